//! Weight initialisation schemes, as `torch.nn.init`, returned as [`Init`] values for
//! [`VarStore::param`](crate::VarStore::param) (which draws them from a seed derived from
//! the parameter's name, so they are reproducible).
//!
//! - Xavier/Glorot (Glorot & Bengio 2010, "Understanding the difficulty of training deep
//!   feedforward neural networks", eq. 16): keep the variance of activations and of
//!   gradients alike, `Var(W) = gain^2 * 2 / (fan_in + fan_out)`.
//! - Kaiming/He (He et al. 2015, "Delving Deep into Rectifiers", eq. 10 and 14): keep the
//!   variance through rectifiers, `Var(W) = gain^2 / fan`, with `fan` the fan-in (forward
//!   pass) or the fan-out (backward pass).
//!
//! A uniform `U(-a, a)` has variance `a^2 / 3`, so its bound is `sqrt(3) * std`.
//! PyTorch's default for `Linear` and the convolutions is [`kaiming_uniform`] with
//! `a = sqrt(5)` on a leaky ReLU, which works out to `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`,
//! and the same bound for the bias ([`bias_uniform`]).

use crate::Init;
use aigc_tensor::{Error, Result};

/// The nonlinearity that follows a layer, which sets the gain of its initialisation
/// (`torch.nn.init.calculate_gain`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nonlinearity {
    /// No nonlinearity; also every convolution (`conv1d` .. `conv_transpose3d`): gain 1.
    Linear,
    /// Gain 1.
    Sigmoid,
    /// Gain 5/3.
    Tanh,
    /// Gain `sqrt(2)`.
    Relu,
    /// Gain `sqrt(2 / (1 + slope^2))`, the slope given as the `param` (default 0.01).
    LeakyRelu,
    /// Gain 3/4 (for self-normalising networks, as PyTorch).
    Selu,
}

/// Which fan the Kaiming schemes keep the variance for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FanMode {
    /// The number of inputs to each output: preserves the variance of activations.
    FanIn,
    /// The number of outputs each input feeds: preserves the variance of gradients.
    FanOut,
}

/// The `(fan_in, fan_out)` of a weight of `shape`, as PyTorch computes them: for
/// `[d0, d1, k..]`, `fan_in = d1 * prod(k)` and `fan_out = d0 * prod(k)`. This is right
/// for `Linear` (`[out, in]`) and convolutions (`[out, in / groups, k..]`); for a
/// transposed convolution (`[in, out / groups, k..]`) PyTorch uses it unchanged, so
/// its "fan-in" is `out / groups * prod(k)`. A weight needs at least 2 dims.
pub fn calculate_fan_in_and_fan_out(shape: &[usize]) -> Result<(usize, usize)> {
    if shape.len() < 2 {
        return Err(Error::invalid(
            "calculate_fan_in_and_fan_out",
            format!("shape {shape:?}: fan in and fan out need a weight with at least 2 dims"),
        ));
    }
    let receptive_field: usize = shape[2..].iter().product();
    Ok((shape[1] * receptive_field, shape[0] * receptive_field))
}

/// The recommended gain for `nonlinearity`; `param` is the negative slope of
/// [`Nonlinearity::LeakyRelu`] (0.01 when `None`) and is ignored by the others.
pub fn calculate_gain(nonlinearity: Nonlinearity, param: Option<f64>) -> Result<f64> {
    Ok(match nonlinearity {
        Nonlinearity::Linear | Nonlinearity::Sigmoid => 1.0,
        Nonlinearity::Tanh => 5.0 / 3.0,
        Nonlinearity::Relu => 2f64.sqrt(),
        Nonlinearity::LeakyRelu => {
            let slope = param.unwrap_or(0.01);
            if !slope.is_finite() {
                return Err(Error::invalid("calculate_gain", format!("negative slope {slope} is not finite")));
            }
            (2.0 / (1.0 + slope * slope)).sqrt()
        }
        Nonlinearity::Selu => 0.75,
    })
}

/// Xavier/Glorot uniform: `U(-a, a)` with `a = gain * sqrt(6 / (fan_in + fan_out))`.
pub fn xavier_uniform(shape: &[usize], gain: f64) -> Result<Init> {
    let std = xavier_std("xavier_uniform", shape, gain)?;
    Ok(symmetric_uniform(3f64.sqrt() * std))
}

/// Xavier/Glorot normal: `N(0, std^2)` with `std = gain * sqrt(2 / (fan_in + fan_out))`.
pub fn xavier_normal(shape: &[usize], gain: f64) -> Result<Init> {
    let std = xavier_std("xavier_normal", shape, gain)?;
    Ok(Init::Normal { mean: 0.0, std })
}

/// Kaiming/He uniform: `U(-b, b)` with `b = gain * sqrt(3 / fan)`, where `gain` is
/// [`calculate_gain`]`(nonlinearity, Some(a))` (`a` is the negative slope of a leaky
/// ReLU) and `fan` is chosen by `mode`.
pub fn kaiming_uniform(shape: &[usize], a: f64, mode: FanMode, nonlinearity: Nonlinearity) -> Result<Init> {
    let std = kaiming_std("kaiming_uniform", shape, a, mode, nonlinearity)?;
    Ok(symmetric_uniform(3f64.sqrt() * std))
}

/// Kaiming/He normal: `N(0, std^2)` with `std = gain / sqrt(fan)` (see [`kaiming_uniform`]).
pub fn kaiming_normal(shape: &[usize], a: f64, mode: FanMode, nonlinearity: Nonlinearity) -> Result<Init> {
    let std = kaiming_std("kaiming_normal", shape, a, mode, nonlinearity)?;
    Ok(Init::Normal { mean: 0.0, std })
}

/// PyTorch's default bias of `Linear` and the convolutions whose weight has
/// `weight_shape`: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, or zeros when `fan_in` is 0.
pub fn bias_uniform(weight_shape: &[usize]) -> Result<Init> {
    let (fan_in, _) = calculate_fan_in_and_fan_out(weight_shape)?;
    Ok(if fan_in == 0 { Init::Const(0.0) } else { symmetric_uniform(1.0 / (fan_in as f64).sqrt()) })
}

fn symmetric_uniform(bound: f64) -> Init {
    Init::Uniform { lo: -bound, hi: bound }
}

fn xavier_std(op: &'static str, shape: &[usize], gain: f64) -> Result<f64> {
    let (fan_in, fan_out) = calculate_fan_in_and_fan_out(shape)?;
    if fan_in + fan_out == 0 {
        return Err(Error::invalid(op, format!("shape {shape:?} has fan_in + fan_out = 0")));
    }
    Ok(gain * (2.0 / (fan_in + fan_out) as f64).sqrt())
}

fn kaiming_std(op: &'static str, shape: &[usize], a: f64, mode: FanMode, nonlinearity: Nonlinearity) -> Result<f64> {
    let (fan_in, fan_out) = calculate_fan_in_and_fan_out(shape)?;
    let fan = match mode {
        FanMode::FanIn => fan_in,
        FanMode::FanOut => fan_out,
    };
    if fan == 0 {
        return Err(Error::invalid(op, format!("shape {shape:?} has {mode:?} = 0")));
    }
    Ok(calculate_gain(nonlinearity, Some(a))? / (fan as f64).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VarStore;
    use crate::testing::{Tol, assert_close, max_abs};
    use aigc_tensor::{DType, Device};

    fn bound(init: Init) -> f64 {
        match init {
            Init::Uniform { lo, hi } => {
                assert_eq!(lo, -hi);
                hi
            }
            other => panic!("expected a symmetric uniform, got {other:?}"),
        }
    }

    fn std(init: Init) -> f64 {
        match init {
            Init::Normal { mean, std } => {
                assert_eq!(mean, 0.0);
                std
            }
            other => panic!("expected a centred normal, got {other:?}"),
        }
    }

    #[test]
    fn fans_follow_pytorch_for_linear_conv_and_transposed_conv() {
        assert_eq!(calculate_fan_in_and_fan_out(&[4, 16]).unwrap(), (16, 4));
        assert_eq!(calculate_fan_in_and_fan_out(&[8, 3, 5, 5]).unwrap(), (75, 200));
        // ConvTranspose2d(6 -> 4, groups 2): weight [6, 2, 3, 3]; PyTorch's fan_in is 2 * 9.
        assert_eq!(calculate_fan_in_and_fan_out(&[6, 2, 3, 3]).unwrap(), (18, 54));
        let err = calculate_fan_in_and_fan_out(&[5]).unwrap_err().to_string();
        assert_eq!(
            err,
            "calculate_fan_in_and_fan_out: shape [5]: fan in and fan out need a weight with at least 2 dims"
        );
    }

    #[test]
    fn gains_are_pytorchs() {
        let gain = |n, p| calculate_gain(n, p).unwrap();
        assert_eq!(gain(Nonlinearity::Linear, None), 1.0);
        assert_eq!(gain(Nonlinearity::Sigmoid, None), 1.0);
        assert_eq!(gain(Nonlinearity::Tanh, None), 5.0 / 3.0);
        assert_eq!(gain(Nonlinearity::Relu, None), 2f64.sqrt());
        assert_eq!(gain(Nonlinearity::LeakyRelu, None), (2.0f64 / (1.0 + 0.01 * 0.01)).sqrt());
        assert_eq!(gain(Nonlinearity::LeakyRelu, Some(0.2)), (2.0 / 1.04f64).sqrt());
        assert_eq!(gain(Nonlinearity::Selu, None), 0.75);
        assert!(calculate_gain(Nonlinearity::LeakyRelu, Some(f64::NAN)).is_err());
    }

    #[test]
    fn bounds_and_stds_match_pytorchs_formulas() {
        let close = |got: f64, want: f64| assert_close(&got, &want, Tol::abs(1e-12), "bound or std");
        // torch.nn.init.xavier_uniform_(torch.empty(4, 16), gain=2): a = 2 sqrt(6 / 20).
        close(bound(xavier_uniform(&[4, 16], 2.0).unwrap()), 2.0 * (6.0f64 / 20.0).sqrt());
        close(std(xavier_normal(&[4, 16], 1.0).unwrap()), (2.0f64 / 20.0).sqrt());
        // Kaiming with a = sqrt(5) on a leaky ReLU is PyTorch's Linear/Conv default: 1/sqrt(fan_in).
        let default = kaiming_uniform(&[8, 3, 5, 5], 5f64.sqrt(), FanMode::FanIn, Nonlinearity::LeakyRelu).unwrap();
        close(bound(default), 1.0 / 75f64.sqrt());
        close(bound(bias_uniform(&[8, 3, 5, 5]).unwrap()), 1.0 / 75f64.sqrt());
        let relu = kaiming_normal(&[8, 3, 5, 5], 0.0, FanMode::FanOut, Nonlinearity::Relu).unwrap();
        close(std(relu), 2f64.sqrt() / 200f64.sqrt());
        assert_eq!(bias_uniform(&[4, 0]).unwrap(), Init::Const(0.0));
        let err = kaiming_uniform(&[4, 0], 0.0, FanMode::FanIn, Nonlinearity::Relu).unwrap_err().to_string();
        assert_eq!(err, "kaiming_uniform: shape [4, 0] has FanIn = 0");
    }

    #[test]
    fn drawn_parameters_have_the_scheme_statistics() {
        let vs = VarStore::new(DType::F64, &Device::Cpu, 5);
        let shape = [64, 32, 3, 3];
        let init = kaiming_normal(&shape, 0.0, FanMode::FanIn, Nonlinearity::Relu).unwrap();
        let w = vs.param("kaiming", shape, init).unwrap().value().to_vec::<f64>().unwrap();
        let n = w.len() as f64;
        let mean = w.iter().sum::<f64>() / n;
        let sd = (w.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let want = (2.0f64 / (32.0 * 9.0)).sqrt();
        assert!(mean.abs() < 0.05 * want && (sd / want - 1.0).abs() < 0.02, "mean {mean}, sd {sd}");
        let init = xavier_uniform(&shape, 1.0).unwrap();
        let a = bound(init);
        let max = max_abs(vs.param("xavier", shape, init).unwrap().value());
        assert!(max <= a && max > 0.99 * a, "max {max}, bound {a}");
    }
}

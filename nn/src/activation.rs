//! Activation functions as [`Module`]s, named as PyTorch's (`nn.ReLU`, `nn.GELU`, ...), so a
//! [`Sequential`](crate::Sequential) reads like its PyTorch twin:
//! `Sequential::new().layer(linear).layer(GELU::default())`.
//!
//! - [`ReLU`] `max(x, 0)` (Nair & Hinton 2010); [`LeakyReLU`] `x` or `slope * x`
//!   (Maas et al. 2013).
//! - [`GELU`] `x * Phi(x)` (Hendrycks & Gimpel 2016), exact or in its tanh approximation.
//! - [`SiLU`] `x * sigmoid(x)` (Elfwing et al. 2018; "Swish"), [`Tanh`], [`Sigmoid`].
//! - [`Softplus`] `log(1 + e^{beta x}) / beta`, linear where `beta x > threshold`.

use crate::Module;
use aigc_autograd::Var;
use aigc_tensor::Result;

/// `max(x, 0)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReLU;

/// `x` where `x >= 0`, `negative_slope * x` elsewhere.
#[derive(Clone, Copy, Debug)]
pub struct LeakyReLU {
    /// The slope for negative inputs (PyTorch's default 0.01).
    pub negative_slope: f64,
}

impl Default for LeakyReLU {
    fn default() -> Self {
        LeakyReLU { negative_slope: 0.01 }
    }
}

/// `x * Phi(x)`, with `Phi` the standard normal CDF.
#[derive(Clone, Copy, Debug, Default)]
pub struct GELU {
    /// Use the tanh approximation `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`
    /// (PyTorch's `approximate="tanh"`, GPT-2's GELU) instead of the exact erf form.
    pub approximate: bool,
}

/// `x * sigmoid(x)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SiLU;

/// `tanh(x)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tanh;

/// `1 / (1 + e^{-x})`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sigmoid;

/// `log(1 + e^{beta x}) / beta`, and `x` itself where `beta x > threshold` (where the two
/// agree to within rounding), as PyTorch's `nn.Softplus`.
#[derive(Clone, Copy, Debug)]
pub struct Softplus {
    /// Sharpness (PyTorch's default 1).
    pub beta: f64,
    /// Above this value of `beta x` the function is taken as linear (default 20).
    pub threshold: f64,
}

impl Default for Softplus {
    fn default() -> Self {
        Softplus { beta: 1.0, threshold: 20.0 }
    }
}

impl Module for ReLU {
    fn forward(&self, x: &Var) -> Result<Var> {
        x.relu()
    }
}

impl Module for LeakyReLU {
    fn forward(&self, x: &Var) -> Result<Var> {
        x.leaky_relu(self.negative_slope)
    }
}

impl Module for GELU {
    fn forward(&self, x: &Var) -> Result<Var> {
        if self.approximate { x.gelu_tanh() } else { x.gelu() }
    }
}

impl Module for SiLU {
    fn forward(&self, x: &Var) -> Result<Var> {
        x.silu()
    }
}

impl Module for Tanh {
    fn forward(&self, x: &Var) -> Result<Var> {
        x.tanh()
    }
}

impl Module for Sigmoid {
    fn forward(&self, x: &Var) -> Result<Var> {
        x.sigmoid()
    }
}

impl Module for Softplus {
    fn forward(&self, x: &Var) -> Result<Var> {
        let scaled = x.affine(self.beta, 0.0)?;
        let smooth = scaled.softplus()?.affine(1.0 / self.beta, 0.0)?;
        x.where_cond(&scaled.value().gt(self.threshold)?, &smooth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Sequential;
    use crate::testing::{Tol, assert_close};
    use aigc_autograd::gradcheck;
    use aigc_tensor::{Device, Tensor};

    fn values(module: &dyn Module, xs: &[f64]) -> Vec<f64> {
        let x = Var::constant(Tensor::new(xs, &Device::Cpu).unwrap());
        module.forward(&x).unwrap().value().to_vec::<f64>().unwrap()
    }

    /// The tolerance against the formulas, evaluated in f64.
    const TOL: Tol = Tol::abs(1e-12);

    #[test]
    fn activations_compute_their_formulas() {
        let xs = [-2.0, -0.5, 0.0, 1.5];
        let map = |f: fn(f64) -> f64| xs.iter().map(|&x| f(x)).collect::<Vec<_>>();
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        assert_close(&values(&ReLU, &xs), &map(|x| x.max(0.0)), TOL, "ReLU");
        assert_close(
            &values(&LeakyReLU::default(), &xs),
            &map(|x| if x >= 0.0 { x } else { 0.01 * x }),
            TOL,
            "LeakyReLU",
        );
        assert_close(
            &values(&LeakyReLU { negative_slope: 0.2 }, &xs),
            &map(|x| if x >= 0.0 { x } else { 0.2 * x }),
            TOL,
            "LeakyReLU(0.2)",
        );
        assert_close(&values(&SiLU, &xs), &map(|x| x / (1.0 + (-x).exp())), TOL, "SiLU");
        assert_close(&values(&Tanh, &xs), &map(f64::tanh), TOL, "Tanh");
        assert_close(&values(&Sigmoid, &xs), &map(sigmoid), TOL, "Sigmoid");
        let tanh_gelu =
            |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
        assert_close(&values(&GELU { approximate: true }, &xs), &map(tanh_gelu), TOL, "tanh GELU");
        // Exact GELU at known points: Phi(0) = 1/2, Phi(1.5) = 0.9331927987311419.
        let exact = values(&GELU::default(), &[0.0, 1.5]);
        assert_close(&exact, &[0.0, 1.5 * 0.933_192_798_731_141_9], TOL, "exact GELU");
    }

    #[test]
    fn softplus_is_linear_above_the_threshold_and_smooth_below() {
        let soft = Softplus { beta: 2.0, threshold: 3.0 };
        let got = values(&soft, &[-1.0, 0.5, 1.4, 1.6, 40.0]);
        let smooth = |x: f64| (1.0 + (2.0 * x).exp()).ln() / 2.0;
        assert_close(&got, &[smooth(-1.0), smooth(0.5), smooth(1.4), 1.6, 40.0], TOL, "Softplus(2, 3)");
        let x = Tensor::new(&[-1.0f64, 0.5, 1.4, 1.6, 4.0], &Device::Cpu).unwrap();
        gradcheck(|v| soft.forward(&v[0]), &[&x], "Softplus").unwrap();
        assert_close(&values(&Softplus::default(), &[1000.0, -1000.0]), &[1000.0, 0.0], TOL, "Softplus at +-1000");
    }

    #[test]
    fn activations_compose_in_a_sequential() {
        let model = Sequential::new().layer(LeakyReLU { negative_slope: 0.5 }).layer(Tanh).layer(ReLU);
        assert_close(&values(&model, &[-1.0, 2.0]), &[0.0, 2f64.tanh()], TOL, "Sequential");
    }
}

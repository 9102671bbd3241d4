//! `Linear`: `y = x W^T + b`, PyTorch's layout (`weight` is `[out, in]`) and default
//! initialisation: `W, b ~ U(-1/sqrt(in), 1/sqrt(in))` (kaiming-uniform with `a = sqrt 5`).
//! The bias, and an activation that follows the layer ([`Linear::forward_with`]), are
//! applied in the GEMM's epilogue (`Var::matmul_bias_act`).

use crate::{Init, Module, VarStore};
use aigc_autograd::Var;
use aigc_tensor::{Result, UnaryOp};

/// A fully connected layer.
pub struct Linear {
    pub weight: Var,
    pub bias: Option<Var>,
}

impl Linear {
    /// `in_features -> out_features` with a bias.
    pub fn new(vs: &VarStore, in_features: usize, out_features: usize) -> Result<Linear> {
        Self::with_bias(vs, in_features, out_features, true)
    }

    /// `in_features -> out_features`, with or without a bias.
    pub fn with_bias(vs: &VarStore, in_features: usize, out_features: usize, bias: bool) -> Result<Linear> {
        let bound = 1.0 / (in_features.max(1) as f64).sqrt();
        let init = Init::Uniform { lo: -bound, hi: bound };
        let weight = vs.param("weight", [out_features, in_features], init)?;
        let bias = if bias { Some(vs.param("bias", [out_features], init)?) } else { None };
        Ok(Linear { weight, bias })
    }

    /// `activation(x W^T + b)`: the layer and the activation after it, fused into the
    /// product's epilogue when no gradient is recorded (inference, sampling).
    pub fn forward_with(&self, x: &Var, activation: UnaryOp) -> Result<Var> {
        x.matmul_bias_act(&self.weight.t()?, self.bias.as_ref(), Some(activation))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Var) -> Result<Var> {
        x.matmul_bias_act(&self.weight.t()?, self.bias.as_ref(), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigc_tensor::{DType, Device, Tensor};

    #[test]
    fn linear_computes_x_wt_plus_b_and_initialises_like_pytorch() {
        let vs = VarStore::new(DType::F64, &Device::Cpu, 0);
        let lin = Linear::new(&vs.pp("fc"), 16, 4).unwrap();
        let w = lin.weight.value().to_vec::<f64>().unwrap();
        assert!(w.iter().all(|v| v.abs() <= 0.25) && w.iter().any(|v| v.abs() > 0.2));
        let x = Var::constant(Tensor::ones([2, 16], DType::F64, &Device::Cpu).unwrap());
        let y = lin.forward(&x).unwrap().value().to_vec::<f64>().unwrap();
        let b = lin.bias.as_ref().unwrap().value().to_vec::<f64>().unwrap();
        for o in 0..4 {
            let want: f64 = w[o * 16..(o + 1) * 16].iter().sum::<f64>() + b[o];
            assert!((y[o] - want).abs() < 1e-12 && (y[4 + o] - want).abs() < 1e-12);
        }
        let names: Vec<String> = vs.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["fc.weight", "fc.bias"]);
    }
}

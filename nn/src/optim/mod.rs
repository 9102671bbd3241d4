//! Optimizers over named parameters, each step one fused in-place kernel per parameter
//! (`Tensor::sgd_step_`, `Tensor::adam_step_`), and global-norm gradient clipping.

mod adam;
pub mod ema;
pub mod rmsprop;
pub mod schedule;
mod sgd;

pub use adam::{Adam, AdamConfig, AdamW};
pub use sgd::{Sgd, SgdConfig};

use aigc_autograd::Var;
use aigc_tensor::Result;

/// What every optimizer offers.
pub trait Optimizer {
    /// Applies one update from the parameters' accumulated gradients. Parameters
    /// without a gradient are left as they are.
    fn step(&mut self) -> Result<()>;
    /// The parameters this optimizer updates.
    fn parameters(&self) -> Vec<Var>;
    /// The current learning rate.
    fn lr(&self) -> f64;
    /// Sets the learning rate (schedulers call this before `step`).
    fn set_lr(&mut self, lr: f64);
    /// Clears every parameter's gradient.
    fn zero_grad(&self) {
        for p in self.parameters() {
            p.zero_grad();
        }
    }
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`; returns the
/// norm before clipping (as `torch.nn.utils.clip_grad_norm_`).
pub fn clip_grad_norm(params: &[Var], max_norm: f64) -> Result<f64> {
    let mut total = 0.0f64;
    for p in params {
        if let Some(g) = p.grad() {
            total += g.to_dtype(aigc_tensor::DType::F64)?.square()?.sum_all()?.to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for p in params {
            if let Some(g) = p.grad() {
                p.set_grad(Some(g.affine(scale, 0.0)?));
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigc_tensor::{Device, Tensor};

    #[test]
    fn clipping_scales_the_global_norm_down_to_the_limit() {
        let a = Var::leaf(Tensor::zeros([2], aigc_tensor::DType::F64, &Device::Cpu).unwrap());
        let b = Var::leaf(Tensor::zeros([1], aigc_tensor::DType::F64, &Device::Cpu).unwrap());
        a.set_grad(Some(Tensor::new(&[3.0f64, 0.0], &Device::Cpu).unwrap()));
        b.set_grad(Some(Tensor::new(&[4.0f64], &Device::Cpu).unwrap()));
        let norm = clip_grad_norm(&[a.clone(), b.clone()], 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        let ga = a.grad().unwrap().to_vec::<f64>().unwrap();
        let gb = b.grad().unwrap().to_vec::<f64>().unwrap();
        assert!(((ga[0] * ga[0] + gb[0] * gb[0]).sqrt() - 1.0).abs() < 1e-5);
        assert!(clip_grad_norm(&[a], 10.0).unwrap() < 1.0 + 1e-5);
    }
}

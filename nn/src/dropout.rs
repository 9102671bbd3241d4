//! [`Dropout`] (Srivastava et al. 2014, "Dropout: A Simple Way to Prevent Neural Networks
//! from Overfitting", section 4), in its inverted form as PyTorch's `nn.Dropout`: in
//! training each element is zeroed with probability `p` and the survivors are scaled by
//! `1 / (1 - p)`, so the expected activation is unchanged and evaluation is the identity.
//!
//! The masks are reproducible: each forward in training draws a fresh seed from the
//! store's seed stream ([`VarStore::next_seed`]), which checkpoints save and restore, so a
//! resumed run draws the same masks as an uninterrupted one.

use crate::{Module, VarStore};
use aigc_autograd::Var;
use aigc_tensor::{Error, Result};

/// Inverted dropout with drop probability `p`, active only in training mode.
pub struct Dropout {
    vs: VarStore,
    p: f64,
}

impl Dropout {
    /// Dropout with probability `p` in `[0, 1)`; the store supplies the mode and the seeds.
    pub fn new(vs: &VarStore, p: f64) -> Result<Dropout> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid("Dropout", format!("p = {p}: need 0 <= p < 1")));
        }
        Ok(Dropout { vs: vs.clone(), p })
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.p
    }
}

impl Module for Dropout {
    fn forward(&self, x: &Var) -> Result<Var> {
        if self.p == 0.0 || !self.vs.is_training() {
            return Ok(x.clone());
        }
        x.dropout(self.p, self.vs.next_seed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigc_tensor::{DType, Device, Tensor};

    fn ones(n: usize) -> Var {
        Var::leaf(Tensor::ones([n], DType::F32, &Device::Cpu).unwrap())
    }

    #[test]
    fn training_drops_and_rescales_and_eval_is_the_identity() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        let dropout = Dropout::new(&vs, 0.25).unwrap();
        let x = ones(4000);
        let y = dropout.forward(&x).unwrap().value().to_vec::<f32>().unwrap();
        assert!(y.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
        let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
        assert!((dropped - 0.25).abs() < 0.03, "dropped fraction {dropped}");
        vs.set_training(false);
        let y = dropout.forward(&x).unwrap();
        assert_eq!(y.id(), x.id(), "eval mode returns the input itself");
        vs.set_training(true);
        assert_eq!(Dropout::new(&vs, 0.0).unwrap().forward(&x).unwrap().id(), x.id());
    }

    #[test]
    fn masks_are_fresh_each_step_and_reproducible_from_the_seed_stream() {
        let masks = |vs: &VarStore| {
            let dropout = Dropout::new(vs, 0.5).unwrap();
            (0..2).map(|_| dropout.forward(&ones(64)).unwrap().value().to_vec::<f32>().unwrap()).collect::<Vec<_>>()
        };
        let vs = VarStore::new(DType::F32, &Device::Cpu, 9);
        let first = masks(&vs);
        assert_ne!(first[0], first[1], "each forward draws a new mask");
        assert_eq!(first, masks(&VarStore::new(DType::F32, &Device::Cpu, 9)), "same seed, same masks");
        // Resuming after one step (the draw counter restored) continues the same sequence.
        let resumed = VarStore::new(DType::F32, &Device::Cpu, 9);
        resumed.set_seed_draws(1);
        assert_eq!(masks(&resumed)[0], first[1]);
        assert_ne!(first, masks(&VarStore::new(DType::F32, &Device::Cpu, 10)));
    }

    #[test]
    fn the_gradient_flows_through_the_kept_elements_only() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        let x = ones(32);
        let y = Dropout::new(&vs, 0.5).unwrap().forward(&x).unwrap();
        y.sum_all().unwrap().backward().unwrap();
        assert_eq!(x.grad().unwrap().to_vec::<f32>().unwrap(), y.value().to_vec::<f32>().unwrap());
    }

    #[test]
    fn p_outside_zero_to_one_is_an_error() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        for p in [-0.1, 1.0, f64::NAN] {
            let err = Dropout::new(&vs, p).err().unwrap().to_string();
            assert_eq!(err, format!("Dropout: p = {p}: need 0 <= p < 1"));
        }
    }
}

//! The [`Module`] trait: a model is a struct of layers whose `forward` maps an input
//! `Var` to an output `Var`. Parameters are not stored in the trait: they live in the
//! [`VarStore`](crate::VarStore) the model was built from, under hierarchical names.

use aigc_autograd::Var;
use aigc_tensor::Result;

/// Something with a forward pass.
pub trait Module {
    fn forward(&self, x: &Var) -> Result<Var>;
}

/// Closures are modules too: `Activation(|x| x.relu())`.
pub struct Activation<F: Fn(&Var) -> Result<Var>>(pub F);

impl<F: Fn(&Var) -> Result<Var>> Module for Activation<F> {
    fn forward(&self, x: &Var) -> Result<Var> {
        (self.0)(x)
    }
}

/// Layers applied one after another.
#[derive(Default)]
pub struct Sequential {
    layers: Vec<Box<dyn Module + Send + Sync>>,
}

impl Sequential {
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends a layer.
    pub fn layer(mut self, layer: impl Module + Send + Sync + 'static) -> Self {
        self.layers.push(Box::new(layer));
        self
    }
    /// Appends an elementwise function (an activation).
    pub fn then(self, f: impl Fn(&Var) -> Result<Var> + Send + Sync + 'static) -> Self {
        self.layer(Activation(f))
    }
    pub fn len(&self) -> usize {
        self.layers.len()
    }
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

impl Module for Sequential {
    fn forward(&self, x: &Var) -> Result<Var> {
        self.layers.iter().try_fold(x.clone(), |h, layer| layer.forward(&h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdamConfig, AdamW, Linear, Optimizer, VarStore, loss};
    use aigc_tensor::{DType, Device, Tensor};

    #[test]
    fn an_mlp_learns_xor() {
        let dev = Device::Cpu;
        let vs = VarStore::new(DType::F32, &dev, 3);
        let model = Sequential::new()
            .layer(Linear::new(&vs.pp("0"), 2, 16).unwrap())
            .then(|x| x.tanh())
            .layer(Linear::new(&vs.pp("2"), 16, 2).unwrap());
        let x = Var::constant(Tensor::from_vec(vec![0.0f32, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0], [4, 2], &dev).unwrap());
        let y = Tensor::new(&[0i64, 1, 1, 0], &dev).unwrap();
        let mut opt = AdamW::adamw(vs.named_parameters(), AdamConfig { lr: 0.05, ..Default::default() }).unwrap();
        let first = loss::cross_entropy(&model.forward(&x).unwrap(), &y).unwrap().value().to_scalar::<f32>().unwrap();
        for _ in 0..200 {
            let l = loss::cross_entropy(&model.forward(&x).unwrap(), &y).unwrap();
            opt.zero_grad();
            l.backward().unwrap();
            opt.step().unwrap();
        }
        let last = loss::cross_entropy(&model.forward(&x).unwrap(), &y).unwrap().value().to_scalar::<f32>().unwrap();
        assert!(last < 0.05 * first, "loss {first} -> {last}");
        let predicted = model.forward(&x).unwrap().value().argmax(-1, false).unwrap().to_vec::<i64>().unwrap();
        assert_eq!(predicted, vec![0, 1, 1, 0]);
    }
}

//! [`Embedding`]: a lookup table of learnt vectors, row `i` for token id `i` (Bengio et
//! al. 2003, "A Neural Probabilistic Language Model", the shared feature matrix `C`), as
//! PyTorch's `nn.Embedding`: weight `[num_embeddings, embedding_dim]` drawn from
//! `N(0, 1)`. Rows looked up several times accumulate their gradients.

use crate::{Init, Module, VarStore};
use aigc_autograd::Var;
use aigc_tensor::{DType, Error, Result, Tensor};

/// A table of `num_embeddings` vectors of size `embedding_dim`.
pub struct Embedding {
    /// `[num_embeddings, embedding_dim]`; public so that a language model can tie it with
    /// its output projection.
    pub weight: Var,
}

impl Embedding {
    /// A table with rows drawn from `N(0, 1)`, as PyTorch.
    pub fn new(vs: &VarStore, num_embeddings: usize, embedding_dim: usize) -> Result<Embedding> {
        let weight = vs.param("weight", [num_embeddings, embedding_dim], Init::Normal { mean: 0.0, std: 1.0 })?;
        Ok(Embedding { weight })
    }

    /// The number of rows (the vocabulary size).
    pub fn num_embeddings(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The size of each vector.
    pub fn embedding_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    /// The rows for `ids` (i64, any shape), shaped `[ids.shape.., embedding_dim]`.
    pub fn forward_ids(&self, ids: &Tensor) -> Result<Var> {
        if ids.dtype() != DType::I64 {
            return Err(Error::UnsupportedDType { op: "Embedding", dtype: ids.dtype(), expected: "i64 token ids" });
        }
        let n = self.num_embeddings();
        let values = ids.to_vec::<i64>()?;
        if let Some((at, id)) = values.iter().enumerate().find(|&(_, &id)| !(0..n as i64).contains(&id)) {
            return Err(Error::invalid(
                "Embedding",
                format!(
                    "id {id} (element {at} of ids of shape {}) is out of range for {n} embeddings: expected 0..{n}",
                    ids.shape()
                ),
            ));
        }
        self.weight.embedding(ids)
    }
}

/// Looks up the i64 ids held in the input (a constant `Var`); see [`Embedding::forward_ids`].
impl Module for Embedding {
    fn forward(&self, ids: &Var) -> Result<Var> {
        self.forward_ids(ids.value())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Fixture, LAYERS_TOL};
    use aigc_tensor::Device;

    #[test]
    fn lookup_and_gradient_match_pytorch() {
        let fx = Fixture::layers();
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        let emb = Embedding::new(&vs.pp("embedding"), 10, 4).unwrap();
        fx.load_params(&vs, "");
        let out = emb.forward(&Var::constant(fx.get("embedding.ids"))).unwrap();
        fx.assert_matches(out.value(), "embedding.out", LAYERS_TOL);
        out.mul(&Var::constant(fx.get("embedding.proj"))).unwrap().sum_all().unwrap().backward().unwrap();
        fx.assert_grads(&vs.pp("embedding"), |param| format!("embedding.{param}.grad"), LAYERS_TOL);
    }

    #[test]
    fn weights_are_standard_normal() {
        let vs = VarStore::new(DType::F64, &Device::Cpu, 0);
        let emb = Embedding::new(&vs, 100, 50).unwrap();
        assert_eq!((emb.num_embeddings(), emb.embedding_dim()), (100, 50));
        let w = emb.weight.value().to_vec::<f64>().unwrap();
        let mean = w.iter().sum::<f64>() / w.len() as f64;
        let var = w.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / w.len() as f64;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.06, "mean {mean}, var {var}");
    }

    #[test]
    fn bad_ids_are_errors_naming_the_id_and_the_table() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        let emb = Embedding::new(&vs, 10, 4).unwrap();
        let ids = Tensor::from_vec(vec![1i64, 10, 3, -1], [2, 2], &Device::Cpu).unwrap();
        let err = emb.forward_ids(&ids).unwrap_err().to_string();
        assert_eq!(
            err,
            "Embedding: id 10 (element 1 of ids of shape [2, 2]) is out of range for 10 embeddings: expected 0..10"
        );
        let err = emb.forward(&Var::constant(Tensor::new(&[1.0f32], &Device::Cpu).unwrap())).unwrap_err();
        assert_eq!(err.to_string(), "Embedding: not supported for dtype f32 (expected i64 token ids)");
    }
}

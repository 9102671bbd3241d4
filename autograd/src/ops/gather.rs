//! Differentiable per-element indexing, embedding lookup and dropout.
//!
//! `gather` picks one element per index position along a dim; `scatter_add` adds one
//! element per index position back. Each is the other's gradient (as `index_select` and
//! `index_add` in `index.rs`), so both are differentiable any number of times:
//!
//! - `y = x.gather(d, idx)`: `dx = zeros.scatter_add(d, idx, dy)`;
//! - `y = x.scatter_add(d, idx, s)`: `dx = dy`, `ds = dy.gather(d, idx)`.
//!
//! `embedding` is `index_select` of rows and a reshape. `dropout` (Srivastava et al. 2014,
//! inverted: kept elements are scaled by `1 / (1 - p)`) multiplies by a constant mask, so
//! its gradient is the same mask times the incoming gradient; the mask is redrawn from the
//! seed in the backward rule rather than stored.

use crate::Var;
use aigc_tensor::{DType, Error, Result, Tensor};

impl Var {
    /// `out[i][j][k] = self[i][indices[i][j][k]][k]` for `dim = 1`, and likewise for any
    /// rank and dim (`torch.gather`); `indices` (i64) is constant. See
    /// [`Tensor::gather`] for the shapes allowed.
    pub fn gather(&self, dim: isize, indices: &Tensor) -> Result<Var> {
        let value = self.value().gather(dim, indices)?;
        let indices = indices.clone();
        self.unary_op("gather", value, move |_, g, x| x.zeros_like()?.scatter_add(dim, &indices, g))
    }

    /// This var with `source[i][j][k]` added at `[i][indices[i][j][k]][k]` for `dim = 1`,
    /// and likewise for any rank and dim; repeats accumulate (`torch.scatter_add`, out of
    /// place). Only the leading box of `source` that `indices` spans is used, so the rest
    /// of `source` gets a zero gradient. See [`Tensor::scatter_add`] for the shapes allowed.
    pub fn scatter_add(&self, dim: isize, indices: &Tensor, source: &Var) -> Result<Var> {
        let value = self.value().scatter_add(dim, indices, source.value())?;
        // Cut `source` to the box it is read from (a differentiable view, whose gradient
        // is zero-padded back), so the rule below sees `source` of the index's shape.
        let source = source.leading_box(indices.dims())?;
        let indices = indices.clone();
        self.binary_op(&source, "scatter_add", value, move |_, g, _, _| Ok((g.clone(), g.gather(dim, &indices)?)))
    }

    /// Rows `ids` (i64, any shape) of this `[vocab, dim]` weight, shaped `[ids.shape.., dim]`
    /// (`torch.nn.functional.embedding`). Built from `index_select` and `reshape`, so rows
    /// looked up several times accumulate their gradients.
    pub fn embedding(&self, ids: &Tensor) -> Result<Var> {
        const OP: &str = "embedding";
        if self.rank() != 2 {
            return Err(Error::bad_shape(OP, &self.shape(), "the weight must be 2-d: [vocab, dim]"));
        }
        if ids.dtype() != DType::I64 {
            return Err(Error::UnsupportedDType { op: OP, dtype: ids.dtype(), expected: "i64 ids" });
        }
        let rows = self.index_select(0, &ids.flatten_all()?)?;
        rows.reshape([ids.dims(), &[self.dims()[1]]].concat())
    }

    /// Inverted dropout with the mask of [`Tensor::dropout`] for the same `p` and `seed`:
    /// each element is zeroed with probability `p`, the rest scaled by `1 / (1 - p)`. The
    /// gradient is the incoming one times the same mask. `p = 0` returns this var itself.
    pub fn dropout(&self, p: f64, seed: u64) -> Result<Var> {
        let value = self.value().dropout(p, seed)?;
        if p == 0.0 {
            return Ok(self.clone());
        }
        self.unary_op("dropout", value, move |_, g, x| {
            // The mask depends only on shape, dtype and seed: dropping out ones redraws it.
            let mask = x.value().ones_like()?.dropout(p, seed)?;
            g.mul(&Var::constant(mask))
        })
    }

    /// The leading box of this var of size `shape` (the first `shape[a]` entries of every
    /// dim `a`), as differentiable narrows; itself when it already has that shape.
    fn leading_box(&self, shape: &[usize]) -> Result<Var> {
        let mut out = self.clone();
        for (d, &n) in shape.iter().enumerate() {
            if out.dims()[d] != n {
                out = out.narrow(d as isize, 0, n)?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::Var;
    use crate::gradcheck::{gradcheck, gradgradcheck};
    use crate::testing::inputs;
    use aigc_tensor::{DType, Device, Tensor};
    use proptest::prelude::*;

    /// A random i64 index of shape `index_dims` with entries in `0..size` (so with repeats
    /// whenever the index is longer than `size`).
    fn random_index(index_dims: &[usize], size: usize, seed: u64) -> Tensor {
        Tensor::randint(0, size as i64, index_dims.to_vec(), &Device::Cpu, seed).unwrap()
    }

    /// A data shape, a dim in it, and an index shape no larger than the data in the other
    /// dims and of any length (1..=4) in `dim`.
    fn gather_case() -> impl Strategy<Value = (Vec<usize>, usize, Vec<usize>, u64)> {
        (proptest::collection::vec(1usize..=3, 1..=3), any::<u64>()).prop_flat_map(|(shape, seed)| {
            let rank = shape.len();
            let index_dims: Vec<BoxedStrategy<usize>> = shape.iter().map(|&n| (1..=n).boxed()).collect::<Vec<_>>();
            (Just(shape), 0..rank, index_dims, 1usize..=4, Just(seed)).prop_map(
                |(shape, dim, mut index, along, seed)| {
                    index[dim] = along;
                    (shape, dim, index, seed)
                },
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn gather_grad_matches_finite_differences_with_repeated_indices(
            (shape, dim, index_dims, seed) in gather_case(), transposed in any::<bool>()
        ) {
            let x = if transposed && shape.len() >= 2 {
                let rev: Vec<usize> = shape.iter().rev().copied().collect();
                inputs::seeded(&rev, seed).permute(&(0..shape.len() as isize).rev().collect::<Vec<_>>()).unwrap()
            } else {
                inputs::seeded(&shape, seed)
            };
            let idx = random_index(&index_dims, shape[dim], seed ^ 1);
            gradcheck(|v| v[0].gather(dim as isize, &idx)?.square(), &[&x], "gather").unwrap();
        }

        #[test]
        fn scatter_add_grads_match_finite_differences_with_repeated_indices(
            (shape, dim, index_dims, seed) in gather_case(), extra in 0usize..2
        ) {
            // `source` may be larger than the index: its unused part gets zero gradient.
            let source_dims: Vec<usize> = index_dims.iter().map(|n| n + extra).collect();
            let x = inputs::seeded(&shape, seed);
            let src = inputs::seeded(&source_dims, seed ^ 2);
            let idx = random_index(&index_dims, shape[dim], seed ^ 3);
            gradcheck(|v| v[0].scatter_add(dim as isize, &idx, &v[1])?.square(), &[&x, &src], "scatter_add").unwrap();
        }

        #[test]
        fn embedding_grad_matches_finite_differences(
            vocab in 1usize..=4, width in 1usize..=3, ids_shape in proptest::collection::vec(1usize..=3, 0..=2),
            seed in any::<u64>()
        ) {
            let weight = inputs::seeded(&[width, vocab], seed).t().unwrap();
            let ids = random_index(&ids_shape, vocab, seed ^ 4);
            gradcheck(|v| v[0].embedding(&ids)?.square(), &[&weight], "embedding").unwrap();
        }
    }

    #[test]
    fn gather_and_scatter_add_second_derivatives_match_finite_differences() {
        let x = inputs::seeded(&[3, 4], 1);
        let idx = Tensor::from_vec(vec![2i64, 0, 2, 1, 1, 1, 0, 3, 3], [3, 3], &Device::Cpu).unwrap();
        gradgradcheck(|v| v[0].gather(1, &idx)?.exp(), &[&x], "gather").unwrap();
        let src = inputs::seeded(&[3, 3], 2);
        let rows = Tensor::from_vec(vec![2i64, 0, 2, 0, 0, 1], [2, 3], &Device::Cpu).unwrap();
        gradgradcheck(
            |v| v[0].scatter_add(0, &rows, &v[1])?.square(),
            &[&x.narrow(1, 0, 3).unwrap(), &src],
            "scatter_add",
        )
        .unwrap();
    }

    #[test]
    fn forward_values_equal_the_tensor_ops() {
        let x = inputs::seeded(&[3, 4], 5);
        let v = Var::leaf(x.clone());
        let idx = Tensor::from_vec(vec![3i64, 0, 0, 2, 1, 3], [3, 2], &Device::Cpu).unwrap();
        assert_eq!(
            v.gather(1, &idx).unwrap().value().to_vec::<f64>().unwrap(),
            x.gather(1, &idx).unwrap().to_vec::<f64>().unwrap()
        );
        let src = inputs::seeded(&[3, 2], 6);
        assert_eq!(
            v.scatter_add(1, &idx, &Var::constant(src.clone())).unwrap().value().to_vec::<f64>().unwrap(),
            x.scatter_add(1, &idx, &src).unwrap().to_vec::<f64>().unwrap()
        );
        let ids = Tensor::from_vec(vec![2i64, 0, 2, 1], [2, 2], &Device::Cpu).unwrap();
        let emb = v.embedding(&ids).unwrap();
        assert_eq!(emb.dims(), &[2, 2, 4]);
        assert_eq!(emb.value().to_vec::<f64>().unwrap(), x.embedding(&ids).unwrap().to_vec::<f64>().unwrap());
        let dropped = v.dropout(0.3, 9).unwrap();
        assert_eq!(dropped.value().to_vec::<f64>().unwrap(), x.dropout(0.3, 9).unwrap().to_vec::<f64>().unwrap());
    }

    #[test]
    fn dropout_gradient_is_the_forward_mask_scaling() {
        let p = 0.4;
        let x = Tensor::full(2.0, [4, 5], DType::F32, &Device::Cpu).unwrap();
        let v = Var::leaf(x.clone());
        let y = v.dropout(p, 17).unwrap();
        y.sum_all().unwrap().backward().unwrap();
        let grad = v.grad().unwrap().to_vec::<f32>().unwrap();
        let out = y.value().to_vec::<f32>().unwrap();
        let scale = (1.0 / (1.0 - p)) as f32;
        // Where the forward kept x = 2 (scaled to 2 * scale) the gradient is the scale; 0 elsewhere.
        for (o, g) in out.iter().zip(&grad) {
            assert_eq!(*g, if *o == 0.0 { 0.0 } else { scale }, "output {o}, gradient {g}");
        }
        assert!(grad.contains(&0.0) && grad.contains(&scale), "mask {grad:?} should drop some and keep some");
        gradcheck(|v| v[0].dropout(p, 17)?.square(), &[&inputs::seeded(&[3, 4], 2)], "dropout").unwrap();
    }

    #[test]
    fn dropout_with_zero_probability_is_the_identity_var() {
        let v = Var::leaf(inputs::seeded(&[2, 3], 1));
        assert_eq!(v.dropout(0.0, 3).unwrap().id(), v.id());
    }

    #[test]
    fn bad_arguments_are_reported_with_shapes() {
        let v = Var::leaf(inputs::seeded(&[2, 3], 1));
        let err = v.embedding(&Tensor::new(&[0.0f64], &Device::Cpu).unwrap()).unwrap_err().to_string();
        assert!(err.contains("embedding") && err.contains("i64"), "{err}");
        let cube = Var::leaf(inputs::seeded(&[2, 3, 1], 1));
        let err = cube.embedding(&Tensor::new(&[0i64], &Device::Cpu).unwrap()).unwrap_err().to_string();
        assert!(err.contains("embedding: input of shape [2, 3, 1]: the weight must be 2-d"), "{err}");
        let err = v.embedding(&Tensor::new(&[0i64, 2], &Device::Cpu).unwrap()).unwrap_err().to_string();
        assert!(err.contains("index 2 is out of range for a dimension of size 2"), "{err}");
        let idx = Tensor::from_vec(vec![4i64, 0], [1, 2], &Device::Cpu).unwrap();
        let err = v.gather(1, &idx).unwrap_err().to_string();
        assert!(err.contains("gather: index 4 is out of range for a dimension of size 3"), "{err}");
        let err = v.scatter_add(1, &idx, &v.narrow(0, 0, 1).unwrap()).unwrap_err().to_string();
        assert!(err.contains("scatter_add: index 4 is out of range"), "{err}");
        let err = v.dropout(1.0, 0).unwrap_err().to_string();
        assert!(err.contains("dropout: p = 1: need 0 <= p < 1"), "{err}");
    }
}

//! Differentiable views and joins. A view's gradient is the inverse view of the incoming
//! gradient: reshape back, permute by the inverse permutation, sum over broadcast dims,
//! and pad a narrowed window with zeros (`pad_with_zeros`, whose own gradient is `narrow`).

use crate::Var;
use aigc_tensor::shape::resolve_dim;
use aigc_tensor::{DType, Error, Result, Shape, Tensor};

impl Var {
    /// Same elements, new shape.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Var> {
        let value = self.value().reshape(shape)?;
        self.unary_op("reshape", value, |_, g, x| g.reshape(x.dims()))
    }
    /// The same values stored row-major: itself when they already are, else a copy (the
    /// gradient passes through unchanged). For a value read by several kernels that need
    /// row-major operands, one copy instead of one per kernel.
    pub fn contiguous(&self) -> Result<Var> {
        if self.value().is_contiguous() {
            return Ok(self.clone());
        }
        let value = self.value().contiguous()?;
        self.unary_op("contiguous", value, |_, g, _| Ok(g.clone()))
    }
    /// Merges dims `start..` into one.
    pub fn flatten_from(&self, start: isize) -> Result<Var> {
        let shape = self.value().flatten_from(start)?.shape();
        self.reshape(shape)
    }
    /// All elements as one dim.
    pub fn flatten_all(&self) -> Result<Var> {
        self.reshape(self.numel())
    }
    /// Reorders dims: result dim `i` is input dim `perm[i]`.
    pub fn permute(&self, perm: &[isize]) -> Result<Var> {
        let value = self.value().permute(perm)?;
        let rank = self.rank() as isize;
        let mut inverse = vec![0isize; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[(if p < 0 { p + rank } else { p }) as usize] = i as isize;
        }
        self.unary_op("permute", value, move |_, g, _| g.permute(&inverse))
    }
    /// Swaps two dims.
    pub fn transpose(&self, d0: isize, d1: isize) -> Result<Var> {
        let value = self.value().transpose(d0, d1)?;
        self.unary_op("transpose", value, move |_, g, _| g.transpose(d0, d1))
    }
    /// Swaps the last two dims.
    pub fn t(&self) -> Result<Var> {
        let value = self.value().t()?;
        self.unary_op("t", value, |_, g, _| g.t())
    }
    /// Inserts a size-1 dim.
    pub fn unsqueeze(&self, dim: isize) -> Result<Var> {
        let value = self.value().unsqueeze(dim)?;
        self.unary_op("unsqueeze", value, |_, g, x| g.reshape(x.dims()))
    }
    /// Removes a size-1 dim.
    pub fn squeeze(&self, dim: isize) -> Result<Var> {
        let value = self.value().squeeze(dim)?;
        self.unary_op("squeeze", value, |_, g, x| g.reshape(x.dims()))
    }
    /// Broadcasts to `shape`; the gradient sums over the repeated dims.
    pub fn broadcast_to(&self, shape: impl Into<Shape>) -> Result<Var> {
        let value = self.value().broadcast_to(shape)?;
        self.unary_op("broadcast_to", value, |_, g, x| g.sum_to(x.dims()))
    }
    /// Keeps `len` entries of `dim` from `start`; the gradient is zero-padded back.
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Var> {
        let value = self.value().narrow(dim, start, len)?;
        let d = resolve_dim("narrow", dim, self.rank())?;
        let out = self
            .unary_op("narrow", value, move |_, g, x| g.pad_with_zeros(d as isize, start, x.dims()[d] - start - len))?;
        out.mark_window(crate::tape::Window { dim: d, start });
        Ok(out)
    }
    /// Pads `dim` with `before` zeros in front and `after` behind; the gradient is the
    /// middle part again (`narrow`).
    pub fn pad_with_zeros(&self, dim: isize, before: usize, after: usize) -> Result<Var> {
        let value = self.value().pad_with_zeros(dim, before, after)?;
        let d = resolve_dim("pad_with_zeros", dim, self.rank())?;
        self.unary_op("pad_with_zeros", value, move |_, g, x| g.narrow(d as isize, before, x.dims()[d]))
    }
    /// Entries `start, start + step, ..` below `end` of `dim`.
    pub fn slice(&self, dim: isize, start: usize, end: usize, step: usize) -> Result<Var> {
        if step == 1 {
            return self.narrow(dim, start, end.saturating_sub(start));
        }
        let value = self.value().slice(dim, start, end, step)?;
        let picked = Tensor::arange_step(start as f64, end as f64, step as f64, DType::I64, &self.device())?;
        self.unary_op("slice", value, move |_, g, x| x.zeros_like()?.index_add(dim, &picked, g))
    }
    /// Splits `dim` into pieces of `size` (the last may be smaller).
    pub fn split(&self, size: usize, dim: isize) -> Result<Vec<Var>> {
        let d = resolve_dim("split", dim, self.rank())?;
        if size == 0 {
            return Err(Error::invalid("split", "split size must be at least 1"));
        }
        let n = self.dims()[d];
        (0..n).step_by(size).map(|s| self.narrow(dim, s, size.min(n - s))).collect()
    }
    /// Splits `dim` into `chunks` nearly equal pieces.
    pub fn chunk(&self, chunks: usize, dim: isize) -> Result<Vec<Var>> {
        let d = resolve_dim("chunk", dim, self.rank())?;
        if chunks == 0 {
            return Err(Error::invalid("chunk", "need at least 1 chunk"));
        }
        self.split(self.dims()[d].div_ceil(chunks).max(1), dim)
    }

    /// Concatenates along `dim`; each input's gradient is its window of the output's.
    pub fn cat(vars: &[&Var], dim: isize) -> Result<Var> {
        let values: Vec<&Tensor> = vars.iter().map(|v| v.value()).collect();
        let value = Tensor::cat(&values, dim)?;
        let d = resolve_dim("cat", dim, value.rank())?;
        let sizes: Vec<usize> = vars.iter().map(|v| v.dims()[d]).collect();
        Var::from_op(
            "cat",
            value,
            vars.iter().map(|v| (*v).clone()).collect(),
            Box::new(move |_, g, _| {
                let mut start = 0;
                sizes
                    .iter()
                    .map(|&len| {
                        let piece = g.narrow(d as isize, start, len)?;
                        start += len;
                        Ok(Some(piece))
                    })
                    .collect()
            }),
        )
    }
    /// Stacks along a new dim `dim`.
    pub fn stack(vars: &[&Var], dim: isize) -> Result<Var> {
        let rank = vars.first().map_or(0, |v| v.rank()) as isize + 1;
        let d = if dim < 0 { dim + rank } else { dim };
        let expanded = vars.iter().map(|v| v.unsqueeze(d)).collect::<Result<Vec<_>>>()?;
        Var::cat(&expanded.iter().collect::<Vec<_>>(), d)
    }
}

#[cfg(test)]
mod tests {
    use crate::Var;
    use crate::gradcheck::{gradcheck, gradgradcheck};
    use crate::testing::inputs;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn view_grads_match_finite_differences(x in inputs::strided_nonempty(3, 4), k in 0..9usize) {
            let r = x.rank() as isize;
            match k {
                0 => gradcheck(|v| v[0].reshape(v[0].numel())?.square(), &[&x], "reshape"),
                1 => gradcheck(|v| v[0].permute(&(0..r).rev().collect::<Vec<_>>())?.square(), &[&x], "permute"),
                2 => gradcheck(|v| v[0].unsqueeze(0)?.broadcast_to([&[2usize][..], v[0].dims()].concat())?.square(), &[&x], "broadcast_to"),
                3 => gradcheck(|v| v[0].narrow(-1, v[0].dims()[r as usize - 1] / 2, 1)?.square(), &[&x], "narrow"),
                4 => gradcheck(|v| v[0].slice(0, 0, v[0].dims()[0], 2)?.square(), &[&x], "slice"),
                5 => gradcheck(|v| Var::cat(&[&v[0], &v[0].square()?], 0), &[&x], "cat"),
                6 => gradcheck(|v| Var::stack(&[&v[0], &v[0].exp()?], -1), &[&x], "stack"),
                7 => gradcheck(|v| v[0].pad_with_zeros(0, 1, 2)?.exp(), &[&x], "pad_with_zeros"),
                _ => gradcheck(|v| {
                    let parts = v[0].chunk(2, 0)?;
                    parts[0].square()?.sum_all()?.add(&parts.last().unwrap().sum_all()?)
                }, &[&x], "chunk"),
            }.unwrap();
        }
    }

    #[test]
    fn view_second_derivatives_match_finite_differences() {
        let x = inputs::seeded(&[3, 4], 5);
        gradgradcheck(|v| v[0].t()?.narrow(0, 1, 2)?.square()?.exp(), &[&x], "t+narrow").unwrap();
        gradgradcheck(|v| v[0].slice(1, 0, 4, 3)?.square(), &[&x], "slice").unwrap();
        gradgradcheck(|v| v[0].pad_with_zeros(1, 2, 1)?.square()?.exp(), &[&x], "pad_with_zeros").unwrap();
    }
}

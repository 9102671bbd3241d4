//! Differentiable reductions. `sum`'s gradient broadcasts back over the reduced dims;
//! `max`/`min` send it to the extreme elements (split evenly on ties); `logsumexp`'s is
//! the softmax. `mean`, `var` and `norm` are composed from these.

use crate::Var;
use aigc_tensor::shape::resolve_dims;
use aigc_tensor::{Result, Tensor};

/// The shape of a keepdim reduction of `dims` (empty = all) over `shape`.
fn kept_shape(shape: &[usize], dims: &[isize]) -> Result<Vec<usize>> {
    let dims = if dims.is_empty() { (0..shape.len()).collect() } else { resolve_dims("reduce", dims, shape.len())? };
    Ok(shape.iter().enumerate().map(|(d, &n)| if dims.contains(&d) { 1 } else { n }).collect())
}

impl Var {
    /// Sum over `dims` (empty = all).
    pub fn sum(&self, dims: &[isize], keepdim: bool) -> Result<Var> {
        let kept = kept_shape(self.dims(), dims)?;
        self.unary_op("sum", self.value().sum(dims, keepdim)?, move |_, g, x| {
            g.reshape(&kept[..])?.broadcast_to(x.dims())
        })
    }
    /// Sum of every element (0-d).
    pub fn sum_all(&self) -> Result<Var> {
        self.sum(&[], false)
    }
    /// Mean over `dims` (empty = all).
    pub fn mean(&self, dims: &[isize], keepdim: bool) -> Result<Var> {
        let n = self.numel() / kept_shape(self.dims(), dims)?.iter().product::<usize>().max(1);
        self.sum(dims, keepdim)?.affine(1.0 / n as f64, 0.0)
    }
    /// Mean of every element (0-d).
    pub fn mean_all(&self) -> Result<Var> {
        self.mean(&[], false)
    }
    /// Variance over `dims` with `correction` (1 = unbiased).
    pub fn var(&self, dims: &[isize], keepdim: bool, correction: usize) -> Result<Var> {
        let n = self.numel() / kept_shape(self.dims(), dims)?.iter().product::<usize>().max(1);
        let centered = self.sub(&self.mean(dims, true)?)?;
        centered.square()?.sum(dims, keepdim)?.affine(1.0 / n.saturating_sub(correction) as f64, 0.0)
    }
    fn extreme(&self, op: &'static str, value: Tensor, dims: &[isize]) -> Result<Var> {
        let kept = kept_shape(self.dims(), dims)?;
        let dims = dims.to_vec();
        self.unary_op(op, value, move |y, g, x| {
            let y = y.value().reshape(&kept[..])?;
            let hits = x.value().eq(&y)?.to_dtype(x.dtype())?;
            let share = hits.div(&hits.sum(&dims, true)?)?;
            g.reshape(&kept[..])?.mul(&Var::constant(share))
        })
    }
    /// Maximum over `dims`.
    pub fn max(&self, dims: &[isize], keepdim: bool) -> Result<Var> {
        self.extreme("max", self.value().max(dims, keepdim)?, dims)
    }
    /// Minimum over `dims`.
    pub fn min(&self, dims: &[isize], keepdim: bool) -> Result<Var> {
        self.extreme("min", self.value().min(dims, keepdim)?, dims)
    }
    /// `log(sum(exp(x)))` over `dims`; its gradient is the softmax over them.
    pub fn logsumexp(&self, dims: &[isize], keepdim: bool) -> Result<Var> {
        let kept = kept_shape(self.dims(), dims)?;
        self.unary_op("logsumexp", self.value().logsumexp(dims, keepdim)?, move |y, g, x| {
            let softmax = x.sub(&y.reshape(&kept[..])?)?.exp()?;
            g.reshape(&kept[..])?.mul(&softmax)
        })
    }
    /// The p-norm over `dims`.
    pub fn norm(&self, p: f64, dims: &[isize], keepdim: bool) -> Result<Var> {
        if p == 2.0 {
            return self.square()?.sum(dims, keepdim)?.sqrt();
        }
        self.abs()?.powf(p)?.sum(dims, keepdim)?.powf(1.0 / p)
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.value().numel()
    }
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::{gradcheck, gradgradcheck};
    use crate::testing::inputs;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn reduction_grads_match_finite_differences(x in inputs::strided(3, 4), mask in any::<u8>(), keep in any::<bool>(), k in 0..6usize) {
            prop_assume!(x.numel() > 0);
            let dims: Vec<isize> = (0..x.rank() as isize).filter(|d| (mask >> d) & 1 == 1).collect();
            let x = if k == 3 || k == 4 { inputs::distinct_values(&x) } else { x };
            match k {
                0 => gradcheck(|v| v[0].sum(&dims, keep), &[&x], "sum"),
                1 => gradcheck(|v| v[0].mean(&dims, keep), &[&x], "mean"),
                2 => gradcheck(|v| v[0].var(&dims, keep, 0), &[&x], "var"),
                3 => gradcheck(|v| v[0].max(&dims, keep), &[&x], "max"),
                4 => gradcheck(|v| v[0].min(&dims, keep), &[&x], "min"),
                _ => gradcheck(|v| v[0].logsumexp(&dims, keep), &[&x], "logsumexp"),
            }.unwrap();
        }
    }

    #[test]
    fn reduction_second_derivatives_match_finite_differences() {
        let x = inputs::seeded(&[3, 4], 3);
        gradgradcheck(|v| v[0].logsumexp(&[1], false), &[&x], "logsumexp").unwrap();
        gradgradcheck(|v| v[0].var(&[0], true, 1), &[&x], "var").unwrap();
        gradgradcheck(|v| v[0].norm(2.0, &[-1], false), &[&x], "norm").unwrap();
        gradgradcheck(|v| v[0].norm(3.0, &[], false), &[&x], "norm3").unwrap();
    }
}

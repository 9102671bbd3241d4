//! Reductions over any set of axes, with `keepdim`: sum, sum of squares, mean, var, max,
//! min, argmax, argmin, logsumexp and p-norms. Negative dims count from the end; an empty
//! dim list means every dim.
//!
//! Every reduction moves the reduced dims to the end (a view) and asks the kernel to fold
//! consecutive groups; `mean`, `var`, `logsumexp` and `norm` are composed from those.

use crate::storage::{CpuStorage, map_float, with_any};
use crate::{DType, Error, Result, Tensor};
use aigc_kernels::Layout;
use aigc_kernels::cpu::reduce;

/// What a reduction over `dims` looks like: the permuted input, the group size, and
/// the output shape.
struct Plan {
    grouped: Tensor,
    group: usize,
    out_shape: Vec<usize>,
}

impl Plan {
    /// Runs `fold`, a kernel that folds each run of `group` consecutive elements of the
    /// grouped view into one, and shapes its output; a reduction over a zero-size dim
    /// (no elements in any group) gives `when_empty(out_shape)` instead.
    fn fold(
        self,
        when_empty: impl FnOnce(Vec<usize>) -> Result<Tensor>,
        fold: impl FnOnce(&CpuStorage, &Layout, usize) -> Result<CpuStorage>,
    ) -> Result<Tensor> {
        if self.group == 0 {
            return when_empty(self.out_shape);
        }
        let out = self.grouped.read_cpu(|s, l| fold(s, l, self.group))?;
        Ok(Tensor::from_cpu(out, &self.out_shape))
    }
}

impl Tensor {
    fn reduce_plan(&self, op: &'static str, dims: &[isize], keepdim: bool) -> Result<Plan> {
        let dims = self.reduce_dims(op, dims)?;
        let grouped = self.move_dims_last(&dims);
        let group = dims.iter().map(|&d| self.dims()[d]).product();
        let out_shape = (0..self.rank())
            .filter_map(|d| match (dims.contains(&d), keepdim) {
                (false, _) => Some(self.dims()[d]),
                (true, true) => Some(1),
                (true, false) => None,
            })
            .collect();
        Ok(Plan { grouped, group, out_shape })
    }

    /// Sum over `dims`. Floats accumulate in f64; integers sum to i64.
    pub fn sum(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        let mut plan = self.reduce_plan("sum", dims, keepdim)?;
        if self.dtype() == DType::U8 {
            plan.grouped = plan.grouped.to_dtype(DType::I64)?;
        }
        let dtype = plan.grouped.dtype();
        plan.fold(
            |shape| Tensor::zeros(shape, dtype, &self.device()),
            |s, l, group| {
                Ok(match s {
                    CpuStorage::I64(b) => CpuStorage::I64(reduce::sum_i64(b, l, group)),
                    s => map_float!("sum", s, |b| reduce::sum_float(b, l, group)),
                })
            },
        )
    }

    /// Sum of every element, as a 0-d tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        self.sum(&[], false)
    }

    /// Sum of the squares over `dims` (float dtypes), accumulated in f64, without a
    /// squared copy: `x.square().sum(dims)` reading `x` once.
    pub fn sum_squares(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.expect_float("sum_squares")?;
        self.reduce_plan("sum_squares", dims, keepdim)?.fold(
            |shape| Tensor::zeros(shape, self.dtype(), &self.device()),
            |s, l, group| Ok(map_float!("sum_squares", s, |b| reduce::sum_squares(b, l, group))),
        )
    }

    /// Arithmetic mean over `dims` (float dtypes).
    pub fn mean(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.expect_float("mean")?;
        let plan = self.reduce_plan("mean", dims, keepdim)?;
        self.sum(dims, keepdim)?.div(plan.group as f64)
    }

    /// Mean of every element, as a 0-d tensor.
    pub fn mean_all(&self) -> Result<Tensor> {
        self.mean(&[], false)
    }

    /// Variance over `dims`: `sum((x - mean)^2) / (n - correction)`; `correction = 1` is
    /// the unbiased estimate (PyTorch's default), 0 the population variance.
    pub fn var(&self, dims: &[isize], keepdim: bool, correction: usize) -> Result<Tensor> {
        self.expect_float("var")?;
        let plan = self.reduce_plan("var", dims, keepdim)?;
        let ss = self.sub(&self.mean(dims, true)?)?.sum_squares(dims, keepdim)?;
        ss.div(plan.group.saturating_sub(correction) as f64)
    }

    fn extreme(&self, op: &'static str, dims: &[isize], keepdim: bool, want_max: bool) -> Result<Tensor> {
        self.reduce_plan(op, dims, keepdim)?.fold(
            |shape| match shape.iter().product::<usize>() {
                0 => Tensor::zeros(shape, self.dtype(), &self.device()),
                _ => Err(Error::bad_shape(op, &self.shape(), "cannot reduce over a zero-size dim (no identity)")),
            },
            |s, l, group| Ok(crate::storage::map_any!(s, |b| reduce::extreme(b, l, group, want_max))),
        )
    }

    /// Maximum over `dims` (NaN propagates).
    pub fn max(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.extreme("max", dims, keepdim, true)
    }
    /// Minimum over `dims` (NaN propagates).
    pub fn min(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.extreme("min", dims, keepdim, false)
    }
    /// Maximum of every element, as a 0-d tensor.
    pub fn max_all(&self) -> Result<Tensor> {
        self.max(&[], false)
    }
    /// Minimum of every element, as a 0-d tensor.
    pub fn min_all(&self) -> Result<Tensor> {
        self.min(&[], false)
    }

    fn arg_extreme(&self, op: &'static str, dim: isize, keepdim: bool, want_max: bool) -> Result<Tensor> {
        self.reduce_plan(op, &[dim], keepdim)?.fold(
            |_| Err(Error::bad_shape(op, &self.shape(), format!("dim {dim} has size 0: there is no {op}"))),
            |s, l, group| Ok(CpuStorage::I64(with_any!(s, |b| reduce::arg_extreme(b, l, group, want_max)))),
        )
    }

    /// Index (i64) of the maximum along `dim`; the first one on ties, the first NaN if any.
    pub fn argmax(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        self.arg_extreme("argmax", dim, keepdim, true)
    }
    /// Index (i64) of the minimum along `dim`; the first one on ties, the first NaN if any.
    pub fn argmin(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        self.arg_extreme("argmin", dim, keepdim, false)
    }

    /// `log(sum(exp(x)))` over `dims`, computed stably as `m + log(sum(exp(x - m)))` with
    /// `m` the max (0 where the max is infinite, so all-`-inf` rows give `-inf`).
    pub fn logsumexp(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.expect_float("logsumexp")?;
        let m = self.max(dims, true)?;
        let shift = m.abs()?.lt(f64::INFINITY)?.where_cond(&m, 0.0)?;
        let out = self.sub(&shift)?.exp()?.sum(dims, true)?.log()?.add(&shift)?;
        if keepdim { Ok(out) } else { out.reshape(self.reduce_plan("logsumexp", dims, false)?.out_shape) }
    }

    /// The p-norm over `dims`: `(sum |x|^p)^(1/p)`; `p = 2` is the Euclidean norm.
    pub fn norm(&self, p: f64, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.expect_float("norm")?;
        if p.is_nan() || p <= 0.0 {
            return Err(Error::invalid("norm", format!("p = {p}: need p > 0")));
        }
        if p == 2.0 {
            return self.sum_squares(dims, keepdim)?.sqrt();
        }
        if p.is_infinite() {
            return self.abs()?.max(dims, keepdim);
        }
        self.abs()?.powf(p)?.sum(dims, keepdim)?.powf(1.0 / p)
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::*;
    use crate::{DType, Device, Tensor};
    use proptest::prelude::*;

    /// Naive reduction: folds over every index whose kept coordinates match.
    fn naive(x: &NdArray, dims: &[usize], keepdim: bool, f: impl Fn(&[f64]) -> f64) -> NdArray {
        let out_full: Vec<usize> =
            x.shape.iter().enumerate().map(|(d, &n)| if dims.contains(&d) { 1 } else { n }).collect();
        let mut groups: Vec<Vec<f64>> = vec![vec![]; out_full.iter().product()];
        let out = NdArray::zeros(&out_full);
        for idx in x.indices() {
            let o: Vec<usize> = idx.iter().enumerate().map(|(d, &i)| if dims.contains(&d) { 0 } else { i }).collect();
            groups[out.flat(&o)].push(x.get(&idx));
        }
        let data = groups.iter().map(|g| f(g)).collect();
        let shape = if keepdim {
            out_full
        } else {
            x.shape.iter().enumerate().filter(|(d, _)| !dims.contains(d)).map(|(_, &n)| n).collect()
        };
        NdArray::new(shape, data)
    }

    fn dims_strategy() -> impl Strategy<Value = (Tensor, Vec<usize>, bool)> {
        (strided_tensor(4, 5), any::<u8>(), any::<bool>()).prop_map(|(t, mask, keep)| {
            let dims: Vec<usize> = (0..t.rank()).filter(|d| (mask >> d) & 1 == 1).collect();
            (t, dims, keep)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn sum_mean_var_match_naive_reference((t, dims, keep) in dims_strategy()) {
            let idims: Vec<isize> = dims.iter().map(|&d| d as isize - t.rank() as isize).collect();
            let all: Vec<usize> = if dims.is_empty() { (0..t.rank()).collect() } else { dims.clone() };
            let x = NdArray::from_tensor(&t);
            let sum = naive(&x, &all, keep, |g| g.iter().sum());
            let got = t.sum(&idims, keep).unwrap();
            prop_assert_eq!(got.dims(), &sum.shape[..]);
            assert_close(&got.to_f64_vec().unwrap(), &sum.data, 1e-5, 1e-5, "sum");
            let squares = naive(&x, &all, keep, |g| g.iter().map(|v| v * v).sum());
            let got = t.sum_squares(&idims, keep).unwrap();
            prop_assert_eq!(got.dims(), &squares.shape[..]);
            assert_close(&got.to_f64_vec().unwrap(), &squares.data, 1e-5, 1e-5, "sum_squares");
            let mean = naive(&x, &all, keep, |g| g.iter().sum::<f64>() / g.len() as f64);
            assert_close(&t.mean(&idims, keep).unwrap().to_f64_vec().unwrap(), &mean.data, 1e-5, 1e-5, "mean");
            let var = naive(&x, &all, keep, |g| {
                let m = g.iter().sum::<f64>() / g.len() as f64;
                if g.len() < 2 { f64::NAN } else { g.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (g.len() as f64 - 1.0) }
            });
            assert_close(&t.var(&idims, keep, 1).unwrap().to_f64_vec().unwrap(), &var.data, 1e-4, 1e-5, "var");
        }

        #[test]
        fn max_min_logsumexp_norm_match_naive_reference((t, dims, keep) in dims_strategy()) {
            prop_assume!(t.numel() > 0);
            let all: Vec<usize> = if dims.is_empty() { (0..t.rank()).collect() } else { dims.clone() };
            let idims: Vec<isize> = dims.iter().map(|&d| d as isize).collect();
            let x = NdArray::from_tensor(&t);
            let max = naive(&x, &all, keep, |g| g.iter().cloned().fold(f64::NEG_INFINITY, f64::max));
            prop_assert_eq!(t.max(&idims, keep).unwrap().to_f64_vec().unwrap(), max.data);
            let min = naive(&x, &all, keep, |g| g.iter().cloned().fold(f64::INFINITY, f64::min));
            prop_assert_eq!(t.min(&idims, keep).unwrap().to_f64_vec().unwrap(), min.data);
            let lse = naive(&x, &all, keep, |g| g.iter().map(|v| v.exp()).sum::<f64>().ln());
            assert_close(&t.logsumexp(&idims, keep).unwrap().to_f64_vec().unwrap(), &lse.data, 1e-5, 1e-5, "logsumexp");
            let n3 = naive(&x, &all, keep, |g| g.iter().map(|v| v.abs().powi(3)).sum::<f64>().cbrt());
            assert_close(&t.norm(3.0, &idims, keep).unwrap().to_f64_vec().unwrap(), &n3.data, 1e-4, 1e-5, "norm3");
            let n2 = naive(&x, &all, keep, |g| g.iter().map(|v| v * v).sum::<f64>().sqrt());
            assert_close(&t.norm(2.0, &idims, keep).unwrap().to_f64_vec().unwrap(), &n2.data, 1e-5, 1e-5, "norm2");
        }

        #[test]
        fn argmax_argmin_pick_the_first_extreme(t in strided_tensor(4, 5), d in 0usize..4, keep in any::<bool>()) {
            prop_assume!(t.rank() > 0 && t.numel() > 0);
            let d = d % t.rank();
            let x = NdArray::from_tensor(&t);
            let first = |g: &[f64], want_max: bool| {
                let mut best = 0;
                for (i, &v) in g.iter().enumerate() {
                    if (want_max && v > g[best]) || (!want_max && v < g[best]) { best = i; }
                }
                best as f64
            };
            let am = naive(&x, &[d], keep, |g| first(g, true));
            let got = t.argmax(d as isize, keep).unwrap();
            prop_assert_eq!(got.dtype(), DType::I64);
            prop_assert_eq!(got.dims(), &am.shape[..]);
            prop_assert_eq!(got.to_f64_vec().unwrap(), am.data);
            let an = naive(&x, &[d], keep, |g| first(g, false));
            prop_assert_eq!(t.argmin(d as isize, keep).unwrap().to_f64_vec().unwrap(), an.data);
        }
    }

    #[test]
    fn f64_sums_are_exact_and_half_sums_accumulate_wide() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0, 1000, DType::F64, &dev).unwrap().reshape([10, 100]).unwrap();
        assert_eq!(x.sum(&[1], false).unwrap().to_vec::<f64>().unwrap()[9], (900..1000).sum::<i64>() as f64);
        // 4096 ones in bf16: a bf16 accumulator would stall at 256.
        let ones = Tensor::ones([4096], DType::BF16, &dev).unwrap();
        assert_eq!(ones.sum_all().unwrap().to_f64_vec().unwrap(), vec![4096.0]);
        let v = Tensor::new(&[1.0f64, 2.0, 3.0, 4.0], &dev).unwrap();
        assert!((v.var(&[0], false, 0).unwrap().to_scalar::<f64>().unwrap() - 1.25).abs() < 1e-15);
    }

    #[test]
    fn integer_and_mask_sums_are_i64() {
        let dev = Device::Cpu;
        let m = Tensor::new(&[1.0f32, 5.0, 2.0], &dev).unwrap().gt(1.5).unwrap();
        let s = m.sum_all().unwrap();
        assert_eq!(s.dtype(), DType::I64);
        assert_eq!(s.to_scalar::<i64>().unwrap(), 2);
        let i = Tensor::new(&[3i64, -1, 7], &dev).unwrap();
        assert_eq!(i.max_all().unwrap().to_scalar::<i64>().unwrap(), 7);
        assert_eq!(i.argmin(0, false).unwrap().to_scalar::<i64>().unwrap(), 1);
    }

    #[test]
    fn empty_reductions_follow_pytorch() {
        let dev = Device::Cpu;
        let e = Tensor::zeros([3, 0], DType::F32, &dev).unwrap();
        assert_eq!(e.sum(&[1], false).unwrap().to_vec::<f32>().unwrap(), vec![0.0; 3]);
        assert!(e.mean(&[1], false).unwrap().to_vec::<f32>().unwrap()[0].is_nan());
        assert!(e.max(&[1], false).unwrap_err().to_string().contains("zero-size dim"));
        assert!(e.argmax(1, false).unwrap_err().to_string().contains("dim 1 has size 0"));
        assert_eq!(e.max(&[0], false).unwrap().dims(), &[0]);
    }

    #[test]
    fn logsumexp_is_stable_for_large_and_infinite_inputs() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[1000.0f32, 1000.0, f32::NEG_INFINITY, f32::NEG_INFINITY], &dev)
            .unwrap()
            .reshape([2, 2])
            .unwrap();
        let l = x.logsumexp(&[1], false).unwrap().to_vec::<f32>().unwrap();
        assert!((l[0] - (1000.0 + 2f32.ln())).abs() < 1e-3);
        assert_eq!(l[1], f32::NEG_INFINITY);
    }

    #[test]
    fn reduction_errors_name_the_op() {
        let dev = Device::Cpu;
        let x = Tensor::zeros([2, 3], DType::F32, &dev).unwrap();
        assert_eq!(
            x.sum(&[2], false).unwrap_err().to_string(),
            "sum: dim 2 is out of range for a tensor of rank 2 (expected -2..2)"
        );
        assert!(x.sum(&[1, -1], false).unwrap_err().to_string().contains("same dimension twice"));
        let i = Tensor::zeros([2], DType::I64, &dev).unwrap();
        assert!(i.mean_all().unwrap_err().to_string().starts_with("mean: not supported for dtype i64"));
        assert!(
            i.sum_squares(&[], false).unwrap_err().to_string().starts_with("sum_squares: not supported for dtype i64")
        );
        let empty = Tensor::zeros([2, 0], DType::F32, &dev).unwrap();
        assert_eq!(empty.sum_squares(&[1], false).unwrap().to_vec::<f32>().unwrap(), vec![0.0, 0.0]);
        assert!(x.norm(0.0, &[], false).is_err());
    }
}

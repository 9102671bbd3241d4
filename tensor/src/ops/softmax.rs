//! Softmax and log-softmax along any dimension, with PyTorch semantics.
//!
//! `softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m)` and
//! `log_softmax(x)_i = x_i - m - ln(sum_j exp(x_j - m))` with `m` the line's max, so
//! that nothing overflows (kernel: `aigc_kernels::cpu::softmax`). The kernel walks any
//! strides directly, so no dim needs to be moved or copied first.
//!
//! Special values, as in PyTorch: a NaN in a line makes the whole line NaN; a line that
//! is all `-inf` gives NaN (nothing to normalise). A 0-d tensor is one line of one
//! element (dim 0 or -1), so its softmax is 1.
//!
//! The backward passes are fused ops too ([`Tensor::softmax_backward`],
//! [`Tensor::log_softmax_backward`]), one pass per line from the forward's output.

use crate::shape::resolve_dim;
use crate::storage::{map_float, zip_float};
use crate::{Error, Result, Tensor};
use aigc_kernels::cpu::softmax::{self, SoftmaxKind};

impl Tensor {
    /// `exp(x_i) / sum_j exp(x_j)` along `dim` (negative counts from the end), computed
    /// stably by subtracting the line's max. Float dtypes only.
    pub fn softmax(&self, dim: isize) -> Result<Tensor> {
        self.softmax_along("softmax", dim, SoftmaxKind::Softmax)
    }

    /// `log(softmax(x))` along `dim`, computed as `x_i - m - ln(sum_j exp(x_j - m))`
    /// (exact where the two-step form would underflow to `-inf`).
    pub fn log_softmax(&self, dim: isize) -> Result<Tensor> {
        self.softmax_along("log_softmax", dim, SoftmaxKind::LogSoftmax)
    }

    /// The gradient of [`Tensor::softmax`] along `dim`, called on its output `y`:
    /// `y * (grad - sum(grad * y))`, the sum over each line (`grad` has `y`'s shape).
    pub fn softmax_backward(&self, grad: &Tensor, dim: isize) -> Result<Tensor> {
        self.softmax_backward_along("softmax_backward", grad, dim, SoftmaxKind::Softmax)
    }

    /// The gradient of [`Tensor::log_softmax`] along `dim`, called on its output `y`:
    /// `grad - exp(y) * sum(grad)`, the sum over each line (`grad` has `y`'s shape).
    pub fn log_softmax_backward(&self, grad: &Tensor, dim: isize) -> Result<Tensor> {
        self.softmax_backward_along("log_softmax_backward", grad, dim, SoftmaxKind::LogSoftmax)
    }

    fn softmax_backward_along(&self, op: &'static str, grad: &Tensor, dim: isize, kind: SoftmaxKind) -> Result<Tensor> {
        self.expect_gradient_of(grad, op, "output")?;
        if self.rank() == 0 {
            let (y, g) = (self.unsqueeze(0)?, grad.unsqueeze(0)?);
            resolve_dim(op, dim, 1)?;
            return y.softmax_backward_along(op, &g, 0, kind)?.squeeze(0);
        }
        let dim = resolve_dim(op, dim, self.rank())?;
        let out = self.read_cpu2(grad, op, |sy, ly, sg, lg| {
            Ok(zip_float!(op, sy, sg, |y, g| softmax::softmax_backward(y, ly, g, lg, dim, kind)))
        })?;
        Ok(Tensor::from_cpu(out, self.dims()))
    }

    fn softmax_along(&self, op: &'static str, dim: isize, kind: SoftmaxKind) -> Result<Tensor> {
        if self.rank() == 0 {
            if dim != 0 && dim != -1 {
                return Err(Error::invalid(
                    op,
                    format!("dim {dim} is out of range for a 0-d tensor (expected 0 or -1)"),
                ));
            }
            return self.unsqueeze(0)?.softmax_along(op, 0, kind)?.squeeze(0);
        }
        let dim = resolve_dim(op, dim, self.rank())?;
        let out = self.read_cpu(|s, l| Ok(map_float!(op, s, |b| softmax::softmax(b, l, dim, kind))))?;
        Ok(Tensor::from_cpu(out, self.dims()))
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::*;
    use crate::{DType, Device, Tensor};
    use proptest::prelude::*;

    /// Naive softmax / log-softmax along `dim`: plain exp and sum over each line, no max
    /// subtraction (the test values are small).
    fn reference(x: &NdArray, dim: usize, log: bool) -> NdArray {
        let mut out = NdArray::zeros(&x.shape);
        for idx in x.indices() {
            let mut line = idx.clone();
            let sum: f64 = (0..x.shape[dim])
                .map(|k| {
                    line[dim] = k;
                    x.get(&line).exp()
                })
                .sum();
            let v = x.get(&idx);
            out.set(&idx, if log { v - sum.ln() } else { v.exp() / sum });
        }
        out
    }

    /// A tensor of random shape and layout with a dim of it (`None` for rank 0).
    fn tensor_and_dim() -> impl Strategy<Value = (Tensor, isize)> {
        strided_tensor(4, 5).prop_flat_map(|t| {
            let rank = t.rank().max(1) as isize;
            (Just(t), -rank..rank)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn softmax_and_log_softmax_match_naive_reference_on_any_dim_and_layout((t, dim) in tensor_and_dim()) {
            let x = NdArray::from_tensor(&t);
            let d = if t.rank() == 0 { 0 } else { dim.rem_euclid(t.rank() as isize) as usize };
            let x1 = if t.rank() == 0 { NdArray::new(vec![1], x.data.clone()) } else { x };
            for (log, got) in [(false, t.softmax(dim).unwrap()), (true, t.log_softmax(dim).unwrap())] {
                prop_assert_eq!(got.dims(), t.dims());
                prop_assert!(got.is_contiguous());
                let want = reference(&x1, d, log);
                assert_close(&got.to_f64_vec().unwrap(), &want.data, 1e-5, 1e-6, "softmax f32");
            }
        }

        #[test]
        fn softmax_in_f64_is_accurate_to_rounding((t, dim) in tensor_and_dim()) {
            let t = t.to_dtype(DType::F64).unwrap();
            let x = NdArray::from_tensor(&t);
            let d = if t.rank() == 0 { 0 } else { dim.rem_euclid(t.rank() as isize) as usize };
            let x1 = if t.rank() == 0 { NdArray::new(vec![1], x.data.clone()) } else { x };
            let got = t.softmax(dim).unwrap().to_vec::<f64>().unwrap();
            assert_close(&got, &reference(&x1, d, false).data, 1e-12, 1e-14, "softmax f64");
            let got = t.log_softmax(dim).unwrap().to_vec::<f64>().unwrap();
            assert_close(&got, &reference(&x1, d, true).data, 1e-12, 1e-14, "log_softmax f64");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn softmax_backwards_match_the_naive_jacobian_product((t, dim) in tensor_and_dim(), (kg, seed) in (view_kind(), any::<u64>())) {
            // dx_i = sum_j g_j dy_j/dx_i along each line, with dy_j/dx_i from the naive
            // reference: softmax: y_j (delta_ij - y_i); log-softmax: delta_ij - y_i(softmax).
            let x = NdArray::from_tensor(&t);
            let g = make_view(t.dims(), kg, seed);
            let gn = NdArray::from_tensor(&g);
            let d = if t.rank() == 0 { 0 } else { dim.rem_euclid(t.rank() as isize) as usize };
            let (x1, g1) = if t.rank() == 0 {
                (NdArray::new(vec![1], x.data.clone()), NdArray::new(vec![1], gn.data.clone()))
            } else {
                (x, gn)
            };
            let p = reference(&x1, d, false);
            for log in [false, true] {
                let y = if log { t.log_softmax(dim) } else { t.softmax(dim) }.unwrap();
                let got = if log { y.log_softmax_backward(&g, dim) } else { y.softmax_backward(&g, dim) }.unwrap();
                prop_assert_eq!(got.dims(), t.dims());
                let mut want = NdArray::zeros(&x1.shape);
                for idx in x1.indices() {
                    let mut line = idx.clone();
                    let dx: f64 = (0..x1.shape[d]).map(|j| {
                        line[d] = j;
                        let delta = if j == idx[d] { 1.0 } else { 0.0 };
                        let jac = if log { delta - p.get(&idx) } else { p.get(&line) * (delta - p.get(&idx)) };
                        g1.get(&line) * jac
                    }).sum();
                    want.set(&idx, dx);
                }
                assert_close(&got.to_f64_vec().unwrap(), &want.data, 1e-4, 1e-5, if log { "log_softmax_backward" } else { "softmax_backward" });
            }
        }
    }

    #[test]
    fn softmax_backward_errors_name_the_op() {
        let dev = Device::Cpu;
        let y = Tensor::zeros([2, 3], DType::F32, &dev).unwrap();
        let g = Tensor::zeros([3, 2], DType::F32, &dev).unwrap();
        assert_eq!(
            y.softmax_backward(&g, -1).unwrap_err().to_string(),
            "softmax_backward: lhs [2, 3] and rhs [3, 2]: the gradient must have the output's shape"
        );
        assert!(y.log_softmax_backward(&y, 2).unwrap_err().to_string().starts_with("log_softmax_backward: dim 2"));
    }

    #[test]
    fn half_precision_softmax_computes_in_f32_and_rounds_once() {
        let t = make_view(&[3, 5], ViewKind::Transposed, 7);
        let want = reference(&NdArray::from_tensor(&t), 0, false);
        let want_log = reference(&NdArray::from_tensor(&t), 0, true);
        for dt in [DType::F16, DType::BF16] {
            let h = t.to_dtype(dt).unwrap();
            let x = NdArray::from_tensor(&h); // the rounded inputs
            let got = h.softmax(0).unwrap();
            assert_eq!(got.dtype(), dt);
            assert_close(&got.to_f64_vec().unwrap(), &reference(&x, 0, false).data, 1e-2, 1e-3, "half softmax");
            assert_close(&got.to_f64_vec().unwrap(), &want.data, 2e-2, 1e-2, "half softmax vs f32 input");
            let got_log = h.log_softmax(0).unwrap().to_f64_vec().unwrap();
            assert_close(&got_log, &want_log.data, 2e-2, 2e-2, "half log_softmax");
        }
    }

    #[test]
    fn huge_logits_do_not_overflow() {
        let t = Tensor::new(&[1000.0f32, 1001.0, -1000.0], &Device::Cpu).unwrap();
        let p = t.softmax(0).unwrap().to_vec::<f32>().unwrap();
        let e = (-1.0f64).exp();
        assert_close(
            &p.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &[e / (1.0 + e), 1.0 / (1.0 + e), 0.0],
            1e-6,
            1e-7,
            "p",
        );
        let lp = t.log_softmax(0).unwrap().to_vec::<f32>().unwrap();
        assert!((lp[2] - (-2001.0 - (1.0 + e).ln() as f32)).abs() < 1e-3, "log-softmax stays finite: {lp:?}");
    }

    #[test]
    fn a_line_of_all_neg_inf_gives_nan_like_pytorch() {
        let inf = f32::INFINITY;
        let t = Tensor::from_vec(vec![-inf, -inf, 0.0, 1.0], [2, 2], &Device::Cpu).unwrap();
        for out in [t.softmax(1).unwrap(), t.log_softmax(1).unwrap()] {
            let v = out.to_vec::<f32>().unwrap();
            assert!(v[0].is_nan() && v[1].is_nan(), "{v:?}");
            assert!(v[2].is_finite() && v[3].is_finite(), "other lines are unaffected: {v:?}");
        }
        // A partly -inf line gives exact zeros there.
        let t = Tensor::new(&[-inf, 0.0], &Device::Cpu).unwrap();
        assert_eq!(t.softmax(0).unwrap().to_vec::<f32>().unwrap(), vec![0.0, 1.0]);
    }

    #[test]
    fn softmax_of_a_scalar_is_one() {
        let t = Tensor::scalar(3.5f64, &Device::Cpu).unwrap();
        assert_eq!(t.softmax(0).unwrap().to_scalar::<f64>().unwrap(), 1.0);
        assert_eq!(t.log_softmax(-1).unwrap().to_scalar::<f64>().unwrap(), 0.0);
        assert_eq!(t.softmax(-1).unwrap().dims(), &[] as &[usize]);
    }

    #[test]
    fn softmax_errors_name_the_op_and_the_problem() {
        let dev = Device::Cpu;
        let x = Tensor::zeros([2, 3], DType::F32, &dev).unwrap();
        assert_eq!(
            x.softmax(2).unwrap_err().to_string(),
            "softmax: dim 2 is out of range for a tensor of rank 2 (expected -2..2)"
        );
        assert_eq!(
            x.log_softmax(-3).unwrap_err().to_string(),
            "log_softmax: dim -3 is out of range for a tensor of rank 2 (expected -2..2)"
        );
        let s = Tensor::scalar(1.0f32, &dev).unwrap();
        assert_eq!(
            s.softmax(1).unwrap_err().to_string(),
            "softmax: dim 1 is out of range for a 0-d tensor (expected 0 or -1)"
        );
        let i = Tensor::new(&[1i64, 2], &dev).unwrap();
        assert_eq!(
            i.softmax(0).unwrap_err().to_string(),
            "softmax: not supported for dtype i64 (expected a float dtype (f32, f64, f16, bf16))"
        );
        let m = Tensor::new(&[1u8, 0], &dev).unwrap();
        assert!(m.log_softmax(0).unwrap_err().to_string().starts_with("log_softmax: not supported for dtype u8"));
    }
}

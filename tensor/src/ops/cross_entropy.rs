//! Cross-entropy of class scores with integer targets, fused with its log-softmax, with
//! PyTorch's `ignore_index` and `label_smoothing` (kernel:
//! `aigc_kernels::cpu::cross_entropy`, which gives the formulas).
//!
//! [`Tensor::cross_entropy_lines`] gives the loss of each line along the class dim from one
//! read of the scores, and the log-sum-exp of each line, which
//! [`Tensor::cross_entropy_backward`] takes to write the gradient in one more pass. Both are
//! f64 (a line each): the log-sum-exp must keep more precision than a half-precision
//! score type has, and the mean over the lines is then rounded once.
//!
//! [`class_targets`] checks the targets against the scores they index; the losses of the
//! autograd layer (cross-entropy, NLL) share it.

use crate::storage::{CpuStorage, map_float};
use crate::{DType, Error, Result, Tensor};
use aigc_kernels::cpu::cross_entropy;

/// PyTorch's options of a classification loss.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CrossEntropyOptions {
    /// Targets equal to this are skipped: no loss, no gradient, not counted in the mean.
    pub ignore_index: Option<i64>,
    /// The weight `eps` in `[0, 1]` of the uniform distribution mixed into the one-hot
    /// target: `q = (1 - eps) onehot + eps / C`.
    pub label_smoothing: f64,
}

impl CrossEntropyOptions {
    /// An error naming `op` unless `0 <= label_smoothing <= 1`.
    pub fn check(&self, op: &'static str) -> Result<()> {
        let eps = self.label_smoothing;
        if !(0.0..=1.0).contains(&eps) {
            return Err(Error::invalid(op, format!("label_smoothing = {eps}: need 0 <= label_smoothing <= 1")));
        }
        Ok(())
    }
}

/// Checks the i64 class `targets` of the float `scores` (named `what` in messages) whose
/// classes lie along `dim` (in range): the targets have the scores' shape without `dim`,
/// and each is a class in `0..C` or `ignore_index`. Returns each line's class, `None`
/// where it is ignored, in row-major order.
pub fn class_targets(
    op: &'static str,
    what: &str,
    scores: &Tensor,
    dim: usize,
    targets: &Tensor,
    ignore_index: Option<i64>,
) -> Result<Vec<Option<usize>>> {
    if !scores.dtype().is_float() {
        return Err(Error::UnsupportedDType {
            op,
            dtype: scores.dtype(),
            expected: "float scores (f32, f64, f16, bf16)",
        });
    }
    if targets.dtype() != DType::I64 {
        return Err(Error::UnsupportedDType { op, dtype: targets.dtype(), expected: "i64 class indices as targets" });
    }
    let mut expected = scores.dims().to_vec();
    let num_classes = expected.remove(dim);
    if targets.dims() != expected {
        return Err(Error::ShapeMismatch {
            op,
            lhs: scores.shape(),
            rhs: targets.shape(),
            reason: format!(
                "the targets (rhs) must have shape {expected:?}: the {what}' (lhs) without the class dim {dim}"
            ),
        });
    }
    let values = targets.to_vec::<i64>()?;
    let mut classes = Vec::with_capacity(values.len());
    for (at, &t) in values.iter().enumerate() {
        if Some(t) == ignore_index {
            classes.push(None);
        } else if (0..num_classes as i64).contains(&t) {
            classes.push(Some(t as usize));
        } else {
            let ignored = ignore_index.map_or(String::new(), |i| format!(" or the ignore_index {i}"));
            return Err(Error::invalid(
                op,
                format!(
                    "target {t} (element {at} of the targets of shape {}) is out of range for {what} of shape {}: \
                     expected a class in 0..{num_classes}{ignored}",
                    targets.shape(),
                    scores.shape()
                ),
            ));
        }
    }
    Ok(classes)
}

impl Tensor {
    /// The cross-entropy `-sum_c q_c log softmax(x)_c` of each line of these class scores
    /// (logits) along `dim`, against the i64 `targets` (this shape without `dim`), with
    /// the smoothed target `q = (1 - eps) onehot(t) + eps / C`. Returns
    /// `(losses, log_sum_exp)`, both f64 of the targets' shape: a line whose target is
    /// `opts.ignore_index` has loss 0 (and log-sum-exp NaN, not computed).
    pub fn cross_entropy_lines(
        &self,
        dim: isize,
        targets: &Tensor,
        opts: CrossEntropyOptions,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "cross_entropy_lines";
        let (dim, classes) = self.cross_entropy_args(OP, dim, targets, opts)?;
        let eps = opts.label_smoothing;
        let lines = self.read_cpu(|s, l| {
            Ok(match s {
                CpuStorage::F32(x) => cross_entropy::cross_entropy(x, l, dim, &classes, eps),
                CpuStorage::F64(x) => cross_entropy::cross_entropy(x, l, dim, &classes, eps),
                CpuStorage::F16(x) => cross_entropy::cross_entropy(x, l, dim, &classes, eps),
                CpuStorage::BF16(x) => cross_entropy::cross_entropy(x, l, dim, &classes, eps),
                CpuStorage::I64(_) | CpuStorage::U8(_) => unreachable!("class_targets checked a float dtype"),
            })
        })?;
        let (losses, log_sum_exp) = lines.iter().map(|l| (l.loss, l.log_sum_exp)).unzip();
        let device = self.device();
        Ok((
            Tensor::from_vec(losses, targets.dims(), &device)?,
            Tensor::from_vec(log_sum_exp, targets.dims(), &device)?,
        ))
    }

    /// The gradient of `scale * sum(losses)` for the losses of
    /// [`Tensor::cross_entropy_lines`] (called on the same scores, with its
    /// `log_sum_exp`): `scale (softmax(x) - q)` along `dim` on every counted line, 0 on
    /// ignored ones. Row-major, this tensor's shape and dtype.
    pub fn cross_entropy_backward(
        &self,
        dim: isize,
        targets: &Tensor,
        log_sum_exp: &Tensor,
        opts: CrossEntropyOptions,
        scale: f64,
    ) -> Result<Tensor> {
        const OP: &str = "cross_entropy_backward";
        let (dim, classes) = self.cross_entropy_args(OP, dim, targets, opts)?;
        if log_sum_exp.dtype() != DType::F64 || log_sum_exp.dims() != targets.dims() {
            return Err(Error::invalid(
                OP,
                format!(
                    "log_sum_exp is {:?} of shape {}: expected f64 of the targets' shape {}, as cross_entropy_lines gives it",
                    log_sum_exp.dtype(),
                    log_sum_exp.shape(),
                    targets.shape()
                ),
            ));
        }
        let lse = log_sum_exp.to_vec::<f64>()?;
        let eps = opts.label_smoothing;
        let out = self.read_cpu(|s, l| {
            Ok(map_float!(OP, s, |x| cross_entropy::cross_entropy_backward(x, l, dim, &classes, &lse, eps, scale)))
        })?;
        Ok(Tensor::from_cpu(out, self.dims()))
    }

    /// The class dim (resolved) and each line's class, for `op`.
    fn cross_entropy_args(
        &self,
        op: &'static str,
        dim: isize,
        targets: &Tensor,
        opts: CrossEntropyOptions,
    ) -> Result<(usize, Vec<Option<usize>>)> {
        opts.check(op)?;
        if self.rank() == 0 {
            return Err(Error::bad_shape(op, &self.shape(), "class scores need a class dim (rank >= 1)"));
        }
        let dim = crate::shape::resolve_dim(op, dim, self.rank())?;
        self.same_device(targets, op)?;
        Ok((dim, class_targets(op, "logits", self, dim, targets, opts.ignore_index)?))
    }
}

#[cfg(test)]
mod tests {
    use super::CrossEntropyOptions;
    use crate::testing::*;
    use crate::{DType, Device, Tensor};
    use proptest::prelude::*;

    const IGNORE: i64 = -100;

    /// Scores of rank 1 to 3 and any layout (f32 or f64), a class dim of them, and i64
    /// targets for every line, about one in four ignored.
    fn case() -> impl Strategy<Value = (Tensor, isize, Tensor)> {
        (nonempty_shape(1, 3, 5), view_kind(), any::<u64>(), any::<bool>()).prop_flat_map(
            |(shape, kind, seed, wide)| {
                let scores = make_view(&shape, kind, seed);
                let scores = if wide { scores.to_dtype(DType::F64).unwrap() } else { scores };
                (Just(scores), 0..shape.len()).prop_flat_map(|(scores, dim)| {
                    let mut lines = scores.dims().to_vec();
                    let classes = lines.remove(dim) as i64;
                    let count = lines.iter().product::<usize>();
                    proptest::collection::vec(0..classes + (classes + 2) / 3, count).prop_map(move |raw| {
                        let targets = raw.iter().map(|&t| if t < classes { t } else { IGNORE }).collect();
                        (
                            scores.clone(),
                            dim as isize,
                            Tensor::from_vec::<i64>(targets, &lines[..], &Device::Cpu).unwrap(),
                        )
                    })
                })
            },
        )
    }

    fn opts(label_smoothing: f64) -> CrossEntropyOptions {
        CrossEntropyOptions { ignore_index: Some(IGNORE), label_smoothing }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn losses_and_gradient_match_the_definition_on_any_dim_and_layout(
            (x, dim, targets) in case(),
            eps in prop_oneof![Just(0.0), 0.0..=1.0],
            scale in -2.0..2.0f64,
        ) {
            let (losses, lse) = x.cross_entropy_lines(dim, &targets, opts(eps)).unwrap();
            prop_assert_eq!((losses.dtype(), losses.dims()), (DType::F64, targets.dims()));
            let dx = x.cross_entropy_backward(dim, &targets, &lse, opts(eps), scale).unwrap();
            prop_assert_eq!((dx.dtype(), dx.dims()), (x.dtype(), x.dims()));
            let (values, d) = (NdArray::from_tensor(&x), dim as usize);
            let (losses, dx) = (losses.to_f64_vec().unwrap(), NdArray::from_tensor(&dx));
            let classes = x.dims()[d];
            let tolerance = if x.dtype() == DType::F32 { 1e-5 } else { 1e-12 };
            for (line, &t) in targets.to_vec::<i64>().unwrap().iter().enumerate() {
                // The index of class `c` on this line: the line's index with `c` put at `d`.
                let mut idx = NdArray::zeros(targets.dims()).indices().nth(line).unwrap();
                idx.insert(d, 0);
                let at = |c: usize| { let mut i = idx.clone(); i[d] = c; i };
                if t == IGNORE {
                    prop_assert_eq!(losses[line], 0.0);
                    prop_assert!((0..classes).all(|c| dx.get(&at(c)) == 0.0));
                    continue;
                }
                // -sum_c q_c log p_c by the plain formula (the scores are within 2).
                let total: f64 = (0..classes).map(|c| values.get(&at(c)).exp()).sum();
                let p = |c: usize| values.get(&at(c)).exp() / total;
                let q = |c: usize| eps / classes as f64 + if c == t as usize { 1.0 - eps } else { 0.0 };
                let loss: f64 = (0..classes).map(|c| -q(c) * p(c).ln()).sum();
                prop_assert!((losses[line] - loss).abs() <= tolerance * (1.0 + loss), "{} vs {}", losses[line], loss);
                for c in 0..classes {
                    let want = scale * (p(c) - q(c));
                    prop_assert!((dx.get(&at(c)) - want).abs() <= tolerance, "{} vs {}", dx.get(&at(c)), want);
                }
            }
        }
    }

    #[test]
    fn half_precision_scores_keep_an_f64_log_sum_exp() {
        // Scores near 300 in bf16 (spacing 2 there): the log-sum-exp rounded to bf16
        // would move every probability by a factor up to e.
        let x = Tensor::new(&[296.0f32, 298.0, 302.0, 300.0], &Device::Cpu).unwrap();
        let x = x.to_dtype(DType::BF16).unwrap().reshape([1, 4]).unwrap();
        let targets = Tensor::new(&[2i64], &Device::Cpu).unwrap();
        let (losses, lse) = x.cross_entropy_lines(1, &targets, opts(0.0)).unwrap();
        let total: f64 = [-6.0f64, -4.0, 0.0, -2.0].iter().map(|v| v.exp()).sum();
        assert!((lse.to_vec::<f64>().unwrap()[0] - (302.0 + total.ln())).abs() < 1e-5);
        assert!((losses.to_vec::<f64>().unwrap()[0] - total.ln()).abs() < 1e-5);
        let dx = x.cross_entropy_backward(1, &targets, &lse, opts(0.0), 1.0).unwrap();
        assert_eq!(dx.dtype(), DType::BF16);
        let dx = dx.to_f64_vec().unwrap();
        assert!((dx[2] - (1.0 / total - 1.0)).abs() < 4e-3, "{dx:?}");
        assert!((dx[3] - (-2f64).exp() / total).abs() < 4e-3, "{dx:?}");
    }

    #[test]
    fn bad_arguments_are_reported_with_what_was_expected() {
        let dev = Device::Cpu;
        let x = Tensor::zeros([2, 3], DType::F32, &dev).unwrap();
        let ok = Tensor::new(&[0i64, 2], &dev).unwrap();
        let err = |r: crate::Result<(Tensor, Tensor)>| r.unwrap_err().to_string();
        let msg = err(x.cross_entropy_lines(1, &Tensor::new(&[0i64, 3], &dev).unwrap(), opts(0.0)));
        assert!(msg.contains("cross_entropy_lines: target 3 (element 1 of the targets of shape [2]) is out of range for logits of shape [2, 3]: expected a class in 0..3 or the ignore_index -100"), "{msg}");
        let msg = err(x.cross_entropy_lines(0, &ok, opts(0.0)));
        assert!(
            msg.contains("the targets (rhs) must have shape [3]: the logits' (lhs) without the class dim 0"),
            "{msg}"
        );
        let msg = err(x.cross_entropy_lines(2, &ok, opts(0.0)));
        assert!(msg.contains("dim 2 is out of range"), "{msg}");
        let msg = err(x.cross_entropy_lines(1, &ok.to_dtype(DType::F32).unwrap(), opts(0.0)));
        assert!(msg.contains("expected i64 class indices"), "{msg}");
        let msg = err(ok.cross_entropy_lines(0, &Tensor::zeros([], DType::I64, &dev).unwrap(), opts(0.0)));
        assert!(msg.contains("not supported for dtype i64 (expected float scores"), "{msg}");
        let msg = err(x.cross_entropy_lines(1, &ok, opts(-0.5)));
        assert!(msg.contains("label_smoothing = -0.5: need 0 <= label_smoothing <= 1"), "{msg}");
        let msg = err(Tensor::zeros([], DType::F32, &dev).unwrap().cross_entropy_lines(0, &ok, opts(0.0)));
        assert!(msg.contains("class scores need a class dim"), "{msg}");
        let (_, lse) = x.cross_entropy_lines(1, &ok, opts(0.0)).unwrap();
        let msg = x
            .cross_entropy_backward(1, &ok, &lse.to_dtype(DType::F32).unwrap(), opts(0.0), 1.0)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("log_sum_exp is F32 of shape [2]: expected f64 of the targets' shape [2]"), "{msg}");
    }
}

//! Classification losses over class scores `[N, C]` or `[N, C, d1, ..]` (class dim 1,
//! PyTorch's layout) and i64 targets `[N]` or `[N, d1, ..]`, averaged over the targets
//! that are not `ignore_index`.
//!
//! **Cross-entropy** (fused, with label smoothing as in Szegedy et al. 2016, "Rethinking
//! the Inception architecture"). With `p = softmax(x)` over the classes, smoothing `eps`
//! and the smoothed target distribution `q = (1 - eps) onehot(t) + eps / C`:
//!
//! ```text
//! loss_n = -sum_c q_c log p_c = (1 - eps) (-log p_t) + eps mean_c(-log p_c)
//! loss   = sum_{n counted} loss_n / #counted
//! dloss/dx_n = (p_n - q_n) [n counted] / #counted
//! ```
//!
//! The forward is the fused tensor op [`Tensor::cross_entropy_lines`] (one read of the
//! logits; it keeps each position's log-sum-exp, not the log-probabilities). The
//! backward rule is the last line: for plain gradients the fused
//! [`Tensor::cross_entropy_backward`] (one read, one write), and with `create_graph` the
//! same written with `Var` ops on the logits (`p = exp(x - logsumexp(x))`), so that it
//! can be differentiated again. Against the composition this replaced (log-softmax,
//! `gather`, and that `Var` rule for plain gradients too), forward and backward of
//! logits `(4096, 1024)` took 23.8-28.6 ms before and 2.27-2.39 after at one thread,
//! 20.1 and 1.79 at two (AVX-512 on Zen 4, median of 41; PyTorch 2.15's
//! `F.cross_entropy` forward and backward took 6.5-7.7 ms at one thread on that host).
//!
//! **NLL** takes log-probabilities and is composed of differentiable `gather`, masking and
//! sum: `loss = -sum_{n counted} logp_{n, t_n} / #counted`.
//!
//! **All targets ignored.** PyTorch returns NaN (0 / 0). Here the loss is 0 and the
//! gradient zero, so that a batch that is all padding leaves the parameters unchanged
//! instead of poisoning them with NaN.

use crate::Var;
use crate::mode;
use aigc_tensor::ops::cross_entropy::class_targets;
use aigc_tensor::{Error, Result, Tensor};

pub use aigc_tensor::CrossEntropyOptions;

/// Targets checked against the scores they index, shaped `[N, 1, d1, ..]` like the
/// scores with the class dim cut to 1, ready for `gather` along dim 1.
struct Targets {
    /// The target class of each position; ignored positions point at class 0.
    classes: Tensor,
    /// 1 (u8) where the target counts, 0 where it is ignored.
    counted: Tensor,
    /// `1 / #counted` where the target counts, 0 where ignored, in the scores' dtype.
    weights: Tensor,
    /// `1 / #counted` (1 when nothing counts).
    weight: f64,
}

impl Targets {
    /// Checks `targets` for class `scores` (named `what` in messages) of `op`: float
    /// scores `[N, C, d..]`, i64 targets `[N, d..]`, each in `0..C` or `ignore_index`.
    fn check(
        op: &'static str,
        what: &str,
        scores: &Tensor,
        targets: &Tensor,
        ignore_index: Option<i64>,
    ) -> Result<Targets> {
        if scores.dtype().is_float() && scores.rank() < 2 {
            return Err(Error::bad_shape(
                op,
                &scores.shape(),
                format!("the {what} must be [N, C] or [N, C, d1, ..] with the classes in dim 1"),
            ));
        }
        let lines = class_targets(op, what, scores, 1, targets, ignore_index)?;
        let weight = 1.0 / lines.iter().flatten().count().max(1) as f64;
        let mut kept = targets.dims().to_vec();
        kept.insert(1, 1);
        let device = scores.device();
        let classes = lines.iter().map(|&t| t.map_or(0, |t| t as i64)).collect();
        let counted: Vec<u8> = lines.iter().map(|t| t.is_some() as u8).collect();
        let weights = counted.iter().map(|&c| c as f64 * weight).collect();
        Ok(Targets {
            classes: Tensor::from_vec::<i64>(classes, &kept[..], &device)?,
            counted: Tensor::from_vec(counted, &kept[..], &device)?,
            weights: Tensor::from_vec::<f64>(weights, &kept[..], &device)?.to_dtype(scores.dtype())?,
            weight,
        })
    }
}

/// The smoothed target distribution `q = (1 - eps) onehot(classes) + eps / C`, shaped
/// like the `logits` `[N, C, d..]`, for `classes` `[N, 1, d..]`.
fn smoothed_one_hot(logits: &Tensor, classes: &Tensor, eps: f64) -> Result<Tensor> {
    let (dtype, device) = (logits.dtype(), logits.device());
    let uniform = Tensor::full(eps / logits.dims()[1] as f64, logits.dims(), dtype, &device)?;
    uniform.scatter_add(1, classes, &Tensor::full(1.0 - eps, classes.dims(), dtype, &device)?)
}

impl Var {
    /// Mean cross-entropy between the softmax of these logits `[N, C]` or
    /// `[N, C, d1, ..]` and the i64 `targets` `[N]` or `[N, d1, ..]`, with PyTorch's
    /// `ignore_index` and `label_smoothing` (see the module doc for the formula). A 0-d
    /// loss; 0 when every target is ignored (PyTorch gives NaN).
    pub fn cross_entropy(&self, targets: &Tensor, opts: CrossEntropyOptions) -> Result<Var> {
        const OP: &str = "cross_entropy";
        opts.check(OP)?;
        let t = Targets::check(OP, "logits", self.value(), targets, opts.ignore_index)?;
        let (losses, log_sum_exp) = self.value().cross_entropy_lines(1, targets, opts)?;
        let value = losses.sum_all()?.affine(t.weight, 0.0)?.to_dtype(self.dtype())?;

        let targets = targets.clone();
        self.unary_op(OP, value, move |_, g, x| {
            if !mode::is_grad_enabled() {
                // Plain gradients: the fused kernel, from the forward's log-sum-exp.
                let scale = g.value().to_f64_vec()?[0] * t.weight;
                return Ok(Var::constant(x.value().cross_entropy_backward(1, &targets, &log_sum_exp, opts, scale)?));
            }
            // With `create_graph`, the rule of differentiable ops, so that it can be
            // differentiated again.
            let q = Var::constant(smoothed_one_hot(x.value(), &t.classes, opts.label_smoothing)?);
            let p = x.sub(&x.logsumexp(&[1], true)?)?.exp()?;
            p.sub(&q)?.mul(&Var::constant(t.weights.clone()))?.mul(g)
        })
    }

    /// Mean negative log-likelihood of the i64 `targets` `[N]` or `[N, d1, ..]` under
    /// these log-probabilities `[N, C]` or `[N, C, d1, ..]`, skipping `ignore_index`:
    /// `-sum logp[n, t_n] / #counted` (0 when every target is ignored). Composed of
    /// differentiable ops, so differentiable any number of times.
    pub fn nll_loss(&self, targets: &Tensor, ignore_index: Option<i64>) -> Result<Var> {
        let t = Targets::check("nll_loss", "log-probabilities", self.value(), targets, ignore_index)?;
        let picked = self.gather(1, &t.classes)?;
        picked.masked(&t.counted)?.mul(&Var::constant(t.weights))?.sum_all()?.neg()
    }
}

#[cfg(test)]
mod tests {
    use super::CrossEntropyOptions;
    use crate::Var;
    use crate::gradcheck::{gradcheck, gradgradcheck};
    use crate::testing::inputs;
    use aigc_tensor::{DType, Device, Tensor};
    use proptest::prelude::*;

    const IGNORE: i64 = -100;

    /// Logits `[N, C]` (transposed in memory) or `[N, C, D]` (permuted), and targets
    /// `[N]` or `[N, D]` in `0..C` where about one in four is `IGNORE`.
    fn case() -> impl Strategy<Value = (Tensor, Tensor)> {
        (1usize..=3, 1usize..=4, proptest::option::of(1usize..=3), any::<u64>()).prop_flat_map(|(n, c, d, seed)| {
            let target_dims: Vec<usize> = std::iter::once(n).chain(d).collect();
            let count = target_dims.iter().product::<usize>();
            let raw = proptest::collection::vec(0..(c as i64 + c.div_ceil(3) as i64), count);
            raw.prop_map(move |raw| {
                let targets: Vec<i64> = raw.iter().map(|&t| if t < c as i64 { t } else { IGNORE }).collect();
                let logits = match d {
                    None => inputs::seeded(&[c, n], seed).t().unwrap(),
                    Some(d) => inputs::seeded(&[c, d, n], seed).permute(&[2, 0, 1]).unwrap(),
                };
                (logits, Tensor::from_vec(targets, &target_dims[..], &Device::Cpu).unwrap())
            })
        })
    }

    /// Naive mean smoothed cross-entropy in f64: plain loops, log-sum-exp by hand.
    fn naive_cross_entropy(logits: &Tensor, targets: &Tensor, eps: f64) -> f64 {
        let dims = logits.dims().to_vec();
        let (n, c, inner) = (dims[0], dims[1], dims[2..].iter().product::<usize>());
        let x = logits.contiguous().unwrap().to_vec::<f64>().unwrap();
        let t = targets.contiguous().unwrap().to_vec::<i64>().unwrap();
        let (mut total, mut count) = (0.0, 0usize);
        for b in 0..n {
            for k in 0..inner {
                let target = t[b * inner + k];
                if target == IGNORE {
                    continue;
                }
                let line: Vec<f64> = (0..c).map(|j| x[(b * c + j) * inner + k]).collect();
                let max = line.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + line.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                let nll = lse - line[target as usize];
                let uniform = line.iter().map(|v| lse - v).sum::<f64>() / c as f64;
                total += (1.0 - eps) * nll + eps * uniform;
                count += 1;
            }
        }
        if count == 0 { 0.0 } else { total / count as f64 }
    }

    fn opts(label_smoothing: f64) -> CrossEntropyOptions {
        CrossEntropyOptions { ignore_index: Some(IGNORE), label_smoothing }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn cross_entropy_matches_naive_reference((logits, targets) in case(), eps in prop_oneof![Just(0.0), 0.0..=1.0]) {
            let loss = Var::leaf(logits.clone()).cross_entropy(&targets, opts(eps)).unwrap();
            let got = loss.value().to_scalar::<f64>().unwrap();
            let want = naive_cross_entropy(&logits, &targets, eps);
            prop_assert!((got - want).abs() <= 1e-12 * (1.0 + want.abs()), "got {got}, want {want}");
        }

        #[test]
        fn cross_entropy_grad_matches_finite_differences((logits, targets) in case(), eps in prop_oneof![Just(0.0), 0.0..=1.0]) {
            gradcheck(|v| v[0].cross_entropy(&targets, opts(eps)), &[&logits], "cross_entropy").unwrap();
        }

        #[test]
        fn nll_loss_grad_matches_finite_differences((scores, targets) in case()) {
            gradcheck(|v| v[0].nll_loss(&targets, Some(IGNORE)), &[&scores], "nll_loss").unwrap();
        }

        #[test]
        fn nll_of_log_softmax_equals_cross_entropy((logits, targets) in case()) {
            let x = Var::leaf(logits.clone());
            let fused = x.cross_entropy(&targets, opts(0.0)).unwrap();
            let log_p = x.sub(&x.logsumexp(&[1], true).unwrap()).unwrap();
            let composed = log_p.nll_loss(&targets, Some(IGNORE)).unwrap();
            let (a, b) = (fused.value().to_scalar::<f64>().unwrap(), composed.value().to_scalar::<f64>().unwrap());
            prop_assert!((a - b).abs() < 1e-12, "fused {a}, composed {b}");
            let ga = crate::grad(&[&fused], &[&x], false).unwrap()[0].value().to_vec::<f64>().unwrap();
            let gb = crate::grad(&[&composed], &[&x], false).unwrap()[0].value().to_vec::<f64>().unwrap();
            prop_assert!(ga.iter().zip(&gb).all(|(a, b)| (a - b).abs() < 1e-12), "{ga:?} vs {gb:?}");
        }
    }

    #[test]
    fn cross_entropy_second_derivatives_match_finite_differences() {
        let logits = inputs::seeded(&[3, 4], 7);
        let targets = Tensor::new(&[2i64, IGNORE, 0], &Device::Cpu).unwrap();
        gradgradcheck(|v| v[0].cross_entropy(&targets, opts(0.0)), &[&logits], "cross_entropy").unwrap();
        gradgradcheck(|v| v[0].cross_entropy(&targets, opts(0.3)), &[&logits], "cross_entropy smoothed").unwrap();
        let volume = inputs::seeded(&[2, 3, 2], 8);
        let targets = Tensor::from_vec(vec![1i64, 2, 0, 0], [2, 2], &Device::Cpu).unwrap();
        gradgradcheck(|v| v[0].cross_entropy(&targets, opts(0.1)), &[&volume], "cross_entropy 3-d").unwrap();
        gradgradcheck(|v| v[0].nll_loss(&targets, None)?.square(), &[&volume], "nll_loss").unwrap();
    }

    #[test]
    fn cross_entropy_matches_a_hand_computed_example() {
        // Row 0: softmax of [0, ln 3] is [1/4, 3/4], target 1. Row 1 is ignored.
        let logits = Tensor::from_vec(vec![0.0f64, 3f64.ln(), 5.0, -5.0], [2, 2], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[1i64, IGNORE], &Device::Cpu).unwrap();
        let x = Var::leaf(logits);
        let loss = x.cross_entropy(&targets, opts(0.0)).unwrap();
        assert!((loss.value().to_scalar::<f64>().unwrap() - (4.0f64 / 3.0).ln()).abs() < 1e-14);

        // eps = 0.2 over 2 classes: q = [0.1, 0.9], loss = 0.8 ln(4/3) + 0.1 (ln 4 + ln(4/3)).
        let loss = x.cross_entropy(&targets, opts(0.2)).unwrap();
        let want = 0.8 * (4.0f64 / 3.0).ln() + 0.1 * (4.0f64.ln() + (4.0f64 / 3.0).ln());
        assert!((loss.value().to_scalar::<f64>().unwrap() - want).abs() < 1e-14);
        loss.backward().unwrap();
        // p - q = [0.25 - 0.1, 0.75 - 0.9]; the ignored row gets nothing.
        let grad = x.grad().unwrap().to_vec::<f64>().unwrap();
        let want = [0.15, -0.15, 0.0, 0.0];
        assert!(grad.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-14), "{grad:?}");
    }

    #[test]
    fn fused_plain_gradients_equal_the_composed_create_graph_ones() {
        // f32 logits [5, 70] (the SIMD rows) and f64 [2, 4, 3] (the generic lines), a
        // target ignored in each.
        let f32_logits = inputs::seeded(&[5, 70], 4).to_dtype(DType::F32).unwrap();
        let f32_targets = Tensor::new(&[3i64, IGNORE, 69, 0, 41], &Device::Cpu).unwrap();
        let volume = inputs::seeded(&[2, 4, 3], 5);
        let volume_targets = Tensor::from_vec(vec![0i64, 3, IGNORE, 2, 1, 1], [2, 3], &Device::Cpu).unwrap();
        for (logits, targets) in [(f32_logits, f32_targets), (volume, volume_targets)] {
            for eps in [0.0, 0.25] {
                let x = Var::leaf(logits.clone());
                let loss = || x.cross_entropy(&targets, opts(eps)).unwrap().affine(1.7, 0.0).unwrap();
                let plain = crate::grad(&[&loss()], &[&x], false).unwrap()[0].value().to_f64_vec().unwrap();
                let composed = crate::grad(&[&loss()], &[&x], true).unwrap()[0].value().to_f64_vec().unwrap();
                for (a, b) in plain.iter().zip(&composed) {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "eps {eps}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn all_ignored_targets_give_zero_loss_and_zero_gradient() {
        let x = Var::leaf(inputs::seeded(&[2, 3], 1));
        let targets = Tensor::new(&[IGNORE, IGNORE], &Device::Cpu).unwrap();
        for loss in [x.cross_entropy(&targets, opts(0.5)).unwrap(), x.nll_loss(&targets, Some(IGNORE)).unwrap()] {
            assert_eq!(loss.value().to_scalar::<f64>().unwrap(), 0.0);
            let grad = crate::grad(&[&loss], &[&x], false).unwrap()[0].value().to_vec::<f64>().unwrap();
            assert_eq!(grad, vec![0.0; 6]);
        }
    }

    #[test]
    fn masked_classes_at_minus_infinity_keep_the_loss_finite() {
        let x = Tensor::from_vec(vec![f32::NEG_INFINITY, 1.0, 2.0], [1, 3], &Device::Cpu).unwrap();
        let v = Var::leaf(x);
        let loss = v.cross_entropy(&Tensor::new(&[2i64], &Device::Cpu).unwrap(), CrossEntropyOptions::default());
        let loss = loss.unwrap();
        let want = (1.0f32.exp() + 2.0f32.exp()).ln() - 2.0;
        assert!((loss.value().to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
        loss.backward().unwrap();
        let grad = v.grad().unwrap().to_vec::<f32>().unwrap();
        assert!(grad[0] == 0.0 && grad.iter().all(|g| g.is_finite()), "{grad:?}");
    }

    #[test]
    fn bad_targets_and_options_are_reported_with_shapes() {
        let x = Var::leaf(inputs::seeded(&[2, 3], 1));
        let err = |r: aigc_tensor::Result<Var>| r.unwrap_err().to_string();
        let msg = err(x.cross_entropy(&Tensor::new(&[0i64, 3], &Device::Cpu).unwrap(), opts(0.0)));
        assert!(
            msg.contains("cross_entropy: target 3 (element 1 of the targets of shape [2]) is out of range for logits of shape [2, 3]: expected a class in 0..3 or the ignore_index -100"),
            "{msg}"
        );
        let msg = err(x.nll_loss(&Tensor::new(&[-1i64, 0], &Device::Cpu).unwrap(), None));
        assert!(msg.contains("nll_loss: target -1") && msg.contains("expected a class in 0..3"), "{msg}");
        let msg = err(x.cross_entropy(&Tensor::new(&[0i64, 1, 2], &Device::Cpu).unwrap(), opts(0.0)));
        assert!(msg.contains("cross_entropy: lhs [2, 3] and rhs [3]: the targets (rhs) must have shape [2]"), "{msg}");
        let msg = err(x.cross_entropy(&Tensor::new(&[0.0f64, 1.0], &Device::Cpu).unwrap(), opts(0.0)));
        assert!(msg.contains("cross_entropy: not supported for dtype f64 (expected i64 class indices"), "{msg}");
        let msg = err(x.cross_entropy(&Tensor::new(&[0i64, 1], &Device::Cpu).unwrap(), opts(1.5)));
        assert!(msg.contains("cross_entropy: label_smoothing = 1.5: need 0 <= label_smoothing <= 1"), "{msg}");
        let msg = err(x.flatten_all().unwrap().cross_entropy(&Tensor::new(&[0i64], &Device::Cpu).unwrap(), opts(0.0)));
        assert!(msg.contains("cross_entropy: input of shape [6]: the logits must be [N, C]"), "{msg}");
        let ints = Var::constant(Tensor::zeros([2, 3], DType::I64, &Device::Cpu).unwrap());
        let msg = err(ints.nll_loss(&Tensor::new(&[0i64, 1], &Device::Cpu).unwrap(), None));
        assert!(msg.contains("nll_loss: not supported for dtype i64 (expected float scores"), "{msg}");
    }
}

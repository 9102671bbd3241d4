//! Losses, each a short composition of differentiable ops, with PyTorch's semantics and
//! its default `reduction="mean"` (averaged over every element unless said otherwise):
//! - regression: MSE `mean((x - y)^2)`, L1 `mean(|x - y|)`;
//! - binary cross-entropy `-mean(y log p + (1 - y) log(1 - p))`, on probabilities ([`bce`],
//!   each log clamped at -100 as PyTorch) or on logits ([`bce_with_logits`], in the stable
//!   form `max(z, 0) - z y + log(1 + e^{-|z|})`);
//! - classification with integer targets: cross-entropy on logits (fused log-softmax, see
//!   `Var::cross_entropy`; with `ignore_index` and label smoothing in
//!   [`cross_entropy_with`]) and NLL on log-probabilities ([`nll`]), averaged over the
//!   targets that are not ignored;
//! - Gaussian: the KL divergence of a diagonal Gaussian from the standard normal (the VAE
//!   regulariser, Kingma & Welling 2014, "Auto-Encoding Variational Bayes", appendix B),
//!   and the Gaussian negative log-likelihood with a predicted variance (Nix & Weigend
//!   1994), as `torch.nn.GaussianNLLLoss`.

use aigc_autograd::Var;
use aigc_tensor::{Error, Result, Tensor};

pub use aigc_autograd::CrossEntropyOptions;

fn same_shape(op: &'static str, a: &Var, b: &Var) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::ShapeMismatch {
            op,
            lhs: a.shape(),
            rhs: b.shape(),
            reason: "prediction and target must have the same shape".into(),
        });
    }
    Ok(())
}

/// Mean squared error.
pub fn mse(prediction: &Var, target: &Var) -> Result<Var> {
    same_shape("mse", prediction, target)?;
    prediction.sub(target)?.square()?.mean_all()
}

/// Mean absolute error.
pub fn l1(prediction: &Var, target: &Var) -> Result<Var> {
    same_shape("l1", prediction, target)?;
    prediction.sub(target)?.abs()?.mean_all()
}

/// Binary cross-entropy between `sigmoid(logits)` and targets in [0, 1].
pub fn bce_with_logits(logits: &Var, target: &Var) -> Result<Var> {
    same_shape("bce_with_logits", logits, target)?;
    let positive_part = logits.relu()?;
    let log_term = logits.abs()?.neg()?.exp()?.log1p()?;
    positive_part.sub(&logits.mul(target)?)?.add(&log_term)?.mean_all()
}

/// Binary cross-entropy between probabilities `p` in `[0, 1]` and targets `y` in `[0, 1]`:
/// `-mean(y log p + (1 - y) log(1 - p))`, each log clamped below at -100 as PyTorch's
/// `binary_cross_entropy`, so that `p = 0` or `1` gives a finite loss. Where a log is
/// clamped its gradient is 0; elsewhere the gradient is `(p - y) / (p (1 - p))` per element
/// (PyTorch divides by `max(p (1 - p), 1e-12)` instead: the two differ only for `p` within
/// about `1e-12` of 0 or 1). Prefer [`bce_with_logits`] when the logits are at hand.
pub fn bce(p: &Var, target: &Var) -> Result<Var> {
    same_shape("bce", p, target)?;
    if let Some(bad) = p.value().to_f64_vec()?.into_iter().find(|v| !(0.0..=1.0).contains(v)) {
        return Err(Error::invalid("bce", format!("input {bad} is not a probability: every input must be in [0, 1]")));
    }
    let log_p = log_clamped_at_minus_100(p)?;
    let log_not_p = log_clamped_at_minus_100(&p.affine(-1.0, 1.0)?)?;
    let positive = target.mul(&log_p)?;
    let negative = target.affine(-1.0, 1.0)?.mul(&log_not_p)?;
    positive.add(&negative)?.mean_all()?.neg()
}

/// `max(log x, -100)` with a zero gradient where the clamp holds. The log runs on 1 in
/// those places, so that `x = 0` gives no `0 * inf = NaN` in the backward pass.
fn log_clamped_at_minus_100(x: &Var) -> Result<Var> {
    let above = x.value().log()?.gt(-100.0)?;
    let safe = x.where_cond(&above, &Var::constant(x.value().ones_like()?))?;
    safe.log()?.where_cond(&above, &Var::constant(x.value().full_like(-100.0)?))
}

/// Cross-entropy of `logits` `[N, C]` (or `[N, C, d1, ..]`) against class indices
/// `targets` `[N]` (or `[N, d1, ..]`, i64), averaged over the targets. No target is
/// ignored (PyTorch ignores -100 by default: use [`cross_entropy_with`] for that).
pub fn cross_entropy(logits: &Var, targets: &Tensor) -> Result<Var> {
    logits.cross_entropy(targets, Default::default())
}

/// [`cross_entropy`] with PyTorch's `ignore_index` (those targets add no loss and are not
/// counted in the mean) and `label_smoothing` `eps` (the target distribution is
/// `(1 - eps) onehot + eps / C`). When every target is ignored the loss is 0, not NaN.
pub fn cross_entropy_with(logits: &Var, targets: &Tensor, options: CrossEntropyOptions) -> Result<Var> {
    logits.cross_entropy(targets, options)
}

/// Negative log-likelihood of the class indices `targets` `[N]` (or `[N, d1, ..]`, i64)
/// under `log_probs` `[N, C]` (or `[N, C, d1, ..]`), e.g. a `log_softmax`:
/// `-mean over counted n of log_probs[n, targets[n]]`, skipping targets equal to
/// `ignore_index` (PyTorch's default is `Some(-100)`). 0 when every target is ignored.
pub fn nll(log_probs: &Var, targets: &Tensor, ignore_index: Option<i64>) -> Result<Var> {
    log_probs.nll_loss(targets, ignore_index)
}

/// `KL(N(mu, diag(exp(logvar))) || N(0, I))`, the VAE's regulariser, in closed form:
/// `0.5 * sum(mu^2 + exp(logvar) - logvar - 1)` summed over every dim but the first
/// (the batch) and averaged over the batch, so that it adds to a per-sample
/// reconstruction loss to give the negative ELBO per sample. `mu` and `logvar` have the
/// same shape `[N, ..]`.
pub fn gaussian_kl_standard(mu: &Var, logvar: &Var) -> Result<Var> {
    same_shape("gaussian_kl_standard", mu, logvar)?;
    let batch = match mu.dims().first() {
        Some(&n) if n > 0 => n,
        _ => return Err(Error::bad_shape("gaussian_kl_standard", &mu.shape(), "expected [N, ..] with N >= 1")),
    };
    let per_element = mu.square()?.add(&logvar.exp()?)?.sub(logvar)?.affine(0.5, -0.5)?;
    per_element.sum_all()?.affine(1.0 / batch as f64, 0.0)
}

/// The Gaussian negative log-likelihood of `target` under `N(mean, var)`, as
/// `torch.nn.GaussianNLLLoss`: `mean(0.5 * (log v + (mean - target)^2 / v))`, plus
/// `0.5 * log(2 pi)` when `full`, with `v = max(var, eps)`. The clamp changes the value
/// only: the gradient passes to `var` as if unclamped (PyTorch clamps under `no_grad`).
/// `var` has the shape of `mean` (one variance per element), or that shape without its
/// last dim, or with one dim of size 1 (a variance shared along it). Negative variances
/// are an error.
pub fn gaussian_nll(mean: &Var, target: &Var, var: &Var, full: bool, eps: f64) -> Result<Var> {
    const OP: &str = "gaussian_nll";
    same_shape(OP, mean, target)?;
    let var = broadcastable_variance(OP, mean, var)?;
    if var.value().to_f64_vec()?.iter().any(|&v| v < 0.0) {
        return Err(Error::invalid(OP, "var has negative entries: variances must be >= 0"));
    }
    // v = var + (clamp(var) - var): the clamped value with the identity's gradient.
    let clamped = var.value().clamp(eps, f64::INFINITY)?;
    let v = var.add(&Var::constant(clamped.sub(var.value())?))?;
    let squared_error = mean.sub(target)?.square()?;
    let constant = if full { 0.5 * (2.0 * std::f64::consts::PI).ln() } else { 0.0 };
    v.log()?.add(&squared_error.div(&v)?)?.affine(0.5, constant)?.mean_all()
}

/// `var` shaped to broadcast against `mean` as `GaussianNLLLoss` allows: the same shape,
/// the shape without the last dim (unsqueezed here), or one dim of size 1.
fn broadcastable_variance(op: &'static str, mean: &Var, var: &Var) -> Result<Var> {
    let (m, v) = (mean.dims(), var.dims());
    if m == v {
        return Ok(var.clone());
    }
    if !m.is_empty() && v == &m[..m.len() - 1] {
        return var.unsqueeze(-1);
    }
    let mismatched: Vec<usize> = (0..m.len()).filter(|&d| v.len() == m.len() && m[d] != v[d]).collect();
    if let [d] = mismatched[..]
        && v[d] == 1
    {
        return Ok(var.clone());
    }
    Err(Error::ShapeMismatch {
        op,
        lhs: mean.shape(),
        rhs: var.shape(),
        reason: "var (rhs) must have the shape of the mean (lhs), that shape without its last dim, \
                 or that shape with one dim of size 1"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Fixture;
    use aigc_autograd::gradcheck;
    use aigc_tensor::Device;

    #[test]
    fn bce_with_logits_matches_the_naive_formula_and_its_gradient() {
        let z = Tensor::new(&[-30.0f64, -1.0, 0.0, 2.0, 40.0], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0.0f64, 1.0, 0.5, 0.0, 1.0], &Device::Cpu).unwrap();
        let got = bce_with_logits(&Var::constant(z.clone()), &Var::constant(y.clone())).unwrap();
        let (zs, ys) = (z.to_vec::<f64>().unwrap(), y.to_vec::<f64>().unwrap());
        let want: f64 = zs
            .iter()
            .zip(&ys)
            .map(|(z, y)| {
                let p: f64 = 1.0 / (1.0 + (-z).exp());
                -(y * p.max(1e-300).ln() + (1.0 - y) * (1.0 - p).max(1e-300).ln())
            })
            .sum::<f64>()
            / 5.0;
        assert!((got.value().to_scalar::<f64>().unwrap() - want).abs() < 1e-9);
        let zs_small = Tensor::new(&[-1.0f64, 0.5, 2.0], &Device::Cpu).unwrap();
        let ys_small = Var::constant(Tensor::new(&[0.0f64, 1.0, 0.3], &Device::Cpu).unwrap());
        gradcheck(|v| bce_with_logits(&v[0], &ys_small), &[&zs_small], "bce_with_logits").unwrap();
    }

    #[test]
    fn mse_and_l1_check_shapes() {
        let a = Var::constant(Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap());
        let b = Var::constant(Tensor::new(&[2.0f64, 4.0], &Device::Cpu).unwrap());
        assert_eq!(mse(&a, &b).unwrap().value().to_scalar::<f64>().unwrap(), 2.5);
        assert_eq!(l1(&a, &b).unwrap().value().to_scalar::<f64>().unwrap(), 1.5);
        let c = Var::constant(Tensor::new(&[1.0f64], &Device::Cpu).unwrap());
        assert!(mse(&a, &c).unwrap_err().to_string().contains("same shape"));
    }

    #[test]
    fn losses_match_pytorch() {
        let fx = Fixture::layers();
        let pair = ["input", "target"];
        fx.check_loss("l1", &pair, |v| l1(&v[0], &v[1]));
        fx.check_loss("mse", &pair, |v| mse(&v[0], &v[1]));
        fx.check_loss("bce", &pair, |v| bce(&v[0], &v[1]));
        fx.check_loss("bce_with_logits", &pair, |v| bce_with_logits(&v[0], &v[1]));
        let targets = fx.get("nll.target");
        fx.check_loss("nll", &["input"], |v| nll(&v[0], &targets, Some(-100)));
        let options = CrossEntropyOptions { ignore_index: Some(-100), label_smoothing: 0.1 };
        let targets = fx.get("cross_entropy.target");
        fx.check_loss("cross_entropy", &["input"], |v| cross_entropy_with(&v[0], &targets, options));
        let options = CrossEntropyOptions { ignore_index: Some(-100), label_smoothing: 0.0 };
        let targets = fx.get("cross_entropy_spatial.target");
        fx.check_loss("cross_entropy_spatial", &["input"], |v| cross_entropy_with(&v[0], &targets, options));
        fx.check_loss("gaussian_kl", &["mu", "logvar"], |v| gaussian_kl_standard(&v[0], &v[1]));
        let triple = ["input", "target", "var"];
        fx.check_loss("gaussian_nll_full", &triple, |v| gaussian_nll(&v[0], &v[1], &v[2], true, 1e-6));
        for case in ["gaussian_nll_shared_var", "gaussian_nll_var_without_last_dim"] {
            fx.check_loss(case, &triple, |v| gaussian_nll(&v[0], &v[1], &v[2], false, 1e-6));
        }
    }

    #[test]
    fn bce_clamps_the_logs_at_minus_100_with_finite_gradients() {
        let p = Var::leaf(Tensor::new(&[0.0f32, 1.0, 0.5], &Device::Cpu).unwrap());
        let y = Var::constant(Tensor::new(&[1.0f32, 0.0, 1.0], &Device::Cpu).unwrap());
        let loss = bce(&p, &y).unwrap();
        let want = (100.0 + 100.0 + 2f32.ln()) / 3.0;
        assert!((loss.value().to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
        loss.backward().unwrap();
        let grad = p.grad().unwrap().to_vec::<f32>().unwrap();
        assert_eq!(&grad[..2], &[0.0, 0.0], "no gradient where the log is clamped");
        assert!((grad[2] - (-2.0 / 3.0)).abs() < 1e-6, "{grad:?}");
        let bad = Var::constant(Tensor::new(&[1.5f32, 0.5, 0.5], &Device::Cpu).unwrap());
        let err = bce(&bad, &y).unwrap_err().to_string();
        assert_eq!(err, "bce: input 1.5 is not a probability: every input must be in [0, 1]");
    }

    #[test]
    fn gaussian_losses_gradcheck_and_reject_bad_arguments() {
        let t =
            |seed, dims: &[usize]| Tensor::normal(dims, 0.0, 1.0, aigc_tensor::DType::F64, &Device::Cpu, seed).unwrap();
        let var = t(3, &[2, 3]).abs().unwrap().affine(1.0, 0.1).unwrap();
        gradcheck(|v| gaussian_kl_standard(&v[0], &v[1]), &[&t(1, &[2, 3]), &t(2, &[2, 3])], "kl").unwrap();
        gradcheck(|v| gaussian_nll(&v[0], &v[1], &v[2], true, 1e-6), &[&t(4, &[2, 3]), &t(5, &[2, 3]), &var], "nll")
            .unwrap();
        let c = |dims: &[usize]| Var::constant(t(6, dims));
        let err = gaussian_nll(&c(&[2, 3]), &c(&[2, 3]), &c(&[3, 3]), false, 1e-6).unwrap_err().to_string();
        assert!(err.starts_with("gaussian_nll: lhs [2, 3] and rhs [3, 3]: var (rhs) must have"), "{err}");
        let negative = Var::constant(var.neg().unwrap());
        let err = gaussian_nll(&c(&[2, 3]), &c(&[2, 3]), &negative, false, 1e-6).unwrap_err().to_string();
        assert_eq!(err, "gaussian_nll: var has negative entries: variances must be >= 0");
        let err = gaussian_kl_standard(&c(&[2, 3]), &c(&[3, 2])).unwrap_err().to_string();
        assert!(err.contains("same shape"), "{err}");
    }
}

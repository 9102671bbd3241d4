//! Losses, each a short composition of differentiable ops (mean reduction):
//! - MSE `mean((x - y)^2)`, L1 `mean(|x - y|)`;
//! - binary cross-entropy on logits, in the stable form
//!   `max(z, 0) - z y + log(1 + e^{-|z|})`;
//! - cross-entropy on logits with integer targets (fused log-softmax, see
//!   `Var::cross_entropy`).

use aigc_autograd::Var;
use aigc_tensor::{Error, Result, Tensor};

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

/// Cross-entropy of `logits` `[N, C]` against class indices `targets` `[N]` (i64).
pub fn cross_entropy(logits: &Var, targets: &Tensor) -> Result<Var> {
    logits.cross_entropy(targets, Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;
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
}

//! Numerical gradient checks, as `torch.autograd.gradcheck` / `gradgradcheck`.
//!
//! `gradcheck` compares the analytic gradient of a function of several tensors with
//! central finite differences `(f(x + h e_i) - f(x - h e_i)) / 2h` in f64. A non-scalar
//! output is first projected to a scalar with fixed random weights, so every output
//! element is checked. `gradgradcheck` applies `gradcheck` to the function
//! `x -> <grad f(x), v>`, built with `create_graph`, which checks every backward rule's
//! own derivative.

use crate::Var;
use crate::tape::{GradOptions, grad_with};
use aigc_tensor::{DType, Error, Result, Tensor};

/// Step and tolerances of a check.
#[derive(Clone, Copy, Debug)]
pub struct GradcheckOptions {
    /// Finite-difference step.
    pub eps: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// Relative tolerance.
    pub rtol: f64,
}

impl Default for GradcheckOptions {
    fn default() -> Self {
        GradcheckOptions { eps: 1e-6, atol: 1e-5, rtol: 1e-4 }
    }
}

/// Fixed pseudo-random weights in [0.5, 1.5) that project an output to a scalar.
fn projection(like: &Tensor, salt: u64) -> Result<Var> {
    Ok(Var::constant(Tensor::uniform(like.shape(), 0.5, 1.5, DType::F64, &like.device(), 0xC0FFEE ^ salt)?))
}

fn to_f64(inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    inputs.iter().map(|t| t.to_dtype(DType::F64)).collect()
}

/// Checks `f`'s gradients at `inputs` (converted to f64) against finite differences.
/// `name` labels the error.
pub fn gradcheck(f: impl Fn(&[Var]) -> Result<Var>, inputs: &[&Tensor], name: &str) -> Result<()> {
    gradcheck_with(f, inputs, name, GradcheckOptions::default())
}

/// [`gradcheck`] with explicit step and tolerances.
pub fn gradcheck_with(
    f: impl Fn(&[Var]) -> Result<Var>,
    inputs: &[&Tensor],
    name: &str,
    opts: GradcheckOptions,
) -> Result<()> {
    let inputs = to_f64(inputs)?;
    let leaves: Vec<Var> = inputs.iter().map(|t| Var::leaf(t.clone())).collect();
    let out = f(&leaves)?;
    let weights = projection(out.value(), 0)?;
    let scalar = |out: &Var| -> Result<Var> { out.mul(&weights)?.sum_all() };
    let loss = scalar(&out)?;
    let analytic = grad_with(&[&loss], None, &leaves.iter().collect::<Vec<_>>(), GradOptions::default())?;

    for (i, x) in inputs.iter().enumerate() {
        let base = x.to_vec::<f64>()?;
        let got = analytic[i].value().to_dtype(DType::F64)?.to_vec::<f64>()?;
        for j in 0..base.len() {
            let eval = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[j] += delta;
                let moved = Tensor::from_vec(v, x.shape(), &x.device())?;
                let args: Vec<Var> = inputs
                    .iter()
                    .enumerate()
                    .map(|(k, t)| Var::constant(if k == i { moved.clone() } else { t.clone() }))
                    .collect();
                scalar(&f(&args)?)?.value().to_scalar::<f64>()
            };
            let numeric = (eval(opts.eps)? - eval(-opts.eps)?) / (2.0 * opts.eps);
            let ok = (got[j] - numeric).abs() <= opts.atol + opts.rtol * numeric.abs()
                || (got[j].is_nan() && numeric.is_nan());
            if !ok {
                return Err(Error::Graph {
                    op: "gradcheck",
                    reason: format!(
                        "{name}: input {i} of shape {}, element {j}: analytic gradient {} but finite differences give {numeric}",
                        x.shape(),
                        got[j]
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Checks second derivatives: `gradcheck` of `x -> sum_i <d f / d x_i, v_i>` with fixed
/// random `v_i`, the gradient built with `create_graph`.
pub fn gradgradcheck(f: impl Fn(&[Var]) -> Result<Var>, inputs: &[&Tensor], name: &str) -> Result<()> {
    let inputs = to_f64(inputs)?;
    let first_order = |xs: &[Var]| -> Result<Var> {
        // Finite differences call this with constants: make them leaves so the inner
        // gradient can still be taken.
        let xs: Vec<Var> = xs.iter().map(|x| if x.needs_grad() { x.clone() } else { x.requires_grad() }).collect();
        let xs = &xs[..];
        let out = f(xs)?;
        let loss = out.mul(&projection(out.value(), 0)?)?.sum_all()?;
        let grads = grad_with(
            &[&loss],
            None,
            &xs.iter().collect::<Vec<_>>(),
            GradOptions { create_graph: true, retain_graph: true },
        )?;
        let mut total: Option<Var> = None;
        for (k, g) in grads.iter().enumerate() {
            let term = g.mul(&projection(g.value(), 1 + k as u64)?)?.sum_all()?;
            total = Some(match total {
                Some(t) => t.add(&term)?,
                None => term,
            });
        }
        total.ok_or_else(|| Error::invalid("gradgradcheck", "needs at least one input"))
    };
    gradcheck(first_order, &inputs.iter().collect::<Vec<_>>(), &format!("{name} (second order)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigc_tensor::Device;

    #[test]
    fn a_wrong_rule_is_caught() {
        // An op whose recorded gradient is off by a factor of 2.
        let wrong = |v: &[Var]| -> Result<Var> {
            let x = &v[0];
            x.unary_op("wrong_square", x.value().square()?, |_, g, x| g.mul(x))
        };
        let x = Tensor::new(&[0.5f64, -1.0, 2.0], &Device::Cpu).unwrap();
        let err = gradcheck(wrong, &[&x], "wrong_square").unwrap_err().to_string();
        assert!(err.contains("wrong_square: input 0 of shape [3], element 0"), "{err}");
        gradcheck(|v| v[0].square(), &[&x], "square").unwrap();
    }

    #[test]
    fn a_rule_that_is_not_differentiable_again_is_caught() {
        // Correct first derivative, but computed from a detached value: its second
        // derivative is wrong, and gradgradcheck says so.
        let detached = |v: &[Var]| -> Result<Var> {
            let x = &v[0];
            x.unary_op("detached_cube", x.value().powf(3.0)?, |_, g, x| g.mul(&x.detach().square()?.affine(3.0, 0.0)?))
        };
        let x = Tensor::new(&[0.5f64, -1.0, 2.0], &Device::Cpu).unwrap();
        gradcheck(detached, &[&x], "detached_cube").unwrap();
        assert!(gradgradcheck(detached, &[&x], "detached_cube").is_err());
    }
}

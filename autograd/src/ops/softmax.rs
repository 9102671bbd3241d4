//! Differentiable softmax and log-softmax along one dim.
//!
//! With `y` the op's output and `g` the gradient flowing into it, both rules are written
//! in terms of `y`, which saves recomputing the normaliser:
//! - softmax: `dx = y * (g - sum(g * y))`, the Jacobian `diag(y) - y y^T` applied to `g`;
//! - log-softmax: `dx = g - exp(y) * sum(g)`, since `exp(y)` is the softmax.
//!
//! The sums run over the softmax dim (kept). `y` is the output `Var` itself, so with
//! `create_graph` the rule's own derivative flows back through the op again: the rule is
//! then composed of differentiable `Var` ops. Without `create_graph` (plain gradients)
//! it is the fused one-pass kernel ([`Tensor::softmax_backward`](aigc_tensor::Tensor::softmax_backward)).

use crate::{Var, mode};
use aigc_tensor::Result;

/// The dims a softmax line spans, as a reduction argument: `[dim]`, or every dim (`[]`)
/// for a 0-d tensor, whose only line is itself.
fn line_dims(x: &Var, dim: isize) -> Vec<isize> {
    if x.rank() == 0 { Vec::new() } else { vec![dim] }
}

/// The softmax input gradient `y * (g - sum(g * y))` along `dim`, from the output `y`.
/// Shared with attention, whose masked softmax has the same rule (there `y` and `g` may
/// differ in broadcast batch dims; the result has their broadcast shape).
pub(crate) fn softmax_backward(y: &Var, g: &Var, dim: isize) -> Result<Var> {
    if !mode::is_grad_enabled() {
        let (y, g) = y.value().broadcast_pair(g.value(), "softmax_backward")?;
        return Ok(Var::constant(y.softmax_backward(&g, dim)?));
    }
    let dims = line_dims(y, dim);
    y.mul(&g.sub(&g.mul(y)?.sum(&dims, true)?)?)
}

/// The log-softmax input gradient `g - exp(y) * sum(g)` along `dim`, from the output `y`.
fn log_softmax_backward(y: &Var, g: &Var, dim: isize) -> Result<Var> {
    if !mode::is_grad_enabled() {
        return Ok(Var::constant(y.value().log_softmax_backward(g.value(), dim)?));
    }
    g.sub(&y.exp()?.mul(&g.sum(&line_dims(y, dim), true)?)?)
}

impl Var {
    /// `exp(x_i) / sum_j exp(x_j)` along `dim` (negative counts from the end), as
    /// [`Tensor::softmax`](aigc_tensor::Tensor::softmax).
    pub fn softmax(&self, dim: isize) -> Result<Var> {
        let value = self.value().softmax(dim)?;
        self.unary_op("softmax", value, move |y, g, _| softmax_backward(y, g, dim))
    }

    /// `log(softmax(x))` along `dim`, as
    /// [`Tensor::log_softmax`](aigc_tensor::Tensor::log_softmax).
    pub fn log_softmax(&self, dim: isize) -> Result<Var> {
        let value = self.value().log_softmax(dim)?;
        self.unary_op("log_softmax", value, move |y, g, _| log_softmax_backward(y, g, dim))
    }
}

#[cfg(test)]
mod tests {
    use crate::Var;
    use crate::gradcheck::{gradcheck, gradgradcheck};
    use crate::testing::inputs;
    use aigc_tensor::{DType, Tensor};
    use proptest::prelude::*;

    /// A tensor of random shape and layout with a valid dim of it (0 or -1 for 0-d).
    fn tensor_and_dim() -> impl Strategy<Value = (Tensor, isize)> {
        inputs::strided(3, 4).prop_flat_map(|t| {
            let rank = t.rank().max(1) as isize;
            (Just(t), -rank..rank)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn softmax_grads_match_finite_differences_on_any_dim_and_layout((x, dim) in tensor_and_dim()) {
            gradcheck(|v| v[0].softmax(dim), &[&x], "softmax").unwrap();
        }

        #[test]
        fn log_softmax_grads_match_finite_differences_on_any_dim_and_layout((x, dim) in tensor_and_dim()) {
            gradcheck(|v| v[0].log_softmax(dim), &[&x], "log_softmax").unwrap();
        }
    }

    #[test]
    fn softmax_second_derivatives_match_finite_differences() {
        let x = inputs::seeded(&[4, 3], 1).t().unwrap();
        gradgradcheck(|v| v[0].softmax(0), &[&x], "softmax").unwrap();
        gradgradcheck(|v| v[0].softmax(-1), &[&x], "softmax").unwrap();
        gradgradcheck(|v| v[0].log_softmax(1), &[&x], "log_softmax").unwrap();
        gradgradcheck(|v| v[0].log_softmax(-2), &[&x], "log_softmax").unwrap();
    }

    #[test]
    fn forward_values_equal_the_tensor_ops() {
        let x = inputs::seeded(&[2, 3, 4], 2).to_dtype(DType::F32).unwrap().permute(&[2, 0, 1]).unwrap();
        let v = Var::leaf(x.clone());
        for dim in [0, 1, -1] {
            let got = v.softmax(dim).unwrap().value().to_vec::<f32>().unwrap();
            assert_eq!(got, x.softmax(dim).unwrap().to_vec::<f32>().unwrap());
            let got = v.log_softmax(dim).unwrap().value().to_vec::<f32>().unwrap();
            assert_eq!(got, x.log_softmax(dim).unwrap().to_vec::<f32>().unwrap());
        }
    }

    #[test]
    fn fused_plain_gradients_equal_the_composed_create_graph_ones() {
        let x = Var::leaf(inputs::seeded(&[5, 70], 4).to_dtype(DType::F32).unwrap());
        let seed = Var::constant(inputs::seeded(&[5, 70], 5).to_dtype(DType::F32).unwrap());
        for log in [false, true] {
            let loss = || {
                let y = if log { x.log_softmax(-1) } else { x.softmax(-1) }.unwrap();
                y.mul(&seed).unwrap().sum_all().unwrap()
            };
            let plain = crate::grad(&[&loss()], &[&x], false).unwrap()[0].value().to_f64_vec().unwrap();
            let composed = crate::grad(&[&loss()], &[&x], true).unwrap()[0].value().to_f64_vec().unwrap();
            for (a, b) in plain.iter().zip(&composed) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "log {log}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_zero_dim_softmax_has_zero_gradient() {
        let x = Var::leaf(Tensor::full(0.7, (), DType::F64, &aigc_tensor::Device::Cpu).unwrap());
        x.softmax(-1).unwrap().mul(&x).unwrap().backward().unwrap();
        // y = 1 whatever x is, so d(y * x)/dx = y = 1.
        assert_eq!(x.grad().unwrap().to_scalar::<f64>().unwrap(), 1.0);
    }

    #[test]
    fn a_bad_dim_is_an_error() {
        let x = Var::leaf(inputs::seeded(&[2, 3], 3));
        let err = x.softmax(2).unwrap_err().to_string();
        assert!(err.contains("softmax"), "{err}");
    }
}

//! Differentiable matmul: `dA = dC @ B^T`, `dB = A^T @ dC`. Broadcast batch dims are
//! summed back by the tape; 1-d operands are promoted with `unsqueeze` (itself
//! differentiable), so the rule only ever sees matrices.

use crate::{Var, mode};
use aigc_kernels::parallel;
use aigc_tensor::{Error, Result, UnaryOp};

impl Var {
    /// `self @ rhs` with numpy semantics (see `Tensor::matmul`).
    pub fn matmul(&self, rhs: &Var) -> Result<Var> {
        if self.rank() == 0 || rhs.rank() == 0 {
            // Let the tensor op produce its error message.
            return Err(self
                .value()
                .matmul(rhs.value())
                .err()
                .unwrap_or_else(|| Error::invalid("matmul", "0-d operand")));
        }
        let a = if self.rank() == 1 { self.unsqueeze(0)? } else { self.clone() };
        let b = if rhs.rank() == 1 { rhs.unsqueeze(-1)? } else { rhs.clone() };
        if b.rank() == 2 && a.rank() > 2 {
            // Fold the batch dims of `a` into its rows, so that forward and both backward
            // products are single GEMMs (no batched products, no reduction of `b`'s gradient).
            let mut shape = a.dims()[..a.rank() - 1].to_vec();
            let k = a.dims()[a.rank() - 1];
            let out = a.reshape([shape.iter().product(), k])?.matmul(&b)?;
            shape.push(b.dims()[1]);
            let out = out.reshape(shape)?;
            return if rhs.rank() == 1 { out.squeeze(-1) } else { Ok(out) };
        }
        let value = a.value().matmul(b.value())?;
        let out = a.binary_op(&b, "matmul", value, |_, g, a, b| matmul_grads(g, a, b))?;
        match (self.rank(), rhs.rank()) {
            (1, 1) => out.reshape(()),
            (1, _) => out.squeeze(-2),
            (_, 1) => out.squeeze(-1),
            _ => Ok(out),
        }
    }

    /// `activation(self @ rhs + bias)`, a linear layer's forward (see
    /// `Tensor::matmul_bias_act`; `bias` has shape `[n]`, `rhs` is a matrix or a batch).
    ///
    /// When nothing needs a gradient (inference, sampling) the whole expression is one
    /// fused tensor op. Otherwise the product and the bias are one recorded op (gradients
    /// `dA = G B^T`, `dB = A^T G`, `dbias` = `G` summed over every dim but the last) and the
    /// activation is recorded after it ([`Var::apply`]), since its backward reads the
    /// pre-activation values.
    pub fn matmul_bias_act(&self, rhs: &Var, bias: Option<&Var>, activation: Option<UnaryOp>) -> Result<Var> {
        let inputs_need_grad = self.needs_grad() || rhs.needs_grad() || bias.is_some_and(Var::needs_grad);
        if !mode::is_grad_enabled() || !inputs_need_grad {
            let bias = bias.map(Var::value);
            return Ok(Var::constant(self.value().matmul_bias_act(rhs.value(), bias, activation)?));
        }
        let Some(bias) = bias else {
            let product = self.matmul(rhs)?;
            return activation.map_or(Ok(product.clone()), |op| product.apply(op));
        };
        if self.rank() == 1 && rhs.rank() >= 2 {
            return self.unsqueeze(0)?.matmul_bias_act(rhs, Some(bias), activation)?.squeeze(-2);
        }
        if self.rank() > 2 && rhs.rank() == 2 {
            // As in `matmul`: fold the batch dims of `self` into its rows.
            let mut shape = self.dims()[..self.rank() - 1].to_vec();
            let rows = self.reshape([shape.iter().product(), self.dims()[self.rank() - 1]])?;
            shape.push(rhs.dims()[1]);
            return rows.matmul_bias_act(rhs, Some(bias), activation)?.reshape(shape);
        }
        let value = self.value().matmul_bias_act(rhs.value(), Some(bias.value()), None)?;
        let inputs = vec![self.clone(), rhs.clone(), bias.clone()];
        let pre_activation = Var::from_op(
            "matmul_bias",
            value,
            inputs,
            Box::new(|_, g, xs| {
                // The tape sums each gradient back to its input's shape (the bias's
                // gradient is `g` summed over the rows).
                let (da, db) = matmul_grads(g, &xs[0], &xs[1])?;
                Ok(vec![Some(da), Some(db), Some(g.clone())])
            }),
        )?;
        activation.map_or(Ok(pre_activation.clone()), |op| pre_activation.apply(op))
    }
}

/// The gradients of `A @ B` for matrices (or batches of equal shape): `(G B^T, A^T G)`,
/// each computed in its operand's memory order (see `is_transposed`).
///
/// On a walk that records nothing and a pool of two threads, the two products run side
/// by side, each on one thread ([`parallel::join`]): the products of a small model (a
/// GPT baby's `768 x 128 x 384`) split across two threads lose 10-20% to the split, so
/// two whole products at once finish sooner than one after the other. (With more
/// threads each product keeps them all: the pool cannot give each half of them.)
fn matmul_grads(g: &Var, a: &Var, b: &Var) -> Result<(Var, Var)> {
    let da = || if is_transposed(a) { b.matmul(&g.t()?)?.t() } else { g.matmul(&b.t()?) };
    let db = || if is_transposed(b) { g.t()?.matmul(a)?.t() } else { a.t()?.matmul(g) };
    if !mode::is_grad_enabled() && parallel::threads() == 2 {
        // The worker's own grad mode is not this thread's: recording stays off there too.
        let (da, db) = parallel::join(|| mode::no_grad(da), || mode::no_grad(db));
        return Ok((da?, db?));
    }
    Ok((da()?, db()?))
}

/// Whether `x` is a transposed contiguous matrix, like a linear layer's `W.t()`. Its
/// gradient is then computed transposed (`(A^T G)^T = G^T A`) and handed back as a
/// transposed view, so that the gradient reaching the contiguous `W` is contiguous too
/// (no transposing copy when it is accumulated).
fn is_transposed(x: &Var) -> bool {
    let v = x.value();
    v.rank() == 2 && !v.is_contiguous() && v.t().is_ok_and(|t| t.is_contiguous())
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::{gradcheck, gradgradcheck};
    use crate::testing::inputs;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn matmul_grads_match_finite_differences_with_broadcast_batches((a, b) in inputs::matmul_pair()) {
            gradcheck(|v| v[0].matmul(&v[1]), &[&a, &b], "matmul").unwrap();
        }
    }

    /// The two gradients computed side by side (a plain walk on a two-thread pool) are the
    /// gradients computed one after the other (one thread), for both memory orders of B.
    #[test]
    fn side_by_side_gradients_equal_sequential_ones() {
        use crate::Var;
        let grads = |threads: usize, transposed_b: bool| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let a = Var::leaf(inputs::seeded(&[70, 24], 1));
                let w = Var::leaf(inputs::seeded(&[16, 24], 2));
                let b = if transposed_b { w.t().unwrap() } else { w.reshape([24, 16]).unwrap() };
                a.matmul(&b).unwrap().tanh().unwrap().sum_all().unwrap().backward().unwrap();
                [a.grad().unwrap(), w.grad().unwrap()].map(|g| g.to_f64_vec().unwrap())
            })
        };
        for transposed_b in [false, true] {
            let (one, two) = (grads(1, transposed_b), grads(2, transposed_b));
            for (x, y) in one.iter().zip(&two) {
                assert_eq!(x.len(), y.len());
                for (p, q) in x.iter().zip(y) {
                    assert!((p - q).abs() <= 1e-12 * (1.0 + p.abs()), "{p} vs {q}");
                }
            }
        }
    }

    #[test]
    fn matmul_second_derivatives_and_vector_promotion() {
        let a = inputs::seeded(&[2, 3, 4], 1);
        let b = inputs::seeded(&[4, 2], 2);
        gradgradcheck(|v| v[0].matmul(&v[1])?.tanh(), &[&a, &b], "matmul").unwrap();
        let m = inputs::seeded(&[3, 4], 3);
        let x = inputs::seeded(&[4], 4);
        gradcheck(|v| v[0].matmul(&v[1]), &[&m, &x], "matvec").unwrap();
        gradcheck(|v| v[1].matmul(&v[0].t()?), &[&m, &x], "vecmat").unwrap();
        gradcheck(|v| v[0].matmul(&v[0]), &[&x], "dot").unwrap();
    }

    #[test]
    fn fused_bias_and_activation_gradients_match_finite_differences() {
        use aigc_tensor::UnaryOp;
        let bias = inputs::seeded(&[5], 9);
        for (a_shape, b_shape) in
            [(&[3, 4][..], &[4, 5][..]), (&[2, 3, 4], &[4, 5]), (&[4], &[4, 5]), (&[2, 3, 4], &[2, 4, 5])]
        {
            let (a, b) = (inputs::seeded(a_shape, 7), inputs::seeded(b_shape, 8));
            for act in [None, Some(UnaryOp::Gelu), Some(UnaryOp::Tanh)] {
                gradcheck(|v| v[0].matmul_bias_act(&v[1], Some(&v[2]), act), &[&a, &b, &bias], "matmul_bias_act")
                    .unwrap();
                gradcheck(|v| v[0].matmul_bias_act(&v[1], None, act), &[&a, &b], "matmul_act").unwrap();
            }
        }
        gradgradcheck(
            |v| v[0].matmul_bias_act(&v[1], Some(&v[2]), None),
            &[&inputs::seeded(&[3, 4], 1), &inputs::seeded(&[4, 5], 2), &bias],
            "matmul_bias",
        )
        .unwrap();
    }

    #[test]
    fn fused_forward_without_gradients_equals_the_recorded_one() {
        use aigc_tensor::UnaryOp;
        let x = crate::Var::leaf(inputs::seeded(&[2, 3, 4], 3));
        let w = crate::Var::leaf(inputs::seeded(&[5, 4], 4));
        let b = crate::Var::leaf(inputs::seeded(&[5], 5));
        let act = Some(UnaryOp::GeluTanh);
        let recorded = x.matmul_bias_act(&w.t().unwrap(), Some(&b), act).unwrap();
        assert!(recorded.needs_grad());
        let fused = crate::no_grad(|| x.matmul_bias_act(&w.t().unwrap(), Some(&b), act)).unwrap();
        assert!(!fused.needs_grad());
        let diff = recorded.value().sub(fused.value()).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
    }

    #[test]
    fn gradients_of_transposed_operands_reach_their_matrices_contiguous() {
        // x W^T and W^T x, as a linear layer writes them: W's gradient arrives contiguous
        // and equals the plain formula's.
        let (x, w) = (crate::Var::leaf(inputs::seeded(&[5, 3], 5)), crate::Var::leaf(inputs::seeded(&[4, 3], 6)));
        x.matmul(&w.t().unwrap()).unwrap().square().unwrap().sum_all().unwrap().backward().unwrap();
        let gw = w.grad().unwrap();
        assert!(gw.is_contiguous());
        let y = x.value().matmul(&w.value().t().unwrap()).unwrap();
        let want = y.affine(2.0, 0.0).unwrap().t().unwrap().matmul(x.value()).unwrap();
        assert!(gw.sub(&want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() < 1e-12);
        gradcheck(|v| v[1].t()?.matmul(&v[1].square()?), &[x.value(), w.value()], "transposed lhs").unwrap();
    }
}

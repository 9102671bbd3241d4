//! Differentiable matmul: `dA = dC @ B^T`, `dB = A^T @ dC`. Broadcast batch dims are
//! summed back by the tape; 1-d operands are promoted with `unsqueeze` (itself
//! differentiable), so the rule only ever sees matrices.

use crate::Var;
use aigc_tensor::{Error, Result};

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
        let out = a.binary_op(&b, "matmul", value, |_, g, a, b| {
            // Each gradient is computed in its operand's memory order (see `is_transposed`).
            let da = if is_transposed(a) { b.matmul(&g.t()?)?.t()? } else { g.matmul(&b.t()?)? };
            let db = if is_transposed(b) { g.t()?.matmul(a)?.t()? } else { a.t()?.matmul(g)? };
            Ok((da, db))
        })?;
        match (self.rank(), rhs.rank()) {
            (1, 1) => out.reshape(()),
            (1, _) => out.squeeze(-2),
            (_, 1) => out.squeeze(-1),
            _ => Ok(out),
        }
    }
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

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
        let out = a.binary_op(&b, "matmul", value, |_, g, a, b| Ok((g.matmul(&b.t()?)?, a.t()?.matmul(g)?)))?;
        match (self.rank(), rhs.rank()) {
            (1, 1) => out.reshape(()),
            (1, _) => out.squeeze(-2),
            (_, 1) => out.squeeze(-1),
            _ => Ok(out),
        }
    }
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
}

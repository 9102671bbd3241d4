//! Differentiable indexing. `index_select` and `index_add` are each other's gradients
//! (pick rows / scatter-add rows back), so both are differentiable any number of times.

use crate::Var;
use aigc_tensor::{Result, Tensor};

impl Var {
    /// Entries `indices` (1-d i64) of `dim`.
    pub fn index_select(&self, dim: isize, indices: &Tensor) -> Result<Var> {
        let value = self.value().index_select(dim, indices)?;
        let indices = indices.clone();
        self.unary_op("index_select", value, move |_, g, x| x.zeros_like()?.index_add(dim, &indices, g))
    }

    /// `self` with `source` rows added at `indices` of `dim` (repeats accumulate).
    pub fn index_add(&self, dim: isize, indices: &Tensor, source: &Var) -> Result<Var> {
        let value = self.value().index_add(dim, indices, source.value())?;
        let indices = indices.clone();
        self.binary_op(source, "index_add", value, move |_, g, _, _| Ok((g.clone(), g.index_select(dim, &indices)?)))
    }
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::{gradcheck, gradgradcheck};
    use crate::testing::inputs;
    use aigc_tensor::{Device, Tensor};

    #[test]
    fn index_select_and_index_add_grads_match_finite_differences() {
        let x = inputs::seeded(&[4, 3], 1);
        let idx = Tensor::new(&[3i64, 0, 3, 1], &Device::Cpu).unwrap();
        gradcheck(|v| v[0].index_select(0, &idx)?.square(), &[&x], "index_select").unwrap();
        let src = inputs::seeded(&[4, 3], 2);
        gradcheck(|v| v[0].index_add(0, &idx, &v[1])?.square(), &[&x, &src], "index_add").unwrap();
        let cols = Tensor::new(&[2i64, 0, 2], &Device::Cpu).unwrap();
        gradgradcheck(|v| v[0].index_select(1, &cols)?.exp(), &[&x], "index_select").unwrap();
    }
}

//! Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
//! Cost"): run a block without recording, keep only its inputs, and recompute the block
//! with recording during the backward walk. Memory for the block's intermediates is
//! traded for one extra forward pass.

use crate::Var;
use crate::mode::no_grad;
use crate::tape::{GradOptions, grad_with};
use aigc_tensor::Result;
use std::sync::Arc;

/// Computes `f(inputs)` without keeping its intermediates; the backward walk recomputes
/// them. The gradients it returns are plain values, so a checkpointed block supports
/// `backward` and first-order `grad`, not `create_graph`.
pub fn checkpoint(f: impl Fn(&[Var]) -> Result<Var> + Send + Sync + 'static, inputs: &[&Var]) -> Result<Var> {
    let f = Arc::new(f);
    let detached: Vec<Var> = inputs.iter().map(|x| x.detach()).collect();
    let value = no_grad(|| f(&detached))?.value().clone();
    Var::from_op(
        "checkpoint",
        value,
        inputs.iter().map(|x| (*x).clone()).collect(),
        Box::new(move |_, g, xs| {
            let leaves: Vec<Var> = xs.iter().map(|x| x.requires_grad()).collect();
            let out = crate::mode::GradMode::scoped(true, || f(&leaves))?;
            let seed = g.detach();
            let grads = grad_with(&[&out], Some(&[&seed]), &leaves.iter().collect::<Vec<_>>(), GradOptions::default())?;
            Ok(xs.iter().zip(grads).map(|(x, g)| x.needs_grad().then_some(g)).collect())
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::inputs;

    #[test]
    fn checkpointed_block_gives_the_same_gradients() {
        let block = |v: &[Var]| -> Result<Var> { v[0].matmul(&v[1])?.tanh()?.matmul(&v[1].t()?)?.square()?.sum_all() };
        let x = Var::leaf(inputs::seeded(&[3, 4], 1));
        let w = Var::leaf(inputs::seeded(&[4, 5], 2));
        block(&[x.clone(), w.clone()]).unwrap().backward().unwrap();
        let (gx, gw) = (x.grad().unwrap().to_vec::<f64>().unwrap(), w.grad().unwrap().to_vec::<f64>().unwrap());
        x.zero_grad();
        w.zero_grad();
        let out = checkpoint(block, &[&x, &w]).unwrap();
        out.affine(2.0, 0.0).unwrap().backward().unwrap();
        let twice = |v: Vec<f64>| v.into_iter().map(|g| 2.0 * g).collect::<Vec<_>>();
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-12);
        assert!(close(&x.grad().unwrap().to_vec::<f64>().unwrap(), &twice(gx)));
        assert!(close(&w.grad().unwrap().to_vec::<f64>().unwrap(), &twice(gw)));
    }
}

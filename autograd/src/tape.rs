//! Reverse-mode autodiff in one file: the record, the reverse walk, the accumulation.
//!
//! **The record.** Every op on [`Var`]s that needs a gradient stores a [`Record`] in its
//! output: the op's name, its inputs, and its backward rule. Each `Var` gets an id from a
//! global counter at creation, so ids are the positions on a Wengert list (tape): an
//! op's inputs always have smaller ids than its output.
//!
//! **The reverse walk.** `grad` collects the recorded ops reachable from the outputs and
//! visits them in decreasing id order, i.e. the tape backwards. That order is topological:
//! by the time an op is visited, every op that consumed its output has already pushed
//! its share of the gradient.
//!
//! **The accumulation.** A rule maps the gradient of an op's output to gradients of its
//! inputs; contributions to the same input are summed. Leaves (parameters) keep their
//! summed gradient in `.grad()` across calls until zeroed.
//!
//! Rules are written with `Var` ops, so with `create_graph` the walk itself is recorded
//! and the gradients can be differentiated again (WGAN-GP, R1, score matching). Without
//! it, the walk runs with recording off and gradients are plain values.
//!
//! After a walk the records it visited are freed (their saved inputs released) unless
//! `retain_graph` is asked; walking a freed record is an error, as in PyTorch.

use crate::mode::{self, GradMode};
use crate::var::{Kind, Var};
use aigc_tensor::{Error, Result, Tensor};
use std::collections::{BTreeMap, HashMap};

/// A backward rule: given the op's output and the gradient flowing into it, return one
/// gradient per input (`None` for inputs that need none, such as indices).
pub type BackwardFn = Box<dyn Fn(&Var, &Var, &[Var]) -> Result<Vec<Option<Var>>> + Send + Sync>;

/// What an op leaves on the tape.
pub struct Record {
    pub op: &'static str,
    pub inputs: Vec<Var>,
    pub backward: BackwardFn,
    /// Set for an op whose output is a window of its one input (`narrow`): see [`Window`].
    pub window: Option<Window>,
}

/// The output of a `narrow` is the elements `start..start + len` of `dim` of its input.
/// Its backward rule pads the gradient with zeros to the input's shape, which a walk
/// that records (`create_graph`) needs; a plain walk instead adds the gradient straight
/// into that window of the gradient pending for the input. Splitting a tensor into `n`
/// pieces (attention's fused q, k, v projection) then costs one zeroed buffer and `n`
/// additions into it, not `n` padded copies and `n - 1` full-size additions.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub dim: usize,
    pub start: usize,
}

/// Options for a backward walk.
#[derive(Clone, Copy, Debug, Default)]
pub struct GradOptions {
    /// Record the walk so the returned gradients are themselves differentiable.
    pub create_graph: bool,
    /// Keep the records so the same graph can be walked again.
    pub retain_graph: bool,
}

/// Gradients of the sum of `outputs` (each scalar, or weighted by `seeds`) with respect
/// to `inputs`, like `torch.autograd.grad`. Inputs the outputs do not depend on get zeros.
pub fn grad_with(outputs: &[&Var], seeds: Option<&[&Var]>, inputs: &[&Var], opts: GradOptions) -> Result<Vec<Var>> {
    let grads = walk(outputs, seeds, opts, &[], |_| true)?;
    gradients_of(inputs, &grads)
}

/// Each input's gradient out of a walk's result; zeros for the inputs it did not reach.
fn gradients_of(inputs: &[&Var], grads: &BTreeMap<u64, (Var, Var)>) -> Result<Vec<Var>> {
    inputs
        .iter()
        .map(|x| match grads.get(&x.id()) {
            Some((_, g)) => Ok(g.clone()),
            None => Ok(Var::constant(x.value().zeros_like()?)),
        })
        .collect()
}

/// `grad_with` for scalar outputs, with `create_graph` as the one option that matters
/// most often (`retain_graph` follows it, as in PyTorch).
pub fn grad(outputs: &[&Var], inputs: &[&Var], create_graph: bool) -> Result<Vec<Var>> {
    grad_with(outputs, None, inputs, GradOptions { create_graph, retain_graph: create_graph })
}

/// Accumulates d(output)/d(leaf) into every leaf's `.grad()`. `output` must be a scalar
/// unless `seed` (same shape as `output`) is given.
pub fn backward(output: &Var, seed: Option<&Var>, retain_graph: bool) -> Result<()> {
    let seeds = seed.map(|s| vec![s]);
    let opts = GradOptions { create_graph: false, retain_graph };
    let grads = walk(&[output], seeds.as_deref(), opts, &[], |v| matches!(v.kind(), Kind::Leaf(_)))?;
    for (leaf, g) in grads.values() {
        leaf.accumulate_grad(g.value())?;
    }
    Ok(())
}

/// Partial derivatives of `outputs` (weighted by `seeds`) with respect to `inputs`, as
/// differentiable vars: the inputs are treated as independent variables, so the walk
/// stops at them instead of going on into whatever they were computed from. A fused
/// op's rule uses this under `create_graph`, on a recomputation of the op from
/// differentiable ops.
pub(crate) fn partial_grads(outputs: &[&Var], seeds: &[&Var], inputs: &[&Var]) -> Result<Vec<Var>> {
    let stop: Vec<u64> = inputs.iter().map(|v| v.id()).collect();
    let opts = GradOptions { create_graph: true, retain_graph: true };
    let grads = walk(outputs, Some(seeds), opts, &stop, |v| stop.contains(&v.id()))?;
    gradients_of(inputs, &grads)
}

/// The reverse walk. Returns `(var, gradient)` for every reached var for which `keep`
/// holds, by id. The walk does not go past the vars whose ids are in `stop`.
fn walk(
    outputs: &[&Var],
    seeds: Option<&[&Var]>,
    opts: GradOptions,
    stop: &[u64],
    keep: impl Fn(&Var) -> bool,
) -> Result<BTreeMap<u64, (Var, Var)>> {
    if let Some(s) = seeds
        && s.len() != outputs.len()
    {
        return Err(Error::Graph {
            op: "backward",
            reason: format!("{} seeds for {} outputs: give one per output", s.len(), outputs.len()),
        });
    }
    let _mode = GradMode::set(opts.create_graph && mode::is_grad_enabled());

    // Seed the outputs: ones for scalars, else the given seed.
    let mut pending: HashMap<u64, Var> = HashMap::new();
    for (i, out) in outputs.iter().enumerate() {
        let seed = match seeds {
            Some(s) => {
                if s[i].value().dims() != out.value().dims() {
                    return Err(Error::Graph {
                        op: "backward",
                        reason: format!("seed of shape {} for an output of shape {}", s[i].shape(), out.shape()),
                    });
                }
                s[i].clone()
            }
            None if out.value().numel() == 1 => Var::constant(out.value().ones_like()?),
            None => {
                return Err(Error::Graph {
                    op: "backward",
                    reason: format!(
                        "the output has shape {}: backward needs a scalar, or a seed gradient of that shape",
                        out.shape()
                    ),
                });
            }
        };
        add_into(&mut pending, out, seed)?;
    }

    // The tape segment: every var reachable from the outputs, by id.
    let mut tape: BTreeMap<u64, Var> = BTreeMap::new();
    let mut stack: Vec<Var> = outputs.iter().map(|v| (*v).clone()).collect();
    while let Some(v) = stack.pop() {
        if tape.contains_key(&v.id()) || !v.needs_grad() {
            continue;
        }
        if let Kind::Op { record, .. } = v.kind()
            && !stop.contains(&v.id())
        {
            let record = record.lock().unwrap_or_else(|e| e.into_inner());
            match record.as_ref() {
                Some(r) => stack.extend(r.inputs.iter().cloned()),
                None => {
                    return Err(Error::Graph {
                        op: "backward",
                        reason: format!(
                            "the recording of `{}` was freed by an earlier backward; pass retain_graph to walk it twice",
                            v.op_name()
                        ),
                    });
                }
            }
        }
        tape.insert(v.id(), v);
    }

    // Walk it backwards.
    let mut kept = BTreeMap::new();
    for (id, v) in tape.into_iter().rev() {
        let Some(g) = pending.remove(&id) else { continue };
        if keep(&v) {
            kept.insert(id, (v.clone(), g.clone()));
        }
        if stop.contains(&id) {
            continue;
        }
        let Kind::Op { record: slot, .. } = v.kind() else { continue };
        let (grads, inputs) = {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            let r = slot.as_ref().expect("checked when the tape was collected");
            if let Some(window) = r.window
                && !mode::is_grad_enabled()
                && !mode::is_anomaly_enabled()
            {
                add_window_into(&mut pending, &r.inputs[0], &g, window)?;
                if !opts.retain_graph {
                    *slot = None;
                }
                continue;
            }
            // Anomaly checks apply to the rule as a whole (below), naming this op, not
            // to the ops the rule is written with.
            let grads = {
                let _quiet = mode::AnomalyMode::set(false);
                crate::profile::backward_rule(v.op_name(), || (r.backward)(&v, &g, &r.inputs))?
            };
            let inputs = r.inputs.clone();
            if !opts.retain_graph {
                *slot = None; // free the saved inputs now
            }
            (grads, inputs)
        };
        for (input, g) in inputs.iter().zip(grads) {
            if let Some(g) = g
                && input.needs_grad()
            {
                if mode::is_anomaly_enabled() {
                    mode::check_finite(v.op_name(), "backward", g.value(), &[input.value()])?;
                }
                add_into(&mut pending, input, g)?;
            }
        }
    }
    Ok(kept)
}

/// Adds `g` to the gradient pending for `v`, reducing it to `v`'s shape first. When
/// the walk is not recorded and nothing else holds the pending gradient, the sum is
/// taken in its buffer (no new tensor per contribution).
fn add_into(pending: &mut HashMap<u64, Var>, v: &Var, g: Var) -> Result<()> {
    let g = if g.value().dims() != v.value().dims() { g.sum_to(v.value().dims())? } else { g };
    let sum = match pending.remove(&v.id()) {
        Some(prev) if !mode::is_grad_enabled() && prev.is_sole_holder() => {
            prev.value().add_(g.value())?;
            prev
        }
        Some(prev) => prev.add(&g)?,
        None => g,
    };
    pending.insert(v.id(), sum);
    Ok(())
}

/// Adds `g`, the gradient of a window of `input` (see [`Window`]), into that window of
/// the gradient pending for `input` (zeros if there is none yet). Only for a walk that
/// records nothing: the sum is taken in place.
fn add_window_into(pending: &mut HashMap<u64, Var>, input: &Var, g: &Var, window: Window) -> Result<()> {
    if !input.needs_grad() {
        return Ok(());
    }
    let sum = match pending.remove(&input.id()) {
        Some(prev) if prev.is_sole_holder() => prev,
        Some(prev) => Var::constant(prev.value().copy()?),
        None => Var::constant(input.value().zeros_like()?),
    };
    let len = g.value().dims()[window.dim];
    sum.value().narrow(window.dim as isize, window.start, len)?.add_(g.value())?;
    pending.insert(input.id(), sum);
    Ok(())
}

/// Accumulates a plain gradient into a leaf's stored `.grad()`.
pub(crate) fn accumulate(slot: &std::sync::Mutex<Option<Tensor>>, g: &Tensor) -> Result<()> {
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    *slot = Some(match slot.take() {
        Some(prev) if prev.is_sole_owner() && prev.is_contiguous() => {
            prev.add_(g)?;
            prev
        }
        Some(prev) => prev.add(g)?,
        None => g.contiguous()?,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::gradcheck;
    use crate::mode::{detect_anomaly, no_grad};
    use crate::testing::inputs;
    use aigc_tensor::{Device, Tensor};

    fn leaf(values: &[f64]) -> Var {
        Var::leaf(Tensor::new(values, &Device::Cpu).unwrap())
    }

    #[test]
    fn no_grad_records_nothing() {
        let x = leaf(&[1.0, 2.0]);
        let y = no_grad(|| x.exp().unwrap().sum_all().unwrap());
        assert!(!y.needs_grad());
        assert_eq!(y.op_name(), "constant");
        let z = x.exp().unwrap().sum_all().unwrap();
        assert!(z.needs_grad());
        assert_eq!(z.op_name(), "sum");
    }

    #[test]
    fn gradients_accumulate_across_two_backward_calls() {
        let x = leaf(&[1.0, -2.0]);
        x.square().unwrap().sum_all().unwrap().backward().unwrap();
        x.square().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(x.grad().unwrap().to_vec::<f64>().unwrap(), vec![4.0, -8.0]);
        x.zero_grad();
        assert!(x.grad().is_none());
    }

    #[test]
    fn in_place_accumulation_never_changes_a_tensor_someone_else_holds() {
        // `x + x`: add's rule hands the same gradient to both operands, so the first
        // contribution must not be summed into in place (it is the second one too).
        let x = leaf(&[1.0, -2.0]);
        let y = x.add(&x).unwrap().mul(&x.exp().unwrap()).unwrap();
        y.sum_all().unwrap().backward().unwrap();
        let e: Vec<f64> = [1.0f64, -2.0].iter().map(|v| v.exp()).collect();
        let want: Vec<f64> = [1.0f64, -2.0].iter().zip(&e).map(|(v, e)| 2.0 * e + 2.0 * v * e).collect();
        let got = x.grad().unwrap().to_vec::<f64>().unwrap();
        assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-12), "{got:?} vs {want:?}");
        // A gradient the caller holds stays as it was when the next backward accumulates.
        let held = x.grad().unwrap();
        x.square().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(held.to_vec::<f64>().unwrap(), got);
        let after = x.grad().unwrap().to_vec::<f64>().unwrap();
        assert!((after[0] - (got[0] + 2.0)).abs() < 1e-12 && (after[1] - (got[1] - 4.0)).abs() < 1e-12);
    }

    #[test]
    fn a_retained_graph_can_be_walked_twice_and_a_freed_one_cannot() {
        let x = leaf(&[3.0]);
        let y = x.square().unwrap().sum_all().unwrap();
        y.backward_retain().unwrap();
        y.backward().unwrap();
        assert_eq!(x.grad().unwrap().to_vec::<f64>().unwrap(), vec![12.0]);
        let err = y.backward().unwrap_err().to_string();
        assert!(err.contains("was freed by an earlier backward; pass retain_graph"), "{err}");
    }

    #[test]
    fn backward_of_a_non_scalar_needs_a_seed() {
        let x = leaf(&[1.0, 2.0, 3.0]);
        let y = x.square().unwrap();
        let err = y.backward().unwrap_err().to_string();
        assert_eq!(
            err,
            "backward: the output has shape [3]: backward needs a scalar, or a seed gradient of that shape"
        );
        y.backward_with(&Tensor::new(&[1.0f64, 0.0, -1.0], &Device::Cpu).unwrap()).unwrap();
        assert_eq!(x.grad().unwrap().to_vec::<f64>().unwrap(), vec![2.0, 0.0, -6.0]);
        let bad_seed = Tensor::new(&[1.0f64], &Device::Cpu).unwrap();
        assert!(x.square().unwrap().backward_with(&bad_seed).unwrap_err().to_string().contains("seed of shape [1]"));
    }

    #[test]
    fn windows_add_into_the_gradient_of_what_they_narrow() {
        // x (2 x 6) split in three along dim 1, each piece weighted differently, plus x
        // used whole and one overlapping narrow: the plain walk (windows added in
        // place) must give what the recorded walk (zero-padded rules) gives.
        let x = Var::leaf(Tensor::randn([2, 6], &Device::Cpu, 3).unwrap().to_dtype(aigc_tensor::DType::F64).unwrap());
        let loss = |x: &Var| -> Result<Var> {
            let pieces = x.chunk(3, 1)?;
            let mut total = x.square()?.sum_all()?;
            for (i, piece) in pieces.iter().enumerate() {
                total = total.add(&piece.affine(i as f64 + 1.0, 0.0)?.tanh()?.sum_all()?)?;
            }
            total.add(&x.narrow(1, 1, 3)?.exp()?.sum_all()?)
        };
        let plain = grad(&[&loss(&x).unwrap()], &[&x], false).unwrap();
        let recorded = grad(&[&loss(&x).unwrap()], &[&x], true).unwrap();
        let diff = plain[0].value().sub(recorded[0].value()).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-15);
        // A window whose gradient arrives first starts from zeros; a narrow of a narrow too.
        let y = x.narrow(1, 2, 4).unwrap().narrow(0, 1, 1).unwrap().sum_all().unwrap();
        let g = grad(&[&y], &[&x], false).unwrap();
        let want = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        assert_eq!(g[0].value().to_vec::<f64>().unwrap(), want);
    }

    #[test]
    fn a_shared_subexpression_gets_the_sum_of_its_uses() {
        // y = x * x + x: dy/dx = 2x + 1, with x reached along three paths.
        let x = leaf(&[2.0, -1.0]);
        let y = x.mul(&x).unwrap().add(&x).unwrap().sum_all().unwrap();
        y.backward().unwrap();
        assert_eq!(x.grad().unwrap().to_vec::<f64>().unwrap(), vec![5.0, -1.0]);
    }

    #[test]
    fn grad_of_an_unused_input_is_zero_and_leaves_are_untouched() {
        let x = leaf(&[1.0, 2.0]);
        let unused = leaf(&[5.0]);
        let y = x.sum_all().unwrap();
        let g = grad(&[&y], &[&x, &unused], false).unwrap();
        assert_eq!(g[1].value().to_vec::<f64>().unwrap(), vec![0.0]);
        assert!(x.grad().is_none(), "grad() returns gradients without storing them");
    }

    #[test]
    fn anomaly_mode_names_the_op_that_first_made_a_nan() {
        let x = leaf(&[-1.0, 4.0]);
        let err = detect_anomaly(|| x.affine(1.0, 0.0).unwrap().log().map(|_| ())).unwrap_err().to_string();
        assert!(err.starts_with("log: anomaly: forward produced 1 NaN/Inf value(s)"), "{err}");
        // sqrt(0) is fine forward, but its gradient is infinite.
        let z = leaf(&[0.0, 4.0]);
        let err = detect_anomaly(|| z.sqrt().unwrap().sum_all().unwrap().backward()).unwrap_err().to_string();
        assert!(err.starts_with("sqrt: anomaly: backward produced"), "{err}");
        // Without anomaly mode the NaN passes silently, as in PyTorch.
        assert!(x.log().is_ok());
    }

    /// The WGAN-GP penalty (Gulrajani et al. 2017) `(|| d critic(x) / dx || - 1)^2` for a
    /// one-hidden-layer critic `w2 . tanh(W1 x)`, as a function of the critic's weights.
    fn gradient_penalty(w1: &Var, w2: &Var, x: &Tensor) -> Result<Var> {
        let x = Var::leaf(x.clone());
        let critic = x.matmul(w1)?.tanh()?.matmul(w2)?;
        let dx = grad(&[&critic.sum_all()?], &[&x], true)?;
        dx[0].norm(2.0, &[-1], false)?.affine(1.0, -1.0)?.square()?.mean_all()
    }

    #[test]
    fn wgan_gp_penalty_gradient_reaches_the_critic_weights_and_matches_finite_differences() {
        let x = inputs::seeded(&[5, 3], 1);
        let w1 = inputs::seeded(&[3, 4], 2);
        let w2 = inputs::seeded(&[4, 1], 3);
        gradcheck(|v| gradient_penalty(&v[0], &v[1], &x), &[&w1, &w2], "wgan_gp").unwrap();
        let (w1, w2) = (Var::leaf(w1), Var::leaf(w2));
        gradient_penalty(&w1, &w2, &x).unwrap().backward().unwrap();
        assert!(w1.grad().unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() > 0.0);
    }

    #[test]
    fn a_long_training_loop_keeps_the_number_of_live_vars_flat() {
        // Other tests run in parallel threads and create vars too, so measure this loop's
        // own footprint by comparing two windows of the same loop.
        let w = Var::leaf(inputs::seeded(&[8, 8], 1));
        let x = Var::constant(inputs::seeded(&[4, 8], 2));
        let step = || {
            let loss = x.matmul(&w).unwrap().tanh().unwrap().square().unwrap().mean_all().unwrap();
            loss.backward().unwrap();
            w.zero_grad();
        };
        // Each step's intermediates die with its loss; a leak would grow by ~5 vars a step.
        for _ in 0..10 {
            step();
        }
        let mut growth = Vec::new();
        for _ in 0..3 {
            let before = Var::live_count();
            for _ in 0..2000 {
                step();
            }
            growth.push(Var::live_count() as i64 - before as i64);
        }
        // A leak would show as +10,000 per window in every window; concurrent tests may
        // add or free a few hundred at most.
        assert!(growth.iter().any(|&g| g.abs() < 1000), "live vars grew by {growth:?} per 2000 steps");
    }

    #[test]
    fn gradients_flow_into_f32_and_broadcast_inputs() {
        let w = Var::leaf(Tensor::ones([3], aigc_tensor::DType::F32, &Device::Cpu).unwrap());
        let x = Var::constant(Tensor::randn([4, 3], &Device::Cpu, 0).unwrap());
        x.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = w.grad().unwrap();
        assert_eq!(g.dims(), &[3]);
        let want = x.value().sum(&[0], false).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(g.to_vec::<f32>().unwrap(), want);
    }
}

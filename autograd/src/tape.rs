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
    let grads = walk(outputs, seeds, opts, |_| true)?;
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
    let grads = walk(&[output], seeds.as_deref(), opts, |v| matches!(v.kind(), Kind::Leaf(_)))?;
    for (leaf, g) in grads.values() {
        leaf.accumulate_grad(g.value())?;
    }
    Ok(())
}

/// The reverse walk. Returns `(var, gradient)` for every reached var for which `keep`
/// holds, by id.
fn walk(
    outputs: &[&Var],
    seeds: Option<&[&Var]>,
    opts: GradOptions,
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
        if let Kind::Op { record, .. } = v.kind() {
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
        let Kind::Op { record: slot, .. } = v.kind() else { continue };
        let (grads, inputs) = {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            let r = slot.as_ref().expect("checked when the tape was collected");
            let grads = (r.backward)(&v, &g, &r.inputs)?;
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

/// Adds `g` to the gradient pending for `v`, reducing it to `v`'s shape first.
fn add_into(pending: &mut HashMap<u64, Var>, v: &Var, g: Var) -> Result<()> {
    let g = if g.value().dims() != v.value().dims() { g.sum_to(v.value().dims())? } else { g };
    let sum = match pending.remove(&v.id()) {
        Some(prev) => prev.add(&g)?,
        None => g,
    };
    pending.insert(v.id(), sum);
    Ok(())
}

/// Accumulates a plain gradient into a leaf's stored `.grad()`.
pub(crate) fn accumulate(slot: &std::sync::Mutex<Option<Tensor>>, g: &Tensor) -> Result<()> {
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    *slot = Some(match slot.take() {
        Some(prev) => prev.add(g)?,
        None => g.contiguous()?,
    });
    Ok(())
}

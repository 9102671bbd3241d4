//! Optimizers over named parameters, each step one fused in-place kernel per parameter
//! (`Tensor::sgd_step_`, `Tensor::adam_step_`, `Tensor::rmsprop_step_`), plus learning-rate
//! [`schedule`]s, the parameter [`ema`] and global-norm gradient clipping.
//!
//! **Parameter groups.** As in PyTorch, an optimizer takes its parameters in groups, each
//! with its own settings ([`ParamGroup`]: a learning-rate scale and a weight-decay
//! override). A plain `Vec<(String, Var)>` is one group with the optimizer's settings.
//! The usual split — no weight decay on biases and norm gains — is one line:
//! `AdamW::adamw(ParamGroup::no_decay_for_vectors(vs.named_parameters()), cfg)`.
//!
//! **State.** Every optimizer keeps, per parameter, a step count and its buffers (Adam's
//! `exp_avg`/`exp_avg_sq`, SGD's `momentum_buffer`, ...). [`Optimizer::state`] exports them
//! as named tensors (`exp_avg.fc1.weight`, `step.fc1.weight`) for checkpoints, and
//! [`Optimizer::load_state`] reads them back, checking every name and shape.
//!
//! Frozen parameters (`Var::set_requires_grad(false)`) and parameters without a gradient
//! are skipped by `step`: their state and step count stay as they are (PyTorch's rule).

mod adam;
pub mod ema;
pub mod rmsprop;
pub mod schedule;
mod sgd;

pub use adam::{Adam, AdamConfig, AdamW};
pub use ema::Ema;
pub use rmsprop::{RmsProp, RmsPropConfig};
pub use schedule::{Constant, LinearWarmup, LrSchedule, StepLr, WarmupCosine};
pub use sgd::{Sgd, SgdConfig};

use aigc_autograd::Var;
use aigc_tensor::{DType, Error, Result, Tensor};
use std::collections::{HashMap, HashSet};

/// What every optimizer offers.
pub trait Optimizer {
    /// Applies one update from the parameters' accumulated gradients. Parameters
    /// without a gradient, and frozen ones, are left as they are.
    fn step(&mut self) -> Result<()>;
    /// The parameters this optimizer updates.
    fn parameters(&self) -> Vec<Var>;
    /// The current base learning rate (each group's is this times its `lr_scale`).
    fn lr(&self) -> f64;
    /// Sets the base learning rate (schedulers call this before `step`).
    fn set_lr(&mut self, lr: f64);
    /// The optimizer's state as named tensors: per parameter its buffers
    /// (`{buffer}.{param name}`) and its step count (`step.{param name}`, an i64 scalar).
    /// The buffers share storage with the optimizer: serialise them before the next step.
    fn state(&self) -> Vec<(String, Tensor)>;
    /// Restores a state exported by [`Optimizer::state`] from an optimizer over the same
    /// parameters. Every entry must be present with the right shape and no other entry may
    /// appear; otherwise one error lists every problem and nothing is changed.
    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()>;
    /// Clears every parameter's gradient.
    fn zero_grad(&self) {
        for p in self.parameters() {
            p.zero_grad();
        }
    }
}

/// Parameters that share optimizer settings (a PyTorch param group).
#[derive(Clone)]
pub struct ParamGroup {
    /// The parameters, by name.
    pub params: Vec<(String, Var)>,
    /// This group's learning rate is the optimizer's times this (1 by default).
    pub lr_scale: f64,
    /// Replaces the optimizer's weight decay for this group when set.
    pub weight_decay: Option<f64>,
}

impl ParamGroup {
    /// A group with the optimizer's own settings.
    pub fn new(params: Vec<(String, Var)>) -> ParamGroup {
        ParamGroup { params, lr_scale: 1.0, weight_decay: None }
    }

    /// The same group with its learning rate scaled by `scale`.
    pub fn with_lr_scale(self, scale: f64) -> ParamGroup {
        ParamGroup { lr_scale: scale, ..self }
    }

    /// The same group with its own weight decay.
    pub fn with_weight_decay(self, weight_decay: f64) -> ParamGroup {
        ParamGroup { weight_decay: Some(weight_decay), ..self }
    }

    /// Splits parameters in two by a rule: those for which `rule(name, var)` holds, then
    /// the others, both with the optimizer's settings.
    pub fn split(params: Vec<(String, Var)>, rule: impl Fn(&str, &Var) -> bool) -> (ParamGroup, ParamGroup) {
        let (chosen, rest): (Vec<_>, Vec<_>) = params.into_iter().partition(|(name, var)| rule(name, var));
        (ParamGroup::new(chosen), ParamGroup::new(rest))
    }

    /// nanoGPT's split: matrices and kernels (2 or more dims) get the optimizer's weight
    /// decay, biases and norm gains (fewer than 2 dims) get none.
    pub fn no_decay_for_vectors(params: Vec<(String, Var)>) -> Vec<ParamGroup> {
        let (decayed, vectors) = ParamGroup::split(params, |_, var| var.rank() >= 2);
        vec![decayed, vectors.with_weight_decay(0.0)]
    }
}

/// What an optimizer constructor accepts: named parameters (one group), one group, or
/// several groups.
pub trait IntoParamGroups {
    /// The groups.
    fn into_param_groups(self) -> Vec<ParamGroup>;
}

impl IntoParamGroups for Vec<(String, Var)> {
    fn into_param_groups(self) -> Vec<ParamGroup> {
        vec![ParamGroup::new(self)]
    }
}

impl IntoParamGroups for ParamGroup {
    fn into_param_groups(self) -> Vec<ParamGroup> {
        vec![self]
    }
}

impl IntoParamGroups for Vec<ParamGroup> {
    fn into_param_groups(self) -> Vec<ParamGroup> {
        self
    }
}

/// One parameter under an optimizer: its group's settings, how many updates it has had,
/// and its state buffers (one per name in [`ParamStates`]).
struct ParamState {
    name: String,
    param: Var,
    lr_scale: f64,
    weight_decay: f64,
    steps: u64,
    buffers: Vec<Tensor>,
}

/// The per-parameter bookkeeping every optimizer shares: building the state from groups,
/// choosing the parameters to update, and exporting and importing the state.
struct ParamStates {
    /// The optimizer's name, for errors.
    op: &'static str,
    buffer_names: Vec<&'static str>,
    params: Vec<ParamState>,
}

/// What an optimizer's update sees of one parameter on one step.
struct Update<'a> {
    param: &'a Tensor,
    grad: Tensor,
    /// The parameter's own step count, this step included (1 on its first update).
    step: u64,
    lr_scale: f64,
    weight_decay: f64,
    buffers: &'a [Tensor],
}

impl ParamStates {
    /// Zeroed buffers named `buffer_names` for every parameter of `groups`; a group without
    /// a weight-decay override gets `weight_decay`. A parameter may appear only once.
    fn new(
        op: &'static str,
        groups: Vec<ParamGroup>,
        weight_decay: f64,
        buffer_names: Vec<&'static str>,
    ) -> Result<ParamStates> {
        let mut params: Vec<ParamState> = Vec::new();
        let mut seen = HashSet::new();
        for group in groups {
            for (name, param) in group.params {
                if !seen.insert(name.clone()) {
                    return Err(Error::invalid(op, format!("the parameter `{name}` appears in two groups")));
                }
                let buffers = buffer_names.iter().map(|_| param.value().zeros_like()).collect::<Result<_>>()?;
                let weight_decay = group.weight_decay.unwrap_or(weight_decay);
                params.push(ParamState { name, param, lr_scale: group.lr_scale, weight_decay, steps: 0, buffers });
            }
        }
        Ok(ParamStates { op, buffer_names, params })
    }

    /// Calls `update` for every unfrozen parameter that has a gradient, after advancing its
    /// step count.
    fn for_each_update(&mut self, mut update: impl FnMut(Update<'_>) -> Result<()>) -> Result<()> {
        for p in &mut self.params {
            let Some(grad) = p.param.grad().filter(|_| p.param.needs_grad()) else { continue };
            p.steps += 1;
            update(Update {
                param: p.param.value(),
                grad,
                step: p.steps,
                lr_scale: p.lr_scale,
                weight_decay: p.weight_decay,
                buffers: &p.buffers,
            })?;
        }
        Ok(())
    }

    fn parameters(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.param.clone()).collect()
    }

    fn export(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.params.len() * (self.buffer_names.len() + 1));
        for p in &self.params {
            for (buffer, t) in self.buffer_names.iter().zip(&p.buffers) {
                out.push((state_key(buffer, &p.name), t.clone()));
            }
            out.push((state_key("step", &p.name), step_tensor(p.steps)));
        }
        out
    }

    /// Checks every entry first, then writes the buffers in place and sets the step counts.
    fn import(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let given: HashMap<&str, &Tensor> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut problems = Vec::new();
        let mut steps = Vec::with_capacity(self.params.len());
        let mut expected: HashSet<String> = HashSet::new();
        for p in &self.params {
            for (buffer, t) in self.buffer_names.iter().zip(&p.buffers) {
                let key = state_key(buffer, &p.name);
                match given.get(key.as_str()) {
                    None => problems.push(format!("missing `{key}`")),
                    Some(g) if g.dims() != t.dims() => problems.push(format!(
                        "`{key}` has shape {} but the parameter has shape {}",
                        g.shape(),
                        t.shape()
                    )),
                    Some(_) => {}
                }
                expected.insert(key);
            }
            let key = state_key("step", &p.name);
            match given.get(key.as_str()).map(|t| read_step(t)) {
                None => problems.push(format!("missing `{key}`")),
                Some(Err(reason)) => problems.push(format!("`{key}` {reason}")),
                Some(Ok(step)) => steps.push(step),
            }
            expected.insert(key);
        }
        let mut unexpected: Vec<&str> = given.keys().copied().filter(|k| !expected.contains(*k)).collect();
        unexpected.sort_unstable();
        problems.extend(unexpected.into_iter().map(|k| format!("unexpected `{k}`")));
        if !problems.is_empty() {
            return Err(Error::invalid(self.op, format!("cannot load the optimizer state: {}", problems.join("; "))));
        }
        for (p, steps) in self.params.iter_mut().zip(steps) {
            for (buffer, t) in self.buffer_names.iter().zip(&p.buffers) {
                let saved = given[state_key(buffer, &p.name).as_str()];
                t.assign_(&saved.to_dtype(t.dtype())?)?;
            }
            p.steps = steps;
        }
        Ok(())
    }
}

/// The name of a parameter's state entry: `exp_avg.fc1.weight`, `step.fc1.weight`.
fn state_key(kind: &str, param: &str) -> String {
    format!("{kind}.{param}")
}

/// A step count as an i64 scalar tensor on the CPU (as PyTorch keeps `step`).
fn step_tensor(steps: u64) -> Tensor {
    let steps = i64::try_from(steps).unwrap_or(i64::MAX);
    Tensor::scalar(steps, &aigc_tensor::Device::Cpu).expect("a CPU scalar always builds")
}

/// Reads a step count saved by [`step_tensor`] (any dtype holding one whole,
/// non-negative number).
fn read_step(t: &Tensor) -> std::result::Result<u64, String> {
    let values = t.to_dtype(DType::F64).and_then(|t| t.to_vec::<f64>()).map_err(|e| e.to_string())?;
    match values.as_slice() {
        [v] if *v >= 0.0 && v.fract() == 0.0 && *v < 2f64.powi(63) => Ok(*v as u64),
        [v] => Err(format!("is {v}, not a step count")),
        _ => Err(format!("has shape {}, expected a scalar step count", t.shape())),
    }
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`; returns the
/// norm before clipping (as `torch.nn.utils.clip_grad_norm_`).
pub fn clip_grad_norm(params: &[Var], max_norm: f64) -> Result<f64> {
    let mut total = 0.0f64;
    for p in params {
        if let Some(g) = p.grad() {
            // The sum accumulates in f64 whatever the dtype (and reads the gradient once).
            total += g.sum_squares(&[], false)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for p in params {
            if let Some(g) = p.grad() {
                p.set_grad(Some(g.affine(scale, 0.0)?));
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::{Fixture, Tol};
    use aigc_tensor::Device;

    /// A leaf holding `values` (f64) with `shape`.
    pub(crate) fn leaf(values: &[f64], shape: &[usize]) -> Var {
        Var::leaf(Tensor::from_slice(values, shape, &Device::Cpu).unwrap())
    }

    /// Sets `var`'s gradient to `values`.
    pub(crate) fn set_grad(var: &Var, values: &[f64]) {
        var.set_grad(Some(Tensor::from_slice(values, var.dims(), &Device::Cpu).unwrap()));
    }

    /// The values of `var`.
    pub(crate) fn values(var: &Var) -> Vec<f64> {
        var.value().to_vec::<f64>().unwrap()
    }

    /// Steps `make()` three times uninterrupted, and once, then exports its state into a
    /// fresh optimizer over fresh parameters and steps that twice: the parameters must end
    /// equal bit for bit.
    pub(crate) fn assert_resumes_exactly<O: Optimizer>(make: impl Fn(Vec<(String, Var)>) -> O) {
        let fresh = || {
            vec![("w".to_string(), leaf(&[1.0, -2.0, 0.5, 3.0], &[2, 2])), ("b".to_string(), leaf(&[0.25, -1.0], &[2]))]
        };
        let grads = |k: usize| [vec![0.3 - k as f64, 1.0, -0.5, 2.0], vec![-1.0, 0.5 * k as f64]];
        let run = |opt: &mut O, params: &[(String, Var)], steps: std::ops::Range<usize>| {
            for k in steps {
                for ((_, p), g) in params.iter().zip(grads(k)) {
                    set_grad(p, &g);
                }
                opt.step().unwrap();
            }
        };
        let straight = fresh();
        let mut opt = make(straight.clone());
        run(&mut opt, &straight, 0..3);

        let first = fresh();
        let mut opt = make(first.clone());
        run(&mut opt, &first, 0..1);
        let saved: Vec<(String, Tensor)> = opt.state().into_iter().map(|(n, t)| (n, t.copy().unwrap())).collect();
        let resumed = fresh();
        for ((_, a), (_, b)) in resumed.iter().zip(&first) {
            a.value().assign_(b.value()).unwrap();
        }
        let mut opt = make(resumed.clone());
        opt.load_state(&saved).unwrap();
        run(&mut opt, &resumed, 1..3);
        for ((name, a), (_, b)) in straight.iter().zip(&resumed) {
            let (a, b) = (values(a), values(b));
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name}: {a:?} vs {b:?}");
        }
    }

    #[test]
    fn clipping_scales_the_global_norm_down_to_the_limit() {
        let a = Var::leaf(Tensor::zeros([2], DType::F64, &Device::Cpu).unwrap());
        let b = Var::leaf(Tensor::zeros([1], DType::F64, &Device::Cpu).unwrap());
        a.set_grad(Some(Tensor::new(&[3.0f64, 0.0], &Device::Cpu).unwrap()));
        b.set_grad(Some(Tensor::new(&[4.0f64], &Device::Cpu).unwrap()));
        let norm = clip_grad_norm(&[a.clone(), b.clone()], 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        let ga = a.grad().unwrap().to_vec::<f64>().unwrap();
        let gb = b.grad().unwrap().to_vec::<f64>().unwrap();
        assert!(((ga[0] * ga[0] + gb[0] * gb[0]).sqrt() - 1.0).abs() < 1e-5);
        assert!(clip_grad_norm(&[a], 10.0).unwrap() < 1.0 + 1e-5);
    }

    #[test]
    fn no_decay_for_vectors_splits_matrices_from_biases_in_one_line() {
        let params = vec![
            ("fc.weight".to_string(), leaf(&[0.0; 4], &[2, 2])),
            ("fc.bias".to_string(), leaf(&[0.0; 2], &[2])),
            ("ln.weight".to_string(), leaf(&[0.0; 2], &[2])),
        ];
        let groups = ParamGroup::no_decay_for_vectors(params);
        let names = |g: &ParamGroup| g.params.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&groups[0]), vec!["fc.weight"]);
        assert_eq!(names(&groups[1]), vec!["fc.bias", "ln.weight"]);
        assert_eq!((groups[0].weight_decay, groups[1].weight_decay), (None, Some(0.0)));
    }

    #[test]
    fn a_parameter_in_two_groups_is_an_error() {
        let w = ("w".to_string(), leaf(&[1.0], &[1]));
        let groups = vec![ParamGroup::new(vec![w.clone()]), ParamGroup::new(vec![w])];
        let err = Sgd::new(groups, SgdConfig::default()).err().unwrap().to_string();
        assert!(err.contains("`w` appears in two groups"), "{err}");
    }

    #[test]
    fn frozen_parameters_and_parameters_without_gradient_are_not_updated() {
        let (a, b, c) = (leaf(&[1.0], &[1]), leaf(&[1.0], &[1]), leaf(&[1.0], &[1]));
        let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone()), ("c".to_string(), c.clone())];
        let mut opt = Adam::new(params, AdamConfig { lr: 0.1, ..Default::default() }).unwrap();
        set_grad(&a, &[1.0]);
        set_grad(&b, &[1.0]);
        b.set_requires_grad(false).unwrap();
        opt.step().unwrap();
        assert!((values(&a)[0] - 0.9).abs() < 1e-7);
        assert_eq!((values(&b), values(&c)), (vec![1.0], vec![1.0]));
        let state: HashMap<String, Tensor> = opt.state().into_iter().collect();
        let step = |n: &str| state[&format!("step.{n}")].to_vec::<i64>().unwrap()[0];
        assert_eq!((step("a"), step("b"), step("c")), (1, 0, 0));
    }

    #[test]
    fn loading_a_mismatched_state_lists_every_problem_and_changes_nothing() {
        let w = leaf(&[1.0, 2.0], &[2]);
        let mut opt = Adam::new(vec![("w".to_string(), w.clone())], AdamConfig::default()).unwrap();
        let dev = Device::Cpu;
        let bad = vec![
            ("exp_avg.w".to_string(), Tensor::zeros([3], DType::F64, &dev).unwrap()),
            ("step.w".to_string(), Tensor::scalar(-1.0f64, &dev).unwrap()),
            ("exp_avg.v".to_string(), Tensor::zeros([2], DType::F64, &dev).unwrap()),
        ];
        let err = opt.load_state(&bad).unwrap_err().to_string();
        for part in [
            "`exp_avg.w` has shape [3] but the parameter has shape [2]",
            "missing `exp_avg_sq.w`",
            "`step.w` is -1, not a step count",
            "unexpected `exp_avg.v`",
        ] {
            assert!(err.contains(part), "{part} not in {err}");
        }
        assert!(opt.state().iter().all(|(_, t)| t.to_f64_vec().unwrap().iter().all(|v| *v == 0.0)));
    }

    #[test]
    fn optimizers_match_pytorch_step_by_step() {
        // nn/fixtures/optim.py: torch.optim on w [3, 4], b [4], three steps of fixed
        // gradients, b without a gradient at step 1.
        let fx = Fixture::optim();
        type Make = fn(Vec<(String, Var)>) -> Box<dyn Optimizer>;
        let cases: [(&str, Make); 7] = [
            ("sgd_momentum", |p| {
                Box::new(
                    Sgd::new(p, SgdConfig { lr: 0.1, momentum: 0.9, nesterov: false, weight_decay: 0.01 }).unwrap(),
                )
            }),
            ("sgd_nesterov", |p| {
                Box::new(Sgd::new(p, SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 0.01 }).unwrap())
            }),
            ("adam", |p| {
                Box::new(
                    Adam::new(p, AdamConfig { lr: 0.01, beta2: 0.99, weight_decay: 0.01, ..Default::default() })
                        .unwrap(),
                )
            }),
            ("adamw", |p| {
                Box::new(Adam::adamw(p, AdamConfig { lr: 0.01, weight_decay: 0.1, ..Default::default() }).unwrap())
            }),
            ("adamw_groups", |p| {
                let (w, b) = ParamGroup::split(p, |name, _| name == "w");
                let groups = vec![w, b.with_weight_decay(0.0).with_lr_scale(0.5)];
                Box::new(Adam::adamw(groups, AdamConfig { lr: 0.01, weight_decay: 0.1, ..Default::default() }).unwrap())
            }),
            ("rmsprop", |p| {
                Box::new(
                    RmsProp::new(p, RmsPropConfig { lr: 0.01, alpha: 0.9, weight_decay: 0.01, ..Default::default() })
                        .unwrap(),
                )
            }),
            ("rmsprop_centered_momentum", |p| {
                let cfg = RmsPropConfig {
                    lr: 0.01,
                    alpha: 0.9,
                    eps: 1e-6,
                    weight_decay: 0.01,
                    momentum: 0.9,
                    centered: true,
                };
                Box::new(RmsProp::new(p, cfg).unwrap())
            }),
        ];
        for (case, make) in cases {
            let (w, b) = (Var::leaf(fx.get("w").copy().unwrap()), Var::leaf(fx.get("b").copy().unwrap()));
            let mut opt = make(vec![("w".to_string(), w.clone()), ("b".to_string(), b.clone())]);
            for k in 0..3 {
                w.set_grad(Some(fx.get(&format!("grad{k}.w"))));
                b.set_grad(if k == 1 { None } else { Some(fx.get(&format!("grad{k}.b"))) });
                opt.step().unwrap();
                for (name, var) in [("w", &w), ("b", &b)] {
                    fx.assert_matches(var.value(), &format!("{case}.step{k}.{name}"), Tol::scaled(1e-13));
                }
            }
        }
    }
}

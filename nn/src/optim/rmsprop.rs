//! RMSprop (Hinton, Coursera lecture 6e, 2012), as `torch.optim.RMSprop`: each weight's
//! step is its gradient divided by a running root-mean-square of its recent gradients,
//! `s = alpha s + (1 - alpha) g^2`, `p -= lr g / (sqrt(s) + eps)`. The centered variant
//! (Graves 2013, eq. 38–40) also tracks the running mean of the gradient `ga` and divides
//! by the running standard deviation `sqrt(s - ga^2)`; with momentum the scaled gradient
//! feeds a momentum buffer `b = mu b + g / (sqrt(..) + eps)`, `p -= lr b`. Weight decay
//! adds `wd p` to the gradient first.

use super::{IntoParamGroups, Optimizer, ParamStates};
use aigc_autograd::Var;
use aigc_tensor::ops::inplace::RmsPropStep;
use aigc_tensor::{Result, Tensor};

/// RMSprop settings (the defaults of every group).
#[derive(Clone, Copy, Debug)]
pub struct RmsPropConfig {
    pub lr: f64,
    /// Smoothing constant of the running averages.
    pub alpha: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    /// Divide by the running standard deviation instead of the root mean square.
    pub centered: bool,
}

impl Default for RmsPropConfig {
    /// PyTorch's defaults: lr 1e-2, alpha 0.99, eps 1e-8, no weight decay, no momentum,
    /// not centered.
    fn default() -> Self {
        RmsPropConfig { lr: 1e-2, alpha: 0.99, eps: 1e-8, weight_decay: 0.0, momentum: 0.0, centered: false }
    }
}

/// RMSprop over groups of parameters. Per parameter: `square_avg`, plus `momentum_buffer`
/// with momentum and `grad_avg` when centered (PyTorch's state names).
pub struct RmsProp {
    states: ParamStates,
    cfg: RmsPropConfig,
}

impl RmsProp {
    /// RMSprop over `params` (named parameters or groups).
    pub fn new(params: impl IntoParamGroups, cfg: RmsPropConfig) -> Result<RmsProp> {
        let mut buffers = vec!["square_avg"];
        if cfg.momentum != 0.0 {
            buffers.push("momentum_buffer");
        }
        if cfg.centered {
            buffers.push("grad_avg");
        }
        let states = ParamStates::new("RmsProp", params.into_param_groups(), cfg.weight_decay, buffers)?;
        Ok(RmsProp { states, cfg })
    }
}

impl Optimizer for RmsProp {
    fn step(&mut self) -> Result<()> {
        let c = self.cfg;
        self.states.for_each_update(|u| {
            let step = RmsPropStep {
                lr: c.lr * u.lr_scale,
                alpha: c.alpha,
                eps: c.eps,
                weight_decay: u.weight_decay,
                momentum: c.momentum,
            };
            let mut extra = u.buffers[1..].iter();
            let momentum_buf = if c.momentum != 0.0 { extra.next() } else { None };
            let grad_avg = if c.centered { extra.next() } else { None };
            u.param.rmsprop_step_(&u.grad, &u.buffers[0], grad_avg, momentum_buf, step)
        })
    }
    fn parameters(&self) -> Vec<Var> {
        self.states.parameters()
    }
    fn lr(&self) -> f64 {
        self.cfg.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
    fn state(&self) -> Vec<(String, Tensor)> {
        self.states.export()
    }
    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        self.states.import(state)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{assert_resumes_exactly, leaf, set_grad, values};
    use super::*;

    #[test]
    fn two_plain_rmsprop_steps_match_the_hand_computed_update() {
        let p = leaf(&[1.0], &[1]);
        let cfg = RmsPropConfig { lr: 0.01, alpha: 0.9, eps: 0.0, ..Default::default() };
        let mut opt = RmsProp::new(vec![("p".to_string(), p.clone())], cfg).unwrap();
        set_grad(&p, &[2.0]);
        opt.step().unwrap();
        set_grad(&p, &[1.0]);
        opt.step().unwrap();
        // s1 = 0.4, p1 = 1 - 0.01 * 2 / sqrt(0.4); s2 = 0.36 + 0.1 = 0.46, p2 = p1 - 0.01 / sqrt(0.46).
        let want = 1.0 - 0.02 / 0.4f64.sqrt() - 0.01 / 0.46f64.sqrt();
        assert!((values(&p)[0] - want).abs() < 1e-15);
    }

    #[test]
    fn centered_rmsprop_with_momentum_matches_the_hand_computed_update() {
        let p = leaf(&[1.0], &[1]);
        let cfg = RmsPropConfig { lr: 0.1, alpha: 0.5, eps: 0.0, momentum: 0.5, centered: true, ..Default::default() };
        let mut opt = RmsProp::new(vec![("p".to_string(), p.clone())], cfg).unwrap();
        set_grad(&p, &[2.0]);
        opt.step().unwrap();
        set_grad(&p, &[-2.0]);
        opt.step().unwrap();
        // Step 1: s = 2, ga = 1, sd = 1, b = 2, p = 0.8.
        // Step 2: s = 1 + 2 = 3, ga = 0.5 - 1 = -0.5, sd = sqrt(2.75), b = 1 - 2 / sqrt(2.75).
        let want = 0.8 - 0.1 * (1.0 - 2.0 / 2.75f64.sqrt());
        assert!((values(&p)[0] - want).abs() < 1e-15, "{} vs {want}", values(&p)[0]);
        let names: Vec<String> = opt.state().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["square_avg.p", "momentum_buffer.p", "grad_avg.p", "step.p"]);
    }

    #[test]
    fn rmsprop_state_round_trips_and_resumes_bit_for_bit() {
        let cfg = RmsPropConfig { lr: 0.01, momentum: 0.9, centered: true, weight_decay: 0.01, ..Default::default() };
        assert_resumes_exactly(|params| RmsProp::new(params, cfg).unwrap());
        assert_resumes_exactly(|params| RmsProp::new(params, RmsPropConfig::default()).unwrap());
    }
}

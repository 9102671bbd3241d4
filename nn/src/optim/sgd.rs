//! Stochastic gradient descent with momentum (Polyak's heavy ball, in Sutskever et al.
//! 2013's formulation), Nesterov momentum and L2 weight decay, as `torch.optim.SGD` (no
//! dampening): `g += wd p`; `b = mu b + g` (`b = g` on a parameter's first update);
//! `p -= lr (g + mu b)` with Nesterov, `p -= lr b` without, `p -= lr g` with no momentum.

use super::{IntoParamGroups, Optimizer, ParamStates};
use aigc_autograd::Var;
use aigc_tensor::ops::inplace::SgdStep;
use aigc_tensor::{Error, Result, Tensor};

/// SGD settings (the defaults of every group).
#[derive(Clone, Copy, Debug)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    /// lr 0.01 (PyTorch has no default), no momentum, no weight decay.
    fn default() -> Self {
        SgdConfig { lr: 0.01, momentum: 0.0, nesterov: false, weight_decay: 0.0 }
    }
}

/// SGD over groups of parameters. With momentum, each parameter has a `momentum_buffer`.
pub struct Sgd {
    states: ParamStates,
    cfg: SgdConfig,
}

impl Sgd {
    /// SGD over `params` (named parameters or groups). Nesterov needs a non-zero momentum.
    pub fn new(params: impl IntoParamGroups, cfg: SgdConfig) -> Result<Sgd> {
        if cfg.nesterov && cfg.momentum == 0.0 {
            return Err(Error::invalid("Sgd", "Nesterov momentum requires a non-zero momentum"));
        }
        let buffers = if cfg.momentum != 0.0 { vec!["momentum_buffer"] } else { vec![] };
        let states = ParamStates::new("Sgd", params.into_param_groups(), cfg.weight_decay, buffers)?;
        Ok(Sgd { states, cfg })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self) -> Result<()> {
        let c = self.cfg;
        self.states.for_each_update(|u| {
            let step = SgdStep {
                lr: c.lr * u.lr_scale,
                momentum: c.momentum,
                nesterov: c.nesterov,
                weight_decay: u.weight_decay,
                first: u.step == 1,
            };
            u.param.sgd_step_(&u.grad, u.buffers.first(), step)
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

    fn sgd_on(p: &Var, cfg: SgdConfig) -> Sgd {
        Sgd::new(vec![("p".to_string(), p.clone())], cfg).unwrap()
    }

    #[test]
    fn plain_sgd_with_weight_decay_steps_against_the_decayed_gradient() {
        let p = leaf(&[2.0, -1.0], &[2]);
        let mut opt = sgd_on(&p, SgdConfig { lr: 0.1, weight_decay: 0.5, ..Default::default() });
        set_grad(&p, &[1.0, 1.0]);
        opt.step().unwrap();
        // p -= 0.1 * (g + 0.5 p)
        assert_eq!(values(&p), vec![2.0 - 0.1 * 2.0, -1.0 - 0.1 * 0.5]);
        assert_eq!(opt.state().len(), 1, "no momentum buffer without momentum");
    }

    #[test]
    fn momentum_and_nesterov_match_the_hand_computed_steps() {
        let cfg = SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() };
        let p = leaf(&[1.0], &[1]);
        let mut opt = sgd_on(&p, cfg);
        for _ in 0..2 {
            set_grad(&p, &[1.0]);
            opt.step().unwrap();
        }
        // b1 = 1, p = 0.9; b2 = 0.9 + 1 = 1.9, p = 0.9 - 0.19.
        assert!((values(&p)[0] - 0.71).abs() < 1e-15);
        let q = leaf(&[1.0], &[1]);
        let mut opt = sgd_on(&q, SgdConfig { nesterov: true, ..cfg });
        for _ in 0..2 {
            set_grad(&q, &[1.0]);
            opt.step().unwrap();
        }
        // Nesterov: step1 = 1 + 0.9 * 1 = 1.9; step2 = 1 + 0.9 * 1.9 = 2.71.
        assert!((values(&q)[0] - (1.0 - 0.19 - 0.271)).abs() < 1e-15);
    }

    #[test]
    fn nesterov_without_momentum_is_an_error() {
        let p = leaf(&[1.0], &[1]);
        let err = Sgd::new(vec![("p".to_string(), p)], SgdConfig { nesterov: true, ..Default::default() });
        assert!(err.err().unwrap().to_string().contains("requires a non-zero momentum"));
    }

    #[test]
    fn sgd_state_round_trips_and_resumes_bit_for_bit() {
        let cfg = SgdConfig { lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 0.01 };
        assert_resumes_exactly(|params| Sgd::new(params, cfg).unwrap());
    }
}

//! Stochastic gradient descent with momentum, Nesterov momentum and weight decay, as
//! `torch.optim.SGD`.

use super::Optimizer;
use aigc_autograd::Var;
use aigc_tensor::ops::inplace::SgdStep;
use aigc_tensor::{Result, Tensor};

/// SGD settings.
#[derive(Clone, Copy, Debug)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig { lr: 0.01, momentum: 0.0, nesterov: false, weight_decay: 0.0 }
    }
}

/// SGD over a set of parameters.
pub struct Sgd {
    params: Vec<(String, Var, Tensor)>,
    cfg: SgdConfig,
    steps: u64,
}

impl Sgd {
    pub fn new(params: Vec<(String, Var)>, cfg: SgdConfig) -> Result<Sgd> {
        let params = params
            .into_iter()
            .map(|(n, v)| {
                let buf = v.value().zeros_like()?;
                Ok((n, v, buf))
            })
            .collect::<Result<_>>()?;
        Ok(Sgd { params, cfg, steps: 0 })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self) -> Result<()> {
        let c = self.cfg;
        let s = SgdStep {
            lr: c.lr,
            momentum: c.momentum,
            nesterov: c.nesterov,
            weight_decay: c.weight_decay,
            first: self.steps == 0,
        };
        for (_, p, buf) in &self.params {
            if let Some(g) = p.grad() {
                p.value().sgd_step_(&g, buf, s)?;
            }
        }
        self.steps += 1;
        Ok(())
    }
    fn parameters(&self) -> Vec<Var> {
        self.params.iter().map(|(_, v, _)| v.clone()).collect()
    }
    fn lr(&self) -> f64 {
        self.cfg.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
}

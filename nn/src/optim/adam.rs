//! Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019, decoupled weight decay),
//! as `torch.optim.Adam` / `AdamW`. AdamW can skip weight decay for some parameters
//! (biases and norm gains, by the usual rule: parameters with fewer than 2 dims).

use super::Optimizer;
use aigc_autograd::Var;
use aigc_tensor::ops::inplace::AdamStep;
use aigc_tensor::{Result, Tensor};

/// Adam/AdamW settings.
#[derive(Clone, Copy, Debug)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Apply no weight decay to parameters with fewer than 2 dims (biases, norm gains).
    pub no_decay_for_vectors: bool,
}

impl Default for AdamConfig {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay.
    fn default() -> Self {
        AdamConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, no_decay_for_vectors: false }
    }
}

struct State {
    param: Var,
    m: Tensor,
    v: Tensor,
    weight_decay: f64,
}

/// Adam with L2 (`decoupled = false`) or decoupled (AdamW) weight decay.
pub struct Adam {
    states: Vec<(String, State)>,
    cfg: AdamConfig,
    decoupled: bool,
    t: u64,
}

/// AdamW is Adam with decoupled weight decay.
pub type AdamW = Adam;

impl Adam {
    /// Adam with L2 weight decay folded into the gradient.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Adam> {
        Self::build(params, cfg, false)
    }
    /// AdamW: weight decay applied to the weights directly.
    pub fn adamw(params: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Adam> {
        Self::build(params, cfg, true)
    }
    fn build(params: Vec<(String, Var)>, cfg: AdamConfig, decoupled: bool) -> Result<Adam> {
        let states = params
            .into_iter()
            .map(|(name, param)| {
                let skip = cfg.no_decay_for_vectors && param.rank() < 2;
                let weight_decay = if skip { 0.0 } else { cfg.weight_decay };
                let (m, v) = (param.value().zeros_like()?, param.value().zeros_like()?);
                Ok((name, State { param, m, v, weight_decay }))
            })
            .collect::<Result<_>>()?;
        Ok(Adam { states, cfg, decoupled, t: 0 })
    }
    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.t
    }
}

impl Optimizer for Adam {
    fn step(&mut self) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        for (_, s) in &self.states {
            if let Some(g) = s.param.grad() {
                let step = AdamStep {
                    lr: c.lr,
                    beta1: c.beta1,
                    beta2: c.beta2,
                    eps: c.eps,
                    weight_decay: s.weight_decay,
                    decoupled: self.decoupled,
                    t: self.t,
                };
                s.param.value().adam_step_(&g, &s.m, &s.v, step)?;
            }
        }
        Ok(())
    }
    fn parameters(&self) -> Vec<Var> {
        self.states.iter().map(|(_, s)| s.param.clone()).collect()
    }
    fn lr(&self) -> f64 {
        self.cfg.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigc_tensor::{DType, Device};

    #[test]
    fn adam_minimises_a_quadratic() {
        let x = Var::leaf(Tensor::new(&[3.0f64, -2.0], &Device::Cpu).unwrap());
        let mut opt = Adam::new(vec![("x".into(), x.clone())], AdamConfig { lr: 0.1, ..Default::default() }).unwrap();
        for _ in 0..300 {
            opt.zero_grad();
            x.square().unwrap().sum_all().unwrap().backward().unwrap();
            opt.step().unwrap();
        }
        let v = x.value().to_vec::<f64>().unwrap();
        assert!(v.iter().all(|x| x.abs() < 0.05), "{v:?}");
    }

    #[test]
    fn adamw_skips_decay_for_vectors_when_asked() {
        let w = Var::leaf(Tensor::ones([2, 2], DType::F64, &Device::Cpu).unwrap());
        let b = Var::leaf(Tensor::ones([2], DType::F64, &Device::Cpu).unwrap());
        let cfg = AdamConfig { lr: 0.1, weight_decay: 0.5, no_decay_for_vectors: true, ..Default::default() };
        let mut opt = Adam::adamw(vec![("w".into(), w.clone()), ("b".into(), b.clone())], cfg).unwrap();
        w.set_grad(Some(w.value().zeros_like().unwrap()));
        b.set_grad(Some(b.value().zeros_like().unwrap()));
        opt.step().unwrap();
        assert_eq!(w.value().to_vec::<f64>().unwrap(), vec![0.95; 4]);
        assert_eq!(b.value().to_vec::<f64>().unwrap(), vec![1.0; 2]);
    }
}

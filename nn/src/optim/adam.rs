//! Adam (Kingma & Ba 2015, Algorithm 1) and AdamW (Loshchilov & Hutter 2019, decoupled
//! weight decay), as `torch.optim.Adam` / `torch.optim.AdamW`: per parameter, running
//! means of the gradient (`exp_avg`) and of its square (`exp_avg_sq`), bias-corrected by
//! the parameter's own step count. Adam folds weight decay into the gradient (L2); AdamW
//! shrinks the weights directly, `p *= 1 - lr * wd`, before the Adam update.

use super::{IntoParamGroups, Optimizer, ParamStates};
use aigc_autograd::Var;
use aigc_tensor::ops::inplace::AdamStep;
use aigc_tensor::{Result, Tensor};

/// Adam/AdamW settings (the defaults of every group).
#[derive(Clone, Copy, Debug)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay.
    fn default() -> Self {
        AdamConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Adam with L2 (`Adam::new`) or decoupled (`Adam::adamw`) weight decay.
pub struct Adam {
    states: ParamStates,
    cfg: AdamConfig,
    decoupled: bool,
}

/// AdamW is Adam with decoupled weight decay: build it with [`Adam::adamw`].
pub type AdamW = Adam;

impl Adam {
    /// Adam with L2 weight decay folded into the gradient (`torch.optim.Adam`).
    pub fn new(params: impl IntoParamGroups, cfg: AdamConfig) -> Result<Adam> {
        Self::build("Adam", params, cfg, false)
    }
    /// AdamW: weight decay applied to the weights directly (`torch.optim.AdamW`).
    pub fn adamw(params: impl IntoParamGroups, cfg: AdamConfig) -> Result<Adam> {
        Self::build("AdamW", params, cfg, true)
    }
    fn build(op: &'static str, params: impl IntoParamGroups, cfg: AdamConfig, decoupled: bool) -> Result<Adam> {
        let states = ParamStates::new(op, params.into_param_groups(), cfg.weight_decay, vec!["exp_avg", "exp_avg_sq"])?;
        Ok(Adam { states, cfg, decoupled })
    }
}

impl Optimizer for Adam {
    fn step(&mut self) -> Result<()> {
        let (c, decoupled) = (self.cfg, self.decoupled);
        self.states.for_each_update(|u| {
            let step = AdamStep {
                lr: c.lr * u.lr_scale,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: u.weight_decay,
                decoupled,
                t: u.step,
            };
            u.param.adam_step_(&u.grad, &u.buffers[0], &u.buffers[1], step)
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
    use super::super::ParamGroup;
    use super::super::tests::{assert_resumes_exactly, leaf, set_grad, values};
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
    fn two_adam_steps_match_the_hand_computed_update() {
        // Step 1: m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2: p -= lr * sign(g).
        // Step 2 with g2: m = 0.09 g1 + 0.1 g2, v = 0.000999 g1^2 + 0.001 g2^2, corrected
        // by 1 - 0.9^2 = 0.19 and 1 - 0.999^2 = 0.001999.
        let (g1, g2, lr) = (0.5f64, -1.5f64, 0.01);
        let p = leaf(&[1.0], &[1]);
        let cfg = AdamConfig { lr, eps: 0.0, ..Default::default() };
        let mut opt = Adam::new(vec![("p".into(), p.clone())], cfg).unwrap();
        set_grad(&p, &[g1]);
        opt.step().unwrap();
        assert!((values(&p)[0] - (1.0 - lr)).abs() < 1e-15);
        set_grad(&p, &[g2]);
        opt.step().unwrap();
        let m_hat = (0.09 * g1 + 0.1 * g2) / 0.19;
        let v_hat = (0.000999 * g1 * g1 + 0.001 * g2 * g2) / 0.001999;
        let want = 1.0 - lr - lr * m_hat / v_hat.sqrt();
        assert!((values(&p)[0] - want).abs() < 1e-14, "{} vs {want}", values(&p)[0]);
    }

    #[test]
    fn adam_folds_weight_decay_into_the_gradient_and_adamw_decays_the_weight() {
        // With a zero gradient, Adam sees g = wd p (so it moves by lr), AdamW only decays.
        let cfg = AdamConfig { lr: 0.1, weight_decay: 0.5, ..Default::default() };
        let (a, b) = (leaf(&[2.0], &[1]), leaf(&[2.0], &[1]));
        let mut adam = Adam::new(vec![("a".into(), a.clone())], cfg).unwrap();
        let mut adamw = Adam::adamw(vec![("b".into(), b.clone())], cfg).unwrap();
        set_grad(&a, &[0.0]);
        set_grad(&b, &[0.0]);
        adam.step().unwrap();
        adamw.step().unwrap();
        assert!((values(&a)[0] - 1.9).abs() < 1e-7);
        assert!((values(&b)[0] - 2.0 * (1.0 - 0.05)).abs() < 1e-15);
    }

    #[test]
    fn groups_override_weight_decay_and_scale_the_learning_rate() {
        let w = Var::leaf(Tensor::ones([2, 2], DType::F64, &Device::Cpu).unwrap());
        let b = Var::leaf(Tensor::ones([2], DType::F64, &Device::Cpu).unwrap());
        let cfg = AdamConfig { lr: 0.1, weight_decay: 0.5, ..Default::default() };
        let params = vec![("w".into(), w.clone()), ("b".into(), b.clone())];
        let mut opt = Adam::adamw(ParamGroup::no_decay_for_vectors(params), cfg).unwrap();
        set_grad(&w, &[0.0; 4]);
        set_grad(&b, &[0.0; 2]);
        opt.step().unwrap();
        assert_eq!(values(&w), vec![0.95; 4]);
        assert_eq!(values(&b), vec![1.0; 2]);

        let x = leaf(&[1.0], &[1]);
        let mut opt = Adam::adamw(ParamGroup::new(vec![("x".into(), x.clone())]).with_lr_scale(0.5), cfg).unwrap();
        set_grad(&x, &[1.0]);
        opt.step().unwrap();
        assert!((values(&x)[0] - (1.0 * (1.0 - 0.025) - 0.05)).abs() < 1e-7);
    }

    #[test]
    fn adam_state_round_trips_and_resumes_bit_for_bit() {
        let cfg = AdamConfig { lr: 0.05, weight_decay: 0.1, ..Default::default() };
        assert_resumes_exactly(|params| Adam::adamw(params, cfg).unwrap());
        assert_resumes_exactly(|params| Adam::new(params, cfg).unwrap());
        let opt = Adam::new(vec![("w".into(), leaf(&[1.0], &[1]))], cfg).unwrap();
        let names: Vec<String> = opt.state().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["exp_avg.w", "exp_avg_sq.w", "step.w"]);
    }
}

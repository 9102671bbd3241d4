//! [`Ema`]: an exponential moving average of the parameters (Polyak averaging; the
//! "EMA weights" that DDPM, Ho et al. 2020, and most diffusion models sample from).
//! After each optimizer step, `shadow = decay * shadow + (1 - decay) * param`, one fused
//! in-place `lerp_` per parameter. For evaluation, [`Ema::swap`] exchanges the shadows
//! and the parameters (swap again to resume training), or [`Ema::copy_to_params`]
//! overwrites the parameters for good.
//!
//! With warmup (diffusers' `EMAModel` default), the `n`-th update (counting from 0) uses
//! `decay_n = min(decay, (1 + n) / (10 + n))`, and the first one copies the parameters
//! (`decay_0 = 0`), so early shadows are not dominated by the random initialisation.

use super::{ParamGroup, ParamStates};
use aigc_autograd::Var;
use aigc_tensor::{Error, Result, Tensor};

/// Shadow copies of parameters, updated as their exponential moving average.
pub struct Ema {
    /// One `shadow` buffer per parameter; each parameter's step count is the number of
    /// updates so far.
    states: ParamStates,
    decay: f64,
    warmup: bool,
}

impl Ema {
    /// Shadows of `params`, starting as copies of their current values, averaged with
    /// `decay` in `[0, 1]` (0.999 and 0.9999 are usual).
    pub fn new(params: Vec<(String, Var)>, decay: f64) -> Result<Ema> {
        if !(0.0..=1.0).contains(&decay) {
            return Err(Error::invalid("Ema", format!("decay {decay} is outside [0, 1]")));
        }
        let states = ParamStates::new("Ema", vec![ParamGroup::new(params)], 0.0, vec!["shadow"])?;
        for p in &states.params {
            p.buffers[0].assign_(p.param.value())?;
        }
        Ok(Ema { states, decay, warmup: false })
    }

    /// The same EMA with diffusers' decay warmup: `min(decay, (1 + n) / (10 + n))` at the
    /// `n`-th update, 0 at the first.
    pub fn with_warmup(self) -> Ema {
        Ema { warmup: true, ..self }
    }

    /// The decay used by the update that follows `n` earlier ones.
    pub fn decay_at(&self, n: u64) -> f64 {
        if !self.warmup {
            return self.decay;
        }
        if n == 0 {
            return 0.0;
        }
        let n = n as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    /// How many updates the shadows have had.
    pub fn updates(&self) -> u64 {
        self.states.params.first().map_or(0, |p| p.steps)
    }

    /// Moves every shadow towards its parameter: `shadow.lerp_(param, 1 - decay)`.
    pub fn update(&mut self) -> Result<()> {
        for i in 0..self.states.params.len() {
            let decay = self.decay_at(self.states.params[i].steps);
            let p = &mut self.states.params[i];
            p.buffers[0].lerp_(p.param.value(), 1.0 - decay)?;
            p.steps += 1;
        }
        Ok(())
    }

    /// The shadow of the parameter `name`.
    pub fn shadow(&self, name: &str) -> Option<&Tensor> {
        self.states.params.iter().find(|p| p.name == name).map(|p| &p.buffers[0])
    }

    /// Overwrites every parameter with its shadow.
    pub fn copy_to_params(&self) -> Result<()> {
        for p in &self.states.params {
            p.param.value().assign_(&p.buffers[0])?;
        }
        Ok(())
    }

    /// Exchanges every parameter with its shadow, in place: swap, evaluate, swap back.
    pub fn swap(&self) -> Result<()> {
        for p in &self.states.params {
            let param = p.param.value();
            let saved = param.copy()?;
            param.assign_(&p.buffers[0])?;
            p.buffers[0].assign_(&saved)?;
        }
        Ok(())
    }

    /// The shadows (`shadow.{name}`) and update counts (`step.{name}`) as named tensors,
    /// sharing storage with the EMA.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.states.export()
    }

    /// Restores a state exported by [`Ema::state`]; every entry must be present with the
    /// right shape, or one error lists every problem and nothing changes.
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        self.states.import(state)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{leaf, values};
    use super::*;
    use crate::testing::{Tol, assert_close};

    #[test]
    fn update_moves_the_shadow_by_one_minus_decay() {
        let p = leaf(&[1.0, 2.0], &[2]);
        let mut ema = Ema::new(vec![("p".into(), p.clone())], 0.9).unwrap();
        p.value().assign_(&Tensor::new(&[11.0f64, 2.0], &aigc_tensor::Device::Cpu).unwrap()).unwrap();
        ema.update().unwrap();
        // 0.9 * 1 + 0.1 * 11 = 2; 0.9 * 2 + 0.1 * 2 = 2.
        assert_close(ema.shadow("p").unwrap(), &[2.0, 2.0], Tol::abs(1e-15), "shadow after one update");
        ema.update().unwrap();
        // 0.9 * 2 + 0.1 * 11 = 2.9.
        assert_close(ema.shadow("p").unwrap(), &[2.9, 2.0], Tol::abs(1e-15), "shadow after two updates");
        assert_eq!(ema.updates(), 2);
    }

    #[test]
    fn warmup_follows_diffusers_schedule() {
        let p = leaf(&[0.0], &[1]);
        let mut ema = Ema::new(vec![("p".into(), p.clone())], 0.5).unwrap().with_warmup();
        assert_eq!([0, 1, 2, 3, 9].map(|n| ema.decay_at(n)), [0.0, 2.0 / 11.0, 3.0 / 12.0, 4.0 / 13.0, 0.5]);
        p.value().assign_(&Tensor::new(&[4.0f64], &aigc_tensor::Device::Cpu).unwrap()).unwrap();
        ema.update().unwrap();
        assert_eq!(ema.shadow("p").unwrap().to_vec::<f64>().unwrap(), vec![4.0], "the first update copies");
        assert!(Ema::new(vec![], 1.5).is_err());
    }

    #[test]
    fn swap_twice_restores_and_copy_to_params_overwrites() {
        let p = leaf(&[1.0], &[1]);
        let mut ema = Ema::new(vec![("p".into(), p.clone())], 0.5).unwrap();
        p.value().assign_(&Tensor::new(&[3.0f64], &aigc_tensor::Device::Cpu).unwrap()).unwrap();
        ema.update().unwrap();
        ema.swap().unwrap();
        assert_eq!((values(&p), ema.shadow("p").unwrap().to_vec::<f64>().unwrap()), (vec![2.0], vec![3.0]));
        ema.swap().unwrap();
        assert_eq!(values(&p), vec![3.0]);
        ema.copy_to_params().unwrap();
        assert_eq!(values(&p), vec![2.0]);
    }

    #[test]
    fn ema_state_round_trips() {
        let p = leaf(&[1.0, -1.0], &[2]);
        let mut ema = Ema::new(vec![("p".into(), p.clone())], 0.9).unwrap().with_warmup();
        ema.update().unwrap();
        p.value().assign_(&Tensor::new(&[5.0f64, 5.0], &aigc_tensor::Device::Cpu).unwrap()).unwrap();
        ema.update().unwrap();
        let saved: Vec<(String, Tensor)> = ema.state().into_iter().map(|(n, t)| (n, t.copy().unwrap())).collect();
        let mut restored = Ema::new(vec![("p".into(), p.clone())], 0.9).unwrap().with_warmup();
        restored.load_state(&saved).unwrap();
        assert_eq!(restored.updates(), 2);
        ema.update().unwrap();
        restored.update().unwrap();
        assert_eq!(
            ema.shadow("p").unwrap().to_vec::<f64>().unwrap(),
            restored.shadow("p").unwrap().to_vec::<f64>().unwrap()
        );
        assert!(restored.load_state(&saved[..1]).unwrap_err().to_string().contains("missing `step.p`"));
    }
}

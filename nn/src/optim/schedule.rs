//! Learning-rate schedules: the learning rate as a pure function of the step number, so
//! a resumed run only needs the step (`opt.set_lr(schedule.lr(step))` before each step).
//!
//! - [`Constant`]: the same rate throughout.
//! - [`LinearWarmup`]: ramps up linearly, then constant.
//! - [`WarmupCosine`]: nanoGPT's `get_lr` exactly (Karpathy, `train.py`): linear warmup,
//!   then half a cosine period from `max_lr` down to `min_lr` (Loshchilov & Hutter 2017's
//!   SGDR without restarts), then `min_lr`.
//! - [`StepLr`]: `torch.optim.lr_scheduler.StepLR`, the rate times `gamma` every
//!   `step_size` steps.
//!
//! Warmup follows the current nanoGPT: at step `it < warmup` the rate is
//! `max_lr * (it + 1) / (warmup + 1)`, so the first step already trains (the earlier
//! `max_lr * it / warmup` gave 0 at step 0).

use std::f64::consts::PI;

/// A learning rate for every step (steps count from 0).
pub trait LrSchedule {
    /// The learning rate to use for step `step`.
    fn lr(&self, step: u64) -> f64;
}

/// The same learning rate at every step.
#[derive(Clone, Copy, Debug)]
pub struct Constant(pub f64);

impl LrSchedule for Constant {
    fn lr(&self, _step: u64) -> f64 {
        self.0
    }
}

/// The warmup ramp shared by the schedules: `lr * (step + 1) / (warmup + 1)`.
fn warmup_ramp(lr: f64, step: u64, warmup: u64) -> f64 {
    lr * (step + 1) as f64 / (warmup + 1) as f64
}

/// Linear warmup over the first `warmup` steps (nanoGPT's ramp), then `lr`.
#[derive(Clone, Copy, Debug)]
pub struct LinearWarmup {
    pub warmup: u64,
    pub lr: f64,
}

impl LrSchedule for LinearWarmup {
    fn lr(&self, step: u64) -> f64 {
        if step < self.warmup { warmup_ramp(self.lr, step, self.warmup) } else { self.lr }
    }
}

/// nanoGPT's schedule: linear warmup for `warmup` steps, cosine decay from `max_lr` to
/// `min_lr` until step `total` (nanoGPT's `lr_decay_iters`), then `min_lr`.
#[derive(Clone, Copy, Debug)]
pub struct WarmupCosine {
    pub warmup: u64,
    pub total: u64,
    pub max_lr: f64,
    pub min_lr: f64,
}

impl LrSchedule for WarmupCosine {
    fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return warmup_ramp(self.max_lr, step, self.warmup);
        }
        // At `step == total` the cosine is exactly -1, so `>=` is nanoGPT's `>` without its
        // 0/0 when `total == warmup`.
        if step >= self.total {
            return self.min_lr;
        }
        let decay_ratio = (step - self.warmup) as f64 / (self.total - self.warmup) as f64;
        let coeff = 0.5 * (1.0 + (PI * decay_ratio).cos());
        self.min_lr + coeff * (self.max_lr - self.min_lr)
    }
}

impl WarmupCosine {
    /// The rate for a run with a time budget, after `step` steps with the share
    /// `budget_spent` (0 to 1, `None` without a budget) of it used: the warmup counts
    /// steps, and after it the decay is advanced to the spent share of `total` when that
    /// is further along than the step count, so that a run its budget stops also ends its
    /// decay.
    pub fn lr_within_budget(&self, step: u64, budget_spent: Option<f64>) -> f64 {
        let by_time = budget_spent.map_or(0, |share| (share * self.total as f64) as u64);
        self.lr(if step < self.warmup { step } else { step.max(by_time) })
    }
}

/// `lr * gamma^(step / step_size)` (integer division): the rate drops by `gamma` every
/// `step_size` steps. A `step_size` of 0 counts as 1.
#[derive(Clone, Copy, Debug)]
pub struct StepLr {
    pub lr: f64,
    pub step_size: u64,
    pub gamma: f64,
}

impl LrSchedule for StepLr {
    fn lr(&self, step: u64) -> f64 {
        let drops = step / self.step_size.max(1);
        self.lr * self.gamma.powi(i32::try_from(drops).unwrap_or(i32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Tol, assert_close};

    #[test]
    fn constant_and_linear_warmup() {
        assert_eq!(Constant(0.3).lr(1000), 0.3);
        let s = LinearWarmup { warmup: 4, lr: 1.0 };
        let got: Vec<f64> = (0..6).map(|i| s.lr(i)).collect();
        assert_eq!(got, vec![0.2, 0.4, 0.6, 0.8, 1.0, 1.0]);
    }

    #[test]
    fn a_budget_advances_the_decay_but_not_the_warmup() {
        let s = WarmupCosine { warmup: 10, total: 100, max_lr: 1.0, min_lr: 0.1 };
        assert_eq!(s.lr_within_budget(40, None), s.lr(40));
        assert_eq!(s.lr_within_budget(40, Some(0.2)), s.lr(40), "the steps are further along");
        assert_eq!(s.lr_within_budget(40, Some(0.7)), s.lr(70), "the budget is further along");
        assert_eq!(s.lr_within_budget(3, Some(0.9)), s.lr(3), "the warmup counts steps");
        assert_eq!(s.lr_within_budget(20, Some(1.0)), 0.1);
    }

    #[test]
    fn warmup_cosine_matches_nanogpt_get_lr() {
        let s = WarmupCosine { warmup: 10, total: 110, max_lr: 6e-4, min_lr: 6e-5 };
        let close = |step: u64, want: f64| assert_close(&s.lr(step), &want, Tol::scaled(1e-15), &format!("lr({step})"));
        // Warmup: 6e-4 * (it + 1) / 11.
        close(0, 6e-4 / 11.0);
        close(9, 6e-4 * 10.0 / 11.0);
        // Decay starts at max_lr, is halfway at the middle, ends at min_lr.
        close(10, 6e-4);
        close(60, 6e-5 + 0.5 * (6e-4 - 6e-5));
        // A quarter of the way: coeff = 0.5 (1 + cos(pi/4)).
        let coeff = 0.5 * (1.0 + (PI / 4.0).cos());
        close(35, 6e-5 + coeff * (6e-4 - 6e-5));
        close(110, 6e-5);
        assert_eq!(s.lr(5000), 6e-5);
        let lrs: Vec<f64> = (10..=110).map(|i| s.lr(i)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "the decay is monotone");
    }

    #[test]
    fn warmup_cosine_without_a_decay_phase_goes_to_min_lr() {
        let s = WarmupCosine { warmup: 2, total: 2, max_lr: 1.0, min_lr: 0.1 };
        let got: Vec<f64> = (0..4).map(|i| s.lr(i)).collect();
        assert_eq!(got, vec![1.0 / 3.0, 2.0 / 3.0, 0.1, 0.1]);
    }

    #[test]
    fn step_lr_drops_by_gamma_every_step_size_steps() {
        let s = StepLr { lr: 1.0, step_size: 3, gamma: 0.5 };
        let got: Vec<f64> = (0..7).map(|i| s.lr(i)).collect();
        assert_eq!(got, vec![1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]);
    }
}

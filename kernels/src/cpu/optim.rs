//! Fused optimizer updates: one pass over a parameter, its gradient and its state per
//! step, in place (instead of a chain of tensor ops that each allocate).
//!
//! - SGD with momentum and Nesterov (Sutskever et al. 2013), PyTorch's formulation:
//!   `b = mu b + g` (`b = g` on the first step), `p -= lr (g + mu b)` (Nesterov) or
//!   `p -= lr b`; weight decay adds `wd p` to `g` first.
//! - Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019):
//!   `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`,
//!   `p -= lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)`; AdamW first decays
//!   `p *= 1 - lr wd`, Adam instead adds `wd p` to `g`.
//!
//! Everything is computed in the accumulator type (f32 for half-precision parameters).

use crate::{Element, FloatElem, Real};

/// Hyper-parameters of one SGD step.
#[derive(Clone, Copy, Debug)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// True on the first step (the momentum buffer starts as the gradient).
    pub first: bool,
}

/// One SGD step in place. `buf` is the momentum buffer (ignored when momentum is 0).
pub fn sgd<T: FloatElem>(param: &mut [T], grad: &[T], buf: &mut [T], s: SgdStep) {
    let lr = <T::Acc as Element>::from_f64(s.lr);
    let mu = <T::Acc as Element>::from_f64(s.momentum);
    let wd = <T::Acc as Element>::from_f64(s.weight_decay);
    for i in 0..param.len() {
        let p = param[i].to_acc();
        let g = grad[i].to_acc() + wd * p;
        let step = if s.momentum == 0.0 {
            g
        } else {
            let b = if s.first { g } else { mu * buf[i].to_acc() + g };
            buf[i] = T::from_acc(b);
            if s.nesterov { g + mu * b } else { b }
        };
        param[i] = T::from_acc(p - lr * step);
    }
}

/// Hyper-parameters of one Adam/AdamW step.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Decoupled (AdamW) rather than L2 (Adam) weight decay.
    pub decoupled: bool,
    /// The step number, starting at 1 (for bias correction).
    pub t: u64,
}

/// One Adam or AdamW step in place, with first and second moment buffers `m`, `v`.
pub fn adam<T: FloatElem>(param: &mut [T], grad: &[T], m: &mut [T], v: &mut [T], s: AdamStep) {
    let c = |x: f64| <T::Acc as Element>::from_f64(x);
    let (b1, b2) = (c(s.beta1), c(s.beta2));
    let correction1 = c(1.0 - s.beta1.powi(s.t as i32));
    let correction2_sqrt = c((1.0 - s.beta2.powi(s.t as i32)).sqrt());
    let (lr, eps, wd) = (c(s.lr), c(s.eps), c(s.weight_decay));
    let one = <T::Acc as Element>::one();
    let decay = if s.decoupled { one - lr * wd } else { one };
    for i in 0..param.len() {
        let p = param[i].to_acc();
        let g = if s.decoupled { grad[i].to_acc() } else { grad[i].to_acc() + wd * p };
        let mi = b1 * m[i].to_acc() + (one - b1) * g;
        let vi = b2 * v[i].to_acc() + (one - b2) * g * g;
        m[i] = T::from_acc(mi);
        v[i] = T::from_acc(vi);
        let denom = vi.sqrt() / correction2_sqrt + eps;
        param[i] = T::from_acc(p * decay - lr * (mi / correction1) / denom);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_first_step_moves_each_weight_by_lr_against_its_gradient_sign() {
        // On step 1, m_hat = g and v_hat = g^2, so the update is lr * g / (|g| + eps).
        let mut p = vec![1.0f64, -1.0];
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        let s = AdamStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: true, t: 1 };
        adam(&mut p, &[0.5, -2.0], &mut m, &mut v, s);
        assert!((p[0] - 0.9).abs() < 1e-7 && (p[1] + 0.9).abs() < 1e-7, "{p:?}");
        assert!((m[0] - 0.05).abs() < 1e-15 && (v[1] - 0.004).abs() < 1e-15);
    }

    #[test]
    fn adamw_decays_weights_independently_of_the_gradient() {
        let mut p = vec![2.0f64];
        let s = AdamStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.5, decoupled: true, t: 1 };
        adam(&mut p, &[0.0], &mut [0.0], &mut [0.0], s);
        assert!((p[0] - 2.0 * (1.0 - 0.05)).abs() < 1e-12);
    }

    #[test]
    fn sgd_momentum_and_nesterov_follow_pytorch() {
        let s = SgdStep { lr: 0.1, momentum: 0.9, nesterov: false, weight_decay: 0.0, first: true };
        let (mut p, mut b) = (vec![1.0f64], vec![0.0]);
        sgd(&mut p, &[1.0], &mut b, s);
        sgd(&mut p, &[1.0], &mut b, SgdStep { first: false, ..s });
        // b1 = 1, p = 0.9; b2 = 1.9, p = 0.9 - 0.19 = 0.71
        assert!((p[0] - 0.71).abs() < 1e-12 && (b[0] - 1.9).abs() < 1e-12);
        let (mut p, mut b) = (vec![1.0f64], vec![0.0]);
        sgd(&mut p, &[1.0], &mut b, SgdStep { nesterov: true, ..s });
        // b = 1, step = g + mu b = 1.9
        assert!((p[0] - 0.81).abs() < 1e-12);
    }
}

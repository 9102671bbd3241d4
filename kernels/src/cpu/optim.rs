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
//! - RMSprop (Hinton's lecture 6e; Graves 2013 for the centered form), PyTorch's
//!   formulation: `s = a s + (1-a) g^2`; centered also tracks `ga = ga + (1-a)(g - ga)`
//!   and uses `s - ga^2`; `d = sqrt(s [- ga^2]) + eps`; with momentum `b = mu b + g / d`,
//!   `p -= lr b`, else `p -= lr g / d`; weight decay adds `wd p` to `g` first.
//! - Linear interpolation `a += w (b - a)`, the exponential moving average of parameters.
//!
//! Everything is computed in the accumulator type (f32 for half-precision parameters).
//! f32 parameters take a SIMD kernel written once over [`F32Vector`] (the same formulas,
//! with fused multiply-adds); the other dtypes the scalar loops below.

use super::simd::{F32Vector, Isa, Operand, kernel, update};
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

/// One SGD step in place. `buf` is the momentum buffer, given exactly when momentum is
/// non-zero.
pub fn sgd<T: FloatElem>(param: &mut [T], grad: &[T], mut buf: Option<&mut [T]>, s: SgdStep) {
    if let Some(grad) = T::as_f32(grad) {
        let param = T::as_f32_mut(param).expect("T is f32");
        let buf = buf.map(|b| T::as_f32_mut(b).expect("T is f32"));
        return sgd_f32(Isa::best(), param, grad, buf, s);
    }
    let lr = <T::Acc as Element>::from_f64(s.lr);
    let mu = <T::Acc as Element>::from_f64(s.momentum);
    let wd = <T::Acc as Element>::from_f64(s.weight_decay);
    for i in 0..param.len() {
        let p = param[i].to_acc();
        let g = grad[i].to_acc() + wd * p;
        let step = match buf.as_deref_mut() {
            None => g,
            Some(buf) => {
                let b = if s.first { g } else { mu * buf[i].to_acc() + g };
                buf[i] = T::from_acc(b);
                if s.nesterov { g + mu * b } else { b }
            }
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
    if let Some(grad) = T::as_f32(grad) {
        let param = T::as_f32_mut(param).expect("T is f32");
        let (m, v) = (T::as_f32_mut(m).expect("T is f32"), T::as_f32_mut(v).expect("T is f32"));
        return adam_f32(Isa::best(), param, grad, m, v, s);
    }
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

/// Hyper-parameters of one RMSprop step.
#[derive(Clone, Copy, Debug)]
pub struct RmsPropStep {
    pub lr: f64,
    /// Smoothing constant of the running averages (PyTorch's `alpha`, 0.99 by default).
    pub alpha: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Momentum of the update (0 for none).
    pub momentum: f64,
}

/// The optional RMSprop state: `grad_avg` for the centered variant, `momentum_buf` when
/// momentum is non-zero.
pub struct RmsPropBuffers<'a, T> {
    pub square_avg: &'a mut [T],
    pub grad_avg: Option<&'a mut [T]>,
    pub momentum_buf: Option<&'a mut [T]>,
}

/// One RMSprop step in place. Centered when `state.grad_avg` is given; with momentum
/// when `state.momentum_buf` is given (then `s.momentum` is its coefficient).
pub fn rmsprop<T: FloatElem>(param: &mut [T], grad: &[T], state: RmsPropBuffers<'_, T>, s: RmsPropStep) {
    let c = |x: f64| <T::Acc as Element>::from_f64(x);
    let (lr, alpha, eps, wd, mu) = (c(s.lr), c(s.alpha), c(s.eps), c(s.weight_decay), c(s.momentum));
    let one = <T::Acc as Element>::one();
    let RmsPropBuffers { square_avg, mut grad_avg, mut momentum_buf } = state;
    for i in 0..param.len() {
        let p = param[i].to_acc();
        let g = grad[i].to_acc() + wd * p;
        let sq = alpha * square_avg[i].to_acc() + (one - alpha) * g * g;
        square_avg[i] = T::from_acc(sq);
        let variance = match grad_avg.as_deref_mut() {
            Some(ga) => {
                let mean = ga[i].to_acc();
                let mean = mean + (one - alpha) * (g - mean);
                ga[i] = T::from_acc(mean);
                sq - mean * mean
            }
            None => sq,
        };
        let scaled = g / (variance.sqrt() + eps);
        let step = match momentum_buf.as_deref_mut() {
            Some(b) => {
                let bi = mu * b[i].to_acc() + scaled;
                b[i] = T::from_acc(bi);
                bi
            }
            None => scaled,
        };
        param[i] = T::from_acc(p - lr * step);
    }
}

/// `a += weight (b - a)` elementwise, in place: moves `a` a fraction `weight` of the way
/// to `b` (an EMA update with decay `1 - weight`).
pub fn lerp<T: FloatElem>(a: &mut [T], b: &[T], weight: f64) {
    let w = <T::Acc as Element>::from_f64(weight);
    for (x, &y) in a.iter_mut().zip(b) {
        let xa = x.to_acc();
        *x = T::from_acc(xa + w * (y.to_acc() - xa));
    }
}

kernel! {
    /// [`sgd`] on f32 buffers, with SIMD.
    fn sgd_f32(param: &mut [f32], grad: &[f32], buf: Option<&mut [f32]>, s: SgdStep) {
        let (lr, mu, wd) = (V::splat(s.lr as f32), V::splat(s.momentum as f32), V::splat(s.weight_decay as f32));
        let grad = [Operand::Slice(grad)];
        let Some(buf) = buf else {
            return update::<V, 1, 1>([param], grad, |[p], [g]| [p - lr * p.mul_add(wd, g)]);
        };
        update::<V, 2, 1>([param, buf], grad, |[p, b], [g]| {
            let g = p.mul_add(wd, g);
            let b = if s.first { g } else { b.mul_add(mu, g) };
            let step = if s.nesterov { b.mul_add(mu, g) } else { b };
            [p - lr * step, b]
        });
    }
}

kernel! {
    /// [`adam`] on f32 buffers, with SIMD.
    fn adam_f32(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], s: AdamStep) {
        let c = |x: f64| V::splat(x as f32);
        let (b1, b2, eps, wd) = (c(s.beta1), c(s.beta2), c(s.eps), c(s.weight_decay));
        let (one_minus_b1, one_minus_b2) = (c(1.0 - s.beta1), c(1.0 - s.beta2));
        // The bias corrections folded into two constants (as PyTorch's `step_size`), so
        // that each vector takes one square root and one division, not three divisions:
        // from L2, AVX2 on Zen 3, 0.61 -> 0.36 ns per parameter.
        let step_size = c(s.lr / (1.0 - s.beta1.powi(s.t as i32)));
        let inv_correction2_sqrt = c(1.0 / (1.0 - s.beta2.powi(s.t as i32)).sqrt());
        let decay = if s.decoupled { c(1.0 - s.lr * s.weight_decay) } else { c(1.0) };
        update::<V, 3, 1>([param, m, v], [Operand::Slice(grad)], |[p, m, v], [g]| {
            let g = if s.decoupled { g } else { p.mul_add(wd, g) };
            let m = m.mul_add(b1, one_minus_b1 * g);
            let v = v.mul_add(b2, one_minus_b2 * g * g);
            let denom = v.sqrt().mul_add(inv_correction2_sqrt, eps);
            [p * decay - step_size * m / denom, m, v]
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn f32_steps_match_the_f64_steps(
            n in 0usize..70,
            (momentum, nesterov, first, decoupled) in (prop_oneof![Just(0.0), Just(0.9)], any::<bool>(), any::<bool>(), any::<bool>()),
            (t, seed) in (1u64..5, any::<u64>()),
        ) {
            let mut state = seed | 1;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            };
            let (p, g, b, m): (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) =
                (0..n).map(|_| (next(), next(), next(), next())).fold(Default::default(), |mut acc, (a, b, c, d)| {
                    acc.0.push(a); acc.1.push(b); acc.2.push(c); acc.3.push(d); acc
                });
            let v: Vec<f32> = m.iter().map(|x| x * x).collect();
            let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
            let close = |a: &[f32], b: &[f64], what: &str| {
                for (x, y) in a.iter().zip(b) {
                    assert!((*x as f64 - y).abs() <= 1e-5 * (1.0 + y.abs()), "{what}: {x} vs {y}");
                }
            };

            let s = SgdStep { lr: 0.1, momentum, nesterov, weight_decay: 0.01, first };
            let (mut p32, mut b32, mut p64, mut b64) = (p.clone(), b.clone(), wide(&p), wide(&b));
            let with_momentum = momentum != 0.0;
            sgd(&mut p32, &g, with_momentum.then_some(&mut b32[..]), s);
            sgd(&mut p64, &wide(&g), with_momentum.then_some(&mut b64[..]), s);
            close(&p32, &p64, "sgd param");
            close(&b32, &b64, "sgd buffer");

            let s = AdamStep { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, decoupled, t };
            let (mut p32, mut m32, mut v32) = (p.clone(), m.clone(), v.clone());
            let (mut p64, mut m64, mut v64) = (wide(&p), wide(&m), wide(&v));
            adam(&mut p32, &g, &mut m32, &mut v32, s);
            adam(&mut p64, &wide(&g), &mut m64, &mut v64, s);
            close(&p32, &p64, "adam param");
            close(&m32, &m64, "adam m");
            close(&v32, &v64, "adam v");
        }
    }

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
        sgd(&mut p, &[1.0], Some(&mut b), s);
        sgd(&mut p, &[1.0], Some(&mut b), SgdStep { first: false, ..s });
        // b1 = 1, p = 0.9; b2 = 1.9, p = 0.9 - 0.19 = 0.71
        assert!((p[0] - 0.71).abs() < 1e-12 && (b[0] - 1.9).abs() < 1e-12);
        let (mut p, mut b) = (vec![1.0f64], vec![0.0]);
        sgd(&mut p, &[1.0], Some(&mut b), SgdStep { nesterov: true, ..s });
        // b = 1, step = g + mu b = 1.9
        assert!((p[0] - 0.81).abs() < 1e-12);
        // Plain SGD with weight decay: p -= lr (g + wd p) = 1 - 0.1 (1 + 0.5).
        let mut p = vec![1.0f64];
        sgd(&mut p, &[1.0], None, SgdStep { momentum: 0.0, weight_decay: 0.5, ..s });
        assert!((p[0] - 0.85).abs() < 1e-15);
    }

    #[test]
    fn rmsprop_plain_centered_and_momentum_follow_pytorch() {
        let s = RmsPropStep { lr: 0.1, alpha: 0.9, eps: 0.0, weight_decay: 0.0, momentum: 0.0 };
        // Plain: s = 0.1 * 4 = 0.4, p -= 0.1 * 2 / sqrt(0.4).
        let (mut p, mut sq) = (vec![1.0f64], vec![0.0]);
        let state = RmsPropBuffers { square_avg: &mut sq, grad_avg: None, momentum_buf: None };
        rmsprop(&mut p, &[2.0], state, s);
        assert!((p[0] - (1.0 - 0.2 / 0.4f64.sqrt())).abs() < 1e-15 && (sq[0] - 0.4).abs() < 1e-15);
        // Centered: ga = 0.2, variance = 0.4 - 0.04 = 0.36, update 2 / 0.6.
        let (mut p, mut sq, mut ga) = (vec![1.0f64], vec![0.0], vec![0.0]);
        let state = RmsPropBuffers { square_avg: &mut sq, grad_avg: Some(&mut ga), momentum_buf: None };
        rmsprop(&mut p, &[2.0], state, s);
        assert!((p[0] - (1.0 - 0.1 * 2.0 / 0.6)).abs() < 1e-15 && (ga[0] - 0.2).abs() < 1e-15);
        // Momentum 0.5 with weight decay 0.5: g = 2 + 0.5 = 2.5, s = 0.625, b = 0.5 * 1 + 2.5 / sqrt(0.625).
        let (mut p, mut sq, mut b) = (vec![1.0f64], vec![0.0], vec![1.0]);
        let state = RmsPropBuffers { square_avg: &mut sq, grad_avg: None, momentum_buf: Some(&mut b) };
        rmsprop(&mut p, &[2.0], state, RmsPropStep { momentum: 0.5, weight_decay: 0.5, ..s });
        let want_b = 0.5 + 2.5 / 0.625f64.sqrt();
        assert!((b[0] - want_b).abs() < 1e-15 && (p[0] - (1.0 - 0.1 * want_b)).abs() < 1e-15);
    }

    #[test]
    fn lerp_moves_a_fraction_of_the_way() {
        let mut a = vec![1.0f64, -4.0];
        lerp(&mut a, &[3.0, 4.0], 0.25);
        assert_eq!(a, vec![1.5, -2.0]);
        let mut h = vec![half::bf16::from_f32(2.0)];
        lerp(&mut h, &[half::bf16::from_f32(4.0)], 0.5);
        assert_eq!(h[0].to_f32(), 3.0);
    }
}

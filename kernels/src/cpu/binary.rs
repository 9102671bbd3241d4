//! Elementwise functions of two values ([`BinaryOp`]) and comparisons ([`CmpOp`]),
//! declared once each. The tensor layer broadcasts both operands to one shape (stride-0
//! views, no copies) before calling these kernels.
//!
//! The activation-gradient ops (`GeluGrad`, ...) are the fused backward of the
//! activations: `g * f'(x)` in one pass instead of a chain of ops.
//!
//! For f32, `+ - * /`, `maximum`, `minimum` and the activation gradients have a SIMD kernel (`binary_f32`) that
//! runs whenever each operand is, along the innermost dims, either contiguous or one
//! repeated value: same-shape contiguous tensors, a scalar operand, a row broadcast over
//! the last dim (`[m, n] + [n]`), a column broadcast (`[m, n] + [m, 1]`), and any mix
//! of these ([`SimdRuns`]). Other layouts, ops and dtypes take the generic kernel.

use super::map::{SimdRuns, zip_map};
use super::simd::{F32Vector, Isa, Operand, Wide, kernel, map, math};
use crate::{Element, FloatElem, Layout, Real};

macro_rules! binary_ops {
    ($( $(#[$doc:meta])* $name:ident => |$a:ident, $b:ident| $body:expr; )*) => {
        /// An elementwise function of two values.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum BinaryOp { $( $(#[$doc])* $name, )* }

        impl BinaryOp {
            pub fn name(self) -> &'static str {
                match self { $( Self::$name => stringify!($name), )* }
            }
            /// The op on one pair of values: the definition every kernel must agree with.
            pub fn apply<R: Real>(self, lhs: R, rhs: R) -> R {
                match self { $( Self::$name => { let ($a, $b) = (lhs, rhs); $body } )* }
            }
        }

        /// `op(lhs, rhs)` elementwise over two same-shaped strided float views.
        pub fn binary_float<T: FloatElem>(op: BinaryOp, lhs: &[T], ll: &Layout, rhs: &[T], rl: &Layout) -> Vec<T> {
            if let (Some(a), Some(b)) = (T::as_f32(lhs), T::as_f32(rhs))
                && op.has_f32_kernel()
                && let Some(runs) = SimdRuns::plan([ll, rl], true)
            {
                let mut out = crate::buffers::for_overwrite(ll.numel());
                let dst = T::as_f32_mut(&mut out).expect("T is f32");
                runs.run([a, b], dst, |[a, b], dst| binary_f32(Isa::best(), op, a, b, dst));
                return out;
            }
            binary_generic(op, lhs, ll, rhs, rl)
        }

        /// `op(lhs, value)` for every element of a strided float view: a number as the right
        /// operand (`x * 0.5`), read as one repeated value rather than from a tensor of one
        /// element broadcast to `lhs`'s shape. Same results as [`binary_float`] with such a
        /// tensor, without the second tensor and its broadcast view: `x * 2.0` on an 8 x 8
        /// tensor, 5M calls in a loop, about 550 -> 190 ns per call.
        pub fn binary_float_scalar<T: FloatElem>(op: BinaryOp, lhs: &[T], ll: &Layout, value: T) -> Vec<T> {
            if let Some(a) = T::as_f32(lhs)
                && op.has_f32_kernel()
                && let Some(runs) = SimdRuns::plan([ll], false)
            {
                let value = value.to_f64() as f32; // exact: T is f32
                let mut out = crate::buffers::for_overwrite(ll.numel());
                let dst = T::as_f32_mut(&mut out).expect("T is f32");
                runs.run([a], dst, |[a], dst| binary_f32(Isa::best(), op, a, Operand::Splat(value), dst));
                return out;
            }
            binary_generic(op, lhs, ll, &[value], &Layout::new(&[], &[], 0).broadcast_to(ll.shape()))
        }

        /// [`binary_float`] with the scalar definition on every element: the path of the
        /// dtypes and layouts without a SIMD kernel, and the reference the SIMD kernel is
        /// tested against.
        pub fn binary_generic<T: FloatElem>(op: BinaryOp, lhs: &[T], ll: &Layout, rhs: &[T], rl: &Layout) -> Vec<T> {
            match op {
                $( BinaryOp::$name => zip_map(lhs, ll, rhs, rl, |x: T, y: T| {
                    let ($a, $b) = (x.to_acc(), y.to_acc());
                    T::from_acc($body)
                }), )*
            }
        }
    };
}

binary_ops! {
    /// `a + b`
    Add => |a, b| a + b;
    /// `a - b`
    Sub => |a, b| a - b;
    /// `a * b`
    Mul => |a, b| a * b;
    /// `a / b`
    Div => |a, b| a / b;
    /// `a ^ b`
    Pow => |a, b| a.powf(b);
    /// the larger (NaN if either is NaN)
    Maximum => |a, b| a.max(b);
    /// the smaller (NaN if either is NaN)
    Minimum => |a, b| a.min(b);
    /// `b * gelu'(a)`: the gradient `b` of exact GELU's output carried to its input `a`
    GeluGrad => |a, b| b * gelu_erf_grad(a);
    /// `b * gelu_tanh'(a)`, as [`BinaryOp::GeluGrad`] for the tanh form
    GeluTanhGrad => |a, b| b * gelu_tanh_grad(a);
    /// `b * silu'(a)`, as [`BinaryOp::GeluGrad`] for SiLU
    SiluGrad => |a, b| b * silu_grad(a);
}

/// `Phi(x) + x phi(x)`: the derivative of `x Phi(x)`.
fn gelu_erf_grad<R: Real>(x: R) -> R {
    let cdf = R::from_f64(0.5) * (R::one() + (x * R::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
    let pdf = (R::from_f64(-0.5) * x * x).exp() * R::from_f64(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    cdf + x * pdf
}

/// With `u = c (x + a x^3)`, `t = tanh u`: `(1 + t)/2 + x (1 - t^2) c (1 + 3 a x^2) / 2`.
fn gelu_tanh_grad<R: Real>(x: R) -> R {
    let (c, a, half) = (R::from_f64((2.0 / std::f64::consts::PI).sqrt()), R::from_f64(0.044715), R::from_f64(0.5));
    let t = (c * (x + a * x * x * x)).tanh();
    half * (R::one() + t) + half * x * (R::one() - t * t) * c * (R::one() + R::from_f64(3.0) * a * x * x)
}

/// `s (1 + x (1 - s))` with `s = sigmoid(x)`.
fn silu_grad<R: Real>(x: R) -> R {
    let s = if x >= R::zero() {
        R::one() / (R::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (R::one() + e)
    };
    s * (R::one() + x * (R::one() - s))
}

impl BinaryOp {
    /// Ops that are closed over the integers (Div and Pow are not).
    pub fn is_integral(self) -> bool {
        matches!(self, Self::Add | Self::Sub | Self::Mul | Self::Maximum | Self::Minimum)
    }

    /// Whether f32 has a SIMD kernel for the op (all but `Pow`).
    pub fn has_f32_kernel(self) -> bool {
        !matches!(self, Self::Pow)
    }
}

kernel! {
    /// The f32 SIMD kernel: `dst = op(a, b)` on one run, each operand a slice or a
    /// repeated value. `+ - * /` are correctly rounded, so the results equal the scalar
    /// kernel's bit for bit; `maximum`/`minimum` propagate NaN as the scalar definition does.
    fn binary_f32(op: BinaryOp, a: Operand, b: Operand, dst: &mut [f32]) {
        // NaN in either operand gives NaN (min/max instructions would return one operand).
        let nan_or = |x: V, y: V, r: V| V::select(x.is_nan(), x, V::select(y.is_nan(), y, r));
        match op {
            BinaryOp::Add => map::<V, 2>([a, b], dst, |[x, y]| x + y),
            BinaryOp::Sub => map::<V, 2>([a, b], dst, |[x, y]| x - y),
            BinaryOp::Mul => map::<V, 2>([a, b], dst, |[x, y]| x * y),
            BinaryOp::Div => map::<V, 2>([a, b], dst, |[x, y]| x / y),
            BinaryOp::Maximum => map::<V, 2>([a, b], dst, |[x, y]| nan_or(x, y, x.max(y))),
            BinaryOp::Minimum => map::<V, 2>([a, b], dst, |[x, y]| nan_or(x, y, x.min(y))),
            BinaryOp::GeluGrad => map::<Wide<V>, 2>([a, b], dst, |[x, g]| g * math::gelu_erf_grad(x)),
            BinaryOp::GeluTanhGrad => map::<Wide<V>, 2>([a, b], dst, |[x, g]| g * math::gelu_tanh_grad(x)),
            BinaryOp::SiluGrad => map::<Wide<V>, 2>([a, b], dst, |[x, g]| g * math::silu_grad(x)),
            BinaryOp::Pow => unreachable!("binary_f32: pow has no f32 kernel"),
        }
    }
}

/// `op(lhs, rhs)` over i64 buffers with wrapping arithmetic. The caller checks `op.is_integral()`.
pub fn binary_i64(op: BinaryOp, lhs: &[i64], ll: &Layout, rhs: &[i64], rl: &Layout) -> Vec<i64> {
    match op {
        BinaryOp::Add => zip_map(lhs, ll, rhs, rl, |a: i64, b| a.wrapping_add(b)),
        BinaryOp::Sub => zip_map(lhs, ll, rhs, rl, |a: i64, b| a.wrapping_sub(b)),
        BinaryOp::Mul => zip_map(lhs, ll, rhs, rl, |a: i64, b| a.wrapping_mul(b)),
        BinaryOp::Maximum => zip_map(lhs, ll, rhs, rl, |a: i64, b| a.max(b)),
        BinaryOp::Minimum => zip_map(lhs, ll, rhs, rl, |a: i64, b| a.min(b)),
        op => unreachable!("binary_i64: {} is not integral", op.name()),
    }
}

/// `op(lhs, rhs)` over u8 buffers with saturating arithmetic (u8 tensors are masks and
/// raw pixels). The caller checks `op.is_integral()`.
pub fn binary_u8(op: BinaryOp, lhs: &[u8], ll: &Layout, rhs: &[u8], rl: &Layout) -> Vec<u8> {
    match op {
        BinaryOp::Add => zip_map(lhs, ll, rhs, rl, |a: u8, b| a.saturating_add(b)),
        BinaryOp::Sub => zip_map(lhs, ll, rhs, rl, |a: u8, b| a.saturating_sub(b)),
        BinaryOp::Mul => zip_map(lhs, ll, rhs, rl, |a: u8, b| a.saturating_mul(b)),
        BinaryOp::Maximum => zip_map(lhs, ll, rhs, rl, |a: u8, b| a.max(b)),
        BinaryOp::Minimum => zip_map(lhs, ll, rhs, rl, |a: u8, b| a.min(b)),
        op => unreachable!("binary_u8: {} is not integral", op.name()),
    }
}

/// A comparison; the result is a u8 mask (1 where true).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub fn name(self) -> &'static str {
        match self {
            Self::Eq => "eq",
            Self::Ne => "ne",
            Self::Lt => "lt",
            Self::Le => "le",
            Self::Gt => "gt",
            Self::Ge => "ge",
        }
    }
    /// The comparison on one pair (IEEE semantics: every comparison with NaN is false but `ne`).
    pub fn apply<T: PartialOrd>(self, a: T, b: T) -> bool {
        match self {
            Self::Eq => a == b,
            Self::Ne => a != b,
            Self::Lt => a < b,
            Self::Le => a <= b,
            Self::Gt => a > b,
            Self::Ge => a >= b,
        }
    }
}

/// Compares two same-shaped strided views; 1 where `op` holds, else 0.
pub fn compare<T: Element>(op: CmpOp, lhs: &[T], ll: &Layout, rhs: &[T], rl: &Layout) -> Vec<u8> {
    zip_map(lhs, ll, rhs, rl, |a: T, b: T| op.apply(a, b) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::map::testing::{View, data, elements, view};
    use proptest::prelude::*;

    const OPS: [BinaryOp; 6] =
        [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Maximum, BinaryOp::Minimum];

    /// Same bits, or both NaN.
    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn f32_kernel_equals_the_scalar_definition_bit_for_bit_on_every_broadcast_pattern(
            (m, n) in (1usize..5, 1usize..70),
            (ka, kb) in (view(), view()),
            k in 0..OPS.len(),
            (seed, specials) in (any::<u64>(), any::<bool>()),
        ) {
            let op = OPS[k];
            let (la, lb) = (ka.layout(m, n), kb.layout(m, n));
            let (a, b) = (data(&la, seed, specials), data(&lb, seed ^ 7, specials));
            let got = binary_float(op, &a, &la, &b, &lb);
            let want: Vec<f32> =
                elements(&a, &la).into_iter().zip(elements(&b, &lb)).map(|(x, y)| op.apply(x, y)).collect();
            prop_assert!(got.iter().zip(&want).all(|(&g, &w)| same(g, w)), "{op:?} {ka:?} {kb:?} {m}x{n}: {got:?} vs {want:?}");
        }

        #[test]
        fn a_number_operand_equals_the_scalar_definition_bit_for_bit(
            (m, n) in (1usize..5, 1usize..70),
            kind in view(),
            k in 0..OPS.len(),
            (seed, specials) in (any::<u64>(), any::<bool>()),
            value in prop_oneof![any::<f32>(), Just(0.0f32), Just(-0.0), Just(f32::INFINITY), Just(f32::NAN)],
        ) {
            let op = OPS[k];
            let layout = kind.layout(m, n);
            let a = data(&layout, seed, specials);
            let want: Vec<f32> = elements(&a, &layout).into_iter().map(|x| op.apply(x, value)).collect();
            // f32 (the SIMD kernel where the view allows it) and f64 (the generic one).
            let got = binary_float_scalar(op, &a, &layout, value);
            prop_assert!(got.iter().zip(&want).all(|(&g, &w)| same(g, w)), "{op:?} {kind:?} {m}x{n} {value}: {got:?} vs {want:?}");
            let a64: Vec<f64> = a.iter().map(|&x| x as f64).collect();
            let got64 = binary_float_scalar(op, &a64, &layout, value as f64);
            let want64: Vec<f64> = elements(&a64, &layout).into_iter().map(|x| op.apply(x, value as f64)).collect();
            prop_assert!(got64.iter().zip(&want64).all(|(&g, &w)| g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())));
        }
    }

    #[test]
    fn broadcast_patterns_take_the_simd_path_and_transposes_do_not() {
        let (m, n) = (3, 20);
        let full = View::Contiguous.layout(m, n);
        // Rows shorter than 16 are left to the scalar walk (a call per row would cost more).
        assert!(SimdRuns::plan([&View::Contiguous.layout(m, 8), &View::Row.layout(m, 8)], true).is_none());
        for kind in [View::Contiguous, View::RowSlice, View::Row, View::Column, View::Scalar] {
            assert!(SimdRuns::plan([&full, &kind.layout(m, n)], true).is_some(), "{kind:?}");
        }
        assert!(SimdRuns::plan([&full, &View::Transposed.layout(m, n)], true).is_none());
        // Without broadcast (unary ops) a repeated row still has unit-stride runs; a repeated
        // column or scalar does not.
        assert!(SimdRuns::plan([&View::Row.layout(m, n)], false).is_some());
        assert!(SimdRuns::plan([&View::Column.layout(m, n)], false).is_none());
        assert!(SimdRuns::plan([&View::Scalar.layout(m, n)], false).is_none());
    }

    #[test]
    fn a_large_broadcast_is_threaded_and_still_exact() {
        // Above the parallel threshold, with runs both shorter and longer than a piece.
        for (m, n) in [(600, 300), (3, 40_000)] {
            let (la, lb) = (View::Contiguous.layout(m, n), View::Row.layout(m, n));
            let (a, b) = (data(&la, 1, true), data(&lb, 2, false));
            let got = binary_float(BinaryOp::Sub, &a, &la, &b, &lb);
            let want = binary_generic(BinaryOp::Sub, &a, &la, &b, &lb);
            assert!(got.iter().zip(&want).all(|(&g, &w)| same(g, w)), "{m}x{n}");
        }
    }
}

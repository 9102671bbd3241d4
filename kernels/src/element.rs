//! Element types the kernels work on.
//!
//! - [`Element`]: anything a buffer can hold (f32, f64, f16, bf16, i64, u8), with exact
//!   conversion through f64 for casts.
//! - [`FloatElem`]: the floating types. Each computes in an accumulator type
//!   ([`FloatElem::Acc`]): f32 for f32/f16/bf16, f64 for f64. Half-precision values are
//!   widened on load and rounded once on store, as PyTorch does on CPU.
//! - [`Real`]: the math an accumulator type offers (f32 and f64).

use half::{bf16, f16};
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// A value a buffer can hold.
pub trait Element: Copy + Send + Sync + Default + PartialOrd + std::fmt::Debug + 'static {
    fn to_f64(self) -> f64;
    /// Converts with `as`-style rounding (saturating for integers).
    fn from_f64(v: f64) -> Self;
    fn zero() -> Self;
    fn one() -> Self;
    /// The cache of freed buffers of this type (see [`crate::buffers`]).
    fn buffer_cache() -> &'static crate::buffers::BufferCache<Self>;
}

/// Math on f32 and f64: what the float kernels compute in.
pub trait Real:
    Element
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    const INFINITY: Self;
    const NEG_INFINITY: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn ln_1p(self) -> Self;
    fn tanh(self) -> Self;
    fn sqrt(self) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn abs(self) -> Self;
    fn powf(self, e: Self) -> Self;
    fn floor(self) -> Self;
    fn ceil(self) -> Self;
    fn round(self) -> Self;
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn is_nan(self) -> bool;
    fn is_finite(self) -> bool;
    fn erf(self) -> Self;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Element for $t {
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn zero() -> Self {
                0.0
            }
            fn one() -> Self {
                1.0
            }
            fn buffer_cache() -> &'static crate::buffers::BufferCache<Self> {
                static CACHE: crate::buffers::BufferCache<$t> = crate::buffers::BufferCache::new();
                &CACHE
            }
        }
        impl Real for $t {
            const INFINITY: Self = <$t>::INFINITY;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn ln_1p(self) -> Self {
                <$t>::ln_1p(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn powf(self, e: Self) -> Self {
                <$t>::powf(self, e)
            }
            fn floor(self) -> Self {
                <$t>::floor(self)
            }
            fn ceil(self) -> Self {
                <$t>::ceil(self)
            }
            fn round(self) -> Self {
                <$t>::round_ties_even(self)
            }
            fn max(self, o: Self) -> Self {
                // NaN propagates, as in PyTorch's maximum.
                if self.is_nan() || o.is_nan() { <$t>::NAN } else { <$t>::max(self, o) }
            }
            fn min(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() { <$t>::NAN } else { <$t>::min(self, o) }
            }
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            fn erf(self) -> Self {
                erf_f64(self as f64) as $t
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

macro_rules! impl_int_element {
    ($t:ty) => {
        impl Element for $t {
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn zero() -> Self {
                0
            }
            fn one() -> Self {
                1
            }
            fn buffer_cache() -> &'static crate::buffers::BufferCache<Self> {
                static CACHE: crate::buffers::BufferCache<$t> = crate::buffers::BufferCache::new();
                &CACHE
            }
        }
    };
}
impl_int_element!(i64);
impl_int_element!(u8);

macro_rules! impl_half_element {
    ($t:ty) => {
        impl Element for $t {
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
            fn from_f64(v: f64) -> Self {
                <$t>::from_f64(v)
            }
            fn zero() -> Self {
                <$t>::ZERO
            }
            fn one() -> Self {
                <$t>::ONE
            }
            fn buffer_cache() -> &'static crate::buffers::BufferCache<Self> {
                static CACHE: crate::buffers::BufferCache<$t> = crate::buffers::BufferCache::new();
                &CACHE
            }
        }
    };
}
impl_half_element!(f16);
impl_half_element!(bf16);

/// A floating-point storage type and the type it computes in.
pub trait FloatElem: Element {
    type Acc: Real;
    fn to_acc(self) -> Self::Acc;
    fn from_acc(a: Self::Acc) -> Self;

    /// The slice as `&[f32]` when `Self` is f32 (`None` otherwise): how a generic kernel
    /// finds its f32 SIMD fast path without specialisation.
    fn as_f32(slice: &[Self]) -> Option<&[f32]> {
        let _ = slice;
        None
    }

    /// The mutable counterpart of [`FloatElem::as_f32`].
    fn as_f32_mut(slice: &mut [Self]) -> Option<&mut [f32]> {
        let _ = slice;
        None
    }
}

impl FloatElem for f32 {
    type Acc = f32;
    fn to_acc(self) -> f32 {
        self
    }
    fn from_acc(a: f32) -> Self {
        a
    }
    fn as_f32(slice: &[f32]) -> Option<&[f32]> {
        Some(slice)
    }
    fn as_f32_mut(slice: &mut [f32]) -> Option<&mut [f32]> {
        Some(slice)
    }
}
impl FloatElem for f64 {
    type Acc = f64;
    fn to_acc(self) -> f64 {
        self
    }
    fn from_acc(a: f64) -> Self {
        a
    }
}
impl FloatElem for f16 {
    type Acc = f32;
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(a: f32) -> Self {
        f16::from_f32(a)
    }
}
impl FloatElem for bf16 {
    type Acc = f32;
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(a: f32) -> Self {
        bf16::from_f32(a)
    }
}

/// The error function, accurate to about 1e-15 in f64.
///
/// |x| < 2.5: the Maclaurin series `2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1))`;
/// otherwise `1 - erfc(x)` with erfc from its continued fraction (modified Lentz).
pub fn erf_f64(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    let a = x.abs();
    let r = if a < 2.5 {
        let x2 = a * a;
        let mut term = a; // x^(2n+1) (-1)^n / n!
        let mut sum = a;
        let mut n = 0.0f64;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let contrib = term / (2.0 * n + 1.0);
            sum += contrib;
            if contrib.abs() <= 1e-17 * sum.abs() {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else if a > 6.0 {
        1.0
    } else {
        // erfc(a) = exp(-a^2)/sqrt(pi) * 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + 2/(a + ...)))))
        let tiny = 1e-300;
        let mut f = a;
        let mut c = a;
        let mut d = 0.0f64;
        for k in 1..200 {
            let ak = k as f64 / 2.0;
            d = a + ak * d;
            d = if d.abs() < tiny { tiny } else { d };
            d = 1.0 / d;
            c = a + ak / c;
            c = if c.abs() < tiny { tiny } else { c };
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
    };
    if x < 0.0 { -r } else { r }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // Reference values from tables of erf (Abramowitz & Stegun 7.1).
        let cases = [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (2.5, 0.999_593_047_982_555),
            (3.0, 0.999_977_909_503_001_4),
            (-1.5, -0.966_105_146_475_310_7),
        ];
        for (x, want) in cases {
            assert!((erf_f64(x) - want).abs() < 1e-14, "erf({x}) = {} want {want}", erf_f64(x));
        }
    }

    #[test]
    fn erf_derivative_is_smooth_across_the_branch_switch() {
        // Finite differences must agree with 2/sqrt(pi) exp(-x^2) near x = 2.5.
        for x in [2.49, 2.5, 2.51, 5.9, 6.1] {
            let h = 1e-5;
            let fd = (erf_f64(x + h) - erf_f64(x - h)) / (2.0 * h);
            let exact = std::f64::consts::FRAC_2_SQRT_PI * (-x * x).exp();
            assert!((fd - exact).abs() < 1e-9, "x={x}: fd {fd} exact {exact}");
        }
    }
}

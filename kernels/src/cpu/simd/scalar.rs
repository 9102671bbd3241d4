//! The portable [`F32Vector`]: one `f32` lane in plain Rust, for targets without a
//! SIMD implementation (and as the reference the vector ISAs are tested against).

use super::F32Vector;
use std::ops::{Add, Div, Mul, Neg, Sub};

/// One f32 as a one-lane vector.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scalar(pub f32);

macro_rules! scalar_operator {
    ($($trait:ident $method:ident $op:tt),*) => {$(
        impl $trait for Scalar {
            type Output = Scalar;
            #[inline(always)]
            fn $method(self, rhs: Scalar) -> Scalar {
                Scalar(self.0 $op rhs.0)
            }
        }
    )*};
}
scalar_operator!(Add add +, Sub sub -, Mul mul *, Div div /);

impl Neg for Scalar {
    type Output = Scalar;
    #[inline(always)]
    fn neg(self) -> Scalar {
        Scalar(-self.0)
    }
}

impl F32Vector for Scalar {
    const LANES: usize = 1;
    const FUSED: bool = false;
    type Mask = bool;
    type Wide = Self;

    #[inline(always)]
    fn splat(value: f32) -> Self {
        Scalar(value)
    }
    #[inline(always)]
    fn load(src: &[f32]) -> Self {
        Scalar(src[0])
    }
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        dst[0] = self.0;
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        Scalar(self.0 * b.0 + c.0)
    }
    #[inline(always)]
    fn min(self, other: Self) -> Self {
        // As x86's `minps` (not `f32::min`, which drops a NaN): `other` unless `self` is smaller.
        if self.0 < other.0 { self } else { other }
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        // As x86's `maxps`: `other` unless `self` is larger.
        if self.0 > other.0 { self } else { other }
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        Scalar(self.0.sqrt())
    }
    #[inline(always)]
    fn abs(self) -> Self {
        Scalar(self.0.abs())
    }
    #[inline(always)]
    fn copysign(self, sign: Self) -> Self {
        Scalar(self.0.copysign(sign.0))
    }
    #[inline(always)]
    fn round(self) -> Self {
        Scalar(self.0.round_ties_even())
    }
    #[inline(always)]
    fn lt(self, other: Self) -> bool {
        self.0 < other.0
    }
    #[inline(always)]
    fn le(self, other: Self) -> bool {
        self.0 <= other.0
    }
    #[inline(always)]
    fn gt(self, other: Self) -> bool {
        self.0 > other.0
    }
    #[inline(always)]
    fn ge(self, other: Self) -> bool {
        self.0 >= other.0
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        self.0.is_nan()
    }
    #[inline(always)]
    fn mask_from_bits(bits: u32) -> bool {
        bits & 1 != 0
    }
    #[inline(always)]
    unsafe fn load_masked(src: *const f32, mask: bool) -> Self {
        // SAFETY: the caller guarantees that `src` is readable when the lane is set.
        Scalar(if mask { unsafe { src.read_unaligned() } } else { 0.0 })
    }
    #[inline(always)]
    fn select(mask: bool, if_true: Self, if_false: Self) -> Self {
        if mask { if_true } else { if_false }
    }
    #[inline(always)]
    fn deinterleave(self, next: Self) -> (Self, Self) {
        (self, next)
    }
    #[inline(always)]
    fn interleave(self, other: Self) -> (Self, Self) {
        (self, other)
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        self.0
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        self.0
    }
    #[inline(always)]
    fn pow2i(self) -> Self {
        Scalar(f32::from_bits(((self.0 as i32 + 127) as u32) << 23))
    }
    #[inline(always)]
    fn pow2_shifted(self) -> Self {
        Scalar(f32::from_bits(((self.0.to_bits() as i32).max(super::SHIFTER_BITS) as u32) << 23))
    }
    #[inline(always)]
    fn pow2_eighths_shifted(self) -> Self {
        let m = (self.0.to_bits() as i32).max(super::SHIFTER_BITS);
        Scalar(f32::from_bits((m << 20).wrapping_add(super::EIGHTHS[(m & 7) as usize]) as u32))
    }
    #[inline(always)]
    fn frexp(self) -> (Self, Self) {
        let bits = self.0.to_bits();
        let exponent = (bits >> 23) as i32 - 126;
        let mantissa = f32::from_bits((bits & 0x807f_ffff) | 0x3f00_0000);
        (Scalar(mantissa), Scalar(exponent as f32))
    }
}

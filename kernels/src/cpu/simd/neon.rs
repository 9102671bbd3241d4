//! [`F32Vector`] for aarch64 NEON: four f32 lanes in a `float32x4_t`. NEON is part of
//! every AArch64 CPU (and of the `aarch64-*` targets' baseline), so it needs no runtime
//! detection.

use super::F32Vector;
use std::arch::aarch64::*;
use std::ops::{Add, Div, Mul, Neg, Sub};

/// Evaluates an expression of NEON intrinsic calls.
macro_rules! arch {
    ($e:expr) => {
        // SAFETY: NEON is always available on aarch64 (it is a baseline feature of the
        // target); pointer arguments come from slices whose length was checked to cover
        // the four lanes read or written.
        unsafe { $e }
    };
}

/// Four f32 lanes in a NEON q register.
#[derive(Clone, Copy)]
pub struct Neon(float32x4_t);

/// The sign bit of an f32.
const SIGN: u32 = 0x8000_0000;
/// The mantissa bits of an f32.
const MANTISSA: i32 = 0x007f_ffff;
/// The bits of 0.5: the exponent field of a mantissa in `[0.5, 1)`.
const HALF_BITS: i32 = 0x3f00_0000;

impl F32Vector for Neon {
    const LANES: usize = 4;
    type Mask = uint32x4_t;
    type Wide = Self;

    #[inline(always)]
    fn splat(value: f32) -> Self {
        Self(arch!(vdupq_n_f32(value)))
    }
    #[inline(always)]
    fn load(src: &[f32]) -> Self {
        let src = &src[..4];
        Self(arch!(vld1q_f32(src.as_ptr())))
    }
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        let dst = &mut dst[..4];
        arch!(vst1q_f32(dst.as_mut_ptr(), self.0))
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        Self(arch!(vfmaq_f32(c.0, self.0, b.0)))
    }
    #[inline(always)]
    fn min(self, other: Self) -> Self {
        Self(arch!(vminq_f32(self.0, other.0)))
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        Self(arch!(vmaxq_f32(self.0, other.0)))
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        Self(arch!(vsqrtq_f32(self.0)))
    }
    #[inline(always)]
    fn abs(self) -> Self {
        Self(arch!(vabsq_f32(self.0)))
    }
    #[inline(always)]
    fn copysign(self, sign: Self) -> Self {
        Self(arch!(vbslq_f32(vdupq_n_u32(SIGN), sign.0, self.0)))
    }
    #[inline(always)]
    fn round(self) -> Self {
        Self(arch!(vrndnq_f32(self.0)))
    }
    #[inline(always)]
    fn lt(self, other: Self) -> Self::Mask {
        arch!(vcltq_f32(self.0, other.0))
    }
    #[inline(always)]
    fn le(self, other: Self) -> Self::Mask {
        arch!(vcleq_f32(self.0, other.0))
    }
    #[inline(always)]
    fn gt(self, other: Self) -> Self::Mask {
        arch!(vcgtq_f32(self.0, other.0))
    }
    #[inline(always)]
    fn ge(self, other: Self) -> Self::Mask {
        arch!(vcgeq_f32(self.0, other.0))
    }
    #[inline(always)]
    fn is_nan(self) -> Self::Mask {
        arch!(vmvnq_u32(vceqq_f32(self.0, self.0)))
    }
    #[inline(always)]
    fn mask_from_bits(bits: u32) -> Self::Mask {
        let lane_bits: [u32; 4] = [1, 2, 4, 8];
        arch!(vtstq_u32(vdupq_n_u32(bits), vld1q_u32(lane_bits.as_ptr())))
    }
    #[inline(always)]
    unsafe fn load_masked(src: *const f32, mask: Self::Mask) -> Self {
        // NEON has no masked load: the set lanes one at a time.
        let mut set = [0u32; 4];
        arch!(vst1q_u32(set.as_mut_ptr(), mask));
        let mut lanes = [0.0f32; 4];
        for (l, value) in lanes.iter_mut().enumerate() {
            if set[l] != 0 {
                // SAFETY: the caller guarantees that lane `l` of `src` is readable when set.
                *value = unsafe { src.wrapping_add(l).read_unaligned() };
            }
        }
        Self::load(&lanes)
    }
    #[inline(always)]
    fn select(mask: Self::Mask, if_true: Self, if_false: Self) -> Self {
        Self(arch!(vbslq_f32(mask, if_true.0, if_false.0)))
    }
    #[inline(always)]
    fn deinterleave(self, next: Self) -> (Self, Self) {
        (Self(arch!(vuzp1q_f32(self.0, next.0))), Self(arch!(vuzp2q_f32(self.0, next.0))))
    }
    #[inline(always)]
    fn interleave(self, other: Self) -> (Self, Self) {
        (Self(arch!(vzip1q_f32(self.0, other.0))), Self(arch!(vzip2q_f32(self.0, other.0))))
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        arch!(vaddvq_f32(self.0))
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        arch!(vmaxvq_f32(self.0))
    }
    #[inline(always)]
    fn pow2i(self) -> Self {
        Self(arch!(vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(vcvtnq_s32_f32(self.0), vdupq_n_s32(127))))))
    }
    #[inline(always)]
    fn pow2_shifted(self) -> Self {
        Self(arch!(vreinterpretq_f32_s32(vshlq_n_s32::<23>(vmaxq_s32(
            vreinterpretq_s32_f32(self.0),
            vdupq_n_s32(super::SHIFTER_BITS)
        )))))
    }
    #[inline(always)]
    fn pow2_eighths_shifted(self) -> Self {
        arch!({
            let m = vmaxq_s32(vreinterpretq_s32_f32(self.0), vdupq_n_s32(super::SHIFTER_BITS));
            // The table lookup as a byte shuffle: lane `l` takes bytes `4 j .. 4 j + 4`
            // of the table, `j = m mod 8`.
            let table = vld1q_u8_x2(super::EIGHTHS.as_ptr().cast());
            let first_byte = vshlq_n_u32::<2>(vandq_u32(vreinterpretq_u32_s32(m), vdupq_n_u32(7)));
            let bytes = vaddq_u32(vmulq_n_u32(first_byte, 0x0101_0101), vdupq_n_u32(0x0302_0100));
            let entry = vreinterpretq_s32_u8(vqtbl2q_u8(table, vreinterpretq_u8_u32(bytes)));
            Self(vreinterpretq_f32_s32(vaddq_s32(vshlq_n_s32::<20>(m), entry)))
        })
    }
    #[inline(always)]
    fn frexp(self) -> (Self, Self) {
        arch!({
            let bits = vreinterpretq_s32_f32(self.0);
            let exponent = vsubq_s32(vshrq_n_s32::<23>(bits), vdupq_n_s32(126));
            let mantissa = vorrq_s32(vandq_s32(bits, vdupq_n_s32(MANTISSA)), vdupq_n_s32(HALF_BITS));
            (Self(vreinterpretq_f32_s32(mantissa)), Self(vcvtq_f32_s32(exponent)))
        })
    }
}

impl Add for Neon {
    type Output = Self;
    #[inline(always)]
    fn add(self, rhs: Self) -> Self {
        Self(arch!(vaddq_f32(self.0, rhs.0)))
    }
}
impl Sub for Neon {
    type Output = Self;
    #[inline(always)]
    fn sub(self, rhs: Self) -> Self {
        Self(arch!(vsubq_f32(self.0, rhs.0)))
    }
}
impl Mul for Neon {
    type Output = Self;
    #[inline(always)]
    fn mul(self, rhs: Self) -> Self {
        Self(arch!(vmulq_f32(self.0, rhs.0)))
    }
}
impl Div for Neon {
    type Output = Self;
    #[inline(always)]
    fn div(self, rhs: Self) -> Self {
        Self(arch!(vdivq_f32(self.0, rhs.0)))
    }
}
impl Neg for Neon {
    type Output = Self;
    #[inline(always)]
    fn neg(self) -> Self {
        Self(arch!(vnegq_f32(self.0)))
    }
}

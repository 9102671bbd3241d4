//! [`Pair`]: two vectors used as one twice as wide, so that a long dependent chain (a
//! polynomial, the steps of `exp`) is issued for two independent vectors side by side.
//!
//! Every operation of `Pair<V>` is the operation of `V` on both halves, one after the
//! other, so the instruction stream interleaves the two chains. An out-of-order core
//! could in principle find that parallelism itself across loop iterations, but only as
//! far as its scheduler holds waiting instructions: `exp` is a chain of about 20
//! dependent steps, and our reading of the measurements (see [`F32Vector::Wide`]) is that
//! Zen 3's floating-point scheduler fills with one chain's waiting steps before the next
//! chain's ready ones reach it. Interleaved, each waiting step of one chain has a ready
//! step of the other beside it.
//!
//! `V` is one of the ISAs' vectors (at most [`super::MAX_LANES`] lanes): the loops' lane
//! masks cover a `Pair` of those, not deeper nestings.

use super::F32Vector;
use std::ops::{Add, Div, Mul, Neg, Sub};

/// Two `V`s as one vector of `2 * V::LANES` lanes: the first half in `.0`.
#[derive(Clone, Copy)]
pub struct Pair<V>(pub V, pub V);

macro_rules! pair_operator {
    ($($trait:ident $method:ident),*) => {$(
        impl<V: F32Vector> $trait for Pair<V> {
            type Output = Self;
            #[inline(always)]
            fn $method(self, rhs: Self) -> Self {
                Pair(self.0.$method(rhs.0), self.1.$method(rhs.1))
            }
        }
    )*};
}
pair_operator!(Add add, Sub sub, Mul mul, Div div);

impl<V: F32Vector> Neg for Pair<V> {
    type Output = Self;
    #[inline(always)]
    fn neg(self) -> Self {
        Pair(-self.0, -self.1)
    }
}

/// Trait methods that apply `V`'s method to both halves: `name(args) -> Pair` for those
/// that give a vector, `name(args) -> Mask` for those that give a mask.
macro_rules! halves {
    ($($method:ident($($arg:ident),*) -> $out:ident),* $(,)?) => {$(
        #[inline(always)]
        fn $method(self $(, $arg: Self)*) -> halves!(@type $out) {
            halves!(@make $out, self.0.$method($($arg.0),*), self.1.$method($($arg.1),*))
        }
    )*};
    (@type Pair) => { Self };
    (@type Mask) => { Self::Mask };
    (@make Pair, $lo:expr, $hi:expr) => { Pair($lo, $hi) };
    (@make Mask, $lo:expr, $hi:expr) => { ($lo, $hi) };
}

impl<V: F32Vector> F32Vector for Pair<V> {
    const LANES: usize = 2 * V::LANES;
    const FUSED: bool = V::FUSED;
    type Mask = (V::Mask, V::Mask);
    type Wide = Self;

    halves! {
        mul_add(b, c) -> Pair,
        min(other) -> Pair,
        max(other) -> Pair,
        sqrt() -> Pair,
        abs() -> Pair,
        copysign(sign) -> Pair,
        round() -> Pair,
        pow2i() -> Pair,
        pow2_shifted() -> Pair,
        pow2_eighths_shifted() -> Pair,
        ldexp(n) -> Pair,
        lt(other) -> Mask,
        le(other) -> Mask,
        gt(other) -> Mask,
        ge(other) -> Mask,
        is_nan() -> Mask,
    }

    #[inline(always)]
    fn splat(value: f32) -> Self {
        Pair(V::splat(value), V::splat(value))
    }
    #[inline(always)]
    fn load(src: &[f32]) -> Self {
        Pair(V::load(src), V::load(&src[V::LANES..]))
    }
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        self.0.store(dst);
        self.1.store(&mut dst[V::LANES..]);
    }
    #[inline(always)]
    fn select(mask: Self::Mask, if_true: Self, if_false: Self) -> Self {
        Pair(V::select(mask.0, if_true.0, if_false.0), V::select(mask.1, if_true.1, if_false.1))
    }
    #[inline(always)]
    fn deinterleave(self, next: Self) -> (Self, Self) {
        // The sequence is self.0, self.1, next.0, next.1: each pair of halves splits on
        // its own.
        let ((even0, odd0), (even1, odd1)) = (self.0.deinterleave(self.1), next.0.deinterleave(next.1));
        (Pair(even0, even1), Pair(odd0, odd1))
    }
    #[inline(always)]
    fn interleave(self, other: Self) -> (Self, Self) {
        let ((a, b), (c, d)) = (self.0.interleave(other.0), self.1.interleave(other.1));
        (Pair(a, b), Pair(c, d))
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        (self.0 + self.1).reduce_add()
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        self.0.max(self.1).reduce_max()
    }
    #[inline(always)]
    fn frexp(self) -> (Self, Self) {
        let ((m0, e0), (m1, e1)) = (self.0.frexp(), self.1.frexp());
        (Pair(m0, m1), Pair(e0, e1))
    }
    #[inline(always)]
    fn mask_from_bits(bits: u32) -> Self::Mask {
        (V::mask_from_bits(bits), V::mask_from_bits(bits.checked_shr(V::LANES as u32).unwrap_or(0)))
    }
    #[inline(always)]
    unsafe fn load_masked(src: *const f32, mask: Self::Mask) -> Self {
        // SAFETY: the caller vouches for every lane set in `mask`: the first half's lanes
        // are `src + l`, the second half's `src + V::LANES + l`.
        unsafe { Pair(V::load_masked(src, mask.0), V::load_masked(src.wrapping_add(V::LANES), mask.1)) }
    }
    #[inline(always)]
    fn load_partial(src: &[f32], fill: f32) -> Self {
        if src.len() <= V::LANES {
            Pair(V::load_partial(src, fill), V::splat(fill))
        } else {
            Pair(V::load(src), V::load_partial(&src[V::LANES..], fill))
        }
    }
    #[inline(always)]
    fn store_partial(self, dst: &mut [f32]) {
        if dst.len() <= V::LANES {
            self.0.store_partial(dst);
        } else {
            self.0.store(dst);
            self.1.store_partial(&mut dst[V::LANES..]);
        }
    }
}

//! Vectorised f32 transcendental functions, written once over [`F32Vector`]: `exp`, `ln`,
//! `tanh`, `erf`, `sigmoid`, `silu`, GELU in its erf and tanh forms, and [`RowExp`], the
//! exponentials of a row less its max (softmax's).
//!
//! The method is the classic one of the Cephes library (S. L. Moshier, *Methods and
//! Programs for Mathematical Functions*, 1989): reduce the argument to a short interval
//! with an exact identity, evaluate a polynomial there (Horner's rule with fused
//! multiply-adds), and undo the reduction. `exp` uses Cephes' `expf` reduction with a
//! polynomial one degree shorter, fitted for this crate; `ln` uses Cephes' `logf`
//! reduction and coefficients, `tanh` Cephes' `tanhf` polynomial; `erf` uses
//! polynomials fitted for this crate (minimax in relative error, by Lawson's iteratively
//! reweighted least squares) in the form `erf(x) = x + x P(x^2)` near 0 and
//! `erf(x) = 1 - exp(Q(x))` beyond, where `Q` approximates `ln(erfc(x))`. [`RowExp`]
//! reduces to eighths of a power of two, taken from a table of eight, and a cubic fitted
//! the same way.
//!
//! Every function is branch-free: all cases are computed and the right one is selected
//! per lane, so a vector of mixed inputs costs the same as any other. Special values are
//! handled explicitly: NaN in gives NaN out, infinities and overflow/underflow give the
//! IEEE limits, `ln` of 0 is `-inf` and of a negative number NaN, and subnormal inputs
//! and outputs are treated exactly where the result can be represented.
//!
//! The error bounds in each doc comment were measured against the f64 functions of the
//! standard library (and `erf_f64` for erf) on a dense sweep of the whole useful input
//! range (every 251st to 1021st f32 bit pattern, which visits every binade), on AVX2 + FMA
//! and on the portable [`super::Scalar`] path; the tests at the bottom assert them. An
//! "ulp" is the spacing of f32 values at the exact result.

use super::F32Vector;

/// Evaluates `c[0] x^(n-1) + c[1] x^(n-2) + ... + c[n-1]` by Horner's rule.
#[inline(always)]
fn horner<V: F32Vector, const N: usize>(x: V, c: [f32; N]) -> V {
    let mut acc = V::splat(c[0]);
    for &ck in &c[1..] {
        acc = acc.mul_add(x, V::splat(ck));
    }
    acc
}

/// `log2(e)`.
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `ln(2)` split in two (Cody & Waite): the high part has only 9 significant bits, so
/// `n * LN2_HI` is exact for every `|n| < 2^15`.
const LN2_HI: f32 = 0.693_359_4;
/// `ln(2) - LN2_HI`.
const LN2_LO: f32 = -2.121_944_4e-4;
/// `e^r ~ 1 + r + r^2 P(r)` on `|r| <= ln(2)/2`, `P` of degree 4 (Cephes' `expf` has
/// degree 5): fitted for this crate, minimax in relative error (Lawson's iteratively
/// reweighted least squares); with the coefficients rounded to f32 the fit is within
/// 3.8e-9 of `e^r` (0.06 ulp), so the rounding of the evaluation is all that is left.
const EXP_P: [f32; 5] = [1.381_46e-3, 8.368_71e-3, 4.166_839e-2, 1.666_652_1e-1, 4.999_999_4e-1];

/// `1.5 * 2^23 + 127`. For `|v| < 2^21`, the float nearest `v + EXP_SHIFTER` is
/// `1.5 * 2^23 + round(v) + 127`: the addition rounds `v` to an integer (to nearest, ties
/// to even) and leaves it, with the exponent bias, in the low mantissa bits, where
/// [`F32Vector::pow2_shifted`] takes `2^round(v)` from.
const EXP_SHIFTER: f32 = super::ROUNDING_SHIFTER + 127.0;

/// `e^x = e^r 2^n` for an `x` already clamped to `[-104, 89]`: returns `e^r`, in
/// `[0.7, 1.42]`, and `n + EXP_SHIFTER` (see [`EXP_SHIFTER`]).
///
/// Method (Cephes `expf`): `x = n ln 2 + r` with `n = round(x / ln 2)` and `|r| <= ln(2)/2`
/// (`n ln 2` subtracted in two parts, Cody & Waite), then `e^r` by a degree-6 polynomial.
/// `n` is rounded by adding the shifter in the same fused multiply-add that scales `x`
/// by `log2(e)`.
#[inline(always)]
fn exp_reduce<V: F32Vector>(clamped: V) -> (V, V) {
    let shifted = clamped.mul_add(V::splat(LOG2_E), V::splat(EXP_SHIFTER));
    let n = shifted - V::splat(EXP_SHIFTER);
    let r = n.mul_add(V::splat(-LN2_HI), clamped);
    let r = n.mul_add(V::splat(-LN2_LO), r);
    (horner(r, EXP_P).mul_add(r * r, r) + V::splat(1.0), shifted)
}

/// `e^x` as `(e^r, n)` with `e^x = e^r 2^n` and `n` in `[-150, 129]` (see `exp_reduce`),
/// so that a product `c e^x` evaluated as `(c e^r) 2^n` (with [`F32Vector::ldexp`]) is
/// rounded once, however far into the subnormal range it falls. A NaN `x` gives a NaN
/// `e^r`.
#[inline(always)]
fn exp_parts<V: F32Vector>(x: V) -> (V, V) {
    // Beyond these the result is inf or 0 anyway; clamping keeps n within [-150, 129].
    // `splat(c).max(x)` keeps a NaN `x` (see `F32Vector::max`).
    let (er, shifted) = exp_reduce(V::splat(89.0).min(V::splat(-104.0).max(x)));
    (er, shifted - V::splat(EXP_SHIFTER))
}

/// `e^x`.
///
/// Max error: 0.96 ulp (measured), including results in the subnormal range, which are
/// rounded once. `exp(x) = inf` for x > 88.72, `0` for x < -103.97, NaN for NaN.
///
/// Method: see `exp_reduce` (Cephes `expf`), then `e^r 2^n` by [`F32Vector::ldexp`] (one
/// instruction on AVX-512).
#[inline(always)]
pub fn exp<V: F32Vector>(x: V) -> V {
    let (er, n) = exp_parts(x);
    er.ldexp(n)
}

/// `e^x` for `x <= 0`, as softmax and attention need it (`x - max` over a row), with
/// `2^n` made from the bits of the rounded `n` by [`F32Vector::pow2_shifted`] (one
/// integer max and one shift) instead of [`exp`]'s [`F32Vector::ldexp`]. Results down
/// to `2^-127` (`x >= -87.68`) are rounded once, subnormal ones included; below, the
/// result is `0`. `exp_nonpositive(-inf) = 0`, NaN for NaN. Positive inputs give
/// unspecified values.
///
/// Max error: 0.96 ulp (measured) over `[-87.68, 0]`, as [`exp`] (same reduction and
/// polynomial). Cost with AVX2 on Zen 3, from L1, one thread, on `Wide` vectors: 0.32
/// ns per value, against 0.46 with Cephes' longer polynomial, `round`, and selects for
/// the flush and for NaN.
#[inline(always)]
pub fn exp_nonpositive<V: F32Vector>(x: V) -> V {
    // `splat(c).max(x)` keeps a NaN `x` (see `F32Vector::max`), and NaN survives every
    // step after it: `pow2_shifted` of NaN is 0, and NaN * 0 is NaN.
    let (er, shifted) = exp_reduce(V::splat(-104.0).max(x));
    er * shifted.pow2_shifted()
}

/// `log2(e) - LOG2_E`: with it, `x log2(e)` is carried to 48 bits.
const LOG2_E_LO: f32 = 1.925_963e-8;
/// `2^(r/8) ~ 1 + r P(r)` on `|r| <= 0.511` ([`RowExp`]'s `r`, at most `1/2` plus
/// `8 |x| (log2(e) - LOG2_E)`), `P` of degree 2: fitted for this crate, minimax in
/// relative error (Lawson's iteratively reweighted least squares), within 2.7e-8 of
/// `2^(r/8)` (0.45 ulp).
const EXP2_EIGHTHS_P: [f32; 3] = [1.083_904_3e-4, 3.754_045_3e-3, 8.664_340_5e-2];

/// The exponentials `e^(x - m)` of the values `x <= m` of a row (softmax's) whose max is
/// `m`, each times one factor `2^s` with `|s| <= 1/16`, the same for the whole row
/// ([`RowExp::log_factor`] gives `s ln 2`), which cancels when the row is normalised.
/// Results under the normal range (`2^-126`) are within `2^-126.9` of the exact value,
/// and 0 under `2^-127`.
///
/// Max error: 1.2 ulp (measured) against `2^s e^(x - m)` with `x - m` exact, over
/// `x - m` in `[-87, 0]` for maxima from `-2^16` to `2^16`.
///
/// Method: `2^s e^(x - m) = 2^(k/8) 2^(r/8)` with `k` an integer and `|r| <= 0.511`.
/// The row's constant `c = ROUNDING_SHIFTER + 8 (127 - m log2(e))`, rounded to f32 once
/// per row (its rounding is `8 s`), is added to `8 x LOG2_E` in the fused multiply-add
/// that rounds the sum to the integer `k + 8 * 127` (see `EXP_SHIFTER`); a second one
/// gives the remainder `r` with one rounding (the product and the difference in it are
/// exact), and a third adds `8 x LOG2_E_LO`. `2^(k/8)` is
/// [`F32Vector::pow2_eighths_shifted`] of the rounded sum (a table of eight and the
/// exponent bits), `2^(r/8) = 1 + q` a polynomial of degree 3, and the result
/// `2^(k/8) + 2^(k/8) q` one more multiply-add, so that it is rounded once. Neither
/// `x - m` nor a Cody-Waite split of `k ln 2` is computed, and the polynomial is half
/// as long as [`exp_nonpositive`]'s: 7 multiplies and multiply-adds a value against its
/// 10, the operations that bound it. And `x - m` is never rounded: in
/// `exp_nonpositive(x - m)` its rounding (half an ulp of it) is a relative error of up
/// to `|x - m| 2^-24` in the result, tens of ulp at `x - m = -80`.
#[derive(Clone, Copy)]
pub struct RowExp<V> {
    /// `c`, in every lane.
    offset: V,
    /// `m - 104`: lower values are raised to it, so that `k` stays within what
    /// [`F32Vector::pow2_eighths_shifted`] takes (their results are 0 either way).
    floor: V,
    /// `s ln 2`.
    log_factor: f64,
}

impl<V: F32Vector> RowExp<V> {
    /// The largest `|m|` taken. `k` is rounded before the low part of `log2(e)` is
    /// added in, which moves `r` by up to `8 |x| LOG2_E_LO` (0.01 here) outside
    /// `[-1/2, 1/2]`; and beyond `|m| = 5.4e5` the sum that rounds `k` leaves the binade
    /// where the shifter works.
    pub const MAX_ABS: f32 = 65_536.0;

    /// The exponentials of a row whose max is `max`, or `None` if `max` is NaN or
    /// `|max| > MAX_ABS` (infinities included), or if `V`'s multiply-adds are not fused
    /// (the method needs the products `8 x log2(e)` exact).
    #[inline(always)]
    pub fn new(max: f32) -> Option<Self> {
        if !V::FUSED || max.is_nan() || max.abs() > Self::MAX_ABS {
            return None;
        }
        let exact = super::ROUNDING_SHIFTER as f64 + 8.0 * (127.0 - max as f64 * std::f64::consts::LOG2_E);
        let offset = exact as f32;
        let log_factor = (offset as f64 - exact) / 8.0 * std::f64::consts::LN_2;
        Some(Self { offset: V::splat(offset), floor: V::splat(max - 104.0), log_factor })
    }

    /// `2^s e^(x - m)` for `x <= m`.
    #[inline(always)]
    pub fn at(&self, x: V) -> V {
        // `floor.max(x)` keeps a NaN `x`, and NaN survives every step after it.
        let x = self.floor.max(x);
        let shifted = x.mul_add(V::splat(8.0 * LOG2_E), self.offset);
        // `offset - shifted` is exact (the two are within a factor of 2).
        let r = x.mul_add(V::splat(8.0 * LOG2_E), self.offset - shifted);
        let r = x.mul_add(V::splat(8.0 * LOG2_E_LO), r);
        let q = horner(r, EXP2_EIGHTHS_P) * r;
        let power = shifted.pow2_eighths_shifted();
        power.mul_add(q, power)
    }

    /// `s ln 2`: the logarithm of the factor every result carries.
    pub fn log_factor(&self) -> f64 {
        self.log_factor
    }
}

/// `sqrt(1/2)`: `ln` evaluates its polynomial on `[sqrt(1/2), sqrt(2))`.
const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// Cephes `logf` polynomial: `ln(1 + f) ~ f - f^2/2 + f^3 P(f)` for `f` in `[sqrt(1/2) - 1, sqrt(2) - 1)`.
const LN_P: [f32; 9] = [
    7.037_683_6e-2,
    -1.151_461e-1,
    1.167_699_9e-1,
    -1.242_014_1e-1,
    1.424_932_3e-1,
    -1.666_805_8e-1,
    2.000_071_5e-1,
    -2.499_999_4e-1,
    3.333_333e-1,
];

/// The natural logarithm.
///
/// Max error: 0.75 ulp (measured) over every positive f32, subnormals included. `ln(0) = -inf`,
/// `ln(x < 0) = NaN`, `ln(inf) = inf`, NaN for NaN.
///
/// Method (Cephes `logf`): `x = m 2^e` with `m` in `[sqrt(1/2), sqrt(2))`, then
/// `ln x = ln(1 + f) + e ln 2` with `f = m - 1` and `ln(1 + f)` from a polynomial; `e ln 2`
/// is added in two parts (Cody-Waite) so that no bits are lost. Subnormal inputs are
/// first scaled by `2^23`.
#[inline(always)]
pub fn ln<V: F32Vector>(x: V) -> V {
    let subnormal = x.lt(V::splat(f32::MIN_POSITIVE));
    let scaled = V::select(subnormal, x * V::splat(8_388_608.0), x);
    let (m, e) = scaled.frexp();
    let e = V::select(subnormal, e - V::splat(23.0), e);
    // m in [0.5, 1): below sqrt(1/2) use 2m and e - 1 instead.
    let low = m.lt(V::splat(SQRT_HALF));
    let f = V::select(low, m + m, m) - V::splat(1.0);
    let e = V::select(low, e - V::splat(1.0), e);
    let f2 = f * f;
    let y = horner(f, LN_P) * f * f2;
    let y = e.mul_add(V::splat(LN2_LO), y);
    let y = f2.mul_add(V::splat(-0.5), y);
    let y = e.mul_add(V::splat(LN2_HI), f + y);
    let y = V::select(x.le(V::splat(0.0)), V::splat(f32::NEG_INFINITY), y);
    let y = V::select(x.lt(V::splat(0.0)), V::splat(f32::NAN), y);
    let y = V::select(x.ge(V::splat(f32::INFINITY)), x, y);
    V::select(x.is_nan(), x, y)
}

/// Below this `|x|`, `tanh` uses its odd polynomial; above, the exponential form.
const TANH_SMALL: f32 = 0.625;
/// Cephes `tanhf` polynomial: `tanh(x) ~ x + x^3 P(x^2)` on `|x| < 0.625`.
const TANH_P: [f32; 5] = [-5.704_988_7e-3, 2.063_909e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328e-1];

/// The hyperbolic tangent.
///
/// Max error: 1.34 ulp (measured). Saturates to exactly `±1` for `|x| > 9.01`; `tanh(±inf) = ±1`,
/// `tanh(-0) = -0`, NaN for NaN.
///
/// Method (Cephes `tanhf`): for `|x| < 0.625` an odd polynomial; otherwise
/// `tanh|x| = 1 - 2e / (1 + e)` with `e = e^(-2|x|)`, which has no cancellation there (the
/// result is above 0.55); the sign of `x` is copied onto the result. (`e` from
/// [`exp_nonpositive`] rather than `e^(2|x|)` from [`exp`]: 10% faster, 1.34 ulp against
/// 1.28.)
#[inline(always)]
pub fn tanh<V: F32Vector>(x: V) -> V {
    let a = x.abs();
    let a2 = a * a;
    let small = (horner(a2, TANH_P) * a2).mul_add(a, a);
    let one = V::splat(1.0);
    let e = exp_nonpositive(-(a + a));
    let large = one - (e + e) / (one + e);
    V::select(a.lt(V::splat(TANH_SMALL)), small, large).copysign(x)
}

/// Below this `|x|`, `erf` uses `x + x P(x^2)`; above, `1 - exp(Q(x))`.
const ERF_SMALL: f32 = 0.921_875;
/// Above this `|x|`, `erf(x)` rounds to `±1` in f32 (`erfc(3.92) < 2^-25`).
const ERF_ONE: f32 = 3.92;
/// `erf(x)/x - 1 ~ P(x^2)` on `|x| < 0.921875` (relative error of the fit 1.6e-8).
const ERF_P: [f32; 6] = [-5.990_976e-4, 4.993_209e-3, -2.676_664e-2, 1.128_181_7e-1, -3.761_249_5e-1, 1.283_791_5e-1];
/// `ln(erfc(t)) ~ Q(t)` on `[0.921875, 3.92]` (absolute error of the fit 8.3e-9).
const ERFC_LN_Q: [f32; 9] = [
    1.632_533_7e-6,
    -4.592_95e-5,
    5.954_035_4e-4,
    -4.751_518_4e-3,
    2.639_386e-2,
    -1.100_244_1e-1,
    -6.318_933_4e-1,
    -1.130_189_3,
    3.080_752_8e-4,
];

/// The two pieces of `erf`, for `t = |x|`: `x + x P(x^2)` (valid below [`ERF_SMALL`])
/// and `erfc(t) = exp(Q(t))` (valid from [`ERF_SMALL`] to [`ERF_ONE`]; `t` is clamped there).
#[inline(always)]
fn erf_pieces<V: F32Vector>(x: V, t: V) -> (V, V, V::Mask) {
    let small = horner(x * x, ERF_P).mul_add(x, x);
    // `Q <= 3.1e-4` (its value at 0, a lane that takes the other piece) and `>= -17`:
    // `exp_nonpositive` is as accurate as `exp` there (its `2^n` is normal), and cheaper.
    let erfc = exp_nonpositive(horner(t.min(V::splat(ERF_ONE)), ERFC_LN_Q));
    (small, erfc, t.lt(V::splat(ERF_SMALL)))
}

/// The error function `erf(x) = 2/sqrt(pi) int_0^x e^(-s^2) ds`.
///
/// Max error: 1.25 ulp (measured) over all f32. `erf(x) = ±1` exactly for `|x| >= 3.92`,
/// `erf(±inf) = ±1`, `erf(-0) = -0`, NaN for NaN.
///
/// Method: `x + x P(x^2)` for `|x| < 0.921875` (so that tiny inputs keep full relative
/// precision), else `1 - erfc(|x|)` with `erfc = exp(Q(|x|))`, signed like `x`.
#[inline(always)]
pub fn erf<V: F32Vector>(x: V) -> V {
    let t = x.abs();
    let (small, erfc, is_small) = erf_pieces(x, t);
    let large = (V::splat(1.0) - erfc).copysign(x);
    let y = V::select(is_small, small, large);
    V::select(x.is_nan(), x, y)
}

/// `k * sigmoid(x)`, rounded once at the end, so that results in the subnormal range
/// keep every bit they can hold.
///
/// Method: with `e = e^-|x|`, `sigmoid(|x|) = 1 / (1 + e)`, and for negative `x`,
/// `sigmoid(x) = e / (1 + e)` (no cancellation in `1 - sigmoid(|x|)`). In the
/// denominator `e = e^r 2^n` is built from the bits of `n` ([`F32Vector::pow2_shifted`]:
/// `0` below `2^-127`, where `1 + e` is 1 anyway); for negative `x` the power of two is
/// applied last, as `2^(n + 64)` and then `2^-64`, so that a result in the subnormal
/// range is rounded once. Lanes that take the other branch, or are `0` anyway
/// (`x < -104`), scale by `2^64` and `2^-64`: no lane computes a subnormal number it does
/// not return, as arithmetic on subnormals is slow (measured on Zen 3: GELU-tanh 2.4x
/// slower per value for `|x| > 10.5`, where it computed them and threw them away).
#[inline(always)]
fn scaled_sigmoid<V: F32Vector>(x: V, k: V) -> V {
    let negative = x.lt(V::splat(0.0));
    let underflow = x.lt(V::splat(-104.0));
    let (er, shifted) = exp_reduce(V::splat(-104.0).max(-x.abs()));
    let r = V::splat(1.0) / (V::splat(1.0) + er * shifted.pow2_shifted());
    // 2^n 2^64 in the lanes that return the tail, else 2^64 (the two scalings cancel).
    let up = V::splat(64.0);
    let unscaled = V::splat(EXP_SHIFTER) + up;
    let tail_shifted = V::select(underflow, unscaled, V::select(negative, shifted + up, unscaled));
    let tail = (k * er * r) * tail_shifted.pow2_shifted() * V::splat(TWO_TO_MINUS_64);
    // Below -104, `e^x` is 0: `k * 0` (NaN for an infinite `k`, as the definition gives).
    let tail = V::select(underflow, k * V::splat(0.0), tail);
    // NaN is NaN by now, but with bits that depend on the path: return `x` itself.
    V::select(x.is_nan(), x, V::select(negative, tail, k * r))
}

/// `2^-64`, the power of two that [`scaled_sigmoid`] applies last.
const TWO_TO_MINUS_64: f32 = 5.421_011e-20;

/// `1 / (1 + e^-x)`, the logistic sigmoid.
///
/// Max error: 2.7 ulp (measured) over all f32, including the subnormal results for x in
/// [-103.9, -87.3]. `sigmoid(-inf) = 0`, `sigmoid(inf) = 1`, NaN for NaN.
#[inline(always)]
pub fn sigmoid<V: F32Vector>(x: V) -> V {
    scaled_sigmoid(x, V::splat(1.0))
}

/// SiLU (swish), `x * sigmoid(x)` (Elfwing et al. 2018; Ramachandran et al. 2017).
///
/// Max error: 3.2 ulp (measured) over all f32. `silu(-inf)` is NaN (`-inf * 0`), as
/// the scalar definition gives.
#[inline(always)]
pub fn silu<V: F32Vector>(x: V) -> V {
    scaled_sigmoid(x, x)
}

/// `sqrt(2/pi)`, the scale inside the tanh form of GELU.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// GELU, tanh form (Hendrycks & Gimpel 2016, as used by GPT-2):
/// `x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
///
/// Max error (measured): 3.1 ulp for x >= -1; 7 ulp on [-2, -1]; 21 ulp on [-4, -2];
/// 1.3e-5 relative on [-10, -4]. For negative `x` the result is `x sigmoid(2u)` with
/// `sigmoid(2u) ~ e^(2u)`, so the rounding of the argument `2u` in f32 (a few ulp of a
/// number that grows like `x^3`) becomes a relative error of `|2u|` ulps: that is the
/// conditioning of the formula in f32, shared by every f32 evaluation (the usual
/// `x/2 (1 + tanh u)` is far worse there, as `1 + tanh u` cancels).
///
/// Method: `(1 + tanh(u)) / 2 = sigmoid(2u)`, so GELU is `x * sigmoid(2u)`: one
/// exponential, no cancellation for negative `x`, and subnormal results where due.
#[inline(always)]
pub fn gelu_tanh<V: F32Vector>(x: V) -> V {
    let two_u = x * (x * x).mul_add(V::splat(2.0 * SQRT_2_OVER_PI * 0.044_715), V::splat(2.0 * SQRT_2_OVER_PI));
    scaled_sigmoid(two_u, x)
}

/// GELU, exact form: `x Phi(x) = x/2 (1 + erf(x / sqrt 2))` (Hendrycks & Gimpel 2016).
///
/// Max error (measured): 2.3 ulp for x >= -1; 9.3 ulp on [-2, -1]; 18 ulp on [-3, -2];
/// 5.1e-6 relative on [-5.54, -3]. For negative `x`, `1 + erf = erfc(|t|) = exp(Q)` with
/// `|Q|` up to 15, and the f32 rounding of `Q` (and of `t = x / sqrt 2`) becomes a
/// relative error of about `|Q|` ulps; the usual `x/2 (1 + erf(t))` is far worse there
/// (`1 + erf` cancels: about 200 ulp at x = -2.8). Below -5.54 the result is `-0.0`:
/// the exact value is below 8e-8 in magnitude, and PyTorch's f32 GELU, whose `1 + erf`
/// rounds to 0 there, gives 0 too.
///
/// Method: `1 + erf(t)` is computed directly as `2 - erfc(t)` for `t >= 0.92` and as
/// `erfc(|t|)` for `t <= -0.92`, so there is no cancellation for negative `x`.
#[inline(always)]
pub fn gelu_erf<V: F32Vector>(x: V) -> V {
    x * V::splat(0.5) * one_plus_erf_scaled(x)
}

/// `1 + erf(x / sqrt 2)`, that is `2 Phi(x)`, without cancellation for negative `x`
/// (see [`gelu_erf`]).
#[inline(always)]
fn one_plus_erf_scaled<V: F32Vector>(x: V) -> V {
    let t = x * V::splat(std::f32::consts::FRAC_1_SQRT_2);
    let a = t.abs();
    let (small, erfc, is_small) = erf_pieces(t, a);
    let erfc = V::select(a.gt(V::splat(ERF_ONE)), V::splat(0.0), erfc);
    let one_plus_erf_large = V::select(t.lt(V::splat(0.0)), erfc, V::splat(2.0) - erfc);
    V::select(is_small, V::splat(1.0) + small, one_plus_erf_large)
}

/// `1 / sqrt(2 pi)`, the peak of the standard normal density.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// The derivative of [`gelu_erf`]: `Phi(x) + x phi(x)`, with `phi` the standard normal
/// density. Max error (measured over [-10, 10]): `6.2e-8 (1 + |result|)`.
#[inline(always)]
pub fn gelu_erf_grad<V: F32Vector>(x: V) -> V {
    // As in `sigmoid_and_slope` (|x| > 14.4: 1.27 -> 0.69 ms per (768, 512)).
    let pdf = exp_nonpositive(x * x * V::splat(-0.5)) * V::splat(INV_SQRT_2PI);
    x.mul_add(pdf, one_plus_erf_scaled(x) * V::splat(0.5))
}

/// The derivative of [`gelu_tanh`]: with `u = sqrt(2/pi) (x + 0.044715 x^3)` and
/// `s = sigmoid(2u) = (1 + tanh u) / 2`, it is `s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 *
/// 0.044715 x^2)` (as `1 - tanh^2 u = 4 s (1 - s)`). Max error (measured over [-10,
/// 10]): `1.1e-7 (1 + |result|)`.
#[inline(always)]
pub fn gelu_tanh_grad<V: F32Vector>(x: V) -> V {
    let x2 = x * x;
    let two_u = x * x2.mul_add(V::splat(2.0 * SQRT_2_OVER_PI * 0.044_715), V::splat(2.0 * SQRT_2_OVER_PI));
    let (s, s_one_minus_s) = sigmoid_and_slope(two_u);
    let du = x2.mul_add(V::splat(2.0 * SQRT_2_OVER_PI * 3.0 * 0.044_715), V::splat(2.0 * SQRT_2_OVER_PI));
    (x * s_one_minus_s).mul_add(du, s)
}

/// `(s, s (1 - s))` with `s = sigmoid(x)`, both without cancellation: with
/// `e = exp(-|x|)`, `s (1 - s) = e / (1 + e)^2` on either side of 0.
#[inline(always)]
fn sigmoid_and_slope<V: F32Vector>(x: V) -> (V, V) {
    // `exp_nonpositive`: values under 2^-127 are 0, well inside the derivatives' absolute
    // error, and no subnormal arithmetic for |x| > 87 (slow: SiLU's derivative at x ~ -200
    // 0.72 -> 0.22 ms per (768, 512), GELU-tanh's for |x| > 10.5 0.85 -> 0.31).
    let e = exp_nonpositive(-x.abs());
    let one = V::splat(1.0);
    let r = one / (one + e);
    let s = V::select(x.lt(V::splat(0.0)), e * r, r);
    (s, e * r * r)
}

/// The derivative of [`silu`]: `s + x s (1 - s)` with `s = sigmoid(x)`. Max error
/// (measured over [-10, 10]): `9e-8 (1 + |result|)`.
#[inline(always)]
pub fn silu_grad<V: F32Vector>(x: V) -> V {
    let (s, s_one_minus_s) = sigmoid_and_slope(x);
    x.mul_add(s_one_minus_s, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::simd::{Isa, kernel, map1, test_isas};
    use crate::element::erf_f64;

    kernel! {
        /// The three activation derivatives on every element of `xs`.
        fn apply_grads(xs: &[f32]) -> [Vec<f32>; 3] {
            let mut out = [vec![0.0; xs.len()], vec![0.0; xs.len()], vec![0.0; xs.len()]];
            let [a, b, c] = &mut out;
            map1::<V>(xs, a, |x| gelu_erf_grad(x));
            map1::<V>(xs, b, |x| gelu_tanh_grad(x));
            map1::<V>(xs, c, |x| silu_grad(x));
            out
        }
    }

    #[test]
    fn activation_derivatives_are_within_their_documented_bounds() {
        use std::f64::consts::{PI, SQRT_2};
        let gelu = |x: f64| 0.5 * (1.0 + erf_f64(x / SQRT_2)) + x * (-0.5 * x * x).exp() / (2.0 * PI).sqrt();
        let gelu_tanh = |x: f64| {
            let (c, a) = ((2.0 / PI).sqrt(), 0.044715);
            let t = (c * (x + a * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * a * x * x)
        };
        let silu = |x: f64| {
            let s = 1.0 / (1.0 + (-x).exp());
            s * (1.0 + x * (1.0 - s))
        };
        // Beyond |x| = 104 the exponentials underflow (to 0, see `sigmoid_and_slope`).
        let xs = sweep(-120.0, 120.0, 1001);
        for isa in test_isas() {
            let got = apply_grads(isa, &xs);
            for (name, f, got) in [
                ("gelu", &gelu as &dyn Fn(f64) -> f64, &got[0]),
                ("gelu_tanh", &gelu_tanh, &got[1]),
                ("silu", &silu, &got[2]),
            ] {
                for (&x, &y) in xs.iter().zip(got) {
                    let want = f(x as f64);
                    let err = (y as f64 - want).abs();
                    assert!(err <= 1.5e-7 * (1.0 + want.abs()), "{name}'({x}) = {y}, want {want} ({isa:?})");
                }
            }
        }
    }

    /// The functions under test.
    #[derive(Clone, Copy, Debug)]
    enum F {
        Exp,
        ExpNonpositive,
        Ln,
        Tanh,
        Erf,
        Sigmoid,
        Silu,
        GeluTanh,
        GeluErf,
    }

    kernel! {
        /// `f` applied to every element of `xs`.
        fn apply(f: F, xs: &[f32]) -> Vec<f32> {
            let mut out = vec![0.0; xs.len()];
            match f {
                F::Exp => map1::<V>(xs, &mut out, exp),
                F::ExpNonpositive => map1::<V>(xs, &mut out, exp_nonpositive),
                F::Ln => map1::<V>(xs, &mut out, ln),
                F::Tanh => map1::<V>(xs, &mut out, tanh),
                F::Erf => map1::<V>(xs, &mut out, erf),
                F::Sigmoid => map1::<V>(xs, &mut out, sigmoid),
                F::Silu => map1::<V>(xs, &mut out, silu),
                F::GeluTanh => map1::<V>(xs, &mut out, gelu_tanh),
                F::GeluErf => map1::<V>(xs, &mut out, gelu_erf),
            }
            out
        }
    }

    /// The exact value (to f64 precision) of `f` at an f32 input.
    fn reference(f: F, x: f32) -> f64 {
        let x = x as f64;
        let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
        match f {
            F::Exp | F::ExpNonpositive => x.exp(),
            F::Ln => x.ln(),
            F::Tanh => x.tanh(),
            F::Erf => erf_f64(x),
            F::Sigmoid => sigmoid(x),
            F::Silu => x * sigmoid(x),
            // x/2 (1 + tanh u) = x sigmoid(2u): the same function, without the f64
            // cancellation of 1 + tanh(u) for very negative u.
            F::GeluTanh => x * sigmoid(2.0 * (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)),
            F::GeluErf => 0.5 * x * (1.0 + erf_f64(x / std::f64::consts::SQRT_2)),
        }
    }

    /// The spacing of f32 values at `v` (the subnormal spacing below the normal range).
    fn ulp(v: f64) -> f64 {
        let a = v.abs().max(f32::MIN_POSITIVE as f64);
        2f64.powi(a.log2().floor() as i32 - 23)
    }

    /// Every `step`-th f32 with `lo <= x <= hi` (by bit pattern, so every binade, tiny
    /// magnitudes included, is visited), plus both ends.
    fn sweep(lo: f32, hi: f32, step: u32) -> Vec<f32> {
        let mut xs = vec![lo, hi];
        let mut push_magnitudes = |max: f32, sign: f32| {
            let mut bits = 0u32;
            while bits <= max.to_bits() {
                xs.push(sign * f32::from_bits(bits));
                bits += step;
            }
        };
        if lo < 0.0 {
            push_magnitudes(-lo, -1.0);
        }
        if hi > 0.0 {
            push_magnitudes(hi, 1.0);
        }
        xs.retain(|&x| lo <= x && x <= hi);
        xs
    }

    /// The largest error in ulps of `f` over `xs`, and where it occurs, on one vector type.
    fn max_ulp_error(f: F, isa: Isa, xs: &[f32]) -> (f64, f32) {
        let got = apply(isa, f, xs);
        let mut worst = (0.0, 0.0);
        for (&x, &y) in xs.iter().zip(&got) {
            let want = reference(f, x);
            let err = (y as f64 - want).abs() / ulp(want);
            assert!(err.is_finite(), "{f:?}({x}) = {y}, want {want} ({isa:?})");
            if err > worst.0 {
                worst = (err, x);
            }
        }
        worst
    }

    /// Asserts that `f` is within `bound` ulps over `[lo, hi]` on every vector type, and
    /// prints the measured maximum (`cargo test -- --nocapture` shows the table).
    fn check_ulps(f: F, lo: f32, hi: f32, step: u32, bound: f64) {
        let xs = sweep(lo, hi, step);
        for isa in test_isas() {
            let (err, at) = max_ulp_error(f, isa, &xs);
            println!("{f:?} on [{lo}, {hi}] ({} points, {isa:?}): max {err:.3} ulp at x = {at}", xs.len());
            assert!(err <= bound, "{f:?}: {err} ulp at x = {at} on {isa:?} (bound {bound})");
        }
    }

    /// Asserts the relative error of `f` over `[lo, hi]` is at most `bound`.
    fn check_relative(f: F, lo: f32, hi: f32, step: u32, bound: f64) {
        let xs = sweep(lo, hi, step);
        for isa in test_isas() {
            let got = apply(isa, f, &xs);
            let (mut worst, mut at) = (0.0f64, 0.0f32);
            for (&x, &y) in xs.iter().zip(&got) {
                let want = reference(f, x);
                let err = if want == 0.0 { y.abs() as f64 } else { ((y as f64 - want) / want).abs() };
                if err > worst {
                    (worst, at) = (err, x);
                }
            }
            println!("{f:?} on [{lo}, {hi}] ({isa:?}): max relative error {worst:.3e} at x = {at}");
            assert!(worst <= bound, "{f:?}: relative error {worst} at x = {at} on {isa:?} (bound {bound})");
        }
    }

    /// `f` at special inputs, on every vector type; NaN matches NaN, zeros match by sign.
    fn check_specials(f: F, cases: &[(f32, f32)]) {
        let xs: Vec<f32> = cases.iter().map(|c| c.0).collect();
        for isa in test_isas() {
            let got = apply(isa, f, &xs);
            for (&(x, want), &y) in cases.iter().zip(&got) {
                let same = (y.is_nan() && want.is_nan()) || y.to_bits() == want.to_bits();
                assert!(same, "{f:?}({x}) = {y:e}, want {want:e} ({isa:?})");
            }
        }
    }

    const INF: f32 = f32::INFINITY;
    const NAN: f32 = f32::NAN;

    #[test]
    fn exp_is_within_1_ulp() {
        check_ulps(F::Exp, -103.9, 88.72, 509, 1.0);
        check_specials(
            F::Exp,
            &[(0.0, 1.0), (-0.0, 1.0), (NAN, NAN), (INF, INF), (-INF, 0.0), (88.73, INF), (-104.0, 0.0), (1e30, INF)],
        );
    }

    #[test]
    fn exp_of_nonpositive_inputs_is_within_1_ulp_down_to_2_to_the_minus_127_and_0_below() {
        check_ulps(F::ExpNonpositive, -87.68, 0.0, 509, 1.0);
        // Every f32 from e^x = 2^-126 (x = -87.34) down to about 2^-127: subnormal
        // results, one rounding each.
        let subnormal: Vec<f32> = (f32::to_bits(87.33)..=f32::to_bits(87.68)).map(|b| -f32::from_bits(b)).collect();
        for isa in test_isas() {
            let (err, at) = max_ulp_error(F::ExpNonpositive, isa, &subnormal);
            assert!(err <= 1.0, "ExpNonpositive: {err} ulp at x = {at} on {isa:?}");
        }
        check_specials(
            F::ExpNonpositive,
            &[
                (0.0, 1.0),
                (-0.0, 1.0),
                (NAN, NAN),
                (-NAN, NAN),
                (-INF, 0.0),
                (-87.69, 0.0),
                (-104.0, 0.0),
                (-1e30, 0.0),
            ],
        );
    }

    kernel! {
        /// [`RowExp`] for a row whose max is `max` at every element of `xs`, with its
        /// `log_factor`.
        fn apply_row_exp(max: f32, xs: &[f32]) -> Option<(Vec<f32>, f64)> {
            let exp = RowExp::<V>::new(max)?;
            let mut out = vec![0.0; xs.len()];
            map1::<V>(xs, &mut out, |x| exp.at(x));
            Some((out, exp.log_factor()))
        }
    }

    /// The vector types with fused multiply-adds, which [`RowExp`] needs: all but the
    /// portable scalar one (on x86; on aarch64 `Isa::Scalar` runs NEON's).
    fn isas_with_row_exp() -> Vec<Isa> {
        let isas: Vec<Isa> = test_isas().into_iter().filter(|&isa| apply_row_exp(isa, 0.0, &[0.0]).is_some()).collect();
        assert!(test_isas().iter().all(|isa| *isa == Isa::Scalar || isas.contains(isa)));
        isas
    }

    #[test]
    fn row_exponentials_are_within_1_25_ulp_of_the_row_factor_times_the_exact_exponential() {
        let mut worst = 0.0f64;
        for max in [0.0, 1.0, -3.7, 0.123, 37.25, -88.0, 1000.1, -3e4 + 0.5, 65_536.0, -65_536.0] {
            // Values `x <= max`, their exact `x - max` from 0 down to -87.2 (below, the
            // result may fall under the normal range): the rounded `max - t` and, where
            // `t` is tiny, `max` itself.
            let xs: Vec<f32> = sweep(-87.2, 0.0, 509).iter().map(|&t| (max + t).min(max)).collect();
            for isa in isas_with_row_exp() {
                let (got, log_factor) = apply_row_exp(isa, max, &xs).expect("|max| <= 2^16");
                assert!(log_factor.abs() <= std::f64::consts::LN_2 / 16.0, "s ln 2 = {log_factor} for max {max}");
                for (&x, &y) in xs.iter().zip(&got) {
                    let want = (x as f64 - max as f64 + log_factor).exp();
                    let err = (y as f64 - want).abs() / ulp(want);
                    assert!(err <= 1.25, "row max {max}: e^({x} - max) = {y}, want {want} ({err} ulp, {isa:?})");
                    worst = worst.max(err);
                }
            }
        }
        println!("RowExp: max {worst:.3} ulp");
        // Results under the normal range: within 2^-126.9 (0 under 2^-127).
        let tiny = 2f64.powi(-127);
        for max in [0.0, 37.25] {
            let xs: Vec<f32> = (0..4000).map(|i| max - 86.9 - i as f32 * 4e-4).collect();
            for isa in isas_with_row_exp() {
                let (got, log_factor) = apply_row_exp(isa, max, &xs).unwrap();
                for (&x, &y) in xs.iter().zip(&got) {
                    let want = (x as f64 - max as f64 + log_factor).exp();
                    let ok = if want < 2f64.powf(-125.9) {
                        (y as f64 - want).abs() <= 2f64.powf(-126.9) && (want >= tiny || y == 0.0)
                    } else {
                        (y as f64 - want).abs() <= 1.25 * ulp(want)
                    };
                    assert!(ok, "row max {max}: e^({x} - max) = {y:e}, want {want:e} ({isa:?})");
                }
            }
        }
        // Far below the max the result is 0, and NaN stays NaN; for a max of NaN, inf or
        // beyond 2^16 there is no `RowExp`.
        for isa in isas_with_row_exp() {
            let (got, _) = apply_row_exp(isa, 3.0, &[-80.0, -101.0, -1e30, -INF, NAN, 3.0]).unwrap();
            assert_eq!(&got[1..4], &[0.0; 3], "{isa:?}");
            assert!(got[0] > 0.0 && got[4].is_nan() && (0.95..1.05).contains(&got[5]), "{got:?} ({isa:?})");
            for max in [NAN, INF, -INF, 65_536.01, -6e5] {
                assert!(apply_row_exp(isa, max, &[0.0]).is_none(), "row max {max} ({isa:?})");
            }
        }
    }

    #[test]
    fn ln_is_within_0_8_ulp_over_all_positive_floats() {
        check_ulps(F::Ln, f32::from_bits(1), f32::MAX, 1021, 0.8);
        check_specials(
            F::Ln,
            &[(1.0, 0.0), (0.0, -INF), (-0.0, -INF), (-1.0, NAN), (-INF, NAN), (INF, INF), (NAN, NAN)],
        );
    }

    #[test]
    fn tanh_is_within_1_5_ulp_and_saturates() {
        check_ulps(F::Tanh, -10.0, 10.0, 251, 1.5);
        check_specials(
            F::Tanh,
            &[(0.0, 0.0), (-0.0, -0.0), (9.1, 1.0), (-20.0, -1.0), (INF, 1.0), (-INF, -1.0), (NAN, NAN)],
        );
    }

    #[test]
    fn erf_is_within_1_5_ulp() {
        check_ulps(F::Erf, -4.5, 4.5, 251, 1.5);
        check_specials(
            F::Erf,
            &[(0.0, 0.0), (-0.0, -0.0), (3.92, 1.0), (-5.0, -1.0), (INF, 1.0), (-INF, -1.0), (NAN, NAN)],
        );
    }

    #[test]
    fn sigmoid_is_within_3_ulp_including_subnormal_results() {
        check_ulps(F::Sigmoid, -103.9, 30.0, 509, 3.0);
        check_specials(F::Sigmoid, &[(0.0, 0.5), (-INF, 0.0), (INF, 1.0), (-200.0, 0.0), (NAN, NAN)]);
    }

    #[test]
    fn silu_is_within_3_5_ulp_including_subnormal_results() {
        check_ulps(F::Silu, -103.9, 1e6, 509, 3.5);
        check_specials(F::Silu, &[(0.0, 0.0), (INF, INF), (-INF, NAN), (NAN, NAN), (-200.0, -0.0)]);
    }

    #[test]
    fn gelu_tanh_is_within_its_documented_bounds() {
        check_ulps(F::GeluTanh, -1.0, 1e6, 251, 3.5);
        check_ulps(F::GeluTanh, -2.0, -1.0, 251, 8.0);
        check_ulps(F::GeluTanh, -4.0, -2.0, 251, 24.0);
        check_relative(F::GeluTanh, -10.0, -4.0, 251, 1.5e-5);
        check_specials(F::GeluTanh, &[(0.0, 0.0), (INF, INF), (-INF, NAN), (NAN, NAN), (-30.0, -0.0)]);
    }

    #[test]
    fn gelu_erf_is_within_its_documented_bounds() {
        check_ulps(F::GeluErf, -1.0, 1e6, 251, 2.5);
        check_ulps(F::GeluErf, -2.0, -1.0, 251, 10.0);
        check_ulps(F::GeluErf, -3.0, -2.0, 251, 20.0);
        check_relative(F::GeluErf, -5.54, -3.0, 251, 6e-6);
        check_specials(F::GeluErf, &[(0.0, 0.0), (INF, INF), (-INF, NAN), (NAN, NAN), (-6.0, -0.0), (10.0, 10.0)]);
    }
}

//! Explicit SIMD for f32, written once: a small vector trait ([`F32Vector`]), one
//! implementation per instruction set, and a dispatcher that runs a kernel with the
//! fastest one this CPU has.
//!
//! **The vector.** [`F32Vector`] is the handful of operations the kernels need: load,
//! store, arithmetic with `+ - * /` operators, fused multiply-add, min/max, comparisons
//! that give a lane mask and `select` on it, horizontal sums, and the two bit-level steps
//! the transcendental functions need (build `2^n`, split a float into mantissa and
//! exponent). It is implemented for
//!
//! - AVX-512F: `__m512`, 16 lanes, masks in `__mmask16` (x86-64);
//! - AVX2 + FMA: `__m256`, 8 lanes (x86-64);
//! - NEON: `float32x4_t`, 4 lanes (aarch64, where NEON is always present);
//! - [`Scalar`]: one `f32`, the portable fallback on every other target.
//!
//! The AVX-512 and AVX2 types come from one macro over the same intrinsic names (see
//! `x86.rs`), so the code that cannot be exercised on an AVX2-only machine is the same
//! text as the code that is.
//!
//! **The kernels.** A kernel is a struct implementing [`Kernel`], whose
//! `run::<V: F32Vector>` is written once against the trait. [`dispatch`] instantiates it
//! for the chosen [`Isa`] inside a `#[target_feature]` function, so the compiler emits that
//! ISA's instructions for the whole kernel body. Everything a kernel calls on the way
//! (trait methods, the math in [`math`], the loops [`map`], [`sums`], [`update`], ...) is
//! `#[inline(always)]`: a non-inlined generic helper would be compiled without the
//! target features and lose the vector instructions.
//!
//! **Detection.** The ISA is detected once per process ([`Isa::best`], shared with the
//! GEMM). On aarch64 NEON is part of the baseline target, so it is used without detection
//! whenever no x86 extension applies.
//!
//! **Safety.** The vector types of each ISA are private to this module, and [`dispatch`]
//! is the only code that names them; it checks `isa.is_available()` before entering the
//! `#[target_feature]` function. So an AVX2 or AVX-512 value (and so any intrinsic
//! called on one) can only exist on a CPU that has the instructions. Each ISA file has a
//! single `unsafe` site, in a macro that wraps every intrinsic call with that argument;
//! pointer loads and stores go through slices whose length is checked first.

pub mod math;
mod scalar;

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use super::gemm::Isa;
pub use scalar::Scalar;
use std::ops::{Add, Div, Mul, Neg, Sub};

/// The most lanes any [`F32Vector`] has (AVX-512), the size of the scratch buffer used
/// for partial loads and stores.
pub const MAX_LANES: usize = 16;

/// A vector of `LANES` f32 values and the operations the kernels are written with.
///
/// Arithmetic uses the operators (`a * b + c`); the rest are methods. Lanes are
/// independent: every operation acts lane by lane except the `reduce_*` methods.
pub trait F32Vector:
    Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> + Neg<Output = Self>
{
    /// Number of f32 lanes.
    const LANES: usize;
    /// The per-lane result of a comparison.
    type Mask: Copy;

    /// Every lane equal to `value`.
    fn splat(value: f32) -> Self;
    /// Loads `src[..LANES]`. Panics if `src` is shorter.
    fn load(src: &[f32]) -> Self;
    /// Stores into `dst[..LANES]`. Panics if `dst` is shorter.
    fn store(self, dst: &mut [f32]);
    /// `self * b + c`, rounded once where the ISA has fused multiply-add (all but
    /// [`Scalar`], which rounds twice rather than call a slow software `fmaf`).
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// Lane-wise minimum. A lane where either input is NaN gets one of the two inputs
    /// (which one depends on the ISA): kernels that must propagate NaN use `select`.
    fn min(self, other: Self) -> Self;
    /// Lane-wise maximum, with the same NaN caveat as [`F32Vector::min`].
    fn max(self, other: Self) -> Self;
    /// Correctly rounded square root.
    fn sqrt(self) -> Self;
    /// Absolute value (clears the sign bit, so NaN stays NaN).
    fn abs(self) -> Self;
    /// The magnitude of `self` with the sign bit of `sign`.
    fn copysign(self, sign: Self) -> Self;
    /// Rounds to the nearest integer, ties to even.
    fn round(self) -> Self;
    /// `self < other` (false where either is NaN).
    fn lt(self, other: Self) -> Self::Mask;
    /// `self <= other` (false where either is NaN).
    fn le(self, other: Self) -> Self::Mask;
    /// `self > other` (false where either is NaN).
    fn gt(self, other: Self) -> Self::Mask;
    /// `self >= other` (false where either is NaN).
    fn ge(self, other: Self) -> Self::Mask;
    /// True where the lane is NaN.
    fn is_nan(self) -> Self::Mask;
    /// `if_true` where `mask` is set, else `if_false`.
    fn select(mask: Self::Mask, if_true: Self, if_false: Self) -> Self;
    /// The sum of the lanes.
    fn reduce_add(self) -> f32;
    /// The largest lane (NaN lanes are ignored or returned, depending on the ISA).
    fn reduce_max(self) -> f32;
    /// `2^self` for lanes holding integers in `[-126, 127]` (built from the exponent
    /// bits directly; other lanes give unspecified values).
    fn pow2i(self) -> Self;
    /// Splits a positive normal float into `(m, e)` with `self = m * 2^e` and
    /// `m` in `[0.5, 1)` (C's `frexp`). Other lanes give unspecified values.
    fn frexp(self) -> (Self, Self);

    /// Loads `src` (at most `LANES` values) and fills the remaining lanes with `fill`.
    #[inline(always)]
    fn load_partial(src: &[f32], fill: f32) -> Self {
        let mut buf = [fill; MAX_LANES];
        buf[..src.len()].copy_from_slice(src);
        Self::load(&buf)
    }

    /// Stores the first `dst.len()` lanes (at most `LANES`) into `dst`.
    #[inline(always)]
    fn store_partial(self, dst: &mut [f32]) {
        let mut buf = [0.0; MAX_LANES];
        self.store(&mut buf);
        let n = dst.len();
        dst.copy_from_slice(&buf[..n]);
    }
}

/// A computation written once for every vector type: [`dispatch`] calls `run` with the
/// vector type of the chosen ISA.
pub trait Kernel {
    /// What the kernel returns.
    type Output;
    /// The kernel body. Implementations are `#[inline(always)]` so that the body is
    /// compiled inside the ISA's `#[target_feature]` function.
    fn run<V: F32Vector>(self) -> Self::Output;
}

/// The vector type used when no x86 extension is available: NEON on aarch64, where every
/// CPU has it, else [`Scalar`].
#[cfg(target_arch = "aarch64")]
type Baseline = neon::Neon;
#[cfg(not(target_arch = "aarch64"))]
type Baseline = Scalar;

/// Runs `kernel` with the vector type of `isa`.
///
/// # Panics
/// If this CPU does not support `isa` (see [`Isa::is_available`]).
#[inline]
pub fn dispatch<K: Kernel>(isa: Isa, kernel: K) -> K::Output {
    assert!(isa.is_available(), "simd::dispatch: {isa:?} is not supported by this CPU");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            #[target_feature(enable = "avx512f")]
            fn avx512<K: Kernel>(kernel: K) -> K::Output {
                kernel.run::<x86::Avx512>()
            }
            // SAFETY: the assert above checked that this CPU has AVX-512F.
            unsafe { avx512(kernel) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => {
            #[target_feature(enable = "avx2,fma")]
            fn avx2<K: Kernel>(kernel: K) -> K::Output {
                kernel.run::<x86::Avx2>()
            }
            // SAFETY: the assert above checked that this CPU has AVX2 and FMA.
            unsafe { avx2(kernel) }
        }
        _ => kernel.run::<Baseline>(),
    }
}

/// Runs `kernel` with the fastest vector type of this CPU (detected once per process).
#[inline]
pub fn run<K: Kernel>(kernel: K) -> K::Output {
    dispatch(Isa::best(), kernel)
}

/// One input of the loops below: a slice as long as the output, or one value for every
/// element.
#[derive(Clone, Copy, Debug)]
pub enum Operand<'a> {
    /// Element `i` is `slice[i]`.
    Slice(&'a [f32]),
    /// Every element is this value.
    Splat(f32),
}

impl Operand<'_> {
    /// The vector of elements `start..start + LANES`.
    #[inline(always)]
    fn load<V: F32Vector>(self, start: usize) -> V {
        match self {
            Operand::Slice(s) => V::load(&s[start..]),
            Operand::Splat(v) => V::splat(v),
        }
    }

    /// The (fewer than `LANES`) elements from `start` to the end, padded with 1.0.
    #[inline(always)]
    fn load_tail<V: F32Vector>(self, start: usize) -> V {
        match self {
            Operand::Slice(s) => V::load_partial(&s[start..], 1.0),
            Operand::Splat(v) => V::splat(v),
        }
    }

    /// Panics unless a slice operand has exactly `len` elements.
    fn check_len(self, len: usize) {
        if let Operand::Slice(s) = self {
            assert_eq!(s.len(), len, "simd: operand and output lengths differ");
        }
    }
}

/// `dst[i] = f([input_0[i], input_1[i], ..])` a vector at a time. The tail goes through
/// the same `f` on a partial vector (padded with 1.0, a harmless input for every function
/// here), so there is no scalar remainder loop and every element is computed by the
/// same instructions.
#[inline(always)]
pub fn map<V: F32Vector, const N: usize>(inputs: [Operand; N], dst: &mut [f32], f: impl Fn([V; N]) -> V) {
    inputs.iter().for_each(|x| x.check_len(dst.len()));
    let body = dst.len() - dst.len() % V::LANES;
    let (head, tail) = dst.split_at_mut(body);
    for (i, d) in head.chunks_exact_mut(V::LANES).enumerate() {
        f(inputs.map(|x| x.load(i * V::LANES))).store(d);
    }
    if !tail.is_empty() {
        f(inputs.map(|x| x.load_tail(body))).store_partial(tail);
    }
}

/// `dst[i] = f(src[i])`: [`map`] of one slice.
#[inline(always)]
pub fn map1<V: F32Vector>(src: &[f32], dst: &mut [f32], f: impl Fn(V) -> V) {
    map([Operand::Slice(src)], dst, |[x]| f(x))
}

/// Updates `M` buffers in place, reading `N` more inputs:
/// `[buf_0[i], ..] = f([buf_0[i], ..], [input_0[i], ..])`, a vector at a time (the tail
/// as in [`map`]). Scaling a row is `M = 1, N = 0`; an optimizer step updates the
/// parameter and its state together from the gradient.
#[inline(always)]
pub fn update<V: F32Vector, const M: usize, const N: usize>(
    mut bufs: [&mut [f32]; M],
    inputs: [Operand; N],
    f: impl Fn([V; M], [V; N]) -> [V; M],
) {
    let len = bufs.first().map_or(0, |b| b.len());
    bufs.iter().for_each(|b| assert_eq!(b.len(), len, "simd::update: buffer lengths differ"));
    inputs.iter().for_each(|x| x.check_len(len));
    let body = len - len % V::LANES;
    for start in (0..body).step_by(V::LANES) {
        let new = f(bufs.each_ref().map(|b| V::load(&b[start..])), inputs.map(|x| x.load(start)));
        bufs.iter_mut().zip(new).for_each(|(b, v)| v.store(&mut b[start..]));
    }
    if body < len {
        let old = bufs.each_ref().map(|b| V::load_partial(&b[body..], 1.0));
        let new = f(old, inputs.map(|x| x.load_tail(body)));
        bufs.iter_mut().zip(new).for_each(|(b, v)| v.store_partial(&mut b[body..]));
    }
}

/// The lane mask of the first `n` lanes (`n < LANES`): which lanes of a tail are real.
#[inline(always)]
fn first_lanes<V: F32Vector>(n: usize) -> V::Mask {
    const LANE_INDEX: [f32; MAX_LANES] = [0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.];
    V::load(&LANE_INDEX).lt(V::splat(n as f32))
}

/// `K` sums at once: `sum_i f([input_0[i], ..])[k]` over `len` elements. Four sets of
/// vector accumulators hide the latency of the adds; the padded lanes of the tail are
/// masked out, so `f` may return anything there.
#[inline(always)]
pub fn sums<V: F32Vector, const N: usize, const K: usize>(
    inputs: [Operand; N],
    len: usize,
    f: impl Fn([V; N]) -> [V; K],
) -> [f32; K] {
    inputs.iter().for_each(|x| x.check_len(len));
    let zero = V::splat(0.0);
    let mut acc = [[zero; K]; 4];
    let add = |acc: &mut [V; K], terms: [V; K]| acc.iter_mut().zip(terms).for_each(|(a, t)| *a = *a + t);
    let body = len - len % V::LANES;
    let mut start = 0;
    while start + 4 * V::LANES <= body {
        for (u, a) in acc.iter_mut().enumerate() {
            add(a, f(inputs.map(|x| x.load(start + u * V::LANES))));
        }
        start += 4 * V::LANES;
    }
    while start < body {
        add(&mut acc[0], f(inputs.map(|x| x.load(start))));
        start += V::LANES;
    }
    if body < len {
        let real = first_lanes::<V>(len - body);
        add(&mut acc[1], f(inputs.map(|x| x.load_tail(body))).map(|t| V::select(real, t, zero)));
    }
    std::array::from_fn(|k| ((acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k])).reduce_add())
}

/// The largest element of a slice (`-inf` for an empty one). A NaN element may or may not
/// be returned: callers that need NaN to propagate get it from later arithmetic.
#[inline(always)]
pub fn max_of<V: F32Vector>(x: &[f32]) -> f32 {
    let mut acc = [V::splat(f32::NEG_INFINITY); 4];
    let mut blocks = x.chunks_exact(4 * V::LANES);
    for block in &mut blocks {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = a.max(V::load(&block[k * V::LANES..]));
        }
    }
    for (k, chunk) in blocks.remainder().chunks(V::LANES).enumerate() {
        acc[k] = acc[k].max(V::load_partial(chunk, f32::NEG_INFINITY));
    }
    acc[0].max(acc[1]).max(acc[2].max(acc[3])).reduce_max()
}

/// Every vector type this CPU can run, for tests: the portable [`Scalar`] plus each
/// available ISA, as `(name, isa or None for Scalar)`.
#[cfg(test)]
pub(crate) fn test_isas() -> Vec<Option<Isa>> {
    // On x86-64 `Isa::Scalar` runs `Scalar` again, so it is left out there.
    let baseline_differs = cfg!(target_arch = "aarch64");
    let mut out = vec![None];
    out.extend(
        Isa::ALL.into_iter().filter(|&isa| isa.is_available() && (isa != Isa::Scalar || baseline_differs)).map(Some),
    );
    out
}

/// Runs `kernel` with [`Scalar`] (`None`) or the given ISA, for tests.
#[cfg(test)]
pub(crate) fn run_with<K: Kernel>(isa: Option<Isa>, kernel: K) -> K::Output {
    match isa {
        None => kernel.run::<Scalar>(),
        Some(isa) => dispatch(isa, kernel),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exercises every trait method on known values, for each vector type this CPU runs.
    struct Basics;
    impl Kernel for Basics {
        type Output = ();
        #[inline(always)]
        fn run<V: F32Vector>(self) {
            let lanes: Vec<f32> = (0..V::LANES).map(|i| i as f32 - 2.5).collect();
            let x = V::load(&lanes);
            let mut out = vec![0.0; V::LANES];
            let check = |v: V, f: &dyn Fn(f32) -> f32, what: &str| {
                let mut got = vec![0.0; V::LANES];
                v.store(&mut got);
                for (g, &l) in got.iter().zip(&lanes) {
                    let want = f(l);
                    assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "{what}({l}) = {g}, want {want}");
                }
            };
            let two = V::splat(2.0);
            check(x + two, &|l| l + 2.0, "add");
            check(x - two, &|l| l - 2.0, "sub");
            check(x * two, &|l| l * 2.0, "mul");
            check(x / two, &|l| l / 2.0, "div");
            check(-x, &|l| -l, "neg");
            check(x.mul_add(two, V::splat(1.0)), &|l| l * 2.0 + 1.0, "mul_add");
            check(x.min(V::splat(0.0)), &|l| l.min(0.0), "min");
            check(x.max(V::splat(0.0)), &|l| l.max(0.0), "max");
            check(x.abs().sqrt(), &|l| l.abs().sqrt(), "sqrt");
            check(x.abs(), &|l| l.abs(), "abs");
            check(two.copysign(x), &|l| 2f32.copysign(l), "copysign");
            check(x.round(), &|l| l.round_ties_even(), "round");
            let zero = V::splat(0.0);
            let one = V::splat(1.0);
            check(V::select(x.lt(zero), one, zero), &|l| (l < 0.0) as u8 as f32, "lt");
            check(V::select(x.le(V::splat(-0.5)), one, zero), &|l| (l <= -0.5) as u8 as f32, "le");
            check(V::select(x.gt(zero), one, zero), &|l| (l > 0.0) as u8 as f32, "gt");
            check(V::select(x.ge(V::splat(-0.5)), one, zero), &|l| (l >= -0.5) as u8 as f32, "ge");
            check(V::select((x / zero).is_nan(), one, zero), &|l| (l / 0.0).is_nan() as u8 as f32, "is_nan");
            check(x.round().pow2i(), &|l| 2f32.powi(l.round_ties_even() as i32), "pow2i");
            let positive = x.abs() + V::splat(0.75);
            let (m, e) = positive.frexp();
            check(m, &|l| {
                let p = l.abs() + 0.75;
                p / 2f32.powi(p.log2().floor() as i32 + 1)
            }, "frexp mantissa");
            check(e, &|l| (l.abs() + 0.75).log2().floor() + 1.0, "frexp exponent");
            let sum: f32 = lanes.iter().sum();
            assert_eq!(x.reduce_add(), sum, "reduce_add");
            assert_eq!(x.reduce_max(), lanes[V::LANES - 1], "reduce_max");
            x.store_partial(&mut out[..1]);
            assert_eq!(out[0], lanes[0]);
            let part = V::load_partial(&lanes[..1], 7.0);
            part.store(&mut out);
            assert!(out[0] == lanes[0] && out[1..].iter().all(|&v| v == 7.0));
        }
    }

    #[test]
    fn every_vector_type_implements_the_trait_lane_by_lane() {
        for isa in test_isas() {
            run_with(isa, Basics);
        }
    }

    /// Sums, maxima and maps of lengths around every multiple of the lane count.
    struct Loops<'a>(&'a [f32]);
    impl Kernel for Loops<'_> {
        type Output = ([f32; 2], f32, Vec<f32>, Vec<f32>, Vec<f32>);
        #[inline(always)]
        fn run<V: F32Vector>(self) -> Self::Output {
            let x = self.0;
            let sums = sums::<V, 2, 2>([Operand::Slice(x), Operand::Splat(2.0)], x.len(), |[v, two]| [v * v, v * two]);
            let max = max_of::<V>(x);
            let mut doubled = vec![0.0; x.len()];
            map1::<V>(x, &mut doubled, |v| v + v);
            let mut scaled = vec![0.0; x.len()];
            map::<V, 2>([Operand::Slice(x), Operand::Splat(3.0)], &mut scaled, |[a, b]| a * b);
            let mut halved = x.to_vec();
            update::<V, 1, 0>([&mut halved], [], |[v], []| [v * V::splat(0.5)]);
            (sums, max, doubled, scaled, halved)
        }
    }

    #[test]
    fn loops_cover_bodies_and_tails_of_every_length() {
        for isa in test_isas() {
            for n in 0..70 {
                let x: Vec<f32> = (0..n).map(|i| ((i * 7) % 11) as f32 - 4.0).collect();
                let ([squares, twice], max, doubled, scaled, halved) = run_with(isa, Loops(&x));
                assert_eq!(squares, x.iter().map(|v| v * v).sum::<f32>(), "{isa:?} n={n}");
                assert_eq!(twice, x.iter().map(|v| v * 2.0).sum::<f32>(), "{isa:?} n={n}");
                assert_eq!(max, x.iter().copied().fold(f32::NEG_INFINITY, f32::max), "{isa:?} n={n}");
                assert_eq!(doubled, x.iter().map(|v| v + v).collect::<Vec<_>>());
                assert_eq!(scaled, x.iter().map(|v| v * 3.0).collect::<Vec<_>>());
                assert_eq!(halved, x.iter().map(|v| v * 0.5).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn dispatch_refuses_an_isa_this_cpu_lacks() {
        for isa in Isa::ALL.into_iter().filter(|isa| !isa.is_available()) {
            assert!(std::panic::catch_unwind(|| dispatch(isa, Basics)).is_err());
        }
    }
}

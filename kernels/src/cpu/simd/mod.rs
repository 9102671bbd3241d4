//! Explicit SIMD for f32, written once: a small vector trait ([`F32Vector`]), one
//! implementation per instruction set, and a macro that compiles a kernel for each of
//! them and runs the fastest one this CPU has.
//!
//! **The vector.** [`F32Vector`] is the handful of operations the kernels need: load,
//! store, arithmetic with `+ - * /` operators, fused multiply-add, min/max, comparisons
//! that give a lane mask and `select` on it, horizontal sums, pairs of lanes split apart
//! and back (`deinterleave`, `interleave`), and the two bit-level steps the
//! transcendental functions need (build `2^n`, split a float into mantissa and
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
//! **The kernels.** A kernel is a function defined with `kernel!`, whose body is
//! written once against a vector type `V`. The macro compiles that body once per
//! instruction set, each copy inside a `#[target_feature]` function with `V` set to the
//! ISA's vector type, and gives the function a leading `isa: Isa` argument that picks
//! the copy. Everything the body contains or calls is then compiled for that ISA:
//! closures defined in a `#[target_feature]` function inherit its features, and the
//! helpers (trait methods, the math in [`math`], the loops [`map`], [`sums`],
//! [`update`], ...) are `#[inline(always)]`. (A generic `run::<V>` method called from a
//! `#[target_feature]` wrapper would not do: its closures would be separate functions
//! compiled without the features, every intrinsic in them an out-of-line call.)
//!
//! **Detection.** The ISA is detected once per process ([`Isa::best`], shared with the
//! GEMM). On aarch64 NEON is part of the baseline target, so it is used without detection
//! whenever no x86 extension applies.
//!
//! **Safety.** Values of the AVX2 and AVX-512 vector types (and so the intrinsics called
//! on them) exist only inside kernel bodies that `kernel!` enters after asserting that
//! the CPU has the ISA: the types are `pub(crate)` only so that the macro can name them,
//! and no other code does. Each ISA file wraps every intrinsic call in one macro with
//! that argument; pointer loads and stores go through slices whose length is checked
//! first. The one exception is [`F32Vector::load_masked`], an `unsafe fn` whose caller
//! vouches for the lanes it reads (the convolution's shifted reads, which may start
//! before or end after the image for the lanes they leave out). The macro's two `unsafe`
//! calls (one per x86 ISA) are justified by its assertion.

pub mod math;
mod pair;
mod scalar;

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

pub use super::gemm::Isa;
pub use pair::Pair;
pub use scalar::Scalar;
use std::ops::{Add, Div, Mul, Neg, Sub};

/// The most lanes an ISA's [`F32Vector`] has (AVX-512; a [`Pair`] of them has twice as
/// many and loads and stores its halves itself), the size of the scratch buffer used
/// for partial loads and stores.
pub const MAX_LANES: usize = 16;

/// `1.5 * 2^23`: the float nearest `v + ROUNDING_SHIFTER`, for `|v| < 2^22`, holds
/// `round(v)` (to nearest, ties to even) in its low mantissa bits, as the integer
/// `SHIFTER_BITS + round(v)`.
pub(crate) const ROUNDING_SHIFTER: f32 = 12_582_912.0;
/// The bits of [`ROUNDING_SHIFTER`].
pub(crate) const SHIFTER_BITS: i32 = ROUNDING_SHIFTER.to_bits() as i32;

/// The table of [`F32Vector::pow2_eighths_shifted`]: the bits of `2^(j/8)` (rounded to
/// f32) less those that `m << 20` puts in the same places for `m = 8 * 127 + j`, so that
/// adding `m << 20` to entry `m mod 8` gives the bits of `2^(m/8 - 127)` with no masking.
pub(crate) const EIGHTHS: [i32; 8] = {
    let powers: [f32; 8] =
        [1.0, 1.090_507_7, 1.189_207_1, 1.296_839_6, std::f32::consts::SQRT_2, 1.542_210_8, 1.681_792_9, 1.834_008_1];
    let mut table = [0; 8];
    let mut j = 0;
    while j < 8 {
        table[j] = powers[j].to_bits() as i32 - (127 << 23) - ((j as i32) << 20);
        j += 1;
    }
    table
};

/// A vector of `LANES` f32 values and the operations the kernels are written with.
///
/// Arithmetic uses the operators (`a * b + c`); the rest are methods. Lanes are
/// independent: every operation acts lane by lane except the `reduce_*` methods.
pub trait F32Vector:
    Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> + Neg<Output = Self>
{
    /// Number of f32 lanes.
    const LANES: usize;
    /// Whether [`F32Vector::mul_add`] rounds once (a fused multiply-add), as every ISA's
    /// does but [`Scalar`]'s.
    const FUSED: bool = true;
    /// The per-lane result of a comparison.
    type Mask: Copy;
    /// The vector to compute long dependent chains on (the functions of [`math`]):
    /// [`Pair<Self>`] where interleaving two chains was measured faster, else `Self`.
    /// AVX2 on Zen 3: GELU 10-16%, tanh 14%, sigmoid 18%, exp 3% faster per value (from
    /// L2, one thread, same-process A/B). AVX-512 and NEON were not measured (no such
    /// machine at hand) and keep `Self`.
    type Wide: F32Vector;

    /// Every lane equal to `value`.
    fn splat(value: f32) -> Self;
    /// Loads `src[..LANES]`. Panics if `src` is shorter.
    fn load(src: &[f32]) -> Self;
    /// Stores into `dst[..LANES]`. Panics if `dst` is shorter.
    fn store(self, dst: &mut [f32]);
    /// `self * b + c`, rounded once where the ISA has fused multiply-add (all but
    /// [`Scalar`], which rounds twice rather than call a slow software `fmaf`; see
    /// [`F32Vector::FUSED`]).
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// Lane-wise minimum. A lane where either input is NaN gets `other` or NaN (which
    /// depends on the ISA), so NaN wherever `other` is NaN: `V::splat(c).min(x)` clamps
    /// `x` from above and keeps its NaNs; `x.min(V::splat(c))` may not.
    fn min(self, other: Self) -> Self;
    /// Lane-wise maximum, with the same NaN rule as [`F32Vector::min`]: NaN wherever
    /// `other` is NaN.
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
    /// `2^(m - 127)` for lanes holding `ROUNDING_SHIFTER + m` with an integer `m <= 254`
    /// (the sum that rounds `m`, see `ROUNDING_SHIFTER`), made from the bits directly:
    /// `m` is already where the exponent field goes once shifted by 23 bits. Lanes with
    /// `m <= 0` (and NaN lanes) give `0`.
    fn pow2_shifted(self) -> Self;
    /// `2^(m/8 - 127)` for lanes holding `ROUNDING_SHIFTER + m` with an integer
    /// `m < 2040` (the sum that rounds `m`): `2^(j/8)`, `j = m mod 8`, from a table of
    /// eight (`EIGHTHS`), with `m / 8` added to its exponent field. Lanes with `m <= 0`
    /// (and NaN lanes) give 0; those with `0 < m < 8`, whose results are under the
    /// normal range, are within `2^-127` of them.
    fn pow2_eighths_shifted(self) -> Self;

    /// `self * 2^n` (C's `ldexp`) for lanes of `n` holding integers in `[-252, 254]`,
    /// rounded once wherever `self * 2^(n/2)` is a normal float (as it is for the
    /// reduced arguments of `exp`): results under the normal range come out subnormal or
    /// 0, results over it inf. AVX-512 has this as one instruction (`vscalefps`); the
    /// other ISAs multiply by the two normal powers of two `2^(n/2)` and `2^(n - n/2)`.
    #[inline(always)]
    fn ldexp(self, n: Self) -> Self {
        let half = (n * Self::splat(0.5)).round();
        self * half.pow2i() * (n - half).pow2i()
    }

    /// The mask with lane `l` set where bit `l` of `bits` is (bits from `LANES` on are
    /// ignored).
    fn mask_from_bits(bits: u32) -> Self::Mask;

    /// Loads lane `l` from `src.wrapping_add(l)` for the lanes set in `mask` and gives 0
    /// in the others, which are not read (so they may lie outside any allocation): the
    /// shifted, zero-padded reads of a convolution's implicit GEMM. One instruction on
    /// AVX-512 (`vmovups` with a zeroing mask) and AVX2 (`vmaskmovps`).
    ///
    /// # Safety
    /// For every lane `l` set in `mask`, `src.wrapping_add(l)` must be valid for reading
    /// an f32.
    unsafe fn load_masked(src: *const f32, mask: Self::Mask) -> Self;

    /// The `2 * LANES` values of `self` followed by `next`, split into those at even and
    /// those at odd positions: `([v0, v2, ..], [v1, v3, ..])`. Reads pairs of columns,
    /// as Winograd's patches do (`conv_winograd.rs`). [`F32Vector::interleave`] undoes it.
    fn deinterleave(self, next: Self) -> (Self, Self);

    /// The lanes of `self` and `other` alternated, `[a0, b0, a1, b1, ..]`, as two vectors
    /// (the first `LANES` values, then the rest): the inverse of
    /// [`F32Vector::deinterleave`].
    fn interleave(self, other: Self) -> (Self, Self);

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

/// [`F32Vector::Wide`] of `V`: what the kernels compute the functions of [`math`] on.
pub type Wide<V> = <V as F32Vector>::Wide;

/// The vector type used when no x86 extension is available: NEON on aarch64, where every
/// CPU has it, else [`Scalar`].
#[cfg(target_arch = "aarch64")]
pub(crate) type Baseline = neon::Neon;
#[cfg(not(target_arch = "aarch64"))]
pub(crate) type Baseline = Scalar;

/// Defines a SIMD kernel: a function whose body is written once against a vector type
/// `V: F32Vector` and compiled once per instruction set.
///
/// ```ignore
/// kernel! {
///     /// `dst = 2 * src`.
///     fn double(src: &[f32], dst: &mut [f32]) {
///         map1::<V>(src, dst, |x| x + x)
///     }
/// }
/// double(Isa::best(), &src, &mut dst);
/// ```
///
/// The function takes a leading `isa: Isa` argument (usually [`Isa::best`]) and panics if
/// this CPU does not support it. Each copy of the body is the body of a
/// `#[target_feature]` function in which `V` is that ISA's vector type ([`Scalar`] or
/// NEON for `Isa::Scalar`), so the body, its closures and the `#[inline(always)]`
/// helpers it calls are all compiled with the ISA's instructions.
macro_rules! kernel {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name(isa: $crate::cpu::simd::Isa, $($arg: $ty),*) $(-> $ret)? {
            assert!(isa.is_available(), "{}: {isa:?} is not supported by this CPU", stringify!($name));
            match isa {
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::simd::Isa::Avx512 => {
                    #[target_feature(enable = "avx512f")]
                    fn avx512($($arg: $ty),*) $(-> $ret)? {
                        type V = $crate::cpu::simd::x86::Avx512;
                        $body
                    }
                    // SAFETY: asserted above that this CPU has AVX-512F.
                    unsafe { avx512($($arg),*) }
                }
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::simd::Isa::Avx2Fma => {
                    #[target_feature(enable = "avx2,fma")]
                    fn avx2($($arg: $ty),*) $(-> $ret)? {
                        type V = $crate::cpu::simd::x86::Avx2;
                        $body
                    }
                    // SAFETY: asserted above that this CPU has AVX2 and FMA.
                    unsafe { avx2($($arg),*) }
                }
                _ => {
                    fn baseline($($arg: $ty),*) $(-> $ret)? {
                        type V = $crate::cpu::simd::Baseline;
                        $body
                    }
                    baseline($($arg),*)
                }
            }
        }
    };
}
pub(crate) use kernel;

/// Asks for the cache line of `value` ahead of a read or write of it (the first store to
/// an output line that is not in cache otherwise stalls on it). A prefetch never faults;
/// nothing is done off x86-64.
#[inline(always)]
pub fn prefetch(value: &f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint: it never faults and changes no memory.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>((value as *const f32).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// [`prefetch`] of every cache line (64 bytes) of `values`.
#[inline(always)]
pub fn prefetch_lines(values: &[f32]) {
    values.iter().step_by(16).for_each(prefetch);
}

kernel! {
    /// The ISA's vector width, in f32 lanes.
    pub fn vector_lanes() -> usize {
        V::LANES
    }
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

/// The vectors of `inputs` at element `start`: full vectors, or the tail padded with 1.0.
///
/// (The loops below build their arrays with `for` loops rather than `array::map`: a
/// closure written here would be compiled without the kernel's target features.)
#[inline(always)]
fn load_all<V: F32Vector, const N: usize>(inputs: &[Operand; N], start: usize, tail: bool) -> [V; N] {
    let mut out = [V::splat(0.0); N];
    for k in 0..N {
        out[k] = if tail { inputs[k].load_tail(start) } else { inputs[k].load(start) };
    }
    out
}

/// The vectors of `inputs` at `start`, `start + LANES`, .. (`U` of each), every slice cut
/// once for all `U`: one bounds check per operand rather than two per vector. Against a
/// [`load_all`] per vector (a build that also carried a non-temporal-store path, switched
/// off), AVX-512 on Zen 4, (64, 1024) from L2, one thread, cycles in the kernel over the
/// cycles of a copy of the same bytes in the same run (perf, four alternated runs):
/// LayerNorm 2.60-2.97 -> 2.21-2.40, log-softmax 4.09-4.45 -> 3.49-4.15; from memory,
/// (4096, 1024), LayerNorm 1.28-1.40 -> 1.30-1.37.
#[inline(always)]
fn load_block<V: F32Vector, const N: usize, const U: usize>(inputs: &[Operand; N], start: usize) -> [[V; N]; U] {
    let mut out = [[V::splat(0.0); N]; U];
    for k in 0..N {
        match inputs[k] {
            Operand::Slice(s) => {
                let block = &s[start..start + U * V::LANES];
                for (u, vectors) in out.iter_mut().enumerate() {
                    vectors[k] = V::load(&block[u * V::LANES..]);
                }
            }
            Operand::Splat(v) => {
                for vectors in &mut out {
                    vectors[k] = V::splat(v);
                }
            }
        }
    }
    out
}

/// Panics unless every slice input has `len` elements.
#[inline(always)]
fn check_lens<const N: usize>(inputs: &[Operand; N], len: usize) {
    for x in inputs {
        x.check_len(len);
    }
}

/// `dst[i] = f([input_0[i], input_1[i], ..])` a vector at a time. The tail goes through
/// the same `f` on a partial vector (padded with 1.0, a harmless input for every function
/// here), so there is no scalar remainder loop and every element is computed by the
/// same instructions.
///
/// Like [`sums`] and [`update`], it compiles its loop twice: for any operands, and for
/// slices only (see `all_slices`).
#[inline(always)]
pub fn map<V: F32Vector, const N: usize>(inputs: [Operand; N], dst: &mut [f32], f: impl Fn([V; N]) -> V) {
    map_alongside(inputs, dst, f, &[], |_| ());
}

/// [`map`] with a side job on another row: `side(v)` is given each whole vector of
/// `next` in turn, beside the vector of `dst` at the same place. `next` is as long as
/// `dst` or empty (no side job); its last `len % LANES` values are left to the caller
/// ([`tail_vector`]). [`map`] passes no row and runs as fast as the loop did before it had
/// a side job (`a * b + c` of three slices, AVX-512 on a Xeon, one thread, alternated
/// runs, median ns per value from L1, L2 and memory: before 0.081, 0.144, 0.664; after
/// 0.081, 0.145, 0.661).
///
/// Softmax takes the max of each row in a first pass that reads the row from memory,
/// then works on it from L1. Done in turn, the first pass waits on memory with little to
/// compute and the later passes compute with no reads in flight; given the first pass
/// over the next row as the side job of its last pass over this one, the kernel overlaps
/// the two (the figures are in the softmax module's doc). The side job must run beside
/// the stores, vector by vector: the same work in a separate loop after the pass, or in
/// blocks of four vectors each pass its own loop, was no faster than no pipelining; and
/// its vectors come from zipped chunks, not by index (indexing either row lost 3-7% to
/// the bounds checks, same-process A/B; [`update_alongside`]'s loop asking for the next
/// vector with a branch, as this one does so that [`map`] can pass no row, lost 8-14%,
/// and log-softmax, the user of this one, was not measured apart). LayerNorm's and
/// RMSNorm's long rows take the next row's statistics as the side job of their output pass
/// (one-pass Welford states: LayerNorm 25-30% faster, RMSNorm 4-15%, figures in `norm`); an
/// earlier try with only the next row's mean as the side job, its variance from L1, was
/// within the noise.
///
/// The side job's loads come before the stores beside them. The next row's vector at
/// `j` lies `(input start - output start) + 4n` bytes after this row's output at `j`:
/// when both buffers are large allocations (which start at the same offset within a
/// page) and a row is a multiple of 1024 values, the two addresses agree in their low 12
/// bits, and a load issued after a store that matches it there waits on that store ("4K
/// aliasing") even though they do not overlap. Loaded first, AVX-512 on Zen 4,
/// (64, 1024) from L2, one thread, cycles in the kernel (perf, fixed-period samples, three
/// runs each; LayerNorm six): LayerNorm 7350-9110 -> 6400-6880 samples, softmax
/// 12520-14530 -> 10680-14780, log-softmax 11960-12690 -> 10950-11590; (4096, 1024) from memory:
/// log-softmax 6080-6960 -> 4870-6550, softmax 4160-4400 -> 3700-4280, LayerNorm the same.
/// With the input moved 1 KB against the output (the aliasing store is then one written
/// 48 stores earlier, presumably still in the store queue), LayerNorm from L2 went
/// 6460-6600 -> 6850-7680: the order suits buffers at the same page offset, as fresh
/// tensors are.
#[inline(always)]
pub fn map_alongside<V: F32Vector, const N: usize>(
    inputs: [Operand; N],
    dst: &mut [f32],
    f: impl Fn([V; N]) -> V,
    next: &[f32],
    side: impl FnMut(V),
) {
    check_lens(&inputs, dst.len());
    assert!(next.is_empty() || next.len() == dst.len(), "simd: the next row's length differs");
    match all_slices(&inputs) {
        Some(slices) => map_loop(slices, dst, f, next, side),
        None => map_loop(inputs, dst, f, next, side),
    }
}

/// `buf[i] = f(buf[i])` in place, with [`map_alongside`]'s side job on `next` (here
/// always as long as `buf`: a kernel's last row can give itself as its next).
#[inline(always)]
pub fn update_alongside<V: F32Vector>(buf: &mut [f32], f: impl Fn(V) -> V, next: &[f32], mut side: impl FnMut(V)) {
    assert_eq!(next.len(), buf.len(), "simd: the next row's length differs");
    let body = buf.len() - buf.len() % V::LANES;
    let (head, tail) = buf.split_at_mut(body);
    for (b, v) in head.chunks_exact_mut(V::LANES).zip(next.chunks_exact(V::LANES)) {
        // The side job's load before the store (see `map_alongside`).
        let v = V::load(v);
        f(V::load(b)).store(b);
        side(v);
    }
    if !tail.is_empty() {
        f(V::load_partial(tail, 1.0)).store_partial(tail);
    }
}

/// The last `len % LANES` values of `row` as a vector, the other lanes set to `pad`: what
/// the side job of [`map_alongside`] and [`update_alongside`] leaves out (`pad` is a
/// value that does not change the statistic: `-inf` for a max, 0 for a sum).
#[inline(always)]
pub fn tail_vector<V: F32Vector>(row: &[f32], pad: f32) -> V {
    V::load_partial(&row[row.len() - row.len() % V::LANES..], pad)
}

/// `inputs` rebuilt as slice operands where every one is a slice. A loop given these
/// knows every operand's kind where it is compiled, so no load matches on it: with
/// slices only (the common case) [`map`], [`sums`] and [`update`] run such a copy of
/// their loop. LayerNorm's last pass (weight and bias each a slice or a splat, known only
/// at run time) ran 8-12% faster per value (same-process A/B, AVX2 on Zen 3); an
/// addition of two slices changed by -1% to +5%, within the runs' noise.
#[inline(always)]
fn all_slices<'a, const N: usize>(inputs: &[Operand<'a>; N]) -> Option<[Operand<'a>; N]> {
    let mut slices = [Operand::Splat(0.0); N];
    for k in 0..N {
        match inputs[k] {
            Operand::Slice(s) => slices[k] = Operand::Slice(s),
            Operand::Splat(_) => return None,
        }
    }
    Some(slices)
}

/// The loop of [`map`], on operands of checked lengths.
#[inline(always)]
fn map_loop<V: F32Vector, const N: usize>(
    inputs: [Operand; N],
    dst: &mut [f32],
    f: impl Fn([V; N]) -> V,
    next: &[f32],
    mut side: impl FnMut(V),
) {
    let body = dst.len() - dst.len() % V::LANES;
    let (head, tail) = dst.split_at_mut(body);
    // Two vectors per iteration, as in `map1_sum`.
    let mut pairs = head.chunks_exact_mut(2 * V::LANES);
    let mut next_pairs = next.chunks_exact(2 * V::LANES);
    for (i, d) in (&mut pairs).enumerate() {
        let start = 2 * i * V::LANES;
        // The side job's loads before this pair's stores (see `map_alongside`); a
        // `match`, since a closure given to `Option::map` would be compiled without the
        // kernel's target features (see `load_all`).
        #[allow(clippy::manual_map)]
        let side_pair = match next_pairs.next() {
            Some(v) => Some((V::load(v), V::load(&v[V::LANES..]))),
            None => None,
        };
        let [x0, x1] = load_block::<V, N, 2>(&inputs, start);
        let (y0, y1) = (f(x0), f(x1));
        y0.store(d);
        y1.store(&mut d[V::LANES..]);
        if let Some((v0, v1)) = side_pair {
            side(v0);
            side(v1);
        }
    }
    let single = pairs.into_remainder();
    if !single.is_empty() {
        f(load_all(&inputs, body - V::LANES, false)).store(single);
        if !next.is_empty() {
            side(V::load(&next[body - V::LANES..]));
        }
    }
    if !tail.is_empty() {
        f(load_all(&inputs, body, true)).store_partial(tail);
    }
}

/// `dst[i] = f(src[i])`: [`map`] of one slice, written out so that `f` takes a plain
/// vector (`map1(src, dst, |x| math::exp(x))`; pass a closure, not the function item
/// `math::exp`, whose call shim would be compiled without the kernel's target features).
/// It is [`map1_sum`] with the sum unused, which the compiler removes once inlined.
#[inline(always)]
pub fn map1<V: F32Vector>(src: &[f32], dst: &mut [f32], f: impl Fn(V) -> V) {
    map1_sum(src, dst, f);
}

/// `dst[i] = f(src[i])` and the sum of the results in one pass (a softmax writing its
/// exponentials while it sums them); the padded lanes of the tail are left out of the sum.
/// The sum is returned lane by lane (`reduce_add` totals it), so that a caller that
/// sums a row piece by piece reduces across the lanes once: a reduction per softmax
/// piece of 256 values took a tenth of its samples in `perf`, and without it softmax
/// (rows in L2) takes 0.234 ns a value instead of 0.248 on (64, 1024), 0.233 instead of
/// 0.246 on (256, 1024) (one thread, AVX-512 on Zen 4, median of three runs of each build
/// alternated).
///
/// Two vectors per iteration: the functions are long dependency chains (a polynomial by
/// Horner's rule), and two independent chains side by side keep more of the FMA units
/// busy (GELU 10% faster on Zen 1).
#[inline(always)]
pub fn map1_sum<V: F32Vector>(src: &[f32], dst: &mut [f32], f: impl Fn(V) -> V) -> V {
    assert_eq!(src.len(), dst.len(), "simd: operand and output lengths differ");
    let zero = V::splat(0.0);
    let (mut acc0, mut acc1) = (zero, zero);
    let mut src_pairs = src.chunks_exact(2 * V::LANES);
    let mut dst_pairs = dst.chunks_exact_mut(2 * V::LANES);
    for (s, d) in (&mut src_pairs).zip(&mut dst_pairs) {
        let (y0, y1) = (f(V::load(s)), f(V::load(&s[V::LANES..])));
        y0.store(d);
        y1.store(&mut d[V::LANES..]);
        (acc0, acc1) = (acc0 + y0, acc1 + y1);
    }
    let (src, dst) = (src_pairs.remainder(), dst_pairs.into_remainder());
    let mut src_chunks = src.chunks_exact(V::LANES);
    let mut dst_chunks = dst.chunks_exact_mut(V::LANES);
    for (s, d) in (&mut src_chunks).zip(&mut dst_chunks) {
        let y = f(V::load(s));
        y.store(d);
        acc0 = acc0 + y;
    }
    let (s, d) = (src_chunks.remainder(), dst_chunks.into_remainder());
    if !s.is_empty() {
        let y = f(V::load_partial(s, 1.0));
        y.store_partial(d);
        acc1 = acc1 + V::select(first_lanes::<V>(s.len()), y, zero);
    }
    acc0 + acc1
}

/// Updates `M` buffers in place, reading `N` more inputs:
/// `[buf_0[i], ..] = f([buf_0[i], ..], [input_0[i], ..])`, a vector at a time (the tail
/// as in [`map`]). Scaling a row is `M = 1, N = 0`; an optimizer step updates the
/// parameter and its state together from the gradient.
#[inline(always)]
pub fn update<V: F32Vector, const M: usize, const N: usize>(
    bufs: [&mut [f32]; M],
    inputs: [Operand; N],
    f: impl Fn([V; M], [V; N]) -> [V; M],
) {
    let len = if M == 0 { 0 } else { bufs[0].len() };
    for b in &bufs {
        assert_eq!(b.len(), len, "simd::update: buffer lengths differ");
    }
    check_lens(&inputs, len);
    match all_slices(&inputs) {
        Some(slices) => update_loop(bufs, slices, f),
        None => update_loop(bufs, inputs, f),
    }
}

/// The loop of [`update`], on buffers and operands of checked lengths: the whole vectors,
/// then the tail. (Written as one loop that asked at every vector whether it had reached
/// the tail, it compiled to a dozen instructions of bookkeeping around each multiply:
/// softmax's scaling pass took a fifth of its time. Split, same-process A/B with AVX2 on
/// Zen 3: softmax of (4096, 1024) 3.23-3.43 -> 2.39-2.63 ms at one thread, 1.42-1.52 ->
/// 1.22-1.32 at two; an f32 Adam step from L2 0.85-0.90 -> 0.61 ns per parameter.)
#[inline(always)]
fn update_loop<V: F32Vector, const M: usize, const N: usize>(
    mut bufs: [&mut [f32]; M],
    inputs: [Operand; N],
    f: impl Fn([V; M], [V; N]) -> [V; M],
) {
    let len = if M == 0 { 0 } else { bufs[0].len() };
    let body = len - len % V::LANES;
    for start in (0..body).step_by(V::LANES) {
        update_at(&mut bufs, &inputs, start, false, &f);
    }
    if body < len {
        update_at(&mut bufs, &inputs, body, true, &f);
    }
}

/// One step of [`update_loop`]: the vector at `start`, or the `tail` from `start` on
/// (a separate call, so that the loop over whole vectors has no branch on it).
#[inline(always)]
fn update_at<V: F32Vector, const M: usize, const N: usize>(
    bufs: &mut [&mut [f32]; M],
    inputs: &[Operand; N],
    start: usize,
    tail: bool,
    f: &impl Fn([V; M], [V; N]) -> [V; M],
) {
    let mut old = [V::splat(0.0); M];
    for k in 0..M {
        old[k] = if tail { V::load_partial(&bufs[k][start..], 1.0) } else { V::load(&bufs[k][start..]) };
    }
    let new = f(old, load_all(inputs, start, tail));
    for k in 0..M {
        if tail { new[k].store_partial(&mut bufs[k][start..]) } else { new[k].store(&mut bufs[k][start..]) }
    }
}

/// The lane mask of the first `n` lanes (`n < LANES`): which lanes of a tail are real.
#[inline(always)]
fn first_lanes<V: F32Vector>(n: usize) -> V::Mask {
    lane_indices::<V>().lt(V::splat(n as f32))
}

/// The vector `[0, 1, .., LANES - 1]`.
#[inline(always)]
pub fn lane_indices<V: F32Vector>() -> V {
    // Lane indices for vectors of up to a `Pair` of the widest vector.
    const LANE_INDEX: [f32; 2 * MAX_LANES] = {
        let mut index = [0.0; 2 * MAX_LANES];
        let mut i = 0;
        while i < index.len() {
            index[i] = i as f32;
            i += 1;
        }
        index
    };
    V::load(&LANE_INDEX)
}

/// `acc[k] += terms[k]` for every `k`.
#[inline(always)]
fn accumulate<V: F32Vector, const K: usize>(acc: &mut [V; K], terms: [V; K]) {
    for k in 0..K {
        acc[k] = acc[k] + terms[k];
    }
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
    check_lens(&inputs, len);
    match all_slices(&inputs) {
        Some(slices) => sums_loop(slices, len, f),
        None => sums_loop(inputs, len, f),
    }
}

/// The loop of [`sums`], on operands of checked lengths.
#[inline(always)]
fn sums_loop<V: F32Vector, const N: usize, const K: usize>(
    inputs: [Operand; N],
    len: usize,
    f: impl Fn([V; N]) -> [V; K],
) -> [f32; K] {
    let zero = V::splat(0.0);
    let mut acc = [[zero; K]; 4];
    let body = len - len % V::LANES;
    let mut start = 0;
    while start + 4 * V::LANES <= body {
        for (a, x) in acc.iter_mut().zip(load_block::<V, N, 4>(&inputs, start)) {
            accumulate(a, f(x));
        }
        start += 4 * V::LANES;
    }
    while start < body {
        accumulate(&mut acc[0], f(load_all(&inputs, start, false)));
        start += V::LANES;
    }
    if body < len {
        let real = first_lanes::<V>(len - body);
        let mut terms = f(load_all(&inputs, body, true));
        for t in &mut terms {
            *t = V::select(real, *t, zero);
        }
        accumulate(&mut acc[1], terms);
    }
    let mut out = [0.0; K];
    for k in 0..K {
        out[k] = ((acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k])).reduce_add();
    }
    out
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

/// Every ISA this CPU can run, for tests (on x86-64 `Isa::Scalar` runs [`Scalar`]).
#[cfg(test)]
pub(crate) fn test_isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|isa| isa.is_available()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    kernel! {
        /// [`basics_of`] the ISA's vector and a [`Pair`] of them.
        fn basics() {
            basics_of::<V>();
            basics_of::<Pair<V>>();
        }
    }

    /// Exercises every trait method on known values. (Generic, so compiled without the
    /// ISA's target features: slower, but the same results.)
    fn basics_of<V: F32Vector>() {
        let lanes: Vec<f32> = (0..V::LANES).map(|i| i as f32 - 2.5).collect();
        let x = V::load(&lanes);
        let mut out = vec![0.0; V::LANES];
        let check = |v: V, f: &dyn Fn(f32) -> f32, what: &str| {
            let mut got = vec![0.0; V::LANES];
            v.store(&mut got);
            for (g, &l) in got.iter().zip(&lanes) {
                let want = f(l);
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{what}({l}) = {g}, want {want}"
                );
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
        // NaN in `other` gives NaN, on every ISA: `splat(c).max(x)` clamps and keeps NaNs.
        let nan_where_negative = V::select(x.lt(zero), V::splat(f32::NAN), x);
        check(zero.max(nan_where_negative), &|l| if l < 0.0 { f32::NAN } else { l }, "max keeping NaN");
        check(zero.min(nan_where_negative), &|l| if l < 0.0 { f32::NAN } else { 0.0 }, "min keeping NaN");
        // m = first + lane: 2^(m - 127), or 0 for m <= 0. The last `first` puts the top
        // lane at m = 254, the largest the contract allows, whatever the width.
        for first in [-40, -8, -1, 0, 1, 100, 127, 255 - V::LANES as i32] {
            let shifted = (x + V::splat(2.5)) + V::splat(ROUNDING_SHIFTER + first as f32);
            let want = |l: f32| {
                let m = first + (l + 2.5) as i32;
                if m <= 0 { 0.0 } else { (2f64.powi(m - 127)) as f32 }
            };
            check(shifted.pow2_shifted(), &want, "pow2_shifted");
        }
        check(V::splat(f32::NAN).pow2_shifted(), &|_| 0.0, "pow2_shifted of NaN");
        // m = first + lane: 2^(j/8) rounded to f32, times 2^(m/8 - 127 - j/8) exactly
        // (j = m mod 8), or 0 for m <= 0; for 0 < m < 8, within 2^-127 of 2^(m/8 - 127).
        for first in [-40, -7, 8, 100, 1016, 2040 - V::LANES as i32] {
            let shifted = (x + V::splat(2.5)) + V::splat(ROUNDING_SHIFTER + first as f32);
            let mut got = vec![0.0; V::LANES];
            shifted.pow2_eighths_shifted().store(&mut got);
            for (l, g) in got.into_iter().enumerate() {
                let m = first + l as i32;
                let power = 2f64.powf(m.rem_euclid(8) as f64 / 8.0) as f32 as f64;
                let want = if m <= 0 { 0.0 } else { power * 2f64.powi(m.div_euclid(8) - 127) };
                let close =
                    if (1..8).contains(&m) { (g as f64 - want).abs() <= 2f64.powi(-127) } else { g as f64 == want };
                assert!(close, "pow2_eighths_shifted at m = {m}: {g:e}, want {want:e}");
            }
        }
        check(V::splat(f32::NAN).pow2_eighths_shifted(), &|_| 0.0, "pow2_eighths_shifted of NaN");
        for bits in [0u32, 1, 0b1011_0110_0101_1001, u32::MAX, 1 << (V::LANES - 1)] {
            let mask = V::mask_from_bits(bits);
            check(V::select(mask, one, zero), &|l| (bits >> (l + 2.5) as u32 & 1) as f32, "mask_from_bits");
            // SAFETY: every lane of `lanes` is readable.
            let loaded = unsafe { V::load_masked(lanes.as_ptr(), mask) };
            check(loaded, &|l| if bits >> (l + 2.5) as u32 & 1 == 1 { l } else { 0.0 }, "load_masked");
        }
        // Lanes outside the mask are not read: one value at the end of its allocation.
        let last = Box::new(7.0f32);
        // SAFETY: lane 0, the only one set, is `*last`.
        let loaded = unsafe { V::load_masked(&*last, V::mask_from_bits(1)) };
        check(loaded, &|l| if l == -2.5 { 7.0 } else { 0.0 }, "load_masked at the end");
        // Results across the whole range: normal, subnormal (rounded once), 0 and inf.
        for n in [-252, -160, -149, -140, -127, -126, -1, 0, 1, 127, 128, 200, 254] {
            let scale = |l: f32| ((l + 0.1) as f64 * 2f64.powi(n)) as f32;
            check((x + V::splat(0.1)).ldexp(V::splat(n as f32)), &scale, "ldexp");
        }
        let positive = x.abs() + V::splat(0.75);
        let (m, e) = positive.frexp();
        check(
            m,
            &|l| {
                let p = l.abs() + 0.75;
                p / 2f32.powi(p.log2().floor() as i32 + 1)
            },
            "frexp mantissa",
        );
        check(e, &|l| (l.abs() + 0.75).log2().floor() + 1.0, "frexp exponent");
        // Pairs apart and back: `x` then `x + 100` as one sequence of `2 * LANES` values.
        let next = x + V::splat(100.0);
        let sequence: Vec<f32> =
            lanes.iter().chain(&lanes.iter().map(|l| l + 100.0).collect::<Vec<_>>()).copied().collect();
        let (evens, odds) = x.deinterleave(next);
        check(evens, &|l| sequence[2 * (l + 2.5) as usize], "deinterleave (evens)");
        check(odds, &|l| sequence[2 * (l + 2.5) as usize + 1], "deinterleave (odds)");
        let (first, second) = evens.interleave(odds);
        check(first, &|l| l, "interleave (first half)");
        check(second, &|l| l + 100.0, "interleave (second half)");
        let sum: f32 = lanes.iter().sum();
        assert_eq!(x.reduce_add(), sum, "reduce_add");
        assert_eq!(x.reduce_max(), lanes[V::LANES - 1], "reduce_max");
        x.store_partial(&mut out[..1]);
        assert_eq!(out[0], lanes[0]);
        let part = V::load_partial(&lanes[..1], 7.0);
        part.store(&mut out);
        assert!(out[0] == lanes[0] && out[1..].iter().all(|&v| v == 7.0));
        // A partial load or store that reaches into a Pair's second half.
        let many = &lanes[..V::LANES - 1];
        V::load_partial(many, 7.0).store(&mut out);
        assert!(out[..V::LANES - 1] == *many && out[V::LANES - 1] == 7.0);
        let mut stored = vec![0.0; V::LANES - 1];
        x.store_partial(&mut stored);
        assert_eq!(stored, many);
    }

    #[test]
    fn every_vector_type_implements_the_trait_lane_by_lane() {
        for isa in test_isas() {
            basics(isa);
        }
    }

    /// What [`loops`] computes: each loop with a splat operand (its general copy) and with
    /// slices only (its copy for slices, see `all_slices`).
    struct LoopResults {
        sums_with_splat: [f32; 2],
        sums_of_slices: [f32; 2],
        max: f32,
        doubled: Vec<f32>,
        map_with_splat: Vec<f32>,
        map_of_slices: Vec<f32>,
        update_from_splat: Vec<f32>,
        update_from_slice: Vec<f32>,
        /// [`map_alongside`]'s output, and the max of the next row from its side job.
        map_alongside: (Vec<f32>, f32),
        /// [`update_alongside`]'s output, and the max of the next row from its side job.
        update_alongside: (Vec<f32>, f32),
    }

    kernel! {
        /// [`loops_of`] on the ISA's vector, or on a [`Pair`] of them.
        fn loops(x: &[f32], paired: bool) -> LoopResults {
            if paired { loops_of::<Pair<V>>(x) } else { loops_of::<V>(x) }
        }
    }

    /// Sums, maxima and maps of `x` (lengths around every multiple of the lane count).
    fn loops_of<V: F32Vector>(x: &[f32]) -> LoopResults {
        let (len, two) = (x.len(), Operand::Splat(2.0));
        // A second slice, so that swapped operands show.
        let y: Vec<f32> = x.iter().map(|v| v + 1.0).collect();
        let (x_slice, y_slice) = (Operand::Slice(x), Operand::Slice(&y));
        let sums_with_splat = sums::<V, 2, 2>([Operand::Slice(x), two], len, |[v, two]| [v * v, v * two]);
        let sums_of_slices = sums::<V, 2, 2>([x_slice, y_slice], len, |[a, b]| [a * b, a - b]);
        let mut doubled = vec![0.0; len];
        map1::<V>(x, &mut doubled, |v| v + v);
        let mut map_with_splat = vec![0.0; len];
        map::<V, 2>([Operand::Slice(x), Operand::Splat(3.0)], &mut map_with_splat, |[a, b]| a * b);
        let mut map_of_slices = vec![0.0; len];
        map::<V, 2>([x_slice, y_slice], &mut map_of_slices, |[a, b]| a * a - b);
        let mut update_from_splat = x.to_vec();
        update::<V, 1, 1>([&mut update_from_splat], [Operand::Splat(0.5)], |[v], [h]| [v * h]);
        let mut update_from_slice = x.to_vec();
        update::<V, 1, 1>([&mut update_from_slice], [y_slice], |[v], [w]| [v - w]);
        // The side jobs take the max of another row; `tail_vector` adds what they leave.
        let next: Vec<f32> = x.iter().rev().map(|v| v * 2.0 + 0.5).collect();
        let finish_max = |max: V| max.max(tail_vector::<V>(&next, f32::NEG_INFINITY)).reduce_max();
        let (mut map_out, mut map_max) = (vec![0.0; len], V::splat(f32::NEG_INFINITY));
        map_alongside::<V, 2>([x_slice, y_slice], &mut map_out, |[a, b]| a * b, &next, |v| map_max = map_max.max(v));
        let (mut update_out, mut update_max) = (x.to_vec(), V::splat(f32::NEG_INFINITY));
        update_alongside::<V>(&mut update_out, |v| v * V::splat(0.5), &next, |v| update_max = update_max.max(v));
        LoopResults {
            sums_with_splat,
            sums_of_slices,
            max: max_of::<V>(x),
            doubled,
            map_with_splat,
            map_of_slices,
            update_from_splat,
            update_from_slice,
            map_alongside: (map_out, finish_max(map_max)),
            update_alongside: (update_out, finish_max(update_max)),
        }
    }

    #[test]
    fn loops_cover_bodies_and_tails_of_every_length() {
        for (isa, paired) in test_isas().into_iter().flat_map(|isa| [(isa, false), (isa, true)]) {
            for n in 0..70 {
                let x: Vec<f32> = (0..n).map(|i| ((i * 7) % 11) as f32 - 4.0).collect();
                let got = loops(isa, &x, paired);
                let sum = |f: &dyn Fn(f32) -> f32| x.iter().map(|&v| f(v)).sum::<f32>();
                let each = |f: &dyn Fn(f32) -> f32| x.iter().map(|&v| f(v)).collect::<Vec<_>>();
                let at = format!("{isa:?} paired={paired} n={n}");
                assert_eq!(got.sums_with_splat, [sum(&|v| v * v), sum(&|v| v * 2.0)], "{at}");
                assert_eq!(got.sums_of_slices, [sum(&|v| v * (v + 1.0)), sum(&|v| v - (v + 1.0))], "{at}");
                assert_eq!(got.max, x.iter().copied().fold(f32::NEG_INFINITY, f32::max), "{at}");
                assert_eq!(got.doubled, each(&|v| v + v), "{at}");
                assert_eq!(got.map_with_splat, each(&|v| v * 3.0), "{at}");
                assert_eq!(got.map_of_slices, each(&|v| v * v - (v + 1.0)), "{at}");
                assert_eq!(got.update_from_splat, each(&|v| v * 0.5), "{at}");
                assert_eq!(got.update_from_slice, each(&|v| v - (v + 1.0)), "{at}");
                let next_max = x.iter().map(|v| v * 2.0 + 0.5).fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(got.map_alongside, (each(&|v| v * (v + 1.0)), next_max), "{at}");
                assert_eq!(got.update_alongside, (each(&|v| v * 0.5), next_max), "{at}");
            }
        }
    }

    #[test]
    fn a_kernel_refuses_an_isa_this_cpu_lacks() {
        for isa in Isa::ALL.into_iter().filter(|isa| !isa.is_available()) {
            assert!(std::panic::catch_unwind(|| basics(isa)).is_err());
        }
    }
}

/// Independent FMA chains of [`fma_chains`]: enough to cover the FMA latency (4-5
/// cycles) times the FMA ports (2) of current x86 cores.
const FMA_CHAINS: usize = 12;

kernel! {
    /// The machine's FMA peak probe: `iterations` rounds of 12 independent vector FMA
    /// chains (no memory traffic). Returns the flops it did (`2 * 12 * LANES` per round)
    /// and a value that depends on every chain, so the work cannot be optimised away.
    /// Time it to read every kernel's GFLOP/s as a fraction of peak (see
    /// `examples/bench_kernels`).
    pub fn fma_chains(iterations: usize) -> (usize, f32) {
        let mut acc = [V::splat(0.0); FMA_CHAINS];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = V::splat(i as f32 * 1e-3);
        }
        let (x, y) = (V::splat(0.999_99), V::splat(1e-6));
        for _ in 0..iterations {
            for a in acc.iter_mut() {
                *a = a.mul_add(x, y);
            }
        }
        let mut total = V::splat(0.0);
        for a in acc {
            total = total + a;
        }
        (2 * FMA_CHAINS * V::LANES * iterations, total.reduce_add())
    }
}

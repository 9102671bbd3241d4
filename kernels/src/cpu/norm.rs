//! Normalisation layers over rows of a strided tensor: LayerNorm (Ba, Kiros & Hinton
//! 2016), RMSNorm (Zhang & Sennrich 2019) and GroupNorm (Wu & He 2018).
//!
//! Each one normalises a row `x` of `n` values and applies an optional affine map:
//!
//! - LayerNorm, GroupNorm: `y = (x - mean) / sqrt(var + eps) * w + b`, with the biased
//!   variance `var = mean((x - mean)^2)` (as PyTorch);
//! - RMSNorm: `y = x / sqrt(mean(x^2) + eps) * w`, the same formula centred at 0
//!   instead of the mean, without bias.
//!
//! The statistics are computed in the accumulator type in two passes: first the mean,
//! then the mean of squared deviations from it. Unlike the one-pass `E[x^2] - E[x]^2`,
//! this does not cancel catastrophically when the mean is large next to the spread.
//! The row is read once into a scratch buffer, so the second pass costs no extra reads
//! of the input. (The f32 SIMD forward gets the same two statistics in one pass by
//! Welford's update, `Welford`; on rows of `ALONGSIDE_MIN_ROW` values or more it takes
//! them for the next row while it writes this one, so each row is read from memory in one
//! pass: see `norm_f32`.)
//!
//! The backward ([`normalize_backward`]) is the closed form. Over a row of `n` elements,
//! with `xhat = (x - mean) * rstd`, `rstd = 1 / sqrt(var + eps)` and `gw = g * w` (the
//! incoming gradient times the weight):
//!
//! - `dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat))` (RMSNorm: without `mean(gw)`,
//!   and `xhat = x * rstd`);
//! - `dw = sum(g * xhat)`, `db = sum(g)` over every row (and position) sharing the parameter.
//!
//! The statistics are recomputed from `x` (a pass for the mean, then the squared
//! deviations in the same pass as the gradient sums, over a row that is in cache anyway)
//! rather than saved by the forward. The parameter sums are accumulated per block
//! of rows and added in block order, so the result does not depend on the thread count.
//!
//! For f32 LayerNorm and RMSNorm whose normalised elements are contiguous in memory, both
//! directions run a fused SIMD kernel per row (`UnitRows`); GroupNorm, the other dtypes
//! and layouts take the generic kernel.

use super::map::PARALLEL_THRESHOLD;
use super::simd::{F32Vector, Isa, Operand, kernel, map, map_alongside, prefetch_lines, sums, update};
use super::softmax::{Rows, UnitRows, for_row_blocks};
use crate::layout::Layout;
use crate::parallel;
use crate::{Element, FloatElem, Real};
use std::sync::Mutex;

/// Which normalisation, and over which elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// LayerNorm over the last `dims` dims; weight and bias have those dims' shape.
    Layer { dims: usize },
    /// RMSNorm over the last dim; the weight has its size (there is no bias).
    Rms,
    /// GroupNorm on `[N, C, *]`: the `C` channels form `groups` equal groups, and each
    /// (sample, group) is normalised over its channels and all spatial positions.
    /// Weight and bias have `C` entries, one per channel.
    Group { groups: usize },
}

/// Applies `norm` to a strided view. `weight` and `bias` are row-major buffers of the
/// parameter shape (see [`Norm`]); the caller has checked the shapes, that `C` is a
/// multiple of `groups`, and `eps >= 0`. The output is row-major with the view's shape.
pub fn normalize<T: FloatElem>(
    src: &[T],
    layout: &Layout,
    norm: Norm,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
) -> Vec<T> {
    if let Some(x) = T::as_f32(src)
        && let Some(rows) = unit_rows(layout, norm)
    {
        // Every row is written by the SIMD kernel.
        let mut out = crate::buffers::for_overwrite(layout.numel());
        let out_f32 = T::as_f32_mut(&mut out).expect("T is f32");
        let (weight, bias) = (f32_operand(weight, 1.0), f32_operand(bias, 0.0));
        let (center, eps) = (norm.center(), eps as f32);
        for_row_blocks(out_f32, rows.n, |first, out| {
            norm_f32(Isa::best(), x, &rows, first, out, center, eps, weight, bias)
        });
        return out;
    }
    let to_acc = |p: Option<&[T]>| p.map(|p| p.iter().map(|v| v.to_acc()).collect::<Vec<T::Acc>>());
    let affine = Affine { weight: to_acc(weight), bias: to_acc(bias) };
    let eps = <T::Acc as Element>::from_f64(eps);
    match norm {
        Norm::Layer { dims } => Rows::new(layout, layout.rank() - dims)
            .map(src, |_, x, out| normalize_row(x, out, Center::Mean, eps, &affine, |p| p)),
        Norm::Rms => Rows::new(layout, layout.rank() - 1)
            .map(src, |_, x, out| normalize_row(x, out, Center::Zero, eps, &affine, |p| p)),
        Norm::Group { groups } => {
            let channels_per_group = layout.shape()[1] / groups;
            let spatial: usize = layout.shape()[2..].iter().product();
            let grouped = split_channels(layout, groups);
            Rows::new(&grouped, 2).map(src, |row, x, out| {
                let first_channel = (row % groups) * channels_per_group;
                normalize_row(x, out, Center::Mean, eps, &affine, |p| first_channel + p / spatial)
            })
        }
    }
}

impl Norm {
    /// Where the norm centres a row.
    fn center(self) -> Center {
        match self {
            Norm::Layer { .. } | Norm::Group { .. } => Center::Mean,
            Norm::Rms => Center::Zero,
        }
    }

    /// The number of weight (and bias) entries, for an input of layout `layout`.
    fn param_len(self, layout: &Layout) -> usize {
        let shape = layout.shape();
        match self {
            Norm::Layer { dims } => shape[shape.len() - dims..].iter().product(),
            Norm::Rms => shape[shape.len() - 1],
            Norm::Group { .. } => shape[1],
        }
    }

    /// The view the statistics are taken over, and the number of leading dims that index
    /// its rows (each row is one normalised set of elements).
    fn rows_view(self, layout: &Layout) -> (Layout, usize) {
        match self {
            Norm::Layer { dims } => (layout.clone(), layout.rank() - dims),
            Norm::Rms => (layout.clone(), layout.rank() - 1),
            Norm::Group { groups } => (split_channels(layout, groups), 2),
        }
    }

    /// Maps `(row, position in row)` to the weight/bias index, for an input of layout
    /// `layout`: the position itself, except for GroupNorm, whose rows are (sample,
    /// group) and whose parameters are per channel.
    fn param_index(self, layout: &Layout) -> impl Fn(usize, usize) -> usize + Sync + use<> {
        let (groups, channels_per_group, spatial) = match self {
            Norm::Group { groups } => (groups, layout.shape()[1] / groups, layout.shape()[2..].iter().product()),
            _ => (1, 0, 1),
        };
        move |row, p| (row % groups) * channels_per_group + p / spatial
    }
}

/// The point a row is centred at before scaling.
#[derive(Clone, Copy)]
enum Center {
    /// Subtract the row mean (LayerNorm, GroupNorm).
    Mean,
    /// Keep the values: the "variance" is then the mean square (RMSNorm).
    Zero,
}

/// The optional per-element scale and shift, in the accumulator type.
struct Affine<A> {
    weight: Option<Vec<A>>,
    bias: Option<Vec<A>>,
}

/// Normalises one row `x` into `out`; `param(p)` is the weight/bias index of position `p`.
fn normalize_row<T: FloatElem>(
    x: &[T::Acc],
    out: &mut [T],
    center: Center,
    eps: T::Acc,
    affine: &Affine<T::Acc>,
    param: impl Fn(usize) -> usize,
) {
    let (mean, inv_std) = row_stats(x, center, eps);
    for (p, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        let mut y = (v - mean) * inv_std;
        if let Some(w) = &affine.weight {
            y *= w[param(p)];
        }
        if let Some(b) = &affine.bias {
            y += b[param(p)];
        }
        *o = T::from_acc(y);
    }
}

/// The mean of a row (0 when not centring) and `1 / sqrt(var + eps)`, in two passes.
/// The mean is taken of the values shifted by the first one, `x0 + mean(x - x0)`: exact
/// for a constant row (whose normalised values must be exactly 0, not rounding noise
/// divided by `sqrt(eps)`), and more accurate whenever the spread is small next to the mean.
fn row_stats<A: Real>(x: &[A], center: Center, eps: A) -> (A, A) {
    let n = A::from_f64(x.len() as f64);
    let mean = match (center, x.first()) {
        (Center::Mean, Some(&shift)) => shift + x.iter().fold(A::zero(), |s, &v| s + (v - shift)) / n,
        _ => A::zero(),
    };
    let var = x.iter().fold(A::zero(), |s, &v| s + (v - mean) * (v - mean)) / n;
    (mean, A::one() / (var + eps).sqrt())
}

/// The gradients of a normalisation: `dx` (row-major, the input's shape) and the
/// parameter gradients `dweight`, `dbias` (row-major, the parameter shape; for RMSNorm,
/// which has no bias, `dbias` is the sum of `g` all the same).
#[derive(Clone, Debug, PartialEq)]
pub struct NormGrads<T> {
    pub dx: Vec<T>,
    pub dweight: Vec<T>,
    pub dbias: Vec<T>,
}

/// The backward of [`normalize`]: the gradients with respect to the input and the
/// parameters, given the input `x`, the gradient `g` flowing into the output (same
/// shape, any layouts) and the weight (if the forward had one; the bias does not enter).
/// See the module docs for the formulas. The caller has checked the arguments as for
/// [`normalize`].
pub fn normalize_backward<T: FloatElem>(
    x: &[T],
    x_layout: &Layout,
    g: &[T],
    g_layout: &Layout,
    norm: Norm,
    weight: Option<&[T]>,
    eps: f64,
) -> NormGrads<T> {
    let param_len = norm.param_len(x_layout);
    let center = norm.center();
    // Both paths below write every element of dx.
    let mut dx = crate::buffers::for_overwrite(x_layout.numel());
    if let (Some(x), Some(g)) = (T::as_f32(x), T::as_f32(g))
        && let (Some(x_rows), Some(g_rows)) = (unit_rows(x_layout, norm), unit_rows(g_layout, norm))
    {
        let dx_f32 = T::as_f32_mut(&mut dx).expect("T is f32");
        let (weight, eps) = (f32_operand(weight, 1.0), eps as f32);
        let (dweight, dbias) = blocks_with_sums(dx_f32, x_rows.n, param_len, |first, dx, dweight, dbias| {
            norm_backward_f32(Isa::best(), (x, &x_rows), (g, &g_rows), first, dx, center, eps, weight, dweight, dbias)
        });
        let to_t = |v: Vec<f32>| v.into_iter().map(|v| T::from_f64(v as f64)).collect();
        return NormGrads { dx, dweight: to_t(dweight), dbias: to_t(dbias) };
    }
    let ((xv, split), (gv, _)) = (norm.rows_view(x_layout), norm.rows_view(g_layout));
    let (x_rows, g_rows) = (Rows::new(&xv, split), Rows::new(&gv, split));
    let n = x_rows.len();
    let weight: Option<Vec<T::Acc>> = weight.map(|w| w.iter().map(|v| v.to_acc()).collect());
    let eps = <T::Acc as Element>::from_f64(eps);
    let param_index = norm.param_index(x_layout);
    let (dweight, dbias) = blocks_with_sums(&mut dx, n, param_len, |first, dx, dweight, dbias| {
        let (mut xs, mut gs) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for (i, dx_row) in dx.chunks_mut(n).enumerate() {
            let row = first + i;
            x_rows.read(x, row, &mut xs);
            g_rows.read(g, row, &mut gs);
            let param = |p| param_index(row, p);
            backward_row(&xs, &gs, dx_row, center, eps, weight.as_deref(), param, dweight, dbias);
        }
    });
    let to_t = |v: Vec<T::Acc>| v.into_iter().map(T::from_acc).collect();
    NormGrads { dx, dweight: to_t(dweight), dbias: to_t(dbias) }
}

/// The backward of one row in the accumulator type: writes `dx` and adds the row's
/// contributions to `dweight` and `dbias` (indexed by `param(p)`).
fn backward_row<T: FloatElem>(
    x: &[T::Acc],
    g: &[T::Acc],
    dx: &mut [T],
    center: Center,
    eps: T::Acc,
    weight: Option<&[T::Acc]>,
    param: impl Fn(usize) -> usize,
    dweight: &mut [T::Acc],
    dbias: &mut [T::Acc],
) {
    let zero = <T::Acc as Element>::zero();
    let n = <T::Acc as Element>::from_f64(x.len() as f64);
    let (mean, rstd) = row_stats(x, center, eps);
    let xhat = |p: usize| (x[p] - mean) * rstd;
    let gw = |p: usize| weight.map_or(g[p], |w| g[p] * w[param(p)]);
    let (mut sum_gw, mut sum_gw_xhat) = (zero, zero);
    for p in 0..x.len() {
        sum_gw += gw(p);
        sum_gw_xhat += gw(p) * xhat(p);
    }
    let mean_gw = match center {
        Center::Mean => sum_gw / n,
        Center::Zero => zero,
    };
    let mean_gw_xhat = sum_gw_xhat / n;
    for (p, d) in dx.iter_mut().enumerate() {
        *d = T::from_acc(rstd * (gw(p) - mean_gw - xhat(p) * mean_gw_xhat));
        dweight[param(p)] += g[p] * xhat(p);
        dbias[param(p)] += g[p];
    }
}

/// Calls `f(first_row, out_block, dweight, dbias)` on blocks of whole rows (of `n`
/// elements) of `out`, threaded when `out` is large, each block with its own zeroed
/// accumulators of `param_len` entries; returns the accumulators summed in block order
/// (so the result does not depend on how the blocks were scheduled).
fn blocks_with_sums<T: Send, A: Real>(
    out: &mut [T],
    n: usize,
    param_len: usize,
    f: impl Fn(usize, &mut [T], &mut [A], &mut [A]) + Sync,
) -> (Vec<A>, Vec<A>) {
    let mut sums = (vec![A::zero(); param_len], vec![A::zero(); param_len]);
    if out.is_empty() || n == 0 {
        return sums;
    }
    if out.len() <= PARALLEL_THRESHOLD {
        f(0, out, &mut sums.0, &mut sums.1);
        return sums;
    }
    // Blocks of a size that depends on the shape alone, never on the thread count (so
    // the sums do not either): at least a quarter of the threshold, enough of them to
    // balance the threads, and at most `MAX_BLOCKS`, so that their accumulators stay
    // small next to the rows.
    const MAX_BLOCKS: usize = 64;
    let rows = out.len() / n;
    let rows_per_block = (PARALLEL_THRESHOLD / 4 / n).max(rows.div_ceil(MAX_BLOCKS)).max(1);
    // Each task takes its block of rows through an (uncontended) lock, and its
    // accumulators as its chunk of `partials`: two disjoint borrows per task, no unsafe.
    let blocks: Vec<Mutex<&mut [T]>> = out.chunks_mut(rows_per_block * n).map(Mutex::new).collect();
    // Every block's two accumulators side by side in one buffer from the cache (a fresh
    // allocation per block, freed at once, made the heap fault its pages in every call).
    let mut partials = crate::buffers::filled(blocks.len() * 2 * param_len, A::zero());
    parallel::for_each_chunk_mut(&mut partials, 2 * param_len, |b, accumulators| {
        let (dweight, dbias) = accumulators.split_at_mut(param_len);
        let mut rows = blocks[b].lock().unwrap_or_else(|e| e.into_inner());
        f(b * rows_per_block, &mut rows, dweight, dbias);
    });
    for block in partials.chunks_exact(2 * param_len) {
        let (dweight, dbias) = block.split_at(param_len);
        sums.0.iter_mut().zip(dweight).for_each(|(a, &v)| *a += v);
        sums.1.iter_mut().zip(dbias).for_each(|(a, &v)| *a += v);
    }
    crate::buffers::recycle(partials);
    sums
}

/// The rows of an f32 LayerNorm or RMSNorm as `UnitRows` (the normalised dims merged
/// into one), when the normalised elements of each row are contiguous in memory.
fn unit_rows(layout: &Layout, norm: Norm) -> Option<UnitRows> {
    let dims = match norm {
        Norm::Layer { dims } => dims,
        Norm::Rms => 1,
        Norm::Group { .. } => return None,
    };
    let split = layout.rank() - dims;
    let (outer_shape, row_shape) = layout.shape().split_at(split);
    let (outer_strides, row_strides) = layout.strides().split_at(split);
    if !Layout::new(row_shape, row_strides, 0).is_contiguous() {
        return None;
    }
    let n = row_shape.iter().product();
    UnitRows::new(&Layout::new(&[outer_shape, &[n]].concat(), &[outer_strides, &[1]].concat(), layout.offset()))
}

/// An optional f32 parameter as a kernel operand: the slice, or `absent` everywhere.
fn f32_operand<T: FloatElem>(param: Option<&[T]>, absent: f32) -> Operand<'_> {
    match param.map(|p| T::as_f32(p).expect("the parameter has the input's dtype")) {
        Some(p) => Operand::Slice(p),
        None => Operand::Splat(absent),
    }
}

/// The mean of one f32 row (0 when not centring), with SIMD: the mean of the values
/// shifted by the first one (the backward's statistics pass; the forward's is
/// [`mean_and_square_deviations`]).
#[inline(always)]
fn row_mean_f32<V: F32Vector>(x: &[f32], center: Center) -> V {
    V::splat(match (center, x.first()) {
        (Center::Mean, Some(&shift)) => {
            let s = V::splat(shift);
            shift + sums::<V, 1, 1>([Operand::Slice(x)], x.len(), |[v]| [v - s])[0] / x.len() as f32
        }
        _ => 0.0,
    })
}

/// `1 / sqrt(var + eps)` from the sum of squared deviations of a row of `n` values.
#[inline(always)]
fn rstd_f32<V: F32Vector>(square_sum: f32, n: usize, eps: f32) -> V {
    V::splat(1.0 / (square_sum / n as f32 + eps).sqrt())
}

/// The mean (0 when not centring) and `1 / sqrt(var + eps)` of one f32 row, with SIMD:
/// one pass over the row when centring ([`mean_and_square_deviations`]), the mean square
/// when not.
#[inline(always)]
fn row_stats_f32<V: F32Vector>(x: &[f32], center: Center, eps: f32) -> (V, V) {
    let (mean, square_sum) = match center {
        Center::Mean => mean_and_square_deviations::<V>(x),
        Center::Zero => (0.0, sums::<V, 1, 1>([Operand::Slice(x)], x.len(), |[v]| [v * v])[0]),
    };
    (V::splat(mean), rstd_f32(square_sum, x.len(), eps))
}

/// Vector Welford states that [`mean_and_square_deviations`] keeps side by side (each
/// update waits on its state's last one).
const WELFORD_STATES: usize = 4;

/// The mean of a row and the sum of its squared deviations from it, in one pass over the
/// row: [`Welford`] with [`WELFORD_STATES`] states, a block of one vector per state at a
/// time (so the states share one count and one division per block), and the tail (fewer
/// values than a block) merged from its own two-pass statistics. Against the two-pass
/// mean-then-deviations it saves a pass over the row for a few more operations: LayerNorm
/// 6-10% faster per value (same-process A/B, AVX2 on Zen 3, 1 and 2 threads, rows of 1024
/// from L2 and DRAM).
#[inline(always)]
fn mean_and_square_deviations<V: F32Vector>(x: &[f32]) -> (f32, f32) {
    let mut stats = Welford::<V, WELFORD_STATES>::shifted_by_first(x);
    let mut blocks = x.chunks_exact(WELFORD_STATES * V::LANES);
    for block in &mut blocks {
        stats.push_block(block);
    }
    stats.finish(blocks.remainder())
}

/// Running means and sums of squared deviations (Welford 1962), one per lane of `S`
/// vector states: the mean and the deviation sum of a row without the cancellation of
/// `sum(x^2) - n mean^2`, built up vector by vector so that the row needs no second pass.
/// Each update `mean += (v - mean) / count`, `m2 += (v - mean_old) (v - mean_new)` waits
/// on its state's previous one, so `S` states side by side keep `S` chains in flight.
/// [`Welford::finish`] merges the states and lanes by the pairwise formula of Chan, Golub
/// & LeVeque (1979), `M2 = M2_a + M2_b + delta^2 n_a n_b / n`.
///
/// The values are taken less the row's first value (`shift`), and the mean given back
/// plus it: the running means are then those of the deviations from it, whose rounding
/// steps are as fine as the deviations, where the means of values far from zero (rows at
/// 1e4 with a spread of 0.2) move in steps of their own large magnitude's spacing, as
/// large as the deviations' (0.18% off in the normalised values with AVX2's states, 0.16%
/// with the scalar vectors', before the shift; the mean's own rounding, half an input
/// spacing, is all that is left). It costs a subtraction per vector: on Zen 4, LayerNorm
/// on (4096, 1024) level with AVX-512 at one and two threads (medians of 41 calls, four
/// alternated runs), and with AVX2 (`AIGC_CPU_ISA=avx2`) 7% slower at one thread (median
/// of eight runs 1.60 -> 1.72 ms), level at two.
struct Welford<V, const S: usize> {
    shift: f32,
    mean: [V; S],
    m2: [V; S],
    /// How many vectors each state has seen.
    count: [f32; S],
}

impl<V: F32Vector, const S: usize> Welford<V, S> {
    /// No values yet, for a row whose first value is `row[0]` (any shift, for an empty row).
    #[inline(always)]
    fn shifted_by_first(row: &[f32]) -> Self {
        let zero = V::splat(0.0);
        Self { shift: row.first().copied().unwrap_or(0.0), mean: [zero; S], m2: [zero; S], count: [0.0; S] }
    }

    /// Adds `v` to the first state, then rotates the states by one, so that consecutive
    /// vectors go to the states in turn. (With `S` a divisor of the caller's unrolling,
    /// the rotation is only a renaming of registers.)
    #[inline(always)]
    fn push(&mut self, v: V) {
        let v = v - V::splat(self.shift);
        let count = self.count[0] + 1.0;
        let delta = v - self.mean[0];
        let mean = delta.mul_add(V::splat(1.0 / count), self.mean[0]);
        let m2 = delta.mul_add(v - mean, self.m2[0]);
        (self.mean[0], self.m2[0], self.count[0]) = (mean, m2, count);
        self.mean.rotate_left(1);
        self.m2.rotate_left(1);
        self.count.rotate_left(1);
    }

    /// Adds the `S` vectors of `block`, one to each state, when every state has seen the
    /// same number (only whole blocks so far): one division for all of them.
    #[inline(always)]
    fn push_block(&mut self, block: &[f32]) {
        let count = self.count[0] + 1.0;
        let inverse_count = V::splat(1.0 / count);
        for k in 0..S {
            let v = V::load(&block[k * V::LANES..]) - V::splat(self.shift);
            let delta = v - self.mean[k];
            self.mean[k] = delta.mul_add(inverse_count, self.mean[k]);
            self.m2[k] = delta.mul_add(v - self.mean[k], self.m2[k]);
        }
        self.count = [count; S];
    }

    /// The mean and the sum of squared deviations of every value pushed and then of
    /// `tail` (values not pushed, fewer than a block).
    #[inline(always)]
    fn finish(self, tail: &[f32]) -> (f32, f32) {
        // The states into one, lane by lane (a lane of each state holds `count` values).
        let (mut count, mut mean, mut m2) = (self.count[0], self.mean[0], self.m2[0]);
        for k in 1..S {
            let (count_k, total) = (self.count[k], count + self.count[k]);
            if count_k > 0.0 {
                let delta = self.mean[k] - mean;
                mean = delta.mul_add(V::splat(count_k / total), mean);
                m2 = m2 + self.m2[k] + delta * delta * V::splat(count * count_k / total);
                count = total;
            }
        }
        // The lanes into one: with equal counts, the mean is the mean of the lane means,
        // and the spread of those means adds `count * sum (mean_lane - mean)^2`.
        let mut whole = (0.0, 0.0, 0.0);
        if count > 0.0 {
            let lanes_mean = mean.reduce_add() / V::LANES as f32;
            let centre = V::splat(lanes_mean);
            let spread = ((mean - centre) * (mean - centre)).reduce_add();
            whole = (count * V::LANES as f32, lanes_mean, m2.reduce_add() + count * spread);
        }
        let shift = self.shift;
        if tail.is_empty() {
            return (whole.1 + shift, whole.2);
        }
        let tail_count = tail.len() as f32;
        let tail_mean = tail.iter().map(|&v| v - shift).sum::<f32>() / tail_count;
        let tail_m2 = tail.iter().map(|&v| (v - shift - tail_mean) * (v - shift - tail_mean)).sum::<f32>();
        let (n_a, mean_a, m2_a) = whole;
        let n = n_a + tail_count;
        let delta = tail_mean - mean_a;
        (mean_a + delta * tail_count / n + shift, m2_a + tail_m2 + delta * delta * n_a * tail_count / n)
    }
}

/// The shortest LayerNorm or RMSNorm row whose statistics are taken while the row before
/// it is written (see `norm_f32`). LayerNorm, AVX-512 on a Xeon (the rows from its L3),
/// median ms at one thread / two, own statistics pass -> alongside (two builds, runs
/// alternated): (4096, 1024) 1.80-1.86 / 0.93-0.97 -> 1.29-1.37 / 0.67-0.69 (PyTorch in
/// the same session: 1.50 / 0.86), (8192, 512) 1.82-1.84 / 0.93-0.95 -> 1.30-1.35 /
/// 0.67-0.69, (1536, 512) 0.28-0.30 / 0.13-0.15 -> 0.23-0.26 / 0.11-0.12. AVX2 on the
/// same CPU (one process, variants alternated): (4096, 1024) 2.12-2.17 / 0.95-0.99 ->
/// 1.58-1.64 / 0.74-0.75, (8192, 512) 1.91-1.95 / 0.88-1.01 -> 1.60-1.65 / 0.75-0.77.
/// Shorter rows lost: with AVX2, (16384, 256) by 2-10% and (768, 384) by 5-15%; on both
/// ISAs, (32768, 128) by 6-24% (the statistics, merged at the end of each row, are needed
/// at once by the next row). RMSNorm (its sum of squares from the same states), AVX-512,
/// one process, alternated: (4096, 1024) 1.53-1.60 / 0.77-0.88 -> 1.32-1.38 / 0.68-0.69,
/// (8192, 512) 1.35-1.42 / 0.72-0.78 -> 1.30-1.35 / 0.68-0.74 (one run 0.88), (1536, 512)
/// 0.24-0.28 / 0.13-0.14 -> 0.22-0.25 / 0.12-0.13 (one run 0.16).
const ALONGSIDE_MIN_ROW: usize = 512;

kernel! {
    /// LayerNorm / RMSNorm of whole rows `first..` of `x` into `out`, with SIMD; an
    /// absent weight is a splat of 1, an absent bias a splat of 0.
    ///
    /// A row's statistics pass reads it from memory with little to compute, and its output
    /// pass computes from L1 with nothing to read; done in turn they do not overlap. For
    /// rows of [`ALONGSIDE_MIN_ROW`] values or more, the next row's statistics are the
    /// side job of this row's output pass ([`map_alongside`], a two-state [`Welford`]:
    /// the pass's loop hands it two vectors at a time), as softmax takes the next row's
    /// max; each row is then read from memory once, in one pass.
    fn norm_f32(
        x: &[f32],
        rows: &UnitRows,
        first: usize,
        out: &mut [f32],
        center: Center,
        eps: f32,
        weight: Operand,
        bias: Operand,
    ) {
        let n = rows.n;
        let count = out.len() / n.max(1);
        let alongside = n >= ALONGSIDE_MIN_ROW;
        let mut next_stats = None;
        for (i, y) in out.chunks_exact_mut(n).enumerate() {
            let row = rows.row(x, first + i);
            let next = if i + 1 < count { rows.row(x, first + i + 1) } else { &[][..] };
            // With vectors narrower than AVX-512's, the next row on its way from memory
            // while this one's passes run from L1: on (4096, 1024), interleaved A/B runs,
            // AVX2 on Zen 3 11-20% faster at 1 and 2 threads; AVX-512 on Zen 4 6-30%
            // slower (the hardware prefetcher streams the rows on its own).
            if V::LANES < 16 && !alongside {
                prefetch_lines(next);
            }
            let (mean, rstd) = next_stats.take().unwrap_or_else(|| row_stats_f32::<V>(row, center, eps));
            let inputs = [Operand::Slice(row), weight, bias];
            let output = |[v, w, b]: [V; 3]| ((v - mean) * rstd).mul_add(w, b);
            if alongside && !next.is_empty() {
                let mut stats = Welford::<V, 2>::shifted_by_first(next);
                map_alongside(inputs, y, output, next, |v| stats.push(v));
                let (next_mean, deviations) = stats.finish(&next[n / V::LANES * V::LANES..]);
                // RMSNorm's sum of squares is the deviations' plus `n mean^2` (no
                // cancellation: both terms are positive).
                let (centre, square_sum) = match center {
                    Center::Mean => (next_mean, deviations),
                    Center::Zero => (0.0, next_mean.mul_add(next_mean * n as f32, deviations)),
                };
                next_stats = Some((V::splat(centre), rstd_f32(square_sum, n, eps)));
            } else {
                map(inputs, y, output);
            }
        }
    }
}

kernel! {
    /// The backward of `norm_f32` for whole rows `first..`: writes `dx` and accumulates
    /// the rows' parameter gradients into `dweight` and `dbias`. Three passes over each
    /// row: its mean; its squared deviations together with the sums of `gw` and
    /// `gw (x - mean)` (so `sum(gw xhat) = rstd sum(gw (x - mean))`); then `dx` and the
    /// parameter gradients together.
    fn norm_backward_f32(
        x: (&[f32], &UnitRows),
        g: (&[f32], &UnitRows),
        first: usize,
        dx: &mut [f32],
        center: Center,
        eps: f32,
        weight: Operand,
        dweight: &mut [f32],
        dbias: &mut [f32],
    ) {
        let n = x.1.n;
        let inv_n = 1.0 / n as f32;
        for (i, dx) in dx.chunks_exact_mut(n).enumerate() {
            let (x, g) = (x.1.row(x.0, first + i), g.1.row(g.0, first + i));
            let inputs = [Operand::Slice(x), Operand::Slice(g), weight];
            let mean = row_mean_f32::<V>(x, center);
            let [square_sum, sum_gw, sum_gw_deviation] = sums::<V, 3, 3>(inputs, n, |[x, g, w]| {
                let (deviation, gw) = (x - mean, g * w);
                [deviation * deviation, gw, gw * deviation]
            });
            let rstd = rstd_f32::<V>(square_sum, n, eps);
            let mean_gw = V::splat(match center {
                Center::Mean => sum_gw * inv_n,
                Center::Zero => 0.0,
            });
            let mean_gw_xhat = rstd * V::splat(sum_gw_deviation * inv_n);
            update::<V, 3, 3>([dx, &mut *dweight, &mut *dbias], inputs, |[_, dw, db], [x, g, w]| {
                let xhat = (x - mean) * rstd;
                [rstd * (g * w - mean_gw - xhat * mean_gw_xhat), g.mul_add(xhat, dw), db + g]
            });
        }
    }
}

/// Views `[N, C, *]` as `[N, groups, C / groups, *]`. Splitting one dim is always a
/// view, whatever its stride.
fn split_channels(layout: &Layout, groups: usize) -> Layout {
    let (shape, strides) = (layout.shape(), layout.strides());
    let per_group = shape[1] / groups;
    let mut new_shape = vec![shape[0], groups, per_group];
    let mut new_strides = vec![strides[0], strides[1] * per_group, strides[1]];
    new_shape.extend_from_slice(&shape[2..]);
    new_strides.extend_from_slice(&strides[2..]);
    Layout::new(&new_shape, &new_strides, layout.offset())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::map::testing::{View, data, view};
    use proptest::prelude::*;

    /// `got` (f32) is `want` (f64) up to `1e-4` relative and `abs` absolute; NaN matches NaN.
    fn assert_close(got: &[f32], want: &[f64], abs: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let ok = (g.is_nan() && w.is_nan()) || (g as f64 - w).abs() <= 1e-4 * w.abs() + abs;
            assert!(ok, "{what}[{i}] = {g}, want {w}");
        }
    }

    fn wide(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&v| v as f64).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn f32_rows_match_the_f64_kernel_forward_and_backward(
            (m, n) in (1usize..5, 1usize..70),
            // Not a broadcast column or scalar for `x`: a constant row has no spread, and its
            // normalised value is pure rounding noise divided by sqrt(eps).
            (kx, kg) in (prop_oneof![Just(View::Contiguous), Just(View::RowSlice), Just(View::Transposed), Just(View::Row)], view()),
            (which, has_weight, has_bias) in (0usize..3, any::<bool>(), any::<bool>()),
            seed in any::<u64>(),
        ) {
            let norm = [Norm::Layer { dims: 1 }, Norm::Layer { dims: 2 }, Norm::Rms][which];
            let (lx, lg) = (kx.layout(m, n), kg.layout(m, n));
            let (x, g) = (data(&lx, seed, false), data(&lg, seed ^ 5, false));
            let plen = norm.param_len(&lx);
            let param = |salt: u64| data(&Layout::contiguous(&[plen]), seed ^ salt, false);
            let (w, b) = (param(11), param(13));
            let (w, b) = (has_weight.then_some(&w[..]), has_bias.then_some(&b[..]));
            let (w64, b64) = (w.map(wide), b.map(wide));
            let eps = 1e-3;
            let y = normalize(&x, &lx, norm, w, b, eps);
            let want = normalize(&wide(&x), &lx, norm, w64.as_deref(), b64.as_deref(), eps);
            assert_close(&y, &want, 1e-4, "forward");
            let got = normalize_backward(&x, &lx, &g, &lg, norm, w, eps);
            let want = normalize_backward(&wide(&x), &lx, &wide(&g), &lg, norm, w64.as_deref(), eps);
            assert_close(&got.dx, &want.dx, 1e-3, "dx");
            assert_close(&got.dweight, &want.dweight, 1e-3, "dweight");
            assert_close(&got.dbias, &want.dbias, 1e-3, "dbias");
        }
    }

    /// `sum(w_out * normalize(x, weight, bias))` for the finite-difference checks.
    fn loss(x: &[f64], layout: &Layout, norm: Norm, w: &[f64], b: &[f64], w_out: &[f64]) -> f64 {
        normalize(x, layout, norm, Some(w), Some(b), 0.1).iter().zip(w_out).map(|(y, c)| y * c).sum()
    }

    #[test]
    fn backward_matches_finite_differences_for_every_norm() {
        // [N=2, C=4, S=3]; LayerNorm over the last 2 dims, RMSNorm over the last, GroupNorm
        // with 2 groups; the input is a transposed view (the generic path) and contiguous.
        let shape = [2usize, 4, 3];
        let numel = 24;
        let x: Vec<f64> = (0..numel).map(|i| ((i * 7) % 11) as f64 * 0.3 - 1.5).collect();
        let w_out: Vec<f64> = (0..numel).map(|i| ((i * 5) % 7) as f64 * 0.2 - 0.6).collect();
        let transposed = Layout::contiguous(&[3, 4, 2]).permute(&[2, 1, 0]);
        for layout in [Layout::contiguous(&shape), transposed] {
            for norm in [Norm::Layer { dims: 2 }, Norm::Rms, Norm::Group { groups: 2 }] {
                let plen = norm.param_len(&layout);
                let w: Vec<f64> = (0..plen).map(|i| 0.5 + i as f64 * 0.1).collect();
                let b: Vec<f64> = (0..plen).map(|i| i as f64 * 0.05).collect();
                // The output gradient, contiguous: g = w_out.
                let grads = normalize_backward(&x, &layout, &w_out, &Layout::contiguous(&shape), norm, Some(&w), 0.1);
                let h = 1e-6;
                let fd = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);
                // dx, indexed by buffer position.
                let mut dx_at = vec![0.0; numel];
                let mut k = 0;
                crate::layout::for_each_offset(&layout, |o| {
                    dx_at[o] = grads.dx[k];
                    k += 1;
                });
                for o in 0..numel {
                    let want = fd(&|d| {
                        let mut xs = x.clone();
                        xs[o] += d;
                        loss(&xs, &layout, norm, &w, &b, &w_out)
                    });
                    assert!((dx_at[o] - want).abs() < 1e-7, "{norm:?} dx[{o}]: {} vs {want}", dx_at[o]);
                }
                for p in 0..plen {
                    let dw = fd(&|d| {
                        let mut ws = w.clone();
                        ws[p] += d;
                        loss(&x, &layout, norm, &ws, &b, &w_out)
                    });
                    let db = fd(&|d| {
                        let mut bs = b.clone();
                        bs[p] += d;
                        loss(&x, &layout, norm, &w, &bs, &w_out)
                    });
                    assert!((grads.dweight[p] - dw).abs() < 1e-7, "{norm:?} dw[{p}]: {} vs {dw}", grads.dweight[p]);
                    if norm != Norm::Rms {
                        assert!((grads.dbias[p] - db).abs() < 1e-7, "{norm:?} db[{p}]: {} vs {db}", grads.dbias[p]);
                    }
                }
            }
        }
    }

    #[test]
    fn threaded_backward_is_deterministic_and_matches_one_block() {
        // Enough rows to be split over the pool; the parameter sums must not depend on it.
        let (m, n) = (300, 257);
        let layout = Layout::contiguous(&[m, n]);
        let (x, g) = (data(&layout, 1, false), data(&layout, 2, false));
        let w = data(&Layout::contiguous(&[n]), 3, false);
        let a = normalize_backward(&x, &layout, &g, &layout, Norm::Layer { dims: 1 }, Some(&w), 1e-5);
        let b = normalize_backward(&x, &layout, &g, &layout, Norm::Layer { dims: 1 }, Some(&w), 1e-5);
        assert_eq!(a, b);
        let want =
            normalize_backward(&wide(&x), &layout, &wide(&g), &layout, Norm::Layer { dims: 1 }, Some(&wide(&w)), 1e-5);
        assert_close(&a.dweight, &want.dweight, 1e-3, "dweight");
        assert_close(&a.dx, &want.dx, 1e-3, "dx");
    }

    #[test]
    fn layer_norm_of_a_large_offset_keeps_its_spread() {
        // mean 1e4, spread 1e-2: the one-pass formula loses every digit of var in f32.
        let src: Vec<f32> = vec![10000.01, 9999.99, 10000.01, 9999.99];
        let out = normalize(&src, &Layout::contiguous(&[4]), Norm::Layer { dims: 1 }, None, None, 0.0);
        for (o, want) in out.iter().zip([1.0, -1.0, 1.0, -1.0]) {
            assert!((o - want).abs() < 1e-2, "{out:?}");
        }
    }

    #[test]
    fn simd_layer_norm_of_a_large_offset_and_a_far_first_value_matches_f64() {
        // Rows of 500 and 1000 values (whole Welford blocks and a tail on every ISA; the
        // second row of 1000 has its statistics taken alongside the first's output pass), and
        // one of 2000, at 1e4 with a spread of 0.2, every 1000th value 1.5 away: in f32,
        // `E[x^2] - E[x]^2` keeps no digit of the variance (about 0.005), and running means
        // at 1e4 lose two or three.
        let n = 2000;
        let x: Vec<f32> =
            (0..n).map(|i| if i % 1000 == 0 { 10001.5 } else { 10000.0 + ((i * 37) % 101) as f32 * 2e-3 }).collect();
        for (shape, dims) in [([4, 500], 1), ([2, 1000], 1), ([2, 1000], 2)] {
            let (layout, norm) = (Layout::contiguous(&shape), Norm::Layer { dims });
            let want = normalize(&wide(&x), &layout, norm, None, None, 1e-6);
            let rows = unit_rows(&layout, norm).expect("contiguous rows");
            for isa in crate::cpu::simd::test_isas() {
                let mut y = vec![f32::NAN; n];
                let (weight, bias) = (f32_operand::<f32>(None, 1.0), f32_operand::<f32>(None, 0.0));
                norm_f32(isa, &x, &rows, 0, &mut y, norm.center(), 1e-6, weight, bias);
                // The mean, rounded to the inputs' own f32 spacing at 1e4 (2^-10), is off by up
                // to half of it: 0.0084 over the smallest standard deviation (0.058, rows of 500).
                assert_close(&y, &want, 9e-3, &format!("{shape:?}, {norm:?} on {isa:?}"));
            }
        }
    }

    #[test]
    fn norm_rows_with_statistics_taken_alongside_match_f64_on_every_isa() {
        // Rows long enough for the next row's statistics to be the side job of this row's
        // output pass: whole vector pairs, an odd vector count and a tail on every ISA. Each
        // row sits at its own large offset with a far first value, so a statistic taken
        // from the wrong row, or a lost vector, shows.
        for n in [ALONGSIDE_MIN_ROW, ALONGSIDE_MIN_ROW + 16, 1000, 1031] {
            let m = 5;
            let layout = Layout::contiguous(&[m, n]);
            let x: Vec<f32> = data(&layout, n as u64, false)
                .iter()
                .enumerate()
                .map(|(i, &v)| if i % n == 0 { 100.0 * (i / n) as f32 + 30.0 } else { 100.0 * (i / n) as f32 + v })
                .collect();
            let param = |salt: u64| data(&Layout::contiguous(&[n]), salt, false);
            let (w, b) = (param(1), param(2));
            let rows = UnitRows::new(&layout).expect("contiguous rows");
            for (norm, bias) in [(Norm::Layer { dims: 1 }, Some(&b)), (Norm::Rms, None)] {
                let want = normalize(&wide(&x), &layout, norm, Some(&wide(&w)), bias.map(|b| wide(b)).as_deref(), 1e-5);
                for isa in crate::cpu::simd::test_isas() {
                    let mut y = vec![f32::NAN; m * n];
                    let operands = (Operand::Slice(&w), f32_operand(bias.map(Vec::as_slice), 0.0));
                    norm_f32(isa, &x, &rows, 0, &mut y, norm.center(), 1e-5, operands.0, operands.1);
                    assert_close(&y, &want, 2e-4, &format!("{norm:?} on {isa:?}, rows of {n}"));
                }
            }
        }
    }

    #[test]
    fn group_norm_uses_one_weight_per_channel() {
        // [N=1, C=4, S=2], 2 groups of 2 channels; constant-free data so var > 0.
        let src: Vec<f64> = (0..8).map(f64::from).collect();
        let weight = [1.0, 2.0, 3.0, 4.0];
        let out = normalize(&src, &Layout::contiguous(&[1, 4, 2]), Norm::Group { groups: 2 }, Some(&weight), None, 0.0);
        // Group 0 is 0, 1, 2, 3: mean 1.5, var 1.25.
        let z = |v: f64| (v - 1.5) / 1.25f64.sqrt();
        let want = [z(0.0), z(1.0), 2.0 * z(2.0), 2.0 * z(3.0)];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-14, "{out:?}");
        }
    }
}

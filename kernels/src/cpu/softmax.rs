//! Softmax and log-softmax along one dimension of a strided tensor, and `Rows`, the
//! strided row reader that the norm kernels share.
//!
//! For one line `x` along the dimension, with `m = max_j x_j`:
//!
//! - `softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m)`
//! - `log_softmax(x)_i = (x_i - m) - ln(sum_j exp(x_j - m))`
//!
//! Subtracting the max (the usual stabilisation, e.g. Goodfellow, Bengio & Courville,
//! *Deep Learning*, §4.1) keeps every exponential in `(0, 1]`, so nothing overflows and
//! the sum is at least 1. Everything is computed in the accumulator type and rounded
//! once on store.
//!
//! Special values follow PyTorch: a NaN anywhere in a line makes the whole line NaN, and
//! a line whose entries are all `-inf` gives NaN (there is no mass to normalise:
//! `-inf - (-inf)` is NaN).
//!
//! The backward passes ([`softmax_backward`]) are written in terms of the output `y` and
//! the incoming gradient `g`, with sums over each line:
//!
//! - softmax: `dx = y * (g - sum_j g_j y_j)` (the Jacobian `diag(y) - y y^T` applied to `g`);
//! - log-softmax: `dx = g - exp(y) * sum_j g_j`.
//!
//! For f32 along the last dim, when each row is contiguous in memory, both directions
//! run a fused SIMD kernel per row (`UnitRows`): softmax writes `exp(x - max)` while
//! summing (on [`F32Vector::Wide`] vectors: 9% faster with AVX2 on Zen 3; by
//! [`RowExp`], below) and scales in place, so the input is read from memory once and the
//! output written once. Each row's max is taken by the side job of the last pass over the
//! row before it ([`simd::update_alongside`], [`simd::map_alongside`]), so that the next
//! row's reads from memory overlap this row's work from L1. Against a max pass of its own
//! (alternated runs in one process on a Xeon with AMX, (4096, 1024), output in
//! place, median ms): AVX-512 1.05 -> 0.90 at two threads and 2.18 -> 1.91 at one; AVX2
//! 1.32 -> 1.24 and 4.06 -> 2.53 (a copy of the same bytes: 0.64 and 1.33). Asking for the
//! whole next row up front instead (the kernel's earlier way with vectors narrower than
//! AVX-512's: 1-16% faster with AVX2 on Zen 3) was slower in the same runs (AVX-512 1.01
//! and 2.00 ms, AVX2 1.32 and 4.11). The exponentials pass over a row (from L1) also asks
//! for the next row's cache lines, a piece of 256 values at a time
//! (`in_pieces_fetching`), so that the side job of the following pass finds them on
//! their way. Same-process A/B on a Xeon with 480 MB of L3 (the rows stay in it), the two
//! orders alternated, median ms at one thread / two, before -> after: AVX-512
//! (16384, 256) 2.18 -> 1.88 / 1.04 -> 0.92, (768, 384) 0.121 -> 0.106 / 0.065 -> 0.060,
//! (32768, 128) 2.32 -> 2.26 / 1.24 -> 1.15, (4096, 1024) 2.42 -> 2.43 / 1.10 -> 1.08
//! (another run 2.80 -> 2.92 / 1.08 -> 1.08), (1024, 4096) 2.22 -> 2.23 / 1.16 -> 1.11;
//! log-softmax (4096, 1024) 3.32 -> 3.20 / 1.26 -> 1.22; AVX2 (16384, 256) 3.00 -> 2.67 /
//! 1.34 -> 1.26, (4096, 1024) 3.42 -> 3.19 / 1.41 -> 1.38, log-softmax 3.62 -> 3.40 /
//! 1.56 -> 1.47. The same in the backward's output pass was 4-6% slower with AVX-512 on
//! (4096, 1024), and in LayerNorm's output pass from 9% slower to 20% faster depending
//! on the ISA and shape: neither does it.
//!
//! [`RowExp`] never forms `x - max`, and takes 7 multiplies and multiply-adds a value
//! where [`math::exp_nonpositive`] of `x - max` takes 10 (the operations that bound
//! softmax at one thread); rows whose max is beyond `2^16` or not finite, and the
//! portable scalar path, take the latter. Softmax of rows already in L1/L2, one thread,
//! AVX-512 on Zen 4, same-process A/B, median ns a value: (16, 1024) 0.30-0.31 ->
//! 0.26-0.27, (64, 1024) 0.30 -> 0.26, (256, 1024) 0.29 -> 0.25; (4096, 1024), from
//! memory, 0.34-0.35 -> 0.32-0.33.
//!
//! Softmax's exponentials pass also asks for the lines of the next row's *output*, piece
//! by piece: without it the first store to each line of an output row waits for the line
//! to come from memory (a store must own its line). AVX-512 on Zen 4 (EPYC, 2 vCPU, 32 MB
//! of L3), (4096, 1024), two builds, runs alternated three times, median ms at one thread /
//! two: 1.82-2.08 -> 1.56-1.58 / 0.92-1.11 -> 0.79-0.82, against 1.08-1.29 / 0.61-0.81 for
//! a copy of the same bytes in the same runs. Log-softmax writes its output in its second
//! pass, from the side job's loop, and does not ask: asking in its sum pass was within
//! the noise (one thread, median ms of runs alternated three times in one binary: 2.02-2.82
//! against 2.27-2.49).
//!
//! Non-temporal stores for outputs past 8 MB (no read of each output line before it is
//! written; softmax's exponentials then kept in a row of scratch) were no faster on
//! Zen 4, though a copy with them took 1.2 ms against 2.2 with plain stores: (4096, 1024)
//! at one thread, median ms, softmax 1.93-2.02 -> 1.96-2.34 (that build also loaded the
//! side job's vectors first, see `simd::map_alongside`), LayerNorm 2.28 -> 2.20-2.66.
//!
//! The other dims, dtypes and layouts take the generic kernel, which reads each line into
//! a scratch buffer through `Rows`.
//!
//! [`simd::update_alongside`]: super::simd::update_alongside
//! [`simd::map_alongside`]: super::simd::map_alongside

use super::map::PARALLEL_THRESHOLD;
use super::simd::math::RowExp;
use super::simd::{
    F32Vector, Isa, Operand, Wide, kernel, map, map_alongside, map1_sum, math, max_of, prefetch_lines, sums,
    tail_vector, update_alongside,
};
use crate::layout::{Layout, for_each_offsets};
use crate::parallel;
use crate::{Element, FloatElem, Real};

/// Which of the two functions to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftmaxKind {
    /// `exp(x_i - m) / sum_j exp(x_j - m)`
    Softmax,
    /// `(x_i - m) - ln(sum_j exp(x_j - m))`
    LogSoftmax,
}

/// Softmax (or log-softmax) of every line along `dim` of a strided view. The output is
/// row-major with the view's shape. `dim < layout.rank()`.
pub fn softmax<T: FloatElem>(src: &[T], layout: &Layout, dim: usize, kind: SoftmaxKind) -> Vec<T> {
    if dim + 1 == layout.rank()
        && let Some(x) = T::as_f32(src)
        && let Some(rows) = UnitRows::new(layout)
    {
        // Every row is written by the SIMD kernel.
        let mut out = crate::buffers::for_overwrite(layout.numel());
        let out_f32 = T::as_f32_mut(&mut out).expect("T is f32");
        for_row_blocks(out_f32, rows.n, |first, out| softmax_f32(Isa::best(), x, &rows, first, out, kind));
        return out;
    }
    // Each row holds the dims from `dim` on: a row-major `[n, inner]` block whose
    // columns are the lines to normalise.
    let inner: usize = layout.shape()[dim + 1..].iter().product();
    Rows::new(layout, dim).map(src, |_, block, out| softmax_columns(block, out, inner, kind))
}

/// The gradient of [`softmax`] (or log-softmax) along `dim`, from its output `y` and the
/// gradient `g` flowing into it (same shape, any layouts): `y * (g - sum(g * y))`, or
/// `g - exp(y) * sum(g)`, the sums over each line. The result is row-major.
pub fn softmax_backward<T: FloatElem>(
    y: &[T],
    y_layout: &Layout,
    g: &[T],
    g_layout: &Layout,
    dim: usize,
    kind: SoftmaxKind,
) -> Vec<T> {
    if dim + 1 == y_layout.rank()
        && let (Some(y), Some(g)) = (T::as_f32(y), T::as_f32(g))
        && let (Some(y_rows), Some(g_rows)) = (UnitRows::new(y_layout), UnitRows::new(g_layout))
    {
        let mut out = crate::buffers::for_overwrite(y_layout.numel());
        let out_f32 = T::as_f32_mut(&mut out).expect("T is f32");
        for_row_blocks(out_f32, y_rows.n, |first, out| {
            softmax_backward_f32(Isa::best(), (y, &y_rows), (g, &g_rows), first, out, kind)
        });
        return out;
    }
    let inner: usize = y_layout.shape()[dim + 1..].iter().product();
    let g_rows = Rows::new(g_layout, dim);
    Rows::new(y_layout, dim).zip_map(y, &g_rows, g, |_, y, g, out| softmax_backward_columns(y, g, out, inner, kind))
}

/// Normalises every column of the row-major `[n, inner]` block `x` into `out`.
/// `x` is scratch: the softmax overwrites it with the shifted exponentials.
fn softmax_columns<T: FloatElem>(x: &mut [T::Acc], out: &mut [T], inner: usize, kind: SoftmaxKind) {
    let zero = <T::Acc as Element>::zero();
    let mut max = vec![T::Acc::NEG_INFINITY; inner];
    for line in x.chunks(inner) {
        for (m, &v) in max.iter_mut().zip(line) {
            *m = Real::max(*m, v);
        }
    }
    let mut sum = vec![zero; inner];
    for line in x.chunks_mut(inner) {
        for ((v, s), &m) in line.iter_mut().zip(&mut sum).zip(&max) {
            let e = (*v - m).exp();
            *s += e;
            if kind == SoftmaxKind::Softmax {
                *v = e;
            }
        }
    }
    let log_sum: Vec<T::Acc> = sum.iter().map(|s| s.ln()).collect();
    for (out_line, line) in out.chunks_mut(inner).zip(x.chunks(inner)) {
        for j in 0..inner {
            let y = match kind {
                SoftmaxKind::Softmax => line[j] / sum[j],
                SoftmaxKind::LogSoftmax => line[j] - max[j] - log_sum[j],
            };
            out_line[j] = T::from_acc(y);
        }
    }
}

/// The backward of [`softmax_columns`]: `y` and `g` are row-major `[n, inner]` blocks.
fn softmax_backward_columns<T: FloatElem>(y: &[T::Acc], g: &[T::Acc], out: &mut [T], inner: usize, kind: SoftmaxKind) {
    let mut sum = vec![<T::Acc as Element>::zero(); inner];
    for (y_line, g_line) in y.chunks(inner).zip(g.chunks(inner)) {
        for j in 0..inner {
            sum[j] += match kind {
                SoftmaxKind::Softmax => g_line[j] * y_line[j],
                SoftmaxKind::LogSoftmax => g_line[j],
            };
        }
    }
    for ((out_line, y_line), g_line) in out.chunks_mut(inner).zip(y.chunks(inner)).zip(g.chunks(inner)) {
        for j in 0..inner {
            let dx = match kind {
                SoftmaxKind::Softmax => y_line[j] * (g_line[j] - sum[j]),
                SoftmaxKind::LogSoftmax => g_line[j] - y_line[j].exp() * sum[j],
            };
            out_line[j] = T::from_acc(dx);
        }
    }
}

/// The rows of an f32 view along its last dim, when each row is contiguous in memory
/// (unit stride; the rows themselves may be anywhere): what the fused SIMD row kernels
/// of softmax and the norms read.
pub(crate) struct UnitRows {
    /// Row length.
    pub(crate) n: usize,
    starts: RowStarts,
}

/// Where each row starts in the buffer.
enum RowStarts {
    /// Row `r` starts at `first + r * n` (a contiguous view).
    Packed(usize),
    /// Row `r` starts at `starts[r]`.
    Listed(Vec<usize>),
}

impl UnitRows {
    /// The rows of `layout` (rank >= 1), or `None` if the last dim is strided.
    pub(crate) fn new(layout: &Layout) -> Option<Self> {
        let rank = layout.rank();
        let n = *layout.shape().last()?;
        if layout.is_contiguous() {
            return Some(Self { n, starts: RowStarts::Packed(layout.offset()) });
        }
        if n > 1 && layout.strides()[rank - 1] != 1 {
            return None;
        }
        let (outer_shape, outer_strides) = (&layout.shape()[..rank - 1], &layout.strides()[..rank - 1]);
        Some(Self { n, starts: RowStarts::Listed(start_offsets(outer_shape, outer_strides, layout.offset())) })
    }

    /// Row `r` of `buf`.
    #[inline(always)]
    pub(crate) fn row<'a>(&self, buf: &'a [f32], r: usize) -> &'a [f32] {
        let start = match &self.starts {
            RowStarts::Packed(first) => first + r * self.n,
            RowStarts::Listed(starts) => starts[r],
        };
        &buf[start..start + self.n]
    }
}

/// Calls `f(first_row, block)` on blocks of whole rows (of `n` elements) of `out`,
/// on the kernels' pool when `out` is large and on the calling thread otherwise.
pub(crate) fn for_row_blocks(out: &mut [f32], n: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.is_empty() || n == 0 {
        return;
    }
    if out.len() <= PARALLEL_THRESHOLD {
        return f(0, out);
    }
    let rows_per_block = rows_per_block(out.len() / n, n);
    parallel::for_each_chunk_mut(out, rows_per_block * n, |b, block| f(b * rows_per_block, block));
}

/// The rows in each block of [`for_row_blocks`], for `rows` rows of `n` values: blocks of
/// about [`ROW_BLOCK_VALUES`], at least four per thread (so that a thread that starts late
/// finds others' work to share), as many as a multiple of the thread count, so that every
/// thread gets the same number of rows.
pub(crate) fn rows_per_block(rows: usize, n: usize) -> usize {
    let threads = parallel::threads();
    let blocks = (rows * n).div_ceil(ROW_BLOCK_VALUES).max(4 * threads).next_multiple_of(threads);
    rows.div_ceil(blocks).max(1)
}

/// The values of a block of rows that [`for_row_blocks`] hands one thread at a time (1 MB
/// of f32). Each block boundary breaks the stream of rows a thread reads (the kernels
/// prefetch the next row only within a block, and the hardware prefetcher starts over):
/// against blocks of 2^14 values, same-process A/B on Zen 3 (AVX2), median ms, LayerNorm
/// of (4096, 1024) 2.03 -> 1.88-1.94 at one thread and 0.96 -> 0.90 at two, softmax
/// 1-3% faster, (4096, 256) 2-3% faster, (768, 128) and (768, 384) the same.
const ROW_BLOCK_VALUES: usize = 1 << 18;

/// The values of a row per piece of a pass that fetches the next row
/// ([`in_pieces_fetching`]): 16 cache lines of the next row asked for at a time.
const FETCH_PIECE: usize = 256;

/// `pass(piece)` over the pieces of a row of `next.len()` values ([`FETCH_PIECE`] each),
/// in order, each after asking for the same values of the `next` row
/// ([`prefetch_lines`]), so that the next row comes from memory while a pass over this
/// row runs from L1.
#[inline(always)]
pub(crate) fn in_pieces_fetching(next: &[f32], mut pass: impl FnMut(std::ops::Range<usize>)) {
    for start in (0..next.len()).step_by(FETCH_PIECE) {
        let piece = start..next.len().min(start + FETCH_PIECE);
        prefetch_lines(&next[piece.clone()]);
        pass(piece);
    }
}

kernel! {
    /// Softmax or log-softmax of whole rows `first..` of `x` into `out`, with SIMD. Each
    /// row's max is taken by the side job of the last pass over the row before it (see
    /// the module doc).
    fn softmax_f32(x: &[f32], rows: &UnitRows, first: usize, out: &mut [f32], kind: SoftmaxKind) {
        let n = rows.n;
        let count = out.len() / n.max(1);
        if count == 0 {
            return;
        }
        let mut max = max_of::<V>(rows.row(x, first));
        let mut rest = out;
        for i in 0..count {
            let (y, later) = std::mem::take(&mut rest).split_at_mut(n);
            rest = later;
            let next_y: &[f32] = rest.get(..n).unwrap_or(&[]);
            // The last row's "next" is itself, already in L1: its max is not used.
            let (row, next) = (rows.row(x, first + i), rows.row(x, first + (i + 1).min(count - 1)));
            let mut next_max = V::splat(f32::NEG_INFINITY);
            let take_next_max = |v: V| next_max = next_max.max(v);
            // The exponentials on `Wide<V>`, the rest on `V`; by `RowExp` where it takes
            // the row (a max within 2^16, and fused multiply-adds).
            let wide_max = Wide::<V>::splat(max);
            let exp = RowExp::<Wide<V>>::new(max);
            match kind {
                SoftmaxKind::Softmax => {
                    let mut sum = Wide::<V>::splat(0.0);
                    in_pieces_fetching(next, |piece| {
                        // The next row's output lines too (none after the last row).
                        if let Some(next_y_piece) = next_y.get(piece.clone()) {
                            prefetch_lines(next_y_piece);
                        }
                        let (x, e) = (&row[piece.clone()], &mut y[piece]);
                        let piece_sum = match &exp {
                            Some(exp) => map1_sum::<Wide<V>>(x, e, |v| exp.at(v)),
                            None => map1_sum::<Wide<V>>(x, e, |v| math::exp_nonpositive(v - wide_max)),
                        };
                        sum = sum + piece_sum;
                    });
                    let scale = V::splat(1.0 / sum.reduce_add());
                    update_alongside::<V>(y, |e| e * scale, next, take_next_max);
                }
                SoftmaxKind::LogSoftmax => {
                    let mut sum = 0.0;
                    in_pieces_fetching(next, |piece| {
                        let (x, len) = ([Operand::Slice(&row[piece.clone()])], piece.len());
                        let [piece_sum] = match &exp {
                            Some(exp) => sums::<Wide<V>, 1, 1>(x, len, |[v]| [exp.at(v)]),
                            None => sums::<Wide<V>, 1, 1>(x, len, |[v]| [math::exp_nonpositive(v - wide_max)]),
                        };
                        sum += piece_sum;
                    });
                    // The sum of `RowExp`'s values carries its factor: its logarithm is
                    // `log_factor` too large.
                    let log_factor = exp.map_or(0.0, |exp| exp.log_factor());
                    let (max, log_sum) = (V::splat(max), V::splat(((sum as f64).ln() - log_factor) as f32));
                    map_alongside::<V, 1>([Operand::Slice(row)], y, |[v]| (v - max) - log_sum, next, take_next_max);
                }
            }
            max = next_max.max(tail_vector::<V>(next, f32::NEG_INFINITY)).reduce_max();
        }
    }
}

kernel! {
    /// [`softmax_backward`] of whole rows `first..`, with SIMD; `y` and `g` are each a
    /// buffer and its rows.
    fn softmax_backward_f32(
        y: (&[f32], &UnitRows),
        g: (&[f32], &UnitRows),
        first: usize,
        out: &mut [f32],
        kind: SoftmaxKind,
    ) {
        let n = y.1.n;
        for (i, dx) in out.chunks_exact_mut(n).enumerate() {
            let y = Operand::Slice(y.1.row(y.0, first + i));
            let g = Operand::Slice(g.1.row(g.0, first + i));
            match kind {
                SoftmaxKind::Softmax => {
                    let [dot] = sums::<V, 2, 1>([y, g], n, |[y, g]| [y * g]);
                    let dot = V::splat(dot);
                    map::<V, 2>([y, g], dx, |[y, g]| y * (g - dot));
                }
                SoftmaxKind::LogSoftmax => {
                    let [sum] = sums::<V, 1, 1>([g], n, |[g]| [g]);
                    let sum = Wide::<V>::splat(sum);
                    // `y <= 0` (a log-probability): `exp_nonpositive` computes no subnormals
                    // (slow) for the very unlikely entries, whose `e^y` is 0 below 2^-127.
                    map::<Wide<V>, 2>([y, g], dx, |[y, g]| g - math::exp_nonpositive(y) * sum);
                }
            }
        }
    }
}

/// A strided view seen as rows: the leading `split` dims index the rows, the remaining
/// dims form each row (read row-major). Row-wise kernels (softmax, norms) read a row into
/// a scratch buffer in the accumulator type, whatever the strides, and write one
/// contiguous output row.
pub(crate) struct Rows<'a> {
    row_shape: &'a [usize],
    row_strides: &'a [usize],
    starts: Vec<usize>,
    len: usize,
}

impl<'a> Rows<'a> {
    /// Splits `layout` after its first `split` dims (`split <= rank`).
    pub(crate) fn new(layout: &'a Layout, split: usize) -> Self {
        let (outer_shape, row_shape) = layout.shape().split_at(split);
        let (outer_strides, row_strides) = layout.strides().split_at(split);
        Self {
            row_shape,
            row_strides,
            starts: start_offsets(outer_shape, outer_strides, layout.offset()),
            len: row_shape.iter().product(),
        }
    }

    /// Elements per row.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Replaces `buf` with row `row`, converted to the accumulator type.
    pub(crate) fn read<T: FloatElem>(&self, src: &[T], row: usize, buf: &mut Vec<T::Acc>) {
        buf.clear();
        for_each_offsets(self.row_shape, [self.row_strides], [self.starts[row]], |[o]| buf.push(src[o].to_acc()));
    }

    /// Computes every output row with `f(row_index, row_values, out_row)`, in parallel
    /// when the work is large. `row_values` is scratch that `f` may overwrite. Returns the
    /// rows concatenated (row-major output of the view's shape).
    pub(crate) fn map<T: FloatElem>(&self, src: &[T], f: impl Fn(usize, &mut [T::Acc], &mut [T]) + Sync) -> Vec<T> {
        self.for_each_row(
            || Vec::with_capacity(self.len),
            |buf, row, out_row| {
                self.read(src, row, buf);
                f(row, buf, out_row);
            },
        )
    }

    /// Like [`Rows::map`] over two views of the same shape read row by row together:
    /// `f(row_index, self_row, other_row, out_row)`.
    pub(crate) fn zip_map<T: FloatElem>(
        &self,
        src: &[T],
        other: &Rows,
        other_src: &[T],
        f: impl Fn(usize, &mut [T::Acc], &mut [T::Acc], &mut [T]) + Sync,
    ) -> Vec<T> {
        let scratch = || (Vec::with_capacity(self.len), Vec::with_capacity(self.len));
        self.for_each_row(scratch, |(a, b), row, out_row| {
            self.read(src, row, a);
            other.read(other_src, row, b);
            f(row, a, b, out_row);
        })
    }

    /// Calls `f(scratch, row_index, out_row)` for every output row, on the kernels' pool
    /// when the work is large (each task makes its scratch with `init`), else on the
    /// calling thread. Returns the output rows concatenated.
    fn for_each_row<T: FloatElem, S>(
        &self,
        init: impl Fn() -> S + Sync + Send,
        f: impl Fn(&mut S, usize, &mut [T]) + Sync,
    ) -> Vec<T> {
        let mut out = crate::buffers::filled(self.starts.len() * self.len, T::zero());
        if out.is_empty() {
            return out;
        }
        if out.len() <= PARALLEL_THRESHOLD {
            let mut scratch = init();
            out.chunks_mut(self.len).enumerate().for_each(|(row, out_row)| f(&mut scratch, row, out_row));
            return out;
        }
        let rows_per_task = (PARALLEL_THRESHOLD / self.len).max(1);
        parallel::for_each_chunk_mut(&mut out, rows_per_task * self.len, |task, rows| {
            let mut scratch = init();
            for (r, out_row) in rows.chunks_mut(self.len).enumerate() {
                f(&mut scratch, task * rows_per_task + r, out_row);
            }
        });
        out
    }
}

/// The buffer offset at which each index of the leading dims (`shape`, `strides`)
/// starts, in row-major order of those dims.
pub(crate) fn start_offsets(shape: &[usize], strides: &[usize], offset: usize) -> Vec<usize> {
    let mut starts = Vec::with_capacity(shape.iter().product());
    for_each_offsets(shape, [strides], [offset], |[o]| starts.push(o));
    starts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::map::testing::{data, view};
    use proptest::prelude::*;

    /// `got` (f32) is `want` (f64) up to `1e-5` relative and `abs` absolute; NaN matches NaN.
    fn assert_close(got: &[f32], want: &[f64], abs: f64, what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let ok = (g.is_nan() && w.is_nan()) || g as f64 == w || (g as f64 - w).abs() <= 1e-5 * w.abs() + abs;
            assert!(ok, "{what}[{i}] = {g}, want {w}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn f32_rows_match_the_f64_kernel_on_any_length_and_layout(
            (m, n) in (1usize..5, 1usize..70),
            (kx, kg) in (view(), view()),
            log in any::<bool>(),
            (seed, specials) in (any::<u64>(), any::<bool>()),
        ) {
            let kind = if log { SoftmaxKind::LogSoftmax } else { SoftmaxKind::Softmax };
            let (lx, lg) = (kx.layout(m, n), kg.layout(m, n));
            let (x, g) = (data(&lx, seed, specials), data(&lg, seed ^ 3, false));
            let wide = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<f64>>();
            let y = softmax(&x, &lx, 1, kind);
            assert_close(&y, &softmax(&wide(&x), &lx, 1, kind), 1e-6, "forward");
            // The backward from the f32 output, against the f64 kernel on the same values.
            let ly = Layout::contiguous(&[m, n]);
            let dx = softmax_backward(&y, &ly, &g, &lg, 1, kind);
            // The backward cancels: allow the rounding of a sum of n terms of size <= 6.
            let abs = 6.0 * n as f64 * 2f64.powi(-23);
            assert_close(&dx, &softmax_backward(&wide(&y), &ly, &wide(&g), &lg, 1, kind), abs, "backward");
        }
    }

    #[test]
    fn f32_rows_split_into_blocks_match_the_f64_kernel_on_every_thread_count() {
        // 91K and 96K values, past the parallel threshold: several blocks of rows per
        // thread; rows of 600 are two whole pieces of `in_pieces_fetching` and a part.
        for (m, n) in [(700, 130), (160, 600)] {
            let layout = Layout::contiguous(&[m, n]);
            let x: Vec<f32> = (0..m * n).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0).collect();
            let wide: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            for kind in [SoftmaxKind::Softmax, SoftmaxKind::LogSoftmax] {
                let want = softmax(&wide, &layout, 1, kind);
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let got = pool.install(|| softmax(&x, &layout, 1, kind));
                    assert_close(&got, &want, 1e-6, &format!("{kind:?} of ({m}, {n}) on {threads} threads"));
                }
            }
        }
    }

    #[test]
    fn softmax_backward_matches_finite_differences_of_the_forward() {
        // d/dx_k of sum_i w_i softmax(x)_i, along a middle dim (the generic path) and
        // along the last (the f32 path), in f64 and f32.
        let (shape, dims) = ([2usize, 3, 4], [1usize, 2]);
        let layout = Layout::contiguous(&shape);
        let x: Vec<f64> = (0..24).map(|i| ((i * 7) % 11) as f64 * 0.3 - 1.5).collect();
        let w: Vec<f64> = (0..24).map(|i| ((i * 5) % 7) as f64 * 0.2 - 0.6).collect();
        for dim in dims {
            for kind in [SoftmaxKind::Softmax, SoftmaxKind::LogSoftmax] {
                let loss = |x: &[f64]| softmax(x, &layout, dim, kind).iter().zip(&w).map(|(a, b)| a * b).sum::<f64>();
                let y = softmax(&x, &layout, dim, kind);
                let dx = softmax_backward(&y, &layout, &w, &layout, dim, kind);
                let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
                let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
                let dx32 = softmax_backward(&softmax(&x32, &layout, dim, kind), &layout, &w32, &layout, dim, kind);
                for k in 0..24 {
                    let h = 1e-6;
                    let (mut up, mut down) = (x.clone(), x.clone());
                    up[k] += h;
                    down[k] -= h;
                    let fd = (loss(&up) - loss(&down)) / (2.0 * h);
                    assert!((dx[k] - fd).abs() < 1e-8, "{kind:?} dim {dim} x[{k}]: {} vs {fd}", dx[k]);
                    assert!((dx32[k] as f64 - fd).abs() < 1e-5, "f32 {kind:?} dim {dim} x[{k}]: {} vs {fd}", dx32[k]);
                }
            }
        }
    }

    #[test]
    fn f32_rows_keep_the_special_value_semantics() {
        let inf = f32::INFINITY;
        let x = [-inf, -inf, -inf, 0.0, -inf, 1.0, f32::NAN, 2.0, 3.0, 1000.0, 1001.0, -1000.0];
        let layout = Layout::contiguous(&[4, 3]);
        let p = softmax(&x, &layout, 1, SoftmaxKind::Softmax);
        assert!(p[..3].iter().all(|v| v.is_nan()), "all -inf gives NaN: {p:?}");
        assert_eq!(p[4], 0.0, "a -inf entry gets exactly 0: {p:?}");
        assert!(p[6..9].iter().all(|v| v.is_nan()), "a NaN poisons its row: {p:?}");
        assert!(p[9..].iter().all(|v| v.is_finite()) && (p[9..].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let lp = softmax(&x, &layout, 1, SoftmaxKind::LogSoftmax);
        assert!((lp[11] - (-2001.0 - (1.0 + (-1.0f32).exp()).ln())).abs() < 1e-3, "log-softmax stays finite: {lp:?}");
    }

    #[test]
    fn f32_rows_far_from_zero_or_widely_spread_match_the_f64_kernel() {
        // Row maxima on both sides of `RowExp::MAX_ABS` (2^16; beyond it the rows take
        // `exp_nonpositive(x - max)`), rows of 50 values spread over 0.5 to 120 below it
        // (the far end's exponentials are 0 or subnormal).
        let offsets = [0.0f32, -3.5, 811.25, -4.0e4, 65_536.0, -65_536.0, 65_540.0, -1.0e5, 3.0e6];
        let spreads = [0.5f32, 10.0, 120.0];
        let (m, n) = (offsets.len() * spreads.len(), 50);
        let x: Vec<f32> = (0..m * n)
            .map(|i| {
                let (row, col) = (i / n, i % n);
                let (offset, spread) = (offsets[row / spreads.len()], spreads[row % spreads.len()]);
                offset - spread * ((col * 37 % n) as f32 / (n - 1) as f32)
            })
            .collect();
        let layout = Layout::contiguous(&[m, n]);
        let wide: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for kind in [SoftmaxKind::Softmax, SoftmaxKind::LogSoftmax] {
            // Within 1e-5 relative, or 1e-6 absolute for the probabilities near 0.
            assert_close(&softmax(&x, &layout, 1, kind), &softmax(&wide, &layout, 1, kind), 1e-6, &format!("{kind:?}"));
        }
    }

    #[test]
    fn softmax_of_a_transposed_view_normalises_each_line() {
        // [[0, 1, 2], [3, 4, 5]] transposed: lines along dim 0 are (0, 1, 2) and (3, 4, 5).
        let src: Vec<f64> = (0..6).map(f64::from).collect();
        let layout = Layout::contiguous(&[2, 3]).permute(&[1, 0]);
        let out = softmax(&src, &layout, 0, SoftmaxKind::Softmax);
        let z: f64 = (0..3).map(|i| f64::from(i).exp()).sum();
        for col in 0..2 {
            for row in 0..3 {
                let want = (row as f64).exp() / z;
                assert!((out[row * 2 + col] - want).abs() < 1e-15);
            }
        }
    }

    #[test]
    fn rows_read_a_stepped_view_row_major() {
        let src: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let layout = Layout::contiguous(&[4, 6]).strided_narrow(1, 1, 3, 2); // columns 1, 3, 5
        let rows = Rows::new(&layout, 1);
        let mut buf = Vec::new();
        rows.read(&src, 2, &mut buf);
        assert_eq!(buf, vec![13.0, 15.0, 17.0]);
    }
}

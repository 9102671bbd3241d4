//! Scaled dot-product attention, `softmax(Q K^T * scale + mask) V`, computed without
//! ever materialising the `Lq x Lk` score matrix: FlashAttention-style tiling with an
//! online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for
//! softmax"; Dao et al. 2022, "FlashAttention").
//!
//! Queries are split into blocks of [`Tiling::query_block`] rows; the kernels' pool runs
//! one task per batch entry, or per query block when there are few entries. Keys and
//! values stream through in blocks of [`Tiling::key_block`] rows, so only a `query_block x key_block` tile of scores exists
//! at any time. For each query row the kernel keeps a running max `m`, a running sum
//! `l = sum_j exp(s_j - m)` and an accumulator `acc = sum_j exp(s_j - m) v_j`. When a
//! key block raises the max to `m'`, the old terms are rescaled by `exp(m - m')`:
//!
//! ```text
//! l'   = l   * exp(m - m') + sum_j exp(s_j - m')
//! acc' = acc * exp(m - m') + sum_j exp(s_j - m') v_j
//! ```
//!
//! and the output row is `acc / l` once every key has been seen. This is exactly the
//! softmax of the whole row, in one pass over the keys. Per tile the two products,
//! `S = Q_b K_b^T` and `acc += P V_b`, are GEMMs in the accumulator type
//! (`matmul::gemm_acc`: the SIMD `sgemm` for f32).
//!
//! Masking: a boolean mask removes key `j` from query `i` where it is 0; an additive mask
//! is added to the scores (`-inf` removes a key). `causal` removes key `j` from query `i`
//! when `j > i + (Lk - Lq)`: the causal diagonal is aligned to the bottom-right corner, so
//! that with a KV cache (`Lq < Lk`, the queries being the last `Lq` positions) the last
//! query sees every key. For `Lq == Lk` this is PyTorch's `is_causal`. Key blocks that
//! the causal mask hides entirely are skipped. A query row with every key removed
//! outputs zeros (PyTorch gives NaN): there is nothing to attend to, and zeros keep
//! padded rows from poisoning the rest of a batch.

use super::matmul::{StridedMat, cast, cast_mut, gemm_acc};
use super::simd::{self, F32Vector, Isa, Wide, kernel, math};
use super::softmax::start_offsets;
use crate::buffers;
use crate::layout::Layout;
use crate::parallel;
use crate::{Element, FloatElem, Real};
use std::borrow::Cow;

/// A strided view into a buffer: the data and the layout that addresses it.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a, T> {
    pub data: &'a [T],
    pub layout: &'a Layout,
}

/// The optional mask, shaped `[batch.., Lq, Lk]` like the scores.
#[derive(Clone, Copy, Debug)]
pub enum AttentionMask<'a, T> {
    /// Every key is visible (apart from the causal mask).
    None,
    /// 1 = attend, 0 = masked out.
    Keep(Strided<'a, u8>),
    /// Added to the scaled scores before the softmax (`-inf` masks out).
    Additive(Strided<'a, T>),
}

/// Block sizes of the tiling. Any sizes >= 1 give the same result up to rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    /// Query rows per parallel task.
    pub query_block: usize,
    /// Key/value rows per step of the online softmax.
    pub key_block: usize,
}

impl Default for Tiling {
    /// 16 query rows by 128 keys: a tile of scores, and the key/value blocks for a head
    /// dim of 64, fit comfortably in L1/L2; the two products per tile are small enough
    /// for the GEMM's unpacked path, and under a causal mask short query blocks skip more
    /// of the hidden keys (a GPT baby layer's forward measured 10-15% faster than with
    /// 32-row blocks).
    fn default() -> Self {
        Self { query_block: 16, key_block: 128 }
    }
}

/// Everything besides the operands.
#[derive(Clone, Copy, Debug)]
pub struct AttentionOptions {
    /// Hide key `j` from query `i` when `j > i + (Lk - Lq)`.
    pub causal: bool,
    /// The factor on `Q K^T` (usually `1 / sqrt(D)`).
    pub scale: f64,
    pub tiling: Tiling,
}

/// Attention of `q [batch.., Lq, D]` over `k [batch.., Lk, D]` and `v [batch.., Lk, Dv]`
/// with an optional mask `[batch.., Lq, Lk]`. All four views have the same batch dims
/// (broadcast ones have stride 0) and any strides. Returns `[batch.., Lq, Dv]` row-major.
pub fn scaled_dot_product_attention<T: FloatElem>(
    q: Strided<'_, T>,
    k: Strided<'_, T>,
    v: Strided<'_, T>,
    mask: AttentionMask<'_, T>,
    options: AttentionOptions,
) -> Vec<T> {
    let problem = Problem::new(q, k, v, mask, options);
    let (lq, dv) = (problem.lq, problem.dv);
    // `attend` writes every row (zeros for a row that sees no key).
    let mut out = crate::buffers::for_overwrite(problem.q.starts.len() * lq * dv);
    if out.is_empty() {
        return out;
    }
    let query_block = options.tiling.query_block.max(1);
    // Batch entries (batch x heads) across the threads when there are enough of them,
    // else each one's query blocks.
    parallel::for_each_entry(&mut out, lq * dv, |batch, out_batch| {
        parallel::for_each_chunk_mut(out_batch, query_block * dv, |block, out_block| {
            problem.attend(batch, block * query_block, out_block);
        });
    });
    out
}

/// A stack of matrices (the last two dims of a view) over the batch dims.
pub(super) struct Matrices<'a, T> {
    data: &'a [T],
    pub(super) starts: Vec<usize>,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T: Copy> Matrices<'a, T> {
    pub(super) fn new(view: Strided<'a, T>) -> Self {
        let (shape, strides) = (view.layout.shape(), view.layout.strides());
        let batch_rank = shape.len() - 2;
        Self {
            data: view.data,
            starts: start_offsets(&shape[..batch_rank], &strides[..batch_rank], view.layout.offset()),
            row_stride: strides[batch_rank],
            col_stride: strides[batch_rank + 1],
        }
    }

    /// Element `(row, col)` of matrix `batch`.
    fn get(&self, batch: usize, row: usize, col: usize) -> T {
        self.data[self.starts[batch] + row * self.row_stride + col * self.col_stride]
    }
}

impl<T: FloatElem> Matrices<'_, T> {
    /// Rows `rows` of matrix `batch`, `cols` wide, as a GEMM operand in the accumulator
    /// type: the buffer itself, through its strides, when it already holds that type (f32,
    /// f64), else a row-major converted copy.
    pub(super) fn tile(&self, batch: usize, rows: std::ops::Range<usize>, cols: usize) -> Tile<'_, T::Acc> {
        let start = self.starts[batch] + rows.start * self.row_stride;
        if let Some(data) = cast::<T, T::Acc>(self.data)
            && !rows.is_empty()
            && cols > 0
        {
            let end = start + (rows.len() - 1) * self.row_stride + (cols - 1) * self.col_stride + 1;
            let (row_stride, col_stride) = (self.row_stride, self.col_stride);
            return Tile { data: Cow::Borrowed(&data[start..end]), row_stride, col_stride };
        }
        let mut out = Vec::with_capacity(rows.len() * cols);
        for r in rows {
            let row_start = self.starts[batch] + r * self.row_stride;
            if self.col_stride == 1 {
                out.extend(self.data[row_start..row_start + cols].iter().map(|x| x.to_acc()));
            } else {
                out.extend((0..cols).map(|c| self.data[row_start + c * self.col_stride].to_acc()));
            }
        }
        Tile { data: Cow::Owned(out), row_stride: cols, col_stride: 1 }
    }
}

/// A block of rows of one matrix as a GEMM operand: borrowed or converted (see
/// [`Matrices::tile`]).
pub(super) struct Tile<'a, A: Clone> {
    data: Cow<'a, [A]>,
    row_stride: usize,
    col_stride: usize,
}

impl<A: Clone> Tile<'_, A> {
    /// The block as it is.
    pub(super) fn mat(&self) -> StridedMat<'_, A> {
        (&self.data, self.row_stride, self.col_stride)
    }

    /// The block transposed (read through swapped strides).
    pub(super) fn mat_t(&self) -> StridedMat<'_, A> {
        (&self.data, self.col_stride, self.row_stride)
    }
}

/// The mask in the form the kernel reads it.
pub(super) enum MaskMatrices<'a, T> {
    None,
    Keep(Matrices<'a, u8>),
    Additive(Matrices<'a, T>),
}

impl<T: FloatElem> MaskMatrices<'_, T> {
    /// What the mask adds to score `(query, key)`: 0, `-inf`, or the additive value.
    pub(super) fn bias(&self, batch: usize, query: usize, key: usize) -> T::Acc {
        match self {
            Self::None => <T::Acc as Element>::zero(),
            Self::Keep(m) if m.get(batch, query, key) != 0 => <T::Acc as Element>::zero(),
            Self::Keep(_) => T::Acc::NEG_INFINITY,
            Self::Additive(m) => m.get(batch, query, key).to_acc(),
        }
    }
}

/// The operands, sizes and options of one attention call.
pub(super) struct Problem<'a, T: FloatElem> {
    pub(super) q: Matrices<'a, T>,
    pub(super) k: Matrices<'a, T>,
    pub(super) v: Matrices<'a, T>,
    pub(super) mask: MaskMatrices<'a, T>,
    pub(super) lq: usize,
    pub(super) lk: usize,
    pub(super) d: usize,
    pub(super) dv: usize,
    pub(super) scale: T::Acc,
    causal: bool,
    key_block: usize,
}

impl<'a, T: FloatElem> Problem<'a, T> {
    pub(super) fn new(
        q: Strided<'a, T>,
        k: Strided<'a, T>,
        v: Strided<'a, T>,
        mask: AttentionMask<'a, T>,
        options: AttentionOptions,
    ) -> Self {
        let dims = |view: Strided<'a, T>| {
            let s = view.layout.shape();
            (s[s.len() - 2], s[s.len() - 1])
        };
        let ((lq, d), (lk, _), (_, dv)) = (dims(q), dims(k), dims(v));
        Self {
            q: Matrices::new(q),
            k: Matrices::new(k),
            v: Matrices::new(v),
            mask: match mask {
                AttentionMask::None => MaskMatrices::None,
                AttentionMask::Keep(m) => MaskMatrices::Keep(Matrices::new(m)),
                AttentionMask::Additive(m) => MaskMatrices::Additive(Matrices::new(m)),
            },
            lq,
            lk,
            d,
            dv,
            scale: <T::Acc as Element>::from_f64(options.scale),
            causal: options.causal,
            key_block: options.tiling.key_block.max(1),
        }
    }

    /// How many keys (a prefix `0..n`) query `i` may see under the causal mask.
    pub(super) fn visible_keys(&self, query: usize) -> usize {
        if self.causal { (query + self.lk + 1).saturating_sub(self.lq).min(self.lk) } else { self.lk }
    }

    /// Turns the visible raw scores `q . k_j` of query `query` (keys from `key_start`)
    /// into the softmax's logits: scaled, plus the mask's bias.
    fn scale_and_mask(&self, batch: usize, query: usize, key_start: usize, seen: &mut [T::Acc]) {
        let scale = self.scale;
        seen.iter_mut().for_each(|s| *s *= scale);
        if !matches!(self.mask, MaskMatrices::None) {
            for (j, s) in seen.iter_mut().enumerate() {
                *s += self.mask.bias(batch, query, key_start + j);
            }
        }
    }

    /// Turns a tile of raw scores `q_i . k_j` (`width` keys per row, from `key_start`;
    /// query rows from `first`) into softmax weights, and folds them into each row's
    /// running statistics ([`RowStats`], see the module docs): with `s_j` the row's
    /// logits (scaled, plus the mask's bias), its max `m` is raised to `m'` (at least
    /// every `s_j`), its sum becomes `l exp(m - m') + sum_j exp(s_j - m')`, the scores
    /// are overwritten with `exp(s_j - m')` (0 where the causal mask hides the key), and
    /// `rescale` gets `exp(m - m')`, the factor for whatever the caller accumulated
    /// against the old max. A row whose keys are all hidden keeps its statistics
    /// (`rescale` 1) and gets zeros.
    ///
    /// f32 scores without an explicit mask (none, or causal only) take one SIMD kernel
    /// for the whole tile: per row a pass that scales, hides the keys the causal mask
    /// hides and takes the max, and one that exponentiates and sums, both on whole
    /// vectors. Against a kernel call per row for each of the max and the exponentials,
    /// scalar scaling and masking, and small buffers allocated per block of queries (now
    /// one [`buffers::scratch`]), a GPT baby layer's attention (12 x 4 heads, 64
    /// positions, head dim 32, causal; alternating builds, best of 300, AVX2 on Zen 3, one
    /// thread): forward 670-698 -> 457-475 us, backward 1704-1742 -> 1433-1534 us.
    pub(super) fn exponentiate(
        &self,
        batch: usize,
        (first, key_start): (usize, usize),
        scores: &mut [T::Acc],
        width: usize,
        stats: &mut RowStats<'_, T::Acc>,
    ) {
        let visible = |i: usize| self.visible_keys(first + i).saturating_sub(key_start).min(width);
        let RowStats { max, sum, rescale } = stats;
        if matches!(self.mask, MaskMatrices::None)
            && let (Some(scores), Some(max), Some(sum), Some(rescale)) =
                (cast_mut(scores), cast_mut(max), cast_mut(sum), cast_mut(rescale))
        {
            let scale = self.scale.to_f64() as f32;
            return exponentiate_f32(Isa::best(), scores, width, &visible, scale, [max, sum, rescale]);
        }
        let zero = <T::Acc as Element>::zero();
        for (i, row) in scores.chunks_mut(width).enumerate() {
            let (seen, hidden) = row.split_at_mut(visible(i));
            self.scale_and_mask(batch, first + i, key_start, seen);
            hidden.fill(zero);
            match raise_max(max_of(seen), &mut max[i], &mut sum[i], &mut rescale[i]) {
                Some(max) => sum[i] += exp_shifted(seen, max),
                None => seen.fill(zero), // every key of the block is masked out
            }
        }
    }

    /// Computes output rows `first..first + out.len() / dv` of batch entry `batch`.
    fn attend(&self, batch: usize, first: usize, out: &mut [T]) {
        let (d, dv) = (self.d, self.dv);
        let rows = out.len() / dv;
        let zero = <T::Acc as Element>::zero();
        let q = self.q.tile(batch, first..first + rows, d);
        // Later queries see at least as many keys, so the last row bounds the key range.
        let key_end = self.visible_keys(first + rows - 1);
        // One scratch buffer for the tile of scores and the product P V (each overwritten
        // before it is read), the accumulator and the row statistics.
        let widest = self.key_block.min(key_end);
        let mut scratch = buffers::scratch(rows * (widest + 2 * dv + 3));
        let (scores, rest) = scratch.split_at_mut(rows * widest);
        let (values, rest) = rest.split_at_mut(rows * dv);
        let (acc, rest) = rest.split_at_mut(rows * dv);
        acc.fill(zero);
        let mut stats = RowStats::new(&mut rest[..3 * rows]);
        for key_start in (0..key_end).step_by(self.key_block) {
            let keys = key_start..(key_start + self.key_block).min(key_end);
            let width = keys.len();
            let k = self.k.tile(batch, keys.clone(), d);
            let v = self.v.tile(batch, keys.clone(), dv);
            // The tile of scores S = Q_b K^T (K^T read through strides), one GEMM.
            let scores = &mut scores[..rows * width];
            gemm_acc(rows, width, d, q.mat(), k.mat_t(), scores);
            self.exponentiate(batch, (first, key_start), scores, width, &mut stats);
            // acc = acc * rescale + P V: the rows of `scores` now hold the unnormalised
            // probabilities.
            gemm_acc(rows, dv, width, (scores, width, 1), v.mat(), values);
            for ((acc_row, values_row), &r) in acc.chunks_mut(dv).zip(values.chunks(dv)).zip(&*stats.rescale) {
                for (a, &x) in acc_row.iter_mut().zip(values_row) {
                    *a = *a * r + x;
                }
            }
        }
        for ((out_row, acc_row), &l) in out.chunks_mut(dv).zip(acc.chunks(dv)).zip(&*stats.sum) {
            // l == 0 only when no key was visible: the row outputs zeros.
            let inv = if l == zero { zero } else { <T::Acc as Element>::one() / l };
            for (o, &a) in out_row.iter_mut().zip(acc_row) {
                *o = T::from_acc(a * inv);
            }
        }
        buffers::recycle(scratch);
    }
}

/// The running softmax statistics of a block of query rows (see the module docs and
/// [`Problem::exponentiate`]): each row's max `m` and sum `l`, and the factor
/// `exp(m_old - m)` by which the last tile rescaled them.
pub(super) struct RowStats<'a, A> {
    pub(super) max: &'a mut [A],
    pub(super) sum: &'a mut [A],
    pub(super) rescale: &'a mut [A],
}

impl<'a, A: Real> RowStats<'a, A> {
    /// The empty state (max `-inf`, sum 0) of `buffer.len() / 3` rows, kept in `buffer`.
    pub(super) fn new(buffer: &'a mut [A]) -> Self {
        let rows = buffer.len() / 3;
        let (max, rest) = buffer.split_at_mut(rows);
        let (sum, rescale) = rest.split_at_mut(rows);
        max.fill(A::NEG_INFINITY);
        sum.fill(A::zero());
        rescale.fill(A::one());
        Self { max, sum, rescale }
    }
}

/// Raises a row's running max `max` to the largest logit of a tile, `block_max`, and
/// rescales its sum to the new max: returns the new max, or `None` when the tile has no
/// visible key (`block_max` is `-inf`; nothing changes). `rescale` gets the factor
/// `exp(max_old - max_new)`, 1 when the max stays. The step [`Problem::exponentiate`]'s
/// two paths share.
#[inline(always)]
fn raise_max<A: Real>(block_max: A, max: &mut A, sum: &mut A, rescale: &mut A) -> Option<A> {
    *rescale = A::one();
    if block_max == A::NEG_INFINITY {
        return None;
    }
    if block_max > *max {
        // exp(-inf - finite) = 0 clears the empty initial state.
        *rescale = (*max - block_max).exp();
        *sum *= *rescale;
        *max = block_max;
    }
    Some(*max)
}

/// The largest value of `row` (`-inf` when empty): SIMD for f32.
fn max_of<A: Real>(row: &[A]) -> A {
    match cast::<_, f32>(row) {
        Some(row) => A::from_f64(f64::from(max_f32(Isa::best(), row))),
        None => row.iter().fold(A::NEG_INFINITY, |m, &s| m.max(s)),
    }
}

kernel! {
    /// [`max_of`] on f32.
    fn max_f32(row: &[f32]) -> f32 {
        simd::max_of::<V>(row)
    }
}

/// `row[j] = exp(row[j] - max)` in place (`-inf` entries become 0) for a `max` no smaller
/// than any entry; returns the sum. The
/// exponentials of attention: SIMD for f32, `Real::exp` otherwise.
fn exp_shifted<A: Real>(row: &mut [A], max: A) -> A {
    if let Some(row) = cast_mut::<_, f32>(row) {
        let sum = exp_shifted_f32(Isa::best(), row, max.to_f64() as f32);
        return A::from_f64(sum as f64);
    }
    let mut sum = A::zero();
    for s in row.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    sum
}

kernel! {
    /// [`exp_shifted`] on f32, in one pass: `max` is at least every entry of the row (a
    /// row's running max), so every exponent is `<= 0`. The tail is padded with `-inf`,
    /// whose exponential adds nothing to the sum.
    fn exp_shifted_f32(row: &mut [f32], max: f32) -> f32 {
        exp_shifted_row::<Wide<V>>(row, max)
    }
}

/// The body of [`exp_shifted_f32`], for the kernels here.
#[inline(always)]
fn exp_shifted_row<W: F32Vector>(row: &mut [f32], max: f32) -> f32 {
    let max = W::splat(max);
    let mut sum = W::splat(0.0);
    let mut vectors = row.chunks_exact_mut(W::LANES);
    for x in &mut vectors {
        let e = math::exp_nonpositive(W::load(x) - max);
        e.store(x);
        sum = sum + e;
    }
    let tail = vectors.into_remainder();
    if !tail.is_empty() {
        let e = math::exp_nonpositive(W::load_partial(tail, f32::NEG_INFINITY) - max);
        e.store_partial(tail);
        sum = sum + e;
    }
    sum.reduce_add()
}

/// `row[j] *= scale` for the first `visible` entries and `-inf` for the rest (keys the
/// causal mask hides), in place, whole vectors at a time (the hidden lanes selected away,
/// so that a row whose visible part ends mid-vector needs no partial load); returns the
/// largest result (`-inf` when nothing is visible; a NaN may or may not be returned, as
/// [`simd::max_of`]).
#[inline(always)]
fn logits_and_max<V: F32Vector>(row: &mut [f32], visible: usize, scale: f32) -> f32 {
    let (factor, hidden) = (V::splat(scale), V::splat(f32::NEG_INFINITY));
    // Lane l of the vector at j is visible while j + l < visible, i.e. l < visible - j.
    let lanes = simd::lane_indices::<V>();
    let mut max = hidden;
    let start = row.len() - row.len() % V::LANES;
    let mut vectors = row.chunks_exact_mut(V::LANES);
    for (v, x) in (&mut vectors).enumerate() {
        let seen = lanes.lt(V::splat(visible as f32 - (v * V::LANES) as f32));
        let y = V::select(seen, V::load(x) * factor, hidden);
        y.store(x);
        max = max.max(y);
    }
    let tail = vectors.into_remainder();
    for (j, x) in tail.iter_mut().enumerate() {
        *x = if start + j < visible { *x * scale } else { f32::NEG_INFINITY };
    }
    max.max(V::load_partial(tail, f32::NEG_INFINITY)).reduce_max()
}

kernel! {
    /// [`Problem::exponentiate`] of an f32 tile without an explicit mask: the rows of
    /// `scores` (`width` each) with `visible(i)` leading keys that the causal mask leaves
    /// to row `i`, and the rows' `[max, sum, rescale]`.
    fn exponentiate_f32(
        scores: &mut [f32],
        width: usize,
        visible: &dyn Fn(usize) -> usize,
        scale: f32,
        stats: [&mut [f32]; 3],
    ) {
        let [max, sum, rescale] = stats;
        for (i, row) in scores.chunks_exact_mut(width).enumerate() {
            let block_max = logits_and_max::<V>(row, visible(i), scale);
            match raise_max(block_max, &mut max[i], &mut sum[i], &mut rescale[i]) {
                // The hidden keys' -inf logits give weights of 0.
                Some(max) => sum[i] += exp_shifted_row::<Wide<V>>(row, max),
                None => row.fill(0.0), // no visible key in this block
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The f64 reference of one row of [`exponentiate_f32`]: `(weights, max, sum,
    /// rescale)` after folding `row` (raw scores, the first `visible` seen) into the
    /// statistics `(max, sum)`.
    fn exponentiate_row(row: &[f32], visible: usize, scale: f64, (max, sum): (f64, f64)) -> (Vec<f64>, f64, f64, f64) {
        let logits: Vec<f64> = row[..visible].iter().map(|&s| f64::from(s) * scale).collect();
        let block_max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if block_max == f64::NEG_INFINITY {
            return (vec![0.0; row.len()], max, sum, 1.0);
        }
        let new_max = max.max(block_max);
        let rescale = (max - new_max).exp();
        let mut weights: Vec<f64> = logits.iter().map(|l| (l - new_max).exp()).collect();
        let new_sum = sum * rescale + weights.iter().sum::<f64>();
        weights.resize(row.len(), 0.0);
        (weights, new_max, new_sum, rescale)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Two tiles in a row through the f32 kernel, on every ISA, against the f64
        /// reference: rows long enough for whole vectors and a tail, any visible prefix
        /// (none included), any scale (negative included).
        #[test]
        fn f32_tiles_fold_into_the_row_statistics_like_the_f64_reference(
            (rows, width) in (1usize..5, 1usize..70),
            scale in -1.5f64..1.5,
            seed in any::<u32>(),
        ) {
            let tiles: Vec<Vec<f32>> = (0..2u32)
                .map(|t| values(rows * width, seed ^ t).into_iter().map(|x| (x * 3.0) as f32).collect())
                .collect();
            let visible = |tile: usize, i: usize| ((seed as usize >> (4 * i + tile)) * 7 + i) % (width + 1);
            for isa in simd::test_isas() {
                let (mut max, mut sum, mut rescale) = (vec![f32::NEG_INFINITY; rows], vec![0.0; rows], vec![0.0; rows]);
                let mut want_stats = vec![(f64::NEG_INFINITY, 0.0); rows];
                for (t, tile) in tiles.iter().enumerate() {
                    let mut scores = tile.clone();
                    let stats = [&mut max[..], &mut sum[..], &mut rescale[..]];
                    exponentiate_f32(isa, &mut scores, width, &|i| visible(t, i), scale as f32, stats);
                    for i in 0..rows {
                        let row = &tile[i * width..(i + 1) * width];
                        let (weights, m, l, r) = exponentiate_row(row, visible(t, i), f64::from(scale as f32), want_stats[i]);
                        want_stats[i] = (m, l);
                        let close = |got: f32, want: f64| (f64::from(got) - want).abs() <= 1e-5 * want.abs().max(1.0);
                        for (j, (&g, &w)) in scores[i * width..(i + 1) * width].iter().zip(&weights).enumerate() {
                            prop_assert!(close(g, w), "{isa:?} tile {t} row {i} key {j}: {g} vs {w}");
                        }
                        prop_assert!(f64::from(max[i]) == m || close(max[i], m), "{isa:?} max {} vs {m}", max[i]);
                        prop_assert!(close(sum[i], l), "{isa:?} tile {t} row {i}: sum {} vs {l}", sum[i]);
                        prop_assert!(close(rescale[i], r), "{isa:?} tile {t} row {i}: rescale {} vs {r}", rescale[i]);
                    }
                }
            }
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f64> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f64 / 250.0 - 2.0).collect()
    }

    /// softmax(q k^T * scale) v for one contiguous matrix triple.
    fn naive(q: &[f64], k: &[f64], v: &[f64], lq: usize, lk: usize, d: usize, dv: usize, scale: f64) -> Vec<f64> {
        let mut out = vec![0.0; lq * dv];
        for i in 0..lq {
            let s: Vec<f64> =
                (0..lk).map(|j| scale * (0..d).map(|c| q[i * d + c] * k[j * d + c]).sum::<f64>()).collect();
            let z: f64 = s.iter().map(|x| x.exp()).sum();
            for j in 0..lk {
                for c in 0..dv {
                    out[i * dv + c] += s[j].exp() / z * v[j * dv + c];
                }
            }
        }
        out
    }

    #[test]
    fn every_tiling_gives_the_full_softmax() {
        let (lq, lk, d, dv) = (7, 23, 5, 3);
        let (q, k, v) = (values(lq * d, 1), values(lk * d, 2), values(lk * dv, 3));
        let (lq_l, lk_l, lv_l) =
            (Layout::contiguous(&[lq, d]), Layout::contiguous(&[lk, d]), Layout::contiguous(&[lk, dv]));
        let want = naive(&q, &k, &v, lq, lk, d, dv, 0.7);
        for (query_block, key_block) in [(1, 1), (2, 3), (4, 8), (7, 23), (32, 64)] {
            let options = AttentionOptions { causal: false, scale: 0.7, tiling: Tiling { query_block, key_block } };
            let got = scaled_dot_product_attention(
                Strided { data: &q, layout: &lq_l },
                Strided { data: &k, layout: &lk_l },
                Strided { data: &v, layout: &lv_l },
                AttentionMask::None,
                options,
            );
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-13, "tiling {query_block}x{key_block}: {g} vs {w}");
            }
        }
    }
}

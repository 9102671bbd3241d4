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
use crate::buffers::{for_overwrite, recycle};
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

    /// Turns a row of raw scores `q . k_j` (query `query`, keys from `key_start`) into
    /// the softmax's logits: scaled, plus the mask's bias, `-inf` where the causal mask
    /// hides the key.
    /// Returns how many leading keys of the row the causal mask leaves visible (the rest
    /// are `-inf`).
    pub(super) fn scale_and_mask(&self, batch: usize, query: usize, key_start: usize, row: &mut [T::Acc]) -> usize {
        let visible = self.visible_keys(query).saturating_sub(key_start).min(row.len());
        let (seen, hidden) = row.split_at_mut(visible);
        let scale = self.scale;
        seen.iter_mut().for_each(|s| *s *= scale);
        if !matches!(self.mask, MaskMatrices::None) {
            for (j, s) in seen.iter_mut().enumerate() {
                *s += self.mask.bias(batch, query, key_start + j);
            }
        }
        hidden.fill(T::Acc::NEG_INFINITY);
        visible
    }

    /// Computes output rows `first..first + out.len() / dv` of batch entry `batch`.
    fn attend(&self, batch: usize, first: usize, out: &mut [T]) {
        let (d, dv) = (self.d, self.dv);
        let rows = out.len() / dv;
        let zero = <T::Acc as Element>::zero();
        let q = self.q.tile(batch, first..first + rows, d);
        let mut max = vec![T::Acc::NEG_INFINITY; rows];
        let mut sum = vec![zero; rows];
        let mut acc = vec![zero; rows * dv];
        // Scratch that each product overwrites before it is read: no zero fill.
        let (mut scores, mut values) = (for_overwrite(rows * self.key_block), for_overwrite(rows * dv));
        // Later queries see at least as many keys, so the last row bounds the key range.
        let key_end = self.visible_keys(first + rows - 1);
        for key_start in (0..key_end).step_by(self.key_block) {
            let keys = key_start..(key_start + self.key_block).min(key_end);
            let width = keys.len();
            let k = self.k.tile(batch, keys.clone(), d);
            let v = self.v.tile(batch, keys.clone(), dv);
            // The tile of scores S = Q_b K^T (K^T read through strides), one GEMM.
            let scores = &mut scores[..rows * width];
            gemm_acc(rows, width, d, q.mat(), k.mat_t(), scores);
            for (i, row) in scores.chunks_mut(width).enumerate() {
                let visible = self.scale_and_mask(batch, first + i, key_start, row);
                let state = OnlineSoftmax { max: &mut max[i], sum: &mut sum[i], acc: &mut acc[i * dv..(i + 1) * dv] };
                state.update(row, visible);
            }
            // acc += P V: the rows of `scores` now hold the unnormalised probabilities.
            gemm_acc(rows, dv, width, (scores, width, 1), v.mat(), &mut values);
            for (a, &x) in acc.iter_mut().zip(&values) {
                *a += x;
            }
        }
        recycle(scores);
        recycle(values);
        for ((out_row, acc_row), &l) in out.chunks_mut(dv).zip(acc.chunks(dv)).zip(&sum) {
            // l == 0 only when no key was visible: the row outputs zeros.
            let inv = if l == zero { zero } else { <T::Acc as Element>::one() / l };
            for (o, &a) in out_row.iter_mut().zip(acc_row) {
                *o = T::from_acc(a * inv);
            }
        }
    }
}

/// The running state of one query row: max `m`, sum `l`, accumulator `acc` (see the
/// module docs).
struct OnlineSoftmax<'s, A> {
    max: &'s mut A,
    sum: &'s mut A,
    acc: &'s mut [A],
}

impl<A: Real> OnlineSoftmax<'_, A> {
    /// Folds in one block of scores `s_j`, of which only the first `visible` can be
    /// finite (the rest are hidden by the causal mask): raises the max, rescales `l` and
    /// `acc` to it, adds `sum_j exp(s_j - m')` to `l`, and overwrites the scores with
    /// `exp(s_j - m')` (0 for the hidden ones), the weights the caller then multiplies
    /// into `acc` with the block's values (`acc += P V`, one GEMM for all rows).
    fn update(self, scores: &mut [A], visible: usize) {
        let (seen, hidden) = scores.split_at_mut(visible);
        hidden.fill(A::zero());
        let block_max = max_of(seen);
        if block_max == A::NEG_INFINITY {
            seen.fill(A::zero()); // every key of the block is masked out: nothing changes
            return;
        }
        if block_max > *self.max {
            // exp(-inf - finite) = 0 clears the empty initial state.
            let rescale = (*self.max - block_max).exp();
            *self.sum *= rescale;
            for a in self.acc.iter_mut() {
                *a *= rescale;
            }
            *self.max = block_max;
        }
        *self.sum += exp_shifted(seen, *self.max);
    }
}

/// The largest value of `row` (`-inf` when empty): SIMD for f32.
pub(super) fn max_of<A: Real>(row: &[A]) -> A {
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
pub(super) fn exp_shifted<A: Real>(row: &mut [A], max: A) -> A {
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
        type W = Wide<V>;
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
}

#[cfg(test)]
mod tests {
    use super::*;

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

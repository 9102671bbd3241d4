//! Scaled dot-product attention, `softmax(Q K^T * scale + mask) V`, computed without
//! ever materialising the `Lq x Lk` score matrix: FlashAttention-style tiling with an
//! online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for
//! softmax"; Dao et al. 2022, "FlashAttention").
//!
//! Queries are split into blocks of [`Tiling::query_block`] rows, one rayon task per
//! (batch entry, query block). Keys and values stream through in blocks of
//! [`Tiling::key_block`] rows, so only a `query_block x key_block` tile of scores exists
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
//! softmax of the whole row, in one pass over the keys.
//!
//! Masking: a boolean mask removes key `j` from query `i` where it is 0; an additive mask
//! is added to the scores (`-inf` removes a key). `causal` removes key `j` from query `i`
//! when `j > i + (Lk - Lq)`: the causal diagonal is aligned to the bottom-right corner, so
//! that with a KV cache (`Lq < Lk`, the queries being the last `Lq` positions) the last
//! query sees every key. For `Lq == Lk` this is PyTorch's `is_causal`. Key blocks that
//! the causal mask hides entirely are skipped. A query row with every key removed
//! outputs zeros (PyTorch gives NaN): there is nothing to attend to, and zeros keep
//! padded rows from poisoning the rest of a batch.

use super::softmax::start_offsets;
use crate::layout::Layout;
use crate::{Element, FloatElem, Real};
use rayon::prelude::*;

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
    /// 32 query rows by 64 keys: a tile of scores, and the key/value blocks for a head
    /// dim of 64, fit comfortably in L1/L2.
    fn default() -> Self {
        Self { query_block: 32, key_block: 64 }
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
    let mut out = vec![T::zero(); problem.q.starts.len() * lq * dv];
    if out.is_empty() {
        return out;
    }
    let query_block = options.tiling.query_block.max(1);
    out.par_chunks_mut(lq * dv).enumerate().for_each(|(batch, out_batch)| {
        out_batch.par_chunks_mut(query_block * dv).enumerate().for_each(|(block, out_block)| {
            problem.attend(batch, block * query_block, out_block);
        });
    });
    out
}

/// A stack of matrices (the last two dims of a view) over the batch dims.
struct Matrices<'a, T> {
    data: &'a [T],
    starts: Vec<usize>,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T: Copy> Matrices<'a, T> {
    fn new(view: Strided<'a, T>) -> Self {
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
    /// Rows `rows` of matrix `batch`, `cols` wide, row-major in the accumulator type.
    fn tile(&self, batch: usize, rows: std::ops::Range<usize>, cols: usize) -> Vec<T::Acc> {
        rows.flat_map(|r| (0..cols).map(move |c| self.get(batch, r, c).to_acc())).collect()
    }
}

/// The mask in the form the kernel reads it.
enum MaskMatrices<'a, T> {
    None,
    Keep(Matrices<'a, u8>),
    Additive(Matrices<'a, T>),
}

impl<T: FloatElem> MaskMatrices<'_, T> {
    /// What the mask adds to score `(query, key)`: 0, `-inf`, or the additive value.
    fn bias(&self, batch: usize, query: usize, key: usize) -> T::Acc {
        match self {
            Self::None => <T::Acc as Element>::zero(),
            Self::Keep(m) if m.get(batch, query, key) != 0 => <T::Acc as Element>::zero(),
            Self::Keep(_) => T::Acc::NEG_INFINITY,
            Self::Additive(m) => m.get(batch, query, key).to_acc(),
        }
    }
}

/// The operands, sizes and options of one attention call.
struct Problem<'a, T: FloatElem> {
    q: Matrices<'a, T>,
    k: Matrices<'a, T>,
    v: Matrices<'a, T>,
    mask: MaskMatrices<'a, T>,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    scale: T::Acc,
    causal: bool,
    key_block: usize,
}

impl<'a, T: FloatElem> Problem<'a, T> {
    fn new(
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
    fn visible_keys(&self, query: usize) -> usize {
        if self.causal { (query + self.lk + 1).saturating_sub(self.lq).min(self.lk) } else { self.lk }
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
        let mut scores = vec![zero; self.key_block];
        // Later queries see at least as many keys, so the last row bounds the key range.
        let key_end = self.visible_keys(first + rows - 1);
        for key_start in (0..key_end).step_by(self.key_block) {
            let keys = key_start..(key_start + self.key_block).min(key_end);
            let k = self.k.tile(batch, keys.clone(), d);
            let v = self.v.tile(batch, keys.clone(), dv);
            for i in 0..rows {
                let query = first + i;
                let visible = keys.start..self.visible_keys(query).min(keys.end);
                let scores = &mut scores[..visible.len()];
                for (j, s) in scores.iter_mut().enumerate() {
                    let dot =
                        q[i * d..(i + 1) * d].iter().zip(&k[j * d..(j + 1) * d]).fold(zero, |s, (&a, &b)| s + a * b);
                    *s = self.scale * dot + self.mask.bias(batch, query, keys.start + j);
                }
                let state = OnlineSoftmax { max: &mut max[i], sum: &mut sum[i], acc: &mut acc[i * dv..(i + 1) * dv] };
                state.update(scores, &v);
            }
        }
        for ((out_row, acc_row), &l) in out.chunks_mut(dv).zip(acc.chunks(dv)).zip(&sum) {
            for (o, &a) in out_row.iter_mut().zip(acc_row) {
                // l == 0 only when no key was visible: the row outputs zeros.
                *o = T::from_acc(if l == zero { zero } else { a / l });
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
    /// Folds in one block of scores `s_j` and the value rows `v` (`scores.len()` rows of
    /// `acc.len()` values, row-major; extra rows are ignored).
    fn update(self, scores: &[A], v: &[A]) {
        let block_max = scores.iter().fold(A::NEG_INFINITY, |m, &s| m.max(s));
        if block_max == A::NEG_INFINITY {
            return; // every key of the block is masked out: nothing changes
        }
        let new_max = self.max.max(block_max);
        // exp(-inf - finite) = 0 clears the empty initial state.
        let rescale = (*self.max - new_max).exp();
        *self.sum *= rescale;
        for a in self.acc.iter_mut() {
            *a *= rescale;
        }
        let dv = self.acc.len();
        for (&s, v_row) in scores.iter().zip(v.chunks(dv)) {
            let p = (s - new_max).exp();
            *self.sum += p;
            for (a, &x) in self.acc.iter_mut().zip(v_row) {
                *a += p * x;
            }
        }
        *self.max = new_max;
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

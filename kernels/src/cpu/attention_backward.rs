//! The backward of scaled dot-product attention, fused: the gradients of
//! `O = softmax(Q K^T * scale + bias) V` with respect to `Q`, `K` and `V`, given the
//! output's gradient `G`, without a graph of tensor ops.
//!
//! Like FlashAttention's backward (Dao et al. 2022, Algorithm 4), it recomputes the
//! probabilities instead of storing them, one block of query rows at a time:
//!
//! ```text
//! S  = Q_b K^T * scale + bias          (hidden keys: -inf)      [bq, Lk]
//! P  = softmax(S) row by row           (a row with no visible key: zeros)
//! dV += P^T G_b                                                 [Lk, Dv]
//! dP = G_b V^T                                                  [bq, Lk]
//! dS = P * (dP - rowsum(P * dP))       (the softmax backward)
//! dQ_b = dS K * scale                                           [bq, D]
//! dK += dS^T Q_b * scale                                        [Lk, D]
//! ```
//!
//! so only a `bq x Lk` tile of scores exists at a time. The five products are GEMMs on
//! tiles in the accumulator type (`matmul::gemm_acc`: the SIMD `sgemm` for f32). Batch
//! entries run in parallel; within one, the query blocks run in order and accumulate
//! `dK` and `dV`. Under the causal mask a query block only reads the keys its last row
//! can see. Masking conventions are the forward's (`attention.rs`).

use super::attention::{AttentionMask, AttentionOptions, Matrices, Problem, RowStats, Strided};
use super::matmul::gemm_acc;
use crate::buffers::{self, for_overwrite, recycle};
use crate::parallel;
use crate::{Element, FloatElem, Real};

/// Query rows per block of the backward. Small blocks skip more of what the causal mask
/// hides (a block reads only the keys its last row sees): with 64 positions, blocks of 16
/// compute 62% of the full score matrix, blocks of 64 all of it. Measured on a GPT baby
/// layer (12 x 4 heads, 64 positions, head dim 32): 16 rows 15-25% faster than 64.
const QUERY_BLOCK: usize = 16;

/// The gradients `[dQ, dK, dV]` of attention, each row-major with the shape of its
/// (batch-broadcast) operand `[batch.., L, D]`: summing broadcast batch dims down to an
/// input's shape is the caller's. `g` is the gradient of the output `[batch.., Lq, Dv]`;
/// the other arguments are the forward's.
pub fn scaled_dot_product_attention_backward<T: FloatElem>(
    q: Strided<'_, T>,
    k: Strided<'_, T>,
    v: Strided<'_, T>,
    g: Strided<'_, T>,
    mask: AttentionMask<'_, T>,
    options: AttentionOptions,
) -> [Vec<T>; 3] {
    let problem = Problem::new(q, k, v, mask, options);
    let g = Matrices::new(g);
    let (lq, lk, d, dv) = (problem.lq, problem.lk, problem.d, problem.dv);
    let batches = problem.q.starts.len();
    if batches == 0 || lq == 0 || lk == 0 {
        // No query or no key: every gradient is zero.
        let zeros = |len| crate::buffers::filled(len, T::zero());
        return [zeros(batches * lq * d), zeros(batches * lk * d), zeros(batches * lk * dv)];
    }
    // Each batch entry's gradients in the accumulator type, `[dq | dk | dv]` side by side
    // in one buffer (one allocation, reused from call to call), in parallel; then
    // converted out. Every value is written (zeros included): no zero fill. (Allocated per
    // entry, a few kilobytes each, they were returned to the system and faulted in again
    // on every call. GPT baby layer, 12 x 4 heads, 64 positions, head dim 32, causal,
    // alternating builds, best of 200, against the build before `exponentiate` and this:
    // 1.79-1.88 -> 1.08-1.13 ms at one thread, 1.11-1.17 -> 0.59-0.70 ms at two.)
    let sizes = [lq * d, lk * d, lk * dv];
    let entry: usize = sizes.iter().sum();
    let mut grads = for_overwrite(batches * entry);
    if entry > 0 {
        parallel::for_each_chunk_mut(&mut grads, entry, |batch, grads| {
            let (dq, rest) = grads.split_at_mut(sizes[0]);
            let (dk, dv) = rest.split_at_mut(sizes[1]);
            entry_grads(&problem, &g, batch, [dq, dk, dv]);
        });
    }
    let mut outputs = sizes.map(|size| for_overwrite::<T>(batches * size));
    for (batch, grads) in grads.chunks(entry.max(1)).enumerate() {
        let mut start = 0;
        for (out, size) in outputs.iter_mut().zip(sizes) {
            write(&mut out[batch * size..][..size], &grads[start..start + size]);
            start += size;
        }
    }
    recycle(grads);
    outputs
}

fn write<T: FloatElem>(dst: &mut [T], src: &[T::Acc]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = T::from_acc(s);
    }
}

/// The gradients `[dq, dk, dv]` of batch entry `batch`, in the accumulator type, into
/// the three slices (of `lq d`, `lk d` and `lk dv` values).
fn entry_grads<T: FloatElem>(p: &Problem<'_, T>, g: &Matrices<'_, T>, batch: usize, out: [&mut [T::Acc]; 3]) {
    let (lq, d, dv) = (p.lq, p.d, p.dv);
    let zero = <T::Acc as Element>::zero();
    let [out_dq, out_dk, out_dv] = out;
    for grads in [&mut *out_dq, &mut *out_dk, &mut *out_dv] {
        grads.fill(zero);
    }
    // Later queries see at least as many keys: the last row bounds every block's keys.
    let keys_seen = p.visible_keys(lq - 1);
    let (k, v) = (p.k.tile(batch, 0..keys_seen, d), p.v.tile(batch, 0..keys_seen, dv));
    // One scratch buffer for every block, sized for the largest: probabilities, dS, one
    // product at a time for dV and dK (each overwritten before it is read), and the row
    // statistics.
    let block_rows = QUERY_BLOCK.min(lq);
    let block = block_rows * keys_seen;
    let mut scratch = buffers::scratch(2 * block + keys_seen * dv.max(d) + 3 * block_rows);
    let (probs_buf, rest) = scratch.split_at_mut(block);
    let (ds_buf, rest) = rest.split_at_mut(block);
    let (part, stats_buf) = rest.split_at_mut(keys_seen * dv.max(d));
    for first in (0..lq).step_by(QUERY_BLOCK) {
        let rows = QUERY_BLOCK.min(lq - first);
        let keys = p.visible_keys(first + rows - 1);
        if keys == 0 {
            continue; // no query of the block sees a key: zero gradients
        }
        let q_block = p.q.tile(batch, first..first + rows, d);
        let g_block = g.tile(batch, first..first + rows, dv);
        // S = Q_b K^T (K^T read through strides), then scale, bias and softmax.
        let probs = &mut probs_buf[..rows * keys];
        gemm_acc(rows, keys, d, q_block.mat(), k.mat_t(), probs);
        let mut stats = RowStats::new(&mut stats_buf[..3 * rows]);
        p.exponentiate(batch, (first, 0), probs, keys, &mut stats);
        for (row, &l) in probs.chunks_mut(keys).zip(&*stats.sum) {
            // l == 0 only when no key is visible: the row stays zeros.
            if l != zero {
                let inv = <T::Acc as Element>::one() / l;
                row.iter_mut().for_each(|s| *s *= inv);
            }
        }
        // dV[..keys] += P^T G_b.
        gemm_acc(keys, dv, rows, (probs, 1, keys), g_block.mat(), &mut part[..keys * dv]);
        add_into(&mut out_dv[..keys * dv], &part[..keys * dv]);
        // dP = G_b V^T, then dS = P (dP - rowsum(P dP)) * scale, in place.
        let ds = &mut ds_buf[..rows * keys];
        gemm_acc(rows, keys, dv, g_block.mat(), v.mat_t(), ds);
        for (ds_row, p_row) in ds.chunks_mut(keys).zip(probs.chunks(keys)) {
            let dot = dot(ds_row, p_row);
            for (x, &pr) in ds_row.iter_mut().zip(p_row) {
                *x = pr * (*x - dot) * p.scale;
            }
        }
        // dQ_b = dS K, dK[..keys] += dS^T Q_b.
        gemm_acc(rows, d, keys, (ds, keys, 1), k.mat(), &mut out_dq[first * d..(first + rows) * d]);
        gemm_acc(keys, d, rows, (ds, 1, keys), q_block.mat(), &mut part[..keys * d]);
        add_into(&mut out_dk[..keys * d], &part[..keys * d]);
    }
    buffers::recycle(scratch);
}

fn dot<A: Real>(a: &[A], b: &[A]) -> A {
    let mut partial = [A::zero(); 8];
    let (mut a8, mut b8) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut a8).zip(&mut b8) {
        for ((p, &x), &y) in partial.iter_mut().zip(x).zip(y) {
            *p += x * y;
        }
    }
    let tail = a8.remainder().iter().zip(b8.remainder()).fold(A::zero(), |s, (&x, &y)| s + x * y);
    partial.iter().fold(tail, |s, &p| s + p)
}

fn add_into<A: Real>(acc: &mut [A], part: &[A]) {
    for (a, &p) in acc.iter_mut().zip(part) {
        *a += p;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::attention::Tiling;
    use crate::layout::Layout;

    fn values(n: usize, seed: u32) -> Vec<f64> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f64 / 250.0 - 2.0).collect()
    }

    /// The loss `sum(O * G)` for one contiguous (q, k, v), causal or not, in f64.
    fn loss(q: &[f64], k: &[f64], v: &[f64], g: &[f64], dims: [usize; 4], causal: bool) -> f64 {
        let [lq, lk, d, dv] = dims;
        let mut total = 0.0;
        for i in 0..lq {
            let visible = if causal { (i + lk + 1).saturating_sub(lq).min(lk) } else { lk };
            let s: Vec<f64> =
                (0..visible).map(|j| 0.6 * (0..d).map(|c| q[i * d + c] * k[j * d + c]).sum::<f64>()).collect();
            let z: f64 = s.iter().map(|x| x.exp()).sum();
            for (j, sj) in s.iter().enumerate() {
                for c in 0..dv {
                    total += sj.exp() / z * v[j * dv + c] * g[i * dv + c];
                }
            }
        }
        total
    }

    #[test]
    fn gradients_match_central_differences_of_the_loss() {
        // Several query blocks (lq > QUERY_BLOCK), causal with Lq < Lk (a KV-cache shape)
        // and not, in f64.
        for (causal, dims) in [(false, [70, 9, 3, 2]), (true, [70, 75, 3, 2]), (true, [5, 5, 4, 4])] {
            let [lq, lk, d, dv] = dims;
            let (q, k, v, g) = (values(lq * d, 1), values(lk * d, 2), values(lk * dv, 3), values(lq * dv, 4));
            let layouts = [Layout::contiguous(&[lq, d]), Layout::contiguous(&[lk, d]), Layout::contiguous(&[lk, dv])];
            let g_layout = Layout::contiguous(&[lq, dv]);
            let options = AttentionOptions { causal, scale: 0.6, tiling: Tiling::default() };
            let [dq, dk, dv_got] = scaled_dot_product_attention_backward(
                Strided { data: &q, layout: &layouts[0] },
                Strided { data: &k, layout: &layouts[1] },
                Strided { data: &v, layout: &layouts[2] },
                Strided { data: &g, layout: &g_layout },
                AttentionMask::None,
                options,
            );
            let h = 1e-6;
            let mut operands = [q, k, v];
            for (which, got) in [dq, dk, dv_got].iter().enumerate() {
                for idx in (0..got.len()).step_by(7) {
                    let x = operands[which][idx];
                    operands[which][idx] = x + h;
                    let up = loss(&operands[0], &operands[1], &operands[2], &g, dims, causal);
                    operands[which][idx] = x - h;
                    let down = loss(&operands[0], &operands[1], &operands[2], &g, dims, causal);
                    operands[which][idx] = x;
                    let want = (up - down) / (2.0 * h);
                    assert!(
                        (got[idx] - want).abs() < 1e-6 * (1.0 + want.abs()),
                        "operand {which}[{idx}]: {} vs {want}",
                        got[idx]
                    );
                }
            }
        }
    }
}

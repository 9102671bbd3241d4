//! Batched matrix multiply `C[b] = A[b] @ B[b]` over strided operands.
//!
//! The tensor layer broadcasts the batch dims, so both layouts arrive as
//! `[batch..., m, k]` and `[batch..., k, n]` with identical batch dims (stride 0 where a
//! batch is shared). Each batch's A and B are packed once into contiguous row-major
//! buffers in the accumulator type (which also widens f16/bf16), then the output rows
//! are computed in parallel with an i-k-j loop whose inner loop is a contiguous
//! `c_row += a_ik * b_row` that the compiler vectorises.
//!
//! This is the reference GEMM: clear, correct for every stride pattern, and a few times
//! off the machine's peak. The packed, register-blocked SIMD GEMM replaces the inner
//! product behind this same function.

use crate::layout::{Layout, for_each_offsets};
use crate::{Element, FloatElem};
use rayon::prelude::*;

/// One batch's A and B, packed row-major in the accumulator type.
type PackedPair<T> = (Vec<<T as FloatElem>::Acc>, Vec<<T as FloatElem>::Acc>);

/// Copies the `rows x cols` matrix at `offset` (strides `rs`, `cs`) into a row-major
/// buffer of the accumulator type.
fn pack<T: FloatElem>(src: &[T], offset: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> Vec<T::Acc> {
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row = offset + r * rs;
        out.extend((0..cols).map(|c| src[row + c * cs].to_acc()));
    }
    out
}

/// `[batch..., m, k] @ [batch..., k, n] -> [batch..., m, n]`, row-major.
pub fn matmul<T: FloatElem>(a: &[T], la: &Layout, b: &[T], lb: &Layout) -> Vec<T> {
    let rank = la.rank();
    debug_assert!(rank >= 2 && lb.rank() == rank);
    let (m, k, n) = (la.shape()[rank - 2], la.shape()[rank - 1], lb.shape()[rank - 1]);
    let batch_shape = &la.shape()[..rank - 2];
    let mut batch_offsets = Vec::new();
    for_each_offsets(
        batch_shape,
        [&la.strides()[..rank - 2], &lb.strides()[..rank - 2]],
        [la.offset(), lb.offset()],
        |o| batch_offsets.push(o),
    );
    let (ars, acs) = (la.strides()[rank - 2], la.strides()[rank - 1]);
    let (brs, bcs) = (lb.strides()[rank - 2], lb.strides()[rank - 1]);
    let packed: Vec<PackedPair<T>> =
        batch_offsets.iter().map(|&[oa, ob]| (pack(a, oa, m, k, ars, acs), pack(b, ob, k, n, brs, bcs))).collect();

    let mut out = vec![T::zero(); batch_offsets.len() * m * n];
    if n == 0 {
        return out;
    }
    let compute_row = |row: usize, c: &mut [T]| {
        let (batch, i) = (row / m, row % m);
        let (pa, pb) = &packed[batch];
        let mut acc = vec![<T::Acc as Element>::zero(); n];
        for p in 0..k {
            let aik = pa[i * k + p];
            for (c_j, &b_pj) in acc.iter_mut().zip(&pb[p * n..(p + 1) * n]) {
                *c_j += aik * b_pj;
            }
        }
        for (dst, v) in c.iter_mut().zip(acc) {
            *dst = T::from_acc(v);
        }
    };
    if out.len() * k >= super::map::PARALLEL_THRESHOLD {
        out.par_chunks_mut(n).enumerate().for_each(|(row, c)| compute_row(row, c));
    } else {
        out.chunks_mut(n).enumerate().for_each(|(row, c)| compute_row(row, c));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_by_two_product() {
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b = [5.0f32, 6.0, 7.0, 8.0];
        let l = Layout::contiguous(&[2, 2]);
        assert_eq!(matmul(&a, &l, &b, &l), vec![19.0, 22.0, 43.0, 50.0]);
        // A^T B through strides alone: [[1,3],[2,4]] @ B = [[26, 30], [38, 44]].
        assert_eq!(matmul(&a, &l.permute(&[1, 0]), &b, &l), vec![26.0, 30.0, 38.0, 44.0]);
    }
}

//! Batched matrix multiply `C[b] = A[b] @ B[b]` over strided operands.
//!
//! The tensor layer broadcasts the batch dims, so both layouts arrive as
//! `[batch..., m, k]` and `[batch..., k, n]` with identical batch dims (stride 0 where a
//! batch is shared). Each batch's A and B are packed once into contiguous row-major
//! buffers in the accumulator type (which also widens f16/bf16), then the output rows
//! are computed in parallel with an i-k-j loop whose inner loop is a contiguous
//! `c_row += a_ik * b_row` that the compiler vectorises.
//!
//! That reference path serves f64, f16 and bf16. f32 goes to the packed,
//! register-blocked SIMD GEMM in [`super::gemm`], one call per batch, which reads the
//! strided operands directly.

use super::gemm::{MatRef, sgemm};
use crate::layout::{Layout, for_each_offsets};
use crate::{Element, FloatElem, Real};
use rayon::prelude::*;
use std::any::TypeId;

/// `slice` viewed as f32s, when `T` is f32.
pub(crate) fn as_f32<T: 'static>(slice: &[T]) -> Option<&[f32]> {
    (TypeId::of::<T>() == TypeId::of::<f32>()).then(|| {
        // SAFETY: `T` is `f32` (same `TypeId`), so pointer and length describe the same f32s.
        unsafe { std::slice::from_raw_parts(slice.as_ptr().cast::<f32>(), slice.len()) }
    })
}

/// `slice` viewed mutably as f32s, when `T` is f32.
pub(crate) fn as_f32_mut<T: 'static>(slice: &mut [T]) -> Option<&mut [f32]> {
    (TypeId::of::<T>() == TypeId::of::<f32>()).then(|| {
        // SAFETY: `T` is `f32` (same `TypeId`), so pointer and length describe the same f32s,
        // and the exclusive borrow moves from `slice` to the result.
        unsafe { std::slice::from_raw_parts_mut(slice.as_mut_ptr().cast::<f32>(), slice.len()) }
    })
}

/// The f32 path: one [`sgemm`] per batch, batches in parallel when the work is large.
fn matmul_f32(a: &[f32], b: &[f32], out: &mut [f32], dims: [usize; 3], strides: [usize; 4], batches: &[[usize; 2]]) {
    let [m, k, n] = dims;
    let [ars, acs, brs, bcs] = strides;
    if out.is_empty() {
        return;
    }
    let one_batch = |(c, &[oa, ob]): (&mut [f32], &[usize; 2])| {
        let a = MatRef { data: a, offset: oa, row_stride: ars, col_stride: acs };
        let b = MatRef { data: b, offset: ob, row_stride: brs, col_stride: bcs };
        sgemm(m, n, k, a, b, c)
    };
    if out.len() * k >= super::map::PARALLEL_THRESHOLD {
        out.par_chunks_mut(m * n).zip(batches).for_each(one_batch);
    } else {
        out.chunks_mut(m * n).zip(batches).for_each(one_batch);
    }
}

/// One strided matrix operand of [`gemm_acc`]: the data, its row stride and column stride.
pub(crate) type StridedMat<'a, A> = (&'a [A], usize, usize);

/// `c = a @ b` for one `m x k` by `k x n` product in an accumulator type, `c` row-major:
/// [`sgemm`] for f32, the i-k-j reference loop otherwise. For kernels that multiply
/// small tiles of their own (the attention backward).
pub(crate) fn gemm_acc<A: Real>(m: usize, n: usize, k: usize, a: StridedMat<A>, b: StridedMat<A>, c: &mut [A]) {
    if let (Some(ad), Some(bd), Some(cd)) = (as_f32(a.0), as_f32(b.0), as_f32_mut(c)) {
        let a = MatRef { data: ad, offset: 0, row_stride: a.1, col_stride: a.2 };
        let b = MatRef { data: bd, offset: 0, row_stride: b.1, col_stride: b.2 };
        return sgemm(m, n, k, a, b, cd);
    }
    for i in 0..m {
        let row = &mut c[i * n..(i + 1) * n];
        row.fill(A::zero());
        for p in 0..k {
            let aip = a.0[i * a.1 + p * a.2];
            for (j, c_ij) in row.iter_mut().enumerate() {
                *c_ij += aip * b.0[p * b.1 + j * b.2];
            }
        }
    }
}

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
///
/// f32 runs on the SIMD [`sgemm`]; the other types on the reference loop below.
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
    let mut out = crate::buffers::for_overwrite(batch_offsets.len() * m * n);
    if let (Some(a), Some(b), Some(c)) = (as_f32(a), as_f32(b), as_f32_mut(&mut out)) {
        matmul_f32(a, b, c, [m, k, n], [ars, acs, brs, bcs], &batch_offsets);
        return out;
    }
    let packed: Vec<PackedPair<T>> =
        batch_offsets.iter().map(|&[oa, ob]| (pack(a, oa, m, k, ars, acs), pack(b, ob, k, n, brs, bcs))).collect();

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

    #[test]
    fn f32_sgemm_path_matches_f64_reference_on_batched_transposed_operands() {
        // A: [3, 5, 7] with its last two dims transposed; B: [7, 9] broadcast over the batch.
        let a64: Vec<f64> = (0..3 * 7 * 5).map(|i| ((i * 37) % 11) as f64 - 5.0).collect();
        let b64: Vec<f64> = (0..7 * 9).map(|i| ((i * 13) % 7) as f64 - 3.0).collect();
        let la = Layout::contiguous(&[3, 7, 5]).permute(&[0, 2, 1]);
        let lb = Layout::contiguous(&[7, 9]).unsqueeze(0).broadcast_to(&[3, 7, 9]);
        let want = matmul(&a64, &la, &b64, &lb);
        let a32: Vec<f32> = a64.iter().map(|&v| v as f32).collect();
        let b32: Vec<f32> = b64.iter().map(|&v| v as f32).collect();
        let got = matmul(&a32, &la, &b32, &lb);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(*g as f64, *w, "small integers multiply exactly in f32");
        }
    }
}

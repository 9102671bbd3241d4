//! Batched matrix multiply `C[b] = act(A[b] @ B[b] + bias)` over strided operands.
//!
//! The tensor layer broadcasts the batch dims, so both layouts arrive as
//! `[batch..., m, k]` and `[batch..., k, n]` with identical batch dims (stride 0 where a
//! batch is shared). f32, f16 and bf16 go to the packed, register-blocked SIMD GEMM in
//! [`super::gemm`], one call per batch, which reads the strided operands directly
//! (widening half-precision values as it packs them) and applies the optional bias and
//! activation in its epilogue; half-precision results are rounded once from the f32
//! accumulators. f64 takes a reference path: each batch's A and B are packed into
//! contiguous row-major buffers, then the output rows are computed in parallel with an
//! i-k-j loop whose inner loop is a contiguous `c_row += a_ik * b_row` that the compiler
//! vectorises, and the bias and activation follow.

use super::gemm::{Epilogue, GemmInput, MatRef, PARALLEL_MIN_WORK, gemm, sgemm};
use super::unary::UnaryOp;
use crate::layout::{Layout, for_each_offsets};
use crate::parallel;
use crate::{Element, FloatElem, Real};
use half::{bf16, f16};
use std::any::TypeId;

/// `slice` viewed as `[U]`, when `T` is `U`.
pub(crate) fn cast<T: 'static, U: 'static>(slice: &[T]) -> Option<&[U]> {
    (TypeId::of::<T>() == TypeId::of::<U>()).then(|| {
        // SAFETY: `T` is `U` (same `TypeId`), so pointer and length describe the same values.
        unsafe { std::slice::from_raw_parts(slice.as_ptr().cast::<U>(), slice.len()) }
    })
}

/// `slice` viewed mutably as `[U]`, when `T` is `U`.
pub(crate) fn cast_mut<T: 'static, U: 'static>(slice: &mut [T]) -> Option<&mut [U]> {
    (TypeId::of::<T>() == TypeId::of::<U>()).then(|| {
        // SAFETY: `T` is `U` (same `TypeId`), so pointer and length describe the same
        // values, and the exclusive borrow moves from `slice` to the result.
        unsafe { std::slice::from_raw_parts_mut(slice.as_mut_ptr().cast::<U>(), slice.len()) }
    })
}

/// The shape of one batched product: `[m, k, n]`, A's and B's strides
/// `[a_row, a_col, b_row, b_col]`, and each batch's `[a_offset, b_offset]`.
struct Batches<'a> {
    dims: [usize; 3],
    strides: [usize; 4],
    offsets: &'a [[usize; 2]],
}

/// The GEMM path: one [`gemm`] per batch into `out` (f32 accumulators), batches in
/// parallel when the work is large.
fn gemm_batches<T: GemmInput>(a: &[T], b: &[T], out: &mut [f32], batches: &Batches, epilogue: Epilogue) {
    let [m, k, n] = batches.dims;
    let [ars, acs, brs, bcs] = batches.strides;
    if out.is_empty() {
        return;
    }
    let one_batch = |(c, &[oa, ob]): (&mut [f32], &[usize; 2])| {
        let a = MatRef { data: a, offset: oa, row_stride: ars, col_stride: acs };
        let b = MatRef { data: b, offset: ob, row_stride: brs, col_stride: bcs };
        gemm(m, n, k, a, b, c, epilogue)
    };
    // Batches in parallel when there are enough of them to share out evenly, or when each
    // is too small for the GEMM to split; otherwise one after another, each GEMM split
    // over the threads.
    let count = batches.offsets.len();
    let many = count >= 2 * parallel::threads() || m * n * k < PARALLEL_MIN_WORK;
    if count > 1 && many && out.len() * k >= super::map::PARALLEL_THRESHOLD {
        parallel::for_each_chunk_mut(out, m * n, |batch, c| one_batch((c, &batches.offsets[batch])));
    } else {
        out.chunks_mut(m * n).zip(batches.offsets).for_each(one_batch);
    }
}

/// The half-precision path: the GEMM into f32 accumulators (bias widened), each result
/// rounded once to `H`.
fn gemm_batches_half<H: GemmInput + FloatElem<Acc = f32>>(
    a: &[H],
    b: &[H],
    bias: Option<&[H]>,
    activation: Option<UnaryOp>,
    batches: &Batches,
    out: &mut [H],
) {
    let mut acc: Vec<f32> = crate::buffers::for_overwrite(out.len());
    let bias: Option<Vec<f32>> = bias.map(|bias| bias.iter().map(|v| v.to_f32()).collect());
    gemm_batches(a, b, &mut acc, batches, Epilogue { bias: bias.as_deref(), activation });
    out.iter_mut().zip(&acc).for_each(|(o, &v)| *o = H::from_acc(v));
    crate::buffers::recycle(acc);
}

/// One strided matrix operand of [`gemm_acc`]: the data, its row stride and column stride.
pub(crate) type StridedMat<'a, A> = (&'a [A], usize, usize);

/// `c = a @ b` for one `m x k` by `k x n` product in an accumulator type, `c` row-major:
/// [`sgemm`] for f32, the i-k-j reference loop otherwise. For kernels that multiply
/// small tiles of their own (the attention backward).
pub(crate) fn gemm_acc<A: Real>(m: usize, n: usize, k: usize, a: StridedMat<A>, b: StridedMat<A>, c: &mut [A]) {
    if let (Some(ad), Some(bd), Some(cd)) = (cast::<A, f32>(a.0), cast::<A, f32>(b.0), cast_mut::<A, f32>(c)) {
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
pub fn matmul<T: FloatElem>(a: &[T], la: &Layout, b: &[T], lb: &Layout) -> Vec<T> {
    matmul_fused(a, la, b, lb, None, None)
}

/// `activation(A @ B + bias)` for `[batch..., m, k] @ [batch..., k, n]`, row-major
/// `[batch..., m, n]`: the bias (`n` values, contiguous) is added to every row, then the
/// activation (an op with an f32 kernel, [`UnaryOp::has_f32_kernel`]) is applied, in the
/// GEMM's epilogue for f32, f16 and bf16.
///
/// # Panics
/// If the bias does not hold `n` values or the activation has no f32 kernel.
pub fn matmul_fused<T: FloatElem>(
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
    bias: Option<&[T]>,
    activation: Option<UnaryOp>,
) -> Vec<T> {
    let rank = la.rank();
    debug_assert!(rank >= 2 && lb.rank() == rank);
    let (m, k, n) = (la.shape()[rank - 2], la.shape()[rank - 1], lb.shape()[rank - 1]);
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "matmul: the bias holds {} values, expected n = {n}", bias.len());
    }
    if let Some(op) = activation {
        assert!(op.has_f32_kernel(), "matmul: the activation {} has no f32 kernel", op.name());
    }
    let batch_shape = &la.shape()[..rank - 2];
    let mut offsets = Vec::new();
    for_each_offsets(
        batch_shape,
        [&la.strides()[..rank - 2], &lb.strides()[..rank - 2]],
        [la.offset(), lb.offset()],
        |o| offsets.push(o),
    );
    let strides = [la.strides()[rank - 2], la.strides()[rank - 1], lb.strides()[rank - 2], lb.strides()[rank - 1]];
    let batches = Batches { dims: [m, k, n], strides, offsets: &offsets };
    let mut out = crate::buffers::for_overwrite(offsets.len() * m * n);
    if let (Some(a), Some(b), Some(c)) = (T::as_f32(a), T::as_f32(b), T::as_f32_mut(&mut out)) {
        let bias = bias.map(|bias| T::as_f32(bias).expect("T is f32"));
        gemm_batches(a, b, c, &batches, Epilogue { bias, activation });
    } else if let (Some(a), Some(b), Some(c)) = (cast::<T, bf16>(a), cast::<T, bf16>(b), cast_mut::<T, bf16>(&mut out))
    {
        gemm_batches_half(a, b, bias.map(|bias| cast(bias).expect("T is bf16")), activation, &batches, c);
    } else if let (Some(a), Some(b), Some(c)) = (cast::<T, f16>(a), cast::<T, f16>(b), cast_mut::<T, f16>(&mut out)) {
        gemm_batches_half(a, b, bias.map(|bias| cast(bias).expect("T is f16")), activation, &batches, c);
    } else {
        reference_matmul(a, b, bias, activation, &batches, &mut out);
    }
    out
}

/// The reference path (f64): packed row-major batches, an i-k-j loop per output row in
/// the accumulator type, then the bias and activation.
fn reference_matmul<T: FloatElem>(
    a: &[T],
    b: &[T],
    bias: Option<&[T]>,
    activation: Option<UnaryOp>,
    batches: &Batches,
    out: &mut [T],
) {
    let [m, k, n] = batches.dims;
    let [ars, acs, brs, bcs] = batches.strides;
    if n == 0 {
        return;
    }
    let packed: Vec<PackedPair<T>> =
        batches.offsets.iter().map(|&[oa, ob]| (pack(a, oa, m, k, ars, acs), pack(b, ob, k, n, brs, bcs))).collect();
    let bias: Option<Vec<T::Acc>> = bias.map(|bias| bias.iter().map(|v| v.to_acc()).collect());
    let compute_row = |row: usize, c: &mut [T]| {
        let (batch, i) = (row / m, row % m);
        let (pa, pb) = &packed[batch];
        let mut acc = bias.clone().unwrap_or_else(|| vec![<T::Acc as Element>::zero(); n]);
        for p in 0..k {
            let aik = pa[i * k + p];
            for (c_j, &b_pj) in acc.iter_mut().zip(&pb[p * n..(p + 1) * n]) {
                *c_j += aik * b_pj;
            }
        }
        for (dst, v) in c.iter_mut().zip(acc) {
            *dst = T::from_acc(activation.map_or(v, |op| op.apply(v)));
        }
    };
    if out.len() * k >= super::map::PARALLEL_THRESHOLD {
        parallel::for_each_chunk_mut(out, n, compute_row);
    } else {
        out.chunks_mut(n).enumerate().for_each(|(row, c)| compute_row(row, c));
    }
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

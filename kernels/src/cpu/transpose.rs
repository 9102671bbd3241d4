//! Out-of-place transpose of a strided block of f32: `dst[j * dst_stride + i] =
//! src[i * src_stride + j]`. With AVX2 (and on AVX-512 CPUs) 8 x 8 blocks go through
//! registers (eight row loads, the shuffles of `gemm`'s packing, eight row stores);
//! the edges, and other CPUs, copy value by value. Convolutions use it for their
//! channels-last copies (`conv_weight_grad::channels_last_rows`), a transpose of each
//! image row's `[channels][width]` values, and the GEMM to turn a product it computed
//! transposed (few rows: `C^T = B^T A^T`) back into C.

use super::gemm::Isa;

/// `dst[j * dst_stride + i] = src[i * src_stride + j]` for `i < rows`, `j < cols`; the
/// rest of `dst` is left as it was.
///
/// # Panics
/// If a block reaches past its slice, or this CPU does not support `isa`.
pub(super) fn transpose(
    isa: Isa,
    src: &[f32],
    src_stride: usize,
    dst: &mut [f32],
    dst_stride: usize,
    [rows, cols]: [usize; 2],
) {
    assert!(isa.is_available(), "transpose: {isa:?} is not supported by this CPU");
    if rows == 0 || cols == 0 {
        return;
    }
    assert!((rows - 1) * src_stride + cols <= src.len(), "transpose: {rows} x {cols} reaches past the source");
    assert!((cols - 1) * dst_stride + rows <= dst.len(), "transpose: {cols} x {rows} reaches past the destination");
    let (block_rows, block_cols) = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 => {
            // SAFETY: this CPU supports `isa` (asserted above; AVX2 and FMA are part of
            // both), and the blocks are inside the slices (asserted above).
            unsafe { x86::blocks_avx2(src, src_stride, dst, dst_stride, [rows, cols]) };
            (rows / 8 * 8, cols / 8 * 8)
        }
        _ => (0, 0),
    };
    // What the blocks left: the columns past them in their rows, then the rows past them.
    for i in 0..rows {
        let first = if i < block_rows { block_cols } else { 0 };
        for j in first..cols {
            dst[j * dst_stride + i] = src[i * src_stride + j];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::cpu::gemm::x86::transpose8;
    use std::arch::x86_64::*;

    /// The whole 8 x 8 blocks of [`super::transpose`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and the `rows x cols` block of `src` and its
    /// transpose in `dst` must be inside the slices.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn blocks_avx2(
        src: &[f32],
        src_stride: usize,
        dst: &mut [f32],
        dst_stride: usize,
        [rows, cols]: [usize; 2],
    ) {
        let (src, dst) = (src.as_ptr(), dst.as_mut_ptr());
        for i0 in (0..rows / 8 * 8).step_by(8) {
            for j0 in (0..cols / 8 * 8).step_by(8) {
                // SAFETY: rows `i0..i0 + 8` and columns `j0..j0 + 8` are inside the block,
                // which is inside both slices (the caller's contract).
                unsafe {
                    let rows = std::array::from_fn(|r| _mm256_loadu_ps(src.add((i0 + r) * src_stride + j0)));
                    for (c, column) in transpose8(rows).into_iter().enumerate() {
                        _mm256_storeu_ps(dst.add((j0 + c) * dst_stride + i0), column);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Against the definition on every ISA, with gaps between the rows of both
        /// sides, sizes around the 8 x 8 blocks, and `dst`'s other values untouched.
        #[test]
        fn transpose_matches_its_definition(
            rows in 0usize..20, cols in 0usize..20, src_gap in 0usize..3, dst_gap in 0usize..3,
        ) {
            let (src_stride, dst_stride) = (cols + src_gap, rows + dst_gap);
            let src: Vec<f32> = (0..rows * src_stride).map(|v| v as f32).collect();
            for isa in crate::cpu::simd::test_isas() {
                let mut dst = vec![-1.0; cols * dst_stride];
                transpose(isa, &src, src_stride, &mut dst, dst_stride, [rows, cols]);
                for (k, &v) in dst.iter().enumerate() {
                    let (j, i) = (k / dst_stride.max(1), k % dst_stride.max(1));
                    let want = if i < rows && j < cols { src[i * src_stride + j] } else { -1.0 };
                    prop_assert_eq!(v, want, "{:?}: [{}][{}] of {} x {}", isa, j, i, rows, cols);
                }
            }
        }
    }
}

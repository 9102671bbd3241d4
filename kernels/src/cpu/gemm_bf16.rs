//! bf16 GEMM on the CPU's bf16 dot-product instruction, AVX512_BF16 `vdpbf16ps`.
//!
//! `vdpbf16ps acc, a, b` reads each 32-bit lane of `a` and `b` as a pair of bf16 values
//! and adds both products to that lane of the f32 accumulator:
//! `acc[i] += a[2i] b[2i] + a[2i + 1] b[2i + 1]` (Intel SDM, "VDPBF16PS"). A product of
//! two bf16 values is exact in f32; the additions round to nearest even, and denormal
//! inputs and results are flushed to zero. One instruction does two depth steps of an
//! f32 FMA's work, so on a core that issues it as often as an FMA the bf16 product runs
//! at twice the f32 peak.
//!
//! The blocked GEMM of [`super::gemm`] runs unchanged around it: only the packing
//! ([`Bf16Pairs`]) and the microkernel differ. A packed word is a pair of consecutive
//! depth steps: in an A sliver `(A[i, p], A[i, p + 1])` for one row `i`, in a B sliver
//! `(B[p, j], B[p + 1, j])` for one column `j`; an odd depth pads its last pair with a
//! zero. The microkernel is the f32 AVX-512 kernel's 14 x 32 tile with the A word
//! broadcast to every lane and `vdpbf16ps` in place of the FMA, so a tile takes half as
//! many steps.
//!
//! Packing, by the operand's layout:
//! - depth contiguous (a row-major A; a B that is a transposed row-major matrix, such as
//!   a linear layer's weight): each pair is already one 32-bit word in memory, and the
//!   f32 path's 8 x 8 transposing pack moves the words;
//! - lanes contiguous (a row-major B): two rows of B interleaved 16 bits at a time;
//! - any other strides: value by value.
//!
//! Used for bf16 operands when the CPU has AVX512_BF16 ([`has_dot_product`]) but not
//! AMX (`gemm_amx.rs`, faster where present); without either, bf16 operands are widened
//! to f32 as they are packed (see [`super::gemm`]).

use super::gemm::x86::{AVX512_MR, AVX512_NR, PACK_MAX_LANES, pack_lines_avx2, two_vector_microkernel};
use super::gemm::{Isa, KC, MatRef, Operand, Packing};
use half::bf16;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Whether this CPU has the bf16 dot product (AVX512_BF16 with AVX-512F), detected once.
pub(super) fn has_dot_product() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"))
}

/// bf16 operands packed as pairs of consecutive depth steps in 32-bit words.
pub(super) struct Bf16Pairs;

/// The word holding `first` (the lower 16 bits, the earlier depth step) and `second`.
#[inline(always)]
fn pair(first: bf16, second: bf16) -> u32 {
    u32::from(first.to_bits()) | (u32::from(second.to_bits()) << 16)
}

/// Word `q` of a line of depth-contiguous values: elements `2q` and `2q + 1`, the second
/// zero past the line's end.
#[inline(always)]
fn pair_at(line: &[bf16], q: usize) -> u32 {
    pair(line[2 * q], line.get(2 * q + 1).copied().unwrap_or(bf16::ZERO))
}

impl Packing<bf16> for Bf16Pairs {
    type Word = u32;
    const DEPTH_PER_WORD: usize = 2;
    // Twice the f32 depth: the same bytes per sliver.
    const KC: usize = 2 * KC;

    fn pack_sliver<const W: usize>(
        x: MatRef<bf16>,
        _: Operand,
        lane0: usize,
        lane_end: usize,
        pc: usize,
        depth: usize,
        sliver: &mut [[u32; W]],
    ) {
        let lanes = W.min(lane_end - lane0);
        debug_assert_eq!(sliver.len(), depth.div_ceil(2));
        if x.col_stride == 1 && W <= PACK_MAX_LANES && Isa::Avx2Fma.is_available() {
            let mut lines = [&x.data[..0]; PACK_MAX_LANES];
            for (w, line) in lines.iter_mut().take(lanes).enumerate() {
                *line = &x.data[x.offset + (lane0 + w) * x.row_stride + pc..][..depth];
            }
            // SAFETY: the CPU has AVX2 (checked above); at most `W` lines. It zeroes the
            // padding lanes too.
            unsafe { pack_lines_avx2(&lines[..lanes], sliver, pair_at) };
            return;
        }
        if lanes < W {
            sliver.iter_mut().for_each(|row| row[lanes..].fill(0));
        }
        if x.row_stride == 1 {
            // Lanes contiguous: each word row interleaves two depth rows of `x`.
            let depth_row = |p: usize| &x.data[x.offset + lane0 + (pc + p) * x.col_stride..][..lanes];
            for (q, dst) in sliver.iter_mut().enumerate() {
                let first = depth_row(2 * q);
                if 2 * q + 1 < depth {
                    let second = depth_row(2 * q + 1);
                    for ((d, &a), &b) in dst.iter_mut().zip(first).zip(second) {
                        *d = pair(a, b);
                    }
                } else {
                    for (d, &a) in dst.iter_mut().zip(first) {
                        *d = pair(a, bf16::ZERO);
                    }
                }
            }
        } else {
            let at = |w: usize, p: usize| x.data[x.offset + (lane0 + w) * x.row_stride + (pc + p) * x.col_stride];
            for (q, dst) in sliver.iter_mut().enumerate() {
                for (w, d) in dst.iter_mut().take(lanes).enumerate() {
                    let second = if 2 * q + 1 < depth { at(w, 2 * q + 1) } else { bf16::ZERO };
                    *d = pair(at(w, 2 * q), second);
                }
            }
        }
    }
}

/// Loads 16 packed words as 32 bf16 values.
///
/// # Safety
/// `words` must be valid for reading 16 `u32`s; the CPU must have AVX-512F.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn load_pairs(words: *const u32) -> __m512bh {
    // SAFETY: the caller guarantees 64 readable bytes (an unaligned load); every bit
    // pattern of the 64 bytes is a valid `__m512bh`, a plain vector of the same size.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(words.cast())) }
}

/// One packed word (a pair of bf16) in every lane.
#[target_feature(enable = "avx512f,avx512bf16")]
fn splat_pair(word: u32) -> __m512bh {
    let lanes = _mm512_set1_epi32(word as i32);
    // SAFETY: as in `load_pairs`, a plain reinterpretation of 64 bytes.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(lanes) }
}

/// `acc + a b` pair by pair: `acc[i] + a[2i] b[2i] + a[2i + 1] b[2i + 1]`.
#[target_feature(enable = "avx512f,avx512bf16")]
fn dot_pairs(a: __m512bh, b: __m512bh, acc: __m512) -> __m512 {
    _mm512_dpbf16_ps(acc, a, b)
}

two_vector_microkernel!(
    /// AVX512_BF16 microkernel: a 14 x 32 f32 tile in twenty-eight zmm accumulators,
    /// two depth steps per packed word. It asks for no words ahead (the f32 kernels'
    /// prefetch is not measured with bf16 pairs).
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX512_BF16.
    avx512_bf16_tile, "avx512f,avx512bf16", u32, AVX512_MR, 16, 0,
    _mm512_setzero_ps, load_pairs, splat_pair, dot_pairs,
    _mm512_loadu_ps, _mm512_add_ps, _mm512_storeu_ps
);

const _: () = assert!(AVX512_NR == 32, "the tile is two 16-lane vectors wide");

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::cpu::gemm::{Bf16Path, Dims, Epilogue, Problem, blocked_bf16_gemm, gemm_with_isa};
    use proptest::prelude::*;

    /// A `rows x cols` bf16 matrix with values from `seed`, stored with the given layout:
    /// 0 row-major, 1 column-major, 2 every other element of a row-major matrix twice as
    /// wide (neither stride 1), each with one unused value in front.
    pub(in crate::cpu) fn matrix(rows: usize, cols: usize, layout: u8, seed: u64) -> (Vec<bf16>, usize, usize) {
        let (row_stride, col_stride, len) = match layout {
            0 => (cols, 1, rows * cols),
            1 => (1, rows, rows * cols),
            _ => (2 * cols, 2, 2 * rows * cols),
        };
        let mut state = seed | 1;
        let data = (0..=len)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                bf16::from_f32(((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            })
            .collect();
        (data, row_stride, col_stride)
    }

    pub(in crate::cpu) fn view(m: &(Vec<bf16>, usize, usize)) -> MatRef<'_, bf16> {
        MatRef { data: &m.0, offset: 1, row_stride: m.1, col_stride: m.2 }
    }

    pub(in crate::cpu) fn at(m: &MatRef<bf16>, i: usize, j: usize) -> f64 {
        m.data[m.offset + i * m.row_stride + j * m.col_stride].to_f64()
    }

    #[test]
    fn pair_sliver_matches_its_definition_for_every_layout() {
        fn check<const W: usize>() {
            for layout in 0..3 {
                for depth in [1, 2, 7, 16, 17, 33] {
                    let (rows, pc) = (W + 3, 2);
                    let x = matrix(rows, depth + pc, layout, 9);
                    let x = view(&x);
                    for (lane0, lane_end) in [(0, W), (1, W + 1), (3, W + 3), (W, W + 1)] {
                        let mut sliver = vec![[u32::MAX; W]; depth.div_ceil(2)];
                        Bf16Pairs::pack_sliver(x, Operand::A, lane0, lane_end, pc, depth, &mut sliver);
                        for (q, row) in sliver.iter().enumerate() {
                            for (w, &word) in row.iter().enumerate() {
                                let value = |p: usize| {
                                    if lane0 + w < lane_end && p < depth {
                                        x.data[x.offset + (lane0 + w) * x.row_stride + (pc + p) * x.col_stride]
                                    } else {
                                        bf16::ZERO
                                    }
                                };
                                let want = pair(value(2 * q), value(2 * q + 1));
                                assert_eq!(
                                    word, want,
                                    "W {W} layout {layout} depth {depth} lanes {lane0}..{lane_end}: [{q}][{w}]"
                                );
                            }
                        }
                    }
                }
            }
        }
        check::<14>();
        check::<32>();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Every bf16 path this CPU has (the dot product, the AMX tiles), packed whatever
        /// the size, and the routed product (`gemm_with_isa`), against an f64 product of
        /// the same bf16 values, tolerance relative to `sum |a b|` (f32 accumulation).
        /// Depths up to 1100 take two or three depth blocks. Skipped without AVX-512.
        #[test]
        fn bf16_paths_match_naive_f64(
            m in 1usize..=70, n in 1usize..=70, k in 1usize..=1100,
            a_layout in 0u8..3, b_layout in 0u8..3, seed in any::<u64>(),
        ) {
            if !Isa::Avx512.is_available() {
                return Ok(());
            }
            let (a, b) = (matrix(m, k, a_layout, seed), matrix(k, n, b_layout, seed ^ 0x5bd1));
            let (a, b) = (view(&a), view(&b));
            let problem = Problem { dims: Dims { m, n, k }, isa: Isa::Avx512, epilogue: Epilogue::NONE };
            let paths = Bf16Path::ALL.into_iter().filter(|path| path.is_available());
            for path in paths.map(Some).chain([None]) {
                let mut c = vec![f32::NAN; m * n];
                match path {
                    Some(path) => blocked_bf16_gemm(path, problem, a, b, &mut c),
                    None => gemm_with_isa(Isa::Avx512, m, n, k, a, b, &mut c, Epilogue::NONE),
                }
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|p| at(&a, i, p) * at(&b, p, j)).sum();
                        let scale: f64 = (0..k).map(|p| (at(&a, i, p) * at(&b, p, j)).abs()).sum::<f64>().max(1.0);
                        let got = c[i * n + j] as f64;
                        prop_assert!(
                            (got - want).abs() <= 1e-5 * scale,
                            "{path:?}: C[{i},{j}] = {got}, expected {want} ({m}x{n}x{k})"
                        );
                    }
                }
            }
        }
    }
}

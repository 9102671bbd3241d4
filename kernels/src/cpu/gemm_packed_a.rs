//! A left operand packed once for many products: `C = A @ B` for one A and a
//! sequence of B's.
//!
//! The packed GEMM (`gemm.rs`) copies A into the microkernel's slivers on every call
//! (Goto & van de Geijn's packed block of A). When the same A meets many right operands
//! one after another, as a recurrent layer's `W_hh` meets every step's gradient in
//! backpropagation through time, that copy is repeated for nothing, and for a product
//! with few columns it is most of the call: an LSTM of 512 units on a batch of 16 runs
//! `W_hh^T (512 x 2048) @ d_gates^T (2048 x 16)` per step, 1M values of A packed for
//! 16.8M multiply-adds. [`PackedA`] is that packing done once, block by block as the
//! packed path would do it, and [`gemm_packed_a`] runs the packed path's loops on it
//! (only B is packed per call).
//!
//! The packing is for the f32 microkernel of one instruction set, f16 and bf16 operands
//! widened as they are packed (so bf16 uses neither `vdpbf16ps` nor the AMX tiles here).

#[cfg(target_arch = "x86_64")]
use super::gemm::x86;
use super::gemm::{
    Dims, Epilogue, GemmInput, Isa, KC, Left, MatRef, Operand, Problem, SCALAR_MR, Widened, depth_block, pack_slivers,
    widened_blocked_gemm, without_products,
};
use crate::parallel;
use std::cell::Cell;

/// An `m x k` matrix packed into the slivers of one ISA's f32 microkernel, for
/// [`gemm_packed_a`]: for each depth block in turn (the packed path's blocks for depth `k`,
/// `gemm::depth_block`), `m.div_ceil(MR)` slivers of `MR` rows, each row-block of a depth
/// step contiguous, zero past row `m`.
pub struct PackedA {
    isa: Isa,
    m: usize,
    k: usize,
    /// The depth of its blocks (`gemm::depth_block`, for the threads it was packed on).
    block_depth: usize,
    words: Vec<f32>,
}

impl PackedA {
    /// `a` (`m x k`, any strides) packed for the fastest microkernel of this CPU.
    ///
    /// # Panics
    /// If `a` reaches past its slice.
    pub fn new<T: GemmInput>(m: usize, k: usize, a: MatRef<T>) -> Self {
        Self::with_isa(Isa::best(), m, k, a)
    }

    /// `a` packed for `isa`'s microkernel.
    ///
    /// # Panics
    /// If `isa` is not available on this CPU, or `a` reaches past its slice.
    pub fn with_isa<T: GemmInput>(isa: Isa, m: usize, k: usize, a: MatRef<T>) -> Self {
        assert!(isa.is_available(), "PackedA: {isa:?} is not supported by this CPU");
        if m > 0 && k > 0 {
            assert!(a.end(m, k) <= a.data.len(), "PackedA: A ({m} x {k}) reaches past its slice of {}", a.data.len());
        }
        // The blocks the packed path would take for a product of this depth on as many
        // threads as this one may use (any block depth gives the same product).
        let block_depth = depth_block(k, KC, 1, parallel::threads() > 1);
        // The slivers as tall as the rows of the microkernel `widened_blocked_gemm` runs.
        let words = match isa {
            Isa::Scalar => pack_all::<T, SCALAR_MR>(m, k, a, block_depth),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => pack_all::<T, { x86::AVX2_MR }>(m, k, a, block_depth),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => pack_all::<T, { x86::AVX512_MR }>(m, k, a, block_depth),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2Fma | Isa::Avx512 => unreachable!("checked by is_available"),
        };
        PackedA { isa, m, k, block_depth, words }
    }

    /// Rows of A (`m`).
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Columns of A (`k`, the products' depth).
    pub fn depth(&self) -> usize {
        self.k
    }
}

thread_local! {
    /// The words of the last [`PackedA`] dropped on this thread, for the next one.
    static LAST_BUFFER: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

impl Drop for PackedA {
    fn drop(&mut self) {
        LAST_BUFFER.set(std::mem::take(&mut self.words));
    }
}

/// The words of [`PackedA`] for a microkernel of `MR` rows, each block filled by the
/// packed path's own packing (in parallel when there are many slivers).
fn pack_all<T: GemmInput, const MR: usize>(m: usize, k: usize, a: MatRef<T>, block_depth: usize) -> Vec<f32> {
    let slivers = m.div_ceil(MR);
    // The buffer this thread last packed into: a sequence's weights are packed again for
    // every sequence, and fresh memory would fault its pages in each time. Not the shared
    // buffer cache (`crate::buffers`): its other users' buffers of about the same size
    // (an LSTM's `[steps, batch, 4 hidden]` gradients, 1M values against 1.06M here) took
    // this one, whose misses then evicted the largest buffers every step (the cache's
    // eviction rule at the time): 810K page faults in 150 training steps against 22K.
    // (Packing writes every word, padding included.)
    let mut words = LAST_BUFFER.take();
    words.resize(slivers * MR * k, 0.0);
    let mut rest = &mut words[..];
    for pc in (0..k).step_by(block_depth) {
        let kc = block_depth.min(k - pc);
        let (block, after) = rest.split_at_mut(slivers * MR * kc);
        pack_slivers::<T, Widened, MR>(a, Operand::A, 0..m, pc, kc, block.as_chunks_mut::<MR>().0, true);
        rest = after;
    }
    words
}

/// `C = epilogue(A @ B)` for a packed A (`m x k`) and `B` (`k x n`, any strides, any
/// [`GemmInput`]), `c` row-major `m x n`, overwritten: the packed path of
/// [`super::gemm::gemm`] without packing A. The rows are split across the threads as
/// there when the work is large.
///
/// # Panics
/// If `c` does not hold `m * n` values, B reaches past its slice, or the epilogue is
/// invalid (as for [`super::gemm::gemm`]).
pub fn gemm_packed_a<T: GemmInput>(a: &PackedA, n: usize, b: MatRef<T>, c: &mut [f32], epilogue: Epilogue) {
    let PackedA { isa, m, k, .. } = *a;
    if without_products(isa, [m, n, k], c, epilogue) {
        return;
    }
    assert!(b.end(k, n) <= b.data.len(), "gemm_packed_a: B ({k} x {n}) reaches past its slice of {}", b.data.len());
    let problem = Problem { dims: Dims { m, n, k }, isa, epilogue };
    widened_blocked_gemm(problem, Left::Packed { words: &a.words, block_depth: a.block_depth }, b, c);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::unary::UnaryOp;
    use half::bf16;
    use proptest::prelude::*;

    /// A `rows x cols` matrix of values from `seed`, row-major or (`transposed`)
    /// column-major, with `gap` unused values after each line and one before the first.
    fn matrix(rows: usize, cols: usize, transposed: bool, gap: usize, seed: u64) -> (Vec<f32>, usize, usize) {
        let (lines, line) = if transposed { (cols, rows) } else { (rows, cols) };
        let mut state = seed | 1;
        let data = (0..1 + lines * (line + gap))
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        let strides = if transposed { (1, line + gap) } else { (line + gap, 1) };
        (data, strides.0, strides.1)
    }

    fn view<T>((data, row_stride, col_stride): &(Vec<T>, usize, usize)) -> MatRef<'_, T> {
        MatRef { data, offset: 1, row_stride: *row_stride, col_stride: *col_stride }
    }

    /// `activation(A @ B + bias)` in f64.
    fn naive(dims: [usize; 3], a: MatRef<f32>, b: MatRef<f32>, bias: Option<&[f32]>, op: Option<UnaryOp>) -> Vec<f64> {
        let [m, n, k] = dims;
        let at = |x: &MatRef<f32>, i: usize, j: usize| x.data[x.offset + i * x.row_stride + j * x.col_stride] as f64;
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let sum: f64 = (0..k).map(|p| at(&a, i, p) * at(&b, p, j)).sum();
                let biased = sum + bias.map_or(0.0, |bias| bias[j] as f64);
                c[i * n + j] = op.map_or(biased, |op| op.apply(biased));
            }
        }
        c
    }

    fn assert_close(got: &[f32], want: &[f64], k: usize, what: &str) {
        assert_eq!(got.len(), want.len());
        for (idx, (&g, &w)) in got.iter().zip(want).enumerate() {
            let tol = 1e-5 * (k as f64 + 1.0) + 1e-5 * w.abs();
            assert!((g as f64 - w).abs() <= tol, "{what}: C[{idx}] = {g}, expected {w}");
        }
    }

    fn available_isas() -> impl Iterator<Item = Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.is_available())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]

        /// One packed A against two different B's, on every ISA, with and without an
        /// epilogue, against the f64 product.
        #[test]
        fn packed_a_times_any_b_matches_the_naive_product(
            m in 0usize..=45, n in 0usize..=40, k in 0usize..=70,
            a_t in any::<bool>(), b_t in any::<bool>(), gaps in (0usize..3, 0usize..3),
            fused in any::<bool>(), seed in any::<u64>(),
        ) {
            let a = matrix(m, k, a_t, gaps.0, seed);
            let bias: Vec<f32> = (0..n).map(|j| (j as f32 * 0.7).cos()).collect();
            let epilogue = if fused { Epilogue { bias: Some(&bias), activation: Some(UnaryOp::Tanh) } } else { Epilogue::NONE };
            for isa in available_isas() {
                let packed = PackedA::with_isa(isa, m, k, view(&a));
                prop_assert_eq!((packed.rows(), packed.depth()), (m, k));
                for b_seed in [seed ^ 0x5a5a, seed.wrapping_add(99)] {
                    let b = matrix(k, n, b_t, gaps.1, b_seed);
                    let mut c = vec![f32::NAN; m * n];
                    gemm_packed_a(&packed, n, view(&b), &mut c, epilogue);
                    let want = naive([m, n, k], view(&a), view(&b), epilogue.bias, epilogue.activation);
                    assert_close(&c, &want, k, &format!("{isa:?} {m}x{n}x{k}"));
                }
            }
        }
    }

    #[test]
    fn packed_a_spans_several_depth_and_row_blocks_on_every_thread_count() {
        // Past twice KC (deeper blocks when packed on several threads) and the 240-row
        // block, with work enough to go parallel; packed on one thread count, multiplied on
        // another.
        let (m, n, k) = (250, 20, 2 * KC + 3);
        let a = matrix(m, k, true, 1, 3);
        let b = matrix(k, n, false, 0, 4);
        let want = naive([m, n, k], view(&a), view(&b), None, None);
        let pools: Vec<_> =
            [1, 2, 3].map(|threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()).into();
        for isa in available_isas() {
            for (p, packing_pool) in pools.iter().enumerate() {
                let packed = packing_pool.install(|| PackedA::with_isa(isa, m, k, view(&a)));
                for (t, pool) in pools.iter().enumerate() {
                    let mut c = vec![f32::NAN; m * n];
                    pool.install(|| gemm_packed_a(&packed, n, view(&b), &mut c, Epilogue::NONE));
                    assert_close(&c, &want, k, &format!("{isa:?} packed on {} threads, run on {}", p + 1, t + 1));
                }
            }
        }
    }

    #[test]
    fn half_precision_operands_are_widened_exactly() {
        let (m, n, k) = (13, 9, 40);
        let (a32, b32) = (matrix(m, k, false, 0, 7), matrix(k, n, true, 2, 8));
        let half = |(data, rs, cs): &(Vec<f32>, usize, usize)| {
            (data.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), *rs, *cs)
        };
        let rounded = |(data, rs, cs): &(Vec<bf16>, usize, usize)| {
            (data.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), *rs, *cs)
        };
        let (a16, b16) = (half(&a32), half(&b32));
        let want = naive([m, n, k], view(&rounded(&a16)), view(&rounded(&b16)), None, None);
        let packed = PackedA::new(m, k, view(&a16));
        let mut c = vec![f32::NAN; m * n];
        gemm_packed_a(&packed, n, view(&b16), &mut c, Epilogue::NONE);
        assert_close(&c, &want, k, "bf16");
    }

    #[test]
    fn an_empty_depth_gives_the_epilogue_of_zeros() {
        let a = matrix(2, 0, false, 0, 1);
        let packed = PackedA::new(2, 0, view(&a));
        let mut c = vec![f32::NAN; 6];
        let bias = [1.0, -2.0, 0.5];
        let b = MatRef { data: &[0.0f32], offset: 0, row_stride: 3, col_stride: 1 };
        gemm_packed_a(&packed, 3, b, &mut c, Epilogue { bias: Some(&bias), activation: Some(UnaryOp::Relu) });
        assert_eq!(c, [1.0, 0.0, 0.5, 1.0, 0.0, 0.5]);
    }

    #[test]
    #[should_panic(expected = "reaches past its slice")]
    fn a_reaching_past_its_slice_is_rejected() {
        let data = [0.0f32; 11];
        PackedA::new(3, 4, MatRef { data: &data, offset: 0, row_stride: 4, col_stride: 1 });
    }

    #[test]
    #[should_panic(expected = "B (4 x 3) reaches past its slice")]
    fn b_reaching_past_its_slice_is_rejected() {
        let a = matrix(2, 4, false, 0, 1);
        let packed = PackedA::new(2, 4, view(&a));
        let b = [0.0f32; 11];
        gemm_packed_a(
            &packed,
            3,
            MatRef { data: &b, offset: 0, row_stride: 3, col_stride: 1 },
            &mut [0.0; 6],
            Epilogue::NONE,
        );
    }

    #[test]
    #[should_panic(expected = "expected m * n")]
    fn a_wrongly_sized_output_is_rejected() {
        let a = matrix(2, 4, false, 0, 1);
        let b = matrix(4, 3, false, 0, 2);
        gemm_packed_a(&PackedA::new(2, 4, view(&a)), 3, view(&b), &mut [0.0; 5], Epilogue::NONE);
    }
}

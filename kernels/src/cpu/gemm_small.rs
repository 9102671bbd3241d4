//! f32 GEMM for products too small to be worth packing A: `C = A @ B` with A read in
//! place through its strides.
//!
//! Packing (`gemm.rs`) pays for itself when each packed value is used many times from
//! L1: a KC-deep sliver of B against every A sliver of an MC-row block. A product of a
//! few hundred thousand multiply-adds (an attention tile, `16 x 64 x 32`; a decoding
//! step, `1 x 128 x 384`; a small layer on a small batch) uses each value only a few
//! times, and the packed path spends about as long copying, zero-padding and dispatching
//! as it does multiplying. Here A is never copied:
//!
//! ```text
//! for j0 in (0..n).step_by(2 * LANES)   // a column block of B (k rows of 2 vectors)
//!   for i0 in (0..m).step_by(ROWS)       // ... against every ROWS-row block of A
//!     acc[ROWS][2] = 0
//!     for p in 0..k                      // B row p: two vector loads
//!       acc[r] += broadcast(A[i0 + r, p]) * B[p, j0..]   for each row r
//!     C[i0.., j0..] = acc
//! ```
//!
//! the same register tile as the packed AVX2 microkernel (6 rows x 2 vectors, twelve
//! accumulators), with A's values broadcast straight from its rows, whatever its strides.
//! B's rows are loaded straight from memory when its columns are contiguous (`P V` in
//! attention, `x W` for a row-major `W`). Otherwise (`x W^T` with a row-major `W`,
//! `Q K^T`) B is packed into column blocks first, by the packed path's own B packing
//! (transposed in registers where B's columns are contiguous): `k x n` values, a small
//! share of the `m x n x k` multiply-adds unless `m` is tiny. When it is (fewer rows than
//! a tile) and B's columns are contiguous, each value of C is instead a dot product of an
//! A row and a B column, both read in place, so B is read once and never copied.
//!
//! The products this path takes run on the calling thread: [`is_small`] is the bound
//! below which the packed path would not split the work across threads either.

use super::gemm::{MatRef, PARALLEL_MIN_WORK, Widened, pack_b};
use super::simd::{Baseline, F32Vector, Isa, kernel};

/// Rows of C per register tile.
const ROWS: usize = 6;

/// Whether `m x n x k` is small enough for this path: below the work at which the packed
/// path goes parallel, where packing costs as much as it saves.
pub(super) fn is_small(m: usize, n: usize, k: usize) -> bool {
    m.saturating_mul(n).saturating_mul(k) < PARALLEL_MIN_WORK
}

thread_local! {
    /// This thread's buffer for a B packed into column blocks.
    static PACKED_B: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `C = A @ B` (`m x k` times `k x n`, `c` row-major `m x n`, overwritten) without
/// packing A. `m`, `n` and `k` are nonzero.
///
/// # Panics
/// If an operand reaches past its slice or `c.len() != m * n`.
pub(super) fn small_sgemm(isa: Isa, m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32]) {
    assert_eq!(c.len(), m * n, "small_sgemm: output holds {} values, expected {m} * {n}", c.len());
    let last = |x: &MatRef, rows: usize, cols: usize| x.offset + (rows - 1) * x.row_stride + (cols - 1) * x.col_stride;
    assert!(last(&a, m, k) < a.data.len(), "small_sgemm: A ({m} x {k}) reaches past its slice");
    assert!(last(&b, k, n) < b.data.len(), "small_sgemm: B ({k} x {n}) reaches past its slice");
    if m < ROWS && b.row_stride == 1 && b.col_stride != 1 && a.col_stride == 1 {
        // Fewer rows than a tile, B's columns contiguous (a decoding step's `x W^T`): each
        // value of C is a dot product of two contiguous vectors, and B is read once.
        dot_products(isa, m, n, k, a, b, c);
        return;
    }
    if b.col_stride == 1 {
        // B as it is: the block at column `j0` starts `j0` values into B's first row.
        let b = ColumnBlocks { data: &b.data[b.offset..], column_step: 1, row_stride: b.row_stride };
        tiles(isa, m, n, k, a, b, c);
        return;
    }
    // Columns of B are not contiguous: pack them into blocks of two vectors' width, each
    // block `k` rows of `2 * LANES` values (the packed path's B slivers, transposed in
    // registers where B's columns are contiguous, as with `x W^T`).
    let mut packed = PACKED_B.take();
    let blocks = match isa {
        Isa::Avx512 => ColumnBlocks::packed::<32>(b, k, n, &mut packed),
        Isa::Avx2Fma => ColumnBlocks::packed::<16>(b, k, n, &mut packed),
        Isa::Scalar => ColumnBlocks::packed::<{ 2 * Baseline::LANES }>(b, k, n, &mut packed),
    };
    tiles(isa, m, n, k, a, blocks, c);
    PACKED_B.set(packed);
}

/// B as blocks of `2 * LANES` columns, each row of a block contiguous: the block that
/// starts at column `j0` starts at `data[j0 * column_step]`, its rows `row_stride` apart.
#[derive(Clone, Copy)]
struct ColumnBlocks<'a> {
    data: &'a [f32],
    column_step: usize,
    row_stride: usize,
}

impl<'a> ColumnBlocks<'a> {
    /// B packed into `buffer` as `NR`-wide blocks of `k` rows (zero-padded at the right
    /// edge): the block at column `j0 = s * NR` starts at `s * k * NR = j0 * k`.
    fn packed<const NR: usize>(b: MatRef, k: usize, n: usize, buffer: &'a mut Vec<f32>) -> Self {
        let slivers = pack_b::<f32, Widened, NR>(b, 0, k, 0, n, buffer, false);
        ColumnBlocks { data: slivers.as_flattened(), column_step: k, row_stride: NR }
    }
}

kernel! {
    /// Every register tile of `C = A @ B` (see the module docs for the loop order).
    fn tiles(m: usize, n: usize, k: usize, a: MatRef<'_>, b: ColumnBlocks<'_>, c: &mut [f32]) {
        let lanes = V::LANES;
        for j0 in (0..n).step_by(2 * lanes) {
            let cols = (n - j0).min(2 * lanes);
            let b_block = &b.data[j0 * b.column_step..];
            for i0 in (0..m).step_by(ROWS) {
                let tile = Tile { k, b: b_block, ldb: b.row_stride, cols, c: &mut c[i0 * n + j0..], ldc: n };
                match m - i0 {
                    1 => a_rows::<V, 1>(a, i0, tile),
                    2 => a_rows::<V, 2>(a, i0, tile),
                    3 => a_rows::<V, 3>(a, i0, tile),
                    4 => a_rows::<V, 4>(a, i0, tile),
                    5 => a_rows::<V, 5>(a, i0, tile),
                    _ => a_rows::<V, ROWS>(a, i0, tile),
                }
            }
        }
    }
}

/// The register tile `C[i0..i0 + R, j0..] = A[i0..i0 + R, ..] @ B[.., j0..]`, A's values
/// read through its strides.
#[inline(always)]
fn a_rows<V: F32Vector, const R: usize>(a: MatRef, i0: usize, tile: Tile) {
    let (first, k) = (a.offset + i0 * a.row_stride, tile.k);
    let last = first + (R - 1) * a.row_stride + (k - 1) * a.col_stride;
    assert!(last < a.data.len(), "small_sgemm: A's tile reaches past its slice");
    tile.multiply::<V, R>(|p, r| {
        debug_assert!(p < k && r < R);
        // SAFETY: `multiply` asks only for `p < k` and `r < R`, so the index is at most
        // `last`, which is inside `a.data` (asserted above). (Checked indexing here, in the
        // innermost loop, cost a third of the speed.)
        unsafe { *a.data.get_unchecked(first + r * a.row_stride + p * a.col_stride) }
    });
}

/// One register tile's B (a column block, rows `ldb` apart, `cols` of its columns used,
/// at most two vectors) and C (from the tile's corner, rows `ldc` apart).
struct Tile<'b, 'c> {
    k: usize,
    b: &'b [f32],
    ldb: usize,
    cols: usize,
    c: &'c mut [f32],
    ldc: usize,
}

impl Tile<'_, '_> {
    /// `C = sum over p of A[.., p] (outer) B[p, ..]`, where `a(p, r)` is the tile's row
    /// `r` of A at depth `p` (asked only for `p < k`, `r < R`): two vector accumulators per row (twelve for
    /// `R = 6`), one B row (two vector loads) and `R` broadcasts per depth step.
    #[inline(always)]
    fn multiply<V: F32Vector, const R: usize>(self, a: impl Fn(usize, usize) -> f32) {
        let Tile { k, b, ldb, cols, c, ldc } = self;
        let lanes = V::LANES;
        let mut acc = [[V::splat(0.0); 2]; R];
        if cols == 2 * lanes {
            for p in 0..k {
                let b_row = &b[p * ldb..][..2 * lanes];
                let (b0, b1) = (V::load(b_row), V::load(&b_row[lanes..]));
                for r in 0..R {
                    let x = V::splat(a(p, r));
                    acc[r][0] = x.mul_add(b0, acc[r][0]);
                    acc[r][1] = x.mul_add(b1, acc[r][1]);
                }
            }
            for (r, acc_row) in acc.iter().enumerate() {
                let c_row = &mut c[r * ldc..][..2 * lanes];
                acc_row[0].store(c_row);
                acc_row[1].store(&mut c_row[lanes..]);
            }
            return;
        }
        // The right edge: fewer than two vectors of columns, loaded and stored partially.
        let low = cols.min(lanes);
        for p in 0..k {
            let b_row = &b[p * ldb..][..cols];
            let b0 = V::load_partial(&b_row[..low], 0.0);
            let b1 = V::load_partial(&b_row[low..], 0.0);
            for r in 0..R {
                let x = V::splat(a(p, r));
                acc[r][0] = x.mul_add(b0, acc[r][0]);
                acc[r][1] = x.mul_add(b1, acc[r][1]);
            }
        }
        for (r, acc_row) in acc.iter().enumerate() {
            let c_row = &mut c[r * ldc..][..cols];
            acc_row[0].store_partial(&mut c_row[..low]);
            if cols > lanes {
                acc_row[1].store_partial(&mut c_row[low..]);
            }
        }
    }
}

kernel! {
    /// `C[i, j] = A[i, ..] . B[.., j]` for A with contiguous rows and B with contiguous
    /// columns: four columns of B at a time against one row of A, a vector accumulator
    /// per column, summed across its lanes at the end.
    fn dot_products(m: usize, n: usize, k: usize, a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32]) {
        const GROUP: usize = 4;
        let lanes = V::LANES;
        let whole = k - k % lanes;
        for (i, c_row) in c.chunks_exact_mut(n).enumerate().take(m) {
            let a_row = &a.data[a.offset + i * a.row_stride..][..k];
            for (group, c_group) in c_row.chunks_mut(GROUP).enumerate() {
                let mut columns = [a_row; GROUP];
                for (g, column) in columns.iter_mut().enumerate().take(c_group.len()) {
                    *column = &b.data[b.offset + (group * GROUP + g) * b.col_stride..][..k];
                }
                let mut acc = [V::splat(0.0); GROUP];
                for p in (0..whole).step_by(lanes) {
                    let x = V::load(&a_row[p..]);
                    for g in 0..GROUP {
                        acc[g] = x.mul_add(V::load(&columns[g][p..]), acc[g]);
                    }
                }
                if whole < k {
                    let x = V::load_partial(&a_row[whole..], 0.0);
                    for g in 0..GROUP {
                        acc[g] = x.mul_add(V::load_partial(&columns[g][whole..], 0.0), acc[g]);
                    }
                }
                for (c, acc) in c_group.iter_mut().zip(acc) {
                    *c = acc.reduce_add();
                }
            }
        }
    }
}

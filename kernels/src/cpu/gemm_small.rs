//! f32 GEMM without packing A: `C = A @ B` with A read in place through its strides,
//! for products small or moderate enough that packing A costs more than it saves, and
//! for A with contiguous rows at any size up to a moderate depth.
//!
//! Packing (`gemm.rs`) pays for itself when each packed value is used many times from
//! L1: a KC-deep sliver of B against every A sliver of an MC-row block. A product of a
//! few hundred thousand multiply-adds (an attention tile, `16 x 64 x 32`; a decoding
//! step, `1 x 128 x 384`; a small layer on a small batch) uses each value only a few
//! times, and the packed path spends about as long copying, zero-padding and dispatching
//! as it does multiplying. Past that, A is still better read where it is when its rows
//! are contiguous: a block of its rows stays in L2 while every column block of B goes by,
//! and the broadcasts read it from there as cheaply as from a packed copy, so the copy
//! (a transpose of every row of A, 6% of a `768 x 128 x 384` product) is saved
//! ([`is_faster_unpacked`] has the measurements). Here A is never copied:
//!
//! ```text
//! for r0 in (0..m).step_by(BLOCK)          // a block of A's rows (A_BLOCK_VALUES, L2)
//!   for j0 in (0..n).step_by(2 * LANES)    // a column block of B (k rows of 2 vectors)
//!     for i0 in (r0..).step_by(ROWS)       // ... against every ROWS-row tile of the block
//!       acc[ROWS][2] = 0
//!       for p in 0..k                      // B row p: two vector loads
//!         acc[r] += broadcast(A[i0 + r, p]) * B[p, j0..]   for each row r
//!       C[i0.., j0..] = acc
//! ```
//!
//! the register tile of the packed AVX2 microkernel (6 rows x 2 vectors, twelve
//! accumulators; 12 rows with AVX-512's 32 registers), with A's values broadcast straight
//! from its rows, whatever its strides;
//! a block of at most one vector's columns (the right edge) takes one accumulator per row.
//! B is packed into column blocks (`k` rows of two vectors each, contiguous): `k x n`
//! values, a small share of the `m x n x k` multiply-adds. Where B's rows are contiguous
//! and the product fits in L2, the first register tile of each column block packs it as
//! it reads it (`Columns::PackedAsRead`); otherwise the packed path's own B packing does,
//! before the tiles (transposed in registers where B's columns are contiguous, as with
//! `x W^T`). Only below the work at which the GEMM goes parallel are B's rows read
//! in place when they are contiguous (`P V` in attention), except a last block
//! narrower than two vectors, which is copied out zero-padded so that every load is a
//! whole vector; read in place at larger sizes, rows of B a power of two apart fall
//! into a few of L1's sets (`512^3`: 65 GFLOP/s against 96 packed). When `m` is tiny
//! (fewer rows than a tile) and B's columns are contiguous, each value of C is instead a
//! dot product of an A row and a B column, both read in place, so B is read once and
//! never copied.
//!
//! Products below the packed path's parallel threshold run on the calling thread; larger
//! ones cut C's rows into parts of whole tiles, a few per thread ([`row_parts`]), which
//! the threads claim as they become free. Each thread then packs the whole of B for
//! itself, once per call ([`PackedB`]): a B packed by one thread and read by the others
//! moves between the cores' caches twice per call, and costs more than packing it
//! again (`128^3` on two threads ran slower than on one).
//!
//! The register tile reads B through [`TileColumns`], so that a caller can supply B's
//! rows without a B in memory: the convolution's implicit GEMM (`conv_shifted.rs`)
//! loads them from the image, shifted and masked.

use super::gemm::{Epilogue, MatRef, Operand, PARALLEL_MIN_WORK, Widened, pack_b, pack_slivers, sliver_buffer};
use super::simd::{Baseline, F32Vector, Isa, kernel, vector_lanes};
use crate::parallel;
use std::sync::atomic::{AtomicU64, Ordering};

/// Rows of C per register tile with 16 vector registers (AVX2: twelve accumulators).
const ROWS: usize = 6;
/// Rows of C per register tile with 32 vector registers (AVX-512: twenty-four
/// accumulators). Against 6 rows, measured on the GPT baby's products at one thread: the
/// gradient products (depth 384-768) 11-23% faster, the forward products equal.
const WIDE_ROWS: usize = 12;

/// Rows of C per register tile for vectors of `lanes` f32 (16 lanes: AVX-512).
pub(super) const fn tile_rows(lanes: usize) -> usize {
    if lanes >= 16 { WIDE_ROWS } else { ROWS }
}

/// Whether this path is the faster one for an `m x n x k` product on `threads` threads
/// with `isa`'s register tiles, `a_rows_contiguous` when A's rows are (`col_stride == 1`).
///
/// Below the work at which the packed path goes parallel, packing costs as much as it
/// saves. Above it, A is streamed from L2 once per column block of B, one block of rows
/// at a time ([`A_BLOCK_VALUES`]), instead of being packed once, and B is packed into
/// column blocks. That pays up to a depth of [`UNPACKED_MAX_DEPTH`] (each B column block
/// is then read from L1 or L2 by every tile of rows):
///
/// - with AVX2 tiles and A's rows contiguous, whatever A's size. Measured on Zen 3 (512 KB
///   L2), GFLOP/s packed -> unpacked, one thread: `256^3` 90.7-91.4 -> 93.9-94.8,
///   `512^3` 93.7-94.2 -> 95.8-96.0, `1024^3` 92.9 -> 94.8, `2048 x 1024 x 1024` 94.0 ->
///   96.5, `300 x 1000 x 1000` 93.4 -> 96.0, a GPT baby's input gradient `768 x 128 x
///   384` 91.4-91.9 -> 97.7 and forward `768 x 128 x 512` (B column-major) 91.5-92.5 ->
///   97.7; two threads `512^3` 176 -> 183, `1024^3` 180 -> 186, `2048 x 2048 x 768` 181.5
///   -> 190, `4096 x 1536 x 384` 189 -> 187 (the one loss, 1%). Without the row blocks and
///   with a row-major B read in place, `512^3` had run at 65 (B's rows 2 KB apart fall
///   into two of L1's 64 sets); with A column-major, broadcasting down its columns, the
///   weight gradients `384 x 128 x 768` ran at 66 against 85-87 packed;
/// - with AVX2 tiles and A column-major, up to 128 KB of A per thread (the GPT baby's
///   products below it, `128^3`, kept a 10-20% gain);
/// - with AVX-512 tiles, up to 2 MB of A per thread: measured at one thread on Zen 4 (1 MB
///   L2), before the row blocks and with B read in place, the products of a GPT baby layer
///   (`768 x 384 x 128` and its gradients, A up to 1.5 MB) ran 0-29% faster unpacked,
///   `512^3` 3% faster, while `1024^3` (A 4 MB) ran 24% slower and `4096 x 1536 x 384`
///   (A 6 MB) 41% slower. (The row blocks and the packed B are not measured on AVX-512.)
/// - whatever A's size, when B is a single column block (`n` at most two vectors): A is
///   then streamed exactly once, so packing it cannot pay. Measured on Zen 3 (AVX2),
///   GFLOP/s packed -> unpacked: `4096 x 16 x 512` 64 -> 93 at one thread and 130 -> 194
///   at two, `4096 x 8 x 512` (B column-major) 32 -> 65 and 64 -> 125, `2048 x 16 x 1024`
///   60 -> 95 and 122 -> 191. This is also the transposed product that a product with
///   few rows becomes (see `gemm::computed_transposed`): at two threads a recurrent
///   step's `16 x 2048 x 512` (`h W^T`, `W` row-major) ran 106-113 -> 160-168, a
///   `1 x 4096 x 1024` decoding step 7.2-7.5 -> 15.1-15.4, and a 512-hidden LSTM's training
///   7% faster (23.7 -> 25.3-25.6 it/s, the same losses).
pub(super) fn is_faster_unpacked(isa: Isa, [m, n, k]: [usize; 3], threads: usize, a_rows_contiguous: bool) -> bool {
    if m.saturating_mul(n).saturating_mul(k) < PARALLEL_MIN_WORK {
        return true;
    }
    let lanes = vector_lanes(isa);
    let max_a = match (tile_rows(lanes) == WIDE_ROWS, a_rows_contiguous) {
        (true, _) => UNPACKED_MAX_A,
        (false, true) => usize::MAX,
        (false, false) => UNPACKED_MAX_A_NARROW,
    };
    let one_pass_over_a = n <= 2 * lanes;
    // Rows split evenly across the threads need enough of them for whole tiles.
    m >= threads * 4 * ROWS && (one_pass_over_a || m.div_ceil(threads) * k < max_a) && k <= UNPACKED_MAX_DEPTH
}

/// The most values of A a thread streams through unpacked with AVX-512 tiles (2 MB of
/// f32).
const UNPACKED_MAX_A: usize = 1 << 19;
/// The most values of A a thread streams through unpacked with narrower tiles when its
/// rows are not contiguous (128 KB).
const UNPACKED_MAX_A_NARROW: usize = 1 << 15;
/// The values of A in one block of rows streamed against every column block of B
/// (128 KB of f32, a quarter of Zen 3's L2: 64, 128 and 256 KB measured the same).
const A_BLOCK_VALUES: usize = 1 << 15;
/// The deepest product taken unpacked once the work is parallel.
const UNPACKED_MAX_DEPTH: usize = 1024;
/// The most values that A, C, B and B's packed copy may hold together (1 MB of f32) for B
/// to be packed as the tiles read it ([`packs_as_read`]).
const PACK_AS_READ_MAX_VALUES: usize = 1 << 18;

/// Whether B, when it is packed, is packed by the first register tile of each column
/// block as it reads it ([`Columns::PackedAsRead`]) rather than in a pass of its own
/// before the tiles: with AVX-512's tiles, B's rows contiguous (and not overlapping), and
/// A, B, C and the packed copy within [`PACK_AS_READ_MAX_VALUES`].
///
/// Measured on a Xeon with AMX (2 MB L2), same process, the two builds alternated,
/// medians of 150 x 20 calls, GFLOP/s at one thread (two) before -> after: `128^3`
/// 154-156 (222-232) -> 159-161 (243-244), `96^3` 146-148 (189-207) -> 149-153
/// (205-210), `64 x 256 x 288` 145-146 (202-210) -> 161-162 (233), `64 x 784 x 64` 136
/// (187-194) -> 142 (196-199), `256^3` 165-166 (286-290) -> 168 (288-292); with the
/// operands evicted to L3 before each call, `128^3` +1-6%, `96^3` +7%. Larger products
/// lost, which is the limit: B then comes from L3, and the tile, which asks for one row
/// of B per 12 depth steps' multiply-adds, keeps too few of those reads in flight (the
/// pass of its own streams them): `64 x 784 x 288` -13% to -22% (-5% to -14% from L3),
/// `128 x 784 x 288` -4% to -6%, `384^3` -2% to -4%, `512^3` -1% to -6%. AVX2's 6-row
/// tiles, on the same CPU: -4% to +7% (`256^3` and `200 x 300 x 100` -3-4%, `64 x 784 x
/// 64` at two threads +4-7%), so they keep the pass.
fn packs_as_read(isa: Isa, [m, n, k]: [usize; 3], b: MatRef) -> bool {
    tile_rows(vector_lanes(isa)) == WIDE_ROWS
        && b.col_stride == 1
        && b.row_stride >= n
        && m * k + m * n + 2 * k * n <= PACK_AS_READ_MAX_VALUES
}

thread_local! {
    /// This thread's buffer for a B packed into column blocks.
    static PACKED_B: std::cell::Cell<PackedB> = const { std::cell::Cell::new(PackedB::EMPTY) };
}

/// `C = epilogue(A @ B)` (`m x k` times `k x n`, `c` row-major `m x n`, overwritten)
/// without packing A. `m`, `n` and `k` are nonzero. When the work is large enough for the
/// packed path to go parallel, the rows of C are cut into parts shared out among the
/// threads ([`row_parts`]; each thread packs B for itself, [`PackedB`]); the epilogue is
/// applied to each part's rows while they are in its thread's cache.
///
/// # Panics
/// If an operand reaches past its slice or `c.len() != m * n`.
#[allow(clippy::too_many_arguments)] // the BLAS argument list, as `gemm_with_isa`
pub(super) fn small_sgemm(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    epilogue: Epilogue,
) {
    assert_eq!(c.len(), m * n, "small_sgemm: output holds {} values, expected {m} * {n}", c.len());
    assert!(a.end(m, k) <= a.data.len(), "small_sgemm: A ({m} x {k}) reaches past its slice");
    assert!(b.end(k, n) <= b.data.len(), "small_sgemm: B ({k} x {n}) reaches past its slice");
    let isa = narrowest_fit(isa, n);
    if m < ROWS && b.row_stride == 1 && b.col_stride != 1 && a.col_stride == 1 {
        // Fewer rows than a tile, B's columns contiguous (a decoding step's `x W^T`): each
        // value of C is a dot product of two contiguous vectors, and B is read once.
        dot_products(isa, m, n, k, a, b, c);
        epilogue.apply(isa, c, n, m, 0, n);
        return;
    }
    let width = block_width(isa);
    let rows = |columns: Columns, i0: usize, c_rows: &mut [f32]| {
        let rows = c_rows.len() / n;
        tiles(isa, rows, n, k, MatRef { offset: a.offset + i0 * a.row_stride, ..a }, columns, c_rows);
        epilogue.apply(isa, c_rows, n, rows, 0, n);
    };
    // Large enough for the packed path to go parallel: then B is packed (see the module
    // docs), and split across the threads when there are several.
    let large = m * n * k >= PARALLEL_MIN_WORK;
    let as_read = packs_as_read(isa, [m, n, k], b);
    if large && parallel::threads() > 1 {
        let call = NEXT_CALL.fetch_add(1, Ordering::Relaxed);
        let rows_per_tile = tile_rows(width / 2);
        let parts = row_parts(m, rows_per_tile, parallel::threads());
        parallel::for_each_part_mut(c, rows_per_tile * n, parts, |offset, c_rows| {
            let mut packed = PACKED_B.take();
            let columns = packed.for_call(call, |buffer| pack_columns(isa, b, k, n, as_read, buffer));
            rows(columns, offset / n, c_rows);
            PACKED_B.set(packed);
        });
        return;
    }
    let mut packed = PACKED_B.take();
    packed.call = NO_CALL;
    let buffer = &mut packed.buffer;
    let columns = if b.col_stride == 1 && !large {
        // B as it is: the block at column `j0` starts `j0` values into B's first row. A
        // last block narrower than `width` is copied out, zero-padded, so that every
        // block can be read with whole vectors.
        let edge = n - n % width;
        let edge = if edge < n { pad_columns(b, k, edge..n, width, buffer) } else { &[] };
        Columns::Blocks(ColumnBlocks { data: &b.data[b.offset..], column_step: 1, row_stride: b.row_stride, edge })
    } else {
        pack_columns(isa, b, k, n, as_read, buffer)
    };
    rows(columns, 0, c);
    PACKED_B.set(packed);
}

/// The ISA whose register tiles waste no lanes on a product of `n` columns: AVX2's for
/// at most 8 (`isa` otherwise). An AVX-512 tile there uses 8 of each multiply-add's 16
/// lanes. Zen 4 issues two 8-lane multiply-adds (AVX2) per cycle or one 16-lane one
/// (AVX-512), so AVX2 does twice the useful work; CPUs with two 512-bit units issue two of
/// either, the same useful work. Zen 4, median ms at one thread: `8 x 1024 x 1024` (`h
/// W^T`, computed transposed: 1024 x 8 columns) 0.51 -> 0.22.
fn narrowest_fit(isa: Isa, n: usize) -> Isa {
    if isa == Isa::Avx512 && n <= 8 && Isa::Avx2Fma.is_available() { Isa::Avx2Fma } else { isa }
}

/// B packed into column blocks of two vectors, each block `k` rows of `2 * LANES`
/// values, zero-padded at the right edge (the packed path's B slivers): by the register
/// tiles as they read it when `as_read` ([`Columns::PackedAsRead`], B's rows
/// contiguous), else now (transposed in registers where B's columns are contiguous, as
/// with `x W^T`).
fn pack_columns<'a>(
    isa: Isa,
    b: MatRef<'a>,
    k: usize,
    n: usize,
    as_read: bool,
    buffer: &'a mut Vec<f32>,
) -> Columns<'a> {
    match isa {
        Isa::Avx512 => Columns::packed::<32>(b, k, n, as_read, buffer),
        Isa::Avx2Fma => Columns::packed::<16>(b, k, n, as_read, buffer),
        Isa::Scalar => Columns::packed::<{ 2 * Baseline::LANES }>(b, k, n, as_read, buffer),
    }
}

/// Numbers the parallel calls, so that a thread can tell whether its [`PackedB`] holds
/// this call's B.
static NEXT_CALL: AtomicU64 = AtomicU64::new(1);
/// The call of a [`PackedB`] that holds no call's B.
const NO_CALL: u64 = 0;

/// One thread's packed B, and the call it was packed for: on several threads, each
/// thread packs B on its first part of a call and reads it from its own cache for the
/// rest, instead of one thread packing B for all. With one shared copy, the other core
/// read every line of it from the packing core's cache, and the next call's pack had to
/// take every line back: on a Xeon with AMX at `128^3`, the pack took 17 us against 2
/// us on one thread, and each thread's half of the tiles 21 us against 12-13. Shared ->
/// per thread, same-process A/B at two threads (orders alternated, medians of 300
/// rounds), GFLOP/s: `128^3` 107-109 -> 222-224 (one thread: 155), `96^3` 80-83 ->
/// 196-201, `64 x 784 x 288` 141-144 -> 176-177, `256^3` 255 -> 283-285, `512^3` 280-282
/// -> 289-290, `768 x 128 x 384` 298-300 -> 307-310, with B column-major `768 x 384 x 128`
/// 279-280 -> 295-296; one thread unchanged. With AVX2's tiles on the same CPU (medians of
/// 200 rounds): `128^3` 90.7 -> 167.6, `256^3` 165.3 -> 184.2, `512^3` 170.1 -> 179.1,
/// `768 x 128 x 384` 191.8 -> 200.5. The extra packing (all of B per thread
/// instead of a share of it) is `k n` values against the thread's `m n k / threads`
/// multiply-adds.
#[derive(Default)]
struct PackedB {
    call: u64,
    buffer: Vec<f32>,
    /// The address of the column blocks' first value in `buffer`, their length, and their
    /// [`ColumnBlocks`] steps.
    first: usize,
    len: usize,
    column_step: usize,
    row_stride: usize,
}

impl PackedB {
    const EMPTY: PackedB =
        PackedB { call: NO_CALL, buffer: Vec::new(), first: 0, len: 0, column_step: 0, row_stride: 0 };

    /// The column blocks of `call`'s B: packed by `pack` (or to be packed as the tiles read
    /// them) on this thread's first part of the call, reused by its later parts.
    fn for_call<'s>(&'s mut self, call: u64, pack: impl FnOnce(&'s mut Vec<f32>) -> Columns<'s>) -> Columns<'s> {
        if self.call == call {
            let start = (self.first - self.buffer.as_ptr().addr()) / size_of::<f32>();
            return Columns::Blocks(ColumnBlocks {
                data: &self.buffer[start..][..self.len],
                column_step: self.column_step,
                row_stride: self.row_stride,
                edge: &[],
            });
        }
        self.call = call;
        let columns = pack(&mut self.buffer);
        let (blocks, column_step, row_stride) = match &columns {
            Columns::Blocks(blocks) => (blocks.data, blocks.column_step, blocks.row_stride),
            Columns::PackedAsRead { blocks, k, width, .. } => (&blocks[..], *k, *width),
        };
        (self.first, self.len) = (blocks.as_ptr().addr(), blocks.len());
        (self.column_step, self.row_stride) = (column_step, row_stride);
        columns
    }
}

/// The most parts per thread that C's rows are cut into ([`row_parts`]).
const PARTS_PER_THREAD: usize = 4;
/// The fewest register tiles of rows in a part: each part streams all of B once.
const MIN_PART_TILES: usize = 6;

/// How many parts C's `m` rows are cut into for `threads` threads, for tiles of
/// `tile_rows` rows: a multiple of the threads (an even share for each when all run at the
/// same speed), up to [`PARTS_PER_THREAD`] per thread while each part keeps at least
/// [`MIN_PART_TILES`] tiles.
///
/// Parts are claimed by whichever thread is free, so a thread that is descheduled (this
/// VM's other vCPU, or another process holding a core) or that wakes late costs its
/// unfinished parts, not its whole half: with one part per thread, 2-thread products of
/// `256^3`-`512^3` ran at 100-110 GFLOP/s (median) through such phases.
fn row_parts(m: usize, tile_rows: usize, threads: usize) -> usize {
    let tiles = m.div_ceil(tile_rows);
    threads * (tiles / (threads * MIN_PART_TILES)).clamp(1, PARTS_PER_THREAD)
}

/// The columns of a register tile: two vectors of the ISA.
fn block_width(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 32,
        Isa::Avx2Fma => 16,
        Isa::Scalar => 2 * Baseline::LANES,
    }
}

/// `B[.., columns]` copied into `buffer` as `k` rows of `width` values, zero-padded on
/// the right (B's columns contiguous).
fn pad_columns<'a>(
    b: MatRef,
    k: usize,
    columns: std::ops::Range<usize>,
    width: usize,
    buffer: &'a mut Vec<f32>,
) -> &'a [f32] {
    buffer.clear();
    buffer.resize(k * width, 0.0);
    for (p, row) in buffer.chunks_exact_mut(width).enumerate() {
        let start = b.offset + p * b.row_stride + columns.start;
        row[..columns.len()].copy_from_slice(&b.data[start..start + columns.len()]);
    }
    buffer
}

/// B as blocks of `2 * LANES` columns, each row of a block contiguous and readable
/// whole: the block that starts at column `j0` starts at `data[j0 * column_step]`, its
/// rows `row_stride` apart, except a last, partial block of a B read in place, which is
/// `edge` (rows `2 * LANES` apart, zero-padded) when that is not empty.
#[derive(Clone, Copy)]
struct ColumnBlocks<'a> {
    data: &'a [f32],
    column_step: usize,
    row_stride: usize,
    edge: &'a [f32],
}

impl<'a> ColumnBlocks<'a> {
    /// The block of `cols` columns at `j0` (of at most `width`) and its row stride.
    fn block(&self, j0: usize, cols: usize, width: usize) -> (&'a [f32], usize) {
        if cols < width && !self.edge.is_empty() {
            (self.edge, width)
        } else {
            (&self.data[j0 * self.column_step..], self.row_stride)
        }
    }
}

/// Where [`tiles`] reads B.
enum Columns<'a> {
    /// Column blocks to read.
    Blocks(ColumnBlocks<'a>),
    /// B's rows, read in place by the first register tile of each column block and copied
    /// as they are read into `blocks` (laid out as packed [`ColumnBlocks`]: the block at
    /// column `j0` is `k` rows of `width` values from `j0 * k`), which the block's other
    /// tiles then read: the copy's loads are the tile's own, and its stores go by between
    /// the multiply-adds, instead of a pass over B of its own before the tiles
    /// ([`packs_as_read`] has the measurements). A last block narrower than `width` is
    /// packed, zero-padded, before the tiles.
    PackedAsRead { b: MatRef<'a>, blocks: &'a mut [f32], k: usize, width: usize },
}

impl<'a> Columns<'a> {
    /// B in `NR`-wide column blocks of `k` rows (zero-padded at the right edge) in
    /// `buffer`: the block at column `j0 = s * NR` starts at `s * k * NR = j0 * k`.
    fn packed<const NR: usize>(b: MatRef<'a>, k: usize, n: usize, as_read: bool, buffer: &'a mut Vec<f32>) -> Self {
        if !as_read {
            let slivers = pack_b::<f32, Widened, NR>(b, 0, k, 0, n, buffer, false);
            return Columns::Blocks(ColumnBlocks {
                data: slivers.as_flattened(),
                column_step: k,
                row_stride: NR,
                edge: &[],
            });
        }
        let slivers = sliver_buffer::<f32, NR>(buffer, n.div_ceil(NR), k);
        let whole = n / NR;
        if whole * NR < n {
            let edge = &mut slivers[whole * k..];
            pack_slivers::<f32, Widened, NR>(b.transposed(), Operand::B, whole * NR..n, 0, k, edge, false);
        }
        Columns::PackedAsRead { b, blocks: slivers.as_flattened_mut(), k, width: NR }
    }

    /// The block of `cols` columns at `j0` (of at most `width`) and its row stride, for
    /// the tiles after a block's first.
    fn block(&self, j0: usize, cols: usize, width: usize) -> (&[f32], usize) {
        match self {
            Columns::Blocks(blocks) => blocks.block(j0, cols, width),
            Columns::PackedAsRead { blocks, k, width: block_width, .. } => (&blocks[j0 * k..], *block_width),
        }
    }
}

kernel! {
    /// Every register tile of `C = A @ B` (see the module docs for the loop order).
    fn tiles(m: usize, n: usize, k: usize, a: MatRef<'_>, b: Columns<'_>, c: &mut [f32]) {
        // One loop nest per kind of B, each compiled for it: with the first tiles' packing
        // in the same loops, the tiles of already packed blocks ran 2-4% slower.
        match b {
            Columns::Blocks(blocks) => every_tile::<V>([m, n, k], a, Columns::Blocks(blocks), c),
            as_read => every_tile::<V>([m, n, k], a, as_read, c),
        }
    }
}

/// The loops of [`tiles`].
#[inline(always)]
fn every_tile<V: F32Vector>([m, n, k]: [usize; 3], a: MatRef, mut b: Columns, c: &mut [f32]) {
    let lanes = V::LANES;
    let step = balanced_tile_rows(m, tile_rows(lanes));
    // Whole tiles of rows, as many as A_BLOCK_VALUES holds (at least one).
    let block_rows = (A_BLOCK_VALUES / k).max(step) / step * step;
    for r0 in (0..m).step_by(block_rows) {
        let r_end = m.min(r0 + block_rows);
        for j0 in (0..n).step_by(2 * lanes) {
            let cols = (n - j0).min(2 * lanes);
            let mut first = r0;
            if let Columns::PackedAsRead { b: source, blocks, width, .. } = &mut b
                && r0 == 0
                && cols == *width
            {
                // The block's first tile packs it as it reads it.
                let rows = step.min(r_end);
                let rows_of_b = &source.data[source.offset + j0..][..(k - 1) * source.row_stride + cols];
                let packed = &mut blocks[j0 * k..][..k * cols];
                let b = PackingRows { source: rows_of_b, ld: source.row_stride, packed };
                let tile = Tile { k, b, cols, c: &mut c[j0..], ldc: n, start: TileStart::Zero };
                row_tile::<V, 2, _>(a, 0, rows, tile);
                first = rows;
            }
            let (b_block, ldb) = b.block(j0, cols, 2 * lanes);
            let b = BlockRows { b: b_block, ldb };
            for i0 in (first..r_end).step_by(step) {
                let tile = Tile { k, b, cols, c: &mut c[i0 * n + j0..], ldc: n, start: TileStart::Zero };
                let rows = step.min(r_end - i0);
                // A block of at most one vector's columns takes one accumulator per row.
                if cols <= lanes {
                    row_tile::<V, 1, _>(a, i0, rows, tile);
                } else {
                    row_tile::<V, 2, _>(a, i0, rows, tile);
                }
            }
        }
    }
}

/// The rows of the register tiles that cover `m` rows in as few tiles of at most `max`
/// rows as possible, as evenly as possible: 64 rows in tiles of at most 12 are 11, 11,
/// 11, 11, 11, 9 rather than five of 12 and one of 4, whose 8 accumulators (AVX-512)
/// keep the FMA units less busy (measured at `64 x 288 x 784`, one thread: the 4 rows
/// cost 5.1 us each, a whole tile's 4.0).
pub(super) fn balanced_tile_rows(m: usize, max: usize) -> usize {
    m.div_ceil(m.div_ceil(max).max(1)).max(1)
}

/// The register tile at row `i0` with `rows` rows (at most [`WIDE_ROWS`]) and `NV`
/// vectors of columns.
#[inline(always)]
pub(super) fn row_tile<V: F32Vector, const NV: usize, B: TileColumns<V, NV>>(
    a: MatRef,
    i0: usize,
    rows: usize,
    tile: Tile<'_, B>,
) {
    match rows {
        1 => a_rows::<V, 1, NV, B>(a, i0, tile),
        2 => a_rows::<V, 2, NV, B>(a, i0, tile),
        3 => a_rows::<V, 3, NV, B>(a, i0, tile),
        4 => a_rows::<V, 4, NV, B>(a, i0, tile),
        5 => a_rows::<V, 5, NV, B>(a, i0, tile),
        6 => a_rows::<V, 6, NV, B>(a, i0, tile),
        7 => a_rows::<V, 7, NV, B>(a, i0, tile),
        8 => a_rows::<V, 8, NV, B>(a, i0, tile),
        9 => a_rows::<V, 9, NV, B>(a, i0, tile),
        10 => a_rows::<V, 10, NV, B>(a, i0, tile),
        11 => a_rows::<V, 11, NV, B>(a, i0, tile),
        _ => a_rows::<V, WIDE_ROWS, NV, B>(a, i0, tile),
    }
}

/// The register tile `C[i0..i0 + R, j0..] = A[i0..i0 + R, ..] @ B[.., j0..]`, A's values
/// read through its strides.
#[inline(always)]
fn a_rows<V: F32Vector, const R: usize, const NV: usize, B: TileColumns<V, NV>>(
    a: MatRef,
    i0: usize,
    tile: Tile<'_, B>,
) {
    let (first, k) = (a.offset + i0 * a.row_stride, tile.k);
    let last = first + (R - 1) * a.row_stride + (k - 1) * a.col_stride;
    assert!(last < a.data.len(), "small_sgemm: A's tile reaches past its slice");
    if a.col_stride == 1 {
        // A's rows contiguous (a row-major A): each row a slice indexed by the depth step,
        // which compiles to a running address per row, with no multiply. Against the
        // strided index below, same-process A/B with AVX2 on Zen 3, one thread: 1-2%
        // faster on the GPT baby's products and on 256^3-512^3. Unchecked: the bounds
        // check of each row at each step (twelve with AVX-512's tiles) cost 10-25% at
        // 128^3 on a Xeon with AMX, one thread, median 34.9-38.7 -> 29.3-32.6 us
        // (AVX2 the same, 48-51 us either way); asserting `p < k` first did not remove them.
        let rows: [&[f32]; R] = std::array::from_fn(|r| &a.data[first + r * a.row_stride..][..k]);
        return tile.multiply::<V, R, NV>(
            #[inline(always)]
            |p, r| {
                debug_assert!(p < k && r < R);
                // SAFETY: `multiply` asks only for `p < k` and `r < R`, and each of the `R`
                // rows holds `k` values.
                unsafe { *rows[r].get_unchecked(p) }
            },
        );
    }
    tile.multiply::<V, R, NV>(
        #[inline(always)]
        |p, r| {
            debug_assert!(p < k && r < R);
            // SAFETY: `multiply` asks only for `p < k` and `r < R`, so the index is at most
            // `last`, which is inside `a.data` (asserted above). (Checked indexing here, in the
            // innermost loop, cost a third of the speed.)
            unsafe { *a.data.get_unchecked(first + r * a.row_stride + p * a.col_stride) }
        },
    );
}

/// Where a register tile reads B: the `NV` vectors of each of B's rows at the tile's
/// columns.
pub(super) trait TileColumns<V: F32Vector, const NV: usize> {
    /// Calls `f(p, row p)` for every depth step `p` in `0..depth`, in order.
    fn for_each_row(self, depth: usize, f: impl FnMut(usize, [V; NV]));
}

/// A column block of B in memory: row `p` is `b[p * ldb..]`, readable for `NV` whole
/// vectors.
#[derive(Clone, Copy)]
pub(super) struct BlockRows<'b> {
    pub b: &'b [f32],
    pub ldb: usize,
}

/// A column block of B read in place, rows `ld` apart, and copied as it is read into
/// `packed`, its rows one after another (as [`BlockRows`] then reads them): the first
/// register tile of a column block packs it for the others ([`Columns::PackedAsRead`]).
///
/// Each row is stored to the packed block before the tile's multiply-adds use it, and
/// the rows come from `chunks_exact` (the last one apart), so that the loop has one exit
/// and no bounds check. Read through `chunks(ld).zip(..).take(depth)`, with the stores
/// after the multiply-adds, the loop had two exits and carried copies of the
/// accumulators (three of them through the stack) from one step to the next; that tile
/// took 1.6-1.7 times a plain tile's time at `128^3` (now 1.1-1.2). Same process, builds
/// alternated (with [`Tile::multiply`]'s stores of C), GFLOP/s at one thread: `128^3`
/// 157-158 -> 163-164, `96^3` 149-150 -> 155-156. `depth` is at least 1.
struct PackingRows<'b> {
    source: &'b [f32],
    ld: usize,
    packed: &'b mut [f32],
}

impl<V: F32Vector, const NV: usize> TileColumns<V, NV> for PackingRows<'_> {
    #[inline(always)]
    fn for_each_row(self, depth: usize, mut f: impl FnMut(usize, [V; NV])) {
        let width = NV * V::LANES;
        let (packed, last_packed) = self.packed[..depth * width].split_at_mut((depth - 1) * width);
        let (source, last_source) = self.source.split_at((depth - 1) * self.ld);
        let rows = source.chunks_exact(self.ld).zip(packed.chunks_exact_mut(width));
        for (p, (source_row, packed_row)) in rows.enumerate() {
            f(p, copied_row(source_row, packed_row));
        }
        f(depth - 1, copied_row(last_source, last_packed));
    }
}

/// The `NV` vectors at the start of `source`, stored at the start of `packed` too.
#[inline(always)]
fn copied_row<V: F32Vector, const NV: usize>(source: &[f32], packed: &mut [f32]) -> [V; NV] {
    let row: [V; NV] = load_row(source);
    for (v, vector) in row.iter().enumerate() {
        vector.store(&mut packed[v * V::LANES..]);
    }
    row
}

/// Rows of a packed column block that [`BlockRows`] hands out per group (see there).
const ROWS_PER_GROUP: usize = 4;

impl<V: F32Vector, const NV: usize> TileColumns<V, NV> for BlockRows<'_> {
    /// Rows packed one after another (`ldb` is the block's width, as in the column blocks
    /// that B is packed into) are taken [`ROWS_PER_GROUP`] at a time from `chunks_exact`:
    /// every load then sits at a constant offset in a slice of constant length, with no
    /// bounds check. The 12-row AVX-512 tile's loop (in the disassembly) had 6 loads from
    /// the stack per depth step (3 of its A row pointers, B's start and stride, the trip
    /// count); it now reloads all twelve A pointers once per group of 4 steps (13 loads).
    /// Same-process A/B on a Xeon with AMX, median GFLOP/s before -> after, AVX-512 at one
    /// thread: `128^3` 141.5 -> 149.2, `256^3` 153.6 -> 162.8, `512^3` 138.8 -> 154.9,
    /// `768 x 128 x 384` 146.1 -> 160.7, `64 x 288 x 784` 117.8 -> 131.1; at two threads
    /// `512^3` 277 -> 312, `768 x 128 x 384` 297 -> 323; the 12-row tile alone, on 120
    /// rows, depth 256, in a scratch form of the same loop (FMA peak 228) 159.5 -> 178.4.
    /// AVX2's 6-row tile: -2% to +4%. Groups of 2 and 8 gained less (`256^3` +5% and +6%,
    /// against +9% in the same run), groups of 4 with each row's bounds checked nothing.
    #[inline(always)]
    fn for_each_row(self, depth: usize, mut f: impl FnMut(usize, [V; NV])) {
        let width = NV * V::LANES;
        if self.ldb != width {
            // Rows `ldb` apart: B read in place, or a block of a wider buffer.
            for p in 0..depth {
                f(p, load_row(&self.b[p * self.ldb..][..width]));
            }
            return;
        }
        let groups = self.b[..depth * width].chunks_exact(ROWS_PER_GROUP * width);
        let rest = groups.remainder();
        for (g, group) in groups.enumerate() {
            for row in 0..ROWS_PER_GROUP {
                f(g * ROWS_PER_GROUP + row, load_row(&group[row * width..]));
            }
        }
        let done = depth - rest.len() / width;
        for (i, row) in rest.chunks_exact(width).enumerate() {
            f(done + i, load_row(row));
        }
    }
}

/// The `NV` vectors at the start of `row`.
#[inline(always)]
fn load_row<V: F32Vector, const NV: usize>(row: &[f32]) -> [V; NV] {
    std::array::from_fn(
        #[inline(always)]
        |v| V::load(&row[v * V::LANES..]),
    )
}

/// One register tile's B (its columns, `cols` of them used), C (from the tile's corner,
/// rows `ldc` apart) and what its sums start from.
pub(super) struct Tile<'c, B> {
    pub k: usize,
    pub b: B,
    pub cols: usize,
    pub c: &'c mut [f32],
    pub ldc: usize,
    pub start: TileStart<'c>,
}

/// What a register tile's sums start from.
#[derive(Clone, Copy)]
pub(super) enum TileStart<'a> {
    /// Zero: `C = A @ B`.
    Zero,
    /// `values[r]` in every column of row `r` (a convolution's bias).
    RowValues(&'a [f32]),
    /// C's own values: `C += A @ B` (a sum over several products).
    Output,
}

impl<B> Tile<'_, B> {
    /// `C = start + sum over p of A[.., p] (outer) B[p, ..]`, where `a(p, r)` is the
    /// tile's row `r` of A at depth `p` (asked only for `p < k`, `r < R`): `NV` vector
    /// accumulators per row (twelve for `R = 6`, `NV = 2`), one B row (`NV` vectors) and
    /// `R` broadcasts per depth step. Only C's columns past `cols` are left unwritten
    /// (and unread).
    ///
    /// The accumulators stay in registers from the first multiply-add to the stores of C
    /// when every loop that indexes them is unrolled: the loads and stores of a partial
    /// tile (C's right edge, whose copies through a buffer keep their loops rolled) take
    /// the accumulators by value ([`loaded`], [`store_edge`]). With those loops in
    /// this function, the tiles went through the stack (seen in the disassembly of the
    /// packing tile, [`PackingRows`]): their accumulators copied there after the last
    /// step and read back for the stores (and, in one variant's build, zeroed there first
    /// with a `memset`).
    #[inline(always)]
    fn multiply<V: F32Vector, const R: usize, const NV: usize>(self, a: impl Fn(usize, usize) -> f32)
    where
        B: TileColumns<V, NV>,
    {
        let Tile { k, b, cols, c, ldc, start } = self;
        let lanes = V::LANES;
        let mut acc = [[V::splat(0.0); NV]; R];
        match start {
            TileStart::Zero => {}
            TileStart::RowValues(values) => {
                for (acc_row, &value) in acc.iter_mut().zip(&values[..R]) {
                    *acc_row = [V::splat(value); NV];
                }
            }
            TileStart::Output => acc = loaded::<V, R, NV>(c, ldc, cols),
        }
        b.for_each_row(
            k,
            #[inline(always)]
            |p, b_vectors| {
                for (r, acc_row) in acc.iter_mut().enumerate() {
                    let x = V::splat(a(p, r));
                    for (acc, &b) in acc_row.iter_mut().zip(&b_vectors) {
                        *acc = x.mul_add(b, *acc);
                    }
                }
            },
        );
        if cols == NV * lanes {
            for (r, acc_row) in acc.iter().enumerate() {
                let c_row = &mut c[r * ldc..][..cols];
                for (v, acc) in acc_row.iter().enumerate() {
                    acc.store(&mut c_row[v * lanes..]);
                }
            }
        } else {
            store_edge::<V, R, NV>(acc, c, ldc, cols);
        }
    }
}

/// The first `cols` columns of the `R`-row tile of C at `c` (rows `ldc` apart) as a
/// register tile, zero past them: the starting sums of [`TileStart::Output`].
#[inline(always)]
fn loaded<V: F32Vector, const R: usize, const NV: usize>(c: &[f32], ldc: usize, cols: usize) -> [[V; NV]; R] {
    let lanes = V::LANES;
    let mut acc = [[V::splat(0.0); NV]; R];
    for (r, acc_row) in acc.iter_mut().enumerate() {
        let c_row = &c[r * ldc..][..cols];
        for (v, acc) in acc_row.iter_mut().enumerate() {
            let first = v * lanes;
            if first + lanes <= cols {
                *acc = V::load(&c_row[first..]);
            } else if first < cols {
                *acc = V::load_partial(&c_row[first..], 0.0);
            }
        }
    }
    acc
}

/// Stores the first `cols` columns of a register tile `acc` (fewer than its `NV`
/// vectors hold: C's right edge) to `c`, rows `ldc` apart.
#[inline(always)]
fn store_edge<V: F32Vector, const R: usize, const NV: usize>(
    acc: [[V; NV]; R],
    c: &mut [f32],
    ldc: usize,
    cols: usize,
) {
    let lanes = V::LANES;
    for (r, acc_row) in acc.iter().enumerate() {
        let c_row = &mut c[r * ldc..][..cols];
        for (v, acc) in acc_row.iter().enumerate() {
            let start = v * lanes;
            if start + lanes <= cols {
                acc.store(&mut c_row[start..]);
            } else if start < cols {
                // The right edge of C.
                acc.store_partial(&mut c_row[start..]);
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

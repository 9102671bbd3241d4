//! The shifted product: the implicit GEMM of a convolution whose im2col rows are the
//! input planes themselves, read from a shifted start and masked where the tap meets
//! padding. `conv_phases.rs` maps every convolution and transposed convolution it
//! takes onto these products.
//!
//! The product is
//!
//! ```text
//! out[co, j] = start[co] + sum over taps t, channels c of
//!              filters(co, t, c) * planes[c * channel_stride + offset(t) + j]
//! ```
//!
//! over the positions `j = y * width + x` of an output plane, where each tap's term is
//! present only inside its window of rows and columns (elsewhere it meets padding). For a
//! stride-1 convolution whose feature rows are as wide as the image's, the tap `(ky, kx)`
//! reads the image itself at `offset = (ky * dy - py) * w + kx * dx - px`: feature
//! position `j` and the image position the tap meets there differ by that constant, so
//! im2col's row for (input channel, tap) is the image plane read from `offset` on. Other
//! strides and widths come here through phase planes (`conv_phases.rs`).
//!
//! Whether a tap reads at a position depends only on the tap and the position, so the
//! lane masks of every tap and block of positions come from bits built once per product
//! ([`ShiftedProduct::new`]), and the GEMM's B vectors are masked loads straight from the
//! planes ([`F32Vector::load_masked`]): the lanes in the padding read nothing and give
//! zero. The masks bound every read: `new` checks that each set lane reads inside the
//! planes' `extent`, and the kernel that the planes it is given are that long.
//!
//! The sums run in the register tiles of the unpacked GEMM (`gemm_small.rs`): for each
//! block of two vectors of positions, every tile of output channels, starting from a bias
//! or zero. The depth runs tap-major (`t * channels + c`), so a tap's masks stay in mask
//! registers while its channels go by; the filters are packed once per product to match,
//! each depth step's values for a tile side by side (one cache line for the tile's
//! broadcasts instead of one per channel: 2-3% faster). A block's plane lines (the rows
//! around its positions, in every channel) are read by each tile of output channels in
//! turn from L1, where the im2col method wrote one copy of the image per tap and read them
//! back.
//!
//! Without mask registers (AVX2, and the portable vectors) a masked load is costly, so
//! each block's columns are instead staged: loaded once into a buffer of `depth` rows of
//! two vectors, plain loads with the padding lanes selected to zero wherever the lines
//! lie inside the planes, and every tile of output channels reads that buffer as the
//! unpacked GEMM reads a packed column block of B ([`stages_columns`]). This is im2col
//! done one block of positions at a time, in L1 (for depths up to about 500 with AVX2),
//! never writing the columns matrix.
//!
//! Measured on the issue's layer (batch 64, 32 -> 64 channels, 28 x 28, 3 x 3, padding
//! 1), interleaved in one process at one thread, with AVX-512 on Zen 4: 18.6-18.9 ms
//! here against 21.6-22.0 ms by im2col (99 against 85 GFLOP/s, the FMA peak 115).
//! Masking the loads costs about 2%, reading the image from L3 rather than L1 about 2.5%
//! (both measured by removing them); prefetching each tile's output lines before its
//! sums gained 5% (measured on the first version, a depth-major kernel: the first store
//! to an output line otherwise waits for it). With AVX2 on Zen 3, staged: see
//! [`stages_columns`] and `conv_phases::pays_on`.

use super::gemm::{Isa, MatRef, PARALLEL_MIN_WORK};
use super::gemm_small::{BlockRows, Tile, TileColumns, TileStart, balanced_tile_rows, row_tile, tile_rows};
use super::simd::{F32Vector, kernel, prefetch, vector_lanes};
use crate::{buffers, parallel};
use std::ops::Range;

/// Positions per word of [`ShiftedProduct`]'s mask bits: a block of two vectors of
/// positions (32 with AVX-512, fewer with narrower vectors) lies inside one word.
const WORD: usize = 32;

/// One tap of a [`ShiftedProduct`]: at output position `j` its channel `c` reads
/// `planes[c * channel_stride + offset + j]`, but only where the position's row is in
/// `rows` and its column in `cols` (elsewhere the tap meets padding and adds nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Tap {
    pub offset: isize,
    pub rows: Range<usize>,
    pub cols: Range<usize>,
}

/// A product of the form in the module doc, prepared for one ISA: the taps' offsets and
/// mask bits, and the filters packed for its register tiles.
#[derive(Debug)]
pub(super) struct ShiftedProduct {
    out_channels: usize,
    channels: usize,
    channel_stride: usize,
    positions: usize,
    offsets: Vec<isize>,
    /// `[word of positions][tap]`: bit `l` of word `w` is set where the tap reads at
    /// position `w * WORD + l`.
    bits: Vec<u32>,
    /// The filters, tap-major, each register tile's rows side by side: the tile at
    /// output channel `i0` (`tile_rows` rows, the last fewer) is `depth * rows` values
    /// from `i0 * depth`, value `p * rows + r` the filter of channel `i0 + r` at depth
    /// step `p = t * channels + c`.
    filters: Vec<f32>,
    tile_rows: usize,
    lanes: usize,
    /// One past the last plane value a set lane reads.
    extent: usize,
    /// Whether each block's columns are loaded once into a buffer that the tiles read
    /// (see [`stages_columns`]), rather than loaded masked by every tile.
    staged: bool,
}

impl ShiftedProduct {
    /// The product of `out_channels` rows over the `size = [rows, width]` output plane,
    /// reading `channels` planes `channel_stride` apart through `taps`, with
    /// `filter(co, t, c)` the filter of output channel `co`, tap `t` and channel `c`; its
    /// register tiles are `isa`'s.
    ///
    /// Panics if a tap reads before the planes' start inside its window.
    pub(super) fn new(
        isa: Isa,
        out_channels: usize,
        (channels, channel_stride): (usize, usize),
        size: [usize; 2],
        taps: &[Tap],
        filter: impl Fn(usize, usize, usize) -> f32,
    ) -> ShiftedProduct {
        let [rows, width] = size;
        let positions = rows * width;
        let lanes = vector_lanes(isa);
        assert!(WORD.is_multiple_of(2 * lanes), "shifted product: {lanes} lanes");
        let mut bits = vec![0u32; positions.div_ceil(WORD) * taps.len()];
        let mut extent = 0;
        for (t, tap) in taps.iter().enumerate() {
            let inside = |j: &usize| tap.rows.contains(&(j / width)) && tap.cols.contains(&(j % width));
            let (Some(first), Some(last)) = ((0..positions).find(inside), (0..positions).rev().find(inside)) else {
                continue;
            };
            let first_read = tap.offset + first as isize;
            assert!(first_read >= 0, "shifted product: tap {t} reads {} values before its planes", -first_read);
            let last_read = (tap.offset + last as isize) as usize + channels.saturating_sub(1) * channel_stride;
            extent = extent.max(last_read + 1);
            for j in (first..=last).filter(inside) {
                bits[j / WORD * taps.len() + t] |= 1 << (j % WORD);
            }
        }
        let depth = taps.len() * channels;
        let tile_rows = balanced_tile_rows(out_channels, tile_rows(lanes));
        let mut filters = vec![0.0; out_channels * depth];
        for i0 in (0..out_channels).step_by(tile_rows) {
            let tile_height = tile_rows.min(out_channels - i0);
            let tile = &mut filters[i0 * depth..][..tile_height * depth];
            for (p, step) in tile.chunks_exact_mut(tile_height).enumerate() {
                let (t, c) = (p / channels, p % channels);
                step.iter_mut().enumerate().for_each(|(r, value)| *value = filter(i0 + r, t, c));
            }
        }
        let offsets = taps.iter().map(|tap| tap.offset).collect();
        ShiftedProduct {
            out_channels,
            channels,
            channel_stride,
            positions,
            offsets,
            bits,
            filters,
            tile_rows,
            lanes,
            extent,
            staged: stages_columns(isa),
        }
    }

    /// The bits of the `block` positions from `j0` (a multiple of `block`) at which tap
    /// `t` reads.
    fn bits_at(&self, t: usize, j0: usize, block: usize) -> u32 {
        let word = self.bits[j0 / WORD * self.offsets.len() + t] >> (j0 % WORD);
        if block < WORD { word & ((1 << block) - 1) } else { word }
    }

    /// How many values the planes given to [`shifted_product`] must hold at least.
    #[cfg(test)]
    pub(super) fn extent(&self) -> usize {
        self.extent
    }
}

/// Whether `isa`'s products stage each block's columns: load them once into a buffer
/// (`depth` rows of two vectors, in L1 for the usual depths) that every tile of output
/// channels then reads, instead of each tile loading them masked from the planes. Every
/// ISA but AVX-512 does: without mask registers the masked loads are costly (an AVX2
/// `vmaskmovps` takes its mask from a vector register), and doing them once per block
/// rather than once per tile pays. Measured on Zen 3 (AVX2) at one thread, the issue's
/// layer (batch 64, 32 -> 64 channels, 28 x 28, 3 x 3, padding 1), min of 10, builds
/// alternated: each tile loading masked 123-151 ms, staged with masked loads 59-69,
/// staged with plain loads where they stay inside the planes ([`ShiftedPlanes::stage`])
/// 52.9-57.3, im2col and the GEMM 62-91 in the same runs. AVX-512 keeps the direct
/// loads, measured on Zen 4 against im2col (module doc); staging is not measured there.
pub(super) fn stages_columns(isa: Isa) -> bool {
    isa != Isa::Avx512
}

/// B for the register tiles of one block of positions, in tap-major depth order (depth
/// step `t * channels + c`): the planes, the taps' offsets, and the block's masks (two
/// vectors per tap) from position `j0`. Each tap's masks stay in registers while its
/// channels go by.
#[derive(Clone, Copy)]
struct ShiftedPlanes<'a, M> {
    planes: &'a [f32],
    channels: usize,
    channel_stride: usize,
    j0: usize,
    offsets: &'a [isize],
    masks: &'a [[M; 2]],
}

impl<M: Copy> ShiftedPlanes<'_, M> {
    /// Calls `f` with the two vectors of tap `t`'s row of the block in each channel in
    /// turn, loaded masked: the lanes in the padding read nothing and give zero.
    #[inline(always)]
    fn masked_tap_rows<V: F32Vector<Mask = M>, const NV: usize>(&self, t: usize, mut f: impl FnMut([V; NV])) {
        let masks = &self.masks[t];
        let mut start = self.planes.as_ptr().wrapping_offset(self.offsets[t] + self.j0 as isize);
        for _ in 0..self.channels {
            // SAFETY: a lane of vector `v` is set in the tap's mask only when the tap
            // reads at its position `j = j0 + v * LANES + l` (the product's bits), and
            // `ShiftedProduct::new` checked that every such read,
            // `c * channel_stride + offset + j` for `c < channels`, lies in
            // `0..extent`; `shifted_product` asserted `planes.len() >= extent`.
            f(std::array::from_fn(
                #[inline(always)]
                |v| unsafe { V::load_masked(start.wrapping_add(v * V::LANES), masks[v]) },
            ));
            start = start.wrapping_add(self.channel_stride);
        }
    }

    /// Writes the block's columns into `staged` (`depth` rows of two vectors), the
    /// values [`TileColumns::for_each_row`] gives. Where a tap's lines in every channel
    /// lie inside the planes (all blocks but the first and last few of a plane), they
    /// are plain loads with the padding lanes set to zero by a select; elsewhere masked
    /// loads. (Staged with masked loads throughout, the issue's layer took 59-69 ms
    /// instead of 53-57 on Zen 3: see [`stages_columns`].)
    #[inline(always)]
    fn stage<V: F32Vector<Mask = M>>(&self, staged: &mut [f32]) {
        let (lanes, zero) = (V::LANES, V::splat(0.0));
        let block = 2 * lanes;
        assert_eq!(staged.len(), self.offsets.len() * self.channels * block, "shifted product: staging size");
        let mut rows = staged.chunks_exact_mut(block);
        for (t, (&offset, masks)) in self.offsets.iter().zip(self.masks).enumerate() {
            let first = offset + self.j0 as isize;
            let end = first + ((self.channels - 1) * self.channel_stride + block) as isize;
            let mut tap_rows = rows.by_ref().take(self.channels);
            if first < 0 || end > self.planes.len() as isize {
                self.masked_tap_rows::<V, 2>(t, |[low, high]| {
                    if let Some(row) = tap_rows.next() {
                        low.store(row);
                        high.store(&mut row[lanes..]);
                    }
                });
                continue;
            }
            let lines = &self.planes[first as usize..end as usize];
            for (c, row) in tap_rows.enumerate() {
                let line = &lines[c * self.channel_stride..][..block];
                V::select(masks[0], V::load(line), zero).store(row);
                V::select(masks[1], V::load(&line[lanes..]), zero).store(&mut row[lanes..]);
            }
        }
    }
}

impl<V: F32Vector, const NV: usize> TileColumns<V, NV> for ShiftedPlanes<'_, V::Mask> {
    #[inline(always)]
    fn for_each_row(self, depth: usize, mut f: impl FnMut(usize, [V; NV])) {
        assert_eq!(depth, self.offsets.len() * self.channels, "shifted product: depth");
        let mut p = 0;
        for t in 0..self.offsets.len() {
            self.masked_tap_rows::<V, NV>(t, |row| {
                f(p, row);
                p += 1;
            });
        }
    }
}

/// The product `p` (prepared for `isa`) of `planes` (at least `p.extent()` values) into
/// `out` (`[out_channels, positions]` row-major), each row starting from `start[co]` (or
/// zero). Every element of `out` is written.
///
/// A product of [`PARALLEL_MIN_WORK`] multiply-adds or more is shared among the threads:
/// its tiles of output channels where there are as many as threads (each part reads all
/// of the planes), else its positions, in whole blocks, each part computed into scratch
/// and copied into place (on two threads, a product of one tile: up to 12 output
/// channels with AVX-512, 6 with AVX2). Each value is computed by the same tile and block
/// on any number of threads. Inside a parallel loop over batch entries (two or more per
/// thread) it runs on one; a batch too small for that ran every product on one thread
/// before. Zen 4, two threads, batch of one, the min over
/// five runs of each build (alternated) of the median ms of 7, before -> after: 3 x 3 3
/// -> 64 channels at 256 x 256 4.86 -> 3.75; 4 x 4 stride 2 64 -> 128 at 64 x 64 2.74 ->
/// 2.14, its transposed convolution 2.74 -> 1.73; 1 x 1 128 -> 128 at 32 x 32 0.34 ->
/// 0.22 and 0.35 -> 0.25 (by tiles); by positions, 3 x 3 16 -> 3 at 128 x 128 (batch
/// 2) 1.00 -> 0.66, the transposed convolution of the 3 -> 64 one 9.83 -> 5.61. One
/// thread unchanged.
pub(super) fn shifted_product(isa: Isa, p: &ShiftedProduct, planes: &[f32], start: Option<&[f32]>, out: &mut [f32]) {
    let (rows, positions) = (p.out_channels, p.positions);
    assert_eq!(out.len(), rows * positions, "shifted product: output size");
    if out.is_empty() {
        return;
    }
    let work = out.len().saturating_mul(p.offsets.len() * p.channels);
    let threads = if work < PARALLEL_MIN_WORK { 1 } else { parallel::threads() };
    let (tiles, blocks) = (rows.div_ceil(p.tile_rows), positions.div_ceil(2 * p.lanes));
    if tiles >= threads || blocks < threads {
        let parts = threads.min(tiles);
        parallel::for_each_part_mut(out, p.tile_rows * positions, parts, |offset, part| {
            let first = offset / positions;
            product_part(isa, p, [first..first + part.len() / positions, 0..positions], planes, start, part);
        });
        return;
    }
    let per_part = blocks.div_ceil(threads) * 2 * p.lanes;
    let spans = |i: usize| i * per_part..((i + 1) * per_part).min(positions);
    let parts = parallel::map(positions.div_ceil(per_part), |i| {
        let mut part = buffers::for_overwrite(rows * spans(i).len());
        product_part(isa, p, [0..rows, spans(i)], planes, start, &mut part);
        part
    });
    for (i, part) in parts.into_iter().enumerate() {
        let span = spans(i);
        for (row, values) in out.chunks_exact_mut(positions).zip(part.chunks_exact(span.len())) {
            row[span.clone()].copy_from_slice(values);
        }
        buffers::recycle(part);
    }
}

kernel! {
    /// The output channels `rows` (from a tile's first row to another's, or to the last
    /// channel) at the positions `span` (from a block's first, two vectors, to another's or
    /// to the last position) of [`shifted_product`], into `out` (`[rows.len(),
    /// span.len()]`).
    fn product_part(
        p: &ShiftedProduct,
        part: [Range<usize>; 2],
        planes: &[f32],
        start: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let [rows, span] = part;
        assert_eq!(p.lanes, V::LANES, "shifted product: prepared for another ISA");
        assert!(planes.len() >= p.extent, "shifted product: {} plane values, the taps read {}", planes.len(), p.extent);
        assert!(
            rows.end <= p.out_channels && rows.start.is_multiple_of(p.tile_rows),
            "shifted product: rows {rows:?} are not whole tiles of {} rows", p.tile_rows,
        );
        assert!(
            span.end <= p.positions && span.start.is_multiple_of(2 * V::LANES),
            "shifted product: positions {span:?} are not whole blocks of {}", 2 * V::LANES,
        );
        let width = span.len();
        assert_eq!(out.len(), rows.len() * width, "shifted product: output size");
        if let Some(start) = start {
            assert_eq!(start.len(), p.out_channels, "shifted product: one start value per output channel");
        }
        let depth = p.offsets.len() * p.channels;
        if depth == 0 {
            for (co, row) in rows.zip(out.chunks_exact_mut(width.max(1))) {
                row.fill(start.map_or(0.0, |start| start[co]));
            }
            return;
        }
        let lanes = V::LANES;
        let block = 2 * lanes;
        let mut masks = vec![[V::mask_from_bits(0); 2]; p.offsets.len()];
        // Staged: each block's columns are loaded once into this buffer (every value
        // written before the tiles read it), and every tile reads them from there.
        let mut staged = p.staged.then(|| crate::buffers::for_overwrite(depth * block));
        for j0 in span.clone().step_by(block) {
            let cols = block.min(span.end - j0);
            for (t, masks) in masks.iter_mut().enumerate() {
                let bits = p.bits_at(t, j0, block);
                *masks = [V::mask_from_bits(bits), V::mask_from_bits(bits >> lanes)];
            }
            let columns = ShiftedPlanes {
                planes,
                channels: p.channels,
                channel_stride: p.channel_stride,
                j0,
                offsets: &p.offsets,
                masks: &masks,
            };
            let Some(staged) = &mut staged else {
                block_tiles::<V, _>(p, [rows.clone(), span.clone()], columns, j0, cols, start, out);
                continue;
            };
            columns.stage::<V>(staged);
            let staged = BlockRows { b: staged, ldb: block };
            block_tiles::<V, _>(p, [rows.clone(), span.clone()], staged, j0, cols, start, out);
        }
        if let Some(staged) = staged {
            crate::buffers::recycle(staged);
        }
    }
}

/// Every register tile of the output channels `rows` at the block of `cols` positions
/// from `j0`, its B read through `columns`; `out` holds those channels' values at the
/// positions `span`.
#[inline(always)]
fn block_tiles<V: F32Vector, B: TileColumns<V, 1> + TileColumns<V, 2> + Copy>(
    p: &ShiftedProduct,
    [rows, span]: [Range<usize>; 2],
    columns: B,
    j0: usize,
    cols: usize,
    start: Option<&[f32]>,
    out: &mut [f32],
) {
    let (width, column) = (span.len(), j0 - span.start);
    let depth = p.offsets.len() * p.channels;
    for i0 in rows.clone().step_by(p.tile_rows) {
        let tile_height = p.tile_rows.min(rows.end - i0);
        let at = i0 - rows.start;
        for r in at..at + tile_height {
            prefetch(&out[r * width + column]);
            prefetch(&out[r * width + column + cols - 1]);
        }
        let start = start.map_or(TileStart::Zero, |start| TileStart::RowValues(&start[i0..][..tile_height]));
        let c = &mut out[at * width + column..];
        let tile = Tile { k: depth, b: columns, cols, c, ldc: width, start };
        let filters = MatRef {
            data: &p.filters[i0 * depth..][..tile_height * depth],
            offset: 0,
            row_stride: 1,
            col_stride: tile_height,
        };
        if cols <= V::LANES {
            row_tile::<V, 1, _>(filters, 0, tile_height, tile);
        } else {
            row_tile::<V, 2, _>(filters, 0, tile_height, tile);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A tap of an output plane `[rows, width]`: any window, and an offset that puts its
    /// first read `slack` values after the planes' start.
    fn tap_in(size: [usize; 2]) -> impl Strategy<Value = Tap> {
        let [rows, width] = size;
        (0..=rows, 0..=rows, 0..=width, 0..=width, 0usize..40).prop_map(move |(r0, r1, c0, c1, slack)| {
            let (rows, cols) = (r0.min(r1)..r0.max(r1), c0.min(c1)..c0.max(c1));
            Tap { offset: slack as isize - (rows.start * width + cols.start) as isize, rows, cols }
        })
    }

    fn filter_value(co: usize, t: usize, c: usize) -> f32 {
        ((co * 31 + t * 7 + c * 13) % 17) as f32 / 8.0 - 1.0
    }

    /// The product by its definition, in f64.
    fn naive(
        out_channels: usize,
        (channels, channel_stride): (usize, usize),
        size: [usize; 2],
        taps: &[Tap],
        planes: &[f32],
        start: Option<&[f32]>,
    ) -> Vec<f64> {
        let positions = size[0] * size[1];
        let mut out = vec![0.0; out_channels * positions];
        for (co, row) in out.chunks_exact_mut(positions).enumerate() {
            for (j, value) in row.iter_mut().enumerate() {
                *value = start.map_or(0.0, |start| start[co] as f64);
                for (t, tap) in taps.iter().enumerate() {
                    if tap.rows.contains(&(j / size[1])) && tap.cols.contains(&(j % size[1])) {
                        for c in 0..channels {
                            let read = (c * channel_stride) as isize + tap.offset + j as isize;
                            *value += filter_value(co, t, c) as f64 * planes[read as usize] as f64;
                        }
                    }
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Every ISA, its columns staged and not, against the definition: random windows
        /// and offsets (reads from the planes' first value to their last: `planes` is
        /// exactly `extent` long, so staging takes both its plain and its masked loads),
        /// zero to five taps, output channels over several register tiles, into a
        /// NaN-filled output.
        #[test]
        fn shifted_products_match_their_definition_on_every_isa(
            (size, taps) in ((1usize..6, 1usize..40).prop_map(|(r, w)| [r, w]))
                .prop_flat_map(|size| (Just(size), prop::collection::vec(tap_in(size), 0..5))),
            out_channels in 1usize..30, channels in 0usize..4, channel_stride in 0usize..60, with_start: bool,
        ) {
            for isa in Isa::ALL.into_iter().filter(|isa| isa.is_available()) {
                let mut product = ShiftedProduct::new(isa, out_channels, (channels, channel_stride), size, &taps, filter_value);
                let planes: Vec<f32> = (0..product.extent()).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
                let start: Option<Vec<f32>> = with_start.then(|| (0..out_channels).map(|co| co as f32 - 3.0).collect());
                let want = naive(out_channels, (channels, channel_stride), size, &taps, &planes, start.as_deref());
                // Both ways of reading the columns, whichever this ISA would take.
                for staged in [false, true] {
                    product.staged = staged;
                    let mut out = vec![f32::NAN; want.len()];
                    shifted_product(isa, &product, &planes, start.as_deref(), &mut out);
                    for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                        prop_assert!(
                            (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{:?} staged {} [{}]: {} vs {}", isa, staged, i, got, want
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn large_products_are_shared_among_the_threads_by_tiles_or_by_positions() {
        // 41 x 39 positions (50 blocks of 32 with AVX-512, the last part ending in a
        // partial block), 16 channels and 9 taps with windows and shifts: 3 output
        // channels (one tile, cut by positions) and 40 (several tiles, cut by tiles); the
        // same values on one thread.
        let (size, channels) = ([41, 39], 16);
        let taps: Vec<Tap> = (0..9)
            .map(|t| Tap { offset: (t * 37) as isize, rows: t / 3..41 - t % 3, cols: t % 3..39 - t / 3 })
            .collect();
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a pool");
        for out_channels in [3, 40] {
            assert!(out_channels * 41 * 39 * channels * taps.len() >= PARALLEL_MIN_WORK);
            for isa in Isa::ALL.into_iter().filter(|isa| isa.is_available()) {
                let product = ShiftedProduct::new(isa, out_channels, (channels, 41 * 39), size, &taps, filter_value);
                let planes: Vec<f32> =
                    (0..product.extent()).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
                let start: Vec<f32> = (0..out_channels).map(|co| co as f32 - 3.0).collect();
                let want = naive(out_channels, (channels, 41 * 39), size, &taps, &planes, Some(&start));
                let run = || {
                    let mut out = vec![f32::NAN; want.len()];
                    shifted_product(isa, &product, &planes, Some(&start), &mut out);
                    out
                };
                let got = run();
                for (i, (&got, &want)) in got.iter().zip(&want).enumerate() {
                    assert!((got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "{isa:?} [{i}]: {got} vs {want}");
                }
                assert_eq!(
                    got,
                    one_thread.install(run),
                    "{isa:?}, {out_channels} channels: the threads changed a value"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "reads 1 values before its planes")]
    fn a_tap_reading_before_the_planes_is_refused() {
        let tap = Tap { offset: -3, rows: 0..2, cols: 2..4 };
        ShiftedProduct::new(Isa::Scalar, 1, (1, 0), [2, 4], &[tap], filter_value);
    }

    #[test]
    #[should_panic(expected = "the taps read 8")]
    fn planes_shorter_than_the_reads_are_refused() {
        let tap = Tap { offset: 0, rows: 0..2, cols: 0..4 };
        let product = ShiftedProduct::new(Isa::Scalar, 1, (1, 0), [2, 4], &[tap], filter_value);
        shifted_product(Isa::Scalar, &product, &[0.0; 7], None, &mut [0.0; 8]);
    }
}

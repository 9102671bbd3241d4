//! 3 x 3 convolutions at stride 1 by Winograd's minimal filtering F(2 x 2, 3 x 3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016, eq. 8).
//!
//! Each 2 x 2 tile of output features is computed from the 4 x 4 patch `d` of the image
//! under it as
//!
//! ```text
//! Y = A^T [ sum over input channels of (G g G^T) ⊙ (B^T d B) ] A
//!
//!       | 1  0 -1  0 |         | 1    0    0  |
//! B^T = | 0  1  1  0 |    G =  | 1/2  1/2  1/2 |    A^T = | 1  1  1  0 |
//!       | 0 -1  1  0 |         | 1/2 -1/2  1/2 |          | 0  1 -1 -1 |
//!       | 0  1  0 -1 |         | 0    0    1  |
//! ```
//!
//! with `g` a 3 x 3 filter: 16 multiplications per tile and input channel instead of the
//! 36 of the direct sum, 2.25x fewer. The sum over input channels at each of the 16
//! positions `e` of a transformed tile is a matrix product: with `U_e[ci, tile]` the
//! transformed patches and `W_e[co, ci]` the transformed filters, `M_e = W_e U_e`, and the
//! output transform reads each tile's 16 values back out of the `M_e`. The transforms'
//! coefficients are 0, +-1 and +-1/2, so they add few roundings: the tests hold the
//! results within `1e-4 (1 + sqrt(channels))` of the f64 sum, relative to its size.
//! A transposed convolution of the same kind (the input gradient of one) is the
//! convolution of its features with the flipped filters ([`conv_transpose2d`]).
//!
//! **Layout.** Tiles are numbered in raster order over the feature plane and run in
//! blocks of whole register tiles of columns (a multiple of two vectors), as many as keep
//! the block's `U` in L2 ([`PATCH_BLOCK_VALUES`]). For each block:
//!
//! ```text
//! U[e][ci][tile] = (B^T d B)[e]            every input channel (transform_patches)
//! for each register tile of output channels co0..co0 + rows:
//!     M[e][co][tile] = W_e[co, ..] U_e      16 products of depth cin (multiply)
//!     out[co][2 x 2 tile] = A^T M A + bias  (transform_products)
//! ```
//!
//! The products are the register tiles of the unpacked GEMM (`gemm_small.rs`), reading
//! `U_e`'s rows as a column block of B and the transformed filters packed tile by tile
//! (as `conv_shifted.rs` packs its filters). Both transforms are elementwise across a run
//! of tiles in one tile row, a vector of tiles at a time: a patch's columns are pairs of
//! image columns ([`F32Vector::deinterleave`] splits a row into its even and odd columns)
//! and an output tile's columns pairs of feature columns ([`F32Vector::interleave`]).
//! Batch entries run in parallel.
//!
//! `conv.rs` takes this method for f32 (and f16/bf16, accumulated in f32) 3 x 3
//! convolutions at stride 1 and dilation 1 with enough channels ([`applies`]); the
//! measurements are there.

use super::conv::ConvGeometry;
use super::gemm::{Isa, MatRef};
use super::gemm_small::{BlockRows, Tile, TileStart, balanced_tile_rows, row_tile, tile_rows};
use super::simd::{F32Vector, kernel, prefetch, vector_lanes};
use crate::{buffers, parallel};
use std::ops::Range;

/// The most transformed-patch values in a block of tiles (`16 * cin_g * tiles`): 128 KB,
/// a quarter of Zen 3's L2, so that `U` stays there while every tile of output channels
/// reads it.
const PATCH_BLOCK_VALUES: usize = 1 << 15;
/// The fewest input and output channels per group for which the products are deep and
/// tall enough to pay for the transforms.
const MIN_CHANNELS: usize = 16;

/// Whether [`conv2d`] computes this convolution with `isa`: a 3 x 3 kernel at stride 1
/// and dilation 1, at least [`MIN_CHANNELS`] input and output channels per group, some
/// output, and SIMD vectors (AVX2 or AVX-512).
///
/// Measured on Zen 3 (AVX2), `Tensor::conv2d` forward, Winograd against the method it
/// replaced (staged shifted products for 32 or more output channels, else im2col), ms,
/// the best of 6 in each of 4 alternated runs, the range over the runs at one thread, and
/// the ratio of the bests at one and two threads:
///
/// | layer (batch, channels, size) | Winograd | before | 1 thread | 2 threads |
/// |---|---|---|---|---|
/// | 64, 32 -> 64, 28 x 28, padding 1 (the issue's) | 37.9-40.6 | 54.9-61.8 | 1.45x | 1.18x |
/// | 16, 128 -> 128, 14 x 14 | 20.3-32.0 | 27.2-31.9 | 1.34x | 1.14x |
/// | 16, 256 -> 256, 7 x 7 | 25.3-36.7 | 42.8-48.3 | 1.69x | 1.45x |
/// | 8, 64 -> 64, 56 x 56 | 36.4-38.6 | 53.8-62.4 | 1.48x | 1.46x |
/// | 32, 16 -> 16, 32 x 32 | 4.3-10.5 | 8.7-13.6 | 2.03x | 2.11x |
/// | 32, 16 -> 32, 24 x 24, valid | 4.0-7.0 | 5.3-7.9 | 1.32x | 1.28x |
/// | 64, 32 -> 64, 28 x 28, valid | 34.0-40.8 | 50.1-58.3 | 1.48x | 1.54x |
///
/// The transposed convolutions of the same layers ([`conv_transpose2d`], the input
/// gradients), against staged shifted products or im2col, best of 6 in each of 3
/// alternated runs, ms at one thread: 47.2 / 56.5 (1.20x), 20.0 / 26.2 (1.31x), 25.0 / 41.5
/// (1.66x), 34.9 / 53.4 (1.53x), 4.1 / 8.1 (1.99x), 4.8 / 6.3 (1.30x), 47.8 / 59.0 (1.23x);
/// at two threads 1.17-2.35x.
///
/// Fewer than 16 channels were not measured (the transforms' share grows as the
/// products get shallower or shorter), nor AVX-512.
pub(super) fn applies(isa: Isa, g: &ConvGeometry) -> bool {
    isa != Isa::Scalar
        && is_3x3_stride_1(g)
        && g.in_channels / g.groups >= MIN_CHANNELS
        && g.out_channels / g.groups >= MIN_CHANNELS
        && g.out_size[0] * g.out_size[1] > 0
}

/// Whether `g` is a 3 x 3 convolution at stride 1 and dilation 1 whose sizes agree
/// (`out = in + 2 padding - 2` on both axes), as the transforms' row lengths assume.
fn is_3x3_stride_1(g: &ConvGeometry) -> bool {
    g.kernel == [3, 3]
        && g.stride == [1, 1]
        && g.dilation == [1, 1]
        && (0..2).all(|axis| g.out_size[axis] + 2 == g.in_size[axis] + 2 * g.padding[axis])
}

/// The convolution whose result is the transposed convolution of `g` (the adjoint of
/// `g`'s convolution), for a 3 x 3 kernel at stride 1 and dilation 1 with padding at most
/// 2: the features are its image, the image its features, and its padding is `2 - p`.
/// Its filters are `g`'s, flipped ([`flipped_filters`]).
fn transposed_as_convolution(g: &ConvGeometry) -> Option<ConvGeometry> {
    (is_3x3_stride_1(g) && g.padding.iter().all(|&p| p <= 2)).then(|| ConvGeometry {
        batch: g.batch,
        in_channels: g.out_channels,
        in_size: g.out_size,
        out_channels: g.in_channels,
        out_size: g.in_size,
        kernel: [3, 3],
        stride: [1, 1],
        padding: g.padding.map(|p| 2 - p),
        dilation: [1, 1],
        groups: g.groups,
    })
}

/// `g`'s filters (`[out_channels, in_channels / groups, 3, 3]`) as those of
/// [`transposed_as_convolution`] (`[in_channels, out_channels / groups, 3, 3]`): within
/// each group, input and output channels swapped and each 3 x 3 filter turned by 180
/// degrees.
fn flipped_filters(g: &ConvGeometry, weight: &[f32]) -> Vec<f32> {
    let (cin_g, cout_g) = (g.in_channels / g.groups, g.out_channels / g.groups);
    let mut flipped = vec![0.0; weight.len()];
    for group in 0..g.groups {
        for o in 0..cout_g {
            for i in 0..cin_g {
                let src = &weight[((group * cout_g + o) * cin_g + i) * 9..][..9];
                let dst = &mut flipped[((group * cin_g + i) * cout_g + o) * 9..][..9];
                dst.iter_mut().zip(src.iter().rev()).for_each(|(d, &s)| *d = s);
            }
        }
    }
    flipped
}

/// Whether [`conv_transpose2d`] computes this transposed convolution with `isa`: its
/// [`transposed_as_convolution`] exists and [`applies`].
pub(super) fn applies_transposed(isa: Isa, g: &ConvGeometry) -> bool {
    transposed_as_convolution(g).is_some_and(|conv| applies(isa, &conv))
}

/// The transposed convolution `out = conv_transpose(features, weight) + bias` for a
/// geometry [`applies_transposed`] accepts, as the convolution of `features` with the
/// flipped filters: `features` `[batch, out_channels, out_size..]`, `weight`
/// `[out_channels, in_channels / groups, 3, 3]`, `bias` `[in_channels]` and `out`
/// `[batch, in_channels, in_size..]`, all row-major f32.
pub(super) fn conv_transpose2d(
    isa: Isa,
    g: &ConvGeometry,
    features: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let conv =
        transposed_as_convolution(g).expect("conv_winograd::conv_transpose2d: not a 3 x 3 stride-1 transposition");
    conv2d(isa, &conv, features, &flipped_filters(g, weight), bias, out);
}

/// The 2 x 2 tiles of output features: `rows` rows of `per_row`, numbered in raster
/// order.
#[derive(Clone, Copy)]
struct Tiles {
    rows: usize,
    per_row: usize,
}

/// The tiles of a block that lie in one tile row: `columns` of tile row `row`, the first
/// of them the block's tile `slot`.
struct Run {
    row: usize,
    columns: Range<usize>,
    slot: usize,
}

impl Tiles {
    /// The runs of the tiles `block` (raster numbers), in order.
    fn runs(self, block: Range<usize>) -> impl Iterator<Item = Run> {
        let per_row = self.per_row;
        let rows = block.start / per_row..block.end.div_ceil(per_row);
        rows.map(move |row| {
            let first = block.start.max(row * per_row);
            let end = block.end.min((row + 1) * per_row);
            Run { row, columns: first - row * per_row..end - row * per_row, slot: first - block.start }
        })
    }
}

/// `G g G^T` for a 3 x 3 filter `g` (row-major): the 4 x 4 transformed filter.
fn transform_filter(g: &[f32; 9]) -> [f32; 16] {
    // `G x` for a column (or row) of three values.
    let lift = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    let columns: [[f32; 4]; 3] = std::array::from_fn(|x| lift(g[x], g[3 + x], g[6 + x]));
    let mut out = [0.0; 16];
    for (y, row) in out.chunks_exact_mut(4).enumerate() {
        row.copy_from_slice(&lift(columns[0][y], columns[1][y], columns[2][y]));
    }
    out
}

/// f32 values in a cache line.
const LINE_VALUES: usize = 16;

/// `buffer` from its first value on a cache line (at most [`LINE_VALUES`] - 1 in).
fn aligned(buffer: &mut [f32]) -> &mut [f32] {
    let skip = buffer.as_ptr().align_offset(4 * LINE_VALUES).min(LINE_VALUES - 1);
    &mut buffer[skip..]
}

/// The transformed filters of every group, `[group][e][cout_g * cin_g]`, each `W_e`
/// packed one register tile of `tile_rows` output channels after another, a tile's
/// values `[ci][row]` (the columns of A that its depth steps broadcast).
fn transform_filters(g: &ConvGeometry, weight: &[f32], tile_rows: usize) -> Vec<f32> {
    let (cin_g, cout_g) = (g.in_channels / g.groups, g.out_channels / g.groups);
    let per_e = cout_g * cin_g;
    let mut filters = vec![0.0; g.groups * 16 * per_e];
    for (group, group_filters) in filters.chunks_exact_mut(16 * per_e).enumerate() {
        for co in 0..cout_g {
            let (i0, row) = (co / tile_rows * tile_rows, co % tile_rows);
            let height = tile_rows.min(cout_g - i0);
            for ci in 0..cin_g {
                let at = ((group * cout_g + co) * cin_g + ci) * 9;
                let g9: &[f32; 9] = weight[at..at + 9].try_into().expect("nine filter values");
                for (e, &value) in transform_filter(g9).iter().enumerate() {
                    group_filters[e * per_e + i0 * cin_g + ci * height + row] = value;
                }
            }
        }
    }
    filters
}

/// The features `out = conv(image, weight) + bias` for a geometry [`applies`] accepts
/// with `isa`: `image` `[batch, in_channels, in_size..]`, `weight` `[out_channels,
/// in_channels / groups, 3, 3]`, `bias` `[out_channels]` and `out` `[batch,
/// out_channels, out_size..]`, all row-major f32. Every element of `out` is written.
pub(super) fn conv2d(isa: Isa, g: &ConvGeometry, image: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    assert!(applies(isa, g), "conv_winograd::conv2d: not a 3 x 3 stride-1 convolution with enough channels");
    let (cin_g, cout_g) = (g.in_channels / g.groups, g.out_channels / g.groups);
    let ([h, w], [oh, ow]) = (g.in_size, g.out_size);
    let positions = oh * ow;
    assert_eq!(image.len(), g.batch * g.in_channels * h * w, "conv2d: image size");
    assert_eq!(weight.len(), g.out_channels * cin_g * 9, "conv2d: weight size");
    assert_eq!(out.len(), g.batch * g.out_channels * positions, "conv2d: output size");
    let lanes = vector_lanes(isa);
    let tile_height = balanced_tile_rows(cout_g, tile_rows(lanes));
    let filters = transform_filters(g, weight, tile_height);
    let tiles = Tiles { rows: oh.div_ceil(2), per_row: ow.div_ceil(2) };
    let count = tiles.rows * tiles.per_row;
    // Blocks of whole register tiles of columns (two vectors), as many as fit the budget.
    let width = 2 * lanes;
    let per_block = (PATCH_BLOCK_VALUES / (16 * cin_g) / width).max(1) * width;
    let per_block = per_block.min(count.next_multiple_of(width));
    // Rows of U and M: a block's tiles and room for the last vector of a run to write
    // past its end, a whole number of column blocks, so that each column block's rows
    // start on a cache line (with `aligned`).
    let stride = per_block + width;
    parallel::for_each_entry(out, g.out_channels * positions, |n, out_n| {
        // Not cleared: the products also read U's columns past a block's tiles (a partial
        // column block, the spare columns), whatever they hold, but the sums of those
        // columns are never stored, nor read back out of M.
        let mut patches_buffer = buffers::for_overwrite(16 * cin_g * stride + LINE_VALUES);
        let mut products_buffer = buffers::for_overwrite(16 * tile_height * stride + LINE_VALUES);
        let (patches, products) = (aligned(&mut patches_buffer), aligned(&mut products_buffer));
        let mut lines = vec![0.0; split_lines(tiles, per_block, lanes)];
        for group in 0..g.groups {
            let planes = &image[(n * g.in_channels + group * cin_g) * h * w..][..cin_g * h * w];
            let group_filters = &filters[group * 16 * cout_g * cin_g..][..16 * cout_g * cin_g];
            let out_g = &mut out_n[group * cout_g * positions..][..cout_g * positions];
            for first in (0..count).step_by(per_block) {
                let block = first..(first + per_block).min(count);
                let next = block.end..(block.end + per_block).min(count);
                transform_patches(isa, g, planes, tiles, block.clone(), stride, patches, &mut lines);
                let tile_count = cout_g.div_ceil(tile_height);
                for (t, i0) in (0..cout_g).step_by(tile_height).enumerate() {
                    let rows = tile_height.min(cout_g - i0);
                    let out_rows = &mut out_g[i0 * positions..][..rows * positions];
                    // The image and the features come from and go to memory: ask for the
                    // lines this tile's outputs and (a share of the channels at a time)
                    // the next block's patches need, while the products run.
                    prefetch_outputs(g, tiles, block.clone(), out_rows);
                    let channels = t * cin_g / tile_count..(t + 1) * cin_g / tile_count;
                    prefetch_image(g, tiles, next.clone(), &planes[channels.start * h * w..channels.end * h * w]);
                    let products = &mut products[..16 * rows * stride];
                    let filters = Filters { values: group_filters, channels: cin_g, first: i0, rows };
                    multiply(isa, filters, patches, block.len(), stride, products);
                    let bias = bias.map(|bias| &bias[group * cout_g + i0..][..rows]);
                    transform_products(isa, g, products, bias, tiles, block.clone(), stride, out_rows);
                }
            }
        }
        buffers::recycle(patches_buffer);
        buffers::recycle(products_buffer);
    });
}

/// Asks for the cache lines of `values` (see [`prefetch`]).
fn prefetch_all(values: &[f32]) {
    if let Some(last) = values.last() {
        values.iter().step_by(LINE_VALUES).chain([last]).for_each(prefetch);
    }
}

/// Asks for the lines of the output planes `out` that the tiles `block` write.
fn prefetch_outputs(g: &ConvGeometry, tiles: Tiles, block: Range<usize>, out: &[f32]) {
    let [oh, ow] = g.out_size;
    for plane in out.chunks_exact(oh * ow) {
        for run in tiles.runs(block.clone()) {
            let columns = 2 * run.columns.start..ow.min(2 * run.columns.end);
            for y in 2 * run.row..(2 * run.row + 2).min(oh) {
                prefetch_all(&plane[y * ow..][columns.clone()]);
            }
        }
    }
}

/// Asks for the lines of the image `planes` that the patches of the tiles `block` read.
fn prefetch_image(g: &ConvGeometry, tiles: Tiles, block: Range<usize>, planes: &[f32]) {
    let ([h, w], py) = (g.in_size, g.padding[0]);
    if block.is_empty() {
        return;
    }
    let first = (2 * (block.start / tiles.per_row)).saturating_sub(py).min(h);
    let end = (2 * block.end.div_ceil(tiles.per_row) + 2).saturating_sub(py).min(h);
    for plane in planes.chunks_exact(h * w) {
        prefetch_all(&plane[first * w..end * w]);
    }
}

/// One group's transformed filters and the register tile of output channels being
/// multiplied: rows `first..first + rows` of every `W_e` (packed as
/// [`transform_filters`] leaves them), `channels` deep.
#[derive(Clone, Copy)]
struct Filters<'a> {
    values: &'a [f32],
    channels: usize,
    first: usize,
    rows: usize,
}

kernel! {
    /// `U[e][ci][slot] = (B^T d B)[e]` for the tiles `block` of one group's `planes`, into
    /// `u` (rows `stride` apart): `d` is the 4 x 4 patch at row `2 ty - padding_y`, column
    /// `2 tx - padding_x`, zero outside the image. `lines` is scratch of
    /// [`split_lines`] values.
    ///
    /// For each input channel, the image rows under the block's tile rows are split into
    /// even and odd columns ([`split_row`]), so that patch `tx`'s columns `0, 1, 2, 3` are
    /// even `tx`, odd `tx`, even `tx + 1` and odd `tx + 1`; `B^T d B` is then elementwise
    /// across each run of tiles in a tile row.
    #[allow(clippy::too_many_arguments)]
    fn transform_patches(
        g: &ConvGeometry,
        planes: &[f32],
        tiles: Tiles,
        block: Range<usize>,
        stride: usize,
        u: &mut [f32],
        lines: &mut [f32],
    ) {
        let lanes = V::LANES;
        let ([h, w], [py, px]) = (g.in_size, g.padding);
        let cin_g = planes.len() / (h * w);
        let line_len = split_line(tiles.per_row, lanes);
        // The padded image rows 2 first_row .. 2 last_row + 4.
        let first_row = block.start / tiles.per_row;
        let image_rows = 2 * (block.end.div_ceil(tiles.per_row) - first_row) + 2;
        let split = &mut lines[..2 * image_rows * line_len];
        for ci in 0..cin_g {
            for (local, pair) in split.chunks_exact_mut(2 * line_len).enumerate() {
                let (evens, odds) = pair.split_at_mut(line_len);
                match (2 * first_row + local).checked_sub(py).filter(|&y| y < h) {
                    Some(y) => split_row::<V>(&planes[(ci * h + y) * w..], w, px, evens, odds),
                    None => {
                        evens.fill(0.0);
                        odds.fill(0.0);
                    }
                }
            }
            let split = &*split;
            for run in tiles.runs(block.clone()) {
                // Even (odd = 0) or odd (odd = 1) columns of the patches' row r.
                let line = |r: usize, odd: usize| &split[(2 * (2 * (run.row - first_row) + r) + odd) * line_len..][..line_len];
                for tx in vector_starts(run.columns.clone(), lanes) {
                    // Column c of the patches' row r, for the tiles tx.. (c = 0, 1, 2, 3:
                    // even tx, odd tx, even tx + 1, odd tx + 1).
                    let mut d = [[V::splat(0.0); 4]; 4];
                    for (r, row) in d.iter_mut().enumerate() {
                        for (c, value) in row.iter_mut().enumerate() {
                            *value = V::load(&line(r, c % 2)[tx + c / 2..]);
                        }
                    }
                    // B^T d: rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3).
                    let mut k = [[V::splat(0.0); 4]; 4];
                    for c in 0..4 {
                        k[0][c] = d[0][c] - d[2][c];
                        k[1][c] = d[1][c] + d[2][c];
                        k[2][c] = d[2][c] - d[1][c];
                        k[3][c] = d[1][c] - d[3][c];
                    }
                    // (B^T d) B: the same along each row, into U_(4 row + column).
                    let slot = run.slot + (tx - run.columns.start);
                    for (row, k) in k.iter().enumerate() {
                        let values = [k[0] - k[2], k[1] + k[2], k[2] - k[1], k[1] - k[3]];
                        for (j, value) in values.into_iter().enumerate() {
                            value.store(&mut u[((4 * row + j) * cin_g + ci) * stride + slot..]);
                        }
                    }
                }
            }
        }
    }
}

/// The values of one line of even (or odd) columns: `per_row + 1` tiles' worth (a tile
/// row's patches reach one pair of columns past its last tile) and a vector to spare.
fn split_line(per_row: usize, lanes: usize) -> usize {
    per_row + 1 + lanes
}

/// The scratch [`transform_patches`] needs for blocks of `per_block` tiles: the even and
/// the odd columns of every image row under the tile rows one block can touch.
fn split_lines(tiles: Tiles, per_block: usize, lanes: usize) -> usize {
    let tile_rows = (per_block.div_ceil(tiles.per_row) + 1).min(tiles.rows);
    2 * (2 * tile_rows + 2) * split_line(tiles.per_row, lanes)
}

/// `evens[t] = row[2 t - padding]` and `odds[t] = row[2 t + 1 - padding]` for the row
/// of `len` values at the start of `rest` (the row and whatever follows it in the
/// planes), zero outside the row, for every `t` of the lines (at least
/// `len.div_ceil(2) + padding + LANES` long, as [`split_line`] makes them for a 3 x 3
/// convolution's tile rows).
///
/// The row's own even and odd columns, `E'[i] = row[2 i]` and `O'[i] = row[2 i + 1]`,
/// land shifted by the padding: `evens[t] = E'[t - padding / 2]` for an even padding,
/// `evens[t] = O'[t - (padding + 1) / 2]` and `odds[t] = E'[t - (padding - 1) / 2]` for
/// an odd one. Only the same `len.div_ceil(2)` values (rounded up to whole vectors) from
/// those shifts on are written, so the lines' other values stay as they were: zero.
#[inline(always)]
fn split_row<V: F32Vector>(rest: &[f32], len: usize, padding: usize, evens: &mut [f32], odds: &mut [f32]) {
    let lanes = V::LANES;
    let (row_evens, even_shift, row_odds, odd_shift) = if padding.is_multiple_of(2) {
        (evens, padding / 2, odds, padding / 2)
    } else {
        (odds, (padding - 1) / 2, evens, padding.div_ceil(2))
    };
    let zero = V::splat(0.0);
    for i in (0..len.div_ceil(2)).step_by(lanes) {
        let (first, second) = (2 * i, 2 * i + lanes);
        let (a, b) = if second + lanes <= len {
            (V::load(&rest[first..]), V::load(&rest[second..]))
        } else if second + lanes <= rest.len() {
            // Whole vectors reaching into the next row, its lanes set to zero.
            let (a, b) = (V::load(&rest[first..]), V::load(&rest[second..]));
            let (a_lanes, b_lanes) = (lanes_below::<V>(len - first), lanes_below::<V>(len.saturating_sub(second)));
            (V::select(a_lanes, a, zero), V::select(b_lanes, b, zero))
        } else {
            (V::load_partial(&rest[first..len.min(second)], 0.0), V::load_partial(&rest[second.min(len)..len], 0.0))
        };
        let (row_even, row_odd) = a.deinterleave(b);
        row_even.store(&mut row_evens[i + even_shift..]);
        row_odd.store(&mut row_odds[i + odd_shift..]);
    }
}

/// The mask of the first `n` lanes.
#[inline(always)]
fn lanes_below<V: F32Vector>(n: usize) -> V::Mask {
    V::mask_from_bits(if n >= 32 { u32::MAX } else { (1 << n) - 1 })
}

kernel! {
    /// `M_e[co][tile] = W_e[co, ..] U_e[.., tile]` for the tile of output channels
    /// `filters` and the first `count` tiles of `u`, into `m` (`[e][co][tile]`, rows
    /// `stride` apart): each product one register tile per column block of two vectors.
    fn multiply(filters: Filters<'_>, u: &[f32], count: usize, stride: usize, m: &mut [f32]) {
        let lanes = V::LANES;
        let Filters { values, channels, first, rows } = filters;
        let per_e = values.len() / 16;
        for e in 0..16 {
            let a = MatRef { data: &values[e * per_e + first * channels..][..rows * channels], offset: 0, row_stride: 1, col_stride: rows };
            let u_e = &u[e * channels * stride..][..channels * stride];
            let m_e = &mut m[e * rows * stride..][..rows * stride];
            for j0 in (0..count).step_by(2 * lanes) {
                let cols = (count - j0).min(2 * lanes);
                let tile = Tile { k: channels, b: BlockRows { b: &u_e[j0..], ldb: stride }, cols, c: &mut m_e[j0..], ldc: stride, start: TileStart::Zero };
                if cols <= lanes {
                    row_tile::<V, 1, _>(a, 0, rows, tile);
                } else {
                    row_tile::<V, 2, _>(a, 0, rows, tile);
                }
            }
        }
    }
}

kernel! {
    /// The output tiles `block` of the output channels whose products are `m`
    /// (`[e][co][tile]`, rows `stride` apart): `A^T M A` plus the bias, into `out`
    /// (`[co][out_size..]`), the tiles' parts past the features' right and bottom edges
    /// dropped. Elementwise across each run of tiles in a tile row; the two columns of
    /// each output row are interleaved into feature columns `2 tx, 2 tx + 1`.
    #[allow(clippy::too_many_arguments)]
    fn transform_products(
        g: &ConvGeometry,
        m: &[f32],
        bias: Option<&[f32]>,
        tiles: Tiles,
        block: Range<usize>,
        stride: usize,
        out: &mut [f32],
    ) {
        let lanes = V::LANES;
        let [oh, ow] = g.out_size;
        let rows = m.len() / (16 * stride);
        for (co, plane) in out.chunks_exact_mut(oh * ow).enumerate().take(rows) {
            let bias = V::splat(bias.map_or(0.0, |bias| bias[co]));
            for run in tiles.runs(block.clone()) {
                // Feature columns of this run.
                let end = ow.min(2 * run.columns.end);
                for tx in vector_starts(run.columns.clone(), lanes) {
                    let slot = run.slot + (tx - run.columns.start);
                    // A^T M: (m0 + m1 + m2, m1 - m2 - m3) down each column j.
                    let at = |e: usize| (e * rows + co) * stride + slot;
                    let mut top = [V::splat(0.0); 4];
                    let mut bottom = [V::splat(0.0); 4];
                    for j in 0..4 {
                        let m1 = V::load(&m[at(4 + j)..]);
                        let m2 = V::load(&m[at(8 + j)..]);
                        top[j] = V::load(&m[at(j)..]) + m1 + m2;
                        bottom[j] = m1 - m2 - V::load(&m[at(12 + j)..]);
                    }
                    // (A^T M) A along each row, plus the bias, as feature columns 2 tx..
                    let columns = (end - 2 * tx).min(2 * lanes);
                    let y = 2 * run.row;
                    let (left, right) = (top[0] + top[1] + top[2] + bias, top[1] - top[2] - top[3] + bias);
                    store_pairs(left, right, &mut plane[y * ow + 2 * tx..][..columns]);
                    if y + 1 < oh {
                        let (left, right) = (bottom[0] + bottom[1] + bottom[2] + bias, bottom[1] - bottom[2] - bottom[3] + bias);
                        store_pairs(left, right, &mut plane[(y + 1) * ow + 2 * tx..][..columns]);
                    }
                }
            }
        }
    }
}

/// `left[0], right[0], left[1], right[1], ..` into `dst` (at most `2 * LANES` long).
#[inline(always)]
fn store_pairs<V: F32Vector>(left: V, right: V, dst: &mut [f32]) {
    let lanes = V::LANES;
    let (first, second) = left.interleave(right);
    if dst.len() == 2 * lanes {
        first.store(dst);
        second.store(&mut dst[lanes..]);
    } else if dst.len() > lanes {
        first.store(dst);
        second.store_partial(&mut dst[lanes..]);
    } else {
        first.store_partial(dst);
    }
}

/// Where the vectors across the tiles `columns` start: a vector apart, the last one
/// moved back to end with the run where the run holds a whole vector (it redoes a few
/// tiles rather than store a partial vector).
fn vector_starts(columns: Range<usize>, lanes: usize) -> impl Iterator<Item = usize> {
    let last = columns.end.saturating_sub(lanes).max(columns.start);
    columns.step_by(lanes).map(move |start| start.min(last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::conv::tests::for_each_term;
    use crate::cpu::simd::test_isas;
    use proptest::prelude::*;

    /// The convolution by its definition, in f64.
    fn naive(g: &ConvGeometry, image: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f64> {
        let plane = g.out_size[0] * g.out_size[1];
        let mut out: Vec<f64> = (0..g.batch * g.out_channels * plane)
            .map(|i| bias.map_or(0.0, |b| b[i / plane % g.out_channels] as f64))
            .collect();
        for_each_term(g, |o, i, w| out[o] += weight[w] as f64 * image[i] as f64);
        out
    }

    fn values(len: usize, salt: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + salt * 104729) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    /// A 3 x 3 stride-1 convolution of `[cin, cout]` channels per group, if it has
    /// features.
    fn geometry(
        batch: usize,
        groups: usize,
        [cin, cout]: [usize; 2],
        size: (usize, usize),
        padding: (usize, usize),
    ) -> Option<ConvGeometry> {
        let out = |len: usize, pad: usize| (len + 2 * pad).checked_sub(2);
        Some(ConvGeometry {
            batch,
            in_channels: cin * groups,
            in_size: [size.0, size.1],
            out_channels: cout * groups,
            out_size: [out(size.0, padding.0)?, out(size.1, padding.1)?],
            kernel: [3, 3],
            stride: [1, 1],
            padding: [padding.0, padding.1],
            dilation: [1, 1],
            groups,
        })
    }

    /// Fails unless every value of `got` is within the transforms' rounding of `want`, for
    /// sums of `depth` channels of 9 terms.
    fn check(isa: Isa, got: &[f32], want: &[f64], depth: usize) -> Result<(), TestCaseError> {
        let scale = 1.0 + (depth as f64).sqrt();
        for (i, (&got, &want)) in got.iter().zip(want).enumerate() {
            prop_assert!(
                (got as f64 - want).abs() <= 1e-4 * scale * (1.0 + want.abs()),
                "{:?} [{}]: {} vs {}",
                isa,
                i,
                got,
                want
            );
        }
        Ok(())
    }

    #[test]
    fn the_filter_transform_of_a_single_tap_is_its_row_and_column_of_g() {
        // g = e_(1,1): G g G^T = (G's middle column) outer itself.
        let mut g = [0.0; 9];
        g[4] = 1.0;
        let middle = [0.0, 0.5, -0.5, 0.0];
        let want: Vec<f32> = middle.iter().flat_map(|&a| middle.iter().map(move |&b| a * b)).collect();
        assert_eq!(transform_filter(&g).to_vec(), want);
    }

    #[test]
    fn runs_cover_a_block_row_by_row() {
        let tiles = Tiles { rows: 4, per_row: 5 };
        let runs: Vec<_> = tiles.runs(3..14).map(|r| (r.row, r.columns, r.slot)).collect();
        assert_eq!(runs, [(0, 3..5, 0), (1, 0..5, 2), (2, 0..4, 7)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The transposed convolution against its definition, the adjoint of the
        /// convolution (`image[i] += weight[w] * features[o]` for each term), on every ISA
        /// it applies to: paddings 0-2, odd and even sizes, groups, a bias.
        #[test]
        fn winograd_transposed_convolutions_match_their_definition(
            batch in 1usize..3, groups in 1usize..3, cin in 16usize..20, cout in 16usize..22,
            size in (3usize..20, 3usize..20), padding in (0usize..3, 0usize..3), with_bias: bool, salt in 0usize..100,
        ) {
            let Some(g) = geometry(batch, groups, [cin, cout], size, padding) else { return Ok(()) };
            let [oh, ow] = g.out_size;
            let weight = values(g.out_channels * cin * 9, salt);
            let features = values(batch * g.out_channels * oh * ow, salt + 1);
            let bias = with_bias.then(|| values(g.in_channels, salt + 2));
            let plane = size.0 * size.1;
            let mut want: Vec<f64> = (0..batch * g.in_channels * plane)
                .map(|i| bias.as_ref().map_or(0.0, |b| b[i / plane % g.in_channels] as f64))
                .collect();
            for_each_term(&g, |o, i, w| want[i] += weight[w] as f64 * features[o] as f64);
            for isa in test_isas().into_iter().filter(|&isa| applies_transposed(isa, &g)) {
                let mut got = vec![f32::NAN; want.len()];
                conv_transpose2d(isa, &g, &features, &weight, bias.as_deref(), &mut got);
                check(isa, &got, &want, cout)?;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Against the definition on every ISA it applies to: odd and even sizes (partial
        /// tiles at the right and bottom), paddings 0-3 on each axis (valid, same, full and
        /// wider), several blocks of tiles with runs that start and end inside tile rows
        /// (many input channels make small blocks), groups, with and without a bias, into
        /// a NaN-filled output.
        #[test]
        fn winograd_convolutions_match_their_definition(
            batch in 1usize..3, groups in 1usize..3, cin in prop_oneof![16usize..20, 200usize..260],
            cout in 16usize..30, size in (1usize..24, 1usize..24), padding in (0usize..4, 0usize..4),
            with_bias: bool, salt in 0usize..100,
        ) {
            let Some(g) = geometry(batch, groups, [cin, cout], size, padding) else { return Ok(()) };
            let weight = values(g.out_channels * cin * 9, salt);
            let image = values(batch * g.in_channels * size.0 * size.1, salt + 1);
            let bias = with_bias.then(|| values(g.out_channels, salt + 2));
            let want = naive(&g, &image, &weight, bias.as_deref());
            for isa in test_isas().into_iter().filter(|&isa| applies(isa, &g)) {
                let mut got = vec![f32::NAN; want.len()];
                conv2d(isa, &g, &image, &weight, bias.as_deref(), &mut got);
                check(isa, &got, &want, cin)?;
            }
        }
    }
}

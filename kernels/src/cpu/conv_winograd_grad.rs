//! The weight gradient of a 3 x 3 convolution at stride 1 by the Winograd transforms of
//! its forward pass (`conv_winograd.rs`: Lavin & Gray, "Fast Algorithms for
//! Convolutional Neural Networks", CVPR 2016; the gradient follows from the forward's
//! linearity, as their section 4 notes for the backward passes).
//!
//! The forward computes each m x m tile of features as `Y = A^T M A` with `M = sum over
//! ci of W_ci ⊙ U_ci`, `W = G g G^T` and `U = B^T d B`. That is linear in each
//! transformed filter, so for an output gradient tile `dY`
//!
//! ```text
//! dL/dM = A dY A^T                                   (the adjoint of A^T M A)
//! dL/dW_e[co, ci] = sum over tiles of (A dY A^T)_e[co] U_e[ci]
//! dL/dg = G^T (dL/dW) G                              (the adjoint of G g G^T)
//! ```
//!
//! For each of the `(m + 2)^2` positions `e` the sum over tiles is a product as deep as
//! the batch has tiles, `dW_e^T (cin x cout) += U_e (cin x tiles) V_e (tiles x cout)`,
//! taking 16 multiplications per tile and channel pair for F(2 x 2, 3 x 3) where the
//! direct sum takes 36 (2.25x fewer), 36 for F(4 x 4, 3 x 3) against 144 (4x fewer).
//!
//! **Layout.** The patches are transformed by the forward's own kernel
//! (`transform_patches`, lanes across tiles), into `U[e][ci][tile]`: the product's A,
//! broadcast through its strides. The gradient tiles are transformed lanes across output channels, from a
//! channels-last copy of each entry's gradient planes (zero past the features, where a
//! tile overhangs them), into `V[e][tile][co]`: rows of whole vectors, the product's B,
//! read by the unpacked GEMM's register tiles (`gemm_small.rs`) as in
//! `conv_weight_grad.rs`. Tiles are numbered across the batch's planes and cut into
//! chunks, of whole entries or, for a small batch, of whole rows of tiles
//! (`conv_weight_grad::positions_per_sum`), which run in blocks of [`BLOCK_TILES`] (the
//! products' depth); each block's products add into the chunk's sums of `dW_e`, which
//! `G^T (.) G` then folds into the chunk's 3 x 3 filters. The chunks run in parallel and
//! their filters are summed in order; the cut depends on the geometry only, so the
//! rounding does not depend on the threads.
//!
//! **Accuracy.** The transforms' coefficients are small integers but for `G`'s 1/6,
//! 1/12 and 1/24 (`conv_winograd.rs`); the larger ones, up to 8 in F(4 x 4, 3 x 3)'s `A`
//! and 5 in its `B`, scale the rounding of the sums. The tests hold the result within
//! `2e-4 (1 + sqrt(terms))` of the f64 sum, relative to the size of its terms; on the
//! layers probed, its largest error was of the same order as the channels-last
//! gradient's.
//!
//! `conv.rs` takes this module for the weight gradient of every convolution the forward
//! runs by Winograd ([`applies`]); the measurements are there.

use super::conv::ConvGeometry;
use super::conv_weight_grad::{channels_last_rows, positions_per_sum};
use super::conv_winograd::{
    F2x2, F4x4, LINE_VALUES, MAX_PATCH, MAX_TILE, Method, Minimal, Split, Tiles, aligned, array_of, split_line,
    split_lines, transform_isa, transform_patches,
};
use super::gemm::{Isa, MatRef};
use super::gemm_small::{BlockRows, Tile, TileStart, balanced_tile_rows, row_tile, tile_rows};
use super::simd::{F32Vector, Scalar, kernel, vector_lanes};
use crate::{buffers, parallel};
use std::ops::Range;

/// Tiles per block: the depth of each block's products, deep enough that the register
/// tiles' loads and stores of the sums are a small part of their work.
const BLOCK_TILES: usize = 128;

/// Whether [`weight_grad`] computes the weight gradient of `g` with `isa`: the 3 x 3
/// stride-1 convolutions whose forward runs by Winograd (`conv_winograd::applies`).
pub(super) fn applies(isa: Isa, g: &ConvGeometry) -> bool {
    super::conv_winograd::applies(isa, g)
}

/// The weight gradient `[out_channels, in_channels / groups, 3, 3]` (row-major f32) of a
/// convolution `g` that [`applies`] with `isa`, for `image` `[batch, in_channels, ih,
/// iw]` and `features` (the output's gradient) `[batch, out_channels, oh, ow]`, by
/// [`method`]: batch entries summed in chunks of `entries_per_sum` (rows of tiles when
/// the batch is small), in order, in parallel, then the chunks' sums in order.
pub(super) fn weight_grad(
    isa: Isa,
    g: &ConvGeometry,
    image: &[f32],
    features: &[f32],
    entries_per_sum: usize,
) -> Vec<f32> {
    assert!(applies(isa, g), "conv_winograd_grad: not a convolution that runs by Winograd");
    weight_grad_by(isa, method(g), g, image, features, entries_per_sum)
}

/// The F(m x m, 3 x 3) for the weight gradient of `g`: F(4 x 4, 3 x 3) where a feature
/// plane has at least 32 of its tiles (28 x 28 features and up), else F(2 x 2, 3 x 3),
/// with any number of channels. Its 4x fewer products outweigh its larger transforms on
/// the large planes; on smaller ones its tiles overhang the plane (a 14 x 14 plane is 16
/// x 16 of them, 31% more tiles' worth of transforms and products). Measured against
/// each other and the channels-last gradient in one process: the table at
/// `conv.rs`'s `conv2d_weight_grad`.
fn method(g: &ConvGeometry) -> Method {
    if Tiles::of(g, F4x4::TILE).per_plane() >= 32 { Method::F4x4 } else { Method::F2x2 }
}

/// [`weight_grad`] by the F(m x m, 3 x 3) `method`.
fn weight_grad_by(
    isa: Isa,
    method: Method,
    g: &ConvGeometry,
    image: &[f32],
    features: &[f32],
    entries_per_sum: usize,
) -> Vec<f32> {
    let ([h, w], [oh, ow]) = (g.in_size, g.out_size);
    assert_eq!(image.len(), g.batch * g.in_channels * h * w, "conv_winograd_grad: image size");
    assert_eq!(features.len(), g.batch * g.out_channels * oh * ow, "conv_winograd_grad: features size");
    let tile = match method {
        Method::F2x2 => F2x2::TILE,
        Method::F4x4 => F4x4::TILE,
    };
    let tiles = Tiles::of(g, tile);
    let count = g.batch * tiles.per_plane();
    // Sums of whole entries, or of rows of tiles for a small batch (as the channels-last
    // gradient cuts its positions).
    let per_sum = positions_per_sum(count, [tiles.per_plane(), tiles.per_row], entries_per_sum);
    let chunks: Vec<Vec<f32>> = parallel::map(count.div_ceil(per_sum), |chunk| {
        let chunk = chunk * per_sum..((chunk + 1) * per_sum).min(count);
        match method {
            Method::F2x2 => chunk_filters::<F2x2>(isa, g, image, features, chunk),
            Method::F4x4 => chunk_filters::<F4x4>(isa, g, image, features, chunk),
        }
    });
    sum_chunks(g, chunks, vector_lanes(isa))
}

/// The rows of V and of the sums, and of [`chunk_filters`]' filters: whole vectors of
/// `lanes` output channels, so that the register tiles and [`fold_filters`] load whole
/// vectors (the values past `cout_g` are never stored in the gradient).
fn row_len(g: &ConvGeometry, lanes: usize) -> usize {
    (g.out_channels / g.groups).next_multiple_of(lanes)
}

/// The filters of the tiles `chunk` (numbered across the batch's planes) by `T` (see the
/// module doc), `[group][ci][tap][co]` with rows of [`row_len`].
fn chunk_filters<T: Minimal>(
    isa: Isa,
    g: &ConvGeometry,
    image: &[f32],
    features: &[f32],
    chunk: Range<usize>,
) -> Vec<f32> {
    let (cin_g, cout_g) = (g.in_channels / g.groups, g.out_channels / g.groups);
    let ([h, w], [oh, ow]) = (g.in_size, g.out_size);
    let (lanes, m, positions) = (vector_lanes(isa), T::TILE, T::POSITIONS);
    let tiles = Tiles::of(g, m);
    // The channels-last copy of an entry's gradient planes covers the rows of its tiles
    // that the chunk reaches into, whole: `n` consecutive tiles reach into at most
    // `ceil(n / per_row) + 1` rows.
    let copy_rows = tiles.rows.min(chunk.len().div_ceil(tiles.per_row) + 1);
    let copy_size = [m * copy_rows, m * tiles.per_row];
    let copy_len = copy_size[0] * copy_size[1] * cout_g;
    let ldv = row_len(g, lanes);
    let line_len = split_line(g, m, tiles, lanes);
    let per_group = 9 * cin_g * ldv;
    let per_block = BLOCK_TILES.min(chunk.len());
    // U's rows hold a block's tiles and room for the last vector of a run to write past
    // its end.
    let stride = per_block + 2 * lanes;
    let mut patches_buffer = buffers::for_overwrite(positions * cin_g * stride + LINE_VALUES);
    let mut gradients_buffer = buffers::for_overwrite(positions * per_block * ldv + LINE_VALUES);
    let (patches, gradients) = (aligned(&mut patches_buffer), aligned(&mut gradients_buffer));
    // The last vector of output channels may read a vector past the copy's end.
    let mut copy = buffers::filled(copy_len + lanes, 0.0);
    let mut lines = vec![0.0; split_lines(m, tiles, per_block, line_len)];
    let mut sums = buffers::for_overwrite(positions * cin_g * ldv);
    let mut filters = buffers::for_overwrite(g.groups * per_group);
    let patches_isa = transform_isa(isa, tiles);
    for (group, filters) in filters.chunks_exact_mut(per_group).enumerate() {
        let mut copied = None;
        for first in chunk.clone().step_by(per_block) {
            let block = first..(first + per_block).min(chunk.end);
            for piece in tiles.pieces(block.clone()) {
                let n = piece.entry;
                let planes = &image[(n * g.in_channels + group * cin_g) * h * w..][..cin_g * h * w];
                let (u, split) = (&mut patches[piece.slot..], Split { lines: &mut lines, line_len });
                transform_patches(patches_isa, T::METHOD, g, planes, tiles, piece.tiles.clone(), stride, u, split);
                // The copy holds the rows of tiles of entry `n` that the chunk covers, from
                // tile row `first_row`.
                let first_row = chunk.start.saturating_sub(n * tiles.per_plane()) / tiles.per_row;
                if copied != Some(n) {
                    let last_row = (chunk.end - n * tiles.per_plane()).min(tiles.per_plane()).div_ceil(tiles.per_row);
                    let planes = &features[(n * g.out_channels + group * cout_g) * oh * ow..][..cout_g * oh * ow];
                    let rows = m * first_row..m * last_row;
                    channels_last_rows(isa, planes, cout_g, g.out_size, [0, 0], rows, copy_size[1], &mut copy);
                    copied = Some(n);
                }
                let shift = first_row * tiles.per_row;
                let in_copy = piece.tiles.start - shift..piece.tiles.end - shift;
                let (v, rows) = (&mut gradients[piece.slot * ldv..], [per_block * ldv, ldv]);
                transform_gradients(isa, T::METHOD, &copy, [copy_size[1], cout_g], tiles, in_copy, rows, v);
            }
            let u = MatRef { data: patches, offset: 0, row_stride: stride, col_stride: 1 };
            let v = Positions { values: gradients, len: per_block * ldv, ldv };
            // The first block's products start the sums.
            let start = if first == chunk.start { TileStart::Zero } else { TileStart::Output };
            multiply(isa, positions, u, v, block.len(), [cin_g, cout_g], start, &mut sums);
        }
        fold_filters(isa, T::METHOD, &sums, cin_g, ldv, filters);
    }
    buffers::recycle(patches_buffer);
    buffers::recycle(gradients_buffer);
    buffers::recycle(copy);
    buffers::recycle(sums);
    filters
}

/// One block's transformed gradients: position `e` at `values[e * len..]`, a tile's
/// row of output channels every `ldv` values.
#[derive(Clone, Copy)]
struct Positions<'a> {
    values: &'a [f32],
    len: usize,
    ldv: usize,
}

kernel! {
    /// `sums_e = start + U_e V_e` (`[ci][co]`, rows of `v.ldv`; `start` zero or the
    /// sums themselves, see [`TileStart`]) for each of the `positions`
    /// `e`, over a block's `depth` tiles: `U_e` the `channels[0]` rows of `u` from row
    /// `e * channels[0]`, `V_e` position `e` of `v`. Register tiles of input channels
    /// (rows) by one or two vectors of output channels.
    #[allow(clippy::too_many_arguments)]
    fn multiply(
        positions: usize,
        u: MatRef,
        v: Positions<'_>,
        depth: usize,
        channels: [usize; 2],
        start: TileStart<'_>,
        sums: &mut [f32],
    ) {
        let ([cin_g, cout_g], lanes, ldv) = (channels, V::LANES, v.ldv);
        let (width, step_rows) = (2 * lanes, balanced_tile_rows(cin_g, tile_rows(lanes)));
        for e in 0..positions {
            let u_e = MatRef { offset: u.offset + e * cin_g * u.row_stride, ..u };
            let v_e = &v.values[e * v.len..];
            for co in (0..cout_g).step_by(width) {
                let cols = width.min(cout_g - co);
                for i0 in (0..cin_g).step_by(step_rows) {
                    let rows = step_rows.min(cin_g - i0);
                    let c = &mut sums[(e * cin_g + i0) * ldv + co..];
                    let b = BlockRows { b: &v_e[co..], ldb: ldv };
                    let tile = Tile { k: depth, b, cols, c, ldc: ldv, start };
                    if cols <= lanes {
                        row_tile::<V, 1, _>(u_e, i0, rows, tile);
                    } else {
                        row_tile::<V, 2, _>(u_e, i0, rows, tile);
                    }
                }
            }
        }
    }
}

/// The chunks' filters ([`chunk_filters`], rows of [`row_len`] for vectors of `lanes`)
/// summed in order, as the gradient `[out_channels, in_channels / groups, 3, 3]`.
fn sum_chunks(g: &ConvGeometry, chunks: Vec<Vec<f32>>, lanes: usize) -> Vec<f32> {
    let (cin_g, cout_g, ldv) = (g.in_channels / g.groups, g.out_channels / g.groups, row_len(g, lanes));
    let per_group = 9 * cin_g * ldv;
    let mut total = buffers::filled(g.groups * per_group, 0.0f32);
    for filters in chunks {
        total.iter_mut().zip(&filters).for_each(|(t, &f)| *t += f);
        buffers::recycle(filters);
    }
    let mut dw = buffers::for_overwrite(g.out_channels * cin_g * 9);
    for (group, total) in total.chunks_exact(per_group).enumerate() {
        for co in 0..cout_g {
            let filter = &mut dw[(group * cout_g + co) * cin_g * 9..][..cin_g * 9];
            for (k, value) in filter.iter_mut().enumerate() {
                *value = total[k * ldv + co];
            }
        }
    }
    buffers::recycle(total);
    dw
}

kernel! {
    /// `V[e][slot][co] = (A dY A^T)[e]` by the F(m x m, 3 x 3) `method` for the tiles
    /// `block` (raster numbers in a plane) of one entry's gradient: `copy` is its
    /// channels-last copy (`[width, channels] = layout`, the pixel row's length and the
    /// channels), `dY` the tile's `m x m` pixels; slot `i` of the block's tiles at
    /// `v[i * ldv..]`, position `e` at `v[e * per_position..]` (`[per_position, ldv] =
    /// rows`). A vector of output channels at a time.
    fn transform_gradients(
        method: Method,
        copy: &[f32],
        layout: [usize; 2],
        tiles: Tiles,
        block: Range<usize>,
        rows: [usize; 2],
        v: &mut [f32],
    ) {
        match method {
            Method::F2x2 => gradients_by::<V, F2x2>(copy, layout, tiles, block, rows, v),
            Method::F4x4 => gradients_by::<V, F4x4>(copy, layout, tiles, block, rows, v),
        }
    }
}

/// [`transform_gradients`] by `T`.
#[inline(always)]
fn gradients_by<V: F32Vector, T: Minimal>(
    copy: &[f32],
    [width, channels]: [usize; 2],
    tiles: Tiles,
    block: Range<usize>,
    [per_position, ldv]: [usize; 2],
    v: &mut [f32],
) {
    let m = T::TILE;
    for (slot, tile) in block.enumerate() {
        let (ty, tx) = (tile / tiles.per_row, tile % tiles.per_row);
        let origin = (m * ty * width + m * tx) * channels;
        for co in (0..channels).step_by(V::LANES) {
            let y = |r: usize, c: usize| V::load(&copy[origin + (r * width + c) * channels + co..]);
            transform_gradient::<V, T>(y, |e, value| value.store(&mut v[e * per_position + slot * ldv + co..]));
        }
    }
}

/// `(A dY A^T)[e]` (`e = PATCH i + j`) for the gradient tile whose row `r`, column `c`
/// is `y(r, c)`, each value handed to `store(e, value)`: `A` along each row, then down
/// each column.
#[inline(always)]
fn transform_gradient<V: F32Vector, T: Minimal>(y: impl Fn(usize, usize) -> V, mut store: impl FnMut(usize, V)) {
    let zero = V::splat(0.0);
    let tile_row = |r: usize| array_of(zero, |c| if c < T::TILE { y(r, c) } else { zero });
    let rows: [[V; MAX_PATCH]; MAX_TILE] =
        array_of([zero; MAX_PATCH], |r| if r < T::TILE { T::lift_gradient(tile_row(r)) } else { [zero; MAX_PATCH] });
    for j in 0..T::PATCH {
        let column = T::lift_gradient(array_of(zero, |r| rows[r][j]));
        column.into_iter().take(T::PATCH).enumerate().for_each(|(i, value)| store(T::PATCH * i + j, value));
    }
}

/// `G` of `T` (`PATCH x 3`, the first `PATCH` rows), column `a` the transform
/// [`Minimal::lift`] makes of the unit vector `a`: the same f32 values as the forward's.
fn filter_matrix<T: Minimal>() -> [[f32; 3]; MAX_PATCH] {
    let columns: [[Scalar; MAX_PATCH]; 3] =
        std::array::from_fn(|a| T::lift(std::array::from_fn(|k| Scalar((k == a) as u8 as f32))));
    std::array::from_fn(|i| std::array::from_fn(|a| columns[a][i].0))
}

kernel! {
    /// `filters[ci][3 a + b][co] = (G^T dW G)[a][b]` by the F(m x m, 3 x 3) `method` for
    /// one group's sums `dW[e][ci][co]` (`e = PATCH i + j`; rows of `ldv` values, as are
    /// the filters').
    fn fold_filters(method: Method, sums: &[f32], cin_g: usize, ldv: usize, filters: &mut [f32]) {
        match method {
            Method::F2x2 => fold_filters_by::<V, F2x2>(sums, cin_g, ldv, filters),
            Method::F4x4 => fold_filters_by::<V, F4x4>(sums, cin_g, ldv, filters),
        }
    }
}

/// [`fold_filters`] by `T`, a vector of output channels at a time: `G` along each row
/// `i`, then `G^T` down the columns.
#[inline(always)]
fn fold_filters_by<V: F32Vector, T: Minimal>(sums: &[f32], cin_g: usize, ldv: usize, filters: &mut [f32]) {
    let g = filter_matrix::<T>();
    let zero = V::splat(0.0);
    for ci in 0..cin_g {
        for co in (0..ldv).step_by(V::LANES) {
            let dw = |e: usize| V::load(&sums[(e * cin_g + ci) * ldv + co..]);
            // (dW G)[i][b], then (G^T (dW G))[a][b].
            let right: [[V; 3]; MAX_PATCH] = array_of([zero; 3], |i| {
                let row =
                    |b: usize| (0..T::PATCH).fold(zero, |s, j| V::splat(g[j][b]).mul_add(dw(T::PATCH * i + j), s));
                if i < T::PATCH { array_of(zero, row) } else { [zero; 3] }
            });
            for a in 0..3 {
                for b in 0..3 {
                    let value = (0..T::PATCH).fold(zero, |s, i| V::splat(g[i][a]).mul_add(right[i][b], s));
                    value.store(&mut filters[(ci * 9 + 3 * a + b) * ldv + co..]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::conv::tests::for_each_term;
    use crate::cpu::conv_winograd::tests::{geometry, values};
    use crate::cpu::simd::test_isas;
    use proptest::prelude::*;

    #[test]
    fn the_gradient_transform_is_the_adjoint_of_the_inverse() {
        // <A^T M A, Y> = <M, A Y A^T> for unit M and unit Y.
        fn check<T: Minimal>() {
            let (p, m) = (T::PATCH, T::TILE);
            for unit in 0..m * m {
                let mut lifted = vec![f32::NAN; p * p];
                let y = |r: usize, c: usize| Scalar((r * m + c == unit) as u8 as f32);
                transform_gradient::<Scalar, T>(y, |e, v| lifted[e] = v.0);
                for (e, &lifted) in lifted.iter().enumerate() {
                    let forward = T::inverse_tile(|k| Scalar((k == e) as u8 as f32));
                    assert_eq!(lifted, forward[unit / m][unit % m].0, "tile value {unit}, position {e}");
                }
            }
        }
        check::<F2x2>();
        check::<F4x4>();
    }

    #[test]
    fn the_filter_matrix_is_g() {
        let g = filter_matrix::<F2x2>();
        assert_eq!(&g[..4], &[[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]]);
        let g = filter_matrix::<F4x4>();
        let sixth = 1.0 / 6.0;
        let want = [
            [0.25, 0.0, 0.0],
            [-sixth, -sixth, -sixth],
            [-sixth, sixth, -sixth],
            [1.0 / 24.0, 1.0 / 12.0, sixth],
            [1.0 / 24.0, -1.0 / 12.0, sixth],
            [0.0, 0.0, 1.0],
        ];
        for (got, want) in g.iter().zip(want) {
            for (&got, want) in got.iter().zip(want) {
                assert!((got as f64 - want).abs() <= 2.0 * f32::EPSILON as f64 * want.abs(), "{got} vs {want}");
            }
        }
    }

    #[test]
    fn the_weight_gradient_of_a_winograd_convolution_takes_this_path() {
        let g = geometry(5, 1, [16, 18], (6, 7), (1, 1)).expect("a geometry");
        let isa = Isa::best();
        if !applies(isa, &g) {
            return; // no SIMD vectors here: the channels-last path, tested with it
        }
        let (image, features) = (values(5 * 16 * 42, 1), values(5 * 18 * 42, 2));
        let layout = |channels: usize| crate::Layout::contiguous(&[5, channels, 6, 7]);
        let got = crate::cpu::conv::conv2d_weight_grad(&g, &image, &layout(16), &features, &layout(18));
        let entries = crate::cpu::conv::WEIGHT_GRAD_ENTRIES;
        assert_eq!(got, weight_grad(isa, &g, &image, &features, entries));
        // Chunks of a fixed number of entries: the same sums on one thread.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a pool");
        assert_eq!(got, pool.install(|| weight_grad(isa, &g, &image, &features, entries)));
    }

    /// Fails unless [`weight_grad_by`] matches the definition `dw[w] += features[o] *
    /// image[i]` for each term, in f64, within the transforms' rounding of sums of
    /// `terms` values.
    fn check(isa: Isa, method: Method, g: &ConvGeometry, entries: usize, salt: usize) -> Result<(), String> {
        let ([h, w], [oh, ow]) = (g.in_size, g.out_size);
        let image = values(g.batch * g.in_channels * h * w, salt);
        let features = values(g.batch * g.out_channels * oh * ow, salt + 1);
        let len = g.out_channels * g.in_channels / g.groups * 9;
        let (mut want, mut scale, mut terms) = (vec![0.0f64; len], vec![0.0f64; len], vec![0usize; len]);
        for_each_term(g, |o, i, w| {
            let term = features[o] as f64 * image[i] as f64;
            want[w] += term;
            scale[w] += term.abs();
            terms[w] += 1;
        });
        let got = weight_grad_by(isa, method, g, &image, &features, entries);
        if got.len() != len {
            return Err(format!("{} values, not {len}", got.len()));
        }
        for (k, &got) in got.iter().enumerate() {
            let bound = 2e-4 * (1.0 + (terms[k] as f64).sqrt()) * (1.0 + scale[k] / terms[k].max(1) as f64);
            if (got as f64 - want[k]).abs() > bound {
                return Err(format!("{isa:?} {method:?} [{k}]: {got} vs {} (bound {bound})", want[k]));
            }
        }
        Ok(())
    }

    #[test]
    fn sums_go_on_across_blocks_and_entries() {
        // Three entries of 28 x 27 features: 588 F(2 x 2) tiles in four sums of 154 (11
        // rows of 14 tiles) and 147 F(4 x 4) tiles in one, so several blocks of
        // `BLOCK_TILES`, the later ones adding into the sums the first started, and
        // blocks and sums that run from one entry into the next.
        let g = geometry(3, 1, [16, 17], (28, 27), (1, 1)).expect("a geometry");
        for isa in test_isas().into_iter().filter(|&isa| applies(isa, &g)) {
            for method in [Method::F2x2, Method::F4x4] {
                let tiles = Tiles::of(&g, if method == Method::F2x2 { 2 } else { 4 }).per_plane();
                assert!(3 * tiles > BLOCK_TILES, "{method:?}: one block");
                check(isa, method, &g, 3, 5).unwrap();
            }
        }
    }

    #[test]
    fn small_batches_are_summed_in_rows_of_tiles_whatever_the_threads() {
        let entries = crate::cpu::conv::WEIGHT_GRAD_ENTRIES;
        // A large batch: sums of whole entries (64 of 28 x 28 features: 7 x 7 F(4 x 4)
        // tiles each).
        let g = geometry(64, 1, [32, 64], (28, 28), (1, 1)).expect("a geometry");
        let tiles = Tiles::of(&g, 4);
        let per_sum = positions_per_sum(64 * tiles.per_plane(), [tiles.per_plane(), tiles.per_row], entries);
        assert_eq!(per_sum, entries * 49);
        // Fewer entries than a sum takes: sums of whole rows of tiles that start and end
        // inside planes. F(2 x 2), one entry of 17 x 17 tiles: sums of 9 and 8 rows;
        // F(4 x 4), two entries of 15 x 15: three sums of 10 rows, the second from the
        // first entry's row 10 into the second's row 4.
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a pool");
        for (batch, size, method, want) in [(1, 34, Method::F2x2, 153), (2, 60, Method::F4x4, 150)] {
            let g = geometry(batch, 1, [16, 17], (size, size), (1, 1)).expect("a geometry");
            let tiles = Tiles::of(&g, if method == Method::F2x2 { 2 } else { 4 });
            assert_eq!(positions_per_sum(batch * tiles.per_plane(), [tiles.per_plane(), tiles.per_row], entries), want);
            for isa in test_isas().into_iter().filter(|&isa| applies(isa, &g)) {
                check(isa, method, &g, entries, 7).unwrap();
                let (image, features) = (values(batch * 16 * size * size, 1), values(batch * 17 * size * size, 2));
                let got = weight_grad_by(isa, method, &g, &image, &features, entries);
                let alone = one_thread.install(|| weight_grad_by(isa, method, &g, &image, &features, entries));
                assert_eq!(got, alone, "{isa:?} {method:?}: the sums depend on the threads");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Against the definition `dw[w] += features[o] * image[i]` for each term, in f64,
        /// on every ISA with Winograd kernels, by both methods: odd and even sizes (tiles
        /// overhanging the features), paddings 0-3, groups, blocks that run from one
        /// entry into the next, chunks of 1 and 2 entries (sums across several blocks:
        /// `sums_go_on_across_blocks_and_entries`).
        #[test]
        fn winograd_weight_gradients_match_their_definition(
            batch in 1usize..4, groups in 1usize..3, cin in 16usize..21, cout in 16usize..26,
            size in (1usize..20, 1usize..20), padding in (0usize..4, 0usize..4), salt in 0usize..100,
        ) {
            let Some(g) = geometry(batch, groups, [cin, cout], size, padding) else { return Ok(()) };
            let [oh, ow] = g.out_size;
            if oh * ow == 0 {
                return Ok(());
            }
            for isa in test_isas().into_iter().filter(|&isa| applies(isa, &g)) {
                for (method, entries) in [(Method::F2x2, 1), (Method::F2x2, 2), (Method::F4x4, 1), (Method::F4x4, 2)] {
                    check(isa, method, &g, entries, salt).map_err(TestCaseError::fail)?;
                }
            }
        }
    }
}

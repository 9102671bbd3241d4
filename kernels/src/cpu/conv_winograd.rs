//! 3 x 3 convolutions at stride 1 by Winograd's minimal filtering F(m x m, 3 x 3), with
//! m = 2 or 4 (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR
//! 2016, eq. 8, and their F(4 x 4, 3 x 3) matrices).
//!
//! Each m x m tile of output features is computed from the (m + 2)-square patch `d` of
//! the image under it as
//!
//! ```text
//! Y = A^T [ sum over input channels of (G g G^T) ⊙ (B^T d B) ] A
//! ```
//!
//! with `g` a 3 x 3 filter. For F(2 x 2, 3 x 3):
//!
//! ```text
//!       | 1  0 -1  0 |         | 1    0    0  |
//! B^T = | 0  1  1  0 |    G =  | 1/2  1/2  1/2 |    A^T = | 1  1  1  0 |
//!       | 0 -1  1  0 |         | 1/2 -1/2  1/2 |          | 0  1 -1 -1 |
//!       | 0  1  0 -1 |         | 0    0    1  |
//! ```
//!
//! and for F(4 x 4, 3 x 3):
//!
//! ```text
//!       | 4  0 -5  0  1  0 |         |  1/4    0     0   |
//!       | 0 -4 -4  1  1  0 |         | -1/6  -1/6  -1/6  |        | 1  1  1  1  1  0 |
//! B^T = | 0  4 -4 -1  1  0 |    G =  | -1/6   1/6  -1/6  |  A^T = | 0  1 -1  2 -2  0 |
//!       | 0 -2 -1  2  1  0 |         |  1/24  1/12  1/6  |        | 0  1  1  4  4  0 |
//!       | 0  2 -1 -2  1  0 |         |  1/24 -1/12  1/6  |        | 0  1 -1  8 -8  1 |
//!       | 0  4  0 -5  0  1 |         |  0     0     1    |
//! ```
//!
//! F(2 x 2, 3 x 3) takes 16 multiplications per tile and input channel instead of the 36
//! of the direct sum (2.25x fewer), F(4 x 4, 3 x 3) 36 instead of 144 (4x fewer), for
//! larger transforms and coarser tiles ([`method`] chooses). The sum over input channels
//! at each of the `(m + 2)^2` positions `e` of a transformed tile is a matrix product:
//! with `U_e[ci, tile]` the transformed patches and `W_e[co, ci]` the transformed
//! filters, `M_e = W_e U_e`, and the output transform reads each tile's values back out
//! of the `M_e`. The transforms' coefficients are small (at most 8; the transformed
//! filters, with their 1/6, 1/12 and 1/24, are within four f32 roundings of `G g G^T`),
//! so they add few roundings: the tests hold the results of both within `1e-4 (1 +
//! sqrt(channels))` of the f64 sum, relative to its size. A transposed convolution of
//! the same kind (the input gradient of one) is the convolution of its features with the
//! flipped filters ([`conv_transpose2d`]).
//!
//! **Layout.** Tiles are numbered in raster order over the feature plane, and on across
//! the planes of a part of the batch, and run in blocks of whole register tiles of
//! columns (a multiple of two vectors), as many as keep the block's `U` in L2
//! ([`Minimal::BLOCK_VALUES`]); a block may end in one entry's plane and go on in the
//! next. For each block:
//!
//! ```text
//! U[e][ci][tile] = (B^T d B)[e]            every input channel (transform_patches)
//! for each register tile of output channels co0..co0 + rows:
//!     M[e][co][tile] = W_e[co, ..] U_e      (m + 2)^2 products of depth cin (multiply)
//!     out[co][m x m tile] = A^T M A + bias  (transform_products)
//! ```
//!
//! The products are the register tiles of the unpacked GEMM (`gemm_small.rs`), reading
//! `U_e`'s rows as a column block of B and the transformed filters packed tile by tile
//! (as `conv_shifted.rs` packs its filters). Both transforms are elementwise across a run
//! of tiles in one tile row, a vector of tiles at a time: a patch's columns are image
//! columns m apart, so each image row is first split into its m phases, the columns
//! `m t + phase` (one round of [`F32Vector::deinterleave`] for m = 2, two for m = 4), and
//! an output tile's m columns are put back in order by as many rounds of
//! [`F32Vector::interleave`]. The two methods share all of this and differ only in their
//! [`Minimal`] transforms. The parts of the batch run in parallel ([`part_count`]).
//!
//! `conv.rs` takes this module for f32 (and f16/bf16, accumulated in f32) 3 x 3
//! convolutions at stride 1 and dilation 1 with enough channels ([`applies`]); the
//! measurements are there and at [`method`].

use super::conv::ConvGeometry;
use super::gemm::{Isa, MatRef};
use super::gemm_small::{BlockRows, Tile, TileStart, balanced_tile_rows, row_tile, tile_rows};
use super::simd::{F32Vector, MAX_LANES, kernel, prefetch, vector_lanes};
use crate::{buffers, parallel};
use std::ops::Range;

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
/// Those figures are F(2 x 2, 3 x 3)'s, which then ran every such convolution; [`method`]
/// now gives some of them to F(4 x 4, 3 x 3), measured against it there.
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
/// degrees. Every value is written, into a buffer from the cache ([`buffers`]).
fn flipped_filters(g: &ConvGeometry, weight: &[f32]) -> Vec<f32> {
    let (cin_g, cout_g) = (g.in_channels / g.groups, g.out_channels / g.groups);
    let mut flipped = buffers::for_overwrite(weight.len());
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
    let flipped = flipped_filters(g, weight);
    conv2d(isa, &conv, features, &flipped, bias, out);
    buffers::recycle(flipped);
}

/// The largest patch side (F(4 x 4, 3 x 3)'s): [`Minimal::lift`] returns this many
/// values, of which F(2 x 2, 3 x 3) uses the first 4.
pub(super) const MAX_PATCH: usize = 6;
/// The largest tile side: [`Minimal::inverse_tile`] returns this square, of which F(2 x
/// 2, 3 x 3) uses the top left 2 x 2.
pub(super) const MAX_TILE: usize = 4;

/// The F(m x m, 3 x 3) a convolution runs ([`method`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Method {
    F2x2,
    F4x4,
}

/// Winograd's F(m x m, 3 x 3) for one tile side `m`: its sizes and its transforms (and
/// the weight gradient's, [`Minimal::lift_gradient`]), the only code that differs
/// between the two methods.
pub(super) trait Minimal {
    /// This method's name for [`transform_patches`] and [`transform_products`].
    const METHOD: Method;
    /// The side of an output tile, `m`.
    const TILE: usize;
    /// The side of the patch under a tile, `m + 2`.
    const PATCH: usize = Self::TILE + 2;
    /// The products per tile and input channel: the values of a transformed patch.
    const POSITIONS: usize = Self::PATCH * Self::PATCH;
    /// The most transformed-patch values in a block of tiles (`POSITIONS * cin_g *
    /// tiles`), so that `U` stays in L2 while every tile of output channels reads it.
    const BLOCK_VALUES: usize;
    /// `G x` for a column (or row) `x` of three filter values, lane by lane.
    fn lift<V: F32Vector>(x: [V; 3]) -> [V; MAX_PATCH];
    /// `(B^T d B)[e]` (`e = PATCH i + j`) for the patch whose row `r`, column `c` is
    /// `d(r, c)`, each value handed to `store(e, value)` as it is made.
    fn transform_patch<V: F32Vector>(d: impl Fn(usize, usize) -> V, store: impl FnMut(usize, V));
    /// `A^T M A` (`[a][b]`, the first `TILE` of each) for the products `M[e] = m(e)`.
    fn inverse_tile<V: F32Vector>(m: impl Fn(usize) -> V) -> [[V; MAX_TILE]; MAX_TILE];
    /// `A x` (the first `PATCH` values) for a column (or row) `x` of `TILE` values of an
    /// output tile's gradient, lane by lane: the adjoint of [`Minimal::inverse_tile`]'s
    /// `A^T`, for the weight gradient (`conv_winograd_grad.rs`).
    fn lift_gradient<V: F32Vector>(x: [V; MAX_TILE]) -> [V; MAX_PATCH];
}

/// F(2 x 2, 3 x 3): 16 products per tile and input channel for 4 outputs.
pub(super) struct F2x2;

impl Minimal for F2x2 {
    const METHOD: Method = Method::F2x2;
    const TILE: usize = 2;
    /// 128 KB, a quarter of Zen 3's L2.
    const BLOCK_VALUES: usize = 1 << 15;

    #[inline(always)]
    fn lift<V: F32Vector>([a, b, c]: [V; 3]) -> [V; MAX_PATCH] {
        let (half, zero) = (V::splat(0.5), V::splat(0.0));
        [a, half * (a + b + c), half * (a - b + c), c, zero, zero]
    }

    #[inline(always)]
    fn transform_patch<V: F32Vector>(d: impl Fn(usize, usize) -> V, mut store: impl FnMut(usize, V)) {
        // B^T d: rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3) of each column c.
        let zero = V::splat(0.0);
        let d: [[V; 4]; 4] = array_of([zero; 4], |r| array_of(zero, |c| d(r, c)));
        let k: [[V; 4]; 4] = [
            array_of(zero, |c| d[0][c] - d[2][c]),
            array_of(zero, |c| d[1][c] + d[2][c]),
            array_of(zero, |c| d[2][c] - d[1][c]),
            array_of(zero, |c| d[1][c] - d[3][c]),
        ];
        // (B^T d) B: the same along each row.
        for (i, k) in k.iter().enumerate() {
            let values = [k[0] - k[2], k[1] + k[2], k[2] - k[1], k[1] - k[3]];
            values.into_iter().enumerate().for_each(|(j, value)| store(4 * i + j, value));
        }
    }

    #[inline(always)]
    fn inverse_tile<V: F32Vector>(m: impl Fn(usize) -> V) -> [[V; MAX_TILE]; MAX_TILE] {
        // A^T M: (m0 + m1 + m2, m1 - m2 - m3) down each column j.
        let mut top = [V::splat(0.0); 4];
        let mut bottom = [V::splat(0.0); 4];
        for j in 0..4 {
            let (m1, m2) = (m(4 + j), m(8 + j));
            top[j] = m(j) + m1 + m2;
            bottom[j] = m1 - m2 - m(12 + j);
        }
        // (A^T M) A along each row.
        let zero = V::splat(0.0);
        let row = |x: [V; 4]| [x[0] + x[1] + x[2], x[1] - x[2] - x[3], zero, zero];
        [row(top), row(bottom), [zero; 4], [zero; 4]]
    }

    #[inline(always)]
    fn lift_gradient<V: F32Vector>(x: [V; MAX_TILE]) -> [V; MAX_PATCH] {
        // The columns of A^T: (1, 0), (1, 1), (1, -1), (0, -1).
        let zero = V::splat(0.0);
        [x[0], x[0] + x[1], x[0] - x[1], -x[1], zero, zero]
    }
}

/// F(4 x 4, 3 x 3): 36 products per tile and input channel for 16 outputs.
pub(super) struct F4x4;

impl Minimal for F4x4 {
    const METHOD: Method = Method::F4x4;
    const TILE: usize = 4;
    /// 512 KB, Zen 3's L2: larger blocks measured faster, as each block streams the
    /// transformed filters (2.25 times F(2 x 2, 3 x 3)'s) through the products once.
    const BLOCK_VALUES: usize = 1 << 17;

    #[inline(always)]
    fn lift<V: F32Vector>([a, b, c]: [V; 3]) -> [V; MAX_PATCH] {
        let (quarter, half, sixth) = (V::splat(0.25), V::splat(0.5), V::splat(1.0 / 6.0));
        let (outer, inner) = (quarter.mul_add(a, c), half * b);
        [
            quarter * a,
            -(sixth * (a + b + c)),
            -(sixth * (a - b + c)),
            sixth * (outer + inner),
            sixth * (outer - inner),
            c,
        ]
    }

    #[inline(always)]
    fn transform_patch<V: F32Vector>(d: impl Fn(usize, usize) -> V, mut store: impl FnMut(usize, V)) {
        // d B: B^T along each row, then B^T (d B) down each column.
        let zero = V::splat(0.0);
        let rows: [[V; 6]; 6] = array_of([zero; 6], |r| transform_six(array_of(zero, |c| d(r, c))));
        for j in 0..6 {
            let column = transform_six(array_of(zero, |r| rows[r][j]));
            column.into_iter().enumerate().for_each(|(i, value)| store(6 * i + j, value));
        }
    }

    #[inline(always)]
    fn inverse_tile<V: F32Vector>(m: impl Fn(usize) -> V) -> [[V; MAX_TILE]; MAX_TILE] {
        // M A: A^T along each row i, then A^T (M A) down each column b.
        let zero = V::splat(0.0);
        let rows: [[V; 4]; 6] = array_of([zero; 4], |i| inverse_six(array_of(zero, |j| m(6 * i + j))));
        let columns: [[V; 4]; 4] = array_of([zero; 4], |b| inverse_six(array_of(zero, |i| rows[i][b])));
        array_of([zero; 4], |a| array_of(zero, |b| columns[b][a]))
    }

    #[inline(always)]
    fn lift_gradient<V: F32Vector>(x: [V; MAX_TILE]) -> [V; MAX_PATCH] {
        // The columns of A^T: (1, 0, 0, 0), (1, 1, 1, 1), (1, -1, 1, -1), (1, 2, 4, 8),
        // (1, -2, 4, -8), (0, 0, 0, 1).
        let (two, minus_two, four) = (V::splat(2.0), V::splat(-2.0), V::splat(4.0));
        let (even, odd) = (x[0] + x[2], x[1] + x[3]);
        let (outer_even, outer_odd) = (four.mul_add(x[2], x[0]), four.mul_add(x[3], x[1]));
        [
            x[0],
            even + odd,
            even - odd,
            two.mul_add(outer_odd, outer_even),
            minus_two.mul_add(outer_odd, outer_even),
            x[3],
        ]
    }
}

/// F(4 x 4, 3 x 3)'s `B^T x` for a column (or row) of six values.
#[inline(always)]
fn transform_six<V: F32Vector>(x: [V; 6]) -> [V; 6] {
    let (two, four, five) = (V::splat(2.0), V::splat(4.0), V::splat(5.0));
    let (sum12, diff12) = (x[1] + x[2], x[1] - x[2]);
    let (sum34, diff43) = (x[3] + x[4], x[4] - x[3]);
    let (diff42, diff31) = (x[4] - x[2], x[3] - x[1]);
    [
        four.mul_add(x[0], x[4]) - five * x[2],
        sum34 - four * sum12,
        four.mul_add(diff12, diff43),
        two.mul_add(diff31, diff42),
        diff42 - two * diff31,
        four.mul_add(x[1], x[5]) - five * x[3],
    ]
}

/// F(4 x 4, 3 x 3)'s `A^T x` for a column (or row) of six values.
#[inline(always)]
fn inverse_six<V: F32Vector>(x: [V; 6]) -> [V; 4] {
    let (two, four, eight) = (V::splat(2.0), V::splat(4.0), V::splat(8.0));
    let (sum12, diff12) = (x[1] + x[2], x[1] - x[2]);
    let (sum34, diff34) = (x[3] + x[4], x[3] - x[4]);
    [
        x[0] + sum12 + sum34,
        two.mul_add(diff34, diff12),
        four.mul_add(sum34, sum12),
        eight.mul_add(diff34, diff12) + x[5],
    ]
}

/// The F(m x m, 3 x 3) that convolution `g` runs: F(4 x 4, 3 x 3) for at least 32 input
/// channels per group and 32 of its tiles per plane; or, with 32 of its tiles in the
/// batch, for at least 256 input channels per group, or 64 and 4 tiles a row, or 96 and
/// 3 tiles a row that cover no more than F(2 x 2)'s; else F(2 x 2, 3 x 3). With fewer
/// channels the products are shallow and F(4 x 4)'s larger transforms cost more than
/// its products save. Its transforms run across a tile row's tiles, a vector of them at
/// a time, which planes of 2 or 3 tiles a row fill poorly (only the deepest products
/// pay for that); a batch of a few of its tiles fills little of the products'
/// two-vector column blocks.
///
/// Measured on Zen 3 (AVX2), `Tensor::conv2d` and `conv_transpose2d` at one thread, the
/// first rule (32 input channels and 32 tiles a plane) against F(2 x 2, 3 x 3)
/// everywhere, ms, the best of 4 in each of 12 alternated rounds (the host was noisy:
/// medians were up to 1.8x the bests):
///
/// | batch, channels, size (padding 1) | forward | ratio | transposed | ratio |
/// |---|---|---|---|---|
/// | 64, 32 -> 64, 28 x 28 (the issue's) | 35.2 / 40.5 | 1.15x | 40.1 / 55.1 | 1.37x |
/// | 16, 32 -> 32, 28 x 28 | 5.5 / 5.9 | 1.07x | 5.3 / 5.8 | 1.09x |
/// | 16, 64 -> 64, 28 x 28 | 17.6 / 20.9 | 1.19x | 17.2 / 23.7 | 1.38x |
/// | 8, 128 -> 128, 28 x 28 | 34.7 / 36.0 | 1.04x | 39.0 / 35.4 | 0.91x |
/// | 4, 256 -> 256, 28 x 28 | 65.2 / 87.1 | 1.34x | 74.7 / 71.9 | 0.96x |
/// | 8, 64 -> 64, 56 x 56 | 30.5 / 56.3 | 1.84x | 30.8 / 37.1 | 1.21x |
/// | 4, 128 -> 128, 56 x 56 | 56.8 / 62.4 | 1.10x | 55.1 / 62.4 | 1.13x |
/// | 2, 256 -> 256, 56 x 56 | 109.7 / 135.4 | 1.23x | 114.0 / 149.9 | 1.32x |
/// | 2, 32 -> 64, 112 x 112 | 16.8 / 17.9 | 1.07x | 18.7 / 21.3 | 1.14x |
/// | 8, 32 -> 32, 56 x 56 | 15.6 / 15.5 | 0.99x | 12.2 / 9.9 | 0.80x |
///
/// In total 1.23x forward and 1.16x transposed. Layers the rule leaves to F(2 x 2)
/// ran 1-3% slower than before F(4 x 4) was added, within the noise (the two share the
/// code around the transforms).
/// F(4 x 4) everywhere, in an earlier build, lost 2.4x on 256 -> 256 at 7 x 7 (4 tiles a
/// plane) and 1.04-1.33x on the 16-channel layers. With blocks across entries, F(4 x 4)
/// for every layer of 32 input channels or more still lost at 7 x 7 (best of 3, ms, one
/// thread: 16, 256 -> 256 31.9 / 23.4; 32, 128 -> 128 13.8 / 11.6; 16, 512 -> 512 128.0
/// / 93.4): a 7 x 7 plane is 2 x 2 of its tiles, 8 x 8 features, and 256 -> 256
/// filters transformed by it (9.4 MB) no longer fit the L3.
///
/// Once the filters were transformed in SIMD ([`filter_tile_by`]), F(4 x 4) also won on
/// planes of 16 to 31 of its tiles (13 x 13 to 20 x 20) with 64 channels or more. This
/// rule against the one before (32 tiles a plane), ms, best of 4 in each of 4
/// alternated rounds, forward / transposed:
///
/// | batch, channels, size (padding 1) | 1 thread | ratio | 2 threads | ratio |
/// |---|---|---|---|---|
/// | 16, 64 -> 64, 14 x 14 | 5.19 / 5.21 | 1.00x | 2.63 / 2.55 | 0.97x |
/// | 16, 128 -> 128, 14 x 14 | 15.12 / 17.66 | 1.17x | 7.36 / 8.55 | 1.16x |
/// | 8, 256 -> 256, 14 x 14 | 26.88 / 30.67 | 1.14x | 13.49 / 15.77 | 1.17x |
/// | 2, 256 -> 256, 14 x 14 | 8.26 / 8.53 | 1.03x | 4.32 / 4.84 | 1.12x |
/// | 8, 128 -> 128, 16 x 16 | 7.34 / 9.35 | 1.27x | 3.81 / 4.68 | 1.23x |
/// | 8, 96 -> 96, 18 x 18 | 7.41 / 9.23 | 1.25x | 3.70 / 4.70 | 1.27x |
/// | 16, 64 -> 64, 20 x 20 | 7.96 / 10.30 | 1.29x | 4.03 / 5.16 | 1.28x |
/// | 4, 256 -> 256, 20 x 20 | 24.49 / 31.29 | 1.28x | 12.89 / 15.73 | 1.22x |
///
/// (forward; the transposed convolutions moved alike.) With fewer than 256 channels,
/// planes of 2 or 3 tiles a row gain little or lose where F(4 x 4)'s tiles overhang the
/// plane further than F(2 x 2)'s, or with fewer than 96 channels (best of 10 in each of
/// 3 rounds, one thread, F(4 x 4) / F(2 x 2), ms: 16, 128 -> 128: 8 x 8 5.41 / 5.28, 10
/// x 10 10.26 / 9.17; 32, 64 -> 64: 7 x 7 4.06 / 3.36, 10 x 10 6.87 / 5.51, 12 x 12 3.58
/// / 3.57). Where its tiles cover no more than F(2 x 2)'s, with 96 channels or more and
/// 3 tiles a row, F(4 x 4) won (16, 128 -> 128, 12 x 12: 10.49 / 12.03; best of 8 in
/// each of 3 rounds, forward, batch 16, F(4 x 4) / F(2 x 2), ms, 1 thread and 2: 96 ->
/// 96, 12 x 12 6.16 / 7.25 and 3.12 / 3.64; 128 -> 128, 11 x 11 10.21 / 11.69 and 5.16
/// / 5.96; 192 -> 192, 12 x 12 20.08 / 24.38 and 10.06 / 12.15),
/// but not with 2 tiles a row (128 -> 128, 8 x 8: 5.16 / 5.17) nor where they overhang
/// (9 x 9: 9.98 / 8.92; 192 -> 192, 10 x 10: 20.20 / 18.43). A batch of one 14 x 14
/// plane lost (512 -> 512: 32.7 against 23.5), and so did a batch of one 7 x 7 plane
/// (256 -> 256: 2.9x). With 256 channels or more, planes of 2 or 3 tiles a row won, the
/// rule for them against the one before, best of 3 in each of 3 rounds, forward:
///
/// | batch, channels, size (padding 1) | 1 thread | ratio | 2 threads | ratio |
/// |---|---|---|---|---|
/// | 8, 512 -> 512, 7 x 7 | 34.98 / 39.81 | 1.14x | 20.21 / 25.09 | 1.24x |
/// | 16, 256 -> 256, 7 x 7 | 17.62 / 20.75 | 1.18x | 9.36 / 11.01 | 1.18x |
/// | 32, 256 -> 256, 7 x 7 | 32.17 / 40.30 | 1.25x | 18.68 / 21.01 | 1.12x |
/// | 16, 512 -> 512, 8 x 8 | 60.49 / 80.69 | 1.33x | 37.59 / 42.94 | 1.14x |
/// | 16, 256 -> 256, 12 x 12 | 35.38 / 48.05 | 1.36x | 19.24 / 25.11 | 1.31x |
/// | 8, 512 -> 512, 12 x 12 | 65.93 / 89.42 | 1.36x | 44.97 / 55.28 | 1.23x |
/// | 4, 512 -> 512, 8 x 8 (16 tiles, left to F(2 x 2)) | 21.83 / 22.68 | 1.04x | 14.24 / 13.96 | 0.98x |
fn method(g: &ConvGeometry) -> Method {
    let (cin_g, tiles) = (g.in_channels / g.groups, Tiles::of(g, F4x4::TILE));
    let large = tiles.per_plane() >= 32;
    let filled = g.batch * tiles.per_plane() >= 32;
    // Its tiles cover no more than F(2 x 2)'s: sides of 4k and 4k + 3.
    let flush = g.out_size.iter().all(|&n| n.next_multiple_of(4) == n.next_multiple_of(2));
    let deep =
        filled && (cin_g >= 256 || cin_g >= 64 && tiles.per_row >= 4 || cin_g >= 96 && tiles.per_row >= 3 && flush);
    if cin_g >= 32 && (large || deep) { Method::F4x4 } else { Method::F2x2 }
}

/// The instruction set of [`transform_patches`] on a plane of `tiles`: the transform
/// works across a tile row's run of tiles, a tile a lane, so AVX-512's 16 lanes leave 9
/// idle on a 28 x 28 plane by F(4 x 4) (7 tiles a row). Where a tile row fits AVX2's 8
/// lanes, its vectors do the same work with all their lanes used. Measured on a Xeon
/// with AMX, the issue's layer (batch 64, 32 -> 64 channels, 28 x 28, 3 x 3, padding 1),
/// medians of 12 in 4 alternated rounds, ms, AVX-512 patches -> AVX2 patches: one thread,
/// forward 13.9 -> 12.9-13.0, input gradient 17.5-17.7 -> 15.7-16.0; two threads,
/// forward 7.35-7.43 -> 6.66-6.71, input gradient 9.15-9.21 -> 7.88-8.02; the same
/// without padding (26 x 26). The weight gradient's patches moved within the noise. The
/// products' transform stays on AVX-512: on AVX2 as well, it cost the forward 0.8 ms at
/// one thread (13.1 -> 13.9).
pub(super) fn transform_isa(isa: Isa, tiles: Tiles) -> Isa {
    let narrow = Isa::Avx2Fma;
    if isa == Isa::Avx512 && tiles.per_row <= vector_lanes(narrow) { narrow } else { isa }
}

/// The tiles of output features: `rows` rows of `per_row`, numbered in raster order.
#[derive(Clone, Copy)]
pub(super) struct Tiles {
    pub rows: usize,
    pub per_row: usize,
}

/// The tiles of a block that lie in one tile row: `columns` of tile row `row`, the first
/// of them the block's tile `slot`.
struct Run {
    row: usize,
    columns: Range<usize>,
    slot: usize,
}

/// The tiles of a block that lie in one batch entry's plane: `tiles` (raster numbers in
/// the plane) of entry `entry`, the first of them the block's tile `slot`.
pub(super) struct Piece {
    pub entry: usize,
    pub tiles: Range<usize>,
    pub slot: usize,
}

impl Tiles {
    /// The `tile` x `tile` tiles of the features of `g`.
    pub(super) fn of(g: &ConvGeometry, tile: usize) -> Tiles {
        Tiles { rows: g.out_size[0].div_ceil(tile), per_row: g.out_size[1].div_ceil(tile) }
    }

    /// How many tiles a feature plane has.
    pub(super) fn per_plane(self) -> usize {
        self.rows * self.per_row
    }

    /// The runs of the tiles `block` (raster numbers in one plane), in order.
    fn runs(self, block: Range<usize>) -> impl Iterator<Item = Run> {
        spans(block, self.per_row).map(|(row, columns, slot)| Run { row, columns, slot })
    }

    /// The pieces of the tiles `block`, numbered across planes (entry `n`'s tile `t` is
    /// `n * per_plane + t`), in order.
    pub(super) fn pieces(self, block: Range<usize>) -> impl Iterator<Item = Piece> {
        spans(block, self.per_plane()).map(|(entry, tiles, slot)| Piece { entry, tiles, slot })
    }
}

/// `numbers` cut where they cross a multiple of `period`: for each period `k` they reach,
/// `(k, the numbers in it less k * period, how many of numbers come before them)`.
fn spans(numbers: Range<usize>, period: usize) -> impl Iterator<Item = (usize, Range<usize>, usize)> {
    let periods = numbers.start / period..numbers.end.div_ceil(period);
    periods.map(move |k| {
        let first = numbers.start.max(k * period);
        let end = numbers.end.min((k + 1) * period);
        (k, first - k * period..end - k * period, first - numbers.start)
    })
}

/// `G g G^T` for 3 x 3 filters `g` (row-major, a filter in each lane): the transformed
/// filters' values `[e]` (`e = PATCH i + j`), each handed to `store(e, value)`.
#[inline(always)]
fn transform_filter<V: F32Vector, T: Minimal>(g: [V; 9], mut store: impl FnMut(usize, V)) {
    let columns: [[V; MAX_PATCH]; 3] = array_of([V::splat(0.0); MAX_PATCH], |x| T::lift([g[x], g[3 + x], g[6 + x]]));
    for i in 0..T::PATCH {
        let values = T::lift([columns[0][i], columns[1][i], columns[2][i]]);
        values.into_iter().take(T::PATCH).enumerate().for_each(|(j, value)| store(T::PATCH * i + j, value));
    }
}

/// `[f(0), .., f(N - 1)]`, inlined into the SIMD kernels: `std::array::from_fn` is not
/// always inlined, and a vector load left outside a kernel's target features is a call.
#[inline(always)]
pub(super) fn array_of<T: Copy, const N: usize>(zero: T, mut f: impl FnMut(usize) -> T) -> [T; N] {
    let mut out = [zero; N];
    for (i, value) in out.iter_mut().enumerate() {
        *value = f(i);
    }
    out
}

/// f32 values in a cache line.
pub(super) const LINE_VALUES: usize = 16;

/// `buffer` from its first value on a cache line (at most [`LINE_VALUES`] - 1 in).
pub(super) fn aligned(buffer: &mut [f32]) -> &mut [f32] {
    let skip = buffer.as_ptr().align_offset(4 * LINE_VALUES).min(LINE_VALUES - 1);
    &mut buffer[skip..]
}

/// The transformed filters of every group, one register tile of `tile_rows` output
/// channels after another (`[group][tile]`), a tile's values `[e][ci][row]`: for each
/// `W_e`, the columns of A that its product's depth steps broadcast, so that a tile's
/// products read one stretch of memory. The tiles are transformed in parallel
/// ([`transform_filter_tile`]), into a buffer from the cache ([`buffers`]): a fresh one
/// of 512 -> 512 channels' F(4 x 4, 3 x 3) filters (38 MB) is above the size glibc
/// keeps in its heap, and faulting its pages in again on every call cost a fifth of a
/// batch-1 28 x 28 convolution's time.
fn transform_filters<T: Minimal>(isa: Isa, g: &ConvGeometry, weight: &[f32], tile_rows: usize) -> Vec<f32> {
    let (cin_g, cout_g) = (g.in_channels / g.groups, g.out_channels / g.groups);
    let first = |p: usize| first_channel(p, cout_g, tile_rows);
    let per_channel = T::POSITIONS * cin_g;
    let mut filters = buffers::for_overwrite(g.out_channels * per_channel);
    parallel::for_each_split_mut(
        &mut filters,
        g.groups * cout_g.div_ceil(tile_rows),
        |p| first(p) * per_channel,
        |p, tile| {
            let weight = &weight[first(p) * cin_g * 9..][..tile.len() / T::POSITIONS * 9];
            transform_filter_tile(isa, T::METHOD, weight, cin_g, tile);
        },
    );
    filters
}

kernel! {
    /// One register tile of [`transform_filters`]: `tile` (`[e][ci][row]`) from the
    /// `rows` filters `weight` (`[row][ci][3][3]`) by the F(m x m, 3 x 3) `method`.
    fn transform_filter_tile(method: Method, weight: &[f32], cin_g: usize, tile: &mut [f32]) {
        match method {
            Method::F2x2 => filter_tile_by::<V, F2x2>(weight, cin_g, tile),
            Method::F4x4 => filter_tile_by::<V, F4x4>(weight, cin_g, tile),
        }
    }
}

/// [`transform_filter_tile`] by `T`, a vector of the tile's rows (output channels) at a
/// time. The rows of a `W_e` lie side by side, so a whole vector is stored wherever the
/// values past the rows belong to the same `W_e` (those of later input channels are
/// written after it); the vectors then fill each `W_e` front to back. Before, each
/// filter was transformed alone, in f64, and its values stored one by one, `cin_g *
/// rows` apart: `perf` put a third of a batch-1 128 -> 128, 28 x 28 convolution there,
/// which now runs 1.5x faster.
#[inline(always)]
fn filter_tile_by<V: F32Vector, T: Minimal>(weight: &[f32], cin_g: usize, tile: &mut [f32]) {
    let rows = weight.len() / (9 * cin_g);
    let w_len = cin_g * rows;
    for ci in 0..cin_g {
        for first in (0..rows).step_by(V::LANES) {
            let lanes = V::LANES.min(rows - first);
            let mut taps = [[0.0; MAX_LANES]; 9];
            for lane in 0..lanes {
                let g = &weight[((first + lane) * cin_g + ci) * 9..][..9];
                taps.iter_mut().zip(g).for_each(|(tap, &value)| tap[lane] = value);
            }
            let g = array_of(V::splat(0.0), |k| V::load(&taps[k]));
            transform_filter::<V, T>(g, |e, value| {
                let at = e * w_len + ci * rows + first;
                if at + V::LANES <= (e + 1) * w_len {
                    value.store(&mut tile[at..]);
                } else {
                    value.store_partial(&mut tile[at..at + lanes]);
                }
            });
        }
    }
}

/// The first output channel of register tile `p`, for groups of `cout_g` output
/// channels cut into tiles of `tile_rows`, group after group (`out_channels` for the
/// tile after the last).
fn first_channel(p: usize, cout_g: usize, tile_rows: usize) -> usize {
    let tile_count = cout_g.div_ceil(tile_rows);
    p / tile_count * cout_g + p % tile_count * tile_rows
}

/// The features `out = conv(image, weight) + bias` for a geometry [`applies`] accepts
/// with `isa`: `image` `[batch, in_channels, in_size..]`, `weight` `[out_channels,
/// in_channels / groups, 3, 3]`, `bias` `[out_channels]` and `out` `[batch,
/// out_channels, out_size..]`, all row-major f32. Every element of `out` is written.
pub(super) fn conv2d(isa: Isa, g: &ConvGeometry, image: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    conv2d_by(method(g), parallel::threads(), isa, g, image, weight, bias, out);
}

/// [`conv2d`] by the F(m x m, 3 x 3) `method`, the batch cut into parts for `threads`
/// threads ([`part_count`]).
#[allow(clippy::too_many_arguments)]
fn conv2d_by(
    method: Method,
    threads: usize,
    isa: Isa,
    g: &ConvGeometry,
    image: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!(applies(isa, g), "conv_winograd::conv2d: not a 3 x 3 stride-1 convolution with enough channels");
    match method {
        Method::F2x2 => conv2d_with::<F2x2>(threads, isa, g, image, weight, bias, out),
        Method::F4x4 => conv2d_with::<F4x4>(threads, isa, g, image, weight, bias, out),
    }
}

/// [`conv2d_by`] by the F(m x m, 3 x 3) `T`.
///
/// The batch is cut into parts of whole entries, run in parallel ([`part_count`]), and
/// each part's tiles are numbered across its entries' planes ([`Tiles::pieces`]), so
/// that a block of tiles may end in one plane and go on in the next: only a part's last
/// block is short, and the products' column blocks are full even where a plane has
/// fewer tiles than one. Where the threads do not divide the batch, each entry's output
/// channels are shared out among them instead.
fn conv2d_with<T: Minimal>(
    threads: usize,
    isa: Isa,
    g: &ConvGeometry,
    image: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (cin_g, cout_g) = (g.in_channels / g.groups, g.out_channels / g.groups);
    let ([h, w], [oh, ow]) = (g.in_size, g.out_size);
    let (positions, entry_len) = (oh * ow, g.out_channels * oh * ow);
    assert_eq!(image.len(), g.batch * g.in_channels * h * w, "conv2d: image size");
    assert_eq!(weight.len(), g.out_channels * cin_g * 9, "conv2d: weight size");
    assert_eq!(out.len(), g.batch * entry_len, "conv2d: output size");
    let lanes = vector_lanes(isa);
    let tile_height = balanced_tile_rows(cout_g, tile_rows(lanes));
    let filters = transform_filters::<T>(isa, g, weight, tile_height);
    let tiles = Tiles::of(g, T::TILE);
    // Blocks of whole register tiles of columns (two vectors), as many as fit the budget.
    let width = 2 * lanes;
    let budget = (T::BLOCK_VALUES / (T::POSITIONS * cin_g) / width).max(1) * width;
    let parts = part_count(g.batch, threads, g.batch * tiles.per_plane() / (4 * budget));
    // An entry's register tiles of output channels, group after group, and where tile
    // `p` starts.
    let tile_count = cout_g.div_ceil(tile_height);
    let channel_tiles = g.groups * tile_count;
    let channel = |p: usize| first_channel(p, cout_g, tile_height);
    // A batch the threads do not divide (one entry, say) runs an entry a part: then each
    // entry's channel tiles are cut into a share for each thread, and every share
    // transforms the entry's patches itself.
    let shares = if parts.is_multiple_of(threads) { 1 } else { threads.min(channel_tiles) };
    // Task `i`'s entries and channel tiles, and where its outputs start.
    let task = |i: usize| {
        let (part, share) = (i / shares, i % shares);
        let entries = g.batch * part / parts..g.batch * (part + 1) / parts;
        (entries, channel_tiles * share / shares..channel_tiles * (share + 1) / shares)
    };
    let start = |i: usize| {
        let (entries, channel_tiles) = task(i);
        entries.start * entry_len + channel(channel_tiles.start) * positions
    };
    let line_len = split_line(g, T::TILE, tiles, lanes);
    let per_group = T::POSITIONS * cout_g * cin_g;
    let patches_isa = transform_isa(isa, tiles);
    parallel::for_each_split_mut(out, parts * shares, start, |i, out_task| {
        let (entries, channel_tiles) = task(i);
        let (channels_start, channels_end) = (channel(channel_tiles.start), channel(channel_tiles.end));
        let count = entries.len() * tiles.per_plane();
        let per_block = budget.min(count.next_multiple_of(width));
        // Rows of U and M: a block's tiles and room for the last vector of a run to
        // write past its end, a whole number of column blocks, so that each column
        // block's rows start on a cache line (with `aligned`).
        let stride = per_block + width;
        // Not cleared: the products also read U's columns past a block's tiles (a
        // partial column block, the spare columns), whatever they hold, but the sums of
        // those columns are never stored, nor read back out of M.
        let mut patches_buffer = buffers::for_overwrite(T::POSITIONS * cin_g * stride + LINE_VALUES);
        let mut products_buffer = buffers::for_overwrite(T::POSITIONS * tile_height * stride + LINE_VALUES);
        let (patches, products) = (aligned(&mut patches_buffer), aligned(&mut products_buffer));
        let mut lines = vec![0.0; split_lines(T::TILE, tiles, per_block, line_len)];
        for (group, group_tiles, _) in spans(channel_tiles, tile_count) {
            // The group's input planes of the task's entry `n`, and the task's output
            // planes of its output channels `first..first + rows`.
            let planes =
                |n: usize| &image[((entries.start + n) * g.in_channels + group * cin_g) * h * w..][..cin_g * h * w];
            let out_rows = |n: usize, first: usize, rows: usize| {
                let start = (n * (channels_end - channels_start) + group * cout_g + first - channels_start) * positions;
                start..start + rows * positions
            };
            let group_filters = &filters[group * per_group..][..per_group];
            for first in (0..count).step_by(per_block) {
                let block = first..(first + per_block).min(count);
                let next = block.end..(block.end + per_block).min(count);
                for piece in tiles.pieces(block.clone()) {
                    let (u, split) = (&mut patches[piece.slot..], Split { lines: &mut lines, line_len });
                    let planes = planes(piece.entry);
                    transform_patches(patches_isa, T::METHOD, g, planes, tiles, piece.tiles, stride, u, split);
                }
                for (k, t) in group_tiles.clone().enumerate() {
                    let (i0, rows) = (t * tile_height, tile_height.min(cout_g - t * tile_height));
                    // The image and the features come from and go to memory: ask for the
                    // lines this tile's outputs and (a share of the channels at a time)
                    // the next block's patches need, while the products run.
                    for piece in tiles.pieces(block.clone()) {
                        let out_rows = &out_task[out_rows(piece.entry, i0, rows)];
                        prefetch_outputs(g, T::TILE, tiles, piece.tiles, out_rows);
                    }
                    let channels = |k: usize| k * cin_g / group_tiles.len() * h * w;
                    for piece in tiles.pieces(next.clone()) {
                        let planes = &planes(piece.entry)[channels(k)..channels(k + 1)];
                        prefetch_image(g, T::TILE, tiles, piece.tiles, planes);
                    }
                    let products = &mut products[..T::POSITIONS * rows * stride];
                    let filters =
                        Filters { values: group_filters, positions: T::POSITIONS, channels: cin_g, first: i0, rows };
                    multiply(isa, filters, patches, block.len(), stride, products);
                    let bias = bias.map(|bias| &bias[group * cout_g + i0..][..rows]);
                    for piece in tiles.pieces(block.clone()) {
                        let (m, out_rows) = (&products[piece.slot..], &mut out_task[out_rows(piece.entry, i0, rows)]);
                        transform_products(isa, T::METHOD, g, m, bias, tiles, piece.tiles, stride, out_rows);
                    }
                }
            }
        }
        buffers::recycle(patches_buffer);
        buffers::recycle(products_buffer);
    });
    buffers::recycle(filters);
}

/// How many parts of whole entries to cut a batch of `batch` into, for `threads` threads:
/// equal parts, the same number for every thread, as many as that allows up to `most`
/// (more parts let a thread take over the share of one that is descheduled; fewer
/// leave more of each part's blocks whole), at least one for each thread. A batch the
/// threads do not divide runs an entry a part ([`conv2d_with`] then shares each entry's
/// output channels out among the threads).
fn part_count(batch: usize, threads: usize, most: usize) -> usize {
    let fits = |parts: &usize| batch.is_multiple_of(*parts) && parts.is_multiple_of(threads);
    // When `threads` divides the batch, `threads` parts fit.
    (1..=most.max(threads).min(batch)).rev().find(fits).unwrap_or(batch)
}

/// Asks for the cache lines of `values` (see [`prefetch`]).
fn prefetch_all(values: &[f32]) {
    if let Some(last) = values.last() {
        values.iter().step_by(LINE_VALUES).chain([last]).for_each(prefetch);
    }
}

/// Asks for the lines of the output planes `out` that the tiles `block` write.
fn prefetch_outputs(g: &ConvGeometry, tile: usize, tiles: Tiles, block: Range<usize>, out: &[f32]) {
    let [oh, ow] = g.out_size;
    for plane in out.chunks_exact(oh * ow) {
        for run in tiles.runs(block.clone()) {
            let columns = tile * run.columns.start..ow.min(tile * run.columns.end);
            for y in tile * run.row..(tile * run.row + tile).min(oh) {
                prefetch_all(&plane[y * ow..][columns.clone()]);
            }
        }
    }
}

/// Asks for the lines of the image `planes` that the patches of the tiles `block` read.
fn prefetch_image(g: &ConvGeometry, tile: usize, tiles: Tiles, block: Range<usize>, planes: &[f32]) {
    let ([h, w], py) = (g.in_size, g.padding[0]);
    if block.is_empty() {
        return;
    }
    let first = (tile * (block.start / tiles.per_row)).saturating_sub(py).min(h);
    let end = (tile * block.end.div_ceil(tiles.per_row) + 2).saturating_sub(py).min(h);
    for plane in planes.chunks_exact(h * w) {
        prefetch_all(&plane[first * w..end * w]);
    }
}

/// One group's transformed filters and the register tile of output channels being
/// multiplied: rows `first..first + rows` of every one of the `positions` `W_e`, a
/// register tile of [`transform_filters`], `channels` deep.
#[derive(Clone, Copy)]
struct Filters<'a> {
    values: &'a [f32],
    positions: usize,
    channels: usize,
    first: usize,
    rows: usize,
}

/// Scratch for the image rows under a block's tile rows, each split into its `m` phases
/// ([`split_row`]): phase `p` of row `r` at `lines[(m r + p) line_len..]` ([`split_line`],
/// [`split_lines`]), zero where no image value lands.
pub(super) struct Split<'a> {
    pub lines: &'a mut [f32],
    pub line_len: usize,
}

kernel! {
    /// `U[e][ci][slot] = (B^T d B)[e]` for the tiles `block` of one group's `planes` by
    /// the F(m x m, 3 x 3) `method`, into `u` (rows `stride` apart): `d` is the
    /// `m + 2`-square patch at row `m ty - padding_y`, column `m tx - padding_x`, zero
    /// outside the image.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn transform_patches(
        method: Method,
        g: &ConvGeometry,
        planes: &[f32],
        tiles: Tiles,
        block: Range<usize>,
        stride: usize,
        u: &mut [f32],
        split: Split<'_>,
    ) {
        match method {
            Method::F2x2 => patches_by::<V, F2x2>(g, planes, tiles, block, stride, u, split),
            Method::F4x4 => patches_by::<V, F4x4>(g, planes, tiles, block, stride, u, split),
        }
    }
}

/// [`transform_patches`] by `T`.
///
/// For each input channel, the image rows under the block's tile rows are split into
/// their `m` phases ([`split_row`]), so that patch `tx`'s column `c` is phase `c % m` at
/// `tx + c / m`; `B^T d B` is then elementwise across each run of tiles in a tile row:
/// `B^T` along each patch row, then down each column.
#[inline(always)]
fn patches_by<V: F32Vector, T: Minimal>(
    g: &ConvGeometry,
    planes: &[f32],
    tiles: Tiles,
    block: Range<usize>,
    stride: usize,
    u: &mut [f32],
    split: Split<'_>,
) {
    let (lanes, m) = (V::LANES, T::TILE);
    let ([h, w], [py, px]) = (g.in_size, g.padding);
    let cin_g = planes.len() / (h * w);
    let Split { lines, line_len } = split;
    // The padded image rows m first_row .. m last_row + m + 2.
    let first_row = block.start / tiles.per_row;
    let image_rows = m * (block.end.div_ceil(tiles.per_row) - first_row) + 2;
    let lines = &mut lines[..m * image_rows * line_len];
    for ci in 0..cin_g {
        for (local, phases) in lines.chunks_exact_mut(m * line_len).enumerate() {
            match (m * first_row + local).checked_sub(py).filter(|&y| y < h) {
                Some(y) => split_row::<V>(m, &planes[(ci * h + y) * w..], w, px, phases, line_len),
                None => phases.fill(0.0),
            }
        }
        let lines = &*lines;
        for run in tiles.runs(block.clone()) {
            // Phase `phase` of the patches' row r.
            let line =
                |r: usize, phase: usize| &lines[(m * (m * (run.row - first_row) + r) + phase) * line_len..][..line_len];
            for tx in vector_starts(run.columns.clone(), lanes) {
                let slot = run.slot + (tx - run.columns.start);
                let d = |r: usize, c: usize| V::load(&line(r, c % m)[tx + c / m..]);
                T::transform_patch(d, |e, value: V| value.store(&mut u[(e * cin_g + ci) * stride + slot..]));
            }
        }
    }
}

/// The values of one line of a phase, for `tile` x `tile` tiles: enough for the image
/// row's values shifted by the padding ([`split_row`] writes whole vectors) and for the
/// patches' reads (a tile row's patches reach one tile past its last), and a vector to
/// spare.
pub(super) fn split_line(g: &ConvGeometry, tile: usize, tiles: Tiles, lanes: usize) -> usize {
    // The row's values per phase, shifted by at most (tile - 1 + padding) / tile.
    let written = g.in_size[1].div_ceil(tile) + g.padding[1].div_ceil(tile);
    written.max(tiles.per_row + 1) + lanes
}

/// The scratch [`transform_patches`] needs for blocks of `per_block` `tile` x `tile`
/// tiles: the phases of every image row under the tile rows one block can touch.
pub(super) fn split_lines(tile: usize, tiles: Tiles, per_block: usize, line_len: usize) -> usize {
    let tile_rows = (per_block.div_ceil(tiles.per_row) + 1).min(tiles.rows);
    tile * (tile * tile_rows + 2) * line_len
}

/// `phases[p * line_len + t] = row[m t + p - padding]` for the row of `len` values at
/// the start of `rest` (the row and whatever follows it in the planes), zero outside the
/// row, for the `m` (2 or 4) phases `p` of `line_len` ([`split_line`]) values each. One
/// round of [`F32Vector::deinterleave`] splits a row into its even and odd columns, a
/// second round those into the four phases.
///
/// The row's own phases, `R_r[i] = row[m i + r]`, land shifted by the padding: `R_r[i]`
/// is phase `(r + padding) % m` at `t = i + (r + padding) / m`. Only those values
/// (rounded up to whole vectors) are written, the same ones for every row, so the lines'
/// other values stay as they were: zero.
#[inline(always)]
fn split_row<V: F32Vector>(m: usize, rest: &[f32], len: usize, padding: usize, phases: &mut [f32], line_len: usize) {
    let lanes = V::LANES;
    for i in (0..len.div_ceil(m)).step_by(lanes) {
        // A loop, not a closure: one would not be inlined into the kernel's features.
        let mut vectors = [V::splat(0.0); 4];
        for (k, vector) in vectors.iter_mut().enumerate().take(m) {
            *vector = row_vector::<V>(rest, len, m * i + k * lanes);
        }
        let [a, b, c, d] = vectors;
        let ((even_ab, odd_ab), (even_cd, odd_cd)) = (a.deinterleave(b), c.deinterleave(d));
        let row_phases = if m == 2 {
            [even_ab, odd_ab, even_cd, odd_cd]
        } else {
            let ((phase0, phase2), (phase1, phase3)) = (even_ab.deinterleave(even_cd), odd_ab.deinterleave(odd_cd));
            [phase0, phase1, phase2, phase3]
        };
        for (r, phase) in row_phases.into_iter().enumerate().take(m) {
            let (p, shift) = ((r + padding) % m, (r + padding) / m);
            phase.store(&mut phases[p * line_len + i + shift..]);
        }
    }
}

/// The vector of the row of `len` values at the start of `rest` from value `start` on,
/// its lanes past the row set to zero.
#[inline(always)]
fn row_vector<V: F32Vector>(rest: &[f32], len: usize, start: usize) -> V {
    let lanes = V::LANES;
    if start + lanes <= len {
        V::load(&rest[start..])
    } else if start + lanes <= rest.len() {
        // A whole vector reaching into the next row, its lanes set to zero.
        V::select(lanes_below::<V>(len.saturating_sub(start)), V::load(&rest[start..]), V::splat(0.0))
    } else {
        V::load_partial(&rest[start.min(len)..len], 0.0)
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
        let Filters { values, positions, channels, first, rows } = filters;
        let tile = &values[first * positions * channels..][..positions * rows * channels];
        for (e, w_e) in tile.chunks_exact(rows * channels).enumerate() {
            let a = MatRef { data: w_e, offset: 0, row_stride: 1, col_stride: rows };
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
    /// (`[e][co][tile]`, rows `stride` apart) by the F(m x m, 3 x 3) `method`:
    /// `A^T M A` plus the bias, into `out` (`[co][out_size..]`), the tiles' parts past
    /// the features' right and bottom edges dropped.
    #[allow(clippy::too_many_arguments)]
    fn transform_products(
        method: Method,
        g: &ConvGeometry,
        m: &[f32],
        bias: Option<&[f32]>,
        tiles: Tiles,
        block: Range<usize>,
        stride: usize,
        out: &mut [f32],
    ) {
        match method {
            Method::F2x2 => products_by::<V, F2x2>(g, m, bias, tiles, block, stride, out),
            Method::F4x4 => products_by::<V, F4x4>(g, m, bias, tiles, block, stride, out),
        }
    }
}

/// [`transform_products`] by `T`: elementwise across each run of tiles in a tile row,
/// `A^T` along each row of `M`, then down each column; each output row's `m` columns are
/// interleaved into feature columns `m tx..m tx + m` ([`store_tiles`]).
#[inline(always)]
fn products_by<V: F32Vector, T: Minimal>(
    g: &ConvGeometry,
    m: &[f32],
    bias: Option<&[f32]>,
    tiles: Tiles,
    block: Range<usize>,
    stride: usize,
    out: &mut [f32],
) {
    let (lanes, tile) = (V::LANES, T::TILE);
    let [oh, ow] = g.out_size;
    let rows = out.len() / (oh * ow);
    for (co, plane) in out.chunks_exact_mut(oh * ow).enumerate() {
        let bias = V::splat(bias.map_or(0.0, |bias| bias[co]));
        for run in tiles.runs(block.clone()) {
            // Feature columns of this run.
            let end = ow.min(tile * run.columns.end);
            for tx in vector_starts(run.columns.clone(), lanes) {
                let slot = run.slot + (tx - run.columns.start);
                let at = |e: usize| (e * rows + co) * stride + slot;
                let mut y = T::inverse_tile(|e| V::load(&m[at(e)..]));
                for row in y.iter_mut().take(tile) {
                    row.iter_mut().take(tile).for_each(|value| *value = *value + bias);
                }
                let columns = (end - tile * tx).min(tile * lanes);
                for (a, y) in y.into_iter().enumerate().take(tile.min(oh - tile * run.row)) {
                    store_tiles(tile, y, &mut plane[(tile * run.row + a) * ow + tile * tx..][..columns]);
                }
            }
        }
    }
}

/// One output row of a vector of `m` x `m` tiles, `columns[b]` its column `b` (`b < m`)
/// of each tile, into `dst` (at most `m * LANES` long) in feature order: `columns[0][0],
/// .., columns[m - 1][0], columns[0][1], ..`. One round of [`F32Vector::interleave`]
/// for m = 2, two for m = 4.
#[inline(always)]
fn store_tiles<V: F32Vector>(m: usize, columns: [V; MAX_TILE], dst: &mut [f32]) {
    let lanes = V::LANES;
    let vectors = if m == 2 {
        // `dst` holds at most two vectors: the last two are never stored.
        let (first, second) = columns[0].interleave(columns[1]);
        [first, second, first, second]
    } else {
        let (first02, second02) = columns[0].interleave(columns[2]);
        let (first13, second13) = columns[1].interleave(columns[3]);
        let (v0, v1) = first02.interleave(first13);
        let (v2, v3) = second02.interleave(second13);
        [v0, v1, v2, v3]
    };
    for (vector, dst) in vectors.into_iter().zip(dst.chunks_mut(lanes)) {
        if dst.len() == lanes {
            vector.store(dst);
        } else {
            vector.store_partial(dst);
        }
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
pub(super) mod tests {
    use super::*;
    use crate::cpu::conv::tests::for_each_term;
    use crate::cpu::simd::{Scalar, test_isas};
    use proptest::prelude::*;

    /// A convolution's outputs by their definition, in f64: each output's sum (bias and
    /// terms) and the sum of the magnitudes of the same, which bounds its rounding.
    struct Reference {
        sums: Vec<f64>,
        magnitudes: Vec<f64>,
    }

    impl Reference {
        /// `len` outputs in planes of `plane` values, each starting from its channel's
        /// `bias`; `terms` calls its argument with (output, term) for each term.
        fn new(len: usize, plane: usize, bias: Option<&[f32]>, terms: impl FnOnce(&mut dyn FnMut(usize, f64))) -> Self {
            let channels = bias.map_or(1, <[f32]>::len);
            let sums: Vec<f64> = (0..len).map(|i| bias.map_or(0.0, |b| b[i / plane % channels] as f64)).collect();
            let mut reference = Self { magnitudes: sums.iter().map(|s| s.abs()).collect(), sums };
            terms(&mut |o, term| {
                reference.sums[o] += term;
                reference.magnitudes[o] += term.abs();
            });
            reference
        }
    }

    /// The convolution by its definition.
    fn naive(g: &ConvGeometry, image: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Reference {
        let len = g.batch * g.out_channels * g.out_size[0] * g.out_size[1];
        Reference::new(len, g.out_size[0] * g.out_size[1], bias, |add| {
            for_each_term(g, |o, i, w| add(o, weight[w] as f64 * image[i] as f64))
        })
    }

    pub(in crate::cpu) fn values(len: usize, salt: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + salt * 104729) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    /// A 3 x 3 stride-1 convolution of `[cin, cout]` channels per group, if it has
    /// features.
    pub(in crate::cpu) fn geometry(
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

    /// Fails unless every value of `got` is within the transforms' rounding of `want`'s,
    /// in planes of `[rows, columns]`. The transforms mix the outputs of a tile, so an
    /// output's error follows the largest magnitude among the outputs it may share a tile
    /// with (3 rows and columns either side), not its own: an output that sees only
    /// padding is 0 exactly, yet comes out of its tile with its neighbours' rounding (CI
    /// once saw -0.0017 there, 236 channels deep). The bound is 1e-5 of that magnitude:
    /// over 400 random cases F(4 x 4) came within 2.3e-6 of it and F(2 x 2) within 6e-7,
    /// while a term of `values` averages 0.25 in magnitude against a bound of 4e-4 at 16
    /// channels and 5e-3 at 236, so a term missed or doubled shows unless it is tiny.
    fn check(isa: Isa, got: &[f32], want: &Reference, [rows, columns]: [usize; 2]) -> Result<(), TestCaseError> {
        let plane = rows * columns;
        for (i, &got) in got.iter().enumerate() {
            let (start, row, column) = (i / plane * plane, i % plane / columns, i % columns);
            let near = |len: usize, at: usize| at.saturating_sub(3)..(at + 4).min(len);
            let magnitude = near(rows, row)
                .flat_map(|r| near(columns, column).map(move |c| start + r * columns + c))
                .fold(0.0f64, |m, k| m.max(want.magnitudes[k]));
            let want = want.sums[i];
            prop_assert!(
                (got as f64 - want).abs() <= 1e-5 * magnitude,
                "{:?} [{}]: {} vs {} (magnitude {})",
                isa,
                i,
                got,
                want,
                magnitude
            );
        }
        Ok(())
    }

    /// `T`'s transforms of unit patches and unit products against the outer products of
    /// the columns of `b_t` (`B^T`) and `a_t` (`A^T`).
    fn check_transforms<T: Minimal>(b_t: &[&[f32]], a_t: &[&[f32]]) {
        let p = T::PATCH;
        for unit in 0..p * p {
            let (r, c) = (unit / p, unit % p);
            let mut got = vec![f32::NAN; p * p];
            T::transform_patch(|y, x| Scalar((y * p + x == unit) as u8 as f32), |e, v: Scalar| got[e] = v.0);
            let want: Vec<f32> = (0..p * p).map(|e| b_t[e / p][r] * b_t[e % p][c]).collect();
            assert_eq!(got, want, "B^T d B of unit {unit}");
            let y = T::inverse_tile(|e| Scalar((e == unit) as u8 as f32));
            for (a, b) in (0..T::TILE).flat_map(|a| (0..T::TILE).map(move |b| (a, b))) {
                assert_eq!(y[a][b].0, a_t[a][r] * a_t[b][c], "A^T M A of unit {unit} at {a}, {b}");
            }
        }
    }

    #[test]
    fn the_transforms_are_b_and_a() {
        let b_t: [&[f32]; 4] =
            [&[1.0, 0.0, -1.0, 0.0], &[0.0, 1.0, 1.0, 0.0], &[0.0, -1.0, 1.0, 0.0], &[0.0, 1.0, 0.0, -1.0]];
        let a_t: [&[f32]; 2] = [&[1.0, 1.0, 1.0, 0.0], &[0.0, 1.0, -1.0, -1.0]];
        check_transforms::<F2x2>(&b_t, &a_t);
        let b_t: [&[f32]; 6] = [
            &[4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
            &[0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
            &[0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
            &[0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
            &[0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
            &[0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
        ];
        let a_t: [&[f32]; 4] = [
            &[1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
            &[0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
            &[0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
            &[0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
        ];
        check_transforms::<F4x4>(&b_t, &a_t);
    }

    /// `T`'s transforms of unit filters against the outer products of the columns of
    /// `g` (`G`, in f64): within a few roundings of f32 (the 1/6 of F(4 x 4, 3 x 3) is
    /// not exact).
    fn check_filter_transform<T: Minimal>(g: &[[f64; 3]]) {
        for unit in 0..9 {
            let (y, x) = (unit / 3, unit % 3);
            let mut got = vec![f32::NAN; T::POSITIONS];
            let filter = array_of(Scalar(0.0), |k| Scalar((k == unit) as u8 as f32));
            transform_filter::<Scalar, T>(filter, |e, v| got[e] = v.0);
            for (e, &got) in got.iter().enumerate() {
                let want = g[e / T::PATCH][y] * g[e % T::PATCH][x];
                let error = (got as f64 - want).abs();
                assert!(
                    error <= 4.0 * f32::EPSILON as f64 * want.abs(),
                    "G g G^T of unit {unit} [{e}]: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn the_filter_transforms_are_g() {
        check_filter_transform::<F2x2>(&[[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]]);
        let (sixth, twelfth, twenty_fourth) = (1.0 / 6.0, 1.0 / 12.0, 1.0 / 24.0);
        check_filter_transform::<F4x4>(&[
            [0.25, 0.0, 0.0],
            [-sixth, -sixth, -sixth],
            [-sixth, sixth, -sixth],
            [twenty_fourth, twelfth, sixth],
            [twenty_fourth, -twelfth, sixth],
            [0.0, 0.0, 1.0],
        ]);
    }

    #[test]
    fn runs_cover_a_block_row_by_row() {
        let tiles = Tiles { rows: 4, per_row: 5 };
        let runs: Vec<_> = tiles.runs(3..14).map(|r| (r.row, r.columns, r.slot)).collect();
        assert_eq!(runs, [(0, 3..5, 0), (1, 0..5, 2), (2, 0..4, 7)]);
    }

    #[test]
    fn batches_are_cut_into_equal_parts_shared_evenly() {
        // batch, threads, most: parts.
        for (batch, threads, most, parts) in [
            (64, 2, 7, 4),
            (64, 2, 0, 2),
            (8, 2, 6, 4),
            (16, 1, 0, 1),
            (12, 1, 5, 4),
            (3, 2, 5, 3),
            (6, 4, 1, 6),
            (1, 2, 9, 1),
            (18, 4, 2, 18),
        ] {
            assert_eq!(part_count(batch, threads, most), parts, "batch {batch}, {threads} threads, at most {most}");
        }
    }

    #[test]
    fn channel_tiles_run_group_after_group() {
        // Groups of 10 output channels in tiles of 4: 4, 4 and 2 channels a group.
        let firsts: Vec<_> = (0..=6).map(|p| first_channel(p, 10, 4)).collect();
        assert_eq!(firsts, [0, 4, 8, 10, 14, 18, 20]);
    }

    #[test]
    fn f4x4_runs_deep_products_on_planes_it_fills() {
        // batch, channels, size, the method; padding 1 keeps the size.
        let cases = [
            (64, 32, 28, Method::F4x4),  // 49 tiles a plane
            (16, 32, 20, Method::F2x2),  // 25 tiles, shallow
            (16, 64, 14, Method::F4x4),  // 4 tiles a row, 256 in the batch
            (16, 128, 12, Method::F4x4), // 3 tiles a row, flush with F(2 x 2)'s
            (16, 96, 11, Method::F4x4),
            (16, 128, 10, Method::F2x2), // 3 tiles a row, overhanging
            (16, 64, 12, Method::F2x2),  // 3 tiles a row, not deep enough
            (2, 128, 12, Method::F2x2),  // 18 tiles in the batch
            (1, 512, 14, Method::F2x2),  // 16 tiles in the batch
            (2, 256, 14, Method::F4x4),  // 32 tiles in the batch
            (16, 512, 7, Method::F4x4),  // deep: 2 tiles a row will do
            (1, 256, 7, Method::F2x2),   // 4 tiles in the batch
            (16, 128, 8, Method::F2x2),  // 2 tiles a row, not deep enough
            (16, 16, 56, Method::F2x2),
        ];
        for (batch, channels, size, want) in cases {
            let g = geometry(batch, 1, [channels, channels], (size, size), (1, 1)).expect("a geometry");
            assert_eq!(method(&g), want, "batch {batch}, {channels} channels, {size} x {size}");
        }
    }

    #[test]
    fn pieces_cut_a_block_at_planes() {
        let tiles = Tiles { rows: 2, per_row: 2 };
        let pieces: Vec<_> = tiles.pieces(3..14).map(|p| (p.entry, p.tiles, p.slot)).collect();
        assert_eq!(pieces, [(0, 3..4, 0), (1, 0..4, 1), (2, 0..4, 5), (3, 0..2, 9)]);
        let within: Vec<_> = tiles.pieces(5..7).map(|p| (p.entry, p.tiles, p.slot)).collect();
        assert_eq!(within, [(1, 1..3, 0)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The transposed convolution against its definition, the adjoint of the
        /// convolution (`image[i] += weight[w] * features[o]` for each term), on every ISA
        /// it applies to: paddings 0-2, odd and even sizes, groups, a bias.
        #[test]
        fn winograd_transposed_convolutions_match_their_definition(
            batch in 1usize..4, groups in 1usize..3, cin in 16usize..20, cout in 16usize..22,
            size in (3usize..20, 3usize..20), padding in (0usize..3, 0usize..3), with_bias: bool, salt in 0usize..100,
        ) {
            let Some(g) = geometry(batch, groups, [cin, cout], size, padding) else { return Ok(()) };
            let [oh, ow] = g.out_size;
            let weight = values(g.out_channels * cin * 9, salt);
            let features = values(batch * g.out_channels * oh * ow, salt + 1);
            let bias = with_bias.then(|| values(g.in_channels, salt + 2));
            let plane = size.0 * size.1;
            let want = Reference::new(batch * g.in_channels * plane, plane, bias.as_deref(), |add| {
                for_each_term(&g, |o, i, w| add(i, weight[w] as f64 * features[o] as f64))
            });
            for isa in test_isas().into_iter().filter(|&isa| applies_transposed(isa, &g)) {
                let mut got = vec![f32::NAN; want.sums.len()];
                conv_transpose2d(isa, &g, &features, &weight, bias.as_deref(), &mut got);
                check(isa, &got, &want, g.in_size)?;
                // Both methods, whichever `method` chose above, with blocks across entries
                // (one thread) and, for two threads, either a part for each or an odd
                // batch's channels shared out.
                let conv = transposed_as_convolution(&g).expect("applies");
                let flipped = flipped_filters(&g, &weight);
                for (method, threads) in [(Method::F2x2, 1), (Method::F4x4, 1), (Method::F2x2, 2), (Method::F4x4, 2)] {
                    conv2d_by(method, threads, isa, &conv, &features, &flipped, bias.as_deref(), &mut got);
                    check(isa, &got, &want, g.in_size)?;
                }
            }
        }
    }

    #[test]
    fn winograd_transforms_match_on_tile_rows_narrower_and_wider_than_avx2() {
        // F(4 x 4) on 28 x 28 (7 tiles a row: AVX-512's patch transforms run as AVX2's,
        // `transform_isa`) and on 36 x 36 (9 tiles a row: they do not).
        for size in [28, 36] {
            let g = geometry(2, 1, [32, 32], (size, size), (1, 1)).expect("a Winograd geometry");
            let weight = values(32 * 32 * 9, 3);
            let image = values(2 * 32 * size * size, 4);
            let want = naive(&g, &image, &weight, None);
            for isa in test_isas().into_iter().filter(|&isa| applies(isa, &g)) {
                for threads in [1, 3] {
                    let mut got = vec![f32::NAN; want.sums.len()];
                    conv2d_by(Method::F4x4, threads, isa, &g, &image, &weight, None, &mut got);
                    check(isa, &got, &want, g.out_size).unwrap();
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Against the definition on every ISA it applies to: odd and even sizes (partial
        /// tiles at the right and bottom), paddings 0-3 on each axis (valid, same, full and
        /// wider), several blocks of tiles with runs that start and end inside tile rows
        /// and blocks that go on from one entry's plane into the next (many input
        /// channels make small blocks), groups, with and without a bias, into a NaN-filled
        /// output.
        #[test]
        fn winograd_convolutions_match_their_definition(
            batch in 1usize..4, groups in 1usize..3, cin in prop_oneof![16usize..20, 200usize..260],
            cout in 16usize..30, size in (1usize..24, 1usize..24), padding in (0usize..4, 0usize..4),
            with_bias: bool, salt in 0usize..100,
        ) {
            let Some(g) = geometry(batch, groups, [cin, cout], size, padding) else { return Ok(()) };
            let weight = values(g.out_channels * cin * 9, salt);
            let image = values(batch * g.in_channels * size.0 * size.1, salt + 1);
            let bias = with_bias.then(|| values(g.out_channels, salt + 2));
            let want = naive(&g, &image, &weight, bias.as_deref());
            for isa in test_isas().into_iter().filter(|&isa| applies(isa, &g)) {
                // One part (blocks across entries), and for three threads a part for each
                // entry (batch 3) or each entry's channels shared out (batches 1 and 2).
                for (method, threads) in [(Method::F2x2, 1), (Method::F4x4, 1), (Method::F2x2, 3), (Method::F4x4, 3)] {
                    let mut got = vec![f32::NAN; want.sums.len()];
                    conv2d_by(method, threads, isa, &g, &image, &weight, bias.as_deref(), &mut got);
                    check(isa, &got, &want, g.out_size)?;
                }
            }
        }
    }
}

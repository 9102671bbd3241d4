//! The weight gradient of a 2-d convolution without the im2col matrix, from a
//! zero-padded, channels-last copy of each image.
//!
//! The gradient is `dw[co, ci, tap] = sum over n and feature positions j of
//! dy[n, co, j] * x[n, ci, iy, ix]`, where tap `(ky, kx)` at position `j = (oy, ox)` meets
//! `iy = oy * sy + ky * dy - py`, `ix = ox * sx + kx * dx - px` (zero outside the image).
//! In a copy of image `n` with `py` rows and `px` columns of zeros on every side, stored
//! channels-last (`padded[(y * w' + x) * cin + ci]`, `w' = iw + 2 px`), that value is
//!
//! ```text
//! padded[(base(j) + offset(tap)) * cin + ci],  base(j) = oy * sy * w' + ox * sx,
//!                                               offset(tap) = ky * dy * w' + kx * dx,
//! ```
//!
//! always inside the copy, zero in the padding, and consecutive for consecutive input
//! channels. So for each tap, `dw[.., .., tap]` (`cout x cin`) is `dy_n` (`cout x
//! positions`, read in place) times the matrix whose row `j` is the `cin` values at
//! `base(j) + offset(tap)`: a product whose B rows are whole vector loads from the copy,
//! computed in the unpacked GEMM's register tiles (`gemm_small.rs`), the tiles adding into
//! the gradient entry after entry. Any stride, padding and dilation; the copy is
//! `(ih + 2 py)(iw + 2 px) cin` values per entry where im2col writes
//! `positions * taps * cin` (and a share of the positions copies only the band of rows
//! their taps reach).
//!
//! Input channels come in vectors, so a group needs enough of them ([`applies`]): the
//! first layer of an RGB network (3 channels) keeps im2col, whose products are as deep
//! as `3 * taps` there.
//!
//! Measured at one thread, interleaved with the im2col method in one process (with the
//! first, channel-by-channel copy, which the pixel-by-pixel copy of [`channels_last_rows`]
//! then made 7-14% faster): the issue's layer (batch 64, 32 -> 64 channels, 28 x 28,
//! 3 x 3, padding 1) 19.4 ms against 22.1; 64 -> 64 channels at 14 x 14, 10.8 against
//! 15.3; 128 -> 128 at 14 x 14 (batch 16), 10.1 against 13.0; a 4 x 4 stride-2 layer
//! (32 -> 64, 28 x 28), 11.7 against 16.9; 16 -> 32 at 28 x 28, 5.4 against 7.0. (Zen 4,
//! AVX-512.) Checked again on Zen 3 with AVX2, when the shifted products of the
//! forward still lost to im2col there (`conv_phases::pays_on`):
//! `Tensor::conv2d_weight_grad`, builds with and without this path, best of 15 in a slow
//! phase, one thread: the issue's layer 55.1-57.9 ms against 61.8-63.8, the 4 x 4
//! stride-2 layer 28.7-29.8 against 37.4-38.9; two threads level (27-35 against 35-36,
//! 18-20 against 19.5-20.5). It stays on every ISA.

use super::conv::ConvGeometry;
use super::gemm::{Isa, MatRef};
use super::gemm_small::{Tile, TileColumns, TileStart, balanced_tile_rows, row_tile, tile_rows};
use super::simd::{F32Vector, kernel};
use super::transpose::transpose;
use crate::{buffers, parallel};
use std::ops::Range;

/// The fewest input channels per group this path takes: with 16, an AVX-512 vector (or
/// two AVX2 ones) is full; a group of 24 fills three quarters of two.
const MIN_CHANNELS: usize = 16;

/// Whether [`weight_grad_channels_last`] computes this gradient: at least
/// [`MIN_CHANNELS`] input channels per group, and something to sum.
pub(super) fn applies(g: &ConvGeometry) -> bool {
    g.in_channels / g.groups >= MIN_CHANNELS && g.out_size[0] * g.out_size[1] > 0 && g.out_channels > 0
}

/// The padded, channels-last image's geometry: its row length `w'` and its size in
/// values.
fn padded_size(g: &ConvGeometry) -> (usize, usize) {
    let width = g.in_size[1] + 2 * g.padding[1];
    (width, (g.in_size[0] + 2 * g.padding[0]) * width * (g.in_channels / g.groups))
}

/// Fewest partial sums [`positions_per_sum`] aims for: enough for the threads of a small
/// machine to share a batch of one entry.
const FEWEST_SUMS: usize = 4;

/// Fewest output positions in a partial sum cut out of an entry: the depth of its
/// products.
const FEWEST_POSITIONS: usize = 128;

/// The output positions of each partial sum of [`weight_grad_channels_last`] and of the
/// columns path of `conv::conv2d_weight_grad`, numbered across the batch's planes of
/// `positions` each, of `count` in all: `entries_per_sum` entries' worth, or where that
/// leaves fewer than [`FEWEST_SUMS`] sums (a batch of up to `entries_per_sum` entries was
/// one sum, on one thread), that many sums of whole rows of `row` positions, or as many
/// as have [`FEWEST_POSITIONS`] each. It depends on the geometry only, not on the
/// threads, so neither do the order of the additions and the rounding.
/// (`conv_winograd_grad` cuts its tiles the same way.)
pub(super) fn positions_per_sum(count: usize, [positions, row]: [usize; 2], entries_per_sum: usize) -> usize {
    if count == 0 {
        return 1; // no positions: no sums
    }
    let whole_entries = entries_per_sum.max(1) * positions;
    let sums = FEWEST_SUMS.min(count / FEWEST_POSITIONS).max(1);
    whole_entries.min(count.div_ceil(sums).next_multiple_of(row))
}

/// The entries whose planes (of `positions` each, `positions > 0`) the positions `chunk`
/// (numbered across the batch's planes) reach, each with the positions of its plane that
/// the chunk holds: what one partial sum of [`positions_per_sum`] covers.
pub(super) fn entry_spans(chunk: Range<usize>, positions: usize) -> impl Iterator<Item = (usize, Range<usize>)> {
    (chunk.start / positions..chunk.end.div_ceil(positions)).map(move |n| {
        let plane = n * positions;
        (n, chunk.start.max(plane) - plane..chunk.end.min(plane + positions) - plane)
    })
}

/// Copies the rows `rows` of the channels-last copy of `channels` planes of `[h, w]`
/// values (row-major, one after another) into `out`, whose row 0 is the copy's row
/// `rows.start`. The copy is `width` pixels wide and holds the planes' pixel `(y, x)` at
/// `(top + y, left + x)`, its channel `c` at `(pixel * channels + c)`, and zero wherever
/// no value lands. Every value of `out`'s first `rows.len() * width * channels` is
/// written.
#[allow(clippy::too_many_arguments)]
pub(super) fn channels_last_rows(
    isa: Isa,
    planes: &[f32],
    channels: usize,
    [h, w]: [usize; 2],
    [top, left]: [usize; 2],
    rows: Range<usize>,
    width: usize,
    out: &mut [f32],
) {
    assert!(left + w <= width, "channels_last_rows: the planes do not fit the copy");
    assert_eq!(planes.len(), channels * h * w, "channels_last_rows: planes size");
    let row_values = width * channels;
    for (y, row) in rows.clone().zip(out[..rows.len() * row_values].chunks_exact_mut(row_values)) {
        let Some(iy) = y.checked_sub(top).filter(|&iy| iy < h) else {
            row.fill(0.0);
            continue;
        };
        row[..left * channels].fill(0.0);
        row[(left + w) * channels..].fill(0.0);
        // The image row's `[channels][w]` values, transposed in 8 x 8 blocks. Against the
        // value-by-value copy (each pixel's channels in turn), same-process A/B on a Xeon
        // with AMX, medians of 30, the whole weight gradient of the issue's layer (batch
        // 64, 32 -> 64 channels, 28 x 28) 13.95 -> 12.23 ms at one thread, 7.15 -> 6.32 at
        // two; 16 -> 16 channels 3.06 -> 2.67; 64 -> 64 at 14 x 14 9.07 -> 8.55.
        let source = &planes[iy * w..];
        transpose(isa, source, h * w, &mut row[left * channels..][..w * channels], channels, [channels, w]);
    }
}

/// B for the register tiles of one tap and block of input channels: row `j` is the
/// values at `(base[j] + tap offset) * cin + ci0` onward of the padded copy.
#[derive(Clone, Copy)]
struct ChannelsLast<'a> {
    padded: &'a [f32],
    base: &'a [usize],
    /// `offset(tap) * cin + ci0`.
    start: usize,
    channels: usize,
}

impl<V: F32Vector, const NV: usize> TileColumns<V, NV> for ChannelsLast<'_> {
    #[inline(always)]
    fn for_each_row(self, depth: usize, mut f: impl FnMut(usize, [V; NV])) {
        assert!(depth <= self.base.len(), "weight_grad_channels_last: depth");
        if depth == 0 {
            return;
        }
        // `base` increases with the position, so its last value bounds every read.
        let last = (self.base[depth - 1] * self.channels + self.start) + NV * V::LANES;
        assert!(last <= self.padded.len(), "weight_grad_channels_last: a row reaches past the copy");
        let padded = self.padded.as_ptr();
        for (p, &base) in self.base[..depth].iter().enumerate() {
            let row = base * self.channels + self.start;
            // SAFETY: `row + NV * LANES <= last <= padded.len()` (asserted above, `base`
            // being increasing), so each vector's `LANES` values are inside `padded`.
            f(
                p,
                std::array::from_fn(
                    #[inline(always)]
                    |v| V::load(unsafe { std::slice::from_raw_parts(padded.add(row + v * V::LANES), V::LANES) }),
                ),
            );
        }
    }
}

kernel! {
    /// The weight gradient `[out_channels, in_channels / groups, kh, kw]` (row-major f32)
    /// of a convolution with geometry `g` (one [`applies`] accepts) for `image`
    /// `[batch, in_channels, ih, iw]` and `features` (the output's gradient)
    /// `[batch, out_channels, oh, ow]`, both row-major f32. The batch's output positions
    /// are summed in chunks of [`positions_per_sum`], in order, in parallel; then the
    /// chunks' sums in order (so the rounding does not depend on the number of threads).
    pub(super) fn weight_grad_channels_last(
        g: &ConvGeometry,
        image: &[f32],
        features: &[f32],
        entries_per_sum: usize,
    ) -> Vec<f32> {
        assert!(applies(g), "weight_grad_channels_last: too few input channels per group");
        let (cin_g, cout_g) = (g.in_channels / g.groups, g.out_channels / g.groups);
        let ([kh, kw], positions) = ([g.kernel[0], g.kernel[1]], g.out_size[0] * g.out_size[1]);
        let (taps, plane) = (kh * kw, g.in_size[0] * g.in_size[1]);
        let depth = taps * cin_g;
        assert_eq!(image.len(), g.batch * g.in_channels * plane, "weight_grad_channels_last: image size");
        assert_eq!(features.len(), g.batch * g.out_channels * positions, "weight_grad_channels_last: features size");
        let lanes = V::LANES;
        let block = 2 * lanes;
        let (width, padded_len) = padded_size(g);
        // The padded rows one output row's taps reach.
        let reach = (kh - 1) * g.dilation[0] + 1;
        let base: Vec<usize> = (0..positions)
            .map(|j| (j / g.out_size[1]) * g.stride[0] * width + (j % g.out_size[1]) * g.stride[1])
            .collect();
        let offsets: Vec<usize> =
            (0..taps).map(|tap| (tap / kw) * g.dilation[0] * width + (tap % kw) * g.dilation[1]).collect();
        let step_rows = balanced_tile_rows(cout_g, tile_rows(lanes));
        // Per chunk of positions, the gradient tap-major: `[out_channels, taps, cin_g]`.
        let count = g.batch * positions;
        let per_sum = positions_per_sum(count, [positions, g.out_size[1]], entries_per_sum);
        let sums: Vec<Vec<f32>> = parallel::map(count.div_ceil(per_sum), |chunk| {
            let mut sum = buffers::filled(g.out_channels * depth, 0.0f32);
            // The last block of channels may read one block past the copy's last value.
            let mut padded = buffers::for_overwrite(padded_len + block);
            let chunk = chunk * per_sum..((chunk + 1) * per_sum).min(count);
            for (n, at) in entry_spans(chunk, positions) {
                // The chunk's positions of this plane (their columns of the gradient rows),
                // and the band of the padded image's rows that their taps reach: only
                // that band is copied, so a small batch's chunks do not each pad the
                // whole image. A position's pixel in the band is the pixel of the position
                // as many rows up as the band starts down (`base` grows by `sy` rows of the
                // copy per row of positions).
                let k = at.len();
                let out_rows = at.start / g.out_size[1]..at.end.div_ceil(g.out_size[1]);
                let band = out_rows.start * g.stride[0]..(out_rows.end - 1) * g.stride[0] + reach;
                let base = &base[at.start - out_rows.start * g.out_size[1]..][..k];
                for group in 0..g.groups {
                    let first_plane = n * g.in_channels + group * cin_g;
                    // The copy is exact on any ISA: the best one (the kernel's own is not named here).
                    let planes = &image[first_plane * plane..][..cin_g * plane];
                    let rows = band.clone();
                    channels_last_rows(Isa::best(), planes, cin_g, g.in_size, g.padding, rows, width, &mut padded);
                    let copied = band.len() * width * cin_g;
                    padded[copied..copied + block].fill(0.0);
                    let grads = MatRef {
                        data: features,
                        offset: (n * g.out_channels + group * cout_g) * positions + at.start,
                        row_stride: positions,
                        col_stride: 1,
                    };
                    let sum_g = &mut sum[group * cout_g * depth..][..cout_g * depth];
                    for (tap, &offset) in offsets.iter().enumerate() {
                        for ci0 in (0..cin_g).step_by(block) {
                            let cols = block.min(cin_g - ci0);
                            let start = offset * cin_g + ci0;
                            let rows_of_b = ChannelsLast { padded: &padded, base, start, channels: cin_g };
                            for i0 in (0..cout_g).step_by(step_rows) {
                                let rows = step_rows.min(cout_g - i0);
                                let c = &mut sum_g[i0 * depth + tap * cin_g + ci0..];
                                let tile = Tile { k, b: rows_of_b, cols, c, ldc: depth, start: TileStart::Output };
                                if cols <= lanes {
                                    row_tile::<V, 1, _>(grads, i0, rows, tile);
                                } else {
                                    row_tile::<V, 2, _>(grads, i0, rows, tile);
                                }
                            }
                        }
                    }
                }
            }
            buffers::recycle(padded);
            sum
        });
        let mut total = buffers::filled(g.out_channels * depth, 0.0f32);
        for sum in sums {
            total.iter_mut().zip(&sum).for_each(|(t, &s)| *t += s);
            buffers::recycle(sum);
        }
        // Tap-major back to `[out_channels, cin_g, taps]`.
        let mut dw = buffers::for_overwrite(total.len());
        for (dst, src) in dw.chunks_exact_mut(depth).zip(total.chunks_exact(depth)) {
            for (tap, channels) in src.chunks_exact(cin_g).enumerate() {
                for (ci, &value) in channels.iter().enumerate() {
                    dst[ci * taps + tap] = value;
                }
            }
        }
        buffers::recycle(total);
        dw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Against its definition on every ISA: every value of the copy written (it starts
        /// as NaN), the planes' pixels at their shifted places, zero elsewhere.
        #[test]
        fn channels_last_matches_its_definition(
            channels in 1usize..20, h in 1usize..12, w in 1usize..20,
            margins in (0usize..3, 0usize..3, 0usize..3, 0usize..3), band in (0usize..20, 0usize..20),
        ) {
            let (top, left, bottom, right) = margins;
            let [height, width] = [top + h + bottom, left + w + right];
            let first = band.0 % (height + 1);
            let rows = first..first + band.1 % (height - first + 1);
            let planes: Vec<f32> = (0..channels * h * w).map(|v| v as f32 + 1.0).collect();
            let len = rows.len() * width * channels;
            for isa in crate::cpu::simd::test_isas() {
                let mut out = vec![f32::NAN; len + 3];
                channels_last_rows(isa, &planes, channels, [h, w], [top, left], rows.clone(), width, &mut out);
                for (k, &v) in out[..len].iter().enumerate() {
                    let (pixel, c) = (k / channels, k % channels);
                    let (y, x) = (rows.start + pixel / width, pixel % width);
                    let inside = (top..top + h).contains(&y) && (left..left + w).contains(&x);
                    let want = if inside { planes[(c * h + y - top) * w + x - left] } else { 0.0 };
                    prop_assert_eq!(v, want, "{:?}: pixel ({}, {}) channel {}", isa, y, x, c);
                }
                prop_assert!(out[len..].iter().all(|v| v.is_nan()));
            }
        }
    }
}

//! The implicit GEMM of a stride-1 convolution whose feature rows are as wide as the
//! image's (x padding `dilation * (kernel - 1) / 2`: the "same" 3x3 with padding 1 of
//! most CNN, U-Net and VAE blocks, and every 1x1): the product of the im2col method
//! without the im2col matrix.
//!
//! With stride 1 and feature width = image width `w`, feature position `j = oy * w + ox`
//! and the image position tap `(ky, kx)` meets there,
//! `(oy + ky * dy - py) * w + (ox + kx * dx - px)`, differ by a constant,
//!
//! ```text
//! shift(ky, kx) = (ky * dy - py) * w + kx * dx - px,
//! ```
//!
//! so im2col's row for (input channel `ci`, tap) is image plane `ci` read from `shift`
//! on, except where the tap lands in the padding: above or below the image (the flat
//! index leaves the plane) or left or right of it (it wraps onto the neighbouring row).
//! Whether it does depends only on the tap and the position, so each block of feature
//! positions gets one lane mask per tap and vector (built once per call from
//! `tap_window`), and the GEMM's B vectors are masked loads straight from the image
//! ([`F32Vector::load_masked`]): the lanes in the padding read nothing and give zero.
//!
//! The product is `features (cout x fp) = filters (cout x cin * taps) @ columns`, in the
//! register tiles of the unpacked GEMM (`gemm_small.rs`): for each block of two vectors
//! of positions, every tile of output channels, with the bias as the sums' starting
//! value. The depth runs tap-major (`tap * cin + ci`), so a tap's masks stay in mask
//! registers while its channels go by; the filters are packed once per call to match,
//! each depth step's values for a tile side by side (one cache line for the tile's
//! broadcasts instead of one per channel: 2-3% faster). A block's image lines (the rows
//! around its positions, in every input channel) are read by each tile of output
//! channels in turn from L1, where the im2col method wrote nine copies of the image and
//! read them back.
//!
//! Measured on the issue's layer (batch 64, 32 -> 64 channels, 28 x 28, 3 x 3, padding
//! 1), interleaved in one process at one thread: 18.6-18.9 ms here against 21.6-22.0 ms
//! by im2col (99 against 85 GFLOP/s, the FMA peak 115). Masking the loads costs about
//! 2%, reading the image from L3 rather than L1 about 2.5% (both measured by removing
//! them); prefetching each tile's output lines before its sums gained 5% (measured on
//! the first version, a depth-major kernel: the first store to an output line otherwise
//! waits for it).

use super::conv::{ConvGeometry, tap_window};
use super::gemm::MatRef;
use super::gemm_small::{Tile, TileColumns, TileStart, balanced_tile_rows, row_tile, tile_rows};
use super::simd::{F32Vector, kernel};
use crate::parallel;

/// The most filter values (`out_channels / groups` times the depth) this path takes:
/// each block of positions streams all of them, which pays while they stay in L2, as
/// for the unpacked GEMM (`gemm_small::UNPACKED_MAX_A`). Larger layers take im2col and
/// the packed GEMM.
const MAX_FILTER_VALUES: usize = 1 << 19;

/// Whether [`conv2d_shifted`] computes this convolution: stride 1, feature rows as wide
/// as the image's, and filters small enough (see [`MAX_FILTER_VALUES`]).
pub(super) fn applies(g: &ConvGeometry) -> bool {
    let depth = g.in_channels / g.groups * g.kernel[0] * g.kernel[1];
    let filters = g.out_channels / g.groups * depth;
    g.stride == [1, 1]
        && g.out_size[1] == g.in_size[1]
        && depth > 0
        && filters <= MAX_FILTER_VALUES
        && g.in_size[0] * g.in_size[1] < isize::MAX as usize / 4
}

/// The transposed convolution of geometry `g` as a convolution [`conv2d_shifted`]
/// computes, when it is one: with stride 1, image position `iy` receives from feature
/// position `oy = iy - ky * dy + py`, which is tap `kh - 1 - ky` of a convolution of the
/// features with padding `dy * (kh - 1) - py` (and likewise along x). Returns that
/// forward geometry (features in, image out) and its weight: the filters flipped and the
/// channels of each group swapped, `[in_channels, out_channels / groups, kh, kw]` from
/// `g`'s `[out_channels, in_channels / groups, kh, kw]`. `None` when the stride is not 1,
/// the padding exceeds the kernel's reach, or the result is not a shifted convolution.
pub(super) fn as_convolution(g: &ConvGeometry, weight: &[f32]) -> Option<(ConvGeometry, Vec<f32>)> {
    let reach = |axis: usize| g.dilation[axis] * (g.kernel[axis] - 1);
    let padding = [reach(0).checked_sub(g.padding[0])?, reach(1).checked_sub(g.padding[1])?];
    let forward = ConvGeometry {
        in_channels: g.out_channels,
        in_size: g.out_size,
        out_channels: g.in_channels,
        out_size: g.in_size,
        padding,
        ..*g
    };
    if g.stride != [1, 1] || !applies(&forward) {
        return None;
    }
    let (cin_g, cout_g, taps) = (g.in_channels / g.groups, g.out_channels / g.groups, g.kernel[0] * g.kernel[1]);
    let mut flipped = crate::buffers::for_overwrite(weight.len());
    for group in 0..g.groups {
        for co in 0..cout_g {
            for ci in 0..cin_g {
                let src = &weight[((group * cout_g + co) * cin_g + ci) * taps..][..taps];
                let dst = &mut flipped[((group * cin_g + ci) * cout_g + co) * taps..][..taps];
                dst.iter_mut().zip(src.iter().rev()).for_each(|(d, &s)| *d = s);
            }
        }
    }
    Some((forward, flipped))
}

/// How far tap `(ky, kx)` reads from the position it serves, in the flat plane:
/// `shift = (ky * dy - py) * w + kx * dx - px`.
fn tap_shifts(g: &ConvGeometry) -> Vec<isize> {
    let [kh, kw] = g.kernel;
    let w = g.in_size[1] as isize;
    let along = |k: usize, dilation: usize, padding: usize| (k * dilation) as isize - padding as isize;
    (0..kh * kw)
        .map(|tap| along(tap / kw, g.dilation[0], g.padding[0]) * w + along(tap % kw, g.dilation[1], g.padding[1]))
        .collect()
}

/// The bits of the positions `j0..j0 + lanes` (`lanes <= 32`) at which tap `(ky, kx)`
/// lands inside the image: bit `l` for position `j0 + l`, none past the last position.
fn tap_bits(g: &ConvGeometry, ky: usize, kx: usize, j0: usize, lanes: usize) -> u32 {
    let (rows, cols) = tap_window(g, ky, kx);
    let (w, positions) = (g.out_size[1], g.out_size[0] * g.out_size[1]);
    (0..lanes)
        .filter(|l| {
            let j = j0 + l;
            j < positions && rows.contains(&(j / w)) && cols.contains(&(j % w))
        })
        .fold(0, |bits, l| bits | 1 << l)
}

/// The group's filters `[cout_g, cin_g, taps]` packed for the register tiles: the
/// depth tap-major (step `tap * cin_g + ci`, the order of [`ShiftedImage`]), and the rows
/// of each tile (`tile_rows` channels from `i0`, the last tile fewer) side by side, so
/// that a depth step's values for the tile are consecutive: the tile at `i0` is
/// `depth * rows` values from `i0 * depth`, value `p * rows + r` the filter of channel
/// `i0 + r` at step `p`.
fn pack_filters(filters: &[f32], cin_g: usize, taps: usize, tile_rows: usize) -> Vec<f32> {
    let depth = cin_g * taps;
    let cout_g = filters.len() / depth;
    let mut packed = crate::buffers::for_overwrite(filters.len());
    for i0 in (0..cout_g).step_by(tile_rows) {
        let rows = tile_rows.min(cout_g - i0);
        let tile = &mut packed[i0 * depth..][..rows * depth];
        for (r, channel) in filters[i0 * depth..][..rows * depth].chunks_exact(depth).enumerate() {
            for (ci, taps_of_ci) in channel.chunks_exact(taps).enumerate() {
                for (tap, &value) in taps_of_ci.iter().enumerate() {
                    tile[(tap * cin_g + ci) * rows + r] = value;
                }
            }
        }
    }
    packed
}

/// B for the register tiles of one block of positions, in tap-major depth order (depth
/// step `tap * cin_g + ci`): the group's `cin_g` planes (`plane` values apart), the
/// taps' shifts, and the block's masks (`[tap][vector]`), from position `j0`. Each tap's
/// masks stay in registers while its channels go by.
#[derive(Clone, Copy)]
struct ShiftedImage<'a, M> {
    planes: &'a [f32],
    plane: usize,
    channels: usize,
    j0: usize,
    shifts: &'a [isize],
    masks: &'a [[M; 2]],
}

impl<V: F32Vector, const NV: usize> TileColumns<V, NV> for ShiftedImage<'_, V::Mask> {
    #[inline(always)]
    fn for_each_row(&self, depth: usize, mut f: impl FnMut(usize, [V; NV])) {
        assert_eq!(depth, self.shifts.len() * self.channels, "conv2d_shifted: depth");
        assert!(self.planes.len() >= self.channels * self.plane, "conv2d_shifted: planes");
        let mut p = 0;
        for (&shift, masks) in self.shifts.iter().zip(self.masks) {
            let mut start = self.planes.as_ptr().wrapping_offset(shift + self.j0 as isize);
            for _ in 0..self.channels {
                // SAFETY: a lane of vector `v` is set in the tap's mask only when its
                // position `j = j0 + v * LANES + l` is a feature position at which the tap
                // lands inside the image (`tap_bits`), i.e. `0 <= j + shift < plane`; the
                // lane then reads `planes[ci * plane + j + shift]`, inside plane `ci` of
                // the `channels` that `planes` holds (asserted above).
                f(p, std::array::from_fn(|v| unsafe { V::load_masked(start.wrapping_add(v * V::LANES), masks[v]) }));
                start = start.wrapping_add(self.plane);
                p += 1;
            }
        }
    }
}

/// Asks for the cache line of `value` ahead of a store to it: the first write of an
/// output line that is not in cache otherwise stalls the tile's last step. (A prefetch
/// never faults; nothing is done off x86-64.)
#[inline(always)]
fn prefetch(value: &f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint: it never faults and changes no memory.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>((value as *const f32).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

kernel! {
    /// The convolution `out[n, co, j] = bias[co] + sum over ci, tap of
    /// weight[co, ci, tap] * image[n, ci, j + shift(tap)]` (where the tap lands inside
    /// the image) for a geometry [`applies`] accepts, batch entries in parallel.
    /// `image` is `[batch, in_channels, plane]`, `weight` `[out_channels, depth]`,
    /// `bias` `[out_channels]` and `out` `[batch, out_channels, plane]`, all row-major
    /// f32; every element of `out` is written.
    pub(super) fn conv2d_shifted(
        g: &ConvGeometry,
        image: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        assert!(applies(g), "conv2d_shifted: the geometry needs stride 1 and same-width rows");
        let (cin_g, cout_g) = (g.in_channels / g.groups, g.out_channels / g.groups);
        let (taps, plane) = (g.kernel[0] * g.kernel[1], g.in_size[0] * g.in_size[1]);
        let (depth, positions) = (cin_g * taps, g.out_size[0] * g.out_size[1]);
        assert_eq!(image.len(), g.batch * g.in_channels * plane, "conv2d_shifted: image size");
        assert_eq!(weight.len(), g.out_channels * depth, "conv2d_shifted: weight size");
        assert_eq!(out.len(), g.batch * g.out_channels * positions, "conv2d_shifted: output size");
        if let Some(bias) = bias {
            assert_eq!(bias.len(), g.out_channels, "conv2d_shifted: bias size");
        }
        let lanes = V::LANES;
        let block = 2 * lanes;
        // Per block of positions, per tap: the masks of its two vectors.
        let masks: Vec<[<V as F32Vector>::Mask; 2]> = (0..positions.div_ceil(block))
            .flat_map(|b| (0..taps).map(move |tap| (b * block, tap)))
            .map(|(j0, tap)| {
                let bits = tap_bits(g, tap / g.kernel[1], tap % g.kernel[1], j0, block);
                [V::mask_from_bits(bits), V::mask_from_bits(bits >> lanes)]
            })
            .collect();
        let shifts = tap_shifts(g);
        let step_rows = balanced_tile_rows(cout_g, tile_rows(lanes));
        let filters: Vec<Vec<f32>> =
            (0..g.groups).map(|group| pack_filters(&weight[group * cout_g * depth..][..cout_g * depth], cin_g, taps, step_rows)).collect();
        parallel::for_each_entry(out, g.out_channels * positions, |n, out_n| {
            for (group, filters) in filters.iter().enumerate() {
                let first_plane = n * g.in_channels + group * cin_g;
                let planes = &image[first_plane * plane..(first_plane + cin_g) * plane];
                let out_g = &mut out_n[group * cout_g * positions..][..cout_g * positions];
                for (b, j0) in (0..positions).step_by(block).enumerate() {
                    let cols = block.min(positions - j0);
                    let masks = &masks[b * taps..][..taps];
                    let columns = ShiftedImage { planes, plane, channels: cin_g, j0, shifts: &shifts, masks };
                    for i0 in (0..cout_g).step_by(step_rows) {
                        let rows = step_rows.min(cout_g - i0);
                        for r in i0..i0 + rows {
                            prefetch(&out_g[r * positions + j0]);
                            prefetch(&out_g[r * positions + j0 + cols - 1]);
                        }
                        let start = bias.map_or(TileStart::Zero, |bias| TileStart::RowValues(&bias[group * cout_g + i0..][..rows]));
                        let c = &mut out_g[i0 * positions + j0..];
                        let tile = Tile { k: depth, b: columns, cols, c, ldc: positions, start };
                        let filters = MatRef { data: &filters[i0 * depth..][..rows * depth], offset: 0, row_stride: 1, col_stride: rows };
                        if cols <= lanes {
                            row_tile::<V, 1, _>(filters, 0, rows, tile);
                        } else {
                            row_tile::<V, 2, _>(filters, 0, rows, tile);
                        }
                    }
                }
            }
        });
        filters.into_iter().for_each(crate::buffers::recycle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::conv::tests::for_each_term;
    use crate::cpu::simd::Isa;
    use proptest::prelude::*;

    /// `planes` planes of `plane` values each, every value of plane `c` the bias of
    /// channel `c % channels` (or 0), in f64: where the definitions' sums start.
    fn from_bias(bias: Option<&[f32]>, planes: usize, channels: usize, plane: usize) -> Vec<f64> {
        (0..planes * plane).map(|i| bias.map_or(0.0, |b| b[i / plane % channels] as f64)).collect()
    }

    /// The convolution by its definition, in f64.
    fn naive(g: &ConvGeometry, image: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f64> {
        let plane = g.out_size[0] * g.out_size[1];
        let mut out = from_bias(bias, g.batch * g.out_channels, g.out_channels, plane);
        for_each_term(g, |o, i, w| out[o] += weight[w] as f64 * image[i] as f64);
        out
    }

    /// The transposed convolution by its definition (each feature value scattered through
    /// the filters onto the image), in f64.
    fn naive_transposed(g: &ConvGeometry, features: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f64> {
        let plane = g.in_size[0] * g.in_size[1];
        let mut image = from_bias(bias, g.batch * g.in_channels, g.in_channels, plane);
        for_each_term(g, |o, i, w| image[i] += weight[w] as f64 * features[o] as f64);
        image
    }

    /// Runs [`conv2d_shifted`] with every available ISA into a NaN-filled output and
    /// compares it with `want`.
    fn check_every_isa(
        g: &ConvGeometry,
        input: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        want: &[f64],
    ) -> Result<(), TestCaseError> {
        for isa in Isa::ALL.into_iter().filter(|isa| isa.is_available()) {
            let mut out = vec![f32::NAN; want.len()];
            conv2d_shifted(isa, g, input, weight, bias, &mut out);
            for (i, (&got, &want)) in out.iter().zip(want).enumerate() {
                prop_assert!(
                    (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{:?} [{}]: {} vs {}",
                    isa,
                    i,
                    got,
                    want
                );
            }
        }
        Ok(())
    }

    /// A stride-1 geometry with feature rows as wide as the image's: x padding
    /// `dilation * (kernel - 1) / 2` (`None` when that is not whole), any y padding.
    #[allow(clippy::too_many_arguments)] // the proptest's parameters, as they come
    fn same_width(
        batch: usize,
        groups: usize,
        (cin, cout): (usize, usize),
        (h, w): (usize, usize),
        (kh, kw): (usize, usize),
        (dy, dx): (usize, usize),
        py: usize,
    ) -> Option<ConvGeometry> {
        let reach_x = dx * (kw - 1);
        let oh = (h + 2 * py).checked_sub(dy * (kh - 1))?;
        (reach_x % 2 == 0 && oh > 0).then_some(ConvGeometry {
            batch,
            in_channels: cin * groups,
            in_size: [h, w],
            out_channels: cout * groups,
            out_size: [oh, w],
            kernel: [kh, kw],
            stride: [1, 1],
            padding: [py, reach_x / 2],
            dilation: [dy, dx],
            groups,
        })
    }

    fn values(len: usize, salt: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + salt * 104729) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Every ISA against the definitions, on geometries that span several blocks of
        /// positions and tiles of output channels (the right edge, partial tiles, taps in
        /// the padding on every side), writing every output value (the buffers start as
        /// NaN): the convolution, and the transposed convolution through
        /// [`as_convolution`] (y padding up to the kernel's reach, and beyond it, where it
        /// is refused).
        #[test]
        fn shifted_convolutions_match_their_definitions_on_every_isa(
            batch in 1usize..3, groups in 1usize..3, channels in (1usize..6, 1usize..30),
            size in (1usize..12, 1usize..40), kernel in (1usize..6, 1usize..6), dilation in (1usize..3, 1usize..3),
            py in 0usize..4, with_bias: bool, salt in 0usize..100,
        ) {
            let Some(g) = same_width(batch, groups, channels, size, kernel, dilation, py) else { return Ok(()) };
            prop_assert!(applies(&g));
            let weight = values(g.out_channels * channels.0 * kernel.0 * kernel.1, salt);
            let image = values(batch * g.in_channels * size.0 * size.1, salt + 1);
            let bias = with_bias.then(|| values(g.out_channels, salt + 2));
            let want = naive(&g, &image, &weight, bias.as_deref());
            check_every_isa(&g, &image, &weight, bias.as_deref(), &want)?;

            let features = values(batch * g.out_channels * g.out_size[0] * g.out_size[1], salt + 3);
            let bias = with_bias.then(|| values(g.in_channels, salt + 4));
            let Some((forward, flipped)) = as_convolution(&g, &weight) else {
                prop_assert!(py > dilation.0 * (kernel.0 - 1), "refused with y padding {}", py);
                return Ok(());
            };
            let want = naive_transposed(&g, &features, &weight, bias.as_deref());
            check_every_isa(&forward, &features, &flipped, bias.as_deref(), &want)?;
        }
    }

    #[test]
    fn applies_only_to_stride_one_with_rows_as_wide_as_the_image() {
        let g = same_width(2, 1, (3, 4), (8, 8), (3, 3), (1, 1), 1).expect("a 3x3 same convolution");
        assert!(applies(&g));
        assert!(!applies(&ConvGeometry { stride: [1, 2], out_size: [8, 4], ..g }));
        assert!(!applies(&ConvGeometry { stride: [2, 1], out_size: [4, 8], ..g }));
        assert!(!applies(&ConvGeometry { padding: [1, 0], out_size: [8, 6], ..g }));
        // Taller or shorter outputs are fine: only the rows' width matters.
        assert!(applies(&ConvGeometry { padding: [0, 1], out_size: [6, 8], ..g }));
        // Filters too large to stream from L2 take im2col and the packed GEMM.
        assert!(!applies(&ConvGeometry { in_channels: 512, out_channels: 512, ..g }));
    }
}

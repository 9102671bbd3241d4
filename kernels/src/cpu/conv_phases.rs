//! Convolutions and transposed convolutions of any stride as shifted products
//! (`conv_shifted.rs`): the strided side is split into phases.
//!
//! Along an axis of stride `s`, tap `k` (dilation `d`, padding `p`) of a convolution
//! meets image position
//!
//! ```text
//! i = o * s + k * d - p = s * (o + q) + r,   q = floor((k * d - p) / s),  r = (k * d - p) mod s,
//! ```
//!
//! so it reads phase `r` of the image (the positions `r, r + s, r + 2s, ..`) at index
//! `o + q`: a stride-1 read shifted by `q`. In two dimensions, with phase planes as wide
//! as the feature rows (`wo`), that is the shifted product's read at offset
//! `q_y * wo + q_x` in phase `(r_y, r_x)`.
//!
//! - **Convolution**: the image is copied into its `s_y * s_x` phase planes (zero where a
//!   phase is shorter than the others), and the features are one shifted product over
//!   all taps, each reading its own phase. A stride-1 convolution whose feature rows are
//!   as wide as the image's ("same" padding: the 3 x 3 with padding 1 of most CNN, U-Net
//!   and VAE blocks, every 1 x 1) reads the image itself.
//! - **Transposed convolution**: image phase `r` receives only from the taps of
//!   remainder `r`, feature `o` landing at phase index `o + q`, so each phase plane is a
//!   shifted product of the features over those taps at offset `-(q_y * wf + q_x)`,
//!   computed in rows as wide as the feature rows (`wf`) and then interleaved into the
//!   image (written in place at stride 1 with equal widths). This is the sub-pixel view of
//!   a strided transposed convolution: a 4 x 4, stride-2 one is four 2 x 2 stride-1
//!   convolutions, with no multiplications by the zeros that im2col's col2im would
//!   scatter and no columns matrix.
//!
//! Both need every phase's columns to fit in the feature rows: `ceil(w / s_x) <= wf`,
//! true for "same" and "half" layers (3 x 3 or 4 x 4 with padding 1 at stride 2, 1 x 1
//! downsampling). Where the features are narrower (a "valid" convolution: 26 features
//! per row of 28 pixels for a 3 x 3 kernel), both run on rows widened to
//! `ceil(w / s_x)` ([`widened`]): the extra features meet only padding on the right; the
//! convolution computes them masked like it and drops them when it copies its rows out,
//! and the transposed convolution reads its features zero-padded to that width. Widening
//! the valid 3 x 3 layer of the issue's shape (batch 64, 32 -> 64 channels, 28 x 28)
//! took its forward from im2col's 27.0-28.8 ms to 20.3-20.7 at one thread and 18.7-20.6
//! to 10.8-11.1 at two (`bench_kernels conv`, alternating builds; PyTorch 20.7 and 11.5
//! in the same hour); the transposed convolutions of valid layers ran 7-19% faster than
//! by im2col (same-process A/B, one and two threads: 3 x 3 of 26 x 26 features 24.0 ->
//! 22.2 ms and 12.3 -> 11.1, 5 x 5 32 -> 16 channels 22.8 -> 19.5 and 11.9 -> 9.6, 3 x 3
//! stride 2 8.3 -> 7.1 and 4.1 -> 3.5). It pays even where half the widened row is
//! thrown away: valid convolutions of small maps (batch 64, 32 or 64 channels in and
//! out), same-process A/B, ms, widened against im2col at one thread: 5 x 5 of 12 x 12
//! 11.1 against 13.8, of 14 x 14 16.4 against 21.5, of 8 x 8 (4 features of 8) 7.9
//! against 12.3, 3 x 3 of 6 x 6 2.5 against 4.4 (two threads: 6.4 / 7.6, 9.2 / 11.6,
//! 3.3 / 5.4, 1.05 / 1.71).

use super::conv::{ConvGeometry, tap_window};
use super::conv_shifted::{ShiftedProduct, Tap, shifted_product};
use super::gemm::Isa;
use crate::{buffers, parallel};
use std::ops::Range;

/// The most filter values (`out_channels / groups` times the depth) this path takes:
/// each block of positions streams all of them, which pays while they stay in L2, as
/// for the unpacked GEMM (`gemm_small::UNPACKED_MAX_A`). Larger layers take im2col and
/// the packed GEMM.
const MAX_FILTER_VALUES: usize = 1 << 19;

/// How many of the positions `0..len` lie in phase `r` of stride `s`: `r, r + s, ..`.
fn phase_len(len: usize, s: usize, r: usize) -> usize {
    (len + s - 1 - r) / s
}

/// `(q, r)` with `k * d - p = s * q + r`, `0 <= r < s`: the phase a tap reads along one
/// axis and its shift within it.
fn tap_phase(k: usize, d: usize, p: usize, s: usize) -> (isize, usize) {
    let at = (k * d) as isize - p as isize;
    (at.div_euclid(s as isize), at.rem_euclid(s as isize) as usize)
}

/// Whether there is a product to compute with filters small enough (see
/// [`MAX_FILTER_VALUES`]), and the sizes are sane for the products' signed offsets.
fn products_fit(g: &ConvGeometry) -> bool {
    let depth = g.in_channels / g.groups * g.kernel[0] * g.kernel[1];
    let wide = widened(g);
    let values =
        [g.in_channels.max(g.out_channels), g.in_size[0].max(g.out_size[0]), g.in_size[1].max(wide.out_size[1])]
            .into_iter()
            .fold(g.batch, usize::saturating_mul);
    depth > 0
        && g.out_channels > 0
        && g.out_channels / g.groups * depth <= MAX_FILTER_VALUES
        && values < isize::MAX as usize / 4
}

/// `g` with feature rows widened to hold the image's phase planes (`g` itself when they
/// do). The extra features at the right of each row meet the image only through taps
/// past its right edge: the convolution computes them masked like padding and throws
/// them away (a "valid" 3 x 3 convolution of 28 x 28 images computes 26 rows of 28
/// features, 8% more sums than it keeps); the transposed convolution reads them as zeros.
fn widened(g: &ConvGeometry) -> ConvGeometry {
    let width = g.out_size[1].max(g.in_size[1].div_ceil(g.stride[1]));
    ConvGeometry { out_size: [g.out_size[0], width], ..*g }
}

/// Whether the shifted products are the faster method with this ISA's kernels for
/// products of `rows` rows (the output channels per group of a convolution, the input
/// channels per group of a transposed one): always with AVX-512, each tile loading its
/// columns masked (the masks in mask registers), and with AVX2 from
/// [`MIN_STAGED_ROWS`] rows, each block's columns staged once for all its tiles
/// (`conv_shifted::stages_columns`; before staging, the AVX2 products ran at half
/// im2col's speed). Measured on Zen 3 (AVX2, slow phase), `bench_kernels quick conv`,
/// two runs of each build alternated, ms by im2col -> by staged products: the issue's
/// convolution 64.1-90.8 -> 55.7-63.1 at one thread (candle 144-213 in the same runs) and
/// 33.9-35.8 -> 28.6-29.0 at two (candle 80-108); its valid form 54.3-63.2 -> 51.6-55.9
/// and 30.6-31.0 -> 28.4-31.5; the issue's transposed convolution 35.3-35.4 -> 30.2-33.1
/// and 18.3-20.9 -> 15.1-15.7; forward and backward together 206.8-223.8 -> 185.6-202.8,
/// 125.4-130.4 -> 103.7-110.3, 176.3-179.8 -> 166.1-184.0, 93.2-106.5 -> 94.6-95.4,
/// 106.1-114.2 -> 87.6-94.9, 55.9-59.3 -> 49.1-52.2. The portable and NEON vectors of
/// `Isa::Scalar` take im2col (staging is not measured with them).
pub(super) fn pays_on(isa: Isa, rows: usize) -> bool {
    match isa {
        Isa::Avx512 => true,
        Isa::Avx2Fma => rows >= MIN_STAGED_ROWS,
        Isa::Scalar => false,
    }
}

/// The fewest rows (see [`pays_on`]) for which the staged products beat im2col: its
/// GEMM has `taps` times as many rows, and fills its register tiles where a product of
/// a few rows cannot. Measured on Zen 3 at one thread, the min of 5 alternated runs of
/// each build, staged against im2col, ms: products of 32 rows or more were level or
/// faster on every layer tried (batch 16-64; 3 x 3 at 14 x 14 128 -> 128 channels 29.1
/// against 42.3, transposed 28.4 / 32.8; 3 x 3 at 7 x 7 256 -> 256 46.7 / 46.9, 43.9 / 44.6; 1 x 1
/// 64 -> 128 15.3 / 16.3, 14.2 / 16.5; 3 x 3 stride 2 30.3 / 36.7, 30.2 / 38.1; 4 x 4
/// stride 2 18.3 / 23.8, 19.5 / 23.5; 3 x 3 3 -> 32 channels at 64 x 64 4.9 / 7.1), and
/// the two with fewer lost: the transposed 5 x 5 valid layer 32 -> 16 channels 17.7 /
/// 14.2, the transposed RGB layer (32 -> 3, a generator's last) 8.7 / 7.4.
const MIN_STAGED_ROWS: usize = 32;

/// Whether [`conv2d`] can compute this convolution (see the module doc).
pub(super) fn applies(g: &ConvGeometry) -> bool {
    products_fit(g) && g.out_size[0] * g.out_size[1] > 0
}

/// Whether [`conv_transpose2d`] can compute this transposed convolution (see the module
/// doc).
pub(super) fn applies_transposed(g: &ConvGeometry) -> bool {
    products_fit(g) && g.in_size[0] * g.in_size[1] > 0
}

/// Whether the convolution reads the image itself: stride 1 and feature rows as wide.
fn reads_in_place(g: &ConvGeometry) -> bool {
    g.stride == [1, 1] && g.out_size[1] == g.in_size[1]
}

/// The phase planes' rows and the values of one (`rows * out_size[1]`).
fn phase_plane(g: &ConvGeometry) -> (usize, usize) {
    let rows = g.in_size[0].div_ceil(g.stride[0]);
    (rows, rows * g.out_size[1])
}

/// Copies the `cin_g` planes of one group of an image into its phase planes,
/// `[phase (r_y * s_x + r_x)][channel][phase_plane]` with rows `out_size[1]` long, zero
/// past each phase's end. Writes every value of its first `s_y * s_x * cin_g * plane`.
fn split_phases(g: &ConvGeometry, planes: &[f32], phases: &mut [f32]) {
    let ([h, w], [sy, sx]) = (g.in_size, g.stride);
    let (rows, plane) = phase_plane(g);
    let width = g.out_size[1];
    let cin_g = g.in_channels / g.groups;
    let mut dst = phases.chunks_exact_mut(plane);
    for (ry, rx) in (0..sy).flat_map(|ry| (0..sx).map(move |rx| (ry, rx))) {
        let (phase_rows, phase_cols) = (phase_len(h, sy, ry), phase_len(w, sx, rx));
        for source in planes.chunks_exact(h * w).take(cin_g) {
            let dst = dst.next().expect("split_phases: room for every phase plane");
            for (m, row) in dst.chunks_exact_mut(width).enumerate().take(rows) {
                if m >= phase_rows || phase_cols == 0 {
                    row.fill(0.0);
                    continue;
                }
                let source_row = &source[(sy * m + ry) * w + rx..];
                row.iter_mut().zip(source_row.iter().step_by(sx)).take(phase_cols).for_each(|(d, &s)| *d = s);
                row[phase_cols..].fill(0.0);
            }
        }
    }
}

/// The features `out = conv(image, weight) + bias` for a geometry [`applies`] accepts:
/// `image` `[batch, in_channels, in_size..]`, `weight` `[out_channels, in_channels /
/// groups, kernel..]`, `bias` `[out_channels]` and `out` `[batch, out_channels,
/// out_size..]`, all row-major f32. Every element of `out` is written.
pub(super) fn conv2d(isa: Isa, g: &ConvGeometry, image: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    assert!(applies(g), "conv_phases::conv2d: no product to compute, or filters too large for it");
    let (cin_g, cout_g) = (g.in_channels / g.groups, g.out_channels / g.groups);
    let ([kh, kw], taps) = (g.kernel, g.kernel[0] * g.kernel[1]);
    let (in_plane, positions) = (g.in_size[0] * g.in_size[1], g.out_size[0] * g.out_size[1]);
    assert_eq!(image.len(), g.batch * g.in_channels * in_plane, "conv2d: image size");
    assert_eq!(weight.len(), g.out_channels * cin_g * taps, "conv2d: weight size");
    assert_eq!(out.len(), g.batch * g.out_channels * positions, "conv2d: output size");
    // The products run on feature rows wide enough for the phase planes.
    let wide = widened(g);
    let wide_positions = wide.out_size[0] * wide.out_size[1];
    let in_place = reads_in_place(&wide);
    let (channel_stride, phase_stride) = if in_place {
        (in_plane, 0)
    } else {
        let plane = phase_plane(&wide).1;
        (plane, cin_g * plane)
    };
    let width = wide.out_size[1] as isize;
    let taps_of: Vec<Tap> = (0..taps)
        .map(|t| {
            let (ky, kx) = (t / kw, t % kw);
            let (qy, ry) = tap_phase(ky, g.dilation[0], g.padding[0], g.stride[0]);
            let (qx, rx) = tap_phase(kx, g.dilation[1], g.padding[1], g.stride[1]);
            let (rows, cols) = tap_window(&wide, ky, kx);
            let offset = ((ry * g.stride[1] + rx) * phase_stride) as isize + qy * width + qx;
            Tap { offset, rows, cols }
        })
        .collect();
    debug_assert_eq!(kh * kw, taps_of.len());
    let products: Vec<ShiftedProduct> = (0..g.groups)
        .map(|group| {
            let filters = &weight[group * cout_g * cin_g * taps..][..cout_g * cin_g * taps];
            let filter = |co: usize, t: usize, c: usize| filters[(co * cin_g + c) * taps + t];
            ShiftedProduct::new(isa, cout_g, (cin_g, channel_stride), wide.out_size, &taps_of, filter)
        })
        .collect();
    parallel::for_each_entry(out, g.out_channels * positions, |n, out_n| {
        let mut phases =
            (!in_place).then(|| buffers::for_overwrite(g.stride[0] * g.stride[1] * cin_g * channel_stride));
        // Widened rows are computed into scratch, one group's planes at a time, and
        // their first `out_size[1]` features kept.
        let mut wide_out = (wide_positions != positions).then(|| buffers::for_overwrite(cout_g * wide_positions));
        for (group, product) in products.iter().enumerate() {
            let image_g = &image[(n * g.in_channels + group * cin_g) * in_plane..][..cin_g * in_plane];
            let planes = match &mut phases {
                Some(phases) => {
                    split_phases(&wide, image_g, phases);
                    &phases[..]
                }
                None => image_g,
            };
            let bias = bias.map(|bias| &bias[group * cout_g..][..cout_g]);
            let out_g = &mut out_n[group * cout_g * positions..][..cout_g * positions];
            match &mut wide_out {
                None => shifted_product(isa, product, planes, bias, out_g),
                Some(wide_out) => {
                    shifted_product(isa, product, planes, bias, wide_out);
                    let (kept, wide_row) = (g.out_size[1], wide.out_size[1]);
                    for (row, wide_row) in out_g.chunks_exact_mut(kept).zip(wide_out.chunks_exact(wide_row)) {
                        row.copy_from_slice(&wide_row[..kept]);
                    }
                }
            }
        }
        for buffer in [phases, wide_out].into_iter().flatten() {
            buffers::recycle(buffer);
        }
    });
}

/// The rows of phase index `m` (or columns) at which a tap of shift `q` receives from
/// features `0..features`: `0 <= m - q < features`, within the phase's `len`.
fn receiving(q: isize, features: usize, len: usize) -> Range<usize> {
    let start = q.max(0) as usize;
    let end = (q + features as isize).clamp(0, len as isize) as usize;
    start.min(end)..end
}

/// The transposed convolution of [`conv2d`]'s geometry `g`: `out = conv^T(features,
/// weight) + bias` for a geometry [`applies_transposed`] accepts: `features`
/// `[batch, out_channels, out_size..]`, `weight` `[out_channels, in_channels / groups,
/// kernel..]`, `bias` `[in_channels]` and `out` `[batch, in_channels, in_size..]`, all
/// row-major f32. Every element of `out` is written.
pub(super) fn conv_transpose2d(
    isa: Isa,
    g: &ConvGeometry,
    features: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!(applies_transposed(g), "conv_phases::conv_transpose2d: no product to compute, or filters too large for it");
    let (cin_g, cout_g) = (g.in_channels / g.groups, g.out_channels / g.groups);
    assert_eq!(
        features.len(),
        g.batch * g.out_channels * g.out_size[0] * g.out_size[1],
        "conv_transpose2d: features size"
    );
    // Feature rows narrower than the phase planes are read zero-padded to their width
    // (the extra features add nothing): one batch entry at a time, into scratch.
    let narrow_width = g.out_size[1];
    let g = &widened(g);
    let ([h, w], [hf, wf], [sy, sx]) = (g.in_size, g.out_size, g.stride);
    let (kw, taps) = (g.kernel[1], g.kernel[0] * g.kernel[1]);
    let (image_plane, feature_plane) = (h * w, hf * wf);
    assert_eq!(weight.len(), g.out_channels * cin_g * taps, "conv_transpose2d: weight size");
    assert_eq!(out.len(), g.batch * g.in_channels * image_plane, "conv_transpose2d: output size");
    // Per phase `(r_y, r_x)` that holds image positions: its columns, and per group its
    // product.
    let phases: Vec<(usize, usize, usize, Vec<ShiftedProduct>)> = (0..sy)
        .flat_map(|ry| (0..sx).map(move |rx| (ry, rx)))
        .filter(|&(ry, rx)| phase_len(h, sy, ry) > 0 && phase_len(w, sx, rx) > 0)
        .map(|(ry, rx)| {
            let (rows, cols) = (phase_len(h, sy, ry), phase_len(w, sx, rx));
            let mut kernel_taps = Vec::new();
            let mut phase_taps = Vec::new();
            for t in 0..taps {
                let (qy, ty) = tap_phase(t / kw, g.dilation[0], g.padding[0], sy);
                let (qx, tx) = tap_phase(t % kw, g.dilation[1], g.padding[1], sx);
                if (ty, tx) == (ry, rx) {
                    kernel_taps.push(t);
                    let offset = -(qy * wf as isize + qx);
                    phase_taps.push(Tap { offset, rows: receiving(qy, hf, rows), cols: receiving(qx, wf, wf) });
                }
            }
            let products = (0..g.groups)
                .map(|group| {
                    let filters = &weight[group * cout_g * cin_g * taps..][..cout_g * cin_g * taps];
                    let filter = |ci: usize, t: usize, co: usize| filters[(co * cin_g + ci) * taps + kernel_taps[t]];
                    ShiftedProduct::new(isa, cin_g, (cout_g, feature_plane), [rows, wf], &phase_taps, filter)
                })
                .collect();
            (ry, rx, cols, products)
        })
        .collect();
    let in_place = g.stride == [1, 1] && w == wf;
    let entry_len = g.out_channels * feature_plane;
    parallel::for_each_entry(out, g.in_channels * image_plane, |n, out_n| {
        let mut scratch = (!in_place).then(|| buffers::for_overwrite(cin_g * h.div_ceil(sy) * wf));
        let widened_features = (narrow_width < wf).then(|| {
            let mut wide = buffers::for_overwrite(entry_len);
            let narrow = &features[n * g.out_channels * hf * narrow_width..][..g.out_channels * hf * narrow_width];
            for (wide_row, row) in wide.chunks_exact_mut(wf).zip(narrow.chunks_exact(narrow_width)) {
                wide_row[..narrow_width].copy_from_slice(row);
                wide_row[narrow_width..].fill(0.0);
            }
            wide
        });
        let entry = match &widened_features {
            Some(wide) => &wide[..],
            None => &features[n * entry_len..][..entry_len],
        };
        for (ry, rx, cols, products) in &phases {
            for (group, product) in products.iter().enumerate() {
                let features_g = &entry[group * cout_g * feature_plane..][..cout_g * feature_plane];
                let bias = bias.map(|bias| &bias[group * cin_g..][..cin_g]);
                let out_g = &mut out_n[group * cin_g * image_plane..][..cin_g * image_plane];
                let Some(scratch) = &mut scratch else {
                    shifted_product(isa, product, features_g, bias, out_g);
                    continue;
                };
                let rows = phase_len(h, sy, *ry);
                let phase = &mut scratch[..cin_g * rows * wf];
                shifted_product(isa, product, features_g, bias, phase);
                for (image, plane) in out_g.chunks_exact_mut(image_plane).zip(phase.chunks_exact(rows * wf)) {
                    for (m, row) in plane.chunks_exact(wf).enumerate() {
                        let image_row = &mut image[(sy * m + ry) * w + rx..];
                        image_row.iter_mut().step_by(sx).zip(&row[..*cols]).for_each(|(d, &s)| *d = s);
                    }
                }
            }
        }
        for buffer in [scratch, widened_features].into_iter().flatten() {
            buffers::recycle(buffer);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::conv::tests::for_each_term;
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

    /// Runs `compute` with every available ISA into a NaN-filled output and compares it
    /// with `want`.
    fn check_every_isa(want: &[f64], compute: impl Fn(Isa, &mut [f32])) -> Result<(), TestCaseError> {
        for isa in Isa::ALL.into_iter().filter(|isa| isa.is_available()) {
            let mut out = vec![f32::NAN; want.len()];
            compute(isa, &mut out);
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

    /// The geometry of a convolution, or `None` where the kernel does not fit the padded
    /// image.
    fn geometry(
        (batch, groups): (usize, usize),
        (cin, cout): (usize, usize),
        size: [usize; 2],
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
        padding: [usize; 2],
    ) -> Option<ConvGeometry> {
        let out = |axis: usize| {
            let reach = dilation[axis] * (kernel[axis] - 1) + 1;
            (size[axis] + 2 * padding[axis]).checked_sub(reach).map(|room| room / stride[axis] + 1)
        };
        Some(ConvGeometry {
            batch,
            in_channels: cin * groups,
            in_size: size,
            out_channels: cout * groups,
            out_size: [out(0)?, out(1)?],
            kernel,
            stride,
            padding,
            dilation,
            groups,
        })
    }

    fn values(len: usize, salt: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + salt * 104729) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Every ISA against the definitions, both directions, on geometries with strides
        /// 1-5 (some beyond the image), dilations, asymmetric kernels and paddings (x
        /// padding 0, or half the kernel's reach plus 0-1: some fit the phase planes, some
        /// do not, and both directions widen their rows), spanning several blocks
        /// of positions and tiles of output channels, writing every output value (the
        /// buffers start as NaN).
        #[test]
        fn phase_convolutions_match_their_definitions_on_every_isa(
            batch_groups in (1usize..3, 1usize..3), channels in (1usize..6, 1usize..30),
            size in (1usize..12, 1usize..40), kernel in (1usize..6, 1usize..6), dilation in (1usize..3, 1usize..3),
            stride in (1usize..6, 1usize..6), py in 0usize..4, px_mode in 0usize..3, with_bias: bool, salt in 0usize..100,
        ) {
            // "Valid", "same", one more than "same".
            let half = dilation.1 * (kernel.1 - 1) / 2;
            let px = match px_mode { 0 => 0, 1 => half, _ => half + 1 };
            let geometry = geometry(
                batch_groups, channels, [size.0, size.1], [kernel.0, kernel.1],
                [stride.0, stride.1], [dilation.0, dilation.1], [py, px],
            );
            let Some(g) = geometry else { return Ok(()) };
            prop_assert!(applies(&g) && applies_transposed(&g));
            let weight = values(g.out_channels * channels.0 * kernel.0 * kernel.1, salt);
            let image = values(g.batch * g.in_channels * size.0 * size.1, salt + 1);
            let bias = with_bias.then(|| values(g.out_channels, salt + 2));
            let want = naive(&g, &image, &weight, bias.as_deref());
            check_every_isa(&want, |isa, out| conv2d(isa, &g, &image, &weight, bias.as_deref(), out))?;

            let features = values(g.batch * g.out_channels * g.out_size[0] * g.out_size[1], salt + 3);
            let bias = with_bias.then(|| values(g.in_channels, salt + 4));
            let want = naive_transposed(&g, &features, &weight, bias.as_deref());
            check_every_isa(&want, |isa, out| conv_transpose2d(isa, &g, &features, &weight, bias.as_deref(), out))?;
        }
    }

    #[test]
    fn applies_to_small_filters_widening_narrow_feature_rows() {
        let layer = |size: usize, kernel: usize, stride: usize, padding: usize| {
            geometry((2, 1), (32, 64), [size, size], [kernel; 2], [stride; 2], [1, 1], [padding; 2]).expect("a layer")
        };
        // "Same" and "half" layers: 3 x 3 padding 1 at stride 1 and 2, 4 x 4 padding 1 at
        // stride 2 (even sizes), 1 x 1 at stride 1 and 2.
        for g in [layer(28, 3, 1, 1), layer(28, 3, 2, 1), layer(27, 3, 2, 1), layer(28, 4, 2, 1), layer(28, 1, 2, 0)] {
            assert!(applies(&g) && applies_transposed(&g), "{g:?}");
        }
        // Narrower features, computed in (or read from) widened rows: "valid" 3 x 3 and
        // 5 x 5, a 4 x 4 stride-2 layer on an odd size.
        for g in [layer(28, 3, 1, 0), layer(32, 5, 1, 0), layer(27, 4, 2, 1)] {
            assert!(applies(&g) && applies_transposed(&g), "{g:?}");
            assert_eq!(widened(&g).out_size, [g.out_size[0], g.in_size[1].div_ceil(g.stride[1])]);
        }
        // Filters too large to stream from L2 take im2col and the packed GEMM.
        let wide = ConvGeometry { in_channels: 512, out_channels: 512, ..layer(14, 3, 1, 1) };
        assert!(!applies(&wide) && !applies_transposed(&wide));
    }
}

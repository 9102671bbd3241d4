//! 2-d convolution and its adjoint, the transposed convolution (PyTorch's `conv2d` and
//! `conv_transpose2d`; 1-d convolutions are the special case of height 1).
//!
//! Method: im2col + GEMM. For one batch entry and channel group, every kernel tap
//! `(ky, kx)` pairs each feature position `(oy, ox)` with the image position
//!
//! ```text
//! iy = oy * stride_y + ky * dilation_y - padding_y
//! ix = ox * stride_x + kx * dilation_x - padding_x
//! ```
//!
//! whenever that lands inside the image (padding is zero, so outside taps add nothing).
//! `for_each_tap` enumerates these pairs as runs along feature rows (`(tap, feature
//! position, image position, length)`), which are slice copies at stride 1.
//! The `columns` matrix has one row per (input channel, tap) and one column per feature
//! position, and both directions are one GEMM and one pass of `for_each_tap`:
//!
//! - convolution: im2col (`columns[ci, tap][o] = image[ci][i]`), then
//!   `features = W columns` with `W` the `[out, in * taps]` filter matrix;
//! - transposed convolution: `columns = W^T features`, then col2im
//!   (`image[ci][i] += columns[ci, tap][o]`).
//!
//! The transposed convolution is therefore exactly the adjoint (the input gradient) of
//! the convolution with the same weight and hyper-parameters, as in PyTorch. Batch
//! entries run in parallel on the kernels' pool; a batch with fewer than two entries per
//! thread runs entry by entry, with each entry's im2col rows (col2im planes) and its GEMM
//! shared among the threads (with AVX2 at two threads, batch 1, 16 -> 3 channels, 3 x 3
//! at 128 x 128: forward 1.16-1.80 -> 0.81-1.01 ms, transposed 1.54-1.93 -> 0.91-1.06).
//! The GEMM is `matmul::gemm_acc`, the SIMD `sgemm` for f32. Inputs of any strided layout are
//! first read row-major into the accumulator type (f32 for f32/f16/bf16, f64 for f64);
//! each output is rounded once.
//!
//! Which method runs where: with AVX-512 or AVX2, in f32 (and f16/bf16, accumulated in
//! f32), 3 x 3 convolutions at stride 1 and dilation 1 with at least 16 input and output
//! channels per group take Winograd's minimal filtering (`conv_winograd.rs`): F(4 x 4,
//! 3 x 3) (4x fewer multiplications) with at least 32 input channels per group and 32 of
//! its tiles per plane, else F(2 x 2, 3 x 3) (2.25x fewer; 1.14-2.1x as fast as the
//! methods below, and F(4 x 4) 1.23x as fast again in total on the layers measured
//! there). So do their transposed convolutions (the input gradients), computed as the
//! convolution with the flipped filters. Other convolutions and transposed convolutions skip the columns
//! matrix:
//! `conv_phases.rs` splits the strided side into phases and computes each as a shifted
//! product (`conv_shifted.rs`), which reads each tap's row of the columns straight from
//! the planes, shifted and masked, for the GEMM's register tiles: with AVX-512 each tile
//! loads them itself (1.16x as fast as im2col at the issue's layer on Zen 4; a "valid"
//! convolution's narrower feature rows are widened to the image's, 1.3-1.8x as fast),
//! with AVX2 they are staged once per block of positions for all its tiles (level with
//! im2col to 1.45x as fast on Zen 3, `conv_phases::pays_on`), for products of at least 32
//! channels. Everything else takes im2col + GEMM: f64, filters too large to stream from
//! L2, products of fewer channels with AVX2, and the portable and NEON vectors
//! (`Isa::Scalar`).
//!
//! The weight gradient, accumulated in f32: of a convolution that runs by Winograd, by
//! the same transforms (`conv_winograd_grad.rs`, a product per transformed position as
//! deep as the batch has tiles; 1.1-2.2x as fast as the next method on the layers
//! measured at [`conv2d_weight_grad`], but for one noisy round); of any other with at
//! least 16 input channels per group, from a zero-padded channels-last copy of each
//! image instead of the columns (`conv_weight_grad.rs`: 1.14-1.44x as fast as im2col on
//! the layers measured there, any stride); with fewer (an RGB input layer), by im2col.

use super::conv_phases;
use super::conv_weight_grad;
use super::conv_winograd;
use super::conv_winograd_grad;
use super::gemm::Isa;
use super::map::map;
use super::matmul::{cast, cast_mut, gemm_acc};
use crate::parallel;
use crate::{Element, FloatElem, Layout, Real, buffers};
use std::borrow::Cow;
use std::ops::Range;

/// The sizes of one 2-d convolution, described in the forward direction: it maps an
/// image `[batch, in_channels, in_size[0], in_size[1]]` to features
/// `[batch, out_channels, out_size[0], out_size[1]]` with a weight
/// `[out_channels, in_channels / groups, kernel[0], kernel[1]]`.
///
/// A transposed convolution is described by the convolution it is the adjoint of: it
/// maps features `[batch, out_channels, out_size..]` back to an image
/// `[batch, in_channels, in_size..]` with the same weight tensor.
///
/// The caller validates the geometry: `groups` divides both channel counts, strides and
/// dilations are at least 1, and sizes are consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub in_size: [usize; 2],
    pub out_channels: usize,
    pub out_size: [usize; 2],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl ConvGeometry {
    fn in_channels_per_group(&self) -> usize {
        self.in_channels / self.groups
    }
    fn out_channels_per_group(&self) -> usize {
        self.out_channels / self.groups
    }
    fn image_plane(&self) -> usize {
        self.in_size[0] * self.in_size[1]
    }
    fn feature_plane(&self) -> usize {
        self.out_size[0] * self.out_size[1]
    }
    fn taps(&self) -> usize {
        self.kernel[0] * self.kernel[1]
    }
}

/// The feature positions `o` along one axis whose tap at `offset = k * dilation` lands
/// inside the image: `0 <= o * stride + offset - padding < image_len`.
fn valid_outputs(offset: usize, padding: usize, stride: usize, image_len: usize, feature_len: usize) -> Range<usize> {
    if image_len + padding <= offset {
        return 0..0;
    }
    let first = padding.saturating_sub(offset).div_ceil(stride);
    let end = ((image_len + padding - offset - 1) / stride + 1).min(feature_len);
    first.min(end)..end
}

/// The feature rows and columns (`oy` and `ox` ranges) at which tap `(ky, kx)` lands
/// inside the image; at every other feature position it lands in the padding.
pub(super) fn tap_window(g: &ConvGeometry, ky: usize, kx: usize) -> (Range<usize>, Range<usize>) {
    let rows = valid_outputs(ky * g.dilation[0], g.padding[0], g.stride[0], g.in_size[0], g.out_size[0]);
    let cols = valid_outputs(kx * g.dilation[1], g.padding[1], g.stride[1], g.in_size[1], g.out_size[1]);
    (rows, cols)
}

/// Calls `f(feature_pos, image_pos, len)` for every run of `len` feature positions
/// along a row of `out_rows` at which tap `(ky, kx)` lands inside the image: feature
/// positions `feature_pos..feature_pos + len` meet image positions `image_pos, image_pos +
/// stride_x, ..`. Image positions are flat row-major indices within one plane, feature
/// positions within the rows `out_rows` (counted from the first of them).
fn for_each_run(
    g: &ConvGeometry,
    [ky, kx]: [usize; 2],
    out_rows: Range<usize>,
    mut f: impl FnMut(usize, usize, usize),
) {
    let [iw, ow] = [g.in_size[1], g.out_size[1]];
    let (rows, cols) = tap_window(g, ky, kx);
    if cols.is_empty() {
        return;
    }
    for oy in rows.start.max(out_rows.start)..rows.end.min(out_rows.end) {
        let iy = oy * g.stride[0] + ky * g.dilation[0] - g.padding[0];
        let ix = cols.start * g.stride[1] + kx * g.dilation[1] - g.padding[1];
        f((oy - out_rows.start) * ow + cols.start, iy * iw + ix, cols.len());
    }
}

/// [`for_each_run`] of every kernel tap, as `f(tap, feature_pos, image_pos, len)` with
/// `tap` the row-major index into one filter.
fn for_each_tap(g: &ConvGeometry, out_rows: Range<usize>, mut f: impl FnMut(usize, usize, usize, usize)) {
    let [kh, kw] = g.kernel;
    for tap in 0..kh * kw {
        for_each_run(g, [tap / kw, tap % kw], out_rows.clone(), |o, i, len| f(tap, o, i, len));
    }
}

/// Sets to zero the feature positions of one im2col row (one tap, the feature rows
/// `out_rows`) at which the tap lands in the padding: the rows outside its window, and
/// the left and right margins of the rows inside it.
fn zero_padding_taps<A: Element>(g: &ConvGeometry, [ky, kx]: [usize; 2], out_rows: Range<usize>, row: &mut [A]) {
    let (rows, cols) = tap_window(g, ky, kx);
    for (oy, feature_row) in out_rows.zip(row.chunks_mut(g.out_size[1].max(1))) {
        if rows.contains(&oy) && !cols.is_empty() {
            feature_row[..cols.start].fill(A::zero());
            feature_row[cols.end..].fill(A::zero());
        } else {
            feature_row.fill(A::zero());
        }
    }
}

/// The bias of channel `c`, or zero without a bias.
fn bias_of<R: Real>(bias: Option<&[R]>, c: usize) -> R {
    bias.map_or(R::zero(), |b| b[c])
}

/// The fewest values of a columns matrix that im2col fills, or col2im adds back, on every
/// thread (a batch entry's, when the batch is too small to give each thread entries).
const COLUMNS_PARALLEL_MIN: usize = 1 << 16;

/// Runs `task(index, chunk)` on every `chunk_len`-long chunk of `data` (rows of a columns
/// matrix of `columns` values, or the planes they are added onto): on every thread when
/// the matrix holds [`COLUMNS_PARALLEL_MIN`] values or more, else on this one. (Inside a
/// parallel loop over batch entries, [`parallel`] runs it on the entry's thread.)
fn for_each_chunk_of_columns<A: Send>(
    data: &mut [A],
    chunk_len: usize,
    columns: usize,
    task: impl Fn(usize, &mut [A]) + Sync,
) {
    if columns >= COLUMNS_PARALLEL_MIN {
        parallel::for_each_chunk_mut(data, chunk_len.max(1), task);
    } else {
        data.chunks_mut(chunk_len.max(1)).enumerate().for_each(|(index, chunk)| task(index, chunk));
    }
}

/// im2col for batch entry `n`, one group and the feature rows `out_rows`: row
/// `ci * taps + tap` of `columns` (the group's `cin_g * taps` rows of `out_rows.len() *
/// out_width` values) holds the image values that tap meets at those positions, and
/// zeros where it lands in the padding. Every element is written, so the buffer may
/// hold anything before. The rows are filled in parallel, each whole by one thread
/// ([`for_each_chunk_of_columns`]).
fn im2col<A: Element>(
    g: &ConvGeometry,
    image: &[A],
    n: usize,
    group: usize,
    out_rows: Range<usize>,
    columns: &mut [A],
) {
    let (cin_g, taps, ip) = (g.in_channels_per_group(), g.taps(), g.image_plane());
    let positions = out_rows.len() * g.out_size[1];
    let columns = &mut columns[..cin_g * taps * positions];
    let first_plane = n * g.in_channels + group * cin_g;
    let fill_row = |r: usize, row: &mut [A]| {
        let plane = &image[(first_plane + r / taps) * ip..];
        let tap = [r % taps / g.kernel[1], r % taps % g.kernel[1]];
        zero_padding_taps(g, tap, out_rows.clone(), row);
        let sx = g.stride[1];
        for_each_run(g, tap, out_rows.clone(), |o, i, len| {
            let dst = &mut row[o..o + len];
            if sx == 1 {
                dst.copy_from_slice(&plane[i..i + len]);
            } else {
                dst.iter_mut().zip(plane[i..].iter().step_by(sx)).for_each(|(d, &v)| *d = v);
            }
        });
    };
    for_each_chunk_of_columns(columns, positions, cin_g * taps * positions, fill_row);
}

/// A strided view row-major in the accumulator type: the buffer itself when it already
/// is (a contiguous f32 or f64 tensor), else a converted copy.
fn widen<'a, T: FloatElem>(src: &'a [T], layout: &Layout) -> Cow<'a, [T::Acc]> {
    match cast::<T, T::Acc>(src) {
        Some(acc) if layout.is_contiguous() => Cow::Borrowed(&acc[layout.offset()..layout.offset() + layout.numel()]),
        _ => Cow::Owned(map(src, layout, T::to_acc)),
    }
}

/// Gives a copy made by [`widen`] back to the buffer cache.
fn release<A: Element>(values: Cow<'_, [A]>) {
    if let Cow::Owned(buffer) = values {
        buffers::recycle(buffer);
    }
}

/// A convolution or transposed convolution computed in f32 without the columns matrix:
/// `(isa, geometry, input, weight, bias, out)`.
type F32Conv = fn(Isa, &ConvGeometry, &[f32], &[f32], Option<&[f32]>, &mut [f32]);

/// Runs `method` on the operands where their accumulator type is f32 (f32, f16 and bf16
/// operands), writing `out` (rounded to `T`), and says so; with f64 it does nothing and
/// returns false.
fn run_in_f32<T: FloatElem>(
    method: F32Conv,
    isa: Isa,
    g: &ConvGeometry,
    input: &[T::Acc],
    weight: &[T::Acc],
    bias: Option<&[T::Acc]>,
    out: &mut [T],
) -> bool {
    let (Some(input), Some(weight)) = (cast::<T::Acc, f32>(input), cast::<T::Acc, f32>(weight)) else {
        return false;
    };
    let bias = bias.and_then(cast::<T::Acc, f32>);
    in_f32(out, |out| method(isa, g, input, weight, bias, out));
    true
}

/// Convolution: `out[n, co, oy, ox] = bias[co] + sum over ci in co's group, ky, kx of
/// weight[co, ci, ky, kx] * image[n, ci, iy, ix]` with `iy, ix` as in the module doc.
///
/// `input` is `[batch, in_channels, in_size..]`, `weight` is
/// `[out_channels, in_channels / groups, kernel..]`, `bias` is `[out_channels]` (any
/// layouts). Returns `[batch, out_channels, out_size..]` row-major.
pub fn conv2d<T: FloatElem>(
    g: &ConvGeometry,
    input: &[T],
    input_layout: &Layout,
    weight: &[T],
    weight_layout: &Layout,
    bias: Option<(&[T], &Layout)>,
) -> Vec<T> {
    let image = widen(input, input_layout);
    let weight = widen(weight, weight_layout);
    let bias = bias.map(|(b, l)| widen(b, l));
    let (cin_g, cout_g, taps, fp) =
        (g.in_channels_per_group(), g.out_channels_per_group(), g.taps(), g.feature_plane());
    let depth = cin_g * taps;
    // Every output plane is written below.
    let mut out = buffers::for_overwrite(g.batch * g.out_channels * fp);
    if out.is_empty() {
        return out;
    }
    let isa = Isa::best();
    // The f32 method that skips the columns matrix, where one applies.
    let method: Option<F32Conv> = if conv_winograd::applies(isa, g) {
        Some(conv_winograd::conv2d)
    } else if conv_phases::pays_on(isa, cout_g) && conv_phases::applies(g) {
        Some(conv_phases::conv2d)
    } else {
        None
    };
    if let Some(method) = method
        && run_in_f32(method, isa, g, &image, &weight, bias.as_deref(), &mut out)
    {
        release(image);
        release(weight);
        return out;
    }
    parallel::for_each_entry(&mut out, g.out_channels * fp, |n, out_n| {
        // Scratch from the buffer cache and back to it: a fresh megabyte per batch
        // entry would fault its pages in every time (serialised in the kernel, so the
        // threads queue up there). im2col writes every element of it.
        let mut columns = buffers::for_overwrite(depth * fp);
        // The product of a group, where the output's type is not the accumulator's.
        let mut features = None;
        for group in 0..g.groups {
            im2col(g, &image, n, group, 0..g.out_size[0], &mut columns);
            let filters = &weight[group * cout_g * depth..(group + 1) * cout_g * depth];
            let out_group = &mut out_n[group * cout_g * fp..(group + 1) * cout_g * fp];
            let product = |c: &mut [T::Acc]| gemm_acc(cout_g, fp, depth, (filters, depth, 1), (&columns, fp, 1), c);
            let biases = (group * cout_g..(group + 1) * cout_g).map(|co| bias_of(bias.as_deref(), co));
            if let Some(out_group) = cast_mut::<T, T::Acc>(out_group) {
                // f32 and f64: the GEMM writes the output planes themselves.
                product(&mut *out_group);
                for (plane, b) in out_group.chunks_mut(fp.max(1)).zip(biases) {
                    plane.iter_mut().for_each(|v| *v += b);
                }
            } else {
                let features = features.get_or_insert_with(|| buffers::for_overwrite(cout_g * fp));
                product(features);
                for ((dst, plane), b) in out_group.chunks_mut(fp.max(1)).zip(features.chunks(fp.max(1))).zip(biases) {
                    dst.iter_mut().zip(plane).for_each(|(o, &v)| *o = T::from_acc(v + b));
                }
            }
        }
        buffers::recycle(columns);
        if let Some(features) = features {
            buffers::recycle(features);
        }
    });
    release(image);
    release(weight);
    out
}

/// Runs `compute`, an f32 kernel, into `out`: in place for f32, through an f32 buffer
/// rounded once for f16 and bf16.
fn in_f32<T: FloatElem>(out: &mut [T], compute: impl FnOnce(&mut [f32])) {
    if let Some(out32) = cast_mut::<T, f32>(out) {
        compute(out32);
        return;
    }
    let mut values = buffers::for_overwrite(out.len());
    compute(&mut values);
    round_into(&values, out);
    buffers::recycle(values);
}

/// `dst[i] = src[i]` rounded once to `T`, for a `T` that accumulates in f32 (the f32
/// results of the f32-only kernels, for f16 and bf16 tensors).
fn round_into<T: FloatElem>(src: &[f32], dst: &mut [T]) {
    let src = cast::<f32, T::Acc>(src).expect("the f32 kernels serve types that accumulate in f32");
    dst.iter_mut().zip(src).for_each(|(d, &v)| *d = T::from_acc(v));
}

/// Transposed convolution, the adjoint of [`conv2d`] for the same geometry and weight:
/// every feature value `x[n, co, oy, ox]` adds `weight[co, ci, ky, kx] * x[n, co, oy, ox]`
/// into `out[n, ci, iy, ix]` for every ci of co's group (the scatter form), then
/// `bias[ci]` is added.
///
/// `input` is `[batch, out_channels, out_size..]`, `weight` is
/// `[out_channels, in_channels / groups, kernel..]` (PyTorch's transposed-conv layout
/// `[in, out / groups, k..]` seen from the transposed side), `bias` is `[in_channels]`.
/// Returns `[batch, in_channels, in_size..]` row-major.
pub fn conv_transpose2d<T: FloatElem>(
    g: &ConvGeometry,
    input: &[T],
    input_layout: &Layout,
    weight: &[T],
    weight_layout: &Layout,
    bias: Option<(&[T], &Layout)>,
) -> Vec<T> {
    let features = widen(input, input_layout);
    let weight = widen(weight, weight_layout);
    let bias = bias.map(|(b, l)| widen(b, l));
    let (cin_g, cout_g, taps, fp) =
        (g.in_channels_per_group(), g.out_channels_per_group(), g.taps(), g.feature_plane());
    let (depth, ip) = (cin_g * taps, g.image_plane());
    // Every output plane is written below.
    let mut out = buffers::for_overwrite(g.batch * g.in_channels * ip);
    if out.is_empty() {
        return out;
    }
    let isa = Isa::best();
    let method: Option<F32Conv> = if conv_winograd::applies_transposed(isa, g) {
        Some(conv_winograd::conv_transpose2d)
    } else if conv_phases::pays_on(isa, cin_g) && conv_phases::applies_transposed(g) {
        Some(conv_phases::conv_transpose2d)
    } else {
        None
    };
    if let Some(method) = method
        && run_in_f32(method, isa, g, &features, &weight, bias.as_deref(), &mut out)
    {
        release(features);
        release(weight);
        return out;
    }
    parallel::for_each_entry(&mut out, g.in_channels * ip, |n, out_n| {
        // The GEMM writes all of `columns`; the image is a sum, from zero.
        let (mut columns, mut image) =
            (buffers::for_overwrite(depth * fp), buffers::filled(g.in_channels * ip, T::Acc::zero()));
        for group in 0..g.groups {
            // columns = W_g^T x_g: row `ci * taps + tap` is what that tap sends back.
            let filters = &weight[group * cout_g * depth..(group + 1) * cout_g * depth];
            let x =
                &features[(n * g.out_channels + group * cout_g) * fp..(n * g.out_channels + (group + 1) * cout_g) * fp];
            gemm_acc(depth, fp, cout_g, (filters, 1, depth), (x, fp, 1), &mut columns);
            // col2im: scatter-add every row back onto the image, plane by plane.
            let planes = &mut image[group * cin_g * ip..(group + 1) * cin_g * ip];
            for_each_chunk_of_columns(planes, ip, depth * fp, |ci_in_group, plane| {
                let rows = &columns[ci_in_group * taps * fp..(ci_in_group + 1) * taps * fp];
                let sx = g.stride[1];
                for_each_tap(g, 0..g.out_size[0], |tap, o, i, len| {
                    let src = &rows[tap * fp + o..][..len];
                    if sx == 1 {
                        plane[i..i + len].iter_mut().zip(src).for_each(|(p, &v)| *p += v);
                    } else {
                        plane[i..].iter_mut().step_by(sx).zip(src).for_each(|(p, &v)| *p += v);
                    }
                });
            });
        }
        for (ci, (dst, plane)) in out_n.chunks_mut(ip.max(1)).zip(image.chunks(ip.max(1))).enumerate() {
            let b = bias_of(bias.as_deref(), ci);
            for (o, &v) in dst.iter_mut().zip(plane) {
                *o = T::from_acc(v + b);
            }
        }
        buffers::recycle(columns);
        buffers::recycle(image);
    });
    release(features);
    release(weight);
    out
}

/// Batch entries per partial sum of [`conv2d_weight_grad`]: a fixed count, so that the
/// order in which the sums are added (and the rounding) does not depend on the number of
/// threads. (In the columns path each sum's GEMM may still block its depth by the
/// threads, as any GEMM here does.)
pub(super) const WEIGHT_GRAD_ENTRIES: usize = 4;

/// The weight gradient of [`conv2d`]: for features `[batch, out_channels, out_size..]`
/// (the gradient of the convolution's output) and its input image
/// `[batch, in_channels, in_size..]`,
/// `dw[co, ci, ky, kx] = sum over n, oy, ox of features[n, co, oy, ox] * image[n, ci, iy, ix]`
/// with `iy, ix` as in the module doc (and `ci` within `co`'s group). Returns
/// `[out_channels, in_channels / groups, kernel..]` row-major. For a transposed
/// convolution the roles swap: its output gradient is the image and its input the
/// features.
///
/// Method: in f32 (or f16/bf16, accumulated in f32), for a convolution whose forward
/// runs by Winograd (3 x 3, stride 1, 16 or more channels per group in and out, AVX2 or
/// AVX-512), `conv_winograd_grad.rs`; else with 16 or more input channels per group,
/// `conv_weight_grad.rs`, from a padded channels-last copy of each image.
/// Otherwise the columns of [`conv2d`] again, per batch entry and group, and one GEMM
/// `columns (cin_g * taps x fp) @ features_n^T (fp x cout_g)`, the transpose of the
/// group's rows of `dw`, added into them. Every path sums batch entries in fixed chunks
/// of `WEIGHT_GRAD_ENTRIES` in parallel, then the chunks' partial sums in order, and
/// cuts a batch too small for four such chunks into rows of output positions (of tiles)
/// instead (`conv_weight_grad::positions_per_sum`; the columns path then takes im2col of
/// those rows only), so a batch of one runs on every thread. For the columns path this
/// took a batch of 1-4 at two threads (Zen 4, median ms of 15, three alternated rounds
/// of two builds; one thread about the same) from 4.4-6.0 to 2.5-3.5 ms (1 entry, 3 ->
/// 64 channels, 256 x 256, 3 x 3), 1.24-1.33 to 0.62-0.97 (2, 3 -> 32, 128 x 128),
/// 0.56-0.59 to 0.17-0.26 (4, 1 -> 32, 64 x 64), 0.83-1.01 to 0.51-0.81 (4, 3 -> 64,
/// 64 x 64) and 0.37-0.40 to 0.26-0.33 (1, 3 -> 64, 128 x 128, 4 x 4 stride 2). (Before,
/// two threads were slower than one on some: the single sum's deep GEMM took the packed
/// path there.)
///
/// The Winograd weight gradient against the channels-last one, measured on this crate's
/// AVX2 host (2 vCPUs, noisy: the same runs' direct times vary up to 1.6x), one thread,
/// `conv_winograd_grad` and `conv_weight_grad` called in one process, best of 5 in each
/// of 3 rounds, ms, the range over the rounds (F(4 x 4) where a plane has 32 of its
/// tiles, `conv_winograd_grad::method`):
///
/// | batch, channels, size (padding 1) | channels-last | Winograd | method |
/// |---|---|---|---|
/// | 64, 32 -> 64, 28 x 28 (the issue's) | 58.7-74.4 | 33.2-34.7 | F(4 x 4) |
/// | 8, 64 -> 64, 56 x 56 | 72.9-86.4 | 32.8-48.8 | F(4 x 4) |
/// | 16, 16 -> 32, 28 x 28 | 5.6-6.4 | 4.2-5.2 | F(4 x 4) |
/// | 32, 16 -> 16, 32 x 32 | 5.7-10.1 | 5.1-8.8 | F(4 x 4) |
/// | 64, 64 -> 32, 14 x 14 | 17.2-21.0 | 13.5-16.3 | F(2 x 2) |
/// | 16, 256 -> 256, 7 x 7 | 39.5-63.8 | 30.4-47.7 | F(2 x 2) |
///
/// Round by round the Winograd gradient was 1.7-2.1x as fast on the issue's layer,
/// 1.7-2.2x at 56 x 56, 1.3x at 14 x 14, 1.1-1.3x on the 16-channel layers, and 0.9-2.0x
/// on the 7 x 7 one. F(4 x 4) lost to F(2 x 2) on the 14 x 14 and 7 x 7 planes (15.5
/// against 13.5 ms, 56.1 against 47.7), and won on the others (the issue's layer 33.2
/// against 45.5).
pub fn conv2d_weight_grad<T: FloatElem>(
    g: &ConvGeometry,
    image: &[T],
    image_layout: &Layout,
    features: &[T],
    features_layout: &Layout,
) -> Vec<T> {
    let image = widen(image, image_layout);
    let features = widen(features, features_layout);
    let (cin_g, cout_g, taps, fp) =
        (g.in_channels_per_group(), g.out_channels_per_group(), g.taps(), g.feature_plane());
    let depth = cin_g * taps;
    if conv_weight_grad::applies(g)
        && let (Some(image32), Some(features32)) = (cast::<T::Acc, f32>(&image), cast::<T::Acc, f32>(&features))
    {
        let isa = Isa::best();
        let dw = if conv_winograd_grad::applies(isa, g) {
            conv_winograd_grad::weight_grad(isa, g, image32, features32, WEIGHT_GRAD_ENTRIES)
        } else {
            conv_weight_grad::weight_grad_channels_last(isa, g, image32, features32, WEIGHT_GRAD_ENTRIES)
        };
        release(image);
        release(features);
        let mut rounded = buffers::for_overwrite(dw.len());
        round_into(&dw, &mut rounded);
        buffers::recycle(dw);
        return rounded;
    }
    let zero = T::Acc::zero();
    if g.out_channels * depth == 0 {
        release(image);
        release(features);
        return Vec::new(); // no weights
    }
    // The batch's output positions, numbered across its planes, in sums of whole rows.
    let (count, ow) = (g.batch * fp, g.out_size[1]);
    let per_sum = conv_weight_grad::positions_per_sum(count, [fp, ow], WEIGHT_GRAD_ENTRIES);
    let partials: Vec<Vec<T::Acc>> = parallel::map(count.div_ceil(per_sum), |chunk| {
        let mut dw = vec![zero; g.out_channels * depth];
        let chunk = chunk * per_sum..((chunk + 1) * per_sum).min(count);
        // im2col and the GEMM write every element of these (up to a plane's positions).
        let most = per_sum.min(fp);
        let (mut columns, mut product) = (buffers::for_overwrite(depth * most), buffers::for_overwrite(cout_g * depth));
        for (n, at) in conv_weight_grad::entry_spans(chunk, fp) {
            // The chunk's positions of entry `n` are whole rows (`per_sum` and the planes are).
            let k = at.len();
            for group in 0..g.groups {
                im2col(g, &image, n, group, at.start / ow..at.end / ow, &mut columns[..depth * k]);
                let start = (n * g.out_channels + group * cout_g) * fp;
                let grads = &features[start + at.start..start + cout_g * fp];
                // dw^T = columns @ features^T: the columns are the product's A, read in
                // place, and the features (`cout_g x k`, fewer values) are what gets
                // packed, 3-6% faster than `features @ columns^T` at the issue's layer.
                gemm_acc(depth, cout_g, k, (&columns, k, 1), (grads, 1, fp), &mut product);
                let rows = &mut dw[group * cout_g * depth..(group + 1) * cout_g * depth];
                for (co, row) in rows.chunks_exact_mut(depth).enumerate() {
                    row.iter_mut().zip(product[co..].iter().step_by(cout_g)).for_each(|(d, &p)| *d += p);
                }
            }
        }
        buffers::recycle(columns);
        buffers::recycle(product);
        dw
    });
    let mut total = partials.into_iter().reduce(|mut sum, part| {
        sum.iter_mut().zip(&part).for_each(|(s, &p)| *s += p);
        sum
    });
    release(image);
    release(features);
    let total = total.get_or_insert_with(|| vec![zero; g.out_channels * depth]);
    total.iter().map(|&v| T::from_acc(v)).collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn valid_outputs_keeps_exactly_the_taps_inside_the_image() {
        for offset in 0..7 {
            for padding in 0..4 {
                for stride in 1..4 {
                    for image_len in 1..6 {
                        let feature_len = 6;
                        let want: Vec<usize> = (0..feature_len)
                            .filter(|&o| {
                                let i = (o * stride + offset) as isize - padding as isize;
                                i >= 0 && i < image_len as isize
                            })
                            .collect();
                        let got: Vec<usize> = valid_outputs(offset, padding, stride, image_len, feature_len).collect();
                        assert_eq!(got, want, "offset {offset} padding {padding} stride {stride} len {image_len}");
                    }
                }
            }
        }
    }

    #[test]
    fn one_by_one_kernel_with_stride_picks_every_other_pixel() {
        // 1x1 conv with weight 2, stride 2 over a 3x3 image: out = 2 * image[0::2, 0::2].
        let g = ConvGeometry {
            batch: 1,
            in_channels: 1,
            in_size: [3, 3],
            out_channels: 1,
            out_size: [2, 2],
            kernel: [1, 1],
            stride: [2, 2],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        };
        let image: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let out = conv2d(&g, &image, &Layout::contiguous(&[1, 1, 3, 3]), &[2.0f32], &Layout::contiguous(&[1; 4]), None);
        assert_eq!(out, vec![2.0, 6.0, 14.0, 18.0]);
        // The adjoint puts them back where they came from, zeros elsewhere.
        let back = conv_transpose2d(
            &g,
            &out,
            &Layout::contiguous(&[1, 1, 2, 2]),
            &[0.5f32],
            &Layout::contiguous(&[1; 4]),
            None,
        );
        assert_eq!(back, vec![1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 7.0, 0.0, 9.0]);
    }

    /// Calls `f(feature index, image index, weight index)` for every multiply-add of the
    /// convolution's definition: each feature position, output channel, input channel of
    /// its group and tap that lands inside the image (flat indices into the row-major
    /// features, image and weight).
    pub(in crate::cpu) fn for_each_term(g: &ConvGeometry, mut f: impl FnMut(usize, usize, usize)) {
        let (cin_g, cout_g) = (g.in_channels / g.groups, g.out_channels / g.groups);
        let ([ih, iw], [oh, ow], [kh, kw]) = (g.in_size, g.out_size, g.kernel);
        for (n, co) in (0..g.batch).flat_map(|n| (0..g.out_channels).map(move |co| (n, co))) {
            for (oy, ox) in (0..oh).flat_map(|oy| (0..ow).map(move |ox| (oy, ox))) {
                for ci in 0..cin_g {
                    for (ky, kx) in (0..kh).flat_map(|ky| (0..kw).map(move |kx| (ky, kx))) {
                        let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.padding[0] as isize;
                        let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.padding[1] as isize;
                        if (0..ih as isize).contains(&iy) && (0..iw as isize).contains(&ix) {
                            let channel = n * g.in_channels + co / cout_g * cin_g + ci;
                            f(
                                ((n * g.out_channels + co) * oh + oy) * ow + ox,
                                (channel * ih + iy as usize) * iw + ix as usize,
                                ((co * cin_g + ci) * kh + ky) * kw + kx,
                            );
                        }
                    }
                }
            }
        }
    }

    /// The weight gradient by its definition, in f64.
    fn naive_weight_grad(g: &ConvGeometry, image: &[f64], features: &[f64]) -> Vec<f64> {
        let mut dw = vec![0.0; g.out_channels * g.in_channels_per_group() * g.taps()];
        for_each_term(g, |o, i, w| dw[w] += features[o] * image[i]);
        dw
    }

    #[test]
    fn small_batches_are_summed_in_rows_of_positions_whatever_the_threads() {
        // Channels-last: one entry of 20 x 20 outputs (4 x 4 filters, stride 2) in sums of
        // 7, 7 and 6 rows; two entries of 15 x 15 (3 x 3, stride 1) in three sums of 10
        // rows, the second from the first entry's row 10 into the second's row 5.
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a pool");
        let cases = [(1, (40, 40), (4, 4), (2, 2), 140), (2, (15, 15), (3, 3), (1, 1), 150)];
        for (batch, size, kernel, stride, want_per_sum) in cases {
            let g = geometry(batch, 1, (16, 5), size, kernel, stride, (1, 1), (1, 1)).expect("a geometry");
            let [oh, ow] = g.out_size;
            let per_sum = conv_weight_grad::positions_per_sum(batch * oh * ow, [oh * ow, ow], WEIGHT_GRAD_ENTRIES);
            assert_eq!(per_sum, want_per_sum);
            let values = |len: usize, salt: usize| -> Vec<f64> {
                (0..len).map(|i| (((i + salt) * 2654435761 % 1000) as f64) / 500.0 - 1.0).collect()
            };
            let image = values(batch * 16 * size.0 * size.1, 1);
            let features = values(batch * 5 * oh * ow, 2);
            let want = naive_weight_grad(&g, &image, &features);
            let (image32, features32): (Vec<f32>, Vec<f32>) =
                (image.iter().map(|&v| v as f32).collect(), features.iter().map(|&v| v as f32).collect());
            for isa in Isa::ALL.into_iter().filter(|isa| isa.is_available()) {
                let by =
                    || conv_weight_grad::weight_grad_channels_last(isa, &g, &image32, &features32, WEIGHT_GRAD_ENTRIES);
                let got = by();
                for (a, b) in got.iter().zip(&want) {
                    assert!((*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()), "{isa:?}: {a} vs {b}");
                }
                assert_eq!(got, one_thread.install(by), "{isa:?}: the sums depend on the threads");
            }
        }
    }

    #[test]
    fn small_batches_of_few_channels_are_summed_in_rows_of_positions() {
        // The columns path (fewer than 16 input channels per group): one entry of 40 x 40
        // outputs in four sums of 10 rows; three entries of 15 x 15 in two groups, in sums
        // of 12 rows that cross entries (the second from the first entry's row 12 into the
        // second's row 9); one entry of 20 x 20 outputs (4 x 4 filters, stride 2) in 7, 7
        // and 6 rows.
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a pool");
        let cases = [
            (1, 1, (40, 40), (3, 3), (1, 1), 400),
            (3, 2, (15, 15), (3, 3), (1, 1), 180),
            (1, 1, (40, 40), (4, 4), (2, 2), 140),
        ];
        for (batch, groups, size, kernel, stride, want_per_sum) in cases {
            let g = geometry(batch, groups, (3, 5), size, kernel, stride, (1, 1), (1, 1)).expect("a geometry");
            let [oh, ow] = g.out_size;
            let per_sum = conv_weight_grad::positions_per_sum(batch * oh * ow, [oh * ow, ow], WEIGHT_GRAD_ENTRIES);
            assert_eq!(per_sum, want_per_sum);
            let values = |len: usize, salt: usize| -> Vec<f64> {
                (0..len).map(|i| (((i + salt) * 2654435761 % 1000) as f64) / 500.0 - 1.0).collect()
            };
            let image = values(batch * g.in_channels * size.0 * size.1, 1);
            let features = values(batch * g.out_channels * oh * ow, 2);
            let want = naive_weight_grad(&g, &image, &features);
            let (image_layout, features_layout) = (
                Layout::contiguous(&[batch, g.in_channels, size.0, size.1]),
                Layout::contiguous(&[batch, g.out_channels, oh, ow]),
            );
            // f64 takes the reference product: the sums are added in the same order, so the
            // same bits on any number of threads.
            let by = || conv2d_weight_grad(&g, &image, &image_layout, &features, &features_layout);
            let got = by();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
            }
            assert_eq!(got, one_thread.install(by), "the sums depend on the threads");
            // f32 through the SIMD GEMM (whose own blocking may depend on the threads).
            let (image32, features32): (Vec<f32>, Vec<f32>) =
                (image.iter().map(|&v| v as f32).collect(), features.iter().map(|&v| v as f32).collect());
            let by = || conv2d_weight_grad(&g, &image32, &image_layout, &features32, &features_layout);
            for got in [by(), one_thread.install(by)] {
                for (a, b) in got.iter().zip(&want) {
                    assert!((*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn batches_too_small_for_the_threads_fill_and_add_back_the_columns_on_every_thread() {
        // f64 takes im2col (and col2im) on every ISA. A batch of one, and three entries in
        // two groups (fewer than two per thread on two threads, so the entries run one after
        // another); each entry's columns hold at least `COLUMNS_PARALLEL_MIN` values, so its
        // rows (and the planes they are added onto) are shared among the threads.
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a pool");
        let cases = [(1, 1, (3, 8), (50, 50), (3, 3), (1, 1)), (3, 2, (4, 3), (64, 66), (4, 4), (2, 2))];
        for (batch, groups, channels, size, kernel, stride) in cases {
            let g = geometry(batch, groups, channels, size, kernel, stride, (1, 1), (1, 1)).expect("a geometry");
            assert!(channels.0 * g.taps() * g.feature_plane() >= COLUMNS_PARALLEL_MIN, "{g:?}: too small to share");
            let values = |len: usize, salt: usize| -> Vec<f64> {
                (0..len).map(|i| (((i + salt) * 2654435761 % 1000) as f64) / 500.0 - 1.0).collect()
            };
            let image = values(batch * g.in_channels * g.image_plane(), 1);
            let features = values(batch * g.out_channels * g.feature_plane(), 2);
            let weight = values(g.out_channels * channels.0 * g.taps(), 3);
            let (mut want_features, mut want_image) = (vec![0.0; features.len()], vec![0.0; image.len()]);
            for_each_term(&g, |o, i, w| {
                want_features[o] += weight[w] * image[i];
                want_image[i] += weight[w] * features[o];
            });
            let [oh, ow] = g.out_size;
            let image_layout = Layout::contiguous(&[batch, g.in_channels, size.0, size.1]);
            let features_layout = Layout::contiguous(&[batch, g.out_channels, oh, ow]);
            let weight_layout = Layout::contiguous(&[g.out_channels, channels.0, kernel.0, kernel.1]);
            let forward = || conv2d(&g, &image, &image_layout, &weight, &weight_layout, None);
            let transposed = || conv_transpose2d(&g, &features, &features_layout, &weight, &weight_layout, None);
            for (what, got, alone, want) in [
                ("forward", forward(), one_thread.install(forward), &want_features),
                ("transposed", transposed(), one_thread.install(transposed), &want_image),
            ] {
                for (a, b) in got.iter().zip(want) {
                    assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{what} {g:?}: {a} vs {b}");
                }
                assert_eq!(got, alone, "{what} {g:?}: depends on the threads");
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// The weight gradient against its definition: f64 (im2col and the reference
        /// product), f32 through the SIMD GEMM (im2col, few input channels per group) or
        /// channels-last (16 and more, then also on every ISA, with the batch summed in
        /// chunks of two).
        #[test]
        fn weight_grad_matches_its_definition(
            batch in 0usize..6, groups in 1usize..3, cin in proptest::prop_oneof![1usize..3, 16usize..35], cout in 1usize..10,
            size in (1usize..7, 1usize..7), kernel in (1usize..4, 1usize..4), stride in (1usize..3, 1usize..3),
            padding in (0usize..3, 0usize..3), dilation in (1usize..3, 1usize..3), seed in 0u64..1000,
        ) {
            let Some(g) = geometry(batch, groups, (cin, cout), size, kernel, stride, padding, dilation) else {
                return Ok(());
            };
            let [oh, ow] = g.out_size;
            let values = |len: usize, salt: u64| -> Vec<f64> {
                (0..len as u64).map(|i| (((i + salt) * 2654435761 % 1000) as f64) / 500.0 - 1.0).collect()
            };
            let image = values(batch * g.in_channels * size.0 * size.1, seed);
            let features = values(batch * g.out_channels * oh * ow, seed + 7);
            let want = naive_weight_grad(&g, &image, &features);
            let image_layout = Layout::contiguous(&[batch, g.in_channels, size.0, size.1]);
            let features_layout = Layout::contiguous(&[batch, g.out_channels, oh, ow]);
            let got = conv2d_weight_grad(&g, &image, &image_layout, &features, &features_layout);
            proptest::prop_assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                proptest::prop_assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{} vs {}", a, b);
            }
            let (image32, features32): (Vec<f32>, Vec<f32>) =
                (image.iter().map(|&v| v as f32).collect(), features.iter().map(|&v| v as f32).collect());
            let mut results = vec![("f32".to_string(), conv2d_weight_grad(&g, &image32, &image_layout, &features32, &features_layout))];
            if conv_weight_grad::applies(&g) {
                for isa in Isa::ALL.into_iter().filter(|isa| isa.is_available()) {
                    let got = conv_weight_grad::weight_grad_channels_last(isa, &g, &image32, &features32, 2);
                    results.push((format!("{isa:?}"), got));
                }
            }
            for (path, got) in results {
                proptest::prop_assert_eq!(got.len(), want.len());
                for (a, b) in got.iter().zip(&want) {
                    proptest::prop_assert!((*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()), "{}: {} vs {}", path, a, b);
                }
            }
        }

        /// im2col against its definition on a buffer poisoned with NaN, for the whole plane
        /// and a band of its feature rows: every element is written, with the image value a
        /// tap meets or zero where it lands in the padding, and nothing past the band's.
        #[test]
        fn im2col_writes_every_element_zero_where_a_tap_lands_in_the_padding(
            groups in 1usize..3, cin in 1usize..3, size in (1usize..7, 1usize..7), kernel in (1usize..4, 1usize..4),
            stride in (1usize..3, 1usize..3), padding in (0usize..3, 0usize..3), dilation in (1usize..3, 1usize..3),
            band in (0usize..7, 0usize..7),
        ) {
            let Some(g) = geometry(2, groups, (cin, 1), size, kernel, stride, padding, dilation) else {
                return Ok(());
            };
            let [oh, ow] = g.out_size;
            let image: Vec<f64> = (0..2 * g.in_channels * g.image_plane()).map(|i| i as f64 + 1.0).collect();
            let first = band.0 % (oh + 1);
            let bands = [0..oh, first..first + band.1 % (oh - first + 1)];
            let taps = g.taps();
            for ((n, group), out_rows) in [(0, 0), (1, groups - 1)].into_iter().flat_map(|e| bands.clone().map(|b| (e, b))) {
                let positions = out_rows.len() * ow;
                let mut columns = vec![f64::NAN; cin * taps * positions + 5];
                im2col(&g, &image, n, group, out_rows.clone(), &mut columns);
                for ci in 0..cin {
                    for (ky, kx, oy, ox) in every_tap_and_position(kernel, (oh, ow)) {
                        if !out_rows.contains(&oy) {
                            continue;
                        }
                        let iy = (oy * stride.0 + ky * dilation.0) as isize - padding.0 as isize;
                        let ix = (ox * stride.1 + kx * dilation.1) as isize - padding.1 as isize;
                        let inside = (0..size.0 as isize).contains(&iy) && (0..size.1 as isize).contains(&ix);
                        let channel = n * g.in_channels + group * cin + ci;
                        let want = if inside { image[(channel * size.0 + iy as usize) * size.1 + ix as usize] } else { 0.0 };
                        let got = columns[(ci * taps + ky * kernel.1 + kx) * positions + (oy - out_rows.start) * ow + ox];
                        proptest::prop_assert_eq!(got, want, "rows {:?}: tap ({}, {}) at ({}, {})", out_rows, ky, kx, oy, ox);
                    }
                }
                proptest::prop_assert!(columns[cin * taps * positions..].iter().all(|v| v.is_nan()), "past the band");
            }
        }
    }

    /// The geometry of a convolution with `channels = (in, out)` per group, or `None` when
    /// the kernel does not fit the padded image.
    #[allow(clippy::too_many_arguments)] // the proptests' parameters, as they come
    fn geometry(
        batch: usize,
        groups: usize,
        channels: (usize, usize),
        size: (usize, usize),
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
    ) -> Option<ConvGeometry> {
        let out = |len: usize, k: usize, s: usize, p: usize, d: usize| {
            (len + 2 * p).checked_sub(d * (k - 1) + 1).map(|v| v / s + 1)
        };
        Some(ConvGeometry {
            batch,
            in_channels: channels.0 * groups,
            in_size: [size.0, size.1],
            out_channels: channels.1 * groups,
            out_size: [
                out(size.0, kernel.0, stride.0, padding.0, dilation.0)?,
                out(size.1, kernel.1, stride.1, padding.1, dilation.1)?,
            ],
            kernel: [kernel.0, kernel.1],
            stride: [stride.0, stride.1],
            padding: [padding.0, padding.1],
            dilation: [dilation.0, dilation.1],
            groups,
        })
    }

    /// Every `(ky, kx, oy, ox)` for kernel `(kh, kw)` and output `(oh, ow)`.
    fn every_tap_and_position(kernel: (usize, usize), out: (usize, usize)) -> Vec<(usize, usize, usize, usize)> {
        let mut all = Vec::new();
        for ky in 0..kernel.0 {
            for kx in 0..kernel.1 {
                for oy in 0..out.0 {
                    for ox in 0..out.1 {
                        all.push((ky, kx, oy, ox));
                    }
                }
            }
        }
        all
    }
}

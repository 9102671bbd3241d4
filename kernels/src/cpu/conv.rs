//! 2-d convolution and its adjoint, the transposed convolution (PyTorch's `conv2d` and
//! `conv_transpose2d`; 1-d convolutions are the special case of height 1).
//!
//! Method: a direct convolution, no im2col. For one (batch, channel) output plane, every
//! kernel tap `(ky, kx)` pairs each feature position `(oy, ox)` with the image position
//!
//! ```text
//! iy = oy * stride_y + ky * dilation_y - padding_y
//! ix = ox * stride_x + kx * dilation_x - padding_x
//! ```
//!
//! whenever that lands inside the image (padding is zero, so outside taps add nothing).
//! [`for_each_tap`] enumerates these `(tap, feature position, image position)` triples,
//! and both directions are one line on top of it:
//!
//! - convolution (gather): `features[o] += weight[tap] * image[i]`,
//! - transposed convolution (scatter): `image[i] += weight[tap] * features[o]`.
//!
//! The transposed convolution is therefore exactly the adjoint (the input gradient) of
//! the convolution with the same weight and hyper-parameters, as in PyTorch. Work is
//! split over output planes with rayon: a convolution over `(batch, out_channel)`, a
//! transposed convolution over `(batch, image_channel)`, so no two threads write the
//! same element. Inputs of any strided layout are first read row-major into the
//! accumulator type (f32 for f32/f16/bf16, f64 for f64); each output is rounded once.

use super::map::map;
use crate::{Element, FloatElem, Layout, Real};
use rayon::prelude::*;
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
    /// The `kernel` weights linking out channel `co` to in channel `ci_in_group` of its group.
    fn filter<'a, R>(&self, weight: &'a [R], co: usize, ci_in_group: usize) -> &'a [R] {
        let start = (co * self.in_channels_per_group() + ci_in_group) * self.taps();
        &weight[start..start + self.taps()]
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

/// Calls `f(tap, feature_pos, image_pos)` for every kernel tap (row-major index into
/// one filter) and every feature position whose tap lands inside the image. Positions
/// are flat row-major indices within one plane.
fn for_each_tap(g: &ConvGeometry, mut f: impl FnMut(usize, usize, usize)) {
    let [kh, kw] = g.kernel;
    let [ih, iw] = g.in_size;
    let [oh, ow] = g.out_size;
    let [sy, sx] = g.stride;
    let [py, px] = g.padding;
    let [dy, dx] = g.dilation;
    for ky in 0..kh {
        let rows = valid_outputs(ky * dy, py, sy, ih, oh);
        for kx in 0..kw {
            let cols = valid_outputs(kx * dx, px, sx, iw, ow);
            let tap = ky * kw + kx;
            for oy in rows.clone() {
                let iy = oy * sy + ky * dy - py;
                for ox in cols.clone() {
                    let ix = ox * sx + kx * dx - px;
                    f(tap, oy * ow + ox, iy * iw + ix);
                }
            }
        }
    }
}

/// Every output plane (of `plane_len` elements) is filled by `fill(plane_index, acc)`,
/// which accumulates into a zeroed plane of the accumulator type; planes run in
/// parallel and are rounded to `T` once.
fn fill_planes<T: FloatElem>(planes: usize, plane_len: usize, fill: impl Fn(usize, &mut [T::Acc]) + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); planes * plane_len];
    if plane_len == 0 {
        return out;
    }
    out.par_chunks_mut(plane_len).enumerate().for_each(|(p, plane)| {
        let mut acc = vec![T::Acc::zero(); plane_len];
        fill(p, &mut acc);
        for (o, a) in plane.iter_mut().zip(acc) {
            *o = T::from_acc(a);
        }
    });
    out
}

/// The bias of channel `c`, or zero without a bias.
fn bias_of<R: Real>(bias: &Option<Vec<R>>, c: usize) -> R {
    bias.as_ref().map_or(R::zero(), |b| b[c])
}

/// Reads a strided view row-major in the accumulator type.
fn widen<T: FloatElem>(src: &[T], layout: &Layout) -> Vec<T::Acc> {
    map(src, layout, T::to_acc)
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
    let (cin_g, cout_g) = (g.in_channels_per_group(), g.out_channels_per_group());
    fill_planes::<T>(g.batch * g.out_channels, g.feature_plane(), |p, features| {
        let (n, co) = (p / g.out_channels, p % g.out_channels);
        features.fill(bias_of(&bias, co));
        let group = co / cout_g;
        for ci_in_group in 0..cin_g {
            let ci = group * cin_g + ci_in_group;
            let plane = &image[(n * g.in_channels + ci) * g.image_plane()..][..g.image_plane()];
            let filter = g.filter(&weight, co, ci_in_group);
            for_each_tap(g, |tap, o, i| features[o] += filter[tap] * plane[i]);
        }
    })
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
    let (cin_g, cout_g) = (g.in_channels_per_group(), g.out_channels_per_group());
    fill_planes::<T>(g.batch * g.in_channels, g.image_plane(), |p, image| {
        let (n, ci) = (p / g.in_channels, p % g.in_channels);
        image.fill(bias_of(&bias, ci));
        let (group, ci_in_group) = (ci / cin_g, ci % cin_g);
        for co in group * cout_g..(group + 1) * cout_g {
            let plane = &features[(n * g.out_channels + co) * g.feature_plane()..][..g.feature_plane()];
            let filter = g.filter(&weight, co, ci_in_group);
            for_each_tap(g, |tap, o, i| image[i] += filter[tap] * plane[o]);
        }
    })
}

#[cfg(test)]
mod tests {
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
}

//! 2-d pooling and nearest-neighbour upsampling over `[planes, height, width]` images
//! (PyTorch's `max_pool2d`, `avg_pool2d` and `upsample_nearest2d`; a plane is one
//! (batch, channel) pair).
//!
//! The pooling window of output `(oy, ox)` covers image rows
//! `oy * stride_y - padding_y .. + kernel_y` (columns likewise), clipped to the image:
//!
//! - max pooling treats padding as `-inf`, so it takes the max over the clipped window
//!   and returns the flat position `iy * width + ix` of the max within its plane. As in
//!   PyTorch, the first maximum wins and a NaN beats every number (NaN propagates).
//! - average pooling treats padding as zeros and divides by the full window size
//!   `kernel_y * kernel_x` (PyTorch's `count_include_pad = true`; without `ceil_mode`
//!   every window lies inside the padded image, so that is its element count).
//! - nearest upsampling reads `src = floor(dst * in / out)` along each axis, computed
//!   exactly in integers.
//!
//! Planes are processed in parallel with rayon. Inputs of any strided layout are read
//! row-major in the accumulator type; outputs are row-major.

use super::map::map;
use crate::{Element, FloatElem, Layout, Real};
use rayon::prelude::*;
use std::ops::Range;

/// The sizes of one 2-d pooling: `planes` images of `in_size` pooled to `out_size`.
/// The caller validates it (stride >= 1, windows that overlap the image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeometry {
    pub planes: usize,
    pub in_size: [usize; 2],
    pub out_size: [usize; 2],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
}

impl PoolGeometry {
    /// The image rows (axis 0) or columns (axis 1) inside the window of output index `o`.
    fn window(&self, axis: usize, o: usize) -> Range<usize> {
        let start = o * self.stride[axis];
        let end = (start + self.kernel[axis]).saturating_sub(self.padding[axis]).min(self.in_size[axis]);
        start.saturating_sub(self.padding[axis]).min(end)..end
    }

    /// Calls `f(out_pos, rows, cols)` for every output position of one plane.
    fn for_each_window(&self, mut f: impl FnMut(usize, Range<usize>, Range<usize>)) {
        for oy in 0..self.out_size[0] {
            for ox in 0..self.out_size[1] {
                f(oy * self.out_size[1] + ox, self.window(0, oy), self.window(1, ox));
            }
        }
    }
}

/// Reads a strided `[planes, h, w]` view row-major in the accumulator type.
fn widen<T: FloatElem>(src: &[T], layout: &Layout) -> Vec<T::Acc> {
    map(src, layout, T::to_acc)
}

/// Max pooling. Returns the maxima `[planes, out_h, out_w]` and, for each, the flat
/// index `iy * in_w + ix` of the maximum within its input plane.
pub fn max_pool2d<T: FloatElem>(g: &PoolGeometry, input: &[T], layout: &Layout) -> (Vec<T>, Vec<i64>) {
    let image = widen(input, layout);
    let (in_plane, out_plane) = (g.in_size[0] * g.in_size[1], g.out_size[0] * g.out_size[1]);
    let mut values = crate::buffers::filled(g.planes * out_plane, T::zero());
    let mut indices = crate::buffers::filled(g.planes * out_plane, 0i64);
    if out_plane == 0 || in_plane == 0 {
        return (values, indices);
    }
    values.par_chunks_mut(out_plane).zip(indices.par_chunks_mut(out_plane)).zip(image.par_chunks(in_plane)).for_each(
        |((values, indices), plane)| {
            g.for_each_window(|o, rows, cols| {
                let mut best = (T::Acc::NEG_INFINITY, rows.start * g.in_size[1] + cols.start);
                for iy in rows {
                    for ix in cols.clone() {
                        let pos = iy * g.in_size[1] + ix;
                        let v = plane[pos];
                        if v > best.0 || v.is_nan() {
                            best = (v, pos);
                        }
                    }
                }
                values[o] = T::from_acc(best.0);
                indices[o] = best.1 as i64;
            })
        },
    );
    (values, indices)
}

/// Average pooling with zero padding counted in the divisor (`count_include_pad`).
/// Returns `[planes, out_h, out_w]`.
pub fn avg_pool2d<T: FloatElem>(g: &PoolGeometry, input: &[T], layout: &Layout) -> Vec<T> {
    let image = widen(input, layout);
    let (in_plane, out_plane) = (g.in_size[0] * g.in_size[1], g.out_size[0] * g.out_size[1]);
    let mut out = crate::buffers::filled(g.planes * out_plane, T::zero());
    if out_plane == 0 || in_plane == 0 {
        return out;
    }
    let divisor = <T::Acc as Element>::from_f64((g.kernel[0] * g.kernel[1]) as f64);
    out.par_chunks_mut(out_plane).zip(image.par_chunks(in_plane)).for_each(|(out, plane)| {
        g.for_each_window(|o, rows, cols| {
            let mut sum = T::Acc::zero();
            for iy in rows {
                for ix in cols.clone() {
                    sum += plane[iy * g.in_size[1] + ix];
                }
            }
            out[o] = T::from_acc(sum / divisor);
        })
    });
    out
}

/// The source index `floor(dst * in_len / out_len)` of every destination index.
fn nearest_sources(in_len: usize, out_len: usize) -> Vec<usize> {
    (0..out_len).map(|dst| dst * in_len / out_len).collect()
}

/// Nearest-neighbour upsampling (or downsampling) of `[planes, in_size..]` to
/// `[planes, out_size..]`. A pure gather, so it works for every element type.
pub fn upsample_nearest2d<T: Element>(
    planes: usize,
    in_size: [usize; 2],
    out_size: [usize; 2],
    input: &[T],
    layout: &Layout,
) -> Vec<T> {
    let image = super::copy::contiguous(input, layout);
    let (in_plane, out_plane) = (in_size[0] * in_size[1], out_size[0] * out_size[1]);
    let mut out = crate::buffers::filled(planes * out_plane, T::zero());
    if out_plane == 0 || in_plane == 0 {
        return out;
    }
    let (rows, cols) = (nearest_sources(in_size[0], out_size[0]), nearest_sources(in_size[1], out_size[1]));
    out.par_chunks_mut(out_plane).zip(image.par_chunks(in_plane)).for_each(|(out, plane)| {
        for (oy, &iy) in rows.iter().enumerate() {
            for (ox, &ix) in cols.iter().enumerate() {
                out[oy * out_size[1] + ox] = plane[iy * in_size[1] + ix];
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_clipped_to_the_image() {
        let g = PoolGeometry {
            planes: 1,
            in_size: [5, 5],
            out_size: [3, 3],
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1, 1],
        };
        assert_eq!(g.window(0, 0), 0..2);
        assert_eq!(g.window(0, 1), 1..4);
        assert_eq!(g.window(0, 2), 3..5);
    }

    #[test]
    fn nearest_sources_follow_floor_of_scaled_index() {
        assert_eq!(nearest_sources(2, 4), vec![0, 0, 1, 1]);
        assert_eq!(nearest_sources(3, 2), vec![0, 1]);
        assert_eq!(nearest_sources(3, 7), vec![0, 0, 0, 1, 1, 2, 2]);
    }
}

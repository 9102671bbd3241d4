//! Normalisation layers over rows of a strided tensor: LayerNorm (Ba, Kiros & Hinton
//! 2016), RMSNorm (Zhang & Sennrich 2019) and GroupNorm (Wu & He 2018).
//!
//! Each one normalises a row `x` of `n` values and applies an optional affine map:
//!
//! - LayerNorm, GroupNorm: `y = (x - mean) / sqrt(var + eps) * w + b`, with the biased
//!   variance `var = mean((x - mean)^2)` (as PyTorch);
//! - RMSNorm: `y = x / sqrt(mean(x^2) + eps) * w`, the same formula centred at 0
//!   instead of the mean, without bias.
//!
//! The statistics are computed in the accumulator type in two passes: first the mean,
//! then the mean of squared deviations from it. Unlike the one-pass `E[x^2] - E[x]^2`,
//! this does not cancel catastrophically when the mean is large next to the spread.
//! The row is read once into a scratch buffer, so the second pass costs no extra reads
//! of the input.

use super::softmax::Rows;
use crate::layout::Layout;
use crate::{Element, FloatElem, Real};

/// Which normalisation, and over which elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// LayerNorm over the last `dims` dims; weight and bias have those dims' shape.
    Layer { dims: usize },
    /// RMSNorm over the last dim; the weight has its size (there is no bias).
    Rms,
    /// GroupNorm on `[N, C, *]`: the `C` channels form `groups` equal groups, and each
    /// (sample, group) is normalised over its channels and all spatial positions.
    /// Weight and bias have `C` entries, one per channel.
    Group { groups: usize },
}

/// Applies `norm` to a strided view. `weight` and `bias` are row-major buffers of the
/// parameter shape (see [`Norm`]); the caller has checked the shapes, that `C` is a
/// multiple of `groups`, and `eps >= 0`. The output is row-major with the view's shape.
pub fn normalize<T: FloatElem>(
    src: &[T],
    layout: &Layout,
    norm: Norm,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
) -> Vec<T> {
    let to_acc = |p: Option<&[T]>| p.map(|p| p.iter().map(|v| v.to_acc()).collect::<Vec<T::Acc>>());
    let affine = Affine { weight: to_acc(weight), bias: to_acc(bias) };
    let eps = <T::Acc as Element>::from_f64(eps);
    match norm {
        Norm::Layer { dims } => Rows::new(layout, layout.rank() - dims)
            .map(src, |_, x, out| normalize_row(x, out, Center::Mean, eps, &affine, |p| p)),
        Norm::Rms => Rows::new(layout, layout.rank() - 1)
            .map(src, |_, x, out| normalize_row(x, out, Center::Zero, eps, &affine, |p| p)),
        Norm::Group { groups } => {
            let channels_per_group = layout.shape()[1] / groups;
            let spatial: usize = layout.shape()[2..].iter().product();
            let grouped = split_channels(layout, groups);
            Rows::new(&grouped, 2).map(src, |row, x, out| {
                let first_channel = (row % groups) * channels_per_group;
                normalize_row(x, out, Center::Mean, eps, &affine, |p| first_channel + p / spatial)
            })
        }
    }
}

/// The point a row is centred at before scaling.
#[derive(Clone, Copy)]
enum Center {
    /// Subtract the row mean (LayerNorm, GroupNorm).
    Mean,
    /// Keep the values: the "variance" is then the mean square (RMSNorm).
    Zero,
}

/// The optional per-element scale and shift, in the accumulator type.
struct Affine<A> {
    weight: Option<Vec<A>>,
    bias: Option<Vec<A>>,
}

/// Normalises one row `x` into `out`; `param(p)` is the weight/bias index of position `p`.
fn normalize_row<T: FloatElem>(
    x: &[T::Acc],
    out: &mut [T],
    center: Center,
    eps: T::Acc,
    affine: &Affine<T::Acc>,
    param: impl Fn(usize) -> usize,
) {
    let zero = <T::Acc as Element>::zero();
    let n = <T::Acc as Element>::from_f64(x.len() as f64);
    let mean = match center {
        Center::Mean => x.iter().fold(zero, |s, &v| s + v) / n,
        Center::Zero => zero,
    };
    let var = x.iter().fold(zero, |s, &v| s + (v - mean) * (v - mean)) / n;
    let inv_std = <T::Acc as Element>::one() / (var + eps).sqrt();
    for (p, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        let mut y = (v - mean) * inv_std;
        if let Some(w) = &affine.weight {
            y *= w[param(p)];
        }
        if let Some(b) = &affine.bias {
            y += b[param(p)];
        }
        *o = T::from_acc(y);
    }
}

/// Views `[N, C, *]` as `[N, groups, C / groups, *]`. Splitting one dim is always a
/// view, whatever its stride.
fn split_channels(layout: &Layout, groups: usize) -> Layout {
    let (shape, strides) = (layout.shape(), layout.strides());
    let per_group = shape[1] / groups;
    let mut new_shape = vec![shape[0], groups, per_group];
    let mut new_strides = vec![strides[0], strides[1] * per_group, strides[1]];
    new_shape.extend_from_slice(&shape[2..]);
    new_strides.extend_from_slice(&strides[2..]);
    Layout::new(new_shape, new_strides, layout.offset())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_of_a_large_offset_keeps_its_spread() {
        // mean 1e4, spread 1e-2: the one-pass formula loses every digit of var in f32.
        let src: Vec<f32> = vec![10000.01, 9999.99, 10000.01, 9999.99];
        let out = normalize(&src, &Layout::contiguous(&[4]), Norm::Layer { dims: 1 }, None, None, 0.0);
        for (o, want) in out.iter().zip([1.0, -1.0, 1.0, -1.0]) {
            assert!((o - want).abs() < 1e-2, "{out:?}");
        }
    }

    #[test]
    fn group_norm_uses_one_weight_per_channel() {
        // [N=1, C=4, S=2], 2 groups of 2 channels; constant-free data so var > 0.
        let src: Vec<f64> = (0..8).map(f64::from).collect();
        let weight = [1.0, 2.0, 3.0, 4.0];
        let out = normalize(&src, &Layout::contiguous(&[1, 4, 2]), Norm::Group { groups: 2 }, Some(&weight), None, 0.0);
        // Group 0 is 0, 1, 2, 3: mean 1.5, var 1.25.
        let z = |v: f64| (v - 1.5) / 1.25f64.sqrt();
        let want = [z(0.0), z(1.0), 2.0 * z(2.0), 2.0 * z(3.0)];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-14, "{out:?}");
        }
    }
}

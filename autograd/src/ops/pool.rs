//! Differentiable 2-d pooling and nearest upsampling on `[N, C, H, W]` (or unbatched
//! `[C, H, W]`) inputs, with the forward values of `aigc_tensor::ops::pool`.
//!
//! - `max_pool2d`: each output copies one input element (its window's first maximum), so
//!   the gradient sends `g` to those argmax positions: a `scatter_add` of `g` into a zero
//!   plane at the pooling indices, whose own gradient is a `gather` (`ops/gather.rs`).
//! - `avg_pool2d` (`count_include_pad = true`) is the depthwise convolution with the
//!   constant kernel `1 / (kH * kW)` and `groups = C`; its gradient is that convolution's
//!   adjoint, a transposed convolution (`ops/conv.rs`).
//! - `upsample_nearest2d` picks rows `floor(y * H / out_h)` and then columns
//!   `floor(x * W / out_w)` (an `index_select` along each axis); its gradient adds them
//!   back with `index_add`, columns first, then rows (`ops/index.rs`).
//!
//! Every gradient is built from differentiable `Var` ops, so gradients of any order exist.

use super::conv::conv2d_adjoint;
use crate::Var;
use aigc_tensor::{Conv2dParams, Device, Result, Tensor};

impl Var {
    /// Max pooling over `kernel` windows moved by `stride`, with `-inf` padding
    /// (see [`aigc_tensor::Tensor::max_pool2d`]).
    pub fn max_pool2d(&self, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Result<Var> {
        let (value, indices) = self.value().max_pool2d_with_indices(kernel, stride, padding)?;
        // Indices are `h * W + w` within each input plane: scatter into flattened planes.
        let indices = indices.flatten_from(-2)?;
        self.unary_op("max_pool2d", value, move |_, g, x| {
            let planes = x.value().flatten_from(-2)?.zeros_like()?;
            Var::constant(planes).scatter_add(-1, &indices, &g.flatten_from(-2)?)?.reshape(x.dims())
        })
    }

    /// Average pooling over `kernel` windows moved by `stride`, with zero padding counted
    /// in the divisor (see [`aigc_tensor::Tensor::avg_pool2d`]).
    pub fn avg_pool2d(&self, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Result<Var> {
        let value = self.value().avg_pool2d(kernel, stride, padding)?;
        let channels = self.dims()[self.rank() - 3];
        let params = Conv2dParams { stride, padding, dilation: [1, 1], groups: channels };
        self.unary_op("avg_pool2d", value, move |_, g, x| {
            let window = average_window(channels, kernel, x)?;
            let image_size = &x.dims()[x.rank() - 2..];
            if x.rank() == 3 {
                conv2d_adjoint(&g.unsqueeze(0)?, &window, image_size, params)?.squeeze(0)
            } else {
                conv2d_adjoint(g, &window, image_size, params)
            }
        })
    }

    /// Nearest-neighbour resize of the last two dims to `[out_h, out_w]` (see
    /// [`aigc_tensor::Tensor::upsample_nearest2d`]).
    pub fn upsample_nearest2d(&self, out_h: usize, out_w: usize) -> Result<Var> {
        let value = self.value().upsample_nearest2d(out_h, out_w)?;
        let [h, w] = [self.dims()[self.rank() - 2], self.dims()[self.rank() - 1]];
        let (rows, cols) = (nearest_sources(h, out_h, &self.device())?, nearest_sources(w, out_w, &self.device())?);
        self.unary_op("upsample_nearest2d", value, move |_, g, x| {
            let mut row_picked = x.dims().to_vec();
            row_picked[x.rank() - 2] = out_h;
            let zeros = Var::constant(Tensor::zeros(row_picked, g.dtype(), &g.device())?);
            x.zeros_like()?.index_add(-2, &rows, &zeros.index_add(-1, &cols, g)?)
        })
    }
}

/// The depthwise averaging kernel `[channels, 1, kH, kW]` filled with `1 / (kH * kW)`,
/// in the dtype and on the device of `like`.
fn average_window(channels: usize, kernel: [usize; 2], like: &Var) -> Result<Var> {
    let value = 1.0 / (kernel[0] * kernel[1]) as f64;
    let shape = [channels, 1, kernel[0], kernel[1]];
    Ok(Var::constant(Tensor::full(value, shape, like.dtype(), &like.device())?))
}

/// The i64 source index `floor(dst * in_len / out_len)` of every destination index along
/// one axis (PyTorch's `nearest`).
fn nearest_sources(in_len: usize, out_len: usize, device: &Device) -> Result<Tensor> {
    let sources: Vec<i64> = (0..out_len).map(|dst| (dst * in_len / out_len) as i64).collect();
    Tensor::from_vec(sources, out_len, device)
}

#[cfg(test)]
mod tests {
    use crate::Var;
    use crate::gradcheck::{gradcheck, gradgradcheck};
    use crate::testing::inputs;
    use aigc_tensor::{Conv2dParams, Tensor};
    use proptest::prelude::*;

    /// A pooling: image shape (`[N, C, H, W]` or unbatched `[C, H, W]`), kernel, stride
    /// and padding (at most half the kernel), with every output at least 1.
    fn pooling() -> impl Strategy<Value = (Vec<usize>, [usize; 2], [usize; 2], [usize; 2])> {
        let axis = (1usize..=5, 1usize..=3, 1usize..=3, 0usize..=1).prop_map(|(raw, k, s, p)| {
            let p = p.min(k / 2);
            [raw.max(k.saturating_sub(2 * p)), k, s, p]
        });
        (proptest::option::of(1usize..=2), 1usize..=3, axis.clone(), axis).prop_map(|(batch, c, hy, wx)| {
            let shape = batch.into_iter().chain([c, hy[0], wx[0]]).collect();
            (shape, [hy[1], wx[1]], [hy[2], wx[2]], [hy[3], wx[3]])
        })
    }

    /// `values` of `shape` stored transposed in the last two dims (a non-contiguous view).
    fn transposed_layout(values: &Tensor) -> Tensor {
        let rank = values.rank() as isize;
        values.transpose(rank - 2, rank - 1).unwrap().contiguous().unwrap().transpose(rank - 2, rank - 1).unwrap()
    }

    /// An input of `shape` with distinct values (no ties for max pooling), contiguous or not.
    fn image(shape: &[usize], seed: u64, strided: bool) -> Tensor {
        let x = inputs::distinct_values(&inputs::seeded(shape, seed));
        if strided { transposed_layout(&x) } else { x }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn max_pool2d_grads_match_finite_differences((shape, k, s, p) in pooling(), seed: u64, strided: bool) {
            let x = image(&shape, seed, strided);
            gradcheck(|v| v[0].max_pool2d(k, s, p), &[&x], "max_pool2d").unwrap();
        }

        #[test]
        fn avg_pool2d_grads_match_finite_differences((shape, k, s, p) in pooling(), seed: u64, strided: bool) {
            let x = image(&shape, seed, strided);
            gradcheck(|v| v[0].avg_pool2d(k, s, p), &[&x], "avg_pool2d").unwrap();
        }

        #[test]
        fn upsample_nearest2d_grads_match_finite_differences(
            (shape, _, _, _) in pooling(), out_h in 1usize..=6, out_w in 1usize..=6, seed: u64, strided: bool,
        ) {
            let x = image(&shape, seed, strided);
            gradcheck(|v| v[0].upsample_nearest2d(out_h, out_w), &[&x], "upsample_nearest2d").unwrap();
        }
    }

    #[test]
    fn pool_and_upsample_second_derivatives_match_finite_differences() {
        let x = image(&[1, 2, 5, 4], 1, true);
        gradgradcheck(|v| v[0].max_pool2d([3, 2], [2, 1], [1, 1])?.tanh(), &[&x], "max_pool2d").unwrap();
        gradgradcheck(|v| v[0].avg_pool2d([3, 2], [2, 2], [1, 1])?.tanh(), &[&x], "avg_pool2d").unwrap();
        let unbatched = image(&[2, 3, 3], 2, false);
        gradgradcheck(|v| v[0].avg_pool2d([2, 2], [1, 2], [1, 0])?.tanh(), &[&unbatched], "avg_pool2d").unwrap();
        gradgradcheck(|v| v[0].upsample_nearest2d(5, 2)?.tanh(), &[&x], "upsample_nearest2d").unwrap();
    }

    #[test]
    fn pool_forward_values_equal_the_tensor_ops() {
        let x = image(&[2, 3, 5, 4], 3, true);
        let v = Var::leaf(x.clone());
        let same = |var: Var, tensor: Tensor| {
            assert_eq!(var.value().dims(), tensor.dims());
            assert_eq!(var.value().to_vec::<f64>().unwrap(), tensor.to_vec::<f64>().unwrap());
        };
        same(v.max_pool2d([3, 2], [2, 1], [1, 1]).unwrap(), x.max_pool2d([3, 2], [2, 1], [1, 1]).unwrap());
        same(v.avg_pool2d([2, 3], [1, 2], [1, 1]).unwrap(), x.avg_pool2d([2, 3], [1, 2], [1, 1]).unwrap());
        same(v.upsample_nearest2d(7, 3).unwrap(), x.upsample_nearest2d(7, 3).unwrap());
    }

    #[test]
    fn avg_pool2d_equals_the_depthwise_convolution_its_gradient_assumes() {
        let x = image(&[2, 3, 5, 4], 4, false);
        let (kernel, stride, padding) = ([3, 2], [2, 1], [1, 1]);
        let window = Tensor::full(1.0 / 6.0, [3, 1, 3, 2], x.dtype(), &x.device()).unwrap();
        let conv = x.conv2d(&window, None, Conv2dParams { stride, padding, dilation: [1, 1], groups: 3 }).unwrap();
        let pooled = x.avg_pool2d(kernel, stride, padding).unwrap();
        assert_eq!(conv.dims(), pooled.dims());
        for (a, b) in conv.to_vec::<f64>().unwrap().iter().zip(pooled.to_vec::<f64>().unwrap()) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }

    #[test]
    fn max_pool2d_sends_the_gradient_to_each_windows_maximum() {
        let x = Var::leaf(
            Tensor::from_vec(vec![1.0f64, 5.0, 2.0, 0.0, 3.0, 4.0], [1, 1, 2, 3], &aigc_tensor::Device::Cpu).unwrap(),
        );
        // Both 2x2 windows (columns 0-1 and 1-2) have their maximum at the 5: it collects both.
        x.max_pool2d([2, 2], [1, 1], [0, 0]).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(x.grad().unwrap().to_vec::<f64>().unwrap(), vec![0.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
    }
}

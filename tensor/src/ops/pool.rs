//! 2-d pooling and nearest upsampling with PyTorch semantics, on `[N, C, H, W]` inputs
//! (or unbatched `[C, H, W]`, which gives an unbatched result).
//!
//! - `max_pool2d` / `max_pool2d_with_indices`: padding counts as `-inf`; PyTorch's rule
//!   `padding <= kernel / 2` holds, so every window sees at least one input. Indices are
//!   i64 positions `h * W + w` into each `(n, c)` input plane, as PyTorch returns them.
//! - `avg_pool2d`: padding counts as zeros and stays in the divisor, i.e. PyTorch's
//!   default `count_include_pad = true`: every output is the window sum / `kH * kW`.
//! - `upsample_nearest2d`: `src = floor(dst * in / out)` per axis (PyTorch's `nearest`).
//!
//! Pooling output sizes are PyTorch's (without `ceil_mode`):
//! `out = floor((in + 2 * padding - kernel) / stride) + 1`.
//! The kernels live in `aigc_kernels::cpu::pool`.

use crate::storage::{CpuStorage, map_any, map_float};
use crate::{Error, Result, Tensor};
use aigc_kernels::cpu::pool::{self, PoolGeometry};

impl Tensor {
    /// Max pooling over `kernel` windows moved by `stride`, with `-inf` padding
    /// (`padding <= kernel / 2` per dim). Like PyTorch's `max_pool2d`.
    pub fn max_pool2d(&self, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Result<Tensor> {
        Ok(self.max_pool2d_with_indices(kernel, stride, padding)?.0)
    }

    /// [`Tensor::max_pool2d`] and, for every output, the i64 index `h * W + w` of its
    /// maximum within the input plane of its `(n, c)` (the first maximum; NaN wins).
    pub fn max_pool2d_with_indices(
        &self,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> Result<(Tensor, Tensor)> {
        let op = "max_pool2d";
        let g = pool_geometry(op, self, kernel, stride, padding)?;
        let out_shape = pooled_shape(self, g.out_size);
        let (values, indices) = self.read_cpu(|s, l| {
            let indices;
            let values = map_float!(op, s, |b| {
                let (v, i) = pool::max_pool2d(&g, b, l);
                indices = i;
                v
            });
            Ok((values, indices))
        })?;
        Ok((Tensor::from_cpu(values, &out_shape), Tensor::from_cpu(CpuStorage::I64(indices), &out_shape)))
    }

    /// Average pooling over `kernel` windows moved by `stride`, with zero padding
    /// counted in the divisor (`count_include_pad = true`, PyTorch's default): each
    /// output is the window sum divided by `kernel[0] * kernel[1]`.
    pub fn avg_pool2d(&self, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Result<Tensor> {
        let op = "avg_pool2d";
        let g = pool_geometry(op, self, kernel, stride, padding)?;
        let out = self.read_cpu(|s, l| Ok(map_float!(op, s, |b| pool::avg_pool2d(&g, b, l))))?;
        Ok(Tensor::from_cpu(out, &pooled_shape(self, g.out_size)))
    }

    /// Nearest-neighbour resize of the last two dims to `[out_h, out_w]`: output
    /// `(y, x)` copies input `(floor(y * H / out_h), floor(x * W / out_w))`. Like
    /// PyTorch's `upsample_nearest2d` / `interpolate(mode="nearest")`. Any dtype.
    pub fn upsample_nearest2d(&self, out_h: usize, out_w: usize) -> Result<Tensor> {
        let op = "upsample_nearest2d";
        let in_size = check_image(op, self)?;
        if out_h == 0 || out_w == 0 {
            return Err(Error::invalid(op, format!("output size [{out_h}, {out_w}] must be >= 1 in both dims")));
        }
        let out_size = [out_h, out_w];
        let planes = planes(self);
        let out =
            self.read_cpu(|s, l| Ok(map_any!(s, |b| pool::upsample_nearest2d(planes, in_size, out_size, b, l))))?;
        Ok(Tensor::from_cpu(out, &pooled_shape(self, out_size)))
    }
}

/// Checks that `input` is `[N, C, H, W]` or `[C, H, W]` with `H, W >= 1`; returns `[H, W]`.
fn check_image(op: &'static str, input: &Tensor) -> Result<[usize; 2]> {
    if input.rank() != 3 && input.rank() != 4 {
        return Err(Error::bad_shape(
            op,
            &input.shape(),
            "expected a 4-d input [batch, channels, height, width] or a 3-d input [channels, height, width]",
        ));
    }
    let [h, w] = [input.dims()[input.rank() - 2], input.dims()[input.rank() - 1]];
    if h == 0 || w == 0 {
        return Err(Error::bad_shape(op, &input.shape(), format!("spatial sizes [{h}, {w}] must be >= 1")));
    }
    Ok([h, w])
}

/// The number of `(n, c)` planes: every dim before the last two.
fn planes(input: &Tensor) -> usize {
    input.dims()[..input.rank() - 2].iter().product()
}

/// The input's leading dims followed by the output's spatial size.
fn pooled_shape(input: &Tensor, out_size: [usize; 2]) -> Vec<usize> {
    let mut shape = input.dims()[..input.rank() - 2].to_vec();
    shape.extend_from_slice(&out_size);
    shape
}

/// Validates a pooling and returns its geometry.
fn pool_geometry(
    op: &'static str,
    input: &Tensor,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> Result<PoolGeometry> {
    input.expect_float(op)?;
    let in_size = check_image(op, input)?;
    if kernel.contains(&0) || stride.contains(&0) {
        return Err(Error::invalid(op, format!("kernel {kernel:?} and stride {stride:?} must be >= 1 in both dims")));
    }
    if (0..2).any(|d| padding[d] > kernel[d] / 2) {
        return Err(Error::invalid(op, format!("padding {padding:?} must be at most half of kernel {kernel:?}")));
    }
    let mut out_size = [0; 2];
    for d in 0..2 {
        let padded = in_size[d] + 2 * padding[d];
        if padded < kernel[d] {
            return Err(Error::bad_shape(
                op,
                &input.shape(),
                format!(
                    "output size would be below 1: spatial dim {d} of size {} + 2 * padding {} is smaller than \
                     kernel {}",
                    in_size[d], padding[d], kernel[d]
                ),
            ));
        }
        out_size[d] = (padded - kernel[d]) / stride[d] + 1;
    }
    Ok(PoolGeometry { planes: planes(input), in_size, out_size, kernel, stride, padding })
}

#[cfg(test)]
mod tests {
    use crate::testing::*;
    use crate::{DType, Device, Result, Tensor};
    use proptest::prelude::*;

    /// One pooling case: input shape `[n, c, h, w]` and per-dim kernel, stride, padding.
    #[derive(Clone, Debug)]
    struct Case {
        shape: Vec<usize>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    }

    /// Per-axis (size, kernel, stride, padding) with `padding <= kernel / 2` and an
    /// input at least as large as the kernel once padded.
    fn axis() -> impl Strategy<Value = (usize, usize, usize, usize)> {
        (1usize..=4, 1usize..=3, 0usize..=2, 0usize..=3).prop_map(|(kernel, stride, pad_seed, extra)| {
            let padding = pad_seed.min(kernel / 2);
            ((kernel.saturating_sub(2 * padding)).max(1) + extra, kernel, stride, padding)
        })
    }

    fn case() -> impl Strategy<Value = (Case, Tensor)> {
        (prop_oneof![1 => Just(0usize), 4 => 1usize..=2], 1usize..=3, axis(), axis()).prop_flat_map(|(n, c, h, w)| {
            let case =
                Case { shape: vec![n, c, h.0, w.0], kernel: [h.1, w.1], stride: [h.2, w.2], padding: [h.3, w.3] };
            (Just(case.clone()), tensor_of_shape(case.shape))
        })
    }

    /// The input positions of the window of output `(oy, ox)`, inside the image only,
    /// and the full window size (padding included).
    fn window(c: &Case, oy: usize, ox: usize) -> Vec<(usize, usize)> {
        let mut cells = vec![];
        for ky in 0..c.kernel[0] {
            for kx in 0..c.kernel[1] {
                let iy = (oy * c.stride[0] + ky) as isize - c.padding[0] as isize;
                let ix = (ox * c.stride[1] + kx) as isize - c.padding[1] as isize;
                if iy >= 0 && ix >= 0 && (iy as usize) < c.shape[2] && (ix as usize) < c.shape[3] {
                    cells.push((iy as usize, ix as usize));
                }
            }
        }
        cells
    }

    /// Naive max pooling (first maximum wins) and average pooling (divide by kH * kW).
    fn naive_pools(x: &NdArray, c: &Case) -> (NdArray, NdArray, NdArray) {
        let out = |d: usize| (c.shape[d + 2] + 2 * c.padding[d] - c.kernel[d]) / c.stride[d] + 1;
        let shape = [c.shape[0], c.shape[1], out(0), out(1)];
        let (mut max, mut arg, mut avg) = (NdArray::zeros(&shape), NdArray::zeros(&shape), NdArray::zeros(&shape));
        for idx in max.indices().collect::<Vec<_>>() {
            let cells = window(c, idx[2], idx[3]);
            let (mut best, mut best_at, mut sum) = (f64::NEG_INFINITY, cells[0], 0.0);
            for &(iy, ix) in &cells {
                let v = x.get(&[idx[0], idx[1], iy, ix]);
                sum += v;
                if v > best {
                    (best, best_at) = (v, (iy, ix));
                }
            }
            max.set(&idx, best);
            arg.set(&idx, (best_at.0 * c.shape[3] + best_at.1) as f64);
            avg.set(&idx, sum / (c.kernel[0] * c.kernel[1]) as f64);
        }
        (max, arg, avg)
    }

    fn naive_upsample(x: &NdArray, out_h: usize, out_w: usize) -> NdArray {
        let [n, c, h, w] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
        let mut out = NdArray::zeros(&[n, c, out_h, out_w]);
        for idx in out.indices().collect::<Vec<_>>() {
            let sy = (idx[2] as f64 * h as f64 / out_h as f64).floor() as usize;
            let sx = (idx[3] as f64 * w as f64 / out_w as f64).floor() as usize;
            out.set(&idx, x.get(&[idx[0], idx[1], sy, sx]));
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn max_pool2d_with_indices_matches_naive_first_maximum((c, x) in case()) {
            let (values, indices) = x.max_pool2d_with_indices(c.kernel, c.stride, c.padding).unwrap();
            let (max, arg, _) = naive_pools(&NdArray::from_tensor(&x), &c);
            prop_assert_eq!(values.dims(), &max.shape[..]);
            prop_assert_eq!(indices.dtype(), DType::I64);
            prop_assert_eq!(values.to_f64_vec().unwrap(), max.data);
            prop_assert_eq!(indices.to_f64_vec().unwrap(), arg.data);
        }

        #[test]
        fn avg_pool2d_matches_naive_mean_with_padding_counted((c, x) in case()) {
            let got = x.avg_pool2d(c.kernel, c.stride, c.padding).unwrap();
            let (_, _, avg) = naive_pools(&NdArray::from_tensor(&x), &c);
            prop_assert_eq!(got.dims(), &avg.shape[..]);
            assert_close(&got.to_f64_vec().unwrap(), &avg.data, 1e-6, 1e-6, "avg_pool2d");
        }

        #[test]
        fn avg_pool2d_in_f64_is_exact_to_1e12((c, x) in case()) {
            let x = x.to_dtype(DType::F64).unwrap();
            let got = x.avg_pool2d(c.kernel, c.stride, c.padding).unwrap();
            let (_, _, avg) = naive_pools(&NdArray::from_tensor(&x), &c);
            assert_close(&got.to_vec::<f64>().unwrap(), &avg.data, 1e-12, 1e-14, "avg_pool2d f64");
        }

        #[test]
        fn upsample_nearest2d_matches_floor_rule_up_and_down(
            x in nonempty_shape(4, 4, 4).prop_flat_map(tensor_of_shape),
            out_h in 1usize..=9,
            out_w in 1usize..=9,
        ) {
            let got = x.upsample_nearest2d(out_h, out_w).unwrap();
            let want = naive_upsample(&NdArray::from_tensor(&x), out_h, out_w);
            prop_assert_eq!(got.dims(), &want.shape[..]);
            prop_assert_eq!(got.to_f64_vec().unwrap(), want.data);
        }
    }

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(data, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn pools_of_a_4x4_image_by_hand() {
        //  1  2  3  4
        //  5  6  7  8     2x2 windows, stride 2: max 6 8 / 14 16, mean 3.5 5.5 / 11.5 13.5
        //  9 10 11 12
        // 13 14 15 16
        let data: Vec<f32> = (1..=16).map(|v| v as f32).collect();
        let x = t(&data, &[1, 1, 4, 4]);
        let (max, idx) = x.max_pool2d_with_indices([2, 2], [2, 2], [0, 0]).unwrap();
        assert_eq!(max.to_vec::<f32>().unwrap(), vec![6., 8., 14., 16.]);
        assert_eq!(idx.to_vec::<i64>().unwrap(), vec![5, 7, 13, 15]);
        assert_eq!(x.avg_pool2d([2, 2], [2, 2], [0, 0]).unwrap().to_vec::<f32>().unwrap(), vec![3.5, 5.5, 11.5, 13.5]);
        // Padding 1: the corner window holds only the 1, the padding counts in the mean.
        let avg = x.avg_pool2d([2, 2], [2, 2], [1, 1]).unwrap();
        assert_eq!(avg.dims(), &[1, 1, 3, 3]);
        assert_eq!(avg.to_vec::<f32>().unwrap()[0], 0.25);
        let up = t(&[1., 2., 3., 4.], &[1, 1, 2, 2]).upsample_nearest2d(3, 4).unwrap();
        assert_eq!(up.to_vec::<f32>().unwrap(), vec![1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4.]);
    }

    #[test]
    fn max_pool_pads_with_minus_infinity_and_propagates_nan() {
        let x = t(&[-5., -6., -7., -8.], &[1, 1, 2, 2]);
        let (max, idx) = x.max_pool2d_with_indices([3, 3], [1, 1], [1, 1]).unwrap();
        assert_eq!(max.to_vec::<f32>().unwrap(), vec![-5.; 4]);
        assert_eq!(idx.to_vec::<i64>().unwrap(), vec![0; 4]);
        let x = t(&[1., f32::NAN, 3., 4.], &[1, 1, 2, 2]);
        let (max, idx) = x.max_pool2d_with_indices([2, 2], [1, 1], [0, 0]).unwrap();
        assert!(max.to_vec::<f32>().unwrap()[0].is_nan());
        assert_eq!(idx.to_vec::<i64>().unwrap(), vec![1]);
    }

    #[test]
    fn unbatched_inputs_give_unbatched_outputs() {
        let x = make_view(&[2, 5, 4], ViewKind::Transposed, 3);
        let batched = x.unsqueeze(0).unwrap();
        let pairs = [
            (x.max_pool2d([3, 2], [2, 1], [1, 0]).unwrap(), batched.max_pool2d([3, 2], [2, 1], [1, 0]).unwrap()),
            (x.avg_pool2d([2, 2], [1, 2], [1, 1]).unwrap(), batched.avg_pool2d([2, 2], [1, 2], [1, 1]).unwrap()),
            (x.upsample_nearest2d(7, 3).unwrap(), batched.upsample_nearest2d(7, 3).unwrap()),
        ];
        for (single, with_batch) in pairs {
            assert_eq!(single.rank(), 3);
            assert_eq!(single.unsqueeze(0).unwrap().dims(), with_batch.dims());
            assert_eq!(single.to_f64_vec().unwrap(), with_batch.to_f64_vec().unwrap());
        }
    }

    #[test]
    fn half_precision_pools_round_once_and_upsample_copies_any_dtype() {
        let x = make_view(&[1, 2, 5, 6], ViewKind::Stepped, 11);
        let c = Case { shape: vec![1, 2, 5, 6], kernel: [3, 3], stride: [2, 2], padding: [1, 1] };
        for dtype in [DType::BF16, DType::F16] {
            let xh = x.to_dtype(dtype).unwrap();
            let (max, _, avg) = naive_pools(&NdArray::from_tensor(&xh), &c);
            let got = xh.avg_pool2d(c.kernel, c.stride, c.padding).unwrap();
            assert_eq!(got.dtype(), dtype);
            assert_close(&got.to_f64_vec().unwrap(), &avg.data, 1e-2, 1e-3, "half avg_pool2d");
            assert_eq!(xh.max_pool2d(c.kernel, c.stride, c.padding).unwrap().to_f64_vec().unwrap(), max.data);
        }
        let labels = Tensor::from_vec(vec![1u8, 2, 3, 4], [1, 1, 2, 2], &Device::Cpu).unwrap();
        let up = labels.upsample_nearest2d(2, 4).unwrap();
        assert_eq!(up.to_vec::<u8>().unwrap(), vec![1, 1, 2, 2, 3, 3, 4, 4]);
    }

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn pools_reject_bad_inputs_and_windows() {
        let dev = Device::Cpu;
        let x = Tensor::zeros([1, 2, 4, 4], DType::F32, &dev).unwrap();
        assert_eq!(
            err(x.unsqueeze(0).unwrap().max_pool2d([2, 2], [2, 2], [0, 0])),
            "max_pool2d: input of shape [1, 1, 2, 4, 4]: expected a 4-d input [batch, channels, height, width] or \
             a 3-d input [channels, height, width]"
        );
        assert_eq!(
            err(x.to_dtype(DType::I64).unwrap().avg_pool2d([2, 2], [2, 2], [0, 0])),
            "avg_pool2d: not supported for dtype i64 (expected a float dtype (f32, f64, f16, bf16))"
        );
        assert_eq!(
            err(x.max_pool2d_with_indices([0, 2], [2, 2], [0, 0])),
            "max_pool2d: kernel [0, 2] and stride [2, 2] must be >= 1 in both dims"
        );
        assert_eq!(
            err(x.avg_pool2d([2, 2], [1, 0], [0, 0])),
            "avg_pool2d: kernel [2, 2] and stride [1, 0] must be >= 1 in both dims"
        );
        assert_eq!(
            err(x.max_pool2d([3, 3], [1, 1], [1, 2])),
            "max_pool2d: padding [1, 2] must be at most half of kernel [3, 3]"
        );
        assert_eq!(
            err(x.avg_pool2d([5, 2], [1, 1], [0, 0])),
            "avg_pool2d: input of shape [1, 2, 4, 4]: output size would be below 1: spatial dim 0 of size 4 + 2 * \
             padding 0 is smaller than kernel 5"
        );
        let empty = Tensor::zeros([1, 2, 0, 4], DType::F32, &dev).unwrap();
        assert_eq!(
            err(empty.max_pool2d([1, 1], [1, 1], [0, 0])),
            "max_pool2d: input of shape [1, 2, 0, 4]: spatial sizes [0, 4] must be >= 1"
        );
        assert_eq!(
            err(empty.upsample_nearest2d(2, 2)),
            "upsample_nearest2d: input of shape [1, 2, 0, 4]: spatial sizes [0, 4] must be >= 1"
        );
        assert_eq!(err(x.upsample_nearest2d(0, 3)), "upsample_nearest2d: output size [0, 3] must be >= 1 in both dims");
        assert_eq!(
            err(Tensor::zeros([4, 4], DType::F32, &dev).unwrap().upsample_nearest2d(2, 2)),
            "upsample_nearest2d: input of shape [4, 4]: expected a 4-d input [batch, channels, height, width] or a \
             3-d input [channels, height, width]"
        );
    }
}

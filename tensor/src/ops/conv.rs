//! Convolutions with PyTorch semantics: `conv1d`, `conv2d`, `conv_transpose1d` and
//! `conv_transpose2d` on batched, channels-first inputs (`[N, C, L]` / `[N, C, H, W]`).
//!
//! Weights are `[out_channels, in_channels / groups, k..]` for a convolution and
//! `[in_channels, out_channels / groups, k..]` for a transposed convolution, as in
//! PyTorch. Output sizes follow PyTorch's documentation, per spatial dim:
//!
//! ```text
//! conv:           out = floor((in + 2*padding - dilation*(kernel - 1) - 1) / stride) + 1
//! conv_transpose: out = (in - 1)*stride - 2*padding + dilation*(kernel - 1) + output_padding + 1
//! ```
//!
//! A transposed convolution is the adjoint (input gradient) of the convolution with the
//! same weight and hyper-parameters. All four ops share one validation path and run on
//! the direct 2-d kernels of `aigc_kernels::cpu::conv` (see its module doc for the
//! method); the 1-d ops are the 2-d ones with height 1.

use crate::storage::{CpuStorage, zip_float};
use crate::{Error, Layout, Result, Tensor, WithDType};
use aigc_kernels::FloatElem;
use aigc_kernels::cpu::conv::{self, ConvGeometry};

/// The builder methods both parameter structs share: one value for every spatial dim.
macro_rules! shared_builders {
    () => {
        /// The same stride along every spatial dim.
        pub fn stride(mut self, stride: usize) -> Self {
            self.stride = [stride; D];
            self
        }
        /// The same padding along every spatial dim.
        pub fn padding(mut self, padding: usize) -> Self {
            self.padding = [padding; D];
            self
        }
        /// The same dilation along every spatial dim.
        pub fn dilation(mut self, dilation: usize) -> Self {
            self.dilation = [dilation; D];
            self
        }
        /// The number of channel groups.
        pub fn groups(mut self, groups: usize) -> Self {
            self.groups = groups;
            self
        }
    };
}

/// Hyper-parameters of a convolution over `D` spatial dims. [`Default`] is stride 1,
/// padding 0, dilation 1 and one group; the builder methods set one value for every
/// spatial dim, and a struct literal sets them per dim:
///
/// ```
/// use aigc_tensor::ops::conv::Conv2dParams;
/// let p = Conv2dParams::default().stride(2).padding(1);
/// assert_eq!(p, Conv2dParams { stride: [2, 2], padding: [1, 1], ..Default::default() });
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvParams<const D: usize> {
    /// Step between windows, per spatial dim (>= 1).
    pub stride: [usize; D],
    /// Zeros added on both sides of the input, per spatial dim.
    pub padding: [usize; D],
    /// Spacing between kernel taps, per spatial dim (>= 1).
    pub dilation: [usize; D],
    /// Channel groups; each output channel sees `in_channels / groups` inputs (>= 1).
    pub groups: usize,
}

/// Parameters of [`Tensor::conv2d`].
pub type Conv2dParams = ConvParams<2>;
/// Parameters of [`Tensor::conv1d`].
pub type Conv1dParams = ConvParams<1>;

impl<const D: usize> Default for ConvParams<D> {
    fn default() -> Self {
        Self { stride: [1; D], padding: [0; D], dilation: [1; D], groups: 1 }
    }
}

impl<const D: usize> ConvParams<D> {
    shared_builders!();
}

/// Hyper-parameters of a transposed convolution over `D` spatial dims: those of the
/// convolution it is the adjoint of, plus `output_padding`, the extra size added on one
/// side of the output (it picks among the input sizes that the convolution maps to the
/// same output size). [`Default`] is stride 1, padding 0, output padding 0, dilation 1
/// and one group; builders as for [`ConvParams`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTransposeParams<const D: usize> {
    /// Step between windows of the adjoint convolution, per spatial dim (>= 1).
    pub stride: [usize; D],
    /// Padding of the adjoint convolution: removed from both sides of the output.
    pub padding: [usize; D],
    /// Extra output size on the far side, per spatial dim (< stride or < dilation).
    pub output_padding: [usize; D],
    /// Spacing between kernel taps, per spatial dim (>= 1).
    pub dilation: [usize; D],
    /// Channel groups (>= 1).
    pub groups: usize,
}

/// Parameters of [`Tensor::conv_transpose2d`].
pub type ConvTranspose2dParams = ConvTransposeParams<2>;
/// Parameters of [`Tensor::conv_transpose1d`].
pub type ConvTranspose1dParams = ConvTransposeParams<1>;

impl<const D: usize> Default for ConvTransposeParams<D> {
    fn default() -> Self {
        Self { stride: [1; D], padding: [0; D], output_padding: [0; D], dilation: [1; D], groups: 1 }
    }
}

impl<const D: usize> ConvTransposeParams<D> {
    shared_builders!();
    /// The same output padding along every spatial dim.
    pub fn output_padding(mut self, output_padding: usize) -> Self {
        self.output_padding = [output_padding; D];
        self
    }

    /// The parameters of the convolution this one is the adjoint of.
    fn adjoint(&self) -> ConvParams<D> {
        ConvParams { stride: self.stride, padding: self.padding, dilation: self.dilation, groups: self.groups }
    }
}

/// Which way a convolution maps: gathering image windows into features, or scattering
/// features back into an image (with the output padding that picks the image size).
#[derive(Clone, Copy)]
enum Direction<const D: usize> {
    Forward,
    Transposed { output_padding: [usize; D] },
}

impl Tensor {
    /// 2-d convolution of `[N, C_in, H, W]` with a weight `[C_out, C_in / groups, kH, kW]`
    /// and an optional bias `[C_out]`, giving `[N, C_out, H_out, W_out]` (sizes in the
    /// module doc). Like PyTorch's `torch.nn.functional.conv2d`.
    pub fn conv2d(&self, weight: &Tensor, bias: Option<&Tensor>, params: Conv2dParams) -> Result<Tensor> {
        self.conv_nd("conv2d", weight, bias, params, Direction::Forward)
    }

    /// 1-d convolution of `[N, C_in, L]` with a weight `[C_out, C_in / groups, k]` and an
    /// optional bias `[C_out]`, giving `[N, C_out, L_out]`. Like PyTorch's `conv1d`.
    pub fn conv1d(&self, weight: &Tensor, bias: Option<&Tensor>, params: Conv1dParams) -> Result<Tensor> {
        self.conv_nd("conv1d", weight, bias, params, Direction::Forward)
    }

    /// 2-d transposed convolution of `[N, C_in, H, W]` with a weight
    /// `[C_in, C_out / groups, kH, kW]` and an optional bias `[C_out]`, giving
    /// `[N, C_out, H_out, W_out]`. The adjoint of [`Tensor::conv2d`] with the same weight;
    /// like PyTorch's `conv_transpose2d`.
    pub fn conv_transpose2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        params: ConvTranspose2dParams,
    ) -> Result<Tensor> {
        let direction = Direction::Transposed { output_padding: params.output_padding };
        self.conv_nd("conv_transpose2d", weight, bias, params.adjoint(), direction)
    }

    /// 1-d transposed convolution of `[N, C_in, L]` with a weight `[C_in, C_out / groups, k]`
    /// and an optional bias `[C_out]`, giving `[N, C_out, L_out]`. Like PyTorch's
    /// `conv_transpose1d`.
    pub fn conv_transpose1d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        params: ConvTranspose1dParams,
    ) -> Result<Tensor> {
        let direction = Direction::Transposed { output_padding: params.output_padding };
        self.conv_nd("conv_transpose1d", weight, bias, params.adjoint(), direction)
    }

    /// The gradient of `self.conv2d(w, _, params)` with respect to a weight `w` of
    /// spatial size `kernel`, given `features`, the gradient of the convolution's output
    /// (`[N, C_out, H_out, W_out]`, with `self` the image `[N, C_in, H, W]`):
    /// `dw[co, ci, ky, kx] = sum over n, oy, ox of features[n, co, oy, ox] * self[n, ci, iy, ix]`,
    /// shaped `[C_out, C_in / groups, kH, kW]`: products over each batch entry's image, read
    /// channels-last or through im2col columns (`aigc_kernels::cpu::conv::conv2d_weight_grad`
    /// says which where). For a transposed convolution, the image is its output gradient
    /// and `features` its input (which may be smaller than the convolution's output: only
    /// the positions it has count).
    pub fn conv2d_weight_grad(&self, features: &Tensor, kernel: [usize; 2], params: Conv2dParams) -> Result<Tensor> {
        const OP: &str = "conv2d_weight_grad";
        self.expect_float(OP)?;
        self.same_dtype(features, OP)?;
        self.same_device(features, OP)?;
        check_params(OP, &params)?;
        let mismatch =
            |reason: String| Error::ShapeMismatch { op: OP, lhs: self.shape(), rhs: features.shape(), reason };
        if self.rank() != 4 || features.rank() != 4 {
            return Err(mismatch(
                "expected a 4-d image [N, C_in, H, W] and 4-d features [N, C_out, H_out, W_out]".into(),
            ));
        }
        let (x, f, groups) = (self.dims(), features.dims(), params.groups);
        if x[0] != f[0] {
            return Err(mismatch(format!("batch sizes differ: {} and {}", x[0], f[0])));
        }
        if x[1] % groups != 0 || f[1] % groups != 0 {
            return Err(mismatch(format!("channels {} and {} must both be divisible by groups {groups}", x[1], f[1])));
        }
        if kernel.contains(&0) || x[2..].contains(&0) {
            return Err(mismatch(format!("kernel {kernel:?} and image sizes {:?} must be >= 1", &x[2..])));
        }
        // The features may stop short of the convolution's output: a transposed
        // convolution's output padding adds image rows its input never reached.
        let out_size = forward_sizes(&x[2..], &kernel, &params).map_err(&mismatch)?;
        if f[2..].iter().zip(&out_size).any(|(&have, &most)| have > most) {
            return Err(mismatch(format!(
                "the features' spatial size {:?} exceeds the convolution's output size {out_size:?}",
                &f[2..]
            )));
        }
        let geometry = ConvGeometry {
            batch: x[0],
            in_channels: x[1],
            in_size: [x[2], x[3]],
            out_channels: f[1],
            out_size: [f[2], f[3]],
            kernel,
            stride: params.stride,
            padding: params.padding,
            dilation: params.dilation,
            groups,
        };
        let out = self.read_cpu2(features, OP, |si, li, sf, lf| {
            Ok(zip_float!(OP, si, sf, |image, grads| conv::conv2d_weight_grad(&geometry, image, li, grads, lf)))
        })?;
        Ok(Tensor::from_cpu(out, &[f[1], x[1] / groups, kernel[0], kernel[1]]))
    }

    /// Every convolution: validate, describe as a 2-d [`ConvGeometry`], run the kernel.
    fn conv_nd<const D: usize>(
        &self,
        op: &'static str,
        weight: &Tensor,
        bias: Option<&Tensor>,
        params: ConvParams<D>,
        direction: Direction<D>,
    ) -> Result<Tensor> {
        check_operands(op, self, weight, bias, direction)?;
        check_params(op, &params)?;
        let (geometry, out_shape) = plan(op, self, weight, bias, &params, direction)?;
        let transposed = matches!(direction, Direction::Transposed { .. });
        let out = self.read_cpu2(weight, op, |sx, lx, sw, lw| {
            read_optional(bias, |bias| {
                Ok(zip_float!(op, sx, sw, |x, w| run_kernel(transposed, &geometry, x, lx, w, lw, bias)))
            })
        })?;
        Ok(Tensor::from_cpu(out, &out_shape))
    }
}

/// Dtypes, devices and ranks of the operands.
fn check_operands<const D: usize>(
    op: &'static str,
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    direction: Direction<D>,
) -> Result<()> {
    input.expect_float(op)?;
    input.same_dtype(weight, op)?;
    input.same_device(weight, op)?;
    if let Some(bias) = bias {
        input.same_dtype(bias, op)?;
        input.same_device(bias, op)?;
    }
    let names = if D == 1 { "[batch, channels, length]" } else { "[batch, channels, height, width]" };
    if input.rank() != D + 2 {
        return Err(Error::bad_shape(op, &input.shape(), format!("expected a {}-d input {names}", D + 2)));
    }
    let weight_names = match direction {
        Direction::Forward => "[out_channels, in_channels / groups, kernel..]",
        Direction::Transposed { .. } => "[in_channels, out_channels / groups, kernel..]",
    };
    if weight.rank() != D + 2 {
        return Err(Error::ShapeMismatch {
            op,
            lhs: input.shape(),
            rhs: weight.shape(),
            reason: format!("expected a {}-d weight {weight_names}", D + 2),
        });
    }
    Ok(())
}

/// Strides, dilations and groups of at least 1.
fn check_params<const D: usize>(op: &'static str, params: &ConvParams<D>) -> Result<()> {
    for (name, values) in [("stride", &params.stride), ("dilation", &params.dilation)] {
        if values.contains(&0) {
            return Err(Error::invalid(op, format!("{name} {values:?} must be >= 1 in every spatial dim")));
        }
    }
    if params.groups == 0 {
        return Err(Error::invalid(op, "groups 0 must be >= 1"));
    }
    Ok(())
}

/// Checks channels, sizes and bias against each other and returns the 2-d geometry and
/// the output shape. The geometry always describes the forward convolution (for a
/// transposed one, the convolution it is the adjoint of).
fn plan<const D: usize>(
    op: &'static str,
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    params: &ConvParams<D>,
    direction: Direction<D>,
) -> Result<(ConvGeometry, Vec<usize>)> {
    let (x, w) = (input.dims(), weight.dims());
    let mismatch = |reason: String| Error::ShapeMismatch { op, lhs: input.shape(), rhs: weight.shape(), reason };
    let groups = params.groups;
    let (batch, channels) = (x[0], x[1]);
    let (spatial, kernel) = (&x[2..], &w[2..]);
    if spatial.contains(&0) {
        return Err(Error::bad_shape(op, &input.shape(), format!("spatial sizes {spatial:?} must be >= 1")));
    }
    if kernel.contains(&0) {
        return Err(mismatch(format!("weight kernel sizes {kernel:?} must be >= 1")));
    }
    if channels % groups != 0 {
        return Err(mismatch(format!("input channels {channels} are not divisible by groups {groups}")));
    }
    let out_channels = match direction {
        Direction::Forward => {
            if w[0] % groups != 0 {
                return Err(mismatch(format!(
                    "weight.dim(0) = {} out channels are not divisible by groups {groups}",
                    w[0]
                )));
            }
            if w[1] * groups != channels {
                return Err(mismatch(format!(
                    "weight.dim(1) = {} in channels per group times groups {groups} must equal the input's \
                     {channels} channels",
                    w[1]
                )));
            }
            w[0]
        }
        Direction::Transposed { .. } => {
            if w[0] != channels {
                return Err(mismatch(format!("weight.dim(0) = {} must equal the input's {channels} channels", w[0])));
            }
            w[1] * groups
        }
    };
    let out_spatial = match direction {
        Direction::Forward => forward_sizes(spatial, kernel, params).map_err(&mismatch)?,
        Direction::Transposed { output_padding } => {
            transposed_sizes(spatial, kernel, params, &output_padding).map_err(&mismatch)?
        }
    };
    if let Some(bias) = bias
        && bias.dims() != [out_channels]
    {
        return Err(Error::ShapeMismatch {
            op,
            lhs: weight.shape(),
            rhs: bias.shape(),
            reason: format!("bias must be 1-d with one entry per output channel ({out_channels})"),
        });
    }
    // The kernels are 2-d; a 1-d convolution is one of height 1 (`fill` is the height's value).
    let lift = |v: &[usize], fill: usize| -> [usize; 2] { if v.len() == 2 { [v[0], v[1]] } else { [fill, v[0]] } };
    let (image, image_channels, features, feature_channels) = match direction {
        Direction::Forward => (spatial, channels, &out_spatial[..], out_channels),
        Direction::Transposed { .. } => (&out_spatial[..], out_channels, spatial, channels),
    };
    let geometry = ConvGeometry {
        batch,
        in_channels: image_channels,
        in_size: lift(image, 1),
        out_channels: feature_channels,
        out_size: lift(features, 1),
        kernel: lift(kernel, 1),
        stride: lift(&params.stride, 1),
        padding: lift(&params.padding, 0),
        dilation: lift(&params.dilation, 1),
        groups,
    };
    let mut out_shape = vec![batch, out_channels];
    out_shape.extend_from_slice(&out_spatial);
    Ok((geometry, out_shape))
}

/// Output sizes of a convolution; the error reason when one would be below 1.
fn forward_sizes<const D: usize>(
    spatial: &[usize],
    kernel: &[usize],
    params: &ConvParams<D>,
) -> std::result::Result<Vec<usize>, String> {
    (0..D)
        .map(|d| {
            let (padded, span) = (spatial[d] + 2 * params.padding[d], params.dilation[d] * (kernel[d] - 1) + 1);
            if padded < span {
                return Err(format!(
                    "output size would be below 1 in spatial dim {d}: input {} + 2 * padding {} is smaller than \
                     the dilated kernel dilation {} * (kernel {} - 1) + 1 = {span}",
                    spatial[d], params.padding[d], params.dilation[d], kernel[d]
                ));
            }
            Ok((padded - span) / params.stride[d] + 1)
        })
        .collect()
}

/// Output sizes of a transposed convolution; the error reason when `output_padding` is
/// too large (PyTorch: it must be smaller than the stride or the dilation) or a size
/// would be below 1.
fn transposed_sizes<const D: usize>(
    spatial: &[usize],
    kernel: &[usize],
    params: &ConvParams<D>,
    output_padding: &[usize; D],
) -> std::result::Result<Vec<usize>, String> {
    (0..D)
        .map(|d| {
            let (stride, dilation, padding, extra) =
                (params.stride[d], params.dilation[d], params.padding[d], output_padding[d]);
            if extra >= stride && extra >= dilation {
                return Err(format!(
                    "output_padding {output_padding:?} must be smaller than either stride {:?} or dilation {:?} \
                     in spatial dim {d}",
                    params.stride, params.dilation
                ));
            }
            let full = (spatial[d] - 1) * stride + dilation * (kernel[d] - 1) + extra + 1;
            if full <= 2 * padding {
                return Err(format!(
                    "output size would be below 1 in spatial dim {d}: (input {} - 1) * stride {stride} + dilation \
                     {dilation} * (kernel {} - 1) + output_padding {extra} + 1 = {full} is not larger than \
                     2 * padding {padding}",
                    spatial[d], kernel[d]
                ));
            }
            Ok(full - 2 * padding)
        })
        .collect()
}

/// Runs `f` with the CPU buffer and layout of `tensor`, if there is one.
fn read_optional<R>(tensor: Option<&Tensor>, f: impl FnOnce(Option<(&CpuStorage, &Layout)>) -> Result<R>) -> Result<R> {
    match tensor {
        Some(t) => t.read_cpu(|s, l| f(Some((s, l)))),
        None => f(None),
    }
}

/// Calls the convolution kernel of the right direction for element type `T`.
fn run_kernel<T: FloatElem + WithDType>(
    transposed: bool,
    geometry: &ConvGeometry,
    input: &[T],
    input_layout: &Layout,
    weight: &[T],
    weight_layout: &Layout,
    bias: Option<(&CpuStorage, &Layout)>,
) -> Vec<T> {
    let bias = bias.map(|(s, l)| (T::from_storage(s).expect("bias dtype was checked").as_slice(), l));
    let kernel = if transposed { conv::conv_transpose2d::<T> } else { conv::conv2d::<T> };
    kernel(geometry, input, input_layout, weight, weight_layout, bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use crate::{DType, Device};
    use proptest::prelude::*;

    /// Sizes and hyper-parameters of one random 2-d (or, with height 1, 1-d) case.
    #[derive(Clone, Debug)]
    struct Case {
        batch: usize,
        groups: usize,
        in_per_group: usize,
        out_per_group: usize,
        size: [usize; 2],
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        output_padding: [usize; 2],
    }

    impl Case {
        fn in_channels(&self) -> usize {
            self.groups * self.in_per_group
        }
        fn out_channels(&self) -> usize {
            self.groups * self.out_per_group
        }
        fn conv_params(&self) -> Conv2dParams {
            Conv2dParams { stride: self.stride, padding: self.padding, dilation: self.dilation, groups: self.groups }
        }
        fn transpose_params(&self) -> ConvTranspose2dParams {
            ConvTranspose2dParams {
                stride: self.stride,
                padding: self.padding,
                output_padding: self.output_padding,
                dilation: self.dilation,
                groups: self.groups,
            }
        }
        fn input_shape(&self) -> Vec<usize> {
            vec![self.batch, self.in_channels(), self.size[0], self.size[1]]
        }
        /// Forward weight `[out, in / groups, k..]`.
        fn weight_shape(&self) -> Vec<usize> {
            vec![self.out_channels(), self.in_per_group, self.kernel[0], self.kernel[1]]
        }
        /// Transposed weight `[in, out / groups, k..]`.
        fn transposed_weight_shape(&self) -> Vec<usize> {
            vec![self.in_channels(), self.out_per_group, self.kernel[0], self.kernel[1]]
        }
        /// Lowers the padding so that a transposed convolution's output is at least 1:
        /// padding removes at most `(full - 1) / 2` from each side.
        fn with_transpose_padding_that_fits(mut self) -> Self {
            for d in 0..2 {
                let full = (self.size[d] - 1) * self.stride[d]
                    + self.dilation[d] * (self.kernel[d] - 1)
                    + self.output_padding[d]
                    + 1;
                self.padding[d] = self.padding[d].min((full - 1) / 2);
            }
            self
        }
    }

    /// Per-axis sizes: an input large enough for a forward output of at least 1, and an
    /// output padding below the stride or dilation.
    fn axis() -> impl Strategy<Value = (usize, usize, usize, usize, usize, usize)> {
        (1usize..=3, 1usize..=3, 0usize..=2, 1usize..=2, 0usize..=3, 0usize..4).prop_map(
            |(kernel, stride, padding, dilation, extra, op_seed)| {
                let min_size = (dilation * (kernel - 1) + 1).saturating_sub(2 * padding).max(1);
                let output_padding = op_seed % stride.max(dilation);
                (min_size + extra, kernel, stride, padding, dilation, output_padding)
            },
        )
    }

    /// A random case; `one_d` fixes height, kernel height, stride etc. to those of a 1-d conv.
    fn case(one_d: bool) -> impl Strategy<Value = Case> {
        (prop_oneof![1 => Just(0usize), 4 => 1usize..=2], 1usize..=3, 1usize..=2, 1usize..=2, axis(), axis()).prop_map(
            move |(batch, groups, in_per_group, out_per_group, h, w)| {
                let h = if one_d { (1, 1, 1, 0, 1, 0) } else { h };
                Case {
                    batch,
                    groups,
                    in_per_group,
                    out_per_group,
                    size: [h.0, w.0],
                    kernel: [h.1, w.1],
                    stride: [h.2, w.2],
                    padding: [h.3, w.3],
                    dilation: [h.4, w.4],
                    output_padding: [h.5, w.5],
                }
            },
        )
    }

    /// A case with tensors: input, weight (forward layout), transposed weight and two biases,
    /// each with a random strided layout.
    fn case_with_tensors(one_d: bool) -> impl Strategy<Value = (Case, [Tensor; 5])> {
        case(one_d).prop_flat_map(|c| {
            let tensors = (
                tensor_of_shape(c.input_shape()),
                tensor_of_shape(c.weight_shape()),
                tensor_of_shape(c.transposed_weight_shape()),
                tensor_of_shape(vec![c.out_channels()]),
                tensor_of_shape(vec![c.out_channels()]),
            );
            (Just(c), tensors).prop_map(|(c, (x, w, wt, b, bt))| (c, [x, w, wt, b, bt]))
        })
    }

    fn signed(v: usize) -> isize {
        v as isize
    }

    /// Naive convolution straight from the definition, in f64.
    fn naive_conv2d(x: &NdArray, w: &NdArray, b: Option<&NdArray>, c: &Case) -> NdArray {
        let [n, cin, ih, iw] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
        let [cout, cin_g, kh, kw] = [w.shape[0], w.shape[1], w.shape[2], w.shape[3]];
        let out_len =
            |d: usize, i: usize, k: usize| (i + 2 * c.padding[d] - c.dilation[d] * (k - 1) - 1) / c.stride[d] + 1;
        let (oh, ow) = (out_len(0, ih, kh), out_len(1, iw, kw));
        let cout_g = cout / c.groups;
        assert_eq!(cin, cin_g * c.groups);
        let mut out = NdArray::zeros(&[n, cout, oh, ow]);
        for bn in 0..n {
            for co in 0..cout {
                let group = co / cout_g;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut sum = b.map_or(0.0, |b| b.get(&[co]));
                        for j in 0..cin_g {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = signed(oy * c.stride[0] + ky * c.dilation[0]) - signed(c.padding[0]);
                                    let ix = signed(ox * c.stride[1] + kx * c.dilation[1]) - signed(c.padding[1]);
                                    if iy < 0 || ix < 0 || iy >= signed(ih) || ix >= signed(iw) {
                                        continue;
                                    }
                                    let xv = x.get(&[bn, group * cin_g + j, iy as usize, ix as usize]);
                                    sum += w.get(&[co, j, ky, kx]) * xv;
                                }
                            }
                        }
                        out.set(&[bn, co, oy, ox], sum);
                    }
                }
            }
        }
        out
    }

    /// Naive transposed convolution from PyTorch's definition, in f64: every input pixel
    /// `x[n, ci, iy, ix]` adds `x * w[ci, j, ky, kx]` to output `[n, group * out_g + j,
    /// iy * s - p + ky * d, ix * s - p + kx * d]` when that lies inside the output.
    fn naive_conv_transpose2d(x: &NdArray, w: &NdArray, b: Option<&NdArray>, c: &Case) -> NdArray {
        let [n, cin, ih, iw] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
        let [_, cout_g, kh, kw] = [w.shape[0], w.shape[1], w.shape[2], w.shape[3]];
        let out_len = |d: usize, i: usize, k: usize| {
            (i - 1) * c.stride[d] + c.dilation[d] * (k - 1) + c.output_padding[d] + 1 - 2 * c.padding[d]
        };
        let (oh, ow) = (out_len(0, ih, kh), out_len(1, iw, kw));
        let cin_g = cin / c.groups;
        let cout = cout_g * c.groups;
        let mut out = NdArray::zeros(&[n, cout, oh, ow]);
        for idx in out.indices().collect::<Vec<_>>() {
            out.set(&idx, b.map_or(0.0, |b| b.get(&[idx[1]])));
        }
        for idx in x.indices() {
            let [bn, ci, iy, ix] = [idx[0], idx[1], idx[2], idx[3]];
            let group = ci / cin_g;
            for j in 0..cout_g {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let oy = signed(iy * c.stride[0] + ky * c.dilation[0]) - signed(c.padding[0]);
                        let ox = signed(ix * c.stride[1] + kx * c.dilation[1]) - signed(c.padding[1]);
                        if oy < 0 || ox < 0 || oy >= signed(oh) || ox >= signed(ow) {
                            continue;
                        }
                        let at = [bn, group * cout_g + j, oy as usize, ox as usize];
                        let v = out.get(&at) + x.get(&idx) * w.get(&[ci, j, ky, kx]);
                        out.set(&at, v);
                    }
                }
            }
        }
        out
    }

    /// Drops the height-1 dim of a `[n, c, 1, l]` array.
    fn squeeze_height(a: &NdArray) -> NdArray {
        NdArray::new(vec![a.shape[0], a.shape[1], a.shape[3]], a.data.clone())
    }

    /// Adds a height-1 dim to a `[n, c, l]` array.
    fn with_height(a: &NdArray) -> NdArray {
        NdArray::new(vec![a.shape[0], a.shape[1], 1, a.shape[2]], a.data.clone())
    }

    fn nd(t: &Tensor) -> NdArray {
        NdArray::from_tensor(t)
    }

    fn dot(a: &Tensor, b: &Tensor) -> f64 {
        a.to_f64_vec().unwrap().iter().zip(b.to_f64_vec().unwrap()).map(|(x, y)| x * y).sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn conv2d_matches_naive_reference_with_groups_stride_padding_and_dilation(
            (c, [x, w, _, b, _]) in case_with_tensors(false),
            with_bias in any::<bool>(),
        ) {
            let bias = with_bias.then_some(&b);
            let got = x.conv2d(&w, bias, c.conv_params()).unwrap();
            let want = naive_conv2d(&nd(&x), &nd(&w), bias.map(nd).as_ref(), &c);
            prop_assert_eq!(got.dims(), &want.shape[..]);
            assert_close(&got.to_f64_vec().unwrap(), &want.data, 1e-5, 1e-5, "conv2d");
        }

        #[test]
        fn conv_transpose2d_matches_naive_scatter_reference(
            (c, [x, _, wt, _, bt]) in case_with_tensors(false),
            with_bias in any::<bool>(),
        ) {
            let c = c.with_transpose_padding_that_fits();
            let bias = with_bias.then_some(&bt);
            let got = x.conv_transpose2d(&wt, bias, c.transpose_params()).unwrap();
            let want = naive_conv_transpose2d(&nd(&x), &nd(&wt), bias.map(nd).as_ref(), &c);
            prop_assert_eq!(got.dims(), &want.shape[..]);
            assert_close(&got.to_f64_vec().unwrap(), &want.data, 1e-5, 1e-5, "conv_transpose2d");
        }

        #[test]
        fn conv_transpose2d_is_the_adjoint_of_conv2d_in_f64((c, [x, w, _, _, _]) in case_with_tensors(false)) {
            // <conv(x), y> == <x, conv_transpose(y)> with the same weight, when output_padding
            // restores x's size: it is the remainder the conv's floor division dropped.
            let mut c = c;
            let (x, w) = (x.to_dtype(DType::F64).unwrap(), w.to_dtype(DType::F64).unwrap());
            let y_conv = x.conv2d(&w, None, c.conv_params()).unwrap();
            for d in 0..2 {
                c.output_padding[d] =
                    (c.size[d] + 2 * c.padding[d] - c.dilation[d] * (c.kernel[d] - 1) - 1) % c.stride[d];
            }
            let y = make_view(y_conv.dims(), ViewKind::Transposed, 7).to_dtype(DType::F64).unwrap();
            let x_back = y.conv_transpose2d(&w, None, c.transpose_params()).unwrap();
            prop_assert_eq!(x_back.dims(), x.dims());
            let (lhs, rhs) = (dot(&y_conv, &y), dot(&x, &x_back));
            prop_assert!((lhs - rhs).abs() <= 1e-12 * (1.0 + lhs.abs()), "{} vs {}", lhs, rhs);
        }

        #[test]
        fn conv2d_and_conv_transpose2d_in_f64_match_reference_to_1e12(
            (c, [x, w, wt, b, bt]) in case_with_tensors(false),
        ) {
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let (x, w, wt, b, bt) = (f64s(&x), f64s(&w), f64s(&wt), f64s(&b), f64s(&bt));
            let got = x.conv2d(&w, Some(&b), c.conv_params()).unwrap();
            prop_assert_eq!(got.dtype(), DType::F64);
            let want = naive_conv2d(&nd(&x), &nd(&w), Some(&nd(&b)), &c);
            assert_close(&got.to_vec::<f64>().unwrap(), &want.data, 1e-12, 1e-12, "conv2d f64");
            let c = c.with_transpose_padding_that_fits();
            let got = x.conv_transpose2d(&wt, Some(&bt), c.transpose_params()).unwrap();
            let want = naive_conv_transpose2d(&nd(&x), &nd(&wt), Some(&nd(&bt)), &c);
            assert_close(&got.to_vec::<f64>().unwrap(), &want.data, 1e-12, 1e-12, "conv_transpose2d f64");
        }

        #[test]
        fn conv1d_and_conv_transpose1d_match_the_naive_reference_at_height_one(
            (c, [x, w, wt, b, bt]) in case_with_tensors(true),
            with_bias in any::<bool>(),
        ) {
            let squeeze = |t: &Tensor| t.squeeze(2).unwrap();
            let (x1, w1, wt1) = (squeeze(&x), squeeze(&w), squeeze(&wt));
            let (bias, bias_t) = (with_bias.then_some(&b), with_bias.then_some(&bt));
            let p = Conv1dParams::default()
                .stride(c.stride[1])
                .padding(c.padding[1])
                .dilation(c.dilation[1])
                .groups(c.groups);
            let got = x1.conv1d(&w1, bias, p).unwrap();
            let want = squeeze_height(&naive_conv2d(&with_height(&nd(&x1)), &nd(&w), bias.map(nd).as_ref(), &c));
            prop_assert_eq!(got.dims(), &want.shape[..]);
            assert_close(&got.to_f64_vec().unwrap(), &want.data, 1e-5, 1e-5, "conv1d");

            let c = c.with_transpose_padding_that_fits();
            let pt = ConvTranspose1dParams {
                stride: [c.stride[1]],
                padding: [c.padding[1]],
                output_padding: [c.output_padding[1]],
                dilation: [c.dilation[1]],
                groups: c.groups,
            };
            let got = x1.conv_transpose1d(&wt1, bias_t, pt).unwrap();
            let want = squeeze_height(&naive_conv_transpose2d(&nd(&x), &nd(&wt), bias_t.map(nd).as_ref(), &c));
            prop_assert_eq!(got.dims(), &want.shape[..]);
            assert_close(&got.to_f64_vec().unwrap(), &want.data, 1e-5, 1e-5, "conv_transpose1d");
        }
    }

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(data, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn conv2d_of_a_3x3_image_with_a_2x2_kernel_by_hand() {
        // image            kernel     out[0,0] = 1*1 + 2*2 + 4*3 + 5*4 = 37
        // 1 2 3            1 2        out[0,1] = 2*1 + 3*2 + 5*3 + 6*4 = 47
        // 4 5 6            3 4        out[1,0] = 4*1 + 5*2 + 7*3 + 8*4 = 67
        // 7 8 9                       out[1,1] = 5*1 + 6*2 + 8*3 + 9*4 = 77
        let x = t(&[1., 2., 3., 4., 5., 6., 7., 8., 9.], &[1, 1, 3, 3]);
        let w = t(&[1., 2., 3., 4.], &[1, 1, 2, 2]);
        let y = x.conv2d(&w, None, Conv2dParams::default()).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 2]);
        assert_eq!(y.to_vec::<f32>().unwrap(), vec![37., 47., 67., 77.]);
        // Bias 0.5, padding 1, stride 2: windows start at (-1,-1), (-1,1), (1,-1), (1,1).
        let b = t(&[0.5], &[1]);
        let y = x.conv2d(&w, Some(&b), Conv2dParams::default().stride(2).padding(1)).unwrap();
        // Only taps inside the image count: (0,0) sees 1 under weight 4 -> 4; (0,1) sees 2, 3
        // under 3, 4 -> 18; (1,0) sees 4, 7 under 2, 4 -> 36; (1,1) is the full window 5 6 / 8 9 -> 77.
        assert_eq!(y.to_vec::<f32>().unwrap(), vec![4.5, 18.5, 36.5, 77.5]);
    }

    #[test]
    fn conv_transpose2d_with_stride_equal_to_kernel_tiles_each_pixel() {
        let x = t(&[1., 2., 3., 4.], &[1, 1, 2, 2]);
        let w = t(&[1., 10., 100., 1000.], &[1, 1, 2, 2]);
        let y = x.conv_transpose2d(&w, None, ConvTranspose2dParams::default().stride(2)).unwrap();
        assert_eq!(y.dims(), &[1, 1, 4, 4]);
        #[rustfmt::skip]
        let want = vec![
            1., 10., 2., 20.,
            100., 1000., 200., 2000.,
            3., 30., 4., 40.,
            300., 3000., 400., 4000.,
        ];
        assert_eq!(y.to_vec::<f32>().unwrap(), want);
    }

    #[test]
    fn half_precision_convolutions_compute_in_f32_and_round_once() {
        let c = Case {
            batch: 2,
            groups: 2,
            in_per_group: 2,
            out_per_group: 3,
            size: [5, 6],
            kernel: [3, 2],
            stride: [2, 1],
            padding: [1, 1],
            dilation: [1, 2],
            output_padding: [1, 0],
        };
        for dtype in [DType::BF16, DType::F16] {
            let make = |shape: Vec<usize>, seed| make_view(&shape, ViewKind::Sliced, seed).to_dtype(dtype).unwrap();
            let (x, w, wt, b) = (
                make(c.input_shape(), 1),
                make(c.weight_shape(), 2),
                make(c.transposed_weight_shape(), 3),
                make(vec![c.out_channels()], 4),
            );
            let y = x.conv2d(&w, Some(&b), c.conv_params()).unwrap();
            assert_eq!(y.dtype(), dtype);
            let want = naive_conv2d(&nd(&x), &nd(&w), Some(&nd(&b)), &c);
            assert_close(&y.to_f64_vec().unwrap(), &want.data, 1e-2, 2e-2, "half conv2d");
            let y = x.conv_transpose2d(&wt, Some(&b), c.transpose_params()).unwrap();
            let want = naive_conv_transpose2d(&nd(&x), &nd(&wt), Some(&nd(&b)), &c);
            assert_close(&y.to_f64_vec().unwrap(), &want.data, 1e-2, 2e-2, "half conv_transpose2d");
        }
    }

    fn err(r: Result<Tensor>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn conv2d_rejects_bad_dtypes_ranks_and_params() {
        let dev = Device::Cpu;
        let x = Tensor::zeros([1, 4, 5, 5], DType::F32, &dev).unwrap();
        let w = Tensor::zeros([6, 2, 3, 3], DType::F32, &dev).unwrap();
        let p = Conv2dParams::default().groups(2);
        assert_eq!(
            err(x.to_dtype(DType::I64).unwrap().conv2d(&w, None, p)),
            "conv2d: not supported for dtype i64 (expected a float dtype (f32, f64, f16, bf16))"
        );
        assert_eq!(
            err(x.conv2d(&w.to_dtype(DType::F64).unwrap(), None, p)),
            "conv2d: dtypes differ: lhs is f32, rhs is f64 (convert one with to_dtype)"
        );
        let b64 = Tensor::zeros([6], DType::F64, &dev).unwrap();
        assert_eq!(
            err(x.conv2d(&w, Some(&b64), p)),
            "conv2d: dtypes differ: lhs is f32, rhs is f64 (convert one with to_dtype)"
        );
        assert_eq!(
            err(x.squeeze(0).unwrap().conv2d(&w, None, p)),
            "conv2d: input of shape [4, 5, 5]: expected a 4-d input [batch, channels, height, width]"
        );
        assert_eq!(
            err(x.conv2d(&w.flatten_from(2).unwrap(), None, p)),
            "conv2d: lhs [1, 4, 5, 5] and rhs [6, 2, 9]: expected a 4-d weight \
             [out_channels, in_channels / groups, kernel..]"
        );
        assert_eq!(
            err(x.conv2d(&w, None, Conv2dParams { stride: [1, 0], ..p })),
            "conv2d: stride [1, 0] must be >= 1 in every spatial dim"
        );
        assert_eq!(err(x.conv2d(&w, None, p.dilation(0))), "conv2d: dilation [0, 0] must be >= 1 in every spatial dim");
        assert_eq!(err(x.conv2d(&w, None, p.groups(0))), "conv2d: groups 0 must be >= 1");
    }

    #[test]
    fn conv2d_rejects_channel_size_and_bias_mismatches() {
        let dev = Device::Cpu;
        let zeros = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).unwrap();
        let (x, w) = (zeros(&[1, 4, 5, 5]), zeros(&[6, 2, 3, 3]));
        let p = Conv2dParams::default().groups(2);
        assert_eq!(
            err(x.conv2d(&w, None, p.groups(3))),
            "conv2d: lhs [1, 4, 5, 5] and rhs [6, 2, 3, 3]: input channels 4 are not divisible by groups 3"
        );
        assert_eq!(
            err(x.conv2d(&zeros(&[5, 2, 3, 3]), None, p)),
            "conv2d: lhs [1, 4, 5, 5] and rhs [5, 2, 3, 3]: weight.dim(0) = 5 out channels are not divisible by \
             groups 2"
        );
        assert_eq!(
            err(x.conv2d(&w, None, Conv2dParams::default())),
            "conv2d: lhs [1, 4, 5, 5] and rhs [6, 2, 3, 3]: weight.dim(1) = 2 in channels per group times groups 1 \
             must equal the input's 4 channels"
        );
        assert_eq!(
            err(x.conv2d(&zeros(&[6, 2, 0, 3]), None, p)),
            "conv2d: lhs [1, 4, 5, 5] and rhs [6, 2, 0, 3]: weight kernel sizes [0, 3] must be >= 1"
        );
        assert_eq!(
            err(zeros(&[1, 4, 0, 5]).conv2d(&w, None, p)),
            "conv2d: input of shape [1, 4, 0, 5]: spatial sizes [0, 5] must be >= 1"
        );
        assert_eq!(
            err(x.conv2d(&w, None, p.dilation(3))),
            "conv2d: lhs [1, 4, 5, 5] and rhs [6, 2, 3, 3]: output size would be below 1 in spatial dim 0: \
             input 5 + 2 * padding 0 is smaller than the dilated kernel dilation 3 * (kernel 3 - 1) + 1 = 7"
        );
        assert_eq!(
            err(x.conv2d(&w, Some(&zeros(&[4])), p)),
            "conv2d: lhs [6, 2, 3, 3] and rhs [4]: bias must be 1-d with one entry per output channel (6)"
        );
        assert!(err(x.conv2d(&w, Some(&zeros(&[1, 6])), p)).contains("bias must be 1-d"));
    }

    #[test]
    fn transposed_and_1d_convolutions_reject_bad_shapes_and_output_padding() {
        let dev = Device::Cpu;
        let zeros = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).unwrap();
        let x = zeros(&[1, 4, 3, 3]);
        let p = ConvTranspose2dParams::default().groups(2).stride(2);
        assert_eq!(x.conv_transpose2d(&zeros(&[4, 3, 2, 2]), None, p).unwrap().dims(), &[1, 6, 6, 6]);
        assert_eq!(
            err(x.conv_transpose2d(&zeros(&[6, 3, 2, 2]), None, p)),
            "conv_transpose2d: lhs [1, 4, 3, 3] and rhs [6, 3, 2, 2]: weight.dim(0) = 6 must equal the input's \
             4 channels"
        );
        assert_eq!(
            err(x.conv_transpose2d(&zeros(&[4, 3, 2, 2]), None, p.output_padding(2))),
            "conv_transpose2d: lhs [1, 4, 3, 3] and rhs [4, 3, 2, 2]: output_padding [2, 2] must be smaller than \
             either stride [2, 2] or dilation [1, 1] in spatial dim 0"
        );
        // output_padding 1 with stride 1 is allowed when the dilation is larger (PyTorch's rule).
        let q = ConvTranspose2dParams::default().dilation(2).output_padding(1);
        assert_eq!(x.conv_transpose2d(&zeros(&[4, 1, 2, 2]), None, q).unwrap().dims(), &[1, 1, 6, 6]);
        assert_eq!(
            err(zeros(&[1, 1, 1, 1]).conv_transpose2d(
                &zeros(&[1, 1, 1, 1]),
                None,
                ConvTranspose2dParams::default().padding(1)
            )),
            "conv_transpose2d: lhs [1, 1, 1, 1] and rhs [1, 1, 1, 1]: output size would be below 1 in spatial dim 0: \
             (input 1 - 1) * stride 1 + dilation 1 * (kernel 1 - 1) + output_padding 0 + 1 = 1 is not larger than \
             2 * padding 1"
        );
        assert_eq!(
            err(x.conv_transpose2d(&zeros(&[4, 3, 2, 2]), Some(&zeros(&[3])), p)),
            "conv_transpose2d: lhs [4, 3, 2, 2] and rhs [3]: bias must be 1-d with one entry per output channel (6)"
        );
        assert_eq!(
            err(x.conv_transpose2d(&zeros(&[4, 3, 2]), None, p)),
            "conv_transpose2d: lhs [1, 4, 3, 3] and rhs [4, 3, 2]: expected a 4-d weight \
             [in_channels, out_channels / groups, kernel..]"
        );
        assert_eq!(
            err(x.conv1d(&zeros(&[2, 4, 3]), None, Conv1dParams::default())),
            "conv1d: input of shape [1, 4, 3, 3]: expected a 3-d input [batch, channels, length]"
        );
        let x1 = zeros(&[2, 4, 3]);
        assert_eq!(
            err(x1.conv1d(&zeros(&[2, 4, 5]), None, Conv1dParams::default())),
            "conv1d: lhs [2, 4, 3] and rhs [2, 4, 5]: output size would be below 1 in spatial dim 0: \
             input 3 + 2 * padding 0 is smaller than the dilated kernel dilation 1 * (kernel 5 - 1) + 1 = 5"
        );
        assert_eq!(
            err(x1.conv_transpose1d(&zeros(&[4, 1, 2]), None, ConvTranspose1dParams::default().stride(0))),
            "conv_transpose1d: stride [0] must be >= 1 in every spatial dim"
        );
        assert_eq!(x1.conv_transpose1d(&zeros(&[4, 1, 2]), None, Default::default()).unwrap().dims(), &[2, 1, 4]);
    }

    #[test]
    fn empty_batches_and_channels_give_empty_outputs() {
        let dev = Device::Cpu;
        let zeros = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).unwrap();
        assert_eq!(
            zeros(&[0, 2, 4, 4]).conv2d(&zeros(&[3, 2, 3, 3]), None, Default::default()).unwrap().dims(),
            &[0, 3, 2, 2]
        );
        let y = zeros(&[1, 2, 4, 4]).conv2d(&zeros(&[0, 2, 3, 3]), None, Default::default()).unwrap();
        assert_eq!(y.dims(), &[1, 0, 2, 2]);
    }

    #[test]
    fn weight_grad_checks_its_operands_and_equals_the_correlation() {
        let dev = Device::Cpu;
        let image = Tensor::uniform([2, 4, 5, 5], -1.0, 1.0, DType::F64, &dev, 1).unwrap();
        let params = Conv2dParams { padding: [1, 1], groups: 2, ..Default::default() };
        let features = Tensor::uniform([2, 6, 5, 5], -1.0, 1.0, DType::F64, &dev, 2).unwrap();
        let dw = image.conv2d_weight_grad(&features, [3, 3], params).unwrap();
        assert_eq!(dw.dims(), &[6, 2, 3, 3]);
        // <dw, h> = <conv2d(image, h), features> for any weight-shaped h.
        let h = Tensor::uniform([6, 2, 3, 3], -1.0, 1.0, DType::F64, &dev, 3).unwrap();
        let lhs = dw.mul(&h).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let rhs = image.conv2d(&h, None, params).unwrap().mul(&features).unwrap().sum_all().unwrap();
        assert!((lhs - rhs.to_scalar::<f64>().unwrap()).abs() < 1e-10);
        let err = |f: &Tensor, k: [usize; 2]| image.conv2d_weight_grad(f, k, params).unwrap_err().to_string();
        let other_batch = Tensor::zeros([3, 6, 5, 5], DType::F64, &dev).unwrap();
        assert!(err(&other_batch, [3, 3]).contains("batch sizes differ"));
        let too_large = Tensor::zeros([2, 6, 6, 5], DType::F64, &dev).unwrap();
        assert!(err(&too_large, [3, 3]).contains("exceeds the convolution's output size [5, 5]"));
        let odd_channels = Tensor::zeros([2, 5, 5, 5], DType::F64, &dev).unwrap();
        assert!(err(&odd_channels, [3, 3]).contains("divisible by groups 2"));
        assert!(err(&features, [0, 3]).contains("must be >= 1"));
    }
}

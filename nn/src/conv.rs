//! Convolution layers with PyTorch's parameter layouts and default initialisation:
//!
//! - [`Conv1d`] on `[N, C_in, L]`, weight `[C_out, C_in / groups, k]`;
//! - [`Conv2d`] on `[N, C_in, H, W]`, weight `[C_out, C_in / groups, k, k]` (LeCun et al.
//!   1998, the convolutional layer; dilation as Yu & Koltun 2016, groups as Krizhevsky
//!   et al. 2012);
//! - [`ConvTranspose2d`] on `[N, C_in, H, W]`, weight `[C_in, C_out / groups, k, k]`: the
//!   adjoint (gradient) of a convolution, used to upsample (Dumoulin & Visin 2016, "A
//!   guide to convolution arithmetic", section 4). Its output size per spatial dim is
//!   `(in - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1`.
//!
//! Initialisation is PyTorch's `reset_parameters()`: the weight is
//! [`init::kaiming_uniform`] with `a = sqrt(5)`, which is `U(-1/sqrt(fan_in),
//! 1/sqrt(fan_in))`, and the bias is [`init::bias_uniform`] with the same bound. `fan_in`
//! is computed from the weight's shape exactly as PyTorch does, so for a transposed
//! convolution it is `C_out / groups * k * k` (the weight's dim 1 times the kernel area).

use crate::init::{self, FanMode, Nonlinearity};
use crate::{Module, VarStore};
use aigc_autograd::Var;
use aigc_tensor::{Conv1dParams, Conv2dParams, ConvTranspose2dParams, Error, Result};

/// The options of a convolution, PyTorch's defaults in [`Default`]: stride 1, padding 0,
/// dilation 1, one group, with a bias. Each value applies to every spatial dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvConfig {
    /// Step between windows (>= 1).
    pub stride: usize,
    /// Zeros added on both sides of the input.
    pub padding: usize,
    /// Spacing between kernel taps (>= 1).
    pub dilation: usize,
    /// Channel groups: each output channel sees `in_channels / groups` inputs. Both
    /// channel counts must be multiples of it.
    pub groups: usize,
    /// Learn a per-output-channel bias.
    pub bias: bool,
}

impl Default for ConvConfig {
    fn default() -> Self {
        ConvConfig { stride: 1, padding: 0, dilation: 1, groups: 1, bias: true }
    }
}

/// The options of a [`Conv1d`].
pub type Conv1dConfig = ConvConfig;
/// The options of a [`Conv2d`].
pub type Conv2dConfig = ConvConfig;

/// The options of a [`ConvTranspose2d`], PyTorch's defaults in [`Default`]: stride 1,
/// padding 0, output padding 0, dilation 1, one group, with a bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTranspose2dConfig {
    /// Stride of the convolution this layer is the adjoint of (the upsampling factor).
    pub stride: usize,
    /// Padding of that convolution: `dilation * (k - 1) - padding` zeros around the input.
    pub padding: usize,
    /// Extra size on one side of the output; must be smaller than the stride or the
    /// dilation.
    pub output_padding: usize,
    /// Spacing between kernel taps (>= 1).
    pub dilation: usize,
    /// Channel groups; both channel counts must be multiples of it.
    pub groups: usize,
    /// Learn a per-output-channel bias.
    pub bias: bool,
}

impl Default for ConvTranspose2dConfig {
    fn default() -> Self {
        ConvTranspose2dConfig { stride: 1, padding: 0, output_padding: 0, dilation: 1, groups: 1, bias: true }
    }
}

/// 1-d convolution of `[N, C_in, L]` into `[N, C_out, L_out]`.
pub struct Conv1d {
    /// `[out_channels, in_channels / groups, kernel_size]`.
    pub weight: Var,
    /// `[out_channels]`, when the config asks for a bias.
    pub bias: Option<Var>,
    in_channels: usize,
    params: Conv1dParams,
}

/// 2-d convolution of `[N, C_in, H, W]` into `[N, C_out, H_out, W_out]` with a square kernel.
pub struct Conv2d {
    /// `[out_channels, in_channels / groups, kernel_size, kernel_size]`.
    pub weight: Var,
    /// `[out_channels]`, when the config asks for a bias.
    pub bias: Option<Var>,
    in_channels: usize,
    params: Conv2dParams,
}

/// 2-d transposed convolution of `[N, C_in, H, W]` into `[N, C_out, H_out, W_out]` with a
/// square kernel.
pub struct ConvTranspose2d {
    /// `[in_channels, out_channels / groups, kernel_size, kernel_size]` (PyTorch's layout).
    pub weight: Var,
    /// `[out_channels]`, when the config asks for a bias.
    pub bias: Option<Var>,
    in_channels: usize,
    params: ConvTranspose2dParams,
}

impl Conv1d {
    /// `in_channels -> out_channels` with a kernel of `kernel_size` taps.
    pub fn new(
        vs: &VarStore,
        in_channels: usize,
        out_channels: usize,
        kernel_size: usize,
        config: Conv1dConfig,
    ) -> Result<Conv1d> {
        let ConvConfig { stride, padding, dilation, groups, bias } = config;
        let channels = Channels { layer: "Conv1d", in_channels, out_channels, groups };
        channels.check(kernel_size, stride, dilation)?;
        let (weight, bias) =
            weight_and_bias(vs, &[out_channels, in_channels / groups, kernel_size], out_channels, bias)?;
        let params = Conv1dParams::default().stride(stride).padding(padding).dilation(dilation).groups(groups);
        Ok(Conv1d { weight, bias, in_channels, params })
    }
}

impl Conv2d {
    /// `in_channels -> out_channels` with a `kernel_size x kernel_size` kernel.
    pub fn new(
        vs: &VarStore,
        in_channels: usize,
        out_channels: usize,
        kernel_size: usize,
        config: Conv2dConfig,
    ) -> Result<Conv2d> {
        let ConvConfig { stride, padding, dilation, groups, bias } = config;
        let channels = Channels { layer: "Conv2d", in_channels, out_channels, groups };
        channels.check(kernel_size, stride, dilation)?;
        let shape = [out_channels, in_channels / groups, kernel_size, kernel_size];
        let (weight, bias) = weight_and_bias(vs, &shape, out_channels, bias)?;
        let params = Conv2dParams::default().stride(stride).padding(padding).dilation(dilation).groups(groups);
        Ok(Conv2d { weight, bias, in_channels, params })
    }
}

impl ConvTranspose2d {
    /// `in_channels -> out_channels` with a `kernel_size x kernel_size` kernel.
    pub fn new(
        vs: &VarStore,
        in_channels: usize,
        out_channels: usize,
        kernel_size: usize,
        config: ConvTranspose2dConfig,
    ) -> Result<ConvTranspose2d> {
        let ConvTranspose2dConfig { stride, padding, output_padding, dilation, groups, bias } = config;
        let channels = Channels { layer: "ConvTranspose2d", in_channels, out_channels, groups };
        channels.check(kernel_size, stride, dilation)?;
        if output_padding >= stride && output_padding >= dilation {
            return Err(Error::invalid(
                "ConvTranspose2d",
                format!(
                    "output_padding {output_padding} must be smaller than the stride {stride} or the dilation {dilation}"
                ),
            ));
        }
        let shape = [in_channels, out_channels / groups, kernel_size, kernel_size];
        let (weight, bias) = weight_and_bias(vs, &shape, out_channels, bias)?;
        let params = ConvTranspose2dParams::default()
            .stride(stride)
            .padding(padding)
            .output_padding(output_padding)
            .dilation(dilation)
            .groups(groups);
        Ok(ConvTranspose2d { weight, bias, in_channels, params })
    }
}

impl Module for Conv1d {
    fn forward(&self, x: &Var) -> Result<Var> {
        check_input("Conv1d", x, "[N, C, L]", self.in_channels)?;
        x.conv1d(&self.weight, self.bias.as_ref(), self.params)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Var) -> Result<Var> {
        check_input("Conv2d", x, "[N, C, H, W]", self.in_channels)?;
        x.conv2d(&self.weight, self.bias.as_ref(), self.params)
    }
}

impl Module for ConvTranspose2d {
    fn forward(&self, x: &Var) -> Result<Var> {
        check_input("ConvTranspose2d", x, "[N, C, H, W]", self.in_channels)?;
        x.conv_transpose2d(&self.weight, self.bias.as_ref(), self.params)
    }
}

/// The channel counts of a convolution layer, checked at construction.
struct Channels {
    layer: &'static str,
    in_channels: usize,
    out_channels: usize,
    groups: usize,
}

impl Channels {
    /// Groups that divide both channel counts, and a kernel, stride and dilation of at least 1.
    fn check(&self, kernel_size: usize, stride: usize, dilation: usize) -> Result<()> {
        let Channels { layer, in_channels, out_channels, groups } = *self;
        if groups == 0 || !in_channels.is_multiple_of(groups) || !out_channels.is_multiple_of(groups) {
            return Err(Error::invalid(
                layer,
                format!(
                    "in_channels {in_channels} and out_channels {out_channels} must both be multiples of groups {groups}"
                ),
            ));
        }
        for (name, value) in [("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)] {
            if value == 0 {
                return Err(Error::invalid(layer, format!("{name} must be >= 1")));
            }
        }
        Ok(())
    }
}

/// Registers `weight` of `shape` and, if asked, `bias` `[out_channels]`, both with
/// PyTorch's default initialisation for convolutions.
fn weight_and_bias(vs: &VarStore, shape: &[usize], out_channels: usize, bias: bool) -> Result<(Var, Option<Var>)> {
    let weight_init = init::kaiming_uniform(shape, 5f64.sqrt(), FanMode::FanIn, Nonlinearity::LeakyRelu)?;
    let weight = vs.param("weight", shape, weight_init)?;
    let bias = if bias { Some(vs.param("bias", [out_channels], init::bias_uniform(shape)?)?) } else { None };
    Ok((weight, bias))
}

/// Checks that `x` has the rank of `layout` and `in_channels` channels in dim 1.
fn check_input(layer: &'static str, x: &Var, layout: &str, in_channels: usize) -> Result<()> {
    let rank = layout.split(',').count();
    if x.rank() != rank {
        return Err(Error::bad_shape(layer, &x.shape(), format!("expected a {rank}-d input {layout}")));
    }
    let channels = x.dims()[1];
    if channels != in_channels {
        return Err(Error::bad_shape(
            layer,
            &x.shape(),
            format!("has {channels} channels, expected {in_channels} (in_channels)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Fixture, max_abs};
    use aigc_autograd::gradcheck;
    use aigc_tensor::{DType, Device, Tensor};

    fn store() -> VarStore {
        VarStore::new(DType::F32, &Device::Cpu, 0)
    }

    #[test]
    fn convolutions_match_pytorch() {
        let fx = Fixture::layers();
        let vs = store();
        let grouped = ConvConfig { stride: 2, padding: 1, dilation: 2, groups: 2, bias: true };
        let conv1d = Conv1d::new(&vs.pp("conv1d"), 4, 6, 3, grouped).unwrap();
        fx.check_layer("conv1d", &vs.pp("conv1d"), |x| conv1d.forward(x));
        let conv2d = Conv2d::new(&vs.pp("conv2d"), 4, 6, 3, ConvConfig { dilation: 1, ..grouped }).unwrap();
        fx.check_layer("conv2d", &vs.pp("conv2d"), |x| conv2d.forward(x));
        let dilated = ConvConfig { padding: 2, dilation: 2, bias: false, ..Default::default() };
        let conv2d_dilated = Conv2d::new(&vs.pp("conv2d_dilated"), 3, 4, 3, dilated).unwrap();
        fx.check_layer("conv2d_dilated", &vs.pp("conv2d_dilated"), |x| conv2d_dilated.forward(x));
    }

    #[test]
    fn transposed_convolutions_match_pytorch() {
        let fx = Fixture::layers();
        let vs = store();
        let config =
            ConvTranspose2dConfig { stride: 2, padding: 1, output_padding: 1, groups: 2, ..Default::default() };
        let up = ConvTranspose2d::new(&vs.pp("conv_transpose2d"), 4, 6, 3, config).unwrap();
        fx.check_layer("conv_transpose2d", &vs.pp("conv_transpose2d"), |x| up.forward(x));
        let config = ConvTranspose2dConfig { padding: 1, dilation: 2, bias: false, ..Default::default() };
        let dilated = ConvTranspose2d::new(&vs.pp("conv_transpose2d_dilated"), 3, 2, 2, config).unwrap();
        fx.check_layer("conv_transpose2d_dilated", &vs.pp("conv_transpose2d_dilated"), |x| dilated.forward(x));
    }

    #[test]
    fn parameters_have_pytorch_shapes_and_bounds() {
        let vs = store();
        let config = ConvConfig { groups: 2, ..Default::default() };
        let conv = Conv2d::new(&vs.pp("conv"), 8, 16, 5, config).unwrap();
        let up =
            ConvTranspose2d::new(&vs.pp("up"), 8, 16, 5, ConvTranspose2dConfig { groups: 2, ..Default::default() })
                .unwrap();
        let conv1d = Conv1d::new(&vs.pp("conv1d"), 3, 2, 4, ConvConfig { bias: false, ..Default::default() }).unwrap();
        assert_eq!(conv.weight.dims(), [16, 4, 5, 5]);
        assert_eq!(up.weight.dims(), [8, 8, 5, 5]);
        assert_eq!(conv1d.weight.dims(), [2, 3, 4]);
        assert!(conv1d.bias.is_none());
        // fan_in = weight.dim(1) * k * k for both layouts: 4 * 25 and 8 * 25.
        for (param, fan_in) in [(&conv.weight, 100.0), (conv.bias.as_ref().unwrap(), 100.0), (&up.weight, 200.0)] {
            let (max, bound) = (max_abs(param.value()), 1.0 / f64::sqrt(fan_in));
            assert!(max <= bound && max > 0.9 * bound, "max {max}, bound {bound}");
        }
        let (max, bound) = (max_abs(up.bias.as_ref().unwrap().value()), 1.0 / 200f64.sqrt());
        assert!(max <= bound, "bias max {max}, bound {bound}");
        let names: Vec<String> = vs.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["conv.weight", "conv.bias", "up.weight", "up.bias", "conv1d.weight"]);
    }

    #[test]
    fn conv2d_gradchecks_in_f64() {
        let vs = VarStore::new(DType::F64, &Device::Cpu, 1);
        let config = ConvConfig { stride: 2, padding: 1, groups: 2, ..Default::default() };
        let conv = Conv2d::new(&vs, 2, 4, 3, config).unwrap();
        let x = Tensor::normal([1, 2, 4, 4], 0.0, 1.0, DType::F64, &Device::Cpu, 3).unwrap();
        gradcheck(|v| conv.forward(&v[0]), &[&x], "Conv2d").unwrap();
    }

    #[test]
    fn bad_inputs_and_configs_are_errors_naming_the_layer() {
        let vs = store();
        let conv = Conv2d::new(&vs.pp("conv"), 3, 4, 3, Default::default()).unwrap();
        let x = |dims: &[usize]| Var::constant(Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap());
        let err = conv.forward(&x(&[2, 5, 8, 8])).unwrap_err().to_string();
        assert_eq!(err, "Conv2d: input of shape [2, 5, 8, 8]: has 5 channels, expected 3 (in_channels)");
        let err = conv.forward(&x(&[3, 8, 8])).unwrap_err().to_string();
        assert_eq!(err, "Conv2d: input of shape [3, 8, 8]: expected a 4-d input [N, C, H, W]");
        let conv1d = Conv1d::new(&vs.pp("conv1d"), 3, 4, 3, Default::default()).unwrap();
        let err = conv1d.forward(&x(&[2, 3, 8, 8])).unwrap_err().to_string();
        assert_eq!(err, "Conv1d: input of shape [2, 3, 8, 8]: expected a 3-d input [N, C, L]");
        let err = Conv2d::new(&vs.pp("g"), 3, 4, 3, ConvConfig { groups: 2, ..Default::default() }).err().unwrap();
        assert_eq!(err.to_string(), "Conv2d: in_channels 3 and out_channels 4 must both be multiples of groups 2");
        let err = Conv1d::new(&vs.pp("s"), 3, 4, 3, ConvConfig { stride: 0, ..Default::default() }).err().unwrap();
        assert_eq!(err.to_string(), "Conv1d: stride must be >= 1");
        let config = ConvTranspose2dConfig { stride: 2, output_padding: 2, ..Default::default() };
        let err = ConvTranspose2d::new(&vs.pp("t"), 3, 4, 3, config).err().unwrap().to_string();
        assert_eq!(err, "ConvTranspose2d: output_padding 2 must be smaller than the stride 2 or the dilation 1");
    }
}

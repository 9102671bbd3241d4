//! Normalisation layers over features, each a thin layer around a fused `Var` op:
//!
//! - [`LayerNorm`] (Ba, Kiros & Hinton 2016, "Layer Normalization", eq. 4): over the last
//!   dim, `y = (x - mean) / sqrt(var + eps) * weight + bias` with the biased variance.
//! - [`RmsNorm`] (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", eq. 4):
//!   `y = x / sqrt(mean(x^2) + eps) * weight`, no centring and no bias.
//! - [`GroupNorm`] (Wu & He 2018, "Group Normalization", eq. 1-3): on `[N, C, *]`, the
//!   channels split into groups and each (sample, group) is normalised over its channels
//!   and positions; then a per-channel `weight` and `bias`.
//!
//! Parameters, names and defaults are PyTorch's (`nn.LayerNorm`, `nn.RMSNorm`,
//! `nn.GroupNorm`): `weight` starts at ones and `bias` at zeros.

use crate::{Init, Module, VarStore};
use aigc_autograd::Var;
use aigc_tensor::{DType, Error, Result};

/// The options of a [`LayerNorm`], PyTorch's defaults in [`Default`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerNormConfig {
    /// Added to the variance before the square root (default `1e-5`).
    pub eps: f64,
    /// Learn a per-feature scale (and shift, see `bias`): PyTorch's `elementwise_affine`
    /// (default `true`).
    pub affine: bool,
    /// Learn the shift too; only read when `affine` (default `true`). GPT-style models
    /// without biases set it to `false`.
    pub bias: bool,
}

impl Default for LayerNormConfig {
    fn default() -> Self {
        LayerNormConfig { eps: 1e-5, affine: true, bias: true }
    }
}

/// Layer normalisation over the last dim of size `dim`.
pub struct LayerNorm {
    /// The scale `[dim]`, when affine.
    pub weight: Option<Var>,
    /// The shift `[dim]`, when affine with a bias.
    pub bias: Option<Var>,
    dim: usize,
    eps: f64,
}

impl LayerNorm {
    /// LayerNorm over a last dim of size `dim`, with weight and bias (PyTorch's defaults).
    pub fn new(vs: &VarStore, dim: usize) -> Result<LayerNorm> {
        Self::with_config(vs, dim, LayerNormConfig::default())
    }

    /// LayerNorm over a last dim of size `dim` with the given options.
    pub fn with_config(vs: &VarStore, dim: usize, config: LayerNormConfig) -> Result<LayerNorm> {
        let weight = config.affine.then(|| vs.param("weight", [dim], Init::Const(1.0))).transpose()?;
        let bias = (config.affine && config.bias).then(|| vs.param("bias", [dim], Init::Const(0.0))).transpose()?;
        Ok(LayerNorm { weight, bias, dim, eps: config.eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Var) -> Result<Var> {
        check_last_dim("LayerNorm", x, self.dim)?;
        x.layer_norm(1, self.weight.as_ref(), self.bias.as_ref(), self.eps)
    }
}

/// Root-mean-square normalisation over the last dim of size `dim`, with a learnt scale.
pub struct RmsNorm {
    /// The scale `[dim]`, starting at ones.
    pub weight: Var,
    dim: usize,
    /// `None`: the machine epsilon of the input's dtype, as PyTorch's `eps=None`.
    eps: Option<f64>,
}

impl RmsNorm {
    /// RMSNorm over a last dim of size `dim` with PyTorch's `nn.RMSNorm` default `eps=None`:
    /// at each forward, `eps` is the machine epsilon of the input's dtype
    /// (`torch.finfo(dtype).eps`: `2^-23` for f32, `2^-52` for f64). Many LLM codebases
    /// (LLaMA: `1e-6`, T5: `1e-6`) pass an explicit value instead: use [`RmsNorm::with_eps`].
    pub fn new(vs: &VarStore, dim: usize) -> Result<RmsNorm> {
        Self::build(vs, dim, None)
    }

    /// RMSNorm over a last dim of size `dim` with a fixed `eps`.
    pub fn with_eps(vs: &VarStore, dim: usize, eps: f64) -> Result<RmsNorm> {
        Self::build(vs, dim, Some(eps))
    }

    fn build(vs: &VarStore, dim: usize, eps: Option<f64>) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: vs.param("weight", [dim], Init::Const(1.0))?, dim, eps })
    }
}

/// `torch.finfo(dtype).eps`: the gap between 1 and the next representable number.
fn machine_epsilon(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON,
        DType::F16 => 2f64.powi(-10),
        DType::BF16 => 2f64.powi(-7),
        _ => f32::EPSILON as f64,
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Var) -> Result<Var> {
        check_last_dim("RmsNorm", x, self.dim)?;
        x.rms_norm(Some(&self.weight), self.eps.unwrap_or_else(|| machine_epsilon(x.dtype())))
    }
}

/// Group normalisation of `[N, C, *]` inputs: `num_groups` groups of `C / num_groups`
/// channels, with a per-channel weight and bias.
pub struct GroupNorm {
    /// The per-channel scale `[C]`, starting at ones.
    pub weight: Var,
    /// The per-channel shift `[C]`, starting at zeros.
    pub bias: Var,
    num_groups: usize,
    num_channels: usize,
    eps: f64,
}

impl GroupNorm {
    /// GroupNorm with PyTorch's default `eps = 1e-5`.
    pub fn new(vs: &VarStore, num_groups: usize, num_channels: usize) -> Result<GroupNorm> {
        Self::with_eps(vs, num_groups, num_channels, 1e-5)
    }

    /// GroupNorm with the given `eps`. `num_channels` must be a multiple of `num_groups`.
    pub fn with_eps(vs: &VarStore, num_groups: usize, num_channels: usize, eps: f64) -> Result<GroupNorm> {
        if num_groups == 0 || !num_channels.is_multiple_of(num_groups) {
            return Err(Error::invalid(
                "GroupNorm",
                format!("num_channels {num_channels} must be a positive multiple of num_groups {num_groups}"),
            ));
        }
        let weight = vs.param("weight", [num_channels], Init::Const(1.0))?;
        let bias = vs.param("bias", [num_channels], Init::Const(0.0))?;
        Ok(GroupNorm { weight, bias, num_groups, num_channels, eps })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Var) -> Result<Var> {
        if x.rank() < 2 || x.dims()[1] != self.num_channels {
            return Err(Error::bad_shape(
                "GroupNorm",
                &x.shape(),
                format!("expected [N, {}, *] (num_channels in dim 1)", self.num_channels),
            ));
        }
        x.group_norm(self.num_groups, Some(&self.weight), Some(&self.bias), self.eps)
    }
}

/// Checks that `x`'s last dim is the `dim` that `layer` normalises.
fn check_last_dim(layer: &'static str, x: &Var, dim: usize) -> Result<()> {
    match x.dims().last() {
        Some(&last) if last == dim => Ok(()),
        _ => {
            Err(Error::bad_shape(layer, &x.shape(), format!("expected a last dim of size {dim} (the normalised dim)")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Fixture, Tol, assert_close};
    use aigc_autograd::gradcheck;
    use aigc_tensor::{Device, Tensor};

    fn store(dtype: DType) -> VarStore {
        VarStore::new(dtype, &Device::Cpu, 0)
    }

    #[test]
    fn parameters_are_named_and_initialised_like_pytorch() {
        let vs = store(DType::F32);
        let ln = LayerNorm::new(&vs.pp("ln"), 3).unwrap();
        LayerNorm::with_config(&vs.pp("ln_nobias"), 3, LayerNormConfig { bias: false, ..Default::default() }).unwrap();
        LayerNorm::with_config(&vs.pp("ln_plain"), 3, LayerNormConfig { affine: false, ..Default::default() }).unwrap();
        RmsNorm::new(&vs.pp("rms"), 3).unwrap();
        GroupNorm::new(&vs.pp("gn"), 2, 4).unwrap();
        let names: Vec<String> = vs.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["ln.weight", "ln.bias", "ln_nobias.weight", "rms.weight", "gn.weight", "gn.bias"]);
        assert_eq!(ln.weight.unwrap().value().to_vec::<f32>().unwrap(), vec![1.0; 3]);
        assert_eq!(ln.bias.unwrap().value().to_vec::<f32>().unwrap(), vec![0.0; 3]);
    }

    #[test]
    fn norms_match_pytorch() {
        let fx = Fixture::layers();
        let vs = store(DType::F32);
        let cases: Vec<(&str, Box<dyn Module>)> = vec![
            ("layer_norm", Box::new(LayerNorm::new(&vs.pp("layer_norm"), 6).unwrap())),
            (
                "layer_norm_nobias",
                Box::new(
                    LayerNorm::with_config(
                        &vs.pp("layer_norm_nobias"),
                        6,
                        LayerNormConfig { bias: false, ..Default::default() },
                    )
                    .unwrap(),
                ),
            ),
            ("rms_norm", Box::new(RmsNorm::new(&vs.pp("rms_norm"), 6).unwrap())),
            ("rms_norm_eps", Box::new(RmsNorm::with_eps(&vs.pp("rms_norm_eps"), 6, 1e-2).unwrap())),
            ("group_norm", Box::new(GroupNorm::new(&vs.pp("group_norm"), 2, 4).unwrap())),
        ];
        for (case, layer) in &cases {
            fx.check_layer(case, &vs.pp(case), |x| layer.forward(x));
        }
    }

    #[test]
    fn rms_norm_default_eps_is_the_dtype_machine_epsilon() {
        // A zero row: y = 0 / sqrt(0 + eps) * w = 0 for any eps; a tiny row shows eps.
        let vs = store(DType::F64);
        let rms = RmsNorm::new(&vs, 2).unwrap();
        let x = Var::constant(Tensor::new(&[1e-8f64, 1e-8], &Device::Cpu).unwrap());
        let y = rms.forward(&x).unwrap().value().to_vec::<f64>().unwrap();
        let want = 1e-8 / (1e-16 + f64::EPSILON).sqrt();
        assert_close(&y, &[want, want], Tol::scaled(1e-12), "rms_norm f64 eps");
        assert_eq!(machine_epsilon(DType::F32), 1.1920928955078125e-7);
    }

    #[test]
    fn layers_gradcheck_in_f64() {
        let vs = store(DType::F64);
        let ln = LayerNorm::new(&vs.pp("ln"), 3).unwrap();
        let gn = GroupNorm::with_eps(&vs.pp("gn"), 2, 4, 0.1).unwrap();
        let rms = RmsNorm::with_eps(&vs.pp("rms"), 3, 0.1).unwrap();
        let x = Tensor::normal([2, 3], 0.0, 1.0, DType::F64, &Device::Cpu, 1).unwrap();
        gradcheck(|v| ln.forward(&v[0]), &[&x], "LayerNorm").unwrap();
        gradcheck(|v| rms.forward(&v[0]), &[&x], "RmsNorm").unwrap();
        let x = Tensor::normal([2, 4, 3], 0.0, 1.0, DType::F64, &Device::Cpu, 2).unwrap();
        gradcheck(|v| gn.forward(&v[0]), &[&x], "GroupNorm").unwrap();
    }

    #[test]
    fn bad_shapes_and_groups_are_errors_naming_the_layer() {
        let vs = store(DType::F32);
        let x = Var::constant(Tensor::zeros([2, 5], DType::F32, &Device::Cpu).unwrap());
        let err = LayerNorm::new(&vs.pp("ln"), 4).unwrap().forward(&x).unwrap_err().to_string();
        assert_eq!(err, "LayerNorm: input of shape [2, 5]: expected a last dim of size 4 (the normalised dim)");
        let err = RmsNorm::new(&vs.pp("rms"), 4).unwrap().forward(&x).unwrap_err().to_string();
        assert!(err.starts_with("RmsNorm: input of shape [2, 5]"), "{err}");
        let err = GroupNorm::new(&vs.pp("gn"), 2, 4).unwrap().forward(&x).unwrap_err().to_string();
        assert_eq!(err, "GroupNorm: input of shape [2, 5]: expected [N, 4, *] (num_channels in dim 1)");
        let err = GroupNorm::new(&vs.pp("gn3"), 3, 4).err().unwrap().to_string();
        assert_eq!(err, "GroupNorm: num_channels 4 must be a positive multiple of num_groups 3");
    }
}

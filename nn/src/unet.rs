//! The building blocks of a diffusion UNet (Ho, Jain & Abbeel 2020, "Denoising Diffusion
//! Probabilistic Models", appendix B: a PixelCNN++-style UNet of wide residual blocks with
//! group normalisation, self-attention at low resolution, and the timestep fed to every
//! residual block). Parameter names are diffusers' (`ResnetBlock2D`, `Attention`,
//! `Downsample2D`, `Upsample2D`), so their state dicts load key for key.
//!
//! - [`ResBlock`]: `h = conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(temb))`,
//!   `h = conv2(dropout(SiLU(norm2(h))))`, output `shortcut(x) + h`.
//! - [`AttentionBlock`]: self-attention over the `H * W` positions of a feature map,
//!   channels as features, in a residual connection.
//! - [`Downsample`], [`Upsample`]: halve or double the resolution.

use crate::attention::{merge_heads, split_heads};
use crate::conv::{Conv2d, Conv2dConfig};
use crate::dropout::Dropout;
use crate::norm::GroupNorm;
use crate::{Linear, Module, VarStore};
use aigc_autograd::Var;
use aigc_tensor::{Error, Result};

/// Checks that `x` is `[B, channels, H, W]`.
fn check_feature_map(layer: &'static str, x: &Var, channels: usize) -> Result<()> {
    match x.dims() {
        &[_, c, _, _] if c == channels => Ok(()),
        _ => Err(Error::bad_shape(layer, &x.shape(), format!("expected [B, {channels}, H, W]"))),
    }
}

/// A 3x3 convolution with padding 1 and the given stride, at `vs.pp(name)`.
fn conv3x3(vs: &VarStore, name: &str, in_channels: usize, out_channels: usize, stride: usize) -> Result<Conv2d> {
    Conv2d::new(&vs.pp(name), in_channels, out_channels, 3, Conv2dConfig { stride, padding: 1, ..Default::default() })
}

/// The options of a [`ResBlock`]; diffusers' `ResnetBlock2D` defaults in [`Default`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResBlockConfig {
    /// Groups of both GroupNorms (default 32; must divide both channel counts).
    pub groups: usize,
    /// The GroupNorms' epsilon (default 1e-6).
    pub eps: f64,
    /// Dropout before `conv2`, in training mode (default 0; DDPM uses 0.1 on CIFAR-10).
    pub dropout: f64,
}

impl Default for ResBlockConfig {
    fn default() -> Self {
        ResBlockConfig { groups: 32, eps: 1e-6, dropout: 0.0 }
    }
}

/// A residual block conditioned on a time embedding (diffusers' `ResnetBlock2D`).
pub struct ResBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    /// Projects `SiLU(temb)` to one offset per output channel; absent without a time embedding.
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    dropout: Dropout,
    pub conv2: Conv2d,
    /// A 1x1 convolution that matches the channels of the skip path when they change.
    pub conv_shortcut: Option<Conv2d>,
    in_channels: usize,
}

impl ResBlock {
    /// `in_channels -> out_channels`, reading a time embedding of width `temb_channels`
    /// (or none).
    pub fn new(
        vs: &VarStore,
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        config: ResBlockConfig,
    ) -> Result<ResBlock> {
        let norm = |name: &str, channels| GroupNorm::with_eps(&vs.pp(name), config.groups, channels, config.eps);
        Ok(ResBlock {
            norm1: norm("norm1", in_channels)?,
            conv1: conv3x3(vs, "conv1", in_channels, out_channels, 1)?,
            time_emb_proj: temb_channels.map(|t| Linear::new(&vs.pp("time_emb_proj"), t, out_channels)).transpose()?,
            norm2: norm("norm2", out_channels)?,
            dropout: Dropout::new(vs, config.dropout)?,
            conv2: conv3x3(vs, "conv2", out_channels, out_channels, 1)?,
            conv_shortcut: (in_channels != out_channels)
                .then(|| Conv2d::new(&vs.pp("conv_shortcut"), in_channels, out_channels, 1, Default::default()))
                .transpose()?,
            in_channels,
        })
    }

    /// `x [B, in, H, W]` with the time embedding `temb [B, temb_channels]` (pass `None`
    /// exactly when the block has no time embedding) -> `[B, out, H, W]`.
    pub fn forward(&self, x: &Var, temb: Option<&Var>) -> Result<Var> {
        check_feature_map("ResBlock", x, self.in_channels)?;
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => h.add(&self.time_offsets(proj, temb, x.dims()[0])?)?,
            (None, None) => h,
            _ => {
                let reason = match &self.time_emb_proj {
                    Some(proj) => {
                        format!("this block reads a time embedding [B, {}]; none was given", proj.weight.dims()[1])
                    }
                    None => "this block was built without a time embedding, but one was given".to_string(),
                };
                return Err(Error::invalid("ResBlock", reason));
            }
        };
        let h = self.conv2.forward(&self.dropout.forward(&self.norm2.forward(&h)?.silu()?)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        shortcut.add(&h)
    }

    /// `time_emb_proj(SiLU(temb))` as `[B, out, 1, 1]`, to broadcast over H and W.
    fn time_offsets(&self, proj: &Linear, temb: &Var, batch: usize) -> Result<Var> {
        let width = proj.weight.dims()[1];
        if temb.dims() != [batch, width] {
            return Err(Error::bad_shape(
                "ResBlock",
                &temb.shape(),
                format!("temb must be [B, {width}] = [{batch}, {width}]"),
            ));
        }
        let offsets = proj.forward(&temb.silu()?)?;
        offsets.reshape([batch, offsets.dims()[1], 1, 1])
    }
}

/// The options of an [`AttentionBlock`]; diffusers' defaults in [`Default`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionBlockConfig {
    /// Attention heads (default 1, as DDPM); must divide the channels.
    pub num_heads: usize,
    /// Groups of the GroupNorm (default 32).
    pub groups: usize,
    /// The GroupNorm's epsilon (default 1e-5).
    pub eps: f64,
}

impl Default for AttentionBlockConfig {
    fn default() -> Self {
        AttentionBlockConfig { num_heads: 1, groups: 32, eps: 1e-5 }
    }
}

/// Self-attention over the positions of a feature map (diffusers' `Attention` as used in
/// the UNet): `x + to_out(Attention(to_q(h), to_k(h), to_v(h)))` with
/// `h = group_norm(x)` seen as `H * W` tokens of `C` features.
pub struct AttentionBlock {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// The output projection, named `to_out.0` (diffusers keeps it in a list with a dropout).
    pub to_out: Linear,
    channels: usize,
    num_heads: usize,
}

impl AttentionBlock {
    /// Attention over `channels`-wide positions.
    pub fn new(vs: &VarStore, channels: usize, config: AttentionBlockConfig) -> Result<AttentionBlock> {
        if config.num_heads == 0 || !channels.is_multiple_of(config.num_heads) {
            let reason = format!("channels {channels} must be divisible by num_heads {}", config.num_heads);
            return Err(Error::invalid("AttentionBlock", reason));
        }
        let linear = |name: &str| Linear::new(&vs.pp(name), channels, channels);
        Ok(AttentionBlock {
            group_norm: GroupNorm::with_eps(&vs.pp("group_norm"), config.groups, channels, config.eps)?,
            to_q: linear("to_q")?,
            to_k: linear("to_k")?,
            to_v: linear("to_v")?,
            to_out: Linear::new(&vs.pp("to_out").pp(0), channels, channels)?,
            channels,
            num_heads: config.num_heads,
        })
    }
}

impl Module for AttentionBlock {
    /// `[B, C, H, W] -> [B, C, H, W]`.
    fn forward(&self, x: &Var) -> Result<Var> {
        check_feature_map("AttentionBlock", x, self.channels)?;
        let &[b, c, h, w] = x.dims() else { unreachable!("checked above") };
        let tokens = self.group_norm.forward(x)?.reshape([b, c, h * w])?.transpose(1, 2)?;
        let heads = |proj: &Linear| split_heads(&proj.forward(&tokens)?, self.num_heads);
        let attended = Var::scaled_dot_product_attention(
            &heads(&self.to_q)?,
            &heads(&self.to_k)?,
            &heads(&self.to_v)?,
            None,
            false,
            None,
        )?;
        let out = self.to_out.forward(&merge_heads(&attended)?)?;
        x.add(&out.transpose(1, 2)?.reshape([b, c, h, w])?)
    }
}

/// Halves the resolution (diffusers' `Downsample2D`).
pub enum Downsample {
    /// A 3x3 convolution with stride 2 and padding 1, named `conv`.
    Conv(Conv2d),
    /// 2x2 average pooling, no parameters.
    AvgPool,
}

impl Downsample {
    /// The learned form: `channels -> out_channels` by a strided 3x3 convolution.
    pub fn conv(vs: &VarStore, channels: usize, out_channels: usize) -> Result<Downsample> {
        Ok(Downsample::Conv(conv3x3(vs, "conv", channels, out_channels, 2)?))
    }
}

impl Module for Downsample {
    /// `[B, C, H, W] -> [B, C', ceil(H / 2), ceil(W / 2)]` (conv) or `floor` (pool).
    fn forward(&self, x: &Var) -> Result<Var> {
        match self {
            Downsample::Conv(conv) => conv.forward(x),
            Downsample::AvgPool => x.avg_pool2d([2, 2], [2, 2], [0, 0]),
        }
    }
}

/// Doubles the resolution (diffusers' `Upsample2D`): nearest-neighbour x2, then a 3x3
/// convolution `conv` (which smooths the blocky upsampling).
pub struct Upsample {
    pub conv: Conv2d,
}

impl Upsample {
    /// `channels -> out_channels`.
    pub fn new(vs: &VarStore, channels: usize, out_channels: usize) -> Result<Upsample> {
        Ok(Upsample { conv: conv3x3(vs, "conv", channels, out_channels, 1)? })
    }
}

impl Module for Upsample {
    /// `[B, C, H, W] -> [B, C', 2H, 2W]`.
    fn forward(&self, x: &Var) -> Result<Var> {
        let &[_, _, h, w] = x.dims() else {
            return Err(Error::bad_shape("Upsample", &x.shape(), "expected [B, C, H, W]"));
        };
        self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Fixture, Tol};
    use aigc_autograd::gradcheck;
    use aigc_tensor::{DType, Device, Tensor};

    fn f64_store() -> VarStore {
        VarStore::new(DType::F64, &Device::Cpu, 0)
    }

    fn names(vs: &VarStore) -> Vec<String> {
        vs.named_parameters().into_iter().map(|(n, _)| n).collect()
    }

    fn random(shape: &[usize], seed: u64) -> Var {
        Var::constant(Tensor::randn(shape, &Device::Cpu, seed).unwrap().to_dtype(DType::F64).unwrap())
    }

    fn zero_out(params: &[&Var]) {
        for p in params {
            p.value().assign_(&p.value().zeros_like().unwrap()).unwrap();
        }
    }

    #[test]
    fn res_block_matches_the_torch_twin() {
        let (fx, vs) = (Fixture::attention(), f64_store());
        let block = ResBlock::new(&vs, 8, 16, Some(12), ResBlockConfig { groups: 4, ..Default::default() }).unwrap();
        let want = ["norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"]
            .iter()
            .flat_map(|l| [format!("{l}.weight"), format!("{l}.bias")])
            .collect::<Vec<_>>();
        assert_eq!(names(&vs), want);
        fx.load_params(&vs, "resblock");
        let (x, temb) = (Var::constant(fx.get("resblock.x")), Var::constant(fx.get("resblock.temb")));
        let out = block.forward(&x, Some(&temb)).unwrap();
        fx.assert_matches(out.value(), "resblock.out", Tol::abs(1e-12));
    }

    #[test]
    fn attention_block_matches_the_torch_twin() {
        let (fx, vs) = (Fixture::attention(), f64_store());
        let config = AttentionBlockConfig { num_heads: 2, groups: 4, ..Default::default() };
        let block = AttentionBlock::new(&vs, 16, config).unwrap();
        assert!(names(&vs).contains(&"to_out.0.weight".to_string()));
        fx.load_params(&vs, "attnblock");
        let out = block.forward(&Var::constant(fx.get("attnblock.x"))).unwrap();
        fx.assert_matches(out.value(), "attnblock.out", Tol::abs(1e-12));
    }

    #[test]
    fn down_and_upsampling_match_pytorch() {
        let (fx, vs) = (Fixture::attention(), f64_store());
        let (down, up) = (Downsample::conv(&vs.pp("down"), 8, 8).unwrap(), Upsample::new(&vs.pp("up"), 8, 4).unwrap());
        fx.load_params(&vs, "");
        let x = Var::constant(fx.get("down.x"));
        fx.assert_matches(down.forward(&x).unwrap().value(), "down.out", Tol::abs(1e-12));
        fx.assert_matches(up.forward(&x).unwrap().value(), "up.out", Tol::abs(1e-12));
        let pooled = Downsample::AvgPool.forward(&x).unwrap();
        assert_eq!(pooled.dims(), &[2, 8, 2, 3]);
        let corner: f64 =
            [(0, 0), (0, 1), (1, 0), (1, 1)].iter().map(|&(i, j)| x.value().to_vec::<f64>().unwrap()[i * 6 + j]).sum();
        assert!((pooled.value().to_vec::<f64>().unwrap()[0] - corner / 4.0).abs() < 1e-12);
    }

    #[test]
    fn shapes_and_shortcuts() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        let config = ResBlockConfig { groups: 2, ..Default::default() };
        let same = ResBlock::new(&vs.pp("same"), 4, 4, None, config).unwrap();
        assert!(same.conv_shortcut.is_none() && same.time_emb_proj.is_none());
        let wider = ResBlock::new(&vs.pp("wider"), 4, 6, Some(5), config).unwrap();
        let x = Var::constant(Tensor::randn([2, 4, 5, 7], &Device::Cpu, 1).unwrap());
        let temb = Var::constant(Tensor::randn([2, 5], &Device::Cpu, 2).unwrap());
        assert_eq!(same.forward(&x, None).unwrap().dims(), &[2, 4, 5, 7]);
        let h = wider.forward(&x, Some(&temb)).unwrap();
        assert_eq!(h.dims(), &[2, 6, 5, 7]);
        let attn =
            AttentionBlock::new(&vs.pp("attn"), 6, AttentionBlockConfig { groups: 3, ..Default::default() }).unwrap();
        assert_eq!(attn.forward(&h).unwrap().dims(), &[2, 6, 5, 7]);
        let down = Downsample::conv(&vs.pp("down"), 6, 8).unwrap().forward(&h).unwrap();
        assert_eq!(down.dims(), &[2, 8, 3, 4], "ceil(5 / 2), ceil(7 / 2)");
        assert_eq!(Upsample::new(&vs.pp("up"), 8, 6).unwrap().forward(&down).unwrap().dims(), &[2, 6, 6, 8]);
    }

    #[test]
    fn zeroed_output_layers_make_the_blocks_identities() {
        // DDPM initialises each block's last layer to zero, so that a block starts as the identity.
        let vs = f64_store();
        let block =
            ResBlock::new(&vs.pp("res"), 4, 4, Some(3), ResBlockConfig { groups: 2, ..Default::default() }).unwrap();
        let attn = AttentionBlock::new(
            &vs.pp("attn"),
            4,
            AttentionBlockConfig { groups: 2, num_heads: 2, ..Default::default() },
        )
        .unwrap();
        zero_out(&[
            &block.conv2.weight,
            block.conv2.bias.as_ref().unwrap(),
            &attn.to_out.weight,
            attn.to_out.bias.as_ref().unwrap(),
        ]);
        let (x, temb) = (random(&[2, 4, 3, 3], 1), random(&[2, 3], 2));
        let want = x.value().to_vec::<f64>().unwrap();
        assert_eq!(block.forward(&x, Some(&temb)).unwrap().value().to_vec::<f64>().unwrap(), want);
        assert_eq!(attn.forward(&x).unwrap().value().to_vec::<f64>().unwrap(), want);
    }

    #[test]
    fn res_block_gradients_match_finite_differences() {
        let vs = f64_store();
        let block = ResBlock::new(&vs, 4, 6, Some(3), ResBlockConfig { groups: 2, ..Default::default() }).unwrap();
        let (x, temb) = (random(&[1, 4, 3, 3], 1), random(&[1, 3], 2));
        gradcheck(|v| block.forward(&v[0], Some(&v[1])), &[x.value(), temb.value()], "ResBlock").unwrap();
        let attn = AttentionBlock::new(
            &vs.pp("attn"),
            4,
            AttentionBlockConfig { groups: 2, num_heads: 2, ..Default::default() },
        )
        .unwrap();
        gradcheck(|v| attn.forward(&v[0]), &[&x.value().narrow(2, 0, 2).unwrap()], "AttentionBlock").unwrap();
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_block() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        let block =
            ResBlock::new(&vs.pp("res"), 4, 4, Some(3), ResBlockConfig { groups: 2, ..Default::default() }).unwrap();
        let x = Var::constant(Tensor::zeros([2, 4, 3, 3], DType::F32, &Device::Cpu).unwrap());
        let err = block.forward(&x, None).unwrap_err().to_string();
        assert!(err.contains("ResBlock: this block reads a time embedding [B, 3]; none was given"), "{err}");
        let temb = Var::constant(Tensor::zeros([2, 5], DType::F32, &Device::Cpu).unwrap());
        let err = block.forward(&x, Some(&temb)).unwrap_err().to_string();
        assert!(err.contains("ResBlock: input of shape [2, 5]: temb must be [B, 3] = [2, 3]"), "{err}");
        let err = block.forward(&x.narrow(1, 0, 3).unwrap(), None).unwrap_err().to_string();
        assert!(err.contains("ResBlock: input of shape [2, 3, 3, 3]: expected [B, 4, H, W]"), "{err}");
        let err = AttentionBlock::new(&vs.pp("attn"), 6, AttentionBlockConfig { num_heads: 4, ..Default::default() });
        assert!(err.err().unwrap().to_string().contains("channels 6 must be divisible by num_heads 4"));
        let err = ResBlock::new(&vs.pp("groups"), 4, 6, None, ResBlockConfig { groups: 4, ..Default::default() });
        assert!(err.err().unwrap().to_string().contains("GroupNorm"));
    }
}

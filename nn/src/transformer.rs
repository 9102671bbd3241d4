//! Transformer encoder and decoder layers and stacks (Vaswani et al. 2017, "Attention Is
//! All You Need", §3.1-3.3), as `torch.nn.TransformerEncoderLayer`,
//! `TransformerDecoderLayer`, `TransformerEncoder` and `TransformerDecoder` with
//! `batch_first=True`: the same parameter names (`self_attn.*`, `multihead_attn.*`,
//! `linear1`, `linear2`, `norm1..3`, stacks under `layers.{i}.` with an optional final
//! `norm`), the same defaults and the same masks.
//!
//! Each sub-layer (attention or the feed-forward network `FFN(x) = W_2 act(W_1 x + b_1) + b_2`)
//! sits in a residual connection with layer normalisation, in one of two places:
//! - post-LN, the paper's `x = LayerNorm(x + Dropout(Sublayer(x)))` (`norm_first = false`);
//! - pre-LN, `x = x + Dropout(Sublayer(LayerNorm(x)))` (`norm_first = true`; Xiong et al.
//!   2020, "On Layer Normalization in the Transformer Architecture"), which GPT-2 uses and
//!   which trains without learning-rate warm-up.

use crate::attention::{AttentionMask, MultiheadAttention, MultiheadAttentionConfig};
use crate::dropout::Dropout;
use crate::norm::{LayerNorm, LayerNormConfig};
use crate::{Linear, Module, VarStore};
use aigc_autograd::Var;
use aigc_tensor::{Result, UnaryOp};

/// The nonlinearity between the two linear maps of the feed-forward network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeedForwardActivation {
    /// `max(x, 0)`, the paper's (PyTorch's default).
    Relu,
    /// GELU with the exact erf form (Hendrycks & Gimpel 2016), as BERT and GPT.
    Gelu,
}

/// The options of a Transformer layer besides `d_model` and `nhead`; PyTorch's defaults
/// in [`Default`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransformerLayerConfig {
    /// Width of the feed-forward hidden layer (default 2048).
    pub dim_feedforward: usize,
    /// Dropout on attention weights, inside the feed-forward network and on each
    /// sub-layer's output, in training mode (default 0.1).
    pub dropout: f64,
    /// The feed-forward nonlinearity (default ReLU).
    pub activation: FeedForwardActivation,
    /// The LayerNorms' epsilon (default 1e-5).
    pub layer_norm_eps: f64,
    /// Pre-LN when true, post-LN (the paper's) when false (default false).
    pub norm_first: bool,
    /// Biases in the linear maps and LayerNorms (default true).
    pub bias: bool,
}

impl Default for TransformerLayerConfig {
    fn default() -> Self {
        TransformerLayerConfig {
            dim_feedforward: 2048,
            dropout: 0.1,
            activation: FeedForwardActivation::Relu,
            layer_norm_eps: 1e-5,
            norm_first: false,
            bias: true,
        }
    }
}

impl TransformerLayerConfig {
    fn attention(&self) -> MultiheadAttentionConfig {
        MultiheadAttentionConfig { bias: self.bias, dropout: self.dropout, ..Default::default() }
    }
    fn layer_norm(&self, vs: &VarStore, d_model: usize) -> Result<LayerNorm> {
        let config = LayerNormConfig { eps: self.layer_norm_eps, affine: true, bias: self.bias };
        LayerNorm::with_config(vs, d_model, config)
    }

    /// A sub-layer in its residual connection: `x + sublayer(norm(x))` when pre-LN,
    /// `norm(x + sublayer(x))` when post-LN.
    fn residual(&self, x: &Var, norm: &LayerNorm, sublayer: impl FnOnce(&Var) -> Result<Var>) -> Result<Var> {
        if self.norm_first { x.add(&sublayer(&norm.forward(x)?)?) } else { norm.forward(&x.add(&sublayer(x)?)?) }
    }
}

/// The position-wise feed-forward network `linear2(dropout(act(linear1(x))))` (§3.3).
pub struct FeedForward {
    pub linear1: Linear,
    pub linear2: Linear,
    dropout: Dropout,
    activation: FeedForwardActivation,
}

impl FeedForward {
    /// `linear1: d_model -> dim_feedforward` and `linear2` back, at `vs`.
    fn new(vs: &VarStore, d_model: usize, config: &TransformerLayerConfig) -> Result<FeedForward> {
        let linear1 = Linear::with_bias(&vs.pp("linear1"), d_model, config.dim_feedforward, config.bias)?;
        let dropout = Dropout::new(vs, config.dropout)?;
        let linear2 = Linear::with_bias(&vs.pp("linear2"), config.dim_feedforward, d_model, config.bias)?;
        Ok(FeedForward { linear1, linear2, dropout, activation: config.activation })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Var) -> Result<Var> {
        let activation = match self.activation {
            FeedForwardActivation::Relu => UnaryOp::Relu,
            FeedForwardActivation::Gelu => UnaryOp::Gelu,
        };
        let hidden = self.linear1.forward_with(x, activation)?;
        self.linear2.forward(&self.dropout.forward(&hidden)?)
    }
}

/// One encoder layer: self-attention, then the feed-forward network, each in a residual
/// connection with a LayerNorm.
pub struct TransformerEncoderLayer {
    pub self_attn: MultiheadAttention,
    /// `linear1` and `linear2` (named at this layer's path, as PyTorch).
    pub feed_forward: FeedForward,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    dropout1: Dropout,
    dropout2: Dropout,
    config: TransformerLayerConfig,
}

impl TransformerEncoderLayer {
    /// A layer of width `d_model` with `nhead` attention heads.
    pub fn new(
        vs: &VarStore,
        d_model: usize,
        nhead: usize,
        config: TransformerLayerConfig,
    ) -> Result<TransformerEncoderLayer> {
        Ok(TransformerEncoderLayer {
            self_attn: MultiheadAttention::with_config(&vs.pp("self_attn"), d_model, nhead, config.attention())?,
            feed_forward: FeedForward::new(vs, d_model, &config)?,
            norm1: config.layer_norm(&vs.pp("norm1"), d_model)?,
            norm2: config.layer_norm(&vs.pp("norm2"), d_model)?,
            dropout1: Dropout::new(vs, config.dropout)?,
            dropout2: Dropout::new(vs, config.dropout)?,
            config,
        })
    }

    /// `src [B, S, d_model]` -> `[B, S, d_model]`; `mask` applies to the self-attention
    /// (PyTorch's `src_mask`, `src_key_padding_mask`, `is_causal`).
    pub fn forward(&self, src: &Var, mask: AttentionMask) -> Result<Var> {
        let x = self
            .config
            .residual(src, &self.norm1, |h| self.dropout1.forward(&self.self_attn.forward(h, h, h, mask)?))?;
        self.config.residual(&x, &self.norm2, |h| self.dropout2.forward(&self.feed_forward.forward(h)?))
    }
}

impl Module for TransformerEncoderLayer {
    /// Without a mask.
    fn forward(&self, x: &Var) -> Result<Var> {
        TransformerEncoderLayer::forward(self, x, AttentionMask::none())
    }
}

/// One decoder layer: masked self-attention, attention over the encoder's output
/// (`memory`), then the feed-forward network, each in a residual connection with a
/// LayerNorm.
pub struct TransformerDecoderLayer {
    pub self_attn: MultiheadAttention,
    /// The cross-attention over `memory`.
    pub multihead_attn: MultiheadAttention,
    /// `linear1` and `linear2` (named at this layer's path, as PyTorch).
    pub feed_forward: FeedForward,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub norm3: LayerNorm,
    dropout1: Dropout,
    dropout2: Dropout,
    dropout3: Dropout,
    config: TransformerLayerConfig,
}

impl TransformerDecoderLayer {
    /// A layer of width `d_model` with `nhead` heads in both attentions.
    pub fn new(
        vs: &VarStore,
        d_model: usize,
        nhead: usize,
        config: TransformerLayerConfig,
    ) -> Result<TransformerDecoderLayer> {
        Ok(TransformerDecoderLayer {
            self_attn: MultiheadAttention::with_config(&vs.pp("self_attn"), d_model, nhead, config.attention())?,
            multihead_attn: MultiheadAttention::with_config(
                &vs.pp("multihead_attn"),
                d_model,
                nhead,
                config.attention(),
            )?,
            feed_forward: FeedForward::new(vs, d_model, &config)?,
            norm1: config.layer_norm(&vs.pp("norm1"), d_model)?,
            norm2: config.layer_norm(&vs.pp("norm2"), d_model)?,
            norm3: config.layer_norm(&vs.pp("norm3"), d_model)?,
            dropout1: Dropout::new(vs, config.dropout)?,
            dropout2: Dropout::new(vs, config.dropout)?,
            dropout3: Dropout::new(vs, config.dropout)?,
            config,
        })
    }

    /// `tgt [B, L, d_model]` attending to itself under `tgt_mask` (usually causal) and
    /// to `memory [B, S, d_model]` under `memory_mask` (usually the source's key
    /// padding); returns `[B, L, d_model]`.
    pub fn forward(&self, tgt: &Var, memory: &Var, tgt_mask: AttentionMask, memory_mask: AttentionMask) -> Result<Var> {
        let x = self
            .config
            .residual(tgt, &self.norm1, |h| self.dropout1.forward(&self.self_attn.forward(h, h, h, tgt_mask)?))?;
        let x = self.config.residual(&x, &self.norm2, |h| {
            self.dropout2.forward(&self.multihead_attn.forward(h, memory, memory, memory_mask)?)
        })?;
        self.config.residual(&x, &self.norm3, |h| self.dropout3.forward(&self.feed_forward.forward(h)?))
    }
}

/// The final LayerNorm of a stack, when asked for (pre-LN stacks need one: their
/// residual stream is never normalised otherwise).
fn final_norm(
    vs: &VarStore,
    d_model: usize,
    config: &TransformerLayerConfig,
    wanted: bool,
) -> Result<Option<LayerNorm>> {
    wanted.then(|| config.layer_norm(&vs.pp("norm"), d_model)).transpose()
}

/// `num_layers` encoder layers (`layers.{i}.`) and an optional final `norm`.
pub struct TransformerEncoder {
    pub layers: Vec<TransformerEncoderLayer>,
    pub norm: Option<LayerNorm>,
}

impl TransformerEncoder {
    /// A stack of identical-shaped layers, each initialised independently; `norm` adds a
    /// final LayerNorm.
    pub fn new(
        vs: &VarStore,
        num_layers: usize,
        d_model: usize,
        nhead: usize,
        config: TransformerLayerConfig,
        norm: bool,
    ) -> Result<TransformerEncoder> {
        let layers = (0..num_layers)
            .map(|i| TransformerEncoderLayer::new(&vs.pp("layers").pp(i), d_model, nhead, config))
            .collect::<Result<_>>()?;
        Ok(TransformerEncoder { layers, norm: final_norm(vs, d_model, &config, norm)? })
    }

    /// Runs every layer under the same `mask`, then the final norm.
    pub fn forward(&self, src: &Var, mask: AttentionMask) -> Result<Var> {
        let x = self.layers.iter().try_fold(src.clone(), |x, layer| layer.forward(&x, mask))?;
        match &self.norm {
            Some(norm) => norm.forward(&x),
            None => Ok(x),
        }
    }
}

impl Module for TransformerEncoder {
    /// Without a mask.
    fn forward(&self, x: &Var) -> Result<Var> {
        TransformerEncoder::forward(self, x, AttentionMask::none())
    }
}

/// `num_layers` decoder layers (`layers.{i}.`) and an optional final `norm`.
pub struct TransformerDecoder {
    pub layers: Vec<TransformerDecoderLayer>,
    pub norm: Option<LayerNorm>,
}

impl TransformerDecoder {
    /// A stack of identical-shaped layers, each initialised independently; `norm` adds a
    /// final LayerNorm.
    pub fn new(
        vs: &VarStore,
        num_layers: usize,
        d_model: usize,
        nhead: usize,
        config: TransformerLayerConfig,
        norm: bool,
    ) -> Result<TransformerDecoder> {
        let layers = (0..num_layers)
            .map(|i| TransformerDecoderLayer::new(&vs.pp("layers").pp(i), d_model, nhead, config))
            .collect::<Result<_>>()?;
        Ok(TransformerDecoder { layers, norm: final_norm(vs, d_model, &config, norm)? })
    }

    /// Runs every layer over the same `memory` and masks, then the final norm.
    pub fn forward(&self, tgt: &Var, memory: &Var, tgt_mask: AttentionMask, memory_mask: AttentionMask) -> Result<Var> {
        let x =
            self.layers.iter().try_fold(tgt.clone(), |x, layer| layer.forward(&x, memory, tgt_mask, memory_mask))?;
        match &self.norm {
            Some(norm) => norm.forward(&x),
            None => Ok(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Fixture, Tol};
    use crate::{AdamConfig, AdamW, Optimizer, loss};
    use aigc_tensor::{DType, Device, Tensor};

    /// The fixture's layers: d_model 8, 2 heads, feed-forward 16, dropout 0.1, 2 layers.
    fn config(norm_first: bool) -> TransformerLayerConfig {
        let activation = if norm_first { FeedForwardActivation::Gelu } else { FeedForwardActivation::Relu };
        TransformerLayerConfig { dim_feedforward: 16, activation, norm_first, ..Default::default() }
    }

    /// A store in eval mode with the fixture's parameters of `case` copied into it, after
    /// checking that our names are exactly PyTorch's.
    fn load(fx: &Fixture, case: &str, vs: &VarStore, inputs: &[&str]) {
        let mut ours: Vec<String> = vs.named_parameters().into_iter().map(|(n, _)| n).collect();
        let theirs: Vec<String> = fx.keys_under(case).into_iter().filter(|k| !inputs.contains(&k.as_str())).collect();
        ours.sort();
        assert_eq!(ours, theirs, "{case}: parameter names");
        fx.load_params(vs, case);
        vs.set_training(false);
    }

    #[test]
    fn post_ln_encoder_with_key_padding_matches_pytorch() {
        let (fx, vs) = (Fixture::attention(), VarStore::new(DType::F64, &Device::Cpu, 0));
        let encoder = TransformerEncoder::new(&vs, 2, 8, 2, config(false), false).unwrap();
        load(&fx, "enc_post", &vs, &["src", "out", "src_key_padding_mask"]);
        let padding = fx.get("enc_post.src_key_padding_mask");
        let src = Var::constant(fx.get("enc_post.src"));
        let out = encoder.forward(&src, AttentionMask::none().with_key_padding(&padding)).unwrap();
        fx.assert_matches(out.value(), "enc_post.out", Tol::abs(1e-12));
    }

    #[test]
    fn pre_ln_causal_encoder_with_final_norm_matches_pytorch() {
        let (fx, vs) = (Fixture::attention(), VarStore::new(DType::F64, &Device::Cpu, 0));
        let encoder = TransformerEncoder::new(&vs, 2, 8, 2, config(true), true).unwrap();
        load(&fx, "enc_pre", &vs, &["src", "out", "src_key_padding_mask"]);
        let out = encoder.forward(&Var::constant(fx.get("enc_pre.src")), AttentionMask::causal()).unwrap();
        fx.assert_matches(out.value(), "enc_pre.out", Tol::abs(1e-12));
    }

    fn check_decoder(case: &str, norm_first: bool) {
        let (fx, vs) = (Fixture::attention(), VarStore::new(DType::F64, &Device::Cpu, 0));
        let decoder = TransformerDecoder::new(&vs, 2, 8, 2, config(norm_first), norm_first).unwrap();
        load(&fx, case, &vs, &["tgt", "memory", "out", "memory_key_padding_mask"]);
        let padding = fx.get(&format!("{case}.memory_key_padding_mask"));
        let (tgt, memory) =
            (Var::constant(fx.get(&format!("{case}.tgt"))), Var::constant(fx.get(&format!("{case}.memory"))));
        let out = decoder
            .forward(&tgt, &memory, AttentionMask::causal(), AttentionMask::none().with_key_padding(&padding))
            .unwrap();
        fx.assert_matches(out.value(), &format!("{case}.out"), Tol::abs(1e-12));
    }

    #[test]
    fn post_ln_decoder_matches_pytorch() {
        check_decoder("dec_post", false);
    }

    #[test]
    fn pre_ln_decoder_with_final_norm_matches_pytorch() {
        check_decoder("dec_pre", true);
    }

    #[test]
    fn layers_have_pytorch_names() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        TransformerDecoderLayer::new(&vs, 8, 2, TransformerLayerConfig { bias: false, ..config(false) }).unwrap();
        let names: Vec<String> = vs.named_parameters().into_iter().map(|(n, _)| n).collect();
        let want = [
            "self_attn.in_proj_weight",
            "self_attn.out_proj.weight",
            "multihead_attn.in_proj_weight",
            "multihead_attn.out_proj.weight",
            "linear1.weight",
            "linear2.weight",
            "norm1.weight",
            "norm2.weight",
            "norm3.weight",
        ];
        assert_eq!(names, want, "without biases");
    }

    #[test]
    fn an_encoder_decoder_learns_to_copy_in_a_few_steps() {
        // Training mode with dropout: the decoder must reproduce the source sequence.
        let dev = Device::Cpu;
        let vs = VarStore::new(DType::F32, &dev, 1);
        let config = TransformerLayerConfig { dim_feedforward: 32, norm_first: true, ..Default::default() };
        let encoder = TransformerEncoder::new(&vs.pp("encoder"), 1, 16, 2, config, true).unwrap();
        let decoder = TransformerDecoder::new(&vs.pp("decoder"), 1, 16, 2, config, true).unwrap();
        let src = Var::constant(Tensor::randn([4, 5, 16], &dev, 7).unwrap());
        let tgt_in = Var::constant(Tensor::randn([4, 5, 16], &dev, 8).unwrap());
        let mut opt = AdamW::adamw(vs.named_parameters(), AdamConfig { lr: 3e-3, ..Default::default() }).unwrap();
        let mut losses = vec![];
        for _ in 0..25 {
            let memory = encoder.forward(&src, AttentionMask::none()).unwrap();
            let out = decoder.forward(&tgt_in, &memory, AttentionMask::causal(), AttentionMask::none()).unwrap();
            let loss = loss::mse(&out, &src).unwrap();
            losses.push(loss.value().to_scalar::<f32>().unwrap());
            opt.zero_grad();
            loss.backward().unwrap();
            opt.step().unwrap();
        }
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(last < 0.7 * first, "loss {first} -> {last}: {losses:?}");
    }
}

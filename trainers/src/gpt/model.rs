//! The GPT model: a decoder-only Transformer language model (Radford et al. 2018/2019,
//! "Improving Language Understanding by Generative Pre-Training", "Language Models are
//! Unsupervised Multitask Learners"), laid out as Karpathy's nanoGPT `model.py` so that
//! parameter names and initialisation match it key for key:
//!
//! ```text
//! x = wte[idx] + wpe[0..T]                      token + learned position embeddings
//! for each block:  x = x + attn(ln_1(x))        pre-LN causal self-attention
//!                  x = x + mlp(ln_2(x))         pre-LN GELU MLP (4x wide)
//! logits = ln_f(x) @ wte^T                      LM head tied to the token embedding
//! ```
//!
//! Attention runs through the fused (online-softmax) attention op. With a [`KvCache`]
//! the model decodes incrementally: each new token attends over the cached keys and
//! values of the earlier ones, so its cost does not grow with their number apart from
//! attention itself.

use aigc_autograd::{CrossEntropyOptions, Var};
use aigc_nn::norm::{LayerNorm, LayerNormConfig};
use aigc_nn::{Init, KvCache, Linear, Module, VarStore};
use aigc_tensor::{DType, Device, Error, Result, Tensor, UnaryOp};

/// The shape and regularisation of a GPT.
#[derive(Clone, Debug, PartialEq)]
pub struct GptConfig {
    pub vocab_size: usize,
    /// The longest context the position embedding covers.
    pub block_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Dropout after the embeddings, the attention output projection and the MLP.
    pub dropout: f64,
    /// Biases in the linear layers and LayerNorms.
    pub bias: bool,
}

impl GptConfig {
    /// nanoGPT's CPU "baby" configuration for character-level tiny Shakespeare
    /// (`config/train_shakespeare_char.py` with its suggested CPU overrides).
    pub fn baby_shakespeare(vocab_size: usize) -> GptConfig {
        GptConfig { vocab_size, block_size: 64, n_layer: 4, n_head: 4, n_embd: 128, dropout: 0.0, bias: false }
    }

    fn check(&self) -> Result<()> {
        let ok = self.vocab_size > 0 && self.block_size > 0 && self.n_layer > 0 && self.n_head > 0;
        if !ok || self.n_embd == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::invalid(
                "GptConfig",
                format!("{self:?}: sizes must be positive and n_embd a multiple of n_head"),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid("GptConfig", format!("dropout {} must be in [0, 1)", self.dropout)));
        }
        Ok(())
    }
}

/// A linear layer initialised as nanoGPT does: weight ~ N(0, std), bias zero.
fn linear(vs: &VarStore, input: usize, output: usize, bias: bool, std: f64) -> Result<Linear> {
    let weight = vs.param("weight", [output, input], Init::Normal { mean: 0.0, std })?;
    let bias = if bias { Some(vs.param("bias", [output], Init::Const(0.0))?) } else { None };
    Ok(Linear { weight, bias })
}

fn layer_norm(vs: &VarStore, dim: usize, bias: bool) -> Result<LayerNorm> {
    LayerNorm::with_config(vs, dim, LayerNormConfig { eps: 1e-5, affine: true, bias })
}

/// Dropout drawn from the store's seed stream, active only in training mode.
fn dropout(vs: &VarStore, x: Var, p: f64) -> Result<Var> {
    if p > 0.0 && vs.is_training() { x.dropout(p, vs.next_seed()) } else { Ok(x) }
}

/// The keys and values of the positions decoded so far: one [`KvCache`] per layer.
pub struct GptCache {
    layers: Vec<KvCache>,
}

impl GptCache {
    /// How many positions are cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, KvCache::len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Multi-head causal self-attention with one fused q/k/v projection (`c_attn`).
struct CausalSelfAttention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
}

impl CausalSelfAttention {
    fn new(vs: &VarStore, cfg: &GptConfig) -> Result<Self> {
        let c = cfg.n_embd;
        let proj_std = 0.02 / ((2 * cfg.n_layer) as f64).sqrt();
        Ok(CausalSelfAttention {
            c_attn: linear(&vs.pp("c_attn"), c, 3 * c, cfg.bias, 0.02)?,
            c_proj: linear(&vs.pp("c_proj"), c, c, cfg.bias, proj_std)?,
            n_head: cfg.n_head,
        })
    }

    /// `x [B, T, C]` attends causally over itself, and over the cached positions of
    /// `layer` when a cache is given (then only the new positions are in `x`).
    fn forward(&self, x: &Var, cache: Option<&mut KvCache>) -> Result<Var> {
        let (b, t, c) = (x.dims()[0], x.dims()[1], x.dims()[2]);
        let heads = |v: Var| v.reshape([b, t, self.n_head, c / self.n_head])?.transpose(1, 2);
        let qkv = self.c_attn.forward(x)?.split(c, 2)?;
        let (q, mut k, mut v) = (heads(qkv[0].clone())?, heads(qkv[1].clone())?, heads(qkv[2].clone())?);
        if let Some(cache) = cache {
            cache.append(k.value(), v.value())?;
            let (k_all, v_all) = cache.keys_values().ok_or_else(|| Error::invalid("Gpt", "empty KV cache"))?;
            (k, v) = (Var::constant(k_all), Var::constant(v_all));
        }
        let y = Var::scaled_dot_product_attention(&q, &k, &v, None, true, None)?;
        self.c_proj.forward(&y.transpose(1, 2)?.reshape([b, t, c])?)
    }
}

/// The position-wise feed-forward network: `c_proj(gelu(c_fc(x)))`.
struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
}

impl Mlp {
    fn new(vs: &VarStore, cfg: &GptConfig) -> Result<Self> {
        let c = cfg.n_embd;
        let proj_std = 0.02 / ((2 * cfg.n_layer) as f64).sqrt();
        Ok(Mlp {
            c_fc: linear(&vs.pp("c_fc"), c, 4 * c, cfg.bias, 0.02)?,
            c_proj: linear(&vs.pp("c_proj"), 4 * c, c, cfg.bias, proj_std)?,
        })
    }
    fn forward(&self, x: &Var) -> Result<Var> {
        self.c_proj.forward(&self.c_fc.forward_with(x, UnaryOp::Gelu)?)
    }
}

/// One pre-LN Transformer decoder block.
struct Block {
    ln_1: LayerNorm,
    attn: CausalSelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(vs: &VarStore, cfg: &GptConfig) -> Result<Self> {
        Ok(Block {
            ln_1: layer_norm(&vs.pp("ln_1"), cfg.n_embd, cfg.bias)?,
            attn: CausalSelfAttention::new(&vs.pp("attn"), cfg)?,
            ln_2: layer_norm(&vs.pp("ln_2"), cfg.n_embd, cfg.bias)?,
            mlp: Mlp::new(&vs.pp("mlp"), cfg)?,
        })
    }
}

/// A GPT language model. Its parameters live in the [`VarStore`] it was built from,
/// under nanoGPT's names (`transformer.h.0.attn.c_attn.weight`, ...).
pub struct Gpt {
    cfg: GptConfig,
    vs: VarStore,
    wte: Var,
    wpe: Var,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
}

impl Gpt {
    /// Builds the model in `vs` with nanoGPT's initialisation: weights ~ N(0, 0.02), the
    /// residual output projections ~ N(0, 0.02 / sqrt(2 n_layer)), biases 0, norms 1.
    pub fn new(vs: &VarStore, cfg: GptConfig) -> Result<Gpt> {
        cfg.check()?;
        let tr = vs.pp("transformer");
        let normal = Init::Normal { mean: 0.0, std: 0.02 };
        let wte = tr.pp("wte").param("weight", [cfg.vocab_size, cfg.n_embd], normal)?;
        let wpe = tr.pp("wpe").param("weight", [cfg.block_size, cfg.n_embd], normal)?;
        let blocks = (0..cfg.n_layer).map(|i| Block::new(&tr.pp("h").pp(i), &cfg)).collect::<Result<_>>()?;
        let ln_f = layer_norm(&tr.pp("ln_f"), cfg.n_embd, cfg.bias)?;
        Ok(Gpt { cfg, vs: vs.clone(), wte, wpe, blocks, ln_f })
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Logits `[B, T, vocab]` for token ids `idx [B, T]` (i64), every position attending
    /// to itself and the positions before it.
    pub fn forward(&self, idx: &Tensor) -> Result<Var> {
        self.run(idx, None)
    }

    /// Logits for the new tokens `idx [B, T_new]` that continue the sequence whose keys
    /// and values are in `cache`, which is extended with theirs. Start from an empty
    /// cache ([`Gpt::new_cache`]) with the prompt; then feed one token at a time. For
    /// inference: run it under `no_grad` (cached keys and values take no gradient).
    pub fn forward_cached(&self, idx: &Tensor, cache: &mut GptCache) -> Result<Var> {
        self.run(idx, Some(cache))
    }

    /// Mean cross-entropy of the next-token predictions for `idx` against `targets` (both `[B, T]`).
    pub fn loss(&self, idx: &Tensor, targets: &Tensor) -> Result<Var> {
        let logits = self.forward(idx)?;
        let flat = logits.reshape([logits.dims()[0] * logits.dims()[1], self.cfg.vocab_size])?;
        flat.cross_entropy(&targets.flatten_all()?, CrossEntropyOptions::default())
    }

    /// An empty cache for [`Gpt::forward_cached`], holding up to `block_size` positions.
    pub fn new_cache(&self) -> GptCache {
        GptCache { layers: (0..self.cfg.n_layer).map(|_| KvCache::new(self.cfg.block_size)).collect() }
    }

    fn run(&self, idx: &Tensor, mut cache: Option<&mut GptCache>) -> Result<Var> {
        const OP: &str = "Gpt::forward";
        if idx.rank() != 2 || idx.dtype() != DType::I64 {
            return Err(Error::bad_shape(
                OP,
                &idx.shape(),
                format!("expected i64 token ids [B, T], got {:?}", idx.dtype()),
            ));
        }
        let (b, t) = (idx.dims()[0], idx.dims()[1]);
        let start = cache.as_ref().map_or(0, |c| c.len());
        if start + t > self.cfg.block_size {
            return Err(Error::invalid(
                OP,
                format!("positions {start}..{} exceed the block size {}", start + t, self.cfg.block_size),
            ));
        }
        let tok = self.wte.embedding(idx)?;
        let pos = self.wpe.narrow(0, start, t)?;
        let mut x = dropout(&self.vs, tok.add(&pos)?, self.cfg.dropout)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[layer]);
            let attn = block.attn.forward(&block.ln_1.forward(&x)?, layer_cache)?;
            x = x.add(&dropout(&self.vs, attn, self.cfg.dropout)?)?;
            let mlp = block.mlp.forward(&block.ln_2.forward(&x)?)?;
            x = x.add(&dropout(&self.vs, mlp, self.cfg.dropout)?)?;
        }
        let h = self.ln_f.forward(&x)?;
        debug_assert_eq!(h.dims(), &[b, t, self.cfg.n_embd]);
        h.matmul(&self.wte.t()?)
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigc_nn::optim::ParamGroup;
    use aigc_nn::{AdamConfig, AdamW, Optimizer, from_safetensors_bytes};
    use std::collections::HashMap;

    fn tiny(bias: bool) -> GptConfig {
        GptConfig { vocab_size: 11, block_size: 8, n_layer: 2, n_head: 2, n_embd: 16, dropout: 0.0, bias }
    }

    fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let (g, w) = (got.to_f64_vec().unwrap(), want.to_f64_vec().unwrap());
        let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0.0, f64::max);
        assert!(worst < tol, "{what}: max relative error {worst:e} > {tol:e}");
    }

    /// llm.c-style golden state: logits, loss, every gradient and the parameters after
    /// three AdamW steps match nanoGPT in PyTorch (fixtures/gpt_golden.py, f64).
    #[test]
    fn gpt_matches_the_pytorch_golden_state() {
        let dev = Device::Cpu;
        let fixture: HashMap<String, Tensor> =
            from_safetensors_bytes(include_bytes!("../../fixtures/gpt_golden.safetensors"), &dev)
                .unwrap()
                .into_iter()
                .collect();
        let vs = VarStore::new(DType::F64, &dev, 0);
        let model = Gpt::new(&vs, tiny(true)).unwrap();
        let params = vs.named_parameters();
        assert_eq!(params.len(), fixture.keys().filter(|k| k.starts_with("init.")).count());
        for (name, p) in &params {
            p.value().assign_(&fixture[&format!("init.{name}")]).unwrap();
        }
        let batch = |i: usize| {
            let b = &fixture[&format!("batch{i}")];
            (b.narrow(1, 0, 8).unwrap(), b.narrow(1, 1, 8).unwrap())
        };

        let (x, y) = batch(0);
        assert_close("logits", model.forward(&x).unwrap().value(), &fixture["logits"], 1e-10);
        let loss = model.loss(&x, &y).unwrap();
        assert_close("loss", &loss.value().reshape([1]).unwrap(), &fixture["loss"], 1e-12);
        loss.backward().unwrap();
        for (name, p) in &params {
            assert_close(&format!("grad of {name}"), &p.grad().unwrap(), &fixture[&format!("grad.{name}")], 1e-10);
        }

        let cfg = AdamConfig { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::adamw(ParamGroup::no_decay_for_vectors(params.clone()), cfg).unwrap();
        let mut losses = vec![];
        for i in 0..3 {
            let (x, y) = batch(i);
            opt.zero_grad();
            let loss = model.loss(&x, &y).unwrap();
            loss.backward().unwrap();
            opt.step().unwrap();
            losses.push(loss.value().to_scalar::<f64>().unwrap());
        }
        assert_close("step losses", &Tensor::new(&losses, &dev).unwrap(), &fixture["step_losses"], 1e-12);
        for (name, p) in &params {
            assert_close(&format!("{name} after 3 steps"), p.value(), &fixture[&format!("after.{name}")], 1e-9);
        }
    }

    #[test]
    fn the_causal_mask_hides_the_future() {
        let dev = Device::Cpu;
        let model = Gpt::new(&VarStore::new(DType::F64, &dev, 3), tiny(false)).unwrap();
        let a = Tensor::new(&[1i64, 2, 3, 4, 5, 6, 7, 8], &dev).unwrap().reshape([1, 8]).unwrap();
        let b = Tensor::new(&[1i64, 2, 3, 4, 9, 0, 7, 8], &dev).unwrap().reshape([1, 8]).unwrap();
        let (la, lb) = (model.forward(&a).unwrap(), model.forward(&b).unwrap());
        let before = |l: &Var| l.value().narrow(1, 0, 4).unwrap().to_f64_vec().unwrap();
        assert_eq!(before(&la), before(&lb), "positions before the change must not move");
        let at = |l: &Var| l.value().narrow(1, 4, 1).unwrap().to_f64_vec().unwrap();
        assert_ne!(at(&la), at(&lb));
    }

    #[test]
    fn kv_cache_decoding_gives_the_same_logits_as_full_recomputation() {
        let dev = Device::Cpu;
        let model = Gpt::new(&VarStore::new(DType::F64, &dev, 4), tiny(true)).unwrap();
        let ids = Tensor::new(&[3i64, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], &dev).unwrap().reshape([2, 6]).unwrap();
        let full = model.forward(&ids).unwrap();
        let mut cache = model.new_cache();
        let prompt = model.forward_cached(&ids.narrow(1, 0, 3).unwrap(), &mut cache).unwrap();
        let mut pieces = vec![prompt.value().clone()];
        for t in 3..6 {
            pieces.push(model.forward_cached(&ids.narrow(1, t, 1).unwrap(), &mut cache).unwrap().value().clone());
        }
        assert_eq!(cache.len(), 6);
        let stepped = Tensor::cat(&pieces.iter().collect::<Vec<_>>(), 1).unwrap();
        assert_close("cached logits", &stepped, full.value(), 1e-12);
        let err = model.forward_cached(&ids.narrow(1, 0, 3).unwrap(), &mut cache).unwrap_err().to_string();
        assert!(err.contains("positions 6..9 exceed the block size 8"), "{err}");
    }

    #[test]
    fn bad_inputs_and_configs_are_errors() {
        let dev = Device::Cpu;
        let bad = GptConfig { n_embd: 10, n_head: 3, ..tiny(false) };
        assert!(
            Gpt::new(&VarStore::new(DType::F32, &dev, 0), bad)
                .err()
                .unwrap()
                .to_string()
                .contains("multiple of n_head")
        );
        let model = Gpt::new(&VarStore::new(DType::F32, &dev, 0), tiny(false)).unwrap();
        let floats = Tensor::zeros([1, 4], DType::F32, &dev).unwrap();
        assert!(model.forward(&floats).unwrap_err().to_string().contains("expected i64 token ids [B, T]"));
        let long = Tensor::zeros([1, 9], DType::I64, &dev).unwrap();
        assert!(model.forward(&long).unwrap_err().to_string().contains("exceed the block size 8"));
    }
}

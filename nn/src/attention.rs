//! Multi-head attention (Vaswani et al. 2017, "Attention Is All You Need", §3.2.2):
//!
//! `MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O`,
//! `head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)`, `Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V`.
//!
//! [`MultiheadAttention`] is `torch.nn.MultiheadAttention(batch_first=True)`: the same
//! parameters (`in_proj_weight [3E, E]` holding `W^Q; W^K; W^V` stacked, or
//! `q_proj_weight`/`k_proj_weight`/`v_proj_weight` when the keys or values have another
//! width; `in_proj_bias [3E]`; `out_proj.weight`, `out_proj.bias`), the same
//! initialisation and the same mask conventions ([`AttentionMask`]). The attention itself
//! is the fused online-softmax op [`Var::scaled_dot_product_attention`].
//!
//! [`KvCache`] and [`MultiheadAttention::forward_self_cached`] decode incrementally: each
//! step projects only the new tokens, appends their keys and values to the cache and lets
//! the new queries attend over everything cached so far.

use crate::{Init, Linear, Module, VarStore};
use aigc_autograd::Var;
use aigc_tensor::{DType, Device, Error, Result, Tensor};

const OP: &str = "MultiheadAttention";

/// The options of [`MultiheadAttention`] besides its width and number of heads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MultiheadAttentionConfig {
    /// Biases on the input and output projections (`in_proj_bias`, `out_proj.bias`).
    pub bias: bool,
    /// Dropout probability on the attention weights, in training mode.
    pub dropout: f64,
    /// Width of the keys; `None` means `embed_dim`.
    pub kdim: Option<usize>,
    /// Width of the values; `None` means `embed_dim`.
    pub vdim: Option<usize>,
}

impl Default for MultiheadAttentionConfig {
    fn default() -> Self {
        MultiheadAttentionConfig { bias: true, dropout: 0.0, kdim: None, vdim: None }
    }
}

/// Which keys each query may see, with PyTorch's conventions. Masks combine: a key is
/// seen only if every mask allows it. A query that sees no key at all outputs zeros
/// (PyTorch gives NaN there).
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionMask<'a> {
    /// Hide key `j` from query `i` when `j > i + (S - L)` (L queries, S keys): the usual
    /// causal mask when `L == S`, aligned bottom-right otherwise (new queries after a
    /// cached prefix see the whole prefix).
    pub causal: bool,
    /// `[L, S]` or `[B * num_heads, L, S]`: u8 with 1 (true) = masked out, as PyTorch's
    /// boolean masks, or an additive float mask (`-inf` masks out).
    pub attn_mask: Option<&'a Tensor>,
    /// `[B, S]`: u8 with 1 (true) = a padding key that no query sees, or additive float.
    pub key_padding_mask: Option<&'a Tensor>,
}

impl<'a> AttentionMask<'a> {
    /// Every query sees every key.
    pub fn none() -> Self {
        Self::default()
    }
    /// Only the causal mask.
    pub fn causal() -> Self {
        AttentionMask { causal: true, ..Self::default() }
    }
    /// This mask with a `[B, S]` key padding mask added.
    pub fn with_key_padding(self, key_padding_mask: &'a Tensor) -> Self {
        AttentionMask { key_padding_mask: Some(key_padding_mask), ..self }
    }
    /// This mask with an `[L, S]` or `[B * num_heads, L, S]` attention mask added.
    pub fn with_attn_mask(self, attn_mask: &'a Tensor) -> Self {
        AttentionMask { attn_mask: Some(attn_mask), ..self }
    }

    /// `attn_mask` and `key_padding_mask` as one mask for the fused op, broadcastable to
    /// `[B, H, L, S]` (the causal flag is passed on separately).
    fn for_fused_op(&self, sizes: AttentionSizes, dtype: DType) -> Result<Option<Tensor>> {
        let attn = self.attn_mask.map(|m| attn_mask_per_head(m, sizes)).transpose()?;
        let padding = self.key_padding_mask.map(|m| key_padding_per_head(m, sizes)).transpose()?;
        let combined = match (attn, padding) {
            (None, None) => return Ok(None),
            (Some(mask), None) | (None, Some(mask)) => mask,
            (Some(a), Some(b)) => a.and(b, dtype)?,
        };
        combined.into_fused(dtype).map(Some)
    }
}

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug)]
struct AttentionSizes {
    batch: usize,
    heads: usize,
    target_len: usize,
    source_len: usize,
}

/// A mask in the fused op's terms.
enum FusedMask {
    /// u8, 1 = the key is visible (the opposite of PyTorch's boolean masks).
    Keep(Tensor),
    /// Float, added to the scores.
    Additive(Tensor),
}

impl FusedMask {
    /// Reads a PyTorch mask: u8 (true = masked out) or additive float.
    fn from_pytorch(mask: &Tensor, name: &str) -> Result<FusedMask> {
        match mask.dtype() {
            DType::U8 => Ok(FusedMask::Keep(mask.eq(0i64)?)),
            dtype if dtype.is_float() => Ok(FusedMask::Additive(mask.clone())),
            dtype => Err(Error::invalid(
                OP,
                format!("{name} has dtype {dtype}: expected u8 (true = masked out) or an additive float mask"),
            )),
        }
    }

    /// The additive form in `dtype`: 0 where visible, `-inf` where hidden.
    fn additive(self, dtype: DType) -> Result<Tensor> {
        match self {
            FusedMask::Keep(keep) => keep.where_cond(Tensor::zeros((), dtype, &keep.device())?, f64::NEG_INFINITY),
            FusedMask::Additive(mask) => mask.to_dtype(dtype),
        }
    }

    /// Keys visible under both masks.
    fn and(self, other: FusedMask, dtype: DType) -> Result<FusedMask> {
        match (self, other) {
            (FusedMask::Keep(a), FusedMask::Keep(b)) => Ok(FusedMask::Keep(a.mul(&b)?)),
            (a, b) => Ok(FusedMask::Additive(a.additive(dtype)?.add(&b.additive(dtype)?)?)),
        }
    }

    /// The tensor the fused op takes: the keep-mask itself, or the additive mask in q's dtype.
    fn into_fused(self, dtype: DType) -> Result<Tensor> {
        match self {
            FusedMask::Keep(keep) => Ok(keep),
            additive => additive.additive(dtype),
        }
    }
}

/// PyTorch's `attn_mask`, `[L, S]` or `[B * H, L, S]`, as a mask broadcastable to `[B, H, L, S]`.
fn attn_mask_per_head(mask: &Tensor, s: AttentionSizes) -> Result<FusedMask> {
    let (l, k) = (s.target_len, s.source_len);
    let per_head = match *mask.dims() {
        [ml, mk] if (ml, mk) == (l, k) => mask.clone(),
        [bh, ml, mk] if (bh, ml, mk) == (s.batch * s.heads, l, k) => mask.reshape([s.batch, s.heads, l, k])?,
        _ => {
            let reason = format!(
                "attn_mask must be [L, S] = [{l}, {k}] or [B * num_heads, L, S] = [{}, {l}, {k}]",
                s.batch * s.heads
            );
            return Err(Error::bad_shape(OP, &mask.shape(), reason));
        }
    };
    FusedMask::from_pytorch(&per_head, "attn_mask")
}

/// PyTorch's `key_padding_mask` `[B, S]` as a mask of shape `[B, 1, 1, S]`.
fn key_padding_per_head(mask: &Tensor, s: AttentionSizes) -> Result<FusedMask> {
    if mask.dims() != [s.batch, s.source_len] {
        let reason = format!("key_padding_mask must be [B, S] = [{}, {}]", s.batch, s.source_len);
        return Err(Error::bad_shape(OP, &mask.shape(), reason));
    }
    FusedMask::from_pytorch(&mask.reshape([s.batch, 1, 1, s.source_len])?, "key_padding_mask")
}

/// The query, key and value projection weights.
enum InProjWeight {
    /// `in_proj_weight [3E, E]`: `W^Q; W^K; W^V` stacked (keys and values of width E).
    Packed(Var),
    /// `q_proj_weight [E, E]`, `k_proj_weight [E, kdim]`, `v_proj_weight [E, vdim]`.
    Separate([Var; 3]),
}

/// Glorot & Bengio (2010) uniform initialisation of a `[fan_out, fan_in]` weight:
/// `U(-a, a)` with `a = sqrt(6 / (fan_in + fan_out))`.
fn xavier_uniform(fan_out: usize, fan_in: usize) -> Init {
    let bound = (6.0 / (fan_in + fan_out).max(1) as f64).sqrt();
    Init::Uniform { lo: -bound, hi: bound }
}

/// `torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)`.
pub struct MultiheadAttention {
    in_proj_weight: InProjWeight,
    in_proj_bias: Option<Var>,
    /// `W^O` (and its bias).
    pub out_proj: Linear,
    embed_dim: usize,
    num_heads: usize,
    kdim: usize,
    vdim: usize,
    dropout: f64,
    vs: VarStore,
}

impl MultiheadAttention {
    /// `embed_dim` split over `num_heads` heads, with the default config.
    pub fn new(vs: &VarStore, embed_dim: usize, num_heads: usize) -> Result<MultiheadAttention> {
        Self::with_config(vs, embed_dim, num_heads, MultiheadAttentionConfig::default())
    }

    /// `embed_dim` split over `num_heads` heads. Initialised as PyTorch's
    /// `_reset_parameters`: xavier-uniform input projections (the packed `[3E, E]` weight
    /// as one matrix), zero biases, `out_proj.weight` as a `Linear`'s.
    pub fn with_config(
        vs: &VarStore,
        embed_dim: usize,
        num_heads: usize,
        config: MultiheadAttentionConfig,
    ) -> Result<MultiheadAttention> {
        if num_heads == 0 || !embed_dim.is_multiple_of(num_heads) {
            return Err(Error::invalid(
                OP,
                format!("embed_dim {embed_dim} must be divisible by num_heads {num_heads}"),
            ));
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(Error::invalid(OP, format!("dropout {}: need 0 <= p < 1", config.dropout)));
        }
        let e = embed_dim;
        let (kdim, vdim) = (config.kdim.unwrap_or(e), config.vdim.unwrap_or(e));
        let in_proj_weight = if kdim == e && vdim == e {
            InProjWeight::Packed(vs.param("in_proj_weight", [3 * e, e], xavier_uniform(3 * e, e))?)
        } else {
            InProjWeight::Separate([
                vs.param("q_proj_weight", [e, e], xavier_uniform(e, e))?,
                vs.param("k_proj_weight", [e, kdim], xavier_uniform(e, kdim))?,
                vs.param("v_proj_weight", [e, vdim], xavier_uniform(e, vdim))?,
            ])
        };
        let in_proj_bias = config.bias.then(|| vs.param("in_proj_bias", [3 * e], Init::Const(0.0))).transpose()?;
        let out_proj = Linear::with_bias(&vs.pp("out_proj"), e, e, config.bias)?;
        if let Some(bias) = &out_proj.bias {
            bias.value().assign_(&bias.value().zeros_like()?)?;
        }
        let vs = vs.clone();
        Ok(MultiheadAttention {
            in_proj_weight,
            in_proj_bias,
            out_proj,
            embed_dim,
            num_heads,
            kdim,
            vdim,
            dropout: config.dropout,
            vs,
        })
    }

    /// The model width E.
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }
    /// The number of heads H.
    pub fn num_heads(&self) -> usize {
        self.num_heads
    }
    /// The width of one head, `E / H`.
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// Attention of `query [B, L, E]` over `key [B, S, kdim]` and `value [B, S, vdim]`
    /// under `mask`; returns `[B, L, E]`. Self-attention passes the same var three times.
    /// (PyTorch also returns the head-averaged weights; the fused op never forms them.)
    pub fn forward(&self, query: &Var, key: &Var, value: &Var, mask: AttentionMask) -> Result<Var> {
        let sizes = self.check_inputs(query, key, value)?;
        let fused_mask = mask.for_fused_op(sizes, query.dtype())?;
        let [q, k, v] = self.project(query, key, value)?;
        let heads = self.attend(
            &self.split_heads(&q)?,
            &self.split_heads(&k)?,
            &self.split_heads(&v)?,
            fused_mask.as_ref(),
            mask.causal,
        )?;
        self.out_proj.forward(&merge_heads(&heads)?)
    }

    /// Causal self-attention of the new tokens `x_new [B, T, E]` over everything in
    /// `cache` plus themselves: projects only the new tokens, appends their keys and
    /// values to `cache`, then attends (new token `i` sees the cached prefix and new
    /// tokens `0..=i`). Decoding token by token this way equals the causal
    /// [`forward`](Self::forward) over the whole sequence.
    ///
    /// The cache holds values, not graph: gradients reach this call's projections but
    /// not the keys and values of earlier calls. Decode under `no_grad`.
    pub fn forward_self_cached(&self, x_new: &Var, cache: &mut KvCache) -> Result<Var> {
        self.check_inputs(x_new, x_new, x_new)?;
        let [q, k, v] = self.project(x_new, x_new, x_new)?;
        let (k, v) = (self.split_heads(&k)?, self.split_heads(&v)?);
        cache.append(k.value(), v.value())?;
        let (all_keys, all_values) = cache.keys_values().expect("the cache holds the keys just appended");
        let keys = cached_then_new(all_keys, &k)?;
        let values = cached_then_new(all_values, &v)?;
        let heads = self.attend(&self.split_heads(&q)?, &keys, &values, None, true)?;
        self.out_proj.forward(&merge_heads(&heads)?)
    }

    /// Checks `query [B, L, E]`, `key [B, S, kdim]`, `value [B, S, vdim]`.
    fn check_inputs(&self, query: &Var, key: &Var, value: &Var) -> Result<AttentionSizes> {
        let expect = |name: &str, x: &Var, width: usize, what: &str| -> Result<()> {
            match *x.dims() {
                [_, _, w] if w == width => Ok(()),
                [_, _, w] => {
                    Err(Error::bad_shape(OP, &x.shape(), format!("{name} has {w} features, expected {width} ({what})")))
                }
                _ => Err(Error::bad_shape(OP, &x.shape(), format!("{name} must be [B, len, {width}] (batch first)"))),
            }
        };
        expect("query", query, self.embed_dim, "embed_dim")?;
        expect("key", key, self.kdim, "kdim")?;
        expect("value", value, self.vdim, "vdim")?;
        let (q, k, v) = (query.dims(), key.dims(), value.dims());
        if k[..2] != v[..2] {
            let reason = "key [B, S, kdim] and value [B, S, vdim] must agree on B and S".to_string();
            return Err(Error::ShapeMismatch { op: OP, lhs: key.shape(), rhs: value.shape(), reason });
        }
        if q[0] != k[0] {
            let reason = format!("query has batch {} but key has batch {}", q[0], k[0]);
            return Err(Error::ShapeMismatch { op: OP, lhs: query.shape(), rhs: key.shape(), reason });
        }
        Ok(AttentionSizes { batch: q[0], heads: self.num_heads, target_len: q[1], source_len: k[1] })
    }

    /// The projections `Q = query W^Q^T + b^Q`, `K`, `V`, each `[B, len, E]`. For
    /// self-attention with the packed weight this is one matmul.
    fn project(&self, query: &Var, key: &Var, value: &Var) -> Result<[Var; 3]> {
        let is_self_attention = query.id() == key.id() && key.id() == value.id();
        if let (InProjWeight::Packed(weight), true) = (&self.in_proj_weight, is_self_attention) {
            let qkv = affine(query, weight, self.in_proj_bias.as_ref())?;
            let [q, k, v]: [Var; 3] = qkv.chunk(3, -1)?.try_into().expect("chunk(3) of a 3E-wide tensor gives 3");
            return Ok([q, k, v]);
        }
        Ok([self.project_one(query, 0)?, self.project_one(key, 1)?, self.project_one(value, 2)?])
    }

    /// Projection `part` (0: query, 1: key, 2: value) of `x`.
    fn project_one(&self, x: &Var, part: usize) -> Result<Var> {
        let e = self.embed_dim;
        let weight = match &self.in_proj_weight {
            InProjWeight::Packed(weight) => weight.narrow(0, part * e, e)?,
            InProjWeight::Separate(weights) => weights[part].clone(),
        };
        let bias = self.in_proj_bias.as_ref().map(|b| b.narrow(0, part * e, e)).transpose()?;
        affine(x, &weight, bias.as_ref())
    }

    /// `[B, T, E] -> [B, H, T, E / H]`.
    fn split_heads(&self, x: &Var) -> Result<Var> {
        split_heads(x, self.num_heads)
    }

    /// The fused attention op, or in training with attention dropout the written-out
    /// form that drops attention weights (the fused op has no dropout).
    fn attend(&self, q: &Var, k: &Var, v: &Var, mask: Option<&Tensor>, causal: bool) -> Result<Var> {
        if self.vs.is_training() && self.dropout > 0.0 {
            return attention_with_weight_dropout(q, k, v, mask, causal, self.dropout, self.vs.next_seed());
        }
        Var::scaled_dot_product_attention(q, k, v, mask, causal, None)
    }
}

impl Module for MultiheadAttention {
    /// Self-attention without a mask.
    fn forward(&self, x: &Var) -> Result<Var> {
        MultiheadAttention::forward(self, x, x, x, AttentionMask::none())
    }
}

/// `x W^T + b`.
fn affine(x: &Var, weight: &Var, bias: Option<&Var>) -> Result<Var> {
    let y = x.matmul(&weight.t()?)?;
    match bias {
        Some(b) => y.add(b),
        None => Ok(y),
    }
}

/// `[B, T, E] -> [B, H, T, E / H]`: each head's slice of the features, as a batch dim.
pub(crate) fn split_heads(x: &Var, num_heads: usize) -> Result<Var> {
    let &[b, t, e] = x.dims() else { unreachable!("projections are [B, T, E]") };
    x.reshape([b, t, num_heads, e / num_heads])?.permute(&[0, 2, 1, 3])
}

/// `[B, H, T, Dh] -> [B, T, H * Dh]`, the inverse of [`split_heads`].
pub(crate) fn merge_heads(x: &Var) -> Result<Var> {
    let &[b, h, t, dh] = x.dims() else { unreachable!("heads are [B, H, T, Dh]") };
    x.permute(&[0, 2, 1, 3])?.reshape([b, t, h * dh])
}

/// The cached keys (or values) `all [B, H, T, Dh]`, whose last `new.dims()[2]` positions
/// are `new`, as a var. When `new` records no gradient this is the cache buffer itself;
/// otherwise the cached prefix is joined to `new` so that gradients reach it.
fn cached_then_new(all: Tensor, new: &Var) -> Result<Var> {
    let earlier = all.dims()[2] - new.dims()[2];
    match (new.needs_grad(), earlier) {
        (false, _) => Ok(Var::constant(all)),
        (true, 0) => Ok(new.clone()),
        (true, _) => Var::cat(&[&Var::constant(all.narrow(2, 0, earlier)?), new], 2),
    }
}

/// `dropout(softmax(Q K^T / sqrt(d) + mask)) V`, written out: the attention weights
/// exist as a tensor, so dropout can zero some of them, as PyTorch does in training.
/// `mask` and `causal` follow the fused op's conventions; a query that sees no key
/// gets zeros, as there.
fn attention_with_weight_dropout(
    q: &Var,
    k: &Var,
    v: &Var,
    mask: Option<&Tensor>,
    causal: bool,
    p: f64,
    seed: u64,
) -> Result<Var> {
    let (target_len, source_len, head_dim) = (q.dims()[q.rank() - 2], k.dims()[k.rank() - 2], q.dims()[q.rank() - 1]);
    let mut scores = q.matmul(&k.t()?)?.affine(1.0 / (head_dim.max(1) as f64).sqrt(), 0.0)?;
    let mut visible = causal.then(|| causal_keep(target_len, source_len, &q.device())).transpose()?;
    if let Some(mask) = mask {
        let keep = if mask.dtype() == DType::U8 {
            mask.ne(0i64)?
        } else {
            let keep = mask.ne(f64::NEG_INFINITY)?;
            scores = scores.add(&Var::constant(keep.where_cond(mask, 0.0)?))?;
            keep
        };
        visible = Some(match visible {
            Some(causal) => causal.mul(&keep)?,
            None => keep,
        });
    }
    let weights = match visible {
        Some(visible) => masked_softmax(&scores, &visible)?,
        None => scores.softmax(-1)?,
    };
    weights.dropout(p, seed)?.matmul(v)
}

/// The causal keep-mask `[L, S]` (u8): key `j` visible to query `i` when `j <= i + (S - L)`.
fn causal_keep(target_len: usize, source_len: usize, device: &Device) -> Result<Tensor> {
    let keys = Tensor::arange(0, source_len as i64, DType::I64, device)?.reshape([1, source_len])?;
    let queries = Tensor::arange(0, target_len as i64, DType::I64, device)?.reshape([target_len, 1])?;
    keys.sub(&queries)?.le(source_len as i64 - target_len as i64)
}

/// Softmax over the last dim restricted to the `visible` keys (u8): hidden keys get
/// weight 0 and a row with no visible key is all zeros. Hidden scores are replaced by
/// the dtype's most negative finite value rather than `-inf`, so no NaN ever appears.
fn masked_softmax(scores: &Var, visible: &Tensor) -> Result<Var> {
    let dtype = scores.dtype();
    let lowest = Var::constant(Tensor::full(most_negative_finite(dtype), (), dtype, &scores.device())?);
    let weights = scores.where_cond(visible, &lowest)?.softmax(-1)?;
    let any_visible = visible.to_dtype(dtype)?.sum(&[-1], true)?.gt(0.0)?;
    weights.masked(&any_visible)
}

/// The most negative finite value of a float dtype.
fn most_negative_finite(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN,
        DType::F16 => -65504.0,
        // bf16's largest finite value is 3.39e38: f32::MIN would round to -inf there.
        _ => -3.0e38,
    }
}

/// The keys and values of one attention layer's past tokens, for incremental decoding:
/// buffers `[B, H, max_len, Dh]` allocated on the first append and filled in place.
#[derive(Debug)]
pub struct KvCache {
    buffers: Option<(Tensor, Tensor)>,
    len: usize,
    max_len: usize,
}

impl KvCache {
    /// An empty cache for up to `max_len` positions.
    pub fn new(max_len: usize) -> KvCache {
        KvCache { buffers: None, len: 0, max_len }
    }
    /// How many positions are cached.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The most positions the cache holds.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    /// Forgets everything (the next append may have another batch size).
    pub fn clear(&mut self) {
        self.buffers = None;
        self.len = 0;
    }

    /// The cached keys and values, `[B, H, len, Dh]` views of the buffers, or `None`
    /// when nothing was ever appended.
    pub fn keys_values(&self) -> Option<(Tensor, Tensor)> {
        let (keys, values) = self.buffers.as_ref()?;
        let view = |t: &Tensor| t.narrow(2, 0, self.len).expect("len <= max_len, the buffers' dim 2");
        Some((view(keys), view(values)))
    }

    /// Appends `keys [B, H, T, Dk]` and `values [B, H, T, Dv]` of T new positions.
    pub fn append(&mut self, keys: &Tensor, values: &Tensor) -> Result<()> {
        const WHERE: &str = "KvCache::append";
        let (&[b, h, t, _], &[vb, vh, vt, _]) = (keys.dims(), values.dims()) else {
            let reason = "keys and values must be [B, H, T, Dh]".to_string();
            return Err(Error::ShapeMismatch { op: WHERE, lhs: keys.shape(), rhs: values.shape(), reason });
        };
        if (b, h, t) != (vb, vh, vt) {
            let reason = "keys and values must agree on B, H and T".to_string();
            return Err(Error::ShapeMismatch { op: WHERE, lhs: keys.shape(), rhs: values.shape(), reason });
        }
        if self.len + t > self.max_len {
            let reason =
                format!("appending {t} positions to the {} cached would exceed max_len {}", self.len, self.max_len);
            return Err(Error::invalid(WHERE, reason));
        }
        let (key_buffer, value_buffer) = match &self.buffers {
            Some(buffers) => buffers,
            None => {
                self.buffers.insert((zero_buffer_like(keys, self.max_len)?, zero_buffer_like(values, self.max_len)?))
            }
        };
        for (buffer, new) in [(key_buffer, keys), (value_buffer, values)] {
            let fits = buffer.dims()[..2] == new.dims()[..2] && buffer.dims()[3] == new.dims()[3];
            if !fits || buffer.dtype() != new.dtype() {
                let reason = format!(
                    "the cache holds {} [B, H, max_len, Dh]; new entries must match it in B, H, Dh and dtype",
                    buffer.dtype()
                );
                return Err(Error::ShapeMismatch { op: WHERE, lhs: buffer.shape(), rhs: new.shape(), reason });
            }
            buffer.narrow(2, self.len, t)?.assign_(new)?;
        }
        self.len += t;
        Ok(())
    }
}

/// A zero buffer `[B, H, max_len, D]` for cache entries shaped like `new [B, H, T, D]`.
fn zero_buffer_like(new: &Tensor, max_len: usize) -> Result<Tensor> {
    let d = new.dims();
    Tensor::zeros([d[0], d[1], max_len, d[3]], new.dtype(), &new.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Fixture, Tol, assert_close, max_abs};
    use aigc_autograd::no_grad;
    use std::collections::HashMap;

    /// How the fixture case passed its inputs (PyTorch sums the gradients of a tensor
    /// passed twice, and so does the tape).
    enum Inputs {
        /// `mha(x, x, x)`.
        SelfAttention,
        /// `mha(query, memory, memory)`.
        SharedKeyValue,
        /// Three different tensors.
        Separate,
    }

    /// Runs fixture `case` through our layer under `mask` and checks the output and the
    /// gradients of every parameter and input.
    fn check_against_pytorch(case: &str, config: MultiheadAttentionConfig, inputs: Inputs, mask: AttentionMask) {
        let fx = Fixture::attention();
        let key_of = |name: &str| format!("{case}.{name}");
        let vs = VarStore::new(DType::F64, &Device::Cpu, 0);
        let mha = MultiheadAttention::with_config(&vs, 8, 2, config).unwrap();
        fx.load_params(&vs, case);
        let query = Var::leaf(fx.get(&key_of("query")));
        let (key, value) = match inputs {
            Inputs::SelfAttention => (query.clone(), query.clone()),
            Inputs::SharedKeyValue => {
                let memory = Var::leaf(fx.get(&key_of("key")));
                (memory.clone(), memory)
            }
            Inputs::Separate => (Var::leaf(fx.get(&key_of("key"))), Var::leaf(fx.get(&key_of("value")))),
        };
        let out = mha.forward(&query, &key, &value, mask).unwrap();
        fx.assert_matches(out.value(), &key_of("out"), Tol::abs(1e-12));
        let loss = out.mul(&Var::constant(fx.get(&key_of("loss_weight")))).unwrap().sum_all().unwrap();
        loss.backward().unwrap();
        let grad_key = |name: &str| key_of(&format!("grad.{name}"));
        fx.assert_grads(&vs, grad_key, Tol::abs(1e-11));
        for (name, input) in [("query", &query), ("key", &key), ("value", &value)] {
            fx.assert_matches(&input.grad().unwrap(), &grad_key(name), Tol::abs(1e-11));
        }
    }

    #[test]
    fn self_attention_matches_pytorch() {
        check_against_pytorch("mha_self", Default::default(), Inputs::SelfAttention, AttentionMask::none());
    }

    #[test]
    fn cross_attention_matches_pytorch() {
        check_against_pytorch("mha_cross", Default::default(), Inputs::SharedKeyValue, AttentionMask::none());
    }

    #[test]
    fn causal_flag_and_boolean_causal_mask_match_pytorch() {
        check_against_pytorch("mha_causal", Default::default(), Inputs::SelfAttention, AttentionMask::causal());
        let triu = Fixture::attention().get("mha_causal.attn_mask");
        assert_eq!(triu.dtype(), DType::U8);
        let mask = AttentionMask::none().with_attn_mask(&triu);
        check_against_pytorch("mha_causal", Default::default(), Inputs::SelfAttention, mask);
    }

    #[test]
    fn key_padding_and_per_head_boolean_masks_match_pytorch() {
        let fx = Fixture::attention();
        let (padding, per_head) = (fx.get("mha_padding.key_padding_mask"), fx.get("mha_padding.attn_mask"));
        assert_eq!(per_head.dims(), &[4, 4, 5], "[B * H, L, S]");
        let mask = AttentionMask::none().with_key_padding(&padding).with_attn_mask(&per_head);
        check_against_pytorch("mha_padding", Default::default(), Inputs::SharedKeyValue, mask);
    }

    #[test]
    fn additive_float_masks_match_pytorch() {
        let fx = Fixture::attention();
        let (padding, additive) = (fx.get("mha_additive.key_padding_mask"), fx.get("mha_additive.attn_mask"));
        assert_eq!(additive.dtype(), DType::F64);
        let mask = AttentionMask::none().with_key_padding(&padding).with_attn_mask(&additive);
        check_against_pytorch("mha_additive", Default::default(), Inputs::SharedKeyValue, mask);
    }

    #[test]
    fn other_key_and_value_widths_use_separate_projections_and_match_pytorch() {
        let config = MultiheadAttentionConfig { kdim: Some(6), vdim: Some(3), ..Default::default() };
        check_against_pytorch("mha_kdim", config, Inputs::Separate, AttentionMask::none());
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        MultiheadAttention::with_config(&vs, 8, 2, config).unwrap();
        let shapes: Vec<(String, Vec<usize>)> =
            vs.named_parameters().into_iter().map(|(n, v)| (n, v.dims().to_vec())).collect();
        let want = [
            ("q_proj_weight", vec![8, 8]),
            ("k_proj_weight", vec![8, 6]),
            ("v_proj_weight", vec![8, 3]),
            ("in_proj_bias", vec![24]),
            ("out_proj.weight", vec![8, 8]),
            ("out_proj.bias", vec![8]),
        ];
        assert_eq!(shapes, want.map(|(n, s)| (n.to_string(), s)));
    }

    #[test]
    fn parameters_are_named_and_initialised_as_pytorch() {
        let vs = VarStore::new(DType::F64, &Device::Cpu, 3);
        MultiheadAttention::new(&vs.pp("attn"), 16, 4).unwrap();
        let params: HashMap<String, Var> = vs.named_parameters().into_iter().collect();
        let names = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"];
        assert_eq!(params.len(), 4);
        let largest = |name: &str| max_abs(params[name].value());
        let xavier = (6.0f64 / (16.0 + 48.0)).sqrt();
        assert!(largest(names[0]) <= xavier && largest(names[0]) > 0.9 * xavier);
        assert!(largest(names[2]) <= 0.25 && largest(names[2]) > 0.2, "out_proj.weight ~ U(-1/sqrt(16), 1/sqrt(16))");
        assert_eq!((largest(names[1]), largest(names[3])), (0.0, 0.0), "biases start at zero");
    }

    fn random_var(shape: &[usize], seed: u64) -> Var {
        Var::leaf(Tensor::randn(shape, &Device::Cpu, seed).unwrap())
    }

    /// A self-attention layer E = 8, H = 2 in f32 with nonzero biases.
    fn layer(vs: &VarStore) -> MultiheadAttention {
        let mha = MultiheadAttention::new(vs, 8, 2).unwrap();
        for (i, (_, var)) in vs.named_parameters().into_iter().enumerate() {
            var.value()
                .assign_(&Tensor::randn(var.shape(), &Device::Cpu, 100 + i as u64).unwrap().affine(0.3, 0.0).unwrap())
                .unwrap();
        }
        mha
    }

    #[test]
    fn the_causal_mask_hides_the_future() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        let mha = layer(&vs);
        let x = random_var(&[2, 6, 8], 1);
        let before = mha.forward(&x, &x, &x, AttentionMask::causal()).unwrap().value().clone();
        for t in 0..6 {
            // Change every token from position t on.
            let later = Tensor::randn([2, 6 - t, 8], &Device::Cpu, 10 + t as u64).unwrap();
            let changed = Tensor::cat(&[&x.value().narrow(1, 0, t).unwrap(), &later], 1).unwrap();
            let changed = Var::constant(changed);
            let after = mha.forward(&changed, &changed, &changed, AttentionMask::causal()).unwrap();
            let (a, b) = (before.narrow(1, 0, t).unwrap(), after.value().narrow(1, 0, t).unwrap());
            assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap(), "outputs before {t} must not move");
            let (a, b) = (before.narrow(1, t, 1).unwrap(), after.value().narrow(1, t, 1).unwrap());
            assert_ne!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap(), "output {t} sees token {t}");
        }
    }

    #[test]
    fn cached_decoding_equals_the_full_causal_forward() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        let mha = layer(&vs);
        let x = random_var(&[2, 7, 8], 2);
        let full = mha.forward(&x, &x, &x, AttentionMask::causal()).unwrap();
        // Token by token, and in uneven chunks (a prompt, then single tokens, then a chunk).
        for chunks in [vec![1; 7], vec![3, 1, 1, 2]] {
            let mut cache = KvCache::new(8);
            let mut outputs = vec![];
            let mut start = 0;
            for len in chunks {
                let step = no_grad(|| mha.forward_self_cached(&x.narrow(1, start, len).unwrap(), &mut cache)).unwrap();
                outputs.push(step);
                start += len;
            }
            assert_eq!(cache.len(), 7);
            let decoded = Var::cat(&outputs.iter().collect::<Vec<_>>(), 1).unwrap();
            assert_close(decoded.value(), full.value(), Tol::abs(1e-5), "cached decoding");
        }
    }

    #[test]
    fn cached_decoding_passes_gradients_to_the_new_tokens() {
        let vs = VarStore::new(DType::F64, &Device::Cpu, 0);
        let mha = MultiheadAttention::new(&vs, 8, 2).unwrap();
        let f64_var = |shape: &[usize], seed| Tensor::randn(shape, &Device::Cpu, seed).unwrap().to_dtype(DType::F64);
        let prefix = Var::constant(f64_var(&[1, 3, 8], 3).unwrap());
        let mut cache = KvCache::new(4);
        no_grad(|| mha.forward_self_cached(&prefix, &mut cache)).unwrap();
        let last = Var::leaf(f64_var(&[1, 1, 8], 4).unwrap());
        let whole = Var::cat(&[&prefix, &last], 1).unwrap();
        mha.forward_self_cached(&last, &mut cache).unwrap().sum_all().unwrap().backward().unwrap();
        let cached_grad = last.grad().unwrap();
        last.zero_grad();
        let full = mha.forward(&whole, &whole, &whole, AttentionMask::causal()).unwrap();
        full.narrow(1, 3, 1).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(&cached_grad, &last.grad().unwrap(), Tol::abs(1e-12), "gradient through the cached step");
        // A whole sequence on an empty cache, recording gradients, is the causal forward.
        let once = mha.forward_self_cached(&whole, &mut KvCache::new(4)).unwrap();
        assert_close(once.value(), full.value(), Tol::abs(1e-12), "one chunk on an empty cache");
        assert!(once.needs_grad());
    }

    #[test]
    fn a_full_cache_and_mismatched_entries_are_errors() {
        let mut cache = KvCache::new(4);
        let entry = |b: usize, t: usize, d: usize| Tensor::zeros([b, 2, t, d], DType::F32, &Device::Cpu).unwrap();
        cache.append(&entry(1, 3, 4), &entry(1, 3, 4)).unwrap();
        let err = cache.append(&entry(1, 2, 4), &entry(1, 2, 4)).unwrap_err().to_string();
        assert!(err.contains("appending 2 positions to the 3 cached would exceed max_len 4"), "{err}");
        let err = cache.append(&entry(2, 1, 4), &entry(2, 1, 4)).unwrap_err().to_string();
        assert!(err.contains("must match it in B, H, Dh"), "{err}");
        let err = cache.append(&entry(1, 1, 4), &entry(1, 2, 4)).unwrap_err().to_string();
        assert!(err.contains("agree on B, H and T"), "{err}");
        assert_eq!(cache.len(), 3);
        cache.clear();
        assert!(cache.is_empty() && cache.keys_values().is_none());
        cache.append(&entry(2, 4, 4), &entry(2, 4, 4)).unwrap();
        assert_eq!(cache.keys_values().unwrap().0.dims(), &[2, 2, 4, 4]);
    }

    #[test]
    fn bad_masks_and_inputs_are_errors_naming_the_layer() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        let mha = MultiheadAttention::new(&vs, 8, 2).unwrap();
        let (q, kv) = (random_var(&[2, 3, 8], 1), random_var(&[2, 5, 8], 2));
        let u8_mask = |shape: &[usize]| Tensor::zeros(shape, DType::U8, &Device::Cpu).unwrap();
        let error = |mask: AttentionMask| mha.forward(&q, &kv, &kv, mask).unwrap_err().to_string();
        let bad = u8_mask(&[3, 4]);
        let err = error(AttentionMask::none().with_attn_mask(&bad));
        assert!(
            err.contains("MultiheadAttention")
                && err.contains("attn_mask must be [L, S] = [3, 5] or [B * num_heads, L, S] = [4, 3, 5]"),
            "{err}"
        );
        let bad = u8_mask(&[5, 2]);
        let err = error(AttentionMask::none().with_key_padding(&bad));
        assert!(err.contains("key_padding_mask must be [B, S] = [2, 5]"), "{err}");
        let bad = Tensor::zeros([2, 5], DType::I64, &Device::Cpu).unwrap();
        let err = error(AttentionMask::none().with_key_padding(&bad));
        assert!(err.contains("key_padding_mask has dtype i64"), "{err}");
        let narrow = random_var(&[2, 3, 7], 3);
        let err = mha.forward(&narrow, &kv, &kv, AttentionMask::none()).unwrap_err().to_string();
        assert!(
            err.contains("MultiheadAttention: input of shape [2, 3, 7]: query has 7 features, expected 8 (embed_dim)"),
            "{err}"
        );
        let other_batch = random_var(&[1, 5, 8], 4);
        let err = mha.forward(&q, &other_batch, &other_batch, AttentionMask::none()).unwrap_err().to_string();
        assert!(err.contains("query has batch 2 but key has batch 1"), "{err}");
        let err = MultiheadAttention::new(&vs.pp("odd"), 8, 3).err().unwrap().to_string();
        assert!(err.contains("embed_dim 8 must be divisible by num_heads 3"), "{err}");
    }

    #[test]
    fn written_out_attention_equals_the_fused_op() {
        // With p = 0 the dropout path must give the fused op's values and gradients, for
        // every mask kind, including a query row that sees no key.
        let device = Device::Cpu;
        let (q, k, v) = (random_var(&[2, 2, 3, 4], 1), random_var(&[2, 2, 5, 4], 2), random_var(&[2, 2, 5, 4], 3));
        let (q, k, v) = (
            q.value().to_dtype(DType::F64).unwrap(),
            k.value().to_dtype(DType::F64).unwrap(),
            v.value().to_dtype(DType::F64).unwrap(),
        );
        let keep = Tensor::from_vec(vec![1u8, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 1], [3, 5], &device).unwrap();
        let additive = keep
            .where_cond(Tensor::randn([3, 5], &device, 4).unwrap().to_dtype(DType::F64).unwrap(), f64::NEG_INFINITY)
            .unwrap();
        for (mask, causal) in
            [(None, false), (None, true), (Some(&keep), false), (Some(&keep), true), (Some(&additive), true)]
        {
            let run = |f: &dyn Fn(&Var, &Var, &Var) -> Result<Var>| {
                let (vq, vk, vv) = (Var::leaf(q.clone()), Var::leaf(k.clone()), Var::leaf(v.clone()));
                let out = f(&vq, &vk, &vv).unwrap();
                out.square().unwrap().sum_all().unwrap().backward().unwrap();
                [out.value().clone(), vq.grad().unwrap(), vk.grad().unwrap(), vv.grad().unwrap()]
            };
            let fused = run(&|q, k, v| Var::scaled_dot_product_attention(q, k, v, mask, causal, None));
            let written = run(&|q, k, v| attention_with_weight_dropout(q, k, v, mask, causal, 0.0, 0));
            for (a, b) in fused.iter().zip(&written) {
                assert_close(a, b, Tol::abs(1e-12), "written-out attention");
                assert!(b.to_vec::<f64>().unwrap().iter().all(|x| x.is_finite()));
            }
        }
    }

    #[test]
    fn attention_dropout_acts_only_in_training() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        let config = MultiheadAttentionConfig { dropout: 0.5, ..Default::default() };
        let mha = MultiheadAttention::with_config(&vs, 8, 2, config).unwrap();
        let x = random_var(&[2, 4, 8], 1);
        let run = || mha.forward(&x, &x, &x, AttentionMask::causal()).unwrap().value().to_vec::<f32>().unwrap();
        let (first, second) = (run(), run());
        assert_ne!(first, second, "each training forward draws a new dropout mask");
        vs.set_training(false);
        let eval = run();
        assert_eq!(eval, run());
        vs.set_training(true);
        vs.set_seed_draws(0);
        assert_eq!(run(), first, "masks are reproducible from the store's seed");
    }
}

//! Character-level recurrent language models: the neural step of the survey's history
//! between the n-gram model and the Transformer. An embedding feeds a stack of recurrent
//! layers — the Elman RNN (Elman 1990, `tanh`), the LSTM (Hochreiter & Schmidhuber 1997)
//! or the GRU (Cho et al. 2014) — whose hidden state is mapped to next-character logits:
//!
//! ```text
//! x_t      = dropout(E[c_t])                          encoder (embedding)
//! h_t, s_t = rnn(x_t, s_{t-1})                        num_layers cells, dropout between them
//! logits_t = W dropout(h_t) + b                       decoder (linear)
//! ```
//!
//! with dropout on the non-recurrent connections only, as Zaremba, Sutskever & Vinyals 2014
//! ("Recurrent Neural Network Regularization"). The layout and parameter names follow
//! PyTorch's `examples/word_language_model` (`encoder.weight`, `rnn.weight_ih_l0`, ...,
//! `decoder.weight`), including its initialisation of the encoder and decoder.
//!
//! **Training: truncated backpropagation through time**, as Karpathy's char-rnn and Zaremba
//! et al.: the training text is cut into `B` contiguous streams, read side by side; each
//! step takes the next `T` characters of every stream, starts the recurrence from the
//! final state of the previous chunk *detached* from its graph (the state carries context
//! forward, the gradient stops at the chunk boundary), and minimises the mean
//! cross-entropy of the `B * T` next-character predictions, with global-norm gradient
//! clipping (Pascanu et al. 2013) and AdamW under warmup + cosine decay. When the streams
//! run out the pass starts again from their beginnings with a zero state. Validation runs
//! the same way over the validation text, contiguously, with a carried state, in
//! evaluation mode and without recording gradients.
//!
//! The three cell types share one code path: [`RecurrentLm`] is generic over [`LmCell`],
//! which [`RnnCell`], [`LstmCell`] and [`GruCell`] implement; [`RecurrentKind`] names them
//! at run time.

use crate::gpt::{EvalPoint, SamplingConfig};
use crate::rng::SplitMix64;
use aigc_autograd::profile::region;
use aigc_autograd::{CrossEntropyOptions, Var, no_grad};
use aigc_nn::optim::ParamGroup;
use aigc_nn::optim::schedule::WarmupCosine;
use aigc_nn::rnn::{GruCell, LstmCell, Recurrent, RnnCell, Sequence};
use aigc_nn::{
    AdamConfig, AdamW, Dropout, Embedding, Init, Linear, Module, Nonlinearity, Optimizer, RnnConfig, VarStore,
    clip_grad_norm,
};
use aigc_tensor::{DType, Error, Result, Tensor};
use std::fmt;
use std::str::FromStr;
use std::time::Instant;

/// The recurrent cell of a language model, named at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecurrentKind {
    /// The Elman RNN with `tanh` ([`RnnCell`]).
    Rnn,
    /// The LSTM ([`LstmCell`]).
    Lstm,
    /// The GRU ([`GruCell`]).
    Gru,
}

impl RecurrentKind {
    /// Every kind, in historical order.
    pub const ALL: [RecurrentKind; 3] = [RecurrentKind::Rnn, RecurrentKind::Lstm, RecurrentKind::Gru];

    /// The name used on command lines and in tables: `rnn`, `lstm` or `gru`.
    pub fn name(self) -> &'static str {
        match self {
            RecurrentKind::Rnn => "rnn",
            RecurrentKind::Lstm => "lstm",
            RecurrentKind::Gru => "gru",
        }
    }
}

impl fmt::Display for RecurrentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RecurrentKind {
    type Err = Error;

    /// Parses `rnn`, `lstm` or `gru` (any case).
    fn from_str(s: &str) -> Result<RecurrentKind> {
        RecurrentKind::ALL
            .into_iter()
            .find(|kind| kind.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::invalid("RecurrentKind", format!("unknown kind `{s}`: expected rnn, lstm or gru")))
    }
}

/// A recurrent cell a language model can stack: how to build its sequence layer and how to
/// cut its state from the graph.
pub trait LmCell: Recurrent + Sized {
    /// Which kind this cell is.
    const KIND: RecurrentKind;
    /// The stacked sequence layer `input_size -> hidden_size` (the RNN with `tanh`).
    fn sequence(vs: &VarStore, input_size: usize, hidden_size: usize, config: RnnConfig) -> Result<Sequence<Self>>;
    /// The same state without its history: the next chunk's initial state in truncated BPTT.
    fn detach(state: &Self::State) -> Self::State;
}

impl LmCell for RnnCell {
    const KIND: RecurrentKind = RecurrentKind::Rnn;
    fn sequence(vs: &VarStore, input_size: usize, hidden_size: usize, config: RnnConfig) -> Result<Sequence<Self>> {
        Sequence::<RnnCell>::new(vs, input_size, hidden_size, Nonlinearity::Tanh, config)
    }
    fn detach(state: &Var) -> Var {
        state.detach()
    }
}

impl LmCell for LstmCell {
    const KIND: RecurrentKind = RecurrentKind::Lstm;
    fn sequence(vs: &VarStore, input_size: usize, hidden_size: usize, config: RnnConfig) -> Result<Sequence<Self>> {
        Sequence::<LstmCell>::new(vs, input_size, hidden_size, config)
    }
    fn detach(state: &Self::State) -> Self::State {
        state.detach()
    }
}

impl LmCell for GruCell {
    const KIND: RecurrentKind = RecurrentKind::Gru;
    fn sequence(vs: &VarStore, input_size: usize, hidden_size: usize, config: RnnConfig) -> Result<Sequence<Self>> {
        Sequence::<GruCell>::new(vs, input_size, hidden_size, config)
    }
    fn detach(state: &Var) -> Var {
        state.detach()
    }
}

/// The sizes and regularisation of a [`RecurrentLm`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RecurrentLmConfig {
    /// Characters (token ids) the model reads and predicts.
    pub vocab_size: usize,
    /// Width of the character embedding.
    pub embedding_dim: usize,
    /// Width of every recurrent layer's hidden state.
    pub hidden_size: usize,
    /// Stacked recurrent layers.
    pub num_layers: usize,
    /// Dropout on the embeddings, between the layers and on the last layer's output, in
    /// training mode only (in `[0, 1)`).
    pub dropout: f64,
}

impl RecurrentLmConfig {
    /// Sizes for character-level tiny Shakespeare trained for a few minutes on 2 CPU cores:
    /// one layer of 512 for every kind (LSTM 1.22M parameters, GRU 0.92M, RNN 0.33M),
    /// embeddings of 64, no dropout (a few minutes of training underfits: dropout 0.1 made
    /// a 300-second LSTM 256 worse, 1.550 against 1.523 nats/char). In 300 seconds one LSTM
    /// layer of 512 reached 1.464 nats/char on the validation text where 256 reached 1.521
    /// (the larger layer learns more per step, enough to pay for being 2.5x slower).
    pub fn shakespeare(vocab_size: usize) -> RecurrentLmConfig {
        RecurrentLmConfig { vocab_size, embedding_dim: 64, hidden_size: 512, num_layers: 1, dropout: 0.0 }
    }

    fn check(&self) -> Result<()> {
        let sizes = [self.vocab_size, self.embedding_dim, self.hidden_size, self.num_layers];
        if sizes.contains(&0) {
            return Err(Error::invalid("RecurrentLmConfig", format!("{self:?}: every size must be at least 1")));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid("RecurrentLmConfig", format!("dropout {} must lie in [0, 1)", self.dropout)));
        }
        Ok(())
    }
}

/// A character-level recurrent language model with cell `C` (see the module docs). Its
/// parameters live in the [`VarStore`] it was built from.
pub struct RecurrentLm<C: LmCell> {
    cfg: RecurrentLmConfig,
    vs: VarStore,
    encoder: Embedding,
    rnn: Sequence<C>,
    dropout: Dropout,
    decoder: Linear,
}

/// The RNN language model.
pub type RnnLm = RecurrentLm<RnnCell>;
/// The LSTM language model.
pub type LstmLm = RecurrentLm<LstmCell>;
/// The GRU language model.
pub type GruLm = RecurrentLm<GruCell>;

impl<C: LmCell> RecurrentLm<C> {
    /// Builds the model in `vs`: `encoder.weight` and `decoder.weight` drawn from
    /// `U(-0.1, 0.1)` and `decoder.bias` zero, as PyTorch's word-language-model example;
    /// the recurrent layers (`rnn.*`) with PyTorch's default initialisation.
    pub fn new(vs: &VarStore, cfg: RecurrentLmConfig) -> Result<RecurrentLm<C>> {
        cfg.check()?;
        let uniform = Init::Uniform { lo: -0.1, hi: 0.1 };
        let encoder =
            Embedding { weight: vs.pp("encoder").param("weight", [cfg.vocab_size, cfg.embedding_dim], uniform)? };
        let rnn_config = RnnConfig { num_layers: cfg.num_layers, dropout: cfg.dropout, ..RnnConfig::default() };
        let rnn = C::sequence(&vs.pp("rnn"), cfg.embedding_dim, cfg.hidden_size, rnn_config)?;
        let decoder_vs = vs.pp("decoder");
        let decoder = Linear {
            weight: decoder_vs.param("weight", [cfg.vocab_size, cfg.hidden_size], uniform)?,
            bias: Some(decoder_vs.param("bias", [cfg.vocab_size], Init::Const(0.0))?),
        };
        let dropout = Dropout::new(vs, cfg.dropout)?;
        Ok(RecurrentLm { cfg, vs: vs.clone(), encoder, rnn, dropout, decoder })
    }

    /// The sizes the model was built with.
    pub fn config(&self) -> &RecurrentLmConfig {
        &self.cfg
    }

    /// The kind of its cells.
    pub fn kind(&self) -> RecurrentKind {
        C::KIND
    }

    /// The store holding the parameters (and the training mode).
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// Logits `[B, T, vocab]` for token ids `ids [B, T]` (i64), each position seeing the
    /// ones before it and the context carried in `state` (zeros when `None`), and the final
    /// state. For truncated BPTT pass the previous chunk's final state through
    /// [`LmCell::detach`].
    pub fn forward(&self, ids: &Tensor, state: Option<&C::State>) -> Result<(Var, C::State)> {
        if ids.rank() != 2 || ids.dtype() != DType::I64 {
            return Err(Error::bad_shape(
                "RecurrentLm",
                &ids.shape(),
                format!("expected i64 token ids [batch, time], got {:?}", ids.dtype()),
            ));
        }
        let embedded = self.dropout.forward(&self.encoder.forward_ids(ids)?)?;
        let (hidden, last) = self.rnn.forward(&embedded, state)?;
        Ok((self.decoder.forward(&self.dropout.forward(&hidden)?)?, last))
    }

    /// Mean cross-entropy (nats per token) of the predictions for `ids` against `targets`
    /// (both `[B, T]`), from `state`, and the final state.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor, state: Option<&C::State>) -> Result<(Var, C::State)> {
        if targets.dims() != ids.dims() {
            return Err(Error::bad_shape(
                "RecurrentLm::loss",
                &targets.shape(),
                format!("targets must have the shape of the ids, {}", ids.shape()),
            ));
        }
        let (logits, last) = self.forward(ids, state)?;
        let flat = logits.reshape([ids.dims()[0] * ids.dims()[1], self.cfg.vocab_size])?;
        Ok((flat.cross_entropy(&targets.flatten_all()?, CrossEntropyOptions::default())?, last))
    }

    /// Continues `prompt` (at least one token) by `new_tokens` tokens drawn with `sampling`
    /// from `seed`: the prompt is read once, then each new token costs one step of the
    /// recurrence. Runs in evaluation mode without recording gradients; returns only the new
    /// tokens.
    pub fn generate(
        &self,
        prompt: &[u32],
        new_tokens: usize,
        sampling: &SamplingConfig,
        seed: u64,
    ) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(Error::invalid("RecurrentLm::generate", "the prompt needs at least one token"));
        }
        in_eval_mode(&self.vs, || {
            no_grad(|| {
                let mut rng = SplitMix64::new(seed);
                let mut input = prompt.to_vec();
                let mut state = None;
                let mut generated = Vec::with_capacity(new_tokens);
                for _ in 0..new_tokens {
                    let (logits, last) =
                        self.forward(&ids_tensor(&input, 1, input.len(), &self.vs)?, state.as_ref())?;
                    let last_logits = logits.value().narrow(1, input.len() - 1, 1)?.to_f64_vec()?;
                    let next = sampling.sample(&last_logits, &mut rng)?;
                    generated.push(next);
                    input = vec![next];
                    state = Some(last);
                }
                Ok(generated)
            })
        })
    }
}

/// Runs `f` with `vs` in evaluation mode, then restores its mode.
fn in_eval_mode<R>(vs: &VarStore, f: impl FnOnce() -> Result<R>) -> Result<R> {
    let was_training = vs.is_training();
    vs.set_training(false);
    let result = f();
    vs.set_training(was_training);
    result
}

/// Token ids as an i64 tensor `[rows, cols]` on the store's device.
fn ids_tensor(ids: &[u32], rows: usize, cols: usize, vs: &VarStore) -> Result<Tensor> {
    Tensor::from_vec(ids.iter().map(|&id| id as i64).collect(), [rows, cols], &vs.device())
}

/// A token sequence cut into `streams` contiguous streams of equal length, read side by
/// side one chunk at a time: chunk `k` of length `T` holds positions `kT..kT+T` of every
/// stream as inputs and the positions one further on as targets, so consecutive chunks of
/// a row continue each other.
pub struct TokenStreams<'a> {
    tokens: &'a [u32],
    streams: usize,
    stream_len: usize,
    position: usize,
}

impl<'a> TokenStreams<'a> {
    /// `tokens` cut into `streams` streams of `(tokens.len() - 1) / streams` predictions
    /// each (the tail that does not divide evenly is left out).
    pub fn new(tokens: &'a [u32], streams: usize) -> Result<TokenStreams<'a>> {
        if streams == 0 || tokens.len() < streams + 1 {
            return Err(Error::invalid(
                "TokenStreams",
                format!("{} tokens cannot make {streams} streams of at least one prediction", tokens.len()),
            ));
        }
        Ok(TokenStreams { tokens, streams, stream_len: (tokens.len() - 1) / streams, position: 0 })
    }

    /// Predictions per stream.
    pub fn stream_len(&self) -> usize {
        self.stream_len
    }

    /// Predictions per stream not yet read.
    pub fn remaining(&self) -> usize {
        self.stream_len - self.position
    }

    /// Starts again from the beginning of the streams.
    pub fn rewind(&mut self) {
        self.position = 0;
    }

    /// The next `min(len, remaining)` positions of every stream: inputs and targets
    /// `[streams, t]` (i64); `None` when the streams are exhausted or `len` is 0.
    pub fn next_chunk(&mut self, len: usize, vs: &VarStore) -> Option<Result<(Tensor, Tensor)>> {
        let t = len.min(self.remaining());
        if t == 0 {
            return None;
        }
        let (mut inputs, mut targets) = (Vec::with_capacity(self.streams * t), Vec::with_capacity(self.streams * t));
        for stream in 0..self.streams {
            let start = stream * self.stream_len + self.position;
            inputs.extend_from_slice(&self.tokens[start..start + t]);
            targets.extend_from_slice(&self.tokens[start + 1..start + t + 1]);
        }
        self.position += t;
        let tensor = |ids: Vec<u32>| ids_tensor(&ids, self.streams, t, vs);
        Some(tensor(inputs).and_then(|x| Ok((x, tensor(targets)?))))
    }
}

/// The state carried from chunk to chunk in truncated backpropagation through time.
pub struct Tbptt<C: LmCell> {
    state: Option<C::State>,
}

impl<C: LmCell> Default for Tbptt<C> {
    fn default() -> Self {
        Tbptt { state: None }
    }
}

impl<C: LmCell> Tbptt<C> {
    /// Starts from a zero state.
    pub fn new() -> Tbptt<C> {
        Tbptt::default()
    }

    /// Forgets the carried state: the next chunk starts from zeros.
    pub fn reset(&mut self) {
        self.state = None;
    }

    /// The carried state (`None` before the first chunk and after a reset).
    pub fn state(&self) -> Option<&C::State> {
        self.state.as_ref()
    }

    /// The mean loss of one chunk, started from the carried state; keeps the chunk's final
    /// state, detached, for the next chunk. The loss's graph reaches back to the start of
    /// this chunk only.
    pub fn chunk_loss(&mut self, model: &RecurrentLm<C>, inputs: &Tensor, targets: &Tensor) -> Result<Var> {
        let (loss, last) = model.loss(inputs, targets, self.state.as_ref())?;
        self.state = Some(C::detach(&last));
        Ok(loss)
    }
}

/// The mean cross-entropy (nats per token) of `model` over the first `max_tokens`
/// predictions of `tokens` (all of them when it is larger): the sequence is cut into
/// `streams` contiguous streams (fewer when it is too short) read `seq_len` tokens at a
/// time with the state carried across chunks, in evaluation mode and without gradients.
/// Returns the loss and the number of predictions it averages.
pub fn evaluate<C: LmCell>(
    model: &RecurrentLm<C>,
    tokens: &[u32],
    streams: usize,
    seq_len: usize,
    max_tokens: usize,
) -> Result<(f64, usize)> {
    if seq_len == 0 || max_tokens == 0 {
        return Err(Error::invalid("evaluate", "seq_len and max_tokens must be at least 1"));
    }
    let streams = streams.min(tokens.len().saturating_sub(1)).min(max_tokens).max(1);
    let mut data = TokenStreams::new(tokens, streams)?;
    let mut per_stream = data.stream_len().min(max_tokens.div_ceil(streams));
    in_eval_mode(&model.vs, || {
        no_grad(|| {
            let mut carried = Tbptt::new();
            let (mut total, mut count) = (0.0, 0);
            while let Some(chunk) = data.next_chunk(seq_len.min(per_stream), &model.vs) {
                let (inputs, targets) = chunk?;
                let loss = carried.chunk_loss(model, &inputs, &targets)?;
                total += loss.value().to_f64_vec()?[0] * inputs.numel() as f64;
                count += inputs.numel();
                per_stream -= inputs.dims()[1];
            }
            Ok((total / count as f64, count))
        })
    })
}

/// The optimisation settings of a run (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct RecurrentTrainConfig {
    /// Optimisation steps (the run stops earlier when `max_seconds` runs out).
    pub iters: u64,
    /// A budget of training seconds (evaluations excluded), checked before each step.
    pub max_seconds: Option<f64>,
    /// Parallel streams `B`: the rows of every batch.
    pub batch_size: usize,
    /// Characters per chunk `T`: how far back the gradient flows.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    /// Steps of linear warmup.
    pub warmup_iters: u64,
    /// AdamW's decoupled weight decay, on matrices only.
    pub weight_decay: f64,
    /// Adam's first-moment decay.
    pub beta1: f64,
    /// Adam's second-moment decay.
    pub beta2: f64,
    /// Clip the global gradient norm to this (0 turns clipping off).
    pub grad_clip: f64,
    /// Estimate the validation loss every this many steps.
    pub eval_interval: u64,
    /// Validation predictions per periodic estimate; the final estimate reads the whole
    /// validation text.
    pub eval_tokens: usize,
}

impl Default for RecurrentTrainConfig {
    /// The LSTM's settings for tiny Shakespeare: [`RecurrentTrainConfig::shakespeare`]`(Lstm)`.
    fn default() -> Self {
        RecurrentTrainConfig::shakespeare(RecurrentKind::Lstm)
    }
}

impl RecurrentTrainConfig {
    /// Settings for the [`RecurrentLmConfig::shakespeare`] sizes on 2 CPU cores (tuned
    /// briefly, in runs of 60 to 300 seconds): 16 streams of 32-character chunks
    /// (Karpathy's char-rnn uses 50 x 50; smaller batches give more steps in a short
    /// budget), AdamW betas (0.9, 0.99) with weight decay 0.01, warmup 50 then cosine decay
    /// to a tenth of the peak over `iters` steps (or over the time budget when that is
    /// shorter), gradient clipping at 1. The peak learning rate depends on the cell: 1e-2
    /// for the LSTM and the GRU, 3e-3 for the RNN, whose training diverged at 6e-3 (the
    /// exploding gradients the gated cells were designed against).
    pub fn shakespeare(kind: RecurrentKind) -> RecurrentTrainConfig {
        let lr = match kind {
            RecurrentKind::Rnn => 3e-3,
            RecurrentKind::Lstm => 1e-2,
            RecurrentKind::Gru => 1e-2,
        };
        RecurrentTrainConfig {
            iters: 1000,
            max_seconds: None,
            batch_size: 16,
            seq_len: 32,
            lr,
            min_lr: lr / 10.0,
            warmup_iters: 50,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            grad_clip: 1.0,
            eval_interval: 250,
            eval_tokens: 16_384,
        }
    }

    fn check(&self) -> Result<()> {
        let problem = if self.iters == 0 || self.batch_size == 0 || self.seq_len == 0 {
            Some("iters, batch_size and seq_len must be at least 1")
        } else if self.eval_interval == 0 || self.eval_tokens == 0 {
            Some("eval_interval and eval_tokens must be at least 1")
        } else if !(self.lr > 0.0 && (0.0..=self.lr).contains(&self.min_lr)) {
            Some("need lr > 0 and 0 <= min_lr <= lr")
        } else if !(self.grad_clip >= 0.0 && self.weight_decay >= 0.0) {
            Some("grad_clip and weight_decay must not be negative")
        } else if self.max_seconds.is_some_and(|s| s.is_nan() || s <= 0.0) {
            Some("max_seconds must be positive")
        } else {
            None
        };
        match problem {
            Some(reason) => Err(Error::invalid("RecurrentTrainConfig", format!("{self:?}: {reason}"))),
            None => Ok(()),
        }
    }

    /// The learning rate after `step` steps and `seconds` of training: the warmup + cosine
    /// schedule over `iters` steps. After the warmup (counted in steps) the decay is
    /// advanced to the share of the time budget spent when that is further along, so that
    /// a run stopped by its budget also ends its decay.
    pub fn lr_at(&self, step: u64, seconds: f64) -> f64 {
        let schedule =
            WarmupCosine { warmup: self.warmup_iters, total: self.iters, max_lr: self.lr, min_lr: self.min_lr };
        schedule.lr_within_budget(step, self.max_seconds.map(|budget| seconds / budget))
    }
}

/// What a training run did.
#[derive(Clone, Debug, PartialEq)]
pub struct RecurrentTrainReport {
    /// The estimates; `train_loss` is the mean loss of the training batches since the
    /// previous estimate. The last one is over the whole validation text.
    pub points: Vec<EvalPoint>,
    /// Steps taken.
    pub steps: u64,
    /// Seconds of training, evaluations excluded.
    pub train_seconds: f64,
    /// Whether the time budget, rather than the step count, ended the run.
    pub stopped_by_budget: bool,
    /// Validation predictions in the final estimate.
    pub val_tokens: usize,
}

impl RecurrentTrainReport {
    /// The final validation loss (nats per token) over the whole validation text.
    pub fn final_val_loss(&self) -> f64 {
        self.points.last().map_or(f64::NAN, |p| p.val_loss)
    }
}

/// Trains `model` on the token stream `train` by truncated BPTT (see the module docs),
/// estimating the validation loss on `val` every `eval_interval` steps and once more over
/// the whole of `val` when the run ends; `on_eval` sees each estimate as it is made.
pub fn train<C: LmCell>(
    model: &RecurrentLm<C>,
    train: &[u32],
    val: &[u32],
    cfg: &RecurrentTrainConfig,
    mut on_eval: impl FnMut(&EvalPoint),
) -> Result<RecurrentTrainReport> {
    cfg.check()?;
    let mut data = TokenStreams::new(train, cfg.batch_size)?;
    if data.stream_len() < cfg.seq_len {
        return Err(Error::invalid(
            "recurrent_lm::train",
            format!(
                "{} training tokens in {} streams give {} per stream, fewer than seq_len {}",
                train.len(),
                cfg.batch_size,
                data.stream_len(),
                cfg.seq_len
            ),
        ));
    }
    let vs = model.var_store();
    let adam = AdamConfig { lr: cfg.lr, beta1: cfg.beta1, beta2: cfg.beta2, eps: 1e-8, weight_decay: cfg.weight_decay };
    let mut opt = AdamW::adamw(ParamGroup::no_decay_for_vectors(vs.named_parameters()), adam)?;
    let params = vs.parameters();
    let mut carried = Tbptt::new();
    let (mut points, mut train_seconds, mut steps) = (vec![], 0.0, 0);
    let (mut loss_sum, mut losses) = (0.0, 0);
    let stopped_by_budget = loop {
        if cfg.max_seconds.is_some_and(|budget| train_seconds >= budget) {
            break true;
        }
        if steps == cfg.iters {
            break false;
        }
        let started = Instant::now();
        if data.remaining() < cfg.seq_len {
            data.rewind();
            carried.reset();
        }
        let (inputs, targets) = region("next_chunk", || data.next_chunk(cfg.seq_len, vs))
            .ok_or_else(|| Error::invalid("recurrent_lm::train", "the training streams gave no chunk"))??;
        opt.set_lr(cfg.lr_at(steps, train_seconds));
        let loss = carried.chunk_loss(model, &inputs, &targets)?;
        opt.zero_grad();
        loss.backward()?;
        if cfg.grad_clip > 0.0 {
            region("clip_grad_norm", || clip_grad_norm(&params, cfg.grad_clip))?;
        }
        region("optimizer step", || opt.step())?;
        loss_sum += loss.value().to_f64_vec()?[0];
        losses += 1;
        steps += 1;
        train_seconds += started.elapsed().as_secs_f64();
        if steps % cfg.eval_interval == 0 && steps < cfg.iters {
            let (val_loss, _) =
                region("evaluate", || evaluate(model, val, cfg.batch_size, cfg.seq_len, cfg.eval_tokens))?;
            let point = EvalPoint { step: steps, train_loss: loss_sum / losses as f64, val_loss, train_seconds };
            (loss_sum, losses) = (0.0, 0);
            on_eval(&point);
            points.push(point);
        }
    };
    let (val_loss, val_tokens) = region("evaluate", || evaluate(model, val, cfg.batch_size, cfg.seq_len, usize::MAX))?;
    // No step since the last estimate (the budget ran out right after it): repeat its train loss.
    let train_loss = if losses > 0 {
        loss_sum / losses as f64
    } else {
        points.last().map_or(f64::NAN, |p: &EvalPoint| p.train_loss)
    };
    let point = EvalPoint { step: steps, train_loss, val_loss, train_seconds };
    on_eval(&point);
    points.push(point);
    Ok(RecurrentTrainReport { points, steps, train_seconds, stopped_by_budget, val_tokens })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigc_tensor::Device;

    fn store(dtype: DType, seed: u64) -> VarStore {
        VarStore::new(dtype, &Device::Cpu, seed)
    }

    fn tiny(vocab_size: usize) -> RecurrentLmConfig {
        RecurrentLmConfig { vocab_size, embedding_dim: 8, hidden_size: 16, num_layers: 2, dropout: 0.0 }
    }

    /// "abcabd" repeated: after "ab" the next letter depends on the letter three back.
    fn repetitive_text(len: usize) -> Vec<u32> {
        b"abcabd".iter().cycle().take(len).map(|&b| (b - b'a') as u32).collect()
    }

    fn a_few_steps_lower_the_loss<C: LmCell>() {
        let text = repetitive_text(1200);
        let model = RecurrentLm::<C>::new(&store(DType::F32, 1), tiny(4)).unwrap();
        let (before, _) = evaluate(&model, &text, 4, 16, usize::MAX).unwrap();
        let cfg = RecurrentTrainConfig {
            iters: 60,
            batch_size: 4,
            seq_len: 16,
            lr: 3e-2,
            min_lr: 3e-3,
            warmup_iters: 5,
            eval_interval: 30,
            eval_tokens: 200,
            ..RecurrentTrainConfig::default()
        };
        let report = train(&model, &text, &text, &cfg, |_| {}).unwrap();
        assert_eq!(report.points.iter().map(|p| p.step).collect::<Vec<_>>(), vec![30, 60]);
        assert_eq!((report.steps, report.stopped_by_budget, report.val_tokens), (60, false, 1196));
        let after = report.final_val_loss();
        assert!(after < 0.5 * before, "{}: loss {before} -> {after}", C::KIND);
    }

    #[test]
    fn a_few_steps_lower_the_rnn_loss_on_a_repetitive_text() {
        a_few_steps_lower_the_loss::<RnnCell>();
    }

    #[test]
    fn a_few_steps_lower_the_lstm_loss_on_a_repetitive_text() {
        a_few_steps_lower_the_loss::<LstmCell>();
    }

    #[test]
    fn a_few_steps_lower_the_gru_loss_on_a_repetitive_text() {
        a_few_steps_lower_the_loss::<GruCell>();
    }

    #[test]
    fn streams_are_contiguous_across_chunks_and_targets_are_shifted_by_one() {
        let tokens: Vec<u32> = (0..23).collect();
        let vs = store(DType::F32, 0);
        let mut data = TokenStreams::new(&tokens, 3).unwrap();
        assert_eq!(data.stream_len(), 7);
        let rows = |t: &Tensor| t.to_vec2::<i64>().unwrap();
        let (x1, y1) = data.next_chunk(4, &vs).unwrap().unwrap();
        assert_eq!(rows(&x1), vec![vec![0, 1, 2, 3], vec![7, 8, 9, 10], vec![14, 15, 16, 17]]);
        assert_eq!(rows(&y1), vec![vec![1, 2, 3, 4], vec![8, 9, 10, 11], vec![15, 16, 17, 18]]);
        let (x2, y2) = data.next_chunk(4, &vs).unwrap().unwrap();
        assert_eq!(rows(&x2), vec![vec![4, 5, 6], vec![11, 12, 13], vec![18, 19, 20]]);
        assert_eq!(rows(&y2), vec![vec![5, 6, 7], vec![12, 13, 14], vec![19, 20, 21]]);
        assert!(data.next_chunk(4, &vs).is_none());
        data.rewind();
        assert_eq!(rows(&data.next_chunk(1, &vs).unwrap().unwrap().0), vec![vec![0], vec![7], vec![14]]);
    }

    /// Runs the second of two chunks from `initial` and returns every parameter's gradient.
    fn second_chunk_gradients(model: &LstmLm, initial: Option<&aigc_nn::LstmState>) -> Vec<Vec<f64>> {
        let ids = Tensor::from_vec(vec![3i64, 1, 2, 0, 1, 3], [2, 3], &Device::Cpu).unwrap();
        let targets = Tensor::from_vec(vec![1i64, 2, 0, 1, 3, 2], [2, 3], &Device::Cpu).unwrap();
        model.var_store().zero_grad();
        model.loss(&ids, &targets, initial).unwrap().0.backward().unwrap();
        model.var_store().parameters().iter().map(|p| p.grad().unwrap().to_f64_vec().unwrap()).collect()
    }

    #[test]
    fn the_carried_state_continues_the_context_but_not_the_gradient() {
        let model = LstmLm::new(&store(DType::F64, 2), tiny(4)).unwrap();
        let first = Tensor::from_vec(vec![0i64, 1, 2, 3, 2, 1], [2, 3], &Device::Cpu).unwrap();
        let mut carried = Tbptt::new();
        carried.chunk_loss(&model, &first, &first).unwrap();
        let state = carried.state().unwrap().clone();
        assert!(!state.h.needs_grad() && !state.c.needs_grad(), "the carried state is detached");

        // The gradient of the second chunk equals the one from a constant initial state
        // holding the same values: nothing flows back into the first chunk.
        let constant =
            aigc_nn::LstmState { h: Var::constant(state.h.value().clone()), c: Var::constant(state.c.value().clone()) };
        let from_carried = second_chunk_gradients(&model, Some(&state));
        assert_eq!(from_carried, second_chunk_gradients(&model, Some(&constant)));

        // Without the detach the gradient would reach the first chunk and differ; from a
        // zero state the context would be lost and differ too.
        let (_, attached) = model.loss(&first, &first, None).unwrap();
        assert_ne!(from_carried, second_chunk_gradients(&model, Some(&attached)));
        assert_ne!(from_carried, second_chunk_gradients(&model, None));
    }

    #[test]
    fn chunked_evaluation_equals_one_pass_over_the_whole_stream() {
        let model = GruLm::new(&store(DType::F64, 3), tiny(4)).unwrap();
        let text = repetitive_text(26);
        let whole = |tokens: &[u32]| ids_tensor(tokens, 1, tokens.len(), model.var_store()).unwrap();
        let (one_pass, _) = model.loss(&whole(&text[..25]), &whole(&text[1..]), None).unwrap();
        let (chunked, count) = evaluate(&model, &text, 1, 4, usize::MAX).unwrap();
        assert_eq!(count, 25);
        assert!((chunked - one_pass.value().to_f64_vec().unwrap()[0]).abs() < 1e-12);
        let (_, budgeted) = evaluate(&model, &text, 2, 4, 10).unwrap();
        assert_eq!(budgeted, 10, "a token budget caps the predictions");
    }

    #[test]
    fn generation_is_reproducible_and_stays_in_the_vocabulary() {
        let model = RnnLm::new(&store(DType::F32, 4), tiny(5)).unwrap();
        let sampling = SamplingConfig::default();
        let a = model.generate(&[1, 2], 30, &sampling, 9).unwrap();
        assert_eq!(a.len(), 30);
        assert!(a.iter().all(|&id| id < 5));
        assert_eq!(a, model.generate(&[1, 2], 30, &sampling, 9).unwrap());
        assert!(model.var_store().is_training(), "generation restores the training mode");
        assert!(model.generate(&[], 3, &sampling, 9).is_err());
    }

    #[test]
    fn parameters_have_the_word_language_model_names() {
        let vs = store(DType::F32, 0);
        LstmLm::new(&vs, RecurrentLmConfig { num_layers: 1, ..tiny(7) }).unwrap();
        let names: Vec<(String, Vec<usize>)> =
            vs.named_parameters().into_iter().map(|(n, v)| (n, v.dims().to_vec())).collect();
        let want = [
            ("encoder.weight", vec![7, 8]),
            ("rnn.weight_ih_l0", vec![64, 8]),
            ("rnn.weight_hh_l0", vec![64, 16]),
            ("rnn.bias_ih_l0", vec![64]),
            ("rnn.bias_hh_l0", vec![64]),
            ("decoder.weight", vec![7, 16]),
            ("decoder.bias", vec![7]),
        ];
        assert_eq!(names, want.map(|(n, d)| (n.to_string(), d)));
    }

    #[test]
    fn bad_configs_and_inputs_are_errors() {
        let vs = store(DType::F32, 0);
        let err = |r: Result<LstmLm>| r.err().unwrap().to_string();
        assert!(err(LstmLm::new(&vs, RecurrentLmConfig { hidden_size: 0, ..tiny(4) })).contains("at least 1"));
        assert!(err(LstmLm::new(&vs, RecurrentLmConfig { dropout: 1.0, ..tiny(4) })).contains("[0, 1)"));

        let model = LstmLm::new(&store(DType::F32, 0), tiny(4)).unwrap();
        let text = repetitive_text(100);
        let run = |cfg: RecurrentTrainConfig| train(&model, &text, &text, &cfg, |_| {}).err().unwrap().to_string();
        let base = RecurrentTrainConfig { iters: 1, batch_size: 2, seq_len: 8, ..RecurrentTrainConfig::default() };
        assert!(run(RecurrentTrainConfig { seq_len: 0, ..base.clone() }).contains("must be at least 1"));
        assert!(run(RecurrentTrainConfig { min_lr: 1.0, ..base.clone() }).contains("0 <= min_lr <= lr"));
        assert!(run(RecurrentTrainConfig { max_seconds: Some(0.0), ..base.clone() }).contains("positive"));
        assert!(run(RecurrentTrainConfig { batch_size: 20, ..base.clone() }).contains("fewer than seq_len 8"));
        assert!(train(&model, &text[..2], &text, &base, |_| {}).is_err(), "too little training text");

        let ids = Tensor::from_vec(vec![0i64, 9], [1, 2], &Device::Cpu).unwrap();
        assert!(model.forward(&ids, None).err().unwrap().to_string().contains("out of range"));
        let floats = Tensor::zeros([1, 2], DType::F32, &Device::Cpu).unwrap();
        assert!(model.forward(&floats, None).err().unwrap().to_string().contains("expected i64 token ids"));
        assert!("transformer".parse::<RecurrentKind>().is_err());
        assert_eq!("LSTM".parse::<RecurrentKind>().unwrap(), RecurrentKind::Lstm);
    }

    #[test]
    fn a_time_budget_stops_training_and_finishes_the_schedule() {
        let model = GruLm::new(&store(DType::F32, 5), tiny(4)).unwrap();
        let text = repetitive_text(400);
        let cfg = RecurrentTrainConfig {
            iters: 1_000_000,
            max_seconds: Some(0.05),
            batch_size: 2,
            seq_len: 8,
            ..RecurrentTrainConfig::default()
        };
        let report = train(&model, &text, &text, &cfg, |_| {}).unwrap();
        assert!(report.stopped_by_budget && report.steps < cfg.iters);
        assert!(report.train_seconds >= 0.05);
        assert_eq!(cfg.lr_at(cfg.warmup_iters, 0.05), cfg.min_lr, "the decay follows the spent budget");
        assert_eq!(cfg.lr_at(cfg.iters, 0.0), cfg.min_lr);
        assert!(cfg.lr_at(0, 0.05) < cfg.lr_at(1, 0.05), "the warmup counts steps, whatever the time");
    }
}

//! Training a GPT as nanoGPT's `train.py` does: random windows of the token stream as
//! batches, AdamW with decoupled weight decay on matrices only, linear warmup then
//! cosine decay of the learning rate, global-norm gradient clipping, and a periodic
//! estimate of the train and validation loss over a fixed number of random batches.

use super::model::Gpt;
use crate::rng::SplitMix64;
use aigc_autograd::profile::region;
use aigc_autograd::{CrossEntropyOptions, no_grad};
use aigc_nn::optim::ParamGroup;
use aigc_nn::optim::schedule::WarmupCosine;
use aigc_nn::{AdamConfig, AdamW, Optimizer, VarStore, clip_grad_norm};
use aigc_tensor::{Device, Error, Result, Tensor};
use std::time::Instant;

/// The optimisation settings of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct GptTrainConfig {
    pub iters: u64,
    /// A budget of training seconds (estimates excluded): the run stops when it is spent,
    /// and after the warmup the decay is advanced to the share of it spent when that is
    /// further along than the step count, so that a run the budget stops also ends its decay.
    pub max_seconds: Option<f64>,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_iters: u64,
    /// Steps over which the cosine decays from `lr` to `min_lr`.
    pub lr_decay_iters: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Clip the global gradient norm to this (0 turns clipping off).
    pub grad_clip: f64,
    /// Estimate the losses every this many steps (and after the last).
    pub eval_interval: u64,
    /// Batches per loss estimate.
    pub eval_iters: usize,
    /// Seed of the batch sampler.
    pub seed: u64,
}

impl GptTrainConfig {
    /// nanoGPT's CPU "baby" run on character-level tiny Shakespeare: 2000 iterations of
    /// batch 12, lr 1e-3 with warmup 100 and cosine to 1e-4, AdamW betas (0.9, 0.99),
    /// weight decay 0.1, gradient clipping at 1.
    pub fn baby_shakespeare() -> GptTrainConfig {
        GptTrainConfig {
            iters: 2000,
            max_seconds: None,
            batch_size: 12,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_iters: 100,
            lr_decay_iters: 2000,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            grad_clip: 1.0,
            eval_interval: 250,
            eval_iters: 20,
            seed: 1337,
        }
    }
}

/// One loss estimate during training.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalPoint {
    pub step: u64,
    pub train_loss: f64,
    pub val_loss: f64,
    /// Seconds of training (estimates excluded) up to this step.
    pub train_seconds: f64,
}

/// Draws `batch` random windows of `block + 1` tokens from `data`: inputs `[batch, block]`
/// and the same windows shifted by one as targets.
pub fn sample_batch(
    data: &[u32],
    block: usize,
    batch: usize,
    rng: &mut SplitMix64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    if data.len() <= block {
        return Err(Error::invalid(
            "sample_batch",
            format!("{} tokens cannot fill a window of {} + 1", data.len(), block),
        ));
    }
    let (mut x, mut y) = (Vec::with_capacity(batch * block), Vec::with_capacity(batch * block));
    for _ in 0..batch {
        let start = rng.below((data.len() - block) as u64) as usize;
        x.extend(data[start..start + block].iter().map(|&t| t as i64));
        y.extend(data[start + 1..start + block + 1].iter().map(|&t| t as i64));
    }
    Ok((Tensor::from_vec(x, [batch, block], device)?, Tensor::from_vec(y, [batch, block], device)?))
}

/// The mean loss over `batches` random batches of `data`, in evaluation mode.
pub fn estimate_loss(
    model: &Gpt,
    vs: &VarStore,
    data: &[u32],
    batches: usize,
    batch_size: usize,
    seed: u64,
) -> Result<f64> {
    let was_training = vs.is_training();
    vs.set_training(false);
    let mut rng = SplitMix64::new(seed);
    let block = model.config().block_size;
    let total = no_grad(|| -> Result<f64> {
        let mut total = 0.0;
        for _ in 0..batches {
            let (x, y) = sample_batch(data, block, batch_size, &mut rng, &model.device())?;
            total += model.loss(&x, &y)?.value().to_f64_vec()?[0];
        }
        Ok(total)
    });
    vs.set_training(was_training);
    Ok(total? / batches.max(1) as f64)
}

/// The mean loss (nats per token) over every next-token prediction of `tokens`, in
/// evaluation mode: the exact validation loss, where [`estimate_loss`] samples a few random
/// batches. Windows of `block_size` tokens start every `block_size / 2` positions (the
/// last one is moved back to end at the last token); the first window scores all its
/// positions, each later one only those the earlier windows did not score. So every
/// token is scored once, and all but the first `block_size / 2` with at least
/// `block_size / 2` tokens of context: the model is judged on what it does with context,
/// as a recurrent model read contiguously is, not on the start of a window.
pub fn validation_loss(model: &Gpt, vs: &VarStore, tokens: &[u32]) -> Result<f64> {
    const IGNORED: i64 = -1;
    let block = model.config().block_size;
    if tokens.len() < block + 1 {
        return Err(Error::invalid(
            "gpt::validation_loss",
            format!("{} tokens hold no window of block_size {block} plus its target", tokens.len()),
        ));
    }
    let last_start = tokens.len() - 1 - block;
    let mut starts: Vec<usize> = (0..=last_start).step_by((block / 2).max(1)).collect();
    if starts.last() != Some(&last_start) {
        starts.push(last_start);
    }
    // Each window's inputs and targets, with the targets already scored set to IGNORED.
    let mut scored_until = 0;
    let windows: Vec<(Vec<i64>, Vec<i64>)> = starts
        .iter()
        .map(|&s| {
            let x = tokens[s..s + block].iter().map(|&t| t as i64).collect();
            let y =
                (0..block).map(|i| if s + i >= scored_until { tokens[s + i + 1] as i64 } else { IGNORED }).collect();
            scored_until = s + block;
            (x, y)
        })
        .collect();
    let was_training = vs.is_training();
    vs.set_training(false);
    let options = CrossEntropyOptions { ignore_index: Some(IGNORED), ..Default::default() };
    let total = no_grad(|| -> Result<f64> {
        let mut total = 0.0;
        for batch in windows.chunks(64) {
            let shape = [batch.len(), block];
            let x = Tensor::from_vec(batch.iter().flat_map(|w| w.0.iter().copied()).collect(), shape, &model.device())?;
            let y: Vec<i64> = batch.iter().flat_map(|w| w.1.iter().copied()).collect();
            let counted = y.iter().filter(|&&t| t != IGNORED).count();
            let logits = model.forward(&x)?;
            let flat = logits.reshape([batch.len() * block, model.config().vocab_size])?;
            let loss = flat.cross_entropy(&Tensor::from_vec(y, [batch.len() * block], &model.device())?, options)?;
            total += loss.value().to_f64_vec()?[0] * counted as f64;
        }
        Ok(total)
    });
    vs.set_training(was_training);
    Ok(total? / (tokens.len() - 1) as f64)
}

/// Trains `model` (whose parameters live in `vs`) on the token stream `train`, estimating
/// the train and validation losses every `eval_interval` steps and after the last one;
/// `on_eval` sees each estimate as it is made. Returns all the estimates.
pub fn train(
    model: &Gpt,
    vs: &VarStore,
    train: &[u32],
    val: &[u32],
    cfg: &GptTrainConfig,
    mut on_eval: impl FnMut(&EvalPoint),
) -> Result<Vec<EvalPoint>> {
    let adam = AdamConfig { lr: cfg.lr, beta1: cfg.beta1, beta2: cfg.beta2, eps: 1e-8, weight_decay: cfg.weight_decay };
    let mut opt = AdamW::adamw(ParamGroup::no_decay_for_vectors(vs.named_parameters()), adam)?;
    let schedule =
        WarmupCosine { warmup: cfg.warmup_iters, total: cfg.lr_decay_iters, max_lr: cfg.lr, min_lr: cfg.min_lr };
    let mut rng = SplitMix64::new(cfg.seed);
    let block = model.config().block_size;
    let params = vs.parameters();
    let mut points = vec![];
    let mut train_seconds = 0.0;
    let budget_spent = |seconds: f64| cfg.max_seconds.is_some_and(|budget| seconds >= budget);
    let mut step = 0;
    while step < cfg.iters && !budget_spent(train_seconds) {
        let started = Instant::now();
        opt.set_lr(schedule.lr_within_budget(step, cfg.max_seconds.map(|budget| train_seconds / budget)));
        let (x, y) = region("sample_batch", || sample_batch(train, block, cfg.batch_size, &mut rng, &model.device()))?;
        let loss = model.loss(&x, &y)?;
        opt.zero_grad();
        loss.backward()?;
        if cfg.grad_clip > 0.0 {
            region("clip_grad_norm", || clip_grad_norm(&params, cfg.grad_clip))?;
        }
        region("optimizer step", || opt.step())?;
        train_seconds += started.elapsed().as_secs_f64();
        step += 1;
        if step.is_multiple_of(cfg.eval_interval.max(1)) || step == cfg.iters || budget_spent(train_seconds) {
            let eval_seed = cfg.seed ^ step;
            let point = region("estimate_loss", || -> Result<EvalPoint> {
                Ok(EvalPoint {
                    step,
                    train_loss: estimate_loss(model, vs, train, cfg.eval_iters, cfg.batch_size, eval_seed)?,
                    val_loss: estimate_loss(model, vs, val, cfg.eval_iters, cfg.batch_size, eval_seed)?,
                    train_seconds,
                })
            })?;
            on_eval(&point);
            points.push(point);
        }
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::GptConfig;
    use aigc_tensor::DType;

    #[test]
    fn a_few_steps_lower_the_loss_on_a_repetitive_text() {
        let dev = Device::Cpu;
        let text: Vec<u32> = b"abcabdabcabdabcabd".iter().cycle().take(600).map(|&b| (b - b'a') as u32).collect();
        let vs = VarStore::new(DType::F32, &dev, 0);
        let cfg =
            GptConfig { vocab_size: 4, block_size: 8, n_layer: 1, n_head: 2, n_embd: 16, dropout: 0.0, bias: false };
        let model = Gpt::new(&vs, cfg).unwrap();
        let before = estimate_loss(&model, &vs, &text, 4, 8, 0).unwrap();
        let run = GptTrainConfig {
            iters: 60,
            batch_size: 8,
            lr: 1e-2,
            min_lr: 1e-3,
            warmup_iters: 5,
            lr_decay_iters: 60,
            eval_interval: 30,
            eval_iters: 4,
            ..GptTrainConfig::baby_shakespeare()
        };
        let points = train(&model, &vs, &text, &text, &run, |_| {}).unwrap();
        assert_eq!(points.iter().map(|p| p.step).collect::<Vec<_>>(), vec![30, 60]);
        let after = points.last().unwrap().val_loss;
        assert!(after < 0.5 * before, "loss {before} -> {after}");
    }

    #[test]
    fn a_time_budget_stops_the_run_with_a_final_estimate() {
        let dev = Device::Cpu;
        let text: Vec<u32> = (0..400u32).map(|i| i % 4).collect();
        let vs = VarStore::new(DType::F32, &dev, 0);
        let cfg =
            GptConfig { vocab_size: 4, block_size: 8, n_layer: 1, n_head: 2, n_embd: 16, dropout: 0.0, bias: false };
        let model = Gpt::new(&vs, cfg).unwrap();
        let run = GptTrainConfig {
            iters: 1_000_000,
            max_seconds: Some(1e-9),
            batch_size: 4,
            eval_interval: 1000,
            eval_iters: 2,
            ..GptTrainConfig::baby_shakespeare()
        };
        let points = train(&model, &vs, &text, &text, &run, |_| {}).unwrap();
        assert_eq!(points.len(), 1, "one estimate, after the step that spent the budget");
        assert_eq!(points[0].step, 1);
        assert!(points[0].train_seconds > 0.0);
    }

    #[test]
    fn validation_loss_scores_every_token_once_from_the_first_window_holding_it() {
        let dev = Device::Cpu;
        let vs = VarStore::new(DType::F64, &dev, 3);
        let cfg =
            GptConfig { vocab_size: 5, block_size: 4, n_layer: 1, n_head: 1, n_embd: 8, dropout: 0.0, bias: false };
        let model = Gpt::new(&vs, cfg).unwrap();
        // 601 targets: windows start every 2 tokens (more than one batch of 64), and the
        // last start (597) is off that grid.
        let tokens: Vec<u32> = (0..602u32).map(|i| (i * 7 + i / 3) % 5).collect();
        let got = validation_loss(&model, &vs, &tokens).unwrap();
        // Reference: the target after position g is scored by the first window [s, s + 4)
        // that holds g, with the model run on that window alone.
        let mut starts: Vec<usize> = (0..=597).step_by(2).collect();
        starts.push(597);
        let log_prob = |s: usize, g: usize| {
            let x: Vec<i64> = tokens[s..s + 4].iter().map(|&t| t as i64).collect();
            let logits = model.forward(&Tensor::from_vec(x, [1, 4], &dev).unwrap()).unwrap();
            let row = &logits.value().to_vec::<f64>().unwrap()[(g - s) * 5..(g - s + 1) * 5];
            let log_sum = row.iter().map(|v| v.exp()).sum::<f64>().ln();
            row[tokens[g + 1] as usize] - log_sum
        };
        let want = -(0..601).map(|g| log_prob(*starts.iter().find(|&&s| s <= g && g < s + 4).unwrap(), g)).sum::<f64>()
            / 601.0;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert!(vs.is_training(), "the training mode is restored");
        assert!(validation_loss(&model, &vs, &tokens[..4]).is_err());
        assert!(validation_loss(&model, &vs, &tokens[..5]).is_ok(), "one window and its target");
    }

    #[test]
    fn batches_are_shifted_windows() {
        let data: Vec<u32> = (0..20).collect();
        let (x, y) = sample_batch(&data, 5, 3, &mut SplitMix64::new(1), &Device::Cpu).unwrap();
        let (x, y) = (x.to_vec2::<i64>().unwrap(), y.to_vec2::<i64>().unwrap());
        for (xr, yr) in x.iter().zip(&y) {
            assert!(xr.windows(2).all(|w| w[1] == w[0] + 1));
            assert_eq!(yr[0], xr[0] + 1);
        }
        assert!(sample_batch(&data[..5], 5, 1, &mut SplitMix64::new(1), &Device::Cpu).is_err());
    }
}

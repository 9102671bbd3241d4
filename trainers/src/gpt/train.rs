//! Training a GPT as nanoGPT's `train.py` does: random windows of the token stream as
//! batches, AdamW with decoupled weight decay on matrices only, linear warmup then
//! cosine decay of the learning rate, global-norm gradient clipping, and a periodic
//! estimate of the train and validation loss over a fixed number of random batches.

use super::model::Gpt;
use crate::rng::SplitMix64;
use aigc_autograd::no_grad;
use aigc_autograd::profile::region;
use aigc_nn::optim::ParamGroup;
use aigc_nn::optim::schedule::{LrSchedule, WarmupCosine};
use aigc_nn::{AdamConfig, AdamW, Optimizer, VarStore, clip_grad_norm};
use aigc_tensor::{Device, Error, Result, Tensor};
use std::time::Instant;

/// The optimisation settings of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct GptTrainConfig {
    pub iters: u64,
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

/// The mean loss (nats per token) over the whole of `tokens`, cut into consecutive windows
/// of `block_size` tokens scored 64 windows at a time, in evaluation mode: the exact
/// validation loss, where [`estimate_loss`] samples a few random batches. Each position
/// sees the ones before it in its window.
pub fn validation_loss(model: &Gpt, vs: &VarStore, tokens: &[u32]) -> Result<f64> {
    let block = model.config().block_size;
    let windows = tokens.len().saturating_sub(1) / block;
    if windows == 0 {
        return Err(Error::invalid(
            "gpt::validation_loss",
            format!("{} tokens hold no window of block_size {block} plus its target", tokens.len()),
        ));
    }
    let window = |k: usize, shift: usize| tokens[k * block + shift..(k + 1) * block + shift].iter().map(|&t| t as i64);
    let was_training = vs.is_training();
    vs.set_training(false);
    let total = no_grad(|| -> Result<f64> {
        let mut total = 0.0;
        for first in (0..windows).step_by(64) {
            let batch: Vec<usize> = (first..windows.min(first + 64)).collect();
            let x: Vec<i64> = batch.iter().flat_map(|&k| window(k, 0)).collect();
            let y: Vec<i64> = batch.iter().flat_map(|&k| window(k, 1)).collect();
            let shape = [batch.len(), block];
            let (x, y) = (Tensor::from_vec(x, shape, &model.device())?, Tensor::from_vec(y, shape, &model.device())?);
            total += model.loss(&x, &y)?.value().to_f64_vec()?[0] * batch.len() as f64;
        }
        Ok(total)
    });
    vs.set_training(was_training);
    Ok(total? / windows as f64)
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
    for step in 0..cfg.iters {
        let started = Instant::now();
        opt.set_lr(schedule.lr(step));
        let (x, y) = region("sample_batch", || sample_batch(train, block, cfg.batch_size, &mut rng, &model.device()))?;
        let loss = model.loss(&x, &y)?;
        opt.zero_grad();
        loss.backward()?;
        if cfg.grad_clip > 0.0 {
            region("clip_grad_norm", || clip_grad_norm(&params, cfg.grad_clip))?;
        }
        region("optimizer step", || opt.step())?;
        train_seconds += started.elapsed().as_secs_f64();
        let done = step + 1;
        if done.is_multiple_of(cfg.eval_interval.max(1)) || done == cfg.iters {
            let eval_seed = cfg.seed ^ done;
            let point = region("estimate_loss", || -> Result<EvalPoint> {
                Ok(EvalPoint {
                    step: done,
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
    fn validation_loss_is_the_mean_over_every_whole_window() {
        let dev = Device::Cpu;
        let vs = VarStore::new(DType::F64, &dev, 3);
        let cfg =
            GptConfig { vocab_size: 5, block_size: 4, n_layer: 1, n_head: 1, n_embd: 8, dropout: 0.0, bias: false };
        let model = Gpt::new(&vs, cfg).unwrap();
        // 150 windows of 4 (more than one batch of 64) and 2 leftover tokens.
        let tokens: Vec<u32> = (0..602u32).map(|i| (i * 7 + i / 3) % 5).collect();
        let got = validation_loss(&model, &vs, &tokens).unwrap();
        let window_loss = |k: usize| {
            let ids = |shift: usize| tokens[k * 4 + shift..k * 4 + 4 + shift].iter().map(|&t| t as i64).collect();
            let (x, y) =
                (Tensor::from_vec(ids(0), [1, 4], &dev).unwrap(), Tensor::from_vec(ids(1), [1, 4], &dev).unwrap());
            model.loss(&x, &y).unwrap().value().to_f64_vec().unwrap()[0]
        };
        let want = (0..150).map(window_loss).sum::<f64>() / 150.0;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert!(vs.is_training(), "the training mode is restored");
        assert!(validation_loss(&model, &vs, &tokens[..4]).is_err());
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

//! Sampling text from a GPT: temperature, top-k (Fan et al. 2018) and nucleus / top-p
//! (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration") filtering of
//! the next-token distribution, and autoregressive generation with or without the KV
//! cache.
//!
//! With the cache, each new token costs one single-position forward pass. The learned
//! absolute positions stop at `block_size`, so when the cache is full the context is
//! shifted: the cache is rebuilt from the last `block_size / 2` tokens and decoding goes
//! on (an amortised re-prefill every `block_size / 2` tokens). Without the cache every
//! token recomputes the whole window of the last `block_size` tokens, as nanoGPT's
//! `generate` does; within the first block both give the same tokens.

use super::model::Gpt;
use crate::rng::SplitMix64;
use aigc_autograd::no_grad;
use aigc_tensor::{Error, Result, Tensor};

/// How the next token is drawn from the model's logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Logits are divided by this (`> 0`); below 1 sharpens, above 1 flattens.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`.
    pub top_p: Option<f64>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { temperature: 1.0, top_k: None, top_p: None }
    }
}

impl SamplingConfig {
    fn check(&self) -> Result<()> {
        let ok = self.temperature > 0.0 && self.top_k != Some(0) && self.top_p.is_none_or(|p| p > 0.0 && p <= 1.0);
        if ok {
            Ok(())
        } else {
            Err(Error::invalid("SamplingConfig", format!("{self:?}: need temperature > 0, top_k >= 1, 0 < top_p <= 1")))
        }
    }

    /// The filtered next-token distribution for one row of logits (probabilities summing to 1).
    pub fn distribution(&self, logits: &[f64]) -> Result<Vec<f64>> {
        self.check()?;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let keep_k = self.top_k.unwrap_or(logits.len()).min(logits.len());
        let max = logits[order[0]];
        let mut probs = vec![0.0; logits.len()];
        for &i in &order[..keep_k] {
            probs[i] = ((logits[i] - max) / self.temperature).exp();
        }
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.top_p {
            // Keep tokens in order of probability until their mass reaches top_p (the first always).
            let mut mass = 0.0;
            for &i in &order[..keep_k] {
                if mass >= top_p {
                    probs[i] = 0.0;
                }
                mass += probs[i].max(0.0);
            }
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        Ok(probs)
    }

    /// Draws a token id from `logits`.
    pub fn sample(&self, logits: &[f64], rng: &mut SplitMix64) -> Result<u32> {
        let probs = self.distribution(logits)?;
        let u = rng.next_f64();
        let mut cumulative = 0.0;
        let mut last_kept = 0;
        for (i, p) in probs.iter().enumerate() {
            if *p > 0.0 {
                last_kept = i;
                cumulative += p;
                if u < cumulative {
                    return Ok(i as u32);
                }
            }
        }
        Ok(last_kept as u32) // rounding left u just above the total
    }
}

/// The last position's logits of `[1, T, vocab]` as f64.
fn last_logits(logits: &Tensor) -> Result<Vec<f64>> {
    let t = logits.dims()[1];
    logits.narrow(1, t - 1, 1)?.to_f64_vec()
}

fn ids_tensor(ids: &[u32], model: &Gpt) -> Result<Tensor> {
    let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::from_vec(ids.clone(), [1, ids.len()], &model.device())
}

/// Continues `prompt` by `new_tokens` tokens drawn with `cfg`, using the KV cache when
/// `use_cache`. Returns only the new tokens. Runs without recording gradients.
pub fn generate(
    model: &Gpt,
    prompt: &[u32],
    new_tokens: usize,
    cfg: &SamplingConfig,
    seed: u64,
    use_cache: bool,
) -> Result<Vec<u32>> {
    cfg.check()?;
    if prompt.is_empty() {
        return Err(Error::invalid("generate", "the prompt must hold at least one token"));
    }
    let block = model.config().block_size;
    let mut rng = SplitMix64::new(seed);
    let mut tokens = prompt.to_vec();
    no_grad(|| {
        let mut cache = model.new_cache();
        // The cache holds the keys and values of `tokens[cached_from..cached_from + cache.len()]`.
        let mut cached_from = tokens.len().saturating_sub(block);
        for _ in 0..new_tokens {
            let logits = if use_cache {
                if tokens.len() - cached_from > block {
                    // Context shift: rebuild the cache from the most recent half block.
                    cache = model.new_cache();
                    cached_from = tokens.len() - (block / 2).max(1);
                }
                let unseen = &tokens[cached_from + cache.len()..];
                model.forward_cached(&ids_tensor(unseen, model)?, &mut cache)?
            } else {
                model.forward(&ids_tensor(&tokens[tokens.len().saturating_sub(block)..], model)?)?
            };
            tokens.push(cfg.sample(&last_logits(logits.value())?, &mut rng)?);
        }
        Ok(tokens[prompt.len()..].to_vec())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::GptConfig;
    use aigc_nn::VarStore;
    use aigc_tensor::{DType, Device};

    #[test]
    fn top_k_and_top_p_keep_the_most_likely_tokens() {
        let logits = [2.0f64.ln(), 1.0f64.ln(), 4.0f64.ln(), 1.0f64.ln()]; // probabilities 2:1:4:1
        let plain = SamplingConfig::default().distribution(&logits).unwrap();
        assert!((plain[2] - 0.5).abs() < 1e-12 && (plain.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let k2 = SamplingConfig { top_k: Some(2), ..Default::default() }.distribution(&logits).unwrap();
        assert!((k2[2] - 4.0 / 6.0).abs() < 1e-12 && (k2[0] - 2.0 / 6.0).abs() < 1e-12 && k2[1] == 0.0 && k2[3] == 0.0);
        // 0.5 alone does not reach 0.6, 0.5 + 0.25 does: two tokens survive.
        let p = SamplingConfig { top_p: Some(0.6), ..Default::default() }.distribution(&logits).unwrap();
        assert_eq!(p.iter().filter(|&&q| q > 0.0).count(), 2);
        let cold = SamplingConfig { temperature: 0.01, ..Default::default() }.distribution(&logits).unwrap();
        assert!(cold[2] > 0.999);
        let bad = SamplingConfig { temperature: 0.0, ..Default::default() };
        assert!(bad.distribution(&logits).unwrap_err().to_string().contains("temperature > 0"));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0, 1.0f64.ln(), 3.0f64.ln()]; // 1:1:3
        let cfg = SamplingConfig::default();
        let mut rng = SplitMix64::new(9);
        let mut counts = [0usize; 3];
        for _ in 0..5000 {
            counts[cfg.sample(&logits, &mut rng).unwrap() as usize] += 1;
        }
        assert!((counts[2] as f64 / 5000.0 - 0.6).abs() < 0.03, "{counts:?}");
    }

    #[test]
    fn cached_and_recomputed_generation_agree_within_the_block_and_run_past_it() {
        let dev = Device::Cpu;
        let cfg =
            GptConfig { vocab_size: 7, block_size: 8, n_layer: 1, n_head: 2, n_embd: 8, dropout: 0.0, bias: true };
        let model = Gpt::new(&VarStore::new(DType::F64, &dev, 1), cfg).unwrap();
        let sampling = SamplingConfig { temperature: 0.8, top_k: Some(5), top_p: Some(0.95) };
        let cached = generate(&model, &[1, 2], 6, &sampling, 42, true).unwrap();
        let recomputed = generate(&model, &[1, 2], 6, &sampling, 42, false).unwrap();
        assert_eq!(cached, recomputed);
        let long = generate(&model, &[1, 2, 3], 30, &sampling, 42, true).unwrap();
        assert_eq!(long.len(), 30);
        assert!(long.iter().all(|&t| t < 7));
        assert!(generate(&model, &[], 3, &sampling, 0, true).is_err());
    }
}

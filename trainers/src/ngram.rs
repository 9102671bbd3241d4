//! An n-gram language model with interpolated Kneser-Ney smoothing (Kneser & Ney 1995, in the
//! interpolated and modified forms of Chen & Goodman 1998, "An Empirical Study of Smoothing
//! Techniques for Language Modeling", sections 2.7 and 3), the strongest of the pre-neural
//! language models and the baseline every neural one is measured against.
//!
//! An order-`n` model predicts the next token from the `n - 1` before it. Written for a
//! context `h` of length `k` and its suffix `h'` of length `k - 1`:
//!
//! ```text
//! P_k(w | h) = max(c(h w) - D_k(c(h w)), 0) / c(h •)  +  γ(h) P_{k-1}(w | h')
//! γ(h)       = (D_k(1) N_1(h •) + D_k(2) N_2(h •) + D_k(3+) N_3+(h •)) / c(h •)
//! P_{-1}(w)  = 1 / V                                           (the uniform distribution)
//! ```
//!
//! where `c(h •)` sums `c(h w)` over `w`, `N_j(h •)` is the number of distinct `w` with
//! `c(h w) = j`, and a context never seen skips its level (`P_k = P_{k-1}`). What each level
//! discounts is exactly the mass `γ` hands to the level below, so every distribution sums
//! to one and gives every token a positive probability.
//!
//! - **Counts.** The highest level (`k = n - 1`) counts n-grams. The lower levels count
//!   *continuations*: `c(h w)` is the number of distinct tokens `v` seen before `h w`. A lower
//!   level only speaks when the longer context gave little evidence, so it should say how
//!   many contexts `w` follows, not how often `w` occurs ("Francisco" is frequent, but only
//!   after "San").
//! - **Discounts**, estimated per level from the count-of-counts `n_j` (the number of the
//!   level's n-grams with count exactly `j`), with `Y = n_1 / (n_1 + 2 n_2)`:
//!   [`Discounting::Modified`] (the default, Chen & Goodman's modified KN) uses three,
//!   `D(1) = 1 - 2Y n_2/n_1`, `D(2) = 2 - 3Y n_3/n_2`, `D(3+) = 3 - 4Y n_4/n_3`;
//!   [`Discounting::Single`] uses `D = Y` for every count (interpolated KN). On small data
//!   where an estimate is undefined or outside `(0, c]`, it falls back to `Y`, or to 0.5 when
//!   `Y` is undefined too.
//! - **The start of a text.** The first `n - 1` positions have shorter contexts; they are
//!   predicted by the lower level of that length (there is no beginning-of-text token).

use aigc_kernels::cpu::random::unit_f64;
use aigc_tensor::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

/// The multiplicative hash of rustc (`FxHasher`): a rotate, xor and multiply per 8 bytes.
/// N-gram keys are a few token ids, for which the standard SipHash spends most of its time
/// on set-up; the counts here do not need SipHash's resistance to adversarial keys.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        // The multiply leaves the low bits depending on the low bits of the input only, and
        // the table indexes buckets by the low bits: fold the high half down.
        self.0 ^ (self.0 >> 32)
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
type FxSet<K> = HashSet<K, BuildHasherDefault<FxHasher>>;

/// How the discounts are chosen (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Discounting {
    /// One discount per level, `D = n_1 / (n_1 + 2 n_2)`: interpolated Kneser-Ney.
    Single,
    /// Three discounts per level (counts 1, 2 and 3+): modified Kneser-Ney.
    #[default]
    Modified,
}

/// The statistics of one context `h`.
#[derive(Debug, Clone)]
struct Context {
    /// `(w, c(h w))` for every `w` seen after `h`, sorted by `w`.
    followers: Vec<(u32, u32)>,
    /// `c(h •)`.
    total: u64,
    /// `γ(h) c(h •)`: the discounted mass, handed to the level below.
    backoff_mass: f64,
}

impl Context {
    fn count(&self, w: u32) -> u32 {
        self.followers.binary_search_by_key(&w, |&(v, _)| v).map_or(0, |i| self.followers[i].1)
    }
}

/// All contexts of one length `k`.
#[derive(Debug, Clone)]
struct Level {
    contexts: FxMap<Box<[u32]>, Context>,
    /// `D(1), D(2), D(3+)`.
    discounts: [f64; 3],
}

impl Level {
    fn discount(&self, count: u32) -> f64 {
        match count {
            0 => 0.0,
            1 => self.discounts[0],
            2 => self.discounts[1],
            _ => self.discounts[2],
        }
    }
}

/// A trained Kneser-Ney n-gram model over token ids `0..vocab_size`.
#[derive(Debug, Clone)]
pub struct NGramModel {
    order: usize,
    vocab_size: usize,
    discounting: Discounting,
    /// `levels[k]`: the contexts of length `k`, for `k` in `0..order`.
    levels: Vec<Level>,
}

/// The discounts `D(1), D(2), D(3+)` from the count-of-counts `n_1..n_4` of one level.
pub fn estimate_discounts(count_of_counts: [u64; 4], discounting: Discounting) -> [f64; 3] {
    let [n1, n2, n3, n4] = count_of_counts.map(|n| n as f64);
    let y = n1 / (n1 + 2.0 * n2);
    let estimates = match discounting {
        Discounting::Single => [y; 3],
        Discounting::Modified => [1.0 - 2.0 * y * n2 / n1, 2.0 - 3.0 * y * n3 / n2, 3.0 - 4.0 * y * n4 / n3],
    };
    let valid = |d: f64, count: f64| d > 0.0 && d <= count; // false for NaN
    let fallback = if valid(y, 1.0) { y } else { 0.5 };
    let mut discounts = [0.0; 3];
    for (j, d) in estimates.into_iter().enumerate() {
        discounts[j] = if valid(d, (j + 1) as f64) { d } else { fallback };
    }
    discounts
}

impl NGramModel {
    /// Trains an order-`order` model (1 = unigram, 2 = bigram, ...) on `tokens`, every one of
    /// which must be below `vocab_size`, with modified Kneser-Ney discounts.
    pub fn train(tokens: &[u32], vocab_size: usize, order: usize) -> Result<NGramModel> {
        Self::train_with(tokens, vocab_size, order, Discounting::Modified)
    }

    /// [`train`](Self::train) with the discounting of your choice.
    pub fn train_with(tokens: &[u32], vocab_size: usize, order: usize, discounting: Discounting) -> Result<NGramModel> {
        let op = "NGramModel::train";
        if order == 0 {
            return Err(Error::invalid(op, "order must be at least 1 (a unigram model)"));
        }
        if vocab_size == 0 || vocab_size > u32::MAX as usize + 1 {
            return Err(Error::invalid(op, format!("vocab_size {vocab_size} must be in 1..=2^32")));
        }
        check_tokens(op, tokens, vocab_size)?;
        let levels = (0..order)
            .map(|k| {
                let grams = if k + 1 == order { raw_counts(tokens, k + 1) } else { continuation_counts(tokens, k + 1) };
                build_level(grams, k, discounting)
            })
            .collect();
        Ok(NGramModel { order, vocab_size, discounting, levels })
    }

    /// The order `n` (the model looks at the `n - 1` tokens before the next one).
    pub fn order(&self) -> usize {
        self.order
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// How the discounts were chosen.
    pub fn discounting(&self) -> Discounting {
        self.discounting
    }

    /// The discounts `D(1), D(2), D(3+)` of the contexts of length `k` (`k < order`).
    pub fn discounts(&self, k: usize) -> Option<[f64; 3]> {
        self.levels.get(k).map(|level| level.discounts)
    }

    /// The last `order - 1` tokens of `context` (fewer if it is shorter).
    fn usable<'a>(&self, context: &'a [u32]) -> &'a [u32] {
        &context[context.len().saturating_sub(self.order - 1)..]
    }

    /// `P(next | context)`; only the last `order - 1` tokens of `context` matter.
    pub fn prob(&self, context: &[u32], next: u32) -> Result<f64> {
        check_tokens("NGramModel::prob", context, self.vocab_size)?;
        check_tokens("NGramModel::prob", &[next], self.vocab_size)?;
        Ok(self.prob_unchecked(self.usable(context), next))
    }

    /// `ln P(next | context)`.
    pub fn log_prob(&self, context: &[u32], next: u32) -> Result<f64> {
        Ok(self.prob(context, next)?.ln())
    }

    /// The recursion of the module docs, from the uniform distribution up to the longest
    /// context seen; `context` holds at most `order - 1` valid tokens.
    fn prob_unchecked(&self, context: &[u32], next: u32) -> f64 {
        let mut p = 1.0 / self.vocab_size as f64;
        for (k, level) in self.levels.iter().enumerate().take(context.len() + 1) {
            // A context never seen has no longer extension seen either.
            let Some(ctx) = level.contexts.get(&context[context.len() - k..]) else { break };
            let c = ctx.count(next);
            p = ((c as f64 - level.discount(c)).max(0.0) + ctx.backoff_mass * p) / ctx.total as f64;
        }
        p
    }

    /// `P(w | context)` for every `w` in `0..vocab_size`.
    pub fn distribution(&self, context: &[u32]) -> Result<Vec<f64>> {
        check_tokens("NGramModel::distribution", context, self.vocab_size)?;
        Ok(self.distribution_unchecked(self.usable(context)))
    }

    fn distribution_unchecked(&self, context: &[u32]) -> Vec<f64> {
        let mut p = vec![1.0 / self.vocab_size as f64; self.vocab_size];
        for (k, level) in self.levels.iter().enumerate().take(context.len() + 1) {
            let Some(ctx) = level.contexts.get(&context[context.len() - k..]) else { break };
            let total = ctx.total as f64;
            let gamma = ctx.backoff_mass / total;
            p.iter_mut().for_each(|x| *x *= gamma);
            for &(w, c) in &ctx.followers {
                p[w as usize] += (c as f64 - level.discount(c)).max(0.0) / total;
            }
        }
        p
    }

    /// The cross-entropy of the model on `tokens` in nats per token: the mean of
    /// `-ln P(t_i | t_{i-n+1} .. t_{i-1})` over every position, the first `n - 1` positions
    /// using the shorter context they have.
    pub fn cross_entropy(&self, tokens: &[u32]) -> Result<f64> {
        let op = "NGramModel::cross_entropy";
        if tokens.is_empty() {
            return Err(Error::invalid(op, "no tokens to score"));
        }
        check_tokens(op, tokens, self.vocab_size)?;
        let total: f64 = (0..tokens.len())
            .map(|i| -self.prob_unchecked(&tokens[i.saturating_sub(self.order - 1)..i], tokens[i]).ln())
            .sum();
        Ok(total / tokens.len() as f64)
    }

    /// Draws `n` tokens one at a time, each from the distribution given `context` and the
    /// tokens drawn so far. Draw `i` uses the uniform number `(seed, i)` of the library's
    /// counter-based generator, so the same seed gives the same text.
    pub fn sample(&self, context: &[u32], seed: u64, n: usize) -> Result<Vec<u32>> {
        check_tokens("NGramModel::sample", context, self.vocab_size)?;
        let mut history = self.usable(context).to_vec();
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let p = self.distribution_unchecked(self.usable(&history));
            let u = unit_f64(seed, i as u64);
            // Inverse CDF; rounding can leave the running sum just below u at the end, in
            // which case the last token with positive probability is drawn.
            let mut acc = 0.0;
            let mut next = p.iter().rposition(|&x| x > 0.0).unwrap_or(0);
            for (w, &x) in p.iter().enumerate() {
                acc += x;
                if u < acc {
                    next = w;
                    break;
                }
            }
            out.push(next as u32);
            history.push(next as u32);
            if history.len() > 4 * self.order {
                history.drain(..history.len() - self.order);
            }
        }
        Ok(out)
    }
}

fn check_tokens(op: &'static str, tokens: &[u32], vocab_size: usize) -> Result<()> {
    match tokens.iter().position(|&t| t as usize >= vocab_size) {
        Some(i) => Err(Error::invalid(
            op,
            format!("token {} at position {i} is out of range for a vocabulary of {vocab_size}", tokens[i]),
        )),
        None => Ok(()),
    }
}

/// How often each `len`-gram occurs in `tokens`.
fn raw_counts(tokens: &[u32], len: usize) -> FxMap<&[u32], u32> {
    let mut counts = FxMap::<&[u32], u32>::default();
    for gram in tokens.windows(len) {
        *counts.entry(gram).or_default() += 1;
    }
    counts
}

/// For each `len`-gram, the number of distinct tokens seen right before it: Kneser-Ney's
/// continuation count `N_1+(• gram)`.
fn continuation_counts(tokens: &[u32], len: usize) -> FxMap<&[u32], u32> {
    let distinct: FxSet<&[u32]> = tokens.windows(len + 1).collect();
    let mut counts = FxMap::<&[u32], u32>::default();
    for longer in distinct {
        *counts.entry(&longer[1..]).or_default() += 1;
    }
    counts
}

/// Groups the `(k+1)`-gram counts of level `k` by their `k`-token context and estimates the
/// level's discounts.
fn build_level(grams: FxMap<&[u32], u32>, k: usize, discounting: Discounting) -> Level {
    let mut count_of_counts = [0u64; 4];
    let mut grouped = FxMap::<&[u32], Vec<(u32, u32)>>::default();
    for (gram, c) in grams {
        if (1..=4).contains(&c) {
            count_of_counts[c as usize - 1] += 1;
        }
        grouped.entry(&gram[..k]).or_default().push((gram[k], c));
    }
    let discounts = estimate_discounts(count_of_counts, discounting);
    let level_discount = |c: u32| match c {
        1 => discounts[0],
        2 => discounts[1],
        _ => discounts[2],
    };
    let contexts = grouped
        .into_iter()
        .map(|(context, mut followers)| {
            followers.sort_unstable();
            let total = followers.iter().map(|&(_, c)| c as u64).sum();
            let backoff_mass = followers.iter().map(|&(_, c)| level_discount(c)).sum();
            (Box::from(context), Context { followers, total, backoff_mass })
        })
        .collect();
    Level { contexts, discounts }
}

/// The validation score of one order (see [`score_orders`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrderScore {
    pub order: usize,
    /// Cross-entropy on the validation tokens, nats per token.
    pub val_loss: f64,
    /// Wall time to train the model and score the validation tokens.
    pub seconds: f64,
}

/// Trains a modified-KN model of each order on `train` and scores it on `val`.
pub fn score_orders(
    train: &[u32],
    val: &[u32],
    vocab_size: usize,
    orders: impl IntoIterator<Item = usize>,
) -> Result<Vec<OrderScore>> {
    orders
        .into_iter()
        .map(|order| {
            let start = Instant::now();
            let model = NGramModel::train(train, vocab_size, order)?;
            let val_loss = model.cross_entropy(val)?;
            Ok(OrderScore { order, val_loss, seconds: start.elapsed().as_secs_f64() })
        })
        .collect()
}

/// The order with the lowest validation loss: `(order, val_loss, seconds)`, where `seconds`
/// is the wall time of the whole search.
pub fn fit_best_order(
    train: &[u32],
    val: &[u32],
    vocab_size: usize,
    orders: impl IntoIterator<Item = usize>,
) -> Result<(usize, f64, f64)> {
    let start = Instant::now();
    let scores = score_orders(train, val, vocab_size, orders)?;
    let best = scores
        .iter()
        .min_by(|a, b| a.val_loss.total_cmp(&b.val_loss))
        .ok_or_else(|| Error::invalid("fit_best_order", "no orders to try"))?;
    Ok((best.order, best.val_loss, start.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shakespeare::TinyShakespeare;
    use crate::text::CharTokenizer;
    use proptest::prelude::*;

    fn shakespeare_ids(chars: usize) -> (Vec<u32>, usize) {
        let text: String = TinyShakespeare::load().unwrap().text.chars().take(chars).collect();
        let tok = CharTokenizer::from_corpus(&text).unwrap();
        (tok.encode(&text).unwrap(), tok.vocab_size())
    }

    fn assert_close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn bigram_kneser_ney_by_hand() {
        // "abracadabr" with a=0, b=1, r=2, c=3, d=4, and a sixth symbol e=5 never seen.
        let ids = [0, 1, 2, 0, 3, 0, 4, 0, 1, 2];
        let m = NGramModel::train_with(&ids, 6, 2, Discounting::Single).unwrap();

        // Level 1 counts the 9 bigrams: ab 2, br 2, ra 1, ac 1, ca 1, ad 1, da 1.
        // n1 = 5, n2 = 2, so D1 = 5 / (5 + 2*2) = 5/9.
        assert_close(m.discounts(1).unwrap()[0], 5.0 / 9.0);
        // Level 0 counts continuations, the distinct bigram types ending in each symbol:
        // a 3 (ra, ca, da), b 1, r 1, c 1, d 1 (total 7). n1 = 4, n2 = 0: D0 = 4/4 = 1.
        assert_close(m.discounts(0).unwrap()[0], 1.0);
        // P0(w) = max(N(w) - 1, 0)/7 + γ0/6 with γ0 = 1 * 5 / 7:
        // P0(a) = 2/7 + 5/42 = 17/42; P0(b) = P0(e) = 5/42.
        assert_close(m.prob(&[], 0).unwrap(), 17.0 / 42.0);
        assert_close(m.prob(&[], 1).unwrap(), 5.0 / 42.0);
        assert_close(m.prob(&[], 5).unwrap(), 5.0 / 42.0);
        // After a: b 2, c 1, d 1 (total 4), γ(a) = (5/9) * 3 / 4 = 5/12.
        // P(b | a) = (2 - 5/9)/4 + 5/12 * 5/42 = 13/36 + 25/504 = 23/56.
        assert_close(m.prob(&[0], 1).unwrap(), 23.0 / 56.0);
        // P(e | a) = 0 + 5/12 * 5/42 = 25/504.
        assert_close(m.prob(&[0], 5).unwrap(), 25.0 / 504.0);
        // After r: a 1 (total 1), γ(r) = 5/9. P(a | r) = 4/9 + 5/9 * 17/42 = 253/378.
        assert_close(m.prob(&[2], 0).unwrap(), 253.0 / 378.0);
        // An unseen context falls through to level 0; longer contexts are cut to one token.
        assert_close(m.prob(&[5], 0).unwrap(), 17.0 / 42.0);
        assert_close(m.prob(&[5, 5, 0], 1).unwrap(), 23.0 / 56.0);
        assert_close(m.log_prob(&[0], 5).unwrap(), (25.0f64 / 504.0).ln());
        let d = m.distribution(&[0]).unwrap();
        assert_close(d.iter().sum::<f64>(), 1.0);
        assert_close(d[1], 23.0 / 56.0);
        // Cross-entropy: position 0 uses P0, the others their bigram.
        let ce = m.cross_entropy(&[0, 1]).unwrap();
        assert_close(ce, -((17.0f64 / 42.0).ln() + (23.0f64 / 56.0).ln()) / 2.0);
    }

    #[test]
    fn modified_discounts_follow_chen_and_goodman() {
        // n1..n4 = 10, 4, 2, 1: Y = 10/18.
        let [d1, d2, d3] = estimate_discounts([10, 4, 2, 1], Discounting::Modified);
        let y = 10.0 / 18.0;
        assert_close(d1, 1.0 - 2.0 * y * 4.0 / 10.0);
        assert_close(d2, 2.0 - 3.0 * y * 2.0 / 4.0);
        assert_close(d3, 3.0 - 4.0 * y * 1.0 / 2.0);
        assert_eq!(estimate_discounts([10, 4, 2, 1], Discounting::Single), [y; 3]);
        // Degenerate counts fall back to Y, then to 0.5.
        assert_eq!(estimate_discounts([3, 0, 0, 0], Discounting::Modified), [1.0; 3]);
        assert_eq!(estimate_discounts([0, 0, 0, 0], Discounting::Modified), [0.5; 3]);
        assert_eq!(estimate_discounts([0, 5, 0, 0], Discounting::Single), [0.5; 3]);
    }

    #[test]
    fn distributions_sum_to_one_for_seen_and_unseen_contexts() {
        let (ids, vocab) = shakespeare_ids(5000);
        for order in 1..=6 {
            for discounting in [Discounting::Single, Discounting::Modified] {
                let m = NGramModel::train_with(&ids, vocab + 1, order, discounting).unwrap();
                for trial in 0..40u64 {
                    let len = (trial % 8) as usize;
                    let context: Vec<u32> = if trial % 2 == 0 {
                        let start = (trial as usize * 97) % (ids.len() - len);
                        ids[start..start + len].to_vec() // seen
                    } else {
                        (0..len as u64).map(|i| (unit_f64(trial, i) * (vocab + 1) as f64) as u32).collect()
                    };
                    let p = m.distribution(&context).unwrap();
                    assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9, "order {order}, context {context:?}");
                    assert!(p.iter().all(|&x| x > 0.0 && x <= 1.0));
                    for w in [0, vocab as u32 / 2, vocab as u32] {
                        assert!((m.prob(&context, w).unwrap() - p[w as usize]).abs() < 1e-12);
                    }
                }
            }
        }
    }

    #[test]
    fn higher_orders_fit_the_training_text_better() {
        let (ids, vocab) = shakespeare_ids(20_000);
        let losses: Vec<f64> =
            (1..=6).map(|n| NGramModel::train(&ids, vocab, n).unwrap().cross_entropy(&ids).unwrap()).collect();
        for pair in losses.windows(2) {
            assert!(pair[1] < pair[0], "{losses:?}");
        }
        // A unigram model is near the entropy of the letter frequencies (about 3.3 nats).
        assert!(losses[0] > 2.9 && losses[0] < (vocab as f64).ln(), "{losses:?}");
    }

    #[test]
    fn sampling_is_reproducible_and_follows_the_model() {
        let (ids, vocab) = shakespeare_ids(20_000);
        let m = NGramModel::train(&ids, vocab, 4).unwrap();
        let a = m.sample(&ids[..3], 7, 200).unwrap();
        assert_eq!(a, m.sample(&ids[..3], 7, 200).unwrap());
        assert_ne!(a, m.sample(&ids[..3], 8, 200).unwrap());
        assert!(a.iter().all(|&t| (t as usize) < vocab));
        // Samples of a model score better under it than uniform noise does.
        assert!(m.cross_entropy(&a).unwrap() < (vocab as f64).ln() - 1.0);
        // A corpus of one symbol: sampling repeats it almost always.
        let m = NGramModel::train(&[1; 50], 3, 3).unwrap();
        let s = m.sample(&[], 0, 100).unwrap();
        assert!(s.iter().filter(|&&t| t == 1).count() > 80, "{s:?}");
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(NGramModel::train(&[0, 1], 2, 0).unwrap_err().to_string().contains("order must be at least 1"));
        assert!(NGramModel::train(&[0, 1], 0, 2).is_err());
        let err = NGramModel::train(&[0, 3], 3, 2).unwrap_err().to_string();
        assert_eq!(err, "NGramModel::train: token 3 at position 1 is out of range for a vocabulary of 3");
        let m = NGramModel::train(&[0, 1, 2], 3, 2).unwrap();
        assert!(m.prob(&[0], 3).is_err());
        assert!(m.distribution(&[9]).is_err());
        assert!(m.cross_entropy(&[]).is_err());
        assert!(m.sample(&[4], 0, 1).is_err());
        assert!(fit_best_order(&[0, 1], &[1, 0], 2, []).is_err());
        // An empty corpus gives the uniform distribution.
        let m = NGramModel::train(&[], 4, 3).unwrap();
        assert_eq!(m.distribution(&[1, 2]).unwrap(), vec![0.25; 4]);
    }

    #[test]
    fn fit_best_order_prefers_the_order_that_generalises() {
        let (ids, vocab) = shakespeare_ids(30_000);
        let (train, val) = ids.split_at(27_000);
        let scores = score_orders(train, val, vocab, 1..=3).unwrap();
        assert!(scores[2].val_loss < scores[0].val_loss);
        let (order, loss, seconds) = fit_best_order(train, val, vocab, 1..=3).unwrap();
        assert_eq!(order, 3);
        assert_close(loss, scores[2].val_loss);
        assert!(seconds >= 0.0);
    }

    /// The table of the report: `cargo test -p aigc-trainers --release -- --ignored --nocapture ngram_table`.
    #[test]
    #[ignore = "trains 16 models on the full corpus: run in release mode"]
    fn ngram_table_on_tiny_shakespeare() {
        let corpus = TinyShakespeare::load().unwrap();
        let tok = CharTokenizer::from_corpus(&corpus.text).unwrap();
        let (train, val) = corpus.train_val();
        let (train, val) = (tok.encode(train).unwrap(), tok.encode(val).unwrap());
        println!("order | val loss (nats/char), modified KN | single-D KN | seconds (modified)");
        for order in 1..=8 {
            let start = Instant::now();
            let modified = NGramModel::train(&train, tok.vocab_size(), order).unwrap().cross_entropy(&val).unwrap();
            let seconds = start.elapsed().as_secs_f64();
            let single = NGramModel::train_with(&train, tok.vocab_size(), order, Discounting::Single)
                .unwrap()
                .cross_entropy(&val)
                .unwrap();
            println!("{order} | {modified:.4} | {single:.4} | {seconds:.2}");
        }
        let (order, loss, seconds) = fit_best_order(&train, &val, tok.vocab_size(), 1..=8).unwrap();
        println!("fit_best_order: order {order}, val loss {loss:.4} nats/char, {seconds:.1} s");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn probabilities_are_positive_and_normalised(
            vocab in 1usize..6,
            raw in prop::collection::vec(0u32..6, 0..40),
            order in 1usize..5,
            context in prop::collection::vec(0u32..6, 0..6),
            modified in any::<bool>(),
        ) {
            let tokens: Vec<u32> = raw.iter().map(|&t| t % vocab as u32).collect();
            let context: Vec<u32> = context.iter().map(|&t| t % vocab as u32).collect();
            let discounting = if modified { Discounting::Modified } else { Discounting::Single };
            let m = NGramModel::train_with(&tokens, vocab, order, discounting).unwrap();
            let p = m.distribution(&context).unwrap();
            prop_assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            for (w, &x) in p.iter().enumerate() {
                prop_assert!(x > 0.0 && x <= 1.0);
                prop_assert!((m.prob(&context, w as u32).unwrap() - x).abs() < 1e-12);
            }
        }
    }
}

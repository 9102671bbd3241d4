//! A GPT trained on tiny Shakespeare, nanoGPT's CPU "baby" run: characters (default) or
//! GPT-2 byte-level BPE tokens, 4 layers, 4 heads, width 128, context 64, batch 12,
//! AdamW with warmup + cosine, 2000 iterations. Prints the train/validation loss as it
//! goes (estimated on 20 random batches, as nanoGPT does), the loss over the whole
//! validation text at the end, the speed (iterations/s, tokens/s), peak memory, then
//! samples 500 tokens with and without the KV cache.
//!
//! Run: `cargo run --release --example gpt_shakespeare -- [--iters N] [--bpe VOCAB]
//!       [--data PATH/input.txt] [--eval-interval N] [--sample N] [--seed N] [--profile]
//!       [--layers N] [--heads N] [--width N] [--context N] [--batch N] [--lr LR] [--dropout P]`
//!
//! The model and run flags override the baby configuration; with `--iters` the cosine
//! decays over the given number of iterations.
//!
//! `--seed` seeds both the initial weights and the order of the training batches
//! (default 1337, nanoGPT's). `--profile` prints where the training time went, op by op
//! (forward and backward).

use aigc::nn::VarStore;
use aigc::trainers::data::shakespeare::TinyShakespeare;
use aigc::trainers::gpt::{Gpt, GptConfig, GptTrainConfig, SamplingConfig, generate, train, validation_loss};
use aigc::trainers::text::Tokenizer;
use aigc::trainers::text::bpe::BpeTokenizer;
use aigc::trainers::text::char_tokenizer::CharTokenizer;
use aigc::{DType, Device, Error, Result};
use std::process::ExitCode;
use std::time::Instant;

#[path = "common/mod.rs"]
mod common;

/// Command-line options.
struct Options {
    iters: u64,
    bpe_vocab: Option<usize>,
    data: Option<String>,
    eval_interval: u64,
    sample: usize,
    seed: u64,
    profile: bool,
    layers: Option<usize>,
    heads: Option<usize>,
    width: Option<usize>,
    context: Option<usize>,
    batch: Option<usize>,
    lr: Option<f64>,
    dropout: Option<f64>,
}

const USAGE: &str = "usage: gpt_shakespeare [--iters N] [--bpe VOCAB] [--data PATH/input.txt] \
[--eval-interval N] [--sample N] [--seed N] [--profile] [--layers N] [--heads N] [--width N] [--context N] \
[--batch N] [--lr LR] [--dropout P]";

fn parse_options() -> Result<Options> {
    let mut o = Options {
        iters: 2000,
        bpe_vocab: None,
        data: None,
        eval_interval: 100,
        sample: 500,
        seed: 1337,
        profile: false,
        layers: None,
        heads: None,
        width: None,
        context: None,
        batch: None,
        lr: None,
        dropout: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value =
            || args.next().ok_or_else(|| Error::invalid("gpt_shakespeare", format!("{flag} needs a value")));
        fn parse<T: std::str::FromStr>(flag: &str, v: String) -> Result<T> {
            common::parse_flag_value("gpt_shakespeare", flag, v)
        }
        match flag.as_str() {
            "--profile" => o.profile = true,
            "--layers" => o.layers = Some(parse(&flag, value()?)?),
            "--heads" => o.heads = Some(parse(&flag, value()?)?),
            "--width" => o.width = Some(parse(&flag, value()?)?),
            "--context" => o.context = Some(parse(&flag, value()?)?),
            "--batch" => o.batch = Some(parse(&flag, value()?)?),
            "--lr" => o.lr = Some(parse(&flag, value()?)?),
            "--dropout" => o.dropout = Some(parse(&flag, value()?)?),
            "--iters" => o.iters = parse(&flag, value()?)?,
            "--bpe" => o.bpe_vocab = Some(parse(&flag, value()?)?),
            "--data" => o.data = Some(value()?),
            "--eval-interval" => o.eval_interval = parse(&flag, value()?)?,
            "--sample" => o.sample = parse(&flag, value()?)?,
            "--seed" => o.seed = parse(&flag, value()?)?,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(Error::invalid("gpt_shakespeare", format!("unknown flag `{other}`; {USAGE}"))),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    common::report(train_and_sample)
}

fn train_and_sample() -> Result<()> {
    let opts = parse_options()?;
    let corpus = match &opts.data {
        Some(path) => TinyShakespeare::load_from(path)?,
        None => TinyShakespeare::load()?,
    };
    let (train_text, val_text) = corpus.train_val();
    let tokenizer: Box<dyn Tokenizer> = match opts.bpe_vocab {
        Some(vocab) => Box::new(BpeTokenizer::train(train_text, vocab)?),
        None => Box::new(CharTokenizer::from_corpus(&corpus.text)?),
    };
    let (train_ids, val_ids) = (tokenizer.encode(train_text)?, tokenizer.encode(val_text)?);
    let unit = if opts.bpe_vocab.is_some() { "token" } else { "char" };

    let dev = Device::Cpu;
    let vs = VarStore::new(DType::F32, &dev, opts.seed);
    let baby = GptConfig::baby_shakespeare(tokenizer.vocab_size());
    let model = Gpt::new(
        &vs,
        GptConfig {
            n_layer: opts.layers.unwrap_or(baby.n_layer),
            n_head: opts.heads.unwrap_or(baby.n_head),
            n_embd: opts.width.unwrap_or(baby.n_embd),
            block_size: opts.context.unwrap_or(baby.block_size),
            dropout: opts.dropout.unwrap_or(baby.dropout),
            ..baby
        },
    )?;
    let baby_run = GptTrainConfig::baby_shakespeare();
    let lr = opts.lr.unwrap_or(baby_run.lr);
    let cfg = GptTrainConfig {
        iters: opts.iters,
        lr_decay_iters: opts.iters,
        batch_size: opts.batch.unwrap_or(baby_run.batch_size),
        lr,
        min_lr: lr / 10.0,
        eval_interval: opts.eval_interval,
        seed: opts.seed,
        ..baby_run
    };
    println!(
        "GPT: {} parameters, vocabulary {}, {} train / {} val tokens, {} threads",
        vs.num_parameters(),
        tokenizer.vocab_size(),
        train_ids.len(),
        val_ids.len(),
        rayon::current_num_threads()
    );

    if opts.profile {
        aigc::autograd::profile::enable();
    }
    let started = Instant::now();
    let mut reached_1_90: Option<f64> = None;
    let points = train(&model, &vs, &train_ids, &val_ids, &cfg, |p| {
        if reached_1_90.is_none() && p.val_loss <= 1.90 {
            reached_1_90 = Some(started.elapsed().as_secs_f64());
        }
        println!(
            "step {:5}  train {:.4}  val {:.4} nats/{unit}  {:.1} it/s",
            p.step,
            p.train_loss,
            p.val_loss,
            p.step as f64 / p.train_seconds
        );
    })?;
    let last = points.last().ok_or_else(|| Error::invalid("gpt_shakespeare", "--iters must be at least 1"))?;
    let tokens_per_iter = (cfg.batch_size * model.config().block_size) as f64;
    println!(
        "done: val loss {:.4} after {} iterations; {:.2} it/s, {:.0} tokens/s (training only); {:.1} s wall",
        last.val_loss,
        last.step,
        last.step as f64 / last.train_seconds,
        last.step as f64 * tokens_per_iter / last.train_seconds,
        started.elapsed().as_secs_f64()
    );
    if opts.profile {
        aigc::autograd::profile::disable();
        let report = aigc::autograd::profile::report();
        println!("where the time went ({:.1} s profiled):\n{report}", report.total().as_secs_f64());
    }
    let whole_val = validation_loss(&model, &vs, &val_ids)?;
    println!("validation loss over the whole validation text ({} {unit}s): {whole_val:.4}", val_ids.len());
    if opts.bpe_vocab.is_some() {
        // Per character, comparable with the character-level models.
        let chars = val_text.chars().count();
        println!("  = {:.4} nats/char ({chars} chars)", whole_val * val_ids.len() as f64 / chars as f64);
    } else {
        match reached_1_90 {
            Some(s) => println!("validation loss reached 1.90 after {s:.1} s wall"),
            None => println!("validation loss did not reach 1.90"),
        }
    }
    if let Some(mib) = common::peak_rss_mib() {
        println!("peak memory (RSS): {mib:.0} MiB");
    }

    if opts.sample > 0 {
        vs.set_training(false);
        let sampling = SamplingConfig { temperature: 0.8, top_k: Some(200), top_p: None };
        let prompt = tokenizer.encode("\n")?;
        let mut text = String::new();
        for use_cache in [true, false] {
            let t = Instant::now();
            let ids = generate(&model, &prompt, opts.sample, &sampling, 7, use_cache)?;
            let secs = t.elapsed().as_secs_f64();
            println!(
                "sampled {} tokens {} the KV cache: {:.0} tokens/s",
                ids.len(),
                if use_cache { "with" } else { "without" },
                ids.len() as f64 / secs
            );
            if use_cache {
                text = tokenizer.decode(&ids)?;
            }
        }
        println!("---\n{text}\n---");
    }
    Ok(())
}

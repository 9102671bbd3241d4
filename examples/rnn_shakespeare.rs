//! A character-level RNN, LSTM or GRU language model trained on tiny Shakespeare by
//! truncated backpropagation through time (Karpathy's char-rnn; Zaremba et al. 2014), with
//! nanoGPT's 90/10 split. Prints the validation loss as it goes, then the final validation
//! loss over the whole validation text (nats/char), the parameter count, the training time
//! and speed, peak memory, and a 300-character sample.
//!
//! Run: `cargo run --release --example rnn_shakespeare -- --kind lstm [--iters N]
//!       [--hidden H] [--layers L] [--embedding E] [--seconds S] [--lr LR] [--batch B]
//!       [--seq-len T] [--dropout P] [--eval-interval N] [--sample N] [--profile]`
//!
//! `--profile` prints where the training time went, op by op (forward and backward).

use aigc::nn::VarStore;
use aigc::nn::rnn::{GruCell, LstmCell, RnnCell};
use aigc::trainers::data::shakespeare::TinyShakespeare;
use aigc::trainers::gpt::SamplingConfig;
use aigc::trainers::recurrent_lm::{
    LmCell, RecurrentKind, RecurrentLm, RecurrentLmConfig, RecurrentTrainConfig, train,
};
use aigc::trainers::text::char_tokenizer::CharTokenizer;
use aigc::{DType, Device, Error, Result};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Instant;

#[path = "common/mod.rs"]
mod common;

/// Command-line options: the model's kind, and overrides of its sizes
/// (`RecurrentLmConfig::shakespeare`) and of the run's settings
/// (`RecurrentTrainConfig::shakespeare`).
#[derive(Default)]
struct Options {
    kind: Option<RecurrentKind>,
    hidden: Option<usize>,
    layers: Option<usize>,
    embedding: Option<usize>,
    dropout: Option<f64>,
    iters: Option<u64>,
    seconds: Option<f64>,
    lr: Option<f64>,
    batch: Option<usize>,
    seq_len: Option<usize>,
    eval_interval: Option<u64>,
    sample: Option<usize>,
    profile: bool,
}

const USAGE: &str = "usage: rnn_shakespeare [--kind rnn|gru|lstm (default lstm)] [--iters N] [--hidden H] [--layers L] \
[--embedding E] [--seconds S] [--lr LR] [--batch B] [--seq-len T] [--dropout P] [--eval-interval N] [--sample N] \
[--profile]";

fn parse_options() -> Result<Options> {
    let mut o = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--profile" {
            o.profile = true;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        // The value is taken only for a known flag, so an unknown one is named as unknown.
        let mut value =
            || args.next().ok_or_else(|| Error::invalid("rnn_shakespeare", format!("{flag} needs a value")));
        fn parse<T: FromStr>(flag: &str, v: String) -> Result<Option<T>> {
            common::parse_flag_value("rnn_shakespeare", flag, v).map(Some)
        }
        match flag.as_str() {
            "--kind" => o.kind = Some(value()?.parse()?),
            "--hidden" => o.hidden = parse(&flag, value()?)?,
            "--layers" => o.layers = parse(&flag, value()?)?,
            "--embedding" => o.embedding = parse(&flag, value()?)?,
            "--dropout" => o.dropout = parse(&flag, value()?)?,
            "--iters" => o.iters = parse(&flag, value()?)?,
            "--seconds" => o.seconds = parse(&flag, value()?)?,
            "--lr" => o.lr = parse(&flag, value()?)?,
            "--batch" => o.batch = parse(&flag, value()?)?,
            "--seq-len" => o.seq_len = parse(&flag, value()?)?,
            "--eval-interval" => o.eval_interval = parse(&flag, value()?)?,
            "--sample" => o.sample = parse(&flag, value()?)?,
            other => {
                return Err(Error::invalid("rnn_shakespeare", format!("unknown flag `{other}`; {USAGE}")));
            }
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    common::report(train_chosen_cell)
}

fn train_chosen_cell() -> Result<()> {
    let opts = parse_options()?;
    match opts.kind.unwrap_or(RecurrentKind::Lstm) {
        RecurrentKind::Rnn => run::<RnnCell>(&opts),
        RecurrentKind::Lstm => run::<LstmCell>(&opts),
        RecurrentKind::Gru => run::<GruCell>(&opts),
    }
}

/// Trains, reports and samples a model with cell `C`.
fn run<C: LmCell>(opts: &Options) -> Result<()> {
    let corpus = TinyShakespeare::load()?;
    let (train_text, val_text) = corpus.train_val();
    let tokenizer = CharTokenizer::from_corpus(&corpus.text)?;
    let (train_ids, val_ids) = (tokenizer.encode(train_text)?, tokenizer.encode(val_text)?);

    let preset = RecurrentLmConfig::shakespeare(tokenizer.vocab_size());
    let cfg = RecurrentLmConfig {
        hidden_size: opts.hidden.unwrap_or(preset.hidden_size),
        num_layers: opts.layers.unwrap_or(preset.num_layers),
        embedding_dim: opts.embedding.unwrap_or(preset.embedding_dim),
        dropout: opts.dropout.unwrap_or(preset.dropout),
        ..preset
    };
    let vs = VarStore::new(DType::F32, &Device::Cpu, 1337);
    let model = RecurrentLm::<C>::new(&vs, cfg)?;
    let preset = RecurrentTrainConfig::shakespeare(C::KIND);
    let lr = opts.lr.unwrap_or(preset.lr);
    let run = &RecurrentTrainConfig {
        iters: opts.iters.unwrap_or(preset.iters),
        max_seconds: opts.seconds.or(preset.max_seconds),
        batch_size: opts.batch.unwrap_or(preset.batch_size),
        seq_len: opts.seq_len.unwrap_or(preset.seq_len),
        lr,
        min_lr: lr / 10.0,
        eval_interval: opts.eval_interval.unwrap_or(100),
        ..preset
    };
    println!(
        "{}: {} parameters ({} layer(s) of {}, embedding {}, dropout {}), {} train / {} val chars, {} threads",
        C::KIND,
        vs.num_parameters(),
        cfg.num_layers,
        cfg.hidden_size,
        cfg.embedding_dim,
        cfg.dropout,
        train_ids.len(),
        val_ids.len(),
        rayon::current_num_threads()
    );
    println!(
        "truncated BPTT: {} streams x {} chars, lr {} -> {}, clip {}, up to {} iterations{}",
        run.batch_size,
        run.seq_len,
        run.lr,
        run.min_lr,
        run.grad_clip,
        run.iters,
        run.max_seconds.map_or(String::new(), |s| format!(" or {s} s"))
    );

    if opts.profile {
        aigc::autograd::profile::enable();
    }
    let started = Instant::now();
    let report = train(&model, &train_ids, &val_ids, run, |p| {
        println!(
            "step {:5}  train {:.4}  val {:.4} nats/char  {:.1} it/s",
            p.step,
            p.train_loss,
            p.val_loss,
            p.step as f64 / p.train_seconds
        );
    })?;
    let chars_per_iter = (run.batch_size * run.seq_len) as f64;
    println!(
        "done: val loss {:.4} nats/char over all {} validation predictions after {} iterations ({}); \
         {} parameters; {:.1} s training, {:.2} it/s, {:.0} chars/s; {:.1} s wall",
        report.final_val_loss(),
        report.val_tokens,
        report.steps,
        if report.stopped_by_budget { "time budget" } else { "iteration count" },
        vs.num_parameters(),
        report.train_seconds,
        report.steps as f64 / report.train_seconds,
        report.steps as f64 * chars_per_iter / report.train_seconds,
        started.elapsed().as_secs_f64()
    );
    if opts.profile {
        aigc::autograd::profile::disable();
        let report = aigc::autograd::profile::report();
        println!("where the time went ({:.1} s profiled):\n{report}", report.total().as_secs_f64());
    }
    if let Some(mib) = common::peak_rss_mib() {
        println!("peak memory (RSS): {mib:.0} MiB");
    }
    let sample = opts.sample.unwrap_or(300);
    if sample > 0 {
        let sampling = SamplingConfig { temperature: 0.8, top_k: None, top_p: None };
        let ids = model.generate(&tokenizer.encode("\n")?, sample, &sampling, 7)?;
        println!("---\n{}\n---", tokenizer.decode(&ids)?);
    }
    Ok(())
}

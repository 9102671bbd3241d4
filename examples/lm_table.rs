//! The survey's history of language models in numbers: validation loss on character-level
//! tiny Shakespeare (nanoGPT's 90/10 split, nats/char) of a Kneser-Ney n-gram model (the
//! best order of 1..=8), an RNN, a GRU, an LSTM and a GPT, each with its parameter count
//! and training time, the neural models at a similar budget of training seconds. Prints
//! the table and writes it as markdown (by default to `docs/lm_table.md`).
//!
//! - n-gram: modified Kneser-Ney of every order in 1..=8, the best on validation kept;
//!   its "parameters" are the counts it stores (the distinct k-grams, k = 1..=n).
//! - RNN, GRU, LSTM: `RecurrentLmConfig::shakespeare` sizes (one layer of 512 each),
//!   truncated BPTT with `RecurrentTrainConfig::shakespeare` settings, stopped by the budget
//!   (or `--rnn-iters`), the learning-rate schedule spread over the budget; scored over the
//!   whole validation text, contiguously. `lstm256` (not in the default list) adds an
//!   LSTM of 256 (0.35M parameters) with the LSTM's settings and a learning rate of 2e-2.
//! - GPT: nanoGPT's baby config (0.8M parameters) through `gpt::train` with a peak
//!   learning rate of 3e-3, stopped by the budget (or after `--gpt-iters`), with the warmup
//!   and the cosine over the iterations a timing probe says fit the budget (nanoGPT's 100
//!   of 2000 in proportion); scored
//!   over the whole validation text with windows of 64 that overlap by half
//!   ([`gpt::validation_loss`]).
//!
//! Run: `cargo run --release --example lm_table -- [--budget-seconds S] [--rnn-iters N]
//!       [--gpt-iters N] [--models ngram,rnn,gru,lstm,gpt,lstm256] [--out docs/lm_table.md]`

use aigc::nn::VarStore;
use aigc::nn::rnn::{GruCell, LstmCell, RnnCell};
use aigc::trainers::data::shakespeare::TinyShakespeare;
use aigc::trainers::gpt::{self, Gpt, GptConfig, GptTrainConfig};
use aigc::trainers::ngram::score_orders;
use aigc::trainers::recurrent_lm::{self, LmCell, RecurrentKind, RecurrentLm, RecurrentLmConfig, RecurrentTrainConfig};
use aigc::trainers::text::char_tokenizer::CharTokenizer;
use aigc::{DType, Device, Error, Result};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[path = "common/mod.rs"]
mod common;

const OP: &str = "lm_table";

/// The rows the table can have.
const MODELS: [&str; 6] = ["ngram", "rnn", "gru", "lstm", "gpt", "lstm256"];
/// The rows made when `--models` is not given, in their order.
const DEFAULT_MODELS: [&str; 5] = ["ngram", "rnn", "gru", "lstm", "gpt"];

/// Command-line options.
struct Options {
    budget_seconds: f64,
    rnn_iters: u64,
    gpt_iters: Option<u64>,
    models: Vec<String>,
    out: String,
}

const USAGE: &str = "usage: lm_table [--budget-seconds S] [--rnn-iters N] [--gpt-iters N] \
[--models ngram,rnn,gru,lstm,gpt,lstm256] [--out docs/lm_table.md]";

fn parse_options() -> Result<Options> {
    let mut o = Options {
        budget_seconds: 300.0,
        rnn_iters: 100_000,
        gpt_iters: None,
        models: DEFAULT_MODELS.map(String::from).to_vec(),
        out: "docs/lm_table.md".to_string(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        // The value is taken only for a known flag, so an unknown one is named as unknown.
        let mut value = || args.next().ok_or_else(|| Error::invalid(OP, format!("{flag} needs a value")));
        match flag.as_str() {
            "--budget-seconds" => o.budget_seconds = common::parse_flag_value(OP, &flag, value()?)?,
            "--rnn-iters" => o.rnn_iters = common::parse_flag_value(OP, &flag, value()?)?,
            "--gpt-iters" => o.gpt_iters = Some(common::parse_flag_value(OP, &flag, value()?)?),
            "--models" => o.models = value()?.split(',').map(String::from).collect(),
            "--out" => o.out = value()?,
            other => {
                return Err(Error::invalid(OP, format!("unknown flag `{other}`; {USAGE}")));
            }
        }
    }
    if let Some(m) = o.models.iter().find(|m| !MODELS.contains(&m.as_str())) {
        return Err(Error::invalid(OP, format!("unknown model `{m}`: expected one of {}", MODELS.join(", "))));
    }
    if o.budget_seconds.is_nan() || o.budget_seconds <= 0.0 {
        return Err(Error::invalid(OP, "--budget-seconds must be positive"));
    }
    Ok(o)
}

/// One row of the table.
struct Row {
    model: String,
    setup: String,
    parameters: usize,
    train_seconds: f64,
    steps: String,
    val_loss: f64,
}

/// The character-level data: tokenizer vocabulary and the train / validation ids.
struct Data {
    vocab_size: usize,
    train: Vec<u32>,
    val: Vec<u32>,
}

fn main() -> ExitCode {
    common::report(train_all_and_print_table)
}

fn train_all_and_print_table() -> Result<()> {
    let opts = parse_options()?;
    let corpus = TinyShakespeare::load()?;
    let (train_text, val_text) = corpus.train_val();
    let tokenizer = CharTokenizer::from_corpus(&corpus.text)?;
    let data = Data {
        vocab_size: tokenizer.vocab_size(),
        train: tokenizer.encode(train_text)?,
        val: tokenizer.encode(val_text)?,
    };
    let load_before = load_average();
    let started = Instant::now();
    let mut rows = vec![];
    for model in &opts.models {
        println!("== {model}");
        let row = match model.as_str() {
            "ngram" => ngram_row(&data)?,
            "rnn" => recurrent_row::<RnnCell>(&data, &opts, None)?,
            "gru" => recurrent_row::<GruCell>(&data, &opts, None)?,
            "lstm" => recurrent_row::<LstmCell>(&data, &opts, None)?,
            "lstm256" => recurrent_row::<LstmCell>(&data, &opts, Some((256, 2e-2)))?,
            _ => gpt_row(&data, &opts)?,
        };
        println!(
            "{} val {:.4} nats/char, {} parameters, {:.1} s",
            row.model, row.val_loss, row.parameters, row.train_seconds
        );
        rows.push(row);
    }
    let markdown = render(&opts, &data, &rows, &load_before, started.elapsed().as_secs_f64());
    println!("\n{markdown}");
    if let Some(dir) = std::path::Path::new(&opts.out).parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Io { path: dir.display().to_string(), reason: e.to_string() })?;
    }
    std::fs::write(&opts.out, markdown).map_err(|e| Error::Io { path: opts.out.clone(), reason: e.to_string() })?;
    println!("written to {}", opts.out);
    Ok(())
}

/// Modified Kneser-Ney of every order in 1..=8; the best on validation makes the row.
fn ngram_row(data: &Data) -> Result<Row> {
    let scores = score_orders(&data.train, &data.val, data.vocab_size, 1..=8)?;
    for s in &scores {
        println!("order {}: val {:.4} nats/char ({:.1} s)", s.order, s.val_loss, s.seconds);
    }
    let best = scores
        .iter()
        .min_by(|a, b| a.val_loss.total_cmp(&b.val_loss))
        .ok_or_else(|| Error::invalid(OP, "no n-gram orders scored"))?;
    let search_seconds: f64 = scores.iter().map(|s| s.seconds).sum();
    Ok(Row {
        model: format!("{}-gram", best.order),
        setup: format!(
            "modified Kneser-Ney; best of orders 1-8 on validation (search {search_seconds:.0} s); \
             parameters = stored counts"
        ),
        parameters: distinct_grams(&data.train, best.order),
        train_seconds: best.seconds,
        steps: "1 pass".to_string(),
        val_loss: best.val_loss,
    })
}

/// The counts an order-`n` Kneser-Ney model stores: the distinct k-grams of `tokens`, k = 1..=n.
fn distinct_grams(tokens: &[u32], n: usize) -> usize {
    (1..=n).map(|k| tokens.windows(k).collect::<HashSet<_>>().len()).sum()
}

/// A recurrent model with cell `C` at the `shakespeare` size, trained with the
/// `shakespeare` settings within the budget; or with another `(hidden size, learning rate)`.
fn recurrent_row<C: LmCell>(data: &Data, opts: &Options, other: Option<(usize, f64)>) -> Result<Row> {
    let (preset, settings) =
        (RecurrentLmConfig::shakespeare(data.vocab_size), RecurrentTrainConfig::shakespeare(C::KIND));
    let (hidden_size, lr) = other.unwrap_or((preset.hidden_size, settings.lr));
    let cfg = RecurrentLmConfig { hidden_size, ..preset };
    let vs = VarStore::new(DType::F32, &Device::Cpu, 1337);
    let model = RecurrentLm::<C>::new(&vs, cfg)?;
    let run = RecurrentTrainConfig {
        iters: opts.rnn_iters,
        max_seconds: Some(opts.budget_seconds),
        lr,
        min_lr: lr / 10.0,
        ..settings
    };
    let report = recurrent_lm::train(&model, &data.train, &data.val, &run, |p| {
        println!("step {:5}  train {:.4}  val {:.4}  {:.1} s", p.step, p.train_loss, p.val_loss, p.train_seconds);
    })?;
    let name = match C::KIND {
        RecurrentKind::Rnn => "RNN (tanh)",
        RecurrentKind::Lstm => "LSTM",
        RecurrentKind::Gru => "GRU",
    };
    Ok(Row {
        model: format!("{name} {}", cfg.hidden_size),
        setup: format!(
            "{} x {} hidden, embedding {}; TBPTT {} streams x {} chars, AdamW lr {:.0e} warmup {} cosine, clip {}",
            cfg.num_layers,
            cfg.hidden_size,
            cfg.embedding_dim,
            run.batch_size,
            run.seq_len,
            run.lr,
            run.warmup_iters,
            run.grad_clip
        ),
        parameters: vs.num_parameters(),
        train_seconds: report.train_seconds,
        steps: format!("{}{}", report.steps, if report.stopped_by_budget { " (budget)" } else { "" }),
        val_loss: report.final_val_loss(),
    })
}

/// nanoGPT's baby GPT through `gpt::train` within the budget, or for `--gpt-iters`
/// iterations. A timing probe estimates how many iterations the budget holds, which sets the
/// length of the warmup and of the cosine; the budget itself stops the run (and advances
/// the schedule, should the probe have been optimistic).
fn gpt_row(data: &Data, opts: &Options) -> Result<Row> {
    let baby = GptTrainConfig::baby_shakespeare();
    let (planned, max_seconds) = match opts.gpt_iters {
        Some(iters) => (iters.max(1), None),
        None => {
            let rate = gpt_iterations_per_second(data)?;
            let planned = ((opts.budget_seconds * rate).floor() as u64).max(1);
            println!("timing probe: {rate:.1} it/s, so about {planned} iterations");
            (planned, Some(opts.budget_seconds))
        }
    };
    // The schedule keeps its shape: warmup over the same share of the run.
    let warmup_iters = (baby.warmup_iters * planned / baby.iters.max(1)).max(1);
    // A peak learning rate of 3e-3 instead of nanoGPT's 1e-3: in 3800 iterations (300 s
    // here) the estimate reached 1.658 against 1.721; the run is short, the model small.
    let lr = 3e-3;
    let cfg = GptTrainConfig {
        iters: if max_seconds.is_some() { u64::MAX } else { planned },
        max_seconds,
        lr_decay_iters: planned,
        warmup_iters,
        lr,
        min_lr: lr / 10.0,
        ..baby
    };
    let vs = VarStore::new(DType::F32, &Device::Cpu, 1337);
    let model = Gpt::new(&vs, GptConfig::baby_shakespeare(data.vocab_size))?;
    let points = gpt::train(&model, &vs, &data.train, &data.val, &cfg, |p| {
        println!("step {:5}  train {:.4}  val {:.4}  {:.1} s", p.step, p.train_loss, p.val_loss, p.train_seconds);
    })?;
    let last = points.last().ok_or_else(|| Error::invalid(OP, "the GPT trained no step"))?;
    Ok(Row {
        model: "GPT".to_string(),
        setup: format!(
            "nanoGPT baby: 4 layers, 4 heads, width 128, context 64, batch 12; lr {lr:.0e} warmup {warmup_iters} \
             cosine over {planned}{}",
            if max_seconds.is_some() { " (the probe's estimate)" } else { "" }
        ),
        parameters: vs.num_parameters(),
        train_seconds: last.train_seconds,
        steps: format!("{}{}", last.step, if max_seconds.is_some() { " (budget)" } else { "" }),
        val_loss: gpt::validation_loss(&model, &vs, &data.val)?,
    })
}

/// Iterations per second of the baby GPT, timed over 10 steps after 3 warm-up steps of a
/// throwaway model.
fn gpt_iterations_per_second(data: &Data) -> Result<f64> {
    let vs = VarStore::new(DType::F32, &Device::Cpu, 1);
    let model = Gpt::new(&vs, GptConfig::baby_shakespeare(data.vocab_size))?;
    let probe =
        |iters| GptTrainConfig { iters, eval_interval: u64::MAX, eval_iters: 1, ..GptTrainConfig::baby_shakespeare() };
    gpt::train(&model, &vs, &data.train, &data.val[..1000], &probe(3), |_| {})?;
    let points = gpt::train(&model, &vs, &data.train, &data.val[..1000], &probe(10), |_| {})?;
    Ok(10.0 / points.last().map_or(f64::NAN, |p| p.train_seconds))
}

fn render(opts: &Options, data: &Data, rows: &[Row], load_before: &str, wall: f64) -> String {
    let mut md = String::new();
    let command: Vec<String> = std::env::args().skip(1).collect();
    let _ = writeln!(md, "# Language models on tiny Shakespeare: validation loss\n");
    let _ = writeln!(
        md,
        "Generated by `cargo run --release --example lm_table --{}{}`.\n",
        if command.is_empty() { "" } else { " " },
        command.join(" ")
    );
    let _ = writeln!(md, "- date (UTC): {}", utc_date());
    let _ = writeln!(md, "- machine: {}; {} threads", cpu_model(), rayon::current_num_threads());
    let _ = writeln!(
        md,
        "- load average (1, 5, 15 min): {load_before} at the start, {} at the end; {wall:.0} s wall in all",
        load_average()
    );
    let _ = writeln!(
        md,
        "- data: character-level tiny Shakespeare, nanoGPT's split: {} train / {} validation characters, vocabulary {}",
        data.train.len(),
        data.val.len(),
        data.vocab_size
    );
    let _ =
        writeln!(md, "- budget: {:.0} s of training per neural model (evaluations excluded)\n", opts.budget_seconds);
    let _ = writeln!(
        md,
        "| model | validation loss (nats/char) | bits/char | parameters | training time (s) | steps | setup |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {:.4} | {:.3} | {} | {:.1} | {} | {} |",
            r.model,
            r.val_loss,
            r.val_loss / std::f64::consts::LN_2,
            r.parameters,
            r.train_seconds,
            r.steps,
            r.setup
        );
    }
    let _ = writeln!(
        md,
        "\nValidation loss is over every validation character: the n-gram with its full context of n - 1 \
         characters, the recurrent models read contiguously in {} streams with the state carried across \
         chunks, the GPT in windows of 64 characters that overlap by half, each character scored once by the \
         first window holding it (so all but the first 32 with at least 32 characters of context). Training \
         time counts optimisation steps only. The n-gram's time is training and scoring its best order once.",
        RecurrentTrainConfig::default().batch_size
    );
    md
}

/// The CPU's model name from `/proc/cpuinfo` (Linux).
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("model name"))?.to_string();
            Some(line.split_once(':')?.1.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}

/// The 1, 5 and 15 minute load averages from `/proc/loadavg` (Linux).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// Today's date, `YYYY-MM-DD` in UTC (the civil-from-days algorithm of H. Hinnant).
fn utc_date() -> String {
    let days = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

//! Helpers shared by the examples (included with `#[path]`; not an example itself).
//! Each example uses a subset of them.
#![allow(dead_code)]

use aigc::{Error, Result};
use std::process::ExitCode;

/// Runs an example's body; an error becomes one readable line on stderr
/// (`error: gpt_shakespeare: unknown flag ...`) and a failing exit code. (Returning
/// `Result` from `main` would print the error's `Debug` form, `Error: InvalidArgument {..}`.)
pub fn report(body: impl FnOnce() -> Result<()>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// For examples that take no flags: `--help` prints `usage` and exits; anything else is an error.
pub fn expect_no_arguments(example: &'static str, usage: &str) -> Result<()> {
    match std::env::args().nth(1).as_deref() {
        None => Ok(()),
        Some("--help" | "-h") => {
            println!("{usage}");
            std::process::exit(0);
        }
        Some(other) => Err(Error::invalid(example, format!("unexpected argument `{other}`; {usage}"))),
    }
}

/// The value given to `flag`, read as a `T`; a value that does not parse is an error
/// naming the example, the flag and the value.
pub fn parse_flag_value<T: std::str::FromStr>(example: &'static str, flag: &str, value: String) -> Result<T> {
    value.parse().map_err(|_| Error::invalid(example, format!("{flag}: cannot read `{value}`")))
}

/// The process's peak resident memory in MiB (Linux; `None` elsewhere).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

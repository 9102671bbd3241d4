//! An op-level profiler: where the time of a training step goes, by op name, forward and
//! backward, like the op table of `torch.profiler`.
//!
//! Off by default; while off each op pays one relaxed atomic load. [`enable`] starts
//! collecting on the calling thread (the thread that builds the graph; kernels may run
//! on other threads, their wall time is still counted here):
//!
//! - **backward**: each backward rule is timed exactly, from its call to its return.
//! - **forward**: an op is charged the time since the previous profiler event (the
//!   previous op recorded, a backward rule ending, or a [`region`] ending). Ops compute
//!   their value before they are recorded, so this is the op's own time plus whatever
//!   plain code ran between it and the previous op; wrap such code in a [`region`] to
//!   give it its own line.
//! - **regions**: [`region`]`("optimizer", || ...)` times a block of your own.
//!
//! [`report`] returns the table, sorted by total time.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Whether any thread is profiling (a fast check before the thread-local state).
static ANY_ENABLED: AtomicBool = AtomicBool::new(false);

/// What a line of the table measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// An op's forward computation (see the module docs for how it is charged).
    Forward,
    /// An op's backward rule.
    Backward,
    /// A block timed with [`region`].
    Region,
}

#[derive(Default)]
struct State {
    enabled: bool,
    /// Depth of backward rules and regions being timed: forward ops inside them are not
    /// charged separately.
    nesting: u32,
    last_event: Option<Instant>,
    table: HashMap<(&'static str, Phase), (u64, Duration)>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

fn active() -> bool {
    ANY_ENABLED.load(Ordering::Relaxed) && STATE.with(|s| s.borrow().enabled)
}

/// Starts profiling on this thread, clearing earlier measurements.
pub fn enable() {
    ANY_ENABLED.store(true, Ordering::Relaxed);
    STATE.with(|s| *s.borrow_mut() = State { enabled: true, last_event: Some(Instant::now()), ..State::default() });
}

/// Stops profiling on this thread (the measurements stay until [`report`] or [`enable`]).
pub fn disable() {
    STATE.with(|s| s.borrow_mut().enabled = false);
}

fn charge(op: &'static str, phase: Phase, elapsed: Duration) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let entry = s.table.entry((op, phase)).or_default();
        entry.0 += 1;
        entry.1 += elapsed;
        s.last_event = Some(Instant::now());
    });
}

/// Called when an op is recorded: charges it the time since the previous event.
pub(crate) fn forward_op(op: &'static str) {
    if !active() {
        return;
    }
    let since = STATE.with(|s| {
        let s = s.borrow();
        if s.nesting > 0 { None } else { s.last_event }
    });
    if let Some(since) = since {
        charge(op, Phase::Forward, since.elapsed());
    }
}

/// Runs `f`, charging its time to `name` in `phase`.
fn timed<R>(name: &'static str, phase: Phase, f: impl FnOnce() -> R) -> R {
    if !active() {
        return f();
    }
    STATE.with(|s| s.borrow_mut().nesting += 1);
    let started = Instant::now();
    let result = f();
    let elapsed = started.elapsed();
    STATE.with(|s| s.borrow_mut().nesting -= 1);
    charge(name, phase, elapsed);
    result
}

/// Runs the backward rule of `op`, timing it.
pub(crate) fn backward_rule<R>(op: &'static str, f: impl FnOnce() -> R) -> R {
    timed(op, Phase::Backward, f)
}

/// Runs `f` and gives its time a line of its own, `name` (an optimizer step, data
/// loading). Ops inside it are not charged separately.
pub fn region<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    timed(name, Phase::Region, f)
}

/// One line of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    /// The op or region.
    pub name: &'static str,
    pub phase: Phase,
    /// How many times it ran.
    pub calls: u64,
    pub total: Duration,
}

/// The measurements of this thread, largest total first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub lines: Vec<Line>,
}

impl Report {
    /// The sum of every line.
    pub fn total(&self) -> Duration {
        self.lines.iter().map(|l| l.total).sum()
    }
}

/// Takes the measurements made on this thread since [`enable`] (profiling goes on).
pub fn report() -> Report {
    let table = STATE.with(|s| std::mem::take(&mut s.borrow_mut().table));
    let mut lines: Vec<Line> =
        table.into_iter().map(|((name, phase), (calls, total))| Line { name, phase, calls, total }).collect();
    lines.sort_by(|a, b| b.total.cmp(&a.total).then(a.name.cmp(b.name)));
    Report { lines }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.total().as_secs_f64().max(1e-12);
        writeln!(f, "{:<28} {:<9} {:>8} {:>11} {:>10} {:>6}", "op", "phase", "calls", "total ms", "us/call", "%")?;
        for l in &self.lines {
            let ms = l.total.as_secs_f64() * 1e3;
            writeln!(
                f,
                "{:<28} {:<9} {:>8} {:>11.1} {:>10.1} {:>6.1}",
                l.name,
                format!("{:?}", l.phase).to_lowercase(),
                l.calls,
                ms,
                ms * 1e3 / l.calls.max(1) as f64,
                100.0 * l.total.as_secs_f64() / total
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Var;
    use aigc_tensor::{Device, Tensor};

    #[test]
    fn the_report_names_each_op_forward_and_backward_and_each_region() {
        enable();
        let x = Var::leaf(Tensor::new(&[1.0f64, 2.0, 3.0], &Device::Cpu).unwrap());
        let y = x.exp().unwrap().mul(&x).unwrap().sum_all().unwrap();
        y.backward().unwrap();
        region("my block", || std::thread::sleep(Duration::from_millis(2)));
        disable();
        let r = report();
        let find = |name: &str, phase| r.lines.iter().find(|l| l.name == name && l.phase == phase);
        for op in ["exp", "mul", "sum"] {
            assert_eq!(find(op, Phase::Forward).map(|l| l.calls), Some(1), "{op} forward in\n{r}");
            assert_eq!(find(op, Phase::Backward).map(|l| l.calls), Some(1), "{op} backward in\n{r}");
        }
        let block = find("my block", Phase::Region).expect("the region has a line");
        assert!(block.total >= Duration::from_millis(2) && block.calls == 1);
        assert!(r.to_string().contains("my block"));
        // Disabled: nothing more is collected.
        x.exp().unwrap();
        assert!(report().lines.is_empty());
    }
}

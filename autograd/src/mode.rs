//! Thread-local switches: whether ops are recorded (`no_grad`), and anomaly mode, which
//! names the first op whose forward or backward produces a NaN or an infinity.

use aigc_tensor::{Error, Result, Tensor};
use std::cell::Cell;

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
    static ANOMALY: Cell<bool> = const { Cell::new(false) };
}

/// Whether ops on this thread are being recorded.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Whether anomaly detection is on for this thread.
pub fn is_anomaly_enabled() -> bool {
    ANOMALY.with(|a| a.get())
}

/// Restores the previous recording state when dropped.
pub struct GradMode {
    previous: bool,
}

impl GradMode {
    /// Turns recording on or off until the guard is dropped.
    pub fn set(enabled: bool) -> GradMode {
        let previous = GRAD_ENABLED.with(|g| g.replace(enabled));
        GradMode { previous }
    }
}

impl GradMode {
    /// Runs `f` with recording set to `enabled`, then restores the previous state.
    pub fn scoped<R>(enabled: bool, f: impl FnOnce() -> R) -> R {
        let _guard = GradMode::set(enabled);
        f()
    }
}

impl Drop for GradMode {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.previous));
    }
}

/// Runs `f` with recording off: nothing it computes will have a gradient (evaluation,
/// sampling, optimizer updates).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    GradMode::scoped(false, f)
}

/// Restores the previous anomaly state when dropped.
pub struct AnomalyMode {
    previous: bool,
}

impl AnomalyMode {
    /// Turns anomaly detection on or off until the guard is dropped.
    pub fn set(enabled: bool) -> AnomalyMode {
        let previous = ANOMALY.with(|a| a.replace(enabled));
        AnomalyMode { previous }
    }
}

impl Drop for AnomalyMode {
    fn drop(&mut self) {
        ANOMALY.with(|a| a.set(self.previous));
    }
}

/// Runs `f` with anomaly detection on: the first op whose output (forward) or input
/// gradient (backward) holds a NaN or an infinity fails with an error naming the op and
/// its input shapes.
pub fn detect_anomaly<R>(f: impl FnOnce() -> R) -> R {
    let _guard = AnomalyMode::set(true);
    f()
}

/// Fails if `value` holds a NaN or an infinity, naming `op`, the phase and input shapes.
pub(crate) fn check_finite(op: &'static str, phase: &str, value: &Tensor, inputs: &[&Tensor]) -> Result<()> {
    if !value.dtype().is_float() || value.numel() == 0 {
        return Ok(());
    }
    let bad = value.abs()?.lt(f64::INFINITY)?.eq(0i64)?.sum_all()?.to_scalar::<i64>()?;
    if bad > 0 {
        let shapes: Vec<String> = inputs.iter().map(|t| t.shape().to_string()).collect();
        return Err(Error::Graph {
            op,
            reason: format!(
                "anomaly: {phase} produced {bad} NaN/Inf value(s) in a result of shape {} (inputs {})",
                value.shape(),
                shapes.join(", ")
            ),
        });
    }
    Ok(())
}

//! [`Var`]: a tensor that takes part in differentiation. A var is a constant (no
//! gradient), a leaf (a parameter or an input you asked gradients for; it keeps its
//! accumulated `.grad()`), or the output of a recorded op (see `tape.rs`).

use crate::mode;
use crate::tape::{self, BackwardFn, Record};
use aigc_tensor::{DType, Device, Error, Result, Shape, Tensor};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

static NEXT_ID: AtomicU64 = AtomicU64::new(0);
/// Vars alive in this process (for leak checks: a training loop must hold it flat).
static LIVE: AtomicU64 = AtomicU64::new(0);

/// A tensor with a place in the autodiff graph. Cheap to clone.
#[derive(Clone)]
pub struct Var(Arc<Inner>);

struct Inner {
    id: u64,
    value: Tensor,
    kind: Kind,
    /// A frozen leaf takes no gradient and records nothing (`set_requires_grad(false)`).
    frozen: AtomicBool,
}

/// What kind of node a var is.
pub(crate) enum Kind {
    Constant,
    /// Accumulated gradient of a leaf.
    Leaf(Mutex<Option<Tensor>>),
    /// An op's output; the record is `None` once a backward walk has freed it.
    Op {
        name: &'static str,
        record: Mutex<Option<Record>>,
    },
}

impl Var {
    fn make(value: Tensor, kind: Kind) -> Var {
        LIVE.fetch_add(1, Ordering::Relaxed);
        Var(Arc::new(Inner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            value,
            kind,
            frozen: AtomicBool::new(false),
        }))
    }

    /// How many vars are alive in this process. After a training step's `backward`, the
    /// step's recording is gone, so a training loop keeps this number flat.
    pub fn live_count() -> u64 {
        LIVE.load(Ordering::Relaxed)
    }

    /// A value that no gradient flows into.
    pub fn constant(value: Tensor) -> Var {
        Var::make(value, Kind::Constant)
    }

    /// A leaf that gradients flow into: a parameter, or an input you differentiate by.
    pub fn leaf(value: Tensor) -> Var {
        Var::make(value, Kind::Leaf(Mutex::new(None)))
    }

    /// The same value as a fresh leaf (`x.requires_grad()` in the WGAN-GP recipe).
    pub fn requires_grad(&self) -> Var {
        Var::leaf(self.value().clone())
    }

    /// Whether this handle is the only one on the var and on its value's buffer, so
    /// that changing the value in place cannot be seen anywhere else.
    pub(crate) fn is_sole_holder(&self) -> bool {
        Arc::strong_count(&self.0) == 1 && self.value().is_sole_owner()
    }

    /// The same value, cut off from the graph.
    pub fn detach(&self) -> Var {
        Var::constant(self.value().clone())
    }

    /// Records an op: `value` computed from `inputs`, differentiated by `backward`. When
    /// recording is off or no input needs a gradient, the result is a constant.
    pub fn from_op(op: &'static str, value: Tensor, inputs: Vec<Var>, backward: BackwardFn) -> Result<Var> {
        crate::profile::forward_op(op);
        if mode::is_anomaly_enabled() {
            let shapes: Vec<&Tensor> = inputs.iter().map(|v| v.value()).collect();
            mode::check_finite(op, "forward", &value, &shapes)?;
        }
        if !mode::is_grad_enabled() || !inputs.iter().any(Var::needs_grad) {
            return Ok(Var::constant(value));
        }
        Ok(Var::make(
            value,
            Kind::Op { name: op, record: Mutex::new(Some(Record { op, inputs, backward, window: None })) },
        ))
    }

    /// Marks a recorded op as a window of its one input (see [`crate::tape::Window`]);
    /// a constant (nothing recorded) is left as it is.
    pub(crate) fn mark_window(&self, window: crate::tape::Window) {
        if let Kind::Op { record, .. } = self.kind()
            && let Some(r) = record.lock().unwrap_or_else(|e| e.into_inner()).as_mut()
        {
            debug_assert_eq!(r.inputs.len(), 1, "a window has one input");
            r.window = Some(window);
        }
    }

    /// The value.
    pub fn value(&self) -> &Tensor {
        &self.0.value
    }
    /// Position on the tape (creation order).
    pub fn id(&self) -> u64 {
        self.0.id
    }
    pub fn shape(&self) -> Shape {
        self.0.value.shape()
    }
    pub fn dims(&self) -> &[usize] {
        self.0.value.dims()
    }
    pub fn rank(&self) -> usize {
        self.0.value.rank()
    }
    pub fn dtype(&self) -> DType {
        self.0.value.dtype()
    }
    pub fn device(&self) -> Device {
        self.0.value.device()
    }
    pub(crate) fn kind(&self) -> &Kind {
        &self.0.kind
    }
    /// Whether a gradient can flow into this var (it is an unfrozen leaf or depends on one).
    pub fn needs_grad(&self) -> bool {
        match self.0.kind {
            Kind::Constant => false,
            Kind::Leaf(_) => !self.0.frozen.load(Ordering::Relaxed),
            Kind::Op { .. } => true,
        }
    }
    /// Freezes (`false`) or unfreezes (`true`) a leaf, in place, for every clone of it: a
    /// frozen leaf behaves as a constant, so ops on it alone record nothing and no gradient
    /// flows into it (`param.requires_grad_(False)` in PyTorch). Its stored `.grad()` is kept.
    /// Only leaves can be frozen: an op's output depends on its inputs.
    pub fn set_requires_grad(&self, requires_grad: bool) -> Result<()> {
        if !self.is_leaf() {
            return Err(Error::invalid(
                "set_requires_grad",
                format!("only a leaf can be frozen or unfrozen, and this var is `{}`", self.op_name()),
            ));
        }
        self.0.frozen.store(!requires_grad, Ordering::Relaxed);
        Ok(())
    }
    /// Whether this var is a leaf (keeps its gradient in `.grad()`).
    pub fn is_leaf(&self) -> bool {
        matches!(self.0.kind, Kind::Leaf(_))
    }
    /// The name of the op that produced this var (`"leaf"`, `"constant"` otherwise).
    pub fn op_name(&self) -> &'static str {
        match &self.0.kind {
            Kind::Constant => "constant",
            Kind::Leaf(_) => "leaf",
            Kind::Op { name, .. } => name,
        }
    }
    /// The gradient accumulated in this leaf by `backward` calls (None before any).
    pub fn grad(&self) -> Option<Tensor> {
        match &self.0.kind {
            Kind::Leaf(g) => g.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            _ => None,
        }
    }
    /// Clears this leaf's gradient.
    pub fn zero_grad(&self) {
        self.set_grad(None);
    }
    /// Replaces this leaf's gradient (used by optimizers and gradient clipping).
    pub fn set_grad(&self, grad: Option<Tensor>) {
        if let Kind::Leaf(g) = &self.0.kind {
            *g.lock().unwrap_or_else(|e| e.into_inner()) = grad;
        }
    }
    pub(crate) fn accumulate_grad(&self, g: &Tensor) -> Result<()> {
        match &self.0.kind {
            Kind::Leaf(slot) => tape::accumulate(slot, g),
            _ => Ok(()),
        }
    }

    /// Accumulates d(self)/d(leaf) into every leaf's `.grad()` and frees the recording.
    /// `self` must hold one element.
    pub fn backward(&self) -> Result<()> {
        tape::backward(self, None, false)
    }
    /// Like [`Var::backward`], keeping the recording so it can be walked again.
    pub fn backward_retain(&self) -> Result<()> {
        tape::backward(self, None, true)
    }
    /// Backward from a non-scalar output, weighting it by `seed` (same shape).
    pub fn backward_with(&self, seed: &Tensor) -> Result<()> {
        tape::backward(self, Some(&Var::constant(seed.clone())), false)
    }

    /// Sums a (broadcast) gradient down to `shape`: leading extra dims and dims where
    /// `shape` has 1 are summed. The reverse of broadcasting.
    pub fn sum_to(&self, shape: &[usize]) -> Result<Var> {
        let extra = self.rank() - shape.len();
        let mut dims: Vec<isize> = (0..extra as isize).collect();
        for (d, &n) in shape.iter().enumerate() {
            if n == 1 && self.dims()[extra + d] != 1 {
                dims.push((extra + d) as isize);
            }
        }
        if dims.is_empty() {
            return Ok(self.clone());
        }
        self.sum(&dims, true)?.reshape(shape)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

impl From<Tensor> for Var {
    /// A tensor enters the graph as a constant.
    fn from(t: Tensor) -> Var {
        Var::constant(t)
    }
}

impl std::fmt::Debug for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Var#{}({:?}, {})", self.id(), self.0.value, self.op_name())
    }
}

//! The one error type of the tensor layer. Every variant names the op that failed and
//! what it was given, so a message reads like
//! `matmul: lhs [64, 784] and rhs [400, 784]: lhs.dim(-1)=784 must equal rhs.dim(-2)=400`.

use crate::{DType, Device, Shape};

/// Why a tensor operation could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Two operands whose shapes do not fit together.
    #[error("{op}: lhs {lhs} and rhs {rhs}: {reason}")]
    ShapeMismatch { op: &'static str, lhs: Shape, rhs: Shape, reason: String },

    /// One operand whose shape is wrong for the op.
    #[error("{op}: input of shape {shape}: {reason}")]
    BadShape { op: &'static str, shape: Shape, reason: String },

    /// A dimension index outside `-rank..rank`.
    #[error("{op}: dim {dim} is out of range for a tensor of rank {rank} (expected {}..{rank})", -(*rank as i64))]
    DimOutOfRange { op: &'static str, dim: isize, rank: usize },

    /// Two operands of different dtypes (there is no implicit promotion).
    #[error("{op}: dtypes differ: lhs is {lhs}, rhs is {rhs} (convert one with to_dtype)")]
    DTypeMismatch { op: &'static str, lhs: DType, rhs: DType },

    /// The op is not defined for this dtype.
    #[error("{op}: not supported for dtype {dtype} (expected {expected})")]
    UnsupportedDType { op: &'static str, dtype: DType, expected: &'static str },

    /// Operands on different devices.
    #[error("{op}: operands are on different devices: {lhs} and {rhs} (move one with to_device)")]
    DeviceMismatch { op: &'static str, lhs: Device, rhs: Device },

    /// The device is not available in this build or on this machine.
    #[error("device {device} is not available: {reason}")]
    DeviceUnavailable { device: Device, reason: String },

    /// A buffer whose length does not match the shape it is given.
    #[error("{op}: shape {shape} holds {} elements but {got} were given", shape.numel())]
    ElementCount { op: &'static str, shape: Shape, got: usize },

    /// An index (in an index tensor or an argument) outside its dimension.
    #[error("{op}: index {index} is out of range for a dimension of size {size}")]
    IndexOutOfRange { op: &'static str, index: i64, size: usize },

    /// A misuse of the autodiff graph (a freed recording, a non-scalar `backward` without
    /// a seed) or a non-finite value caught by anomaly mode. Raised by `aigc-autograd`.
    #[error("{op}: {reason}")]
    Graph { op: &'static str, reason: String },

    /// A file that could not be read or written.
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },

    /// Data that does not parse: a truncated file, a bad header, a malformed line.
    #[error("{what}: {reason}")]
    Format { what: String, reason: String },

    /// Any other invalid argument, described in words.
    #[error("{op}: {reason}")]
    InvalidArgument { op: &'static str, reason: String },
}

/// `Result` with the tensor layer's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { op, reason: reason.into() }
    }
    pub fn bad_shape(op: &'static str, shape: &Shape, reason: impl Into<String>) -> Self {
        Error::BadShape { op, shape: shape.clone(), reason: reason.into() }
    }
}

//! The buffers behind tensors, one enum arm per device and dtype, and the macros that
//! turn a typed kernel call into a dtype dispatch in one line.

use crate::{DType, Device};
use half::{bf16, f16};

/// `with_any!(storage, |buf| expr)`: evaluates `expr` with `buf` bound to the typed
/// vector, whatever the dtype; every arm must give the same type.
macro_rules! with_any {
    ($s:expr, |$b:ident| $body:expr) => {
        match $s {
            $crate::storage::CpuStorage::F32($b) => $body,
            $crate::storage::CpuStorage::F64($b) => $body,
            $crate::storage::CpuStorage::F16($b) => $body,
            $crate::storage::CpuStorage::BF16($b) => $body,
            $crate::storage::CpuStorage::I64($b) => $body,
            $crate::storage::CpuStorage::U8($b) => $body,
        }
    };
}

/// `map_any!(storage, |buf| expr)`: `expr` yields a vector of the same element type,
/// which is wrapped back into the same `CpuStorage` arm.
macro_rules! map_any {
    ($s:expr, |$b:ident| $body:expr) => {
        match $s {
            $crate::storage::CpuStorage::F32($b) => $crate::storage::CpuStorage::F32($body),
            $crate::storage::CpuStorage::F64($b) => $crate::storage::CpuStorage::F64($body),
            $crate::storage::CpuStorage::F16($b) => $crate::storage::CpuStorage::F16($body),
            $crate::storage::CpuStorage::BF16($b) => $crate::storage::CpuStorage::BF16($body),
            $crate::storage::CpuStorage::I64($b) => $crate::storage::CpuStorage::I64($body),
            $crate::storage::CpuStorage::U8($b) => $crate::storage::CpuStorage::U8($body),
        }
    };
}

/// `map_float!(op_name, storage, |buf| expr)`: like `map_any!` for the float dtypes;
/// integer dtypes return `Error::UnsupportedDType` from the enclosing function.
macro_rules! map_float {
    ($op:expr, $s:expr, |$b:ident| $body:expr) => {
        match $s {
            $crate::storage::CpuStorage::F32($b) => $crate::storage::CpuStorage::F32($body),
            $crate::storage::CpuStorage::F64($b) => $crate::storage::CpuStorage::F64($body),
            $crate::storage::CpuStorage::F16($b) => $crate::storage::CpuStorage::F16($body),
            $crate::storage::CpuStorage::BF16($b) => $crate::storage::CpuStorage::BF16($body),
            other => {
                return Err($crate::Error::UnsupportedDType {
                    op: $op,
                    dtype: other.dtype(),
                    expected: "a float dtype (f32, f64, f16, bf16)",
                })
            }
        }
    };
}

/// `zip_float!(op_name, lhs, rhs, |a, b| expr)`: both storages must hold the same float
/// dtype; `expr` yields a vector of that type, wrapped back.
macro_rules! zip_float {
    ($op:expr, $l:expr, $r:expr, |$a:ident, $b:ident| $body:expr) => {
        match ($l, $r) {
            ($crate::storage::CpuStorage::F32($a), $crate::storage::CpuStorage::F32($b)) => {
                $crate::storage::CpuStorage::F32($body)
            }
            ($crate::storage::CpuStorage::F64($a), $crate::storage::CpuStorage::F64($b)) => {
                $crate::storage::CpuStorage::F64($body)
            }
            ($crate::storage::CpuStorage::F16($a), $crate::storage::CpuStorage::F16($b)) => {
                $crate::storage::CpuStorage::F16($body)
            }
            ($crate::storage::CpuStorage::BF16($a), $crate::storage::CpuStorage::BF16($b)) => {
                $crate::storage::CpuStorage::BF16($body)
            }
            (l, r) if l.dtype() != r.dtype() => {
                return Err($crate::Error::DTypeMismatch { op: $op, lhs: l.dtype(), rhs: r.dtype() })
            }
            (l, _) => {
                return Err($crate::Error::UnsupportedDType {
                    op: $op,
                    dtype: l.dtype(),
                    expected: "a float dtype (f32, f64, f16, bf16)",
                })
            }
        }
    };
}

/// `zip_any!(op_name, lhs, rhs, |a, b| expr)`: both storages must hold the same dtype
/// (any); `expr` is evaluated with both typed vectors and must give one type. Pass
/// `&mut` storage to get mutable vectors.
macro_rules! zip_any {
    ($op:expr, $l:expr, $r:expr, |$a:ident, $b:ident| $body:expr) => {
        match ($l, $r) {
            ($crate::storage::CpuStorage::F32($a), $crate::storage::CpuStorage::F32($b)) => $body,
            ($crate::storage::CpuStorage::F64($a), $crate::storage::CpuStorage::F64($b)) => $body,
            ($crate::storage::CpuStorage::F16($a), $crate::storage::CpuStorage::F16($b)) => $body,
            ($crate::storage::CpuStorage::BF16($a), $crate::storage::CpuStorage::BF16($b)) => $body,
            ($crate::storage::CpuStorage::I64($a), $crate::storage::CpuStorage::I64($b)) => $body,
            ($crate::storage::CpuStorage::U8($a), $crate::storage::CpuStorage::U8($b)) => $body,
            (l, r) => return Err($crate::Error::DTypeMismatch { op: $op, lhs: l.dtype(), rhs: r.dtype() }),
        }
    };
}

/// `of_dtype!(dtype, expr)`: a `CpuStorage` of `dtype` holding `expr`, a vector whose
/// element type is inferred from the arm (so `expr` is typically a generic kernel call).
macro_rules! of_dtype {
    ($dtype:expr, $body:expr) => {
        match $dtype {
            $crate::DType::F32 => $crate::storage::CpuStorage::F32($body),
            $crate::DType::F64 => $crate::storage::CpuStorage::F64($body),
            $crate::DType::F16 => $crate::storage::CpuStorage::F16($body),
            $crate::DType::BF16 => $crate::storage::CpuStorage::BF16($body),
            $crate::DType::I64 => $crate::storage::CpuStorage::I64($body),
            $crate::DType::U8 => $crate::storage::CpuStorage::U8($body),
        }
    };
}

pub(crate) use {map_any, map_float, of_dtype, with_any, zip_any, zip_float};

/// A buffer in host memory, typed.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::I64(_) => DType::I64,
            CpuStorage::U8(_) => DType::U8,
        }
    }
    pub fn len(&self) -> usize {
        with_any!(self, |b| b.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A buffer of `len` copies of `value` converted to `dtype`.
    pub fn full(dtype: DType, len: usize, value: f64) -> Self {
        use aigc_kernels::{Element, buffers::filled};
        of_dtype!(dtype, filled(len, Element::from_f64(value)))
    }
}

/// A dropped buffer goes back to the kernels' cache of freed buffers
/// ([`aigc_kernels::buffers`]), so the next op that needs the same size reuses it.
impl Drop for CpuStorage {
    fn drop(&mut self) {
        with_any!(self, |b| aigc_kernels::buffers::recycle(std::mem::take(b)))
    }
}

/// A buffer on some device. The CUDA arm arrives with the CUDA backend.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
}

impl Storage {
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
        }
    }
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
        }
    }
}

//! Element types a tensor can hold, and the map from Rust types to them.

use crate::storage::CpuStorage;
use half::{bf16, f16};

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    /// Indices, labels, token ids.
    I64,
    /// Boolean masks (0/1, what comparisons return) and raw bytes such as pixels.
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }
    pub fn is_int(self) -> bool {
        !self.is_float()
    }
    /// The name as in PyTorch and safetensors (`f32`, `bf16`, `i64`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Rust type that is the element type of some [`DType`], and how its vectors move in
/// and out of a CPU buffer.
pub trait WithDType: aigc_kernels::Element {
    const DTYPE: DType;
    fn into_storage(v: Vec<Self>) -> CpuStorage;
    fn from_storage(s: &CpuStorage) -> Option<&Vec<Self>>;
    fn from_storage_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>>;
}

macro_rules! with_dtype {
    ($($t:ty => $d:ident),*) => {$(
        impl WithDType for $t {
            const DTYPE: DType = DType::$d;
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$d(v)
            }
            fn from_storage(s: &CpuStorage) -> Option<&Vec<Self>> {
                match s {
                    CpuStorage::$d(v) => Some(v),
                    _ => None,
                }
            }
            fn from_storage_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
                match s {
                    CpuStorage::$d(v) => Some(v),
                    _ => None,
                }
            }
        }
    )*};
}
with_dtype!(f32 => F32, f64 => F64, f16 => F16, bf16 => BF16, i64 => I64, u8 => U8);

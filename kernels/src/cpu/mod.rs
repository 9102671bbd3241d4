//! CPU kernels, one module per op family. Each function reads strided inputs through
//! [`crate::Layout`]s and returns (or fills) a contiguous row-major output.
//!
//! These are the reference kernels: plain, correct for every stride pattern, threaded
//! with rayon where the work is large. The SIMD kernels slot in behind the same
//! functions, which keeps the tensor layer unchanged.

pub mod attention;
pub mod attention_backward;
pub mod binary;
pub mod conv;
mod conv_phases;
mod conv_shifted;
mod conv_weight_grad;
mod conv_winograd;
mod conv_winograd_grad;
pub mod copy;
pub mod cross_entropy;
pub mod gemm;
#[cfg(target_arch = "x86_64")]
mod gemm_amx;
#[cfg(target_arch = "x86_64")]
mod gemm_bf16;
mod gemm_packed_a;
mod gemm_small;
pub mod index;
pub mod map;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod random;
pub mod recurrent;
pub mod reduce;
pub mod simd;
pub mod softmax;
mod transpose;
pub mod unary;

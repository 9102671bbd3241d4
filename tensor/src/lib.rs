//! # aigc-tensor
//!
//! A strided n-dimensional [`Tensor`] with dtypes f32, f64, f16, bf16, i64 and u8 on a
//! [`Device`], and every forward op of the library: views without copies, elementwise
//! math with numpy broadcasting, reductions, matmul, convolutions, pooling, norms,
//! softmax, indexing and fused attention. No autodiff here (that is `aigc-autograd`).
//!
//! Each op checks its arguments, returns an [`Error`] naming the op and the shapes when
//! they are wrong, and dispatches by device and dtype to a kernel in `aigc-kernels`.
//!
//! ```
//! use aigc_tensor::{Tensor, Device, DType};
//! let dev = Device::Cpu;
//! let x = Tensor::randn([4, 8], &dev, 0)?;
//! let w = (Tensor::randn([8, 3], &dev, 1)? * 0.5)?;
//! let p = x.matmul(&w)?.relu()?.softmax(-1)?;
//! assert_eq!(p.dims(), &[4, 3]);
//! assert!((p.sum_all()?.to_scalar::<f32>()? - 4.0).abs() < 1e-5);
//! # Ok::<(), aigc_tensor::Error>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

pub mod device;
pub mod dtype;
pub mod error;
pub mod ops;
pub mod shape;
pub mod storage;
pub mod tensor;
#[cfg(test)]
pub(crate) mod testing;

pub use aigc_kernels::Layout;
pub use aigc_kernels::cpu::binary::{BinaryOp, CmpOp};
pub use aigc_kernels::cpu::unary::UnaryOp;
pub use device::Device;
pub use dtype::{DType, WithDType};
pub use error::{Error, Result};
pub use ops::conv::{Conv1dParams, Conv2dParams, ConvTranspose1dParams, ConvTranspose2dParams};
pub use ops::cross_entropy::CrossEntropyOptions;
pub use ops::recurrent::{RecurrentCell, RecurrentGrads, RecurrentStates};
pub use shape::Shape;
pub use tensor::Tensor;

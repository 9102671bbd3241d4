//! # aigc
//!
//! Generative models from scratch: a strided tensor library with hand-written kernels,
//! reverse-mode autodiff, neural-network layers and a trainer for each family surveyed in
//! "AIGC: from GAN to ChatGPT". This facade re-exports the layers:
//!
//! - [`kernels`]: raw compute on buffers (`aigc-kernels`)
//! - [`tensor`]: the strided n-d [`Tensor`] and every forward op (`aigc-tensor`)
//!
//! See `ARCHITECTURE.md` for how the crates fit together.

pub use aigc_kernels as kernels;
pub use aigc_tensor as tensor;
pub use aigc_tensor::{DType, Device, Error, Result, Shape, Tensor};

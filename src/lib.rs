//! # aigc
//!
//! Generative models from scratch: a strided tensor library with hand-written kernels,
//! reverse-mode autodiff, neural-network layers and a trainer for each family surveyed in
//! "AIGC: from GAN to ChatGPT". This facade re-exports the layers:
//!
//! - [`kernels`]: raw compute on buffers (`aigc-kernels`)
//! - [`tensor`]: the strided n-d [`Tensor`] and every forward op (`aigc-tensor`)
//! - [`autograd`]: [`Var`], the tape, backward rules, grad-of-grad (`aigc-autograd`)
//! - [`nn`]: modules, layers, losses, optimizers (`aigc-nn`)
//! - [`trainers`]: data sets and the generative families (`aigc-trainers`)
//!
//! See `ARCHITECTURE.md` for how the crates fit together.

pub use aigc_autograd as autograd;
pub use aigc_autograd::Var;
pub use aigc_kernels as kernels;
pub use aigc_nn as nn;
pub use aigc_tensor as tensor;
pub use aigc_tensor::{DType, Device, Error, Result, Shape, Tensor};
pub use aigc_trainers as trainers;

//! # aigc-nn
//!
//! Neural-network building blocks on `aigc-autograd`:
//! - [`VarStore`]: parameters under hierarchical names, seeded initialisation, train/eval mode.
//! - [`Module`], [`Sequential`]: a model is a struct whose `forward` maps `Var` to `Var`.
//! - layers: [`Linear`].
//! - [`loss`]: MSE, BCE with logits, cross-entropy.
//! - [`optim`]: SGD, Adam, AdamW (fused in-place updates) and gradient clipping.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod linear;
pub mod loss;
pub mod module;
pub mod optim;
pub mod var_store;

pub use linear::Linear;
pub use module::{Activation, Module, Sequential};
pub use optim::{Adam, AdamConfig, AdamW, Optimizer, Sgd, SgdConfig, clip_grad_norm};
pub use var_store::{Init, VarStore};

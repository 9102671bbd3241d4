//! # aigc-nn
//!
//! Modules, layers, losses, optimizers and state dicts on top of `aigc-autograd`.
//! This crate is being built in its own issue; it exposes nothing yet.

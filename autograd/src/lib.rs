//! # aigc-autograd
//!
//! Reverse-mode automatic differentiation over `aigc-tensor`. This crate is being built
//! in its own issue (the tape, backward rules, grad-of-grad, gradcheck); it exposes
//! nothing yet.

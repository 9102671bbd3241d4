//! # aigc-trainers
//!
//! Data loaders, metrics, and (in the family issues) one module per generative family.
//!
//! - [`data`]: data sets; the 8x8 digits are embedded in the crate.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod data;
pub mod gpt;
pub mod rng;

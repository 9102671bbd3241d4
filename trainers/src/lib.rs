//! # aigc-trainers
//!
//! Data loaders, metrics, and (in the family issues) one module per generative family.
//!
//! - [`data`]: data sets; the 8x8 digits and tiny Shakespeare are embedded in the crate.
//! - [`text`]: tokenizers (characters, GPT-2 byte-level BPE).
//! - [`ngram`]: the Kneser-Ney n-gram language model, the pre-neural baseline.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod data;
pub mod ngram;
pub mod text;

//! # aigc-trainers
//!
//! Data loaders, tokenizers, metrics, and one module per generative family.
//!
//! - [`data`]: data sets; the 8x8 digits and tiny Shakespeare are embedded in the crate.
//! - [`text`]: tokenizers (characters, GPT-2 byte-level BPE).
//! - [`ngram`]: the Kneser-Ney n-gram language model, the pre-neural baseline.
//! - [`gpt`]: the GPT language model, its KV-cache sampling and its trainer.
//! - [`rng`]: the small seeded generator behind batch sampling and token sampling.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod data;
pub mod gpt;
pub mod ngram;
pub mod recurrent_lm;
pub mod rng;
pub mod text;

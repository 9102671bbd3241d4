//! Data sets: the 8x8 digits as tensors, tiny Shakespeare as text.

pub mod digits;
pub mod shakespeare;

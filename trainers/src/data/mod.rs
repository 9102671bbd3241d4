//! Data sets as tensors.

pub mod digits;

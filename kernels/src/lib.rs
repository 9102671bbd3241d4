//! # aigc-kernels
//!
//! Raw compute on buffers: every kernel takes flat slices plus [`Layout`]s (shape,
//! strides, offset) and writes a flat, row-major result. There is no tensor type here;
//! `aigc-tensor` owns the buffers, checks the arguments and dispatches to these
//! functions by device and dtype.
//!
//! - [`layout`]: strided views and the one walker that visits their elements.
//! - [`dims`]: the inline lists of sizes and strides that layouts hold.
//! - [`element`]: the element types and the math they compute with.
//! - [`cpu`]: the CPU kernels, one module per op family.
//! - [`buffers`]: the cache of freed host buffers that kernel outputs are taken from.
//! - [`parallel`]: the thread pool the hot kernels split their loops over.
#![deny(unsafe_op_in_unsafe_fn)]
// SIMD kernels pass closures (`|x| math::exp(x)`), never function items: a closure
// inherits the `#[target_feature]`s of the kernel it is written in, a function item's
// call shim does not (every intrinsic in it becomes an out-of-line call). See `cpu::simd`.
// A closure written in a generic helper outside any kernel (the register tiles of
// `cpu::gemm_small`) inherits nothing: it is `#[inline(always)]`, because left out of
// line it is compiled without the features (measured: a 256^3 product 30x slower, after
// a second caller of the tile loop changed LLVM's inlining choice).
#![allow(clippy::redundant_closure)]

pub mod buffers;
pub mod cpu;
pub mod dims;
pub mod element;
pub mod layout;
pub mod parallel;

pub use dims::Dims;
pub use element::{Element, FloatElem, Real};
/// The half-precision element types, re-exported so that users need no `half` dependency.
pub use half::{bf16, f16};
pub use layout::Layout;

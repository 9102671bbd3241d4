//! # aigc-autograd
//!
//! Reverse-mode automatic differentiation over `aigc-tensor`.
//!
//! - [`Var`] (`var.rs`): a tensor with a place in the graph: constant, leaf, or op output.
//! - `tape.rs`: the whole mechanism: the record each op leaves, the reverse walk over the
//!   tape, the accumulation of gradients. Read it first.
//! - `ops/`: every differentiable op with its backward rule, written with `Var` ops so
//!   that gradients can be differentiated again ([`grad`] with `create_graph`).
//! - [`gradcheck`](fn@gradcheck)/[`gradgradcheck`]: finite-difference checks in f64.
//! - [`no_grad`] and [`detect_anomaly`] (`mode.rs`); [`checkpoint`](fn@checkpoint) trades memory for
//!   recomputation; [`profile`] tables where a step's time goes, op by op.
//!
//! ```
//! use aigc_autograd::{Var, grad};
//! use aigc_tensor::{Tensor, Device};
//! let x = Var::leaf(Tensor::new(&[1.0f64, 2.0, 3.0], &Device::Cpu)?);
//! let y = x.powf(3.0)?.sum_all()?;                       // y = sum x^3
//! let dy = grad(&[&y], &[&x], true)?;                     // 3 x^2, recorded
//! assert_eq!(dy[0].value().to_vec::<f64>()?, vec![3.0, 12.0, 27.0]);
//! let d2y = grad(&[&dy[0].sum_all()?], &[&x], false)?;     // 6 x
//! assert_eq!(d2y[0].value().to_vec::<f64>()?, vec![6.0, 12.0, 18.0]);
//! # Ok::<(), aigc_tensor::Error>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

pub mod checkpoint;
pub mod gradcheck;
pub mod mode;
pub mod ops;
pub mod profile;
pub mod tape;
#[cfg(test)]
pub(crate) mod testing;
pub mod var;

pub use checkpoint::checkpoint;
pub use gradcheck::{GradcheckOptions, gradcheck, gradcheck_with, gradgradcheck};
pub use mode::{detect_anomaly, no_grad};
pub use ops::loss::CrossEntropyOptions;
pub use tape::{GradOptions, grad, grad_with};
pub use var::Var;

//! Every forward op of the tensor layer, one file per family. Each op: checks its
//! arguments (errors name the op and the shapes), then dispatches by device and dtype
//! to its kernel in `aigc_kernels`.

pub mod arith;
pub mod attention;
pub mod bytes;
pub mod conv;
pub mod cross_entropy;
pub mod elementwise;
pub mod index;
pub mod inplace;
pub mod join;
pub mod matmul;
pub mod norm;
pub mod pool;
pub mod random;
pub mod recurrent;
pub mod reduce;
pub mod softmax;
pub mod view;

pub use arith::Scalar;
pub use elementwise::{Operand, OperandValue};

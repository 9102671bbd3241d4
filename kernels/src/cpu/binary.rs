//! Elementwise functions of two values ([`BinaryOp`]) and comparisons ([`CmpOp`]),
//! declared once each. The tensor layer broadcasts both operands to one shape (stride-0
//! views, no copies) before calling these kernels.

use super::map::zip_map;
use crate::{Element, FloatElem, Layout, Real};

macro_rules! binary_ops {
    ($( $(#[$doc:meta])* $name:ident => |$a:ident, $b:ident| $body:expr; )*) => {
        /// An elementwise function of two values.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum BinaryOp { $( $(#[$doc])* $name, )* }

        impl BinaryOp {
            pub fn name(self) -> &'static str {
                match self { $( Self::$name => stringify!($name), )* }
            }
            /// The op on one pair of values: the definition every kernel must agree with.
            pub fn apply<R: Real>(self, lhs: R, rhs: R) -> R {
                match self { $( Self::$name => { let ($a, $b) = (lhs, rhs); $body } )* }
            }
        }

        /// `op(lhs, rhs)` elementwise over two same-shaped strided float views.
        pub fn binary_float<T: FloatElem>(op: BinaryOp, lhs: &[T], ll: &Layout, rhs: &[T], rl: &Layout) -> Vec<T> {
            match op {
                $( BinaryOp::$name => zip_map(lhs, ll, rhs, rl, |x: T, y: T| {
                    let ($a, $b) = (x.to_acc(), y.to_acc());
                    T::from_acc($body)
                }), )*
            }
        }
    };
}

binary_ops! {
    /// `a + b`
    Add => |a, b| a + b;
    /// `a - b`
    Sub => |a, b| a - b;
    /// `a * b`
    Mul => |a, b| a * b;
    /// `a / b`
    Div => |a, b| a / b;
    /// `a ^ b`
    Pow => |a, b| a.powf(b);
    /// the larger (NaN if either is NaN)
    Maximum => |a, b| a.max(b);
    /// the smaller (NaN if either is NaN)
    Minimum => |a, b| a.min(b);
}

impl BinaryOp {
    /// Ops that are closed over the integers (Div and Pow are not).
    pub fn is_integral(self) -> bool {
        matches!(self, Self::Add | Self::Sub | Self::Mul | Self::Maximum | Self::Minimum)
    }
}

/// `op(lhs, rhs)` over i64 buffers with wrapping arithmetic. The caller checks `op.is_integral()`.
pub fn binary_i64(op: BinaryOp, lhs: &[i64], ll: &Layout, rhs: &[i64], rl: &Layout) -> Vec<i64> {
    match op {
        BinaryOp::Add => zip_map(lhs, ll, rhs, rl, |a: i64, b| a.wrapping_add(b)),
        BinaryOp::Sub => zip_map(lhs, ll, rhs, rl, |a: i64, b| a.wrapping_sub(b)),
        BinaryOp::Mul => zip_map(lhs, ll, rhs, rl, |a: i64, b| a.wrapping_mul(b)),
        BinaryOp::Maximum => zip_map(lhs, ll, rhs, rl, |a: i64, b| a.max(b)),
        BinaryOp::Minimum => zip_map(lhs, ll, rhs, rl, |a: i64, b| a.min(b)),
        BinaryOp::Div | BinaryOp::Pow => unreachable!("binary_i64: {} is not integral", op.name()),
    }
}

/// `op(lhs, rhs)` over u8 buffers with saturating arithmetic (u8 tensors are masks and
/// raw pixels). The caller checks `op.is_integral()`.
pub fn binary_u8(op: BinaryOp, lhs: &[u8], ll: &Layout, rhs: &[u8], rl: &Layout) -> Vec<u8> {
    match op {
        BinaryOp::Add => zip_map(lhs, ll, rhs, rl, |a: u8, b| a.saturating_add(b)),
        BinaryOp::Sub => zip_map(lhs, ll, rhs, rl, |a: u8, b| a.saturating_sub(b)),
        BinaryOp::Mul => zip_map(lhs, ll, rhs, rl, |a: u8, b| a.saturating_mul(b)),
        BinaryOp::Maximum => zip_map(lhs, ll, rhs, rl, |a: u8, b| a.max(b)),
        BinaryOp::Minimum => zip_map(lhs, ll, rhs, rl, |a: u8, b| a.min(b)),
        BinaryOp::Div | BinaryOp::Pow => unreachable!("binary_u8: {} is not integral", op.name()),
    }
}

/// A comparison; the result is a u8 mask (1 where true).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub fn name(self) -> &'static str {
        match self {
            Self::Eq => "eq",
            Self::Ne => "ne",
            Self::Lt => "lt",
            Self::Le => "le",
            Self::Gt => "gt",
            Self::Ge => "ge",
        }
    }
    /// The comparison on one pair (IEEE semantics: every comparison with NaN is false but `ne`).
    pub fn apply<T: PartialOrd>(self, a: T, b: T) -> bool {
        match self {
            Self::Eq => a == b,
            Self::Ne => a != b,
            Self::Lt => a < b,
            Self::Le => a <= b,
            Self::Gt => a > b,
            Self::Ge => a >= b,
        }
    }
}

/// Compares two same-shaped strided views; 1 where `op` holds, else 0.
pub fn compare<T: Element>(op: CmpOp, lhs: &[T], ll: &Layout, rhs: &[T], rl: &Layout) -> Vec<u8> {
    zip_map(lhs, ll, rhs, rl, |a: T, b: T| op.apply(a, b) as u8)
}

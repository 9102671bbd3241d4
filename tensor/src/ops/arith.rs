//! `+ - * /` and unary `-` on tensors, scalars and `Result<Tensor>`, so that math reads
//! like math: `((&x * 2.0)? - &y)?`. Every operator returns `Result<Tensor>` (shapes may
//! not broadcast). Tensor-tensor operators also accept a `Result<Tensor>` on either side,
//! so `(&a + &b) * &c` chains; Rust's orphan rule forbids the same for scalars, so write
//! `((&a + &b)? * 2.0)`.

use crate::{Result, Tensor};
use std::ops::{Add, Div, Mul, Neg, Sub};

macro_rules! tensor_operator {
    ($trait:ident, $method:ident) => {
        tensor_operator!(@one $trait, $method, &Tensor, &Tensor, |a, b| Tensor::$method(a, b));
        tensor_operator!(@one $trait, $method, &Tensor, Tensor, |a, b| Tensor::$method(a, &b));
        tensor_operator!(@one $trait, $method, Tensor, &Tensor, |a, b| Tensor::$method(&a, b));
        tensor_operator!(@one $trait, $method, Tensor, Tensor, |a, b| Tensor::$method(&a, &b));
        tensor_operator!(@one $trait, $method, Result<Tensor>, &Tensor, |a, b| Tensor::$method(&a?, b));
        tensor_operator!(@one $trait, $method, Result<Tensor>, Tensor, |a, b| Tensor::$method(&a?, &b));
        tensor_operator!(@one $trait, $method, &Tensor, Result<Tensor>, |a, b| Tensor::$method(a, &b?));
        tensor_operator!(@one $trait, $method, Tensor, Result<Tensor>, |a, b| Tensor::$method(&a, &b?));
    };
    (@one $trait:ident, $method:ident, $lhs:ty, $rhs:ty, |$a:ident, $b:ident| $body:expr) => {
        impl $trait<$rhs> for $lhs {
            type Output = Result<Tensor>;
            fn $method(self, rhs: $rhs) -> Result<Tensor> {
                let ($a, $b) = (self, rhs);
                $body
            }
        }
    };
}
tensor_operator!(Add, add);
tensor_operator!(Sub, sub);
tensor_operator!(Mul, mul);
tensor_operator!(Div, div);

/// A plain number usable as the right (or left) operand of a tensor operator.
pub trait Scalar: Copy {
    fn to_f64(self) -> f64;
}
impl Scalar for f64 {
    fn to_f64(self) -> f64 {
        self
    }
}
impl Scalar for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
}

/// Tensor-scalar operators. `+ - *` lower to one fused `affine` pass; `/` divides
/// exactly (a broadcast scalar), so `x / 3.0` rounds like PyTorch rather than `x * (1/3)`.
/// One generic impl per operator (not one per float type) keeps `x * 2.0` unambiguous.
impl<S: Scalar> Add<S> for &Tensor {
    type Output = Result<Tensor>;
    fn add(self, rhs: S) -> Result<Tensor> {
        self.affine(1.0, rhs.to_f64())
    }
}
impl<S: Scalar> Sub<S> for &Tensor {
    type Output = Result<Tensor>;
    fn sub(self, rhs: S) -> Result<Tensor> {
        self.affine(1.0, -rhs.to_f64())
    }
}
impl<S: Scalar> Mul<S> for &Tensor {
    type Output = Result<Tensor>;
    fn mul(self, rhs: S) -> Result<Tensor> {
        self.affine(rhs.to_f64(), 0.0)
    }
}
impl<S: Scalar> Div<S> for &Tensor {
    type Output = Result<Tensor>;
    fn div(self, rhs: S) -> Result<Tensor> {
        Tensor::div(self, rhs.to_f64())
    }
}
macro_rules! owned_scalar_operators {
    ($($trait:ident $method:ident),*) => {$(
        impl<S: Scalar> $trait<S> for Tensor {
            type Output = Result<Tensor>;
            fn $method(self, rhs: S) -> Result<Tensor> {
                $trait::$method(&self, rhs)
            }
        }
    )*};
}
owned_scalar_operators!(Add add, Sub sub, Mul mul, Div div);

/// Scalar on the left: `1.0 - &x`, `2.0 * x` (f64 only, so that literals infer).
macro_rules! left_scalar_operators {
    ($($s:ty),*) => {$(
        impl Add<&Tensor> for $s {
            type Output = Result<Tensor>;
            fn add(self, rhs: &Tensor) -> Result<Tensor> { rhs.affine(1.0, self as f64) }
        }
        impl Sub<&Tensor> for $s {
            type Output = Result<Tensor>;
            fn sub(self, rhs: &Tensor) -> Result<Tensor> { rhs.affine(-1.0, self as f64) }
        }
        impl Mul<&Tensor> for $s {
            type Output = Result<Tensor>;
            fn mul(self, rhs: &Tensor) -> Result<Tensor> { rhs.affine(self as f64, 0.0) }
        }
        impl Div<&Tensor> for $s {
            type Output = Result<Tensor>;
            fn div(self, rhs: &Tensor) -> Result<Tensor> {
                Tensor::full(self as f64, (), rhs.dtype(), &rhs.device())?.div(rhs)
            }
        }
        impl Add<Tensor> for $s {
            type Output = Result<Tensor>;
            fn add(self, rhs: Tensor) -> Result<Tensor> { self + &rhs }
        }
        impl Sub<Tensor> for $s {
            type Output = Result<Tensor>;
            fn sub(self, rhs: Tensor) -> Result<Tensor> { self - &rhs }
        }
        impl Mul<Tensor> for $s {
            type Output = Result<Tensor>;
            fn mul(self, rhs: Tensor) -> Result<Tensor> { self * &rhs }
        }
        impl Div<Tensor> for $s {
            type Output = Result<Tensor>;
            fn div(self, rhs: Tensor) -> Result<Tensor> { self / &rhs }
        }
    )*};
}
left_scalar_operators!(f64);

impl Neg for &Tensor {
    type Output = Result<Tensor>;
    fn neg(self) -> Result<Tensor> {
        Tensor::neg(self)
    }
}
impl Neg for Tensor {
    type Output = Result<Tensor>;
    fn neg(self) -> Result<Tensor> {
        Tensor::neg(&self)
    }
}

//! `+ - * /` and unary `-` on vars, as on tensors: every operator returns
//! `Result<Var>`; var-var operators also take a `Result<Var>` on either side.

use crate::Var;
use aigc_tensor::Result;
use std::ops::{Add, Div, Mul, Neg, Sub};

macro_rules! var_operator {
    ($trait:ident, $method:ident) => {
        var_operator!(@one $trait, $method, &Var, &Var, |a, b| Var::$method(a, b));
        var_operator!(@one $trait, $method, &Var, Var, |a, b| Var::$method(a, &b));
        var_operator!(@one $trait, $method, Var, &Var, |a, b| Var::$method(&a, b));
        var_operator!(@one $trait, $method, Var, Var, |a, b| Var::$method(&a, &b));
        var_operator!(@one $trait, $method, Result<Var>, &Var, |a, b| Var::$method(&a?, b));
        var_operator!(@one $trait, $method, Result<Var>, Var, |a, b| Var::$method(&a?, &b));
        var_operator!(@one $trait, $method, &Var, Result<Var>, |a, b| Var::$method(a, &b?));
        var_operator!(@one $trait, $method, Var, Result<Var>, |a, b| Var::$method(&a, &b?));
    };
    (@one $trait:ident, $method:ident, $lhs:ty, $rhs:ty, |$a:ident, $b:ident| $body:expr) => {
        impl $trait<$rhs> for $lhs {
            type Output = Result<Var>;
            fn $method(self, rhs: $rhs) -> Result<Var> {
                let ($a, $b) = (self, rhs);
                $body
            }
        }
    };
}
var_operator!(Add, add);
var_operator!(Sub, sub);
var_operator!(Mul, mul);
var_operator!(Div, div);

macro_rules! scalar_operator {
    ($($lhs:ty),*) => {$(
        impl Add<f64> for $lhs {
            type Output = Result<Var>;
            fn add(self, rhs: f64) -> Result<Var> { self.affine(1.0, rhs) }
        }
        impl Sub<f64> for $lhs {
            type Output = Result<Var>;
            fn sub(self, rhs: f64) -> Result<Var> { self.affine(1.0, -rhs) }
        }
        impl Mul<f64> for $lhs {
            type Output = Result<Var>;
            fn mul(self, rhs: f64) -> Result<Var> { self.affine(rhs, 0.0) }
        }
        impl Div<f64> for $lhs {
            type Output = Result<Var>;
            fn div(self, rhs: f64) -> Result<Var> { self.affine(1.0 / rhs, 0.0) }
        }
        impl Neg for $lhs {
            type Output = Result<Var>;
            fn neg(self) -> Result<Var> { Var::neg(&self) }
        }
    )*};
}
scalar_operator!(&Var, Var);

impl Sub<&Var> for f64 {
    type Output = Result<Var>;
    fn sub(self, rhs: &Var) -> Result<Var> {
        rhs.affine(-1.0, self)
    }
}
impl Mul<&Var> for f64 {
    type Output = Result<Var>;
    fn mul(self, rhs: &Var) -> Result<Var> {
        rhs.affine(self, 0.0)
    }
}
impl Add<&Var> for f64 {
    type Output = Result<Var>;
    fn add(self, rhs: &Var) -> Result<Var> {
        rhs.affine(1.0, self)
    }
}

//! Elementwise functions of one value, declared once in [`unary_ops!`]: the enum, the
//! scalar definition (`UnaryOp::apply`, also the reference the tests and the SIMD
//! kernels are checked against) and the buffer kernel all come from that one list.
//!
//! Float dtypes compute in their accumulator type (f32 for f32/f16/bf16, f64 for f64).
//! Integer dtypes support the ops that are exact on integers (see [`UnaryOp::is_integral`]).

use super::map::map;
use crate::{Element, FloatElem, Layout, Real};

macro_rules! unary_ops {
    ($(
        $(#[$doc:meta])*
        $name:ident $({ $($p:ident),* })? => |$x:ident| $body:expr;
    )*) => {
        /// An elementwise function of one value. Parameterised ops carry their scalars.
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub enum UnaryOp {
            $( $(#[$doc])* $name $({ $($p: f64),* })?, )*
        }

        impl UnaryOp {
            /// The op's name as error messages and anomaly reports print it.
            pub fn name(self) -> &'static str {
                match self { $( Self::$name { .. } => stringify!($name), )* }
            }

            /// The op on one value: the definition every kernel must agree with.
            #[allow(unused_variables, clippy::redundant_locals)]
            pub fn apply<R: Real>(self, value: R) -> R {
                match self {
                    $( Self::$name $({ $($p),* })? => {
                        $( $( let $p = R::from_f64($p); )* )?
                        let $x = value;
                        $body
                    } )*
                }
            }
        }

        /// Applies `op` to every element of a strided float buffer.
        pub fn unary_float<T: FloatElem>(op: UnaryOp, src: &[T], layout: &Layout) -> Vec<T> {
            match op {
                $( UnaryOp::$name $({ $($p),* })? => {
                    $( $( let $p = <T::Acc as Element>::from_f64($p); )* )?
                    map(src, layout, |v: T| {
                        let $x = v.to_acc();
                        T::from_acc($body)
                    })
                } )*
            }
        }
    };
}

fn sigmoid<R: Real>(x: R) -> R {
    // Two branches so that neither exp overflows.
    if x >= R::zero() {
        R::one() / (R::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (R::one() + e)
    }
}

fn softplus<R: Real>(x: R) -> R {
    // log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), stable for large |x|.
    x.max(R::zero()) + (-x.abs()).exp().ln_1p()
}

fn sign<R: Real>(x: R) -> R {
    if x > R::zero() {
        R::one()
    } else if x < R::zero() {
        -R::one()
    } else {
        x
    }
}

fn recip<R: Real>(x: R) -> R {
    R::one() / x
}

fn relu<R: Real>(x: R) -> R {
    if x > R::zero() || x.is_nan() { x } else { R::zero() }
}

fn leaky_relu<R: Real>(x: R, slope: R) -> R {
    if x >= R::zero() { x } else { slope * x }
}

fn gelu_erf<R: Real>(x: R) -> R {
    R::from_f64(0.5) * x * (R::one() + (x * R::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

fn gelu_tanh<R: Real>(x: R) -> R {
    let c = R::from_f64((2.0 / std::f64::consts::PI).sqrt());
    let half = R::from_f64(0.5);
    half * x * (R::one() + (c * (x + R::from_f64(0.044715) * x * x * x)).tanh())
}

unary_ops! {
    /// `-x`
    Neg => |x| -x;
    /// `|x|`
    Abs => |x| x.abs();
    /// -1, 0 or 1 (NaN stays NaN)
    Sign => |x| sign(x);
    /// `e^x`
    Exp => |x| x.exp();
    /// natural logarithm
    Log => |x| x.ln();
    /// `log(1 + x)`, accurate near 0
    Log1p => |x| x.ln_1p();
    /// square root
    Sqrt => |x| x.sqrt();
    /// `1 / sqrt(x)`
    Rsqrt => |x| recip(x.sqrt());
    /// `x * x`
    Square => |x| x * x;
    /// `1 / x`
    Recip => |x| recip(x);
    /// sine
    Sin => |x| x.sin();
    /// cosine
    Cos => |x| x.cos();
    /// hyperbolic tangent
    Tanh => |x| x.tanh();
    /// `1 / (1 + e^-x)`
    Sigmoid => |x| sigmoid(x);
    /// `max(x, 0)`
    Relu => |x| relu(x);
    /// GELU, exact form `x * Phi(x) = x/2 (1 + erf(x / sqrt 2))` (Hendrycks & Gimpel 2016)
    Gelu => |x| gelu_erf(x);
    /// GELU, tanh approximation (as in GPT-2)
    GeluTanh => |x| gelu_tanh(x);
    /// SiLU / swish: `x * sigmoid(x)`
    Silu => |x| x * sigmoid(x);
    /// `log(1 + e^x)`
    Softplus => |x| softplus(x);
    /// the error function
    Erf => |x| x.erf();
    /// round down
    Floor => |x| x.floor();
    /// round up
    Ceil => |x| x.ceil();
    /// round half to even
    Round => |x| x.round();
    /// `x^exponent`
    Powf { exponent } => |x| x.powf(exponent);
    /// `x * mul + add`: every tensor-scalar `+ - * /` lowers to this
    Affine { mul, add } => |x| x * mul + add;
    /// `min(max(x, min), max)`
    Clamp { min, max } => |x| if x.is_nan() { x } else { x.max(min).min(max) };
    /// `x` if positive, else `slope * x`
    LeakyRelu { slope } => |x| leaky_relu(x, slope);
}

impl UnaryOp {
    /// Whether the op maps integers to integers exactly, so that it applies to i64/u8.
    pub fn is_integral(self) -> bool {
        match self {
            Self::Neg | Self::Abs | Self::Sign | Self::Square | Self::Relu | Self::Clamp { .. } => true,
            Self::Affine { mul, add } => mul.fract() == 0.0 && add.fract() == 0.0,
            _ => false,
        }
    }
}

/// Applies an integral op (see [`UnaryOp::is_integral`]) to an integer buffer.
/// The caller checks `op.is_integral()`. Values are exact below 2^53 in magnitude.
pub fn unary_int<T: Element>(op: UnaryOp, src: &[T], layout: &Layout) -> Vec<T> {
    debug_assert!(op.is_integral());
    map(src, layout, |v: T| T::from_f64(op.apply(v.to_f64())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameterised_ops_use_their_scalars() {
        assert_eq!(UnaryOp::Affine { mul: 2.0, add: 1.0 }.apply(3.0f64), 7.0);
        assert_eq!(UnaryOp::Clamp { min: -1.0, max: 1.0 }.apply(5.0f32), 1.0);
        assert_eq!(UnaryOp::LeakyRelu { slope: 0.1 }.apply(-2.0f64), -0.2);
        assert_eq!(UnaryOp::Powf { exponent: 3.0 }.apply(2.0f64), 8.0);
        assert_eq!(UnaryOp::Affine { mul: 1.0, add: 0.0 }.name(), "Affine");
    }

    #[test]
    fn sigmoid_and_softplus_do_not_overflow() {
        assert_eq!(UnaryOp::Sigmoid.apply(-1000.0f32), 0.0);
        assert_eq!(UnaryOp::Sigmoid.apply(1000.0f32), 1.0);
        assert_eq!(UnaryOp::Softplus.apply(1000.0f32), 1000.0);
        assert!(UnaryOp::Softplus.apply(-1000.0f32) >= 0.0);
    }

    #[test]
    fn kernel_agrees_with_apply_on_a_strided_view() {
        let src: Vec<f32> = (0..12).map(|i| i as f32 * 0.3 - 1.5).collect();
        let layout = Layout::contiguous(&[3, 4]).permute(&[1, 0]);
        let out = unary_float(UnaryOp::GeluTanh, &src, &layout);
        let mut want = vec![];
        crate::layout::for_each_offset(&layout, |o| want.push(UnaryOp::GeluTanh.apply(src[o])));
        assert_eq!(out, want);
    }
}

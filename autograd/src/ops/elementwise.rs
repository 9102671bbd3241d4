//! Differentiable elementwise ops. Each rule is the textbook derivative, applied to the
//! incoming gradient `g`; broadcasting is undone by the tape (`Var::sum_to`).

use crate::{Var, mode};
use aigc_tensor::{Error, Result, Tensor, UnaryOp};
use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI, PI};

/// `sqrt(2/pi)` and the cubic coefficient of the tanh GELU.
const GELU_C: f64 = 0.797_884_560_802_865_4;
const GELU_A: f64 = 0.044715;

impl Var {
    /// `self` where `mask` is non-zero, 0 elsewhere (the mask is a constant).
    pub fn masked(&self, mask: &Tensor) -> Result<Var> {
        self.where_cond(mask, &self.zeros_like()?)
    }

    /// Elementwise select: `self` where `mask` is non-zero, else `other`; broadcasts.
    pub fn where_cond(&self, mask: &Tensor, other: &Var) -> Result<Var> {
        let value = mask.where_cond(self.value(), other.value())?;
        let mask = mask.clone();
        self.binary_op(other, "where_cond", value, move |_, g, _, _| {
            let zero = g.zeros_like()?;
            Ok((g.where_cond(&mask, &zero)?, zero.where_cond(&mask, g)?))
        })
    }

    /// The differentiable form of an elementwise [`UnaryOp`] (`x.apply(UnaryOp::Gelu)` is
    /// `x.gelu()`), for code that carries the op as a value, like a fused layer's
    /// activation. The rounding ops (`Sign`, `Floor`, `Ceil`, `Round`), whose derivative is
    /// zero almost everywhere, are an error: detach the input if that is what you mean.
    pub fn apply(&self, op: UnaryOp) -> Result<Var> {
        match op {
            UnaryOp::Neg => self.neg(),
            UnaryOp::Abs => self.abs(),
            UnaryOp::Exp => self.exp(),
            UnaryOp::Log => self.log(),
            UnaryOp::Log1p => self.log1p(),
            UnaryOp::Sqrt => self.sqrt(),
            UnaryOp::Rsqrt => self.rsqrt(),
            UnaryOp::Square => self.square(),
            UnaryOp::Recip => self.recip(),
            UnaryOp::Sin => self.sin(),
            UnaryOp::Cos => self.cos(),
            UnaryOp::Tanh => self.tanh(),
            UnaryOp::Sigmoid => self.sigmoid(),
            UnaryOp::Relu => self.relu(),
            UnaryOp::Gelu => self.gelu(),
            UnaryOp::GeluTanh => self.gelu_tanh(),
            UnaryOp::Silu => self.silu(),
            UnaryOp::Softplus => self.softplus(),
            UnaryOp::Erf => self.erf(),
            UnaryOp::Powf { exponent } => self.powf(exponent),
            UnaryOp::Affine { mul, add } => self.affine(mul, add),
            UnaryOp::Clamp { min, max } => self.clamp(min, max),
            UnaryOp::LeakyRelu { slope } => self.leaky_relu(slope),
            UnaryOp::Sign | UnaryOp::Floor | UnaryOp::Ceil | UnaryOp::Round => Err(Error::invalid(
                "apply",
                format!("{} has no useful gradient (zero almost everywhere); apply it to a detached value", op.name()),
            )),
        }
    }

    pub fn neg(&self) -> Result<Var> {
        self.unary_op("neg", self.value().neg()?, |_, g, _| g.neg())
    }
    pub fn abs(&self) -> Result<Var> {
        self.unary_op("abs", self.value().abs()?, |_, g, x| g.mul(&Var::constant(x.value().sign()?)))
    }
    pub fn exp(&self) -> Result<Var> {
        self.unary_op("exp", self.value().exp()?, |y, g, _| g.mul(y))
    }
    pub fn log(&self) -> Result<Var> {
        self.unary_op("log", self.value().log()?, |_, g, x| g.div(x))
    }
    pub fn log1p(&self) -> Result<Var> {
        self.unary_op("log1p", self.value().log1p()?, |_, g, x| g.div(&x.affine(1.0, 1.0)?))
    }
    pub fn sqrt(&self) -> Result<Var> {
        self.unary_op("sqrt", self.value().sqrt()?, |y, g, _| g.div(&y.affine(2.0, 0.0)?))
    }
    /// `1/sqrt(x)`; d/dx = `-0.5 x^(-3/2)`.
    pub fn rsqrt(&self) -> Result<Var> {
        self.unary_op("rsqrt", self.value().rsqrt()?, |y, g, _| g.mul(&y.powf(3.0)?.affine(-0.5, 0.0)?))
    }
    pub fn square(&self) -> Result<Var> {
        self.unary_op("square", self.value().square()?, |_, g, x| g.mul(&x.affine(2.0, 0.0)?))
    }
    pub fn recip(&self) -> Result<Var> {
        self.unary_op("recip", self.value().recip()?, |y, g, _| g.mul(&y.square()?)?.neg())
    }
    pub fn sin(&self) -> Result<Var> {
        self.unary_op("sin", self.value().sin()?, |_, g, x| g.mul(&x.cos()?))
    }
    pub fn cos(&self) -> Result<Var> {
        self.unary_op("cos", self.value().cos()?, |_, g, x| g.mul(&x.sin()?)?.neg())
    }
    /// d/dx tanh = `1 - tanh^2`.
    pub fn tanh(&self) -> Result<Var> {
        self.unary_op("tanh", self.value().tanh()?, |y, g, _| g.mul(&y.square()?.affine(-1.0, 1.0)?))
    }
    /// d/dx sigmoid = `s (1 - s)`.
    pub fn sigmoid(&self) -> Result<Var> {
        self.unary_op("sigmoid", self.value().sigmoid()?, |y, g, _| g.mul(&y.mul(&y.affine(-1.0, 1.0)?)?))
    }
    pub fn relu(&self) -> Result<Var> {
        self.unary_op("relu", self.value().relu()?, |_, g, x| g.masked(&x.value().gt(0.0)?))
    }
    /// `x` where `x >= 0`, `slope * x` elsewhere.
    pub fn leaky_relu(&self, slope: f64) -> Result<Var> {
        self.unary_op("leaky_relu", self.value().leaky_relu(slope)?, move |_, g, x| {
            g.where_cond(&x.value().ge(0.0)?, &g.affine(slope, 0.0)?)
        })
    }
    /// GELU, exact: d/dx `x Phi(x)` = `Phi(x) + x phi(x)`.
    pub fn gelu(&self) -> Result<Var> {
        self.unary_op("gelu", self.value().gelu()?, |_, g, x| {
            if !mode::is_grad_enabled() {
                return Ok(Var::constant(x.value().gelu_backward(g.value())?));
            }
            let cdf = x.affine(FRAC_1_SQRT_2, 0.0)?.erf()?.affine(0.5, 0.5)?;
            let pdf = x.square()?.affine(-0.5, 0.0)?.exp()?.affine(1.0 / (2.0 * PI).sqrt(), 0.0)?;
            g.mul(&cdf.add(&x.mul(&pdf)?)?)
        })
    }
    /// GELU, tanh form: with `u = c (x + a x^3)`, `t = tanh u`:
    /// d/dx = `(1 + t)/2 + x (1 - t^2) c (1 + 3 a x^2) / 2`.
    pub fn gelu_tanh(&self) -> Result<Var> {
        self.unary_op("gelu_tanh", self.value().gelu_tanh()?, |_, g, x| {
            if !mode::is_grad_enabled() {
                return Ok(Var::constant(x.value().gelu_tanh_backward(g.value())?));
            }
            let x2 = x.square()?;
            let t = x.mul(&x2.affine(GELU_A, 1.0)?)?.affine(GELU_C, 0.0)?.tanh()?;
            let left = t.affine(0.5, 0.5)?;
            let right =
                x.mul(&t.square()?.affine(-1.0, 1.0)?)?.mul(&x2.affine(3.0 * GELU_A * GELU_C * 0.5, GELU_C * 0.5)?)?;
            g.mul(&left.add(&right)?)
        })
    }
    /// SiLU: d/dx `x s(x)` = `s (1 + x (1 - s))`.
    pub fn silu(&self) -> Result<Var> {
        self.unary_op("silu", self.value().silu()?, |_, g, x| {
            if !mode::is_grad_enabled() {
                return Ok(Var::constant(x.value().silu_backward(g.value())?));
            }
            let s = x.sigmoid()?;
            g.mul(&s.mul(&x.mul(&s.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)?)
        })
    }
    /// d/dx softplus = `sigmoid(x)`.
    pub fn softplus(&self) -> Result<Var> {
        self.unary_op("softplus", self.value().softplus()?, |_, g, x| g.mul(&x.sigmoid()?))
    }
    /// d/dx erf = `2/sqrt(pi) e^(-x^2)`.
    pub fn erf(&self) -> Result<Var> {
        self.unary_op("erf", self.value().erf()?, |_, g, x| {
            g.mul(&x.square()?.neg()?.exp()?.affine(FRAC_2_SQRT_PI, 0.0)?)
        })
    }
    /// `x^e` for a constant exponent.
    pub fn powf(&self, e: f64) -> Result<Var> {
        self.unary_op("powf", self.value().powf(e)?, move |_, g, x| g.mul(&x.powf(e - 1.0)?.affine(e, 0.0)?))
    }
    /// `x * mul + add`.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Var> {
        self.unary_op("affine", self.value().affine(mul, add)?, move |_, g, _| g.affine(mul, 0.0))
    }
    /// Limits to `[min, max]`; the gradient passes where the input was inside.
    pub fn clamp(&self, min: f64, max: f64) -> Result<Var> {
        self.unary_op("clamp", self.value().clamp(min, max)?, move |_, g, x| {
            let inside = x.value().ge(min)?.mul(&x.value().le(max)?)?;
            g.masked(&inside)
        })
    }

    pub fn add(&self, rhs: &Var) -> Result<Var> {
        self.binary_op(rhs, "add", self.value().add(rhs.value())?, |_, g, _, _| Ok((g.clone(), g.clone())))
    }
    pub fn sub(&self, rhs: &Var) -> Result<Var> {
        self.binary_op(rhs, "sub", self.value().sub(rhs.value())?, |_, g, _, _| Ok((g.clone(), g.neg()?)))
    }
    pub fn mul(&self, rhs: &Var) -> Result<Var> {
        self.binary_op(rhs, "mul", self.value().mul(rhs.value())?, |_, g, a, b| Ok((g.mul(b)?, g.mul(a)?)))
    }
    /// d/da = `1/b`, d/db = `-a/b^2`.
    pub fn div(&self, rhs: &Var) -> Result<Var> {
        self.binary_op(rhs, "div", self.value().div(rhs.value())?, |_, g, a, b| {
            let ga = g.div(b)?;
            Ok((ga.clone(), ga.mul(a)?.div(b)?.neg()?))
        })
    }
    /// `a^b`: d/da = `b a^(b-1)`, d/db = `a^b ln a`.
    pub fn pow(&self, rhs: &Var) -> Result<Var> {
        self.binary_op(rhs, "pow", self.value().pow(rhs.value())?, |y, g, a, b| {
            let ga = g.mul(&b.mul(&a.pow(&b.affine(1.0, -1.0)?)?)?)?;
            Ok((ga, g.mul(&y.mul(&a.log()?)?)?))
        })
    }
    /// Elementwise max; on ties the gradient is split evenly (as PyTorch).
    pub fn maximum(&self, rhs: &Var) -> Result<Var> {
        self.extremum(rhs, "maximum", self.value().maximum(rhs.value())?)
    }
    /// Elementwise min; on ties the gradient is split evenly.
    pub fn minimum(&self, rhs: &Var) -> Result<Var> {
        self.extremum(rhs, "minimum", self.value().minimum(rhs.value())?)
    }
    fn extremum(&self, rhs: &Var, op: &'static str, value: Tensor) -> Result<Var> {
        self.binary_op(rhs, op, value, |y, g, a, b| {
            let dtype = g.dtype();
            let share = |x: &Var| -> Result<Var> {
                let picked = x.value().eq(y.value())?.to_dtype(dtype)?;
                let tie = a.value().eq(b.value())?.to_dtype(dtype)?;
                g.mul(&Var::constant(picked.sub(&tie.affine(0.5, 0.0)?)?))
            };
            Ok((share(a)?, share(b)?))
        })
    }

    /// `self + w (end - self)`.
    pub fn lerp(&self, end: &Var, w: &Var) -> Result<Var> {
        self.add(&end.sub(self)?.mul(w)?)
    }
}

#[cfg(test)]
mod tests {
    use crate::Var;
    use crate::gradcheck::{gradcheck, gradgradcheck};
    use crate::testing::inputs;
    use aigc_tensor::Result;
    use proptest::prelude::*;

    type Unary = fn(&Var) -> Result<Var>;

    #[test]
    fn apply_records_the_same_op_as_the_named_method() {
        use aigc_tensor::UnaryOp;
        let x = inputs::seeded(&[7], 3).abs().unwrap().affine(1.0, 0.1).unwrap();
        type Method = fn(&Var) -> Result<Var>;
        let cases: [(UnaryOp, Method); 4] = [
            (UnaryOp::Gelu, Var::gelu),
            (UnaryOp::Log, Var::log),
            (UnaryOp::Silu, Var::silu),
            (UnaryOp::Rsqrt, Var::rsqrt),
        ];
        for (op, method) in cases {
            let v = Var::leaf(x.clone());
            let (a, b) = (v.apply(op).unwrap(), method(&v).unwrap());
            assert_eq!(a.op_name(), b.op_name());
            assert_eq!(a.value().to_vec::<f64>().unwrap(), b.value().to_vec::<f64>().unwrap());
        }
        gradcheck(|v| v[0].apply(UnaryOp::Clamp { min: 0.2, max: 0.9 }), &[&x], "apply clamp").unwrap();
        let err = Var::leaf(x).apply(UnaryOp::Floor).unwrap_err().to_string();
        assert!(err.contains("Floor has no useful gradient"), "{err}");
    }

    #[test]
    fn fused_activation_gradients_equal_the_composed_create_graph_ones() {
        // Plain gradients come from the fused `*_backward` kernels (the f32 SIMD path
        // here), those of `create_graph` from composed ops.
        use aigc_tensor::DType;
        let x = Var::leaf(inputs::seeded(&[7, 150], 1).affine(3.0, 0.0).unwrap().to_dtype(DType::F32).unwrap());
        let seed = Var::constant(inputs::seeded(&[7, 150], 2).to_dtype(DType::F32).unwrap());
        let ops: [(&str, Unary); 3] =
            [("gelu", |x| x.gelu()), ("gelu_tanh", |x| x.gelu_tanh()), ("silu", |x| x.silu())];
        for (name, f) in ops {
            let loss = || f(&x).unwrap().mul(&seed).unwrap().sum_all().unwrap();
            let plain = crate::grad(&[&loss()], &[&x], false).unwrap()[0].value().to_f64_vec().unwrap();
            let composed = crate::grad(&[&loss()], &[&x], true).unwrap()[0].value().to_f64_vec().unwrap();
            for (p, c) in plain.iter().zip(&composed) {
                assert!((p - c).abs() <= 2e-6 * (1.0 + c.abs()), "{name}: fused {p} vs composed {c}");
            }
        }
    }

    const UNARY: &[(&str, Unary, bool)] = &[
        // (name, op, needs a positive input)
        ("neg", |x| x.neg(), false),
        ("abs", |x| x.abs(), false),
        ("exp", |x| x.exp(), false),
        ("log", |x| x.log(), true),
        ("log1p", |x| x.log1p(), true),
        ("sqrt", |x| x.sqrt(), true),
        ("rsqrt", |x| x.rsqrt(), true),
        ("square", |x| x.square(), false),
        ("recip", |x| x.recip(), true),
        ("sin", |x| x.sin(), false),
        ("cos", |x| x.cos(), false),
        ("tanh", |x| x.tanh(), false),
        ("sigmoid", |x| x.sigmoid(), false),
        ("relu", |x| x.relu(), false),
        ("leaky_relu", |x| x.leaky_relu(0.1), false),
        ("gelu", |x| x.gelu(), false),
        ("gelu_tanh", |x| x.gelu_tanh(), false),
        ("silu", |x| x.silu(), false),
        ("softplus", |x| x.softplus(), false),
        ("erf", |x| x.erf(), false),
        ("powf", |x| x.powf(2.5), true),
        ("affine", |x| x.affine(-1.5, 0.5), false),
        ("clamp", |x| x.clamp(-0.7, 0.9), false),
    ];

    type Binary = fn(&Var, &Var) -> Result<Var>;
    const BINARY: &[(&str, Binary)] = &[
        ("add", |a, b| a.add(b)),
        ("sub", |a, b| a.sub(b)),
        ("mul", |a, b| a.mul(b)),
        ("div", |a, b| a.div(b)),
        ("pow", |a, b| a.abs()?.affine(1.0, 0.5)?.pow(b)),
        ("maximum", |a, b| a.maximum(b)),
        ("minimum", |a, b| a.minimum(b)),
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn unary_grads_match_finite_differences(x in inputs::strided(3, 4), k in 0..UNARY.len()) {
            let (name, op, positive) = UNARY[k];
            let x = if positive { x.abs().unwrap().affine(1.0, 0.2).unwrap() } else { inputs::away_from_kinks(&x) };
            gradcheck(|v| op(&v[0]), &[&x], name).unwrap();
        }

        #[test]
        fn binary_grads_match_finite_differences_with_broadcasting((a, b) in inputs::broadcast_pair(3, 3), k in 0..BINARY.len()) {
            let (name, op) = BINARY[k];
            let b = if name == "div" { b.abs().unwrap().affine(1.0, 0.5).unwrap() } else { b };
            let (a, b) = if name.ends_with("imum") { inputs::distinct(&a, &b) } else { (a, b) };
            gradcheck(|v| op(&v[0], &v[1]), &[&a, &b], name).unwrap();
        }
    }

    #[test]
    fn second_derivatives_match_finite_differences() {
        let x = inputs::seeded(&[2, 3], 1);
        let y = inputs::seeded(&[2, 3], 2);
        for (name, op, positive) in UNARY.iter().copied() {
            if ["relu", "leaky_relu", "abs", "clamp"].contains(&name) {
                continue; // piecewise linear: the second derivative is 0 almost everywhere
            }
            let x = if positive { x.abs().unwrap().affine(1.0, 0.5).unwrap() } else { x.clone() };
            gradgradcheck(|v| op(&v[0]), &[&x], name).unwrap();
        }
        gradgradcheck(|v| v[0].mul(&v[1]), &[&x, &y], "mul").unwrap();
        gradgradcheck(|v| v[0].div(&v[1].abs()?.affine(1.0, 1.0)?), &[&x, &y], "div").unwrap();
        gradgradcheck(|v| v[0].leaky_relu(0.2)?.square(), &[&x], "leaky_relu").unwrap();
    }

    #[test]
    fn maximum_splits_ties_evenly() {
        let a = Var::leaf(aigc_tensor::Tensor::new(&[1.0f64, 2.0], &aigc_tensor::Device::Cpu).unwrap());
        let b = Var::leaf(aigc_tensor::Tensor::new(&[1.0f64, 3.0], &aigc_tensor::Device::Cpu).unwrap());
        a.maximum(&b).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(a.grad().unwrap().to_vec::<f64>().unwrap(), vec![0.5, 0.0]);
        assert_eq!(b.grad().unwrap().to_vec::<f64>().unwrap(), vec![0.5, 1.0]);
    }
}

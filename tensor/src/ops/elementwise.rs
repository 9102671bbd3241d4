//! Elementwise ops: unary math, binary arithmetic with numpy broadcasting, comparisons
//! (u8 masks) and `where_cond`. The methods are generated from one list each; the math
//! itself is declared once in `aigc_kernels::cpu::{unary, binary}`.

use crate::shape::broadcast_shapes;
use crate::storage::{CpuStorage, map_float, zip_any, zip_float};
use crate::{DType, Error, Result, Tensor};
use aigc_kernels::Element;
use aigc_kernels::cpu::binary::{self, BinaryOp, CmpOp};
use aigc_kernels::cpu::{map, unary, unary::UnaryOp};
use std::borrow::Cow;

/// A right-hand operand: a tensor (borrowed or owned), or a plain number.
pub enum OperandValue<'a> {
    Tensor(Cow<'a, Tensor>),
    Scalar(f64),
}

/// Anything usable as an operand: `&Tensor`, `Tensor`, or a number. A number takes the
/// other operand's dtype and device: arithmetic on a float tensor reads it as a repeated
/// value, other ops as a 0-d tensor. A borrowed tensor stays borrowed: an op on small
/// tensors should not pay for copying their handles.
pub trait Operand<'a> {
    fn into_value(self) -> OperandValue<'a>;

    /// The operand as a tensor; a scalar takes `like`'s dtype and device.
    fn into_operand(self, like: &Tensor) -> Result<Cow<'a, Tensor>>
    where
        Self: Sized,
    {
        match self.into_value() {
            OperandValue::Tensor(t) => Ok(t),
            OperandValue::Scalar(v) => Ok(Cow::Owned(Tensor::full(v, (), like.dtype(), &like.device())?)),
        }
    }
}
impl<'a> Operand<'a> for &'a Tensor {
    fn into_value(self) -> OperandValue<'a> {
        OperandValue::Tensor(Cow::Borrowed(self))
    }
}
impl Operand<'static> for Tensor {
    fn into_value(self) -> OperandValue<'static> {
        OperandValue::Tensor(Cow::Owned(self))
    }
}
impl<'a> Operand<'a> for OperandValue<'a> {
    fn into_value(self) -> OperandValue<'a> {
        self
    }
}
macro_rules! scalar_operand {
    ($($t:ty),*) => {$(
        impl Operand<'static> for $t {
            fn into_value(self) -> OperandValue<'static> {
                OperandValue::Scalar(self as f64)
            }
        }
    )*};
}
scalar_operand!(f64, f32, i64, i32, usize);

impl Tensor {
    /// Applies an elementwise [`UnaryOp`]. `name` is the op's name in error messages.
    pub fn unary(&self, op: UnaryOp, name: &'static str) -> Result<Tensor> {
        let out = self.read_cpu(|s, l| {
            Ok(match s {
                CpuStorage::I64(b) if op.is_integral() => CpuStorage::I64(unary::unary_int(op, b, l)),
                CpuStorage::U8(b) if op.is_integral() => CpuStorage::U8(unary::unary_int(op, b, l)),
                s => map_float!(name, s, |b| unary::unary_float(op, b, l)),
            })
        })?;
        Ok(Tensor::from_cpu(out, self.dims()))
    }

    /// Broadcasts two tensors to their common shape (views, no copies; the tensors
    /// themselves when their shapes already agree).
    pub fn broadcast_pair<'a>(
        &'a self,
        rhs: &'a Tensor,
        op: &'static str,
    ) -> Result<(Cow<'a, Tensor>, Cow<'a, Tensor>)> {
        if self.dims() == rhs.dims() {
            return Ok((Cow::Borrowed(self), Cow::Borrowed(rhs)));
        }
        let shape = broadcast_shapes(op, self.dims(), rhs.dims())?;
        let view = |t: &Tensor| Cow::Owned(t.with_layout(t.layout().broadcast_to(&shape)));
        Ok((view(self), view(rhs)))
    }

    /// Applies an elementwise [`BinaryOp`] with numpy broadcasting. Both operands must
    /// have the same dtype (there is no implicit promotion).
    pub fn binary<'a>(&self, rhs: impl Operand<'a>, op: BinaryOp, name: &'static str) -> Result<Tensor> {
        let rhs = match rhs.into_value() {
            // A number operand of a float tensor is read as a repeated value, not made
            // into a tensor (the same result, at a fraction of the cost on small tensors).
            OperandValue::Scalar(value) if self.dtype().is_float() => {
                let out = self.read_cpu(|s, l| {
                    Ok(map_float!(name, s, |x| binary::binary_float_scalar(op, x, l, Element::from_f64(value))))
                })?;
                return Ok(Tensor::from_cpu(out, self.dims()));
            }
            value => value.into_operand(self)?,
        };
        self.same_device(&rhs, name)?;
        self.same_dtype(&rhs, name)?;
        if self.dims() == rhs.dims() {
            return self.binary_same_shape(&rhs, op, name);
        }
        let (a, b) = self.broadcast_pair(&rhs, name)?;
        a.binary_same_shape(&b, op, name)
    }

    /// [`Tensor::binary`] of two tensors of this shape on one device, of one dtype.
    fn binary_same_shape(&self, rhs: &Tensor, op: BinaryOp, name: &'static str) -> Result<Tensor> {
        let out = self.read_cpu2(rhs, name, |sa, la, sb, lb| {
            Ok(match (sa, sb) {
                (CpuStorage::I64(x), CpuStorage::I64(y)) if op.is_integral() => {
                    CpuStorage::I64(binary::binary_i64(op, x, la, y, lb))
                }
                (CpuStorage::U8(x), CpuStorage::U8(y)) if op.is_integral() => {
                    CpuStorage::U8(binary::binary_u8(op, x, la, y, lb))
                }
                (sa, sb) => zip_float!(name, sa, sb, |x, y| binary::binary_float(op, x, la, y, lb)),
            })
        })?;
        Ok(Tensor::from_cpu(out, self.dims()))
    }

    /// Compares elementwise with broadcasting; returns a u8 mask (1 where true).
    pub fn compare<'a>(&self, rhs: impl Operand<'a>, op: CmpOp) -> Result<Tensor> {
        let rhs = rhs.into_operand(self)?;
        let name = op.name();
        self.same_device(&rhs, name)?;
        let (a, b) = self.broadcast_pair(&rhs, name)?;
        let out = a.read_cpu2(&b, name, |sa, la, sb, lb| {
            Ok(zip_any!(name, sa, sb, |x, y| binary::compare(op, x, la, y, lb)))
        })?;
        Ok(Tensor::from_cpu(CpuStorage::U8(out), a.dims()))
    }

    /// `on_true` where this mask is non-zero, else `on_false`; all three broadcast. A
    /// scalar branch takes the other branch's dtype (f32 when both are scalars).
    pub fn where_cond<'t, 'f>(&self, on_true: impl Operand<'t>, on_false: impl Operand<'f>) -> Result<Tensor> {
        let (on_true, on_false) = match (on_true.into_value(), on_false.into_value()) {
            (OperandValue::Tensor(t), f) => {
                let f = f.into_operand(&t)?;
                (t, f)
            }
            (t, OperandValue::Tensor(f)) => (t.into_operand(&f)?, f),
            (t, f) => {
                let like = Tensor::zeros((), DType::F32, &self.device())?;
                (t.into_operand(&like)?, f.into_operand(&like)?)
            }
        };
        on_true.same_dtype(&on_false, "where_cond")?;
        self.same_device(&on_true, "where_cond")?;
        self.same_device(&on_false, "where_cond")?;
        let shape = broadcast_shapes("where_cond", self.dims(), on_true.dims())?;
        let shape = broadcast_shapes("where_cond", &shape, on_false.dims())?;
        let (c, t, f) =
            (self.broadcast_to(&shape[..])?, on_true.broadcast_to(&shape[..])?, on_false.broadcast_to(&shape[..])?);
        let out = Tensor::read_cpu_all(&[&c, &t, &f], |views| {
            let &[(sc, lc), (st, lt), (sf, lf)] = views else { unreachable!("three operands") };
            Ok(crate::storage::with_any!(sc, |cb| zip_any!("where_cond", st, sf, |x, y| {
                let v = map::select(cb, lc, x, lt, y, lf);
                <_ as crate::WithDType>::into_storage(v)
            })))
        })?;
        Ok(Tensor::from_cpu(out, &shape))
    }
}

macro_rules! unary_methods {
    ($( $(#[$doc:meta])* $method:ident => $op:ident ),* $(,)?) => {
        impl Tensor {
            $( $(#[$doc])* pub fn $method(&self) -> Result<Tensor> { self.unary(UnaryOp::$op, stringify!($method)) } )*
        }
    };
}

unary_methods! {
    /// `-x`
    neg => Neg,
    /// `|x|`
    abs => Abs,
    /// -1, 0 or 1
    sign => Sign,
    /// `e^x`
    exp => Exp,
    /// natural log
    log => Log,
    /// `log(1 + x)`
    log1p => Log1p,
    /// square root
    sqrt => Sqrt,
    /// `1 / sqrt(x)`
    rsqrt => Rsqrt,
    /// `x^2`
    square => Square,
    /// `1 / x`
    recip => Recip,
    sin => Sin,
    cos => Cos,
    tanh => Tanh,
    /// `1 / (1 + e^-x)`
    sigmoid => Sigmoid,
    /// `max(x, 0)`
    relu => Relu,
    /// GELU with the exact erf form
    gelu => Gelu,
    /// GELU with the tanh approximation
    gelu_tanh => GeluTanh,
    /// `x * sigmoid(x)`
    silu => Silu,
    /// `log(1 + e^x)`
    softplus => Softplus,
    /// the error function
    erf => Erf,
    floor => Floor,
    ceil => Ceil,
    /// round half to even
    round => Round,
}

macro_rules! binary_methods {
    ($( $(#[$doc:meta])* $method:ident => $op:ident ),* $(,)?) => {
        impl Tensor {
            $( $(#[$doc])* pub fn $method<'a>(&self, rhs: impl Operand<'a>) -> Result<Tensor> { self.binary(rhs, BinaryOp::$op, stringify!($method)) } )*
        }
    };
}

binary_methods! {
    /// `self + rhs`, broadcasting
    add => Add,
    /// `self - rhs`, broadcasting
    sub => Sub,
    /// `self * rhs`, broadcasting
    mul => Mul,
    /// `self / rhs`, broadcasting
    div => Div,
    /// `self ^ rhs`, broadcasting
    pow => Pow,
    /// elementwise max, broadcasting
    maximum => Maximum,
    /// elementwise min, broadcasting
    minimum => Minimum,
    /// Called on GELU's input `x` with the gradient of its output: `grad * gelu'(x)` in
    /// one pass, the fused backward of [`Tensor::gelu`]
    gelu_backward => GeluGrad,
    /// `grad * gelu_tanh'(x)`, the fused backward of [`Tensor::gelu_tanh`] (called on `x`)
    gelu_tanh_backward => GeluTanhGrad,
    /// `grad * silu'(x)`, the fused backward of [`Tensor::silu`] (called on `x`)
    silu_backward => SiluGrad,
}

macro_rules! compare_methods {
    ($( $method:ident => $op:ident ),* $(,)?) => {
        impl Tensor {
            $( #[doc = concat!("Elementwise `", stringify!($method), "` with broadcasting, as a u8 mask.")]
               pub fn $method<'a>(&self, rhs: impl Operand<'a>) -> Result<Tensor> { self.compare(rhs, CmpOp::$op) } )*
        }
    };
}
compare_methods!(eq => Eq, ne => Ne, lt => Lt, le => Le, gt => Gt, ge => Ge);

impl Tensor {
    /// `x^exponent` for a scalar exponent.
    pub fn powf(&self, exponent: f64) -> Result<Tensor> {
        self.unary(UnaryOp::Powf { exponent }, "powf")
    }
    /// `x * mul + add` in one pass.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        self.unary(UnaryOp::Affine { mul, add }, "affine")
    }
    /// Limits every element to `[min, max]`.
    pub fn clamp(&self, min: f64, max: f64) -> Result<Tensor> {
        if min.is_nan() || max.is_nan() || min > max {
            return Err(Error::invalid("clamp", format!("min {min} must be <= max {max}")));
        }
        self.unary(UnaryOp::Clamp { min, max }, "clamp")
    }
    /// `x` where positive, `slope * x` elsewhere.
    pub fn leaky_relu(&self, slope: f64) -> Result<Tensor> {
        self.unary(UnaryOp::LeakyRelu { slope }, "leaky_relu")
    }
    /// `self + weight * (end - self)`, broadcasting.
    pub fn lerp<'a>(&self, end: &Tensor, weight: impl Operand<'a>) -> Result<Tensor> {
        let w = weight.into_operand(self)?;
        self.add(&end.sub(self)?.mul(&*w)?)
    }
    /// 1.0 where the mask is non-zero: a u8 mask as a float tensor of `dtype`.
    pub fn mask_to(&self, dtype: DType) -> Result<Tensor> {
        self.ne(0i64)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::*;
    use crate::{DType, Device, Tensor, UnaryOp};
    use proptest::prelude::*;

    const UNARY_OPS: &[UnaryOp] = &[
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Sign,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Log1p,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Square,
        UnaryOp::Recip,
        UnaryOp::Sin,
        UnaryOp::Cos,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::Gelu,
        UnaryOp::GeluTanh,
        UnaryOp::Silu,
        UnaryOp::Softplus,
        UnaryOp::Erf,
        UnaryOp::Floor,
        UnaryOp::Ceil,
        UnaryOp::Round,
        UnaryOp::Powf { exponent: 1.7 },
        UnaryOp::Affine { mul: -2.5, add: 0.75 },
        UnaryOp::Clamp { min: -0.5, max: 1.25 },
        UnaryOp::LeakyRelu { slope: 0.2 },
    ];

    /// Naive f64 definitions, written independently of the kernels' `apply`.
    fn reference(op: UnaryOp, x: f64) -> f64 {
        use std::f64::consts::PI;
        match op {
            UnaryOp::Neg => -x,
            UnaryOp::Abs => x.abs(),
            UnaryOp::Sign => x.signum() * (x != 0.0) as i32 as f64,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Log1p => (1.0 + x).ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => 1.0 / x.sqrt(),
            UnaryOp::Square => x * x,
            UnaryOp::Recip => 1.0 / x,
            UnaryOp::Sin => x.sin(),
            UnaryOp::Cos => x.cos(),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            UnaryOp::Relu => x.max(0.0),
            UnaryOp::Gelu => 0.5 * x * (1.0 + aigc_kernels::element::erf_f64(x / 2f64.sqrt())),
            UnaryOp::GeluTanh => 0.5 * x * (1.0 + ((2.0 / PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh()),
            UnaryOp::Silu => x / (1.0 + (-x).exp()),
            UnaryOp::Softplus => (1.0 + x.exp()).ln(),
            UnaryOp::Erf => aigc_kernels::element::erf_f64(x),
            UnaryOp::Floor => x.floor(),
            UnaryOp::Ceil => x.ceil(),
            UnaryOp::Round => x.round_ties_even(),
            UnaryOp::Powf { exponent } => x.powf(exponent),
            UnaryOp::Affine { mul, add } => x * mul + add,
            UnaryOp::Clamp { min, max } => x.clamp(min, max),
            UnaryOp::LeakyRelu { slope } => {
                if x >= 0.0 {
                    x
                } else {
                    slope * x
                }
            }
        }
    }

    proptest! {
        #[test]
        fn unary_ops_match_f64_reference_on_strided_views(t in strided_tensor(4, 5), k in 0..UNARY_OPS.len()) {
            let op = UNARY_OPS[k];
            let got = t.unary(op, "test").unwrap();
            prop_assert_eq!(got.dims(), t.dims());
            prop_assert!(got.is_contiguous());
            let want: Vec<f64> = t.to_f64_vec().unwrap().into_iter().map(|x| reference(op, x)).collect();
            assert_close(&got.to_f64_vec().unwrap(), &want, 1e-5, 1e-6, op.name());
        }

        #[test]
        fn unary_ops_in_f64_are_accurate(t in strided_tensor(3, 4), k in 0..UNARY_OPS.len()) {
            let op = UNARY_OPS[k];
            let t = t.to_dtype(DType::F64).unwrap();
            let got = t.unary(op, "test").unwrap().to_vec::<f64>().unwrap();
            let want: Vec<f64> = t.to_vec::<f64>().unwrap().into_iter().map(|x| reference(op, x)).collect();
            assert_close(&got, &want, 1e-12, 1e-14, op.name());
        }

        #[test]
        fn binary_ops_broadcast_like_numpy((a, b) in broadcast_pair(4, 4), k in 0..7usize) {
            let names = ["add", "sub", "mul", "div", "pow", "maximum", "minimum"];
            let a = if k == 4 { a.abs().unwrap() } else { a };
            let got = match k {
                0 => a.add(&b), 1 => a.sub(&b), 2 => a.mul(&b), 3 => a.div(&b),
                4 => a.pow(&b), 5 => a.maximum(&b), _ => a.minimum(&b),
            }.unwrap();
            let f = |x: f64, y: f64| match k {
                0 => x + y, 1 => x - y, 2 => x * y, 3 => x / y, 4 => x.powf(y), 5 => x.max(y), _ => x.min(y),
            };
            let want = NdArray::from_tensor(&a).zip_broadcast(&NdArray::from_tensor(&b), f);
            prop_assert_eq!(got.dims(), &want.shape[..]);
            assert_close(&got.to_f64_vec().unwrap(), &want.data, 1e-5, 1e-5, names[k]);
        }

        #[test]
        fn comparisons_and_where_follow_the_mask((a, b) in broadcast_pair(3, 4)) {
            let lt = a.lt(&b).unwrap();
            prop_assert_eq!(lt.dtype(), DType::U8);
            let want = NdArray::from_tensor(&a).zip_broadcast(&NdArray::from_tensor(&b), |x, y| (x < y) as u8 as f64);
            prop_assert_eq!(lt.to_f64_vec().unwrap(), want.data.clone());
            let picked = lt.where_cond(&a, &b).unwrap();
            let want_min = NdArray::from_tensor(&a).zip_broadcast(&NdArray::from_tensor(&b), |x, y| if x < y { x } else { y });
            prop_assert_eq!(picked.to_f64_vec().unwrap(), want_min.data);
        }
    }

    #[test]
    fn half_precision_ops_round_once() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[0.5f32, -1.25, 3.0], &dev).unwrap();
        for dt in [DType::F16, DType::BF16] {
            let y = x.to_dtype(dt).unwrap().exp().unwrap();
            assert_eq!(y.dtype(), dt);
            let want: Vec<f64> = [0.5f64, -1.25, 3.0].iter().map(|v| v.exp()).collect();
            assert_close(&y.to_f64_vec().unwrap(), &want, 1e-2, 1e-3, "half exp");
        }
    }

    #[test]
    fn integer_tensors_support_integral_ops_only() {
        let dev = Device::Cpu;
        let i = Tensor::new(&[3i64, -4, 5], &dev).unwrap();
        assert_eq!(i.abs().unwrap().to_vec::<i64>().unwrap(), vec![3, 4, 5]);
        assert_eq!(i.add(&i).unwrap().to_vec::<i64>().unwrap(), vec![6, -8, 10]);
        assert_eq!((&i * 2.0).unwrap().to_vec::<i64>().unwrap(), vec![6, -8, 10]);
        let e = i.exp().unwrap_err().to_string();
        assert_eq!(e, "exp: not supported for dtype i64 (expected a float dtype (f32, f64, f16, bf16))");
        assert!(i.div(&i).is_err());
        assert!((&i * 0.5).is_err());
    }

    #[test]
    fn mismatches_are_errors_not_panics() {
        let dev = Device::Cpu;
        let a = Tensor::zeros([2, 3], DType::F32, &dev).unwrap();
        let b = Tensor::zeros([4, 3], DType::F32, &dev).unwrap();
        assert!(a.add(&b).unwrap_err().to_string().contains("cannot broadcast"));
        let c = Tensor::zeros([2, 3], DType::F64, &dev).unwrap();
        assert_eq!(
            a.mul(&c).unwrap_err().to_string(),
            "mul: dtypes differ: lhs is f32, rhs is f64 (convert one with to_dtype)"
        );
        assert!(a.clamp(1.0, 0.0).is_err());
        assert!(a.lt(&c).is_err());
    }

    #[test]
    fn scalar_operands_and_operators_read_like_math() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[1.0f32, 2.0, 4.0], &dev).unwrap();
        let y = ((&x * 2.0).unwrap() - 1.0).unwrap();
        assert_eq!(y.to_vec::<f32>().unwrap(), vec![1.0, 3.0, 7.0]);
        let z = (1.0 - &x).unwrap();
        assert_eq!(z.to_vec::<f32>().unwrap(), vec![0.0, -1.0, -3.0]);
        let w = (&x / 2.0f32).unwrap();
        assert_eq!(w.to_vec::<f32>().unwrap(), vec![0.5, 1.0, 2.0]);
        let q = (-(&x + &x).unwrap()).unwrap();
        let s = (&x * (2.0f32 / 8.0).sqrt()).unwrap();
        assert_eq!(s.to_vec::<f32>().unwrap(), vec![0.5, 1.0, 2.0]);
        assert_eq!(q.to_vec::<f32>().unwrap(), vec![-2.0, -4.0, -8.0]);
        assert_eq!(x.gt(1.5).unwrap().to_vec::<u8>().unwrap(), vec![0, 1, 1]);
        let masked = x.gt(1.5).unwrap().where_cond(0.0, f64::NEG_INFINITY).unwrap();
        assert_eq!(masked.dtype(), DType::F32);
        assert_eq!(masked.to_vec::<f32>().unwrap(), vec![f32::NEG_INFINITY, 0.0, 0.0]);
        let picked = x.gt(1.5).unwrap().where_cond(&x, -1.0).unwrap();
        assert_eq!(picked.to_vec::<f32>().unwrap(), vec![-1.0, 2.0, 4.0]);
        let l = x.lerp(&Tensor::new(&[3.0f32, 2.0, 0.0], &dev).unwrap(), 0.5).unwrap();
        assert_eq!(l.to_vec::<f32>().unwrap(), vec![2.0, 2.0, 2.0]);
    }
}

//! Elementwise functions of one value, declared once in `unary_ops!`: the enum, the
//! scalar definition (`UnaryOp::apply`, also the reference the tests and the SIMD
//! kernels are checked against) and the buffer kernel all come from that one list.
//!
//! Float dtypes compute in their accumulator type (f32 for f32/f16/bf16, f64 for f64).
//! Integer dtypes support the ops that are exact on integers (see [`UnaryOp::is_integral`]).
//!
//! f32 views whose elements lie in unit-stride runs (contiguous tensors, and slices of
//! whole rows) take the SIMD kernel `unary_f32`, written once over
//! [`F32Vector`] with the functions of [`super::simd::math`] (whose error bounds are
//! stated there); the other ops, dtypes and layouts take the generic scalar kernel.

use super::map::{SimdRuns, map};
use super::simd::{F32Vector, Isa, Operand, Wide, kernel, map1, math, update};
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
            if let Some(src) = T::as_f32(src)
                && op.has_f32_kernel()
                && let Some(runs) = SimdRuns::plan([layout], false)
            {
                let mut out = crate::buffers::for_overwrite(layout.numel());
                let dst = T::as_f32_mut(&mut out).expect("T is f32");
                runs.run([src], dst, |[src], dst| {
                    let Operand::Slice(src) = src else { unreachable!("unary runs are planned without broadcast") };
                    unary_f32(Isa::best(), op, src, dst)
                });
                return out;
            }
            unary_generic(op, src, layout)
        }

        /// [`unary_float`] with the scalar definition on every element: the path of the
        /// dtypes and layouts without a SIMD kernel, and the reference the SIMD kernels
        /// are tested against.
        pub fn unary_generic<T: FloatElem>(op: UnaryOp, src: &[T], layout: &Layout) -> Vec<T> {
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

impl UnaryOp {
    /// Whether f32 has a SIMD kernel for the op (`unary_f32`).
    pub fn has_f32_kernel(self) -> bool {
        use UnaryOp::*;
        matches!(
            self,
            Neg | Abs
                | Exp
                | Log
                | Sqrt
                | Rsqrt
                | Square
                | Recip
                | Tanh
                | Sigmoid
                | Relu
                | Gelu
                | GeluTanh
                | Silu
                | Erf
                | Affine { .. }
                | Clamp { .. }
                | LeakyRelu { .. }
        )
    }
}

/// Expands `$body` with `$f` bound to the vector form of `$op` (one of the ops in
/// [`UnaryOp::has_f32_kernel`]), a closure `Fn(W) -> W` on the vector type `$Vector`
/// (the kernel's `Wide<V>`): the one table of vector expressions that [`unary_f32`] and
/// [`bias_activation_f32`] share. Each op is one vector expression; the scalar
/// definitions in `unary_ops!` are the reference they are tested against. It must expand
/// inside a [`kernel!`] body.
///
/// Every function is written as a closure, never as a function item (`math::exp`): a
/// closure inherits the kernel's target features, while a function item is called
/// through a shim compiled without them, where every intrinsic becomes an out-of-line
/// call (measured: GELU 3x slower).
macro_rules! with_vector_op {
    ($Vector:ty, $op:expr, |$f:ident| $body:expr) => {{
        type W = $Vector;
        let zero = W::splat(0.0);
        let one = W::splat(1.0);
        match $op {
            UnaryOp::Neg => {
                let $f = |x: W| -x;
                $body
            }
            UnaryOp::Abs => {
                let $f = |x: W| W::abs(x);
                $body
            }
            UnaryOp::Exp => {
                let $f = |x: W| math::exp(x);
                $body
            }
            UnaryOp::Log => {
                let $f = |x: W| math::ln(x);
                $body
            }
            UnaryOp::Sqrt => {
                let $f = |x: W| W::sqrt(x);
                $body
            }
            UnaryOp::Rsqrt => {
                let $f = |x: W| one / x.sqrt();
                $body
            }
            UnaryOp::Square => {
                let $f = |x: W| x * x;
                $body
            }
            UnaryOp::Recip => {
                let $f = |x: W| one / x;
                $body
            }
            UnaryOp::Tanh => {
                let $f = |x: W| math::tanh(x);
                $body
            }
            UnaryOp::Sigmoid => {
                let $f = |x: W| math::sigmoid(x);
                $body
            }
            // `x <= 0` is false for NaN, which passes through as in the scalar `relu`.
            UnaryOp::Relu => {
                let $f = |x: W| W::select(x.le(zero), zero, x);
                $body
            }
            UnaryOp::Gelu => {
                let $f = |x: W| math::gelu_erf(x);
                $body
            }
            UnaryOp::GeluTanh => {
                let $f = |x: W| math::gelu_tanh(x);
                $body
            }
            UnaryOp::Silu => {
                let $f = |x: W| math::silu(x);
                $body
            }
            UnaryOp::Erf => {
                let $f = |x: W| math::erf(x);
                $body
            }
            UnaryOp::Affine { mul, add } => {
                let (mul, add) = (W::splat(mul as f32), W::splat(add as f32));
                let $f = |x: W| x.mul_add(mul, add);
                $body
            }
            UnaryOp::Clamp { min, max } => {
                let (min, max) = (W::splat(min as f32), W::splat(max as f32));
                let $f = |x: W| W::select(x.lt(min), min, W::select(x.gt(max), max, x));
                $body
            }
            UnaryOp::LeakyRelu { slope } => {
                let slope = W::splat(slope as f32);
                let $f = |x: W| W::select(x.ge(zero), x, x * slope);
                $body
            }
            op => unreachable!("{} has no f32 kernel", op.name()),
        }
    }};
}

kernel! {
    /// The f32 SIMD kernel of the ops in [`UnaryOp::has_f32_kernel`]: `dst = op(src)` on
    /// one contiguous run.
    fn unary_f32(op: UnaryOp, src: &[f32], dst: &mut [f32]) {
        with_vector_op!(Wide<V>, op, |f| map1::<Wide<V>>(src, dst, f))
    }
}

kernel! {
    /// A GEMM epilogue (see [`super::gemm::Epilogue`]): `c[r][j] = op(c[r][j] + bias[j])`
    /// for `r < rows`, `j < cols` on the block of `c` whose rows start `ld` apart, in
    /// place. No bias adds nothing; no op is the identity. `op` must have an f32 kernel.
    pub(crate) fn bias_activation_f32(c: &mut [f32], ld: usize, rows: usize, cols: usize, bias: Option<&[f32]>, op: Option<UnaryOp>) {
        let bias = match bias {
            Some(b) => Operand::Slice(&b[..cols]),
            None => Operand::Splat(0.0),
        };
        let row_starts = (0..rows).map(|r| r * ld);
        match op {
            None => row_starts.for_each(|start| update::<V, 1, 1>([&mut c[start..start + cols]], [bias], |[c], [b]| [c + b])),
            Some(op) => with_vector_op!(Wide<V>, op, |f| row_starts
                .for_each(|start| update::<Wide<V>, 1, 1>([&mut c[start..start + cols]], [bias], |[c], [b]| [f(c + b)]))),
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
    use crate::cpu::map::testing::{View, data, elements, view};
    use crate::cpu::simd;
    use proptest::prelude::*;

    /// The ops with an f32 SIMD kernel, parameterised ones with typical scalars.
    const SIMD_OPS: &[UnaryOp] = &[
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Square,
        UnaryOp::Recip,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::Gelu,
        UnaryOp::GeluTanh,
        UnaryOp::Silu,
        UnaryOp::Erf,
        UnaryOp::Affine { mul: -2.5, add: 0.75 },
        UnaryOp::Clamp { min: -0.5, max: 1.25 },
        UnaryOp::LeakyRelu { slope: 0.2 },
    ];

    /// `got` is `want` up to a relative `1e-5` (absolute `1e-6` near 0); NaN matches NaN.
    fn close(got: f32, want: f64) -> bool {
        (got.is_nan() && want.is_nan()) || got as f64 == want || (got as f64 - want).abs() <= 1e-5 * want.abs() + 1e-6
    }

    #[test]
    fn every_simd_op_is_listed_and_every_listed_op_has_a_kernel() {
        assert_eq!(SIMD_OPS.len(), 18);
        assert!(SIMD_OPS.iter().all(|op| op.has_f32_kernel()));
        assert!(!UnaryOp::Sin.has_f32_kernel() && !UnaryOp::Powf { exponent: 2.0 }.has_f32_kernel());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn f32_kernels_match_the_f64_definition_on_any_length_and_layout(
            (m, n) in (1usize..4, 1usize..70),
            kind in view(),
            k in 0..SIMD_OPS.len(),
            (seed, specials) in (any::<u64>(), any::<bool>()),
        ) {
            let op = SIMD_OPS[k];
            let layout = kind.layout(m, n);
            let src = data(&layout, seed, specials);
            let got = unary_float(op, &src, &layout);
            prop_assert_eq!(got.len(), m * n);
            for (&x, &y) in elements(&src, &layout).iter().zip(&got) {
                let want = op.apply(x as f64);
                prop_assert!(close(y, want), "{}({x}) = {y}, want {want} ({kind:?} {m}x{n})", op.name());
            }
        }

        #[test]
        fn unit_stride_runs_give_the_same_bits_as_the_contiguous_kernel(
            // n >= 16: shorter rows of a strided view are left to the scalar walk.
            (m, n) in (1usize..4, 16usize..70),
            k in 0..SIMD_OPS.len(),
            seed in any::<u64>(),
        ) {
            // A slice of whole rows takes the SIMD kernel run by run; its values, copied to
            // a contiguous buffer, must give exactly the same results.
            let op = SIMD_OPS[k];
            let layout = View::RowSlice.layout(m, n);
            let src = data(&layout, seed, true);
            let packed = elements(&src, &layout);
            let a = unary_float(op, &src, &layout);
            let b = unary_float(op, &packed, &Layout::contiguous(&[m, n]));
            prop_assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{}: {a:?} vs {b:?}", op.name());
        }
    }

    /// The same op, elementwise, on every vector type this CPU runs: the ISAs agree with
    /// the portable kernel to the documented error (bit for bit for the exact ops).
    #[test]
    fn every_isa_agrees_with_the_portable_kernel() {
        let src: Vec<f32> = (0..1000).map(|i| i as f32 * 0.013 - 6.5).collect();
        for &op in SIMD_OPS {
            let run = |isa: Isa| {
                let mut dst = vec![0.0; src.len()];
                unary_f32(isa, op, &src, &mut dst);
                dst
            };
            let portable = run(Isa::Scalar);
            for isa in simd::test_isas() {
                for ((&x, &a), &b) in src.iter().zip(&portable).zip(&run(isa)) {
                    assert!(close(b, a as f64), "{}({x}): {b} on {isa:?}, {a} portable", op.name());
                }
            }
        }
    }

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

//! Differentiable normalisation layers: LayerNorm (Ba, Kiros & Hinton 2016), RMSNorm
//! (Zhang & Sennrich 2019) and GroupNorm (Wu & He 2018).
//!
//! The forward is the fused tensor op. The backward is the closed form, recomputed from
//! the input with `Var` ops so that it is differentiable again. Over the normalised
//! elements (`n` of them), with `xhat = (x - mean) * rstd`, `rstd = 1 / sqrt(var + eps)`
//! and `gw = g * w` (the incoming gradient times the weight, or `g` without weight):
//!
//! `dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat))`,
//!
//! the derivative of `xhat` (the `mean(gw)` term comes from the centring, the last term
//! from `rstd`'s dependence on `x`). RMSNorm is the same without centring:
//! `xhat = x * rstd`, `rstd = 1 / sqrt(mean(x^2) + eps)`, `dx = rstd * (gw - xhat * mean(gw * xhat))`.
//! The parameters get `dw = sum(g * xhat)` and `db = sum(g)` over every position they
//! are shared by.
//!
//! One mechanism serves the three layers: a `NormSpec` says how to view `x` for the
//! statistics (GroupNorm views `[N, C, *]` as `[N, G, rest]`), which dims of that view
//! are normalised, whether to centre, and how the parameters broadcast against `x`.
//!
//! Without `create_graph` (plain gradients, the training-step case) the rule does not
//! build this from `Var` ops: it calls the fused backward kernel of the tensor op
//! ([`Tensor::layer_norm_backward`] and its siblings), which computes the same closed
//! forms in one pass per row. With `create_graph` it composes them from differentiable
//! ops, so that gradients of gradients flow.

use crate::{Var, mode};
use aigc_tensor::{Result, Tensor};

/// Which layer, with the arguments its fused backward takes.
#[derive(Clone, Copy)]
enum NormLayer {
    Layer { normalized_dims: usize },
    Rms,
    Group { num_groups: usize },
}

impl NormLayer {
    /// The fused backward: `(dx, dweight, dbias)` from the input `x` and the output's
    /// gradient `g` (RMSNorm has no bias; its third gradient is unused).
    fn fused_backward(self, x: &Tensor, g: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<[Tensor; 3]> {
        Ok(match self {
            NormLayer::Layer { normalized_dims } => {
                let (dx, dw, db) = x.layer_norm_backward(g, normalized_dims, weight, eps)?;
                [dx, dw, db]
            }
            NormLayer::Rms => {
                let (dx, dw) = x.rms_norm_backward(g, weight, eps)?;
                [dx, dw.clone(), dw]
            }
            NormLayer::Group { num_groups } => {
                let (dx, dw, db) = x.group_norm_backward(g, num_groups, weight, eps)?;
                [dx, dw, db]
            }
        })
    }
}

/// How one normalisation layer computes its statistics and applies its parameters.
struct NormSpec {
    /// The layer, for its fused backward.
    layer: NormLayer,
    /// The shape `x` is viewed as for the statistics.
    stats_view: Vec<usize>,
    /// The dims of `stats_view` the mean and variance run over.
    dims: Vec<isize>,
    /// Subtract the mean (LayerNorm, GroupNorm) or not (RMSNorm).
    center: bool,
    /// The shape the weight and bias take to broadcast against `x` (GroupNorm's `[C]`
    /// becomes `[C, 1, ..]`).
    param_view: Vec<usize>,
    eps: f64,
}

/// `xhat` and `rstd` of a normalisation, recomputed with `Var` ops (in the stats view).
struct Normalized {
    xhat: Var,
    rstd: Var,
}

/// `v` viewed as `shape`, without recording a reshape when it already has that shape.
fn viewed(v: &Var, shape: &[usize]) -> Result<Var> {
    if v.dims() == shape { Ok(v.clone()) } else { v.reshape(shape) }
}

impl NormSpec {
    /// `xhat = (x - mean) * rstd` (or `x * rstd` without centring) and
    /// `rstd = 1 / sqrt(mean((x - mean)^2) + eps)` over the normalised dims.
    fn normalize(&self, x: &Var) -> Result<Normalized> {
        let x = viewed(x, &self.stats_view)?;
        let centered = if self.center { x.sub(&x.mean(&self.dims, true)?)? } else { x };
        let rstd = centered.square()?.mean(&self.dims, true)?.affine(1.0, self.eps)?.rsqrt()?;
        Ok(Normalized { xhat: centered.mul(&rstd)?, rstd })
    }

    /// `dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat))`, the `mean(gw)` term only
    /// when centring; returned in `x`'s shape.
    fn input_grad(&self, n: &Normalized, gw: &Var, x_dims: &[usize]) -> Result<Var> {
        let gw = viewed(gw, &self.stats_view)?;
        let mut inner = gw.sub(&n.xhat.mul(&gw.mul(&n.xhat)?.mean(&self.dims, true)?)?)?;
        if self.center {
            inner = inner.sub(&gw.mean(&self.dims, true)?)?;
        }
        viewed(&n.rstd.mul(&inner)?, x_dims)
    }

    /// A per-position gradient summed down to a parameter (`[param_view]`, then the
    /// parameter's own shape).
    fn param_grad(&self, per_position: &Var, param: &Var) -> Result<Var> {
        viewed(&per_position.sum_to(&self.param_view)?, param.dims())
    }

    /// Records the op: `value` (from the fused tensor op) computed from `x` and the
    /// optional `weight` and `bias`, differentiated by the closed forms above.
    fn record(self, op: &'static str, value: Tensor, x: &Var, weight: Option<&Var>, bias: Option<&Var>) -> Result<Var> {
        let (has_weight, has_bias) = (weight.is_some(), bias.is_some());
        let inputs = [Some(x), weight, bias].into_iter().flatten().cloned().collect();
        Var::from_op(
            op,
            value,
            inputs,
            Box::new(move |_, g, inputs| {
                let x = &inputs[0];
                let weight = has_weight.then(|| &inputs[1]);
                let bias = has_bias.then(|| &inputs[1 + has_weight as usize]);
                if !mode::is_grad_enabled() {
                    let [dx, dw, db] =
                        self.layer.fused_backward(x.value(), g.value(), weight.map(Var::value), self.eps)?;
                    let wanted = |v: &Var, grad: Tensor| v.needs_grad().then(|| Var::constant(grad));
                    let mut grads = vec![wanted(x, dx)];
                    grads.extend(weight.map(|w| wanted(w, dw)));
                    grads.extend(bias.map(|b| wanted(b, db)));
                    return Ok(grads);
                }
                let n = self.normalize(x)?;
                let mut grads = Vec::with_capacity(inputs.len());
                grads.push(if x.needs_grad() {
                    let gw = match weight {
                        Some(w) => g.mul(&viewed(w, &self.param_view)?)?,
                        None => g.clone(),
                    };
                    Some(self.input_grad(&n, &gw, x.dims())?)
                } else {
                    None
                });
                if let Some(w) = weight {
                    let xhat = viewed(&n.xhat, x.dims())?;
                    grads.push(w.needs_grad().then(|| self.param_grad(&g.mul(&xhat)?, w)).transpose()?);
                }
                if let Some(b) = bias {
                    grads.push(b.needs_grad().then(|| self.param_grad(g, b)).transpose()?);
                }
                Ok(grads)
            }),
        )
    }
}

impl Var {
    /// LayerNorm over the last `normalized_dims` dims:
    /// `(x - mean) / sqrt(var + eps) * weight + bias`, as
    /// [`Tensor::layer_norm`]; `weight` and `bias` have the shape of those dims.
    pub fn layer_norm(
        &self,
        normalized_dims: usize,
        weight: Option<&Var>,
        bias: Option<&Var>,
        eps: f64,
    ) -> Result<Var> {
        let value = self.value().layer_norm(normalized_dims, weight.map(Var::value), bias.map(Var::value), eps)?;
        let rank = self.rank();
        let spec = NormSpec {
            layer: NormLayer::Layer { normalized_dims },
            stats_view: self.dims().to_vec(),
            dims: (rank - normalized_dims..rank).map(|d| d as isize).collect(),
            center: true,
            param_view: self.dims()[rank - normalized_dims..].to_vec(),
            eps,
        };
        spec.record("layer_norm", value, self, weight, bias)
    }

    /// RMSNorm over the last dim: `x / sqrt(mean(x^2) + eps) * weight`, as
    /// [`Tensor::rms_norm`]; `weight` has the last dim's size.
    pub fn rms_norm(&self, weight: Option<&Var>, eps: f64) -> Result<Var> {
        let value = self.value().rms_norm(weight.map(Var::value), eps)?;
        let spec = NormSpec {
            layer: NormLayer::Rms,
            stats_view: self.dims().to_vec(),
            dims: vec![-1],
            center: false,
            param_view: vec![self.dims()[self.rank() - 1]],
            eps,
        };
        spec.record("rms_norm", value, self, weight, None)
    }

    /// GroupNorm on `[N, C, *]` with `num_groups` groups of channels and per-channel
    /// `weight` and `bias` (`[C]`), as [`Tensor::group_norm`].
    pub fn group_norm(&self, num_groups: usize, weight: Option<&Var>, bias: Option<&Var>, eps: f64) -> Result<Var> {
        let value = self.value().group_norm(num_groups, weight.map(Var::value), bias.map(Var::value), eps)?;
        let (batch, channels, positions) = (self.dims()[0], self.dims()[1], &self.dims()[2..]);
        let per_group = channels / num_groups * positions.iter().product::<usize>();
        let spec = NormSpec {
            layer: NormLayer::Group { num_groups },
            stats_view: vec![batch, num_groups, per_group],
            dims: vec![2],
            center: true,
            param_view: [&[channels][..], &vec![1; positions.len()]].concat(),
            eps,
        };
        spec.record("group_norm", value, self, weight, bias)
    }
}

#[cfg(test)]
mod tests {
    use crate::Var;
    use crate::gradcheck::{gradcheck, gradgradcheck};
    use crate::testing::inputs;
    use aigc_tensor::{DType, Result, Tensor};
    use proptest::prelude::*;

    /// A large enough `eps` keeps rows with nearly equal values well conditioned for
    /// finite differences.
    const EPS: f64 = 0.1;

    /// `shape` filled from `seed`, laid out with its dims reversed in memory (not
    /// contiguous when two or more dims exceed 1).
    fn reversed_layout(shape: &[usize], seed: u64) -> Tensor {
        let rev: Vec<usize> = shape.iter().rev().copied().collect();
        inputs::seeded(&rev, seed).permute(&(0..shape.len() as isize).rev().collect::<Vec<_>>()).unwrap()
    }

    /// Runs `norm(x, weight, bias)` with the parameters that are present taken from `v`
    /// after `x`.
    fn with_params(
        v: &[Var],
        has_weight: bool,
        has_bias: bool,
        norm: impl Fn(&Var, Option<&Var>, Option<&Var>) -> Result<Var>,
    ) -> Result<Var> {
        let weight = has_weight.then(|| &v[1]);
        let bias = has_bias.then(|| &v[1 + has_weight as usize]);
        norm(&v[0], weight, bias)
    }

    /// The input tensors of a check: `x` and the parameters that are present.
    fn args<'a>(
        x: &'a Tensor,
        weight: &'a Tensor,
        bias: &'a Tensor,
        has_weight: bool,
        has_bias: bool,
    ) -> Vec<&'a Tensor> {
        [Some(x), has_weight.then_some(weight), has_bias.then_some(bias)].into_iter().flatten().collect()
    }

    /// A GroupNorm input shape `[N, C, *]` and its number of groups.
    fn group_norm_shape() -> impl Strategy<Value = (Vec<usize>, usize)> {
        (1usize..3, 1usize..3, 1usize..3, proptest::collection::vec(1usize..4, 0..3))
            .prop_map(|(n, groups, per_group, positions)| ([&[n, groups * per_group][..], &positions].concat(), groups))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn layer_norm_grads_match_finite_differences(
            x in inputs::strided_nonempty(3, 4),
            k in 1usize..4,
            (has_weight, has_bias, seed) in (any::<bool>(), any::<bool>(), any::<u64>()),
        ) {
            let k = k.min(x.rank());
            let param_shape = &x.dims()[x.rank() - k..];
            let (w, b) = (reversed_layout(param_shape, seed), inputs::seeded(param_shape, seed ^ 1));
            let norm = |x: &Var, w: Option<&Var>, b: Option<&Var>| x.layer_norm(k, w, b, EPS);
            gradcheck(|v| with_params(v, has_weight, has_bias, norm), &args(&x, &w, &b, has_weight, has_bias), "layer_norm")
                .unwrap();
        }

        #[test]
        fn rms_norm_grads_match_finite_differences(
            x in inputs::strided_nonempty(3, 4),
            (has_weight, seed) in (any::<bool>(), any::<u64>()),
        ) {
            let w = inputs::seeded(&[x.dims()[x.rank() - 1]], seed);
            let norm = |x: &Var, w: Option<&Var>, _: Option<&Var>| x.rms_norm(w, EPS);
            gradcheck(|v| with_params(v, has_weight, false, norm), &args(&x, &w, &w, has_weight, false), "rms_norm")
                .unwrap();
        }

        #[test]
        fn group_norm_grads_match_finite_differences(
            (shape, groups) in group_norm_shape(),
            (has_weight, has_bias, seed) in (any::<bool>(), any::<bool>(), any::<u64>()),
        ) {
            let x = reversed_layout(&shape, seed);
            let (w, b) = (inputs::seeded(&[shape[1]], seed ^ 1), inputs::seeded(&[shape[1]], seed ^ 2));
            let norm = |x: &Var, w: Option<&Var>, b: Option<&Var>| x.group_norm(groups, w, b, EPS);
            gradcheck(|v| with_params(v, has_weight, has_bias, norm), &args(&x, &w, &b, has_weight, has_bias), "group_norm")
                .unwrap();
        }
    }

    #[test]
    fn norm_second_derivatives_match_finite_differences() {
        let x = reversed_layout(&[3, 2, 2], 1);
        let (w, b) = (inputs::seeded(&[2, 2], 2), inputs::seeded(&[2, 2], 3));
        gradgradcheck(|v| v[0].layer_norm(2, Some(&v[1]), Some(&v[2]), EPS), &[&x, &w, &b], "layer_norm").unwrap();
        let w = inputs::seeded(&[2], 4);
        gradgradcheck(|v| v[0].rms_norm(Some(&v[1]), EPS), &[&x, &w], "rms_norm").unwrap();
        let x = reversed_layout(&[2, 4, 2], 5);
        let (w, b) = (inputs::seeded(&[4], 6), inputs::seeded(&[4], 7));
        gradgradcheck(|v| v[0].group_norm(2, Some(&v[1]), Some(&v[2]), EPS), &[&x, &w, &b], "group_norm").unwrap();
    }

    #[test]
    fn forward_values_equal_the_tensor_ops() {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let x = f32(reversed_layout(&[2, 4, 3], 1));
        let (w, b) = (f32(inputs::seeded(&[4, 3], 2)), f32(inputs::seeded(&[4, 3], 3)));
        let (vx, vw, vb) = (Var::leaf(x.clone()), Var::leaf(w.clone()), Var::leaf(b.clone()));
        let values = |got: Var, want: Tensor| {
            assert_eq!(got.value().to_vec::<f32>().unwrap(), want.to_vec::<f32>().unwrap());
        };
        values(
            vx.layer_norm(2, Some(&vw), Some(&vb), 1e-5).unwrap(),
            x.layer_norm(2, Some(&w), Some(&b), 1e-5).unwrap(),
        );
        values(vx.layer_norm(1, None, None, 1e-5).unwrap(), x.layer_norm(1, None, None, 1e-5).unwrap());
        let w3 = w.narrow(0, 0, 1).unwrap().reshape(3).unwrap();
        values(vx.rms_norm(Some(&Var::leaf(w3.clone())), 1e-6).unwrap(), x.rms_norm(Some(&w3), 1e-6).unwrap());
        let w4 = w.narrow(1, 0, 1).unwrap().reshape(4).unwrap();
        let v4 = Var::leaf(w4.clone());
        values(
            vx.group_norm(2, Some(&v4), Some(&v4), 1e-5).unwrap(),
            x.group_norm(2, Some(&w4), Some(&w4), 1e-5).unwrap(),
        );
    }

    #[test]
    fn fused_plain_gradients_equal_the_composed_create_graph_ones() {
        // Plain gradients come from the fused kernels (the f32 SIMD path here), those of
        // `create_graph` from composed ops: the same numbers up to rounding.
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let x = Var::leaf(f32(inputs::seeded(&[6, 4, 40], 1)));
        let (w, b) = (Var::leaf(f32(inputs::seeded(&[40], 2))), Var::leaf(f32(inputs::seeded(&[40], 3))));
        let (wc, bc) = (Var::leaf(f32(inputs::seeded(&[4], 4))), Var::leaf(f32(inputs::seeded(&[4], 5))));
        let seed = Var::constant(f32(inputs::seeded(&[6, 4, 40], 6)));
        type Case<'a> = (&'a str, Box<dyn Fn() -> Result<Var> + 'a>, Vec<&'a Var>);
        let cases: [Case; 3] = [
            ("layer_norm", Box::new(|| x.layer_norm(1, Some(&w), Some(&b), 1e-5)), vec![&x, &w, &b]),
            ("rms_norm", Box::new(|| x.rms_norm(Some(&w), 1e-5)), vec![&x, &w]),
            ("group_norm", Box::new(|| x.group_norm(2, Some(&wc), Some(&bc), 1e-5)), vec![&x, &wc, &bc]),
        ];
        for (name, f, wrt) in cases {
            let loss = || f().unwrap().mul(&seed).unwrap().sum_all().unwrap();
            let plain = crate::grad(&[&loss()], &wrt, false).unwrap();
            let composed = crate::grad(&[&loss()], &wrt, true).unwrap();
            for (p, c) in plain.iter().zip(&composed) {
                let (p, c) = (p.value().to_f64_vec().unwrap(), c.value().to_f64_vec().unwrap());
                for (a, b) in p.iter().zip(&c) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{name}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn a_constant_input_still_gives_parameter_gradients() {
        // Only the weight and bias need gradients: dw = sum(g * xhat), db = sum(g).
        let x = Var::constant(inputs::seeded(&[3, 4], 1));
        let (w, b) = (Var::leaf(inputs::seeded(&[4], 2)), Var::leaf(inputs::seeded(&[4], 3)));
        x.layer_norm(1, Some(&w), Some(&b), 1e-5).unwrap().sum_all().unwrap().backward().unwrap();
        let xhat = x.value().layer_norm(1, None, None, 1e-5).unwrap();
        let want = xhat.sum(&[0], false).unwrap().to_vec::<f64>().unwrap();
        let got = w.grad().unwrap().to_vec::<f64>().unwrap();
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12), "{got:?} vs {want:?}");
        assert_eq!(b.grad().unwrap().to_vec::<f64>().unwrap(), vec![3.0; 4]);
    }

    #[test]
    fn bad_arguments_are_errors_from_the_tensor_op() {
        let x = Var::leaf(inputs::seeded(&[2, 3], 1));
        let err = x.layer_norm(3, None, None, 1e-5).unwrap_err().to_string();
        assert!(err.contains("layer_norm") && err.contains("normalized_dims 3"), "{err}");
        let err = x.group_norm(2, None, None, 1e-5).unwrap_err().to_string();
        assert!(err.contains("group_norm") && err.contains("num_groups 2"), "{err}");
        let w = Var::leaf(inputs::seeded(&[2], 2));
        let err = x.rms_norm(Some(&w), 1e-5).unwrap_err().to_string();
        assert!(err.contains("rms_norm") && err.contains("weight must have shape [3]"), "{err}");
    }
}

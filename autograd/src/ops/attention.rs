//! Differentiable scaled dot-product attention, `O = softmax(Q K^T * scale + bias) V`
//! (Vaswani et al. 2017).
//!
//! The forward is the fused online-softmax tensor op, which never stores the `Lq x Lk`
//! probabilities. Plain gradients (no `create_graph`, the training-step case) come from
//! the fused backward tensor op, which recomputes them block by block as FlashAttention
//! does (Dao et al. 2022). With `create_graph` the rule recomputes them with `Var` ops,
//! so that it is differentiable again:
//!
//! `P = softmax(Q K^T * scale + bias)`, `dV = P^T g`, `dP = g V^T`,
//! `dS = P * (dP - sum(dP * P, -1))`, `dQ = dS K * scale`, `dK = dS^T Q * scale`.
//!
//! The bias (a u8 keep-mask, an additive float mask, the causal mask, or several) is a
//! constant. Keys it hides get probability exactly 0 through a *masked softmax* (below),
//! whose rule is the softmax's; a query row that sees no key at all gets zeros, as in
//! the forward, and so a zero gradient rather than NaN. Nothing infinite enters the
//! recorded graph, so the backward also runs under `detect_anomaly`. Broadcast batch
//! dims need no care here: the tape sums each gradient down to its input's shape.

use super::softmax::softmax_backward;
use crate::{Var, mode};
use aigc_tensor::{DType, Device, Result, Tensor};

const OP: &str = "scaled_dot_product_attention";

/// Which keys each query sees, as constants for the recomputed probabilities.
struct Visibility {
    /// u8, broadcastable to the scores `[..., Lq, Lk]`: 1 where the key is visible.
    visible: Tensor,
    /// An additive float mask with its hidden (`-inf`) entries replaced by 0.
    additive: Option<Tensor>,
}

impl Visibility {
    /// The visibility that `mask` and `causal` give an `lq x lk` score matrix, or `None`
    /// when every key is visible to every query.
    fn of(mask: Option<&Tensor>, causal: bool, lq: usize, lk: usize, device: &Device) -> Result<Option<Visibility>> {
        let (keep, additive) = match mask {
            None => (None, None),
            Some(m) if m.dtype() == DType::U8 => (Some(m.ne(0i64)?), None),
            Some(m) => {
                let keep = m.ne(f64::NEG_INFINITY)?;
                let additive = keep.where_cond(m, 0.0)?;
                (Some(keep), Some(additive))
            }
        };
        let causal = causal.then(|| causal_keep(lq, lk, device)).transpose()?;
        let visible = match (keep, causal) {
            (Some(keep), Some(causal)) => Some(keep.mul(&causal)?),
            (keep, causal) => keep.or(causal),
        };
        Ok(visible.map(|visible| Visibility { visible, additive }))
    }
}

/// The causal keep-mask `[lq, lk]`: key `j` is visible to query `i` when
/// `j <= i + (lk - lq)` (bottom-right alignment, as the forward).
fn causal_keep(lq: usize, lk: usize, device: &Device) -> Result<Tensor> {
    let keys = Tensor::arange(0, lk as i64, DType::I64, device)?.reshape([1, lk])?;
    let queries = Tensor::arange(0, lq as i64, DType::I64, device)?.reshape([lq, 1])?;
    keys.sub(&queries)?.le(lk as i64 - lq as i64)
}

/// Softmax over the last dim of `x` restricted to the keys `visible` marks (u8,
/// broadcasting with `x`): hidden keys get exactly 0, and a row with no visible key is
/// all zeros. Its rule is the softmax's, `y * (g - sum(g * y))`, which is 0 wherever
/// `y` is, so hidden keys and empty rows get a zero gradient.
fn masked_softmax(x: &Var, visible: &Tensor) -> Result<Var> {
    let probabilities = visible.where_cond(x.value(), f64::NEG_INFINITY)?.softmax(-1)?;
    let any_visible = visible.to_dtype(x.dtype())?.sum(&[-1], true)?.gt(0.0)?;
    let value = any_visible.where_cond(&probabilities, 0.0)?; // empty rows are NaN before this
    x.unary_op("masked_softmax", value, |y, g, _| softmax_backward(y, g, -1))
}

/// The attention probabilities `P = softmax(Q K^T * scale + bias)`, recomputed with
/// `Var` ops (shape `[..., Lq, Lk]`, batch dims broadcast).
fn probabilities(q: &Var, k: &Var, visibility: Option<&Visibility>, scale: f64) -> Result<Var> {
    let scores = q.matmul(&k.t()?)?.affine(scale, 0.0)?;
    let Some(visibility) = visibility else { return scores.softmax(-1) };
    let scores = match &visibility.additive {
        Some(additive) => scores.add(&Var::constant(additive.clone()))?,
        None => scores,
    };
    masked_softmax(&scores, &visibility.visible)
}

impl Var {
    /// Attention of `q [..., Lq, D]` over `k [..., Lk, D]` and `v [..., Lk, Dv]`, as
    /// [`Tensor::scaled_dot_product_attention`]: batch dims broadcast; `mask` is a
    /// constant u8 keep-mask or additive float mask; `causal` hides key `j` from query
    /// `i` when `j > i + (Lk - Lq)`; `scale` defaults to `1 / sqrt(D)`. A query row that
    /// sees no key outputs zeros and passes back zero gradients.
    pub fn scaled_dot_product_attention(
        q: &Var,
        k: &Var,
        v: &Var,
        mask: Option<&Tensor>,
        causal: bool,
        scale: Option<f64>,
    ) -> Result<Var> {
        let value = Tensor::scaled_dot_product_attention(q.value(), k.value(), v.value(), mask, causal, scale)?;
        let head_dim = q.dims()[q.rank() - 1];
        let scale = scale.unwrap_or_else(|| 1.0 / (head_dim.max(1) as f64).sqrt());
        let (lq, lk) = (q.dims()[q.rank() - 2], k.dims()[k.rank() - 2]);
        let mask = mask.cloned();
        Var::from_op(
            OP,
            value,
            vec![q.clone(), k.clone(), v.clone()],
            Box::new(move |_, g, inputs| {
                let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
                if !mode::is_grad_enabled() {
                    let (dq, dk, dv) = Tensor::scaled_dot_product_attention_backward(
                        q.value(),
                        k.value(),
                        v.value(),
                        g.value(),
                        mask.as_ref(),
                        causal,
                        Some(scale),
                    )?;
                    return Ok([dq, dk, dv].into_iter().map(|d| Some(Var::constant(d))).collect());
                }
                let visibility = Visibility::of(mask.as_ref(), causal, lq, lk, &q.device())?;
                let p = probabilities(q, k, visibility.as_ref(), scale)?;
                let dv = v.needs_grad().then(|| p.t()?.matmul(g)).transpose()?;
                if !q.needs_grad() && !k.needs_grad() {
                    return Ok(vec![None, None, dv]);
                }
                let ds = softmax_backward(&p, &g.matmul(&v.t()?)?, -1)?;
                let dq = q.needs_grad().then(|| ds.matmul(k)?.affine(scale, 0.0)).transpose()?;
                let dk = k.needs_grad().then(|| ds.t()?.matmul(q)?.affine(scale, 0.0)).transpose()?;
                Ok(vec![dq, dk, dv])
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::Var;
    use crate::gradcheck::{gradcheck, gradgradcheck};
    use crate::testing::inputs;
    use aigc_tensor::shape::broadcast_shapes;
    use aigc_tensor::{DType, Device, Result, Tensor};
    use proptest::prelude::*;

    /// `shape` filled from `seed`; transposed in memory (last two dims) when `transposed`.
    fn laid_out(shape: &[usize], transposed: bool, seed: u64) -> Tensor {
        if !transposed || shape.len() < 2 {
            return inputs::seeded(shape, seed);
        }
        let mut swapped = shape.to_vec();
        swapped.swap(shape.len() - 1, shape.len() - 2);
        inputs::seeded(&swapped, seed).t().unwrap()
    }

    /// A u8 keep-mask of `shape`, about 70% ones.
    fn keep_mask(shape: &[usize], seed: u64) -> Tensor {
        Tensor::uniform(shape, 0.0, 1.0, DType::F64, &Device::Cpu, seed).unwrap().gt(0.3).unwrap()
    }

    /// An additive f64 mask of `shape`: values in [-1, 1], about 25% `-inf`.
    fn additive_mask(shape: &[usize], seed: u64) -> Tensor {
        let values = Tensor::uniform(shape, -1.0, 1.0, DType::F64, &Device::Cpu, seed).unwrap();
        keep_mask(shape, seed ^ 9).where_cond(&values, f64::NEG_INFINITY).unwrap()
    }

    /// One random attention problem.
    #[derive(Debug)]
    struct Problem {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Option<Tensor>,
        causal: bool,
        scale: Option<f64>,
    }

    impl Problem {
        fn attend(&self, v: &[Var]) -> Result<Var> {
            Var::scaled_dot_product_attention(&v[0], &v[1], &v[2], self.mask.as_ref(), self.causal, self.scale)
        }
    }

    /// Broadcast batch dims (each operand may have 1s or fewer leading dims), `Lq != Lk`
    /// allowed, transposed layouts, causal or not, no / u8 / additive mask.
    fn problem() -> impl Strategy<Value = Problem> {
        let dims = (proptest::collection::vec(1usize..3, 0..3), 1usize..4, 1usize..4, 1usize..3, 1usize..3);
        (dims, any::<u64>(), 0..3u8, any::<bool>(), any::<bool>()).prop_map(
            |((batch, lq, lk, d, dv), seed, mask_kind, causal, default_scale)| {
                let batch_of = |salt: u32| -> Vec<usize> {
                    let dropped = ((seed >> (salt * 8)) % 2) as usize * batch.len().min(1);
                    batch
                        .iter()
                        .enumerate()
                        .skip(dropped)
                        .map(|(i, &n)| if (seed >> (salt * 8 + 2 + i as u32)) & 1 == 1 { 1 } else { n })
                        .collect()
                };
                let batches = [batch_of(0), batch_of(1), batch_of(2)];
                let operand = |salt: usize, tail: [usize; 2]| {
                    laid_out(&[&batches[salt][..], &tail].concat(), (seed >> (40 + salt)) & 1 == 1, seed ^ salt as u64)
                };
                // The mask broadcasts to the scores [broadcast batch.., Lq, Lk]: give it all of it, or only [Lq, Lk].
                let full_batch = batches.iter().fold(Vec::new(), |acc, b| broadcast_shapes("test", &acc, b).unwrap());
                let mask_shape = if (seed >> 50) & 1 == 1 { vec![lq, lk] } else { [full_batch, vec![lq, lk]].concat() };
                let mask = match mask_kind {
                    0 => None,
                    1 => Some(keep_mask(&mask_shape, seed ^ 3)),
                    _ => Some(additive_mask(&mask_shape, seed ^ 4)),
                };
                Problem {
                    q: operand(0, [lq, d]),
                    k: operand(1, [lk, d]),
                    v: operand(2, [lk, dv]),
                    mask,
                    causal,
                    scale: (!default_scale).then_some(0.7),
                }
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn attention_grads_match_finite_differences(p in problem()) {
            gradcheck(|v| p.attend(v), &[&p.q, &p.k, &p.v], "attention").unwrap();
        }
    }

    #[test]
    fn attention_second_derivatives_match_finite_differences() {
        let (q, k, v) = (inputs::seeded(&[2, 3, 2], 1), inputs::seeded(&[1, 2, 2], 2), inputs::seeded(&[2, 3], 3));
        // Causal with Lq > Lk: query 0 sees no key.
        let causal = Problem { q: q.clone(), k: k.clone(), v: v.clone(), mask: None, causal: true, scale: None };
        gradgradcheck(|x| causal.attend(x), &[&q, &k, &v], "causal attention").unwrap();
        let additive = Problem { mask: Some(additive_mask(&[3, 2], 4)), causal: false, scale: Some(0.8), ..causal };
        gradgradcheck(|x| additive.attend(x), &[&q, &k, &v], "additive-mask attention").unwrap();
        let plain = Problem { mask: None, ..additive };
        gradgradcheck(|x| plain.attend(x), &[&q, &k, &v], "attention").unwrap();
    }

    #[test]
    fn fully_masked_query_rows_get_zero_gradients() {
        let (q, k, v) = (inputs::seeded(&[3, 2], 1), inputs::seeded(&[4, 2], 2), inputs::seeded(&[4, 2], 3));
        let mask = Tensor::new(&[1u8, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0], &Device::Cpu).unwrap().reshape([3, 4]).unwrap();
        let (vq, vk, vv) = (Var::leaf(q), Var::leaf(k), Var::leaf(v));
        let out = Var::scaled_dot_product_attention(&vq, &vk, &vv, Some(&mask), false, None).unwrap();
        assert_eq!(out.value().narrow(0, 1, 1).unwrap().to_vec::<f64>().unwrap(), vec![0.0, 0.0]);
        crate::detect_anomaly(|| out.square()?.sum_all()?.backward()).unwrap();
        let dq = vq.grad().unwrap().to_vec::<f64>().unwrap();
        assert_eq!(&dq[2..4], &[0.0, 0.0], "the masked row's query gets no gradient");
        for grad in [vq.grad(), vk.grad(), vv.grad()] {
            assert!(grad.unwrap().to_vec::<f64>().unwrap().iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn forward_value_equals_the_tensor_op() {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let (q, k, v) =
            (f32(laid_out(&[2, 3, 4], true, 1)), f32(inputs::seeded(&[5, 4], 2)), f32(inputs::seeded(&[2, 5, 3], 3)));
        let mask = keep_mask(&[3, 5], 4);
        let got = Var::scaled_dot_product_attention(
            &Var::leaf(q.clone()),
            &Var::leaf(k.clone()),
            &Var::leaf(v.clone()),
            Some(&mask),
            true,
            None,
        )
        .unwrap();
        let want = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), true, None).unwrap();
        assert_eq!(got.value().to_vec::<f32>().unwrap(), want.to_vec::<f32>().unwrap());
    }

    #[test]
    fn bad_shapes_are_errors_from_the_tensor_op() {
        let (q, k) = (Var::leaf(inputs::seeded(&[3, 2], 1)), Var::leaf(inputs::seeded(&[4, 3], 2)));
        let err = Var::scaled_dot_product_attention(&q, &k, &k, None, false, None).unwrap_err().to_string();
        assert!(err.contains("scaled_dot_product_attention") && err.contains("head dim"), "{err}");
    }
}

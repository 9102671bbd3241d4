//! Fused scaled dot-product attention, forward:
//! `softmax(Q K^T * scale + mask) V` (Vaswani et al. 2017), computed tile by tile with an
//! online softmax so that the `Lq x Lk` score matrix never exists in memory
//! (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022). Kernel:
//! `aigc_kernels::cpu::attention`, parallel over (batch entry, query block).
//!
//! Conventions (see [`Tensor::scaled_dot_product_attention`]):
//! - `causal` hides key `j` from query `i` when `j > i + (Lk - Lq)`: the diagonal is
//!   aligned bottom-right, so with a KV cache the last query sees every key. When
//!   `Lq == Lk` this is PyTorch's `is_causal` (which aligns top-left).
//! - A query row whose keys are all masked out outputs zeros (PyTorch gives NaN).
//! - `mask` and `causal` may be combined: a key is visible only if both allow it.

use crate::shape::broadcast_shapes;
use crate::storage::{CpuStorage, map_float};
use crate::{DType, Error, Result, Tensor, WithDType};
use aigc_kernels::cpu::attention::{self, AttentionMask, AttentionOptions, Strided, Tiling};
use aigc_kernels::cpu::attention_backward;
use aigc_kernels::{FloatElem, Layout};

const OP: &str = "scaled_dot_product_attention";

impl Tensor {
    /// Attention of `q [..., Lq, D]` over keys `k [..., Lk, D]` and values
    /// `v [..., Lk, Dv]`; returns `[..., Lq, Dv]`. The leading (batch) dims of the three
    /// broadcast together (numpy rules), e.g. one k/v head shared by every query head.
    ///
    /// - `mask`: a u8 boolean mask (1 = attend, 0 = masked out) or an additive float mask
    ///   of q's dtype (`-inf` masks out), broadcastable to `[..., Lq, Lk]`.
    /// - `causal`: hide key `j` from query `i` when `j > i + (Lk - Lq)` (bottom-right
    ///   alignment; PyTorch's `is_causal` when `Lq == Lk`). Combines with `mask`.
    /// - `scale`: the factor on `Q K^T`; `None` means `1 / sqrt(D)` (1 when `D == 0`).
    ///
    /// A query row with every key masked out gives zeros, not NaN.
    pub fn scaled_dot_product_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        causal: bool,
        scale: Option<f64>,
    ) -> Result<Tensor> {
        attention_tiled(q, k, v, mask, causal, scale, Tiling::default())
    }
}

/// [`Tensor::scaled_dot_product_attention`] with explicit block sizes (the result does
/// not depend on them beyond rounding; the tests use tiny blocks to exercise the online
/// softmax across many key blocks).
pub(crate) fn attention_tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: Option<f64>,
    tiling: Tiling,
) -> Result<Tensor> {
    let p = Prepared::new(q, k, v, mask, scale)?;
    let options = AttentionOptions { causal, scale: p.scale, tiling };
    let operands: Vec<&Tensor> = [&p.q, &p.k, &p.v].into_iter().chain(&p.mask).collect();
    let out =
        Tensor::read_cpu_all(&operands, |views| Ok(map_float!(OP, views[0].0, |qb| attend(qb, views, options)?)))?;
    Ok(Tensor::from_cpu(out, &p.shape(p.lq, p.dv)))
}

impl Tensor {
    /// The gradients `(dq, dk, dv)` of [`Tensor::scaled_dot_product_attention`] given
    /// the gradient `grad` of its output, in one fused pass that recomputes the
    /// probabilities block by block (`aigc_kernels::cpu::attention_backward`). The
    /// other arguments are the forward's. Each gradient has its operand's shape with the
    /// batch dims broadcast (`[batch.., L, D]`); sum over a broadcast dim to get the
    /// gradient of a shared operand.
    pub fn scaled_dot_product_attention_backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
        mask: Option<&Tensor>,
        causal: bool,
        scale: Option<f64>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        const BACKWARD: &str = "scaled_dot_product_attention_backward";
        let p = Prepared::new(q, k, v, mask, scale)?;
        q.same_device(grad, BACKWARD)?;
        q.same_dtype(grad, BACKWARD)?;
        let out_shape = p.shape(p.lq, p.dv);
        if grad.dims() != out_shape.as_slice() {
            return Err(Error::ShapeMismatch {
                op: BACKWARD,
                lhs: grad.shape(),
                rhs: out_shape.into(),
                reason: "the gradient must have the attention output's shape [..., Lq, Dv]".into(),
            });
        }
        let options = AttentionOptions { causal, scale: p.scale, tiling: Tiling::default() };
        // The gradient last, after the operands `attend` reads.
        let operands: Vec<&Tensor> = [&p.q, &p.k, &p.v].into_iter().chain(&p.mask).chain([grad]).collect();
        let [dq, dk, dv] = Tensor::read_cpu_all(&operands, |views| {
            Ok(match views[0].0 {
                CpuStorage::F32(b) => attend_backward(b, views, options)?.map(CpuStorage::F32),
                CpuStorage::F64(b) => attend_backward(b, views, options)?.map(CpuStorage::F64),
                CpuStorage::F16(b) => attend_backward(b, views, options)?.map(CpuStorage::F16),
                CpuStorage::BF16(b) => attend_backward(b, views, options)?.map(CpuStorage::BF16),
                other => unreachable!("{BACKWARD}: {:?} was checked to be a float dtype", other.dtype()),
            })
        })?;
        Ok((
            Tensor::from_cpu(dq, &p.shape(p.lq, p.d)),
            Tensor::from_cpu(dk, &p.shape(p.lk, p.d)),
            Tensor::from_cpu(dv, &p.shape(p.lk, p.dv)),
        ))
    }
}

/// Checked and broadcast operands of one attention call.
struct Prepared {
    /// q, k and v broadcast to the common batch dims.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Option<Tensor>,
    batch: Vec<usize>,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    scale: f64,
}

impl Prepared {
    fn new(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: Option<f64>) -> Result<Prepared> {
        q.expect_float(OP)?;
        for other in [k, v] {
            q.same_device(other, OP)?;
            q.same_dtype(other, OP)?;
        }
        let (lq, d) = matrix_dims("q", q)?;
        let (lk, dk) = matrix_dims("k", k)?;
        let (lv, dv) = matrix_dims("v", v)?;
        if d != dk {
            return Err(mismatch(q, k, format!("q.dim(-1)={d} must equal k.dim(-1)={dk} (the head dim D)")));
        }
        if lk != lv {
            return Err(mismatch(k, v, format!("k.dim(-2)={lk} must equal v.dim(-2)={lv} (the number of keys Lk)")));
        }
        let batch = broadcast_batch(q, k, v)?;
        let scale = match scale {
            Some(s) if !s.is_finite() => return Err(Error::invalid(OP, format!("scale {s} must be finite"))),
            Some(s) => s,
            None => 1.0 / (d.max(1) as f64).sqrt(),
        };
        let with = |rows: usize, cols: usize| [&batch[..], &[rows, cols]].concat();
        let mask = mask.map(|m| check_mask(q, m, with(lq, lk))).transpose()?;
        Ok(Prepared {
            q: q.broadcast_to(with(lq, d))?,
            k: k.broadcast_to(with(lk, d))?,
            v: v.broadcast_to(with(lk, dv))?,
            mask,
            lq,
            lk,
            d,
            dv,
            scale,
            batch,
        })
    }

    /// The batch dims followed by `[rows, cols]`.
    fn shape(&self, rows: usize, cols: usize) -> Vec<usize> {
        [&self.batch[..], &[rows, cols]].concat()
    }
}

/// `(rows, cols)` of the matrices of `t` (its last two dims), or an error if it has fewer.
fn matrix_dims(name: &str, t: &Tensor) -> Result<(usize, usize)> {
    match t.dims() {
        [.., rows, cols] => Ok((*rows, *cols)),
        _ => Err(Error::bad_shape(
            OP,
            &t.shape(),
            format!("{name} needs at least 2 dims [..., L, D] (a sequence of vectors)"),
        )),
    }
}

fn mismatch(lhs: &Tensor, rhs: &Tensor, reason: String) -> Error {
    Error::ShapeMismatch { op: OP, lhs: lhs.shape(), rhs: rhs.shape(), reason }
}

/// The leading dims of `t` (all but the last two).
fn batch_dims(t: &Tensor) -> &[usize] {
    &t.dims()[..t.rank() - 2]
}

/// The broadcast of the batch dims of q, k and v.
fn broadcast_batch(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Vec<usize>> {
    let mut batch = batch_dims(q).to_vec();
    for other in [k, v] {
        batch = broadcast_shapes(OP, &batch, batch_dims(other)).map_err(|_| {
            let reason = format!(
                "the batch dims (all but the last 2) must broadcast, but q, k, v have {:?}, {:?}, {:?}",
                batch_dims(q),
                batch_dims(k),
                batch_dims(v)
            );
            mismatch(q, other, reason)
        })?;
    }
    Ok(batch)
}

/// A mask must be u8 or q's float dtype, and broadcast to the scores' shape.
fn check_mask(q: &Tensor, mask: &Tensor, scores_shape: Vec<usize>) -> Result<Tensor> {
    q.same_device(mask, OP)?;
    match mask.dtype() {
        DType::U8 => {}
        dt if dt == q.dtype() => {}
        dt if dt.is_float() => return Err(Error::DTypeMismatch { op: OP, lhs: q.dtype(), rhs: dt }),
        dt => {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: dt,
                expected: "a u8 boolean mask or an additive mask of the query's float dtype",
            });
        }
    }
    mask.broadcast_to(&scores_shape).map_err(|_| Error::ShapeMismatch {
        op: OP,
        lhs: mask.shape(),
        rhs: scores_shape.clone().into(),
        reason: format!("the mask must broadcast to the scores' shape {scores_shape:?} [..., Lq, Lk]"),
    })
}

/// The typed buffer of a storage whose dtype the caller has checked.
fn typed<T: WithDType>(s: &CpuStorage) -> &[T] {
    T::from_storage(s).expect("dtype checked before dispatch")
}

/// The buffers and layouts of `q`, `k`, `v`, then the mask's if there is one, then
/// (in the backward) the gradient's, as [`Tensor::read_cpu_all`] gives them.
type Views<'a, 'b> = &'b [(&'a CpuStorage, &'a Layout)];

/// Runs the kernel for one dtype (`q` is the typed buffer of `views[0]`): `k`, `v` and
/// an additive mask have the same dtype (checked), a boolean mask is u8.
fn attend<T: FloatElem + WithDType>(q: &[T], views: Views<'_, '_>, options: AttentionOptions) -> Result<Vec<T>> {
    with_operands(q, views, |q, k, v, mask| Ok(attention::scaled_dot_product_attention(q, k, v, mask, options)))
}

/// Calls `f` with the typed views of `q` (its buffer typed as `q`), `k` and `v`, the first
/// three of `views`, and of the mask, a fourth if there is one.
fn with_operands<'a, T: FloatElem + WithDType, R>(
    q: &'a [T],
    views: Views<'a, '_>,
    f: impl FnOnce(Strided<'a, T>, Strided<'a, T>, Strided<'a, T>, AttentionMask<'a, T>) -> Result<R>,
) -> Result<R> {
    let strided = |&(s, layout): &(&'a CpuStorage, &'a Layout)| Strided { data: typed(s), layout };
    let (k, v) = (strided(&views[1]), strided(&views[2]));
    let q = Strided { data: q, layout: views[0].1 };
    let mask = match views.get(3) {
        None => AttentionMask::None,
        Some(&(CpuStorage::U8(data), layout)) => AttentionMask::Keep(Strided { data, layout }),
        Some(other) => AttentionMask::Additive(strided(other)),
    };
    f(q, k, v, mask)
}

/// Runs the backward kernel for one dtype (the dtypes as in [`attend`]); the gradient is
/// the last of `views`.
fn attend_backward<T: FloatElem + WithDType>(
    q: &[T],
    views: Views<'_, '_>,
    options: AttentionOptions,
) -> Result<[Vec<T>; 3]> {
    let (g, operands) = views.split_last().expect("q, k, v and the gradient");
    with_operands(q, operands, |q, k, v, mask| {
        let g = Strided { data: typed(g.0), layout: g.1 };
        Ok(attention_backward::scaled_dot_product_attention_backward(q, k, v, g, mask, options))
    })
}

#[cfg(test)]
mod tests {
    use super::attention_tiled;
    use crate::shape::broadcast_shapes;
    use crate::testing::*;
    use crate::{DType, Device, Tensor};
    use aigc_kernels::cpu::attention::Tiling;
    use proptest::prelude::*;

    fn batch_of(t: &Tensor) -> Vec<usize> {
        t.dims()[..t.rank() - 2].to_vec()
    }

    fn last2(t: &Tensor) -> (usize, usize) {
        (t.dims()[t.rank() - 2], t.dims()[t.rank() - 1])
    }

    /// Naive attention: broadcast every operand to its full shape, then per batch entry
    /// and query row form all `Lk` scores, mask them, exponentiate, normalise and
    /// weight the values. A row whose keys are all masked gives zeros.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        causal: bool,
        scale: Option<f64>,
    ) -> NdArray {
        let ((lq, d), (lk, _), (_, dv)) = (last2(q), last2(k), last2(v));
        let batch = broadcast_shapes("t", &batch_of(q), &batch_of(k)).unwrap();
        let batch = broadcast_shapes("t", &batch, &batch_of(v)).unwrap();
        let full = |t: &Tensor, rows: usize, cols: usize| {
            NdArray::from_tensor(&t.broadcast_to([&batch[..], &[rows, cols]].concat()).unwrap())
        };
        let (qa, ka, va) = (full(q, lq, d), full(k, lk, d), full(v, lk, dv));
        let ma = mask.map(|m| (full(m, lq, lk), m.dtype() == DType::U8));
        let scale = scale.unwrap_or(1.0 / (d.max(1) as f64).sqrt());
        let entries: usize = batch.iter().product();
        let mut out = vec![0.0; entries * lq * dv];
        for b in 0..entries {
            for i in 0..lq {
                let mut weights = vec![0.0; lk];
                for j in 0..lk {
                    let mut s = scale
                        * (0..d).map(|c| qa.data[(b * lq + i) * d + c] * ka.data[(b * lk + j) * d + c]).sum::<f64>();
                    if let Some((m, is_bool)) = &ma {
                        let x = m.data[(b * lq + i) * lk + j];
                        s = if !is_bool {
                            s + x
                        } else if x != 0.0 {
                            s
                        } else {
                            f64::NEG_INFINITY
                        };
                    }
                    if causal && j as isize > i as isize + lk as isize - lq as isize {
                        s = f64::NEG_INFINITY;
                    }
                    weights[j] = s.exp();
                }
                let z: f64 = weights.iter().sum();
                if z > 0.0 {
                    for c in 0..dv {
                        let y: f64 = (0..lk).map(|j| weights[j] * va.data[(b * lk + j) * dv + c]).sum();
                        out[(b * lq + i) * dv + c] = y / z;
                    }
                }
            }
        }
        NdArray::new([&batch[..], &[lq, dv]].concat(), out)
    }

    /// One random attention problem.
    #[derive(Clone, Debug)]
    struct Case {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Option<Tensor>,
        causal: bool,
        scale: Option<f64>,
        tiling: Tiling,
    }

    impl Case {
        fn run(&self) -> Tensor {
            attention_tiled(&self.q, &self.k, &self.v, self.mask.as_ref(), self.causal, self.scale, self.tiling)
                .unwrap()
        }
        fn reference(&self) -> NdArray {
            reference(&self.q, &self.k, &self.v, self.mask.as_ref(), self.causal, self.scale)
        }
        /// The same problem with q, k, v and an additive mask converted to `dtype`.
        fn to_dtype(&self, dtype: DType) -> Case {
            let cast = |t: &Tensor| if t.dtype() == DType::U8 { t.clone() } else { t.to_dtype(dtype).unwrap() };
            Case {
                q: cast(&self.q),
                k: cast(&self.k),
                v: cast(&self.v),
                mask: self.mask.as_ref().map(cast),
                ..self.clone()
            }
        }
    }

    /// `dims` with the dims whose bit is set in `bits` shrunk to 1 and the first `drop`
    /// removed: a shape that broadcasts to `dims`.
    fn shrink(dims: &[usize], bits: u64, drop: usize) -> Vec<usize> {
        let shrunk: Vec<usize> =
            dims.iter().enumerate().map(|(i, &n)| if (bits >> i) & 1 == 1 { 1 } else { n }).collect();
        shrunk[drop.min(shrunk.len())..].to_vec()
    }

    fn size() -> impl Strategy<Value = usize> {
        prop_oneof![1 => Just(0usize), 10 => 1usize..=4]
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            proptest::collection::vec(1usize..=3, 0..=2),
            (size(), size(), size(), size()),
            any::<[u64; 4]>(),
            (view_kind(), view_kind(), view_kind(), view_kind()),
            (0usize..3, any::<bool>(), any::<bool>()),
            prop_oneof![Just(None), (-1.0f64..2.0).prop_map(Some)],
            prop_oneof![
                Just(Tiling::default()),
                (1usize..4, 1usize..4).prop_map(|(query_block, key_block)| Tiling { query_block, key_block })
            ],
            any::<u64>(),
        )
            .prop_map(
                |(
                    batch,
                    (lq, lk, d, dv),
                    bits,
                    (kq, kk, kv, km),
                    (mask_mode, causal, transposed),
                    scale,
                    tiling,
                    seed,
                )| {
                    let operand = |bits: u64, rows, cols, kind, seed| {
                        let lead = shrink(&batch, bits, (bits >> 32) as usize % 3);
                        make_view(&[&lead[..], &[rows, cols]].concat(), kind, seed)
                    };
                    let q = operand(bits[0], lq, d, kq, seed);
                    let k = operand(bits[1], lk, d, kk, seed ^ 1);
                    let v = operand(bits[2], lk, dv, kv, seed ^ 2);
                    let out_batch = broadcast_shapes("t", &batch_of(&q), &batch_of(&k)).unwrap();
                    let out_batch = broadcast_shapes("t", &out_batch, &batch_of(&v)).unwrap();
                    let mask_shape =
                        shrink(&[&out_batch[..], &[lq, lk]].concat(), bits[3], (bits[3] >> 32) as usize % 5);
                    let rank = mask_shape.len();
                    let mask = match mask_mode {
                        0 => None,
                        1 if transposed && rank >= 2 => {
                            let mut swapped = mask_shape.clone();
                            swapped.swap(rank - 2, rank - 1);
                            Some(make_view(&swapped, km, seed ^ 3).gt(-1.0).unwrap().transpose(-2, -1).unwrap())
                        }
                        1 => Some(make_view(&mask_shape, km, seed ^ 3).gt(-1.0).unwrap()),
                        _ => Some(make_view(&mask_shape, km, seed ^ 3)),
                    };
                    Case { q, k, v, mask, causal, scale, tiling }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn attention_matches_naive_reference_with_masks_causality_and_broadcast_batches(c in case()) {
            let got = c.run();
            let want = c.reference();
            prop_assert_eq!(got.dims(), &want.shape[..]);
            prop_assert!(got.is_contiguous());
            assert_close(&got.to_f64_vec().unwrap(), &want.data, 1e-4, 1e-5, "attention f32");
        }

        #[test]
        fn attention_in_f64_is_accurate_to_rounding(c in case()) {
            let c = c.to_dtype(DType::F64);
            let got = c.run();
            prop_assert_eq!(got.dtype(), DType::F64);
            assert_close(&got.to_vec::<f64>().unwrap(), &c.reference().data, 1e-12, 1e-12, "attention f64");
        }

        #[test]
        fn attention_in_half_precision_computes_in_f32(c in case(), bf in any::<bool>()) {
            let dtype = if bf { DType::BF16 } else { DType::F16 };
            let c = c.to_dtype(dtype);
            let got = c.run();
            prop_assert_eq!(got.dtype(), dtype);
            // The reference sees the same rounded inputs; the output is rounded once.
            assert_close(&got.to_f64_vec().unwrap(), &c.reference().data, 1e-2, 2e-2, "attention half");
        }
    }

    fn tensor(dims: &[usize], seed: u64) -> Tensor {
        make_view(dims, ViewKind::Contiguous, seed).to_dtype(DType::F64).unwrap()
    }

    fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool) -> Vec<f64> {
        Tensor::scaled_dot_product_attention(q, k, v, mask, causal, None).unwrap().to_vec::<f64>().unwrap()
    }

    #[test]
    fn causal_mask_hides_future_tokens() {
        // Query row i sees key j only when j <= i + (Lk - Lq); changing key/value `p`
        // must leave every row i < p - (Lk - Lq) bit-for-bit unchanged, and change the others.
        for (lq, lk) in [(5, 5), (3, 6), (6, 4)] {
            let (d, dv) = (4, 3);
            let q = tensor(&[2, lq, d], 1);
            let (k, v) = (tensor(&[2, lk, d], 2), tensor(&[2, lk, dv], 3));
            let base = sdpa(&q, &k, &v, None, true);
            for p in 0..lk {
                let bump = |t: &Tensor, width: usize| {
                    let mut data = t.to_vec::<f64>().unwrap();
                    for b in 0..2 {
                        for c in 0..width {
                            data[(b * lk + p) * width + c] += 0.5 + c as f64;
                        }
                    }
                    Tensor::from_vec(data, t.dims(), &Device::Cpu).unwrap()
                };
                let changed = sdpa(&q, &bump(&k, d), &bump(&v, dv), None, true);
                for b in 0..2 {
                    for i in 0..lq {
                        let row = (b * lq + i) * dv..(b * lq + i + 1) * dv;
                        let sees_p = p as isize <= i as isize + lk as isize - lq as isize;
                        if sees_p {
                            assert_ne!(changed[row.clone()], base[row], "Lq {lq} Lk {lk}: row {i} must see key {p}");
                        } else {
                            assert_eq!(
                                changed[row.clone()],
                                base[row],
                                "Lq {lq} Lk {lk}: row {i} must not see key {p}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn causal_with_a_kv_cache_matches_the_last_rows_of_full_causal_attention() {
        // Bottom-right alignment: the last 2 queries against all 6 keys give the last 2
        // rows of the full 6x6 causal attention, and a single query sees every key.
        let (q, k, v) = (tensor(&[6, 4], 4), tensor(&[6, 4], 5), tensor(&[6, 3], 6));
        let full = sdpa(&q, &k, &v, None, true);
        let cached = sdpa(&q.narrow(0, 4, 2).unwrap(), &k, &v, None, true);
        assert_close(&cached, &full[4 * 3..], 1e-15, 1e-15, "kv cache");
        let last = q.narrow(0, 5, 1).unwrap();
        assert_eq!(sdpa(&last, &k, &v, None, true), sdpa(&last, &k, &v, None, false));
    }

    #[test]
    fn causal_equals_pytorch_is_causal_when_lengths_match() {
        let (q, k, v) = (tensor(&[2, 5, 4], 7), tensor(&[2, 5, 4], 8), tensor(&[2, 5, 2], 9));
        let tril: Vec<u8> = (0..25).map(|x| u8::from(x % 5 <= x / 5)).collect();
        let tril = Tensor::from_vec(tril, [5, 5], &Device::Cpu).unwrap();
        assert_close(&sdpa(&q, &k, &v, None, true), &sdpa(&q, &k, &v, Some(&tril), false), 1e-15, 0.0, "tril");
    }

    #[test]
    fn query_rows_with_every_key_masked_give_zeros() {
        let (q, k, v) = (tensor(&[4, 3], 10), tensor(&[2, 3], 11), tensor(&[2, 2], 12));
        // Causal with Lq = 4 > Lk = 2: rows 0 and 1 see no key.
        let out = sdpa(&q, &k, &v, None, true);
        assert_eq!(&out[..4], &[0.0; 4]);
        assert!(out[4..].iter().all(|x| *x != 0.0));
        // A boolean mask that removes every key of row 2.
        let keep = Tensor::from_vec(vec![1u8, 1, 1, 0, 0, 0, 0, 1], [4, 2], &Device::Cpu).unwrap();
        let out = sdpa(&q, &k, &v, Some(&keep), false);
        assert_eq!(&out[4..6], &[0.0, 0.0]);
        assert!(out.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn neg_inf_additive_mask_equals_the_boolean_mask() {
        let (q, k, v) = (tensor(&[2, 3, 4], 13), tensor(&[2, 5, 4], 14), tensor(&[2, 5, 3], 15));
        let keep = make_view(&[3, 5], ViewKind::Contiguous, 16).gt(-0.5).unwrap();
        let (zero, neg_inf) =
            (tensor(&[3, 5], 0).zeros_like().unwrap(), tensor(&[3, 5], 0).full_like(f64::NEG_INFINITY).unwrap());
        let additive = keep.where_cond(&zero, &neg_inf).unwrap();
        assert_eq!(additive.dtype(), DType::F64);
        assert_close(
            &sdpa(&q, &k, &v, Some(&keep), false),
            &sdpa(&q, &k, &v, Some(&additive), false),
            1e-15,
            0.0,
            "mask",
        );
    }

    #[test]
    fn default_scale_is_the_inverse_square_root_of_the_head_dim() {
        let (q, k, v) = (tensor(&[3, 9], 17), tensor(&[4, 9], 18), tensor(&[4, 2], 19));
        let explicit = Tensor::scaled_dot_product_attention(&q, &k, &v, None, false, Some(1.0 / 3.0)).unwrap();
        assert_eq!(explicit.to_vec::<f64>().unwrap(), sdpa(&q, &k, &v, None, false));
    }

    #[test]
    fn long_sequences_stream_through_many_key_blocks() {
        // Default tiling (32 x 64): 70 queries and 200 keys span 3 query and 4 key blocks.
        let q = make_view(&[2, 70, 8], ViewKind::Transposed, 20);
        let (k, v) = (make_view(&[1, 200, 8], ViewKind::Stepped, 21), make_view(&[2, 200, 5], ViewKind::Sliced, 22));
        let got = Tensor::scaled_dot_product_attention(&q, &k, &v, None, true, None).unwrap();
        assert_close(&got.to_f64_vec().unwrap(), &reference(&q, &k, &v, None, true, None).data, 1e-4, 1e-5, "long");
    }

    #[test]
    fn attention_errors_name_the_op_and_the_shapes() {
        let dev = Device::Cpu;
        let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &dev).unwrap();
        let (q, k, v) = (t(&[2, 3, 4]), t(&[2, 5, 4]), t(&[2, 5, 6]));
        // The message after the op name (which must lead it).
        let err = |r: crate::Result<Tensor>| {
            let e = r.unwrap_err().to_string();
            e.strip_prefix("scaled_dot_product_attention: ").expect("the op name leads the message").to_string()
        };
        let sdpa = Tensor::scaled_dot_product_attention;

        assert_eq!(
            err(sdpa(&t(&[4]), &k, &v, None, false, None)),
            "input of shape [4]: q needs at least 2 dims [..., L, D] (a sequence of vectors)"
        );
        assert_eq!(
            err(sdpa(&q, &t(&[2, 5, 3]), &v, None, false, None)),
            "lhs [2, 3, 4] and rhs [2, 5, 3]: q.dim(-1)=4 must equal k.dim(-1)=3 (the head dim D)"
        );
        assert_eq!(
            err(sdpa(&q, &k, &t(&[2, 4, 6]), None, false, None)),
            "lhs [2, 5, 4] and rhs [2, 4, 6]: k.dim(-2)=5 must equal v.dim(-2)=4 (the number of keys Lk)"
        );
        assert_eq!(
            err(sdpa(&q, &t(&[3, 5, 4]), &v, None, false, None)),
            "lhs [2, 3, 4] and rhs [3, 5, 4]: \
             the batch dims (all but the last 2) must broadcast, but q, k, v have [2], [3], [2]"
        );
        assert_eq!(
            err(sdpa(&q, &k, &v, Some(&t(&[2, 3, 4])), false, None)),
            "lhs [2, 3, 4] and rhs [2, 3, 5]: the mask must broadcast to the scores' shape [2, 3, 5] [..., Lq, Lk]"
        );
        let f64_mask = Tensor::zeros([3, 5], DType::F64, &dev).unwrap();
        assert_eq!(
            err(sdpa(&q, &k, &v, Some(&f64_mask), false, None)),
            "dtypes differ: lhs is f32, rhs is f64 (convert one with to_dtype)"
        );
        let i64_mask = Tensor::zeros([3, 5], DType::I64, &dev).unwrap();
        assert_eq!(
            err(sdpa(&q, &k, &v, Some(&i64_mask), false, None)),
            "not supported for dtype i64 (expected a u8 boolean mask or an additive mask of the query's float dtype)"
        );
        assert_eq!(
            err(sdpa(&q, &k.to_dtype(DType::BF16).unwrap(), &v, None, false, None)),
            "dtypes differ: lhs is f32, rhs is bf16 (convert one with to_dtype)"
        );
        let ints = q.to_dtype(DType::I64).unwrap();
        assert_eq!(
            err(sdpa(&ints, &ints, &ints, None, false, None)),
            "not supported for dtype i64 (expected a float dtype (f32, f64, f16, bf16))"
        );
        assert_eq!(err(sdpa(&q, &k, &v, None, false, Some(f64::NAN))), "scale NaN must be finite");
    }
}

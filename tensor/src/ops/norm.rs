//! Normalisation layers, forward: LayerNorm (Ba, Kiros & Hinton 2016), RMSNorm (Zhang &
//! Sennrich 2019) and GroupNorm (Wu & He 2018), with PyTorch semantics.
//!
//! - `layer_norm`: `(x - mean) / sqrt(var + eps) * w + b` over the last `k` dims;
//! - `rms_norm`: `x / sqrt(mean(x^2) + eps) * w` over the last dim;
//! - `group_norm`: on `[N, C, *]`, the layer-norm formula over each group of `C / G`
//!   channels (and all positions), then a per-channel `w`, `b`.
//!
//! `var` is the biased variance (divide by `n`). Mean and variance are computed in the
//! accumulator type (f32 for f32/f16/bf16, f64 for f64) in two passes, mean first and
//! then the mean of squared deviations, which stays accurate when the mean is large
//! next to the spread (kernel: `aigc_kernels::cpu::norm`).
//!
//! Each norm has a fused backward too (`layer_norm_backward`, ...): from the input and
//! the gradient of the output, the input gradient and the parameter gradients in one
//! kernel, by the closed forms in `aigc_kernels::cpu::norm`.

use crate::storage::{CpuStorage, map_float};
use crate::{Error, Result, Tensor, WithDType};
use aigc_kernels::cpu::norm::{self, Norm};
use aigc_kernels::{FloatElem, Layout};

impl Tensor {
    /// LayerNorm over the last `normalized_dims` dims:
    /// `(x - mean) / sqrt(var + eps) * weight + bias`. `weight` and `bias`, when given,
    /// have the shape of those dims (`self.dims()[rank - normalized_dims..]`).
    pub fn layer_norm(
        &self,
        normalized_dims: usize,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        const OP: &str = "layer_norm";
        let (norm, param_shape) = self.layer_norm_spec(OP, normalized_dims)?;
        self.apply_norm(OP, norm, &param_shape, weight, bias, eps)
    }

    /// The gradients of [`Tensor::layer_norm`], called on its input: given `grad`, the
    /// gradient of the output, returns `(dx, dweight, dbias)`. The parameter gradients
    /// have the normalised dims' shape and are returned whether or not the forward had
    /// the parameters (the bias does not enter the backward, so it is not an argument).
    pub fn layer_norm_backward(
        &self,
        grad: &Tensor,
        normalized_dims: usize,
        weight: Option<&Tensor>,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        const OP: &str = "layer_norm_backward";
        let (norm, param_shape) = self.layer_norm_spec(OP, normalized_dims)?;
        self.norm_backward(OP, norm, &param_shape, grad, weight, eps)
    }

    /// RMSNorm over the last dim: `x / sqrt(mean(x^2) + eps) * weight`; `weight`, when
    /// given, has the last dim's size.
    pub fn rms_norm(&self, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        const OP: &str = "rms_norm";
        let (norm, param_shape) = self.rms_norm_spec(OP)?;
        self.apply_norm(OP, norm, &param_shape, weight, None, eps)
    }

    /// The gradients of [`Tensor::rms_norm`], called on its input: `(dx, dweight)` from
    /// `grad`, the gradient of the output (`dweight` has the last dim's size).
    pub fn rms_norm_backward(&self, grad: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<(Tensor, Tensor)> {
        const OP: &str = "rms_norm_backward";
        let (norm, param_shape) = self.rms_norm_spec(OP)?;
        let (dx, dweight, _) = self.norm_backward(OP, norm, &param_shape, grad, weight, eps)?;
        Ok((dx, dweight))
    }

    /// GroupNorm on `[N, C, *]`: splits the `C` channels into `num_groups` groups and
    /// normalises each (sample, group) over its channels and positions, then applies the
    /// per-channel `weight` and `bias` (each of shape `[C]`).
    pub fn group_norm(
        &self,
        num_groups: usize,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        const OP: &str = "group_norm";
        let (norm, param_shape) = self.group_norm_spec(OP, num_groups)?;
        self.apply_norm(OP, norm, &param_shape, weight, bias, eps)
    }

    /// The gradients of [`Tensor::group_norm`], called on its input: `(dx, dweight,
    /// dbias)` from `grad`, the gradient of the output (the parameter gradients are `[C]`).
    pub fn group_norm_backward(
        &self,
        grad: &Tensor,
        num_groups: usize,
        weight: Option<&Tensor>,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        const OP: &str = "group_norm_backward";
        let (norm, param_shape) = self.group_norm_spec(OP, num_groups)?;
        self.norm_backward(OP, norm, &param_shape, grad, weight, eps)
    }

    /// Checks `normalized_dims`; returns the kernel's [`Norm`] and the parameter shape.
    fn layer_norm_spec(&self, op: &'static str, normalized_dims: usize) -> Result<(Norm, Vec<usize>)> {
        if normalized_dims == 0 || normalized_dims > self.rank() {
            return Err(Error::bad_shape(
                op,
                &self.shape(),
                format!("normalized_dims {normalized_dims} must be between 1 and the rank {}", self.rank()),
            ));
        }
        Ok((Norm::Layer { dims: normalized_dims }, self.dims()[self.rank() - normalized_dims..].to_vec()))
    }

    /// Checks the rank; returns the kernel's [`Norm`] and the parameter shape.
    fn rms_norm_spec(&self, op: &'static str) -> Result<(Norm, Vec<usize>)> {
        let Some(&last) = self.dims().last() else {
            return Err(Error::bad_shape(op, &self.shape(), "need at least 1 dim to normalise over"));
        };
        Ok((Norm::Rms, vec![last]))
    }

    /// Checks the rank and `num_groups`; returns the kernel's [`Norm`] and the parameter shape.
    fn group_norm_spec(&self, op: &'static str, num_groups: usize) -> Result<(Norm, Vec<usize>)> {
        if self.rank() < 2 {
            return Err(Error::bad_shape(op, &self.shape(), "need at least 2 dims [N, C, *]"));
        }
        let channels = self.dims()[1];
        if num_groups == 0 || !channels.is_multiple_of(num_groups) {
            return Err(Error::bad_shape(
                op,
                &self.shape(),
                format!("num_groups {num_groups} must be at least 1 and divide the {channels} channels (dim 1)"),
            ));
        }
        Ok((Norm::Group { groups: num_groups }, vec![channels]))
    }

    /// Checks `eps`, the dtype and the parameters, then runs the norm kernel.
    fn apply_norm(
        &self,
        op: &'static str,
        norm: Norm,
        param_shape: &[usize],
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        self.check_norm_args(op, param_shape, weight, bias, eps)?;
        let out = self.read_cpu(|s, l| Ok(map_float!(op, s, |x| normalize_typed(x, l, norm, weight, bias, eps)?)))?;
        Ok(Tensor::from_cpu(out, self.dims()))
    }

    /// Checks the arguments as the forward does, and `grad` against this input; then runs
    /// the backward kernel. Returns `(dx, dweight, dbias)`.
    fn norm_backward(
        &self,
        op: &'static str,
        norm: Norm,
        param_shape: &[usize],
        grad: &Tensor,
        weight: Option<&Tensor>,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        self.check_norm_args(op, param_shape, weight, None, eps)?;
        self.expect_gradient_of(grad, op, "input")?;
        let [dx, dweight, dbias] = self.read_cpu2(grad, op, |sx, lx, sg, lg| match (sx, sg) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => norm_grads_typed(x, lx, g, lg, norm, weight, eps),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => norm_grads_typed(x, lx, g, lg, norm, weight, eps),
            (CpuStorage::F16(x), CpuStorage::F16(g)) => norm_grads_typed(x, lx, g, lg, norm, weight, eps),
            (CpuStorage::BF16(x), CpuStorage::BF16(g)) => norm_grads_typed(x, lx, g, lg, norm, weight, eps),
            (x, _) => {
                Err(Error::UnsupportedDType { op, dtype: x.dtype(), expected: "a float dtype (f32, f64, f16, bf16)" })
            }
        })?;
        Ok((
            Tensor::from_cpu(dx, self.dims()),
            Tensor::from_cpu(dweight, param_shape),
            Tensor::from_cpu(dbias, param_shape),
        ))
    }

    /// The checks shared by the forward and the backward of the norms.
    fn check_norm_args(
        &self,
        op: &'static str,
        param_shape: &[usize],
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<()> {
        if !(eps >= 0.0 && eps.is_finite()) {
            return Err(Error::invalid(op, format!("eps {eps} must be finite and >= 0")));
        }
        self.expect_float(op)?;
        for (name, param) in [("weight", weight), ("bias", bias)] {
            if let Some(param) = param {
                self.check_norm_param(op, name, param, param_shape)?;
            }
        }
        Ok(())
    }

    /// A weight or bias must be on this device, of this dtype, and shaped `shape`.
    fn check_norm_param(&self, op: &'static str, name: &str, param: &Tensor, shape: &[usize]) -> Result<()> {
        self.same_device(param, op)?;
        self.same_dtype(param, op)?;
        if param.dims() != shape {
            return Err(Error::ShapeMismatch {
                op,
                lhs: self.shape(),
                rhs: param.shape(),
                reason: format!("{name} must have shape {shape:?}, got {}", param.shape()),
            });
        }
        Ok(())
    }
}

/// The kernel call for one dtype: the (small) parameters are read row-major first.
fn normalize_typed<T: FloatElem + WithDType>(
    x: &[T],
    layout: &Layout,
    norm: Norm,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Vec<T>> {
    let weight = weight.map(Tensor::to_vec::<T>).transpose()?;
    let bias = bias.map(Tensor::to_vec::<T>).transpose()?;
    Ok(norm::normalize(x, layout, norm, weight.as_deref(), bias.as_deref(), eps))
}

/// The backward kernel call for one dtype; the three gradients as buffers.
fn norm_grads_typed<T: FloatElem + WithDType>(
    x: &[T],
    x_layout: &Layout,
    g: &[T],
    g_layout: &Layout,
    norm: Norm,
    weight: Option<&Tensor>,
    eps: f64,
) -> Result<[CpuStorage; 3]> {
    let weight = weight.map(Tensor::to_vec::<T>).transpose()?;
    let grads = norm::normalize_backward(x, x_layout, g, g_layout, norm, weight.as_deref(), eps);
    Ok([T::into_storage(grads.dx), T::into_storage(grads.dweight), T::into_storage(grads.dbias)])
}

#[cfg(test)]
mod tests {
    use crate::testing::*;
    use crate::{DType, Device, Tensor};
    use proptest::prelude::*;

    /// Naive normalisation of `x` viewed as `[rows, n]`, written with plain loops:
    /// `center` subtracts the mean (else RMS); `param(r, p)` is the weight/bias index of
    /// position `p` of row `r`.
    fn reference(
        x: &Tensor,
        n: usize,
        center: bool,
        (weight, bias): (Option<&Tensor>, Option<&Tensor>),
        eps: f64,
        param: impl Fn(usize, usize) -> usize,
    ) -> Vec<f64> {
        let x = x.to_f64_vec().unwrap();
        let (weight, bias) = (weight.map(|w| w.to_f64_vec().unwrap()), bias.map(|b| b.to_f64_vec().unwrap()));
        let mut out = vec![0.0; x.len()];
        if n == 0 {
            return out;
        }
        for r in 0..x.len() / n {
            let row = &x[r * n..(r + 1) * n];
            let mean = if center { row.iter().sum::<f64>() / n as f64 } else { 0.0 };
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
            for p in 0..n {
                let w = weight.as_ref().map_or(1.0, |w| w[param(r, p)]);
                let b = bias.as_ref().map_or(0.0, |b| b[param(r, p)]);
                out[r * n + p] = (row[p] - mean) / (var + eps).sqrt() * w + b;
            }
        }
        out
    }

    /// Optional parameter of `shape`, in a random layout (seeded), or `None`.
    fn maybe_param(shape: &[usize], present: bool, kind: ViewKind, seed: u64) -> Option<Tensor> {
        present.then(|| make_view(shape, kind, seed))
    }

    /// A tensor of rank >= 1 and a number of trailing dims to normalise over.
    fn tensor_and_normalized_dims() -> impl Strategy<Value = (Tensor, usize)> {
        shape(4, 5)
            .prop_filter("rank >= 1", |s| !s.is_empty())
            .prop_flat_map(|s| (tensor_of_shape(s.clone()), 1..=s.len()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn layer_norm_matches_naive_reference(
            (t, k) in tensor_and_normalized_dims(),
            (has_w, has_b) in (any::<bool>(), any::<bool>()),
            (kw, kb, seed) in (view_kind(), view_kind(), any::<u64>()),
        ) {
            let pshape = t.dims()[t.rank() - k..].to_vec();
            let (w, b) = (maybe_param(&pshape, has_w, kw, seed), maybe_param(&pshape, has_b, kb, seed ^ 1));
            let got = t.layer_norm(k, w.as_ref(), b.as_ref(), 1e-5).unwrap();
            prop_assert_eq!(got.dims(), t.dims());
            let n = pshape.iter().product();
            let want = reference(&t, n, true, (w.as_ref(), b.as_ref()), 1e-5, |_, p| p);
            assert_close(&got.to_f64_vec().unwrap(), &want, 1e-4, 1e-4, "layer_norm");
        }

        #[test]
        fn rms_norm_matches_naive_reference(
            (t, _) in tensor_and_normalized_dims(),
            has_w in any::<bool>(),
            (kw, seed) in (view_kind(), any::<u64>()),
        ) {
            let last = *t.dims().last().unwrap();
            let w = maybe_param(&[last], has_w, kw, seed);
            let got = t.rms_norm(w.as_ref(), 1e-6).unwrap();
            let want = reference(&t, last, false, (w.as_ref(), None), 1e-6, |_, p| p);
            assert_close(&got.to_f64_vec().unwrap(), &want, 1e-4, 1e-4, "rms_norm");
        }

        #[test]
        fn group_norm_matches_naive_reference_with_per_channel_affine(
            (n, groups, per_group) in (0usize..3, 1usize..4, 1usize..3),
            spatial in proptest::collection::vec(0usize..4, 0..3),
            (kind, kw, kb, seed) in (view_kind(), view_kind(), view_kind(), any::<u64>()),
            (has_w, has_b) in (any::<bool>(), any::<bool>()),
        ) {
            let channels = groups * per_group;
            let mut dims = vec![n, channels];
            dims.extend_from_slice(&spatial);
            let t = make_view(&dims, kind, seed);
            let w = maybe_param(&[channels], has_w, kw, seed ^ 2);
            let b = maybe_param(&[channels], has_b, kb, seed ^ 3);
            let got = t.group_norm(groups, w.as_ref(), b.as_ref(), 1e-5).unwrap();
            prop_assert_eq!(got.dims(), t.dims());
            // Row r is (sample r / groups, group r % groups); position p is in channel
            // (r % groups) * per_group + p / S.
            let s: usize = spatial.iter().product();
            let channel = |r: usize, p: usize| (r % groups) * per_group + p / s;
            let want = reference(&t, per_group * s, true, (w.as_ref(), b.as_ref()), 1e-5, channel);
            assert_close(&got.to_f64_vec().unwrap(), &want, 1e-4, 1e-4, "group_norm");
        }

        #[test]
        fn norms_in_f64_are_accurate_to_rounding(
            t in nonempty_shape(2, 4, 4).prop_flat_map(tensor_of_shape),
            (kw, seed) in (view_kind(), any::<u64>()),
        ) {
            let t = t.to_dtype(DType::F64).unwrap();
            let dims = t.dims().to_vec();
            let last = dims[dims.len() - 1];
            let w = make_view(&[last], kw, seed).to_dtype(DType::F64).unwrap();
            let b = make_view(&[last], kw, seed ^ 5).to_dtype(DType::F64).unwrap();
            let got = t.layer_norm(1, Some(&w), Some(&b), 1e-5).unwrap().to_vec::<f64>().unwrap();
            let want = reference(&t, last, true, (Some(&w), Some(&b)), 1e-5, |_, p| p);
            assert_close(&got, &want, 1e-12, 1e-12, "layer_norm f64");
            let got = t.rms_norm(Some(&w), 1e-5).unwrap().to_vec::<f64>().unwrap();
            let want = reference(&t, last, false, (Some(&w), None), 1e-5, |_, p| p);
            assert_close(&got, &want, 1e-12, 1e-12, "rms_norm f64");
            let c = dims[1];
            let wc = make_view(&[c], kw, seed ^ 7).to_dtype(DType::F64).unwrap();
            let s: usize = dims[2..].iter().product();
            let got = t.group_norm(1, Some(&wc), None, 1e-5).unwrap().to_vec::<f64>().unwrap();
            let want = reference(&t, c * s, true, (Some(&wc), None), 1e-5, |_, p| p / s);
            assert_close(&got, &want, 1e-12, 1e-12, "group_norm f64");
        }
    }

    /// `d/dx sum(g * f(x))` by central differences, for every element of `x` (f64).
    fn numeric_grad(x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor, g: &[f64]) -> Vec<f64> {
        let dims = x.dims().to_vec();
        let base = x.to_vec::<f64>().unwrap();
        let loss = |v: &[f64]| {
            let y = f(&Tensor::from_vec(v.to_vec(), &dims[..], &Device::Cpu).unwrap()).to_vec::<f64>().unwrap();
            y.iter().zip(g).map(|(a, b)| a * b).sum::<f64>()
        };
        (0..base.len())
            .map(|i| {
                // h = 1e-5: the rounding error of the two losses (hundreds of terms) over 2h
                // stays near 1e-8, where h = 1e-6 gave 1.3e-7 and failed the 1e-7 tolerance
                // on a true gradient of zero; the truncation error (h^2 f''') is smaller.
                let h = 1e-5;
                let (mut up, mut down) = (base.clone(), base.clone());
                up[i] += h;
                down[i] -= h;
                (loss(&up) - loss(&down)) / (2.0 * h)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn norm_backwards_match_finite_differences_in_f64(
            (t, k) in tensor_and_normalized_dims(),
            (kg, seed, has_w, rms) in (view_kind(), any::<u64>(), any::<bool>(), any::<bool>()),
        ) {
            let f64t = |t: Tensor| t.to_dtype(DType::F64).unwrap();
            let x = f64t(t);
            let g = f64t(make_view(x.dims(), kg, seed));
            let gv = g.to_vec::<f64>().unwrap();
            let k = if rms { 1 } else { k };
            let pshape = x.dims()[x.rank() - k..].to_vec();
            let w = f64t(make_view(&pshape, ViewKind::Contiguous, seed ^ 1));
            let w = has_w.then_some(&w);
            let eps = 0.1;
            let (dx, dw, db) = if rms {
                let (dx, dw) = x.rms_norm_backward(&g, w, eps).unwrap();
                (dx, dw, None)
            } else {
                let (dx, dw, db) = x.layer_norm_backward(&g, k, w, eps).unwrap();
                (dx, dw, Some(db))
            };
            prop_assert_eq!(dx.dims(), x.dims());
            prop_assert_eq!(dw.dims(), &pshape[..]);
            let forward = |x: &Tensor, w: &Tensor, b: &Tensor| {
                if rms { x.rms_norm(Some(w), eps) } else { x.layer_norm(k, Some(w), Some(b), eps) }.unwrap()
            };
            let ones = Tensor::ones(&pshape[..], DType::F64, &Device::Cpu).unwrap();
            let zeros = Tensor::zeros(&pshape[..], DType::F64, &Device::Cpu).unwrap();
            let w_or_ones = w.cloned().unwrap_or(ones.clone());
            let want_dx = numeric_grad(&x.contiguous().unwrap(), &|x| forward(x, &w_or_ones, &zeros), &gv);
            assert_close(&dx.to_vec::<f64>().unwrap(), &want_dx, 1e-6, 1e-7, "dx");
            let want_dw = numeric_grad(&w_or_ones, &|w| forward(&x, w, &zeros), &gv);
            assert_close(&dw.to_vec::<f64>().unwrap(), &want_dw, 1e-6, 1e-7, "dweight");
            if let Some(db) = db {
                let want_db = numeric_grad(&zeros, &|b| forward(&x, &w_or_ones, b), &gv);
                assert_close(&db.to_vec::<f64>().unwrap(), &want_db, 1e-6, 1e-7, "dbias");
            }
        }

        #[test]
        fn f32_norm_backwards_agree_with_f64_on_strided_views(
            (t, k) in tensor_and_normalized_dims(),
            (kg, seed) in (view_kind(), any::<u64>()),
        ) {
            let pshape = t.dims()[t.rank() - k..].to_vec();
            let g = make_view(t.dims(), kg, seed);
            let w = make_view(&pshape, ViewKind::Contiguous, seed ^ 1);
            let f64t = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let (dx, dw, db) = t.layer_norm_backward(&g, k, Some(&w), 1e-3).unwrap();
            let (dx64, dw64, db64) = f64t(&t).layer_norm_backward(&f64t(&g), k, Some(&f64t(&w)), 1e-3).unwrap();
            assert_close(&dx.to_f64_vec().unwrap(), &dx64.to_vec::<f64>().unwrap(), 1e-3, 1e-3, "dx");
            assert_close(&dw.to_f64_vec().unwrap(), &dw64.to_vec::<f64>().unwrap(), 1e-3, 1e-3, "dweight");
            assert_close(&db.to_f64_vec().unwrap(), &db64.to_vec::<f64>().unwrap(), 1e-3, 1e-3, "dbias");
        }
    }

    #[test]
    fn group_norm_backward_matches_finite_differences() {
        let x = make_view(&[2, 4, 3], ViewKind::Transposed, 5).to_dtype(DType::F64).unwrap();
        let g = make_view(&[2, 4, 3], ViewKind::Contiguous, 6).to_dtype(DType::F64).unwrap();
        let w = make_view(&[4], ViewKind::Contiguous, 7).to_dtype(DType::F64).unwrap();
        let b = Tensor::zeros([4], DType::F64, &Device::Cpu).unwrap();
        let gv = g.to_vec::<f64>().unwrap();
        let (dx, dw, db) = x.group_norm_backward(&g, 2, Some(&w), 0.1).unwrap();
        let want_dx =
            numeric_grad(&x.contiguous().unwrap(), &|x| x.group_norm(2, Some(&w), Some(&b), 0.1).unwrap(), &gv);
        assert_close(&dx.to_vec::<f64>().unwrap(), &want_dx, 1e-6, 1e-7, "dx");
        let want_dw = numeric_grad(&w, &|w| x.group_norm(2, Some(w), Some(&b), 0.1).unwrap(), &gv);
        assert_close(&dw.to_vec::<f64>().unwrap(), &want_dw, 1e-6, 1e-7, "dweight");
        let want_db = numeric_grad(&b, &|b| x.group_norm(2, Some(&w), Some(b), 0.1).unwrap(), &gv);
        assert_close(&db.to_vec::<f64>().unwrap(), &want_db, 1e-6, 1e-7, "dbias");
    }

    #[test]
    fn norm_backward_errors_name_the_op_and_the_problem() {
        let dev = Device::Cpu;
        let x = Tensor::zeros([2, 3], DType::F32, &dev).unwrap();
        let err = |r: crate::Result<(Tensor, Tensor, Tensor)>| r.err().unwrap().to_string();
        assert_eq!(
            err(x.layer_norm_backward(&Tensor::zeros([3, 2], DType::F32, &dev).unwrap(), 1, None, 1e-5)),
            "layer_norm_backward: lhs [2, 3] and rhs [3, 2]: the gradient must have the input's shape"
        );
        assert_eq!(
            err(x.layer_norm_backward(&x.to_dtype(DType::F64).unwrap(), 1, None, 1e-5)),
            "layer_norm_backward: dtypes differ: lhs is f32, rhs is f64 (convert one with to_dtype)"
        );
        assert_eq!(
            err(x.group_norm_backward(&x, 2, None, 1e-5)),
            "group_norm_backward: input of shape [2, 3]: num_groups 2 must be at least 1 and divide the 3 channels (dim 1)"
        );
        let w2 = Tensor::ones([2], DType::F32, &dev).unwrap();
        assert!(
            x.rms_norm_backward(&x, Some(&w2), 1e-5).unwrap_err().to_string().contains("weight must have shape [3]")
        );
    }

    #[test]
    fn half_precision_norms_compute_in_f32_and_round_once() {
        // The reference sees the same rounded inputs; the output is rounded once.
        let t = make_view(&[2, 4, 3], ViewKind::Stepped, 11);
        let w = make_view(&[3], ViewKind::Contiguous, 12);
        let wc = make_view(&[4], ViewKind::Contiguous, 13);
        for dt in [DType::F16, DType::BF16] {
            let (x, w, wc) = (t.to_dtype(dt).unwrap(), w.to_dtype(dt).unwrap(), wc.to_dtype(dt).unwrap());
            let got = x.layer_norm(1, Some(&w), Some(&w), 1e-5).unwrap();
            assert_eq!(got.dtype(), dt);
            let want = reference(&x, 3, true, (Some(&w), Some(&w)), 1e-5, |_, p| p);
            assert_close(&got.to_f64_vec().unwrap(), &want, 1e-2, 2e-2, "half layer_norm");
            let got = x.rms_norm(Some(&w), 1e-5).unwrap().to_f64_vec().unwrap();
            let want = reference(&x, 3, false, (Some(&w), None), 1e-5, |_, p| p);
            assert_close(&got, &want, 1e-2, 2e-2, "half rms_norm");
            let got = x.group_norm(2, Some(&wc), None, 1e-5).unwrap().to_f64_vec().unwrap();
            let want = reference(&x, 6, true, (Some(&wc), None), 1e-5, |r, p| (r % 2) * 2 + p / 3);
            assert_close(&got, &want, 1e-2, 2e-2, "half group_norm");
        }
    }

    #[test]
    fn layer_norm_stays_accurate_for_a_large_mean_in_f32() {
        // Two-pass statistics: the spread of 1e4 + [-2, 2) survives in f32.
        let base = make_view(&[4, 8], ViewKind::Contiguous, 3);
        let t = (&base + 1.0e4).unwrap();
        let got = t.layer_norm(1, None, None, 0.0).unwrap().to_f64_vec().unwrap();
        let want = reference(&t, 8, true, (None, None), 0.0, |_, p| p);
        assert_close(&got, &want, 1e-2, 1e-2, "large mean");
    }

    #[test]
    fn a_constant_row_normalises_to_the_bias() {
        let dev = Device::Cpu;
        let t = Tensor::full(5.0, [2, 3], DType::F64, &dev).unwrap();
        let b = Tensor::new(&[1.0f64, 2.0, 3.0], &dev).unwrap();
        let got = t.layer_norm(1, None, Some(&b), 1e-5).unwrap().to_vec::<f64>().unwrap();
        assert_eq!(got, vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn norm_errors_name_the_op_and_the_problem() {
        let dev = Device::Cpu;
        let x = Tensor::zeros([2, 4, 3], DType::F32, &dev).unwrap();
        let w3 = Tensor::ones([3], DType::F32, &dev).unwrap();
        let w4 = Tensor::ones([4], DType::F32, &dev).unwrap();
        let err = |r: crate::Result<Tensor>| r.unwrap_err().to_string();

        assert_eq!(
            err(x.layer_norm(0, None, None, 1e-5)),
            "layer_norm: input of shape [2, 4, 3]: normalized_dims 0 must be between 1 and the rank 3"
        );
        assert_eq!(
            err(x.layer_norm(4, None, None, 1e-5)),
            "layer_norm: input of shape [2, 4, 3]: normalized_dims 4 must be between 1 and the rank 3"
        );
        assert_eq!(
            err(x.layer_norm(2, Some(&w3), None, 1e-5)),
            "layer_norm: lhs [2, 4, 3] and rhs [3]: weight must have shape [4, 3], got [3]"
        );
        assert_eq!(
            err(x.layer_norm(1, Some(&w3), Some(&w4), 1e-5)),
            "layer_norm: lhs [2, 4, 3] and rhs [4]: bias must have shape [3], got [4]"
        );
        assert_eq!(
            err(x.layer_norm(1, None, Some(&w3.to_dtype(DType::F64).unwrap()), 1e-5)),
            "layer_norm: dtypes differ: lhs is f32, rhs is f64 (convert one with to_dtype)"
        );
        assert_eq!(err(x.layer_norm(1, None, None, -1.0)), "layer_norm: eps -1 must be finite and >= 0");
        assert_eq!(err(x.rms_norm(None, f64::NAN)), "rms_norm: eps NaN must be finite and >= 0");
        assert_eq!(
            err(x.rms_norm(Some(&w4), 1e-6)),
            "rms_norm: lhs [2, 4, 3] and rhs [4]: weight must have shape [3], got [4]"
        );
        let scalar = Tensor::scalar(1.0f32, &dev).unwrap();
        assert_eq!(
            err(scalar.rms_norm(None, 1e-6)),
            "rms_norm: input of shape []: need at least 1 dim to normalise over"
        );
        assert_eq!(
            err(x.group_norm(3, None, None, 1e-5)),
            "group_norm: input of shape [2, 4, 3]: num_groups 3 must be at least 1 and divide the 4 channels (dim 1)"
        );
        assert_eq!(
            err(x.group_norm(0, None, None, 1e-5)),
            "group_norm: input of shape [2, 4, 3]: num_groups 0 must be at least 1 and divide the 4 channels (dim 1)"
        );
        assert_eq!(
            err(x.group_norm(2, Some(&w3), None, 1e-5)),
            "group_norm: lhs [2, 4, 3] and rhs [3]: weight must have shape [4], got [3]"
        );
        assert_eq!(
            err(w3.group_norm(1, None, None, 1e-5)),
            "group_norm: input of shape [3]: need at least 2 dims [N, C, *]"
        );
        let ints = Tensor::zeros([2, 3], DType::I64, &dev).unwrap();
        assert_eq!(
            err(ints.layer_norm(1, None, None, 1e-5)),
            "layer_norm: not supported for dtype i64 (expected a float dtype (f32, f64, f16, bf16))"
        );
    }
}

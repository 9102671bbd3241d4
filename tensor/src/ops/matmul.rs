//! Matrix product with numpy `matmul` semantics: the last two dims multiply, leading
//! (batch) dims broadcast, and a 1-d operand is promoted to a matrix and its added dim
//! removed from the result. [`Tensor::matmul_bias_act`] also adds a bias and applies an
//! activation in the GEMM's epilogue (a linear layer's `act(x W^T + b)` in one pass).

use crate::shape::broadcast_shapes;
use crate::storage::CpuStorage;
use crate::{Error, Result, Tensor, UnaryOp, WithDType};
use aigc_kernels::{FloatElem, Layout, cpu::matmul};

impl Tensor {
    /// `self @ rhs`. `[.., m, k] @ [.., k, n] -> [.., m, n]` with broadcast batch dims.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.matmul_bias_act(rhs, None, None)
    }

    /// `activation(self @ rhs + bias)`: [`Tensor::matmul`], then `bias` (shape `[n]`, one
    /// value per output column) added to every row, then an elementwise activation, all
    /// in the GEMM's epilogue while each block of the output is still in cache. An
    /// activation without a fused f32 kernel ([`UnaryOp::has_f32_kernel`]) is applied
    /// afterwards, with the same result. `rhs` must be a matrix (or a batch of them) when
    /// a bias is given.
    pub fn matmul_bias_act(&self, rhs: &Tensor, bias: Option<&Tensor>, activation: Option<UnaryOp>) -> Result<Tensor> {
        const OP: &str = "matmul";
        if let Some(op) = activation
            && !op.has_f32_kernel()
        {
            return self.matmul_bias_act(rhs, bias, None)?.unary(op, op.name());
        }
        if self.rank() == 0 || rhs.rank() == 0 {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.shape(),
                rhs: rhs.shape(),
                reason: "both operands need at least 1 dim".into(),
            });
        }
        self.same_device(rhs, OP)?;
        self.same_dtype(rhs, OP)?;
        self.expect_float(OP)?;
        if let Some(bias) = bias {
            self.same_device(bias, OP)?;
            self.same_dtype(bias, OP)?;
            let n = rhs.dims()[rhs.rank() - 1];
            if rhs.rank() < 2 || bias.dims() != [n] {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    lhs: rhs.shape(),
                    rhs: bias.shape(),
                    reason: format!("the bias must have shape [n] = [{n}] for a matrix rhs [.., k, n]"),
                });
            }
        }
        let a = if self.rank() == 1 { self.unsqueeze(0)? } else { self.clone() };
        let b = if rhs.rank() == 1 { rhs.unsqueeze(-1)? } else { rhs.clone() };
        let (m, k) = (a.dims()[a.rank() - 2], a.dims()[a.rank() - 1]);
        let (k2, n) = (b.dims()[b.rank() - 2], b.dims()[b.rank() - 1]);
        if k != k2 {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.shape(),
                rhs: rhs.shape(),
                reason: format!("lhs.dim(-1)={k} must equal rhs.dim({})={k2}", if rhs.rank() == 1 { -1 } else { -2 }),
            });
        }
        if b.rank() == 2 && a.rank() > 2 {
            // A stack of matrices times one matrix (a linear layer on [batch, seq, features])
            // is one tall product: fold the batch dims of `a` into its rows.
            let mut shape = a.dims()[..a.rank() - 1].to_vec();
            let out = a.reshape([shape.iter().product(), k])?.matmul_bias_act(&b, bias, activation)?;
            shape.push(n);
            let out = out.reshape(shape)?;
            return if rhs.rank() == 1 { out.squeeze(-1) } else { Ok(out) };
        }
        let batch = broadcast_shapes(OP, &a.dims()[..a.rank() - 2], &b.dims()[..b.rank() - 2]).map_err(|_| {
            Error::ShapeMismatch {
                op: OP,
                lhs: self.shape(),
                rhs: rhs.shape(),
                reason: "batch dims (all but the last two) do not broadcast".into(),
            }
        })?;
        let with = |extra: [usize; 2]| -> Vec<usize> { batch.iter().copied().chain(extra).collect() };
        let a = a.broadcast_to(with([m, k]))?;
        let b = b.broadcast_to(with([k, n]))?;
        let out = a.read_cpu2(&b, OP, |sa, la, sb, lb| match (sa, sb) {
            (CpuStorage::F32(x), CpuStorage::F32(y)) => fused_typed(x, la, y, lb, bias, activation),
            (CpuStorage::F64(x), CpuStorage::F64(y)) => fused_typed(x, la, y, lb, bias, activation),
            (CpuStorage::F16(x), CpuStorage::F16(y)) => fused_typed(x, la, y, lb, bias, activation),
            (CpuStorage::BF16(x), CpuStorage::BF16(y)) => fused_typed(x, la, y, lb, bias, activation),
            (x, _) => Err(Error::UnsupportedDType {
                op: OP,
                dtype: x.dtype(),
                expected: "a float dtype (f32, f64, f16, bf16)",
            }),
        })?;
        let mut out_shape = with([m, n]);
        let out = Tensor::from_cpu(out, &out_shape);
        // Undo the 1-d promotions.
        if rhs.rank() == 1 {
            out_shape.pop();
        }
        if self.rank() == 1 {
            out_shape.remove(out_shape.len() - if rhs.rank() == 1 { 1 } else { 2 });
        }
        out.reshape(out_shape)
    }
}

/// The kernel call for one dtype (operands and bias checked by the caller).
fn fused_typed<T: FloatElem + WithDType>(
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
    bias: Option<&Tensor>,
    activation: Option<UnaryOp>,
) -> Result<CpuStorage> {
    let bias = bias.map(Tensor::to_vec::<T>).transpose()?;
    Ok(T::into_storage(matmul::matmul_fused(a, la, b, lb, bias.as_deref(), activation)))
}

#[cfg(test)]
mod tests {
    use crate::testing::*;
    use crate::{DType, Device, Tensor, UnaryOp};
    use proptest::prelude::*;

    fn naive_matmul(a: &NdArray, b: &NdArray) -> NdArray {
        let (ra, rb) = (a.shape.len(), b.shape.len());
        let (m, k, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 1]);
        let batch_a = &a.shape[..ra - 2];
        let batch_b = &b.shape[..rb - 2];
        let rank = batch_a.len().max(batch_b.len());
        let pad = |s: &[usize]| [vec![1; rank - s.len()], s.to_vec()].concat();
        let (pa, pb) = (pad(batch_a), pad(batch_b));
        let batch: Vec<usize> = pa.iter().zip(&pb).map(|(&x, &y)| if x == 1 { y } else { x }).collect();
        let mut shape = batch.clone();
        shape.extend([m, n]);
        let mut out = NdArray::zeros(&shape);
        let a = NdArray::new([pa.clone(), vec![m, k]].concat(), a.data.clone());
        let b = NdArray::new([pb.clone(), vec![k, n]].concat(), b.data.clone());
        let idxs: Vec<Vec<usize>> = out.indices().collect();
        for idx in idxs {
            let (bi, i, j) = (&idx[..rank], idx[rank], idx[rank + 1]);
            let ia: Vec<usize> = bi.iter().zip(&pa).map(|(&x, &s)| if s == 1 { 0 } else { x }).collect();
            let ib: Vec<usize> = bi.iter().zip(&pb).map(|(&x, &s)| if s == 1 { 0 } else { x }).collect();
            let mut acc = 0.0;
            for p in 0..k {
                acc += a.get(&[ia.clone(), vec![i, p]].concat()) * b.get(&[ib.clone(), vec![p, j]].concat());
            }
            out.set(&idx, acc);
        }
        out
    }

    fn operands() -> impl Strategy<Value = (Tensor, Tensor)> {
        (shape(2, 3), 1usize..3, 0usize..6, 0usize..6, 0usize..6, any::<u64>()).prop_flat_map(
            |(batch, mask, m, k, n, _)| {
                let mut ba = batch.clone();
                let mut bb = batch.clone();
                for d in 0..batch.len() {
                    if (mask >> d) & 1 == 1 { ba[d] = 1 } else { bb[d] = 1 }
                }
                let bb = if mask == 2 { bb[bb.len().min(1)..].to_vec() } else { bb };
                (tensor_of_shape([ba, vec![m, k]].concat()), tensor_of_shape([bb, vec![k, n]].concat()))
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn batched_broadcast_matmul_matches_naive_reference((a, b) in operands()) {
            let got = a.matmul(&b).unwrap();
            let want = naive_matmul(&NdArray::from_tensor(&a), &NdArray::from_tensor(&b));
            prop_assert_eq!(got.dims(), &want.shape[..]);
            assert_close(&got.to_f64_vec().unwrap(), &want.data, 1e-5, 1e-5, "matmul");
            let a64 = a.to_dtype(DType::F64).unwrap();
            let b64 = b.to_dtype(DType::F64).unwrap();
            assert_close(&a64.matmul(&b64).unwrap().to_vec::<f64>().unwrap(), &want.data, 1e-13, 1e-13, "matmul f64");
        }
    }

    /// `op(a @ b + bias)` with separate ops in f64: the reference of the fused product.
    fn separate_ops(a: &Tensor, b: &Tensor, bias: &Tensor, op: Option<UnaryOp>) -> Vec<f64> {
        let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let y = f64_of(a).matmul(&f64_of(b)).unwrap().add(f64_of(bias)).unwrap();
        op.map_or(y.clone(), |op| y.unary(op, op.name()).unwrap()).to_vec::<f64>().unwrap()
    }

    const FUSED_ACTIVATIONS: [Option<UnaryOp>; 5] =
        [None, Some(UnaryOp::Gelu), Some(UnaryOp::Relu), Some(UnaryOp::Tanh), Some(UnaryOp::Softplus)];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn fused_bias_and_activation_match_separate_ops_in_every_float_dtype(
            (a, b) in operands(), act in 0..FUSED_ACTIVATIONS.len(), seed in any::<u64>(),
        ) {
            let op = FUSED_ACTIVATIONS[act];
            let n = b.dims()[b.rank() - 1];
            let bias: Vec<f32> = (0..n).map(|j| ((j as u64 ^ seed) % 17) as f32 / 8.0 - 1.0).collect();
            let bias = Tensor::from_vec(bias, [n], &Device::Cpu).unwrap();
            // f32 and f64 against the separate ops in f64.
            let want = separate_ops(&a, &b, &bias, op);
            let got = a.matmul_bias_act(&b, Some(&bias), op).unwrap();
            let plain = a.matmul(&b).unwrap();
            prop_assert_eq!(got.dims(), plain.dims());
            assert_close(&got.to_f64_vec().unwrap(), &want, 1e-5, 1e-5, "fused f32");
            let t64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let got64 = t64(&a).matmul_bias_act(&t64(&b), Some(&t64(&bias)), op).unwrap();
            assert_close(&got64.to_vec::<f64>().unwrap(), &want, 1e-13, 1e-13, "fused f64");
            // bf16 and f16: the same on the rounded inputs, to the output's rounding.
            for dtype in [DType::BF16, DType::F16] {
                let h = |t: &Tensor| t.to_dtype(dtype).unwrap();
                let (ah, bh, biash) = (h(&a), h(&b), h(&bias));
                let want = separate_ops(&ah, &bh, &biash, op);
                let got = ah.matmul_bias_act(&bh, Some(&biash), op).unwrap();
                prop_assert_eq!(got.dtype(), dtype);
                assert_close(&got.to_f64_vec().unwrap(), &want, 1e-2, 1e-3, "fused half");
            }
        }
    }

    #[test]
    fn fused_bias_is_checked() {
        let dev = Device::Cpu;
        let a = Tensor::zeros([2, 3], DType::F32, &dev).unwrap();
        let b = Tensor::zeros([3, 4], DType::F32, &dev).unwrap();
        let wrong = Tensor::zeros([3], DType::F32, &dev).unwrap();
        let err = a.matmul_bias_act(&b, Some(&wrong), None).unwrap_err().to_string();
        assert!(err.contains("the bias must have shape [n] = [4]"), "{err}");
        let v = Tensor::zeros([3], DType::F32, &dev).unwrap();
        assert!(a.matmul_bias_act(&v, Some(&Tensor::zeros([1], DType::F32, &dev).unwrap()), None).is_err());
        let f64_bias = Tensor::zeros([4], DType::F64, &dev).unwrap();
        assert!(a.matmul_bias_act(&b, Some(&f64_bias), None).unwrap_err().to_string().contains("f64"));
    }

    #[test]
    fn vectors_promote_like_numpy() {
        let dev = Device::Cpu;
        let m = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3], &dev).unwrap();
        let v = Tensor::new(&[1.0f32, 0.0, -1.0], &dev).unwrap();
        let mv = m.matmul(&v).unwrap();
        assert_eq!(mv.dims(), &[2]);
        assert_eq!(mv.to_vec::<f32>().unwrap(), vec![-2.0, -2.0]);
        let u = Tensor::new(&[1.0f32, 1.0], &dev).unwrap();
        assert_eq!(u.matmul(&m).unwrap().to_vec::<f32>().unwrap(), vec![5.0, 7.0, 9.0]);
        assert_eq!(v.matmul(&v).unwrap().dims(), &[] as &[usize]);
        assert_eq!(v.matmul(&v).unwrap().to_scalar::<f32>().unwrap(), 2.0);
    }

    #[test]
    fn half_precision_matmul_accumulates_in_f32() {
        let dev = Device::Cpu;
        let a = Tensor::ones([4, 512], DType::BF16, &dev).unwrap();
        let b = Tensor::ones([512, 2], DType::BF16, &dev).unwrap();
        let c = a.matmul(&b).unwrap();
        assert_eq!(c.dtype(), DType::BF16);
        assert_eq!(c.to_f64_vec().unwrap(), vec![512.0; 8]);
        let h = a.to_dtype(DType::F16).unwrap().matmul(&b.to_dtype(DType::F16).unwrap()).unwrap();
        assert_eq!(h.to_f64_vec().unwrap(), vec![512.0; 8]);
    }

    #[test]
    fn matmul_errors_say_which_dims_disagree() {
        let dev = Device::Cpu;
        let a = Tensor::zeros([64, 784], DType::F32, &dev).unwrap();
        let b = Tensor::zeros([400, 784], DType::F32, &dev).unwrap();
        assert_eq!(
            a.matmul(&b).unwrap_err().to_string(),
            "matmul: lhs [64, 784] and rhs [400, 784]: lhs.dim(-1)=784 must equal rhs.dim(-2)=400"
        );
        let x = Tensor::zeros([2, 3, 4], DType::F32, &dev).unwrap();
        let y = Tensor::zeros([5, 4, 6], DType::F32, &dev).unwrap();
        assert!(x.matmul(&y).unwrap_err().to_string().contains("batch dims"));
        let i = Tensor::zeros([2, 2], DType::I64, &dev).unwrap();
        assert!(i.matmul(&i).unwrap_err().to_string().starts_with("matmul: not supported for dtype i64"));
        let s = Tensor::zeros((), DType::F32, &dev).unwrap();
        assert!(a.matmul(&s).is_err());
    }
}

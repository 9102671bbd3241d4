//! Matrix product with numpy `matmul` semantics: the last two dims multiply, leading
//! (batch) dims broadcast, and a 1-d operand is promoted to a matrix and its added dim
//! removed from the result.

use crate::shape::broadcast_shapes;
use crate::storage::zip_float;
use crate::{Error, Result, Tensor};
use aigc_kernels::cpu::matmul;

impl Tensor {
    /// `self @ rhs`. `[.., m, k] @ [.., k, n] -> [.., m, n]` with broadcast batch dims.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        const OP: &str = "matmul";
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
            let out = a.reshape([shape.iter().product(), k])?.matmul(&b)?;
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
        let out =
            a.read_cpu2(&b, OP, |sa, la, sb, lb| Ok(zip_float!(OP, sa, sb, |x, y| matmul::matmul(x, la, y, lb))))?;
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

#[cfg(test)]
mod tests {
    use crate::testing::*;
    use crate::{DType, Device, Tensor};
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

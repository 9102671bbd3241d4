//! Joining tensors: `cat` (`torch.cat`) puts tensors end to end along an existing
//! dimension, `stack` (`torch.stack`) along a new one. The result is allocated once;
//! contiguous inputs are copied into it block by block, views through their layouts.

use crate::shape::resolve_dim;
use crate::storage::{of_dtype, zip_any};
use crate::{Error, Result, Tensor, WithDType};
use aigc_kernels::cpu::copy::{copy_into, interleave_blocks};

impl Tensor {
    /// Concatenates `tensors` along `dim` (negative counts from the end). All must have
    /// the same dtype, device and rank, and the same size in every other dim.
    pub fn cat(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
        concatenate("cat", tensors, dim)
    }

    /// Stacks same-shaped `tensors` along a new dim inserted at `dim`, which may equal
    /// the rank (`-1` appends it at the end): `n` tensors of shape `[a, b]` stacked at
    /// dim 1 give `[a, n, b]`.
    pub fn stack(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
        let first = first_of("stack", tensors)?;
        let d = resolve_dim("stack", dim, first.rank() + 1)?;
        for (k, t) in tensors.iter().enumerate().skip(1) {
            if t.dims() != first.dims() {
                return Err(Error::ShapeMismatch {
                    op: "stack",
                    lhs: first.shape(),
                    rhs: t.shape(),
                    reason: format!("tensor {k} must have the same shape as tensor 0"),
                });
            }
        }
        let expanded = tensors.iter().map(|t| t.unsqueeze(d as isize)).collect::<Result<Vec<_>>>()?;
        concatenate("stack", &expanded.iter().collect::<Vec<_>>(), d as isize)
    }

    /// Pads `dim` with `before` zeros in front and `after` zeros behind (the gradient of
    /// [`Tensor::narrow`]): `[2, 3]` padded along dim 1 by (1, 2) is `[2, 6]`.
    pub fn pad_with_zeros(&self, dim: isize, before: usize, after: usize) -> Result<Tensor> {
        let d = resolve_dim("pad_with_zeros", dim, self.rank())?;
        let mut shape = self.dims().to_vec();
        shape[d] += before + after;
        let out = Tensor::zeros(shape, self.dtype(), &self.device())?;
        out.narrow(d as isize, before, self.dims()[d])?.write_view(self)?;
        Ok(out)
    }

    /// Copies `src` into the elements this view addresses in its buffer (same shape).
    /// Only for a buffer the caller has just allocated: nobody else may observe it, and
    /// `src` must not share it.
    pub(crate) fn write_view(&self, src: &Tensor) -> Result<()> {
        debug_assert_eq!(self.dims(), src.dims());
        debug_assert!(!self.shares_storage_with(src));
        self.write_cpu(|dst, dst_layout| {
            src.read_cpu(|s, src_layout| {
                zip_any!("write_view", dst, s, |d, s| copy_into(s, src_layout, d, dst_layout));
                Ok(())
            })
        })
    }
}

/// The first tensor of a non-empty list.
fn first_of<'a>(op: &'static str, tensors: &[&'a Tensor]) -> Result<&'a Tensor> {
    tensors.first().copied().ok_or_else(|| Error::invalid(op, "need at least one tensor, got an empty list"))
}

/// `cat`, reporting errors as `op`.
fn concatenate(op: &'static str, tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
    let first = first_of(op, tensors)?;
    let d = resolve_dim(op, dim, first.rank())?;
    for (k, t) in tensors.iter().enumerate().skip(1) {
        first.same_dtype(t, op)?;
        first.same_device(t, op)?;
        check_fits_beside(op, first, t, k, d, dim)?;
    }
    let mut shape = first.dims().to_vec();
    shape[d] = tensors.iter().map(|t| t.dims()[d]).sum();
    if tensors.iter().all(|t| t.is_contiguous()) {
        let outer = shape[..d].iter().product();
        let storage = of_dtype!(first.dtype(), join_contiguous(op, tensors, outer)?);
        return Ok(Tensor::from_cpu(storage, &shape));
    }
    let out = Tensor::zeros(shape, first.dtype(), &first.device())?;
    let mut start = 0;
    for t in tensors {
        let len = t.dims()[d];
        out.narrow(d as isize, start, len)?.write_view(t)?;
        start += len;
    }
    Ok(out)
}

/// `cat` of contiguous tensors, each `outer` blocks long: their blocks interleaved.
fn join_contiguous<T: WithDType>(op: &'static str, tensors: &[&Tensor], outer: usize) -> Result<Vec<T>> {
    Tensor::read_contiguous(tensors, op, |parts| interleave_blocks(parts, outer))
}

/// Checks that tensor `k` has the first tensor's rank and sizes in every dim but `d`.
fn check_fits_beside(op: &'static str, first: &Tensor, t: &Tensor, k: usize, d: usize, dim: isize) -> Result<()> {
    let mismatch = |reason: String| Error::ShapeMismatch { op, lhs: first.shape(), rhs: t.shape(), reason };
    if t.rank() != first.rank() {
        return Err(mismatch(format!("tensor {k} has rank {} but tensor 0 has rank {}", t.rank(), first.rank())));
    }
    match (0..first.rank()).find(|&a| a != d && t.dims()[a] != first.dims()[a]) {
        Some(a) => Err(mismatch(format!(
            "tensor {k} has size {} in dim {a} but tensor 0 has {}; only the {op} dim {dim} may differ",
            t.dims()[a],
            first.dims()[a]
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::*;
    use crate::{DType, Device, Tensor};
    use proptest::prelude::*;

    #[test]
    fn pad_with_zeros_surrounds_the_tensor_along_one_dim() {
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3], &Device::Cpu).unwrap();
        let p = x.t().unwrap().pad_with_zeros(1, 1, 2).unwrap();
        assert_eq!(p.dims(), &[3, 5]);
        let want = [0.0, 1.0, 4.0, 0.0, 0.0, 0.0, 2.0, 5.0, 0.0, 0.0, 0.0, 3.0, 6.0, 0.0, 0.0];
        assert_eq!(p.to_vec::<f32>().unwrap(), want);
        assert_eq!(x.pad_with_zeros(0, 0, 0).unwrap().to_vec::<f32>().unwrap(), x.to_vec::<f32>().unwrap());
        assert!(x.pad_with_zeros(2, 1, 1).is_err());
        let i = Tensor::from_slice(&[7i64], [1], &Device::Cpu).unwrap();
        assert_eq!(i.pad_with_zeros(0, 2, 0).unwrap().to_vec::<i64>().unwrap(), vec![0, 0, 7]);
        let _ = DType::F32;
    }

    /// Naive concatenation: output element `idx` comes from the piece whose range along
    /// `d` contains `idx[d]`.
    fn naive_cat(pieces: &[NdArray], d: usize) -> NdArray {
        let mut shape = pieces[0].shape.clone();
        shape[d] = pieces.iter().map(|p| p.shape[d]).sum();
        let mut out = NdArray::zeros(&shape);
        let idxs: Vec<Vec<usize>> = out.indices().collect();
        for idx in idxs {
            let mut local = idx.clone();
            let mut k = 0;
            while local[d] >= pieces[k].shape[d] {
                local[d] -= pieces[k].shape[d];
                k += 1;
            }
            out.set(&idx, pieces[k].get(&local));
        }
        out
    }

    /// Naive stacking: output element `idx` is element `idx without d` of piece `idx[d]`.
    fn naive_stack(pieces: &[NdArray], d: usize) -> NdArray {
        let mut shape = pieces[0].shape.clone();
        shape.insert(d, pieces.len());
        let mut out = NdArray::zeros(&shape);
        let idxs: Vec<Vec<usize>> = out.indices().collect();
        for idx in idxs {
            let mut local = idx.clone();
            let k = local.remove(d);
            out.set(&idx, pieces[k].get(&local));
        }
        out
    }

    /// A base shape, a dim (possibly negative) and the pieces' sizes along it (some 0),
    /// each piece a random view.
    fn cat_case() -> impl Strategy<Value = (Vec<Tensor>, isize, usize)> {
        (nonempty_shape(1, 4, 4), any::<prop::sample::Index>(), any::<bool>(), prop::collection::vec(0usize..4, 1..4))
            .prop_flat_map(|(shape, pick, negative, sizes)| {
                let d = pick.index(shape.len());
                let dim = if negative { d as isize - shape.len() as isize } else { d as isize };
                let pieces: Vec<_> = sizes
                    .iter()
                    .map(|&n| {
                        let mut s = shape.clone();
                        s[d] = n;
                        tensor_of_shape(s)
                    })
                    .collect();
                (pieces, Just(dim), Just(d))
            })
    }

    /// Shapes for [`cat`](Tensor::cat) of contiguous pieces (the block-by-block path), like
    /// [`cat_case`]'s, each with whether to read that piece at an offset into a larger buffer.
    fn contiguous_cat_case() -> impl Strategy<Value = (Vec<(Vec<usize>, bool)>, usize)> {
        (nonempty_shape(1, 4, 4), any::<prop::sample::Index>(), prop::collection::vec((0usize..4, any::<bool>()), 1..5))
            .prop_map(|(shape, pick, sizes)| {
                let d = pick.index(shape.len());
                let pieces = sizes
                    .iter()
                    .map(|&(n, at_offset)| {
                        let mut s = shape.clone();
                        s[d] = n;
                        (s, at_offset)
                    })
                    .collect();
                (pieces, d)
            })
    }

    /// A contiguous tensor of `shape` and `dtype` with random values (scaled so that
    /// integers are distinct), at an offset when asked: the second half of a buffer twice
    /// its size.
    fn contiguous_piece(shape: &[usize], at_offset: bool, dtype: DType, seed: u64) -> Tensor {
        let mut buffer_shape = shape.to_vec();
        if at_offset {
            buffer_shape.insert(0, 2);
        }
        let t = (make_view(&buffer_shape, ViewKind::Contiguous, seed) * 60.0).unwrap().to_dtype(dtype).unwrap();
        if at_offset { t.narrow(0, 1, 1).unwrap().squeeze(0).unwrap() } else { t }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn cat_of_contiguous_pieces_matches_naive_reference((pieces, d) in contiguous_cat_case(), k in 0usize..3) {
            let dtype = [DType::F32, DType::I64, DType::BF16][k];
            let typed: Vec<Tensor> = pieces
                .iter()
                .enumerate()
                .map(|(seed, (shape, at_offset))| contiguous_piece(shape, *at_offset, dtype, seed as u64))
                .collect();
            prop_assert!(typed.iter().all(Tensor::is_contiguous));
            let refs: Vec<&Tensor> = typed.iter().collect();
            let got = Tensor::cat(&refs, d as isize).unwrap();
            let want = naive_cat(&typed.iter().map(NdArray::from_tensor).collect::<Vec<_>>(), d);
            prop_assert_eq!(got.dims(), &want.shape[..]);
            prop_assert_eq!(got.to_f64_vec().unwrap(), want.data);
        }

        #[test]
        fn cat_matches_naive_reference_on_views_with_zero_size_pieces((pieces, dim, d) in cat_case()) {
            let refs: Vec<&Tensor> = pieces.iter().collect();
            let got = Tensor::cat(&refs, dim).unwrap();
            let want = naive_cat(&pieces.iter().map(NdArray::from_tensor).collect::<Vec<_>>(), d);
            prop_assert_eq!(got.dims(), &want.shape[..]);
            prop_assert_eq!(got.to_f64_vec().unwrap(), want.data);
        }

        #[test]
        fn cat_copies_every_dtype_exactly((pieces, dim, d) in cat_case(), k in 0usize..5) {
            let dtype = [DType::I64, DType::U8, DType::F16, DType::BF16, DType::F64][k];
            // Scale so the integer dtypes see distinct values.
            let typed: Vec<Tensor> = pieces.iter().map(|p| (p * 60.0).unwrap().to_dtype(dtype).unwrap()).collect();
            let refs: Vec<&Tensor> = typed.iter().collect();
            let got = Tensor::cat(&refs, dim).unwrap();
            prop_assert_eq!(got.dtype(), dtype);
            let want = naive_cat(&typed.iter().map(NdArray::from_tensor).collect::<Vec<_>>(), d);
            prop_assert_eq!(got.to_f64_vec().unwrap(), want.data);
        }

        #[test]
        fn stack_matches_naive_reference_at_every_position_including_the_end(
            (pieces, dim, d) in (nonempty_shape(0, 3, 4), 1usize..4, any::<prop::sample::Index>(), any::<bool>())
                .prop_flat_map(|(shape, n, pick, negative)| {
                    let d = pick.index(shape.len() + 1);
                    let dim = if negative { d as isize - shape.len() as isize - 1 } else { d as isize };
                    (prop::collection::vec(tensor_of_shape(shape), n), Just(dim), Just(d))
                })
        ) {
            let refs: Vec<&Tensor> = pieces.iter().collect();
            let got = Tensor::stack(&refs, dim).unwrap();
            let want = naive_stack(&pieces.iter().map(NdArray::from_tensor).collect::<Vec<_>>(), d);
            prop_assert_eq!(got.dims(), &want.shape[..]);
            prop_assert_eq!(got.to_f64_vec().unwrap(), want.data);
        }
    }

    #[test]
    fn cat_of_transposed_i64_views_reads_them_in_logical_order() {
        let dev = Device::Cpu;
        let a = Tensor::from_vec((0..6i64).collect::<Vec<_>>(), [2, 3], &dev).unwrap().t().unwrap();
        let b = Tensor::from_vec(vec![10i64, 11, 12], [3, 1], &dev).unwrap();
        let got = Tensor::cat(&[&a, &b], -1).unwrap();
        assert_eq!(got.to_vec2::<i64>().unwrap(), vec![vec![0, 3, 10], vec![1, 4, 11], vec![2, 5, 12]]);
        let s = Tensor::stack(&[&b, &b], 2).unwrap();
        assert_eq!(s.dims(), &[3, 1, 2]);
        assert_eq!(s.to_vec::<i64>().unwrap(), vec![10, 10, 11, 11, 12, 12]);
    }

    #[test]
    fn cat_shape_mismatch_names_both_shapes_and_the_dim() {
        let dev = Device::Cpu;
        let a = Tensor::zeros([2, 3], DType::F32, &dev).unwrap();
        let b = Tensor::zeros([4, 5], DType::F32, &dev).unwrap();
        let e = Tensor::cat(&[&a, &b], 1).unwrap_err().to_string();
        assert_eq!(
            e,
            "cat: lhs [2, 3] and rhs [4, 5]: tensor 1 has size 4 in dim 0 but tensor 0 has 2; only the cat dim 1 may \
             differ"
        );
        let c = Tensor::zeros([2], DType::F32, &dev).unwrap();
        let e = Tensor::cat(&[&a, &a, &c], 0).unwrap_err().to_string();
        assert_eq!(e, "cat: lhs [2, 3] and rhs [2]: tensor 2 has rank 1 but tensor 0 has rank 2");
        let e = Tensor::stack(&[&a, &b], 0).unwrap_err().to_string();
        assert_eq!(e, "stack: lhs [2, 3] and rhs [4, 5]: tensor 1 must have the same shape as tensor 0");
    }

    #[test]
    fn cat_and_stack_reject_empty_lists_bad_dims_and_mixed_dtypes() {
        let dev = Device::Cpu;
        assert_eq!(Tensor::cat(&[], 0).unwrap_err().to_string(), "cat: need at least one tensor, got an empty list");
        assert_eq!(
            Tensor::stack(&[], 0).unwrap_err().to_string(),
            "stack: need at least one tensor, got an empty list"
        );
        let a = Tensor::zeros([2, 3], DType::F32, &dev).unwrap();
        let b = Tensor::zeros([2, 3], DType::F64, &dev).unwrap();
        assert_eq!(
            Tensor::cat(&[&a, &b], 0).unwrap_err().to_string(),
            "cat: dtypes differ: lhs is f32, rhs is f64 (convert one with to_dtype)"
        );
        assert_eq!(
            Tensor::stack(&[&a, &b], 0).unwrap_err().to_string(),
            "stack: dtypes differ: lhs is f32, rhs is f64 (convert one with to_dtype)"
        );
        assert_eq!(
            Tensor::cat(&[&a], 2).unwrap_err().to_string(),
            "cat: dim 2 is out of range for a tensor of rank 2 (expected -2..2)"
        );
        assert_eq!(
            Tensor::stack(&[&a], -4).unwrap_err().to_string(),
            "stack: dim -4 is out of range for a tensor of rank 3 (expected -3..3)"
        );
    }
}

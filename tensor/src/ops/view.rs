//! Views: ops that change only the layout (shape, strides, offset), never the buffer.
//! `reshape` copies only when the strides make a view impossible (as `torch.reshape`).

use crate::shape::{resolve_dim, resolve_dims};
use crate::{Error, Result, Shape, Tensor};

impl Tensor {
    /// The same elements under another shape with the same element count. A view when
    /// the strides allow it, else a copy.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.numel() != self.numel() {
            return Err(Error::ShapeMismatch {
                op: "reshape",
                lhs: self.shape(),
                rhs: shape.clone(),
                reason: format!("{} elements cannot be viewed as {} elements", self.numel(), shape.numel()),
            });
        }
        match self.layout().reshape(shape.dims()) {
            Some(layout) => Ok(self.with_layout(layout)),
            None => Ok(self.copy()?.with_layout(aigc_kernels::Layout::contiguous(shape.dims()))),
        }
    }

    /// Reshape where one entry may be -1, inferred from the element count.
    pub fn reshape_infer(&self, dims: &[isize]) -> Result<Tensor> {
        let known: usize = dims.iter().filter(|&&d| d >= 0).map(|&d| d as usize).product();
        let holes = dims.iter().filter(|&&d| d < 0).count();
        if holes > 1 || dims.iter().any(|&d| d < -1) {
            return Err(Error::invalid("reshape", format!("{dims:?}: at most one -1 and no other negative sizes")));
        }
        let fill = if holes == 1 {
            if known == 0 || !self.numel().is_multiple_of(known) {
                return Err(Error::invalid(
                    "reshape",
                    format!("cannot infer the -1 in {dims:?} for {} elements", self.numel()),
                ));
            }
            self.numel() / known
        } else {
            0
        };
        let shape: Vec<usize> = dims.iter().map(|&d| if d < 0 { fill } else { d as usize }).collect();
        self.reshape(shape)
    }

    /// Merges dims `start..=end` into one.
    pub fn flatten(&self, start: isize, end: isize) -> Result<Tensor> {
        if self.rank() == 0 {
            return self.reshape([1]);
        }
        let s = resolve_dim("flatten", start, self.rank())?;
        let e = resolve_dim("flatten", end, self.rank())?;
        if s > e {
            return Err(Error::invalid("flatten", format!("start dim {start} comes after end dim {end}")));
        }
        let d = self.dims();
        let mut shape = d[..s].to_vec();
        shape.push(d[s..=e].iter().product());
        shape.extend_from_slice(&d[e + 1..]);
        self.reshape(shape)
    }
    /// Merges dims `start..` into one (`x.flatten_from(1)` turns `[b, c, h, w]` into `[b, c*h*w]`).
    pub fn flatten_from(&self, start: isize) -> Result<Tensor> {
        self.flatten(start, -1)
    }
    /// All elements as one dimension.
    pub fn flatten_all(&self) -> Result<Tensor> {
        self.reshape(self.numel())
    }

    /// Reorders dims: result dim `i` is input dim `perm[i]`.
    pub fn permute(&self, perm: &[isize]) -> Result<Tensor> {
        if perm.len() != self.rank() {
            return Err(Error::bad_shape(
                "permute",
                &self.shape(),
                format!("permutation {perm:?} has {} entries, expected {}", perm.len(), self.rank()),
            ));
        }
        let mut resolved = Vec::with_capacity(perm.len());
        for &p in perm {
            resolved.push(resolve_dim("permute", p, self.rank())?);
        }
        let mut seen = vec![false; perm.len()];
        for &p in &resolved {
            if std::mem::replace(&mut seen[p], true) {
                return Err(Error::invalid("permute", format!("{perm:?} is not a permutation: dim {p} repeats")));
            }
        }
        Ok(self.with_layout(self.layout().permute(&resolved)))
    }

    /// Swaps two dims.
    pub fn transpose(&self, d0: isize, d1: isize) -> Result<Tensor> {
        let a = resolve_dim("transpose", d0, self.rank())?;
        let b = resolve_dim("transpose", d1, self.rank())?;
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        perm.swap(a, b);
        Ok(self.with_layout(self.layout().permute(&perm)))
    }

    /// Swaps the last two dims (the matrix transpose of a batch of matrices).
    pub fn t(&self) -> Result<Tensor> {
        if self.rank() < 2 {
            return Err(Error::bad_shape("t", &self.shape(), "need at least 2 dims"));
        }
        self.transpose(-2, -1)
    }

    /// Keeps `len` entries of `dim` starting at `start`.
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Tensor> {
        let d = resolve_dim("narrow", dim, self.rank())?;
        let size = self.dims()[d];
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::bad_shape(
                "narrow",
                &self.shape(),
                format!("range {start}..{} is outside dim {dim} of size {size}", start.saturating_add(len)),
            ));
        }
        Ok(self.with_layout(self.layout().narrow(d, start, len)))
    }

    /// Entries `start, start + step, ...` below `end` of `dim` (python's `x[start:end:step]`).
    pub fn slice(&self, dim: isize, start: usize, end: usize, step: usize) -> Result<Tensor> {
        let d = resolve_dim("slice", dim, self.rank())?;
        let size = self.dims()[d];
        if step == 0 || start > end || end > size {
            return Err(Error::bad_shape(
                "slice",
                &self.shape(),
                format!(
                    "{start}..{end} step {step} on dim {dim} of size {size}: need start <= end <= size and step >= 1"
                ),
            ));
        }
        let len = (end - start).div_ceil(step);
        Ok(self.with_layout(self.layout().strided_narrow(d, start, len, step)))
    }

    /// Views the tensor as `shape` by numpy broadcasting (size-1 and missing leading dims
    /// repeat without copying).
    pub fn broadcast_to(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let target = shape.dims();
        let ok = target.len() >= self.rank()
            && self.dims().iter().zip(&target[target.len() - self.rank()..]).all(|(&a, &b)| a == b || a == 1);
        if !ok {
            return Err(Error::ShapeMismatch {
                op: "broadcast_to",
                lhs: self.shape(),
                rhs: shape,
                reason: "each trailing dim must equal the target's or be 1".into(),
            });
        }
        Ok(self.with_layout(self.layout().broadcast_to(target)))
    }

    /// Alias of [`Tensor::broadcast_to`], as PyTorch names it.
    pub fn expand(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        self.broadcast_to(shape)
    }

    /// Inserts a size-1 dim at `dim` (`-1` appends one at the end).
    pub fn unsqueeze(&self, dim: isize) -> Result<Tensor> {
        let d = resolve_dim("unsqueeze", dim, self.rank() + 1)?;
        Ok(self.with_layout(self.layout().unsqueeze(d)))
    }

    /// Removes dim `dim`, which must have size 1.
    pub fn squeeze(&self, dim: isize) -> Result<Tensor> {
        let d = resolve_dim("squeeze", dim, self.rank())?;
        if self.dims()[d] != 1 {
            return Err(Error::bad_shape(
                "squeeze",
                &self.shape(),
                format!("dim {dim} has size {}, not 1", self.dims()[d]),
            ));
        }
        Ok(self.with_layout(self.layout().squeeze(d)))
    }

    /// Removes every size-1 dim.
    pub fn squeeze_all(&self) -> Result<Tensor> {
        let mut layout = self.layout().clone();
        for d in (0..self.rank()).rev() {
            if self.dims()[d] == 1 {
                layout = layout.squeeze(d);
            }
        }
        Ok(self.with_layout(layout))
    }

    /// Splits `dim` into pieces of `size` (the last may be smaller); views.
    pub fn split(&self, size: usize, dim: isize) -> Result<Vec<Tensor>> {
        let d = resolve_dim("split", dim, self.rank())?;
        if size == 0 {
            return Err(Error::invalid("split", "split size must be at least 1"));
        }
        let n = self.dims()[d];
        (0..n).step_by(size).map(|start| self.narrow(d as isize, start, size.min(n - start))).collect()
    }

    /// Splits `dim` into pieces of the given sizes, which must add up to the dim; views.
    pub fn split_sizes(&self, sizes: &[usize], dim: isize) -> Result<Vec<Tensor>> {
        let d = resolve_dim("split_sizes", dim, self.rank())?;
        if sizes.iter().sum::<usize>() != self.dims()[d] {
            return Err(Error::bad_shape(
                "split_sizes",
                &self.shape(),
                format!(
                    "sizes {sizes:?} add up to {}, but dim {dim} has size {}",
                    sizes.iter().sum::<usize>(),
                    self.dims()[d]
                ),
            ));
        }
        let mut start = 0;
        sizes
            .iter()
            .map(|&len| {
                let t = self.narrow(d as isize, start, len);
                start += len;
                t
            })
            .collect()
    }

    /// Splits `dim` into `chunks` nearly equal pieces (as `torch.chunk`); views.
    pub fn chunk(&self, chunks: usize, dim: isize) -> Result<Vec<Tensor>> {
        let d = resolve_dim("chunk", dim, self.rank())?;
        if chunks == 0 {
            return Err(Error::invalid("chunk", "need at least 1 chunk"));
        }
        let size = self.dims()[d].div_ceil(chunks).max(1);
        self.split(size, dim)
    }

    /// The view with `dims` permuted to the end, in order (for reductions, which fold
    /// trailing dims). `dims` ascending and already last (a row sum, a mean over the
    /// features) give this tensor itself.
    pub(crate) fn move_dims_last(&self, dims: &[usize]) -> Tensor {
        let first = self.rank() - dims.len();
        if dims.iter().enumerate().all(|(k, &d)| d == first + k) {
            return self.clone();
        }
        let mut perm: Vec<usize> = (0..self.rank()).filter(|d| !dims.contains(d)).collect();
        perm.extend_from_slice(dims);
        self.with_layout(self.layout().permute(&perm))
    }

    /// Resolves reduction dims (empty slice = all dims).
    pub(crate) fn reduce_dims(&self, op: &'static str, dims: &[isize]) -> Result<Vec<usize>> {
        if dims.is_empty() { Ok((0..self.rank()).collect()) } else { resolve_dims(op, dims, self.rank()) }
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::*;
    use crate::{Device, Tensor};
    use proptest::prelude::*;

    fn iota(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|i| i as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn views_share_the_buffer_and_copies_do_not() {
        let x = iota(&[2, 3, 4]);
        for v in [
            x.transpose(0, 2).unwrap(),
            x.narrow(1, 1, 2).unwrap(),
            x.unsqueeze(0).unwrap(),
            x.reshape([6, 4]).unwrap(),
            x.broadcast_to([5, 2, 3, 4]).unwrap(),
            x.slice(2, 0, 4, 2).unwrap(),
        ] {
            assert!(v.shares_storage_with(&x));
        }
        let t = x.transpose(0, 2).unwrap();
        assert!(!t.reshape([24]).unwrap().shares_storage_with(&x));
        assert!(!t.contiguous().unwrap().shares_storage_with(&x));
        assert!(x.contiguous().unwrap().shares_storage_with(&x));
    }

    #[test]
    fn transpose_and_slice_read_the_right_elements() {
        let x = iota(&[2, 3]);
        assert_eq!(x.t().unwrap().to_vec::<f32>().unwrap(), vec![0., 3., 1., 4., 2., 5.]);
        assert_eq!(x.slice(1, 0, 3, 2).unwrap().to_vec::<f32>().unwrap(), vec![0., 2., 3., 5.]);
        assert_eq!(x.narrow(0, 1, 1).unwrap().to_vec::<f32>().unwrap(), vec![3., 4., 5.]);
        let b = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap().unsqueeze(1).unwrap();
        assert_eq!(b.broadcast_to([2, 3]).unwrap().to_vec::<f32>().unwrap(), vec![1., 1., 1., 2., 2., 2.]);
    }

    #[test]
    fn split_and_chunk_cover_the_dim() {
        let x = iota(&[7, 2]);
        let parts = x.chunk(3, 0).unwrap();
        assert_eq!(parts.iter().map(|p| p.dims()[0]).collect::<Vec<_>>(), vec![3, 3, 1]);
        let parts = x.split_sizes(&[2, 5], 0).unwrap();
        assert_eq!(parts[1].to_vec::<f32>().unwrap()[0], 4.0);
        assert!(x.split_sizes(&[2, 2], 0).is_err());
    }

    #[test]
    fn view_errors_name_the_op_and_shapes() {
        let x = iota(&[2, 3]);
        assert_eq!(
            x.reshape([4, 2]).unwrap_err().to_string(),
            "reshape: lhs [2, 3] and rhs [4, 2]: 6 elements cannot be viewed as 8 elements"
        );
        assert!(x.permute(&[0, 0]).unwrap_err().to_string().contains("not a permutation"));
        assert!(x.narrow(1, 2, 2).unwrap_err().to_string().contains("outside dim 1 of size 3"));
        assert!(x.squeeze(0).unwrap_err().to_string().contains("size 2, not 1"));
        assert!(x.broadcast_to([3, 3]).is_err());
        assert!(x.transpose(0, 5).is_err());
        assert!(x.reshape_infer(&[-1, -1]).is_err());
        assert_eq!(x.reshape_infer(&[-1, 2]).unwrap().dims(), &[3, 2]);
        assert!(x.reshape_infer(&[4, -1]).is_err());
    }

    proptest! {
        #[test]
        fn reshape_of_any_view_keeps_row_major_order(t in strided_tensor(4, 6)) {
            let flat = t.to_f64_vec().unwrap();
            let r = t.reshape([t.numel()]).unwrap();
            prop_assert_eq!(r.to_f64_vec().unwrap(), flat.clone());
            let back = r.reshape(t.shape()).unwrap();
            prop_assert_eq!(back.to_f64_vec().unwrap(), flat);
        }

        #[test]
        fn permute_matches_index_math(t in strided_tensor(4, 5)) {
            let rank = t.rank();
            let perm: Vec<isize> = (0..rank as isize).rev().collect();
            let p = t.permute(&perm).unwrap();
            let src = NdArray::from_tensor(&t);
            let got = NdArray::from_tensor(&p);
            for (i, idx) in got.indices().enumerate() {
                let src_idx: Vec<usize> = idx.iter().rev().copied().collect();
                prop_assert_eq!(got.data[i], src.get(&src_idx));
            }
        }
    }
}

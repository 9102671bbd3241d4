//! Indexing with i64 index tensors, as in PyTorch: `index_select` and `embedding` (pick
//! rows), `index_add` (their backward: scatter-add of rows), `gather` and `scatter_add`
//! (pick or accumulate one element per index position; cross-entropy picks the target's
//! log-probability with `gather`), and `one_hot`.
//!
//! Arguments are checked here, strided inputs made contiguous, and the kernels in
//! `aigc_kernels::cpu::index` do the work on `[outer, size, inner]` blocks. An index
//! outside its dimension (negative ones included) is an [`Error::IndexOutOfRange`],
//! found before anything is written.

use crate::shape::resolve_dim;
use crate::storage::{CpuStorage, map_any, of_dtype};
use crate::{DType, Error, Layout, Result, Tensor, WithDType};
use aigc_kernels::cpu::index::{self as kernel, DimBlocks, OutOfRange};

/// `zip_summable!(op, lhs, rhs, |a, b| expr)`: both storages hold the same dtype, one the
/// scatter-add kernels can sum (a float dtype or i64); `expr` yields a vector of that
/// type, which is wrapped back into its `CpuStorage` arm.
macro_rules! zip_summable {
    ($op:expr, $l:expr, $r:expr, |$a:ident, $b:ident| $body:expr) => {
        match ($l, $r) {
            (CpuStorage::F32($a), CpuStorage::F32($b)) => CpuStorage::F32($body),
            (CpuStorage::F64($a), CpuStorage::F64($b)) => CpuStorage::F64($body),
            (CpuStorage::F16($a), CpuStorage::F16($b)) => CpuStorage::F16($body),
            (CpuStorage::BF16($a), CpuStorage::BF16($b)) => CpuStorage::BF16($body),
            (CpuStorage::I64($a), CpuStorage::I64($b)) => CpuStorage::I64($body),
            (l, r) if l.dtype() != r.dtype() => {
                return Err(Error::DTypeMismatch { op: $op, lhs: l.dtype(), rhs: r.dtype() })
            }
            (l, _) => {
                return Err(Error::UnsupportedDType {
                    op: $op,
                    dtype: l.dtype(),
                    expected: "a float dtype (f32, f64, f16, bf16) or i64",
                })
            }
        }
    };
}

impl Tensor {
    /// The entries `indices` (1-d, i64) of dimension `dim`, in that order and with
    /// repeats: the result has `dim` of size `indices.len()` (`torch.index_select`).
    pub fn index_select(&self, dim: isize, indices: &Tensor) -> Result<Tensor> {
        self.select_rows("index_select", dim, indices)
    }

    /// Looks up rows of this `[vocab, dim]` weight: ids of any shape (i64) give
    /// `[ids.shape.., dim]` (`torch.nn.functional.embedding`).
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        const OP: &str = "embedding";
        if self.rank() != 2 {
            return Err(Error::bad_shape(OP, &self.shape(), "the weight must be 2-d: [vocab, dim]"));
        }
        ids.expect_index(OP)?;
        let rows = self.select_rows(OP, 0, &ids.flatten_all()?)?;
        let mut shape = ids.dims().to_vec();
        shape.push(self.dims()[1]);
        rows.reshape(shape)
    }

    /// This tensor with `source[.., j, ..]` added to entry `indices[j]` of `dim`; repeated
    /// indices accumulate (`torch.index_add`, out of place). `source` has this tensor's
    /// shape with `dim` of size `indices.len()`. Float dtypes and i64. This is the
    /// backward of [`Tensor::index_select`].
    pub fn index_add(&self, dim: isize, indices: &Tensor, source: &Tensor) -> Result<Tensor> {
        const OP: &str = "index_add";
        let d = resolve_dim(OP, dim, self.rank())?;
        check_index_list(OP, indices, self)?;
        self.same_device(source, OP)?;
        let mut expected = self.dims().to_vec();
        expected[d] = indices.numel();
        if source.dims() != expected {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.shape(),
                rhs: source.shape(),
                reason: format!(
                    "source must have shape {expected:?}: self's shape with dim {dim} of size {} (one per index)",
                    indices.numel()
                ),
            });
        }
        let (base, source, indices) = (self.contiguous()?, source.contiguous()?, indices.contiguous()?);
        let blocks = DimBlocks::new(base.dims(), d);
        let out = Tensor::read_cpu_all(&[&base, &source, &indices], |views| {
            let &[(b, lb), (s, ls), (i, li)] = views else { unreachable!("three operands") };
            let i = index_values(i, li);
            Ok(zip_summable!(OP, b, s, |b, s| kernel::index_add(rows(b, lb), blocks, i, rows(s, ls))
                .map_err(out_of_range(OP))?))
        })?;
        Ok(Tensor::from_cpu(out, self.dims()))
    }

    /// `out[i][j][k] = self[i][indices[i][j][k]][k]` for `dim = 1`, and likewise for any
    /// rank and dim (`torch.gather`). `indices` (i64) has this tensor's rank and is no
    /// larger in every dim but `dim`; the result has its shape.
    pub fn gather(&self, dim: isize, indices: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather";
        let d = resolve_dim(OP, dim, self.rank())?;
        check_index_box(OP, indices, self, "self", d, dim, false)?;
        let src = self.leading_box(&box_shape(indices.dims(), d, self.dims()[d])).contiguous()?;
        let indices = indices.contiguous()?;
        let blocks = DimBlocks::new(src.dims(), d);
        let index_size = indices.dims()[d];
        let out = src.read_cpu2(&indices, OP, |s, ls, i, li| {
            let i = index_values(i, li);
            Ok(map_any!(s, |s| kernel::gather(rows(s, ls), blocks, i, index_size).map_err(out_of_range(OP))?))
        })?;
        Ok(Tensor::from_cpu(out, indices.dims()))
    }

    /// This tensor with `source[i][j][k]` added at `[i][indices[i][j][k]][k]` for
    /// `dim = 1`, and likewise for any rank and dim; repeated indices accumulate
    /// (`torch.scatter_add`, out of place). `indices` (i64) has this tensor's rank, is no
    /// larger than `source` in any dim and no larger than this tensor in every dim but
    /// `dim`. Float dtypes and i64. This is the backward of [`Tensor::gather`].
    pub fn scatter_add(&self, dim: isize, indices: &Tensor, source: &Tensor) -> Result<Tensor> {
        const OP: &str = "scatter_add";
        let d = resolve_dim(OP, dim, self.rank())?;
        check_index_box(OP, indices, self, "self", d, dim, false)?;
        check_index_box(OP, indices, source, "source", d, dim, true)?;
        // Only the box at the origin that `indices` spans (with all of `dim`) can change.
        let region_shape = box_shape(indices.dims(), d, self.dims()[d]);
        let region = self.leading_box(&region_shape).contiguous()?;
        let source = source.leading_box(indices.dims()).contiguous()?;
        let indices = indices.contiguous()?;
        let blocks = DimBlocks::new(&region_shape, d);
        let index_size = indices.dims()[d];
        let scattered = Tensor::read_cpu_all(&[&region, &source, &indices], |views| {
            let &[(b, lb), (s, ls), (i, li)] = views else { unreachable!("three operands") };
            let i = index_values(i, li);
            Ok(zip_summable!(OP, b, s, |b, s| kernel::scatter_add(rows(b, lb), blocks, i, rows(s, ls), index_size)
                .map_err(out_of_range(OP))?))
        })?;
        let scattered = Tensor::from_cpu(scattered, &region_shape);
        if region_shape == self.dims() {
            return Ok(scattered);
        }
        let out = self.copy()?;
        out.leading_box(&region_shape).write_view(&scattered)?;
        Ok(out)
    }

    /// `[.., num_classes]` rows of `dtype` with a one at each id (i64, any shape) and
    /// zeros elsewhere (`torch.nn.functional.one_hot`).
    pub fn one_hot(&self, num_classes: usize, dtype: DType) -> Result<Tensor> {
        const OP: &str = "one_hot";
        self.expect_index(OP)?;
        let ids = self.contiguous()?;
        let out = ids.read_cpu(|i, li| {
            let ids = index_values(i, li);
            Ok(of_dtype!(dtype, kernel::one_hot(ids, num_classes).map_err(out_of_range(OP))?))
        })?;
        let mut shape = self.dims().to_vec();
        shape.push(num_classes);
        Ok(Tensor::from_cpu(out, &shape))
    }

    /// `index_select`, reporting errors as `op`.
    fn select_rows(&self, op: &'static str, dim: isize, indices: &Tensor) -> Result<Tensor> {
        let d = resolve_dim(op, dim, self.rank())?;
        check_index_list(op, indices, self)?;
        let (src, indices) = (self.contiguous()?, indices.contiguous()?);
        let blocks = DimBlocks::new(src.dims(), d);
        let out = src.read_cpu2(&indices, op, |s, ls, i, li| {
            let i = index_values(i, li);
            Ok(map_any!(s, |s| kernel::index_select(rows(s, ls), blocks, i).map_err(out_of_range(op))?))
        })?;
        let mut shape = self.dims().to_vec();
        shape[d] = indices.numel();
        Ok(Tensor::from_cpu(out, &shape))
    }

    /// The view of the box at the origin of size `shape` (the first `shape[a]` entries
    /// of every dim `a`).
    fn leading_box(&self, shape: &[usize]) -> Tensor {
        debug_assert!(shape.iter().zip(self.dims()).all(|(n, m)| n <= m));
        self.with_layout(Layout::new(shape, self.strides(), self.layout().offset()))
    }
}

/// The shape of an index tensor with dim `d` resized to `size`.
fn box_shape(index_dims: &[usize], d: usize, size: usize) -> Vec<usize> {
    let mut shape = index_dims.to_vec();
    shape[d] = size;
    shape
}

/// Checks a list of indices for `index_select`/`index_add`: 1-d, i64, on `data`'s device.
fn check_index_list(op: &'static str, indices: &Tensor, data: &Tensor) -> Result<()> {
    indices.expect_index(op)?;
    data.same_device(indices, op)?;
    if indices.rank() != 1 {
        return Err(Error::bad_shape(op, &indices.shape(), "indices must be a 1-d tensor"));
    }
    Ok(())
}

/// Checks an index tensor for `gather`/`scatter_add` against `other` (named `name`): i64,
/// on the same device, of the same rank, and no larger in any dim (but `d`, unless
/// `including_dim`).
fn check_index_box(
    op: &'static str,
    indices: &Tensor,
    other: &Tensor,
    name: &str,
    d: usize,
    dim: isize,
    including_dim: bool,
) -> Result<()> {
    indices.expect_index(op)?;
    other.same_device(indices, op)?;
    let mismatch = |reason: String| Error::ShapeMismatch { op, lhs: other.shape(), rhs: indices.shape(), reason };
    if indices.rank() != other.rank() {
        return Err(mismatch(format!("the index (rhs) must have the rank of {name} (lhs), {}", other.rank())));
    }
    let too_big = (0..other.rank()).find(|&a| (including_dim || a != d) && indices.dims()[a] > other.dims()[a]);
    match too_big {
        Some(a) => Err(mismatch(format!(
            "the index (rhs) has size {} in dim {a} but {name} (lhs) has only {}; the index may not be larger than \
             {name} in any dim{}",
            indices.dims()[a],
            other.dims()[a],
            if including_dim { String::new() } else { format!(" but the {op} dim {dim}") }
        ))),
        None => Ok(()),
    }
}

/// The row-major elements of a contiguous view.
fn rows<'a, T>(buf: &'a [T], layout: &Layout) -> &'a [T] {
    &buf[layout.contiguous_range().expect("the tensor was made contiguous")]
}

/// The values of a contiguous i64 tensor.
fn index_values<'a>(storage: &'a CpuStorage, layout: &Layout) -> &'a [i64] {
    rows(i64::from_storage(storage).expect("the index dtype was checked to be i64"), layout)
}

/// Turns a kernel's [`OutOfRange`] into the error of `op`.
fn out_of_range(op: &'static str) -> impl Fn(OutOfRange) -> Error {
    move |OutOfRange { index, size }| Error::IndexOutOfRange { op, index, size }
}

#[cfg(test)]
mod tests {
    use crate::testing::*;
    use crate::{DType, Device, Tensor};
    use proptest::prelude::*;
    use proptest::sample::Index;

    // ----- naive references: plain loops over multi-indices -----

    fn naive_index_select(x: &NdArray, d: usize, idx: &[i64]) -> NdArray {
        let mut shape = x.shape.clone();
        shape[d] = idx.len();
        let mut out = NdArray::zeros(&shape);
        let positions: Vec<Vec<usize>> = out.indices().collect();
        for pos in positions {
            let mut from = pos.clone();
            from[d] = idx[pos[d]] as usize;
            out.set(&pos, x.get(&from));
        }
        out
    }

    fn naive_index_add(x: &NdArray, d: usize, idx: &[i64], src: &NdArray) -> NdArray {
        let mut out = x.clone();
        for pos in src.indices() {
            let mut to = pos.clone();
            to[d] = idx[pos[d]] as usize;
            out.set(&to, out.get(&to) + src.get(&pos));
        }
        out
    }

    fn naive_gather(x: &NdArray, d: usize, idx: &NdArray) -> NdArray {
        let mut out = NdArray::zeros(&idx.shape);
        for pos in idx.indices() {
            let mut from = pos.clone();
            from[d] = idx.get(&pos) as usize;
            out.set(&pos, x.get(&from));
        }
        out
    }

    fn naive_scatter_add(x: &NdArray, d: usize, idx: &NdArray, src: &NdArray) -> NdArray {
        let mut out = x.clone();
        for pos in idx.indices() {
            let mut to = pos.clone();
            to[d] = idx.get(&pos) as usize;
            out.set(&to, out.get(&to) + src.get(&pos));
        }
        out
    }

    // ----- inputs -----

    /// An i64 tensor holding `values` (row-major) as a non-contiguous view: every other
    /// element of a buffer twice as large, whose gaps hold an invalid index.
    fn spread(values: &[i64], shape: &[usize]) -> Tensor {
        let buf: Vec<i64> = values.iter().flat_map(|&v| [v, -7]).collect();
        let mut big = shape.to_vec();
        big.push(2);
        Tensor::from_vec(buf, big, &Device::Cpu).unwrap().narrow(-1, 0, 1).unwrap().squeeze(-1).unwrap()
    }

    /// A tensor of `shape` and `dtype` with values in -120..120, sliced out of a larger
    /// buffer (so not contiguous).
    fn typed_view(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
        let big: Vec<usize> = shape.iter().map(|&n| n + 1).collect();
        let mut t = (&make_view(&big, ViewKind::Contiguous, seed) * 60.0).unwrap().to_dtype(dtype).unwrap();
        for (d, &n) in shape.iter().enumerate() {
            t = t.narrow(d as isize, 1, n).unwrap();
        }
        t
    }

    /// Shapes of rank 1..=4 with small dims, sometimes 0.
    fn data_shape() -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(prop_oneof![1 => Just(0usize), 8 => 1usize..=5], 1..=4)
    }

    /// A dim of a rank-`rank` tensor, as written (maybe negative) and resolved.
    fn pick_dim(rank: usize, pick: Index, negative: bool) -> (isize, usize) {
        let d = pick.index(rank);
        (if negative { d as isize - rank as isize } else { d as isize }, d)
    }

    /// Raw random numbers as indices into a dim of `size` (none when it is empty).
    fn positions(raw: &[u32], size: usize) -> Vec<i64> {
        if size == 0 { vec![] } else { raw.iter().map(|&r| (r as usize % size) as i64).collect() }
    }

    /// For `index_select`/`index_add`: data shape, dim (written, resolved), 1-d indices.
    fn list_case() -> impl Strategy<Value = (Vec<usize>, isize, usize, Vec<i64>)> {
        (data_shape(), any::<Index>(), any::<bool>(), prop::collection::vec(any::<u32>(), 0..7)).prop_map(
            |(shape, pick, negative, raw)| {
                let (dim, d) = pick_dim(shape.len(), pick, negative);
                let idx = positions(&raw, shape[d]);
                (shape, dim, d, idx)
            },
        )
    }

    /// A `gather`/`scatter_add` problem.
    #[derive(Clone, Debug)]
    struct BoxCase {
        shape: Vec<usize>,
        /// The dim as written (maybe negative) and resolved.
        dim: isize,
        d: usize,
        /// No larger than `shape` in every dim but `d`.
        index_shape: Vec<usize>,
        index: Vec<i64>,
        /// No smaller than `index_shape`.
        source_shape: Vec<usize>,
    }

    impl BoxCase {
        fn index_tensor(&self) -> Tensor {
            spread(&self.index, &self.index_shape)
        }
        fn index_array(&self) -> NdArray {
            NdArray::new(self.index_shape.clone(), self.index.iter().map(|&v| v as f64).collect())
        }
    }

    fn box_case() -> impl Strategy<Value = BoxCase> {
        (data_shape(), any::<Index>(), any::<bool>(), prop::collection::vec((0usize..6, 0usize..2), 4)).prop_flat_map(
            |(shape, pick, negative, raw)| {
                let (dim, d) = pick_dim(shape.len(), pick, negative);
                let index_shape: Vec<usize> = (0..shape.len())
                    .map(|a| match (a == d, shape[a]) {
                        (true, 0) => 0,
                        (true, _) => raw[a].0 % 5,
                        (false, n) => raw[a].0 % (n + 1),
                    })
                    .collect();
                let source_shape: Vec<usize> = index_shape.iter().zip(&raw).map(|(&n, r)| n + r.1).collect();
                let numel: usize = index_shape.iter().product();
                let size = shape[d];
                prop::collection::vec(any::<u32>(), numel).prop_map(move |raw| BoxCase {
                    shape: shape.clone(),
                    dim,
                    d,
                    index_shape: index_shape.clone(),
                    index: positions(&raw, size),
                    source_shape: source_shape.clone(),
                })
            },
        )
    }

    const EXACT_DTYPES: [DType; 4] = [DType::I64, DType::U8, DType::F16, DType::BF16];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn index_select_matches_naive_reference_on_strided_views_for_every_dim(
            (shape, dim, d, idx) in list_case(), kind in view_kind(), seed in any::<u64>(),
        ) {
            let x = make_view(&shape, kind, seed);
            let got = x.index_select(dim, &spread(&idx, &[idx.len()])).unwrap();
            let want = naive_index_select(&NdArray::from_tensor(&x), d, &idx);
            prop_assert_eq!(got.dims(), &want.shape[..]);
            prop_assert_eq!(got.to_f64_vec().unwrap(), want.data);
        }

        #[test]
        fn index_select_and_gather_copy_integer_and_half_dtypes_exactly(
            (shape, dim, d, idx) in list_case(),
            case in box_case(), k in 0..EXACT_DTYPES.len(), seed in any::<u64>(),
        ) {
            let dtype = EXACT_DTYPES[k];
            let x = typed_view(&shape, dtype, seed);
            let got = x.index_select(dim, &Tensor::new(&idx, &Device::Cpu).unwrap()).unwrap();
            prop_assert_eq!(got.dtype(), dtype);
            prop_assert_eq!(got.to_f64_vec().unwrap(), naive_index_select(&NdArray::from_tensor(&x), d, &idx).data);
            let y = typed_view(&case.shape, dtype, seed);
            let got = y.gather(case.dim, &case.index_tensor()).unwrap();
            prop_assert_eq!(got.dtype(), dtype);
            let want = naive_gather(&NdArray::from_tensor(&y), case.d, &case.index_array());
            prop_assert_eq!(got.to_f64_vec().unwrap(), want.data);
        }

        #[test]
        fn embedding_looks_up_a_row_for_every_id_of_any_shape(
            vocab in 1usize..6, width in 0usize..5, ids_shape in prop::collection::vec(0usize..4, 0..3),
            kind in view_kind(), seed in any::<u64>(), raw in prop::collection::vec(any::<u32>(), 27),
        ) {
            let weight = make_view(&[vocab, width], kind, seed);
            let n: usize = ids_shape.iter().product();
            let ids = positions(&raw[..n], vocab);
            let got = weight.embedding(&spread(&ids, &ids_shape)).unwrap();
            let mut want_shape = ids_shape.clone();
            want_shape.push(width);
            prop_assert_eq!(got.dims(), &want_shape[..]);
            let w = &NdArray::from_tensor(&weight);
            let want: Vec<f64> = ids.iter().flat_map(|&i| (0..width).map(move |c| w.get(&[i as usize, c]))).collect();
            prop_assert_eq!(got.to_f64_vec().unwrap(), want);
        }

        #[test]
        fn index_add_accumulates_repeated_indices_like_naive_reference(
            (shape, dim, d, idx) in list_case(), kinds in (view_kind(), view_kind()), seed in any::<u64>(),
        ) {
            let x = make_view(&shape, kinds.0, seed);
            let mut source_shape = shape.clone();
            source_shape[d] = idx.len();
            let src = make_view(&source_shape, kinds.1, seed ^ 1);
            let got = x.index_add(dim, &spread(&idx, &[idx.len()]), &src).unwrap();
            let want = naive_index_add(&NdArray::from_tensor(&x), d, &idx, &NdArray::from_tensor(&src));
            prop_assert_eq!(got.dims(), &shape[..]);
            assert_close(&got.to_f64_vec().unwrap(), &want.data, 1e-6, 1e-6, "index_add");
        }

        #[test]
        fn gather_matches_naive_reference_with_an_index_smaller_than_self(
            case in box_case(), kind in view_kind(), seed in any::<u64>(),
        ) {
            let x = make_view(&case.shape, kind, seed);
            let got = x.gather(case.dim, &case.index_tensor()).unwrap();
            let want = naive_gather(&NdArray::from_tensor(&x), case.d, &case.index_array());
            prop_assert_eq!(got.dims(), &case.index_shape[..]);
            prop_assert_eq!(got.to_f64_vec().unwrap(), want.data);
        }

        #[test]
        fn scatter_add_matches_naive_reference_with_repeats_and_a_smaller_index(
            case in box_case(), kinds in (view_kind(), view_kind()), seed in any::<u64>(),
        ) {
            let x = make_view(&case.shape, kinds.0, seed);
            let src = make_view(&case.source_shape, kinds.1, seed ^ 1);
            let got = x.scatter_add(case.dim, &case.index_tensor(), &src).unwrap();
            let want =
                naive_scatter_add(&NdArray::from_tensor(&x), case.d, &case.index_array(), &NdArray::from_tensor(&src));
            prop_assert_eq!(got.dims(), &case.shape[..]);
            assert_close(&got.to_f64_vec().unwrap(), &want.data, 1e-6, 1e-6, "scatter_add");
        }

        #[test]
        fn index_add_and_scatter_add_in_f64_match_to_1e12(
            (shape, dim, d, idx) in list_case(),
            case in box_case(), seed in any::<u64>(),
        ) {
            let f64_view = |s: &[usize], seed| make_view(s, ViewKind::Contiguous, seed).to_dtype(DType::F64).unwrap();
            let x = f64_view(&shape, seed);
            let mut source_shape = shape.clone();
            source_shape[d] = idx.len();
            let src = f64_view(&source_shape, seed ^ 1);
            let got = x.index_add(dim, &Tensor::new(&idx, &Device::Cpu).unwrap(), &src).unwrap();
            prop_assert_eq!(got.dtype(), DType::F64);
            let want = naive_index_add(&NdArray::from_tensor(&x), d, &idx, &NdArray::from_tensor(&src));
            assert_close(&got.to_vec::<f64>().unwrap(), &want.data, 1e-12, 1e-12, "index_add f64");

            let (y, src) = (f64_view(&case.shape, seed ^ 2), f64_view(&case.source_shape, seed ^ 3));
            let got = y.scatter_add(case.dim, &case.index_tensor(), &src).unwrap();
            let want =
                naive_scatter_add(&NdArray::from_tensor(&y), case.d, &case.index_array(), &NdArray::from_tensor(&src));
            assert_close(&got.to_vec::<f64>().unwrap(), &want.data, 1e-12, 1e-12, "scatter_add f64");
        }

        #[test]
        fn index_add_and_scatter_add_in_half_precision_are_close(
            (shape, dim, d, idx) in list_case(),
            case in box_case(), half in prop_oneof![Just(DType::F16), Just(DType::BF16)], seed in any::<u64>(),
        ) {
            let view = |s: &[usize], seed| make_view(s, ViewKind::Sliced, seed).to_dtype(half).unwrap();
            let x = view(&shape, seed);
            let mut source_shape = shape.clone();
            source_shape[d] = idx.len();
            let src = view(&source_shape, seed ^ 1);
            let got = x.index_add(dim, &Tensor::new(&idx, &Device::Cpu).unwrap(), &src).unwrap();
            prop_assert_eq!(got.dtype(), half);
            let want = naive_index_add(&NdArray::from_tensor(&x), d, &idx, &NdArray::from_tensor(&src));
            assert_close(&got.to_f64_vec().unwrap(), &want.data, 2e-2, 5e-2, "index_add half");

            let (y, src) = (view(&case.shape, seed ^ 2), view(&case.source_shape, seed ^ 3));
            let got = y.scatter_add(case.dim, &case.index_tensor(), &src).unwrap();
            let want =
                naive_scatter_add(&NdArray::from_tensor(&y), case.d, &case.index_array(), &NdArray::from_tensor(&src));
            assert_close(&got.to_f64_vec().unwrap(), &want.data, 2e-2, 5e-2, "scatter_add half");
        }

        #[test]
        fn one_hot_marks_each_id_in_every_dtype(
            ids_shape in prop::collection::vec(0usize..4, 0..3), classes in 1usize..5,
            raw in prop::collection::vec(any::<u32>(), 9), k in 0usize..6,
        ) {
            let dtype = [DType::F32, DType::F64, DType::F16, DType::BF16, DType::I64, DType::U8][k];
            let n: usize = ids_shape.iter().product();
            let ids = positions(&raw[..n], classes);
            let got = spread(&ids, &ids_shape).one_hot(classes, dtype).unwrap();
            prop_assert_eq!(got.dtype(), dtype);
            prop_assert_eq!(&got.dims()[..ids_shape.len()], &ids_shape[..]);
            prop_assert_eq!(got.dims()[ids_shape.len()], classes);
            let want: Vec<f64> =
                ids.iter().flat_map(|&i| (0..classes).map(move |c| (c as i64 == i) as u8 as f64)).collect();
            prop_assert_eq!(got.to_f64_vec().unwrap(), want);
        }
    }

    fn i64s(values: &[i64]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    fn matrix(rows: usize, cols: usize) -> Tensor {
        let values: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        Tensor::from_vec(values, [rows, cols], &Device::Cpu).unwrap()
    }

    #[test]
    fn index_add_sums_every_repeat_of_one_index_in_i64() {
        let x = Tensor::from_vec(vec![1i64, 2, 3, 4], [2, 2], &Device::Cpu).unwrap();
        let src = Tensor::from_vec(vec![10i64, 20, 30, 40, 50, 60], [3, 2], &Device::Cpu).unwrap();
        let got = x.index_add(0, &i64s(&[1, 1, 1]), &src).unwrap();
        assert_eq!(got.to_vec2::<i64>().unwrap(), vec![vec![1, 2], vec![93, 124]]);
        // The input is untouched: the op is out of place.
        assert_eq!(x.to_vec::<i64>().unwrap(), vec![1, 2, 3, 4]);
    }

    #[test]
    fn gather_and_scatter_add_pick_and_accumulate_class_scores() {
        // Cross-entropy's use: pick each row's target column, and scatter the gradient back.
        let logp = matrix(3, 4);
        let targets = Tensor::from_vec(vec![2i64, 0, 3], [3, 1], &Device::Cpu).unwrap();
        assert_eq!(logp.gather(-1, &targets).unwrap().to_vec::<f32>().unwrap(), vec![2.0, 4.0, 11.0]);
        let grad = Tensor::ones([3, 1], crate::DType::F32, &Device::Cpu).unwrap();
        let zeros = Tensor::zeros([3, 4], crate::DType::F32, &Device::Cpu).unwrap();
        let back = zeros.scatter_add(1, &targets, &grad).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap()[2], vec![0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn index_out_of_range_errors_name_the_index_and_size() {
        let x = matrix(2, 3);
        let msg = |r: crate::Result<Tensor>| r.unwrap_err().to_string();
        assert_eq!(
            msg(x.index_select(1, &i64s(&[0, 3]))),
            "index_select: index 3 is out of range for a dimension of size 3"
        );
        assert_eq!(
            msg(x.index_select(-2, &i64s(&[-1]))),
            "index_select: index -1 is out of range for a dimension of size 2"
        );
        assert_eq!(msg(x.embedding(&i64s(&[1, 2]))), "embedding: index 2 is out of range for a dimension of size 2");
        assert_eq!(
            msg(x.index_add(0, &i64s(&[2]), &matrix(1, 3))),
            "index_add: index 2 is out of range for a dimension of size 2"
        );
        let column = Tensor::from_vec(vec![0i64, 3], [2, 1], &Device::Cpu).unwrap();
        assert_eq!(msg(x.gather(1, &column)), "gather: index 3 is out of range for a dimension of size 3");
        assert_eq!(
            msg(x.scatter_add(1, &column, &matrix(2, 1))),
            "scatter_add: index 3 is out of range for a dimension of size 3"
        );
        assert_eq!(
            msg(i64s(&[0, -2]).one_hot(3, DType::F32)),
            "one_hot: index -2 is out of range for a dimension of size 3"
        );
    }

    #[test]
    fn indices_of_a_non_i64_dtype_are_rejected() {
        let x = matrix(2, 3);
        let f = Tensor::new(&[0.0f32], &Device::Cpu).unwrap();
        let msg = |r: crate::Result<Tensor>| r.unwrap_err().to_string();
        let expect = |op: &str| format!("{op}: not supported for dtype f32 (expected i64 indices)");
        assert_eq!(msg(x.index_select(0, &f)), expect("index_select"));
        assert_eq!(msg(x.embedding(&f)), expect("embedding"));
        assert_eq!(msg(x.index_add(0, &f, &matrix(1, 3))), expect("index_add"));
        let f2 = f.reshape([1, 1]).unwrap();
        assert_eq!(msg(x.gather(0, &f2)), expect("gather"));
        assert_eq!(msg(x.scatter_add(0, &f2, &x)), expect("scatter_add"));
        assert_eq!(msg(f.one_hot(2, DType::F32)), expect("one_hot"));
    }

    #[test]
    fn shape_and_dtype_errors_name_the_op_and_shapes() {
        let x = matrix(2, 3);
        let msg = |r: crate::Result<Tensor>| r.unwrap_err().to_string();
        let idx2d = Tensor::from_vec(vec![0i64, 1], [1, 2], &Device::Cpu).unwrap();
        assert_eq!(msg(x.index_select(0, &idx2d)), "index_select: input of shape [1, 2]: indices must be a 1-d tensor");
        assert_eq!(
            msg(x.index_select(2, &i64s(&[0]))),
            "index_select: dim 2 is out of range for a tensor of rank 2 (expected -2..2)"
        );
        assert_eq!(
            msg(x.index_add(1, &i64s(&[0, 1]), &matrix(2, 3))),
            "index_add: lhs [2, 3] and rhs [2, 3]: source must have shape [2, 2]: self's shape with dim 1 of size 2 \
             (one per index)"
        );
        assert_eq!(
            msg(x.index_add(0, &i64s(&[0]), &matrix(1, 3).to_dtype(DType::F64).unwrap())),
            "index_add: dtypes differ: lhs is f32, rhs is f64 (convert one with to_dtype)"
        );
        let bytes = x.to_dtype(DType::U8).unwrap();
        assert_eq!(
            msg(bytes.index_add(0, &i64s(&[0]), &bytes.narrow(0, 0, 1).unwrap())),
            "index_add: not supported for dtype u8 (expected a float dtype (f32, f64, f16, bf16) or i64)"
        );
        assert_eq!(
            msg(x.gather(0, &i64s(&[0]))),
            "gather: lhs [2, 3] and rhs [1]: the index (rhs) must have the rank of self (lhs), 2"
        );
        let wide = Tensor::zeros([1, 4], DType::I64, &Device::Cpu).unwrap();
        assert_eq!(
            msg(x.gather(0, &wide)),
            "gather: lhs [2, 3] and rhs [1, 4]: the index (rhs) has size 4 in dim 1 but self (lhs) has only 3; the \
             index may not be larger than self in any dim but the gather dim 0"
        );
        let tall = Tensor::zeros([2, 1], DType::I64, &Device::Cpu).unwrap();
        assert_eq!(
            msg(x.scatter_add(1, &tall, &matrix(1, 1))),
            "scatter_add: lhs [1, 1] and rhs [2, 1]: the index (rhs) has size 2 in dim 0 but source (lhs) has only 1; \
             the index may not be larger than source in any dim"
        );
        assert_eq!(
            msg(matrix(2, 3).reshape([6]).unwrap().embedding(&i64s(&[0]))),
            "embedding: input of shape [6]: the weight must be 2-d: [vocab, dim]"
        );
    }
}

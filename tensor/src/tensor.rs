//! The [`Tensor`]: a shared buffer seen through a strided [`Layout`].
//!
//! Cloning a tensor is cheap (it shares the buffer). Views (reshape, permute, narrow,
//! broadcast, ...) make a new layout over the same buffer; ops that compute write a
//! fresh contiguous buffer. This file holds the struct, constructors, accessors and
//! conversions to and from plain Rust data; the ops live in `ops/`.

use crate::storage::{CpuStorage, Storage, map_any, with_any};
use crate::{DType, Device, Error, Result, Shape, WithDType};
use aigc_kernels::{Layout, cpu};
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// An n-dimensional array of one dtype on one device.
///
/// The value is one pointer to a shared `View` (buffer, layout, dtype, device): moving a
/// tensor, cloning it, or holding it in a `Cow` or a `Result` copies eight bytes, not the
/// 136-byte layout (six sizes and six strides held inline). Moves of the layout were
/// copied in 16-byte pieces that straddled the 8-byte stores just made, which the CPU
/// cannot forward (an add of two 64-float tensors took 131-134 ns with the layout in the
/// value, 120 with this handle, on Zen 4). Ops make a new view for their result, as they
/// make a new buffer.
#[derive(Clone)]
pub struct Tensor(Arc<View>);

/// A buffer seen through a strided layout: what a [`Tensor`] points to. Views of one
/// buffer (reshape, permute, narrow, ...) share the `storage`.
struct View {
    storage: Arc<RwLock<Storage>>,
    layout: Layout,
    dtype: DType,
    device: Device,
}

impl Tensor {
    // ----- construction from buffers -----

    /// Wraps a freshly computed row-major CPU buffer of shape `shape`.
    pub(crate) fn from_cpu(storage: CpuStorage, shape: &[usize]) -> Tensor {
        debug_assert_eq!(storage.len(), shape.iter().product::<usize>());
        Tensor(Arc::new(View {
            dtype: storage.dtype(),
            device: Device::Cpu,
            storage: Arc::new(RwLock::new(Storage::Cpu(storage))),
            layout: Layout::contiguous(shape),
        }))
    }

    /// The same buffer seen through another layout (a view: nothing is copied).
    pub(crate) fn with_layout(&self, layout: Layout) -> Tensor {
        Tensor(Arc::new(View { storage: self.0.storage.clone(), layout, dtype: self.0.dtype, device: self.0.device }))
    }

    /// Runs `f` on the CPU buffer and this tensor's layout.
    pub(crate) fn read_cpu<R>(&self, f: impl FnOnce(&CpuStorage, &Layout) -> Result<R>) -> Result<R> {
        let guard = self.0.storage.read().unwrap_or_else(|e| e.into_inner());
        match &*guard {
            Storage::Cpu(s) => f(s, &self.0.layout),
        }
    }

    /// Runs `f` on the CPU buffers and layouts of two tensors on the same device. Two
    /// views of one buffer share one read lock (see [`Tensor::read_cpu_all`]).
    pub(crate) fn read_cpu2<R>(
        &self,
        other: &Tensor,
        op: &'static str,
        f: impl FnOnce(&CpuStorage, &Layout, &CpuStorage, &Layout) -> Result<R>,
    ) -> Result<R> {
        self.same_device(other, op)?;
        if self.shares_storage_with(other) {
            return self.read_cpu(|a, la| f(a, la, a, &other.0.layout));
        }
        self.read_cpu(|a, la| other.read_cpu(|b, lb| f(a, la, b, lb)))
    }

    /// Read locks on the buffers of `tensors`, one per distinct buffer: entry `k` holds
    /// the lock when tensor `k` is the first on its buffer, else `None`. A second read
    /// lock on a buffer this thread already reads could wait forever: std's `RwLock`
    /// queues new readers behind a writer that is waiting, and that writer waits for the
    /// first lock (views of one buffer are common: `k` and `v` sliced from one QKV
    /// projection, `x * x`).
    fn lock_buffers<'t>(tensors: &[&'t Tensor]) -> Vec<Option<RwLockReadGuard<'t, Storage>>> {
        (0..tensors.len())
            .map(|k| {
                (Tensor::first_on_buffer(tensors, k) == k)
                    .then(|| tensors[k].0.storage.read().unwrap_or_else(|e| e.into_inner()))
            })
            .collect()
    }

    /// The position of the first tensor of `tensors` on tensor `k`'s buffer.
    fn first_on_buffer(tensors: &[&Tensor], k: usize) -> usize {
        tensors.iter().position(|t| t.shares_storage_with(tensors[k])).expect("tensor k itself")
    }

    /// Tensor `k`'s CPU buffer, under the locks `lock_buffers(tensors)` took.
    fn locked_buffer<'g>(
        guards: &'g [Option<RwLockReadGuard<Storage>>],
        tensors: &[&Tensor],
        k: usize,
    ) -> &'g CpuStorage {
        let guard = guards[Tensor::first_on_buffer(tensors, k)].as_ref();
        let Storage::Cpu(s) = &**guard.expect("the first tensor on a buffer holds its lock");
        s
    }

    /// Runs `f` on the CPU buffer and layout of every tensor of `tensors`, taking one
    /// read lock per distinct buffer.
    pub(crate) fn read_cpu_all<R>(
        tensors: &[&Tensor],
        f: impl FnOnce(&[(&CpuStorage, &Layout)]) -> Result<R>,
    ) -> Result<R> {
        let guards = Tensor::lock_buffers(tensors);
        let views: Vec<_> =
            (0..tensors.len()).map(|k| (Tensor::locked_buffer(&guards, tensors, k), &tensors[k].0.layout)).collect();
        f(&views)
    }

    /// Runs `f` on the row-major elements of every tensor of `tensors`, all of dtype `T`,
    /// borrowed from their buffers (a tensor that is not contiguous is copied first).
    pub(crate) fn read_contiguous<T: WithDType, R>(
        tensors: &[&Tensor],
        op: &'static str,
        f: impl FnOnce(&[&[T]]) -> R,
    ) -> Result<R> {
        if tensors.iter().any(|t| !t.is_contiguous()) {
            let copies = tensors.iter().map(|t| t.contiguous()).collect::<Result<Vec<_>>>()?;
            return Tensor::read_contiguous(&copies.iter().collect::<Vec<_>>(), op, f);
        }
        let guards = Tensor::lock_buffers(tensors);
        let mut slices = Vec::with_capacity(tensors.len());
        for (k, t) in tensors.iter().enumerate() {
            let buf = T::from_storage(Tensor::locked_buffer(&guards, tensors, k))
                .ok_or_else(|| Error::DTypeMismatch { op, lhs: T::DTYPE, rhs: t.0.dtype })?;
            let start = t.0.layout.offset();
            slices.push(&buf[start..start + t.numel()]);
        }
        Ok(f(&slices))
    }

    /// Mutable access to the CPU buffer, for in-place writes. The caller must only write
    /// positions its own layout addresses.
    pub(crate) fn write_cpu<R>(&self, f: impl FnOnce(&mut CpuStorage, &Layout) -> Result<R>) -> Result<R> {
        let mut guard = self.0.storage.write().unwrap_or_else(|e| e.into_inner());
        match &mut *guard {
            Storage::Cpu(s) => f(s, &self.0.layout),
        }
    }

    /// Creates a tensor from a vector in row-major order.
    pub fn from_vec<T: WithDType>(data: Vec<T>, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        device.check_available()?;
        if data.len() != shape.numel() {
            return Err(Error::ElementCount { op: "from_vec", shape, got: data.len() });
        }
        Ok(Tensor::from_cpu(T::into_storage(data), shape.dims()))
    }

    /// Creates a tensor from a slice in row-major order.
    pub fn from_slice<T: WithDType>(data: &[T], shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    /// A 1-d tensor holding `data`.
    pub fn new<T: WithDType>(data: &[T], device: &Device) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), data.len(), device)
    }

    /// A 0-d tensor holding one value.
    pub fn scalar<T: WithDType>(value: T, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(vec![value], (), device)
    }

    /// A tensor with every element equal to `value` (converted to `dtype`).
    pub fn full(value: f64, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        device.check_available()?;
        Ok(Tensor::from_cpu(CpuStorage::full(dtype, shape.numel(), value), shape.dims()))
    }

    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(0.0, shape, dtype, device)
    }
    pub fn ones(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(1.0, shape, dtype, device)
    }
    /// Zeros with this tensor's shape, dtype and device.
    pub fn zeros_like(&self) -> Result<Tensor> {
        Tensor::zeros(self.shape(), self.0.dtype, &self.0.device)
    }
    pub fn ones_like(&self) -> Result<Tensor> {
        Tensor::ones(self.shape(), self.0.dtype, &self.0.device)
    }
    pub fn full_like(&self, value: f64) -> Result<Tensor> {
        Tensor::full(value, self.shape(), self.0.dtype, &self.0.device)
    }

    /// `start, start + step, ...` up to but excluding `end` (like `torch.arange`).
    pub fn arange_step(start: f64, end: f64, step: f64, dtype: DType, device: &Device) -> Result<Tensor> {
        if step == 0.0 || !step.is_finite() || !start.is_finite() || !end.is_finite() {
            return Err(Error::invalid(
                "arange",
                format!("start {start}, end {end}, step {step}: need finite values and step != 0"),
            ));
        }
        let n = ((end - start) / step).ceil().max(0.0) as usize;
        let values: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
        Tensor::from_vec(values, n, device)?.to_dtype(dtype)
    }

    /// `start, start + 1, ..., end - 1`.
    pub fn arange(start: i64, end: i64, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::arange_step(start as f64, end as f64, 1.0, dtype, device)
    }

    /// `n` evenly spaced values from `start` to `end` inclusive.
    pub fn linspace(start: f64, end: f64, n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let step = if n > 1 { (end - start) / (n - 1) as f64 } else { 0.0 };
        let values: Vec<f64> =
            (0..n).map(|i| if i + 1 == n && n > 1 { end } else { start + i as f64 * step }).collect();
        Tensor::from_vec(values, n, device)?.to_dtype(dtype)
    }

    /// The `n x n` identity matrix.
    pub fn eye(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut values = vec![0.0f64; n * n];
        for i in 0..n {
            values[i * n + i] = 1.0;
        }
        Tensor::from_vec(values, [n, n], device)?.to_dtype(dtype)
    }

    // ----- accessors -----

    /// The sizes of the dimensions.
    pub fn dims(&self) -> &[usize] {
        self.0.layout.shape()
    }
    /// The shape as a value that prints like `[64, 400]`.
    pub fn shape(&self) -> Shape {
        Shape(self.dims().to_vec())
    }
    pub fn rank(&self) -> usize {
        self.0.layout.rank()
    }
    /// The size of dimension `dim` (negative counts from the end).
    pub fn dim(&self, dim: isize) -> Result<usize> {
        Ok(self.dims()[crate::shape::resolve_dim("dim", dim, self.rank())?])
    }
    pub fn numel(&self) -> usize {
        self.0.layout.numel()
    }
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    pub fn device(&self) -> Device {
        self.0.device
    }
    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }
    pub fn strides(&self) -> &[usize] {
        self.0.layout.strides()
    }
    pub fn is_contiguous(&self) -> bool {
        self.0.layout.is_contiguous()
    }
    /// Whether this tensor is the only holder of its buffer: no clone of it and no other
    /// view of the buffer exists.
    pub(crate) fn holds_buffer_alone(&self) -> bool {
        Arc::strong_count(&self.0) == 1 && Arc::strong_count(&self.0.storage) == 1
    }

    /// Whether two tensors are views of the same buffer.
    pub fn shares_storage_with(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    pub(crate) fn same_device(&self, other: &Tensor, op: &'static str) -> Result<()> {
        if self.0.device != other.0.device {
            return Err(Error::DeviceMismatch { op, lhs: self.0.device, rhs: other.0.device });
        }
        Ok(())
    }
    pub(crate) fn same_dtype(&self, other: &Tensor, op: &'static str) -> Result<()> {
        if self.0.dtype != other.0.dtype {
            return Err(Error::DTypeMismatch { op, lhs: self.0.dtype, rhs: other.0.dtype });
        }
        Ok(())
    }
    /// For the fused backward ops: `grad` is on this tensor's device, of its dtype and of
    /// its shape (`what` names this tensor in the error: "input", "output").
    pub(crate) fn expect_gradient_of(&self, grad: &Tensor, op: &'static str, what: &str) -> Result<()> {
        self.same_device(grad, op)?;
        self.same_dtype(grad, op)?;
        if grad.dims() != self.dims() {
            return Err(Error::ShapeMismatch {
                op,
                lhs: self.shape(),
                rhs: grad.shape(),
                reason: format!("the gradient must have the {what}'s shape"),
            });
        }
        Ok(())
    }
    pub(crate) fn expect_float(&self, op: &'static str) -> Result<()> {
        if !self.0.dtype.is_float() {
            return Err(Error::UnsupportedDType {
                op,
                dtype: self.0.dtype,
                expected: "a float dtype (f32, f64, f16, bf16)",
            });
        }
        Ok(())
    }
    pub(crate) fn expect_index(&self, op: &'static str) -> Result<()> {
        if self.0.dtype != DType::I64 {
            return Err(Error::UnsupportedDType { op, dtype: self.0.dtype, expected: "i64 indices" });
        }
        Ok(())
    }

    // ----- copies and conversions -----

    /// The tensor itself when already contiguous, else a row-major copy.
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        self.copy()
    }

    /// A row-major copy in a buffer of its own.
    pub fn copy(&self) -> Result<Tensor> {
        let out = self.read_cpu(|s, l| Ok(map_any!(s, |b| cpu::copy::contiguous(b, l))))?;
        Ok(Tensor::from_cpu(out, self.dims()))
    }

    /// Converts to another dtype (a copy; the same tensor when the dtype already matches).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.0.dtype {
            return Ok(self.clone());
        }
        let out = self.read_cpu(|s, l| {
            Ok(with_any!(s, |b| match dtype {
                DType::F32 => CpuStorage::F32(cpu::copy::cast(b, l)),
                DType::F64 => CpuStorage::F64(cpu::copy::cast(b, l)),
                DType::F16 => CpuStorage::F16(cpu::copy::cast(b, l)),
                DType::BF16 => CpuStorage::BF16(cpu::copy::cast(b, l)),
                DType::I64 => CpuStorage::I64(cpu::copy::cast(b, l)),
                DType::U8 => CpuStorage::U8(cpu::copy::cast(b, l)),
            }))
        })?;
        Ok(Tensor::from_cpu(out, self.dims()))
    }

    /// Moves the tensor to `device` (the same tensor when it is already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        device.check_available()?;
        Ok(self.clone())
    }

    /// The elements in row-major order. `T` must be the tensor's dtype.
    pub fn to_vec<T: WithDType>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.0.dtype {
            return Err(Error::DTypeMismatch { op: "to_vec", lhs: self.0.dtype, rhs: T::DTYPE });
        }
        self.read_cpu(|s, l| Ok(T::from_storage(s).map(|b| cpu::copy::contiguous(b, l)).expect("dtype checked")))
    }

    /// The elements converted to f64, row-major, whatever the dtype.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        self.read_cpu(|s, l| Ok(with_any!(s, |b| cpu::copy::cast::<_, f64>(b, l))))
    }

    /// The one element of a tensor with exactly one element.
    pub fn to_scalar<T: WithDType>(&self) -> Result<T> {
        if self.numel() != 1 {
            return Err(Error::bad_shape("to_scalar", &self.shape(), "need exactly one element"));
        }
        Ok(self.to_vec::<T>()?[0])
    }

    /// The rows of a 2-d tensor.
    pub fn to_vec2<T: WithDType>(&self) -> Result<Vec<Vec<T>>> {
        if self.rank() != 2 {
            return Err(Error::bad_shape("to_vec2", &self.shape(), "need a 2-d tensor"));
        }
        let flat = self.to_vec::<T>()?;
        let cols = self.dims()[1];
        Ok((0..self.dims()[0]).map(|r| flat[r * cols..(r + 1) * cols].to_vec()).collect())
    }
}

impl<T: WithDType> TryFrom<&ndarray::ArrayD<T>> for Tensor {
    type Error = Error;
    fn try_from(a: &ndarray::ArrayD<T>) -> Result<Tensor> {
        Tensor::from_vec(a.iter().copied().collect(), a.shape(), &Device::Cpu)
    }
}

impl Tensor {
    /// Copies into an `ndarray::ArrayD` (for interop). `T` must be the tensor's dtype.
    pub fn to_ndarray<T: WithDType>(&self) -> Result<ndarray::ArrayD<T>> {
        let v = self.to_vec::<T>()?;
        Ok(ndarray::ArrayD::from_shape_vec(self.dims(), v).expect("length matches the shape"))
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{} {} {}", self.shape(), self.0.dtype, self.0.device)
    }
}

/// Prints the values, numpy style, eliding the middle of long dimensions.
impl std::fmt::Display for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const EDGE: usize = 3;
        fn rec(f: &mut std::fmt::Formatter<'_>, v: &[f64], dims: &[usize], is_int: bool) -> std::fmt::Result {
            if dims.is_empty() {
                return if is_int { write!(f, "{}", v[0]) } else { write!(f, "{:.4}", v[0]) };
            }
            let inner: usize = dims[1..].iter().product();
            write!(f, "[")?;
            let n = dims[0];
            let shown: Vec<usize> =
                if n > 2 * EDGE { (0..EDGE).chain(n - EDGE..n).collect() } else { (0..n).collect() };
            for (k, &i) in shown.iter().enumerate() {
                if k > 0 {
                    write!(f, ", ")?;
                }
                if n > 2 * EDGE && i == n - EDGE {
                    write!(f, "..., ")?;
                }
                rec(f, &v[i * inner..(i + 1) * inner], &dims[1..], is_int)?;
            }
            write!(f, "]")
        }
        match self.to_f64_vec() {
            Ok(v) => {
                rec(f, &v, self.dims(), self.0.dtype.is_int())?;
                write!(f, " {:?}", self)
            }
            Err(e) => write!(f, "<{e}>"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operands that are views of one buffer are read under one lock per buffer
    /// (`read_cpu2`, `read_cpu_all`); each must still be read through its own layout.
    #[test]
    fn operands_that_share_a_buffer_are_each_read_through_their_own_layout() {
        let dev = Device::Cpu;
        let x = Tensor::randn([5, 5], &dev, 3).unwrap();
        let xt = x.t().unwrap();
        let apart = |t: &Tensor| t.copy().unwrap().to_vec::<f32>().unwrap();
        assert_eq!(apart(&x.add(&xt).unwrap()), apart(&x.add(xt.copy().unwrap()).unwrap()));
        assert_eq!(apart(&x.mul(&x).unwrap()), apart(&x.mul(x.copy().unwrap()).unwrap()));
        let (x2, xt2) = (x.copy().unwrap(), xt.copy().unwrap());
        assert_eq!(apart(&x.where_cond(&xt, &x).unwrap()), apart(&x2.where_cond(&xt2, x.copy().unwrap()).unwrap()));
        let row = x.narrow(0, 1, 1).unwrap();
        let copies = [row.copy().unwrap(), x.copy().unwrap(), row.copy().unwrap()];
        let joined_apart = Tensor::cat(&[&copies[0], &copies[1], &copies[2]], 0).unwrap();
        assert_eq!(apart(&Tensor::cat(&[&row, &x, &row], 0).unwrap()), apart(&joined_apart));

        // q, k, v, an additive mask and the output gradient, all views of one buffer.
        let qkv = Tensor::randn([2, 6, 13], &dev, 4).unwrap();
        let part = |start, len| qkv.narrow(2, start, len).unwrap();
        let (q, k, v) = (part(0, 4), part(4, 4), part(8, 4));
        let grad = part(9, 4);
        let copied = |t: &Tensor| t.copy().unwrap();
        let shared = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&part(12, 1)), true, None).unwrap();
        let separate = Tensor::scaled_dot_product_attention(
            &copied(&q),
            &copied(&k),
            &copied(&v),
            Some(&copied(&part(12, 1))),
            true,
            None,
        )
        .unwrap();
        assert_eq!(apart(&shared), apart(&separate));
        let mask_view = part(7, 6);
        let (sq, sk, sv) =
            Tensor::scaled_dot_product_attention_backward(&q, &k, &v, &grad, Some(&mask_view), false, None).unwrap();
        let (cq, ck, cv) = Tensor::scaled_dot_product_attention_backward(
            &copied(&q),
            &copied(&k),
            &copied(&v),
            &copied(&grad),
            Some(&copied(&mask_view)),
            false,
            None,
        )
        .unwrap();
        assert_eq!((apart(&sq), apart(&sk), apart(&sv)), (apart(&cq), apart(&ck), apart(&cv)));
    }

    #[test]
    fn vectors_slices_and_ndarrays_round_trip() {
        let dev = Device::Cpu;
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3], &dev).unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap(), vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]]);
        let a = t.t().unwrap().to_ndarray::<f32>().unwrap();
        assert_eq!(a.shape(), &[3, 2]);
        assert_eq!(a[[2, 1]], 6.0);
        let back = Tensor::try_from(&a).unwrap();
        assert_eq!(back.to_vec::<f32>().unwrap(), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(Tensor::scalar(7i64, &dev).unwrap().to_scalar::<i64>().unwrap(), 7);
    }

    #[test]
    fn conversions_check_element_counts_and_dtypes() {
        let dev = Device::Cpu;
        let e = Tensor::from_vec(vec![1.0f32; 5], [2, 3], &dev).unwrap_err();
        assert_eq!(e.to_string(), "from_vec: shape [2, 3] holds 6 elements but 5 were given");
        let t = Tensor::zeros([2], DType::F32, &dev).unwrap();
        assert_eq!(
            t.to_vec::<f64>().unwrap_err().to_string(),
            "to_vec: dtypes differ: lhs is f32, rhs is f64 (convert one with to_dtype)"
        );
        assert!(t.to_scalar::<f32>().unwrap_err().to_string().contains("exactly one element"));
        assert!(t.to_vec2::<f32>().is_err());
        let cuda = Tensor::zeros([2], DType::F32, &Device::Cuda(0)).unwrap_err();
        assert!(cuda.to_string().starts_with("device cuda:0 is not available"));
    }

    #[test]
    fn casts_round_to_the_target_dtype() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[1.5f64, -2.7, 300.0], &dev).unwrap();
        assert_eq!(x.to_dtype(DType::I64).unwrap().to_vec::<i64>().unwrap(), vec![1, -2, 300]);
        assert_eq!(x.to_dtype(DType::U8).unwrap().to_vec::<u8>().unwrap(), vec![1, 0, 255]);
        let h = x.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(h, vec![1.5, -2.703125, 300.0]);
    }

    #[test]
    fn ranges_and_identity() {
        let dev = Device::Cpu;
        assert_eq!(Tensor::arange(2, 5, DType::I64, &dev).unwrap().to_vec::<i64>().unwrap(), vec![2, 3, 4]);
        assert_eq!(
            Tensor::arange_step(0.0, 1.0, 0.25, DType::F32, &dev).unwrap().to_vec::<f32>().unwrap(),
            vec![0.0, 0.25, 0.5, 0.75]
        );
        assert_eq!(
            Tensor::linspace(0.0, 1.0, 3, DType::F64, &dev).unwrap().to_vec::<f64>().unwrap(),
            vec![0.0, 0.5, 1.0]
        );
        assert_eq!(Tensor::eye(2, DType::F32, &dev).unwrap().to_vec::<f32>().unwrap(), vec![1.0, 0.0, 0.0, 1.0]);
        assert!(Tensor::arange_step(0.0, 1.0, 0.0, DType::F32, &dev).is_err());
    }

    #[test]
    fn tensors_print_their_shape_and_values() {
        let dev = Device::Cpu;
        let t = Tensor::arange(0, 8, DType::I64, &dev).unwrap().reshape([2, 4]).unwrap();
        assert_eq!(format!("{t:?}"), "Tensor[2, 4] i64 cpu");
        assert_eq!(format!("{t}"), "[[0, 1, 2, 3], [4, 5, 6, 7]] Tensor[2, 4] i64 cpu");
        let long = Tensor::arange(0, 10, DType::F32, &dev).unwrap();
        assert_eq!(format!("{long}"), "[0.0000, 1.0000, 2.0000, ..., 7.0000, 8.0000, 9.0000] Tensor[10] f32 cpu");
    }
}

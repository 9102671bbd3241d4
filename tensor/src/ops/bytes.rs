//! Raw little-endian bytes to and from tensors: what file formats (safetensors, checkpoints)
//! read and write. The byte layout is the tensor's row-major order, element by element,
//! each element little-endian, exactly as safetensors and PyTorch store them.

use crate::{DType, Device, Error, Result, Shape, Tensor};
use half::{bf16, f16};

/// Decodes row-major little-endian elements of one type.
fn decode<T: bytemuck::Pod + crate::WithDType>(bytes: &[u8], shape: Shape, device: &Device) -> Result<Tensor> {
    // Copy into a typed buffer, so unaligned input is fine.
    let mut values = vec![T::zeroed(); shape.numel()];
    bytemuck::cast_slice_mut::<T, u8>(&mut values).copy_from_slice(bytes);
    #[cfg(target_endian = "big")]
    compile_error!("aigc's byte format is little-endian; big-endian hosts are not supported");
    Tensor::from_vec(values, shape, device)
}

impl Tensor {
    /// A tensor of `dtype` and `shape` from its elements as little-endian bytes in
    /// row-major order. The byte count must be exactly `numel * dtype.size_in_bytes()`.
    pub fn from_le_bytes(bytes: &[u8], dtype: DType, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let want = shape.dims().iter().try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d));
        if want != Some(bytes.len()) {
            return Err(Error::invalid(
                "from_le_bytes",
                format!(
                    "{} bytes cannot hold a {dtype:?} tensor of shape {shape:?} (needs {} bytes)",
                    bytes.len(),
                    want.map_or("more than usize::MAX".to_string(), |n| n.to_string())
                ),
            ));
        }
        match dtype {
            DType::F32 => decode::<f32>(bytes, shape, device),
            DType::F64 => decode::<f64>(bytes, shape, device),
            DType::F16 => decode::<f16>(bytes, shape, device),
            DType::BF16 => decode::<bf16>(bytes, shape, device),
            DType::I64 => decode::<i64>(bytes, shape, device),
            DType::U8 => decode::<u8>(bytes, shape, device),
        }
    }

    /// The elements as little-endian bytes in row-major order (the inverse of
    /// [`Tensor::from_le_bytes`]).
    pub fn to_le_bytes(&self) -> Result<Vec<u8>> {
        Ok(match self.dtype() {
            DType::F32 => bytemuck::cast_slice(&self.to_vec::<f32>()?).to_vec(),
            DType::F64 => bytemuck::cast_slice(&self.to_vec::<f64>()?).to_vec(),
            DType::F16 => bytemuck::cast_slice(&self.to_vec::<f16>()?).to_vec(),
            DType::BF16 => bytemuck::cast_slice(&self.to_vec::<bf16>()?).to_vec(),
            DType::I64 => bytemuck::cast_slice(&self.to_vec::<i64>()?).to_vec(),
            DType::U8 => self.to_vec::<u8>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_every_dtype_including_views() {
        let dev = Device::Cpu;
        let base = Tensor::from_vec((0..12).map(|i| i as f64 * 0.5 - 2.0).collect::<Vec<_>>(), [3, 4], &dev).unwrap();
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16, DType::I64, DType::U8] {
            let t = base.to_dtype(dtype).unwrap().t().unwrap();
            let bytes = t.to_le_bytes().unwrap();
            assert_eq!(bytes.len(), 12 * dtype.size_in_bytes());
            let back = Tensor::from_le_bytes(&bytes, dtype, [4, 3], &dev).unwrap();
            assert_eq!(back.to_f64_vec().unwrap(), t.to_f64_vec().unwrap(), "{dtype:?}");
        }
    }

    #[test]
    fn little_endian_layout_matches_the_file_format() {
        let t = Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        assert_eq!(t.to_le_bytes().unwrap(), [1.0f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat());
    }

    #[test]
    fn a_wrong_byte_count_is_an_error_not_a_panic() {
        let err = Tensor::from_le_bytes(&[0u8; 7], DType::F32, [2], &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("7 bytes cannot hold a F32 tensor of shape [2] (needs 8 bytes)"), "{err}");
        let huge = Tensor::from_le_bytes(&[0u8; 8], DType::F64, [usize::MAX, 2], &Device::Cpu).unwrap_err();
        assert!(huge.to_string().contains("more than usize::MAX"), "{huge}");
    }
}

//! Reading and writing named tensors in the safetensors format (Hugging Face): an 8-byte
//! little-endian header length, a JSON header naming each tensor's dtype, shape and byte
//! range, then the raw little-endian data. The `safetensors` crate parses and validates
//! the header (lengths checked, ranges inside the file, no overlap); this module converts
//! between its views and [`Tensor`]s. State dicts and checkpoints are built on it.

use aigc_tensor::{DType, Device, Error, Result, Tensor};
use safetensors::{Dtype as StDtype, SafeTensors, tensor::TensorView};
use std::path::Path;

fn to_st_dtype(dtype: DType) -> StDtype {
    match dtype {
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::I64 => StDtype::I64,
        DType::U8 => StDtype::U8,
    }
}

fn from_st_dtype(dtype: StDtype, name: &str) -> Result<DType> {
    Ok(match dtype {
        StDtype::F32 => DType::F32,
        StDtype::F64 => DType::F64,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::I64 => DType::I64,
        StDtype::U8 | StDtype::BOOL => DType::U8,
        other => {
            return Err(Error::Format {
                what: "safetensors".into(),
                reason: format!("tensor `{name}` has dtype {other:?}; supported: F32, F64, F16, BF16, I64, U8, BOOL"),
            });
        }
    })
}

fn format_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Format { what: "safetensors".into(), reason: format!("{what}: {e}") }
}

/// Serialises named tensors to safetensors bytes. Names must be unique. The format keeps
/// no order: the writer lays tensors out by dtype alignment, then name.
pub fn to_safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut datas = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if datas.iter().any(|(n, _, _, _): &(&String, _, _, _)| *n == name) {
            return Err(Error::invalid("safetensors", format!("the tensor name `{name}` appears twice")));
        }
        datas.push((name, to_st_dtype(t.dtype()), t.dims().to_vec(), t.to_le_bytes()?));
    }
    let views: Vec<(&String, TensorView<'_>)> = datas
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|v| (*name, v)).map_err(|e| format_error(name, e))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, None).map_err(|e| format_error("serialize", e))
}

/// Parses safetensors bytes into named tensors on `device`, in the order of their data in
/// the file.
pub fn from_safetensors_bytes(bytes: &[u8], device: &Device) -> Result<Vec<(String, Tensor)>> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| format_error("invalid file", e))?;
    let mut entries = file.tensors();
    entries.sort_by_key(|(_, v)| v.data().as_ptr() as usize);
    entries
        .into_iter()
        .map(|(name, view)| {
            let dtype = from_st_dtype(view.dtype(), &name)?;
            let t = Tensor::from_le_bytes(view.data(), dtype, view.shape(), device)?;
            Ok((name, t))
        })
        .collect()
}

/// Writes named tensors to a safetensors file (see [`to_safetensors_bytes`]). The write
/// is not atomic; training checkpoints add atomic writes on top.
pub fn save_safetensors(path: impl AsRef<Path>, tensors: &[(String, Tensor)]) -> Result<()> {
    let path = path.as_ref();
    let bytes = to_safetensors_bytes(tensors)?;
    std::fs::write(path, bytes).map_err(|e| Error::Io { path: path.display().to_string(), reason: e.to_string() })
}

/// Reads a safetensors file into named tensors on `device`.
pub fn load_safetensors(path: impl AsRef<Path>, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let path = path.as_ref();
    let bytes =
        std::fs::read(path).map_err(|e| Error::Io { path: path.display().to_string(), reason: e.to_string() })?;
    from_safetensors_bytes(&bytes, device).map_err(|e| match e {
        Error::Format { reason, .. } => Error::Format { what: path.display().to_string(), reason },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_tensors_round_trip_with_their_dtypes_and_shapes() {
        let dev = Device::Cpu;
        let a = Tensor::from_vec(vec![1.5f32, -2.0, 3.25, 0.0, 7.0, 8.0], [2, 3], &dev).unwrap();
        let tensors = vec![
            ("z.weight".to_string(), a.t().unwrap()),
            ("a.bias".to_string(), a.to_dtype(DType::BF16).unwrap()),
            ("ids".to_string(), Tensor::new(&[3i64, -1], &dev).unwrap()),
        ];
        let back = from_safetensors_bytes(&to_safetensors_bytes(&tensors).unwrap(), &dev).unwrap();
        assert_eq!(back.len(), 3);
        for (name, t0) in &tensors {
            let (_, t1) = back.iter().find(|(n, _)| n == name).unwrap();
            assert_eq!((t0.dtype(), t0.dims()), (t1.dtype(), t1.dims()));
            assert_eq!(t0.to_f64_vec().unwrap(), t1.to_f64_vec().unwrap());
        }
    }

    #[test]
    fn corrupted_bytes_are_a_format_error() {
        let dev = Device::Cpu;
        let good = to_safetensors_bytes(&[("w".into(), Tensor::ones([4], DType::F32, &dev).unwrap())]).unwrap();
        for bad in [&good[..5], &good[..good.len() - 1], &[0xffu8; 16][..]] {
            let err = from_safetensors_bytes(bad, &dev).unwrap_err();
            assert!(matches!(err, Error::Format { .. }), "{err}");
        }
        let dup = vec![("w".to_string(), Tensor::ones([1], DType::F32, &dev).unwrap()); 2];
        assert!(to_safetensors_bytes(&dup).unwrap_err().to_string().contains("`w` appears twice"));
    }
}

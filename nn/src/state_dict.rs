//! State dicts: a model's parameters and buffers as named tensors under PyTorch's key
//! names (`0.weight`, `encoder.layers.0.self_attn.in_proj_weight`,
//! `bn.running_mean`), saved as safetensors, so weights move between aigc, PyTorch
//! (`model.load_state_dict(safetensors.torch.load_file(path))`) and the Hugging Face
//! ecosystem in both directions.
//!
//! Keys are relative to the store path they are taken from, as a PyTorch submodule's
//! `state_dict()` is: `state_dict(&vs.pp("encoder"))` has `layers.0.weight`, not
//! `encoder.layers.0.weight`.
//!
//! Loading is PyTorch's `load_state_dict(strict=...)`: strict loading accepts only an exact
//! match of keys and shapes and otherwise fails with ONE error that lists every missing,
//! unexpected and mis-shaped key (and changes nothing); non-strict loading loads what
//! matches and reports the rest in a [`LoadReport`]. Values are converted to the dtype of
//! the tensor they load into (a bf16 file loads into an f32 model).

use crate::VarStore;
use crate::safetensors_io::{load_safetensors, save_safetensors};
use aigc_tensor::{DType, Error, Result, Shape, Tensor};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

/// The parameters, then the buffers, under this store path, with keys relative to it.
/// The tensors share storage with the model.
pub fn state_dict(vs: &VarStore) -> Vec<(String, Tensor)> {
    let prefix = vs.full_name("");
    let relative = |name: String| name.strip_prefix(&prefix).map(str::to_string).unwrap_or(name);
    let params = vs.named_parameters().into_iter().map(|(n, v)| (relative(n), v.value().clone()));
    let buffers = vs.named_buffers().into_iter().map(|(n, t)| (relative(n), t));
    params.chain(buffers).collect()
}

/// Writes [`state_dict`] to a safetensors file. With `dtype` (f32, bf16, f16), float
/// tensors are stored in that dtype; integer buffers keep theirs.
pub fn save_state_dict(vs: &VarStore, path: impl AsRef<Path>, dtype: Option<DType>) -> Result<()> {
    let mut tensors = state_dict(vs);
    if let Some(dtype) = dtype {
        if !dtype.is_float() {
            return Err(Error::invalid(
                "save_state_dict",
                format!("cannot store weights as {dtype:?}: pick a float dtype"),
            ));
        }
        for (_, t) in &mut tensors {
            if t.dtype().is_float() {
                *t = t.to_dtype(dtype)?;
            }
        }
    }
    save_safetensors(path, &tensors)
}

/// What a state-dict load matched.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    /// Keys loaded into the model.
    pub loaded: Vec<String>,
    /// Keys of the model that the state dict lacks (left as they were).
    pub missing: Vec<String>,
    /// Keys of the state dict that the model lacks (ignored).
    pub unexpected: Vec<String>,
    /// Keys whose shapes differ: `(key, shape in the model, shape in the state dict)`
    /// (left as they were).
    pub mismatched: Vec<(String, Shape, Shape)>,
}

impl LoadReport {
    /// Whether every key matched in name and shape.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

impl fmt::Display for LoadReport {
    /// The problems, one kind per clause: `missing keys: a, b; unexpected keys: c;
    /// mis-shaped keys: d (model [2, 3], state dict [3, 2])`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing keys: {}", self.missing.join(", ")));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!("unexpected keys: {}", self.unexpected.join(", ")));
        }
        if !self.mismatched.is_empty() {
            let shapes: Vec<String> = self
                .mismatched
                .iter()
                .map(|(k, model, file)| format!("{k} (model {model}, state dict {file})"))
                .collect();
            parts.push(format!("mis-shaped keys: {}", shapes.join(", ")));
        }
        if parts.is_empty() {
            write!(f, "all {} keys loaded", self.loaded.len())
        } else {
            write!(f, "{}", parts.join("; "))
        }
    }
}

/// Loads named tensors into the parameters and buffers under `vs` (keys relative to its
/// path). Strict: any missing, unexpected or mis-shaped key fails with one error listing
/// them all, and nothing is loaded. Not strict: loads the keys that match in name and
/// shape and reports the others.
pub fn load_state_dict(vs: &VarStore, tensors: &[(String, Tensor)], strict: bool) -> Result<LoadReport> {
    let given: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let model = state_dict(vs);
    let mut report = LoadReport::default();
    let mut plan = Vec::new();
    for (key, target) in &model {
        match given.get(key.as_str()) {
            None => report.missing.push(key.clone()),
            Some(source) if source.dims() != target.dims() => {
                report.mismatched.push((key.clone(), target.shape(), source.shape()))
            }
            Some(source) => {
                plan.push((target, *source));
                report.loaded.push(key.clone());
            }
        }
    }
    let model_keys: HashSet<&str> = model.iter().map(|(k, _)| k.as_str()).collect();
    report.unexpected = tensors.iter().map(|(n, _)| n).filter(|n| !model_keys.contains(n.as_str())).cloned().collect();
    if strict && !report.is_exact() {
        return Err(Error::invalid("load_state_dict", format!("strict load failed: {report}")));
    }
    for (target, source) in plan {
        target.assign_(&source.to_dtype(target.dtype())?)?;
    }
    Ok(report)
}

/// [`load_state_dict`] from a safetensors file (as written by [`save_state_dict`] or by
/// `safetensors.torch.save_file(model.state_dict(), path)`).
pub fn load_state_dict_file(vs: &VarStore, path: impl AsRef<Path>, strict: bool) -> Result<LoadReport> {
    let tensors = load_safetensors(path.as_ref(), &vs.device())?;
    load_state_dict(vs, &tensors, strict).map_err(|e| match e {
        Error::InvalidArgument { op, reason } => {
            Error::InvalidArgument { op, reason: format!("{}: {reason}", path.as_ref().display()) }
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Fixture, Tol, assert_close};
    use crate::{Init, Linear, Module, Sequential};
    use aigc_autograd::Var;
    use aigc_tensor::Device;

    fn mlp(vs: &VarStore, dims: [usize; 3]) -> Sequential {
        Sequential::new()
            .layer(Linear::new(&vs.pp("0"), dims[0], dims[1]).unwrap())
            .then(|x| x.relu())
            .layer(Linear::new(&vs.pp("2"), dims[1], dims[2]).unwrap())
    }

    fn keys(tensors: &[(String, Tensor)]) -> Vec<&str> {
        tensors.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn keys_are_pytorch_names_relative_to_the_store_path() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        mlp(&vs.pp("encoder"), [2, 3, 1]);
        vs.pp("encoder")
            .pp("bn")
            .buffer("running_mean", Tensor::zeros([3], DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(
            keys(&state_dict(&vs)),
            vec!["encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias", "encoder.bn.running_mean"]
        );
        assert_eq!(keys(&state_dict(&vs.pp("encoder")))[..2], ["0.weight", "0.bias"]);
    }

    #[test]
    fn interop_fixture_from_pytorch_reproduces_its_output() {
        // nn/fixtures/interop.py: torch.nn.Sequential(Linear(5, 8), ReLU(), Linear(8, 3))
        // saved in f64 with `safetensors.torch.save_file(model.state_dict(), ...)`.
        let fx = Fixture::interop();
        let weights: Vec<(String, Tensor)> =
            fx.keys_under("").into_iter().filter(|n| n.contains('.')).map(|n| (n.clone(), fx.get(&n))).collect();
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let vs = VarStore::new(dtype, &Device::Cpu, 7);
            let model = mlp(&vs, [5, 8, 3]);
            let report = load_state_dict(&vs, &weights, true).unwrap();
            assert_eq!(report.loaded.len(), 4);
            let x = Var::constant(fx.get("input").to_dtype(dtype).unwrap());
            let output = model.forward(&x).unwrap();
            assert_close(output.value(), &fx.get("output"), Tol::abs(tol), &format!("{dtype:?} output"));
        }
    }

    #[test]
    fn strict_load_lists_every_problem_in_one_error_and_loads_nothing() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        mlp(&vs, [2, 3, 1]);
        let before = state_dict(&vs).iter().map(|(_, t)| t.to_f64_vec().unwrap()).collect::<Vec<_>>();
        let dev = Device::Cpu;
        let tensors = vec![
            ("0.weight".to_string(), Tensor::ones([3, 2], DType::F32, &dev).unwrap()),
            ("0.bias".to_string(), Tensor::ones([4], DType::F32, &dev).unwrap()),
            ("2.weight".to_string(), Tensor::ones([1, 3], DType::F32, &dev).unwrap()),
            ("head.weight".to_string(), Tensor::ones([1], DType::F32, &dev).unwrap()),
        ];
        let err = load_state_dict(&vs, &tensors, true).unwrap_err().to_string();
        assert_eq!(
            err,
            "load_state_dict: strict load failed: missing keys: 2.bias; unexpected keys: head.weight; \
             mis-shaped keys: 0.bias (model [3], state dict [4])"
        );
        let after = state_dict(&vs).iter().map(|(_, t)| t.to_f64_vec().unwrap()).collect::<Vec<_>>();
        assert_eq!(before, after);

        let report = load_state_dict(&vs, &tensors, false).unwrap();
        assert_eq!(report.loaded, vec!["0.weight", "2.weight"]);
        assert!(!report.is_exact());
        assert_eq!(state_dict(&vs)[0].1.to_vec::<f32>().unwrap(), vec![1.0; 6]);
    }

    #[test]
    fn saved_files_round_trip_in_f32_bf16_and_f16_and_keep_integer_buffers() {
        let dir = std::env::temp_dir().join(format!("aigc-state-dict-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vs = VarStore::new(DType::F32, &Device::Cpu, 3);
        mlp(&vs, [4, 3, 2]);
        let count = Tensor::new(&[7i64], &Device::Cpu).unwrap();
        vs.pp("bn").buffer("num_batches_tracked", count).unwrap();
        for dtype in [None, Some(DType::BF16), Some(DType::F16)] {
            let path = dir.join(format!("{dtype:?}.safetensors"));
            save_state_dict(&vs, &path, dtype).unwrap();
            let on_disk = load_safetensors(&path, &Device::Cpu).unwrap();
            let (_, w) = on_disk.iter().find(|(n, _)| n == "0.weight").unwrap();
            assert_eq!(w.dtype(), dtype.unwrap_or(DType::F32));
            let (_, n) = on_disk.iter().find(|(n, _)| n == "bn.num_batches_tracked").unwrap();
            assert_eq!(n.dtype(), DType::I64);

            let other = VarStore::new(DType::F32, &Device::Cpu, 4);
            mlp(&other, [4, 3, 2]);
            other.pp("bn").buffer("num_batches_tracked", Tensor::new(&[0i64], &Device::Cpu).unwrap()).unwrap();
            load_state_dict_file(&other, &path, true).unwrap();
            let tol = Tol::scaled(if dtype.is_none() { 0.0 } else { 1e-2 });
            for ((name, saved), (_, loaded)) in state_dict(&vs).iter().zip(&state_dict(&other)) {
                assert_close(loaded, saved, tol, &format!("{name} through {dtype:?}"));
            }
        }
        assert!(save_state_dict(&vs, dir.join("x"), Some(DType::I64)).is_err());
        let err = load_state_dict_file(&vs, dir.join("absent.safetensors"), true).unwrap_err().to_string();
        assert!(err.contains("absent.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_frozen_store_still_saves_every_parameter() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        vs.pp("a").param("w", [2], Init::Const(1.0)).unwrap();
        vs.freeze();
        assert_eq!(keys(&state_dict(&vs)), vec!["a.w"]);
    }
}

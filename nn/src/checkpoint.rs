//! Training checkpoints: everything a run needs to continue exactly where it stopped —
//! the model's state dict, the optimizer's state, the step, the store's random state
//! (its seed and how many dropout seeds it has drawn), the caller's own random or
//! data-loader state as `u64`s, a configuration string, and any extra named tensors
//! (an EMA's shadows, a second optimizer) — in ONE safetensors file.
//!
//! **Layout.** Tensors are named `model.{key}`, `optimizer.{key}` and `extra.{key}`;
//! scalars and strings go in the header's `__metadata__` map (`format`, `step`,
//! `store_seed`, `seed_draws`, `rng`, `config`), with a `checksum` (64-bit FNV-1a over
//! every tensor's name, dtype, shape and bytes and every other metadata entry), so a
//! corrupted file is an error rather than silently different weights.
//!
//! **Atomic writes.** [`Checkpoint::save`] writes `path.tmp-<pid>`, flushes it to disk
//! (`fsync`), renames it over `path` and flushes the directory: a crash leaves either the
//! old checkpoint or the new one, never half of one.
//!
//! **Careful reads.** [`Checkpoint::load`] checks the header length against the file
//! length before reading anything else (a corrupted length cannot ask for a huge
//! allocation), lets the `safetensors` crate validate the header, then checks the format,
//! every metadata entry and the checksum. Every failure is an `Err` naming the file.

use crate::VarStore;
use crate::optim::Optimizer;
use crate::safetensors_io::{from_safetensors_bytes, to_safetensors_bytes};
use crate::state_dict::{load_state_dict, state_dict};
use aigc_tensor::{Device, Error, Result, Tensor};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The `format` metadata value of files written by this version.
const FORMAT: &str = "aigc-checkpoint/1";
/// Tensor name prefixes of the three sections.
const SECTIONS: [&str; 3] = ["model", "optimizer", "extra"];

/// A training run's full state at a step boundary.
#[derive(Clone, Debug, Default)]
pub struct Checkpoint {
    /// The model's state dict (parameters and buffers, PyTorch keys).
    pub model: Vec<(String, Tensor)>,
    /// The optimizer's state ([`Optimizer::state`]).
    pub optimizer: Vec<(String, Tensor)>,
    /// Other named state, grouped by a prefix (see [`Checkpoint::with_extra`]).
    pub extra: Vec<(String, Tensor)>,
    /// Training steps completed.
    pub step: u64,
    /// The seed of the [`VarStore`] the model lives in.
    pub store_seed: u64,
    /// How many seeds the store had drawn ([`VarStore::seed_draws`]).
    pub seed_draws: u64,
    /// The caller's own random or data-loader state.
    pub rng: Vec<u64>,
    /// The run's configuration, in any text form the caller likes.
    pub config: String,
}

impl Checkpoint {
    /// The state of a run after `step` steps: the whole store's state dict, the
    /// optimizer's state and the store's random state. The tensors share storage with the
    /// model and the optimizer: save before the next training step.
    pub fn capture(vs: &VarStore, optimizer: &dyn Optimizer, step: u64) -> Checkpoint {
        Checkpoint {
            model: state_dict(vs),
            optimizer: optimizer.state(),
            step,
            store_seed: vs.seed(),
            seed_draws: vs.seed_draws(),
            ..Checkpoint::default()
        }
    }

    /// The same checkpoint with the caller's random state.
    pub fn with_rng(self, rng: Vec<u64>) -> Checkpoint {
        Checkpoint { rng, ..self }
    }

    /// The same checkpoint with a configuration string.
    pub fn with_config(self, config: impl Into<String>) -> Checkpoint {
        Checkpoint { config: config.into(), ..self }
    }

    /// The same checkpoint with `tensors` added to the extra state under `{name}.`
    /// (`with_extra("ema", ema.state())`); read them back with [`Checkpoint::extra`].
    pub fn with_extra(mut self, name: &str, tensors: Vec<(String, Tensor)>) -> Checkpoint {
        self.extra.extend(tensors.into_iter().map(|(k, t)| (format!("{name}.{k}"), t)));
        self
    }

    /// The extra tensors saved under `name` by [`Checkpoint::with_extra`], prefix removed.
    pub fn extra(&self, name: &str) -> Vec<(String, Tensor)> {
        let prefix = format!("{name}.");
        self.extra.iter().filter_map(|(k, t)| Some((k.strip_prefix(&prefix)?.to_string(), t.clone()))).collect()
    }

    /// Puts the model, the optimizer and the store's random state back as they were.
    /// Fails, naming every problem, if the store's seed differs, if any model key is
    /// missing, unexpected or mis-shaped, or if the optimizer state does not fit.
    pub fn restore(&self, vs: &VarStore, optimizer: &mut dyn Optimizer) -> Result<()> {
        if vs.seed() != self.store_seed {
            return Err(Error::invalid(
                "Checkpoint::restore",
                format!(
                    "the checkpoint was written from a store seeded with {}, this store has seed {}: \
                     dropout would draw different masks",
                    self.store_seed,
                    vs.seed()
                ),
            ));
        }
        optimizer.load_state(&self.optimizer)?;
        load_state_dict(vs, &self.model, true)?;
        vs.set_seed_draws(self.seed_draws);
        Ok(())
    }

    /// Writes the checkpoint to `path` atomically (temporary file, fsync, rename, fsync of
    /// the directory).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        write_atomically(path, &self.to_bytes()?)
    }

    /// Reads a checkpoint written by [`Checkpoint::save`]; tensors are on the CPU.
    pub fn load(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let bytes = read_checked(path)?;
        Checkpoint::from_bytes(&bytes).map_err(|e| match e {
            Error::Format { reason, .. } => Error::Format { what: path.display().to_string(), reason },
            other => other,
        })
    }

    /// The checkpoint as the bytes of a safetensors file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors = Vec::with_capacity(self.model.len() + self.optimizer.len() + self.extra.len());
        for (section, entries) in SECTIONS.iter().zip([&self.model, &self.optimizer, &self.extra]) {
            tensors.extend(entries.iter().map(|(k, t)| (format!("{section}.{k}"), t.clone())));
        }
        // Serialise once to let `safetensors_io` convert the tensors, then again with the
        // metadata and its checksum.
        let plain = to_safetensors_bytes(&tensors)?;
        let parsed = SafeTensors::deserialize(&plain).map_err(|e| format_error(format!("serialize: {e}")))?;
        let mut metadata = self.metadata();
        metadata.insert("checksum".into(), checksum(&parsed.tensors(), &metadata));
        safetensors::serialize(parsed.tensors(), Some(metadata)).map_err(|e| format_error(format!("serialize: {e}")))
    }

    /// Parses the bytes of a checkpoint file, checking the header length, the format,
    /// every metadata entry and the checksum.
    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint> {
        check_header_length(bytes.len() as u64, bytes.get(..8))?;
        let file = SafeTensors::deserialize(bytes).map_err(|e| format_error(format!("invalid file: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format_error(format!("invalid file: {e}")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        match metadata.get("format").map(String::as_str) {
            Some(FORMAT) => {}
            Some(other) => return Err(format_error(format!("format `{other}` is not `{FORMAT}`"))),
            None => {
                return Err(format_error(
                    "no `format` metadata: not an aigc checkpoint (load plain weights with load_state_dict_file)",
                ));
            }
        }
        let stored = metadata.get("checksum").ok_or_else(|| format_error("no `checksum` metadata"))?;
        let actual = checksum(&file.tensors(), &metadata);
        if *stored != actual {
            return Err(format_error(format!(
                "checksum mismatch (stored {stored}, computed {actual}): the file is corrupted"
            )));
        }
        let mut checkpoint = Checkpoint {
            step: parse_u64(&metadata, "step")?,
            store_seed: parse_u64(&metadata, "store_seed")?,
            seed_draws: parse_u64(&metadata, "seed_draws")?,
            rng: parse_u64_list(required(&metadata, "rng")?)?,
            config: required(&metadata, "config")?.to_string(),
            ..Checkpoint::default()
        };
        for (name, t) in from_safetensors_bytes(bytes, &Device::Cpu)? {
            let (section, key) = name.split_once('.').unwrap_or(("", &name));
            let entries = match section {
                "model" => &mut checkpoint.model,
                "optimizer" => &mut checkpoint.optimizer,
                "extra" => &mut checkpoint.extra,
                _ => return Err(format_error(format!("tensor `{name}` is in none of the sections {SECTIONS:?}"))),
            };
            entries.push((key.to_string(), t));
        }
        Ok(checkpoint)
    }

    /// The scalar and string entries of the header (all but the checksum).
    fn metadata(&self) -> HashMap<String, String> {
        let rng: Vec<String> = self.rng.iter().map(u64::to_string).collect();
        HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("step".to_string(), self.step.to_string()),
            ("store_seed".to_string(), self.store_seed.to_string()),
            ("seed_draws".to_string(), self.seed_draws.to_string()),
            ("rng".to_string(), rng.join(",")),
            ("config".to_string(), self.config.clone()),
        ])
    }
}

fn format_error(reason: impl Into<String>) -> Error {
    Error::Format { what: "checkpoint".into(), reason: reason.into() }
}

/// Rejects a file whose 8-byte header length is absent or larger than what follows it.
fn check_header_length(file_len: u64, first_bytes: Option<&[u8]>) -> Result<()> {
    let Some(Ok(n)) = first_bytes.map(<[u8; 8]>::try_from) else {
        return Err(format_error(format!("{file_len} bytes is too short for the 8-byte header length")));
    };
    let header_len = u64::from_le_bytes(n);
    if header_len > file_len - 8 {
        return Err(format_error(format!(
            "the header claims {header_len} bytes but only {} follow: the file is truncated or corrupted",
            file_len - 8
        )));
    }
    Ok(())
}

/// Reads a whole file after checking its header length against its size.
fn read_checked(path: &Path) -> Result<Vec<u8>> {
    let io_error = |e: std::io::Error| Error::Io { path: path.display().to_string(), reason: e.to_string() };
    let mut file = File::open(path).map_err(io_error)?;
    let len = file.metadata().map_err(io_error)?.len();
    let mut first = [0u8; 8];
    if len >= 8 {
        file.read_exact(&mut first).map_err(io_error)?;
    }
    check_header_length(len, (len >= 8).then_some(&first[..])).map_err(|e| match e {
        Error::Format { reason, .. } => Error::Format { what: path.display().to_string(), reason },
        other => other,
    })?;
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    bytes.extend_from_slice(&first);
    file.read_to_end(&mut bytes).map_err(io_error)?;
    Ok(bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same directory, so that
/// `path` always holds a complete file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io_error = |p: &Path, e: std::io::Error| Error::Io { path: p.display().to_string(), reason: e.to_string() };
    let file_name = path.file_name().ok_or_else(|| Error::invalid("Checkpoint::save", "the path has no file name"))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        // Best effort: the temporary file may not exist, and the write error is what matters.
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error(path, e));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    sync_dir(dir).map_err(|e| io_error(dir, e))
}

/// Flushes a directory's entries (the rename) to disk.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
/// Directories cannot be opened for syncing here; the rename is as durable as the OS makes it.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}

/// 64-bit FNV-1a over every tensor (by name: name, dtype, shape, bytes) and every
/// metadata entry but `checksum` (by key), each field prefixed by its length; as hex.
fn checksum(tensors: &[(String, TensorView<'_>)], metadata: &HashMap<String, String>) -> String {
    let mut hash = Fnv1a::new();
    let mut entries: Vec<(&String, &String)> = metadata.iter().filter(|(k, _)| *k != "checksum").collect();
    entries.sort();
    for (key, value) in entries {
        hash.field(key.as_bytes());
        hash.field(value.as_bytes());
    }
    let mut views: Vec<&(String, TensorView<'_>)> = tensors.iter().collect();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in views {
        hash.field(name.as_bytes());
        hash.field(format!("{:?}", view.dtype()).as_bytes());
        let shape: Vec<u8> = view.shape().iter().flat_map(|&d| (d as u64).to_le_bytes()).collect();
        hash.field(&shape);
        hash.field(view.data());
    }
    format!("{:016x}", hash.0)
}

/// The 64-bit Fowler–Noll–Vo hash, FNV-1a variant.
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Fnv1a {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    /// A length-prefixed field, so that field boundaries count.
    fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }
}

fn required<'a>(metadata: &'a HashMap<String, String>, key: &str) -> Result<&'a str> {
    metadata.get(key).map(String::as_str).ok_or_else(|| format_error(format!("missing metadata `{key}`")))
}

fn parse_u64(metadata: &HashMap<String, String>, key: &str) -> Result<u64> {
    let value = required(metadata, key)?;
    value.parse().map_err(|_| format_error(format!("metadata `{key}` is `{value}`, not an unsigned integer")))
}

/// Parses `1,2,3` (or the empty string) into numbers.
fn parse_u64_list(value: &str) -> Result<Vec<u64>> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(|v| v.parse().map_err(|_| format_error(format!("metadata `rng` holds `{v}`, not an unsigned integer"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamConfig, AdamW};
    use crate::{Linear, Module};
    use aigc_autograd::Var;
    use aigc_tensor::DType;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("aigc-checkpoint-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A small trained model and its optimizer, after two steps.
    fn trained() -> (VarStore, Linear, AdamW) {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 5);
        let lin = Linear::new(&vs.pp("fc"), 3, 2).unwrap();
        let mut opt = AdamW::adamw(vs.named_parameters(), AdamConfig { lr: 0.1, ..Default::default() }).unwrap();
        let x = Var::constant(Tensor::ones([4, 3], DType::F32, &Device::Cpu).unwrap());
        for _ in 0..2 {
            opt.zero_grad();
            lin.forward(&x).unwrap().square().unwrap().sum_all().unwrap().backward().unwrap();
            opt.step().unwrap();
        }
        vs.next_seed();
        (vs, lin, opt)
    }

    fn small_checkpoint() -> Checkpoint {
        let (vs, _, opt) = trained();
        Checkpoint::capture(&vs, &opt, 2).with_rng(vec![7, u64::MAX]).with_config("lr=0.1\nbatch=4")
    }

    fn tensor_bytes(entries: &[(String, Tensor)]) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<_> = entries.iter().map(|(k, t)| (k.clone(), t.to_le_bytes().unwrap())).collect();
        out.sort();
        out
    }

    /// Whether two checkpoints hold the same state.
    fn same(a: &Checkpoint, b: &Checkpoint) -> bool {
        (a.step, a.store_seed, a.seed_draws, &a.rng, &a.config)
            == (b.step, b.store_seed, b.seed_draws, &b.rng, &b.config)
            && tensor_bytes(&a.model) == tensor_bytes(&b.model)
            && tensor_bytes(&a.optimizer) == tensor_bytes(&b.optimizer)
            && tensor_bytes(&a.extra) == tensor_bytes(&b.extra)
    }

    #[test]
    fn save_load_restore_round_trip() {
        let dir = temp_dir("round-trip");
        let path = dir.join("run.ckpt");
        let (vs, lin, opt) = trained();
        let ema = vec![("fc.weight".to_string(), Tensor::ones([2, 3], DType::F32, &Device::Cpu).unwrap())];
        let saved = Checkpoint::capture(&vs, &opt, 2).with_rng(vec![1, 2, 3]).with_config("c").with_extra("ema", ema);
        saved.save(&path).unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec!["run.ckpt"], "no temporary file is left behind");
        let loaded = Checkpoint::load(&path).unwrap();
        assert!(same(&saved, &loaded));
        assert_eq!((loaded.step, loaded.seed_draws, loaded.rng.as_slice()), (2, 1, &[1u64, 2, 3][..]));
        assert_eq!(loaded.extra("ema")[0].0, "fc.weight");

        let other = VarStore::new(DType::F32, &Device::Cpu, 5);
        let lin2 = Linear::new(&other.pp("fc"), 3, 2).unwrap();
        let mut opt2 = AdamW::adamw(other.named_parameters(), AdamConfig::default()).unwrap();
        loaded.restore(&other, &mut opt2).unwrap();
        assert_eq!(lin.weight.value().to_vec::<f32>().unwrap(), lin2.weight.value().to_vec::<f32>().unwrap());
        assert_eq!(other.seed_draws(), 1);
        assert_eq!(tensor_bytes(&state_dict(&other)), tensor_bytes(&loaded.model));
        assert_eq!(tensor_bytes(&opt2.state()), tensor_bytes(&loaded.optimizer));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn restore_rejects_another_seed_model_or_optimizer() {
        let checkpoint = small_checkpoint();
        let other_seed = VarStore::new(DType::F32, &Device::Cpu, 6);
        Linear::new(&other_seed.pp("fc"), 3, 2).unwrap();
        let mut opt = AdamW::adamw(other_seed.named_parameters(), AdamConfig::default()).unwrap();
        let err = checkpoint.restore(&other_seed, &mut opt).unwrap_err().to_string();
        assert!(err.contains("seeded with 5, this store has seed 6"), "{err}");

        let wider = VarStore::new(DType::F32, &Device::Cpu, 5);
        Linear::new(&wider.pp("fc"), 4, 2).unwrap();
        let mut opt = AdamW::adamw(wider.named_parameters(), AdamConfig::default()).unwrap();
        let err = checkpoint.restore(&wider, &mut opt).unwrap_err().to_string();
        assert!(err.contains("`exp_avg.fc.weight` has shape [2, 3] but the parameter has shape [2, 4]"), "{err}");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = small_checkpoint().to_bytes().unwrap();
        for len in 0..bytes.len() {
            assert!(Checkpoint::from_bytes(&bytes[..len]).is_err(), "a prefix of {len} bytes loaded");
        }
        let dir = temp_dir("truncated");
        for len in [0, 7, 8, 64, bytes.len() - 1] {
            let path = dir.join(format!("{len}.ckpt"));
            std::fs::write(&path, &bytes[..len]).unwrap();
            let err = Checkpoint::load(&path).unwrap_err().to_string();
            assert!(err.contains(&format!("{len}.ckpt")), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_huge_header_length_is_rejected_before_reading() {
        let dir = temp_dir("huge");
        let path = dir.join("huge.ckpt");
        let mut bytes = (u64::MAX / 2).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&path, &bytes).unwrap();
        let err = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(err.contains("header claims 9223372036854775807 bytes but only 2 follow"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn flipped_bytes_are_an_error_or_change_nothing() {
        let original = small_checkpoint();
        let bytes = original.to_bytes().unwrap();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut state = 0x1234_5678u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state >> 33
        };
        let mut errors = 0;
        for _ in 0..2000 {
            let mut corrupted = bytes.clone();
            // Mostly the header, sometimes the data.
            let at = if next() % 4 == 0 { next() as usize % bytes.len() } else { next() as usize % header_end };
            corrupted[at] ^= (next() % 255 + 1) as u8;
            match Checkpoint::from_bytes(&corrupted) {
                Err(_) => errors += 1,
                // Only a change of JSON whitespace (the header's padding) may go unnoticed.
                Ok(loaded) => assert!(same(&original, &loaded), "a flip at byte {at} changed the state silently"),
            }
        }
        assert!(errors > 1900, "{errors} errors");
    }

    #[test]
    fn bad_metadata_is_named() {
        let bytes = small_checkpoint().to_bytes().unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let rewrite = |edit: &dyn Fn(&mut HashMap<String, String>)| {
            let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
            let mut metadata = header.metadata().clone().unwrap();
            edit(&mut metadata);
            metadata.insert("checksum".into(), checksum(&file.tensors(), &metadata));
            let bytes = safetensors::serialize(file.tensors(), Some(metadata)).unwrap();
            Checkpoint::from_bytes(&bytes).unwrap_err().to_string()
        };
        let set = |key: &'static str, value: &'static str| {
            move |m: &mut HashMap<String, String>| {
                m.insert(key.to_string(), value.to_string());
            }
        };
        assert!(rewrite(&set("step", "ten")).contains("`step` is `ten`"));
        assert!(rewrite(&set("rng", "1,x")).contains("`rng` holds `x`"));
        assert!(rewrite(&set("format", "other/2")).contains("format `other/2`"));
        assert!(
            rewrite(&|m| {
                m.remove("config");
            })
            .contains("missing metadata `config`")
        );
        let plain = to_safetensors_bytes(&small_checkpoint().model).unwrap();
        let err = Checkpoint::from_bytes(&plain).unwrap_err().to_string();
        assert!(err.contains("not an aigc checkpoint"), "{err}");
    }
}

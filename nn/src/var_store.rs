//! [`VarStore`]: where a model's parameters live, under PyTorch-style hierarchical names
//! (`blocks.0.attn.qkv.weight`). A layer is built from a store path (`vs.pp("fc1")`) and
//! registers its parameters there; the optimizer and the state dict read them back by
//! name. Each parameter is initialised from a seed derived from the store's seed and its
//! full name, so adding a layer never changes another layer's initial weights.

use aigc_autograd::Var;
use aigc_tensor::{DType, Device, Error, Result, Shape, Tensor};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How a new parameter is filled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Every element equal to the value.
    Const(f64),
    /// Uniform in `[lo, hi)`.
    Uniform { lo: f64, hi: f64 },
    /// Normal with the given mean and standard deviation.
    Normal { mean: f64, std: f64 },
}

struct Store {
    vars: Mutex<Vec<(String, Var)>>,
    buffers: Mutex<Vec<(String, Tensor)>>,
    /// Draws of [`VarStore::next_seed`] so far: the store's random state.
    seed_draws: AtomicU64,
    dtype: DType,
    device: Device,
    seed: u64,
    training: AtomicBool,
}

/// A handle on a parameter store at some path. Cheap to clone; clones share the store.
#[derive(Clone)]
pub struct VarStore {
    store: Arc<Store>,
    path: Vec<String>,
}

/// FNV-1a, to turn a parameter's name into a seed.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The splitmix64 finaliser: a cheap bijective mix of 64 bits.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl VarStore {
    /// An empty store whose parameters have `dtype`, live on `device` and are initialised
    /// from `seed`. It starts in training mode.
    pub fn new(dtype: DType, device: &Device, seed: u64) -> VarStore {
        VarStore {
            store: Arc::new(Store {
                vars: Mutex::new(Vec::new()),
                buffers: Mutex::new(Vec::new()),
                seed_draws: AtomicU64::new(0),
                dtype,
                device: *device,
                seed,
                training: AtomicBool::new(true),
            }),
            path: vec![],
        }
    }

    /// The store one level down: `vs.pp("encoder").pp(0)` names `encoder.0.*`.
    pub fn pp(&self, name: impl ToString) -> VarStore {
        let mut path = self.path.clone();
        path.push(name.to_string());
        VarStore { store: self.store.clone(), path }
    }

    /// The full name of `name` at this path.
    pub fn full_name(&self, name: &str) -> String {
        let mut parts = self.path.clone();
        parts.push(name.to_string());
        parts.join(".")
    }

    pub fn dtype(&self) -> DType {
        self.store.dtype
    }
    /// The seed the store was created with (checkpoints record it: a resumed run must
    /// draw the same dropout masks).
    pub fn seed(&self) -> u64 {
        self.store.seed
    }
    pub fn device(&self) -> Device {
        self.store.device
    }

    /// Creates and registers a trainable parameter `name` of `shape`.
    pub fn param(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Var> {
        let full = self.full_name(name);
        let seed = self.store.seed ^ name_hash(&full);
        let (dtype, device) = (self.store.dtype, &self.store.device);
        let value = match init {
            Init::Const(v) => Tensor::full(v, shape, dtype, device)?,
            Init::Uniform { lo, hi } => Tensor::uniform(shape, lo, hi, dtype, device, seed)?,
            Init::Normal { mean, std } => Tensor::normal(shape, mean, std, dtype, device, seed)?,
        };
        let var = Var::leaf(value);
        let mut vars = self.store.vars.lock().unwrap_or_else(|e| e.into_inner());
        if vars.iter().any(|(n, _)| *n == full) {
            return Err(Error::invalid("VarStore::param", format!("a parameter named `{full}` already exists")));
        }
        vars.push((full, var.clone()));
        Ok(var)
    }

    /// Creates and registers a buffer `name`: state that is saved in the state dict but not
    /// trained (BatchNorm's running statistics). The returned tensor shares its storage with
    /// the store, so in-place updates (`assign_`) are what the state dict sees.
    pub fn buffer(&self, name: &str, value: Tensor) -> Result<Tensor> {
        let full = self.full_name(name);
        let mut buffers = self.store.buffers.lock().unwrap_or_else(|e| e.into_inner());
        if buffers.iter().any(|(n, _)| *n == full) {
            return Err(Error::invalid("VarStore::buffer", format!("a buffer named `{full}` already exists")));
        }
        buffers.push((full, value.clone()));
        Ok(value)
    }

    /// Every parameter under this path, with its full name, in creation order.
    pub fn named_parameters(&self) -> Vec<(String, Var)> {
        let vars = self.store.vars.lock().unwrap_or_else(|e| e.into_inner());
        vars.iter().filter(|(n, _)| self.is_under_path(n)).cloned().collect()
    }

    /// Every buffer under this path, with its full name, in creation order.
    pub fn named_buffers(&self) -> Vec<(String, Tensor)> {
        let buffers = self.store.buffers.lock().unwrap_or_else(|e| e.into_inner());
        buffers.iter().filter(|(n, _)| self.is_under_path(n)).cloned().collect()
    }

    /// Whether the full name `name` lies under this store's path (a prefix must end at a dot).
    fn is_under_path(&self, name: &str) -> bool {
        let prefix = self.path.join(".");
        prefix.is_empty() || name.strip_prefix(&prefix).is_some_and(|rest| rest.starts_with('.'))
    }

    /// A fresh seed for a random op at forward time (dropout masks): the store's seed mixed
    /// with a counter of draws, so a run is reproducible and a resumed run continues the
    /// same sequence once [`VarStore::set_seed_draws`] restores the counter.
    pub fn next_seed(&self) -> u64 {
        let draw = self.store.seed_draws.fetch_add(1, Ordering::Relaxed);
        splitmix64(self.store.seed ^ splitmix64(draw.wrapping_add(0x5eed)))
    }
    /// How many seeds [`VarStore::next_seed`] has handed out (saved in checkpoints).
    pub fn seed_draws(&self) -> u64 {
        self.store.seed_draws.load(Ordering::Relaxed)
    }
    /// Restores the draw counter (when resuming from a checkpoint).
    pub fn set_seed_draws(&self, draws: u64) {
        self.store.seed_draws.store(draws, Ordering::Relaxed);
    }

    /// Every parameter under this path.
    pub fn parameters(&self) -> Vec<Var> {
        self.named_parameters().into_iter().map(|(_, v)| v).collect()
    }

    /// Total number of scalar parameters under this path.
    pub fn num_parameters(&self) -> usize {
        self.parameters().iter().map(|v| v.numel()).sum()
    }

    /// Number of scalar parameters under this path that are not frozen.
    pub fn num_trainable_parameters(&self) -> usize {
        self.parameters().iter().filter(|v| v.needs_grad()).map(|v| v.numel()).sum()
    }

    /// Freezes every parameter under this path (`vs.pp("encoder").freeze()`): no gradient
    /// flows into them, ops on frozen parameters alone record nothing, and optimizers skip
    /// them. Parameters created later are not frozen.
    pub fn freeze(&self) {
        self.set_requires_grad(false);
    }

    /// Unfreezes every parameter under this path.
    pub fn unfreeze(&self) {
        self.set_requires_grad(true);
    }

    fn set_requires_grad(&self, requires_grad: bool) {
        for v in self.parameters() {
            v.set_requires_grad(requires_grad).expect("store parameters are leaves");
        }
    }

    /// Whether layers built from this store behave as in training (dropout on, batch
    /// statistics) or evaluation.
    pub fn is_training(&self) -> bool {
        self.store.training.load(Ordering::Relaxed)
    }
    /// Switches the whole store between training and evaluation mode.
    pub fn set_training(&self, training: bool) {
        self.store.training.store(training, Ordering::Relaxed);
    }

    /// Clears the gradient of every parameter under this path.
    pub fn zero_grad(&self) {
        for v in self.parameters() {
            v.zero_grad();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_hierarchical_and_unique() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        vs.pp("blocks").pp(0).pp("attn").param("weight", [2, 2], Init::Const(0.0)).unwrap();
        vs.pp("head").param("bias", [2], Init::Const(0.0)).unwrap();
        let names: Vec<String> = vs.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["blocks.0.attn.weight", "head.bias"]);
        assert_eq!(vs.pp("blocks").named_parameters().len(), 1);
        assert_eq!(vs.pp("block").named_parameters().len(), 0, "a prefix must end at a dot");
        let err = vs.pp("head").param("bias", [2], Init::Const(0.0)).unwrap_err().to_string();
        assert!(err.contains("`head.bias` already exists"));
        assert_eq!(vs.num_parameters(), 6);
    }

    #[test]
    fn buffers_share_storage_and_seeds_are_reproducible() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 1);
        let running =
            vs.pp("bn").buffer("running_mean", Tensor::zeros([2], DType::F32, &Device::Cpu).unwrap()).unwrap();
        running.assign_(&Tensor::ones([2], DType::F32, &Device::Cpu).unwrap()).unwrap();
        let (name, seen) = vs.named_buffers().pop().unwrap();
        assert_eq!((name.as_str(), seen.to_vec::<f32>().unwrap()), ("bn.running_mean", vec![1.0, 1.0]));
        let seeds: Vec<u64> = (0..3).map(|_| vs.next_seed()).collect();
        assert!(seeds[0] != seeds[1] && seeds[1] != seeds[2]);
        vs.set_seed_draws(1);
        assert_eq!(vs.next_seed(), seeds[1]);
        assert_eq!(vs.seed_draws(), 2);
    }

    #[test]
    fn initial_values_depend_on_the_name_not_the_creation_order() {
        let init = Init::Normal { mean: 0.0, std: 1.0 };
        let a = VarStore::new(DType::F32, &Device::Cpu, 7);
        let wa = a.pp("fc2").param("weight", [3], init).unwrap();
        let b = VarStore::new(DType::F32, &Device::Cpu, 7);
        b.pp("fc1").param("weight", [3], init).unwrap();
        let wb = b.pp("fc2").param("weight", [3], init).unwrap();
        assert_eq!(wa.value().to_vec::<f32>().unwrap(), wb.value().to_vec::<f32>().unwrap());
    }

    #[test]
    fn freezing_a_path_stops_gradients_and_recording_there() {
        let vs = VarStore::new(DType::F64, &Device::Cpu, 0);
        let enc = vs.pp("encoder").param("weight", [2], Init::Const(2.0)).unwrap();
        let head = vs.pp("head").param("weight", [2], Init::Const(3.0)).unwrap();
        vs.pp("encoder").freeze();
        assert_eq!((vs.num_parameters(), vs.num_trainable_parameters()), (4, 2));
        // An op on frozen parameters alone is not recorded.
        let h = enc.square().unwrap();
        assert_eq!(h.op_name(), "constant");
        h.mul(&head).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(enc.grad().is_none());
        assert_eq!(head.grad().unwrap().to_vec::<f64>().unwrap(), vec![4.0, 4.0]);
        // A mixed op records, and still sends nothing into the frozen input.
        head.zero_grad();
        enc.mul(&head).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(enc.grad().is_none());
        assert_eq!(head.grad().unwrap().to_vec::<f64>().unwrap(), vec![2.0, 2.0]);
        vs.unfreeze();
        assert_eq!(vs.num_trainable_parameters(), 4);
        enc.mul(&head).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(enc.grad().unwrap().to_vec::<f64>().unwrap(), vec![3.0, 3.0]);
        let err = h.mul(&head).unwrap().set_requires_grad(false).unwrap_err().to_string();
        assert!(err.contains("only a leaf can be frozen"), "{err}");
    }
}

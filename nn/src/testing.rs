//! Test support shared by every test of the crate: the PyTorch reference fixtures of
//! `nn/fixtures/*.safetensors` (each written by the `.py` script of the same name, whose doc
//! describes its keys) and one numerical comparison, [`assert_close`].
//!
//! A fixture test copies PyTorch's parameters into our layer ([`Fixture::load_params`]), runs
//! it, and compares outputs and gradients with PyTorch's ([`Fixture::assert_matches`],
//! [`Fixture::assert_grads`]).

use crate::{VarStore, from_safetensors_bytes};
use aigc_autograd::Var;
use aigc_tensor::{Device, Result, Tensor};
use std::collections::HashMap;

/// How close a value must be to the reference: `|got - want| <= max(abs, rel * |want|)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tol {
    /// The allowed absolute difference.
    pub abs: f64,
    /// The allowed difference relative to `|want|`.
    pub rel: f64,
}

impl Tol {
    /// An absolute tolerance: `|got - want| <= tol`.
    pub const fn abs(tol: f64) -> Tol {
        Tol { abs: tol, rel: 0.0 }
    }

    /// Absolute near zero and relative for large values: `|got - want| <= tol * max(1, |want|)`.
    pub const fn scaled(tol: f64) -> Tol {
        Tol { abs: tol, rel: tol }
    }

    /// The difference allowed from `want`.
    fn allowed(self, want: f64) -> f64 {
        self.abs.max(self.rel * want.abs())
    }
}

/// The tolerance of a comparison with `layers.safetensors` (f32 values).
pub const LAYERS_TOL: Tol = Tol::scaled(1e-5);

/// What [`assert_close`] compares: a tensor (any dtype), a slice, array or `Vec` of `f64`, or
/// one `f64`.
pub trait Values {
    /// The shape and the values in row-major order.
    fn shape_and_values(&self) -> (Vec<usize>, Vec<f64>);
}

impl Values for Tensor {
    fn shape_and_values(&self) -> (Vec<usize>, Vec<f64>) {
        (self.dims().to_vec(), self.to_f64_vec().unwrap())
    }
}

impl Values for [f64] {
    fn shape_and_values(&self) -> (Vec<usize>, Vec<f64>) {
        (vec![self.len()], self.to_vec())
    }
}

impl<const N: usize> Values for [f64; N] {
    fn shape_and_values(&self) -> (Vec<usize>, Vec<f64>) {
        self.as_slice().shape_and_values()
    }
}

impl Values for Vec<f64> {
    fn shape_and_values(&self) -> (Vec<usize>, Vec<f64>) {
        self.as_slice().shape_and_values()
    }
}

impl Values for f64 {
    fn shape_and_values(&self) -> (Vec<usize>, Vec<f64>) {
        (vec![], vec![*self])
    }
}

/// Asserts that `got` and `want` have the same shape and that every element of `got` lies within
/// `tol` of `want`'s (a NaN never does). The message names `what`, how many elements are off,
/// and the worst one: its index, both values and the difference against the allowed one.
pub fn assert_close<G, W>(got: &G, want: &W, tol: Tol, what: &str)
where
    G: Values + ?Sized,
    W: Values + ?Sized,
{
    let ((got_shape, got), (want_shape, want)) = (got.shape_and_values(), want.shape_and_values());
    assert_eq!(got_shape, want_shape, "{what}: shapes differ (got, want)");
    // A NaN on either side is never within the tolerance, and it is the worst.
    let within = |i: usize| (got[i] - want[i]).abs() <= tol.allowed(want[i]);
    let excess = |i: usize| (got[i] - want[i]).abs() - tol.allowed(want[i]);
    let failing: Vec<usize> = (0..got.len()).filter(|&i| !within(i)).collect();
    let Some(&worst) = failing.iter().max_by(|&&a, &&b| excess(a).total_cmp(&excess(b))) else {
        return;
    };
    let (g, w) = (got[worst], want[worst]);
    panic!(
        "{what}: {} of {} values are not within {tol:?}; the worst is at {:?} (flat {worst}): \
         got {g:e}, want {w:e}, |got - want| = {:e} > {:e}",
        failing.len(),
        got.len(),
        unravel(worst, &got_shape),
        (g - w).abs(),
        tol.allowed(w),
    );
}

/// The multi-dimensional index of the row-major `flat` index in `shape`.
fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (i, &dim) in shape.iter().enumerate().rev() {
        index[i] = flat % dim;
        flat /= dim;
    }
    index
}

/// The largest absolute value of `t` (0 for an empty tensor).
pub fn max_abs(t: &Tensor) -> f64 {
    t.to_f64_vec().unwrap().iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// The tensors of one fixture file, by key.
pub struct Fixture(HashMap<String, Tensor>);

impl Fixture {
    /// The tensors of a safetensors file: `Fixture::from_bytes(include_bytes!(...))`.
    pub fn from_bytes(bytes: &[u8]) -> Fixture {
        Fixture(from_safetensors_bytes(bytes, &Device::Cpu).unwrap().into_iter().collect())
    }

    /// `layers.safetensors`: convolutions, norms, batch norms, embedding and losses (f32).
    pub fn layers() -> Fixture {
        Fixture::from_bytes(include_bytes!("../fixtures/layers.safetensors"))
    }

    /// `attention.safetensors`: multi-head attention, Transformer layers, UNet blocks and
    /// timestep embeddings (f64).
    pub fn attention() -> Fixture {
        Fixture::from_bytes(include_bytes!("../fixtures/attention.safetensors"))
    }

    /// `rnn.safetensors`: recurrent cells and layers (f64).
    pub fn rnn() -> Fixture {
        Fixture::from_bytes(include_bytes!("../fixtures/rnn.safetensors"))
    }

    /// `optim.safetensors`: the optimizers' parameters step by step (f64).
    pub fn optim() -> Fixture {
        Fixture::from_bytes(include_bytes!("../fixtures/optim.safetensors"))
    }

    /// `interop.safetensors`: a PyTorch MLP state dict with an input and its output (f64).
    pub fn interop() -> Fixture {
        Fixture::from_bytes(include_bytes!("../fixtures/interop.safetensors"))
    }

    /// The tensor under `key` (panics naming the key when it is missing).
    pub fn get(&self, key: &str) -> Tensor {
        self.0.get(key).unwrap_or_else(|| panic!("the fixture has no tensor `{key}`")).clone()
    }

    /// Whether the fixture has a tensor under `key`.
    pub fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// The keys under `prefix.` with the prefix removed (every key when `prefix` is empty), sorted.
    pub fn keys_under(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = self.0.keys().filter_map(|key| under(prefix, key)).map(str::to_string).collect();
        keys.sort();
        keys
    }

    /// Overwrites every parameter of `vs` with the tensor `<prefix>.<full name>` (the full name
    /// alone when `prefix` is empty), and every buffer of `vs` that the fixture holds so.
    pub fn load_params(&self, vs: &VarStore, prefix: &str) {
        for (name, var) in vs.named_parameters() {
            var.value().assign_(&self.get(&join(prefix, &name))).unwrap();
        }
        for (name, buffer) in vs.named_buffers() {
            let key = join(prefix, &name);
            if self.has(&key) {
                buffer.assign_(&self.get(&key)).unwrap();
            }
        }
    }

    /// Compares `got` with the tensor under `key`.
    pub fn assert_matches(&self, got: &Tensor, key: &str, tol: Tol) {
        assert_close(got, &self.get(key), tol, key);
    }

    /// Compares the gradient of every parameter of `vs` with the tensor under `key(name)`,
    /// where `name` is the parameter's name relative to the path of `vs`.
    pub fn assert_grads(&self, vs: &VarStore, key: impl Fn(&str) -> String, tol: Tol) {
        let path = vs.full_name("");
        for (name, var) in vs.named_parameters() {
            let grad = var.grad().unwrap_or_else(|| panic!("{name} has no gradient"));
            self.assert_matches(&grad, &key(name.strip_prefix(&path).unwrap_or(&name)), tol);
        }
    }

    /// For `layers.safetensors`: loads the parameters of `vs` (at path `case`), runs `layer` on
    /// `case.x`, and compares the output and the gradients of `(out * case.proj).sum()` with
    /// PyTorch's (`case.out`, `case.x.grad`, `case.<param>.grad`).
    pub fn check_layer(&self, case: &str, vs: &VarStore, layer: impl Fn(&Var) -> Result<Var>) {
        self.load_params(vs, "");
        let x = Var::leaf(self.get(&format!("{case}.x")));
        let out = layer(&x).unwrap();
        self.assert_matches(out.value(), &format!("{case}.out"), LAYERS_TOL);
        let proj = Var::constant(self.get(&format!("{case}.proj")));
        out.mul(&proj).unwrap().sum_all().unwrap().backward().unwrap();
        self.assert_matches(&x.grad().unwrap(), &format!("{case}.x.grad"), LAYERS_TOL);
        self.assert_grads(vs, |param| format!("{case}.{param}.grad"), LAYERS_TOL);
    }

    /// For `layers.safetensors`: runs the scalar loss `loss` on the float inputs `case.<name>`
    /// for `names` and compares its value (`case.out`) and the gradients of the inputs
    /// (`case.<name>.grad`) with PyTorch's.
    pub fn check_loss(&self, case: &str, names: &[&str], loss: impl Fn(&[Var]) -> Result<Var>) {
        let inputs: Vec<Var> = names.iter().map(|n| Var::leaf(self.get(&format!("{case}.{n}")))).collect();
        let value = loss(&inputs).unwrap();
        self.assert_matches(value.value(), &format!("{case}.out"), LAYERS_TOL);
        value.backward().unwrap();
        for (name, input) in names.iter().zip(&inputs) {
            let grad = input.grad().unwrap_or_else(|| panic!("{case}.{name} has no gradient"));
            self.assert_matches(&grad, &format!("{case}.{name}.grad"), LAYERS_TOL);
        }
    }
}

/// `<prefix>.<name>`, or `name` when `prefix` is empty.
fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") }
}

/// `key` without `<prefix>.` when it starts so (`key` itself when `prefix` is empty).
fn under<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
    if prefix.is_empty() { Some(key) } else { key.strip_prefix(prefix)?.strip_prefix('.') }
}

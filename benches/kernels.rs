//! The fused and elementwise CPU kernels side by side with candle (`candle-core` and the
//! fused CPU ops of `candle-nn`) in one run, each next to a plain copy of the same bytes
//! (`Vec::clone`: read the input, write a fresh output), the memory-bound floor:
//!
//! - softmax over the last dim and LayerNorm (with weight and bias) on (4096, 1024);
//! - GELU, erf and tanh forms, on 16M floats;
//! - `add` on 64 floats, the fixed cost of a tiny op: through `Tensor`, through a
//!   recorded `Var`, candle's `Tensor`, and a plain `Vec` loop.
//!
//! Criterion reports time per call and, through `Throughput::Bytes` (bytes read plus
//! written), bandwidth. Run: `cargo bench --bench kernels` (2 threads here; both crates
//! use the rayon pool), `RAYON_NUM_THREADS=1 cargo bench --bench kernels` for 1 thread.
//! Timings on a shared machine are noisy: read the ratios within one run.

use aigc::autograd::Var;
use aigc::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

/// Our tensor and candle's with the same values.
fn pair(shape: &[usize], seed: u64) -> (Tensor, candle_core::Tensor, Vec<f32>) {
    let ours = Tensor::randn(shape, &Device::Cpu, seed).unwrap();
    let values = ours.to_vec::<f32>().unwrap();
    let theirs = candle_core::Tensor::from_vec(values.clone(), shape, &candle_core::Device::Cpu).unwrap();
    (ours, theirs, values)
}

/// One group: ours, candle's and the plain copy of `copy_bytes` on the same input.
fn group(
    c: &mut Criterion,
    name: &str,
    bytes_moved: usize,
    samples: usize,
    ours: impl Fn(),
    candle: impl Fn(),
    copy: impl Fn(),
) {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(bytes_moved as u64)).sample_size(samples);
    group.bench_function(BenchmarkId::new("aigc", "f32"), |b| b.iter(&ours));
    group.bench_function(BenchmarkId::new("candle", "f32"), |b| b.iter(&candle));
    group.bench_function(BenchmarkId::new("copy", "f32"), |b| b.iter(&copy));
    group.finish();
}

fn row_kernels(c: &mut Criterion) {
    let shape = [4096, 1024];
    let (x, cx, values) = pair(&shape, 1);
    let bytes = 2 * 4 * values.len();
    group(
        c,
        "softmax_4096x1024",
        bytes,
        20,
        || drop(black_box(x.softmax(-1).unwrap())),
        || drop(black_box(candle_nn::ops::softmax_last_dim(&cx).unwrap())),
        || drop(black_box(values.clone())),
    );
    let (w, cw, _) = pair(&[1024], 2);
    let (b, cb, _) = pair(&[1024], 3);
    group(
        c,
        "layer_norm_4096x1024",
        bytes,
        20,
        || drop(black_box(x.layer_norm(1, Some(&w), Some(&b), 1e-5).unwrap())),
        || drop(black_box(candle_nn::ops::layer_norm(&cx, &cw, &cb, 1e-5).unwrap())),
        || drop(black_box(values.clone())),
    );
}

fn gelu(c: &mut Criterion) {
    let n = 16 << 20;
    let (x, cx, values) = pair(&[n], 4);
    let bytes = 2 * 4 * n;
    group(
        c,
        "gelu_erf_16M",
        bytes,
        10,
        || drop(black_box(x.gelu().unwrap())),
        || drop(black_box(cx.gelu_erf().unwrap())),
        || drop(black_box(values.clone())),
    );
    group(
        c,
        "gelu_tanh_16M",
        bytes,
        10,
        || drop(black_box(x.gelu_tanh().unwrap())),
        || drop(black_box(cx.gelu().unwrap())),
        || drop(black_box(values.clone())),
    );
}

fn tiny_add(c: &mut Criterion) {
    let (a, ca, av) = pair(&[64], 5);
    let (b, cb, bv) = pair(&[64], 6);
    let (va, vb) = (Var::leaf(a.clone()), Var::leaf(b.clone()));
    let mut group = c.benchmark_group("add_64");
    group.throughput(Throughput::Bytes(3 * 4 * 64));
    group.bench_function(BenchmarkId::new("aigc", "Tensor"), |bench| bench.iter(|| black_box(a.add(&b).unwrap())));
    group.bench_function(BenchmarkId::new("aigc", "Var"), |bench| bench.iter(|| black_box(va.add(&vb).unwrap())));
    group.bench_function(BenchmarkId::new("candle", "Tensor"), |bench| bench.iter(|| black_box(ca.add(&cb).unwrap())));
    // Candle's variables record their ops for backward, as our `Var`s do.
    let (cva, cvb) = (candle_core::Var::from_tensor(&ca).unwrap(), candle_core::Var::from_tensor(&cb).unwrap());
    group.bench_function(BenchmarkId::new("candle", "Var"), |bench| bench.iter(|| black_box(cva.add(&cvb).unwrap())));
    group.bench_function(BenchmarkId::new("plain", "Vec"), |bench| {
        bench.iter(|| black_box(av.iter().zip(&bv).map(|(x, y)| x + y).collect::<Vec<f32>>()))
    });
    group.finish();
}

criterion_group!(benches, tiny_add, row_kernels, gelu);
criterion_main!(benches);

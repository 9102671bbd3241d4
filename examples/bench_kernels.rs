//! Kernel timings as JSON lines, ours next to a peer measured in the same run, at 1 and
//! 2 threads (a rayon pool of that size around both):
//!
//! - `fma_peak`: the FMA peak of each instruction set, every thread busy, in GFLOP/s;
//! - `sgemm` against the `gemm` crate (candle's GEMM), in GFLOP/s;
//! - `gpt_*`: the GEMMs of one GPT "baby" training step in their real layouts, against `gemm`;
//! - `small_*`: products below the packing threshold (attention tiles, a decoding step),
//!   against `gemm`;
//! - `gemm_bf16`: our GEMM on bf16 operands (f32 accumulation) against ours on f32, with
//!   the path taken (`amx` where the CPU has AMX tiles, else `vdpbf16ps` where it has
//!   AVX512_BF16, else `widened` to f32);
//! - `linear_bias_gelu`: `gelu(x W^T + b)` with the bias and GELU in the GEMM's epilogue
//!   (`matmul_bias_act`) against the same as three separate ops;
//! - conv2d and conv_transpose2d (the shapes), forward and forward+backward,
//!   against candle, in milliseconds;
//! - softmax and LayerNorm on (4096, 1024), GELU (erf and tanh forms) on 16M floats,
//!   against candle, in milliseconds, with `copy_ms`, a plain copy of the same bytes into
//!   an existing buffer (the memory-bound floor), raced against the op separately
//!   (`ms_beside_copy` is the op in that race); cross-entropy of logits (4096, 1024),
//!   forward and backward, against candle's;
//! - small ops on 64 floats (`add` of tensors and of `Var`s, a number operand, a row sum,
//!   a concatenation), against candle, in nanoseconds per call: the fixed cost of an op.
//!
//! Run: `cargo run --release --example bench_kernels` (add `-- quick` for fewer repeats, and
//! group names, `rows conv sgemm gpt small bf16 fused`, to run only those).
//! Each figure is the median of interleaved repeats (ours, peer, ours, ...), so slow
//! drifts of a shared machine hit both sides alike. PyTorch and OpenBLAS figures for the
//! same shapes come from `benches/reference/torch_kernels.py` and `openblas_sgemm.py`.

use aigc::autograd::Var;
use aigc::kernels::bf16;
use aigc::kernels::cpu::gemm::{Bf16Path, Epilogue, Isa, MatRef, gemm, sgemm};
use aigc::kernels::cpu::simd::fma_chains;
use aigc::tensor::{Conv2dParams, ConvTranspose2dParams, UnaryOp};
use aigc::{Device, Tensor};
use std::hint::black_box;
use std::time::Instant;

#[path = "common/gemm_peer.rs"]
mod gemm_peer;
use gemm_peer::{gemm_crate_sgemm, gemm_crate_sgemm_strided};

/// Median seconds of `f` and `g` over `reps` interleaved calls each (after a warm-up).
fn race(reps: usize, mut f: impl FnMut(), mut g: impl FnMut()) -> (f64, f64) {
    f();
    g();
    let (mut a, mut b) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for _ in 0..reps {
        let t = Instant::now();
        f();
        a.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        g();
        b.push(t.elapsed().as_secs_f64());
    }
    (median(a), median(b))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Repeats `f` `inner` times per sample: for calls too short to time one by one.
fn batched(inner: usize, mut f: impl FnMut()) -> impl FnMut() {
    move || (0..inner).for_each(|_| f())
}

/// Our tensor and candle's holding the same values.
fn pair(shape: &[usize], seed: u64) -> (Tensor, candle_core::Tensor, Vec<f32>) {
    let ours = Tensor::randn(shape, &Device::Cpu, seed).unwrap();
    let values = ours.to_vec::<f32>().unwrap();
    let theirs = candle_core::Tensor::from_vec(values.clone(), shape, &candle_core::Device::Cpu).unwrap();
    (ours, theirs, values)
}

/// Prints one measurement of an op against candle, in milliseconds.
fn line(op: &str, shape: &[usize], threads: usize, ms: f64, peer_ms: f64) {
    line_with(op, shape, threads, ms, peer_ms, "");
}

/// [`line`] with more JSON fields (`,"name":value...`) at the end.
fn line_with(op: &str, shape: &[usize], threads: usize, ms: f64, peer_ms: f64, more: &str) {
    println!(
        "{{\"op\":\"{op}\",\"shape\":{shape:?},\"threads\":{threads},\"ms\":{ms:.4},\"peer\":\"candle\",\"peer_ms\":{peer_ms:.4}{more}}}"
    );
}

/// Copies `values` into a buffer that already exists (so that it measures the memory
/// traffic alone, not the allocator's page faults), split over the pool's threads like
/// the kernels it is the floor of.
fn copier(values: &[f32]) -> impl FnMut() + '_ {
    use rayon::prelude::*;
    let mut dst = vec![1.0f32; values.len()];
    let chunk = values.len().div_ceil(rayon::current_num_threads());
    move || dst.par_chunks_mut(chunk).zip(black_box(values).par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s))
}

/// One memory-bound op: ours raced against candle's (`ms`, `peer_ms`), then against a
/// plain copy of its input (`ms_beside_copy`, `copy_ms`). Two races, because candle's op
/// allocates and faults in a fresh output each call, which slows whatever runs next:
/// the ratio to the copy is taken between two runs that see the same conditions.
fn memory_bound_line(
    op: &str,
    shape: &[usize],
    threads: usize,
    reps: usize,
    mut ours: impl FnMut(),
    peer: impl FnMut(),
    copy: &mut impl FnMut(),
) {
    let (ms, peer_ms) = race(reps, &mut ours, peer);
    let (beside_copy, copy_ms) = race(reps, &mut ours, copy);
    let copy_fields = format!(",\"ms_beside_copy\":{:.4},\"copy_ms\":{:.4}", beside_copy * 1e3, copy_ms * 1e3);
    line_with(op, shape, threads, ms * 1e3, peer_ms * 1e3, &copy_fields);
}

/// The memory-bound ops: ours and candle's, and a plain copy of the input.
fn elementwise_and_rows(threads: usize, reps: usize) {
    let (x, cx, values) = pair(&[4096, 1024], 1);
    let mut copy = copier(&values);
    let (softmax, candle_softmax) =
        (|| drop(x.softmax(-1).unwrap()), || drop(candle_nn::ops::softmax_last_dim(&cx).unwrap()));
    memory_bound_line("softmax", &[4096, 1024], threads, reps, softmax, candle_softmax, &mut copy);
    let (w, cw, _) = pair(&[1024], 2);
    let (b, cb, _) = pair(&[1024], 3);
    let layer_norm = || drop(x.layer_norm(1, Some(&w), Some(&b), 1e-5).unwrap());
    let candle_layer_norm = || drop(candle_nn::ops::layer_norm(&cx, &cw, &cb, 1e-5).unwrap());
    memory_bound_line("layer_norm", &[4096, 1024], threads, reps, layer_norm, candle_layer_norm, &mut copy);
    cross_entropy_line(&x, &cx, threads, reps);

    let n = 16 << 20;
    let (x, cx, values) = pair(&[n], 4);
    let mut copy = copier(&values);
    let reps3 = reps.div_ceil(3);
    let (gelu, candle_gelu) = (|| drop(x.gelu().unwrap()), || drop(cx.gelu_erf().unwrap()));
    memory_bound_line("gelu_erf", &[n], threads, reps3, gelu, candle_gelu, &mut copy);
    let (gelu, candle_gelu) = (|| drop(x.gelu_tanh().unwrap()), || drop(cx.gelu().unwrap()));
    memory_bound_line("gelu_tanh", &[n], threads, reps3, gelu, candle_gelu, &mut copy);

    let inner = 1000;
    let (a, ca, _) = pair(&[64], 5);
    let (b, cb, _) = pair(&[64], 6);
    let ns_per_call = 1e9 / inner as f64;
    let (ours, peer) = race(
        reps,
        batched(inner, || drop(black_box(a.add(&b).unwrap()))),
        batched(inner, || drop(black_box(ca.add(&cb).unwrap()))),
    );
    small_op_line("add", &[64], threads, ours * ns_per_call, peer * ns_per_call);
    // Both sides record the op for backward: our `Var`s and candle's (whose ops on a
    // variable keep their operands, as ours do).
    let (va, vb) = (Var::leaf(a.clone()), Var::leaf(b.clone()));
    let (cva, cvb) = (candle_core::Var::from_tensor(&ca).unwrap(), candle_core::Var::from_tensor(&cb).unwrap());
    let (ours, peer) = race(
        reps,
        batched(inner, || drop(black_box(va.add(&vb).unwrap()))),
        batched(inner, || drop(black_box(cva.add(&cvb).unwrap()))),
    );
    small_op_line("add_var", &[64], threads, ours * ns_per_call, peer * ns_per_call);
    // The same 64 values as an 8 x 8 matrix: a number operand, a row sum, a concatenation.
    let (m, cm) = (a.reshape([8, 8]).unwrap(), ca.reshape((8, 8)).unwrap());
    let (ours, peer) = race(
        reps,
        batched(inner, || drop(black_box(m.mul(0.5).unwrap()))),
        batched(inner, || drop(black_box((&cm * 0.5).unwrap()))),
    );
    small_op_line("mul_scalar", &[8, 8], threads, ours * ns_per_call, peer * ns_per_call);
    let (ours, peer) = race(
        reps,
        batched(inner, || drop(black_box(m.sum(&[1], true).unwrap()))),
        batched(inner, || drop(black_box(cm.sum_keepdim(1).unwrap()))),
    );
    small_op_line("sum_rows", &[8, 8], threads, ours * ns_per_call, peer * ns_per_call);
    let (ours, peer) = race(
        reps,
        batched(inner, || drop(black_box(Tensor::cat(&[&m, &m], 0).unwrap()))),
        batched(inner, || drop(black_box(candle_core::Tensor::cat(&[&cm, &cm], 0).unwrap()))),
    );
    small_op_line("cat", &[8, 8], threads, ours * ns_per_call, peer * ns_per_call);
}

/// Cross-entropy of logits (4096, 1024) against a class for each row, forward and
/// backward (the gradient of the mean loss with respect to the logits), ours against
/// candle's (`candle_nn::loss::cross_entropy`: log-softmax, then gather).
fn cross_entropy_line(x: &Tensor, cx: &candle_core::Tensor, threads: usize, reps: usize) {
    let rows = x.dims()[0];
    let classes: Vec<usize> = (0..rows).map(|i| i * 7919 % x.dims()[1]).collect();
    let targets = Tensor::from_vec(classes.iter().map(|&c| c as i64).collect(), [rows], &Device::Cpu).unwrap();
    let candle_targets = candle_core::Tensor::from_vec(
        classes.iter().map(|&c| c as u32).collect::<Vec<u32>>(),
        rows,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let ours = || {
        let logits = Var::leaf(x.clone());
        logits.cross_entropy(&targets, Default::default()).unwrap().backward().unwrap();
        drop(black_box(logits.grad()));
    };
    let candle = || {
        let logits = candle_core::Var::from_tensor(cx).unwrap();
        let loss = candle_nn::loss::cross_entropy(logits.as_tensor(), &candle_targets).unwrap();
        drop(black_box(loss.backward().unwrap()));
    };
    let (ms, peer_ms) = race(reps, ours, candle);
    line("cross_entropy_fwd_bwd", x.dims(), threads, ms * 1e3, peer_ms * 1e3);
}

/// Prints one measurement of an op on 64 elements against candle's, in nanoseconds per
/// call (the op's fixed cost: its work is a few nanoseconds).
fn small_op_line(op: &str, shape: &[usize], threads: usize, ns: f64, peer_ns: f64) {
    println!(
        "{{\"op\":\"{op}\",\"shape\":{shape:?},\"threads\":{threads},\"ns\":{ns:.0},\"peer\":\"candle\",\"peer_ns\":{peer_ns:.0}}}"
    );
}

/// The convolutions of the issue, forward and forward+backward (the gradient of the sum
/// of the output with respect to input and weight), ours against candle's:
/// conv2d of batch 64, 32 -> 64 channels, 28x28, 3x3, padding 1 (and 0); conv_transpose2d of
/// batch 64, 64 -> 32 channels, 14x14 -> 28x28, 4x4, stride 2, padding 1.
fn conv_lines(threads: usize, reps: usize) {
    let params = Conv2dParams { stride: [1, 1], padding: [1, 1], dilation: [1, 1], groups: 1 };
    let shapes = ([64, 32, 28, 28], [64, 32, 3, 3]);
    conv_line("conv2d", shapes, threads, reps, |x, w| x.conv2d(w, None, params), |x, w| x.conv2d(w, 1, 1, 1, 1));
    // The same layer without padding ("valid": 26 x 26 features).
    let valid = Conv2dParams { padding: [0, 0], ..params };
    conv_line("conv2d_valid", shapes, threads, reps, |x, w| x.conv2d(w, None, valid), |x, w| x.conv2d(w, 0, 1, 1, 1));
    let params =
        ConvTranspose2dParams { stride: [2, 2], padding: [1, 1], output_padding: [0, 0], dilation: [1, 1], groups: 1 };
    let shapes = ([64, 64, 14, 14], [64, 32, 4, 4]);
    let ours = |x: &Var, w: &Var| x.conv_transpose2d(w, None, params);
    conv_line("conv_transpose2d", shapes, threads, reps, ours, |x, w| x.conv_transpose2d(w, 1, 0, 2, 1));
}

/// One convolution `op(input, weight)` on inputs of the given shapes: the forward alone
/// (constants, nothing recorded) and forward+backward, ours against candle's.
fn conv_line(
    name: &str,
    (x_shape, w_shape): ([usize; 4], [usize; 4]),
    threads: usize,
    reps: usize,
    ours: impl Fn(&Var, &Var) -> aigc::Result<Var>,
    theirs: impl Fn(&candle_core::Tensor, &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor>,
) {
    let ms = 1e3;
    let (x, cx, _) = pair(&x_shape, 7);
    let (w, cw, _) = pair(&w_shape, 8);
    let (xc, wc) = (Var::constant(x.clone()), Var::constant(w.clone()));
    let (t_ours, t_peer) = race(reps, || drop(ours(&xc, &wc).unwrap()), || drop(theirs(&cx, &cw).unwrap()));
    line(name, &x_shape, threads, t_ours * ms, t_peer * ms);
    let (xv, wv) = (Var::leaf(x), Var::leaf(w));
    let (cxv, cwv) = (candle_core::Var::from_tensor(&cx).unwrap(), candle_core::Var::from_tensor(&cw).unwrap());
    let (t_ours, t_peer) = race(
        reps,
        || ours(&xv, &wv).unwrap().sum_all().unwrap().backward().unwrap(),
        || drop(theirs(&cxv, &cwv).unwrap().sum_all().unwrap().backward().unwrap()),
    );
    line(&format!("{name}_fwd_bwd"), &x_shape, threads, t_ours * ms, t_peer * ms);
}

/// A row-major `rows x cols` matrix.
fn row_major(data: &[f32], cols: usize) -> MatRef<'_> {
    MatRef { data, offset: 0, row_stride: cols, col_stride: 1 }
}

/// SGEMM `C = A B` for row-major `m x k` and `k x n` operands: ours against `gemm`.
fn sgemm_lines(threads: usize, reps: usize) {
    for (m, k, n) in
        [(128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (4096, 384, 1536)]
    {
        let a = Tensor::randn([m, k], &Device::Cpu, 1).unwrap().to_vec::<f32>().unwrap();
        let b = Tensor::randn([k, n], &Device::Cpu, 2).unwrap().to_vec::<f32>().unwrap();
        let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
        let inner = (1 << 27) / (m * n * k).min(1 << 27);
        let (ours, peer) = race(
            reps,
            batched(inner, || sgemm(m, n, k, row_major(&a, k), row_major(&b, n), &mut c1)),
            batched(inner, || gemm_crate_sgemm(m, n, k, &a, &b, &mut c2, threads)),
        );
        gemm_line("sgemm", [m, k, n], threads, ours / inner as f64, peer / inner as f64);
    }
}

/// Prints one GEMM measurement against the `gemm` crate, from the seconds per product.
fn gemm_line(op: &str, [m, k, n]: [usize; 3], threads: usize, ours: f64, peer: f64) {
    let gflops = |secs: f64| 2.0 * (m * n * k) as f64 / secs / 1e9;
    println!(
        "{{\"op\":\"{op}\",\"shape\":[{m},{k},{n}],\"threads\":{threads},\"ms\":{:.5},\"gflops\":{:.1},\"peer\":\"gemm\",\"peer_ms\":{:.5},\"peer_gflops\":{:.1}}}",
        ours * 1e3,
        gflops(ours),
        peer * 1e3,
        gflops(peer)
    );
}

/// A product in a given layout: `(name, m, n, k, A, B)`, each operand as `(data, row
/// stride, column stride)`.
type StridedProduct<'a> = (&'a str, usize, usize, usize, (&'a [f32], usize, usize), (&'a [f32], usize, usize));

/// Races our `sgemm` against `gemm` on each product, `inner` products per timed sample,
/// and prints one line each (op `{prefix}_{name}`).
fn strided_gemm_lines(prefix: &str, products: &[StridedProduct], threads: usize, reps: usize, inner: usize) {
    for &(name, m, n, k, (a, a_rs, a_cs), (b, b_rs, b_cs)) in products {
        let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
        let view = |data, row_stride, col_stride| MatRef { data, offset: 0, row_stride, col_stride };
        let (ours, peer) = race(
            reps,
            batched(inner, || sgemm(m, n, k, view(a, a_rs, a_cs), view(b, b_rs, b_cs), &mut c1)),
            batched(inner, || gemm_crate_sgemm_strided(m, n, k, (a, a_rs, a_cs), (b, b_rs, b_cs), &mut c2, threads)),
        );
        gemm_line(&format!("{prefix}_{name}"), [m, k, n], threads, ours / inner as f64, peer / inner as f64);
    }
}

/// The GEMMs of one training step of the GPT "baby" (768 tokens, width 128, MLP 512), in
/// the layouts a linear layer hands the GEMM: forward `x W^T` (B column-major), input
/// gradient `dy W` (both row-major), weight gradient `dy^T x` (A column-major, depth 768).
fn gpt_gemm_lines(threads: usize, reps: usize) {
    let tokens = 768;
    for (inputs, outputs) in [(128, 384), (128, 128), (128, 512), (512, 128), (128, 65)] {
        let x = Tensor::randn([tokens, inputs], &Device::Cpu, 1).unwrap().to_vec::<f32>().unwrap();
        let w = Tensor::randn([outputs, inputs], &Device::Cpu, 2).unwrap().to_vec::<f32>().unwrap();
        let dy = Tensor::randn([tokens, outputs], &Device::Cpu, 3).unwrap().to_vec::<f32>().unwrap();
        let products = [
            ("forward", tokens, outputs, inputs, (&x[..], inputs, 1), (&w[..], 1, inputs)),
            ("input_grad", tokens, inputs, outputs, (&dy[..], outputs, 1), (&w[..], inputs, 1)),
            ("weight_grad", outputs, inputs, tokens, (&dy[..], 1, outputs), (&x[..], inputs, 1)),
        ];
        strided_gemm_lines("gpt", &products, threads, reps * 4, 1);
    }
}

/// GEMM on bf16 operands against f32, same shapes.
fn bf16_gemm_lines(threads: usize, reps: usize) {
    for (m, k, n) in [(512, 512, 512), (1024, 1024, 1024), (4096, 384, 1536)] {
        let a = Tensor::randn([m, k], &Device::Cpu, 1).unwrap().to_vec::<f32>().unwrap();
        let b = Tensor::randn([k, n], &Device::Cpu, 2).unwrap().to_vec::<f32>().unwrap();
        let (a16, b16): (Vec<bf16>, Vec<bf16>) =
            (a.iter().map(|&v| bf16::from_f32(v)).collect(), b.iter().map(|&v| bf16::from_f32(v)).collect());
        let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
        let view = |data, cols| MatRef { data, offset: 0, row_stride: cols, col_stride: 1 };
        let (ours, f32_secs) = race(
            reps,
            || gemm(m, n, k, view(&a16, k), view(&b16, n), &mut c1, Epilogue::NONE),
            || sgemm(m, n, k, row_major(&a, k), row_major(&b, n), &mut c2),
        );
        let gflops = |secs: f64| 2.0 * (m * n * k) as f64 / secs / 1e9;
        let path = Bf16Path::best().name();
        println!(
            "{{\"op\":\"gemm_bf16\",\"shape\":[{m},{k},{n}],\"threads\":{threads},\"path\":\"{path}\",\"gflops\":{:.1},\"f32_gflops\":{:.1},\"bf16_over_f32\":{:.2}}}",
            gflops(ours),
            gflops(f32_secs),
            f32_secs / ours
        );
    }
}

/// A linear layer with a bias and GELU: fused into the GEMM's epilogue against three ops.
fn fused_linear_lines(threads: usize, reps: usize) {
    for (m, k, n) in [(768, 128, 512), (4096, 384, 1536)] {
        let x = Tensor::randn([m, k], &Device::Cpu, 1).unwrap();
        let w_t = Tensor::randn([n, k], &Device::Cpu, 2).unwrap().t().unwrap();
        let bias = Tensor::randn([n], &Device::Cpu, 3).unwrap();
        let (fused, separate) = race(
            reps,
            || drop(black_box(x.matmul_bias_act(&w_t, Some(&bias), Some(UnaryOp::Gelu)).unwrap())),
            || drop(black_box(x.matmul(&w_t).unwrap().add(&bias).unwrap().gelu().unwrap())),
        );
        println!(
            "{{\"op\":\"linear_bias_gelu\",\"shape\":[{m},{k},{n}],\"threads\":{threads},\"fused_ms\":{:.4},\"separate_ms\":{:.4}}}",
            fused * 1e3,
            separate * 1e3
        );
    }
}

/// Products below the GEMM's packing threshold, which take the unpacked path: the tile
/// products of attention in a GPT baby layer (64 positions, head dim 32; Q/K/V rows 384
/// apart as views into the fused projection), and one decoding step's `x W^T`.
fn small_gemm_lines(threads: usize, reps: usize) {
    let operand = |len: usize, seed: u64| Tensor::randn([len], &Device::Cpu, seed).unwrap().to_vec::<f32>().unwrap();
    let (qkv, square, w) = (operand(64 * 384, 1), operand(64 * 64, 2), operand(384 * 128, 3));
    let products = [
        ("attn_scores", 64, 64, 32, (&qkv[..], 384, 1), (&qkv[..], 1, 384)),
        ("attn_weighted_values", 64, 32, 64, (&square[..], 64, 1), (&qkv[..], 384, 1)),
        ("attn_value_grad", 64, 32, 64, (&square[..], 1, 64), (&qkv[..], 384, 1)),
        ("decode_step", 1, 384, 128, (&qkv[..], 384, 1), (&w[..], 1, 128)),
    ];
    strided_gemm_lines("small", &products, threads, reps, 50);
}

/// The FMA peak of each instruction set this CPU has, with `threads` threads running the
/// probe at once: the ceiling to read GFLOP/s figures against. Plain scoped threads, not
/// the rayon pool: a `broadcast` on the pool measured about half the 2-thread peak here
/// (95 against 175 GFLOP/s), the threads not overlapping for the whole probe.
fn fma_peak_lines(threads: usize) {
    let iterations = 50_000_000;
    for isa in Isa::ALL.into_iter().filter(|isa| isa.is_available()) {
        black_box(fma_chains(isa, 1000)); // warm up
        let started = Instant::now();
        let flops: usize = std::thread::scope(|scope| {
            let probes: Vec<_> =
                (0..threads).map(|_| scope.spawn(move || black_box(fma_chains(isa, iterations)).0)).collect();
            probes.into_iter().map(|probe| probe.join().expect("an FMA probe thread")).sum()
        });
        let gflops = flops as f64 / started.elapsed().as_secs_f64() / 1e9;
        println!("{{\"op\":\"fma_peak\",\"isa\":\"{isa:?}\",\"threads\":{threads},\"gflops\":{gflops:.1}}}");
    }
}

/// The groups of measurements, by the names that select them on the command line.
const GROUPS: [&str; 7] = ["rows", "conv", "sgemm", "gpt", "small", "bf16", "fused"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "quick");
    let reps = if quick { 5 } else { 15 };
    // Any other argument names the groups to run; none runs all.
    let groups: Vec<&str> = args.iter().map(String::as_str).filter(|a| *a != "quick").collect();
    if let Some(other) = groups.iter().find(|g| !GROUPS.contains(g)) {
        let usage = format!("usage: bench_kernels [quick] [{}]", GROUPS.join("] ["));
        if matches!(*other, "--help" | "-h") {
            println!("{usage}");
            return;
        }
        eprintln!("bench_kernels: unknown argument `{other}`\n{usage}");
        std::process::exit(2);
    }
    let wanted = |group: &str| groups.is_empty() || groups.contains(&group);
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a rayon pool");
        fma_peak_lines(threads);
        pool.install(|| {
            if wanted("rows") {
                elementwise_and_rows(threads, reps);
            }
            if wanted("conv") {
                conv_lines(threads, reps.div_ceil(3));
            }
            if wanted("sgemm") {
                sgemm_lines(threads, reps);
            }
            if wanted("gpt") {
                gpt_gemm_lines(threads, reps);
            }
            if wanted("small") {
                small_gemm_lines(threads, reps);
            }
            if wanted("bf16") {
                bf16_gemm_lines(threads, reps);
            }
            if wanted("fused") {
                fused_linear_lines(threads, reps);
            }
        });
    }
}

//! Forward + backward of two small models, ours side by side with the same model in
//! candle (`candle-core` + `candle-nn`, CPU) in one criterion run:
//! - an MLP 784-400-20 (ReLU) on a batch of 128, cross-entropy loss;
//! - one pre-LN Transformer block (batch 12, sequence 64, width 128, 4 heads, causal
//!   self-attention, GELU MLP 4x, no biases) with a mean-square loss on its output.
//!
//! Run: `cargo bench --bench train_step` (both libraries use 2 threads: rayon's pool is
//! set to 2, candle's CPU backend uses rayon too). Read the ratio, not the absolute time.

use aigc::autograd::{CrossEntropyOptions, Var};
use aigc::nn::{Linear, Module, VarStore};
use aigc::tensor::{DType, Device, Tensor};
use candle_core::{D, Tensor as CTensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{Criterion, criterion_group, criterion_main};

const MLP: (usize, usize, usize, usize) = (128, 784, 400, 20);
const BLOCK: (usize, usize, usize, usize) = (12, 64, 128, 4);

fn ours_mlp(c: &mut Criterion) {
    let (n, i, h, o) = MLP;
    let dev = Device::Cpu;
    let vs = VarStore::new(DType::F32, &dev, 0);
    let (fc1, fc2) = (Linear::new(&vs.pp("fc1"), i, h).unwrap(), Linear::new(&vs.pp("fc2"), h, o).unwrap());
    let x = Var::constant(Tensor::randn([n, i], &dev, 1).unwrap());
    let y = Tensor::randint(0, o as i64, [n], &dev, 2).unwrap();
    c.bench_function("mlp 784-400-20 b128 fwd+bwd/aigc", |b| {
        b.iter(|| {
            let logits = fc2.forward(&fc1.forward(&x).unwrap().relu().unwrap()).unwrap();
            let loss = logits.cross_entropy(&y, CrossEntropyOptions::default()).unwrap();
            vs.zero_grad();
            loss.backward().unwrap();
        })
    });
}

fn candle_mlp(c: &mut Criterion) -> candle_core::Result<()> {
    let (n, i, h, o) = MLP;
    let dev = candle_core::Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &dev);
    let fc1 = candle_nn::linear(i, h, vb.pp("fc1"))?;
    let fc2 = candle_nn::linear(h, o, vb.pp("fc2"))?;
    let x = CTensor::randn(0f32, 1.0, (n, i), &dev)?;
    let y = CTensor::from_vec((0..n as u32).map(|k| k % o as u32).collect::<Vec<_>>(), n, &dev)?;
    c.bench_function("mlp 784-400-20 b128 fwd+bwd/candle", |b| {
        b.iter(|| {
            use candle_nn::Module;
            let logits = fc2.forward(&fc1.forward(&x).unwrap().relu().unwrap()).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            loss.backward().unwrap()
        })
    });
    Ok(())
}

/// Our pre-LN block: `x + attn(ln1(x))`, then `+ mlp(ln2(x))`.
struct OurBlock {
    ln1: Var,
    ln2: Var,
    qkv: Linear,
    proj: Linear,
    fc: Linear,
    out: Linear,
}

impl OurBlock {
    fn new(vs: &VarStore, d: usize) -> OurBlock {
        let ones = aigc::nn::Init::Const(1.0);
        OurBlock {
            ln1: vs.param("ln1", [d], ones).unwrap(),
            ln2: vs.param("ln2", [d], ones).unwrap(),
            qkv: Linear::with_bias(&vs.pp("qkv"), d, 3 * d, false).unwrap(),
            proj: Linear::with_bias(&vs.pp("proj"), d, d, false).unwrap(),
            fc: Linear::with_bias(&vs.pp("fc"), d, 4 * d, false).unwrap(),
            out: Linear::with_bias(&vs.pp("out"), 4 * d, d, false).unwrap(),
        }
    }
    fn forward(&self, x: &Var) -> aigc::tensor::Result<Var> {
        let (b, t, d, h) = BLOCK;
        let heads = |v: &Var| v.reshape([b, t, h, d / h])?.transpose(1, 2);
        let qkv = self.qkv.forward(&x.layer_norm(1, Some(&self.ln1), None, 1e-5)?)?.split(d, 2)?;
        let y =
            Var::scaled_dot_product_attention(&heads(&qkv[0])?, &heads(&qkv[1])?, &heads(&qkv[2])?, None, true, None)?;
        let x = x.add(&self.proj.forward(&y.transpose(1, 2)?.reshape([b, t, d])?)?)?;
        let m = self.out.forward(&self.fc.forward(&x.layer_norm(1, Some(&self.ln2), None, 1e-5)?)?.gelu()?)?;
        x.add(&m)
    }
}

fn ours_block(c: &mut Criterion) {
    let (b, t, d, _) = BLOCK;
    let dev = Device::Cpu;
    let vs = VarStore::new(DType::F32, &dev, 0);
    let block = OurBlock::new(&vs, d);
    let x = Var::constant(Tensor::randn([b, t, d], &dev, 1).unwrap());
    c.bench_function("transformer block b12 t64 d128 fwd+bwd/aigc", |bench| {
        bench.iter(|| {
            let loss = block.forward(&x).unwrap().square().unwrap().mean_all().unwrap();
            vs.zero_grad();
            loss.backward().unwrap();
        })
    });
}

fn candle_block(c: &mut Criterion) -> candle_core::Result<()> {
    let (b, t, d, h) = BLOCK;
    let dev = candle_core::Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &dev);
    // The no-bias LayerNorm takes candle's composed (differentiable) path.
    let ln1 = candle_nn::layer_norm_no_bias(d, 1e-5, vb.pp("ln1"))?;
    let ln2 = candle_nn::layer_norm_no_bias(d, 1e-5, vb.pp("ln2"))?;
    let qkv = candle_nn::linear_no_bias(d, 3 * d, vb.pp("qkv"))?;
    let proj = candle_nn::linear_no_bias(d, d, vb.pp("proj"))?;
    let fc = candle_nn::linear_no_bias(d, 4 * d, vb.pp("fc"))?;
    let out = candle_nn::linear_no_bias(4 * d, d, vb.pp("out"))?;
    let x = CTensor::randn(0f32, 1.0, (b, t, d), &dev)?;
    let future: Vec<u8> = (0..t * t).map(|k| u8::from(k % t > k / t)).collect();
    let future = CTensor::from_vec(future, (t, t), &dev)?.broadcast_as((b, h, t, t))?.contiguous()?;
    let neg_inf = CTensor::new(f32::NEG_INFINITY, &dev)?.broadcast_as((b, h, t, t))?;
    let forward = || -> candle_core::Result<CTensor> {
        use candle_nn::Module;
        let heads = |v: CTensor| v.reshape((b, t, h, d / h))?.transpose(1, 2)?.contiguous();
        let qkv = qkv.forward(&ln1.forward(&x)?)?;
        let (q, k, v) = (heads(qkv.narrow(2, 0, d)?)?, heads(qkv.narrow(2, d, d)?)?, heads(qkv.narrow(2, 2 * d, d)?)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / ((d / h) as f64).sqrt()))?;
        let scores = future.where_cond(&neg_inf, &scores)?;
        let y = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?;
        let x = (&x + proj.forward(&y.transpose(1, 2)?.reshape((b, t, d))?)?)?;
        let m = out.forward(&fc.forward(&ln2.forward(&x)?)?.gelu_erf()?)?;
        x + m
    };
    c.bench_function("transformer block b12 t64 d128 fwd+bwd/candle", |bench| {
        bench.iter(|| forward().unwrap().sqr().unwrap().mean_all().unwrap().backward().unwrap())
    });
    Ok(())
}

fn benches(c: &mut Criterion) {
    let _ = rayon::ThreadPoolBuilder::new().num_threads(2).build_global();
    ours_mlp(c);
    candle_mlp(c).expect("candle mlp");
    ours_block(c);
    candle_block(c).expect("candle block");
}

criterion_group! {
    name = train_step;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(4));
    targets = benches
}
criterion_main!(train_step);

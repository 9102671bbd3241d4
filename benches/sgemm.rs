//! SGEMM side by side with the Rust peers in one run: ours (`Tensor::matmul`), the
//! `matrixmultiply` crate (ndarray's) and the `gemm` crate (candle's). Criterion reports
//! time per call and, through `Throughput::Elements(2 m n k)`, FLOP/s ("elem/s").
//! `aigc/bf16` is ours on bf16 operands (f32 accumulation, the output rounded to bf16):
//! the AMX tiles where the CPU has them, else the AVX512_BF16 dot-product kernel, else
//! widened to f32 (`Bf16Path`).
//!
//! Run: `cargo bench --bench sgemm` (2 threads), `RAYON_NUM_THREADS=1 cargo bench --bench sgemm` (1 thread;
//! `matrixmultiply` is always single-threaded here, `gemm` follows the rayon pool).
//! Read every figure against the FMA peak (about 116 GFLOP/s per Zen 4 core).

use aigc::{DType, Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

#[path = "../examples/common/gemm_peer.rs"]
mod gemm_peer;
use gemm_peer::gemm_crate_sgemm;

const SHAPES: &[(usize, usize, usize)] =
    &[(128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (4096, 384, 1536)];

fn sgemm(c: &mut Criterion) {
    let dev = Device::Cpu;
    for &(m, k, n) in SHAPES {
        let mut group = c.benchmark_group(format!("sgemm_{m}x{k}x{n}"));
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.sample_size(if m * n * k >= 1 << 29 { 10 } else { 30 });
        let a = Tensor::randn([m, k], &dev, 1).unwrap();
        let b = Tensor::randn([k, n], &dev, 2).unwrap();
        let (av, bv) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        let mut out = vec![0f32; m * n];

        group.bench_function(BenchmarkId::new("aigc", "f32"), |bench| bench.iter(|| a.matmul(&b).unwrap()));
        let (a16, b16) = (a.to_dtype(DType::BF16).unwrap(), b.to_dtype(DType::BF16).unwrap());
        group.bench_function(BenchmarkId::new("aigc", "bf16"), |bench| bench.iter(|| a16.matmul(&b16).unwrap()));
        group.bench_function(BenchmarkId::new("matrixmultiply", "f32"), |bench| {
            bench.iter(|| {
                // SAFETY: the pointers cover m*k, k*n and m*n f32s with the row-major strides given.
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        n,
                        1.0,
                        av.as_ptr(),
                        k as isize,
                        1,
                        bv.as_ptr(),
                        n as isize,
                        1,
                        0.0,
                        out.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                }
            })
        });
        let threads = rayon::current_num_threads();
        group.bench_function(BenchmarkId::new("gemm", "f32"), |bench| {
            bench.iter(|| gemm_crate_sgemm(m, n, k, &av, &bv, &mut out, threads))
        });
        group.finish();
    }
}

criterion_group!(benches, sgemm);
criterion_main!(benches);

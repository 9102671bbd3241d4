use aigc::kernels::cpu::gemm::{MatRef, sgemm};
use std::time::Instant;
#[path = "common/gemm_peer.rs"]
mod gemm_peer;
fn med(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[reps / 2]
}
fn main() {
    let threads = rayon::current_num_threads();
    // (m, k, n, a_transposed, b_transposed, what)
    let shapes = [
        (768, 128, 384, false, true, "qkv fwd"),
        (768, 128, 128, false, true, "proj fwd"),
        (768, 128, 512, false, true, "fc fwd"),
        (768, 512, 128, false, true, "fc2 fwd"),
        (768, 384, 128, false, false, "qkv dX"),
        (768, 512, 128, false, false, "fc dX"),
        (768, 128, 512, false, false, "fc2 dX"),
        (384, 768, 128, true, false, "qkv dW"),
        (512, 768, 128, true, false, "fc dW"),
        (128, 768, 512, true, false, "fc2 dW"),
    ];
    let mut tot = (0.0, 0.0);
    for (m, k, n, at, bt, what) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
        let mut c = vec![0f32; m * n];
        let av = if at {
            MatRef { data: &a, offset: 0, row_stride: 1, col_stride: m }
        } else {
            MatRef { data: &a, offset: 0, row_stride: k, col_stride: 1 }
        };
        let bv = if bt {
            MatRef { data: &b, offset: 0, row_stride: 1, col_stride: k }
        } else {
            MatRef { data: &b, offset: 0, row_stride: n, col_stride: 1 }
        };
        let ours = med(|| sgemm(m, n, k, av, bv, &mut c), 51);
        let peer = med(|| gemm_peer::gemm_crate_sgemm(m, n, k, &a, &b, &mut c, threads), 51);
        let gf = |s: f64| 2.0 * (m * n * k) as f64 / s / 1e9;
        tot.0 += ours;
        tot.1 += peer;
        println!(
            "{what:10} {m}x{k}x{n}: ours {:.1} GFLOP/s ({:.0} us), gemm crate (row-major) {:.1}",
            gf(ours),
            ours * 1e6,
            gf(peer)
        );
    }
    println!("total ours {:.0} us, peer {:.0} us", tot.0 * 1e6, tot.1 * 1e6);
}

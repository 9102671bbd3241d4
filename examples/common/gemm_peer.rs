//! The `gemm` crate (candle's GEMM) as the SGEMM peer of the benchmarks, behind a safe
//! row-major call (included with `#[path]` by `benches/sgemm.rs` and `examples/bench_kernels.rs`).

/// `c = a @ b` for row-major `m x k` and `k x n` f32 matrices with the `gemm` crate on
/// `threads` rayon threads.
///
/// # Panics
/// If a slice is shorter than its matrix.
pub fn gemm_crate_sgemm(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], threads: usize) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm_crate_sgemm: slices too short");
    // SAFETY: checked above that the pointers cover m*k, k*n and m*n f32s with the
    // row-major strides given; `gemm` reads a and b and overwrites c (read_dst false).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(threads),
        )
    }
}

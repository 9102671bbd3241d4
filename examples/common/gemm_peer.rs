//! The `gemm` crate (candle's GEMM) as the SGEMM peer of the benchmarks, behind a safe
//! row-major call (included with `#[path]` by `benches/sgemm.rs` and `examples/bench_kernels.rs`).

/// `c = a @ b` for row-major `m x k` and `k x n` f32 matrices with the `gemm` crate on
/// `threads` rayon threads.
///
/// # Panics
/// If a slice is shorter than its matrix.
pub fn gemm_crate_sgemm(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], threads: usize) {
    gemm_crate_sgemm_strided(m, n, k, (a, k, 1), (b, n, 1), c, threads);
}

/// `c = a @ b` with the `gemm` crate for operands given as `(data, row_stride, col_stride)`
/// (a transposed operand is a swap of its strides); `c` is row-major `m x n`.
///
/// # Panics
/// If an operand's last element or `c` lies past its slice.
pub fn gemm_crate_sgemm_strided(
    m: usize,
    n: usize,
    k: usize,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    c: &mut [f32],
    threads: usize,
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(m > 0 && n > 0 && k > 0, "gemm_crate_sgemm: empty product");
    assert!(
        last(m, k, a_rs, a_cs) < a.len() && last(k, n, b_rs, b_cs) < b.len() && c.len() >= m * n,
        "gemm_crate_sgemm: slices too short"
    );
    // SAFETY: checked above that every element the strides address lies inside its slice
    // (c row-major m x n); `gemm` reads a and b and overwrites c (read_dst false).
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
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(threads),
        )
    }
}

"""OpenBLAS reference for aigc's SGEMM targets (issue 3): numpy's float32 matmul (numpy links
OpenBLAS) on the shapes of `cargo run --release --example bench_kernels sgemm`, at 1 and 2
threads, the median of repeats after a warm-up (as bench_kernels). Prints one JSON line per measurement, with
"peer":"openblas".

Usage: python3 benches/reference/openblas_sgemm.py
Not part of the test suite (the project's tests never run Python).
"""

import json
import os
import subprocess
import sys
import time

SHAPES = [(128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (4096, 384, 1536)]


def measure(threads):
    import numpy as np

    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        flops = 2.0 * m * n * k
        inner = max(1, int(2e9 / flops))
        a @ b
        times = []
        for _ in range(15):
            t = time.perf_counter()
            for _ in range(inner):
                a @ b
            times.append((time.perf_counter() - t) / inner)
        median = sorted(times)[len(times) // 2]
        print(json.dumps({"op": "sgemm", "shape": [m, k, n], "threads": threads, "peer": "openblas",
                          "peer_gflops": round(flops / median / 1e9, 1)}), flush=True)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--threads":
        measure(int(sys.argv[2]))
        return
    for threads in (1, 2):
        # OpenBLAS reads its thread count when numpy is first imported: one process each.
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        subprocess.run([sys.executable, __file__, "--threads", str(threads)], env=env, check=True)


if __name__ == "__main__":
    main()

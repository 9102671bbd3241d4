"""PyTorch reference for aigc's kernel targets (issue 3): the same shapes as
`cargo run --release --example bench_kernels`, timed the same way (median of repeats after a
warm-up), at 1 and 2 threads. Prints one JSON line per measurement, with "peer":"torch".

The forward-only convolutions run under `torch.no_grad()`, as ours run on constants. The add
of 64 floats is timed from Python, so it measures the interpreter's call overhead (about 3 us)
more than libtorch's.

Usage: python3 benches/reference/torch_kernels.py [quick]
Not part of the test suite (the project's tests never run Python).
"""

import json
import sys
import time

import torch
import torch.nn.functional as F

REPS = 5 if "quick" in sys.argv else 15


def median_ms(f, reps=REPS, inner=1):
    f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            f()
        times.append((time.perf_counter() - t) / inner)
    times.sort()
    return times[len(times) // 2] * 1e3


def line(**fields):
    print(json.dumps(fields))


def main():
    torch.manual_seed(0)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        x = torch.randn(4096, 1024)
        w, b = torch.randn(1024), torch.randn(1024)
        out = torch.empty_like(x)
        line(op="softmax", shape=[4096, 1024], threads=threads, ms=median_ms(lambda: torch.softmax(x, -1)),
             peer="torch", copy_ms=median_ms(lambda: out.copy_(x)))
        line(op="layer_norm", shape=[4096, 1024], threads=threads, ms=median_ms(lambda: F.layer_norm(x, (1024,), w, b)))
        logits = x.clone().requires_grad_(True)
        classes = torch.tensor([i * 7919 % 1024 for i in range(4096)])
        line(op="cross_entropy_fwd_bwd", shape=[4096, 1024], threads=threads,
             ms=median_ms(lambda: F.cross_entropy(logits, classes).backward()))
        g = torch.randn(1 << 24)
        line(op="gelu_erf", shape=[1 << 24], threads=threads, ms=median_ms(lambda: F.gelu(g)))
        line(op="gelu_tanh", shape=[1 << 24], threads=threads, ms=median_ms(lambda: F.gelu(g, approximate="tanh")))
        small = torch.randn(64)
        line(op="add", shape=[64], threads=threads, ms=median_ms(lambda: small + small, inner=1000))
        image = torch.randn(64, 32, 28, 28, requires_grad=True)
        weight = torch.randn(64, 32, 3, 3, requires_grad=True)
        line(op="conv2d", shape=[64, 32, 28, 28], threads=threads,
             ms=median_ms(torch.no_grad()(lambda: F.conv2d(image, weight, padding=1)), reps=max(3, REPS // 3)))
        line(op="conv2d_fwd_bwd", shape=[64, 32, 28, 28], threads=threads,
             ms=median_ms(lambda: F.conv2d(image, weight, padding=1).sum().backward(), reps=max(3, REPS // 3)))
        line(op="conv2d_valid", shape=[64, 32, 28, 28], threads=threads,
             ms=median_ms(torch.no_grad()(lambda: F.conv2d(image, weight)), reps=max(3, REPS // 3)))
        line(op="conv2d_valid_fwd_bwd", shape=[64, 32, 28, 28], threads=threads,
             ms=median_ms(lambda: F.conv2d(image, weight).sum().backward(), reps=max(3, REPS // 3)))
        feats = torch.randn(64, 64, 14, 14, requires_grad=True)
        weight_t = torch.randn(64, 32, 4, 4, requires_grad=True)
        line(op="conv_transpose2d", shape=[64, 64, 14, 14], threads=threads,
             ms=median_ms(torch.no_grad()(lambda: F.conv_transpose2d(feats, weight_t, stride=2, padding=1)),
                          reps=max(3, REPS // 3)))
        line(op="conv_transpose2d_fwd_bwd", shape=[64, 64, 14, 14], threads=threads,
             ms=median_ms(lambda: F.conv_transpose2d(feats, weight_t, stride=2, padding=1).sum().backward(),
                          reps=max(3, REPS // 3)))
        shapes = [(128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048),
                  (4096, 384, 1536)]
        for m, k, n in shapes:
            a, bm = torch.randn(m, k), torch.randn(k, n)
            c = torch.empty(m, n)
            inner = max(1, (1 << 27) // (m * n * k))
            ms = median_ms(lambda: torch.mm(a, bm, out=c), inner=inner)
            line(op="sgemm", shape=[m, k, n], threads=threads, ms=ms, gflops=2 * m * n * k / ms / 1e6, peer="torch")


if __name__ == "__main__":
    main()

# Copyright © 2026 mstream-mlx contributors.
"""The 8B step's matmuls alone, at M = 1 .. 16 rows: is the small-M path the limit?

    python docs/probes/matmuls.py

Every weight matrix of the random Qwen3-8B shape (253 of them, 15.1 GB in bf16) times an
``M``-row input, one pass evaluated at once; docs/benchmarks.md has the numbers.
"""

import statistics
import time

import mlx.core as mx

from mstream_mlx.benchmarks import decode as bench


def main():
    model, _ = bench.random_model("qwen3-8b", mx.bfloat16)
    weights = []
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            weights.append(lin.weight)
    weights.append(model.lm_head.weight)
    gb = sum(w.nbytes for w in weights) / 1e9
    res = {}
    for r in range(4):  # round 0 warms up
        for M in (1, 2, 4, 10, 16):
            xs = {d: mx.random.normal((M, d)).astype(mx.bfloat16) for d in {w.shape[1] for w in weights}}
            mx.eval(xs)
            one = lambda: [xs[w.shape[1]] @ w.T for w in weights]
            mx.eval(one())
            times = []
            for _ in range(20):
                t = time.perf_counter()
                mx.eval(one())
                times.append(time.perf_counter() - t)
            if r:
                res.setdefault(M, []).append(statistics.median(times))
    for M, v in res.items():
        t = statistics.median(v)
        print(f"M={M}: {t * 1e3:.2f} ms per pass over {gb:.1f} GB ({gb / t / 1e3:.2f} TB/s)")


if __name__ == "__main__":
    main()

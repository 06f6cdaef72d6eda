# Copyright © 2026 mstream-mlx contributors.
"""The row kernel alone (CUDA): 36 calls, one 8B step's layers, against the plain ops and
mlx-lm's batch-N attention (mx.fast SDPA, each row over its own keys).

    python docs/probes/row_kernel.py

Prints ms per 36 calls by cached keys and tokens; docs/benchmarks.md has the numbers.
"""

import statistics
import time

import mlx.core as mx

from mstream_mlx import row_attention
from mstream_mlx.attention import masked_attention
from mstream_mlx.mask import RowMask

H, HKV, D = 32, 8, 128


def timed(fn, reps=30) -> float:
    mx.eval(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    bf16 = mx.bfloat16
    for cached in (1150, 5000):
        for N in (4, 10):
            S = cached + N
            qs = [mx.random.normal((1, N, H, D)).astype(bf16).transpose(0, 2, 1, 3) for _ in range(36)]
            ks = [mx.random.normal((1, HKV, S + 200, D)).astype(bf16)[..., :S, :] for _ in range(36)]
            vs = [mx.random.normal((1, HKV, S + 200, D)).astype(bf16)[..., :S, :] for _ in range(36)]
            mx.eval(qs, ks, vs)
            mask = RowMask(mx.full((1, N), 7, dtype=mx.int32), cached).array
            out = {}
            for u in (1, row_attention.UNROLL):
                out[f"kernel, {u} key(s) a turn"] = timed(
                    lambda: [row_attention.row_attention(q, k, v, D**-0.5, unroll=u) for q, k, v in zip(qs, ks, vs)]
                )
            out["plain ops"] = timed(lambda: [masked_attention(q, k, v, D**-0.5, mask) for q, k, v in zip(qs, ks, vs)])
            per = max(1, cached // N)
            bq = [mx.random.normal((N, H, 1, D)).astype(bf16) for _ in range(36)]
            bk = [mx.random.normal((N, HKV, per, D)).astype(bf16) for _ in range(36)]
            mx.eval(bq, bk)
            out["mlx-lm batch-N SDPA"] = timed(
                lambda: [mx.fast.scaled_dot_product_attention(q, k, k, scale=D**-0.5) for q, k in zip(bq, bk)]
            )
            print(f"{cached} cached keys, {N} tokens: ms per 36 calls", {k: round(v, 3) for k, v in out.items()})


if __name__ == "__main__":
    main()

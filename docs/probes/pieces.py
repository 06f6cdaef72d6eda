# Copyright © 2026 mstream-mlx contributors.
"""Where an 8B decode step's time goes: take one piece out at a time, same run.

    python docs/probes/pieces.py

Bare model loop at N = 1 and 10 with attention, the rotation or the LM head replaced by
a no-op (the numbers are wrong, only the time matters), beside mlx-lm's batch-N loop.
On a host-bound step, removing work that the GPU hides does not shorten the step.
"""

import statistics
from functools import partial

import mlx.core as mx
import numpy as np

from mstream_mlx import attention
from mstream_mlx.benchmarks import decode as bench
from mstream_mlx.models import qwen3


def main():
    model, _ = bench.random_model("qwen3-8b", mx.bfloat16)
    lm = bench.mlx_lm_model(model)
    rng = np.random.default_rng(1)
    prompt = rng.integers(bench.FIRST_FREE_ID, model.args.vocab_size, 512).tolist()
    attend, rotate, head = qwen3.stream_attention, attention.StreamRoPE.at, type(model).lm_logits

    def without(piece):
        qwen3.stream_attention = (lambda q, *a, **k: q) if piece == "attention" else attend
        attention.StreamRoPE.at = (
            (lambda self, p, d, fused=None: lambda x: x.transpose(0, 2, 1, 3))
            if piece == "rotation"
            else rotate
        )
        type(model).lm_logits = (lambda self, h: h[..., :64]) if piece == "head" else head

    def loop_without(piece, N):
        without(piece)
        return bench.run_model_loop(model, prompt, N, 64)

    for N in (1, 10):
        fns = {p: partial(loop_without, p, N) for p in ("nothing", "attention", "rotation", "head")}
        fns["mlx-lm"] = partial(bench.run_mlx_lm_batch, lm, prompt, N, 64)
        runs = bench.interleaved(fns, 3, warm=list(fns))
        without("nothing")
        print(f"N={N} ms per step without",
              {k: round(statistics.median(1e3 / r.timesteps_per_sec for r in v), 2) for k, v in runs.items()})


if __name__ == "__main__":
    main()

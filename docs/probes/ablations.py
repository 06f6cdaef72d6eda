# Copyright © 2026 mstream-mlx contributors.
"""Issue 15's A/B probe: switch one decode change back at a time, in one run.

    python docs/probes/ablations.py qwen3-8b decode,prefill     # on a GPU (bf16)
    python docs/probes/ablations.py tiny check                  # anywhere

Variants (comma-joined names switch several back): ``oldrope`` (cos/sin tables instead of
``mx.fast.rope``), ``oldys`` (also write each step's ``y`` into a device array and
``async_eval`` it, as the cache did before), ``oldmask`` (a boolean mask for cuDNN instead
of the additive one), ``nokernel`` (a decode row through the plain ops instead of the row
kernel), ``oldturn`` (the fused rotation back to ``[B, H, L, D]`` by a reshape and a
transpose whatever the shape, two graph nodes more per call for one token per sequence).  ``decode`` times the bare model loop against mlx-lm's batch-N loop, rounds
alternating; ``prefill`` a 10-stream rows prompt against mlx-lm's prompt; ``check``
compares the logits and a training gradient of the variants.  docs/benchmarks.md has the
numbers.
"""

import statistics
import sys
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mstream_mlx import attention, cache, prefill, row_attention
from mstream_mlx.benchmarks import decode as bench
from mstream_mlx.models import base
from mstream_mlx.streams import rows_to_flat

ORIGINAL = {
    "at": attention.StreamRoPE.at,
    "push": cache.push_positions,
    "kernel_mask": attention.kernel_mask,
    "fits": row_attention.fits,
    "turn": attention.FusedRotation.__call__,
}


def rotate_then_reshape(self, x):
    """The fused rotation as it was: always reshape and transpose back."""
    B, L, H, D = x.shape
    r = self.rope
    out = mx.fast.rope(x.reshape(B * L, H, 1, D), r.dims, traditional=False, base=r.base,
                       scale=r.scale, offset=self.offsets, freqs=r.freqs)
    return out.reshape(B, L, H, D).transpose(0, 2, 1, 3)


def push_with_device_ys(caches, positions):
    """The cache's old per-step device work: the new y written into a device array."""
    ORIGINAL["push"](caches, positions)
    first = caches[0]
    n = first.host_ys.shape[1]
    ys = getattr(first, "_device_ys", None)
    if ys is None or ys.shape[1] < n:
        grown = mx.zeros((1, ((n + 255) // 256) * 256), mx.int32)
        if ys is not None:
            grown[:, : ys.shape[1]] = ys
        ys = grown
    L = np.asarray(positions).shape[1]
    ys[:, n - L : n] = mx.array(positions).astype(mx.int32)
    mx.async_eval(ys)
    first._device_ys = ys


def variant(name: str):
    """Switch the named changes back (``"new"``: everything as shipped)."""
    old = set(name.split(","))
    attention.StreamRoPE.at = (
        (lambda self, p, d, fused=None: ORIGINAL["at"](self, p, d, fused=False))
        if "oldrope" in old
        else ORIGINAL["at"]
    )
    base.push_positions = push_with_device_ys if "oldys" in old else ORIGINAL["push"]
    base.kernel_mask = (lambda m, d: m) if "oldmask" in old else ORIGINAL["kernel_mask"]
    row_attention.fits = (lambda q, k: False) if "nokernel" in old else ORIGINAL["fits"]
    attention.FusedRotation.__call__ = rotate_then_reshape if "oldturn" in old else ORIGINAL["turn"]


def check():
    model, _ = bench.random_model("tiny", mx.float32)
    bench.set_heads(model, 8)
    flat = rows_to_flat(np.random.default_rng(0).integers(10, 2000, size=(40, 10)))
    out = {}
    for v in ("new", "oldrope,oldmask,nokernel", "oldturn"):
        variant(v)
        c = model.make_cache()
        lg = prefill.prefill(model, flat, c, logits_at=list(range(0, 400, 37)), step=64)
        row = model(
            mx.array([[5] * 10]),
            channels=mx.array([list(range(10))]),
            positions=np.array([[40] * 10]),
            cache=c,
        )
        ids, ch, pos = flat.arrays()
        loss = lambda m: m(ids[:, :200], channels=ch[:, :200], positions=pos[:, :200]).square().mean()
        _, grads = nn.value_and_grad(model, loss)(model)
        out[v] = (lg, row, tree_flatten(grads)[5][1])
    variant("new")
    a = out.pop("new")
    for v, b in out.items():
        print(f"check {v}: max |d| prefill", mx.abs(a[0] - b[0]).max().item(), "decode row",
              mx.abs(a[1] - b[1]).max().item(), "gradient", mx.abs(a[2] - b[2]).max().item())


def decode(model, lm, prompt, rounds=3):
    def loop_with(v, N):
        variant(v)
        return bench.run_model_loop(model, prompt, N, 64)

    for N in (1, 2, 4, 10):
        names = ["new", "oldturn", "oldrope", "oldys"] if N == 1 else ["new", "oldturn", "nokernel"]
        fns = {v: partial(loop_with, v, N) for v in names}
        fns["mlx-lm"] = partial(bench.run_mlx_lm_batch, lm, prompt, N, 64)
        runs = bench.interleaved(fns, rounds, warm=list(fns))
        variant("new")
        print(f"N={N} loop steps/s",
              {k: round(statistics.median(r.timesteps_per_sec for r in x), 1) for k, x in runs.items()})


def prefill_rows(model, lm, weights_gb, rng):
    bench.set_heads(model, 8)
    for n in (2048, 8192):
        ids = rng.integers(bench.FIRST_FREE_ID, model.args.vocab_size, n)
        rows = rows_to_flat(np.resize(ids, n - n % 10).reshape(-1, 10))
        lm_runs = [bench.prefill_mlx_lm(lm, ids.tolist()) for _ in range(3)][1:]
        print(n, "mlx-lm", round(max(r.peak_memory for r in lm_runs) - weights_gb, 2), "GB",
              round(statistics.median(r.prefill_tps for r in lm_runs)), "tok/s")
        for v in ("new", "oldmask"):
            variant(v)
            runs = []
            for _ in range(3):
                c = model.make_cache()
                bench._fresh()
                t = time.perf_counter()
                out = prefill.prefill(model, rows, c, logits_at=[len(rows) - 1], step=2048)
                mx.argmax(out, axis=-1).tolist()
                runs.append((len(rows) / (time.perf_counter() - t), mx.get_peak_memory() / 1e9))
            print(n, "rows", v, round(max(r[1] for r in runs[1:]) - weights_gb, 2), "GB",
                  round(statistics.median(r[0] for r in runs[1:])), "tok/s")
        variant("new")


def main():
    shape = sys.argv[1]
    what = sys.argv[2].split(",") if len(sys.argv) > 2 else ["check", "decode", "prefill"]
    if "check" in what:
        check()
    if not {"decode", "prefill"} & set(what):
        return
    model, _ = bench.random_model(shape, mx.bfloat16)
    lm = bench.mlx_lm_model(model)
    rng = np.random.default_rng(1)
    prompt = rng.integers(bench.FIRST_FREE_ID, model.args.vocab_size, 512).tolist()
    if "decode" in what:
        decode(model, lm, prompt)
    if "prefill" in what:
        prefill_rows(model, lm, bench.weight_bytes(model) / 1e9, rng)


if __name__ == "__main__":
    main()

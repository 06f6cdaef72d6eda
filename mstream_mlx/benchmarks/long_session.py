# Copyright © 2026 mstream-mlx contributors.
"""Long sessions, measured (docs/long-sessions.md): KV bytes per timestep, memory over a
long chat, the demo task's exact match with bounded caches, decode speed with 8-bit KV.

    python -m mstream_mlx.benchmarks.long_session kv-bytes
    python -m mstream_mlx.benchmarks.long_session memory --steps 20000 --kv-window 1024
    python -m mstream_mlx.benchmarks.long_session quality --data /tmp/demo/data/stream --limit 200
    python -m mstream_mlx.benchmarks.long_session speed --shape tiny --context 8192

Each prints one JSON object.
"""

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx

from ..cache import StreamKVCache, push_positions

SUM = "add five minus two add nine"
EIGHT_B = dict(layers=36, kv_heads=8, head_dim=128)  # the Stream-8B (Qwen3-8B) KV shape


def filled_caches(
    layers: int, kv_heads: int, head_dim: int, streams: int, timesteps: int,
    dtype=mx.bfloat16,
) -> List[StreamKVCache]:
    """Caches holding ``timesteps`` rows of ``streams`` random keys each (no model)."""
    caches = [StreamKVCache() for _ in range(layers)]
    chunk = 256
    for y0 in range(0, timesteps, chunk):
        ys = mx.repeat(mx.arange(y0, min(y0 + chunk, timesteps)), streams)[None]
        push_positions(caches, ys)
        shape = (1, kv_heads, ys.shape[1], head_dim)
        for c in caches:
            c.update_and_fetch(mx.random.normal(shape).astype(dtype),
                               mx.random.normal(shape).astype(dtype))
        mx.eval([c.state for c in caches])
    return caches


def kv_bytes(streams: int = 10, timesteps: int = 128, group_size: int = 64) -> Dict:
    """KV bytes per timestep at the 8B shape, from the caches' own ``nbytes``: bf16 and
    the same keys quantized to 8 and 4 bits.  ``timesteps * streams`` is a multiple of
    the caches' 256-key allocation step, so no allocated slot is empty."""
    caches = filled_caches(**EIGHT_B, streams=streams, timesteps=timesteps)
    ys_bytes = caches[0].host_ys.nbytes  # one y array shared by all layers
    full = sum(c.nbytes - c.host_ys.nbytes for c in caches) + ys_bytes
    out = {"streams": streams, "shape": EIGHT_B, "bfloat16": full / timesteps}
    for bits in (8, 4):
        q = [c.to_quantized(group_size=group_size, bits=bits) for c in caches]
        mx.eval([c.state for c in q])
        out[f"{bits}-bit"] = (sum(c.nbytes - c.host_ys.nbytes for c in q) + ys_bytes) / timesteps
    return out


def memory(steps: int, kv_window: Optional[int], every: int = 1000, feed_every: int = 60,
           kv_bits: Optional[int] = None, kv_group_size: int = 32) -> Dict:
    """``steps`` rows of the chat's own engine (``mstream-mlx chat`` at full speed, no
    idle pause) on the bundled model, a new sum typed every ``feed_every`` rows; MLX's
    active memory as the chat's status line reads it, every ``every`` rows."""
    from ..chat.engine import ChatEngine, ChatOptions, Failed, Ready, Stepped
    from ..utils import default_model_path

    engine = ChatEngine(ChatOptions(
        model=str(default_model_path()), tick=0.0, idle_pause=0, kv_window=kv_window,
        kv_bits=kv_bits, kv_group_size=kv_group_size,
    ))
    engine.start()
    curve, t0, last = {}, time.perf_counter(), None
    try:
        while True:
            msg = engine.outbox.get(timeout=120)
            if isinstance(msg, Failed):
                raise RuntimeError(msg.message)
            if isinstance(msg, Ready):
                engine.send(SUM)
            if not isinstance(msg, Stepped):
                continue
            t, last = msg.event.t, msg
            if t % feed_every == 0:
                engine.send("add three minus one")
            if t % every == 0:
                curve[t] = msg.memory * 1e9
            if t >= steps:
                break
    finally:
        engine.close()
    probe = [t for t in curve if t >= steps // 4]
    base = curve[min(probe)]
    return {
        "steps": steps, "kv_window": kv_window, "kv_bits": kv_bits,
        "seconds": time.perf_counter() - t0,
        "active_bytes": curve,
        "growth_after_quarter": max(curve[t] for t in probe) / base - 1,
        "output_tail": last.event.text if last else None,
    }


def quality(data: Path, limit: int, demo_dir: Path, configs: Sequence[Dict]) -> Dict:
    """The demo task's exact match (``examples/demo/evaluate.py``'s scoring) per KV
    setting, on the first ``limit`` test episodes."""
    import mstream_mlx
    from mstream_mlx import Session

    sys.path.insert(0, str(demo_dir))
    import evaluate  # examples/demo/evaluate.py

    from ..utils import default_model_path

    model, tokenizer = mstream_mlx.load(str(default_model_path()))
    tables = [json.loads(l)["streams"] for l in open(data / "test.jsonl")][:limit]
    spans = [len(t["User"]) for t in tables]
    out = {"episodes": len(tables), "episode_rows": [min(spans), max(spans)], "runs": []}
    for kv in configs:
        # run_episode builds its own Session: give it one with these KV settings
        evaluate.Session = partial(Session, **kv)
        t0 = time.perf_counter()
        results = [evaluate.run_episode(model, tokenizer, t) for t in tables]
        acc = sum(r["correct"] for r in results) / len(results)
        out["runs"].append({"kv": kv, "exact_match": acc, "seconds": time.perf_counter() - t0})
    evaluate.Session = Session
    return out


def speed(shape: str, streams: int, context: int, steps: int, bits: Sequence[Optional[int]],
          group_size: int = 64, dtype: str = "bfloat16") -> Dict:
    """Decode timesteps per second of a random ``shape`` model with ``context``
    timesteps of ``streams`` keys already cached, full (``dtype``) against quantized KV."""
    from ..step import step as forward_step
    from .decode import random_model

    model, _ = random_model(shape, getattr(mx, dtype))
    args = model.args
    out = {"shape": shape, "dtype": dtype, "streams": streams, "context_timesteps": context,
           "runs": []}
    for b in bits:
        cache = filled_caches(args.num_hidden_layers, args.num_key_value_heads,
                              args.head_dim, streams, context, getattr(mx, dtype))
        if b is not None:
            cache = [c.to_quantized(group_size=group_size, bits=b) for c in cache]
            mx.eval([c.state for c in cache])
        tokens = mx.zeros((streams,), dtype=mx.int32)
        channels = [c % args.num_channels for c in range(streams)]
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            logits = forward_step(model, cache, tokens, channels, [context + i] * streams)
            tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
            mx.eval(tokens)
            times.append(time.perf_counter() - t0)
        times = sorted(times[1:])  # the first step warms up
        out["runs"].append({"kv_bits": b, "steps_per_sec": 1 / times[len(times) // 2],
                            "kv_bytes": sum(c.nbytes for c in cache)})
        print(json.dumps(out["runs"][-1]), file=sys.stderr, flush=True)
        del cache
        mx.clear_cache()
    return out


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kv-bytes")
    k.add_argument("--streams", type=int, default=10)
    m = sub.add_parser("memory")
    m.add_argument("--steps", type=int, default=20_000)
    m.add_argument("--kv-window", type=int, default=1024)
    m.add_argument("--kv-bits", type=int, default=None)
    q = sub.add_parser("quality")
    q.add_argument("--data", type=Path, required=True, help="the demo's data/stream folder")
    q.add_argument("--limit", type=int, default=200)
    q.add_argument("--windows", default="32,16", help="kv windows to score")
    q.add_argument("--demo-dir", type=Path, default=Path("examples/demo"))
    s = sub.add_parser("speed")
    s.add_argument("--shape", default="tiny")
    s.add_argument("--streams", type=int, default=10)
    s.add_argument("--context", type=int, default=8192)
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--dtype", default="bfloat16", help="model and full-precision KV dtype")
    a = p.parse_args(argv)
    if a.what == "kv-bytes":
        res = kv_bytes(a.streams)
    elif a.what == "memory":
        res = memory(a.steps, a.kv_window, kv_bits=a.kv_bits)
    elif a.what == "quality":
        quant = dict(kv_group_size=32, quantized_kv_start=0)
        configs = [{}, {"kv_bits": 8, **quant}, {"kv_bits": 4, **quant}]
        configs += [{"max_kv_timesteps": int(w)} for w in a.windows.split(",") if w]
        res = quality(a.data, a.limit, a.demo_dir, configs)
    else:
        res = speed(a.shape, a.streams, a.context, a.steps, (None, 8, 4), dtype=a.dtype)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

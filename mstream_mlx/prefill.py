# Copyright © 2026 mstream-mlx contributors.
"""Chunked prefill of a multi-stream sequence into a cache.

Tokens are first put in timestep order (any order is valid for one forward, but only
a y-sorted order may be cut into chunks: a token must never enter the cache after a
token that should have seen it).  Each chunk's mask is at most ``step × context``,
never ``L × L``, and the cache is evaluated after every chunk as mlx-lm does.
"""

from typing import Any, Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .streams import Flat, timestep_order

DEFAULT_PREFILL_STEP = 2048
SCORES_BUDGET = 1 << 28
"""Bytes of fp32 attention scores (chunk x context x heads) one chunk of a multi-stream
prompt may materialise where attention runs unfused (the CPU, and a quantized cache,
which goes through mlx-lm's quantized matmuls).  On a GPU the fused kernel takes the
stream mask (Metal a boolean one; CUDA's cuDNN the additive form of
``attention.kernel_mask``), so there chunks stay at ``step``.  The measurements
behind the number: docs/benchmarks.md."""
MIN_CHUNK = 256


def prefill(
    model,
    flat: Flat,
    cache: List[Any],
    *,
    logits_at: Sequence[int] = (),
    step: int = DEFAULT_PREFILL_STEP,
    mask_fn: Optional[Callable[[mx.array, mx.array, List[Any]], Optional[mx.array]]] = None,
) -> Optional[mx.array]:
    """Feed ``flat`` (batch 1) into ``cache`` in chunks of ``step`` tokens.

    Args:
        model: a multi-stream model.
        flat: the tokens, in any order.
        cache: from ``model.make_cache()``; extended in place.
        logits_at: flat indices (into ``flat``) whose logits to return.
        step: tokens per chunk.
        mask_fn: ``(ids, positions, cache) -> mask`` of a chunk, for masks beyond the
            rule (e.g. skip-silence); ``None`` (or a ``None`` mask): the model derives
            the rule's own.

    Returns:
        Logits ``[len(logits_at), V]`` in the order of ``logits_at`` (None if empty).
    """
    if step < 1:
        raise ValueError(f"The prefill step must be >= 1, got {step}.")
    row = getattr(model, "tokens_per_row", 1)  # recurrent (Qwen3.5) layers: whole rows
    step = min(step, _unfused_chunk(model, flat, cache))
    step = max(row, step - step % row)
    flat, wanted = in_timestep_order(flat, logits_at)
    ids, channels, positions = flat.arrays()
    hidden = {}
    for start in range(0, len(flat), step):
        sl = slice(start, start + step)
        mask = None if mask_fn is None else mask_fn(ids[:, sl], positions[:, sl], cache)
        h = model.model(ids[:, sl], channels[:, sl], positions[:, sl], cache, mask)
        for w in wanted:
            if start <= w < start + step:
                hidden[w] = h[0, w - start]
        mx.eval([c.state for c in cache] + list(hidden.values()))
        mx.clear_cache()
    if not wanted:
        return None
    return model.lm_logits(mx.stack([hidden[w] for w in wanted]))


def _unfused_chunk(model, flat: Flat, cache: List[Any]) -> int:
    """The largest chunk whose masked scores fit :data:`SCORES_BUDGET` where attention
    runs unfused; no limit for a single-stream prompt (its mask is ``"causal"``) or on
    a GPU with a full-precision cache."""
    quantized = any(hasattr(c, "bits") for c in cache)
    if mx.default_device() == mx.gpu and not quantized:
        return len(flat)
    if len(np.unique(flat.positions)) == len(flat):  # one token per timestep
        return len(flat)
    heads = getattr(model.args, "num_attention_heads", 1)
    held = max((getattr(c, "offset", 0) for c in cache), default=0)
    return max(MIN_CHUNK, SCORES_BUDGET // (4 * heads * (held + len(flat))))


def in_timestep_order(flat: Flat, indices: Sequence[int]) -> Tuple[Flat, List[int]]:
    """``flat`` sorted by ``y`` (stable), and where the tokens at ``indices`` went."""
    order = timestep_order(flat.positions)
    where = np.empty_like(order)
    where[order] = np.arange(len(order))  # flat index -> position in y order
    return flat.take(order), [int(where[i]) for i in indices]

# Copyright © 2026 mstream-mlx contributors.
"""Prompt-cache files: mlx-lm's format (``save_prompt_cache``/``load_prompt_cache``)
for multi-stream caches, and the prefix check that lets a session reuse one.

mlx-lm's loader rebuilds each layer with ``<class name>.from_state(state)``, looking the
class name up in ``mlx_lm.models.cache``; our cache classes are registered there under
their own names, so mlx-lm's loader reads our files and ours is mlx-lm's.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from mlx_lm.models import cache as lm_cache

from .atomic import atomic_file
from .cache import QuantizedStreamKVCache, StreamKVCache
from .deltanet import DeltaNetCache
from .streams import Flat, StreamSpec

PREFIX_KEY = "mstream_prefix"  # metadata: the cached tokens (ids, channels, y)


def _register(*classes):
    for cls in classes:
        known = getattr(lm_cache, cls.__name__, cls)
        if known is not cls:
            raise RuntimeError(f"mlx_lm.models.cache already has a {cls.__name__}.")
        setattr(lm_cache, cls.__name__, cls)


_register(StreamKVCache, QuantizedStreamKVCache, DeltaNetCache)


def _check_name(file: str):
    if not str(file).endswith(".safetensors"):
        raise ValueError(f"A prompt cache file must end in .safetensors, got {file}.")


def save_prompt_cache(
    file: str, cache: List[Any], metadata: Optional[Dict[str, str]] = None
):
    """Save ``cache`` to ``file`` (``.safetensors``) with mlx-lm's ``save_prompt_cache``,
    atomically: a failed write leaves nothing behind (one-line ``WriteError``)."""
    _check_name(file)
    with atomic_file(file) as tmp:
        lm_cache.save_prompt_cache(str(tmp), cache, metadata)


def load_prompt_cache(file: str, return_metadata: bool = False):
    """Load a cache written by :func:`save_prompt_cache` (or by mlx-lm), with mlx-lm's
    ``load_prompt_cache``."""
    if not Path(file).is_file():
        raise FileNotFoundError(f"No prompt cache file at {file}.")
    _check_name(file)
    return lm_cache.load_prompt_cache(str(file), return_metadata=return_metadata)


def save_prefix(file: str, cache: List[Any], prefix: Flat, args, spec: StreamSpec):
    """Save ``cache``, which holds exactly ``prefix`` (timestep order), with the tokens
    in the metadata so a later prompt can check that it starts the same way."""
    if len(prefix) == 0:
        raise ValueError(
            "This prompt has no shared part to cache (rows: give prefill rows; "
            "a seed row is not cached)."
        )
    meta = {
        PREFIX_KEY: json.dumps([a.tolist() for a in prefix.astuple()]),
        "model_type": str(args.model_type),
        "layout": spec.layout,
    }
    save_prompt_cache(file, cache, meta)


def load_prefix(
    file: str, prompt: Flat, limit: int, num_layers: int
) -> Tuple[List[Any], np.ndarray]:
    """Load a prompt cache whose tokens start ``prompt`` (timestep order).

    Args:
        limit: most tokens the cache may cover (the first token whose logits are
            sampled must still be computed).
        num_layers: the model's cache length.

    Returns:
        The cache and the ids it holds (its length: how many prompt tokens it covers).
    """
    cache, meta = load_prompt_cache(file, return_metadata=True)
    if PREFIX_KEY not in meta:
        raise ValueError(f"{file} is not an mstream-mlx prompt cache (no {PREFIX_KEY!r}).")
    cached = [np.asarray(a, dtype=np.int32) for a in json.loads(meta[PREFIX_KEY])]
    n = len(cached[0])
    mine = [a[:n] for a in prompt.astuple()]
    if n > limit or not all(np.array_equal(a, b) for a, b in zip(cached, mine)):
        raise ValueError(
            f"The prompt cache {file} was made for another prompt; delete it or "
            "pass another --prompt-cache-file."
        )
    if len(cache) != num_layers:
        raise ValueError(
            f"The prompt cache {file} has {len(cache)} layers, not {num_layers}."
        )
    return cache, cached[0]

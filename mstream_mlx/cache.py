# Copyright © 2026 mstream-mlx contributors.
"""Multi-stream KV cache: mlx-lm's ``KVCache`` plus the timestep ``y`` of every key.

A decode step appends any number of tokens (one per active stream).  The mask of the
new tokens against the cache comes from the stored ``y`` (the rule and its shortcuts
live in ``mask.py``), so tokens may enter the cache in any order.
"""

from typing import List, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as lm_cache



class StreamKVCache(lm_cache.KVCache):
    """``KVCache`` that also stores each key's timestep.

    The model calls :meth:`push_positions` once per forward (before the layers run
    ``update_and_fetch``), so ``ys[:, :offset]`` always lines up with the keys.
    """

    def __init__(self):
        super().__init__()
        self.ys = None
        self.max_y: Optional[np.ndarray] = None  # host copy, per batch row

    def push_positions(self, positions: mx.array):
        B, L = positions.shape
        prev = self.offset
        if self.ys is None or prev + L > self.ys.shape[1]:
            n = ((prev + L + self.step - 1) // self.step) * self.step
            grown = mx.zeros((B, n), dtype=mx.int32)
            if self.ys is not None:
                grown[:, :prev] = self.ys[:, :prev]
            self.ys = grown
        self.ys[:, prev : prev + L] = positions.astype(mx.int32)
        top = np.array(positions).max(axis=1)
        self.max_y = top if self.max_y is None or prev == 0 else np.maximum(self.max_y, top)

    def key_ys(self) -> mx.array:
        return self.ys[:, : self.offset]

    @property
    def state(self):
        return self.keys, self.values, self.ys, self.offset

    @state.setter
    def state(self, v):
        self.keys, self.values, self.ys, self.offset = v
        self._refresh_max_y()

    def _refresh_max_y(self):
        if self.ys is None or self.offset == 0:
            self.max_y = None
        else:
            self.max_y = np.array(self.ys[:, : self.offset]).max(axis=1)

    def trim(self, n: int) -> int:
        n = super().trim(n)
        self._refresh_max_y()
        return n

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        raise NotImplementedError(
            "Quantized KV caches are not supported for multi-stream models yet."
        )

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else super().nbytes + self.ys.nbytes


def push_positions(caches: List[StreamKVCache], positions: mx.array):
    """Record the new tokens' ``y`` in every layer's cache, computed once: layers at
    the same offset share one ``ys`` array (each layer pushing its own cost two ops
    and a host copy per layer per step)."""
    first = caches[0]
    first.push_positions(positions)
    for c in caches[1:]:
        if c.offset == first.offset:
            c.ys, c.max_y = first.ys, first.max_y
        else:
            c.push_positions(positions)



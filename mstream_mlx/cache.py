# Copyright © 2026 mstream-mlx contributors.
"""Multi-stream KV cache: mlx-lm's ``KVCache`` plus the timestep ``y`` of every key.

A decode step appends any number of tokens (one per active stream).  The mask of the
new tokens against the cache comes from the stored ``y`` (the rule and its shortcuts
live in ``mask.py``), so tokens may enter the cache in any order.  That is also what
bounds a long session's cache (docs/long-sessions.md): a quantized cache keeps every
key's ``y`` (:class:`QuantizedStreamKVCache`), and a timestep window drops whole old
timesteps by moving the newest keys into their slots (:func:`evict_timesteps`).
"""

from dataclasses import dataclass
from typing import List, Optional, Union

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as lm_cache



class StreamKVCache(lm_cache.KVCache):
    """``KVCache`` that also stores each key's timestep.

    The model calls :meth:`push_positions` once per forward (before the layers run
    ``update_and_fetch``), so ``host_ys[:, :offset]`` always lines up with the keys.
    The ``y`` live on the host only: the mask's shortcuts read them there, and the
    general mask builds its device copy when it needs one, so a decode step adds no
    device work and no extra evaluation for them (docs/benchmarks.md).
    """

    keep: Optional[int] = None  # leading keys (the prompt) a timestep window keeps

    def __init__(self):
        super().__init__()
        self.host_ys: Optional[np.ndarray] = None  # [B, offset] int32
        self.max_y: Optional[np.ndarray] = None  # newest y per batch row

    def push_positions(self, positions: Union[mx.array, np.ndarray]):
        host = np.array(positions, dtype=np.int32)
        prev = self.offset
        top = host.max(axis=1)
        self.max_y = top if self.max_y is None or prev == 0 else np.maximum(self.max_y, top)
        old = None if self.host_ys is None else self.host_ys[:, :prev]
        # a new array every step: layers share it (push_positions below)
        self.host_ys = host if old is None or prev == 0 else np.concatenate([old, host], 1)

    @property
    def ys(self) -> Optional[mx.array]:
        """The ``y`` of the cached keys ``[B, offset]`` on the device."""
        return None if self.host_ys is None else mx.array(self.host_ys[:, : self.offset])

    def key_ys(self) -> mx.array:
        return self.ys

    @property
    def state(self):
        return self.keys, self.values, self.ys, self.offset

    @state.setter
    def state(self, v):
        keys, values, ys, offset = v
        self.keys, self.values, self.offset = keys, values, offset
        self.host_ys = None if ys is None else np.array(ys[:, :offset], dtype=np.int32)
        self._refresh_max_y()

    def _refresh_max_y(self):
        if self.host_ys is None or self.offset == 0:
            self.max_y = self.host_ys = None
        else:
            self.host_ys = self.host_ys[:, : self.offset]
            self.max_y = self.host_ys.max(axis=1)

    def trim(self, n: int) -> int:
        n = super().trim(n)
        self._refresh_max_y()
        return n

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "QuantizedStreamKVCache":
        """The same keys quantized (``mx.quantize``, as mlx-lm's ``KVCache`` does),
        with the same ``y``: the stream mask is unchanged."""
        q = QuantizedStreamKVCache(group_size=group_size, bits=bits)
        q.offset, q.keep = self.offset, self.keep
        if self.keys is not None:
            n = self.offset
            q.keys = mx.quantize(self.keys[..., :n, :], group_size=group_size, bits=bits)
            q.values = mx.quantize(self.values[..., :n, :], group_size=group_size, bits=bits)
            q.max_y, q.host_ys = self.max_y, self.host_ys
        return q

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values on the device plus the ``y`` on the host."""
        return 0 if self.keys is None else super().nbytes + self.host_ys.nbytes

    def move_keys(self, src: mx.array, dst: mx.array, n: int):
        """Copy the keys at ``src`` into the slots ``dst`` and drop the last ``n``."""
        if len(dst):
            for part in self._stored():
                part[..., dst, :] = part[..., src, :]
        self.offset -= n

    def _stored(self) -> List[mx.array]:
        return [self.keys, self.values]


class QuantizedStreamKVCache(StreamKVCache):
    """mlx-lm's ``QuantizedKVCache`` plus each key's ``y``.  Its ``bits`` attribute
    sends attention through mlx-lm's quantized SDPA (``mx.quantized_matmul``)."""

    def __init__(self, group_size: int = 64, bits: int = 8):
        super().__init__()
        self.group_size, self.bits = group_size, bits

    update_and_fetch = lm_cache.QuantizedKVCache.update_and_fetch
    keys_and_values = lm_cache.QuantizedKVCache.keys_and_values

    @property
    def state(self):
        return self.keys, self.values, self.ys, self.offset, self.group_size, self.bits

    @state.setter
    def state(self, v):
        *kv, self.group_size, self.bits = v
        StreamKVCache.state.fset(self, kv)
        self.keep = None

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        return self

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(a.nbytes for a in (*self.keys, *self.values)) + self.host_ys.nbytes

    def _stored(self) -> List[mx.array]:
        return [*self.keys, *self.values]


def push_positions(caches: List[StreamKVCache], positions: Union[mx.array, np.ndarray]):
    """Record the new tokens' ``y`` in every layer's cache, computed once: layers at
    the same offset share one host array."""
    first = caches[0]
    first.push_positions(positions)
    for c in caches[1:]:
        if c.offset == first.offset:
            c.max_y, c.host_ys = first.max_y, first.host_ys
        else:
            c.push_positions(positions)


def evict_timesteps(caches: List[StreamKVCache], first_y: int) -> int:
    """Drop every key older than timestep ``first_y`` except the first ``keep`` keys
    of each cache (the prompt), whole timesteps at a time, in every layer at once.

    The mask depends on each key's ``y``, not on its slot, so the newest keys move
    into the freed slots (a copy of as many keys as were dropped, not of the window)
    and the free slots end up past ``offset``, where the next step writes.  The new
    tokens still sit at ``offset ..``, as the mask's fast paths assume.

    Returns:
        How many keys each cache dropped.
    """
    first = caches[0]
    if first.offset == 0 or first.host_ys is None:
        return 0
    if any(c.offset != first.offset or c.keep != first.keep for c in caches):
        raise ValueError("A timestep window needs every layer's cache at one offset.")
    n_keys, keep = first.offset, first.keep or 0
    old = np.flatnonzero((first.host_ys[:, keep:] < first_y).any(axis=0)) + keep
    n = len(old)
    if n == 0:
        return 0
    tail = np.arange(n_keys - n, n_keys)
    dst = old[old < n_keys - n]  # freed slots below the new end ...
    src = np.setdiff1d(tail, old)  # ... filled by the kept keys past it
    host = first.host_ys.copy()
    host[:, dst] = host[:, src]
    host = host[:, : n_keys - n]
    dst_a, src_a = mx.array(dst, dtype=mx.int32), mx.array(src, dtype=mx.int32)
    for c in caches:
        c.move_keys(src_a, dst_a, n)
        c.host_ys, c.max_y = host, host.max(axis=1)
    return n


KV_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass
class KVPolicy:
    """How a session bounds its KV cache and its positions (docs/long-sessions.md).

    Args:
        max_kv_size: most keys the cache may hold (a step that would pass it is not
            run; a longer prompt is a ``ValueError``).
        kv_bits, kv_group_size, quantized_kv_start: mlx-lm's names: quantize every
            layer's cache to ``kv_bits`` (4 or 8) once it holds ``quantized_kv_start``
            keys.
        max_kv_timesteps: keep the prompt and the last this many timesteps (``None``:
            everything).
        max_position: the model's ``max_position_embeddings``: a step whose tokens
            would see a key more than this many timesteps older is not run.
    """

    max_kv_size: Optional[int] = None
    kv_bits: Optional[int] = None
    kv_group_size: int = 64
    quantized_kv_start: int = 5000  # mlx-lm's default
    max_kv_timesteps: Optional[int] = None
    max_position: Optional[int] = None

    def __post_init__(self):
        if self.max_kv_size is not None and self.max_kv_size < 1:
            raise ValueError(f"max_kv_size must be >= 1, got {self.max_kv_size}.")
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits (--kv-bits) must be 4 or 8, got {self.kv_bits}.")
        if self.kv_group_size not in GROUP_SIZES:
            raise ValueError(
                f"kv_group_size (--kv-group-size) must be 32, 64 or 128, got {self.kv_group_size}."
            )
        if self.quantized_kv_start < 0:
            raise ValueError(
                f"quantized_kv_start (--quantized-kv-start) must be >= 0, got {self.quantized_kv_start}."
            )
        if self.max_kv_timesteps is not None and self.max_kv_timesteps < 1:
            raise ValueError(
                f"max_kv_timesteps (--kv-window) must be >= 1, got {self.max_kv_timesteps}."
            )

    @classmethod
    def for_model(cls, model, cache: List, *options) -> "KVPolicy":
        """The policy for ``model`` (checked against its head size and cache kinds);
        ``options``: the fields from ``max_kv_size`` to ``max_kv_timesteps``."""
        args = model.args
        policy = cls(*options, max_position=getattr(args, "max_position_embeddings", None))
        if policy.kv_bits is not None:
            head = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
            if head % policy.kv_group_size:
                fit = [g for g in GROUP_SIZES if head % g == 0]
                hint = f"pass --kv-group-size {fit[-1]}" if fit else "its KV cannot be quantized"
                raise ValueError(
                    f"kv_group_size {policy.kv_group_size} does not divide the model's head "
                    f"size {head}; {hint}."
                )
        windowed = policy.max_kv_timesteps is not None or policy.kv_bits is not None
        if windowed and not all(isinstance(c, StreamKVCache) for c in cache):
            raise ValueError(
                "kv_bits and max_kv_timesteps need attention-only models (recurrent "
                "layers keep no per-key state to quantize or evict)."
            )
        return policy

    def before_step(self, cache: List, ys: List[int]):
        """Quantize (once the cache is long enough) and evict before a decode step at
        timesteps ``ys``; the first call marks the cached prompt as kept."""
        if self.kv_bits is None and self.max_kv_timesteps is None:
            return
        if cache[0].keep is None:
            for c in cache:
                c.keep = c.offset
        if self.kv_bits is not None and cache[0].offset >= self.quantized_kv_start:
            for i, c in enumerate(cache):
                cache[i] = c.to_quantized(group_size=self.kv_group_size, bits=self.kv_bits)
        if self.max_kv_timesteps is not None:
            evict_timesteps(cache, min(ys) - self.max_kv_timesteps)

    def fits(self, cache: List, ys: List[int], n: int) -> bool:
        """Whether ``n`` tokens at ``ys`` fit: within ``max_kv_size``, and within the
        trained positions (every key they see, after the window's eviction, is at
        most ``max_position - 1`` timesteps older)."""
        if self.max_kv_size is not None and cache[0].offset + n > self.max_kv_size:
            return False
        kv = next((c for c in cache if isinstance(c, StreamKVCache)), None)
        if self.max_position is None or kv is None:
            return True
        host = kv.host_ys if kv.offset else None
        oldest = min(ys) if host is None else int(host.min())
        if self.max_kv_timesteps is not None and host is not None:
            keep = kv.keep or 0
            window = max(oldest, min(ys) - self.max_kv_timesteps)
            oldest = min(int(host[:, :keep].min()) if keep else window, window)
        return max(ys) - oldest < self.max_position

    def check_prompt(self, positions: np.ndarray):
        """A prompt larger than ``max_kv_size`` or wider than the trained positions is
        a ``ValueError``."""
        if self.max_kv_size is not None and len(positions) > self.max_kv_size:
            raise ValueError(
                f"The prompt needs {len(positions)} cache entries but max_kv_size is "
                f"{self.max_kv_size}."
            )
        span = int(positions.max() - positions.min()) + 1 if positions.size else 0
        if self.max_position is not None and span > self.max_position:
            raise ValueError(
                f"The prompt spans {span} timesteps; the model was trained on "
                f"{self.max_position} positions."
            )


@dataclass(kw_only=True)
class KVFlags:
    """The KV-cache flags an app (chat, server) hands every Session it makes, under the
    CLI's names: ``--kv-bits``, ``--kv-group-size``, ``--quantized-kv-start`` and
    ``--kv-window`` (Session's ``max_kv_timesteps``).  Checked when the options are
    built, so a bad flag fails at start, not at the first session."""

    kv_bits: Optional[int] = None
    kv_group_size: int = 64
    quantized_kv_start: int = 5000
    kv_window: Optional[int] = None

    def __post_init__(self):
        KVPolicy(None, self.kv_bits, self.kv_group_size, self.quantized_kv_start, self.kv_window)

    def session_kwargs(self) -> dict:
        """These flags as :class:`~mstream_mlx.session.Session` keyword arguments."""
        return dict(
            kv_bits=self.kv_bits,
            kv_group_size=self.kv_group_size,
            quantized_kv_start=self.quantized_kv_start,
            max_kv_timesteps=self.kv_window,
        )

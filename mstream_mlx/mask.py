# Copyright © 2026 mstream-mlx contributors.
"""The attention rule of multi-stream models and every shortcut that depends on it.

Token i sees token j iff ``y_j < y_i`` or ``j == i``: all streams, earlier timesteps,
never a same-timestep peer (paper §4; ``docs/design.md``).  This module is the one
home of that rule: the boolean mask (:func:`stream_mask`), the cheaper forms that are
exactly equal to it in common cases (:func:`attention_mask`, :func:`make_mask`), and
the test those shortcuts rest on (:func:`cache_is_older`).  A cache passed here needs
``offset`` (keys held), ``max_y`` (host copy of the newest cached ``y`` per batch row)
and, for the general case, ``key_ys()`` (the ``y`` of every cached key), as
:class:`~mstream_mlx.cache.StreamKVCache` and
:class:`~mstream_mlx.deltanet.DeltaNetCache` provide.
"""

from dataclasses import dataclass, field
from typing import Optional, Union

import mlx.core as mx
import numpy as np


@dataclass
class RowMask:
    """The rule for one decode row: ``L`` new tokens at one timestep, batch 1, over a
    cache whose ``offset`` keys are all older.  Each token sees every cached key and
    itself, no peer.  Attention may run a kernel made for exactly this
    (``row_attention.py``); :attr:`array` is the boolean form, built on first use and
    shared by the layers that need it."""

    positions: mx.array
    offset: int
    _array: Optional[mx.array] = field(default=None, repr=False)

    @property
    def array(self) -> mx.array:
        if self._array is None:
            self._array = peer_mask(self.positions, self.offset)
        return self._array


Mask = Union[None, str, mx.array, RowMask]
"""What attention takes: ``None`` (see everything), ``"causal"``, a boolean array
``[B|1, 1, L, S]`` (True = attend) or a :class:`RowMask`."""


def stream_mask(q_ys: mx.array, k_ys: mx.array, offset: int = 0) -> mx.array:
    """The visibility rule as a boolean mask ``[B, 1, L, S]`` (True = attend).

    ``q_ys`` ``[B, L]`` are the timesteps of the new tokens, ``k_ys`` ``[B, S]`` those of
    all keys, and the new tokens sit at key indices ``offset .. offset+L-1``.  Token i
    sees key j iff ``y_j < y_i`` or j is i itself.
    """
    L, S = q_ys.shape[1], k_ys.shape[1]
    itself = mx.arange(S)[None, :] == (offset + mx.arange(L))[:, None]  # (L, S)
    earlier = k_ys[:, None, :] < q_ys[:, :, None]  # (B, L, S)
    return (earlier | itself)[:, None]


def peer_mask(q_ys: mx.array, offset: int) -> mx.array:
    """:func:`stream_mask` when every one of ``offset`` cached keys is older than every
    new token: the cached part is all True, only the new block needs the rule."""
    B, L = q_ys.shape
    new = stream_mask(q_ys, q_ys)  # (B, 1, L, L)
    if offset == 0:
        return new
    return mx.concatenate([mx.ones((B, 1, L, offset), dtype=mx.bool_), new], axis=-1)


def cache_is_older(positions: np.ndarray, cache) -> bool:
    """True when the cache is empty or every cached key is older than every new token
    (the usual decode step): then the rule needs no cached ``y`` at all."""
    return cache.offset == 0 or bool((positions.min(axis=1) > cache.max_y).all())


def attention_mask(positions: mx.array, cache) -> Mask:
    """What a model passes to attention for new tokens at ``positions``: the rule, in
    the cheapest form that is exactly equal to it.

    With a cache whose keys are all older than every new token: ``None`` for one new
    token per row (a decode step of one stream sees everything), ``"causal"`` when the
    new ``y`` strictly increase along each row (a single-stream prompt: the rule *is*
    the causal mask, and fused kernels take it without a mask array), a
    :class:`RowMask` for several tokens at one ``y`` (a decode row of N streams).
    Otherwise the boolean array of :func:`make_mask`.  Without a cache (training, under
    ``mx.compile``) the positions cannot be read: always the array.
    """
    if cache is None:
        return make_mask(positions, None)
    pos = np.array(positions)
    if cache_is_older(pos, cache):
        if pos.shape[1] == 1:
            return None
        if (np.diff(pos, axis=1) > 0).all():
            return "causal"
        if pos.shape[0] == 1 and (pos == pos[0, 0]).all():
            return RowMask(positions, cache.offset)
    return make_mask(positions, cache)


def make_mask(positions: mx.array, cache=None) -> mx.array:
    """The boolean mask ``[B, 1, L, offset+L]`` for new tokens at ``positions``.

    Fast path: when every cached key is older than every new token (the usual decode
    step), the cached part is all True and the stored ``y`` are not read.
    """
    if cache is None or cache.offset == 0:
        return stream_mask(positions, positions)
    if cache_is_older(np.array(positions), cache):
        return peer_mask(positions, cache.offset)
    k_ys = mx.concatenate([cache.key_ys(), positions.astype(mx.int32)], axis=1)
    return stream_mask(positions, k_ys, cache.offset)

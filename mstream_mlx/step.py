# Copyright © 2026 mstream-mlx contributors.
"""One decode step as a bare function: new tokens (any channels, any timesteps) into a
cache, logits out.  :class:`~mstream_mlx.session.Session` runs every decode step
through it; a benchmark or an app with its own loop calls it directly::

    cache = model.make_cache()
    logits = prefill(model, flat, cache, logits_at=[len(flat) - 1])
    tokens = mx.argmax(logits, axis=-1)
    for y in range(first_y, first_y + n):
        logits = step(model, cache, tokens, channels=[2], positions=[y])
        tokens = mx.argmax(logits, axis=-1)
"""

from typing import Any, List, Optional, Sequence, Union

import mlx.core as mx

Ints = Union[mx.array, Sequence[int]]


def step(
    model,
    cache: List[Any],
    tokens: mx.array,
    channels: Ints,
    positions: Ints,
    *,
    mask: Optional[mx.array] = None,
    logits_at: Optional[Sequence[int]] = None,
) -> mx.array:
    """Feed one timestep's tokens (batch 1) into ``cache`` and return their logits.

    Args:
        model: a multi-stream model (``model.model``, ``model.lm_logits``).
        cache: from ``model.make_cache()``; extended in place.
        tokens: ids ``[L]`` (or ``[1, L]``); may be lazy, e.g. the previous step's
            sampled tokens, so the step can be launched before they are read.
        channels, positions: stream and timestep ``y`` of each token, ``[L]``.  Give
            positions as host values (a list, or an evaluated array): the mask is
            derived from them on the host, so a lazy array would wait for the
            previous step and undo pipelining.
        mask: an explicit boolean mask ``[1, 1, L, S]``; ``None``: the rule (token i
            sees j iff ``y_j < y_i`` or ``j == i``), in its cheapest exact form.
        logits_at: indices into the ``L`` tokens whose logits to return (``None``: all).

    Returns:
        Logits ``[n, V]``, one row per index in ``logits_at`` (lazy).
    """
    ids, channels, positions = (_batch1(a) for a in (tokens, channels, positions))
    h = model.model(ids, channels, positions, cache, mask)  # (1, L, D)
    return model.lm_logits(h[0] if logits_at is None else h[0, mx.array(logits_at)])


def _batch1(a: Ints) -> mx.array:
    if isinstance(a, mx.array):
        return a if a.ndim == 2 else a[None]
    return mx.array([list(a)], dtype=mx.int32)

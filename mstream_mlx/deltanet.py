# Copyright © 2026 mstream-mlx contributors.
"""Gated DeltaNet in stream mode (Qwen3.5 linear-attention layers; paper §7, ``docs/qwen3_5.md``).

A rows-layout sequence is row-major: token ``i = r*C + c`` is stream ``c`` at row ``r``.
Two things in a DeltaNet layer look back in time, and both must respect streams:

* the depthwise conv (``deltanet_conv: column``) looks back along its own stream only;
* the recurrence either keeps one state per stream (``deltanet_block_causal:
  column``), or one shared state whose output is *forked* per row (``block_causal``):
  every token of row r reads the state after all earlier rows, never a row-mate, and
  the state then advances over the row's tokens in channel order 0..C-1.

Column mode on both is the unmodified layer with streams on the batch axis, so it needs
no code here beyond :func:`to_columns`.  The state layout follows mlx-lm:
``[..., Dv, Dk]`` (the transpose of the PyTorch/fla ``[..., Dk, Dv]``).
"""

import sys
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import ArraysCache
from mlx_lm.models.gated_delta import gated_delta_kernel, gated_delta_ops

COLUMN = "column"
BLOCK_CAUSAL = "block_causal"
DELTA_MODES = (COLUMN, BLOCK_CAUSAL)
CONV_MODES = (COLUMN,)

# The DeltaNet modes when config.json has none: the reference code's defaults (the
# Stream-27B run itself saved column / column; docs/qwen3_5.md).
DELTANET_DEFAULTS = {"deltanet_block_causal": BLOCK_CAUSAL, "deltanet_conv": COLUMN}


def deltanet_facts(config: dict) -> Dict[str, str]:
    """The DeltaNet modes of a config (top level or ``text_config``), defaults filled
    in; a missing ``deltanet_block_causal`` warns, since the two choices differ."""
    text = config.get("text_config") or {}
    facts = {}
    for key, default in DELTANET_DEFAULTS.items():
        facts[key] = config.get(key, text.get(key))
        if facts[key] is None:
            facts[key] = default
            if key == "deltanet_block_causal":
                print(
                    f"[WARNING] config.json has no {key}; using the reference "
                    f"code's default {default!r} (Stream-27B used 'column').",
                    file=sys.stderr,
                )
    return facts


def to_columns(x: mx.array, num_channels: int) -> mx.array:
    """Row-major ``[B, R*C, ...]`` -> one stream per batch row ``[B*C, R, ...]``."""
    B, L = x.shape[:2]
    C, rest = num_channels, x.shape[2:]
    x = x.reshape(B, L // C, C, *rest).swapaxes(1, 2)  # (B, C, R, ...)
    return x.reshape(B * C, L // C, *rest)


def from_columns(x: mx.array, num_channels: int) -> mx.array:
    """Inverse of :func:`to_columns`: ``[B*C, R, ...]`` -> ``[B, R*C, ...]``."""
    BC, R = x.shape[:2]
    C, rest = num_channels, x.shape[2:]
    x = x.reshape(BC // C, C, R, *rest).swapaxes(1, 2)  # (B, R, C, ...)
    return x.reshape(BC // C, R * C, *rest)


def column_conv(
    conv1d: nn.Conv1d,
    x: mx.array,
    num_channels: int,
    history: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """The depthwise causal conv along each stream (``deltanet_conv: column``), no activation.

    ``out[r, c] = sum_k w[K-1-k] * x[r-k, c]`` with ``x[<0] = 0``: a causal conv with
    dilation C on the flat sequence.

    Args:
        conv1d: a depthwise ``nn.Conv1d`` without padding, weight ``[D, K, 1]``.
        x: ``[B, R*C, D]`` row-major.
        history: ``[B*C, K-1, D]``, the last K-1 rows of each stream (zeros if None).

    Returns:
        ``(out [B, R*C, D], history [B*C, K-1, D])`` with the history advanced.
    """
    K = conv1d.weight.shape[1]
    xc = to_columns(x, num_channels)  # (B*C, R, D)
    if history is None:
        history = mx.zeros((xc.shape[0], K - 1, xc.shape[-1]), dtype=x.dtype)
    ext = mx.concatenate([history, xc], axis=1)  # (B*C, K-1+R, D)
    out = conv1d(ext)  # (B*C, R, D)
    history = mx.contiguous(ext[:, ext.shape[1] - (K - 1) :])
    return from_columns(out, num_channels), history


def _sequential(q, k, v, g, beta, state, use_kernel: bool):
    """mlx-lm's sequential gated delta rule: its Metal kernel where it applies
    (GPU, no VJP needed, Dk a multiple of 32), its compiled op loop otherwise."""
    if (
        use_kernel
        and mx.default_device() == mx.gpu
        and mx.metal.is_available()
        and k.shape[-1] % 32 == 0
    ):
        return gated_delta_kernel(q, k, v, g, beta, state)
    return gated_delta_ops(q, k, v, g, beta, state)


def block_causal_delta(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    num_channels: int,
    state: Optional[mx.array] = None,
    *,
    use_kernel: bool = True,
) -> Tuple[mx.array, mx.array]:
    """The ``block_causal`` gated delta rule: shared state, row-forked outputs.

    With ``S`` the state after all earlier rows, token t of a row gives
    ``S_t = g_t S``, ``d_t = beta_t (v_t - S_t k_t)`` and
    ``o_t = S_t q_t + (q_t . k_t) d_t``, so no row-mate contributes; then ``S``
    advances over the row with the standard rule in channel order (the final state
    equals the vanilla one).

    Args:
        q, k: ``[B, L, Hk, Dk]``, l2-normalised, q already scaled by ``Dk**-0.5``.
        v: ``[B, L, Hv, Dv]``.
        g: decay factors ``exp(log_decay)``, ``[B, L, Hv]`` (mlx-lm's ``compute_g``).
        beta: ``[B, L, Hv]``.
        state: ``[B, Hv, Dv, Dk]`` fp32, zeros if None.

    Returns:
        ``(out [B, L, Hv, Dv] in q's dtype, state [B, Hv, Dv, Dk])``.
    """
    B, L, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    C = num_channels
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    rep = Hv // Hk  # value head h reads key head h // rep
    qh = mx.repeat(q, rep, axis=2) if rep > 1 else q
    kh = mx.repeat(k, rep, axis=2) if rep > 1 else k

    def heads_first(x):  # (B, C, Hv, ...) -> (B, Hv, C, ...) in fp32
        return mx.swapaxes(x, 1, 2).astype(mx.float32)

    outs = []
    for r in range(L // C):
        row = slice(r * C, (r + 1) * C)
        qr, kr = heads_first(qh[:, row]), heads_first(kh[:, row])  # (B, Hv, C, Dk)
        vr = heads_first(v[:, row])  # (B, Hv, C, Dv)
        gr = heads_first(g[:, row])[..., None]  # (B, Hv, C, 1)
        br = heads_first(beta[:, row])[..., None]
        st = mx.swapaxes(state, -1, -2)  # (B, Hv, Dk, Dv)
        delta = br * (vr - gr * (kr @ st))  # (B, Hv, C, Dv)
        o = gr * (qr @ st) + (qr * kr).sum(-1, keepdims=True) * delta
        outs.append(mx.swapaxes(o, 1, 2))  # (B, C, Hv, Dv)
        _, state = _sequential(
            q[:, row], k[:, row], v[:, row], g[:, row], beta[:, row], state, use_kernel
        )
    return mx.concatenate(outs, axis=1).astype(q.dtype), state


def check_whole_rows(length: int, num_channels: int):
    """A call's token count must be whole rows (shape only: safe under mx.compile)."""
    if length % num_channels:
        raise ValueError(
            f"Qwen3.5 DeltaNet layers need whole rows: got {length} tokens, not a "
            f"multiple of the {num_channels} channels."
        )


def check_rows(
    channels: mx.array,
    positions: mx.array,
    num_channels: int,
    last_y: Optional[np.ndarray],
):
    """Refuse what the DeltaNet layers cannot run: each row must hold channels
    0..C-1 in order at one ``y``, rows in increasing ``y`` after the cached ones
    (``last_y`` per batch row, None for an empty cache)."""
    C = num_channels
    ch, y = np.array(channels), np.array(positions)
    B, L = ch.shape
    check_whole_rows(L, C)
    if not (ch.reshape(B, L // C, C) == np.arange(C)).all():
        raise ValueError(
            f"Qwen3.5 DeltaNet layers need row-major input: every row must hold "
            f"channels 0..{C - 1} in order, got channels {ch[0, : 2 * C].tolist()}..."
        )
    rows = y.reshape(B, L // C, C)
    if not (rows == rows[..., :1]).all():
        raise ValueError("All tokens of a row must share one position (y).")
    late = last_y is not None and (rows[:, 0, 0] <= last_y).any()
    if late or (np.diff(rows[..., 0], axis=1) <= 0).any():
        cached = None if last_y is None else last_y.tolist()
        raise ValueError(
            f"Rows must arrive in increasing y: got rows at y={rows[0, :, 0].tolist()} "
            f"after cached rows up to y={cached}."
        )


class DeltaNetCache(ArraysCache):
    """State of one Gated DeltaNet layer across calls (one per layer, in place).

    ``self[0]``: conv history, the last K-1 rows of every stream before the conv,
    ``[B*C, K-1, conv_dim]``.  ``self[1]``: recurrent state, fp32, ``[B*C, Hv, Dv, Dk]``
    in column mode (stream c of batch b at ``b*C + c``) or ``[B, Hv, Dv, Dk]`` in
    block_causal mode.  Like :class:`~mstream_mlx.cache.StreamKVCache` it counts the
    tokens fed (``offset``) and the last ``y`` per batch row (``max_y``), so the mask
    helpers and the row-order check work on any layer's cache.

    A recurrent state cannot be cut at an arbitrary point, so :meth:`trim` only steps
    back over the last call (what a pipelined decode loop needs to take back a
    launched step).  That keeps one previous state alive per layer; set
    ``keep_undo = False`` to save that memory when nothing will be trimmed.
    """

    keep_undo = True

    def __init__(self):
        super().__init__(size=2)
        self.offset = 0
        self.max_y: Optional[np.ndarray] = None
        self._undo = None

    def push_positions(self, positions: mx.array):
        """Called once per forward, before the layer updates the arrays."""
        if self.keep_undo:
            self._undo = (self.cache[0], self.cache[1], self.offset, self.max_y)
        top = np.array(positions).max(axis=1)
        self.max_y = top if self.max_y is None else np.maximum(self.max_y, top)
        self.offset += positions.shape[1]

    def trim(self, n: int) -> int:
        """Take back the last call's ``n`` tokens (no other amount)."""
        if n == 0:
            return 0
        last = None if self._undo is None else self.offset - self._undo[2]
        if last != n:
            raise ValueError(
                f"A DeltaNet cache can only step back over its last call "
                f"({last or 0} tokens), not {n} tokens: a recurrent state cannot "
                f"be cut."
            )
        conv, recurrent, self.offset, self.max_y = self._undo
        self.cache, self._undo = [conv, recurrent], None
        return n

    @property
    def state(self):
        last = None if self.max_y is None else mx.array(self.max_y.astype(np.int32))
        return self.cache[0], self.cache[1], self.offset, last

    @state.setter
    def state(self, v):
        conv, recurrent, self.offset, last = v
        self.cache = [conv, recurrent]
        self.max_y = None if last is None else np.array(last)
        self.left_padding = self.lengths = self._undo = None

    def empty(self) -> bool:
        return self.cache[1] is None

# Copyright © 2026 mstream-mlx contributors.
"""Per-stream sampling: mlx-lm's samplers and penalties, one set of settings per stream,
the reference's two token-selection variants, and the silence penalty with its ramp
(paper §7).

Every output stream has its own :class:`SamplingSettings`.  Streams that share settings
(and no private seed or history penalty) are sampled in one call on ``[N, V]``, so the
common case costs one sampler call per timestep whatever the number of streams.

Three token-selection methods (they agree exactly when ``temp == 0``: argmax):

* ``"mlx"``: mlx-lm's ``make_sampler`` chain (top-p, min-p relative to the top token,
  top-k by ``argpartition``) and ``make_logits_processors`` penalties.
* ``"rows"``: the rows reference's ``sample_top_p`` (paper §7): ``/T``, top-k keeps
  ties (``l >= kth``), top-p keeps the token that crosses ``top_p``.
* ``"blocks"``: the blocks reference's ``_select_next_token`` (paper §5-6): presence
  penalty on every distinct token the stream generated (no window), ``/T``, top-k
  keeping ties, top-p that *drops* the crossing token (but always keeps the best),
  min-p as an *absolute* probability, argmax if nothing survives.  The penalty is
  skipped when greedy, as in the reference.

Both reference variants are kept on purpose; docs/design.md lists how they differ.
"""

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
)

from .checks import number

METHODS = ("mlx", "rows", "blocks")
RAMP_ROWS = 5
"""Rows over which the §7 silence penalty ramps up to full strength (0.2, 0.4, ... 1)."""
NUMBERS = ("temp", "top_p", "top_k", "min_p", "min_tokens_to_keep", "repetition_penalty",
           "repetition_context_size", "presence_penalty", "presence_context_size",
           "frequency_penalty", "frequency_context_size")


@dataclass(frozen=True)
class SamplingSettings:
    """How one stream picks its next token.

    Args:
        temp: temperature; ``0`` is greedy (argmax). Default ``0``.
        top_p: nucleus mass in ``(0, 1]``; ``1`` disables it.
        top_k: keep the k best logits; ``0`` disables it.
        min_p: ``"mlx"``: minimum probability relative to the best token;
            ``"blocks"``: an absolute probability floor.  ``0`` disables it.
        min_tokens_to_keep: tokens min-p always keeps (``"mlx"`` only).
        repetition_penalty: mlx-lm's multiplicative penalty on the last
            ``repetition_context_size`` tokens of this stream (``0``/``1``: off).
        presence_penalty: additive penalty on tokens this stream produced: the last
            ``presence_context_size`` (``"mlx"``/``"rows"``) or all of them (``"blocks"``).
        frequency_penalty: mlx-lm's additive penalty proportional to counts.
        seed: a private random stream for this stream (``None``: the global MLX RNG).
        method: ``"mlx"``, ``"rows"`` or ``"blocks"`` (see the module docstring).
    """

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    repetition_penalty: float = 0.0
    repetition_context_size: int = 20
    presence_penalty: float = 0.0
    presence_context_size: int = 20
    frequency_penalty: float = 0.0
    frequency_context_size: int = 20
    seed: Optional[int] = None
    method: str = "mlx"

    def __post_init__(self):
        for name in NUMBERS:  # nan/inf would pass the range checks below
            number(name, getattr(self, name))
        if self.method not in METHODS:
            raise ValueError(
                f"Unknown sampling method {self.method!r}; expected one of {', '.join(METHODS)}."
            )
        if self.temp < 0:
            raise ValueError(f"temp must be >= 0, got {self.temp}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}.")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.repetition_penalty < 0:
            raise ValueError(
                f"repetition_penalty must be >= 0, got {self.repetition_penalty}."
            )

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    @property
    def has_history(self) -> bool:
        """Whether this stream's sampling depends on its own past tokens."""
        rep = self.repetition_penalty not in (0, 1)
        pres = self.presence_penalty != 0 and not (
            self.method == "blocks" and self.greedy
        )
        return rep or pres or self.frequency_penalty != 0

    def with_(self, **changes) -> "SamplingSettings":
        return replace(self, **changes)


# ------------------------------------------------------------------ token filters
def _kth_largest(logits: mx.array, k: int) -> mx.array:
    return mx.topk(logits, k, axis=-1).min(axis=-1, keepdims=True)


def rows_filter(logits: mx.array, temp: float, top_k: int, top_p: float) -> mx.array:
    """The rows reference's ``sample_top_p`` filters (paper §7) on ``[B, V]``.

    Returns the scaled logits with dropped entries at ``-inf``: top-k keeps every
    logit ``>= kth`` (ties too); top-p drops ``p`` where ``cumsum(p) - p > top_p``
    (the token crossing ``top_p`` is kept).
    """
    scaled = logits / temp
    V = scaled.shape[-1]
    if 0 < top_k < V:
        scaled = mx.where(scaled < _kth_largest(scaled, top_k), -mx.inf, scaled)
    if top_p < 1.0:
        ordered = mx.sort(scaled, axis=-1)[..., ::-1]  # descending
        probs = mx.softmax(ordered, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each entry
        n_keep = mx.maximum((before <= top_p).sum(axis=-1, keepdims=True), 1)
        floor = mx.take_along_axis(ordered, n_keep - 1, axis=-1)
        scaled = mx.where(scaled < floor, -mx.inf, scaled)
    return scaled


def blocks_filter(logits: mx.array, temp: float, top_k: int, top_p: float) -> mx.array:
    """The blocks reference's ``_select_next_token`` filters (paper §5-6) on ``[B, V]``:
    ``/T``, top-k keeping ties, top-p dropping ``cumsum > top_p`` but keeping the best.
    """
    scaled = logits / temp
    V = scaled.shape[-1]
    if 0 < top_k < V:
        scaled = mx.where(scaled < _kth_largest(scaled, top_k), -mx.inf, scaled)
    if top_p < 1.0:
        ordered = mx.sort(scaled, axis=-1)[..., ::-1]
        cum = mx.cumsum(mx.softmax(ordered, axis=-1), axis=-1)
        n_keep = mx.maximum((cum <= top_p).sum(axis=-1, keepdims=True), 1)
        floor = mx.take_along_axis(ordered, n_keep - 1, axis=-1)
        scaled = mx.where(scaled < floor, -mx.inf, scaled)
    return scaled


def _categorical(logits: mx.array, key: Optional[mx.array]) -> mx.array:
    return mx.random.categorical(logits, axis=-1, key=key)


def sample_tokens(
    logits: mx.array, s: SamplingSettings, key: Optional[mx.array] = None
) -> mx.array:
    """Pick one token per row of ``logits`` ``[B, V]`` (already penalised) -> ``[B]``."""
    logits = logits.astype(mx.float32)
    if s.method == "blocks":
        logits = mx.where(mx.isnan(logits), -mx.inf, logits)
    if s.greedy:
        return mx.argmax(logits, axis=-1)
    if s.method == "rows":
        return _categorical(rows_filter(logits, s.temp, s.top_k, s.top_p), key)
    if s.method == "blocks":
        scaled = blocks_filter(logits, s.temp, s.top_k, s.top_p)
        if s.min_p > 0:  # absolute floor on the renormalised probabilities
            keep = mx.softmax(scaled, axis=-1) >= s.min_p
            scaled = mx.where(keep, scaled, -mx.inf)
            best = mx.argmax(logits, axis=-1)
            return mx.where(keep.any(axis=-1), _categorical(scaled, key), best)
        return _categorical(scaled, key)
    # "mlx": mlx-lm's filter chain on log-probabilities, in make_sampler's order
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if 0 < s.top_p < 1.0:
        logprobs = apply_top_p(logprobs, s.top_p)
    if s.min_p != 0.0:
        logprobs = apply_min_p(logprobs, s.min_p, s.min_tokens_to_keep)
    if 0 < s.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, s.top_k)
    return _categorical(logprobs * (1.0 / s.temp), key)


# ------------------------------------------------------------- logits processors
class SilencePenalty:
    """The §7 silence penalty as an mlx-lm logits processor ``(tokens, logits) -> logits``:
    ``logits[:, silence] -= penalty * ramp``.

    ``ramp`` is set by the rows schedule before each step (see :func:`silence_ramp`).
    ``penalty`` may be a float or an ``[B]`` array (one amount per row of ``logits``).
    """

    def __init__(self, silence_token: int, penalty, ramp: float = 1.0):
        self.silence_token = silence_token
        self.penalty = penalty
        self.ramp = ramp

    def __call__(self, tokens, logits: mx.array) -> mx.array:
        if self.ramp == 0:
            return logits
        amount = mx.array(self.penalty, dtype=logits.dtype) * self.ramp
        col = logits[:, self.silence_token] - amount
        return mx.concatenate(
            [
                logits[:, : self.silence_token],
                col[:, None],
                logits[:, self.silence_token + 1 :],
            ],
            axis=-1,
        )


def silence_ramp(r: int, start: int, rows: int = RAMP_ROWS) -> float:
    """Non-interactive ramp for the step computing row ``r`` (paper §7): 0 before
    ``start`` (the row after the user's last token), then ``(r - start + 1) / 5`` up to 1.
    """
    return min(1.0, (r - start + 1) / rows) if r >= start else 0.0


def quiet_ramp(quiet_rows: int, rows: int = RAMP_ROWS) -> float:
    """Interactive ramp: ``quiet_rows`` silent user rows since the user last spoke."""
    return min(1.0, quiet_rows / rows)


class _History:
    """One stream's sampled tokens (lazy arrays) for its penalties."""

    def __init__(
        self, settings: SamplingSettings, vocab_size: int, exclude: Optional[int]
    ):
        self.s = settings
        self.exclude = exclude  # silence: never penalised as a repeat
        self.tokens: List[mx.array] = []
        self.seen = (
            mx.zeros((vocab_size,), dtype=mx.bool_)
            if settings.method == "blocks"
            else None
        )
        kw = {}
        if settings.method != "blocks" and settings.presence_penalty:
            kw.update(
                presence_penalty=settings.presence_penalty,
                presence_context_size=settings.presence_context_size,
            )
        self.processors = make_logits_processors(
            repetition_penalty=settings.repetition_penalty or None,
            repetition_context_size=settings.repetition_context_size,
            frequency_penalty=settings.frequency_penalty or None,
            frequency_context_size=settings.frequency_context_size,
            **kw,
        )
        self.context = max(
            settings.repetition_context_size,
            settings.presence_context_size,
            settings.frequency_context_size,
        )

    def add(self, token: mx.array):
        self.tokens.append(token.reshape(1))
        self.tokens = self.tokens[-self.context :]
        if self.seen is not None:
            self.seen = self.seen.at[token.reshape(1)].add(True)

    def apply(self, logits: mx.array) -> mx.array:  # logits (1, V)
        s = self.s
        if self.seen is not None and s.presence_penalty and not s.greedy:
            seen = self.seen
            if self.exclude is not None:
                seen = seen & (mx.arange(seen.shape[0]) != self.exclude)
            logits = logits - s.presence_penalty * seen.astype(logits.dtype)
        if self.processors and self.tokens:
            keep = logits[:, self.exclude] if self.exclude is not None else None
            toks = mx.concatenate(self.tokens)
            for proc in self.processors:
                logits = proc(toks, logits)
            if keep is not None:  # silence is the most frequent token, never a "repeat"
                logits = _set_column(logits, self.exclude, keep)
        return logits


def _set_column(logits: mx.array, col: int, value: mx.array) -> mx.array:
    return mx.concatenate(
        [logits[:, :col], value[:, None], logits[:, col + 1 :]], axis=-1
    )


class StreamSampler:
    """Samples every output stream of a timestep with its own settings.

    Args:
        settings: ``{channel: SamplingSettings}`` for every channel that may be sampled.
        vocab_size: the model's vocabulary size.
        exclude_from_history: a token never counted as a repeat (the silence token).
    """

    def __init__(
        self,
        settings: Dict[int, SamplingSettings],
        vocab_size: int,
        exclude_from_history: Optional[int] = None,
    ):
        self.settings = dict(settings)
        self.keys = {
            c: mx.random.key(s.seed)
            for c, s in self.settings.items()
            if s.seed is not None
        }
        self.histories = {
            c: _History(s, vocab_size, exclude_from_history)
            for c, s in self.settings.items()
            if s.has_history
        }
        # one batched call when all streams share settings and have no private state
        shared = {s.with_(seed=None) for s in self.settings.values()}
        self._uniform = len(shared) == 1 and not self.keys and not self.histories

    def __call__(self, logits: mx.array, channels: Sequence[int]) -> mx.array:
        """``logits`` ``[n, V]`` for ``channels`` (one per row) -> tokens ``[n]`` (lazy)."""
        channels = list(channels)
        if self._uniform or len(channels) == 0:
            s = self.settings[channels[0]] if channels else None
            return sample_tokens(logits, s) if s else mx.zeros((0,), mx.int32)
        groups: Dict[SamplingSettings, List[int]] = {}
        for i, c in enumerate(channels):
            if c in self.histories or c in self.keys:
                groups.setdefault(("own", c), []).append(i)
            else:
                groups.setdefault(self.settings[c], []).append(i)
        parts, order = [], []
        for g, rows in groups.items():
            if isinstance(g, tuple):
                c = g[1]
                row = logits[rows[0] : rows[0] + 1]
                if c in self.histories:
                    row = self.histories[c].apply(row)
                key = None
                if c in self.keys:
                    self.keys[c], key = mx.random.split(self.keys[c])
                parts.append(sample_tokens(row, self.settings[c], key))
            else:
                idx = mx.array(rows) if len(rows) < len(channels) else None
                parts.append(sample_tokens(logits if idx is None else logits[idx], g))
            order += rows
        tokens = mx.concatenate(parts) if len(parts) > 1 else parts[0]
        if order != sorted(order):
            inverse = [0] * len(order)
            for pos, i in enumerate(order):
                inverse[i] = pos
            tokens = tokens[mx.array(inverse)]
        return tokens

    def record(self, tokens: mx.array, channels: Sequence[int]):
        """Add this step's tokens (lazy ``[n]``) to the streams' histories."""
        for i, c in enumerate(channels):
            if c in self.histories:
                self.histories[c].add(tokens[i])


def logits_summary(logits: mx.array) -> mx.array:
    """``[n, 3]``: entropy, top-1 probability and top-1 id of each row of ``logits``
    (the reference's ``logits_summary``)."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    entropy = -(mx.exp(logp) * logp).sum(axis=-1)
    top = mx.argmax(logits, axis=-1)
    p1 = mx.exp(mx.take_along_axis(logp, top[:, None], axis=-1)[:, 0])
    return mx.stack([entropy, p1, top.astype(mx.float32)], axis=-1)

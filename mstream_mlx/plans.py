# Copyright © 2026 mstream-mlx contributors.
"""The contract between :class:`~mstream_mlx.session.Session` and a schedule: the typed
plans a schedule hands out, what a settled step reports, and the base class of every
schedule (:mod:`~mstream_mlx.rows_schedule`, :mod:`~mstream_mlx.blocks_schedule`).

A schedule never runs the model.  It hands the session a plan (:class:`SeedPlan`,
:class:`PrefillPlan` for the first event, then one :class:`DecodePlan` per step), the
session runs it, then tells the schedule what happened in two phases:

* ``advance(plan, tokens)`` right after the launch, with the *lazy* sampled tokens:
  everything that does not depend on their values (counters, consumed input tokens);
* ``settle(plan, values)`` once the values are read: stop rules, what to report.

This split is what lets the session launch step ``k+1`` before reading step ``k``
(``mx.async_eval`` double-buffering); ``invalidates(plan)`` says when a value seen in
``settle`` means the launched step fed something it should not have.

Input tokens sit in per-stream queues and are bound to a timestep only when that
timestep is fed, so a ``feed()`` between two steps lands in the row just produced
(rows, interactive) or the next one fed.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Mapping, Optional, Tuple, Union

import mlx.core as mx
import numpy as np

from .streams import Flat, StreamSpec

LAZY = None
"""Marks a :class:`DecodePlan` id that comes from the previous step's sampled tokens."""


@dataclass
class SeedPlan:
    """A first row whose tokens are fixed (the rows seed mode): nothing to run."""

    tokens: List[int]  # one per channel

    def reads(self) -> Dict[int, Tuple[int, int]]:
        return {}


@dataclass
class PrefillPlan:
    """The prompt in one (chunked) forward, then the first sample."""

    flat: Flat
    sample_at: List[int]  # flat indices whose logits are sampled
    sample_channels: List[int]
    shared: int  # leading tokens (timestep order) worth a prompt cache

    def reads(self) -> Dict[int, Tuple[int, int]]:
        return {}


@dataclass
class DecodePlan:
    """One decode step: the tokens fed (``LAZY`` ids come from ``lazy_src``, in order)."""

    ids: List[Optional[int]]
    channels: List[int]
    ys: List[int]
    lazy_src: Optional[mx.array]
    sample_rows: List[int]  # indices into ids whose logits are sampled
    sample_channels: List[int]
    read: Dict[int, int] = field(default_factory=dict)  # input channel -> token
    # an mlx-lm logits processor ``(tokens, logits) -> logits`` for the sampled rows
    processor: Optional[Callable[[Optional[mx.array], mx.array], mx.array]] = None

    def tokens(self) -> mx.array:
        """The ids ``[1, L]``: host ids and lazy ones put back in plan order."""
        host = [i for i, t in enumerate(self.ids) if t is not LAZY]
        lazy = [i for i, t in enumerate(self.ids) if t is LAZY]
        parts = []
        if host:
            parts.append(mx.array([self.ids[i] for i in host], dtype=mx.int32))
        if lazy:
            parts.append(self.lazy_src.astype(mx.int32))
        ids = mx.concatenate(parts) if len(parts) > 1 else parts[0]
        order = host + lazy
        if order != list(range(len(order))):
            inverse = np.empty(len(order), dtype=np.int32)
            inverse[order] = np.arange(len(order))
            ids = ids[mx.array(inverse)]
        return ids[None]  # (1, L)

    def reads(self) -> Dict[int, Tuple[int, int]]:
        """``{input channel: (token, y)}`` read at this step."""
        return {c: (t, self.ys[self.channels.index(c)]) for c, t in self.read.items()}


Plan = Union[SeedPlan, PrefillPlan, DecodePlan]


@dataclass
class Settled:
    """What a step produced, after its values were read."""

    tokens: Dict[int, Optional[int]]  # channel -> token to report
    ys: Dict[int, int]
    finished: Dict[int, str]  # channels that finished at this step -> reason


def per_output(spec: StreamSpec, value, default) -> dict:
    """``{output channel: value}`` from one value or ``{stream name: value}`` (``"*"``:
    the default for the others)."""
    if not isinstance(value, Mapping):
        return {c: default if value is None else value for c in spec.outputs}
    base = value.get("*", default)
    out = {c: base for c in spec.outputs}
    for name, v in value.items():
        if name == "*":
            continue
        c = spec.index(name)
        if c in spec.inputs:
            raise ValueError(
                f"Stream {spec.names[c]!r} is an input stream (fed, never sampled); "
                f"output streams are {', '.join(spec.names[o] for o in spec.outputs)}."
            )
        out[c] = v
    return out


class Schedule:
    """What every schedule shares: input queues, the finish state, the per-output
    limits and stop tokens, and the defaults a layout gives them.

    A layout's schedule sets the class attributes, implements the state machine
    below (``from_options`` to ``exhausted``) and overrides the questions after it
    where its layout differs; the session asks nothing else and never checks the
    layout itself.
    """

    layout: str = ""  # the StreamSpec.layout this schedule runs
    sampling_method: str = "mlx"  # the default SamplingSettings.method
    default_max_tokens: Optional[int] = None
    default_max_steps: int = 0
    default_stop_tokens: Tuple[str, ...] = ()

    def __init__(
        self, spec: StreamSpec, tokenizer, *, max_steps, max_tokens, stop_tokens, heads=None
    ):
        self.spec = spec
        self.tokenizer = tokenizer
        # the output channels that generate, in order (docs/generation.md#heads)
        self.heads: List[int] = list(spec.outputs if heads is None else heads)
        caps = per_output(spec, max_tokens, self.default_max_tokens)
        if any(v is not None and v < 1 for v in caps.values()):
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
        self.max_tokens: Dict[int, Optional[int]] = caps
        self.stop_tokens: Dict[int, set] = self._stop_tokens(stop_tokens)
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}.")
        self.max_steps = self.default_max_steps if max_steps is None else max_steps
        self.queues: Dict[int, Deque[int]] = {c: deque() for c in spec.inputs}
        self.finished: Dict[int, str] = {}
        self.done = False
        self.finish_reason: Optional[str] = None
        self.steps = 0

    def finish(self, reason: str):
        self.done, self.finish_reason = True, self.finish_reason or reason

    def _token_id(self, tok) -> int:
        if isinstance(tok, str):
            ids = self.tokenizer.encode(tok, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(
                    f"Stop token {tok!r} is {len(ids)} tokens; it must be one."
                )
            return ids[0]
        return int(tok)

    def _stop_tokens(self, stop_tokens) -> Dict[int, set]:
        if stop_tokens is None:
            ids = {self._token_id(t) for t in self.default_stop_tokens}
            return {c: ids for c in self.spec.outputs} if ids else {}
        if not isinstance(stop_tokens, Mapping):
            ids = {self._token_id(t) for t in stop_tokens}
            return {c: ids for c in self.spec.outputs}
        parsed = {k: {self._token_id(t) for t in v} for k, v in stop_tokens.items()}
        return per_output(self.spec, parsed, set())

    def _one(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if not ids:
            raise ValueError(f"The word {word!r} gives no tokens.")
        return ids[0]

    # -- the state machine ---------------------------------------------------------
    @classmethod
    def from_options(
        cls, model, tokenizer, *, rows=None, blocks=None, interactive=None, heads=None,
        **limits,
    ) -> "Schedule":
        """The schedule for ``Session``'s arguments (``limits``: ``max_steps``,
        ``max_tokens``, ``stop_tokens``); options of another layout are a ValueError.
        ``heads``: the output streams that generate (:func:`~mstream_mlx.heads.model_heads`);
        each layout says what happens to the others."""
        raise NotImplementedError

    def first_plan(self) -> Union[SeedPlan, PrefillPlan]:
        """The plan of the first event (under the lock)."""
        raise NotImplementedError

    def plan(self) -> Optional[DecodePlan]:
        """The next decode step, or ``None`` when the run is over (under the lock)."""
        raise NotImplementedError

    def advance(self, plan: Plan, tokens):
        """Commit a launched ``plan``; ``tokens`` are its lazy samples (under the lock)."""
        raise NotImplementedError

    def settle(self, plan: Plan, values: List[int]) -> Optional[Settled]:
        """Stop rules on the sampled ``values``; ``None``: nothing to report."""
        raise NotImplementedError

    def invalidates(self, plan: Plan) -> bool:
        """Whether a launched ``plan`` must be undone after the last ``settle``."""
        raise NotImplementedError

    def exhausted(self) -> bool:
        """Whether the step limits are reached."""
        raise NotImplementedError

    # -- what the session asks; the defaults suit most layouts ---------------------
    def tokenize(self, text: str) -> List[int]:
        """How text enters an input stream."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_feed(self, c: int):
        """Raise ``ValueError`` if input channel ``c`` takes no feed now (under the lock)."""

    def close(self, stream):
        """End the input ``stream``'s block (under the lock)."""
        raise ValueError("Only the blocks layout's user stream can be closed.")

    def is_text(self, c: int, tok: int) -> bool:
        """Whether ``tok`` on channel ``c`` is shown as text (silence and stop tokens
        decode to ``""``)."""
        return tok != self.spec.silence_token and tok not in self.stop_tokens.get(c, ())

    def first_input_y(self) -> int:
        """The timestep the first queued input token enters (after ``first_plan``)."""
        raise NotImplementedError

    def pipelines(self) -> bool:
        """Whether the session may launch step ``k+1`` before reading step ``k``."""
        return True

    def idle(self) -> bool:
        """Whether the clock has stopped until an input is fed (under the lock)."""
        return False

    def mask(
        self, ids: mx.array, positions: mx.array, cache, *, decode: bool
    ) -> Optional[mx.array]:
        """An explicit mask ``[1, 1, L, S]`` for new tokens (a prefill chunk or a decode
        step) where the layout's options go beyond the rule, else ``None`` (the rule)."""
        return None

    def trimmed(self, offset: int):
        """The cache was cut back to ``offset`` keys (a launched step undone)."""

    def prefix_loaded(self, ids: np.ndarray):
        """A prompt cache of these ids (timestep order) replaced the empty cache."""

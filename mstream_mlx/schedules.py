# Copyright © 2026 mstream-mlx contributors.
"""What enters the model at each timestep: the reference decode loops of the two layouts
as small state machines that :class:`mstream_mlx.session.Session` drives.

A schedule never runs the model.  Per decode step the session asks it for a
:class:`Plan` (tokens, channels, timesteps, which logits to sample), launches the
forward, then tells it what happened in two phases:

* :meth:`advance` right after the launch, with the *lazy* sampled tokens: everything
  that does not depend on their values (counters, consumed input tokens);
* :meth:`settle` once the values are read: stop rules, what to report.

This split is what lets the session launch step ``k+1`` before reading step ``k``
(``mx.async_eval`` double-buffering); :meth:`invalidates` says when a value seen in
``settle`` means the launched step fed something it should not have.

Input tokens sit in per-stream queues and are bound to a timestep only when that
timestep is fed, so a ``feed()`` between two steps lands in the row just produced
(rows, interactive: the reference's ``gen.send``) or the next one fed.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Union

import mlx.core as mx

from .sample import quiet_ramp, silence_ramp
from .streams import ChatTokens, Flat, blocks_to_flat, chat_blocks, rows_to_flat

# sec7 §7.2: the seed row's words for the thinking streams (channel 2 onwards).
SEED_WORDS = (
    " thinking",
    " checking",
    " feeling",
    " relating",
    " asking",
    " drifting",
    " watching",
    " integrating",
)
DEFAULT_SYSTEM = (
    "You are a helpful assistant."  # sec5 §1.2: the blocks default system text
)
LAZY = None
"""Marks a :class:`Plan` id that comes from the previous step's sampled tokens."""


@dataclass
class RowsOptions:
    """Knobs of the rows decode loop (sec7_rows.md §7.2), reference defaults.

    Args:
        pre_think: rows of the model's own before a user token may enter, in both modes.
            Interactive runs of the reference let a token sent after the seed row land
            in row 0: ``pre_think=0`` does that; the default 1 keeps row 0 silent, as
            the reference's training data and non-interactive loop have it.
            A value below the first generated row (1, or the number of prefill rows) is
            raised to it: the reference silently drops the user tokens that would fall
            there, we keep them.
        prefill_rows: header rows prefilled in one forward (the reference's
            ``prefill_rows``/``warm_start``): a table ``[P][C]`` of token ids or words
            (a word is ``tokenizer.encode(word)[0]``, ``"-"`` is silence).  ``None``: seed
            mode (row 0 = silence, silence, then :data:`SEED_WORDS`).
        seed_words: words of the seed row's thinking streams.
        silence_penalty: subtracted (times the ramp) from the silence logit of the first
            output stream (Output).
        think_silence_penalty: the same for the other output streams (thinking).
        silence_penalty_during_user_talk: start the ramp at ``pre_think`` instead of after
            the user's last token (interactive: count quiet rows while the user talks too).
        silence_exit: consecutive all-silent rows that end a non-interactive run
            (``None``: 1, the reference).  An interactive run never ends on silence: the
            user may simply be thinking (the reference's ``silence_streak_exit`` applies
            to both modes; we deviate on purpose).
        ablate: output streams forced to silence.
        skip_silence: no query attends to a silence key except itself (the reference's
            ``skip_silence`` / ``block_causal_skip_silence``).
        keep_sampled_user: interactive with prefill rows only: the first generated row
            keeps the *model-sampled* user token unless one is fed — a reference quirk
            (sec7 §10.8), off by default (silence).
    """

    pre_think: int = 1
    prefill_rows: Optional[Sequence[Sequence[Union[int, str]]]] = None
    seed_words: Sequence[str] = SEED_WORDS
    silence_penalty: float = 10.0
    think_silence_penalty: float = 0.0
    silence_penalty_during_user_talk: bool = False
    silence_exit: Optional[int] = None
    ablate: Sequence[str] = ()
    skip_silence: bool = False
    keep_sampled_user: bool = False

    @classmethod
    def for_model(cls, model, **overrides) -> "RowsOptions":
        """Defaults, then the model folder's ``multistream.rows_options`` (a model
        trained without silence penalties says so there), then non-None overrides."""
        saved = (model.args.multistream or {}).get("rows_options", {})
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**saved, **given})

    def __post_init__(self):
        if self.pre_think < 0:
            raise ValueError(f"pre_think must be >= 0, got {self.pre_think}.")
        if self.silence_exit is not None and self.silence_exit < 1:
            raise ValueError(f"silence_exit must be >= 1, got {self.silence_exit}.")


@dataclass
class BlocksOptions:
    """Knobs of the blocks decode loops (sec5_sec6_blocks.md §7.1-7.2).

    Args:
        system: default system text (or ids) when nothing is fed to the system stream.
        head_prefill: per assistant head, text or ids placed after
            ``<|im_start|>assistant\\n`` in the prefill (the reference's
            ``head_prefix_ids[h] + prefill_ids``); generation continues after it.
        close_user: feed ``<|im_end|>`` to the user stream when its queue runs dry (the
            reference: ``user_stream = content + [<|im_end|>]``).  ``False`` keeps the
            user block open for later feeds until :meth:`Session.close` is called.
        stop_all_on_last_head: every head stops when the last head emits its stop token
            (``generate_multistream``).
        allow_same_step_visible: a decode query also sees tokens fed earlier in the same
            step (user before heads); the reference's option, off by default.
    """

    system: Union[str, Sequence[int]] = DEFAULT_SYSTEM
    head_prefill: Sequence[Union[str, Sequence[int]]] = ()
    close_user: bool = True
    stop_all_on_last_head: bool = True
    allow_same_step_visible: bool = False


@dataclass
class Plan:
    """One launch: the tokens fed (``LAZY`` ids come from the last sampled tokens)."""

    kind: str  # "seed" | "prefill" | "decode"
    ids: List[Optional[int]] = field(default_factory=list)
    channels: List[int] = field(default_factory=list)
    ys: List[int] = field(default_factory=list)
    lazy_src: Optional[mx.array] = None  # source of the LAZY ids, in order
    sample_rows: List[int] = field(default_factory=list)  # fed index -> logits sampled
    sample_channels: List[int] = field(default_factory=list)
    read: Dict[int, int] = field(default_factory=dict)  # input channel -> token read
    penalties: Optional[List[float]] = None  # silence penalty per sampled row
    ramp: float = 0.0
    flat: Optional[Flat] = None  # prefill
    sample_at: List[int] = field(default_factory=list)  # prefill: flat indices
    shared: int = 0  # prefill: leading tokens (y order) worth a prompt cache
    seed_tokens: List[int] = field(default_factory=list)
    state: dict = field(default_factory=dict)  # schedule bookkeeping for advance()


@dataclass
class Settled:
    """What a step produced, after its values were read."""

    tokens: Dict[int, Optional[int]]  # channel -> token to report
    ys: Dict[int, int]
    finished: Dict[int, str]  # channels that finished at this step -> reason


class _Schedule:
    def __init__(self, spec, tokenizer):
        self.spec = spec
        self.tokenizer = tokenizer
        self.queues: Dict[int, Deque[int]] = {c: deque() for c in spec.inputs}
        self.finished: Dict[int, str] = {}
        self.done = False
        self.finish_reason: Optional[str] = None
        self.steps = 0

    def finish(self, reason: str):
        self.done, self.finish_reason = True, self.finish_reason or reason

    def _one(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if not ids:
            raise ValueError(f"The word {word!r} gives no tokens.")
        return ids[0]


class RowsSchedule(_Schedule):
    """The §7 rows loop: one token per channel per row, ``y = row``."""

    def __init__(
        self,
        spec,
        tokenizer,
        opts: RowsOptions,
        *,
        max_steps: int,
        max_tokens: Dict[int, Optional[int]],
        stop_tokens: Dict[int, set],
        interactive: Optional[bool],
    ):
        super().__init__(spec, tokenizer)
        if spec.silence_token is None:
            raise ValueError(
                "The rows layout needs a silence token; the model spec has none."
            )
        self.opts = opts
        self.sil = spec.silence_token
        self.C = spec.num_channels
        self.outs = list(spec.outputs)
        self.ins = list(spec.inputs)
        self.max_steps = max_steps
        self.max_tokens = max_tokens
        self.stop_tokens = stop_tokens
        self.interactive = interactive
        self.ablated = {spec.index(s) for s in opts.ablate}
        bad = [spec.names[c] for c in self.ablated if c not in self.outs]
        if bad:
            raise ValueError(f"Only output streams can be ablated, not {bad[0]!r}.")
        self.forced = set(self.ablated)  # channels fed silence from now on
        self.counts = {c: 0 for c in self.outs}
        self.prefill_table = (
            self._table(opts.prefill_rows) if opts.prefill_rows else None
        )
        self.pre_think = opts.pre_think
        primary = self.outs[0]
        self.penalty = [
            opts.silence_penalty if c == primary else opts.think_silence_penalty
            for c in self.outs
        ]
        self.r = 0  # the row the next launch produces
        self.prev: Optional[mx.array] = (
            None  # outputs of row r-1 (lazy), in self.outs order
        )
        self.quirk: Optional[mx.array] = (
            None  # keep_sampled_user: lazy user token of row P
        )
        self.quirk_value: Optional[int] = None
        self.last_user_row: Optional[int] = None
        self.got_user = False
        self.quiet = 0
        self.silent_rows = 0

    def _table(self, rows) -> List[List[int]]:
        table = []
        for r, row in enumerate(rows):
            if len(row) != self.C:
                raise ValueError(
                    f"Prefill row {r} has {len(row)} cells; the model has {self.C} streams."
                )
            table.append(
                [
                    (
                        (self.sil if w.strip() == "-" else self._one(w))
                        if isinstance(w, str)
                        else int(w)
                    )
                    for w in row
                ]
            )
        return table

    # -- the first event: seed row or prefill -------------------------------------
    def first_plan(self) -> Plan:
        if self.interactive is None:  # the reference: interactive iff no user text
            self.interactive = not any(self.queues.values())
        if self.prefill_table is None:
            # non-interactive: user tokens start after the fixed seed row; interactive
            # may put one in the seed row itself (the reference's first gen.send)
            self.pre_think = max(self.pre_think, 0 if self.interactive else 1)
            words = list(self.opts.seed_words)
            seed = [self.sil] * self.C
            for i, c in enumerate(self.outs[1:]):
                if i < len(words):
                    seed[c] = self._one(words[i])
            return Plan("seed", seed_tokens=seed)
        P = len(self.prefill_table)
        self.pre_think = max(self.pre_think, P)
        flat = rows_to_flat(self.prefill_table)
        sample = list(self.outs)
        if self.interactive and self.opts.keep_sampled_user:
            sample = [self.ins[0]] + sample
        last = (P - 1) * self.C
        return Plan(
            "prefill",
            flat=flat,
            sample_at=[last + c for c in sample],
            sample_channels=sample,
            shared=(P - 1) * self.C,
        )

    def row_of_first(self) -> int:
        return 0 if self.prefill_table is None else len(self.prefill_table)

    # -- decode steps -----------------------------------------------------------
    def exhausted(self) -> bool:
        return self.steps >= self.max_steps

    def plan(self) -> Optional[Plan]:
        if self.done or self.exhausted():
            return None
        r = self.r
        ids: List[Optional[int]] = [self.sil] * self.C
        read, consumed = {}, []
        quirk_used = False
        for c in self.ins:
            q = self.queues[c]
            if q and r - 1 >= self.pre_think:
                ids[c] = read[c] = q[0]
                consumed.append(c)
            elif c == self.ins[0] and self.quirk is not None:
                ids[c], quirk_used = LAZY, True
                if self.quirk_value is not None:
                    read[c] = self.quirk_value
        src = self.prev
        if self.forced & set(self.outs):
            mask = mx.array([c in self.forced for c in self.outs])
            src = mx.where(mask, self.sil, src)
        if quirk_used:
            src = mx.concatenate([self.quirk.reshape(1), src])
        for c in self.outs:
            ids[c] = LAZY
        # §7.2 silence-penalty ramp for the step computing row r
        user_sil = not any(read.get(c, self.sil) != self.sil for c in self.ins)
        if quirk_used and self.quirk_value is None:
            user_sil = False
        if self.interactive:
            got = self.got_user or not user_sil
            talk = self.opts.silence_penalty_during_user_talk
            quiet = self.quiet + 1 if got and (user_sil or talk) else 0
            ramp = quiet_ramp(quiet)
        else:
            left = sum(len(self.queues[c]) for c in self.ins) - len(consumed)
            if left > 0:
                user_end = max(r, self.pre_think) + left
            elif consumed:
                user_end = r
            elif self.last_user_row is not None:
                user_end = self.last_user_row + 1
            else:
                user_end = self.pre_think
            start = (
                self.pre_think
                if self.opts.silence_penalty_during_user_talk
                else user_end
            )
            ramp, quiet = silence_ramp(r, start), 0
        return Plan(
            "decode",
            ids=ids,
            channels=list(range(self.C)),
            ys=[r - 1] * self.C,
            lazy_src=src,
            sample_rows=list(self.outs),
            sample_channels=list(self.outs),
            read=read,
            penalties=self.penalty,
            ramp=ramp,
            state={"consumed": consumed, "quiet": quiet, "quirk_used": quirk_used},
        )

    def advance(self, plan: Plan, tokens):
        """Commit a launched plan (no token values needed)."""
        if plan.kind == "seed":
            self.prev = mx.array(
                [plan.seed_tokens[c] for c in self.outs], dtype=mx.int32
            )
            self.r = 1
            return
        if plan.kind == "prefill":
            if plan.sample_channels[0] in self.ins:
                self.quirk, tokens = tokens[0], tokens[1:]
            self.prev = tokens
            self.r = self.row_of_first() + 1
            return
        for c in plan.state["consumed"]:
            self.queues[c].popleft()
        if any(t != self.sil for t in plan.read.values()):
            self.last_user_row = self.r - 1
            self.got_user = True
        self.quirk = self.quirk_value = (
            None  # only row P can carry the sampled user token
        )
        self.quiet = plan.state["quiet"]
        self.prev = tokens
        self.r += 1
        self.steps += 1

    def settle(self, plan: Plan, values: List[int]) -> Optional[Settled]:
        """Stop rules on the values of the row ``plan`` produced; ``None`` = not reported."""
        if plan.kind == "seed":
            row = plan.seed_tokens
            return Settled(
                {c: row[c] for c in self.outs}, {c: 0 for c in self.outs}, {}
            )
        if plan.kind == "prefill" and plan.sample_channels[0] in self.ins:
            self.quirk_value, values = values[0], values[1:]
        r = self.row_of_first() if plan.kind == "prefill" else plan.ys[0] + 1
        row = {
            c: (self.sil if c in self.forced else v) for c, v in zip(self.outs, values)
        }
        user_next = (
            any(
                self.queues[c] and r >= self.pre_think
                for c in self.ins
            )
            or self.quirk is not None
        )
        if all(v == self.sil for v in row.values()) and not user_next:
            self.silent_rows += 1
            limit = None if self.interactive else (self.opts.silence_exit or 1)
            if limit is not None and self.silent_rows >= limit:
                self.finish("stop")  # sec7 §7.2: this row is not yielded
                return None
        else:
            self.silent_rows = 0
        finished = {}
        for c, v in row.items():
            if c in self.forced:
                continue
            if v in self.stop_tokens.get(c, ()):
                finished[c] = "stop"
            elif v != self.sil:
                self.counts[c] += 1
                cap = self.max_tokens.get(c)
                if cap is not None and self.counts[c] >= cap:
                    finished[c] = "length"
        self.finished.update(finished)
        self.forced |= set(finished)
        report = {
            c: (None if c in self.forced and c not in finished else v)
            for c, v in row.items()
        }
        if self.forced >= set(self.outs):
            self.finish("length" if "length" in self.finished.values() else "stop")
        return Settled(report, {c: r for c in self.outs}, finished)

    def invalidates(self, plan: Plan) -> bool:
        return self.done  # only the end of the run voids a launched row


class BlocksSchedule(_Schedule):
    """The §5-6 blocks loops: system/user/assistant prefill, then per step the next user
    token and one token per active assistant head (``generate_stream``/``generate_multistream``
    with the decode mask done right: the reference's 3-stream mask lets every decode
    query see only itself, sec5 §4.4; ours follows the rule for any number of heads)."""

    def __init__(
        self,
        spec,
        tokenizer,
        opts: BlocksOptions,
        *,
        max_steps: int,
        max_tokens: Dict[int, Optional[int]],
        stop_tokens: Dict[int, set],
    ):
        super().__init__(spec, tokenizer)
        if tuple(spec.inputs) != (0, 1) or spec.num_channels < 3:
            raise ValueError(
                "The blocks layout needs channel 0 = system and 1 = user as inputs and at "
                f"least one assistant head; the model has inputs {list(spec.inputs)} of "
                f"{spec.num_channels} channels."
            )
        self.opts = opts
        self.chat = ChatTokens.from_tokenizer(tokenizer)
        self.heads = list(spec.outputs)  # channel 2 + h
        H = len(self.heads)
        prefills = list(opts.head_prefill) or [[] for _ in range(H)]
        if len(prefills) != H:
            raise ValueError(
                f"head_prefill has {len(prefills)} entries; the model has {H} heads."
            )
        self.prefills = [self._ids(p) for p in prefills]
        self.max_steps = max_steps
        self.max_tokens = max_tokens
        self.stop_tokens = stop_tokens
        self.system: Optional[List[int]] = None  # set from feeds or opts at start
        self.started = False
        self.close_requested = opts.close_user
        self.closed = False
        self.closing = False
        self.y0 = 0
        self.u = 0
        self.g_fed = {c: 0 for c in self.heads}
        self.counts = {c: 0 for c in self.heads}
        self.active = set(self.heads)
        self.last: Optional[mx.array] = None
        self.last_channels: List[int] = []

    def _ids(self, text_or_ids) -> List[int]:
        if isinstance(text_or_ids, str):
            return self.tokenizer.encode(text_or_ids, add_special_tokens=False)
        return [int(t) for t in text_or_ids]

    def first_plan(self) -> Plan:
        self.started = True
        sys_ids = list(self.queues[0]) or self._ids(self.opts.system)
        self.queues[0].clear()
        blocks = chat_blocks(self.chat, sys_ids, [], self.prefills, close_user=False)
        self.y0 = len(blocks[0].tokens)
        flat = blocks_to_flat(blocks)
        ends, n = [], 0
        for b in blocks:
            n += len(b.tokens)
            ends.append(n - 1)
        return Plan(
            "prefill",
            flat=flat,
            sample_at=ends[2:],
            sample_channels=list(self.heads),
            shared=self.y0,
        )

    def exhausted(self) -> bool:
        return self.steps >= self.max_steps or not self.active

    def plan(self) -> Optional[Plan]:
        if self.done or self.exhausted():
            return None
        ids, ch, ys, read = [], [], [], {}
        q = self.queues[1]
        user = None
        if q:
            user = q[0]
        elif self.close_requested and not self.closed:
            user = self.chat.im_end
            self.closing = True  # from now on a feed would race the close: refused
        if user is not None:
            ids.append(user)
            ch.append(1)
            ys.append(self.y0 + 3 + self.u)
            read[1] = user
        heads = [c for c in self.heads if c in self.active]
        for c in heads:
            ids.append(LAZY)
            ch.append(c)
            h = c - 2
            ys.append(self.y0 + 3 + len(self.prefills[h]) + self.g_fed[c])
        idx = [self.last_channels.index(c) for c in heads]
        src = (
            self.last
            if idx == list(range(len(self.last_channels)))
            else self.last[mx.array(idx)]
        )
        first = len(ids) - len(heads)
        return Plan(
            "decode",
            ids=ids,
            channels=ch,
            ys=ys,
            lazy_src=src,
            sample_rows=list(range(first, len(ids))),
            sample_channels=heads,
            read=read,
            state={"user": user is not None, "content": bool(q)},
        )

    def advance(self, plan: Plan, tokens):
        if plan.kind == "decode":
            if plan.state["content"]:
                self.queues[1].popleft()
            elif plan.state["user"]:
                self.closed = True
            self.u += int(plan.state["user"])
            for c in plan.sample_channels:
                self.g_fed[c] += 1
            self.steps += 1
        for c in plan.sample_channels:
            self.counts[c] += 1
            cap = self.max_tokens.get(c)
            if cap is not None and self.counts[c] >= cap:
                self.active.discard(c)  # its last token: never fed
        self.last, self.last_channels = tokens, list(plan.sample_channels)

    def settle(self, plan: Plan, values: List[int]) -> Settled:
        finished = {}
        tokens = {c: None for c in self.heads}
        ys = {}
        for c, v in zip(plan.sample_channels, values):
            tokens[c] = v
            ys[c] = self.y0 + 3 + len(self.prefills[c - 2]) + self.counts[c] - 1
            if v in self.stop_tokens.get(c, ()):
                finished[c] = "stop"
            elif (
                self.max_tokens.get(c) is not None
                and self.counts[c] >= self.max_tokens[c]
            ):
                finished[c] = "length"
        last = self.heads[-1]
        if finished.get(last) == "stop" and self.opts.stop_all_on_last_head:
            for c in self.heads:  # generate_multistream: the last head ends everyone
                if c not in self.finished and c not in finished:
                    finished[c] = "stop"
        for c in finished:
            self.active.discard(c)
        self.finished.update(finished)
        if not self.active:
            self.finish("length" if "length" in self.finished.values() else "stop")
        return Settled(tokens, ys, finished)

    def invalidates(self, plan: Plan) -> bool:
        return self.done or any(c not in self.active for c in plan.sample_channels)

# Copyright © 2026 mstream-mlx contributors.
"""The rows layout's decode loop (paper §7): one token per channel per row, ``y = row``,
silence in empty cells; its options, defaults, masks and text rules."""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .checks import check_table, number
from .heads import model_heads
from .mask import make_mask
from .plans import LAZY, DecodePlan, Plan, PrefillPlan, Schedule, SeedPlan, Settled
from .sample import SilencePenalty, quiet_ramp, silence_ramp
from .streams import ROWS, rows_to_flat
from .vocab import check_ids

# paper §7: the seed row's words for the thinking streams (channel 2 onwards).
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
DEFAULT_MAX_ROWS = 200  # decode rows (the reference's max_rows)


@dataclass
class RowsOptions:
    """Knobs of the rows decode loop (paper §7), reference defaults.

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
            to both modes; we deviate on purpose, see docs/design.md).
        ablate: output streams forced to silence.
        skip_silence: no query attends to a silence key except itself (the reference's
            ``skip_silence`` / ``block_causal_skip_silence``).
        keep_sampled_user: interactive with prefill rows only: the first generated row
            keeps the *model-sampled* user token unless one is fed — a reference quirk
            (see docs/design.md), off by default (silence).
        idle_pause: interactive only: after this many all-silent rows with nothing
            queued the clock stops (``Session.step`` waits) until something is fed,
            so a pause of any length looks to the model like this many rows
            (docs/long-sessions.md).  0: never.
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
    idle_pause: int = 0

    @classmethod
    def for_model(cls, model, **overrides) -> "RowsOptions":
        """Defaults, then the model folder's ``multistream.rows_options`` (a model
        trained without silence penalties says so there), then non-None overrides."""
        saved = (model.args.multistream or {}).get("rows_options", {})
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**saved, **given})

    def __post_init__(self):
        number("silence_penalty", self.silence_penalty)
        number("think_silence_penalty", self.think_silence_penalty)
        if self.pre_think < 0:
            raise ValueError(f"pre_think must be >= 0, got {self.pre_think}.")
        if self.silence_exit is not None and self.silence_exit < 1:
            raise ValueError(f"silence_exit must be >= 1, got {self.silence_exit}.")
        if self.idle_pause < 0:
            raise ValueError(f"idle_pause (--idle-pause) must be >= 0, got {self.idle_pause}.")


@dataclass
class RowsStep(DecodePlan):
    """A rows decode step and what :meth:`RowsSchedule.advance` commits."""

    consumed: Sequence[int] = ()  # input channels whose queue head this row reads
    quiet: int = 0  # interactive: quiet user rows counted up to this row


class RowsSchedule(Schedule):
    """The §7 rows loop: one token per channel per row, ``y = row``."""

    layout = ROWS
    sampling_method = "rows"
    default_max_tokens = None  # non-silence tokens per output stream: no cap
    default_max_steps = DEFAULT_MAX_ROWS

    def __init__(
        self,
        spec,
        tokenizer,
        opts: RowsOptions,
        *,
        max_steps: Optional[int],
        max_tokens,
        stop_tokens,
        interactive: Optional[bool],
        heads=None,
    ):
        super().__init__(
            spec,
            tokenizer,
            max_steps=max_steps,
            max_tokens=max_tokens,
            stop_tokens=stop_tokens,
            heads=heads,
        )
        if spec.silence_token is None:
            raise ValueError(
                "The rows layout needs a silence token; the model spec has none."
            )
        self.opts = opts
        self.sil = spec.silence_token
        self.C = spec.num_channels
        self.outs = list(spec.outputs)
        self.ins = list(spec.inputs)
        self.interactive = interactive
        self.ablated = {spec.index(s) for s in opts.ablate}
        # a row holds every channel: output streams that are not heads are held
        # silent, as ablated ones are (docs/design.md)
        self.ablated |= set(self.outs) - set(self.heads)
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
        self.prev: Optional[mx.array] = None  # outputs of row r-1 (lazy), outs order
        self.quirk: Optional[mx.array] = None  # keep_sampled_user: user token of row P
        self.quirk_value: Optional[int] = None
        self.last_user_row: Optional[int] = None
        self.got_user = False
        self.quiet = 0
        self.silent_rows = 0
        self.idle_rows = 0  # all-silent rows (user included) with nothing queued
        self.key_sil: Optional[mx.array] = None  # skip_silence: silence flag per key

    @classmethod
    def from_options(
        cls, model, tokenizer, *, rows=None, blocks=None, interactive=None, heads=None,
        **limits,
    ) -> "RowsSchedule":
        """The schedule for ``Session``'s arguments; ``limits``: ``max_steps``,
        ``max_tokens``, ``stop_tokens``."""
        if blocks is not None:
            raise ValueError("blocks options apply to the blocks layout only.")
        opts = rows or RowsOptions.for_model(model)
        heads = model_heads(model, heads)
        sched = cls(
            model.streams, tokenizer, opts, interactive=interactive, heads=heads, **limits
        )
        check_ids(sched.prefill_table or [], model.args.vocab_size, "A prefill row's token id")
        return sched

    def _table(self, rows) -> List[List[int]]:
        table = []
        check_table(rows)
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

    # -- what the session asks ---------------------------------------------------
    def tokenize(self, text: str) -> List[int]:
        """Words, each encoded as ``" " + word``: one token per row (paper §7)."""
        ids = []
        for word in text.split():
            ids += self.tokenizer.encode(" " + word, add_special_tokens=False)
        return ids

    def first_input_y(self) -> int:
        return self.pre_think

    def pipelines(self) -> bool:
        # interactive: a feed must still be able to change the row just produced
        return not self.interactive

    def idle(self) -> bool:
        return (
            bool(self.interactive) and 0 < self.opts.idle_pause <= self.idle_rows
            and not self.done and not any(self.queues[c] for c in self.ins)
        )

    def mask(self, ids, positions, cache, *, decode: bool) -> Optional[mx.array]:
        """skip_silence: the rule, minus every silence key but a token's own."""
        if not self.opts.skip_silence:
            return None
        if self.key_sil is not None and len(self.key_sil) != cache[0].offset:
            raise ValueError("skip_silence cannot run with a timestep window (--kv-window).")
        mask = make_mask(positions, cache[0])  # (1, 1, L, S)
        L, S = positions.shape[1], mask.shape[-1]
        sil = ids[0] == self.sil
        keys = sil if self.key_sil is None else mx.concatenate([self.key_sil, sil])
        itself = mx.arange(S)[None, :] == (S - L + mx.arange(L))[:, None]
        self.key_sil = keys
        return mask & (~keys[None, :] | itself)

    def trimmed(self, offset: int):
        if self.key_sil is not None:
            self.key_sil = self.key_sil[:offset]

    def prefix_loaded(self, ids: np.ndarray):
        if self.key_sil is None and self.opts.skip_silence:
            self.key_sil = mx.array(ids == self.sil)

    # -- the first event: seed row or prefill -------------------------------------
    def first_plan(self) -> Union[SeedPlan, PrefillPlan]:
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
            return SeedPlan(seed)
        P = len(self.prefill_table)
        self.pre_think = max(self.pre_think, P)
        flat = rows_to_flat(self.prefill_table)
        sample = list(self.outs)
        if self.interactive and self.opts.keep_sampled_user:
            sample = [self.ins[0]] + sample
        last = (P - 1) * self.C
        return PrefillPlan(
            flat,
            sample_at=[last + c for c in sample],
            sample_channels=sample,
            shared=(P - 1) * self.C,
        )

    def row_of_first(self) -> int:
        return 0 if self.prefill_table is None else len(self.prefill_table)

    # -- decode steps -----------------------------------------------------------
    def exhausted(self) -> bool:
        return self.steps >= self.max_steps

    def plan(self) -> Optional[RowsStep]:
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
        # paper §7: the silence-penalty ramp for the step computing row r
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
        return RowsStep(
            ids=ids,
            channels=list(range(self.C)),
            ys=[r - 1] * self.C,
            lazy_src=src,
            sample_rows=list(self.outs),
            sample_channels=list(self.outs),
            read=read,
            processor=SilencePenalty(self.sil, self.penalty, ramp) if ramp else None,
            consumed=consumed,
            quiet=quiet,
        )

    def advance(self, plan: Plan, tokens):
        """Commit a launched plan (no token values needed)."""
        if isinstance(plan, SeedPlan):
            self.prev = mx.array([plan.tokens[c] for c in self.outs], dtype=mx.int32)
            self.r = 1
            return
        if isinstance(plan, PrefillPlan):
            if plan.sample_channels[0] in self.ins:
                self.quirk, tokens = tokens[0], tokens[1:]
            self.prev = tokens
            self.r = self.row_of_first() + 1
            return
        for c in plan.consumed:
            self.queues[c].popleft()
        if any(t != self.sil for t in plan.read.values()):
            self.last_user_row = self.r - 1
            self.got_user = True
        self.quirk = self.quirk_value = None  # only row P can carry the sampled user
        self.quiet = plan.quiet
        self.prev = tokens
        self.r += 1
        self.steps += 1

    def settle(self, plan: Plan, values: List[int]) -> Optional[Settled]:
        """Stop rules on the values of the row ``plan`` produced; ``None`` = not reported."""
        if isinstance(plan, SeedPlan):
            row = plan.tokens
            return Settled(
                {c: row[c] for c in self.outs}, {c: 0 for c in self.outs}, {}
            )
        prefill = isinstance(plan, PrefillPlan)
        if prefill and plan.sample_channels[0] in self.ins:
            self.quirk_value, values = values[0], values[1:]
        r = self.row_of_first() if prefill else plan.ys[0] + 1
        row = {
            c: (self.sil if c in self.forced else v) for c, v in zip(self.outs, values)
        }
        user_next = (
            any(self.queues[c] and r >= self.pre_think for c in self.ins)
            or self.quirk is not None
        )
        heard = any(t != self.sil for t in getattr(plan, "read", {}).values())
        quiet = all(v == self.sil for v in row.values()) and not user_next
        self.idle_rows = self.idle_rows + 1 if quiet and not heard and not prefill else 0
        if all(v == self.sil for v in row.values()) and not user_next:
            self.silent_rows += 1
            limit = None if self.interactive else (self.opts.silence_exit or 1)
            if limit is not None and self.silent_rows >= limit:
                self.finish("stop")  # paper §7: this row is not yielded
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

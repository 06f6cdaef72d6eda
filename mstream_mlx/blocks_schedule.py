# Copyright © 2026 mstream-mlx contributors.
"""The blocks layout's decode loops (paper §5-6): a system block, then a user block and
assistant heads that all start at ``y0``; its options, defaults, masks and text rules."""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import mlx.core as mx

from .heads import model_heads
from .mask import make_mask
from .plans import LAZY, DecodePlan, Plan, PrefillPlan, Schedule, Settled
from .streams import BLOCKS, Block, ChatTokens, blocks_to_flat, chat_blocks

DEFAULT_SYSTEM = "You are a helpful assistant."  # the reference's default system text
DEFAULT_MAX_TOKENS = 256  # per assistant head (mlx-lm's generate_step default)
DEFAULT_MAX_STEPS = 4096  # decode steps (the reference's max_steps)


@dataclass
class BlocksOptions:
    """Knobs of the blocks decode loops (paper §5-6), reference defaults.

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
class BlocksStep(DecodePlan):
    """A blocks decode step and what :meth:`BlocksSchedule.advance` commits."""

    user: bool = False  # a user token (content or the closing <|im_end|>) is fed
    content: bool = False  # ... and it is the head of the user queue


class BlocksSchedule(Schedule):
    """The §5-6 blocks loops: system/user/assistant prefill, then per step the next user
    token and one token per active assistant head (``generate_stream``/``generate_multistream``
    with the decode mask done right: the reference's 3-stream mask lets every decode
    query see only itself; ours follows the rule for any number of heads, see
    docs/design.md)."""

    layout = BLOCKS
    sampling_method = "blocks"
    default_max_tokens = DEFAULT_MAX_TOKENS  # every generated token, per head
    default_max_steps = DEFAULT_MAX_STEPS
    default_stop_tokens = ("<|im_end|>",)

    def __init__(
        self,
        spec,
        tokenizer,
        opts: BlocksOptions,
        *,
        max_steps: Optional[int],
        max_tokens,
        stop_tokens,
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
        if tuple(spec.inputs) != (0, 1) or spec.num_channels < 3:
            raise ValueError(
                "The blocks layout needs channel 0 = system and 1 = user as inputs and at "
                f"least one assistant head; the model has inputs {list(spec.inputs)} of "
                f"{spec.num_channels} channels."
            )
        self.opts = opts
        self.chat = ChatTokens.from_tokenizer(tokenizer)
        H = len(self.heads)  # the streams not among them are never fed nor sampled
        prefills = list(opts.head_prefill) or [[] for _ in range(H)]
        if len(prefills) != H:
            raise ValueError(
                f"head_prefill has {len(prefills)} entries; the run has {H} heads."
            )
        self.prefills = [self._ids(p) for p in prefills]
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

    @classmethod
    def from_options(
        cls, model, tokenizer, *, rows=None, blocks=None, interactive=None, heads=None,
        **limits,
    ) -> "BlocksSchedule":
        """The schedule for ``Session``'s arguments; ``limits``: ``max_steps``,
        ``max_tokens``, ``stop_tokens``."""
        if rows is not None or interactive is not None:
            raise ValueError("rows options and interactive apply to the rows layout only.")
        heads = model_heads(model, heads)
        return cls(model.streams, tokenizer, blocks or BlocksOptions(), heads=heads, **limits)

    def _ids(self, text_or_ids) -> List[int]:
        if isinstance(text_or_ids, str):
            return self.tokenizer.encode(text_or_ids, add_special_tokens=False)
        return [int(t) for t in text_or_ids]

    # -- what the session asks ---------------------------------------------------
    def check_feed(self, c: int):
        name = self.spec.names[c]
        if c == 0 and self.started:
            raise ValueError(
                f"{name!r} is fixed once generation starts; feed it before the first step()."
            )
        if c == 1 and self.closing:
            raise ValueError(
                f"The {name!r} block was closed with <|im_end|>; feed before it closes, "
                "or pass BlocksOptions(close_user=False) and call close() when done."
            )

    def close(self, stream):
        if self.spec.index(stream) != 1:
            super().close(stream)
        self.close_requested = True

    def is_text(self, c: int, tok: int) -> bool:
        # the <|im_end|> that closes the user block is read, not shown
        closing = c == 1 and tok == self.chat.im_end
        return super().is_text(c, tok) and not closing

    def first_input_y(self) -> int:
        return self.y0 + 3  # after <|im_start|>user\n

    def mask(self, ids, positions, cache, *, decode: bool) -> Optional[mx.array]:
        """allow_same_step_visible: a decode query also sees the tokens fed before it
        in the same step."""
        if not (decode and self.opts.allow_same_step_visible):
            return None
        mask = make_mask(positions, cache[0])  # (1, 1, L, S)
        L, S = positions.shape[1], mask.shape[-1]
        tril = mx.tril(mx.ones((L, L), dtype=mx.bool_), k=-1)
        return mx.concatenate([mask[..., : S - L], mask[..., S - L :] | tril], axis=-1)

    # -- the first event: the prefill ---------------------------------------------
    def first_plan(self) -> PrefillPlan:
        self.started = True
        sys_ids = list(self.queues[0]) or self._ids(self.opts.system)
        self.queues[0].clear()
        blocks = chat_blocks(self.chat, sys_ids, [], self.prefills, close_user=False)
        blocks[2:] = [Block(c, b.tokens, b.y0) for c, b in zip(self.heads, blocks[2:])]
        self.y0 = len(blocks[0].tokens)
        flat = blocks_to_flat(blocks)
        ends, n = [], 0
        for b in blocks:
            n += len(b.tokens)
            ends.append(n - 1)
        return PrefillPlan(
            flat,
            sample_at=ends[2:],
            sample_channels=list(self.heads),
            shared=self.y0,
        )

    # -- decode steps -----------------------------------------------------------
    def exhausted(self) -> bool:
        return self.steps >= self.max_steps or not self.active

    def plan(self) -> Optional[BlocksStep]:
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
            h = self.heads.index(c)
            ys.append(self.y0 + 3 + len(self.prefills[h]) + self.g_fed[c])
        idx = [self.last_channels.index(c) for c in heads]
        src = (
            self.last
            if idx == list(range(len(self.last_channels)))
            else self.last[mx.array(idx)]
        )
        first = len(ids) - len(heads)
        return BlocksStep(
            ids=ids,
            channels=ch,
            ys=ys,
            lazy_src=src,
            sample_rows=list(range(first, len(ids))),
            sample_channels=heads,
            read=read,
            user=user is not None,
            content=bool(q),
        )

    def advance(self, plan: Plan, tokens):
        if isinstance(plan, BlocksStep):
            if plan.content:
                self.queues[1].popleft()
            elif plan.user:
                self.closed = True
            self.u += int(plan.user)
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
            prefill = self.prefills[self.heads.index(c)]
            ys[c] = self.y0 + 3 + len(prefill) + self.counts[c] - 1
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

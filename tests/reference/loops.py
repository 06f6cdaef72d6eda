"""Reference decode loops for the two published layouts, driving ``RefModel`` with its KV cache.

* rows (paper §7): C channels, one token per channel per row, ``y = row``.
* blocks (paper §5-§6): system block, then user + 1..H assistant blocks from ``y0``.

The *schedule* (what is fed where) lives in small pure functions (``rows_user_cell``,
``rows_ramp``, ``blocks_prefill_layout``, ``blocks_step_feed``) so an MLX loop can be checked
step by step. Any model with ``model(ids, channels, positions, cache=...)``, ``new_cache()`` and a
``device`` attribute works (tests use a fake one to pin the schedule exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor


class Feed(NamedTuple):
    """One token entering the model: id, channel id, timestep."""

    token: int
    cid: int
    y: int


def _forward(model: Any, cache: Any, feeds: list[Feed]) -> Tensor:
    """One model call on ``feeds`` (batch 1); the mask comes from the y's (the rule). fp32 [L, V]."""
    dev = model.device
    ids = torch.tensor([[f.token for f in feeds]], device=dev)
    cids = torch.tensor([[f.cid for f in feeds]], device=dev)
    ys = torch.tensor([[f.y for f in feeds]], device=dev)
    with torch.no_grad():
        return model(ids, cids, ys, cache=cache)[0].float().cpu()


def sample_rows_token(logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None) -> int:
    """The rows reference's ``sample_top_p`` (paper §7): top-k keeps ties; top-p keeps the token that crosses the threshold."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    scaled = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs, order = torch.sort(torch.softmax(scaled, dim=-1), descending=True)
    probs = probs.masked_fill(torch.cumsum(probs, dim=-1) - probs > top_p, 0.0)
    choice = torch.multinomial(probs / probs.sum(), 1, generator=generator)
    return int(order[choice])


def sample_blocks_token(
    logits: Tensor, history: list[int], temperature: float, top_k: int, top_p: float, presence_penalty: float, generator: torch.Generator | None
) -> int:
    """The blocks reference's ``_select_next_token`` (paper §5): presence penalty, /T, top-k, top-p dropping the crossing token."""
    logits = torch.nan_to_num(logits.float(), nan=float("-inf"))
    if temperature <= 0:
        return int(torch.argmax(logits))
    if presence_penalty and history:
        logits[torch.tensor(sorted(set(history)))] -= presence_penalty
    scaled = logits / temperature
    if top_k > 0:
        kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, order = torch.sort(scaled, descending=True)
        drop = torch.cumsum(torch.softmax(sorted_l, dim=-1), dim=-1) > top_p
        drop[0] = False
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if not torch.isfinite(probs).all() or probs.sum() <= 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))


# ----------------------------------------------------------------------------------------- rows


def rows_user_cell(r: int, *, user_tokens: list[int], pre_think: int, silence: int) -> int:
    """Non-interactive user cell of row r: ``U[r - pre_think]`` while ``pre_think <= r < user_end``."""
    if pre_think <= r < pre_think + len(user_tokens):
        return user_tokens[r - pre_think]
    return silence


def rows_ramp(r: int, *, user_end: int) -> float:
    """Non-interactive silence-penalty ramp for the step computing row r: 0.2, 0.4, ... 1 after user_end."""
    return min(1.0, (r - user_end + 1) / 5) if r >= user_end else 0.0


def rows_feed(row: list[int], position: int) -> list[Feed]:
    """A whole row enters at once: channel = column, y = row index."""
    return [Feed(tok, c, position) for c, tok in enumerate(row)]


@dataclass
class RowStep:
    """One decode step: feeding row ``r-1`` at position ``r-1`` produced row ``r``."""

    r: int
    fed: list[int]
    position: int
    ramp: float
    row: list[int]


@dataclass
class RowsResult:
    rows: list[list[int]]  # as yielded: seed row (or prefill rows + first sampled row), then one per step
    steps: list[RowStep] = field(default_factory=list)
    stopped_on_silence: bool = False


def rows_generate(
    model: Any,
    *,
    num_channels: int,
    silence: int,
    user_tokens: list[int] | None,
    pre_think: int = 1,
    seed_row: list[int] | None = None,
    max_rows: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    silence_penalty: float = 10.0,
    think_silence_penalty: float = 0.0,
    prefill_rows: list[list[int]] | None = None,
    user_at: Callable[[int], int | None] | None = None,
    generator: torch.Generator | None = None,
) -> RowsResult:
    """The rows reference's ``generate`` (paper §7). Non-interactive when ``user_tokens`` is non-empty.

    Interactive (``user_tokens`` empty): after row r is produced, ``user_at(r)`` may return a token
    that overwrites that row's user cell before it is fed (the ``gen.send`` of the reference);
    ``None`` keeps what is there. The run never stops on silence then, only after ``max_rows``.
    """
    C, U = num_channels, list(user_tokens or [])
    interactive = not U
    if user_at is not None and not interactive:
        raise ValueError("user_at is only used in interactive mode (user_tokens empty).")
    user_end = pre_think + len(U)
    cache = model.new_cache()
    result = RowsResult(rows=[])
    got_user = False

    def emit(r: int, row: list[int]) -> None:
        nonlocal got_user
        result.rows.append(row)
        sent = user_at(r) if user_at is not None else None
        if sent is not None:
            row[0] = sent  # mutates the yielded row, as the reference does
            got_user = got_user or sent != silence

    if prefill_rows:
        P = len(prefill_rows)
        feeds = [f for r, row in enumerate(prefill_rows) for f in rows_feed(list(row), r)]
        logits = _forward(model, cache, feeds)[(P - 1) * C :]
        for row in prefill_rows:
            result.rows.append(list(row))
        row = [sample_rows_token(logits[c], temperature, top_k, top_p, generator) for c in range(C)]  # user too
        if U and 0 <= P - pre_think < len(U):
            row[0] = U[P - pre_think]
        elif not interactive:
            row[0] = silence  # interactive keeps the sampled user token unless one is sent (quirk)
        emit(P, row)
        start = P + 1
    else:
        if seed_row is None or len(seed_row) != C:
            raise ValueError(f"seed_row must have {C} ids when prefill_rows is not given.")
        row = list(seed_row)
        emit(0, row)
        start = 1

    quiet = 0
    for r in range(start, start + max_rows):
        logits = _forward(model, cache, rows_feed(row, r - 1))
        if interactive:
            quiet = quiet + 1 if got_user and row[0] == silence else 0
            ramp = min(1.0, quiet / 5)
        else:
            ramp = rows_ramp(r, user_end=user_end)
        logits[1, silence] -= silence_penalty * ramp
        logits[2:, silence] -= think_silence_penalty * ramp
        user_tok = silence if interactive else rows_user_cell(r, user_tokens=U, pre_think=pre_think, silence=silence)
        nxt = [user_tok] + [sample_rows_token(logits[c], temperature, top_k, top_p, generator) for c in range(1, C)]
        result.steps.append(RowStep(r=r, fed=list(row), position=r - 1, ramp=ramp, row=list(nxt)))
        if not interactive and all(t == silence for t in nxt):
            result.stopped_on_silence = True  # this row is not yielded
            break
        emit(r, nxt)
        row = nxt
    return result


# --------------------------------------------------------------------------------------- blocks


def blocks_prefill_layout(
    *,
    system_ids: list[int],
    im_start: int,
    im_end: int,
    newline: int,
    role_ids: dict[str, int],
    num_heads: int = 1,
    head_prefill_ids: list[list[int]] | None = None,
) -> tuple[list[Feed], int, list[int]]:
    """Prefill: system (cid 0, y 0..Ls-1); user prefix (cid 1) and head prefixes (cid 2+h) from y0=Ls.

    The user *content* is not in the prefill; it is fed one token per step. Returns
    ``(feeds, y0, last)`` where ``last[h]`` indexes head h's final prefill token in ``feeds``.
    """
    system = [im_start, role_ids["system"], newline, *system_ids, im_end]
    feeds = [Feed(t, 0, y) for y, t in enumerate(system)]
    y0 = len(system)
    feeds += [Feed(t, 1, y0 + j) for j, t in enumerate([im_start, role_ids["user"], newline])]
    prefills = head_prefill_ids or [[] for _ in range(num_heads)]
    if len(prefills) != num_heads:
        raise ValueError(f"head_prefill_ids has {len(prefills)} entries for {num_heads} heads.")
    last = []
    for h, extra in enumerate(prefills):
        head = [im_start, role_ids["assistant"], newline, *extra]
        feeds += [Feed(t, 2 + h, y0 + j) for j, t in enumerate(head)]
        last.append(len(feeds) - 1)
    return feeds, y0, last


def blocks_step_feed(
    *, user_stream: list[int], u: int, pending: list[int | None], g_fed: list[int], y0: int, prefill_lens: list[int]
) -> list[Feed]:
    """One decode step: the next user token (if any) first, then each active head's pending token.

    user token u at ``(1, y0+3+u)``; head h's g-th generated token at ``(2+h, y0+3+P_h+g)``.
    """
    feeds = []
    if u < len(user_stream):
        feeds.append(Feed(user_stream[u], 1, y0 + 3 + u))
    for h, tok in enumerate(pending):
        if tok is not None:
            feeds.append(Feed(tok, 2 + h, y0 + 3 + prefill_lens[h] + g_fed[h]))
    return feeds


@dataclass
class BlocksResult:
    tokens: list[list[int]]  # per head, generated ids including the final im_end if emitted
    prefill: list[Feed]
    steps: list[list[Feed]]  # what each decode call fed, in feed order
    y0: int
    logits: list[Tensor] | None = None  # prefill logits, then each step's [Q, V] (keep_logits=True)


def blocks_generate(
    model: Any,
    *,
    system_ids: list[int],
    user_ids: list[int],
    im_start: int,
    im_end: int,
    newline: int,
    role_ids: dict[str, int],
    num_heads: int = 1,
    head_prefill_ids: list[list[int]] | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    presence_penalty: float = 0.0,
    generator: torch.Generator | None = None,
    max_steps: int = 4096,
    keep_logits: bool = False,
) -> BlocksResult:
    """The blocks reference's ``generate_stream`` (num_heads=1) / ``generate_multistream`` (num_heads=H), correct mask.

    Each head stops at ``im_end`` or after ``max_new_tokens``; every head stops once the last head
    emits ``im_end``. Unlike the reference we stop as soon as no head is active (the reference may
    keep feeding leftover user tokens, which cannot change any output).
    """
    prefill, y0, last = blocks_prefill_layout(
        system_ids=system_ids, im_start=im_start, im_end=im_end, newline=newline,
        role_ids=role_ids, num_heads=num_heads, head_prefill_ids=head_prefill_ids,
    )
    prefill_lens = [len(p) for p in (head_prefill_ids or [[] for _ in range(num_heads)])]
    cache = model.new_cache()
    logits = _forward(model, cache, prefill)
    kept = [logits] if keep_logits else None
    tokens: list[list[int]] = [[] for _ in range(num_heads)]
    pending: list[int | None] = [None] * num_heads

    def take(h: int, row: Tensor) -> None:
        tok = sample_blocks_token(row, tokens[h], temperature, top_k, top_p, presence_penalty, generator)
        tokens[h].append(tok)
        pending[h] = None if tok == im_end or len(tokens[h]) >= max_new_tokens else tok

    for h in range(num_heads):
        take(h, logits[last[h]])
    user_stream, u, g_fed = [*user_ids, im_end], 0, [0] * num_heads
    steps: list[list[Feed]] = []
    while tokens[-1][-1] != im_end and any(p is not None for p in pending) and len(steps) < max_steps:
        feeds = blocks_step_feed(user_stream=user_stream, u=u, pending=pending, g_fed=g_fed, y0=y0, prefill_lens=prefill_lens)
        logits = _forward(model, cache, feeds)
        steps.append(feeds)
        if kept is not None:
            kept.append(logits)
        row = 0
        if u < len(user_stream):
            u, row = u + 1, 1
        for h in range(num_heads):
            if pending[h] is not None:
                g_fed[h] += 1
                take(h, logits[row])
                row += 1
    return BlocksResult(tokens=tokens, prefill=prefill, steps=steps, y0=y0, logits=kept)

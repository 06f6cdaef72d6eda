# Copyright © 2026 mstream-mlx contributors.
"""The (channel, y) model of multi-stream LLMs: stream specs and layouts (the mask rule
itself lives in ``mask.py``).

Every token carries a stream (channel) ``c`` and a timestep ``y``.  The embedding adds
``channel_embedding[c]``, RoPE uses ``y`` and token ``i`` sees token ``j`` iff
``y_j < y_i or j == i`` (paper §5-§7).  Because positions and visibility come from
``(c, y)`` alone, the order of tokens in a sequence or a KV cache does not matter:
*rows* (§7) and *blocks* (§5-6) are two schedules of the same thing.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .vocab import first_outside

ROWS = "rows"
BLOCKS = "blocks"
LAYOUTS = (ROWS, BLOCKS)

# paper §7 / Stream-8B: the fixed order of the 10 channels; channel 0 is the user.
ROWS_CHANNELS = (
    "User",
    "Output",
    "Analytical",
    "Skeptical",
    "Intuitive",
    "Between",
    "Curious",
    "Void",
    "Instinct",
    "Synthesis",
)
# paper §5-6: channel 0 = system, 1 = user, 2 + h = assistant head h.
BLOCKS_CHANNELS = ("system", "user", "assistant", "auditor")

SILENCE_TEXT = " -"
"""Text of the silence token that fills empty cells in the rows layout (§7: ``" -"``;
``"-"`` for SentencePiece tokenizers, see :func:`silence_token_id`)."""


@dataclass(frozen=True)
class StreamSpec:
    """Which channels a model has, what they are called and which are inputs.

    Args:
        names: one name per channel, index = channel id.
        inputs: channel ids fed from outside (never sampled, never in the loss).
        layout: ``"rows"`` (one token per channel per row, silence in empty cells)
            or ``"blocks"`` (system block, then user and assistant blocks with a
            shared ``y`` origin).
        silence_token: id of the silence token (rows layout), ``None`` otherwise.
    """

    names: Tuple[str, ...]
    inputs: Tuple[int, ...]
    layout: str
    silence_token: Optional[int] = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"Unknown layout {self.layout!r}; expected one of {', '.join(LAYOUTS)}."
            )
        if len(set(n.lower() for n in self.names)) != len(self.names):
            raise ValueError(f"Stream names must be unique, got {list(self.names)}.")
        bad = [c for c in self.inputs if not 0 <= c < len(self.names)]
        if bad:
            raise ValueError(
                f"Input channel {bad[0]} is out of range for {len(self.names)} channels."
            )

    @property
    def num_channels(self) -> int:
        return len(self.names)

    @property
    def outputs(self) -> Tuple[int, ...]:
        return tuple(c for c in range(self.num_channels) if c not in self.inputs)

    def index(self, stream) -> int:
        """Channel id of ``stream`` (a name, case-insensitive, or an int id)."""
        if isinstance(stream, (int, np.integer)):
            if not 0 <= stream < self.num_channels:
                raise ValueError(
                    f"Channel {stream} is out of range; the model has "
                    f"{self.num_channels} channels ({', '.join(self.names)})."
                )
            return int(stream)
        for i, n in enumerate(self.names):
            if n.lower() == str(stream).lower():
                return i
        raise ValueError(
            f"Unknown stream {stream!r}; the model defines {', '.join(self.names)}."
        )

    def check_channels(self, channels) -> None:
        """One ``ValueError`` when any of ``channels`` (ints or an array, host-side)
        is not a channel of this model."""
        check_channels(channels, self.num_channels, self.names)

    def to_config(self) -> dict:
        return {
            "layout": self.layout,
            "channel_names": list(self.names),
            "input_channels": list(self.inputs),
            "silence_token_id": self.silence_token,
        }

    @classmethod
    def from_config(cls, cfg: dict, num_channels: int) -> "StreamSpec":
        """Build from the ``"multistream"`` entry of ``config.json``."""
        names = list(cfg.get("channel_names") or [])
        if len(names) > num_channels:
            raise ValueError(
                f"config.json names {len(names)} streams but the channel embedding "
                f"has {num_channels} rows."
            )
        names += [f"ch{i}" for i in range(len(names), num_channels)]
        return cls(
            names=tuple(names),
            inputs=tuple(cfg.get("input_channels", [])),
            layout=cfg.get("layout", BLOCKS),
            silence_token=cfg.get("silence_token_id"),
        )


def check_channels(channels, num_channels: int, names: Sequence[str] = ()) -> None:
    """One ``ValueError`` naming the first channel id outside ``0 .. num_channels - 1``
    (MLX does not bounds-check the channel-table lookup: it reads garbage)."""
    bad = first_outside(channels, num_channels, "Channel")
    if bad is not None:
        which = f" ({', '.join(names)})" if names else ""
        raise ValueError(
            f"Channel {bad} is out of range; the model has {num_channels} channels{which}."
        )


def rows_spec(num_channels: int = 10, silence_token: Optional[int] = None) -> StreamSpec:
    """The §7 rows spec: User (input), Output, then thinking streams."""
    names = list(ROWS_CHANNELS[:num_channels])
    names += [f"ch{i}" for i in range(len(names), num_channels)]
    return StreamSpec(tuple(names), (0,), ROWS, silence_token)


def blocks_spec(num_channels: int = 3) -> StreamSpec:
    """The §5-6 blocks spec: system and user inputs, then assistant heads."""
    names = list(BLOCKS_CHANNELS[:num_channels])
    names += [f"assistant{h}" for h in range(len(names) - 2, num_channels - 2)]
    return StreamSpec(tuple(names), (0, 1), BLOCKS)


def silence_token_id(tokenizer) -> int:
    """The silence id as the reference computes it (paper §7): the first token of
    ``" -"``, or of ``"-"`` for SentencePiece tokenizers (detected by ``▁``)."""
    first = tokenizer.convert_ids_to_tokens(
        tokenizer.encode("test", add_special_tokens=False)
    )[0]
    text = "-" if first.startswith("\u2581") else SILENCE_TEXT
    return tokenizer.encode(text, add_special_tokens=False)[0]


@dataclass
class Flat:
    """A multi-stream sequence flattened for the model: three int arrays of length L."""

    ids: np.ndarray
    channels: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def arrays(self) -> Tuple[mx.array, mx.array, mx.array]:
        """``(inputs, channels, positions)`` as ``[1, L]`` int32 MLX arrays."""
        return tuple(mx.array(a[None], dtype=mx.int32) for a in self.astuple())

    def astuple(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.ids, self.channels, self.positions

    def take(self, order: np.ndarray) -> "Flat":
        return Flat(*(a[order] for a in self.astuple()))


def _flat(ids, channels, positions) -> Flat:
    return Flat(*(np.asarray(a, dtype=np.int32).reshape(-1) for a in (ids, channels, positions)))


def rows_to_flat(
    table: Sequence[Sequence[int]],
    first_row: int = 0,
    streams: Optional[StreamSpec] = None,
) -> Flat:
    """Flatten a rows table ``table[r][c]`` row-major (§7: ``i = r*C + c``).

    Every token of row ``r`` gets ``y = first_row + r``; channel = column.  With
    ``streams`` (``model.streams``) a table wider than the model is refused here;
    without, the model call refuses it.
    """
    t = np.asarray(table)
    if t.ndim != 2:
        raise ValueError(
            f"A rows table must be 2-D [rows, channels], got shape {t.shape}."
        )
    R, C = t.shape
    if streams is not None and C > streams.num_channels:
        streams.check_channels([C - 1])
    y = np.repeat(np.arange(first_row, first_row + R), C)
    return _flat(t, np.tile(np.arange(C), R), y)


@dataclass
class Block:
    """One stream's contiguous run of tokens starting at timestep ``y0``."""

    channel: int
    tokens: List[int]
    y0: int

    def __post_init__(self):
        # a channel past the model's count is refused by blocks_to_flat(streams=)
        # or by the model call, which know the count
        if isinstance(self.channel, bool) or not isinstance(self.channel, (int, np.integer)):
            raise ValueError(f"Block channel must be an int, got {self.channel!r}.")
        if self.channel < 0:
            raise ValueError(f"Block channel must be >= 0, got {self.channel}.")


def blocks_to_flat(
    blocks: Sequence[Block], streams: Optional[StreamSpec] = None
) -> Flat:
    """Concatenate blocks in the given order; token k of a block gets ``y0 + k``.

    With ``streams`` (``model.streams``) a block on a channel the model lacks is
    refused here; without, the model call refuses it."""
    ids, ch, ys = [], [], []
    for b in blocks:
        if streams is not None:
            streams.check_channels([b.channel])
        ids += list(b.tokens)
        ch += [b.channel] * len(b.tokens)
        ys += range(b.y0, b.y0 + len(b.tokens))
    return _flat(ids, ch, ys)


def timestep_order(positions: np.ndarray) -> np.ndarray:
    """A stable permutation that sorts tokens by ``y``.

    Any order is a valid input to a single forward; only a y-sorted order may be cut
    into chunks for incremental prefill, since a token must never arrive after one
    that should have seen it.
    """
    return np.argsort(np.asarray(positions), kind="stable")


@dataclass(frozen=True)
class ChatTokens:
    """The Qwen chat-format ids the blocks layout (§5-6) builds its prefixes from."""

    im_start: int
    im_end: int
    newline: int
    roles: Dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatTokens":
        def one(text: str) -> int:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(
                    f"The blocks layout needs {text!r} to be one token; the "
                    f"tokenizer gives {len(ids)}."
                )
            return ids[0]

        roles = {r: one(r) for r in ("system", "user", "assistant")}
        return cls(one("<|im_start|>"), one("<|im_end|>"), one("\n"), roles)

    def prefix(self, role: str) -> List[int]:
        return [self.im_start, self.roles[role], self.newline]


def chat_blocks(
    chat: ChatTokens,
    system: Sequence[int],
    user: Sequence[int],
    heads: Sequence[Sequence[int]],
    *,
    close_user: bool = True,
    head_offsets: Optional[Sequence[int]] = None,
) -> List[Block]:
    """The §5-6 block layout: a system block at ``y = 0..Ls-1``, then the user block
    and one block per assistant head, all starting at ``y0 = Ls``.

    ``user`` and each of ``heads`` are content ids; role prefixes are added here and
    ``<|im_end|>`` closes the system block (and the user block if ``close_user``).
    ``head_offsets[h]`` delays head h by that many timesteps (a wait-k schedule).
    """
    sys_ids = chat.prefix("system") + list(system) + [chat.im_end]
    y0 = len(sys_ids)
    user_ids = chat.prefix("user") + list(user) + ([chat.im_end] if close_user else [])
    blocks = [Block(0, sys_ids, 0), Block(1, user_ids, y0)]
    offsets = list(head_offsets or [0] * len(heads))
    for h, content in enumerate(heads):
        blocks.append(Block(2 + h, chat.prefix("assistant") + list(content), y0 + offsets[h]))
    return blocks


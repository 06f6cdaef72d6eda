# Copyright © 2026 mstream-mlx contributors.
"""Multi-stream training data: JSONL formats → per-token ``(id, channel, y, label)``.

One example per line; the format is recognised per line from its keys:

* rows (paper §7): ``{"streams": {"User": [...], "Output": [...], ...}}`` with one cell
  per row (a token id, a one-token text piece, or ``null`` for silence), or the
  reference's ``{"num_rows": R, "token_ids": [[R ids] x C]}`` lines as they are.
* blocks (paper §5-6): ``{"system": "...", "user": "...", "assistant": ["...", ...],
  "offsets": {"assistant": 2}}``: one block per stream, heads delayed by ``offsets``.
* mlx-lm's ``{"prompt", "completion"}`` and ``{"messages": [...]}``, converted to blocks
  with the wait-k rule (the assistant starts ``wait_k`` timesteps after the user) and
  an optional ``"auditor"`` text for a second assistant head (auditing-while-solving).

A malformed line raises :class:`DataError` naming the file, the line and the reason
(or, with ``skip_invalid``, is counted and skipped).
"""

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..streams import ROWS, ChatTokens, StreamSpec, blocks_to_flat, chat_blocks
from ..vocab import check_tokenizer_fits

DEFAULT_SYSTEM = "You are a helpful assistant."
"""The reference's default system message (§5-6 ``model.system_message``)."""

SPLITS = ("train", "valid", "test")
ROWS_FORMATS = ("rows", "reference rows")


class DataError(ValueError):
    """A malformed training example; the message names file, line and reason."""


@dataclass
class DataOptions:
    """How lines become examples.

    Args:
        wait_k: the assistant head starts this many timesteps after the user block
            (converted formats, and blocks lines without ``offsets``).
        auditor_wait: the same for the auditor head (default: ``wait_k``).
        system: system message for lines that have none (blocks layout).
        skip_invalid: count and skip malformed lines instead of raising.
    """

    wait_k: int = 0
    auditor_wait: Optional[int] = None
    system: str = DEFAULT_SYSTEM
    skip_invalid: bool = False


@dataclass
class Example:
    """One multi-stream sequence: four arrays of length L.

    ``labels[j]`` says token j is a supervised target: the loss asks the previous
    token of j's stream (same channel, ``y - 1``) to predict it.
    """

    ids: np.ndarray
    channels: np.ndarray
    positions: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def truncate(self, max_length: int) -> Optional["Example"]:
        """Keep whole timesteps: drop every token with ``y >= Y`` for the smallest Y
        that leaves at most ``max_length`` tokens (streams stay aligned in time,
        unlike the reference's cut of the flat tail). None if nothing is left."""
        if len(self) <= max_length:
            return self
        cut = np.sort(self.positions)[max_length]
        keep = self.positions < cut
        if not keep.any():
            return None
        return Example(*(a[keep] for a in self.arrays()))

    def arrays(self) -> Tuple[np.ndarray, ...]:
        return self.ids, self.channels, self.positions, self.labels


def next_in_stream(channels: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Index of the token at ``(c, y + 1)`` for every token ``(c, y)``; -1 if none.

    This is "the next token of the same stream" for any layout: ``i + C`` in rows,
    ``i + 1`` inside a block.
    """
    c = channels.astype(np.int64)
    y = positions.astype(np.int64)
    if len(c) == 0:
        return np.zeros(0, dtype=np.int64)
    key = c * (int(y.max()) + 2) + y
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    at = np.searchsorted(sorted_key, key + 1)
    hit = at < len(key)
    hit[hit] = sorted_key[at[hit]] == key[hit] + 1
    return np.where(hit, order[np.minimum(at, len(key) - 1)], -1)


def targets_and_weights(
    ex: Example, stream_weights: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Per-token target id and loss weight.

    Token i (channel c) predicts the next token of stream c; its weight is
    ``stream_weights[c]`` if that target is labelled, else 0.  ``stream_weights`` is
    0 on input streams, so they never carry loss.
    """
    nxt = next_in_stream(ex.channels, ex.positions)
    has = nxt >= 0
    tgt = np.where(has, ex.ids[np.maximum(nxt, 0)], 0).astype(np.int32)
    w = stream_weights[ex.channels] * (has & ex.labels[np.maximum(nxt, 0)])
    return tgt, w.astype(np.float32)


class StreamDataset:
    """Examples plus the per-channel loss weights; indexable like mlx-lm datasets."""

    def __init__(self, examples: List[Example], stream_weights: np.ndarray):
        self.examples = examples
        self.stream_weights = np.asarray(stream_weights, dtype=np.float32)
        self._cache: Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]] = {}
        self._warned = False

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def lengths(self) -> np.ndarray:
        return np.array([len(e) for e in self.examples], dtype=np.int64)

    def targets(
        self, i: int, max_length: int
    ) -> Tuple[Example, np.ndarray, np.ndarray]:
        """Example i truncated to ``max_length``, with its targets and weights."""
        ex = self.examples[i].truncate(max_length)
        if ex is not self.examples[i] and not self._warned:
            self._warned = True
            print(
                f"[WARNING] Some examples are longer than {max_length} tokens; their "
                "last timesteps are dropped. Consider --max-seq-length or shorter data.",
                file=sys.stderr,
            )
        if ex is None:
            raise ValueError(
                f"Example {i} cannot be truncated to {max_length} tokens: its first "
                "timestep alone is longer; raise --max-seq-length."
            )
        key = (i, max_length)
        if key not in self._cache:
            self._cache[key] = targets_and_weights(ex, self.stream_weights)
        return (ex, *self._cache[key])


def stream_weight_vector(
    spec: StreamSpec, weights: Optional[Dict] = None
) -> np.ndarray:
    """Loss weight per channel: 1 on output streams, 0 on inputs, overridden by
    ``weights`` (stream name or id -> weight >= 0)."""
    w = np.zeros(spec.num_channels, dtype=np.float32)
    w[list(spec.outputs)] = 1.0
    for name, value in (weights or {}).items():
        c = spec.index(int(name) if str(name).isdigit() else name)
        if c in spec.inputs:
            raise ValueError(
                f"Stream {spec.names[c]!r} is an input stream; it never carries loss, "
                "so it takes no weight."
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value >= 0)
        ):
            raise ValueError(
                f"The weight of stream {spec.names[c]!r} must be a number >= 0 "
                f"(finite), got {value!r}."
            )
        w[c] = float(value)
    return w


class ExampleBuilder:
    """Turns one parsed JSON line into an :class:`Example` (raises ``ValueError``
    with the reason; :func:`load_jsonl` adds file and line)."""

    def __init__(self, tokenizer, spec: StreamSpec, vocab_size: int, options=None):
        self.tokenizer = tokenizer
        self.spec = spec
        self.vocab_size = vocab_size
        self.options = options or DataOptions()
        self._chat: Optional[ChatTokens] = None
        self._silence = spec.silence_token

    # -- format detection -------------------------------------------------------
    def kind(self, obj) -> str:
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        if "streams" in obj:
            return "rows"
        if "token_ids" in obj or "num_rows" in obj:
            return "reference rows"
        if "assistant" in obj or "offsets" in obj or "user" in obj:
            return "blocks"
        if "messages" in obj:
            return "chat"
        if "prompt" in obj or "completion" in obj:
            return "prompt/completion"
        keys = ", ".join(repr(k) for k in obj) or "none"
        hint = ""
        if "text" in obj:
            hint = " (plain {'text'} lines have no streams; use prompt/completion)"
        raise ValueError(
            f"unknown format (keys: {keys}){hint}; expected 'streams', "
            "'num_rows'+'token_ids', 'system'/'user'/'assistant', 'messages' or "
            "'prompt'+'completion'"
        )

    def build(self, obj) -> Example:
        kind = self.kind(obj)
        rows = kind in ROWS_FORMATS
        if rows != (self.spec.layout == ROWS):
            want = "rows" if self.spec.layout == ROWS else "blocks"
            raise ValueError(
                f"a {kind} example, but the model uses the {want} layout"
                + (
                    " (give rows models 'streams' tables)"
                    if self.spec.layout == ROWS
                    else " (give blocks models 'user'/'assistant', 'messages' or "
                    "'prompt'/'completion' lines)"
                )
            )
        if kind == "rows":
            return self._rows(obj)
        if kind == "reference rows":
            return self._reference_rows(obj)
        if kind == "blocks":
            return self._blocks(obj)
        if kind == "chat":
            return self._messages(obj)
        return self._prompt_completion(obj)

    # -- rows (§7) ---------------------------------------------------------------
    def _silence_id(self) -> int:
        if self._silence is None:
            raise ValueError("the model has no silence token for empty cells")
        return self._silence

    def _cell(self, cell, name: str, r: int) -> int:
        where = f"cell {r} of stream {name!r}"
        if cell is None:
            return self._silence_id()
        if isinstance(cell, bool) or not isinstance(cell, (int, str)):
            raise ValueError(
                f"{where} is {_brief(cell)}; a cell is a token id, a text piece "
                "or null (silence)"
            )
        if isinstance(cell, str):
            ids = self.tokenizer.encode(cell, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(
                    f"{where} ({cell!r}) is {len(ids)} tokens; a cell holds exactly "
                    "one token, so split it over several rows"
                )
            return ids[0]
        return self._token(cell, where)

    def _token(self, t, where: str) -> int:
        if isinstance(t, bool) or not isinstance(t, int):
            raise ValueError(f"{where} is {_brief(t)}, not a token id")
        if not 0 <= t < self.vocab_size:
            raise ValueError(
                f"{where} is token id {t}, outside the vocabulary (0..{self.vocab_size - 1})"
            )
        return t

    def _rows(self, obj) -> Example:
        streams = obj["streams"]
        if not isinstance(streams, dict) or not streams:
            raise ValueError("'streams' must be a non-empty object {name: [cells]}")
        C = self.spec.num_channels
        table: List[Optional[List[int]]] = [None] * C
        R = None
        first = None
        for name, cells in streams.items():
            try:
                c = self.spec.index(name)
            except ValueError:
                raise ValueError(
                    f"unknown stream {name!r}; the model's streams are "
                    f"{', '.join(self.spec.names)}"
                ) from None
            if table[c] is not None:
                raise ValueError(f"stream {self.spec.names[c]!r} is given twice")
            if not isinstance(cells, list):
                raise ValueError(f"stream {name!r} must be a list of cells")
            if R is None:
                R, first = len(cells), name
            elif len(cells) != R:
                raise ValueError(
                    f"stream {name!r} has {len(cells)} cells but {first!r} has {R}; "
                    "every stream has one cell per row"
                )
            table[c] = [self._cell(x, name, r) for r, x in enumerate(cells)]
        if not R:
            raise ValueError("the streams have no rows")
        silence = [self._silence_id()] * R if None in table else None
        cols = np.array([col if col is not None else silence for col in table])
        return self._table(cols.T)  # (R, C)

    def _reference_rows(self, obj) -> Example:
        ids = obj.get("token_ids")
        R = obj.get("num_rows")
        if not isinstance(ids, list) or not all(isinstance(x, list) for x in ids):
            raise ValueError("'token_ids' must be a list of per-channel lists of ids")
        if isinstance(R, bool) or not isinstance(R, int):
            raise ValueError(f"'num_rows' must be an integer, got {_brief(R)}")
        C = self.spec.num_channels
        if len(ids) < C:
            raise ValueError(
                f"'token_ids' has {len(ids)} channels but the model has {C}"
            )
        # as the reference: a C-channel model keeps the first C channels of the table
        for c, col in enumerate(ids[:C]):
            if len(col) != R:
                raise ValueError(
                    f"channel {c} of 'token_ids' has {len(col)} ids but num_rows is {R}"
                )
            for r, t in enumerate(col):
                self._token(t, f"token_ids[{c}][{r}]")
        if R < 1:
            raise ValueError("num_rows is 0: an empty example")
        return self._table(np.array(ids[:C], dtype=np.int64).T)

    def _table(self, table: np.ndarray) -> Example:
        R, C = table.shape
        y = np.repeat(np.arange(R), C)
        ch = np.tile(np.arange(C), R)
        labels = np.isin(ch, self.spec.outputs)  # silence targets included (docs/fine-tuning.md)
        return _example(table.reshape(-1), ch, y, labels)

    # -- blocks (§5-6) -----------------------------------------------------------
    def _chat_tokens(self) -> ChatTokens:
        if self._chat is None:
            self._chat = ChatTokens.from_tokenizer(self.tokenizer)
        return self._chat

    def _text(self, value, what: str) -> List[int]:
        if isinstance(value, str):
            return list(self.tokenizer.encode(value, add_special_tokens=False))
        if isinstance(value, list):
            return [self._token(t, f"{what}[{i}]") for i, t in enumerate(value)]
        raise ValueError(
            f"{what} must be a string (or a list of token ids), got "
            f"{type(value).__name__}"
        )

    def _heads(self) -> Tuple[int, ...]:
        return tuple(c for c in self.spec.outputs if c >= 2)

    def _assemble(self, system, user, heads: Sequence, offsets: Dict) -> Example:
        if len(heads) == 0:
            raise ValueError("no assistant text")
        avail = self._heads()
        if len(heads) > len(avail):
            raise ValueError(
                f"{len(heads)} assistant streams, but the model has "
                f"{len(avail)} ({', '.join(self.spec.names[c] for c in avail)})"
            )
        chat = self._chat_tokens()
        sys_ids = self._text(system, "'system'")
        user_ids = self._text(user, "'user'")
        contents = []
        for h, text in enumerate(heads):
            ids = self._text(text, f"assistant stream {h}")
            if not ids:
                raise ValueError(f"assistant stream {h} is empty")
            contents.append(ids + [chat.im_end])  # <|im_end|> is supervised (docs/fine-tuning.md)
        delays = [
            offsets.get(avail[h], self._default_wait(h)) for h in range(len(heads))
        ]
        blocks = chat_blocks(chat, sys_ids, user_ids, contents, head_offsets=delays)
        flat = blocks_to_flat(blocks)
        labels = np.zeros(len(flat), dtype=bool)
        start = len(blocks[0].tokens) + len(blocks[1].tokens)
        for b in blocks[2:]:
            # the loss starts after the 3-token "<|im_start|>assistant\n" prefix
            labels[start + 3 : start + len(b.tokens)] = True
            start += len(b.tokens)
        return _example(flat.ids, flat.channels, flat.positions, labels)

    def _default_wait(self, head: int) -> int:
        if head == 0:
            return self.options.wait_k
        a = self.options.auditor_wait
        return self.options.wait_k if a is None else a

    def _offsets(self, raw) -> Dict[int, int]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise ValueError("'offsets' must be an object {stream: timesteps}")
        out = {}
        for name, k in raw.items():
            try:
                c = self.spec.index(name)
            except ValueError:
                raise ValueError(
                    f"'offsets' names unknown stream {name!r}; the model's streams "
                    f"are {', '.join(self.spec.names)}"
                ) from None
            if c not in self._heads():
                raise ValueError(
                    f"'offsets' can delay assistant streams only, not {name!r}"
                )
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(
                    f"the offset of {name!r} must be an integer >= 0, got {_brief(k)}"
                )
            out[c] = k
        return out

    def _blocks(self, obj) -> Example:
        for key in ("user", "assistant"):
            if key not in obj:
                raise ValueError(f"a blocks example needs {key!r}")
        heads = obj["assistant"]
        if isinstance(heads, str):
            heads = [heads]
        if not isinstance(heads, list):
            raise ValueError("'assistant' must be a string or a list of strings")
        system = obj.get("system", self.options.system)
        return self._assemble(
            system, obj["user"], heads, self._offsets(obj.get("offsets"))
        )

    def _with_auditor(self, obj, answer) -> List:
        heads = [answer]
        if obj.get("auditor") is not None:
            heads.append(obj["auditor"])
        return heads

    def _prompt_completion(self, obj) -> Example:
        for k in ("prompt", "completion"):
            if not isinstance(obj.get(k), str):
                raise ValueError(f"{k!r} must be a string")
        heads = self._with_auditor(obj, obj["completion"])
        return self._assemble(
            obj.get("system", self.options.system), obj["prompt"], heads, {}
        )

    def _messages(self, obj) -> Example:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise ValueError("'messages' must be a list of {role, content} objects")
        roles = [m.get("role") for m in msgs]
        system = self.options.system
        if roles and roles[0] == "system":
            system = msgs[0].get("content")
            msgs, roles = msgs[1:], roles[1:]
        if roles != ["user", "assistant"]:
            raise ValueError(
                f"'messages' roles are {roles}; the blocks layout takes one user "
                "message and one assistant reply (after an optional system message)"
            )
        for m in msgs:
            if not isinstance(m.get("content"), str):
                raise ValueError(f"the {m['role']} message has no string 'content'")
        heads = self._with_auditor(obj, msgs[1]["content"])
        return self._assemble(system, msgs[0]["content"], heads, {})


def _brief(value, limit: int = 60) -> str:
    """A JSON value for a one-line message, cut to ``limit`` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _example(ids, channels, positions, labels) -> Example:
    return Example(
        np.asarray(ids, dtype=np.int32),
        np.asarray(channels, dtype=np.int32),
        np.asarray(positions, dtype=np.int32),
        np.asarray(labels, dtype=bool),
    )


@dataclass
class LoadReport:
    """What :func:`load_jsonl` did: examples kept and lines skipped (with reasons)."""

    path: Path
    kept: int = 0
    skipped: List[str] = field(default_factory=list)


def load_jsonl(
    path, builder: ExampleBuilder, skip_invalid: bool = False
) -> Tuple[List[Example], LoadReport]:
    """Parse every line of ``path``; blank lines are ignored.

    Raises:
        DataError: ``"{path}:{line}: {reason}"`` for the first malformed line, unless
            ``skip_invalid`` (then the line is counted in the report).
    """
    path = Path(path)
    report = LoadReport(path)
    examples = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                ex = _line_example(raw, n, builder)
            except ValueError as e:
                msg = f"{path}:{n}: {e}"
                if not skip_invalid:
                    raise DataError(msg) from None
                report.skipped.append(msg)
                continue
            if ex is not None:
                examples.append(ex)
    report.kept = len(examples)
    return examples, report


def _line_example(raw: bytes, n: int, builder: ExampleBuilder) -> Optional[Example]:
    """One JSONL line as an example (None for a blank line); ``ValueError`` with the
    reason otherwise."""
    try:
        line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"not valid UTF-8 (byte {raw[e.start]:#04x} at byte {e.start + 1})"
        ) from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    try:
        ex = builder.build(obj)
    except RecursionError:  # a deeply nested value reached a message
        raise ValueError("a value nested too deeply") from None
    if not has_loss(ex, builder.spec):
        raise ValueError("no output-stream token to learn from")
    return ex


def has_loss(ex: Example, spec: StreamSpec) -> bool:
    """Whether some output-stream token of ``ex`` has a labelled next token."""
    return bool((targets_and_weights(ex, stream_weight_vector(spec))[1] > 0).any())


def load_datasets(
    data: str,
    tokenizer,
    spec: StreamSpec,
    vocab_size: int,
    options: Optional[DataOptions] = None,
    stream_weights: Optional[Dict] = None,
    splits: Sequence[str] = SPLITS,
    log=print,
) -> Dict[str, Optional[StreamDataset]]:
    """``{split: dataset or None}`` for ``{train,valid,test}.jsonl`` in ``data``."""
    folder = Path(data)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--data must be a folder with train.jsonl/valid.jsonl/test.jsonl, got {data}."
        )
    check_tokenizer_fits(tokenizer, vocab_size)
    options = options or DataOptions()
    builder = ExampleBuilder(tokenizer, spec, vocab_size, options)
    weights = stream_weight_vector(spec, stream_weights)
    out: Dict[str, Optional[StreamDataset]] = {}
    for split in splits:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            out[split] = None
            continue
        examples, report = load_jsonl(path, builder, options.skip_invalid)
        if report.skipped:
            log(
                f"[WARNING] Skipped {len(report.skipped)} invalid line(s) of {path}; "
                f"first: {report.skipped[0]}"
            )
        if not examples:
            raise DataError(f"{path}: no valid examples.")
        out[split] = StreamDataset(examples, weights)
    return out

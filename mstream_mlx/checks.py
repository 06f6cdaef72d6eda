# Copyright © 2026 mstream-mlx contributors.
"""Checks of what users hand us that have no better home: numbers from flags,
prefill-rows tables, and checkpoint files (safetensors headers, config.json, shard
indexes) read before anything is built.  Each raises one ``ValueError`` (or
``FileNotFoundError``) whose message names the culprit; docs/checks.md lists what
is checked where.  Token ids are checked in ``vocab.py``, channels in ``streams.py``.
"""

import json
import math
import numbers
import re
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

# A safetensors header is JSON describing the tensors; real ones are a few MB at most.
MAX_HEADER_BYTES = 100 * 2**20


def number(
    flag: str,
    value,
    low: Optional[float] = None,
    high: Optional[float] = None,
    *,
    above: bool = False,
):
    """``value`` when it is a finite number in range (``low`` excluded when
    ``above``), else one ``ValueError`` naming ``flag``.  ``None`` passes."""
    if value is None:
        return value
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)  # numbers.Real: numpy scalars pass too
    if ok and low is not None:
        ok = value > low if above else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        rng = []
        if low is not None:
            rng.append(f"{'>' if above else '>='} {low:g}")
        if high is not None:
            rng.append(f"<= {high:g}")
        want = " and ".join(rng)
        raise ValueError(
            f"{flag} must be a finite number{' ' + want if want else ''}, got {value}."
        )
    return value


def check_table(rows: Any, what: str = "Prefill rows") -> None:
    """A prefill-rows table: a list (or array) of rows, each a list of token ids
    (ints) or words (strings)."""
    import numpy as np

    seq = (list, tuple, np.ndarray)
    if not isinstance(rows, seq):
        raise ValueError(
            f"{what} must be a list of rows (lists of ids or words), got "
            f"{type(rows).__name__}."
        )
    for r, row in enumerate(rows):
        if not isinstance(row, seq):
            raise ValueError(
                f"{what}: row {r} must be a list of ids or words, got {row!r:.40}."
            )
        for c, cell in enumerate(row):
            if isinstance(cell, bool) or not isinstance(cell, (numbers.Integral, str)):
                raise ValueError(
                    f"{what}: row {r} cell {c} is {cell!r:.40}; expected a token id "
                    "or a word."
                )


def read_json(path: Path, what: str) -> Any:
    """A JSON file's content, or one ``ValueError`` naming the file (a folder, a
    missing file, invalid UTF-8 or invalid JSON)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a JSON file.")
    if not path.is_file():
        raise FileNotFoundError(f"No {what} file at {path}.")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not valid UTF-8 (byte {e.start}).") from e
    except RecursionError as e:
        raise ValueError(f"{what} {path} is nested too deeply.") from e
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{what} {path}:{e.lineno}: invalid JSON ({e.msg})."
        ) from e


# flag -> (low, high, low excluded) for the sampling flags generate, chat and server share
SAMPLING_FLAGS = {
    "temp": (0, None, False),
    "top_p": (0, 1, True),
    "top_k": (0, None, False),
    "min_p": (0, 1, False),
    "repetition_penalty": (0, None, False),
    "presence_penalty": (None, None, False),
}


def sampling_flags(**values) -> None:
    """Check sampling flags by their Python names (``temp=...``) before anything
    loads; the message names the flag (``--temp``)."""
    for name, value in values.items():
        low, high, above = SAMPLING_FLAGS[name]
        number("--" + name.replace("_", "-"), value, low, high, above=above)


# ------------------------------------------------------------------ checkpoints
def inside(folder: Path, name: str, source: str) -> Path:
    """``folder / name`` when ``name`` (from ``source``, e.g. a shard index) names a
    file inside ``folder``; one ``ValueError`` for ``../x``, absolute paths, or a
    symlink that leads out of the folder (into the Hugging Face cache's ``blobs``
    beside a snapshot folder is inside: that is how the cache stores files)."""
    folder = Path(folder)
    path = folder / name
    roots = [folder.resolve()]
    if roots[0].parent.name == "snapshots":
        roots.append(roots[0].parent.parent / "blobs")
    real = path.resolve()
    if (
        Path(name).is_absolute()
        or ".." in Path(name).parts
        or not any(r in real.parents for r in roots)
    ):
        raise ValueError(
            f"{source} names {name!r}, which leads outside {folder} "
            f"({real}); a checkpoint's files must be inside its folder."
        )
    return path


def shard_names(weight_map: Any, index: Path) -> list:
    """The shard file names of an index's ``weight_map`` (a JSON object of
    tensor name -> file name)."""
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise ValueError(
            f"{index} is not a valid weight index: weight_map must map tensor names "
            f"to file names, got {type(weight_map).__name__}."
        )
    return sorted(set(weight_map.values()))


def safetensors_header(path: Path) -> Dict[str, Any]:
    """The JSON header of a safetensors file, read without loading tensors; one
    ``ValueError`` naming the file when it is truncated, claims an impossible
    length, or is not the JSON object of tensors the format defines."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (only {size} bytes).")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(
                f"{path} is not a safetensors file: its header claims {n} bytes and "
                f"the file has {size}."
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not a safetensors file (its header is not JSON).") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not an object).")
    for k, v in header.items():
        if k == "__metadata__":
            continue
        shape = v.get("shape") if isinstance(v, dict) else None
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"{path}: tensor {k!r} has no valid shape in the header.")
    return header


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken")


def check_tokenizer_files(folder: Path) -> None:
    """One ``FileNotFoundError`` when ``folder`` has no tokenizer file (transformers
    would build an empty tokenizer from config.json alone, which encodes all to [])."""
    if not any(next(Path(folder).glob(p), None) for p in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"No tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)}); copy "
            "the base model's tokenizer files next to the weights."
        )


# config.json entries every family reads: positive integers when present
POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "num_channels",
)
POSITIVE_NUMBERS = ("rope_theta", "rms_norm_eps")
NULLABLE = ("num_key_value_heads", "intermediate_size", "head_dim")  # mlx-lm defaults
LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # any prefix: model., language_model.model.


def check_config(
    config: Any, shapes: Dict[str, Tuple[int, ...]], folder: Path, vocab: bool = True
) -> None:
    """``config.json`` checked against itself and the tensors on disk, before
    anything is built: a JSON object, positive integer sizes, and no more layers or
    vocabulary rows than the weights hold (``num_hidden_layers: 200000`` would
    otherwise build 200000 layers before failing).  ``vocab=False``: a vocab_size
    that disagrees with the table is allowed (convert warns: the tensor wins)."""
    f = Path(folder) / "config.json"
    if not isinstance(config, dict):
        raise ValueError(f"{f} must hold a JSON object, got {type(config).__name__}.")
    text = config.get("text_config", {})
    if not isinstance(text, dict):
        raise ValueError(f"{f}: text_config must be an object, got {type(text).__name__}.")
    for entries, prefix in ((config, ""), (text, "text_config.")):
        for k in POSITIVE_INTS:
            v = entries.get(k)
            if v is None and k in NULLABLE:
                continue
            if k in entries and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{f}: {prefix}{k} must be a positive integer, got {v!r}.")
        for k in POSITIVE_NUMBERS:
            v = entries.get(k)
            if k in entries and not (
                isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and v > 0
            ):
                raise ValueError(f"{f}: {prefix}{k} must be a positive number, got {v!r}.")
        v = entries.get("tie_word_embeddings")
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{f}: {prefix}tie_word_embeddings must be true or false, got {v!r}.")
    archs = config.get("architectures")
    if archs is not None and not (
        isinstance(archs, list) and all(isinstance(a, str) for a in archs)
    ):
        raise ValueError(f"{f}: architectures must be a list of class names, got {archs!r:.60}.")
    if not isinstance(config.get("model_type", ""), str):
        raise ValueError(f"{f}: model_type must be a string, got {config['model_type']!r:.60}.")
    check_multistream(config.get("multistream"), f)
    facts = {**config, **text}
    layers = {int(m.group(1)) for k in shapes for m in [LAYER_KEY.search(k)] if m}
    n = facts.get("num_hidden_layers")
    if shapes and n is not None and n > len(layers):
        raise ValueError(
            f"{f} says num_hidden_layers {n} but the weights in {folder} hold "
            f"{len(layers)} layers."
        )
    rows = next((v[0] for k, v in shapes.items() if k.endswith("embed_tokens.weight") and v), None)
    v = facts.get("vocab_size")
    if vocab and v is not None and rows is not None and v != rows:
        raise ValueError(
            f"{f} says vocab_size {v} but the embedding table in {folder} has {rows} rows."
        )


def check_multistream(ms: Any, f: Path) -> None:
    """The types of config.json's ``multistream`` entry (values: ``StreamSpec``)."""
    if ms is None:
        return
    if not isinstance(ms, dict):
        raise ValueError(f"{f}: multistream must be an object, got {type(ms).__name__}.")

    def bad(key: str, want: str):
        raise ValueError(f"{f}: multistream.{key} must be {want}, got {ms[key]!r:.60}.")

    def ints(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if "layout" in ms and not isinstance(ms["layout"], str):
        bad("layout", "a string")
    names = ms.get("channel_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) for n in names)
    ):
        bad("channel_names", "a list of names")
    inputs = ms.get("input_channels")
    if inputs is not None and not (isinstance(inputs, list) and all(ints(c) for c in inputs)):
        bad("input_channels", "a list of channel ids")
    sil = ms.get("silence_token_id")
    if sil is not None and not (ints(sil) and sil >= 0):
        bad("silence_token_id", "a token id")
    for key in ("rows_options", "blocks_options"):
        if ms.get(key) is not None and not isinstance(ms[key], dict):
            bad(key, "an object")


def check_outputs(multistream: Dict[str, Any], num_channels: int, source: str) -> None:
    """A multi-stream model needs an output stream: refuse one whose every channel
    is an input (it would convert, then fail in generate)."""
    inputs = set(multistream.get("input_channels") or [])
    if num_channels <= len(inputs & set(range(num_channels))):
        names = multistream.get("channel_names") or []
        raise ValueError(
            f"{source} has no output stream: its {num_channels} channel(s) "
            f"({', '.join(map(str, names))}) are all inputs, so it has nothing to "
            "generate; a rows model needs User plus at least one output stream."
        )


def utf8_path(flag: str, path) -> Path:
    """``path`` when its name can be written as UTF-8 (MLX's writers abort with
    ``std::bad_cast`` otherwise), else one ``ValueError`` naming ``flag``."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{flag} {str(path).encode('utf-8', 'replace').decode()} is not a valid "
            "UTF-8 name; choose another."
        ) from e
    return Path(path)


def read_stdin(flag: str) -> str:
    """All of stdin as text, or one ``ValueError`` naming ``flag`` when it is not
    valid UTF-8."""
    import sys

    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag}: stdin is not valid UTF-8 (byte {e.start}).") from e


def is_text(line: str) -> bool:
    """False for a line read with ``errors="surrogateescape"`` that held bytes that
    are not UTF-8."""
    try:
        line.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False

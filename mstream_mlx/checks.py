# Copyright © 2026 mstream-mlx contributors.
"""Checks of what users hand us that have no better home: numbers from flags,
prefill-rows tables, and checkpoint files (safetensors headers, config.json, shard
indexes) read before anything is built.  Each raises one ``ValueError`` (or
``FileNotFoundError``) whose message names the culprit; docs/checks.md lists what
is checked where.  Token ids are checked in ``vocab.py``, channels in ``streams.py``.
"""

import json
import math
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
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
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
    """A prefill-rows table: a list of rows, each a list of token ids (ints) or
    words (strings)."""
    if not isinstance(rows, (list, tuple)):
        raise ValueError(
            f"{what} must be a list of rows (lists of ids or words), got "
            f"{type(rows).__name__}."
        )
    for r, row in enumerate(rows):
        if not isinstance(row, (list, tuple)):
            raise ValueError(
                f"{what}: row {r} must be a list of ids or words, got {row!r:.40}."
            )
        for c, cell in enumerate(row):
            if isinstance(cell, bool) or not isinstance(cell, (int, str)):
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

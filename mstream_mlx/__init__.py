# Copyright © 2026 mstream-mlx contributors.
"""mstream-mlx: multi-stream LLMs (Su, Yang, Li, Geiping 2026) on MLX."""

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The names below are imported on first use (PEP 562), so `mstream-mlx --help` and
# `mstream-mlx version` never pay for MLX, mlx-lm and transformers (docs/linux.md).
_HOMES = {
    "StepEvent": "events",
    "generate": "generate",
    "stream_generate": "generate",
    "stream_mask": "mask",
    "load_prompt_cache": "prompt_cache",
    "save_prompt_cache": "prompt_cache",
    "SamplingSettings": "sample",
    "BlocksOptions": "schedules",
    "RowsOptions": "schedules",
    "Session": "session",
    "Block": "streams",
    "ChatTokens": "streams",
    "Flat": "streams",
    "StreamSpec": "streams",
    "blocks_to_flat": "streams",
    "chat_blocks": "streams",
    "rows_to_flat": "streams",
    "load": "utils",
}
__all__ = ["__version__", *_HOMES]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'mstream_mlx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_HOMES])


class _Package(types.ModuleType):
    """Keeps ``mstream_mlx.generate`` the function: a first import of the submodule
    ``mstream_mlx.generate`` binds the package's attribute to that module."""

    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType):
            value = value.generate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .events import StepEvent
    from .generate import generate, stream_generate
    from .mask import stream_mask
    from .prompt_cache import load_prompt_cache, save_prompt_cache
    from .sample import SamplingSettings
    from .schedules import BlocksOptions, RowsOptions
    from .session import Session
    from .streams import (
        Block,
        ChatTokens,
        Flat,
        StreamSpec,
        blocks_to_flat,
        chat_blocks,
        rows_to_flat,
    )
    from .utils import load

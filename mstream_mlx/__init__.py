# Copyright © 2026 mstream-mlx contributors.
"""mstream-mlx: multi-stream LLMs (Su, Yang, Li, Geiping 2026) on MLX."""

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

__version__ = "0.1.0"

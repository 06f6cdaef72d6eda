"""Independent PyTorch reference implementation of multi-stream models (for parity tests)."""

from .checkpoint import random_state_dict, write_reference_checkpoint
from .loops import (
    BlocksResult,
    Feed,
    RowsResult,
    blocks_generate,
    blocks_prefill_layout,
    blocks_step_feed,
    rows_feed,
    rows_generate,
    rows_ramp,
    rows_user_cell,
)
from .torch_model import RefCache, RefConfig, RefModel, reference_device, stream_mask

__all__ = [
    "BlocksResult",
    "Feed",
    "RefCache",
    "RefConfig",
    "RefModel",
    "RowsResult",
    "blocks_generate",
    "blocks_prefill_layout",
    "blocks_step_feed",
    "random_state_dict",
    "reference_device",
    "rows_feed",
    "rows_generate",
    "rows_ramp",
    "rows_user_cell",
    "stream_mask",
    "write_reference_checkpoint",
]

# Copyright © 2026 mstream-mlx contributors.
"""One file per model family, named after the HF ``model_type`` (as in mlx-lm)."""

import importlib
from typing import Tuple, Type

SUPPORTED = ("qwen2", "qwen3", "qwen3_5")
# model_types that share a file (HF text-only and MoE variants of Qwen3.5)
ALIASES = {
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe": "qwen3_5",
    "qwen3_5_moe_text": "qwen3_5",
}


def get_model_classes(config: dict) -> Tuple[Type, Type]:
    """``(Model, ModelArgs)`` for a config's ``model_type``."""
    model_type = ALIASES.get(config.get("model_type"), config.get("model_type"))
    if model_type not in SUPPORTED:
        raise ValueError(
            f"Model type {model_type!r} is not supported by mstream-mlx "
            f"(supported: {', '.join(SUPPORTED + tuple(ALIASES))})."
        )
    module = importlib.import_module(f"{__name__}.{model_type}")
    return module.Model, module.ModelArgs

# Copyright © 2026 mstream-mlx contributors.
"""Checkpoint converters (installed as ``mstream_mlx.convert``): PyTorch checkpoints
to MLX folders (:func:`convert`) and back (:func:`export`); torch is needed only
for ``pytorch_model*.bin`` sources."""

from .hf_to_mlx import convert
from .mlx_to_torch import export

__all__ = ["convert", "export"]

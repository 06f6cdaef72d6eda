# Copyright © 2026 mstream-mlx contributors.
"""Qwen2 multi-stream model (paper §6): the Qwen3 file with q/k/v biases and no QK-norm."""

from dataclasses import dataclass
from typing import ClassVar

from . import qwen3


@dataclass
class ModelArgs(qwen3.ModelArgs):
    qk_norm: ClassVar[bool] = False
    qkv_bias: ClassVar[bool] = True


class Model(qwen3.Model):
    pass

# Copyright © 2026 mstream-mlx contributors.
"""Qwen2 multi-stream model (paper §6): the Qwen3 file with q/k/v biases and no QK-norm."""

from dataclasses import dataclass
from typing import ClassVar

from ..streams import BLOCKS, ROWS
from . import qwen3
from .base import Family

FAMILY = Family(
    name="qwen2",
    model_types=("qwen2",),
    architectures={"Qwen2ForMultiStream": BLOCKS, "Qwen2ForCausalLM": None},
    saved_architectures={BLOCKS: "Qwen2ForMultiStream", ROWS: "Qwen2ForCausalLM"},
    sections={BLOCKS: "§6", ROWS: "§7"},
)


@dataclass
class ModelArgs(qwen3.ModelArgs):
    qk_norm: ClassVar[bool] = False
    qkv_bias: ClassVar[bool] = True


class Model(qwen3.Model):
    pass

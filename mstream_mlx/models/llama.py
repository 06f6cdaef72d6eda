# Copyright © 2026 mstream-mlx contributors.
"""Llama multi-stream model: mlx-lm's llama (weight names, MLP, biases) on the shared
stream stack, with Llama 3's RoPE scaling at each token's timestep.

The paper trains Qwen models only; a Llama base becomes a multi-stream model the
same way (a new channel table, RoPE at ``y``, the stream mask) and is fine-tuned
with ``lora``.  Its default layout is rows: the blocks layout builds its prompts
from Qwen's chat tokens (``<|im_start|>`` ...), which a Llama tokenizer lacks.
"""

from dataclasses import dataclass
from typing import ClassVar, List, Optional

import mlx.nn as nn
from mlx_lm.models.llama import MLP

from ..streams import BLOCKS, ROWS
from . import qwen3
from .base import Family

FAMILY = Family(
    name="llama",
    model_types=("llama",),
    architectures={"LlamaForCausalLM": None, "LlamaForMultiStream": BLOCKS},
    saved_architectures={ROWS: "LlamaForCausalLM", BLOCKS: "LlamaForMultiStream"},
    layouts=(ROWS, BLOCKS),
)


@dataclass
class ModelArgs(qwen3.ModelArgs):
    """Qwen3's arguments (HF names, stream facts, ``rope_parameters`` unpacked) plus
    Llama's own fields."""

    max_position_embeddings: Optional[int] = None
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_traditional: bool = False
    layer_types: Optional[List[str]] = None
    sliding_window: Optional[int] = None
    tie_word_embeddings: bool = True  # mlx-lm's llama default

    qk_norm: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        if self.rope_traditional:
            raise ValueError(
                "rope_traditional (interleaved RoPE) is not supported for Llama "
                "multi-stream models; HF Llama checkpoints rotate halves."
            )
        if any(t != "full_attention" for t in self.layer_types or []):
            raise ValueError(
                "Sliding-window layers are not supported for Llama multi-stream "
                f"models, got layer_types {self.layer_types}."
            )

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias


class Attention(qwen3.Attention):
    """The Qwen3 stream attention with Llama's projections (no QK-norm; with
    ``attention_bias`` every projection, o_proj included, has a bias)."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        if args.attention_bias:
            self.o_proj = nn.Linear(
                self.n_heads * args.head_dim, args.hidden_size, bias=True
            )


class TransformerBlock(qwen3.TransformerBlock):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.self_attn = Attention(args)
        self.mlp = MLP(args)  # mlx-lm's Llama MLP (mlp_bias)


class LlamaModel(qwen3.Qwen3Model):
    block = TransformerBlock


class Model(qwen3.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args, LlamaModel)

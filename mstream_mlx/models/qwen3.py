# Copyright © 2026 mstream-mlx contributors.
"""Qwen3 multi-stream model: mlx-lm's qwen3 with a channel embedding, RoPE at each
token's timestep and the block-causal stream mask (paper §5 and §7)."""

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.qwen3 import MLP

from ..attention import StreamRoPE, stream_attention
from ..streams import BLOCKS, ROWS
from .base import Family, StreamModel, stream_inputs

FAMILY = Family(
    name="qwen3",
    model_types=("qwen3",),
    # how the reference code names its classes (paper §5: blocks; §7 Stream-8B: a
    # stock class name plus num_channels)
    architectures={"Qwen3ForMultiStream": BLOCKS, "Qwen3ForCausalLM": None},
    saved_architectures={BLOCKS: "Qwen3ForMultiStream", ROWS: "Qwen3ForCausalLM"},
    sections={BLOCKS: "§5", ROWS: "§7"},
)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: Optional[int] = None  # positions trained on
    tie_word_embeddings: bool = False
    rope_theta: Optional[float] = None
    rope_scaling: Optional[Dict[str, Union[float, str]]] = None
    rope_parameters: Optional[dict] = None
    num_channels: int = 0
    role_gating_enabled: bool = False
    multistream: Optional[dict] = None

    qk_norm: ClassVar[bool] = True
    qkv_bias: ClassVar[bool] = False

    def __post_init__(self):
        # transformers >= 5 nests rope_theta and rope_scaling under rope_parameters.
        if self.rope_parameters:
            self.rope_theta = self.rope_theta or self.rope_parameters.get("rope_theta")
            self.rope_scaling = self.rope_scaling or self.rope_parameters
        if self.rope_theta is None:
            raise ValueError("rope_theta is missing from the model config.")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {self.num_channels}.")
        if self.role_gating_enabled:
            raise ValueError(
                "This checkpoint enables role gating (role_gating_enabled: true), "
                "which mstream-mlx does not implement."
            )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.scale = hd**-0.5
        bias = args.qkv_bias
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=False)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)

    def __call__(self, x, rope, mask, cache=None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q), rope(k)  # (B, H | Hkv, L, D)
        v = v.transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = stream_attention(q, k, v, cache, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(
            args.hidden_size, eps=args.rms_norm_eps
        )

    def __call__(self, x, rope, mask, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    block = TransformerBlock  # a family with the same stack but other blocks swaps it

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.channel_embedding = nn.Embedding(args.num_channels, args.hidden_size)
        self.layers = [self.block(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.rope = StreamRoPE(args.head_dim, args.rope_theta, args.rope_scaling)

    def __call__(self, inputs, channels, positions, cache=None, mask=None) -> mx.array:
        h, rope, mask, cache = stream_inputs(
            self, inputs, channels, positions, cache, mask
        )
        for layer, c in zip(self.layers, cache):
            h = layer(h, rope, mask, c)
        return self.norm(h)


class Model(StreamModel):
    def __init__(self, args: ModelArgs, backbone: type = Qwen3Model):
        super().__init__(args, backbone)

    def shard(self, group: Optional[mx.distributed.Group] = None):
        """Split every layer over ``group`` for tensor-parallel inference (mlx-lm's
        scheme): q/k/v and gate/up keep 1/N of their output rows, o/down 1/N of their
        input columns and all-sum their result, so each rank holds 1/N of the layer
        weights and of the KV cache.  The stream mask, per-token RoPE and
        :class:`StreamKVCache` act per head, so they need no change; the token and
        channel embeddings and the LM head stay whole on every rank.  Load with
        ``lazy=True`` and shard before the first eval to read only this rank's part.
        """
        if not all(isinstance(layer, TransformerBlock) for layer in self.layers):
            # qwen3_5 inherits this class; its DeltaNet layers split differently
            raise NotImplementedError(
                f"shard() supports Qwen3 and Qwen2 multi-stream models, not "
                f"{self.model_type!r}."
            )
        group = group or mx.distributed.init()
        N = group.size()
        a = self.args
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if getattr(a, name) % N:
                raise ValueError(
                    f"Cannot shard over {N} processes: {name} ({getattr(a, name)}) "
                    "is not divisible by it."
                )
        cut, join = "all-to-sharded", "sharded-to-all"  # rows out / columns in
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for module, name, kind in (
                (attn, "q_proj", cut),
                (attn, "k_proj", cut),
                (attn, "v_proj", cut),
                (attn, "o_proj", join),
                (mlp, "gate_proj", cut),
                (mlp, "up_proj", cut),
                (mlp, "down_proj", join),
            ):
                linear = shard_linear(getattr(module, name), kind, group=group)
                setattr(module, name, linear)
            layer.self_attn.n_heads //= N
            layer.self_attn.n_kv_heads //= N

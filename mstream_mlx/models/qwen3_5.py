# Copyright © 2026 mstream-mlx contributors.
"""Qwen3.5 hybrid multi-stream model (Stream-27B; paper §7; ``docs/qwen3_5.md``).

Gated DeltaNet layers with per-stream state (``deltanet.py``) and, every
``full_attention_interval``-th layer, gated full attention with (1+w) q/k norms and
partial RoPE at row positions under the block-causal stream mask.  Rows layout only:
every call carries whole rows, channels 0..C-1 in order.  The MoE variant
(Qwen3.5-MoE) reuses mlx-lm's sparse block.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3_5 as lm_qwen3_5
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.gated_delta import compute_g, normalize_qk
from mlx_lm.models.qwen3_next import Qwen3NextMLP as MLP
from mlx_lm.models.qwen3_next import Qwen3NextSparseMoeBlock as SparseMoeBlock

from ..attention import StreamRoPE, stream_attention
from ..cache import StreamKVCache
from ..deltanet import (
    BLOCK_CAUSAL,
    CONV_MODES,
    DELTA_MODES,
    DeltaNetCache,
    block_causal_delta,
    deltanet_facts,
    check_rows,
    check_whole_rows,
    column_conv,
    from_columns,
    to_columns,
)
from ..streams import ROWS
from . import qwen3
from .base import Family, stream_inputs

# Stream facts live at the top of config.json even when the model nests a text_config.
STREAM_KEYS = (
    "num_channels",
    "multistream",
    "role_gating_enabled",
    "deltanet_block_causal",
    "deltanet_conv",
)
# (1+w) norms: PyTorch stores w, MLX stores 1+w. Never channel_embedding or
# linear_attn.norm, which are plain gains.
ONE_PLUS_NORMS = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
)
DROPPED_PREFIXES = ("mtp.", "model.mtp.", "model.visual.", "vision_tower.")
def is_one_plus_norm(key: str) -> bool:
    """A norm that PyTorch stores as w and MLX as 1 + w."""
    return key.endswith(ONE_PLUS_NORMS) or key == "model.norm.weight"


def reference_weights(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """The inverse of :meth:`Model.sanitize` (MLX layout -> reference layout)."""
    out = {}
    for k, v in weights.items():
        if k.endswith("conv1d.weight"):
            v = v.moveaxis(1, 2)  # (D, K, 1) -> (D, 1, K)
        elif is_one_plus_norm(k):
            v = v.astype(mx.float32) - 1.0
        out[k] = v
    # stacked experts -> the fused layout of transformers >= 5 (gate rows, then up)
    for k in [k for k in out if k.endswith(".switch_mlp.gate_proj.weight")]:
        p = k.removesuffix(".switch_mlp.gate_proj.weight")
        up = out.pop(f"{p}.switch_mlp.up_proj.weight")
        out[f"{p}.experts.gate_up_proj"] = mx.concatenate([out.pop(k), up], axis=1)
        out[f"{p}.experts.down_proj"] = out.pop(f"{p}.switch_mlp.down_proj.weight")
    return out


FAMILY = Family(
    name="qwen3_5",
    # HF text-only and MoE variants share this file
    model_types=("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"),
    architectures={
        "StreamQwen3_5ForCausalLM": ROWS,  # the reference's Stream-27B class
        "StreamQwen3_5MoeForCausalLM": ROWS,  # its Qwen3.5-MoE (35B-A3B) class
        "Qwen3_5ForCausalLM": None,
        "Qwen3_5ForConditionalGeneration": None,
        "Qwen3_5MoeForCausalLM": None,
        "Qwen3_5MoeForConditionalGeneration": None,
    },
    saved_architectures={ROWS: "StreamQwen3_5ForCausalLM"},
    # the reference saves its MoE model under a class of its own
    variant_architectures={
        t: {ROWS: "StreamQwen3_5MoeForCausalLM"}
        for t in ("qwen3_5_moe", "qwen3_5_moe_text")
    },
    layouts=(ROWS,),
    sections={ROWS: "§7"},
    layout_note=" (its DeltaNet state runs row by row)",
    to_reference=reference_weights,
    # (1+w) - 1 is exact in float32, so MLX -> PyTorch -> MLX is bit-exact
    keep_fp32=is_one_plus_norm,
    extra_facts=deltanet_facts,
)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    # dense MLP width; a Qwen3.5-MoE config has none (every layer is sparse)
    intermediate_size: Optional[int] = None
    rms_norm_eps: float = 1e-6
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: Optional[int] = None  # positions trained on
    linear_num_value_heads: int = 32
    linear_num_key_heads: int = 16
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    full_attention_interval: int = 4
    layer_types: Optional[List[str]] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_theta: Optional[float] = None
    partial_rotary_factor: Optional[float] = None
    rope_parameters: Optional[dict] = None
    # Qwen3.5-MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    # multi-stream; the DeltaNet defaults are the reference code's (docs/qwen3_5.md)
    num_channels: int = 0
    multistream: Optional[dict] = None
    role_gating_enabled: bool = False
    deltanet_block_causal: str = BLOCK_CAUSAL
    deltanet_conv: str = "column"
    mlp_only_layers: List[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        # A Qwen3.5 VL-style config nests the language model under text_config.
        merged = {**params, **(params.get("text_config") or {})}
        merged.update({k: params[k] for k in STREAM_KEYS if k in params})
        return super().from_dict(merged)

    def __post_init__(self):
        rope = self.rope_parameters or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"RoPE type {kind!r} is not supported for Qwen3.5.")
        # mRoPE with (row, row, row) ids is exactly partial RoPE at y.
        self.rope_theta = self.rope_theta or rope.get("rope_theta")
        if self.rope_theta is None:
            raise ValueError("rope_theta is missing from the model config.")
        self.partial_rotary_factor = self.partial_rotary_factor or rope.get(
            "partial_rotary_factor", 0.25
        )
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = [
                "full_attention"
                if (i + 1) % self.full_attention_interval == 0
                else "linear_attention"
                for i in range(self.num_hidden_layers)
            ]
        bad = set(self.layer_types) - {"full_attention", "linear_attention"}
        if len(self.layer_types) != self.num_hidden_layers or bad:
            raise ValueError(
                f"layer_types must list {self.num_hidden_layers} entries of "
                f"'linear_attention'/'full_attention', got {self.layer_types}."
            )
        dense = self.num_experts == 0 or bool(self.mlp_only_layers)
        if dense and not self.intermediate_size:
            raise ValueError(
                "intermediate_size is missing from the model config (the dense MLP "
                "layers need it)."
            )
        if self.num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {self.num_channels}.")
        if self.deltanet_conv not in CONV_MODES:
            raise ValueError(
                f"deltanet_conv {self.deltanet_conv!r} is not supported; mstream-mlx "
                f"implements 'column' only (row_boundary and standard let a token's "
                f"conv read its row-mates)."
            )
        if self.deltanet_block_causal not in DELTA_MODES:
            raise ValueError(
                f"deltanet_block_causal {self.deltanet_block_causal!r} is not "
                f"supported; expected one of {', '.join(DELTA_MODES)} ('standard' "
                f"lets a token read its row-mates)."
            )
        if self.role_gating_enabled:
            raise ValueError(
                "This checkpoint enables role gating (role_gating_enabled: true), "
                "which mstream-mlx does not implement."
            )
        layout = (self.multistream or {}).get("layout", ROWS)
        if layout != ROWS:
            raise ValueError(
                f"Qwen3.5 multi-stream models use the rows layout (their DeltaNet "
                f"state runs row by row), got layout {layout!r}."
            )


class Attention(nn.Module):
    """Gated full attention: q_proj is 2x wide (per head: query, then output gate)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.scale = hd**-0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * hd * 2, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=bias)
        self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)

    def __call__(self, x, rope, mask, cache=None) -> mx.array:
        B, L, _ = x.shape
        q, gate = mx.split(self.q_proj(x).reshape(B, L, self.n_heads, -1), 2, axis=-1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        q, k = rope(self.q_norm(q)), rope(self.k_norm(k))  # (B, H | Hkv, L, D)
        v = v.transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = stream_attention(q, k, v, cache, scale=self.scale, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out * mx.sigmoid(gate.reshape(B, L, -1)))


class GatedDeltaNet(lm_qwen3_5.GatedDeltaNet):
    """mlx-lm's Qwen3.5 GatedDeltaNet (same parameters and keys) in stream mode."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.num_channels = args.num_channels
        self.block_causal = args.deltanet_block_causal == BLOCK_CAUSAL

    def __call__(self, x: mx.array, cache: Optional[DeltaNetCache] = None) -> mx.array:
        C = self.num_channels
        if not self.block_causal:
            # column conv + column state is the unmodified layer with
            # streams on the batch axis.
            out = super().__call__(to_columns(x, C), None, cache)
            return from_columns(out, C)
        B, L, _ = x.shape
        z = self.in_proj_z(x).reshape(B, L, self.num_v_heads, self.head_v_dim)
        history = None if cache is None else cache[0]
        conv, history = column_conv(self.conv1d, self.in_proj_qkv(x), C, history)
        q, k, v = mx.split(nn.silu(conv), [self.key_dim, 2 * self.key_dim], axis=-1)
        q = q.reshape(B, L, self.num_k_heads, self.head_k_dim)
        k = k.reshape(B, L, self.num_k_heads, self.head_k_dim)
        v = v.reshape(B, L, self.num_v_heads, self.head_v_dim)
        q, k = normalize_qk(q, k, inv_scale=self.head_k_dim**-0.5, eps=1e-6)
        g = compute_g(self.A_log, self.in_proj_a(x), self.dt_bias)
        beta = mx.sigmoid(self.in_proj_b(x))
        state = None if cache is None else cache[1]
        out, state = block_causal_delta(
            q, k, v, g, beta, C, state, use_kernel=not self.training
        )
        if cache is not None:
            cache[0], cache[1] = history, state
        return self.out_proj(self.norm(out, z).reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.is_linear = args.layer_types[layer_idx] == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = Attention(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(
            args.hidden_size, eps=args.rms_norm_eps
        )
        if args.num_experts > 0 and layer_idx not in args.mlp_only_layers:
            self.mlp = SparseMoeBlock(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)

    def __call__(self, x, rope, mask, cache=None) -> mx.array:
        if self.is_linear:
            r = self.linear_attn(self.input_layernorm(x), cache)
        else:
            r = self.self_attn(self.input_layernorm(x), rope, mask, cache)
        h = x + r
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3_5Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_channels = args.num_channels
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.channel_embedding = nn.Embedding(args.num_channels, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        rotary = int(args.head_dim * args.partial_rotary_factor)
        self.rope = StreamRoPE(rotary, args.rope_theta)
        full = [i for i, l in enumerate(self.layers) if not l.is_linear]
        self.fa_idx = full[0] if full else None  # whose cache builds the mask

    def __call__(self, inputs, channels, positions, cache=None, mask=None) -> mx.array:
        C = self.num_channels
        check_whole_rows(inputs.shape[1], C)
        if cache is not None:
            # Checked only with a cache: training (no cache) runs under mx.compile,
            # where the values cannot be read; its batches are row-major by make.
            check_rows(channels, positions, C, cache[0].max_y)
        h, rope, mask, cache = stream_inputs(
            self, inputs, channels, positions, cache, mask, mask_cache=self.fa_idx
        )
        for layer, c in zip(self.layers, cache):
            h = layer(h, rope, mask, c)
        return self.norm(h)


class Model(qwen3.Model):
    """The Qwen3 multi-stream model's contract on the hybrid stack: calls carry whole
    rows, row-major; a passed ``mask`` reaches the full-attention layers only."""

    def __init__(self, args: ModelArgs):
        super().__init__(args, Qwen3_5Model)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        weights = {
            k.removeprefix("language_model."): v  # a stock mlx-lm qwen3_5 folder
            for k, v in weights.items()
            if not k.startswith(DROPPED_PREFIXES)
        }
        # prefixes, reference-only keys, tied head, channel table for a base model
        weights = super().sanitize(weights)
        # PyTorch layout (conv weight [D, 1, K]) also means (1+w) norms stored as w.
        torch_layout = any(
            "conv1d.weight" in k and v.shape[-1] != 1 for k, v in weights.items()
        )
        for k, v in list(weights.items()):
            if "conv1d.weight" in k and v.shape[-1] != 1:
                weights[k] = v.moveaxis(2, 1)  # (D, 1, K) -> (D, K, 1)
            elif torch_layout and v.ndim == 1 and is_one_plus_norm(k):
                weights[k] = v + 1.0
        return self._sanitize_experts(weights)

    def _sanitize_experts(self, weights):
        """Experts as mlx-lm's ``switch_mlp`` stacks, from the fused layout of
        transformers >= 5 (the reference's parameters, as its lean-checkpoint
        converter writes them) or one tensor per expert (its ``save_pretrained``)."""
        E = self.args.num_experts
        for i in range(self.args.num_hidden_layers):
            p = f"model.layers.{i}.mlp"
            if f"{p}.experts.gate_up_proj" in weights:  # fused (transformers >= 5)
                gate_up = weights.pop(f"{p}.experts.gate_up_proj")  # (E, 2I, D)
                mid = gate_up.shape[1] // 2
                weights[f"{p}.switch_mlp.gate_proj.weight"] = gate_up[:, :mid]
                weights[f"{p}.switch_mlp.up_proj.weight"] = gate_up[:, mid:]
                weights[f"{p}.switch_mlp.down_proj.weight"] = weights.pop(
                    f"{p}.experts.down_proj"
                )
            elif f"{p}.experts.0.up_proj.weight" in weights:  # one key per expert
                for n in ("gate_proj", "up_proj", "down_proj"):
                    keys = [f"{p}.experts.{e}.{n}.weight" for e in range(E)]
                    missing = [k for k in keys if k not in weights]
                    if missing:
                        raise ValueError(
                            f"Missing tensor {missing[0]} (the config has {E} "
                            f"experts per layer)."
                        )
                    weights[f"{p}.switch_mlp.{n}.weight"] = mx.stack(
                        [weights.pop(k) for k in keys]
                    )
        return weights

    def make_cache(self) -> List[Any]:
        return [
            DeltaNetCache() if l.is_linear else StreamKVCache() for l in self.layers
        ]

    @property
    def tokens_per_row(self) -> int:
        """Every call must carry whole rows: a multiple of this many tokens."""
        return self.args.num_channels

    @property
    def quant_predicate(self):
        def predicate(path, module):
            if path.endswith("channel_embedding"):
                return False  # keep the tiny channel table exact
            if path.endswith("mlp.gate") or path.endswith("shared_expert_gate"):
                return {"group_size": 64, "bits": 8}  # as mlx-lm keeps MoE routers
            return True

        return predicate

    @property
    def cast_predicate(self):
        return lambda path: not path.endswith("A_log")  # keep the decay rate in fp32

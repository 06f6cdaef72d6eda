"""Independent PyTorch reference for multi-stream Qwen3 / Qwen2 / Llama decoders.

Written from the rules in DESIGN.md §1 (not from any other implementation): every token has a channel
``c`` and a timestep ``y``; ``h0 = embed_tokens[id] + channel_embedding[c]``; RoPE position = ``y``;
token i sees token j iff ``y_j < y_i`` or ``j == i``. Everything is plain eager math with an explicit
boolean mask so that the MLX implementation has an obvious target to be compared against.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHANNEL_KEY = "model.channel_embedding.weight"
DROPPED_KEY_PARTS = ("gate_in_norm", "role_gating", "rotary_emb.inv_freq")


def reference_device() -> torch.device:
    """`MSTREAM_REF_DEVICE` if set, else cuda when available, else cpu."""
    name = os.environ.get("MSTREAM_REF_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stream_mask(yq: Tensor, yk: Tensor, self_index: Tensor | None = None) -> Tensor:
    """The multi-stream visibility rule as a boolean mask (True = query may attend to key).

    ``visible[..., i, j] = (yk[..., j] < yq[..., i]) or (j == self_index[..., i])``

    Args:
        yq: timesteps of the queries, ``[..., Lq]``.
        yk: timesteps of the keys, ``[..., Lk]`` (cached keys first, then this call's tokens).
        self_index: key slot that holds query i itself, ``[Lq]`` or ``[..., Lq]``. Default: the
            queries are the last ``Lq`` keys (a full forward has ``Lq == Lk``, i.e. the diagonal).
    Returns:
        bool tensor ``[..., Lq, Lk]``. Same-timestep peers never see each other; the channel id
        plays no part.
    """
    lq, lk = yq.shape[-1], yk.shape[-1]
    if self_index is None:
        self_index = torch.arange(lk - lq, lk, device=yq.device)
    earlier = yk[..., None, :] < yq[..., :, None]
    is_self = torch.arange(lk, device=yq.device) == self_index[..., :, None]
    return earlier | is_self


@dataclass(frozen=True)
class RefConfig:
    """The handful of HF config fields the reference math needs."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    tie_word_embeddings: bool
    num_channels: int
    attention_bias: bool = False  # Llama: on q, k, v and o
    mlp_bias: bool = False
    rope_scaling: dict[str, Any] | None = None  # Llama 3: {"rope_type": "llama3", ...}

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> RefConfig:
        model_type = cfg.get("model_type")
        if model_type not in ("qwen3", "qwen2", "llama"):
            raise ValueError(f"Model type {model_type!r} not supported (qwen3, qwen2 or llama).")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} not supported (silu only).")
        if cfg.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported by the reference.")
        if model_type == "qwen3" and cfg.get("attention_bias"):
            raise ValueError("Qwen3 with attention_bias=True is not supported by the reference.")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3") or (kind == "llama3" and model_type != "llama"):
            raise ValueError(f"RoPE type {kind!r} not supported for {model_type}.")
        if cfg.get("rope_traditional") or (cfg.get("mlp_bias") and model_type != "llama"):
            raise ValueError("rope_traditional / mlp_bias are not supported by the reference.")
        # No silent default: a wrong theta (e.g. 1e4 instead of 1e6) would still "work".
        theta = cfg.get("rope_theta", rope.get("rope_theta"))
        if theta is None:
            raise ValueError("Config has no rope_theta (top level or rope_parameters).")
        heads = int(cfg["num_attention_heads"])
        return cls(
            model_type=model_type,
            hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_channels=int(cfg.get("num_channels", 1)),
            attention_bias=model_type == "llama" and bool(cfg.get("attention_bias")),
            mlp_bias=bool(cfg.get("mlp_bias")),
            rope_scaling=dict(rope) if kind == "llama3" else None,
        )


class RMSNorm(nn.Module):
    """HF-style RMSNorm: normalise in fp32, cast back, then scale (in that order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def llama3_inv_freq(inv_freq: Tensor, scaling: dict[str, Any]) -> Tensor:
    """Llama 3's frequency scaling: wavelengths longer than ``original / low_freq_factor``
    are stretched by ``factor``, shorter than ``original / high_freq_factor`` kept, and
    the band between blends the two linearly in ``original / wavelength``."""
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    wavelength = 2 * torch.pi / inv_freq
    blend = (original / wavelength - low) / (high - low)  # 0 at the long end, 1 at the short end
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    out = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    band = (wavelength <= original / low) & (wavelength >= original / high)
    return torch.where(band, blended, out)


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype, scaling: dict[str, Any] | None = None
) -> tuple[Tensor, Tensor]:
    """cos/sin ``[B, L, head_dim]`` for per-token positions (rotate-half layout), computed in fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x ``[B, H, L, D]``; ``x*cos + rotate_half(x)*sin`` with ``rotate_half(x) = [-x2, x1]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class RefCache:
    """Per-layer rotated keys/values plus the timestep ``y`` of every cached token."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.y: Tensor | None = None  # [B, S]

    @property
    def length(self) -> int:
        return 0 if self.y is None else int(self.y.shape[-1])

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        old_k, old_v = self.keys[layer], self.values[layer]
        self.keys[layer] = k if old_k is None else torch.cat([old_k, k], dim=2)
        self.values[layer] = v if old_v is None else torch.cat([old_v, v], dim=2)
        return self.keys[layer], self.values[layer]


class Attention(nn.Module):
    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # Qwen2: q/k/v bias, no QK-norm. Qwen3: the reverse. Llama: no QK-norm, optional bias on all four.
        bias = cfg.model_type == "qwen2" or cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.attention_bias)
        self.qk_norm = cfg.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.heads, self.kv_heads, self.head_dim = h, kv, d

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: RefCache | None, layer: int) -> Tensor:
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, length, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, length, self.kv_heads, self.head_dim)
        if self.qk_norm:  # before RoPE, over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # keys are cached already rotated, at their own y
            k, v = cache.append(layer, k, v)
        repeat = self.heads // self.kv_heads  # GQA: query head i uses kv head i // repeat
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        scores = scores.masked_fill(~mask, float("-inf"))  # every row keeps its diagonal: no NaN
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, length, self.heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: RefCache | None, layer: int) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    """Holds the `model.*` weights under their HF names."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.channel_embedding = nn.Embedding(cfg.num_channels, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class RefModel(nn.Module):
    """Multi-stream Qwen3/Qwen2/Llama decoder; ``state_dict()`` keys are exactly the HF checkpoint names."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = RefConfig.from_dict(config)
        self.model = Backbone(self.config)
        self.lm_head = None
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self) -> RefCache:
        return RefCache(self.config.num_hidden_layers)

    def forward(
        self,
        ids: Tensor,
        channels: Tensor,
        positions: Tensor,
        mask: Tensor | None = None,
        cache: RefCache | None = None,
    ) -> Tensor:
        """Logits ``[B, L, V]`` for ids/channels/positions ``[B, L]``.

        The mask (bool ``[B, 1, L, S]``, True = visible, S = cached + L) is derived from the
        positions, against the cached keys' y when a cache is given, unless passed explicitly.
        """
        b, length = ids.shape
        past_y = cache.y if cache is not None and cache.y is not None else positions[:, :0]
        key_y = torch.cat([past_y, positions], dim=-1)
        if mask is None:
            mask = stream_mask(positions, key_y)[:, None]
        if mask.dtype != torch.bool or tuple(mask.shape) not in ((b, 1, length, key_y.shape[-1]), (1, 1, length, key_y.shape[-1])):
            raise ValueError(f"mask must be bool [B,1,L,S]=[{b},1,{length},{key_y.shape[-1]}], got {mask.dtype} {tuple(mask.shape)}")
        h = self.model.embed_tokens(ids) + self.model.channel_embedding(channels)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, h.dtype, self.config.rope_scaling)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, mask, cache, i)
        if cache is not None:
            cache.y = key_y
        h = self.model.norm(h)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> RefModel:
        """Load an HF-style folder (safetensors, sharded safetensors, or pytorch_model*.bin).

        ``num_channels`` comes from the shape of ``model.channel_embedding.weight`` (config.json
        may lack it or be wrong); a checkpoint without that key gets a zero table, i.e. plain Qwen.
        """
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        weights = sanitize_weights(load_weights(folder))
        if "model.embed_tokens.weight" not in weights:
            raise ValueError(f"No model.embed_tokens.weight in {folder}")
        config["vocab_size"] = weights["model.embed_tokens.weight"].shape[0]
        if CHANNEL_KEY in weights:
            config["num_channels"] = weights[CHANNEL_KEY].shape[0]
        else:
            config.setdefault("num_channels", 1)
            weights[CHANNEL_KEY] = torch.zeros(config["num_channels"], weights["model.embed_tokens.weight"].shape[1])
        model = cls(config)
        if model.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        elif "lm_head.weight" not in weights:
            raise ValueError(f"{folder}: tie_word_embeddings is false but lm_head.weight is missing")
        model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
        return model.to(device=device or reference_device(), dtype=dtype).eval()


def load_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of an HF folder, whichever of the four layouts it uses."""
    from safetensors.torch import load_file

    files: list[Path]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        single = folder / index_name.replace(".index.json", "")
        if single.exists():
            files = [single]
            break
        if (folder / index_name).exists():
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            files = [folder / name for name in sorted(set(weight_map.values()))]
            break
    else:
        files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"No model*.safetensors or pytorch_model*.bin in {folder}")
    weights: dict[str, Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            weights.update(load_file(str(path)))
        else:
            weights.update(torch.load(path, map_location="cpu", weights_only=True))
    return weights


def sanitize_weights(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop unused role-gating params and map a ``model.language_model.`` prefix to ``model.``."""
    out: dict[str, Tensor] = {}
    for key, value in weights.items():
        if any(part in key for part in DROPPED_KEY_PARTS):
            continue
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model.") :]
        out[key] = value
    return out

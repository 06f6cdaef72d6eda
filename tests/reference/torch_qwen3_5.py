"""Independent PyTorch reference for Qwen3.5 hybrid multi-stream models (rows layout).

Written from the rules of ``docs/qwen3_5.md`` (paper §7): partial RoPE at row positions,
block-causal gated full attention, Gated DeltaNet in stream mode and the checkpoint keys, not
from any other implementation. Everything is eager fp32-friendly math with naive per-token loops, so it is
slow but obvious:

* a token is (channel c, row y); the flat sequence is row-major, ``i = r*C + c``;
* full attention: token i sees j iff ``y_j < y_i`` or ``j == i`` (``torch_model.stream_mask``);
* DeltaNet conv (``deltanet_conv: column``): ``out[r, c] = sum_k w[K-1-k] x[r-k, c]``;
* DeltaNet rule, state ``S`` ``[Dk, Dv]``, per token: ``S~ = exp(g) S``,
  ``d = beta (v - S~^T k)``, then
  - ``column``: one ``S`` per stream, ``S = S~ + k d^T``, ``o = S^T q``;
  - ``block_causal``: every token of row r forks from the state after all earlier rows,
    ``o = S~^T q + (q.k) d``; the state then advances over the row in channel order;
* MoE MLP (Qwen3.5-MoE, every layer): softmax over E router logits, the top-k probabilities
  renormalised to sum 1 weight k SwiGLU experts, plus one shared SwiGLU expert scaled by
  ``sigmoid(shared_expert_gate(x))``. Checkpoints store the experts fused (``gate_up_proj``
  ``[E, 2I, D]``, ``down_proj`` ``[E, D, I]``) or one tensor per expert (``save_pretrained``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .torch_model import load_weights, rope_cos_sin, sanitize_weights, stream_mask

COLUMN, BLOCK_CAUSAL = "column", "block_causal"
CHANNEL_KEY = "model.channel_embedding.weight"
STREAM_KEYS = ("num_channels", "deltanet_block_causal", "deltanet_conv")


# ------------------------------------------------------------------------------------ the rule
def delta_step(S: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the upstream gated delta rule. S ``[B,H,Dk,Dv]``; q, k ``[B,H,Dk]`` (q scaled);
    v ``[B,H,Dv]``; g (log-decay), beta ``[B,H]``. Returns (o ``[B,H,Dv]``, new S)."""
    S = torch.exp(g)[..., None, None] * S
    delta = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", S, k))
    S = S + k[..., :, None] * delta[..., None, :]
    return torch.einsum("bhkv,bhk->bhv", S, q), S


def _prep(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor):
    """fp32, q scaled by Dk^-0.5 (the rule's readout scale)."""
    f = lambda t: t.float()  # noqa: E731
    return f(q) * q.shape[-1] ** -0.5, f(k), f(v), f(g), f(beta)


def delta_vanilla(q, k, v, g, beta, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Upstream causal rule over the flat sequence. q, k ``[B,T,H,Dk]`` (l2-normalised, not
    scaled); v ``[B,T,H,Dv]``; g, beta ``[B,T,H]``; state ``[B,H,Dk,Dv]``."""
    q, k, v, g, beta = _prep(q, k, v, g, beta)
    B, T, H, Dk = q.shape
    S = torch.zeros(B, H, Dk, v.shape[-1]) if state is None else state.float()
    outs = []
    for t in range(T):
        o, S = delta_step(S, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        outs.append(o)
    return torch.stack(outs, 1), S


def delta_column(q, k, v, g, beta, C: int, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One state per stream: token i reads and updates only ``S[i % C]``; state ``[B,H,C,Dk,Dv]``."""
    q, k, v, g, beta = _prep(q, k, v, g, beta)
    B, T, H, Dk = q.shape
    S = torch.zeros(B, H, C, Dk, v.shape[-1]) if state is None else state.float().clone()
    outs = []
    for t in range(T):
        c = t % C
        o, S[:, :, c] = delta_step(S[:, :, c], q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        outs.append(o)
    return torch.stack(outs, 1), S


def delta_block_causal(q, k, v, g, beta, C: int, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Shared state; each token of a row forks from the state after all earlier rows."""
    q, k, v, g, beta = _prep(q, k, v, g, beta)
    B, T, H, Dk = q.shape
    S = torch.zeros(B, H, Dk, v.shape[-1]) if state is None else state.float()
    outs = []
    for r in range(T // C):
        S_prev = S
        for t in range(r * C, (r + 1) * C):
            S_t = torch.exp(g[:, t])[..., None, None] * S_prev
            delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S_t, k[:, t]))
            qk = (q[:, t] * k[:, t]).sum(-1, keepdim=True)
            outs.append(torch.einsum("bhkv,bhk->bhv", S_t, q[:, t]) + qk * delta)
        for t in range(r * C, (r + 1) * C):  # advance in channel order 0..C-1
            _, S = delta_step(S, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
    return torch.stack(outs, 1), S


def column_conv(x: Tensor, weight: Tensor, C: int, history: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv along each stream (no activation).

    x ``[B, R*C, D]`` row-major; weight ``[D, 1, K]`` (PyTorch layout: ``w[K-1]`` is the current
    row); history ``[B, K-1, C, D]`` = the K-1 previous rows (zeros if None).
    Returns (out ``[B, R*C, D]``, the new history)."""
    B, T, D = x.shape
    K = weight.shape[-1]
    rows = x.view(B, T // C, C, D)
    if history is None:
        history = torch.zeros(B, K - 1, C, D, dtype=x.dtype)
    ext = torch.cat([history, rows], 1)  # [B, K-1+R, C, D]
    out = torch.zeros_like(rows)
    for r in range(T // C):
        for back in range(K):  # back rows in the past, same stream
            out[:, r] += weight[:, 0, K - 1 - back] * ext[:, r + K - 1 - back]
    return out.reshape(B, T, D), ext[:, ext.shape[1] - (K - 1) :]


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


# ------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class RefQwen35Config:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rotary_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    layer_types: tuple
    tie_word_embeddings: bool
    num_channels: int
    delta_mode: str
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> RefQwen35Config:
        text = {**cfg, **(cfg.get("text_config") or {})}
        text.update({k: cfg[k] for k in STREAM_KEYS if k in cfg})
        rope = text.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"RoPE type {rope['rope_type']!r} not supported.")
        theta = text.get("rope_theta", rope.get("rope_theta"))
        if theta is None:
            raise ValueError("Config has no rope_theta (top level or rope_parameters).")
        factor = text.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.25))
        if text.get("deltanet_conv", "column") != "column":
            raise ValueError(f"deltanet_conv {text['deltanet_conv']!r} not supported (column only).")
        mode = text.get("deltanet_block_causal", BLOCK_CAUSAL)  # the reference code's default
        if mode not in (COLUMN, BLOCK_CAUSAL):
            raise ValueError(f"deltanet_block_causal {mode!r} not supported.")
        n = int(text["num_hidden_layers"])
        interval = int(text.get("full_attention_interval", 4))
        types = text.get("layer_types") or [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)
        ]
        heads = int(text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or text["hidden_size"] // heads)
        return cls(
            hidden_size=int(text["hidden_size"]),
            num_hidden_layers=n,
            intermediate_size=int(text.get("intermediate_size") or 0),  # MoE configs have none
            num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            vocab_size=int(text["vocab_size"]),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rotary_dim=int(head_dim * factor),
            linear_num_key_heads=int(text["linear_num_key_heads"]),
            linear_num_value_heads=int(text["linear_num_value_heads"]),
            linear_key_head_dim=int(text["linear_key_head_dim"]),
            linear_value_head_dim=int(text["linear_value_head_dim"]),
            linear_conv_kernel_dim=int(text.get("linear_conv_kernel_dim", 4)),
            layer_types=tuple(types),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            num_channels=int(text.get("num_channels", 1)),
            delta_mode=mode,
            num_experts=int(text.get("num_experts", 0)),
            num_experts_per_tok=int(text.get("num_experts_per_tok", 0)),
            moe_intermediate_size=int(text.get("moe_intermediate_size", 0)),
            shared_expert_intermediate_size=int(text.get("shared_expert_intermediate_size", 0)),
        )


# ------------------------------------------------------------------------------------ layers
class OnePlusRMSNorm(nn.Module):
    """Qwen3.5 RMSNorm: the stored weight w scales by (1 + w), in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """DeltaNet output norm: ``rmsnorm(o) * w * silu(z)`` with a plain gain w."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((self.weight * x32.to(x.dtype)).float() * F.silu(z.float())).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """Fused expert weights as transformers stores them: gate_up ``[E, 2I, D]``, down ``[E, D, I]``."""

    def __init__(self, cfg: RefQwen35Config) -> None:
        super().__init__()
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.zeros(E, D, I))


def experts_per_key(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The fused experts as ``save_pretrained`` writes them: one ``[I, D]`` gate, one ``[I, D]`` up
    and one ``[D, I]`` down matrix per expert, ``...mlp.experts.<e>.<proj>.weight``. A fused
    ``gate_up_proj[e]`` is the gate rows, then the up rows."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(".mlp.experts.gate_up_proj"):
            prefix = key.removesuffix("gate_up_proj")
            for e, pair in enumerate(value):
                gate, up = pair.chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif key.endswith(".mlp.experts.down_proj"):
            prefix = key.removesuffix("down_proj")
            out.update({f"{prefix}{e}.down_proj.weight": w for e, w in enumerate(value)})
        else:
            out[key] = value
    return out


def fused_experts(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`experts_per_key` (what this model's ``state_dict`` holds)."""
    out: dict[str, Tensor] = {}
    per_expert: dict[str, dict[int, dict[str, Tensor]]] = {}
    for key, value in weights.items():
        head, sep, tail = key.partition(".mlp.experts.")
        if sep and tail.split(".")[0].isdigit():
            e, proj = tail.split(".")[:2]
            per_expert.setdefault(f"{head}.mlp.experts.", {}).setdefault(int(e), {})[proj] = value
        else:
            out[key] = value
    for prefix, experts in per_expert.items():
        order = [experts[e] for e in range(len(experts))]
        out[prefix + "gate_up_proj"] = torch.stack([torch.cat([x["gate_proj"], x["up_proj"]]) for x in order])
        out[prefix + "down_proj"] = torch.stack([x["down_proj"] for x in order])
    return out


class SparseMoe(nn.Module):
    """Softmax router, top-k renormalised, SwiGLU experts, plus a sigmoid-gated shared expert."""

    def __init__(self, cfg: RefQwen35Config) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        top = (top / top.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for slot in range(self.top_k):
            for e in idx[..., slot].unique().tolist():
                sel = idx[..., slot] == e
                gate, up = (x[sel] @ self.experts.gate_up_proj[e].T).chunk(2, dim=-1)
                y = (F.silu(gate) * up) @ self.experts.down_proj[e].T
                out[sel] += top[..., slot][sel, None] * y
        return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class RefQwen35Cache:
    """Per layer: attention keys/values, or DeltaNet (conv history, recurrent state); plus y of
    every token fed so far."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.conv: list[Tensor | None] = [None] * num_layers
        self.state: list[Tensor | None] = [None] * num_layers
        self.y: Tensor | None = None


class Attention(nn.Module):
    def __init__(self, cfg: RefQwen35Config) -> None:
        super().__init__()
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, 2 * h * d, bias=False)  # per head: query, gate
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        self.q_norm = OnePlusRMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = OnePlusRMSNorm(d, cfg.rms_norm_eps)
        self.h, self.kv, self.d, self.rot = h, kv, d, cfg.rotary_dim
        self.theta = cfg.rope_theta

    def rope(self, x: Tensor, positions: Tensor) -> Tensor:
        """Partial rotate-half RoPE at per-token positions: only the first ``rot`` dims turn."""
        cos, sin = rope_cos_sin(positions, self.rot, self.theta, x.dtype)  # [B, L, rot]
        xr, rest = x[..., : self.rot], x[..., self.rot :]
        half = self.rot // 2
        rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
        return torch.cat([xr * cos[:, None] + rotated * sin[:, None], rest], dim=-1)

    def forward(self, x, positions, mask, cache: RefQwen35Cache | None, layer: int) -> Tensor:
        b, n, _ = x.shape
        q, gate = self.q_proj(x).view(b, n, self.h, 2 * self.d).chunk(2, dim=-1)
        k = self.k_proj(x).view(b, n, self.kv, self.d)
        v = self.v_proj(x).view(b, n, self.kv, self.d).transpose(1, 2)
        q = self.rope(self.q_norm(q).transpose(1, 2), positions)
        k = self.rope(self.k_norm(k).transpose(1, 2), positions)
        if cache is not None:
            if cache.keys[layer] is not None:
                k = torch.cat([cache.keys[layer], k], 2)
                v = torch.cat([cache.values[layer], v], 2)
            cache.keys[layer], cache.values[layer] = k, v
        rep = self.h // self.kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.d**-0.5
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, n, self.h * self.d)
        return self.o_proj(out * torch.sigmoid(gate.reshape(b, n, -1)))


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: RefQwen35Config) -> None:
        super().__init__()
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        conv_dim = 2 * self.hk * self.dk + self.hv * self.dv
        D = cfg.hidden_size
        self.in_proj_qkv = nn.Linear(D, conv_dim, bias=False)
        self.in_proj_z = nn.Linear(D, self.hv * self.dv, bias=False)
        self.in_proj_b = nn.Linear(D, self.hv, bias=False)
        self.in_proj_a = nn.Linear(D, self.hv, bias=False)
        K = cfg.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, K, groups=conv_dim, bias=False)  # weight [D,1,K]
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.hv * self.dv, D, bias=False)
        self.C, self.mode = cfg.num_channels, cfg.delta_mode

    def forward(self, x: Tensor, cache: RefQwen35Cache | None, layer: int) -> Tensor:
        b, n, _ = x.shape
        history = state = None
        if cache is not None:
            history, state = cache.conv[layer], cache.state[layer]
        qkv, history = column_conv(self.in_proj_qkv(x), self.conv1d.weight, self.C, history)
        qkv = F.silu(qkv)
        kd = self.hk * self.dk
        q = l2norm(qkv[..., :kd].reshape(b, n, self.hk, self.dk).float())
        k = l2norm(qkv[..., kd : 2 * kd].reshape(b, n, self.hk, self.dk).float())
        v = qkv[..., 2 * kd :].reshape(b, n, self.hv, self.dv)
        rep = self.hv // self.hk  # value head h reads key head h // rep
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
        beta = torch.sigmoid(self.in_proj_b(x))
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        rule = delta_column if self.mode == COLUMN else delta_block_causal
        o, state = rule(q, k, v, g, beta, self.C, state)
        if cache is not None:
            cache.conv[layer], cache.state[layer] = history, state
        z = self.in_proj_z(x).view(b, n, self.hv, self.dv)
        return self.out_proj(self.norm(o.to(x.dtype), z).reshape(b, n, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: RefQwen35Config, layer_type: str) -> None:
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = Attention(cfg)
        self.input_layernorm = OnePlusRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = OnePlusRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoe(cfg) if cfg.num_experts > 0 else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, positions, mask, cache, layer) -> Tensor:
        x = self.input_layernorm(h)
        if self.is_linear:
            h = h + self.linear_attn(x, cache, layer)
        else:
            h = h + self.self_attn(x, positions, mask, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: RefQwen35Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.channel_embedding = nn.Embedding(cfg.num_channels, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, t) for t in cfg.layer_types)
        self.norm = OnePlusRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class RefQwen35Model(nn.Module):
    """Multi-stream Qwen3.5 decoder; ``state_dict()`` keys are the reference checkpoint names."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = RefQwen35Config.from_dict(config)
        self.model = Backbone(self.config)
        self.lm_head = None
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self) -> RefQwen35Cache:
        return RefQwen35Cache(self.config.num_hidden_layers)

    def forward(self, ids: Tensor, channels: Tensor, positions: Tensor, mask: Tensor | None = None,
                cache: RefQwen35Cache | None = None) -> Tensor:
        """Logits ``[B, L, V]``; whole rows, row-major, channels 0..C-1 in every row."""
        C = self.config.num_channels
        b, n = ids.shape
        if n % C or not torch.equal(channels, torch.arange(C).repeat(n // C).expand(b, n)):
            raise ValueError(f"Input must be whole rows of channels 0..{C - 1}, got {channels.tolist()}")
        past_y = cache.y if cache is not None and cache.y is not None else positions[:, :0]
        key_y = torch.cat([past_y, positions], dim=-1)
        if mask is None:
            mask = stream_mask(positions, key_y)[:, None]
        h = self.model.embed_tokens(ids) + self.model.channel_embedding(channels)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, positions, mask, cache, i)
        if cache is not None:
            cache.y = key_y
        h = self.model.norm(h)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> RefQwen35Model:
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        weights = fused_experts(sanitize_weights(load_weights(folder)))
        weights = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
        config["num_channels"] = weights[CHANNEL_KEY].shape[0]
        model = cls(config)
        if model.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
        return model.to(dtype=dtype).eval()


def random_qwen3_5_state_dict(config: dict[str, Any], seed: int, std: float = 0.1) -> dict[str, Tensor]:
    """A random fp32 state dict chosen so that bugs show: (1+w) norms get w ~ N(0, 0.1) (a
    missing +1 zeroes the signal), plain gains 1 + N(0, 0.1), decays near 0.5-0.9 per token so
    state carries across rows, token and channel tables large enough to matter."""
    shapes = {k: v.shape for k, v in RefQwen35Model(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if key.endswith("linear_attn.norm.weight"):
            out[key] = 1.0 + 0.1 * noise
        elif key.endswith("norm.weight"):
            out[key] = 0.1 * noise  # stored w of a (1+w) norm
        elif key.endswith("A_log"):
            out[key] = torch.log(0.2 + 0.6 * torch.rand(shape, generator=gen))
        elif key.endswith("dt_bias"):
            out[key] = 0.5 * noise
        elif key.endswith("conv1d.weight"):
            out[key] = 0.5 * noise
        elif key == CHANNEL_KEY:
            out[key] = 0.5 * noise
        elif key == "model.embed_tokens.weight":
            out[key] = noise
        else:
            out[key] = std * noise
    return out


__all__ = [
    "BLOCK_CAUSAL",
    "COLUMN",
    "RefQwen35Cache",
    "RefQwen35Config",
    "RefQwen35Model",
    "column_conv",
    "delta_block_causal",
    "delta_column",
    "delta_vanilla",
    "experts_per_key",
    "fused_experts",
    "random_qwen3_5_state_dict",
]

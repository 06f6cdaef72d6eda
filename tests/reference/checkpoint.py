"""Write checkpoint folders the way the reference training (HF ``save_pretrained``) does.

Used to produce test inputs for the converter/loader: a ``config.json`` with the stock Qwen
``model_type`` plus the multi-stream ``architectures``, and weights in any of the four HF layouts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .torch_model import RefModel

DEFAULT_ARCHITECTURES = {"qwen3": ["Qwen3ForMultiStream"], "qwen2": ["Qwen2ForMultiStream"]}


def _split(keys: list[str], shards: int) -> list[list[str]]:
    """Contiguous, near-equal groups of keys (the order of the state dict is kept)."""
    size, extra = divmod(len(keys), shards)
    groups, start = [], 0
    for i in range(shards):
        end = start + size + (1 if i < extra else 0)
        groups.append(keys[start:end])
        start = end
    return groups


def write_reference_checkpoint(
    folder: str | Path,
    config: dict[str, Any],
    state_dict: dict[str, Tensor],
    *,
    fmt: str = "safetensors",
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    architectures: list[str] | None = None,
) -> Path:
    """Write ``config.json`` + weights into ``folder`` and return it.

    Args:
        config: HF-style config dict (``model_type`` qwen3/qwen2, sizes, ``rope_theta``...).
            ``num_channels`` is written only if present, as the reference does.
        state_dict: HF-named tensors (e.g. ``RefModel.state_dict()`` or ``random_state_dict``).
            Keys are written as given, so odd prefixes/extra keys can be tested too.
        fmt: "safetensors" (``model.safetensors`` / ``model-0000i-of-0000n.safetensors`` + index)
            or "bin" (``pytorch_model.bin`` / ``pytorch_model-0000i-of-0000n.bin`` + index).
        shards: number of weight files; > 1 also writes the ``*.index.json``.
        dtype: storage dtype of every tensor (the reference saves bf16).
        architectures: default ``["Qwen3ForMultiStream"]`` / ``["Qwen2ForMultiStream"]``.
    """
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # clone(): tied or sliced tensors must not share storage (safetensors refuses that).
    tensors = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in state_dict.items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # tied weights are saved once, under embed_tokens

    cfg = dict(config)
    cfg["architectures"] = architectures or DEFAULT_ARCHITECTURES.get(cfg.get("model_type", ""), ["Qwen3ForCausalLM"])
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    groups = _split(list(tensors), shards)
    names = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    for name, keys in zip(names, groups):
        part = {k: tensors[k] for k in keys}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: name for name, keys in zip(names, groups) for k in keys},
        }
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def random_state_dict(
    config: dict[str, Any],
    seed: int,
    std: float = 0.02,
    *,
    embed_std: float = 1.0,
    channel_std: float = 0.5,
    norm_noise: float = 0.1,
) -> dict[str, Tensor]:
    """A random fp32 state dict for ``RefModel(config)``, chosen so that bugs show.

    Projections and biases ~ N(0, std); token embeddings ~ N(0, embed_std) so tokens stay
    distinguishable; the channel table ~ N(0, channel_std) so a missing or misindexed channel
    embedding moves the logits clearly; every norm weight is ``1 + N(0, norm_noise)`` so a norm
    that is skipped or applied to the wrong axis is visible too.
    """
    shapes = {k: v.shape for k, v in RefModel(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if key.endswith("norm.weight"):
            out[key] = 1.0 + norm_noise * noise
        elif key == "model.channel_embedding.weight":
            out[key] = channel_std * noise
        elif key == "model.embed_tokens.weight":
            out[key] = embed_std * noise
        else:
            out[key] = std * noise
    return out

# Copyright © 2026 mstream-mlx contributors.
"""Read the weights of a PyTorch-side checkpoint folder into MLX arrays.

The reference training writes ``model.safetensors`` or shards plus
``model.safetensors.index.json`` (HF ``save_pretrained``); older or hand-made folders
hold ``pytorch_model.bin`` (+ shards and index).  ``.bin`` files are pickles: they are
read with ``torch.load(weights_only=True)``, which never runs code from the file, and
only when torch is installed (``pip install 'mstream-mlx[torch]'``).
"""

import json
from pathlib import Path
from typing import Dict, List

import mlx.core as mx

from mstream_mlx.checks import inside, shard_names

SAFETENSORS = ("model.safetensors", "model*.safetensors")
BIN = ("pytorch_model.bin", "pytorch_model*.bin")


def weight_files(folder: Path) -> List[Path]:
    """The weight files of ``folder``: safetensors first, else PyTorch ``.bin``.

    An index (``*.index.json``) names the shards; every shard it lists must exist.
    """
    for single, pattern in (SAFETENSORS, BIN):
        index = folder / f"{single}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index} is not a valid weight index ({e}).") from e
            files = [inside(folder, name, index.name) for name in shard_names(weight_map, index)]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{index.name} lists {missing[0]}, which is missing from {folder}."
                )
            return files
        if (folder / single).is_file():
            return [folder / single]
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(
        f"No weights in {folder}: expected model*.safetensors or pytorch_model*.bin."
    )


def _read_bin(path: Path) -> Dict[str, mx.array]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path.name} is a PyTorch .bin checkpoint; reading it needs torch: "
            "pip install 'mstream-mlx[torch]'."
        ) from e
    try:
        try:  # mmap: no second copy of the file in memory (zip-format files only)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with code in them land here, never run
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"Cannot read {path} as plain tensors: {first}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of tensors.")
    out = {}
    for k, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path.name} holds a non-tensor entry {k!r}.")
        t = t.contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the raw bits
            out[k] = mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
        else:
            out[k] = mx.array(t.numpy())
    return out


def read_weights(folder: Path) -> Dict[str, mx.array]:
    """Every tensor of the checkpoint in ``folder``, in its stored dtype."""
    weights: Dict[str, mx.array] = {}
    for f in weight_files(folder):
        if f.suffix == ".bin":
            weights.update(_read_bin(f))
        else:
            try:
                weights.update(mx.load(str(f)))
            except Exception as e:
                raise ValueError(f"Cannot read {f}: {' '.join(str(e).split())}") from e
    return weights

# Copyright © 2026 mstream-mlx contributors.
"""Adapters on disk, in mlx-lm's layout, plus what exact resumption needs.

* ``adapters.safetensors``: every trainable parameter (LoRA ``lora_a``/``lora_b``,
  DoRA ``m``, whole layers for full fine-tuning) and always the channel embedding
  (``model.channel_embedding.weight``), which is trained in every mode.
* ``adapter_config.json``: the run's settings; mlx-lm's keys (``fine_tune_type``,
  ``num_layers``, ``lora_parameters``) rebuild the same layers on load.
* ``training_state.safetensors``: the optimizer state and the step, next to
  ``adapters.safetensors``, so ``--resume-adapter-file`` continues exactly.
* ``{step:07d}_adapters.safetensors``: a copy per save, as mlx-lm writes.

Every file is written to a temporary name and renamed, so an interrupted save never
leaves a half-written file behind.
"""

import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
STATE_FILE = "training_state.safetensors"
FINE_TUNE_TYPES = ("lora", "dora", "full")
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


def _tmp(path: Path) -> Path:
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def save_safetensors(path, arrays: Dict[str, mx.array], metadata=None):
    """``mx.save_safetensors`` to a temporary name, then an atomic rename."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj: dict):
    path = Path(path)
    tmp = _tmp(path)
    try:
        tmp.write_text(json.dumps(obj, indent=4, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def channel_embedding_path(model: nn.Module) -> Optional[str]:
    """Module path of the channel embedding (``model.channel_embedding``)."""
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] == "channel_embedding":
            return name
    return None


def prepare_model(
    model: nn.Module,
    fine_tune_type: str = "lora",
    num_layers: int = 16,
    lora_parameters: Optional[dict] = None,
) -> nn.Module:
    """Freeze the model, then make trainable what the fine-tune type trains.

    ``lora``/``dora``: mlx-lm's LoRA/DoRA layers on the last ``num_layers`` layers
    (``-1`` = all), on a quantized model too (QLoRA). ``full``: the last
    ``num_layers`` layers unfrozen.  In every case the channel embedding stays
    trainable: it is the one new parameter of a multi-stream model.
    """
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise ValueError(
            f"Unknown fine-tune type {fine_tune_type!r}; expected one of "
            f"{', '.join(FINE_TUNE_TYPES)}."
        )
    n = len(model.layers)
    if num_layers > n:
        raise ValueError(
            f"Requested to train {num_layers} layers but the model only has {n} layers."
        )
    model.freeze()
    if fine_tune_type == "full":
        quantized = [
            p for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)
        ]
        if quantized:
            raise ValueError(
                "Full fine-tuning needs an unquantized model (found quantized layers "
                f"such as {quantized[0]}); use --fine-tune-type lora (QLoRA) instead."
            )
        for layer in model.layers[-max(num_layers, 0) :]:
            layer.unfreeze()
    else:
        params = check_lora_parameters(lora_parameters or {})
        linear_to_lora_layers(
            model, num_layers, params, use_dora=fine_tune_type == "dora"
        )
    ce = channel_embedding_path(model)
    if ce is not None:
        dict(model.named_modules())[ce].unfreeze()
    return model


def check_lora_parameters(params: dict) -> dict:
    """mlx-lm's LoRA settings: ``rank``, ``scale``, ``dropout`` and optional ``keys``.

    mlx-lm scales the low-rank update by ``scale`` (its default 20), not by
    ``alpha / rank``; an ``alpha`` here is an error with that hint, as in mlx-lm.
    """
    if "scale" not in params:
        hint = ""
        if "alpha" in params:
            hint = (
                " Found 'alpha' instead: mlx-lm's LoRA uses 'scale' (the update is "
                "multiplied by scale, e.g. scale = alpha / rank), not 'alpha'."
            )
        raise ValueError(f"LoRA parameters are missing 'scale'.{hint}")
    unknown = set(params) - {"rank", "scale", "dropout", "keys"}
    if unknown:
        raise ValueError(
            f"Unknown LoRA parameter(s) {', '.join(sorted(unknown))}; expected rank, "
            "scale, dropout, keys."
        )
    out = {"rank": 8, "dropout": 0.0, **params}
    if out.get("keys") is None:
        out.pop("keys", None)
    return out


def trainable_weights(model: nn.Module) -> Dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def state_file_for(adapter_file) -> Path:
    """``.../adapters.safetensors`` -> ``.../training_state.safetensors``."""
    p = Path(adapter_file)
    return p.with_name(p.name.replace("adapters.safetensors", STATE_FILE))


def save_checkpoint(
    adapter_path,
    model: nn.Module,
    *,
    step: int,
    optimizer=None,
    numbered: bool = True,
):
    """Write ``adapters.safetensors`` (and a numbered copy) and, when an optimizer
    is given, ``training_state.safetensors`` with its state and ``step``."""
    folder = Path(adapter_path)
    weights = trainable_weights(model)
    save_safetensors(folder / ADAPTER_FILE, weights)
    if numbered:
        save_safetensors(folder / f"{step:07d}_{ADAPTER_FILE}", weights)
    if optimizer is not None:
        state = {f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)}
        save_safetensors(folder / STATE_FILE, state, metadata={"step": str(step)})


def load_training_state(adapter_file) -> Optional[Tuple[int, dict]]:
    """``(step, optimizer state tree)`` saved next to ``adapter_file``, or None."""
    path = state_file_for(adapter_file)
    if not path.is_file():
        return None
    arrays, meta = mx.load(str(path), return_metadata=True)
    state = tree_unflatten(
        [
            (k[len("optimizer.") :], v)
            for k, v in arrays.items()
            if k.startswith("optimizer.")
        ]
    )
    return int(meta["step"]), state


def read_adapter_config(adapter_path) -> dict:
    folder = Path(adapter_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"The adapter path does not exist: {folder}")
    cfg = folder / CONFIG_FILE
    if not cfg.is_file():
        raise FileNotFoundError(f"No {CONFIG_FILE} in {folder}.")
    return json.loads(cfg.read_text())


def load_adapter_weights(model: nn.Module, adapter_file, full: bool = False):
    """Load trained weights into a model whose adapter layers are in place.

    Like mlx-lm's ``load_adapters``, it rejects tensors that are not adapter
    parameters of this model or that have the wrong shape; the channel embedding is
    accepted too (all parameters for a full fine-tune).
    """
    weights = mx.load(str(adapter_file))
    params = dict(tree_flatten(model.parameters()))
    ce = channel_embedding_path(model)
    ok = (
        lambda name: full
        or name.rsplit(".", 1)[-1] in ADAPTER_LEAVES
        or (ce is not None and name == f"{ce}.weight")
    )
    errors = []
    for name, w in weights.items():
        if name not in params or not ok(name):
            errors.append(f"  {name}: not an adapter parameter of this model")
        elif w.shape != params[name].shape:
            errors.append(
                f"  {name}: adapter shape {tuple(w.shape)} does not match the model's "
                f"{tuple(params[name].shape)}"
            )
    if errors:
        raise ValueError(
            f"Adapter file {adapter_file} contains incompatible tensors:\n"
            + "\n".join(errors)
        )
    model.load_weights(list(weights.items()), strict=False)
    return model


def load_adapters(model: nn.Module, adapter_path) -> nn.Module:
    """Rebuild the adapter layers from ``adapter_config.json`` and load
    ``adapters.safetensors`` (what ``mstream_mlx.load(..., adapter_path=)`` calls).

    Args:
        model: a multi-stream model as ``load`` returns it.
        adapter_path: the folder ``mstream-mlx lora`` wrote.

    Returns:
        The same model with its adapters applied (unfused).
    """
    cfg = read_adapter_config(adapter_path)
    kind = cfg.get("fine_tune_type", "lora")
    n = (cfg.get("multistream") or {}).get("num_channels")
    have = getattr(getattr(model, "args", None), "num_channels", None)
    if n is not None and have is not None and n != have:
        raise ValueError(
            f"The adapters in {adapter_path} were trained for {n} channels but the "
            f"model has {have}."
        )
    if kind != "full":
        params = check_lora_parameters(cfg.get("lora_parameters") or {})
        linear_to_lora_layers(model, cfg["num_layers"], params, use_dora=kind == "dora")
    return load_adapter_weights(
        model, Path(adapter_path) / ADAPTER_FILE, kind == "full"
    )

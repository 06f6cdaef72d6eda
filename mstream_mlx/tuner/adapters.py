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

Every file goes through :func:`mstream_mlx.atomic.atomic_file`, so an interrupted
or failed save never leaves a half-written file behind; the training state records
the step and the digest of the adapters it belongs with, so a resume never mixes
the weights of one step with the optimizer state of another.
"""

import hashlib
import json
import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..atomic import atomic_file
from ..heads import adopt_heads

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
STATE_FILE = "training_state.safetensors"
FINE_TUNE_TYPES = ("lora", "dora", "full")
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


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
    rank, scale, dropout = out["rank"], out["scale"], out["dropout"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}.")
    if not _number(scale):
        raise ValueError(f"LoRA scale must be a finite number, got {scale!r}.")
    if not (_number(dropout) and 0 <= dropout < 1):
        raise ValueError(f"LoRA dropout must be a number in [0, 1), got {dropout!r}.")
    keys = out.get("keys")
    if keys is not None and not (
        isinstance(keys, list) and all(isinstance(k, str) for k in keys)
    ):
        raise ValueError(f"LoRA keys must be a list of module names, got {keys!r}.")
    return out


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def trainable_weights(model: nn.Module) -> Dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def state_file_for(adapter_file) -> Path:
    """``.../adapters.safetensors`` -> ``.../training_state.safetensors``."""
    p = Path(adapter_file)
    return p.with_name(p.name.replace("adapters.safetensors", STATE_FILE))


def file_digest(path) -> str:
    """SHA-256 of a file's bytes (which adapters a training state belongs with)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    adapter_path,
    model: nn.Module,
    *,
    step: int,
    optimizer=None,
    optimizer_name: Optional[str] = None,
    numbered: bool = True,
    config: Optional[dict] = None,
):
    """Write ``adapters.safetensors`` (and a numbered copy) and, when an optimizer
    is given, ``training_state.safetensors`` with its state, ``step`` and the
    digest of the adapters it belongs with; then ``config`` as adapter_config.json.

    The pair is written so that a kill at any point leaves either the old pair, the
    new pair, or a new state beside old adapters, which :func:`load_training_state`
    detects (the numbered copy of that step then holds the matching adapters): the
    adapters go to a temporary name, the state is written, then the adapters are
    renamed into place.
    """
    folder = Path(adapter_path)
    weights = trainable_weights(model)
    meta = {"step": str(step)}
    copy = folder / f"{step:07d}_{ADAPTER_FILE}"
    with atomic_file(folder / ADAPTER_FILE) as tmp:
        mx.save_safetensors(str(tmp), weights, metadata=meta)
        try:
            if numbered:
                with atomic_file(copy) as dst:
                    dst.write_bytes(tmp.read_bytes())
            if optimizer is not None:
                state = {f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)}
                meta = {**meta, "adapters_sha256": file_digest(tmp)}
                if optimizer_name:
                    meta["optimizer"] = optimizer_name
                with atomic_file(folder / STATE_FILE) as dst:
                    mx.save_safetensors(str(dst), state, metadata=meta)
        except BaseException:
            if numbered:  # a failed save leaves no part of itself
                copy.unlink(missing_ok=True)
            raise
    if config is not None:
        with atomic_file(folder / CONFIG_FILE) as dst:
            dst.write_text(json.dumps(config, indent=4, default=str))


def _read_safetensors(path, what: str):
    """``mx.load(path, return_metadata=True)`` with one line for a missing,
    truncated or garbage file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {what} at {path}.")
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError, MemoryError, OverflowError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(
            f"{path} is not a readable safetensors file ({reason})."
        ) from None
    if not isinstance(arrays, dict):
        raise ValueError(f"{path} is not a safetensors file of named tensors.")
    return arrays, meta or {}


def load_training_state(
    adapter_file, optimizer_name: Optional[str] = None
) -> Optional[Tuple[int, dict]]:
    """``(step, optimizer state tree)`` saved next to ``adapter_file``, or None.

    Raises ``ValueError`` (one line) when the state is unreadable, has no step, was
    saved with another optimizer than ``optimizer_name``, or belongs with other
    adapters than ``adapter_file`` (a save interrupted between the two files).
    """
    path = state_file_for(adapter_file)
    if not path.is_file():
        return None
    arrays, meta = _read_safetensors(path, "training state")
    remove = f"remove {path} to resume the weights only"
    try:
        step = int(meta["step"])
    except (KeyError, ValueError):
        raise ValueError(
            f"{path} records no training step; {remove}."
        ) from None
    if step < 0:
        raise ValueError(f"{path} records step {step}; {remove}.")
    saved_opt = meta.get("optimizer")
    if saved_opt and optimizer_name and saved_opt != optimizer_name:
        raise ValueError(
            f"{path} holds {saved_opt} optimizer state but the optimizer is "
            f"{optimizer_name}; resume with --optimizer {saved_opt}, or {remove}."
        )
    digest = meta.get("adapters_sha256")
    if digest is not None and digest != file_digest(adapter_file):
        numbered = path.with_name(f"{step:07d}_{ADAPTER_FILE}")
        hint = remove
        if numbered.is_file() and file_digest(numbered) == digest:
            hint = (
                f"copy {numbered} over it to resume exactly from step {step}, "
                f"or {remove}"
            )
        raise ValueError(
            f"{adapter_file} is not the adapters {path.name} (step {step}) was saved "
            f"with (an interrupted save?); {hint}."
        )
    state = tree_unflatten(
        [
            (k[len("optimizer.") :], v)
            for k, v in arrays.items()
            if k.startswith("optimizer.")
        ]
    )
    return step, state


def read_adapter_config(adapter_path) -> dict:
    folder = Path(adapter_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"The adapter path does not exist: {folder}")
    cfg = folder / CONFIG_FILE
    if not cfg.is_file():
        raise FileNotFoundError(f"No {CONFIG_FILE} in {folder}.")
    try:
        out = json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: invalid JSON ({e.msg} at line {e.lineno}).") from None
    except (UnicodeDecodeError, RecursionError):
        raise ValueError(f"{cfg}: not a readable JSON file.") from None
    if not isinstance(out, dict):
        raise ValueError(f"{cfg} must hold a JSON object of settings.")
    return out


def load_adapter_weights(model: nn.Module, adapter_file, full: bool = False):
    """Load trained weights into a model whose adapter layers are in place.

    Like mlx-lm's ``load_adapters``, it rejects tensors that are not adapter
    parameters of this model or that have the wrong shape; the channel embedding is
    accepted too (all parameters for a full fine-tune).
    """
    weights, _ = _read_safetensors(adapter_file, "adapters file")
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
            errors.append(f"{name} is not an adapter parameter of this model")
        elif w.shape != params[name].shape:
            errors.append(
                f"{name} has shape {tuple(w.shape)}, the model's "
                f"{tuple(params[name].shape)}"
            )
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValueError(
            f"Adapter file {adapter_file} does not fit this model: {errors[0]}{more}."
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
    where = Path(adapter_path) / CONFIG_FILE
    heads = (cfg.get("multistream") or {}).get("heads")
    if heads:
        adopt_heads(model, heads)  # the heads the adapters were trained for
    if kind not in FINE_TUNE_TYPES:
        raise ValueError(
            f"{where}: unknown fine_tune_type {kind!r}; expected "
            f"{', '.join(FINE_TUNE_TYPES)}."
        )
    if kind != "full":
        lora = cfg.get("lora_parameters") or {}
        layers = cfg.get("num_layers")
        if not isinstance(lora, dict):
            raise ValueError(f"{where}: lora_parameters must be an object.")
        if isinstance(layers, bool) or not isinstance(layers, int):
            raise ValueError(
                f"{where} has no integer num_layers (got {json.dumps(layers)})."
            )
        params = check_lora_parameters(lora)
        linear_to_lora_layers(model, layers, params, use_dora=kind == "dora")
    return load_adapter_weights(
        model, Path(adapter_path) / ADAPTER_FILE, kind == "full"
    )

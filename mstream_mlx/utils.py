# Copyright © 2026 mstream-mlx contributors.
"""Loading multi-stream models: MLX folders, reference (PyTorch-side) safetensors
folders and plain Qwen base models, from a local path or the Hugging Face Hub."""

import glob
import json
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlx.nn as nn
from mlx_lm.utils import load_config, load_model as lm_load_model, load_tokenizer

from .models import get_model_classes
from .models.qwen3 import CHANNEL_KEY
from .streams import BLOCKS, ROWS, StreamSpec, blocks_spec, rows_spec, silence_token_id

# Qwen3.5 DeltaNet modes when config.json has none: the reference code's defaults
# (sec7 §5.1-§5.2; the Stream-27B run itself saved column / column).
DELTANET_DEFAULTS = {
    "deltanet_block_causal": "block_causal",
    "deltanet_conv": "column",
}

# What snapshot_download fetches for a model (mlx-lm's list plus PyTorch .bin weights
# for the converter).
HUB_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "pytorch_model*.bin",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]


def resolve_model_path(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local folder as is; otherwise a Hub repo id fetched (or found in the local
    Hugging Face cache) with ``huggingface_hub.snapshot_download``."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--model must be a folder or a Hub id, got the file {path}.")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(
            snapshot_download(
                str(path_or_repo), revision=revision, allow_patterns=HUB_PATTERNS
            )
        )
    except HFValidationError as e:
        raise FileNotFoundError(
            f"No model folder at {path_or_repo}, and it is not a valid Hub id."
        ) from e
    except Exception as e:  # network errors, missing repos, offline cache misses
        raise FileNotFoundError(
            f"No model folder at {path_or_repo}, and the Hub could not provide it "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})."
        ) from e


def safetensors_shapes(folder: Path) -> Dict[str, Tuple[int, ...]]:
    """Tensor shapes of every ``model*.safetensors`` file, read from the headers only."""
    shapes = {}
    for f in sorted(glob.glob(str(folder / "model*.safetensors"))):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes.update(
            {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        )
    return shapes


def stream_facts(config: Dict[str, Any], shapes: Dict[str, Tuple[int, ...]]) -> dict:
    """``num_channels`` and the ``multistream`` entry for a checkpoint's config.

    The channel count comes from the channel embedding's shape when there is one
    (the reference's config defaults are unreliable: §5 says 5, §6 says 3).  The
    layout comes from ``config["multistream"]`` (our folders) or, for checkpoints
    written by the reference code, from how it names its classes: §5-6
    ``Qwen*ForMultiStream`` are blocks models, §7 ``Qwen3ForCausalLM`` with
    ``num_channels`` is a rows model.  A plain base model gets a blocks spec, except
    Qwen3.5 (§7 ``StreamQwen3_5ForCausalLM``), which is always a rows model: its
    DeltaNet state runs row by row.  Qwen3.5 configs may nest a ``text_config``; their
    DeltaNet modes default to the reference code's (block_causal / column, §5).
    """
    shape = shapes.get(CHANNEL_KEY) or shapes.get(
        CHANNEL_KEY.replace("model.", "model.language_model.")
    )
    text = config.get("text_config") or {}
    num_channels = config.get("num_channels", text.get("num_channels"))
    hybrid = str(config.get("model_type", "")).startswith("qwen3_5")
    ms = dict(config.get("multistream") or {})
    archs = " ".join(config.get("architectures") or [])
    if "layout" not in ms:
        rows = hybrid or ("ForMultiStream" not in archs and num_channels is not None)
        ms["layout"] = ROWS if rows else BLOCKS
    if shape is not None:
        n = shape[0]
    elif num_channels is not None:
        n = int(num_channels)
    else:
        # a base model: the paper's 10 channels for rows (§7), 3 streams for blocks
        n = len(ms.get("channel_names") or []) or (10 if ms["layout"] == ROWS else 3)
    if "channel_names" not in ms:
        base = rows_spec(n) if ms["layout"] == ROWS else blocks_spec(n)
        ms = {**base.to_config(), **ms}
    StreamSpec.from_config(ms, n)  # validate now: one clear error at load time
    facts = {"num_channels": n, "multistream": ms}
    if hybrid:
        for key, default in DELTANET_DEFAULTS.items():
            facts[key] = config.get(key, text.get(key))
            if facts[key] is None:
                facts[key] = default
                if key == "deltanet_block_causal":  # sec7 §10 pitfall 3
                    print(
                        f"[WARNING] config.json has no {key}; using the reference "
                        f"code's default {default!r} (Stream-27B used 'column')."
                    )
    return facts


def load_model(
    model_path: Path, lazy: bool = False
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the model of an MLX or reference folder and load its weights."""
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {model_path}.")
    shapes = safetensors_shapes(model_path)
    if not shapes:
        if glob.glob(str(model_path / "pytorch_model*.bin")):
            raise FileNotFoundError(
                f"{model_path} holds PyTorch .bin weights; convert it first: "
                f"mstream-mlx convert --hf-path {model_path} --mlx-path OUT"
            )
        raise FileNotFoundError(f"No model*.safetensors in {model_path}.")
    config = load_config(model_path)
    facts = stream_facts(config, shapes)
    try:
        return lm_load_model(
            model_path,
            lazy=lazy,
            model_config=facts,
            get_model_classes=get_model_classes,
        )
    except ValueError as e:  # MLX's weight checks span lines; keep one line
        raise ValueError(f"{model_path}: {' '.join(str(e).split())}") from e


def load(
    path_or_repo: str,
    *,
    lazy: bool = False,
    revision: Optional[str] = None,
    tokenizer_config: Optional[dict] = None,
    adapter_path: Optional[str] = None,
):
    """Load a multi-stream model and its tokenizer.

    Args:
        path_or_repo: an MLX model folder, a folder written by the reference
            training code (safetensors), or a Hugging Face Hub repo id.
        lazy: leave weights unevaluated until first use.
        revision: Hub revision (branch, tag or commit).
        tokenizer_config: extra arguments for the tokenizer.
        adapter_path: a folder written by ``mstream-mlx lora``; its adapters (and
            channel embedding) are applied, unfused.

    Returns:
        ``(model, tokenizer)``; ``model.streams`` is the :class:`StreamSpec`.
    """
    model_path = resolve_model_path(path_or_repo, revision)
    model, config = load_model(model_path, lazy)
    if adapter_path is not None:
        from .tuner.adapters import load_adapters

        load_adapters(model, adapter_path)
        model.eval()
    tokenizer = load_tokenizer(
        model_path, tokenizer_config, eos_token_ids=config.get("eos_token_id")
    )
    ms = model.args.multistream
    if ms["layout"] == ROWS and ms.get("silence_token_id") is None:
        ms["silence_token_id"] = silence_token_id(tokenizer)
    return model, tokenizer

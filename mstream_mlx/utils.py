# Copyright © 2026 mstream-mlx contributors.
"""Loading multi-stream models: MLX folders, reference (PyTorch-side) safetensors
folders and plain base models of a supported family, from a local path or the
Hugging Face Hub."""

import glob
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlx.nn as nn
from mlx_lm.utils import load_config, load_model as lm_load_model, load_tokenizer

from .heads import with_default_heads
from .models import architectures, family_for, get_model_classes
from .models.base import CHANNEL_KEY
from .checks import check_config, check_tokenizer_files, inside, read_json, safetensors_header
from .vocab import check_tokenizer_fits
from .streams import BLOCKS, ROWS, StreamSpec, blocks_spec, rows_spec, silence_token_id

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
        inside(folder, Path(f).name, "The weight file")
        header = safetensors_header(Path(f))
        shapes.update(
            {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        )
    return shapes


def stream_facts(config: Dict[str, Any], shapes: Dict[str, Tuple[int, ...]]) -> dict:
    """``num_channels``, the ``multistream`` entry and the family's own facts (e.g.
    Qwen3.5's DeltaNet modes) for a checkpoint's config.

    The channel count comes from the channel embedding's shape when there is one
    (the reference's config defaults are unreliable: §5 says 5, §6 says 3).  The
    layout comes from ``config["multistream"]`` (our folders), else from the family:
    a family with one layout (Qwen3.5: its DeltaNet state runs row by row) uses it,
    an architecture that implies one (the reference's §5-6 ``Qwen*ForMultiStream``:
    blocks) gives it, and otherwise a config with ``num_channels`` (§7
    ``Qwen3ForCausalLM``) is a rows model and a plain base model a blocks one.
    """
    family = family_for(config)
    shape = shapes.get(CHANNEL_KEY) or shapes.get(
        CHANNEL_KEY.replace("model.", "model.language_model.")
    )
    text = config.get("text_config") or {}
    num_channels = config.get("num_channels", text.get("num_channels"))
    ms = dict(config.get("multistream") or {})
    if "layout" not in ms:
        ms["layout"] = implied_layout(config, family, num_channels is not None)
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
    spec = StreamSpec.from_config(ms, n)  # validate now: one clear error at load time
    ms = with_default_heads(config, ms, spec)  # docs/generation.md#heads
    return {"num_channels": n, "multistream": ms, **family.extra_facts(config)}


def implied_layout(config: Dict[str, Any], family, has_channels: bool) -> str:
    """The layout a config implies when it names none (see :func:`stream_facts`)."""
    if len(family.layouts) == 1:
        return family.layouts[0]
    known = architectures()
    for arch in config.get("architectures") or []:
        if arch in known and known[arch][1] is not None:
            return known[arch][1]
    return ROWS if has_channels else BLOCKS


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
    check_config(read_json(model_path / "config.json", "config.json"), shapes, model_path)
    config = load_config(model_path)  # adds generation_config.json's eos ids
    check_architecture(config, model_path)
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
    except (TypeError, KeyError, AttributeError, ZeroDivisionError) as e:
        # a config value of a type or size the family's code cannot build from
        raise ValueError(
            f"{model_path}/config.json does not describe a model mstream-mlx can "
            f"build ({type(e).__name__}: {' '.join(str(e).split())})."
        ) from e


def check_architecture(config: Dict[str, Any], model_path: Path) -> None:
    """Refuse an ``architectures`` entry no family reads, as convert does (it would
    otherwise load as a rows model)."""
    family = family_for(config)
    archs = config.get("architectures") or []
    known = architectures()
    if not isinstance(archs, list) or (archs and archs[0] not in known):
        raise ValueError(
            f"Unknown architecture {archs if not isinstance(archs, list) else archs[0]!r} "
            f"in {model_path / 'config.json'}; mstream-mlx reads {', '.join(known)}."
        )
    if archs and known[archs[0]][0] is not family:
        raise ValueError(
            f"Inconsistent config in {model_path / 'config.json'}: architecture "
            f"{archs[0]} is a {known[archs[0]][0].name} model but model_type is "
            f"{config.get('model_type')!r}."
        )


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
    check_tokenizer_files(model_path)
    try:
        tokenizer = load_tokenizer(
            model_path, tokenizer_config, eos_token_ids=config.get("eos_token_id")
        )
    except Exception as e:  # transformers also validates config.json here
        raise ValueError(
            f"Cannot load the tokenizer of {model_path} ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]})."
        ) from e
    check_tokenizer_fits(tokenizer, model.args.vocab_size, str(model_path))
    ms = model.args.multistream
    if ms["layout"] == ROWS and ms.get("silence_token_id") is None:
        ms["silence_token_id"] = silence_token_id(tokenizer)
    return model, tokenizer


def default_model_path() -> Path:
    """The bundled default model folder (``mstream_mlx/assets/default_model``).

    Raises:
        ValueError: when no default model is bundled.
    """
    path = Path(__file__).parent / "assets" / "default_model"
    if not path.exists():
        raise ValueError(
            f"No --model given and no bundled default model at {path}; pass --model "
            "PATH_OR_HUB_ID."
        )
    return path

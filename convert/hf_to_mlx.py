# Copyright © 2026 mstream-mlx contributors.
"""PyTorch multi-stream checkpoints (or plain base models) to MLX model folders.

The family comes from ``config.json``'s ``model_type`` and ``architectures``, as each
family file declares them (``mstream_mlx/models``; ``docs/adding-a-model.md``):

* a stream checkpoint carries a channel table; its architecture tells the layout
  (the reference's ``Qwen3ForMultiStream`` / ``Qwen2ForMultiStream``: blocks, paper
  §5-6; ``StreamQwen3_5ForCausalLM`` / ``StreamQwen3_5MoeForCausalLM``: rows, §7)
  or, for a stock class name with ``num_channels`` (§7 Stream-8B's
  ``Qwen3ForCausalLM``), rows;
* a plain base model (``Qwen3ForCausalLM``, ``LlamaForCausalLM``, ...) gets a new
  N(0, 0.02) channel table and the stream spec of the flags (``--layout``: the
  family's first layout by default; Qwen3.5 runs rows only).

The channel count is the channel table's row count.  When ``config.json``'s
``num_channels`` disagrees, **the tensor wins** and a warning says so: the
reference's own configs are unreliable there (its code defaults to 5 channels in §5
and 3 in §6 unless the key is written).  A ``--num-channels`` flag that disagrees
with a trained table is an error (a trained table cannot be resized).

Weights go through the model's own ``sanitize`` (Qwen3.5: conv ``[D,1,K]`` ->
``[D,K,1]``, +1 on exactly the (1+w) norms) and are written in MLX layout, so loading
the folder does not change them again.  ``config.json`` gets the family's own stream
facts (Qwen3.5's DeltaNet modes, with a warning when the default is used) and the
class name the family saves for the layout; ``A_log`` stays float32.
"""

import json
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from mstream_mlx.models import architectures, find_family, get_model_classes, model_types
from mstream_mlx.models.base import CHANNEL_KEY, REFERENCE_ONLY_KEYS, Family
from mstream_mlx.streams import (
    LAYOUTS,
    ROWS,
    blocks_spec,
    rows_spec,
    silence_token_id,
)
from mstream_mlx.heads import set_folder_heads
from mstream_mlx.utils import resolve_model_path, stream_facts

from mstream_mlx.atomic import atomic_folder, check_destination
from mstream_mlx.checks import check_config, check_outputs, utf8_path
from mstream_mlx.folders import check_apart, copy_side_files
from .weights import read_weights

DTYPES = ("float16", "bfloat16", "float32")
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
EMBED_KEY = "model.embed_tokens.weight"
# Buffers some checkpoints carry besides parameters.
DROPPED = REFERENCE_ONLY_KEYS + ("rotary_emb.inv_freq",)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken")

def warn(message: str) -> None:
    print(f"[WARNING] {message}", file=sys.stderr)


def info(message: str) -> None:
    print(f"[INFO] {message}", file=sys.stderr)


def check_options(
    *,
    q_bits: int,
    q_group_size: int,
    dtype: Optional[str],
    layout: Optional[str],
    num_channels: Optional[int],
    channel_names: Optional[Sequence[str]],
) -> None:
    """Reject bad flags before any file is read."""
    if q_bits not in Q_BITS:
        raise ValueError(f"--q-bits {q_bits} is not supported; use one of {Q_BITS}.")
    if q_group_size not in Q_GROUP_SIZES:
        raise ValueError(
            f"--q-group-size {q_group_size} is not supported; use one of {Q_GROUP_SIZES}."
        )
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(
            f"--dtype {dtype} is not supported; use one of {', '.join(DTYPES)}."
        )
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(
            f"--layout {layout} is not supported; use one of {', '.join(LAYOUTS)}."
        )
    if num_channels is not None and num_channels < 1:
        raise ValueError(f"--num-channels must be >= 1, got {num_channels}.")
    if channel_names is not None:
        if num_channels is not None and len(channel_names) != num_channels:
            raise ValueError(
                f"--channel-names gives {len(channel_names)} names but --num-channels "
                f"is {num_channels}."
            )


def read_config(src: Path) -> dict:
    f = src / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"No config.json in {src}.")
    try:
        config = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e}).") from e
    check_config(config, {}, src)
    return config


def text_config(config: dict) -> dict:
    """The language model's entries (Qwen3.5 VL-style configs nest them)."""
    return config.get("text_config") or config


def detect(config: dict, src: Path) -> Tuple[Family, Optional[str], str]:
    """``(family, implied layout or None, architecture)`` from ``config.json``."""
    family = find_family(config.get("model_type"))
    archs = list(config.get("architectures") or [])
    if family is None:
        raise ValueError(
            f"Unknown model_type {config.get('model_type')!r} in {src / 'config.json'}; "
            f"the converter reads {', '.join(model_types())}."
        )
    if config.get("quantization") or config.get("quantization_config"):
        raise ValueError(
            f"{src} is already quantized (config.json has a quantization entry); "
            "convert the unquantized checkpoint instead."
        )
    if not archs:
        return family, None, f"{config['model_type']} (no architectures entry)"
    arch = archs[0]
    known = architectures()
    if arch not in known:
        raise ValueError(
            f"Unknown architecture {arch!r} in {src / 'config.json'}; the converter "
            f"reads {', '.join(known)}."
        )
    arch_family, layout = known[arch]
    if arch_family is not family:
        raise ValueError(
            f"Inconsistent config in {src / 'config.json'}: architecture {arch} is a "
            f"{arch_family.name} model but model_type is {config['model_type']!r}."
        )
    return family, layout, arch


def rename(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Map ``model.language_model.`` to ``model.``; drop reference-only tensors
    (the §7 ``gate_in_norm`` / ``role_gating`` weights, RoPE buffers)."""
    out = {}
    for k, v in weights.items():
        if any(d in k for d in DROPPED):
            continue
        out[k.replace("model.language_model.", "model.", 1)] = v
    return out


def stream_entry(
    config: dict,
    weights: Dict[str, mx.array],
    src: Path,
    family: Family,
    arch_layout: Optional[str],
    *,
    layout: Optional[str],
    num_channels: Optional[int],
    channel_names: Optional[List[str]],
) -> Tuple[int, dict, str]:
    """``(num_channels, stream facts, description)``; the facts are
    ``num_channels``, ``multistream`` and the family's own (Qwen3.5: DeltaNet modes)."""
    table = weights.get(CHANNEL_KEY)
    ms = dict(config.get("multistream") or {})
    arch = (config.get("architectures") or [config.get("model_type")])[0]
    if table is not None:
        n = int(table.shape[0])
        if num_channels is not None and num_channels != n:
            raise ValueError(
                f"--num-channels {num_channels} disagrees with {CHANNEL_KEY} "
                f"{tuple(table.shape)} in {src}; a trained channel table cannot be resized."
            )
        if "num_channels" in config and int(config["num_channels"]) != n:
            warn(
                f"config.json says num_channels {config['num_channels']} but "
                f"{CHANNEL_KEY} has {n} rows; using {n} (the tensor wins)."
            )
        found = arch_layout or ROWS  # a ForCausalLM with a channel table is §7
        section = family.sections.get(found, "")
        about = f"{section} {found} model ({arch})".strip()
    else:
        if arch_layout is not None:
            raise ValueError(
                f"Missing tensor {CHANNEL_KEY} in {src}; {arch} checkpoints carry one."
            )
        if (
            "num_channels" in config
            and config.get("channel_embedding_method") != "none"
        ):
            raise ValueError(
                f"Missing tensor {CHANNEL_KEY} in {src}; config.json has num_channels "
                f"{config['num_channels']}, so it is a §7 stream checkpoint."
            )
        found = family.layouts[0]  # Qwen3.5 runs its DeltaNet state row by row: rows
        n = (
            num_channels
            or (len(channel_names) if channel_names else None)
            or config.get("num_channels")
            or len(ms.get("channel_names") or [])
            or (10 if (layout or ms.get("layout") or found) == ROWS else 3)
        )
        n = int(n)
        about = f"plain {config['model_type']} base model ({arch}; new channel table)"
    if layout is not None:
        ms["layout"] = layout
    ms.setdefault("layout", found)
    default = rows_spec(n) if ms["layout"] == ROWS else blocks_spec(n)
    ms = {**default.to_config(), **ms}  # inputs: User (rows); system, user (blocks)
    if channel_names is not None:
        if len(channel_names) != n:
            raise ValueError(
                f"--channel-names gives {len(channel_names)} names but the model has "
                f"{n} channels."
            )
        ms["channel_names"] = list(channel_names)
    facts = stream_facts({**config, "num_channels": n, "multistream": ms}, {})
    return n, facts, about


def load_source_tokenizer(src: Path):
    from mlx_lm.utils import load_tokenizer

    hint = "copy the base model's tokenizer files next to the weights"
    # transformers builds an empty Qwen tokenizer from config.json alone: look first
    if not any(next(src.glob(p), None) for p in TOKENIZER_FILES):
        raise ValueError(
            f"Cannot load a tokenizer from {src} (no {', '.join(TOKENIZER_FILES)}); "
            f"{hint}."
        )
    try:
        return load_tokenizer(src)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"Cannot load a tokenizer from {src} ({first}); {hint}."
        ) from e


def check_weights(model, weights: Dict[str, mx.array], src: Path, config: dict) -> None:
    """Every parameter present with its shape, nothing extra, all floating point."""
    expected = dict(tree_flatten(model.parameters()))
    for k, v in expected.items():
        if k not in weights:
            hint = ""
            if k == "lm_head.weight":
                hint = " (config.json has tie_word_embeddings false)"
            raise ValueError(f"Missing tensor {k} in {src}{hint}.")
        got = tuple(weights[k].shape)
        if got != tuple(v.shape):
            raise ValueError(
                f"Wrong shape for {k} in {src}: {got}, but config.json implies "
                f"{tuple(v.shape)}."
            )
        if not mx.issubdtype(weights[k].dtype, mx.floating):
            raise ValueError(
                f"Tensor {k} in {src} has dtype {weights[k].dtype}; expected "
                "float32, bfloat16 or float16."
            )
    extra = sorted(set(weights) - set(expected))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise ValueError(
            f"Unexpected tensor {extra[0]}{more} in {src}: not part of a "
            f"{config['model_type']} model with "
            f"{text_config(config)['num_hidden_layers']} layers."
        )


def model_card(
    folder: Path, *, name: str, base: Optional[str], family: str, config: dict
):
    from huggingface_hub import ModelCard
    from mlx_lm.utils import create_model_card

    create_model_card(folder, None)
    card = ModelCard.load(folder / "README.md")
    card.data.tags = list(card.data.tags or []) + ["multi-stream", "mstream-mlx"]
    if base:
        card.data.base_model = base
    ms = config["multistream"]
    q = config.get("quantization")
    quant = (
        f", quantized to {q['bits']} bits (group size {q['group_size']})" if q else ""
    )
    card.text = (
        f"# {name}\n\n"
        f"A multi-stream LLM ({family}) converted to MLX with mstream-mlx{quant}.\n"
        f"Layout: {ms['layout']}; {config['num_channels']} streams: "
        f"{', '.join(ms['channel_names'])} (inputs: "
        f"{', '.join(ms['channel_names'][c] for c in ms['input_channels'])}).\n\n"
        "```python\nimport mstream_mlx\n\n"
        f'model, tokenizer = mstream_mlx.load("{name}")\n```\n'
    )
    card.save(str(folder / "README.md"))


def upload(folder: Path, repo: str) -> None:
    # Not mlx_lm.utils.upload_to_hub: it rewrites the card with mlx_lm.load usage,
    # which cannot load a multi-stream model.
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id=repo, exist_ok=True)
    api.upload_large_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    info(f"Uploaded to https://huggingface.co/{repo}")


def convert(
    hf_path: str,
    mlx_path: str,
    *,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: Optional[str] = None,
    upload_repo: Optional[str] = None,
    force: bool = False,
    layout: Optional[str] = None,
    num_channels: Optional[int] = None,
    channel_names: Optional[Sequence[str]] = None,
    revision: Optional[str] = None,
    heads: Optional[Sequence[str]] = None,
) -> Path:
    """Convert a PyTorch-side checkpoint into an MLX model folder.

    Args:
        hf_path: a local folder or a Hugging Face Hub repo id.
        mlx_path: the output folder; it must not exist unless ``force``.
        quantize: quantize Linear and Embedding layers (the channel table and the
            norms stay in ``dtype``).
        q_bits, q_group_size: affine quantization settings.
        dtype: ``float16``, ``bfloat16`` or ``float32``; default the stored dtype.
        upload_repo: a Hub repo to upload the folder to afterwards.
        force: replace an existing ``mlx_path`` (only once the new one is complete).
        layout, num_channels, channel_names: the stream spec of a plain base model;
            for a stream checkpoint they override (names, layout) or must agree
            with (channel count) what it carries.
        revision: Hub revision.
        heads: the output streams that generate by default, written to
            ``multistream.heads`` (default: the source's, else the reference
            evaluation's one assistant head for a §5-6 checkpoint, else every output
            stream, which leaves the key out; docs/convert.md).

    Returns:
        The output folder.
    """
    channel_names = list(channel_names) if channel_names else None
    check_options(
        q_bits=q_bits,
        q_group_size=q_group_size,
        dtype=dtype,
        layout=layout,
        num_channels=num_channels,
        channel_names=channel_names,
    )
    dst = check_destination(utf8_path("--mlx-path", mlx_path), force)
    local = Path(hf_path).expanduser().exists()
    src = resolve_model_path(str(hf_path), revision)
    check_apart(dst, src, "--mlx-path")
    config = read_config(src)
    family, arch_layout, _ = detect(config, src)
    weights = rename(read_weights(src))
    check_config(config, {k: v.shape for k, v in weights.items()}, src, vocab=False)
    if EMBED_KEY not in weights:
        raise ValueError(f"Missing tensor {EMBED_KEY} in {src}.")
    n, facts, about = stream_entry(
        config,
        weights,
        src,
        family,
        arch_layout,
        layout=layout,
        num_channels=num_channels,
        channel_names=channel_names,
    )
    ms = facts["multistream"]
    family.check_layout(ms["layout"], str(src))
    check_outputs(ms, n, str(src))
    set_folder_heads(config, ms, n, heads)
    tokenizer = load_source_tokenizer(src)
    if ms["layout"] == ROWS and ms.get("silence_token_id") is None:
        ms["silence_token_id"] = silence_token_id(tokenizer)  # never hard-code it (docs/design.md)
    stored = weights[EMBED_KEY].dtype
    info(f"{src}: {about}, {n} channels, {str(stored).split('.')[-1]} weights.")

    cfg = {k: v for k, v in config.items() if k not in ("_name_or_path", "auto_map")}
    if "text_config" in cfg:
        cfg["text_config"] = dict(cfg["text_config"])
    text = text_config(cfg)  # where vocab_size lives; stream facts stay at the top
    vocab = int(weights[EMBED_KEY].shape[0])
    if "vocab_size" in text and int(text["vocab_size"]) != vocab:
        warn(
            f"config.json says vocab_size {text['vocab_size']} but {EMBED_KEY} has "
            f"{vocab} rows; using {vocab} (the tensor wins, as in the reference)."
        )
    text["vocab_size"] = vocab
    cfg.update(
        facts,
        architectures=[family.saved_architecture(ms["layout"], cfg["model_type"])],
    )
    tied = {**cfg, **text}.get("tie_word_embeddings")
    if tied and "lm_head.weight" in weights:
        if not mx.array_equal(weights["lm_head.weight"], weights[EMBED_KEY]).item():
            warn(
                f"tie_word_embeddings is true but {src} has its own lm_head.weight; "
                "it is ignored, as transformers ties the head to the embedding."
            )
    if config.get("channel_embedding_method") == "none" and CHANNEL_KEY not in weights:
        # §7 "none": no channel table at all, i.e. a zero table.
        weights[CHANNEL_KEY] = mx.zeros((n, weights[EMBED_KEY].shape[1]), stored)

    model_class, args_class = get_model_classes(cfg)
    try:
        model = model_class(args_class.from_dict(cfg))
    except (TypeError, KeyError) as e:
        raise ValueError(f"Inconsistent config in {src / 'config.json'}: {e}") from e
    # Vectors (norms, biases; tiny) in fp32 until the final cast: the +1 Qwen3.5's
    # sanitize adds to its (1+w) norms is then exact (a 16-bit add would round it).
    weights = {
        k: (
            v.astype(mx.float32)
            if v.ndim == 1 and mx.issubdtype(v.dtype, mx.floating)
            else v
        )
        for k, v in weights.items()
    }
    weights = model.sanitize(weights)  # a base model gets its N(0, 0.02) table here
    check_weights(model, weights, src, cfg)
    model.load_weights(list(weights.items()))
    del weights

    target = getattr(mx, dtype) if dtype else stored
    cast = getattr(model, "cast_predicate", lambda _: True)  # Qwen3.5: not A_log
    model.update(
        tree_map_with_path(
            lambda k, v: (
                v
                if not mx.issubdtype(v.dtype, mx.floating)
                else v.astype(target if cast(k) else mx.float32)
            ),
            model.parameters(),
        )
    )
    dtype_name = str(target).split(".")[-1]
    cfg["torch_dtype"] = dtype_name
    if "dtype" in cfg:
        cfg["dtype"] = dtype_name
    if quantize:
        from mlx_lm.utils import quantize_model

        with redirect_stdout(sys.stderr):  # mlx-lm prints its bits line to stdout
            model, cfg = quantize_model(
                model, cfg, q_group_size, q_bits, quant_predicate=model.quant_predicate
            )
    mx.eval(model.parameters())

    from mlx_lm.utils import save_config, save_model

    with atomic_folder(dst, force) as tmp:
        save_model(tmp, model, donate_model=True)
        save_config(cfg, tmp / "config.json")
        copy_side_files(src, tmp)
        model_card(
            tmp,
            name=upload_repo or dst.name,
            base=None if local else str(hf_path),
            family=about,
            config=cfg,
        )
    info(f"Wrote {dst}")
    if upload_repo:
        try:
            upload(dst, upload_repo)
        except Exception as e:  # offline, no token, no rights: the folder is done
            raise ValueError(
                f"Wrote {dst}, but uploading it to {upload_repo} failed "
                f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); upload it "
                f"later with: huggingface-cli upload {upload_repo} {dst}"
            ) from e
    return dst

# Copyright © 2026 mstream-mlx contributors.
"""MLX model folders (e.g. after LoRA fuse) back to PyTorch-loadable safetensors.

The output is what the reference training writes: HF key names (MLX keeps them 1:1),
``config.json`` with the class name the family saves for the layout and
``model_type`` (the reference's ``Qwen*ForMultiStream`` for blocks models,
``Qwen*ForCausalLM`` + ``num_channels`` for rows models, ``StreamQwen3_5ForCausalLM``
or ``StreamQwen3_5MoeForCausalLM`` for Qwen3.5) and ``num_channels`` always written (the
reference's code defaults, 5 or 3, would otherwise size the channel table),
safetensors with ``format: pt`` metadata (sharded ≤ 5 GB with an HF index when
large), and the tokenizer files.  Quantized folders are dequantized first.  torch is
not needed.

Each family undoes its own ``sanitize`` (``Family.to_reference``).  Qwen3.5's: conv
weights back to ``[D, 1, K]``, the (1+w) norms back to w, stacked experts back to the
fused ``gate_up_proj`` / ``down_proj``, plus its DeltaNet modes in ``config.json``.
The w of the (1+w) norms is written in float32 (``Family.keep_fp32``, as ``A_log``
stays): then ``(1+w) - 1`` is exact for 16-bit models, so MLX -> PyTorch -> MLX is
bit-exact (for float32 models wherever 1+w >= 0.5; below that, w itself would need
more bits).
"""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from mstream_mlx.models import family_for
from mstream_mlx.utils import load_model, resolve_model_path

from mstream_mlx.atomic import atomic_folder, check_destination
from mstream_mlx.checks import utf8_path
from mstream_mlx.folders import check_apart, copy_side_files
from .hf_to_mlx import DTYPES, info

MLX_ONLY_KEYS = ("quantization", "quantization_config")


def save_torch_weights(folder: Path, weights: dict) -> None:
    """HF ``save_pretrained`` layout: one ``model.safetensors`` or 5 GB shards + index."""
    from mlx_lm.utils import make_shards

    shards = make_shards(weights)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            for i in range(len(shards))
        ]
    )
    weight_map = {}
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (folder / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2)
        )


def export(
    model: str,
    torch_path: str,
    *,
    dtype: Optional[str] = None,
    force: bool = False,
    revision: Optional[str] = None,
) -> Path:
    """Write an MLX model folder as a PyTorch (reference-loadable) checkpoint folder.

    Args:
        model: an MLX model folder or Hub repo id.
        torch_path: the output folder; it must not exist unless ``force``.
        dtype: ``float16``, ``bfloat16`` or ``float32``; default the model's dtype
            (a quantized model's scale dtype).
        force: replace an existing ``torch_path`` (only once the new one is complete).
        revision: Hub revision.

    Returns:
        The output folder.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(
            f"--dtype {dtype} is not supported; use one of {', '.join(DTYPES)}."
        )
    dst = check_destination(utf8_path("--torch-path", torch_path), force)
    src = resolve_model_path(str(model), revision)
    check_apart(dst, src, "--torch-path")
    mlx_model, _ = load_model(src)
    config = json.loads((src / "config.json").read_text())
    if "quantization" in config:
        from mlx_lm.utils import dequantize_model

        q = config["quantization"]
        info(f"Dequantizing ({q.get('bits')}-bit, group size {q.get('group_size')}).")
        mlx_model = dequantize_model(mlx_model)
    weights = dict(tree_flatten(mlx_model.parameters()))
    target = getattr(mx, dtype) if dtype else weights["model.embed_tokens.weight"].dtype
    args = mlx_model.args
    family = family_for(config)
    weights = family.to_reference(weights)
    model_cast = getattr(mlx_model, "cast_predicate", lambda _: True)  # not A_log

    def cast(k: str) -> bool:
        return model_cast(k) and not family.keep_fp32(k)

    weights = {
        k: v.astype(target) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in weights.items()
    }
    mx.eval(weights)

    layout = args.multistream["layout"]
    out = {k: v for k, v in config.items() if k not in MLX_ONLY_KEYS}
    dtype_name = str(target).split(".")[-1]
    out.update(
        architectures=[family.saved_architecture(layout, config.get("model_type"))],
        num_channels=args.num_channels,
        multistream=args.multistream,  # harmless to transformers; kept for re-conversion
        torch_dtype=dtype_name,
    )
    if "dtype" in out:
        out["dtype"] = dtype_name
    out.update(family.extra_facts(vars(args)))  # as the model ran (defaults included)
    with atomic_folder(dst, force) as tmp:
        save_torch_weights(tmp, weights)
        (tmp / "config.json").write_text(
            json.dumps(out, indent=2, sort_keys=True) + "\n"
        )
        copy_side_files(src, tmp)
    info(
        f"Wrote {dst} ({out['architectures'][0]}, {args.num_channels} channels, {dtype_name})."
    )
    return dst

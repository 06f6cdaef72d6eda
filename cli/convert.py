# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx convert`` (PyTorch checkpoint -> MLX folder) and ``mstream-mlx export``
(MLX folder -> PyTorch safetensors): flags as ``mlx_lm.convert`` spells them."""

from typing import Optional

import typer

from .common import REVISION, user_errors


def convert(
    hf_path: str = typer.Option(
        ...,
        "--hf-path",
        "--model",
        help="Source checkpoint: a local folder or a Hub repo id.",
    ),
    mlx_path: str = typer.Option(
        "mlx_model", "--mlx-path", help="Output MLX model folder."
    ),
    quantize: bool = typer.Option(
        False, "-q", "--quantize", help="Quantize the weights."
    ),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits per weight when quantizing."),
    q_group_size: int = typer.Option(
        64, "--q-group-size", help="Quantization group size."
    ),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="float16, bfloat16 or float32 (default: as stored)."
    ),
    upload_repo: Optional[str] = typer.Option(
        None, "--upload-repo", help="Hub repo to upload the converted folder to."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing --mlx-path."
    ),
    layout: Optional[str] = typer.Option(
        None,
        "--layout",
        help="rows or blocks (base models; default blocks, Qwen3.5 rows).",
    ),
    num_channels: Optional[int] = typer.Option(
        None, "--num-channels", help="Channels of a new channel table (base models)."
    ),
    channel_names: Optional[str] = typer.Option(
        None,
        "--channel-names",
        help="Comma-separated stream names, e.g. system,user,assistant.",
    ),
    revision: Optional[str] = REVISION,
    heads: Optional[str] = typer.Option(
        None,
        "--heads",
        help="Output streams that generate by default, e.g. assistant,auditor "
        "(default: the source's; a §5-6 reference checkpoint: assistant).",
    ),
):
    """Convert a multi-stream PyTorch checkpoint (or a plain Qwen base) to MLX."""
    from mstream_mlx.convert.hf_to_mlx import convert as run

    names = [n.strip() for n in channel_names.split(",")] if channel_names else None
    from mstream_mlx.heads import parse_heads

    # ImportError: a PyTorch .bin checkpoint and no torch installed
    with user_errors(ImportError):
        run(
            hf_path,
            mlx_path,
            quantize=quantize,
            q_bits=q_bits,
            q_group_size=q_group_size,
            dtype=dtype,
            upload_repo=upload_repo,
            force=force,
            layout=layout,
            num_channels=num_channels,
            channel_names=names,
            revision=revision,
            heads=parse_heads(heads),
        )


def export(
    model: str = typer.Option(..., "--model", help="MLX model folder or Hub repo id."),
    torch_path: str = typer.Option(..., "--torch-path", help="Output PyTorch folder."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="float16, bfloat16 or float32 (default: the model's)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing --torch-path."
    ),
    revision: Optional[str] = REVISION,
):
    """Export an MLX model folder as PyTorch safetensors the reference code loads."""
    from mstream_mlx.convert.mlx_to_torch import export as run

    with user_errors(ImportError):
        run(model, torch_path, dtype=dtype, force=force, revision=revision)

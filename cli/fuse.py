# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx fuse``: merge trained adapters into a model folder (``mlx_lm.fuse``'s
flags)."""

import sys
from contextlib import redirect_stdout

import typer

from .common import user_errors


def fuse(
    model: str = typer.Option(..., "--model", help="The base model folder or Hub id."),
    adapter_path: str = typer.Option(
        "adapters", "--adapter-path", help="Folder written by mstream-mlx lora."
    ),
    save_path: str = typer.Option(
        "fused_model", "--save-path", help="Output model folder."
    ),
    dequantize: bool = typer.Option(
        False,
        "--dequantize",
        help="Write full-precision weights (QLoRA on a quantized base).",
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing --save-path."
    ),
):
    """Fuse LoRA/DoRA adapters (and the trained channel embedding) into a model."""
    from mstream_mlx.tuner.fuse import fuse as run

    with user_errors(), redirect_stdout(sys.stderr):  # mlx-lm prints
        run(
            model,
            adapter_path,
            save_path,
            dequantize=dequantize,
            force=force,
            log=lambda m: typer.echo(m, err=True),
        )

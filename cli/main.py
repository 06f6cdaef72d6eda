# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx <command>``: one thin typer command per module, as mlx-lm has."""

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


@app.callback()
def _group():
    """Multi-stream LLMs on MLX: generate, chat, convert, lora, fuse, bench."""


@app.command()
def version():
    """Print the installed version."""
    from mstream_mlx import __version__

    typer.echo(__version__)

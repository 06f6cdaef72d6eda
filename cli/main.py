# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx <command>``: one thin typer command per module, as mlx-lm has."""

import os
import sys

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Multi-stream LLMs on MLX: generate, chat, convert, lora, fuse, bench.",
    # -h as mlx-lm accepts it, on every command (subcommands inherit it)
    context_settings={"help_option_names": ["-h", "--help"]},
    # click's plain help, as mlx-lm's argparse prints: nothing cut at 80 columns, flags
    # shown as flags, and no rich/markdown import (0.3 s of every `--help`)
    rich_markup_mode=None,
)

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


@app.callback()
def _group():
    pass  # a callback keeps `mstream-mlx <command>` a group even with one command


@app.command()
def version():
    """Print the installed version."""
    from mstream_mlx import __version__

    typer.echo(__version__)


from . import generate as _generate  # noqa: E402

app.command("generate")(_generate.generate_command)

from . import chat as _chat  # noqa: E402

app.command("chat")(_chat.chat_command)

from . import convert as _convert  # noqa: E402

app.command("convert")(_convert.convert)
app.command("export")(_convert.export)

from . import fuse as _fuse, lora as _lora  # noqa: E402

app.command("lora")(_lora.lora)
app.command("fuse")(_fuse.fuse)

from . import bench as _bench, server as _server  # noqa: E402

app.command("bench")(_bench.bench_command)
app.command("server")(_server.server_command)


def _prefer_openblas():
    """Re-exec once with Debian's OpenBLAS preloaded (Linux only).

    MLX's Linux CPU wheel bundles reference BLAS (~2.5 GFLOP/s fp32); OpenBLAS gives
    the same results 17-80x faster depending on load (docs/linux.md), but only if
    loaded before the process starts.
    """
    preload = os.environ.get("LD_PRELOAD", "")
    if (
        sys.platform != "linux"
        or _wants_help()  # help computes nothing: no second start
        or not os.path.exists(OPENBLAS)
        or "openblas" in preload
        or os.environ.get("MSTREAM_MLX_NO_PRELOAD")
    ):
        return
    env = dict(os.environ, LD_PRELOAD=f"{OPENBLAS}:{preload}".rstrip(":"))
    argv = [sys.executable, "-m", "mstream_mlx.cli.main", *sys.argv[1:]]
    os.execve(sys.executable, argv, env)


def _wants_help() -> bool:
    return len(sys.argv) < 2 or bool({"-h", "--help"} & set(sys.argv[1:]))


# Commands that never need torch (a reference checkpoint imports it when it is read).
NO_TORCH = ("generate", "chat", "server", "lora", "fuse")


def _import_mlx_lm_without_torch():
    """Import mlx-lm as an install without torch would see it.

    mlx-lm imports transformers, and transformers imports torch whenever it is installed
    (1-1.5 s, more than the rest of a `generate` run together: docs/linux.md) only to
    offer PyTorch tensors, which mlx-lm never asks for. ``sys.modules["torch"] = None``
    makes transformers see no torch while it is imported; a later ``import torch`` (a
    reference checkpoint, ``convert``) works as usual.
    """
    if _wants_help() or sys.argv[1] not in NO_TORCH or "transformers" in sys.modules:
        return
    sys.modules["torch"] = None
    try:
        import mlx_lm  # noqa: F401
    finally:
        del sys.modules["torch"]


def main():
    _prefer_openblas()
    _import_mlx_lm_without_torch()
    app(prog_name="mstream-mlx")


if __name__ == "__main__":
    main()

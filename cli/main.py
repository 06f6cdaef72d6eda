# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx <command>``: one thin typer command per module, as mlx-lm has."""

import os
import sys

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Multi-stream LLMs on MLX: generate, chat, convert, lora, fuse, bench.",
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
    the same results ~80x faster, but only if loaded before the process starts.
    """
    preload = os.environ.get("LD_PRELOAD", "")
    if (
        sys.platform != "linux"
        or not os.path.exists(OPENBLAS)
        or "openblas" in preload
        or os.environ.get("MSTREAM_MLX_NO_PRELOAD")
    ):
        return
    env = dict(os.environ, LD_PRELOAD=f"{OPENBLAS}:{preload}".rstrip(":"))
    argv = [sys.executable, "-m", "mstream_mlx.cli.main", *sys.argv[1:]]
    os.execve(sys.executable, argv, env)


def main():
    _prefer_openblas()
    app(prog_name="mstream-mlx")


if __name__ == "__main__":
    main()

# Copyright © 2026 mstream-mlx contributors.
"""What the commands share: option declarations (mlx-lm's flag names), the bundled
default model, and the one way a user's mistake ends a command: a single
``Error: ...`` line on stderr and exit status 1, never a traceback."""

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Type

import typer

# ------------------------------------------------------------------- options
# Each is a typer default: ``model: Optional[str] = MODEL`` (typer copies it per use).
MODEL = typer.Option(
    None, "--model", help="Model folder or Hub id (default: the bundled model)."
)
ADAPTER_PATH = typer.Option(
    None, "--adapter-path", help="LoRA adapters from `mstream-mlx lora`."
)
SYSTEM_PROMPT = typer.Option(
    None,
    "--system-prompt",
    help="Blocks: the system block; rows: read first on the user stream (reference).",
)
TEMP = typer.Option(0.0, "--temp", help="Sampling temperature (0 = greedy).")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling mass.")
TOP_K = typer.Option(0, "--top-k", help="Keep the k best tokens (0 = off).")
SEED = typer.Option(None, "--seed", help="Seed of the MLX random generator.")
REVISION = typer.Option(None, "--revision", help="Hub revision.")
# Long sessions (docs/long-sessions.md): mlx-lm's KV quantization flags and our window.
KV_BITS = typer.Option(
    None, "--kv-bits", help="Quantize the KV cache to 4 or 8 bits (default: no quantization)."
)
KV_GROUP_SIZE = typer.Option(64, "--kv-group-size", help="Group size of KV quantization.")
QUANTIZED_KV_START = typer.Option(
    5000, "--quantized-kv-start", help="Cached tokens before the KV cache is quantized."
)
KV_WINDOW = typer.Option(
    None,
    "--kv-window",
    help="Keep the prompt and the last W timesteps in the KV cache (default: all).",
)
HEADS = typer.Option(
    None,
    "--heads",
    help="Comma-separated output streams that generate, e.g. assistant,auditor "
    "(default: the model's).",
)


# -------------------------------------------------------------------- errors
# What a user can get wrong (a value, a path, a file, a full disk).
USER_ERRORS = (ValueError, OSError)


def one_line(e: BaseException) -> str:
    """``e``'s message on one line (its whitespace collapsed), or its type's name."""
    return " ".join(str(e).split()) or type(e).__name__


def choice(flag: str, value: str, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``, else one ``ValueError`` naming ``flag``."""
    if value not in allowed:
        raise ValueError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}.")
    return value


def chosen_heads(model, text: Optional[str]) -> Tuple[str, ...]:
    """The heads a run on ``model`` uses for ``--heads TEXT`` (None: the model's); a
    bad value is one ``ValueError`` line."""
    from mstream_mlx.heads import head_names, parse_heads

    return head_names(model, parse_heads(text))


def heads_line(model, heads) -> str:
    """Which heads run: ``Heads: assistant (not generating: auditor, assistant2)``."""
    from mstream_mlx.heads import head_names

    names = head_names(model, heads)
    spec = model.streams
    idle = [spec.names[c] for c in spec.outputs if spec.names[c] not in names]
    rest = f" (not generating: {', '.join(idle)}; --heads chooses)" if idle else ""
    return f"Heads: {', '.join(names)}{rest}"


@contextmanager
def user_errors(*more: Type[Exception]) -> Iterator[None]:
    """Run a command's body; a ``ValueError``/``OSError`` (and any of ``more``) becomes
    ``Error: <one line>`` on stderr and exit status 1.

        with user_errors(ImportError):
            convert(...)
    """
    try:
        yield
    except typer.Exit:  # click's Exit is a RuntimeError: a command's own exit passes
        raise
    except (*USER_ERRORS, *more) as e:
        typer.echo(f"Error: {one_line(e)}", err=True)
        raise typer.Exit(1)

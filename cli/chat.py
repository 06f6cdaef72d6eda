# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx chat``: type while a multi-stream model thinks and talks, every stream
live (full screen), or line by line when stdin is not a terminal (``--plain``)."""

import sys
from typing import Optional

import typer

TICK_SCREEN = 0.2  # default seconds per timestep full screen: readable as it scrolls


def chat_command(
    model: Optional[str] = typer.Option(
        None, "--model", help="Model folder or Hub id (default: the bundled model)."
    ),
    adapter_path: Optional[str] = typer.Option(
        None, "--adapter-path", help="LoRA adapters from `mstream-mlx lora`."
    ),
    tick: Optional[float] = typer.Option(
        None, "--tick",
        help=f"Seconds per timestep, 0 = as fast as the model goes "
        f"(default {TICK_SCREEN} full screen, 0 with --plain).",
    ),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k best tokens (0 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the MLX random generator."),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", "-m",
        help="Per output stream: blocks: tokens per turn (default 256); rows: "
        "non-silence tokens per session (default no limit).",
    ),
    max_steps: Optional[int] = typer.Option(
        None, "--max-steps",
        help="Timesteps per turn: blocks (default 4096) and plain-mode rows turns "
        "(default 200); a full-screen rows session runs until /reset.",
    ),
    system_prompt: Optional[str] = typer.Option(
        None, "--system-prompt",
        help="Blocks: the system block; rows: read first on the user stream (reference).",
    ),
    close_after: float = typer.Option(
        2.0, "--close-after",
        help="Blocks: seconds the user block stays open for more text after its last "
        "token is read (0 = close at once, as the reference).",
    ),
    hide_thinking: bool = typer.Option(
        False, "--hide-thinking",
        help="Start with the thinking/auditor streams hidden (Tab toggles).",
    ),
    plain: bool = typer.Option(
        False, "--plain",
        help="Line mode: read messages from stdin, print the streams (automatic when "
        "stdin or stdout is not a terminal).",
    ),
):
    """Chat with a multi-stream model: type while it thinks and talks."""
    try:
        code = _run(locals())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        typer.echo(f"Error: {msg}", err=True)
        raise typer.Exit(1)
    raise typer.Exit(code)


def _run(a: dict) -> int:
    from mstream_mlx.chat import ChatEngine, ChatOptions, run_plain
    from mstream_mlx.utils import resolve_model_path

    from .generate import default_model_path

    plain = a["plain"] or not (sys.stdin.isatty() and sys.stdout.isatty())
    if a["model"]:
        path, label = resolve_model_path(a["model"]), a["model"]
    else:
        path = default_model_path()
        label = "bundled default model"
    tick = a["tick"] if a["tick"] is not None else (0.0 if plain else TICK_SCREEN)
    opts = ChatOptions(
        model=str(path), label=label, adapter_path=a["adapter_path"], tick=tick,
        temp=a["temp"], top_p=a["top_p"], top_k=a["top_k"], seed=a["seed"],
        max_tokens=a["max_tokens"], max_steps=a["max_steps"],
        system_prompt=a["system_prompt"], close_after=a["close_after"],
    )
    meta = {
        "model": label,
        "settings": {k: a[k] for k in ("temp", "top_p", "top_k", "seed", "max_tokens",
                                       "max_steps", "system_prompt", "close_after")},
    }
    meta["settings"]["tick"] = tick
    if plain:
        return run_plain(opts, hide_thinking=a["hide_thinking"], meta=meta)

    from mstream_mlx.chat.screen import ChatScreen

    engine = ChatEngine(opts)
    engine.start()
    try:
        error = ChatScreen(engine, hide_thinking=a["hide_thinking"], meta=meta).run()
    finally:
        try:
            engine.close()
        except KeyboardInterrupt:  # a second Ctrl-C while the last step finishes
            pass
    if error:
        raise RuntimeError(error)
    return 0

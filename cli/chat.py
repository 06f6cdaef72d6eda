# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx chat``: type while a multi-stream model thinks and talks, every stream
live (full screen), or line by line when stdin is not a terminal (``--plain``)."""

import sys
from dataclasses import replace
from typing import Optional

import typer

from mstream_mlx.checks import number, sampling_flags

from .common import (
    ADAPTER_PATH,
    HEADS,
    KV_BITS,
    KV_GROUP_SIZE,
    KV_WINDOW,
    MODEL,
    QUANTIZED_KV_START,
    SEED,
    SYSTEM_PROMPT,
    TEMP,
    TOP_K,
    TOP_P,
    user_errors,
)

TICK_SCREEN = 0.2  # default seconds per timestep full screen: readable as it scrolls
IDLE_PAUSE = 16  # rows: below the bundled model's trained pauses (24 rows at most)


def chat_command(
    model: Optional[str] = MODEL,
    adapter_path: Optional[str] = ADAPTER_PATH,
    tick: Optional[float] = typer.Option(
        None,
        "--tick",
        help=f"Seconds per timestep, 0 = as fast as the model goes "
        f"(default {TICK_SCREEN} full screen, 0 with --plain).",
    ),
    temp: float = TEMP,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    seed: Optional[int] = SEED,
    max_tokens: Optional[int] = typer.Option(
        None,
        "--max-tokens",
        "-m",
        help="Per output stream: blocks: tokens per turn (default 256); rows: "
        "non-silence tokens per session (default no limit).",
    ),
    max_steps: Optional[int] = typer.Option(
        None,
        "--max-steps",
        help="Timesteps per turn: blocks (default 4096) and plain-mode rows turns "
        "(default 200); a full-screen rows session runs until /reset.",
    ),
    system_prompt: Optional[str] = SYSTEM_PROMPT,
    heads: Optional[str] = HEADS,
    close_after: float = typer.Option(
        2.0,
        "--close-after",
        help="Blocks: seconds the user block stays open for more text after its last "
        "token is read (0 = close at once, as the reference).",
    ),
    hide_thinking: bool = typer.Option(
        False,
        "--hide-thinking",
        help="Start with the thinking/auditor streams hidden (Tab toggles).",
    ),
    kv_bits: Optional[int] = KV_BITS,
    kv_group_size: int = KV_GROUP_SIZE,
    quantized_kv_start: int = QUANTIZED_KV_START,
    kv_window: Optional[int] = KV_WINDOW,
    idle_pause: int = typer.Option(
        IDLE_PAUSE,
        "--idle-pause",
        help="Rows: stop the clock after this many all-silent rows with nothing typed, "
        "until you type again (0 = never).",
    ),
    plain: bool = typer.Option(
        False,
        "--plain",
        help="Line mode: read messages from stdin, print the streams (automatic when "
        "stdin or stdout is not a terminal).",
    ),
):
    """Chat with a multi-stream model: type while it thinks and talks."""
    from mstream_mlx.chat import ChatEngine, ChatOptions, run_plain
    from mstream_mlx.heads import parse_heads
    from mstream_mlx.utils import default_model_path, resolve_model_path

    with user_errors(RuntimeError):
        sampling_flags(temp=temp, top_p=top_p, top_k=top_k)
        number("--tick", tick, 0)
        number("--close-after", close_after, 0)
        plain = plain or not (sys.stdin.isatty() and sys.stdout.isatty())
        if model:
            path, label = resolve_model_path(model), model
        else:
            path, label = default_model_path(), "bundled default model"
        if tick is None:
            tick = 0.0 if plain else TICK_SCREEN
        opts = ChatOptions(
            model=str(path),
            label=label,
            adapter_path=adapter_path,
            tick=tick,
            temp=temp,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            max_tokens=max_tokens,
            max_steps=max_steps,
            system_prompt=system_prompt,
            close_after=close_after,
            heads=parse_heads(heads),
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            quantized_kv_start=quantized_kv_start,
            kv_window=kv_window,
            idle_pause=idle_pause,
        )
        # what a saved transcript records about this run
        meta = {
            "model": label,
            "settings": {
                "temp": temp,
                "top_p": top_p,
                "top_k": top_k,
                "seed": seed,
                "max_tokens": max_tokens,
                "max_steps": max_steps,
                "system_prompt": system_prompt,
                "close_after": close_after,
                "heads": heads,
                "tick": tick,
                "kv_bits": kv_bits,
                "kv_window": kv_window,
                "idle_pause": idle_pause,
            },
        }
        if plain:
            opts = replace(opts, idle_pause=0)  # plain: the clock runs per turn only
            raise typer.Exit(run_plain(opts, hide_thinking=hide_thinking, meta=meta))

        from mstream_mlx.chat.screen import ChatScreen

        engine = ChatEngine(opts)
        engine.start()
        try:
            error = ChatScreen(engine, hide_thinking=hide_thinking, meta=meta).run()
        finally:
            try:
                engine.close()
            except KeyboardInterrupt:  # a second Ctrl-C while the last step finishes
                pass
        if error:
            raise RuntimeError(error)

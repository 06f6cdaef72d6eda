# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx server``: serve a multi-stream model over local HTTP: an
OpenAI-compatible endpoint, live sessions, and a page at ``/`` (docs/server.md).
Flags and defaults follow ``mlx_lm.server``."""

import logging
from typing import List, Optional

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
    choice,
    user_errors,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def server_command(
    model: Optional[str] = MODEL,
    adapter_path: Optional[str] = ADAPTER_PATH,
    host: str = typer.Option("127.0.0.1", "--host", help="Host to listen on."),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0: a free one)."),
    temp: float = typer.Option(0.0, "--temp", help="Default sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Default nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", help="Default top-k (0 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Default min-p (0 = off)."),
    repetition_penalty: float = typer.Option(
        0.0, "--repetition-penalty", help="Default repetition penalty per stream (0 = off)."
    ),
    presence_penalty: float = typer.Option(
        0.0, "--presence-penalty", help="Default presence penalty per stream."
    ),
    sampler: str = typer.Option(
        "reference", "--sampler", help="reference (the layout's token selection) or mlx."
    ),
    seed: Optional[int] = SEED,
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", "-m",
        help="Default per output stream: blocks 256; rows: non-silence tokens, no limit.",
    ),
    max_steps: Optional[int] = typer.Option(
        None, "--max-steps",
        help="Timesteps of a chat completion (rows 200, blocks 4096).",
    ),
    system_prompt: Optional[str] = typer.Option(
        None, "--system-prompt",
        help="Default system prompt (blocks: the system block; rows: read first).",
    ),
    heads: Optional[str] = HEADS,
    head_prefill: List[str] = typer.Option(
        [], "--head-prefill",
        help="Blocks: text after 'assistant\\n' for each head, repeatable in head order.",
    ),
    no_stop_all: bool = typer.Option(
        False, "--no-stop-all",
        help="Blocks: the last head's <|im_end|> does not stop the other heads.",
    ),
    tick: float = typer.Option(
        0.2, "--tick", help="Live sessions' default seconds per timestep (0 = full speed)."
    ),
    max_sessions: int = typer.Option(
        8, "--max-sessions", help="Sessions at once (live + running completions); more: 429."
    ),
    max_body: int = typer.Option(
        1 << 20, "--max-body", help="Largest request body in bytes; larger: 413."
    ),
    idle_timeout: float = typer.Option(
        60.0, "--idle-timeout", help="Seconds a live session nobody listens to is kept."
    ),
    log_level: str = typer.Option(
        "INFO", "--log-level", help="DEBUG, INFO, WARNING, ERROR or CRITICAL."
    ),
    kv_bits: Optional[int] = KV_BITS,
    kv_group_size: int = KV_GROUP_SIZE,
    quantized_kv_start: int = QUANTIZED_KV_START,
    kv_window: Optional[int] = KV_WINDOW,
):
    """Serve a multi-stream model: OpenAI-compatible API, live sessions, a page at /."""
    with user_errors(RuntimeError):
        sampling_flags(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                       repetition_penalty=repetition_penalty, presence_penalty=presence_penalty)
        number("--tick", tick)  # its range: ServerConfig
        number("--idle-timeout", idle_timeout, 0, above=True)
        level = choice("--log-level", log_level.upper(), LOG_LEVELS)
        logging.basicConfig(level=level, format="%(message)s")
        from mstream_mlx.heads import parse_heads
        from mstream_mlx.server import ServerConfig, serve
        from mstream_mlx.utils import default_model_path

        cfg = ServerConfig(
            model=model or str(default_model_path()),
            model_id=model or "default_model",
            adapter_path=adapter_path,
            host=host,
            port=port,
            temp=temp,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            sampler=sampler,
            seed=seed,
            max_tokens=max_tokens,
            max_steps=max_steps,
            system_prompt=system_prompt,
            head_prefill=tuple(head_prefill),
            stop_all_on_last_head=not no_stop_all,
            tick=tick,
            max_sessions=max_sessions,
            max_body=max_body,
            idle_timeout=idle_timeout,
            heads=parse_heads(heads),
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            quantized_kv_start=quantized_kv_start,
            kv_window=kv_window,
        )
        if cfg.host not in LOOPBACK:
            typer.echo(
                f"[WARNING] Listening on {cfg.host}: anyone who can reach it may use "
                "the model; the server has no authentication.",
                err=True,
            )

        def ready(server):
            typer.echo(
                f"Serving {cfg.model_id} on {server.url} (page: {server.url}/)", err=True
            )

        serve(cfg, ready)

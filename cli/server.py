# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx server``: serve a multi-stream model over local HTTP: an
OpenAI-compatible endpoint, live sessions, and a page at ``/`` (docs/server.md).
Flags and defaults follow ``mlx_lm.server``."""

import logging
from typing import List, Optional

import typer

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def server_command(
    model: Optional[str] = typer.Option(
        None, "--model", help="Model folder or Hub id (default: the bundled model)."
    ),
    adapter_path: Optional[str] = typer.Option(
        None, "--adapter-path", help="LoRA adapters from `mstream-mlx lora`."
    ),
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
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the MLX random generator."),
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
):
    """Serve a multi-stream model: OpenAI-compatible API, live sessions, a page at /."""
    try:
        _run(locals())
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        typer.echo(f"Error: {msg}", err=True)
        raise typer.Exit(1)


def _run(a: dict):
    if a["log_level"].upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"--log-level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, "
                         f"got {a['log_level']!r}.")
    logging.basicConfig(level=a["log_level"].upper(), format="%(message)s")

    from mstream_mlx.server import ServerConfig, serve

    from .generate import default_model_path

    model = a["model"] or str(default_model_path())
    cfg = ServerConfig(
        model=model, model_id=a["model"] or "default_model",
        adapter_path=a["adapter_path"], host=a["host"], port=a["port"],
        temp=a["temp"], top_p=a["top_p"], top_k=a["top_k"], min_p=a["min_p"],
        repetition_penalty=a["repetition_penalty"], presence_penalty=a["presence_penalty"],
        sampler=a["sampler"], seed=a["seed"], max_tokens=a["max_tokens"],
        max_steps=a["max_steps"], system_prompt=a["system_prompt"],
        head_prefill=tuple(a["head_prefill"]), stop_all_on_last_head=not a["no_stop_all"],
        tick=a["tick"],
        max_sessions=a["max_sessions"], max_body=a["max_body"],
        idle_timeout=a["idle_timeout"],
    )
    if cfg.host not in LOOPBACK:
        typer.echo(f"[WARNING] Listening on {cfg.host}: anyone who can reach it may use the "
                   "model; the server has no authentication.", err=True)

    def ready(server):
        typer.echo(f"Serving {cfg.model_id} on {server.url} (page: {server.url}/)", err=True)

    serve(cfg, ready)

# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx bench``: multi-stream decode and prefill speed against mlx-lm on the
same weights (and the PyTorch reference loop where torch is available)."""

import json
from pathlib import Path
from typing import List, Optional

import typer

USER_ERRORS = (ValueError, OSError)


def _ints(text: str, flag: str) -> List[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}.")


def bench_command(
    model: Optional[str] = typer.Option(
        None, "--model", help="A model folder or Hub id (Qwen3/Qwen2 family)."
    ),
    shape: Optional[str] = typer.Option(
        None,
        "--shape",
        help="Random weights of a named shape instead: qwen3-0.6b, qwen3-4b, tiny.",
    ),
    streams: str = typer.Option(
        "1,2,3,4,10", "--streams", help="Numbers of streams decoding at once."
    ),
    prompt_tokens: int = typer.Option(
        512, "--prompt-tokens", help="Prompt length for the decode table."
    ),
    rows: int = typer.Option(128, "--rows", help="Decode timesteps per run."),
    prefill_tokens: str = typer.Option(
        "",
        "--prefill-tokens",
        help="Prompt lengths of the prefill table (default: --prompt-tokens).",
    ),
    dtype: Optional[str] = typer.Option(
        None,
        "--dtype",
        help="float32, bfloat16 or float16 (default: bfloat16 for --shape).",
    ),
    repeats: int = typer.Option(
        3, "--repeats", help="Timed runs; the median is reported."
    ),
    reference: Optional[bool] = typer.Option(
        None,
        "--reference/--no-reference",
        help="Time the PyTorch reference loop too (default: when importable).",
    ),
    reference_rows: Optional[int] = typer.Option(
        None, "--reference-rows", help="Decode timesteps of the reference loop."
    ),
    seed: int = typer.Option(0, "--seed", help="Random weights and prompt ids."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    output: Optional[str] = typer.Option(
        None, "--output", help="Also write the JSON report to this file."
    ),
):
    """Time multi-stream decode (N = 1, 2, 3, 4, 10) and prefill against mlx-lm."""
    from mstream_mlx.bench import BenchOptions, format_tables, measure

    try:
        opts = BenchOptions(
            streams=_ints(streams, "--streams"),
            prompt_tokens=prompt_tokens,
            rows=rows,
            prefill_tokens=_ints(prefill_tokens, "--prefill-tokens"),
            repeats=repeats,
            reference=reference,
            reference_rows=reference_rows,
            seed=seed,
        )
        report = measure(
            opts,
            model=model,
            shape=shape,
            dtype=dtype,
            log=lambda m: typer.echo(m, err=True),
        )
    except USER_ERRORS as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1)
    if output is not None:
        Path(output).write_text(json.dumps(report, indent=1) + "\n")
    typer.echo(json.dumps(report, indent=1) if as_json else format_tables(report))

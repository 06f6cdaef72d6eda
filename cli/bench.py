# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx bench``: multi-stream decode and prefill speed against mlx-lm on the
same weights (and the PyTorch reference loop where torch is available)."""

import json
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Optional

import typer

from .common import HEADS, user_errors


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
        help="Random weights of a named shape instead: qwen3-0.6b, qwen3-4b, qwen3-8b, tiny.",
    ),
    streams: str = typer.Option(
        "1,2,3,4,10", "--streams", help="Numbers of streams decoding at once."
    ),
    heads: Optional[str] = HEADS,
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
    from mstream_mlx.atomic import atomic_file, check_writable
    from mstream_mlx.benchmarks.decode import BenchOptions, format_tables, measure

    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    with user_errors():
        if output is not None:
            check_writable(output)  # now, not after the whole run
        opts = BenchOptions(
            streams=(
                _heads_n(model, heads) if heads is not None else _ints(streams, "--streams")
            ),
            prompt_tokens=prompt_tokens,
            rows=rows,
            prefill_tokens=_ints(prefill_tokens, "--prefill-tokens"),
            repeats=repeats,
            reference_rows=reference_rows,
            seed=seed,
        )
        report = measure(
            opts,
            model=model,
            shape=shape,
            dtype=dtype,
            reference=_reference(reference, log),
            log=log,
        )
        if output is not None:
            with atomic_file(output) as tmp:
                tmp.write_text(json.dumps(report, indent=1) + "\n")
    typer.echo(json.dumps(report, indent=1) if as_json else format_tables(report))


def _heads_n(model: Optional[str], heads: str) -> List[int]:
    """``--heads`` with ``--model``: time the number of heads such a run decodes (the
    names are checked against the model's streams; its weights are not loaded here)."""
    from mlx_lm.utils import load_config

    from mstream_mlx.heads import head_channels, parse_heads
    from mstream_mlx.streams import StreamSpec
    from mstream_mlx.utils import resolve_model_path, safetensors_shapes, stream_facts

    names = parse_heads(heads)
    if model is None:
        raise ValueError("--heads needs --model: the heads are that model's streams.")
    path = resolve_model_path(model)
    facts = stream_facts(load_config(path), safetensors_shapes(path))
    spec = StreamSpec.from_config(facts["multistream"], facts["num_channels"])
    return [len(head_channels(spec, names))]


def _reference(wanted: Optional[bool], log) -> Optional[ModuleType]:
    """The PyTorch reference implementation to time (``tests/reference`` of the source
    checkout this package runs from, with torch), or ``None``; says in one line why
    it is missing."""
    if wanted is False:
        return None
    import mstream_mlx

    checkout = Path(mstream_mlx.__file__).resolve().parents[1]
    try:
        import torch  # noqa: F401
    except ImportError:
        why = "torch is not installed (pip install 'mstream-mlx[torch]')"
    else:
        if not (checkout / "tests" / "reference" / "__init__.py").is_file():
            why = f"not a source checkout (no tests/reference in {checkout})"
        else:
            if str(checkout) not in sys.path:  # the console script's path lacks it
                sys.path.append(str(checkout))
            try:
                import tests.reference as impl
            except ModuleNotFoundError as e:
                why = f"the PyTorch reference needs {e.name}, which is not installed"
            else:
                return impl
    if wanted:
        raise ValueError(f"--reference: {why}.")
    log(f"[bench] no reference column: {why}.")
    return None

# Copyright © 2026 mstream-mlx contributors.
"""The command line's rough edges (issue 18): start-up imports, -h, flag help,
diagnostics on stderr, widths, summary numbers, the chat screen at 80x24 and 100x30.
Fast: the bundled model or tiny checkpoints."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

from mstream_mlx.cli.main import app

HEAVY = ("torch", "transformers", "mlx_lm", "mlx.core")
BUNDLED_PROMPT = "add five minus two add nine"


def run_main(*argv: str, env=None) -> dict:
    """Run ``mstream-mlx ARGV`` through its console entry in a fresh interpreter and
    return its exit code, output and which heavy modules it imported."""
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.argv = ["mstream-mlx", *{list(argv)!r}]
        from mstream_mlx.cli.main import main
        try:
            main()
            rc = 0
        except SystemExit as e:
            rc = e.code or 0
        sys.stdout.flush()
        print(json.dumps({{"rc": rc, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}),
              file=sys.stderr)
        """
    )
    env = dict(os.environ, MSTREAM_MLX_NO_PRELOAD="1", COLUMNS="80", **(env or {}))
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    *err, last = p.stderr.strip().splitlines()
    return dict(json.loads(last), out=p.stdout, err="\n".join(err))


# ------------------------------------------------------------------- start-up


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["version"], ["generate", "-h"]])
def test_help_and_version_import_nothing_heavy(argv):
    r = run_main(*argv)
    assert r["rc"] == 0, r
    assert r["heavy"] == [], f"mstream-mlx {' '.join(argv)} imported {r['heavy']}"


def test_generate_runs_without_importing_torch():
    r = run_main("generate", "-p", BUNDLED_PROMPT, "--no-color")
    assert r["rc"] == 0, r
    assert "torch" not in r["heavy"] and "transformers" in r["heavy"]
    assert "12" in r["out"]  # the bundled model's running total


def test_package_names_resolve_lazily():
    code = (
        "import sys, mstream_mlx\n"
        "assert 'mlx_lm' not in sys.modules\n"
        "import mstream_mlx.generate\n"  # binds the submodule: must stay the function
        "from mstream_mlx import generate, Session, load\n"
        "assert callable(generate) and generate.__module__ == 'mstream_mlx.generate'\n"
        "assert set(mstream_mlx.__all__) <= set(dir(mstream_mlx))\n"
        "assert all(getattr(mstream_mlx, n) is not None for n in mstream_mlx.__all__)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with pytest.raises(AttributeError):
        import mstream_mlx

        mstream_mlx.no_such_name


# ----------------------------------------------------------------- help text

COMMANDS = ["version", "generate", "chat", "convert", "export", "lora", "fuse", "bench",
            "server"]


def invoke(*argv, env=None):
    return CliRunner().invoke(
        app, list(argv), prog_name="mstream-mlx", env={"COLUMNS": "80", **(env or {})}
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_accepts_h_and_shows_flags_whole(command):
    r = invoke(command, "-h")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"Usage: mstream-mlx {command}")
    assert "<bool>" not in r.stdout  # a boolean is a plain flag: it takes no value
    assert "…" not in r.stdout  # nothing cut at 80 columns


def test_boolean_flags_are_plain_flags():
    help_line = next(l for l in invoke("lora", "-h").stdout.splitlines() if "--train" in l)
    assert help_line.split() == ["--train", "Train."]
    r = invoke("lora", "--train", "true")  # a flag takes no value: the extra word is refused
    assert r.exit_code == 2


def test_stream_config_help_is_whole():
    text = " ".join(invoke("generate", "-h").stdout.split())
    assert "NAME:temp=0.7,top_k=20,max_tokens=50,seed=1" in text


# ------------------------------------------------------- generate's text view


def test_bad_max_kv_size_fails_before_any_output():
    r = invoke("generate", "-p", "add five", "--max-kv-size", "0")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["Error: max_kv_size must be >= 1, got 0."]


def test_ten_streams_fit_the_terminal(tiny_checkpoint):
    rows = str(tiny_checkpoint("qwen3", "rows"))
    for cols in (80, 100):
        r = invoke("generate", "--model", rows, "-p", "what is one", "--max-steps", "3",
                   "--no-color", env={"COLUMNS": str(cols)})
        assert r.exit_code == 0, r.output
        lines = r.stdout.splitlines()
        assert len(lines) >= 5 and max(map(len, lines)) <= cols, r.stdout
        assert "Analytical" not in lines[1] and "Ana" in lines[1] and "…" in lines[1]
    wide = invoke("generate", "--model", rows, "-p", "what is one", "--max-steps", "3",
                  "--no-color", env={"COLUMNS": "200"})
    assert "Analytical" in wide.stdout.splitlines()[1]


def test_whitespace_tokens_are_not_shown_as_silence():
    from mstream_mlx.cli.generate import _cell, _word

    assert _word(" add") == "add"
    assert _word("\n") == "↵" and _word("  ") == "␣␣" and _word("\t") == "⇥"
    assert _word(" -") == "-"  # the rows silence token is the only "-"
    assert _cell("integrating", 10) == "integrati…" and _cell("add", 5) == " add "


def test_blocks_view_shows_newline_tokens(tiny_checkpoint):
    blocks = str(tiny_checkpoint("qwen3", "blocks"))
    r = invoke("generate", "--model", blocks, "-p", "what is one", "-m", "3", "--no-color")
    assert r.exit_code == 0, r.output
    cells = [l.split("|")[2].strip() for l in r.stdout.splitlines()[2:-1]]
    assert cells and "-" not in cells and "↵" in cells, r.stdout


# --------------------------------------------------------- diagnostics on stderr


def test_load_warnings_go_to_stderr(tiny_checkpoint):
    base = str(tiny_checkpoint("qwen3", "blocks", channel_embedding=False))
    r = invoke("generate", "--model", base, "-p", "hi", "-m", "1", "--no-color")
    assert r.exit_code == 0, r.output
    assert "no channel embedding" in r.stderr and "[WARNING]" not in r.stdout
    assert r.stdout.startswith("=" * 10)


def test_convert_quantization_line_goes_to_stderr(tiny_checkpoint, tmp_path):
    src = str(tiny_checkpoint("qwen3", "blocks"))
    r = invoke("convert", "--hf-path", src, "--mlx-path", str(tmp_path / "q"), "-q")
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and "Quantized model with" in r.stderr


# ------------------------------------------------------------- scripts


def test_convert_example_rerun_is_one_line_and_force_works(tiny_checkpoint, tmp_path):
    src, dst = str(tiny_checkpoint("qwen3", "rows")), str(tmp_path / "mlx")
    script = [sys.executable, "examples/convert_checkpoint.py", src, dst]
    run = lambda *extra: subprocess.run(  # noqa: E731
        [*script, *extra], capture_output=True, text=True, timeout=300
    )
    assert run().returncode == 0
    again = run()
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines() == [
        f"Error: {dst} already exists; pass --force to replace it."
    ]
    forced = run("--force")
    assert forced.returncode == 0, forced.stderr
    assert "rows model with streams" in forced.stdout


def test_parity_report_table_has_no_blank_lines(monkeypatch, capfd):
    from tests import parity_report, test_parity

    monkeypatch.setattr(parity_report, "FAMILIES", [("qwen3", True)])
    first = next(iter(test_parity.CASES.items()))
    monkeypatch.setattr(parity_report, "CASES", dict([first]))
    parity_report.main()
    out = capfd.readouterr().out.splitlines()
    table = out[next(i for i, l in enumerate(out) if l.startswith("| case |")):]
    assert len(table) == 3 and all(l.startswith("|") for l in table), out


# ------------------------------------------------------- numbers a user means


def test_summary_counts_what_was_read_and_said():
    events = [json.loads(l) for l in invoke("generate", "-p", BUNDLED_PROMPT, "--format",
                                             "jsonl").stdout.splitlines()]
    import mstream_mlx
    from mstream_mlx.utils import default_model_path

    spec = mstream_mlx.load(str(default_model_path()))[0].streams
    inputs, silence = [spec.names[c] for c in spec.inputs], spec.silence_token
    tokens = [(n, t) for e in events for n, t in e["tokens"].items() if t is not None]
    read = sum(1 for n, t in tokens if n in inputs and t != silence)
    said = sum(1 for n, t in tokens if n not in inputs and t != silence)
    quiet = sum(1 for n, t in tokens if n not in inputs and t == silence)
    assert read == 6 and 0 < said < quiet

    r = invoke("generate", "-p", BUNDLED_PROMPT)
    lines = r.stderr.splitlines()
    prompt, generation = next(lines[i:i + 2] for i, l in enumerate(lines) if l[:7] == "Prompt:")
    assert prompt == f"Prompt: {read} tokens read while generating"
    steps, steps_tps, n, tps = (
        float(x) for x in re.findall(r"([\d.]+) (?:timesteps|tokens)", generation)
    )
    assert n == said and steps >= said / len(spec.outputs)
    assert tps == pytest.approx(said * steps_tps / steps, rel=1e-3, abs=1e-3)
    assert generation.endswith(f"({quiet} silence tokens not counted)")


def test_summary_of_a_prefilled_prompt_keeps_mlx_lm_s_line():
    from mstream_mlx.events import StepEvent
    from mstream_mlx.generate import summary_lines

    ev = StepEvent(t=3, tokens={}, text={}, y={}, finished={}, finish_reason="stop",
                   prompt_tokens=17, prompt_tps=100.0, generation_timesteps=4,
                   timesteps_per_sec=8.0, generation_tokens=8, tokens_per_sec=16.0,
                   ttft=None, ttft_timesteps=None, peak_memory=0.001)
    assert summary_lines(ev)[:2] == [
        "Prompt: 17 tokens, 100.000 tokens-per-sec",
        "Generation: 4 timesteps, 8.000 timesteps-per-sec, 8 tokens, 16.000 tokens-per-sec",
    ]


def test_plain_chat_summary_counts_without_silence():
    p = subprocess.run(
        [sys.executable, "-m", "mstream_mlx.cli.main", "chat", "--plain"],
        input="add five minus two\nadd nine\n", capture_output=True, text=True,
        timeout=120, env=dict(os.environ, MSTREAM_MLX_NO_PRELOAD="1"),
    )
    assert p.returncode == 0, p.stderr
    assert "Prompt: 6 tokens read while generating" in p.stderr
    assert "silence tokens not counted" in p.stderr


def test_bench_targets_are_a_small_table():
    from mstream_mlx.benchmarks.decode import format_tables

    base = dict(timesteps_per_s=1.0, tokens_per_s=1.0, prefill_tps=1.0, ttft_s=0.1,
                peak_memory_gb=0.1)
    report = dict(
        device="cpu", name="micro", dtype="float32", params_b=0.0, prompt_tokens=8,
        rows=2, repeats=1, mlx="x", mlx_lm="y", baseline=base, streams=[], prefill=[],
        targets={
            "n1_within_5pct": {"ratio": 0.9712345678901234, "met": True},
            "aggregate_grows_with_n": {"tokens_per_s": {1: 100.123456789, 2: 90.5},
                                       "stops_growing_at": 2, "met": False},
            "baseline_tokens_per_s": {"value": 1.0},  # not a target: no row
        },
    )
    text = format_tables(report)
    table = text[text.index("| target |"):].splitlines()
    assert table == [
        "| target | met | measured |",
        "|---|---|---|",
        "| n1_within_5pct | yes | ratio 0.971 |",
        "| aggregate_grows_with_n | **no** | tokens_per_s 1: 100, 2: 90.5; "
        "stops_growing_at 2 |",
    ]


# ---------------------------------------------------------------- chat screen

needs_tmux = pytest.mark.skipif(
    __import__("shutil").which("tmux") is None, reason="tmux is not installed"
)


@needs_tmux
@pytest.mark.parametrize("size", [(80, 24), (100, 30)], ids=lambda s: "x".join(map(str, s)))
def test_chat_screen_fits_and_keeps_the_answer_in_view(size):
    from tests.test_chat import Tmux

    w, h = size
    tm = Tmux(f"edges-{w}")
    try:
        tm.tmux("resize-window", "-t", "t", "-x", str(w), "-y", str(h))
        tm.keys(f"{sys.executable} -m mstream_mlx.cli.main chat --tick 0.05 --idle-pause 0; echo EXIT=$?",
                "Enter")
        tm.wait(r"model: ", 60)
        tm.type(BUNDLED_PROMPT)
        tm.keys("Enter")
        tm.wait(r"^Output: .*\b12\b", 60)
        time.sleep(2.5)  # ~50 silent rows: without folding they would fill the ticker
        s = tm.screen()
        lines = s.splitlines()
        assert len(lines) <= h and max(map(len, lines)) <= w
        header, status = lines[0], next(l for l in lines if l.startswith(" t "))
        assert "bundled default model · rows" in header and "…" not in header
        assert re.fullmatch(r" t \d+ · [\d.]+ rows/s.* · [\d.]+ tok/s · .*", status), status
        ticker = next(l for l in lines if l.startswith("Output:")).split()
        assert "12" in ticker and re.fullmatch(r"-×\d+", ticker[-1]), ticker
        assert int(ticker[-1][2:]) >= 20  # the silence after the answer, folded
        assert re.search(r" 0\.0 tok/s", status)  # silence is not counted as tokens
        tm.keys("C-c")
        assert "EXIT=0" in tm.wait(r"EXIT=\d+")
    finally:
        tm.kill()

# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx bench``: a tiny shape, a few steps; the report's structure, and ratios
that are recomputed here from the raw timed runs it carries."""

import ast
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from typer.testing import CliRunner

import mstream_mlx
import tests.reference
from mstream_mlx.benchmarks import decode as bench
from mstream_mlx.cli.main import app
from mstream_mlx.models.qwen3 import Model, ModelArgs
from mstream_mlx.streams import blocks_spec

MICRO = {
    **bench.QWEN3,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
}


@pytest.fixture(scope="module")
def report():
    mx.random.seed(0)
    args = ModelArgs.from_dict(
        {**MICRO, "num_channels": 3, "multistream": blocks_spec(3).to_config()}
    )
    model = Model(args)
    mx.eval(model.parameters())
    tok = bench.synthetic_tokenizer(MICRO["vocab_size"])
    opts = bench.BenchOptions(
        streams=(1, 3), prompt_tokens=12, rows=3, prefill_tokens=(20, 40), repeats=2
    )
    return bench.run_bench(model, tok, opts, name="micro", reference=tests.reference)


def rate(sample, metric):
    run = bench.Run(**sample)
    return getattr(run, metric)


def test_report_structure(report):
    assert report["device"] and report["name"] == "micro"
    assert [e["n"] for e in report["streams"]] == [1, 3]
    for e in report["streams"]:
        for part in ("mlx_lm", "session", "model_loop", "reference"):
            assert e[part]["timesteps_per_s"] > 0 and e[part]["ttft_s"] > 0
        # every decode timestep feeds N tokens (the reference's first step also
        # feeds the user's <|im_end|>, not counted as a stream token)
        for s in e["session"]["samples"] + e["reference"]["samples"]:
            assert s["timesteps"] == 3 and s["tokens"] == 3 * e["n"]
        assert len(e["session"]["samples"]) == 2
    assert [e["tokens"] for e in report["prefill"]] == [20, 40]
    assert report["baseline"]["samples"] and report["weights_gb"] > 0
    for key in (
        "session_n1_ge_0.95x_mlx_lm",
        "session_ge_1.0x_mlx_lm_batch",
        "loop_ge_0.95x_mlx_lm_batch",
        "rows_ge_1.0x_mlx_lm_batch",
    ):
        assert isinstance(report["targets"][key]["met"], bool)
    # the rows schedule: C = 10 tokens per decode row, the prompt as prefill rows
    rows = report["rows_decode"]
    for s in rows["session"]["samples"]:
        assert s["timesteps"] == 3 and s["tokens"] == 30 and s["prompt_tokens"] == 10
    json.dumps(report)  # --json must work


def test_ratios_come_from_the_measured_runs(report):
    for e in report["streams"]:
        for metric, key in (
            ("tokens_per_sec", "tokens_vs_mlx_lm"),
            ("timesteps_per_sec", "timesteps_vs_mlx_lm"),
            ("prefill_tps", "prefill_vs_mlx_lm"),
        ):
            pairs = zip(e["session"]["samples"], e["mlx_lm"]["samples"])
            want = statistics.median(
                rate(a, metric) / rate(b, metric) for a, b in pairs
            )
            assert e[key] == pytest.approx(want)
        s = e["session"]["samples"]
        assert e["session"]["tokens_per_s"] == pytest.approx(
            statistics.median(x["tokens"] / x["decode_time"] for x in s)
        )
    for e in report["prefill"]:
        pairs = zip(e["ours"]["samples"], e["mlx_lm"]["samples"])
        want = statistics.median(
            a["prompt_tokens"] / a["ttft"] / (b["prompt_tokens"] / b["ttft"])
            for a, b in pairs
        )
        assert e["ratio"] == pytest.approx(want)
    n1 = report["targets"]["session_n1_ge_0.95x_mlx_lm"]
    assert n1["ratio"] == report["streams"][0]["timesteps_vs_mlx_lm"]
    assert n1["met"] == (n1["ratio"] >= 0.95)
    many = report["targets"]["session_ge_1.0x_mlx_lm_batch"]
    assert many["ratio"] == {3: report["streams"][1]["timesteps_vs_mlx_lm_batch"]}
    bw = report["targets"]["weight_bandwidth"]
    assert bw["gb_per_s"][3] == pytest.approx(
        report["weights_gb"] * report["streams"][1]["session"]["timesteps_per_s"]
    )


def test_paper_anchor_and_bandwidth_fraction(report):
    """The rows target is checked against the paper's loop for the named shapes, and
    the bandwidth fraction is given for a GPU whose peak we know."""
    named = {**report, "name": "random qwen3-8b", "device": "NVIDIA H200 (MLX CUDA)"}
    t = bench.targets(named)
    rows = report["rows_decode"]["session"]["timesteps_per_s"]
    assert t["rows_ge_10x_paper_loop"] == {
        "rows_per_s": rows, "anchor_h200": 8.4, "met": rows >= 84
    }
    frac = t["weight_bandwidth"]["fraction"]
    assert frac[1] == pytest.approx(t["weight_bandwidth"]["gb_per_s"][1] / 4800)
    assert "of the device's 4.8 TB/s" in bench.format_tables({**named, "targets": t})
    on_cpu = bench.targets({**named, "device": report["device"]})
    assert on_cpu["weight_bandwidth"]["fraction"] is None
    assert "rows_ge_10x_paper_loop" not in on_cpu  # an H200 anchor: compared on an H200


def test_tables_render(report):
    text = bench.format_tables(report)
    assert "| mlx-lm (1 stream) |" in text and "| 3 |" in text and "| 40 |" in text
    assert report["device"] in text


def test_mlx_lm_baseline_shares_the_weights():
    args = ModelArgs.from_dict(
        {**MICRO, "num_channels": 3, "multistream": blocks_spec(3).to_config()}
    )
    model = Model(args)
    mx.eval(model.parameters())
    lm = bench.mlx_lm_model(model)
    assert (
        lm.model.layers[1].mlp.up_proj.weight
        is model.model.layers[1].mlp.up_proj.weight
    )
    # with a zero channel row and one stream, both models compute the same logits
    bench.set_heads(model, 1)
    model.model.channel_embedding.weight = mx.zeros_like(
        model.model.channel_embedding.weight
    )
    ids = mx.array([[9, 30, 31, 200, 7]])
    ours = model(ids, channels=mx.zeros_like(ids), positions=mx.arange(5)[None])
    assert mx.allclose(ours, lm(ids), atol=1e-4).item()


def test_cli_bench(monkeypatch, tmp_path):
    monkeypatch.setitem(bench.SHAPES, "micro", MICRO)
    out = tmp_path / "r.json"
    args = [
        "bench",
        "--shape",
        "micro",
        "--dtype",
        "float32",
        "--streams",
        "2",
        "--prompt-tokens",
        "8",
        "--rows",
        "2",
        "--repeats",
        "1",
        "--no-reference",
        "--json",
        "--output",
        str(out),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = json.loads(out.read_text())
    assert saved["streams"][0]["n"] == 2 and "reference" not in saved["streams"][0]
    assert saved["dtype"] == "float32"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shape", "micro", "--model", "x"], "exactly one of --model and --shape"),
        (["--shape", "qwen9"], "Unknown shape 'qwen9'"),
        (["--shape", "tiny", "--streams", "1,x"], "--streams: expected"),
        (["--shape", "tiny", "--rows", "1"], "rows must be >= 2"),
        (["--shape", "tiny", "--dtype", "int8"], "Unknown dtype 'int8'"),
    ],
)
def test_cli_errors(args, message):
    res = CliRunner().invoke(app, ["bench", *args])
    assert res.exit_code == 1 and message in res.stderr


def test_masked_attention_equals_sdpa():
    from mstream_mlx.attention import masked_attention
    from mstream_mlx.cache import StreamKVCache
    from mstream_mlx.mask import make_mask

    mx.random.seed(1)
    q = mx.random.normal((1, 4, 3, 16))
    k, v = mx.random.normal((1, 2, 9, 16)), mx.random.normal((1, 2, 9, 16))
    cache = StreamKVCache()
    cache.push_positions(mx.array([[0, 0, 1, 1, 2, 3]]))
    cache.offset = 6
    mask = make_mask(mx.array([[3, 4, 4]]), cache)  # a stored y newer than a query
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = masked_attention(q, k, v, 0.25, mask)
    assert mx.allclose(got, want, atol=1e-5).item()


@pytest.mark.parametrize("missing", ["torch", "checkout"])
def test_cli_says_why_the_reference_column_is_absent(monkeypatch, tmp_path, missing):
    monkeypatch.setitem(bench.SHAPES, "micro", MICRO)
    if missing == "torch":
        monkeypatch.setitem(sys.modules, "torch", None)  # importing it raises
        why = "torch is not installed"
    else:  # an installed package: no tests/ beside it
        monkeypatch.setattr(mstream_mlx, "__file__", str(tmp_path / "pkg" / "x.py"))
        why = f"not a source checkout (no tests/reference in {tmp_path})"
    args = ["bench", "--shape", "micro", "--streams", "1", "--prompt-tokens", "8"]
    args += ["--rows", "2", "--repeats", "1", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"[bench] no reference column: {why}" in res.stderr
    assert "reference" not in json.loads(res.stdout)["streams"][0]
    res = CliRunner().invoke(app, [*args, "--reference"])
    assert res.exit_code == 1
    assert res.stderr.startswith("Error: --reference: ") and why in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_the_library_never_imports_the_test_suite():
    root = Path(mstream_mlx.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "tests" for n in names), path

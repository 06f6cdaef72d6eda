# Copyright © 2026 mstream-mlx contributors.
"""Bad inputs and faults for loading, generate, chat, server, convert and bench (issue
19; issue 18 item 1; the lora part is tests/test_bad_inputs_lora.py).  Each case drives
the real CLI (the typer app in-process, as the ``mstream-mlx`` script runs it, or a
process where the case needs one) and asserts a non-zero exit, ONE ``Error:`` line
naming the culprit, no traceback, and nothing new on disk; the library cases assert
one ``ValueError``.  docs/checks.md lists what is checked where.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mstream_mlx
from mstream_mlx import Block, RowsOptions, Session, blocks_to_flat, rows_to_flat
from tests.test_bad_inputs_lora import cli, error_line, full_disk, refused, snapshot  # noqa: F401

BUNDLED = Path(mstream_mlx.__file__).parent / "assets" / "default_model"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundled():
    return mstream_mlx.load(str(BUNDLED))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint("qwen3", "blocks")


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, change) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    new = change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg if new is None else new))
    return folder


def generate(*args):
    return cli("generate", "--max-tokens", 4, *args)


# -------------------------------------------------- token ids and channels (19.1, 18.1)
@pytest.mark.parametrize("bad", [99999, 65, 240, -1])
def test_prefill_rows_outside_the_vocabulary(tmp_path, bad):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([[bad, "-", "-"]]))
    refused(
        tmp_path,
        lambda: generate("--prefill-rows", rows, "-p", "add five"),
        f"token id {bad} is outside the vocabulary (0..64)",
    )


def test_library_ids_are_checked_where_they_enter(bundled):
    model, tokenizer = bundled
    sil = model.streams.silence_token
    with pytest.raises(ValueError, match="token id 99999 is outside the vocabulary"):
        Session(model, tokenizer, rows=RowsOptions(prefill_rows=[[99999, sil, sil]]))
    session = Session(model, tokenizer)
    for bad in (99999, -1, 65):
        with pytest.raises(ValueError, match=f"Token id {bad} is outside"):
            session.feed("User", [bad])
    ids, ch, pos = rows_to_flat([[5, sil, sil], [99999, sil, sil]]).arrays()
    with pytest.raises(ValueError, match="Token id 99999 is outside"):
        model(ids, channels=ch, positions=pos)


@pytest.mark.parametrize("channel", [3, 50, 1000])
def test_channels_out_of_range_are_refused(bundled, channel):
    model, tokenizer = bundled
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    blocks = [Block(0, enc(" add five"), 0), Block(channel, enc(" 5"), 2)]
    ids, ch, pos = blocks_to_flat(blocks).arrays()
    msg = f"Channel {channel} is out of range; the model has 3 channels"
    with pytest.raises(ValueError, match=msg):
        model(ids, channels=ch, positions=pos)  # the README's raw call
    with pytest.raises(ValueError, match=msg):
        blocks_to_flat(blocks, model.streams)
    with pytest.raises(ValueError, match=msg):
        Session(model, tokenizer).feed(channel, "add five")
    table = np.full((2, channel + 1), model.streams.silence_token)
    with pytest.raises(ValueError, match=msg):
        rows_to_flat(table, streams=model.streams)
    with pytest.raises(ValueError, match="must be >= 0"):
        Block(-1, [1], 0)
    # in range: unchanged
    good = blocks_to_flat(blocks[:1], model.streams)
    assert model(*good.arrays()[:1], channels=good.arrays()[1],
                 positions=good.arrays()[2]).shape[1] == len(good)  # fmt: skip


# ------------------------------------------------------------ loading (19.5, 19.6)
def test_unknown_architecture_is_refused(tiny, tmp_path):
    bad = edit_config(copy_of(tiny, tmp_path / "m"), lambda c: c.update(architectures=["FooForCausalLM"]))
    refused(tmp_path, lambda: generate("--model", bad, "-p", "hi"), "Unknown architecture 'FooForCausalLM'")


def test_a_folder_without_tokenizer_files_says_so(tiny, tmp_path):
    m = copy_of(tiny, tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (m / f).unlink(missing_ok=True)
    refused(tmp_path, lambda: generate("--model", m, "-p", "hi"), f"No tokenizer in {m}")


# ---------------------------------------------------------------- numbers (19.7)
@pytest.mark.parametrize(
    "command, flags, culprit",
    [
        ("generate", ["--temp", "nan", "-p", "hi"], "--temp"),
        ("generate", ["--temp", "inf", "-p", "hi"], "--temp"),
        ("generate", ["--top-p", "nan", "-p", "hi"], "--top-p"),
        ("generate", ["--min-p", "-1", "-p", "hi"], "--min-p"),
        ("generate", ["--repetition-penalty", "nan", "-p", "hi"], "--repetition-penalty"),
        ("generate", ["--presence-penalty", "inf", "-p", "hi"], "--presence-penalty"),
        ("generate", ["--silence-penalty", "nan", "-p", "hi"], "--silence-penalty"),
        ("generate", ["--think-silence-penalty", "-inf", "-p", "hi"], "--think-silence-penalty"),
        ("generate", ["--stream-config", "Output:temp=nan", "-p", "hi"], "temp"),
        ("chat", ["--plain", "--temp", "nan"], "--temp"),
        ("chat", ["--plain", "--tick", "nan"], "--tick"),
        ("chat", ["--plain", "--close-after", "inf"], "--close-after"),
        ("server", ["--temp", "nan", "--port", "0"], "--temp"),
        ("server", ["--tick", "nan", "--port", "0"], "--tick"),
        ("server", ["--idle-timeout", "nan", "--port", "0"], "--idle-timeout"),
    ],
)
def test_numbers_must_be_finite(tmp_path, command, flags, culprit):
    line = refused(tmp_path, lambda: cli(command, *flags), culprit)
    assert "finite" in line or "must be" in line


# ---------------------------------------------------- corrupt checkpoints (19.9)
def _header(n: int, body: bytes = b"") -> bytes:
    return struct.pack("<Q", n) + body


CORRUPT = {
    "empty safetensors": (lambda m: (m / "model.safetensors").write_bytes(b""), "is not a safetensors file"),
    "random safetensors": (lambda m: (m / "model.safetensors").write_bytes(os.urandom(64)), "is not a safetensors file"),
    "huge header": (lambda m: (m / "model.safetensors").write_bytes(_header(2**62, b"{}")), "header claims"),
    "header not JSON": (lambda m: (m / "model.safetensors").write_bytes(_header(4, b"\xff\xfe{]")), "header is not JSON"),
    "header a list": (lambda m: (m / "model.safetensors").write_bytes(_header(2, b"[]")), "header is not an object"),
    "config a list": (lambda m: edit_config(m, lambda c: [c]), "must hold a JSON object, got list"),
    "config a string": (lambda m: edit_config(m, lambda c: "qwen3"), "must hold a JSON object, got str"),
    "num_channels null": (lambda m: edit_config(m, lambda c: c.update(num_channels=None)), "num_channels must be a positive integer"),
    "zero heads": (lambda m: edit_config(m, lambda c: c.update(num_attention_heads=0)), "num_attention_heads must be a positive integer"),
    "wrong type": (lambda m: edit_config(m, lambda c: c.update(hidden_size="64")), "hidden_size must be a positive integer, got '64'"),
    "config not JSON": (lambda m: (m / "config.json").write_text("{"), "invalid JSON"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_checkpoints_are_one_line(tiny, tmp_path, case):
    change, culprit = CORRUPT[case]
    m = copy_of(tiny, tmp_path / "m")
    change(m)
    refused(tmp_path, lambda: generate("--model", m, "-p", "hi"), culprit)


def test_a_shard_index_with_a_list_and_a_bin_with_a_list(tiny, tmp_path):
    import torch

    m = copy_of(tiny, tmp_path / "m")
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    out = tmp_path / "out"
    refused(tmp_path, lambda: cli("convert", "--hf-path", m, "--mlx-path", out), "weight_map must map")
    b = copy_of(tiny, tmp_path / "b")
    (b / "model.safetensors").unlink()
    torch.save([1, 2], b / "pytorch_model.bin")
    refused(tmp_path, lambda: cli("convert", "--hf-path", b, "--mlx-path", out), "holds a list, not a dict")


@pytest.mark.parametrize(
    "text, culprit", [("[]", "must hold a JSON object"), ('{"fine_tune_type": "lora"}', "num_layers")]
)
def test_broken_adapter_configs(tmp_path, text, culprit):  # held by the lora checks
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(text)
    (ad / "adapters.safetensors").write_bytes(b"")
    refused(tmp_path, lambda: generate("--adapter-path", ad, "-p", "add five"), culprit)


# ------------------------------------------------------------ absurd configs (19.10)
@pytest.mark.parametrize("layers", [200_000, 3_000_000])
def test_an_absurd_layer_count_fails_fast(tiny, tmp_path, layers):
    m = edit_config(copy_of(tiny, tmp_path / "m"), lambda c: c.update(num_hidden_layers=layers))
    t = time.perf_counter()
    refused(tmp_path, lambda: generate("--model", m, "-p", "hi"), f"num_hidden_layers {layers}", "hold 2 layers")
    assert time.perf_counter() - t < 10
    out = tmp_path / "out"
    refused(tmp_path, lambda: cli("convert", "--hf-path", m, "--mlx-path", out), "hold 2 layers")


def test_vocab_size_against_the_table(tiny, tmp_path):
    m = edit_config(copy_of(tiny, tmp_path / "m"), lambda c: c.update(vocab_size=10**6))
    refused(tmp_path, lambda: generate("--model", m, "-p", "hi"), "vocab_size 1000000", "512 rows")


# ----------------------------------------------------------- generate / chat (19.12)
def run(*args, stdin: bytes = b"", env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mstream_mlx.cli.main", *map(str, args)],
        input=stdin, capture_output=True, timeout=120, env=env, cwd=cwd,
    )  # fmt: skip


def one_error(r, *culprits):
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("Error: ") and sum(l.startswith("Error") for l in lines) == 1, err
    for c in culprits:
        assert c in lines[-1], (c, lines[-1])


def test_invalid_utf8_on_stdin(tmp_path):
    before = snapshot(tmp_path)
    one_error(run("generate", "-p", "-", stdin=b"add caf\xe9"), "--prompt -: stdin is not valid UTF-8")
    r = run("chat", "--plain", stdin=b"add five\ncaf\xe9 plus\nadd two\n")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "skipped a line that is not valid UTF-8" in err
    assert "You: add two" in out  # the rest of the input was read
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "content, culprit",
    [
        (None, "is a folder"),
        ("[[null, 1, 1]]", "row 0 cell 0 is None"),
        ('[[{"a": 1}, 1, 1]]', "row 0 cell 0 is {'a': 1}"),
        ('{"rows": 1}', "must be a list of rows"),
        ("[[1, 1, 1], 5]", "row 1 must be a list"),
        ("[[true, 1, 1]]", "row 0 cell 0 is True"),
        ("[[1, 1", "invalid JSON"),
        ("[[1, 2]]", "Prefill row 0 has 2 cells"),
    ],
)
def test_bad_prefill_rows_files(tmp_path, content, culprit):
    f = tmp_path / "rows"
    if content is None:
        f.mkdir()
    else:
        f.write_text(content)
    refused(tmp_path, lambda: generate("--prefill-rows", f, "-p", "add five"), culprit)


def test_an_unwritable_prompt_cache_file(tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text('[["add", "-", "-"], ["five", "-", "-"]]')
    blocker = tmp_path / "file"
    blocker.write_text("")
    pc = blocker / "pc.safetensors"  # its folder is a file: unwritable even for root
    refused(
        tmp_path,
        lambda: generate("--prefill-rows", rows, "-p", "add two", "--prompt-cache-file", pc),
        f"Cannot write {pc}",
    )


def test_a_rows_model_without_output_streams_is_refused_at_convert(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3", "rows", num_channels=1)
    out = tmp_path / "out"
    refused(tmp_path, lambda: cli("convert", "--hf-path", src, "--mlx-path", out), "has no output stream")


# ------------------------------------------------------ full disk, convert and export (19.8)
def test_convert_and_export_on_a_full_disk(tiny, tmp_path, full_disk):
    """A real 16 KiB tmpfs (MLX reports its ENOSPC as a RuntimeError): one line, and
    neither the output nor a hidden partial folder is left behind."""
    out = full_disk / "mlx"
    before = snapshot(tmp_path)
    error_line(cli("convert", "--hf-path", tiny, "--mlx-path", out), f"Writing {out}", "failed")
    assert snapshot(tmp_path) == before
    converted = tmp_path / "converted"
    assert cli("convert", "--hf-path", tiny, "--mlx-path", converted).exit_code == 0
    before = snapshot(tmp_path)
    torch_out = full_disk / "torch"
    r = cli("export", "--model", converted, "--torch-path", torch_out)
    error_line(r, f"Writing {torch_out}", "failed")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------- convert (19.13)
def test_a_non_utf8_output_name(tiny, tmp_path):
    before = snapshot(tmp_path)
    out = os.fsdecode(str(tmp_path).encode() + b"/out\xff")
    one_error(run("convert", "--hf-path", tiny, "--mlx-path", out), "--mlx-path", "not a valid UTF-8 name")
    assert snapshot(tmp_path) == before


def test_upload_offline_is_one_line_after_the_folder(tiny, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_none"}
    out = tmp_path / "out"
    r = run("convert", "--hf-path", tiny, "--mlx-path", out, "--upload-repo", "someone/tiny", env=env)
    one_error(r, f"Wrote {out}, but uploading it to someone/tiny failed", "huggingface-cli upload")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_bench_output_is_checked_first(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    t = time.perf_counter()
    refused(tmp_path, lambda: cli("bench", "--output", blocker / "r.json"), f"Cannot write {blocker / 'r.json'}")
    assert time.perf_counter() - t < 5


# ---------------------------------------------------------------- stderr (19.14)
def test_jsonl_stdout_stays_json_with_warnings(tiny_checkpoint):
    base = tiny_checkpoint("qwen3", "blocks", channel_embedding=False)  # warns at load
    r = cli("generate", "--model", base, "-p", "hi", "--format", "jsonl", "--max-tokens", 3)
    assert r.exit_code == 0, r.stderr
    assert "[WARNING]" in r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines and all(isinstance(json.loads(l), dict) for l in lines)


# --------------------------------------------------------- outside the folder (19.15)
def test_shard_names_that_leave_the_folder(tiny, tmp_path):
    out = tmp_path / "out"
    for name in ("../model.safetensors", "/etc/passwd"):
        m = copy_of(tiny, tmp_path / "m")
        (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
        refused(tmp_path, lambda: cli("convert", "--hf-path", m, "--mlx-path", out), repr(name), "leads outside")
        shutil.rmtree(m)


def test_symlinks_out_of_the_folder_are_not_followed(tiny, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    m = copy_of(tiny, tmp_path / "m")
    (m / "generation_config.json").symlink_to(secret)
    out = tmp_path / "out"
    refused(tmp_path, lambda: cli("convert", "--hf-path", m, "--mlx-path", out), "generation_config.json", "leads outside")
    w = copy_of(tiny, tmp_path / "w")
    shutil.move(w / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (w / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    refused(tmp_path, lambda: generate("--model", w, "-p", "hi"), "leads outside")
    # the Hugging Face cache's layout (snapshot files link into blobs/) still loads
    repo = tmp_path / "models--someone--tiny"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in tiny.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    assert generate("--model", snap, "-p", "hi").exit_code == 0


# ------------------------------------------------------------ stale folders (19.16)
def test_stale_partial_folders_are_removed_and_said(tiny, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".out.{dead}.abc123.partial"
    live = tmp_path / f".out.{os.getpid()}.def456.partial"
    old = tmp_path / ".out.ghi789.partial"  # no pid (older versions), but old
    for d in (stale, live, old):
        d.mkdir()
        (d / "x").write_text("half")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    r = cli("convert", "--hf-path", tiny, "--mlx-path", out)
    assert r.exit_code == 0, r.stderr
    assert not stale.exists() and not old.exists() and live.exists()
    assert f"Removed {stale}, left by an interrupted run." in r.stderr


# ------------------------------------------------- what already held, kept held
class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


def test_a_malicious_bin_never_runs(tiny, tmp_path):
    import torch

    b = copy_of(tiny, tmp_path / "b")
    (b / "model.safetensors").unlink()
    p = Payload()
    p.mark = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": p}, b / "pytorch_model.bin")
    out = tmp_path / "out"
    refused(tmp_path, lambda: cli("convert", "--hf-path", b, "--mlx-path", out), "Cannot read", "as plain tensors")
    assert not p.mark.exists()


def test_an_interrupted_convert_leaves_nothing_and_force_keeps_the_old(tiny, tmp_path, monkeypatch):
    import mlx_lm.utils

    out = tmp_path / "out"
    assert cli("convert", "--hf-path", tiny, "--mlx-path", out).exit_code == 0
    before = snapshot(tmp_path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_lm.utils, "save_config", interrupted)
    r = cli("convert", "--hf-path", tiny, "--mlx-path", out, "--force")
    assert r.exit_code != 0 and isinstance(r.exception, (KeyboardInterrupt, SystemExit))
    assert snapshot(tmp_path) == before  # the old folder, unchanged, and no partial one


# ------------------------------------------------------------ the UI snippet (19.17)
def test_the_ui_snippet_exits_cleanly_every_time():
    """docs/generation.md's "From a UI" snippet, as a program of its own, several times:
    MLX 0.32 aborted 6 of 9 such runs at exit (134) before the worker was parked."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    page = (ROOT / "docs" / "generation.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "def worker()" in b)
    prog = ("import mstream_mlx\nfrom mstream_mlx import Session\nmodel, tokenizer = "
            f"mstream_mlx.load({str(BUNDLED)!r})\n" + code)  # fmt: skip

    def once(_):
        return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(once, range(4)))
    assert [r.returncode for r in runs] == [0] * 4, [r.stderr[-300:] for r in runs]
    assert all(r.stdout.strip() == "4 5" for r in runs), [r.stdout for r in runs]


# ------------------------------------------------------------------- fuzz (all)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
KEYS = ["num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
        "vocab_size", "num_channels", "head_dim", "intermediate_size", "architectures",
        "model_type", "multistream", "tie_word_embeddings", "rope_theta", "text_config"]  # fmt: skip
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def ok_or_one_line(r):
    assert "Traceback" not in r.stdout + r.stderr
    if r.exit_code != 0:
        error_line(r)


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), JSON, min_size=1, max_size=3))
def test_fuzzed_config_json_is_loaded_or_one_line(tiny_checkpoint, tmp_path_factory, change):
    m = copy_of(tiny_checkpoint("qwen3", "blocks"), tmp_path_factory.mktemp("fz") / "m")
    edit_config(m, lambda c: c.update(change))
    ok_or_one_line(generate("--model", m, "-p", "hi"))


@FUZZ
@given(JSON | st.lists(st.lists(st.integers(-5, 200) | st.text(max_size=5) | JSON, max_size=4), max_size=4))
def test_fuzzed_prefill_rows_are_used_or_one_line(tmp_path_factory, rows):
    f = tmp_path_factory.mktemp("fz") / "rows.json"
    f.write_text(json.dumps(rows))
    ok_or_one_line(generate("--prefill-rows", f, "-p", "add five"))

# Copyright © 2026 mstream-mlx contributors.
"""Bad inputs and faults for ``mstream-mlx lora`` / ``fuse`` (issue 19, the lora part;
issue 18 items 2, 6, 8): each case drives the real CLI and asserts a non-zero exit,
ONE ``Error:`` line (the last on stderr) naming the culprit, no traceback, and
nothing new on disk.  Most cases run the typer app in-process (the same code the
``mstream-mlx`` script runs); the kill and one settings case run it as a process.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from mstream_mlx.cli.main import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
LINE = '{"user": "what is two plus one", "assistant": "three"}\n'


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("qwen3", "blocks")


@pytest.fixture()
def data(tmp_path):
    """A data folder with three good lines per split (each test adds bad ones)."""
    d = tmp_path / "data"
    d.mkdir()
    for split in ("train", "valid", "test"):
        (d / f"{split}.jsonl").write_text(LINE * 3)
    return d


def snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        )
        for p in sorted(root.rglob("*"))
    }


def cli(*args) -> "CliRunner.Result":
    return CliRunner().invoke(app, [str(a) for a in args])


def lora(model, data, adapters, *more):
    return cli(
        "lora", "--model", model, "--data", data, "--adapter-path", adapters,
        "--iters", 2, "--batch-size", 2, "--save-every", 2, "--steps-per-report", 1,
        "--num-layers", -1, *more,
    )  # fmt: skip


def error_line(r, *culprits) -> str:
    """The one ``Error:`` line of a failed run, after the common checks."""
    stderr = r.stderr
    assert r.exit_code not in (0, None), stderr
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(
        r.exception
    )
    assert "Traceback" not in stderr + r.stdout
    lines = stderr.strip().splitlines()
    errors = [l for l in lines if l.startswith("Error")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    for c in culprits:
        assert str(c) in errors[0], (c, errors[0])
    return errors[0]


def refused(tmp_path, run, *culprits) -> str:
    """Run ``run()``; it must fail with one line and leave ``tmp_path`` unchanged."""
    before = snapshot(tmp_path)
    line = error_line(run(), *culprits)
    assert snapshot(tmp_path) == before
    return line


# ------------------------------------------------------------- settings (item 7, 11)
@pytest.mark.parametrize("lr", ["nan", "inf", "-1", "0"])
def test_learning_rate_must_be_finite_and_positive(model, data, tmp_path, lr):
    refused(
        tmp_path,
        lambda: lora(model, data, tmp_path / "ad", "--train", "--learning-rate", lr),
        "learning_rate",
    )


@pytest.mark.parametrize("w", ["nan", "inf", "-1"])
def test_stream_weights_must_be_finite_and_not_negative(model, data, tmp_path, w):
    refused(
        tmp_path,
        lambda: lora(
            model, data, tmp_path / "ad", "--train", "--stream-weights", f"assistant={w}"
        ),
        "'assistant'",
    )


@pytest.mark.parametrize(
    "yaml_text, culprit",
    [
        ("batch_size: .nan\n", "batch_size"),
        ("iters: ten\n", "iters"),
        ("long_ce_gamma: .inf\n", "long_ce_gamma"),
        ("warmup: -3\n", "warmup"),
        ("lora_parameters: {rank: 8, scale: .nan}\n", "scale"),
        ("lora_parameters: {rank: 0, scale: 2.0}\n", "rank"),
        ("optimizer_config: {adamw: {weight_decay: .nan}}\n", "weight_decay"),
        ("optimizer_config: {adamw: {no_such_arg: 1}}\n", "optimizer_config.adamw"),
        ("lr_schedule: {name: no_such, arguments: [0.1]}\n", "no_such"),
        ("lr_schedule: zigzag\n", "zigzag"),
        ("batch_size: [1\n", "line 2"),  # a YAML syntax error, with its line
    ],
)
def test_every_yaml_value_is_checked(model, data, tmp_path, yaml_text, culprit):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    ad = tmp_path / "ad"
    line = refused(
        tmp_path,
        lambda: cli("lora", "--model", model, "--data", data, "--adapter-path", ad,
                    "--train", "-c", cfg),  # fmt: skip
        culprit,
    )
    if "line" in culprit:
        assert str(cfg) in line


def test_a_settings_error_in_a_real_process(model, data, tmp_path):
    before = snapshot(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "mstream_mlx.cli.main", "lora", "--model", str(model),
         "--data", str(data), "--train", "--learning-rate", "nan",
         "--adapter-path", str(tmp_path / "ad")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "Error: learning_rate must be a finite number, got nan."
    ]
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------- data (items 1, 11)
@pytest.mark.parametrize(
    "bad, reason",
    [
        ('{"user": [99999], "assistant": "three"}\n', "outside the vocabulary"),
        ('{"user": "one", "assistant": [[5, -1]]}\n', "outside the vocabulary"),
        ('{"user": "one", "assistant": "three"\n', "invalid JSON"),  # holds already
        ("[" * 100_000 + "\n", "nested too deeply"),
        (b'{"user": "caf\xe9", "assistant": "three"}\n', "not valid UTF-8"),
    ],
)
def test_bad_data_lines_are_named_by_file_and_line(model, data, tmp_path, bad, reason):
    with open(data / "train.jsonl", "ab") as f:
        f.write(bad if isinstance(bad, bytes) else bad.encode())
    refused(
        tmp_path,
        lambda: lora(model, data, tmp_path / "ad", "--train"),
        f"{data / 'train.jsonl'}:4: ",
        reason,
    )


def test_a_deeply_nested_line_is_skippable(model, data, tmp_path):
    with open(data / "train.jsonl", "a") as f:
        f.write("[" * 100_000 + "\n")
    r = lora(model, data, tmp_path / "ad", "--train", "--skip-invalid")
    assert r.exit_code == 0, r.stderr
    assert "Skipped 1 invalid line(s)" in r.stderr and "nested too deeply" in r.stderr


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(
    tiny_checkpoint, data, tmp_path
):
    small = tiny_checkpoint("qwen3", "blocks", vocab_size=400)
    line = refused(
        tmp_path,
        lambda: lora(small, data, tmp_path / "ad", "--train"),
        "vocab_size is 400",
    )
    assert "has 463 token ids" in line


# ------------------------------------------------------------ resume (items 3, 11)
@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    """Adapters after 2 steps (saved at step 2, with their training state)."""
    root = tmp_path_factory.mktemp("trained")
    d = root / "data"
    d.mkdir()
    for split in ("train", "valid", "test"):
        (d / f"{split}.jsonl").write_text(LINE * 3)
    r = lora(model, d, root / "ad", "--train")
    assert r.exit_code == 0, r.stderr
    return root


def resume_case(model, trained, tmp_path, change, *more):
    """A copy of the trained folder, changed by ``change(folder)``; resuming from
    it must fail with one line and change nothing."""
    ad = tmp_path / "ad"
    shutil.copytree(trained / "ad", ad)
    change(ad)
    return lambda: lora(
        model, trained / "data", ad, "--train", "--iters", 4,
        "--resume-adapter-file", ad / "adapters.safetensors", *more,
    )  # fmt: skip


def _truncate(ad):
    f = ad / "adapters.safetensors"
    f.write_bytes(f.read_bytes()[:100])


def _state_without_step(ad):
    f = ad / "training_state.safetensors"
    mx.save_safetensors(str(f), mx.load(str(f)), metadata={"note": "no step"})


@pytest.mark.parametrize(
    "change, culprit",
    [
        (lambda ad: (ad / "adapters.safetensors").unlink(), "No adapters file"),
        (_truncate, "is not a readable safetensors file"),
        (
            lambda ad: (ad / "adapters.safetensors").write_bytes(os.urandom(300)),
            "is not a readable safetensors file",
        ),
        (_state_without_step, "records no training step"),
        (
            lambda ad: (ad / "training_state.safetensors").write_bytes(b"junk" * 9),
            "training_state.safetensors",
        ),
    ],
)
def test_resume_from_broken_files(model, trained, tmp_path, change, culprit):
    run = resume_case(model, trained, tmp_path, change)
    refused(tmp_path, run, culprit)


def test_resume_with_another_optimizer(model, trained, tmp_path):
    run = resume_case(model, trained, tmp_path, lambda ad: None, "--optimizer", "sgd")
    refused(tmp_path, run, "holds adamw optimizer state", "sgd")


def test_a_kill_between_the_two_files_is_refused_then_recovers_exactly(
    model, trained, tmp_path
):
    """Issue 19 item 3: the process dies (SIGKILL-like ``os._exit``) right after the
    step-4 training state is written and before the step-4 adapters are renamed
    into place; resuming refuses with one line and names the numbered copy; after
    following the hint the run ends bit-identical to an uninterrupted one."""
    data, ad = trained / "data", tmp_path / "ad"
    more = ["--iters", 6, "--save-every", 2, "--seed", 1]
    r = lora(model, data, tmp_path / "straight", "--train", *more)
    assert r.exit_code == 0, r.stderr
    kill_after_state = (  # the second state file (step 4) renamed into place: die
        "import os, sys\n"
        "replace, states = os.replace, []\n"
        "def dying(src, dst):\n"
        "    replace(src, dst)\n"
        "    if str(dst).endswith('training_state.safetensors'):\n"
        "        states.append(dst)\n"
        "        if len(states) == 2: os._exit(137)\n"
        "os.replace = dying\n"
        "from mstream_mlx.cli.main import main\n"
        "sys.argv[0] = 'mstream-mlx'\n"
        "main()\n"
    )
    args = ["lora", "--model", model, "--data", data, "--adapter-path", ad, "--train",
            "--batch-size", 2, "--steps-per-report", 1, "--num-layers", -1, *more]  # fmt: skip
    p = subprocess.run(
        [sys.executable, "-c", kill_after_state, *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 137, p.stderr
    resume = ["--resume-adapter-file", ad / "adapters.safetensors"]
    before = snapshot(tmp_path)
    line = error_line(lora(model, data, ad, "--train", *more, *resume))
    assert snapshot(tmp_path) == before
    assert (
        "adapters.safetensors is not the adapters training_state.safetensors (step 4)"
        in line
    )
    assert f"copy {ad / '0000004_adapters.safetensors'} over it" in line
    shutil.copy(ad / "0000004_adapters.safetensors", ad / "adapters.safetensors")
    r = lora(model, data, ad, "--train", *more, *resume)
    assert r.exit_code == 0 and "Resuming at step 4 of 6." in r.stderr, r.stderr
    for name in ("adapters.safetensors", "training_state.safetensors"):
        got, want = (mx.load(str(d / name)) for d in (ad, tmp_path / "straight"))
        assert sorted(got) == sorted(want)
        for k in want:  # bit for bit
            assert got[k].dtype == want[k].dtype and mx.array_equal(got[k], want[k])


def test_a_non_finite_loss_stops_without_touching_good_adapters(
    model, trained, tmp_path
):
    run = resume_case(
        model, trained, tmp_path, lambda ad: None, "--learning-rate", "1e30"
    )
    line = refused(tmp_path, run, "non-finite", "still holds step 2")
    assert "lower --learning-rate" in line


# -------------------------------------------------------------- full disk (item 8)
@pytest.fixture()
def full_disk(tmp_path, monkeypatch):
    """A 16 KiB tmpfs (a real ENOSPC, which MLX reports as ``RuntimeError: [write]
    Unable to write``); where mounting is not permitted, MLX's writer raising that
    same error."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)],
        capture_output=True,
    ).returncode == 0  # fmt: skip
    if not mounted:

        def full(path, *a, **k):
            raise RuntimeError("[write] Unable to write 65536 bytes to file.")

        monkeypatch.setattr(mx, "save_safetensors", full)
    yield disk
    if mounted:
        subprocess.run(["umount", str(disk)], check=True)


def test_lora_on_a_full_disk(model, data, tmp_path, full_disk):
    ad = full_disk / "ad"
    before = snapshot(tmp_path)
    line = error_line(lora(model, data, ad, "--train"), f"Writing {ad}", "failed")
    assert "nothing was written" in line and snapshot(tmp_path) == before


def test_fuse_on_a_full_disk(model, trained, tmp_path, full_disk):
    out = full_disk / "fused"
    before = snapshot(tmp_path)
    r = cli("fuse", "--model", model, "--adapter-path", trained / "ad", "--save-path", out)
    error_line(r, f"Writing {out}", "failed")
    assert snapshot(tmp_path) == before


# -------------------------------------------------------------------- fuse (item 4)
@pytest.mark.parametrize("which", ["model", "adapters"])
def test_fuse_force_never_replaces_its_own_inputs(model, trained, tmp_path, which):
    ad = tmp_path / "ad"
    shutil.copytree(trained / "ad", ad)
    mine = tmp_path / "model"
    shutil.copytree(model, mine)
    target = mine if which == "model" else ad
    refused(
        tmp_path,
        lambda: cli(
            "fuse", "--model", mine, "--adapter-path", ad, "--save-path", target, "--force"
        ),
        "--save-path",
        "must lie outside",
    )


# ----------------------------------------------- issue 18: items 2, 6, 8 (these pass)
def test_test_reuses_saved_data_settings_and_fewer_layers_are_all_trained(
    model, tmp_path
):
    data = EXAMPLES / "chat"
    ad = tmp_path / "ad"
    r = cli(
        "lora", "--model", model, "--data", data, "--adapter-path", ad, "--train",
        "--iters", 2, "--batch-size", 2, "--wait-k", 2,
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    lines = r.stderr.splitlines()
    # the default --num-layers 16 on a 2-layer model: one line, before loading
    assert lines[0] == (
        "[INFO] The model has 2 layers, fewer than num_layers 16: training all 2."
    )
    assert lines[1] == "Loading pretrained model"
    assert json.loads((ad / "adapter_config.json").read_text())["num_layers"] == 2

    def test_loss(*more):
        r = cli("lora", "--model", model, "--data", data, "--adapter-path", ad,
                "--test", *more)  # fmt: skip
        assert r.exit_code == 0, r.stderr
        return r.stderr, r.stderr.split("Test loss ")[1].split(",")[0]

    saved, saved_loss = test_loss()
    assert f"Data settings from {ad / 'adapter_config.json'}: wait_k=2" in saved
    explicit = test_loss("--wait-k", "2")[1]
    overridden = test_loss("--wait-k", "0")[1]
    assert saved_loss == explicit != overridden
    # a random tiny model is worse than uniform guessing: no absurd perplexity
    assert "Test ppl omitted (above the vocabulary size 512" in saved


# ------------------------------------------------- fuzz: JSONL lines never crash
KEYS = ("streams", "token_ids", "num_rows", "system", "user", "assistant", "offsets",
        "messages", "role", "content", "prompt", "completion", "auditor", "User",
        "Output", "Analytical", "text")  # fmt: skip


@pytest.mark.parametrize("layout", ["blocks", "rows"])
def test_fuzzed_jsonl_lines_are_examples_or_one_line_errors(
    tiny_checkpoint, tmp_path_factory, layout
):
    """Any line (JSON built from the formats' own keys, or raw bytes) gives an
    example or a ``DataError`` "file:1: reason" on one line, never another error."""
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    import mstream_mlx
    from mstream_mlx.tuner.datasets import DataError, ExampleBuilder, load_jsonl

    ck = tiny_checkpoint("qwen3", layout, num_channels=3)
    m, tok = mstream_mlx.load(str(ck))
    builder = ExampleBuilder(tok, m.streams, m.args.vocab_size)
    path = tmp_path_factory.mktemp("fuzz") / "train.jsonl"
    words = st.sampled_from([" one", " two", "three", "user", " -", "", "🙂"])
    scalars = (
        st.none() | st.booleans() | st.integers(-(2**70), 2**70)
        | st.integers(-2, 600) | st.floats(allow_nan=True) | words
        | st.text(max_size=8) | st.sampled_from(KEYS)
    )  # fmt: skip
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=5)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=5),
        max_leaves=12,
    )
    names = st.sampled_from(["User", "Output", "Analytical", "user", "assistant",
                             "auditor", "system", "nope", "0", "2"])  # fmt: skip
    heads = st.sampled_from(["assistant", "auditor", "user", "nope"])
    # each format's own shape with fuzzed values, so every check is reached
    formats = st.one_of(
        st.fixed_dictionaries(
            {"streams": st.dictionaries(names, st.lists(scalars, max_size=6) | values)}
        ),
        st.fixed_dictionaries(
            {"num_rows": values | st.integers(0, 4),
             "token_ids": st.lists(st.lists(scalars, max_size=4), max_size=4) | values}
        ),
        st.fixed_dictionaries(
            {"user": values, "assistant": values},
            optional={"system": values, "auditor": values,
                      "offsets": st.dictionaries(heads, values) | values},
        ),
        st.fixed_dictionaries(
            {"messages": st.lists(
                st.fixed_dictionaries({"role": names, "content": values}), max_size=4
            ) | values}
        ),
        st.fixed_dictionaries(
            {"prompt": values, "completion": values}, optional={"auditor": values}
        ),
        values,
    )  # fmt: skip
    lines = formats.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=40)

    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    @hypothesis.given(lines)
    def check(line):
        path.write_bytes(line.replace(b"\n", b" ") + b"\n")
        try:
            load_jsonl(path, builder)
        except DataError as e:
            assert str(e).startswith(f"{path}:1: ") and "\n" not in str(e), str(e)

    check()

# Copyright © 2026 mstream-mlx contributors.
"""The Llama family end to end: a tiny random ``transformers`` LlamaForCausalLM (built
here, saved with ``save_pretrained``) converted into a multi-stream model with
``mstream-mlx convert``, fp32 parity with the PyTorch reference (Llama 3 RoPE scaling
included), greedy traces equal to the reference decode loop, export round trip,
``lora`` fine-tuning and ``generate`` / ``chat`` on the result."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mstream_mlx
from mstream_mlx.attention import StreamRoPE
from mstream_mlx.cli.main import app
from mstream_mlx.convert import export
from mstream_mlx.models.base import CHANNEL_KEY
from mstream_mlx.schedules import RowsOptions
from mstream_mlx.session import Session
from tests.reference import RefModel, rows_generate
from tests.test_generate import GREEDY, assert_rows_equal, seed_row, session_rows, user_ids
from tests.test_parity import CASES, ref_logits, rows_flat
from tests.tiny import make_tokenizer

TOL = 1e-4
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so the tiny head_dim has low, medium and high frequency bands
    "original_max_position_embeddings": 64,
}
KINDS = {
    # Llama 3: scaled RoPE, own head
    "llama3": dict(rope_theta=500000.0, rope_scaling=LLAMA3, tie_word_embeddings=False),
    # Llama 2 style: plain RoPE, tied head, biases everywhere
    "bias": dict(rope_theta=10000.0, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-tok")
    make_tokenizer(folder)
    return folder


def hf_llama(folder, tok_dir, kind):
    """A tiny random LlamaForCausalLM folder (weights, config, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        max_position_embeddings=4096, initializer_range=0.1, **KINDS[kind],
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1 and biases away from 0: both must load
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    for f in tok_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.fixture(scope="module", params=list(KINDS))
def llama(request, tmp_path_factory, tok_dir):
    """``(hf folder, converted rows folder)`` per kind."""
    root = tmp_path_factory.mktemp(f"llama-{request.param}")
    src = hf_llama(root / "hf", tok_dir, request.param)
    r = cli("convert", "--hf-path", src, "--mlx-path", root / "mlx")
    assert r.exit_code == 0, r.output
    return src, root / "mlx"


@pytest.fixture(scope="module")
def pair(llama):
    model, tokenizer = mstream_mlx.load(str(llama[1]))
    return model, RefModel.from_pretrained(llama[1]), tokenizer


def test_reference_is_transformers_llama(llama):
    """The reference's Llama (biases, Llama 3 RoPE) equals transformers' own class on a
    single stream (zero channel table, y = index, so the rule is the causal mask)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(llama[0]).eval()
    ref = RefModel.from_pretrained(llama[0], device="cpu")  # no channel table: zeros
    ids = torch.tensor(np.random.default_rng(0).integers(0, 512, (1, 100)))
    zeros, y = torch.zeros_like(ids), torch.arange(100)[None]
    with torch.no_grad():
        want = hf(ids).logits
        got = ref(ids, zeros, y)
    assert float((want - got).abs().max()) <= TOL


def test_convert_makes_a_rows_model(llama):
    config = json.loads((llama[1] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_channels"] == 10
    assert config["multistream"]["layout"] == "rows"  # the family's default layout
    model, _ = mstream_mlx.load(str(llama[1]))
    assert model.streams.names[:2] == ("User", "Output")
    assert model.model.channel_embedding.weight.shape == (10, 64)


@pytest.mark.parametrize("case", CASES)
def test_parity(pair, case):
    assert CASES[case](*pair) <= TOL


@pytest.mark.parametrize("llama", ["llama3"], indirect=True)
def test_parity_needs_llama3_scaling(pair):
    """The scaled frequencies matter: plain RoPE at the same theta is far off."""
    model, ref, _ = pair
    flat = rows_flat(np.random.default_rng(0), rows=40)
    plain = StreamRoPE(16, model.args.rope_theta)
    scaled, model.model.rope = model.model.rope, plain
    try:
        ids, ch, pos = flat.arrays()
        got = np.array(model(ids, channels=ch, positions=pos)[0])
    finally:
        model.model.rope = scaled
    assert np.abs(got - ref_logits(ref, flat)).max() > 1e-3


def test_greedy_rows_trace_matches_reference(pair):
    model, ref, tok = pair
    spec, prompt = model.streams, "what is two plus one"
    s = Session(model, tok, sampling=GREEDY, max_steps=12, rows=RowsOptions())
    s.feed("User", prompt)
    want = rows_generate(
        ref, num_channels=spec.num_channels, silence=spec.silence_token,
        user_tokens=user_ids(tok, prompt), seed_row=seed_row(tok, spec), max_rows=12,
    )
    assert_rows_equal(session_rows(list(s), spec), want.rows)


def test_export_round_trip_and_blocks_layout(llama, tmp_path):
    """Export -> convert gives the same weights; a blocks model is saved as
    LlamaForMultiStream and comes back as a blocks model."""
    torch_dir = export(str(llama[1]), tmp_path / "pt")
    config = json.loads((torch_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_channels"] == 10
    back = cli("convert", "--hf-path", torch_dir, "--mlx-path", tmp_path / "back")
    assert back.exit_code == 0, back.output
    a = mx.load(str(llama[1] / "model.safetensors"))
    b = mx.load(str(tmp_path / "back" / "model.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)

    r = cli("convert", "--hf-path", llama[0], "--mlx-path", tmp_path / "blk", "--layout", "blocks")
    assert r.exit_code == 0, r.output
    pt = export(str(tmp_path / "blk"), tmp_path / "blk-pt")
    assert json.loads((pt / "config.json").read_text())["architectures"] == ["LlamaForMultiStream"]
    assert cli("convert", "--hf-path", pt, "--mlx-path", tmp_path / "blk2").exit_code == 0
    model, _ = mstream_mlx.load(str(tmp_path / "blk2"))
    assert model.streams.layout == "blocks" and model.streams.num_channels == 3
    assert CHANNEL_KEY in mx.load(str(tmp_path / "blk2" / "model.safetensors"))


def write_rows_data(folder, n=8):
    """User says words; Output repeats each one two rows later."""
    words = " one two three four five six seven eight nine zero".split(" ")[1:]
    rng = np.random.default_rng(0)
    folder.mkdir()
    for split in ("train", "valid"):
        lines = []
        for _ in range(n):
            said = [" " + w for w in rng.choice(words, 6)]
            streams = {"User": said + [None, None], "Output": [None, None] + said}
            lines.append(json.dumps({"streams": streams}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("llama", ["llama3"], indirect=True)
def test_lora_then_generate_and_chat(llama, tmp_path):
    model_dir, ad = llama[1], tmp_path / "ad"
    data = write_rows_data(tmp_path / "data")
    r = cli(
        "lora", "--model", model_dir, "--data", data, "--train", "--iters", "4",
        "--batch-size", "2", "--num-layers", "-1", "--steps-per-report", "2", "--val-batches", "1",
        "--learning-rate", "1e-2", "--adapter-path", ad,
    )
    assert r.exit_code == 0, r.output
    assert "Iter 4: Train loss" in r.output and (ad / "adapters.safetensors").is_file()

    # the adapters change the model
    flat = rows_flat(np.random.default_rng(1), rows=3)
    ids, ch, pos = flat.arrays()
    base, _ = mstream_mlx.load(str(model_dir))
    tuned, _ = mstream_mlx.load(str(model_dir), adapter_path=str(ad))
    diff = mx.abs(base(ids, channels=ch, positions=pos) - tuned(ids, channels=ch, positions=pos))
    assert diff.max().item() > 1e-4

    g = cli("generate", "--model", model_dir, "--adapter-path", ad, "-p", "one two",
            "--max-steps", "6", "--format", "jsonl")
    assert g.exit_code == 0, g.stderr
    rows = [json.loads(x) for x in g.stdout.splitlines() if x.startswith("{")]
    assert rows and all("Output" in x["text"] for x in rows)

    chat = subprocess.run(
        [sys.executable, "-m", "mstream_mlx.cli.main", "chat", "--model", str(model_dir),
         "--adapter-path", str(ad), "--max-steps", "6", "--seed", "0"],
        input="one two three\n", capture_output=True, text=True, timeout=120,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.startswith("You: one two three\nOutput: ")

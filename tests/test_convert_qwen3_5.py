# Copyright © 2026 mstream-mlx contributors.
"""Converters for Qwen3.5 hybrid multi-stream models (paper §7; ``docs/qwen3_5.md``).

Tiny reference checkpoints (tests/reference/torch_qwen3_5.py: PyTorch layout, conv
``[D, 1, K]``, (1+w) norms stored as w) are converted, loaded with ``mstream_mlx.load``
and compared with the PyTorch reference on the same rows; exported back and compared
bit for bit.

Bounds (hidden 64, 4 layers: 3 Gated DeltaNet + 1 full attention):
- fp32 weights (fp32 source, or bf16 source with ``--dtype float32``): max |Δlogit|
  ≤ 2e-4 (test_qwen3_5.PARITY_TOL).
- 8-bit quantized vs the unquantized MLX model: top-1 agreement ≥ 0.9 on 40 rows x 3
  streams (measured 0.975 dense and MoE on the 2-core CPU VM, mlx 0.32.4: random
  std-0.1 heads leave small top-2 gaps, as in test_convert.AGREEMENT).
"""

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from safetensors.torch import load_file

import mstream_mlx
from mstream_mlx.convert.hf_to_mlx import convert
from mstream_mlx.convert.mlx_to_torch import export
from mstream_mlx.models.base import CHANNEL_KEY
from mstream_mlx.streams import silence_token_id
from tests.reference.checkpoint import write_reference_checkpoint
from tests.reference.torch_qwen3_5 import RefQwen35Model, random_qwen3_5_state_dict
from tests.test_convert import cli, error_line, leftovers, tok_dir  # noqa: F401
from tests.test_qwen3_5 import MOE, PARITY_TOL, rows_batch, run_mlx, run_ref, tiny_config

ARCH = "StreamQwen3_5ForCausalLM"
CONV = "model.layers.0.linear_attn.conv1d.weight"
ONE_PLUS = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight", "k_norm.weight")


def is_one_plus(key: str) -> bool:
    return key == "model.norm.weight" or key.endswith(ONE_PLUS)


def checkpoint(folder, tok_dir, *, C=3, mode="column", nested=False, modes=True, dtype=torch.float32,
               fmt="safetensors", shards=1, seed=0, arch=ARCH, state_fn=None, **overrides) -> Path:
    """A tiny Qwen3.5 reference checkpoint: flat ``qwen3_5_text`` with ``model.`` keys,
    or VL-style ``qwen3_5`` + ``text_config`` with ``model.language_model.`` keys."""
    cfg = tiny_config(num_channels=C, mode=mode, **overrides)
    # the reference model (which sizes the state) refuses the modes it lacks
    state = random_qwen3_5_state_dict({**cfg, "deltanet_block_causal": mode, "deltanet_conv": "column"}, seed)
    if state_fn:
        state = state_fn(state)
    if not modes:  # the reference code's defaults apply (block_causal / column)
        del cfg["deltanet_block_causal"], cfg["deltanet_conv"]
    if nested:
        top = {k: cfg.pop(k) for k in ("num_channels", "tie_word_embeddings")}
        cfg = dict(top, model_type="qwen3_5", text_config=cfg)
        state = {k.replace("model.", "model.language_model.", 1): v for k, v in state.items()}
    write_reference_checkpoint(folder, cfg, state, fmt=fmt, shards=shards, dtype=dtype, architectures=[arch])
    for p in Path(tok_dir).iterdir():
        shutil.copy(p, folder)
    return Path(folder)


def logits_diff(model, ref, C, seed=0) -> float:
    ids, ch, pos = rows_batch(C, R=4, B=1, first_row=2, seed=seed)
    return float(np.abs(run_mlx(model, ids, ch, pos) - run_ref(ref, ids, ch, pos)).max())


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


CASES = {  # name -> checkpoint kwargs, convert flags
    # the Stream-27B run's modes, flat config
    "column-flat": (dict(C=3, mode="column"), {}),
    # VL-style nesting, model.language_model. keys, tied head, no mode keys, .bin shards
    "block_causal-nested-defaults": (
        dict(C=4, nested=True, modes=False, tie_word_embeddings=True, fmt="bin", shards=2), {}),
    # MoE, stored in bf16 as the reference's converter writes it; fp32 is lossless
    "moe-bf16-to-fp32": (dict(C=3, mode="block_causal", dtype=torch.bfloat16, **MOE), {"dtype": "float32"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reference_checkpoint_converts_and_matches(tmp_path, tok_dir, capsys, name):
    kw, flags = CASES[name]
    src = checkpoint(tmp_path / "src", tok_dir, **kw)
    dst = convert(src, tmp_path / "mlx", **flags)
    warned = "config.json has no deltanet_block_causal; using the reference code's default"
    assert (warned in capsys.readouterr().err) == (not kw.get("modes", True))

    cfg, source = read_config(dst), read_config(src)
    C = kw["C"]
    assert cfg["model_type"] == source["model_type"] and cfg["architectures"] == [ARCH]
    assert cfg["num_channels"] == C
    assert cfg["deltanet_block_causal"] == kw.get("mode", "block_causal")
    assert cfg["deltanet_conv"] == "column"
    assert ("text_config" in cfg) == kw.get("nested", False)
    model, tok = mstream_mlx.load(dst)  # no warning now: the modes are in config.json
    assert warned not in capsys.readouterr().out
    ms = cfg["multistream"]
    assert ms["layout"] == "rows" and ms["input_channels"] == [0] and len(ms["channel_names"]) == C
    assert ms["silence_token_id"] == silence_token_id(tok)

    # written in MLX layout: conv [D, K, 1], norms 1 + w, A_log fp32, the rest as asked
    w = mx.load(str(dst / "model.safetensors"))
    raw = RefQwen35Model.from_pretrained(src).state_dict()
    assert w[CONV].shape == (raw[CONV].shape[0], 4, 1)
    assert np.array_equal(np.array(w["model.norm.weight"]), raw["model.norm.weight"].numpy() + 1)
    assert w["model.layers.0.linear_attn.A_log"].dtype == mx.float32
    assert w["model.embed_tokens.weight"].dtype == mx.float32
    assert np.array_equal(np.array(w[CHANNEL_KEY]), raw[CHANNEL_KEY].numpy())

    # the reload did not add the 1 again
    assert logits_diff(model, RefQwen35Model.from_pretrained(src), C) <= PARITY_TOL


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_quantized_8bit_reloads(tmp_path, tok_dir, moe):
    src = checkpoint(tmp_path / "src", tok_dir, C=3, mode="column", **(MOE if moe else {}))
    full, _ = mstream_mlx.load(convert(src, tmp_path / "fp"))
    result = cli("convert", "--hf-path", src, "--mlx-path", tmp_path / "q", "-q", "--q-bits", 8)
    assert result.exit_code == 0, result.output
    cfg = read_config(tmp_path / "q")
    assert {cfg["quantization"][k] for k in ("bits", "group_size")} == {8, 64}
    model, _ = mstream_mlx.load(tmp_path / "q")
    m, gdn = model.model, model.layers[0].linear_attn
    assert type(m.channel_embedding) is nn.Embedding and isinstance(m.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(gdn.in_proj_qkv, nn.QuantizedLinear) and type(gdn.conv1d) is nn.Conv1d
    assert type(m.norm) is nn.RMSNorm and gdn.A_log.dtype == mx.float32
    weights = mx.load(str(tmp_path / "q" / "model.safetensors"))
    assert CHANNEL_KEY in weights and f"{CHANNEL_KEY[:-7]}.scales" not in weights
    if moe:  # routers at 8 bits / group 64, as mlx-lm keeps them
        assert cfg["quantization"]["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
        assert isinstance(m.layers[0].mlp.switch_mlp.gate_proj, QuantizedSwitchLinear)
    ids, ch, pos = rows_batch(3, R=40, seed=3)
    agree = (run_mlx(model, ids, ch, pos).argmax(-1) == run_mlx(full, ids, ch, pos).argmax(-1)).mean()
    print(f"8-bit {'moe' if moe else 'dense'}: top-1 agreement {agree:.4f}")
    assert agree >= 0.9, agree
    # a quantized folder exports (dequantized) to what the reference loads and agrees with
    pt = export(tmp_path / "q", tmp_path / "pt")
    assert logits_diff(model, RefQwen35Model.from_pretrained(pt), 3) <= PARITY_TOL


def _small_norms(state):
    """(1+w) norms near 0.2 (trained Qwen3.5 has such): 1+w - 1 is inexact in bf16."""
    return {k: (v - 0.8 if k.endswith("input_layernorm.weight") else v) for k, v in state.items()}


ROUND_TRIPS = {
    "column-fp32": dict(C=3, mode="column"),
    "block_causal-bf16-nested-tied-moe": dict(
        C=4, mode="block_causal", nested=True, tie_word_embeddings=True, dtype=torch.bfloat16,
        state_fn=_small_norms, **MOE),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_round_trip_mlx_torch_mlx_is_exact(tmp_path, tok_dir, name):
    kw = ROUND_TRIPS[name]
    src = checkpoint(tmp_path / "src", tok_dir, **kw)
    a = convert(src, tmp_path / "a")
    result = cli("export", "--model", a, "--torch-path", tmp_path / "pt")
    assert result.exit_code == 0, result.output
    pt = tmp_path / "pt"
    cfg, source = read_config(pt), read_config(src)
    assert cfg["architectures"] == [ARCH] and cfg["model_type"] == source["model_type"]
    assert cfg["deltanet_block_causal"] == kw["mode"] and cfg["deltanet_conv"] == "column"
    assert "quantization" not in cfg
    # reference layout: the reference's key names, conv [D, 1, K], (1+w) norms as w
    ref = RefQwen35Model.from_pretrained(pt)
    tensors = load_file(str(pt / "model.safetensors"))
    keys = set(ref.state_dict()) - ({"lm_head.weight"} if kw.get("tie_word_embeddings") else set())
    assert set(tensors) == keys
    wa = mx.load(str(a / "model.safetensors"))
    assert tuple(tensors[CONV].shape) == (wa[CONV].shape[0], 1, 4)
    assert all(tensors[k].dtype == torch.float32 for k in tensors if is_one_plus(k) or k.endswith("A_log"))
    if kw.get("dtype", torch.float32) == torch.float32:
        model, _ = mstream_mlx.load(a)
        assert logits_diff(model, ref, kw["C"]) <= PARITY_TOL
    else:  # the exported w gives back exactly the (1+w) the MLX model runs with
        w_ = "model.layers.1.input_layernorm.weight"
        assert (np.array(wa[w_].astype(mx.float32)) < 0.5).any()
        assert np.array_equal(tensors[w_].numpy() + 1, np.array(wa[w_].astype(mx.float32)))
    # and back: bit for bit, same config
    b = convert(pt, tmp_path / "b")
    wb = mx.load(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(wa[k].dtype == wb[k].dtype and mx.array_equal(wa[k], wb[k]) for k in wa)
    assert read_config(a) == read_config(b)


def test_plain_qwen3_5_base_converts_to_rows(tmp_path, tok_dir):
    """A Qwen3.5 base checkpoint (no channel table) becomes a 10-stream rows model with
    a new N(0, 0.02) table; its export is a StreamQwen3_5ForCausalLM the reference runs."""
    src = checkpoint(tmp_path / "src", tok_dir, C=10, arch="Qwen3_5ForCausalLM",
                     state_fn=lambda s: {k: v for k, v in s.items() if k != CHANNEL_KEY})
    cfg = read_config(src)
    for k in ("num_channels", "deltanet_block_causal", "deltanet_conv"):
        cfg.pop(k)
    (src / "config.json").write_text(json.dumps(cfg))
    dst = convert(src, tmp_path / "mlx")
    cfg = read_config(dst)
    assert cfg["architectures"] == [ARCH] and cfg["num_channels"] == 10
    assert cfg["multistream"]["layout"] == "rows" and cfg["deltanet_block_causal"] == "block_causal"
    model, _ = mstream_mlx.load(dst)
    assert 0.015 < float(np.array(model.model.channel_embedding.weight).std()) < 0.025
    ref = RefQwen35Model.from_pretrained(export(dst, tmp_path / "pt"))
    assert logits_diff(model, ref, 10) <= PARITY_TOL


# name, checkpoint kwargs, extra flags, message (a regex)
ERRORS = [
    ("conv row_boundary", dict(deltanet_conv="row_boundary"), [],
     r"deltanet_conv 'row_boundary' is not supported; mstream-mlx implements 'column' only"),
    ("delta standard", dict(deltanet_block_causal="standard"), [],
     r"deltanet_block_causal 'standard' is not supported"),
    ("blocks layout", {}, ["--layout", "blocks"],
     r"is a qwen3_5 model, which uses the rows layout only .*got layout 'blocks'"),
    ("arch vs model_type", dict(arch="Qwen3ForMultiStream"), [],
     r"architecture Qwen3ForMultiStream is a qwen3 model but model_type is 'qwen3_5_text'"),
]


@pytest.mark.parametrize("name,kw,flags,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_misconfigured_checkpoints_fail_in_one_line(tmp_path, tok_dir, name, kw, flags, message):
    src = checkpoint(tmp_path / "src", tok_dir, **kw)
    result = cli("convert", "--hf-path", src, "--mlx-path", tmp_path / "out", *flags)
    assert result.exit_code == 1
    assert re.search(message, error_line(result)), result.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []

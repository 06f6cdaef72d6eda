# Copyright © 2026 mstream-mlx contributors.
"""mstream_mlx.load: reference-style folders, the Hub cache, and every bad input."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mstream_mlx
from mstream_mlx.streams import silence_token_id
from tests.reference import RefModel
from tests.test_parity import TOL, max_diff, mlx_logits, ref_logits, rows_flat


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_weights(folder, fn):
    f = folder / "model.safetensors"
    save_file(fn(load_file(f)), f)


def edit_config(folder, **changes):
    f = folder / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))


def test_rows_and_blocks_specs_from_reference_configs(tiny_checkpoint):
    model, tok = mstream_mlx.load(tiny_checkpoint("qwen3", "rows"))
    spec = model.streams
    assert spec.layout == "rows" and spec.num_channels == 10
    assert spec.names[:2] == ("User", "Output")
    assert spec.silence_token == silence_token_id(tok)
    model, _ = mstream_mlx.load(tiny_checkpoint("qwen2", "blocks", num_channels=4))
    assert model.streams.layout == "blocks"
    assert model.streams.names == ("system", "user", "assistant", "auditor")


def test_num_channels_comes_from_the_tensor(tiny_checkpoint, tmp_path):
    folder = copy(tiny_checkpoint("qwen3", "blocks", num_channels=5), tmp_path / "m")
    edit_config(folder, num_channels=3)  # the reference's configs may say 5 or 3 or nothing
    model, _ = mstream_mlx.load(folder)
    assert model.streams.num_channels == 5


@pytest.mark.parametrize("fmt,shards,dtype", [("safetensors", 3, torch.float32), ("safetensors", 1, torch.bfloat16)])
def test_sharded_and_bf16_folders(tmp_path, fmt, shards, dtype):
    from tests.tiny import make_checkpoint

    folder = make_checkpoint(tmp_path / "m", "qwen3", "rows", fmt=fmt, shards=shards, dtype=dtype)
    model, _ = mstream_mlx.load(folder)
    ref = RefModel.from_pretrained(folder)
    flat = rows_flat(np.random.default_rng(0), rows=3)
    got = mlx_logits(model.apply(lambda p: p.astype(mx.float32)) if dtype != torch.float32 else model, flat)
    assert max_diff(got, ref_logits(ref, flat)) <= TOL


def test_language_model_prefix_and_reference_only_keys(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3", "rows")
    folder = copy(src, tmp_path / "m")

    def rename(w):
        out = {k.replace("model.", "model.language_model.", 1): v for k, v in w.items()}
        out["model.language_model.layers.0.self_attn.gate_in_norm.weight"] = torch.ones(64)
        return out

    edit_weights(folder, rename)
    a, _ = mstream_mlx.load(src)
    b, _ = mstream_mlx.load(folder)
    flat = rows_flat(np.random.default_rng(1), rows=2)
    assert max_diff(mlx_logits(a, flat), mlx_logits(b, flat)) == 0.0


def test_plain_base_model_gets_a_fresh_channel_table(tmp_path, capsys):
    from tests.tiny import make_checkpoint

    folder = make_checkpoint(tmp_path / "m", "qwen3", "blocks", channel_embedding=False)
    model, _ = mstream_mlx.load(folder)
    assert "no channel embedding" in capsys.readouterr().err
    assert model.streams.names == ("system", "user", "assistant")
    std = float(np.array(model.model.channel_embedding.weight).std())
    assert 0.015 < std < 0.025


def test_hub_id_through_the_offline_cache(tiny_checkpoint, tmp_path, monkeypatch):
    src = tiny_checkpoint("qwen3", "rows")
    repo = tmp_path / "hub" / "models--acme--tiny-stream"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model, _ = mstream_mlx.load("acme/tiny-stream")
    assert model.streams.num_channels == 10
    with pytest.raises(FileNotFoundError, match="No model folder at acme/missing, and the Hub could not provide it"):
        mstream_mlx.load("acme/missing")


ERRORS = [
    ("unknown model_type", lambda f: edit_config(f, model_type="mistral"), ValueError,
     r"Model type 'mistral' is not supported by mstream-mlx \(supported: llama, qwen2, qwen3"),
    ("role gating", lambda f: edit_config(f, role_gating_enabled=True), ValueError,
     "enables role gating"),
    ("missing tensor", lambda f: edit_weights(f, lambda w: {k: v for k, v in w.items() if "layers.1.mlp.up_proj" not in k}),
     ValueError, r"model\.layers\.1\.mlp\.up_proj\.weight"),
    ("wrong shape", lambda f: edit_weights(f, lambda w: {**w, "model.norm.weight": torch.ones(63)}),
     ValueError, r"model\.norm\.weight"),
    ("no config", lambda f: (f / "config.json").unlink(), FileNotFoundError, "No config.json in"),
    ("no weights", lambda f: (f / "model.safetensors").unlink(), FileNotFoundError, r"No model\*\.safetensors in"),
    ("bin weights", lambda f: (torch.save({}, f / "pytorch_model.bin"), (f / "model.safetensors").unlink()),
     FileNotFoundError, "holds PyTorch .bin weights; convert it first: mstream-mlx convert"),
    ("names vs table", lambda f: edit_config(f, multistream={"layout": "blocks", "channel_names": list("abcdefghijk")}),
     ValueError, "config.json names 11 streams but the channel embedding has 10 rows"),
]


@pytest.mark.parametrize("name,breakit,exc,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_folders_fail_in_one_line(tiny_checkpoint, tmp_path, name, breakit, exc, message):
    folder = copy(tiny_checkpoint("qwen3", "rows"), tmp_path / "m")
    breakit(folder)
    with pytest.raises(exc, match=message) as info:
        mstream_mlx.load(folder)
    assert "\n" not in str(info.value)


def test_missing_path_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model folder at"):
        mstream_mlx.load(str(tmp_path / "nope" / "x" / "y"))


def test_registry_is_built_from_the_family_files():
    from mstream_mlx.models import architectures, families, find_family, get_model_classes

    assert [f.name for f in families()] == ["llama", "qwen2", "qwen3", "qwen3_5"]
    assert find_family("qwen3_5_moe_text").name == "qwen3_5" and find_family("gpt2") is None
    assert architectures()["Qwen2ForMultiStream"] == (find_family("qwen2"), "blocks")
    assert architectures()["Qwen3ForCausalLM"] == (find_family("qwen3"), None)
    for f in families():  # every family saves a class name the registry reads back
        for layout, arch in f.saved_architectures.items():
            implied = architectures()[arch]
            assert implied[0] is f and implied[1] in (None, layout)
        model_class, _ = get_model_classes({"model_type": f.model_types[-1]})
        assert model_class.__module__ == f"mstream_mlx.models.{f.name}"


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2"])
def test_models_keep_the_written_contract(tiny_checkpoint, model_type):
    from mstream_mlx.models.base import Backbone, MultiStreamModel

    model, _ = mstream_mlx.load(tiny_checkpoint(model_type, "rows"))
    assert isinstance(model, MultiStreamModel) and isinstance(model.model, Backbone)
    assert not isinstance(model.model, MultiStreamModel)  # the check can fail

# Copyright © 2026 mstream-mlx contributors.
"""Qwen3.5-MoE stream checkpoints as the reference training writes them (paper §7; its
Qwen3.5-35B-A3B run; ``docs/qwen3_5.md``).

Two layouts, both built here from the reference's rules (tiny sizes):

* ``save_pretrained`` undoing transformers' checkpoint conversion:
  ``architectures: ["StreamQwen3_5MoeForCausalLM"]``, ``model_type: qwen3_5_moe_text``, a
  flat config without ``intermediate_size`` (every layer is sparse), keys under
  ``model.language_model.``, one tensor per expert;
* the model's own parameters, as the lean-checkpoint converter (ZeRO-3 -> safetensors)
  writes them: ``model.`` keys and the fused experts of transformers >= 5
  (``experts.gate_up_proj`` ``[E, 2I, D]``: gate rows then up rows; ``experts.down_proj``
  ``[E, D, I]``), in bf16.

Both load and convert as they are and match ``tests/reference/torch_qwen3_5.py`` (hybrid
DeltaNet/full-attention layers, top-2 of 4 experts renormalised, a sigmoid-gated shared
expert) on prefill, the cache path and a greedy rows trace; export writes the reference's
class name back.
"""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mstream_mlx
from mstream_mlx.models import architectures, find_family
from mstream_mlx.schedules import RowsOptions
from mstream_mlx.session import Session
from mstream_mlx.streams import ROWS
from tests.reference import rows_generate
from tests.reference.checkpoint import write_reference_checkpoint
from tests.reference.torch_qwen3_5 import RefQwen35Model, experts_per_key, random_qwen3_5_state_dict
from tests.test_convert import cli, error_line, leftovers, tok_dir  # noqa: F401
from tests.test_generate import GREEDY, assert_rows_equal, seed_row, session_rows, user_ids
from tests.test_qwen3_5 import PARITY_TOL, decode_rows, rows_batch, run_mlx, run_ref

torch.set_num_threads(2)
ARCH = "StreamQwen3_5MoeForCausalLM"
C = 3
LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]


def moe_config(**overrides) -> dict:
    """A tiny Qwen3.5-MoE stream config as the reference saves it: flat, no
    ``intermediate_size``, explicit ``layer_types`` (both kinds), the stream keys its
    training script sets."""
    cfg = dict(
        model_type="qwen3_5_moe_text",
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        rms_norm_eps=1e-6,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
        layer_types=LAYER_TYPES,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        tie_word_embeddings=False,
        num_channels=C,
        channel_embedding_method="additive",
        role_gating_enabled=False,
        deltanet_block_causal="block_causal",  # baseline_qwen3_5_moe.yaml
        deltanet_conv="column",
    )
    cfg.update(overrides)
    return cfg


def write_checkpoint(folder, tok_dir, *, layout="save_pretrained", seed=0, dtype=torch.float32, state_fn=None):
    """A tiny Qwen3.5-MoE checkpoint in one of the reference's two layouts (module doc)."""
    cfg = moe_config()
    state = random_qwen3_5_state_dict(cfg, seed)  # fused, model.* (the module's parameters)
    if layout == "save_pretrained":
        state = {k.replace("model.", "model.language_model.", 1): v for k, v in experts_per_key(state).items()}
    if state_fn:
        state = state_fn(state)
    write_reference_checkpoint(folder, cfg, state, dtype=dtype, architectures=[ARCH])
    for p in tok_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def read_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def written(tmp_path_factory, tok_dir):
    """A ``save_pretrained`` folder, ``mstream_mlx.load`` of it and its reference model."""
    folder = write_checkpoint(tmp_path_factory.mktemp("moe") / "ref", tok_dir)
    model, tok = mstream_mlx.load(folder)
    return folder, model, tok, RefQwen35Model.from_pretrained(folder)


def test_the_written_layout_is_what_transformers_saves(tmp_path, tok_dir):
    """Anchor the hand-written layout: transformers' own Qwen3.5-MoE, saved with
    ``save_pretrained``, has the same keys (channel table aside, prefix aside) and a
    config without ``intermediate_size``; that folder (a plain base) loads and converts."""
    transformers = pytest.importorskip("transformers")
    cfg = moe_config()
    stream_only = ("num_channels", "channel_embedding_method", "role_gating_enabled", "deltanet_block_causal",
                   "deltanet_conv")
    hf_cfg = {k: v for k, v in cfg.items() if k not in ("model_type", *stream_only)}
    hf = transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**hf_cfg))
    hf.save_pretrained(tmp_path / "hf")
    saved = set(load_file(str(tmp_path / "hf" / "model.safetensors")))
    ours = write_checkpoint(tmp_path / "ours", tok_dir)
    mine = {k.replace("model.language_model.", "model.") for k in load_file(str(ours / "model.safetensors"))}
    assert mine - {"model.channel_embedding.weight"} == {k.replace("model.language_model.", "model.") for k in saved}
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in mine
    assert "intermediate_size" not in read_config(tmp_path / "hf")
    assert "intermediate_size" not in read_config(ours)

    # that folder is a plain Qwen3.5-MoE base: a 10-stream rows model with a new table
    for p in tok_dir.iterdir():
        (tmp_path / "hf" / p.name).write_bytes(p.read_bytes())
    model, _ = mstream_mlx.load(tmp_path / "hf")
    assert model.streams.layout == ROWS and model.streams.num_channels == 10
    result = cli("convert", "--hf-path", tmp_path / "hf", "--mlx-path", tmp_path / "base")
    assert result.exit_code == 0, result.output
    assert read_config(tmp_path / "base")["architectures"] == [ARCH]


def test_loads_as_written_and_matches_the_reference(written):
    folder, model, tok, ref = written
    spec = model.streams
    assert spec.layout == ROWS and spec.num_channels == C and spec.inputs == (0,)
    assert model.args.num_experts == 4 and model.args.intermediate_size is None
    assert [l.is_linear for l in model.layers] == [t == "linear_attention" for t in LAYER_TYPES]
    ids, ch, pos = rows_batch(C, R=6, seed=1)
    want = run_ref(ref, ids, ch, pos)
    assert np.abs(run_mlx(model, ids, ch, pos) - want).max() <= PARITY_TOL  # prefill
    got = decode_rows(run_mlx, model, model.make_cache(), ids, ch, pos, C)  # the cache path
    assert np.abs(got - want).max() <= PARITY_TOL
    ref_cached = decode_rows(run_ref, ref, ref.new_cache(), ids, ch, pos, C)
    assert np.abs(ref_cached - want).max() <= PARITY_TOL


def test_routing_matters(written):
    """The check above can fail: without renormalising the top-2 weights the logits
    move far beyond the tolerance (measured 0.27-0.34 against max |logit| ~3)."""
    _, model, _, ref = written
    ids, ch, pos = rows_batch(C, R=4, seed=2)
    want = run_ref(ref, ids, ch, pos)
    blocks = [l.mlp for l in model.layers]
    try:
        for b in blocks:
            b.norm_topk_prob = False
        assert np.abs(run_mlx(model, ids, ch, pos) - want).max() > 100 * PARITY_TOL
    finally:
        for b in blocks:
            b.norm_topk_prob = True
    assert np.abs(run_mlx(model, ids, ch, pos) - want).max() <= PARITY_TOL


def test_greedy_rows_trace_matches_reference(written):
    _, model, tok, ref = written
    spec, prompt = model.streams, "what is two plus one"
    s = Session(model, tok, sampling=GREEDY, max_steps=10, rows=RowsOptions())
    s.feed("User", prompt)
    want = rows_generate(
        ref, num_channels=C, silence=spec.silence_token, user_tokens=user_ids(tok, prompt),
        seed_row=seed_row(tok, spec), max_rows=10,
    )
    assert_rows_equal(session_rows(list(s), spec), want.rows)


def test_convert_export_round_trip(written, tmp_path):
    """convert reads the folder as it is; export writes the reference's class name and
    the module's own (fused) parameters, which the reference loads; converting that back
    is bit-exact."""
    folder, model, _, ref = written
    a, pt, b = tmp_path / "a", tmp_path / "pt", tmp_path / "b"
    result = cli("convert", "--hf-path", folder, "--mlx-path", a)
    assert result.exit_code == 0, result.output
    cfg = read_config(a)
    assert cfg["architectures"] == [ARCH] and cfg["model_type"] == "qwen3_5_moe_text"
    assert "intermediate_size" not in cfg and cfg["num_channels"] == C
    converted, _ = mstream_mlx.load(a)
    ids, ch, pos = rows_batch(C, R=4, seed=3)
    assert np.abs(run_mlx(converted, ids, ch, pos) - run_ref(ref, ids, ch, pos)).max() <= PARITY_TOL

    result = cli("export", "--model", a, "--torch-path", pt)
    assert result.exit_code == 0, result.output
    out = read_config(pt)
    assert out["architectures"] == [ARCH] and out["model_type"] == "qwen3_5_moe_text"
    assert out["deltanet_block_causal"] == "block_causal" and out["deltanet_conv"] == "column"
    assert set(load_file(str(pt / "model.safetensors"))) == set(ref.state_dict())
    back = RefQwen35Model.from_pretrained(pt)
    assert np.abs(run_ref(back, ids, ch, pos) - run_ref(ref, ids, ch, pos)).max() <= PARITY_TOL

    assert cli("convert", "--hf-path", pt, "--mlx-path", b).exit_code == 0
    wa, wb = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(wa[k].dtype == wb[k].dtype and mx.array_equal(wa[k], wb[k]).item() for k in wa)
    assert read_config(b)["architectures"] == [ARCH]


def test_lean_checkpoint_layout(tmp_path, tok_dir):
    """The lean converter's layout (fused experts, ``model.`` keys, bf16) converts to the
    same MLX weights as ``save_pretrained``'s of the same model, and matches the
    reference in fp32."""
    lean = write_checkpoint(tmp_path / "lean", tok_dir, layout="lean", seed=4, dtype=torch.bfloat16)
    saved = write_checkpoint(tmp_path / "saved", tok_dir, seed=4, dtype=torch.bfloat16)
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(str(lean / "model.safetensors"))
    for src, dst in ((lean, tmp_path / "a"), (saved, tmp_path / "b")):
        result = cli("convert", "--hf-path", src, "--mlx-path", dst, "--dtype", "float32")
        assert result.exit_code == 0, result.output
    wa, wb = mx.load(str(tmp_path / "a" / "model.safetensors")), mx.load(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(mx.array_equal(wa[k], wb[k]).item() for k in wa)
    model, _ = mstream_mlx.load(tmp_path / "a")
    ids, ch, pos = rows_batch(C, R=4, seed=4)
    want = run_ref(RefQwen35Model.from_pretrained(lean), ids, ch, pos)
    assert np.abs(run_mlx(model, ids, ch, pos) - want).max() <= PARITY_TOL
    lean_model, _ = mstream_mlx.load(lean)  # and loads directly, in bf16
    assert lean_model.model.embed_tokens.weight.dtype == mx.bfloat16


def test_registry_saves_moe_under_its_own_class():
    family = find_family("qwen3_5_moe_text")
    assert architectures()[ARCH] == (family, ROWS)
    for model_type in family.model_types:
        arch = family.saved_architecture(ROWS, model_type)
        assert arch == (ARCH if "moe" in model_type else "StreamQwen3_5ForCausalLM")
        assert architectures()[arch] == (family, ROWS)


def _drop_expert(state):
    return {k: v for k, v in state.items() if ".layers.2.mlp.experts.3." not in k}


BAD = {  # name -> (state change, config change, the one error line)
    "missing expert": (
        _drop_expert, {},
        r"Missing tensor model\.layers\.2\.mlp\.experts\.3\.gate_proj\.weight \(the config has 4 experts"),
    "dense config without intermediate_size": (
        None, {"model_type": "qwen3_5_text", "num_experts": 0},
        r"intermediate_size is missing from the model config"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_folders_fail_in_one_line(tmp_path, tok_dir, name):
    state_fn, config_change, message = BAD[name]
    src = write_checkpoint(tmp_path / "src", tok_dir, state_fn=state_fn)
    (src / "config.json").write_text(json.dumps({**read_config(src), **config_change}))
    with pytest.raises(ValueError, match=message) as info:
        mstream_mlx.load(src)
    assert "\n" not in str(info.value)
    result = cli("convert", "--hf-path", src, "--mlx-path", tmp_path / "out")
    assert result.exit_code == 1
    assert re.search(message, error_line(result)), result.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []

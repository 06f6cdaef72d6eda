# Copyright © 2026 mstream-mlx contributors.
"""Qwen3.5 hybrid multi-stream models: DeltaNet stream modes, cache, loading, parity.

The PyTorch side is ``tests/reference/torch_qwen3_5.py`` (naive loops, written from
the rules in ``docs/qwen3_5.md``); the §11.2 and §11.3 vectors are the Stream-27B
reference's own test vectors (column conv, delta rule).
"""

import copy
import json
import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from mlx_lm.models import qwen3_5 as lm_qwen3_5
from mlx_lm.models.gated_delta import gated_delta_ops
from mlx_lm.tuner.utils import linear_to_lora_layers

import mstream_mlx
from mstream_mlx.deltanet import (
    DeltaNetCache,
    block_causal_delta,
    column_conv,
    from_columns,
    to_columns,
)
from mstream_mlx.models.qwen3_5 import Model, ModelArgs
from mstream_mlx.prefill import prefill
from mstream_mlx.streams import ROWS, rows_to_flat, silence_token_id
from tests.reference.checkpoint import write_reference_checkpoint
from tests.reference.torch_qwen3_5 import (
    RefQwen35Model,
    column_conv as ref_column_conv,
    delta_block_causal,
    delta_column,
    delta_vanilla,
    random_qwen3_5_state_dict,
)
from tests.tiny import make_tokenizer

torch.set_num_threads(2)
PARITY_TOL = 2e-4  # fp32 logits, MLX vs the PyTorch reference


def tiny_config(num_channels=3, mode="column", **overrides) -> dict:
    """4 layers (3 Gated DeltaNet + 1 full attention), hidden 64."""
    cfg = dict(
        model_type="qwen3_5_text",
        hidden_size=64,
        num_hidden_layers=4,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # partial RoPE: 8 of 32 dims
        vocab_size=512,
        rms_norm_eps=1e-6,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
        full_attention_interval=4,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        tie_word_embeddings=False,
        num_channels=num_channels,
        deltanet_block_causal=mode,
        deltanet_conv="column",
    )
    cfg.update(overrides)
    return cfg


MOE = dict(
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
)


def mlx_from_state(cfg: dict, state: dict) -> Model:
    model = Model(ModelArgs.from_dict(cfg))
    weights = model.sanitize({k: mx.array(v.numpy()) for k, v in state.items()})
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def build(cfg: dict, seed: int = 0):
    state = random_qwen3_5_state_dict(cfg, seed)
    ref = RefQwen35Model(cfg)
    ref.load_state_dict(state, strict=True)
    return ref.eval(), mlx_from_state(cfg, state)


def rows_batch(C: int, R: int, B: int = 1, first_row: int = 0, seed: int = 0):
    """Random ids and the row-major channels/positions, as numpy ``[B, R*C]``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 512, size=(B, R * C))
    channels = np.tile(np.arange(C), (B, R))
    positions = np.tile(np.repeat(np.arange(first_row, first_row + R), C), (B, 1))
    return ids, channels, positions


def run_mlx(model, ids, channels, positions, cache=None) -> np.ndarray:
    a = [mx.array(x, dtype=mx.int32) for x in (ids, channels, positions)]
    out = model(a[0], channels=a[1], positions=a[2], cache=cache)
    return np.array(out.astype(mx.float32))


def run_ref(model, ids, channels, positions, cache=None) -> np.ndarray:
    t = [torch.tensor(x) for x in (ids, channels, positions)]
    with torch.no_grad():
        return model(t[0], t[1], t[2], cache=cache).float().numpy()


def decode_rows(run, model, cache, ids, channels, positions, C) -> np.ndarray:
    """Feed whole rows one at a time; logits concatenated in input order."""
    L = ids.shape[1]
    return np.concatenate(
        [run(model, *(x[:, s : s + C] for x in (ids, channels, positions)), cache) for s in range(0, L, C)],
        axis=1,
    )


# ----------------------------------------------------------------------- §11.2 column conv
CONV_X = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
CONV_OUT = [2.0, 4.0, 6.5, 9.0, 11.5, 14.0]


def test_column_conv_vector_mlx():
    conv = nn.Conv1d(1, 1, kernel_size=2, groups=1, bias=False)
    conv.weight = mx.array([0.5, 2.0]).reshape(1, 2, 1)  # (D, K, 1): w[1] = this row
    x = mx.array(CONV_X).reshape(1, 6, 1)
    out, _ = column_conv(conv, x, 2)
    assert np.allclose(np.array(out).ravel(), CONV_OUT)
    # row by row with the carried history (K-1 rows per stream)
    first, hist = column_conv(conv, x[:, :4], 2)
    last, _ = column_conv(conv, x[:, 4:], 2, hist)
    assert np.allclose(np.concatenate([np.array(first), np.array(last)], 1).ravel(), CONV_OUT)


def test_column_conv_vector_reference():
    w = torch.tensor([0.5, 2.0]).view(1, 1, 2)  # PyTorch layout (D, 1, K)
    x = torch.tensor(CONV_X).view(1, 6, 1)
    out, _ = ref_column_conv(x, w, 2)
    assert torch.allclose(out.flatten(), torch.tensor(CONV_OUT))
    first, hist = ref_column_conv(x[:, :2], w, 2)
    rest, _ = ref_column_conv(x[:, 2:], w, 2, hist)
    assert torch.allclose(torch.cat([first, rest], 1).flatten(), torch.tensor(CONV_OUT))


# ----------------------------------------------------------------------- §11.3 delta rule
Q = [[1, 0], [0.8, 0.6], [0, 1], [0.6, -0.8]]
K_ = [[1, 0], [0.6, 0.8], [0, 1], [0.8, -0.6]]
V = [[1, 2], [3, 4], [5, 6], [7, 8]]
EXP_G = [0.5, 0.8, 0.9, 0.7]
BETA = [0.5, 1.0, 0.25, 0.75]
VEC = {  # out [4][2], state [Dk][Dv] (column: one per channel)
    "vanilla": (
        [[0.353553, 0.707107], [2.099824, 2.842004], [1.937755, 2.404729], [3.086634, 3.484610]],
        [[5.564126, 6.610973], [-1.283355, -1.201750]],
    ),
    "block_causal": (
        [[0.353553, 0.707107], [2.036468, 2.715290], [1.937755, 2.404729], [3.186053, 3.594591]],
        [[5.564126, 6.610973], [-1.283355, -1.201750]],
    ),
    "column": (
        [[0.353553, 0.707107], [2.036468, 2.715290], [0.883883, 1.060660], [3.148039, 3.518563]],
        [[[0.45, 0.90], [1.25, 1.50]], [[5.46, 6.48], [-1.47, -1.36]]],
    ),
}


def _mlx_rule(mode, sl=slice(0, 4), state=None):
    """The MLX rule of ``mode`` on the vectors: B = H = 1, C = 2, q scaled by Dk^-0.5."""
    q, k, v = (mx.array(x, dtype=mx.float32)[None, sl, None] for x in (Q, K_, V))
    g, beta = (mx.array(x, dtype=mx.float32)[None, sl, None] for x in (EXP_G, BETA))
    q = q * 2**-0.5
    if mode == "vanilla":
        return gated_delta_ops(q, k, v, g, beta, state)
    if mode == "block_causal":
        return block_causal_delta(q, k, v, g, beta, 2, state)
    # column: one stream per batch row, then the stock sequential rule (§5.4)
    out, state = gated_delta_ops(*(to_columns(x, 2) for x in (q, k, v, g, beta)), state)
    return from_columns(out, 2), state


def _mlx_state_dkdv(mode, state):  # mlx-lm keeps [.., Dv, Dk]; the vectors are [Dk][Dv]
    s = np.array(state).swapaxes(-1, -2)
    return s[:, 0] if mode == "column" else s[0, 0]


@pytest.mark.parametrize("mode", list(VEC))
def test_delta_vectors_mlx(mode):
    want_out, want_state = VEC[mode]
    out, state = _mlx_rule(mode)
    assert np.allclose(np.array(out)[0, :, 0], want_out, atol=1e-5)
    assert np.allclose(_mlx_state_dkdv(mode, state), want_state, atol=1e-5)
    # 1 + 1 rows with the carried state reproduce both
    o1, s1 = _mlx_rule(mode, slice(0, 2))
    o2, s2 = _mlx_rule(mode, slice(2, 4), s1)
    out2 = np.concatenate([np.array(o1), np.array(o2)], 1)[0, :, 0]
    assert np.allclose(out2, want_out, atol=1e-5)
    assert np.allclose(_mlx_state_dkdv(mode, s2), want_state, atol=1e-5)


def _ref_rule(mode, sl=slice(0, 4), state=None):
    q, k, v = (torch.tensor(x, dtype=torch.float32)[None, sl, None] for x in (Q, K_, V))
    g = torch.log(torch.tensor(EXP_G))[None, sl, None]
    beta = torch.tensor(BETA)[None, sl, None]
    if mode == "vanilla":
        return delta_vanilla(q, k, v, g, beta, state)
    rule = delta_block_causal if mode == "block_causal" else delta_column
    return rule(q, k, v, g, beta, 2, state)


@pytest.mark.parametrize("mode", list(VEC))
def test_delta_vectors_reference(mode):
    want_out, want_state = VEC[mode]
    out, state = _ref_rule(mode)
    state = state[0, 0]  # column: [C, Dk, Dv]; else [Dk, Dv]
    assert torch.allclose(out[0, :, 0], torch.tensor(want_out), atol=1e-5)
    assert torch.allclose(state, torch.tensor(want_state), atol=1e-5)
    o1, s1 = _ref_rule(mode, slice(0, 2))
    o2, s2 = _ref_rule(mode, slice(2, 4), s1)
    assert torch.allclose(torch.cat([o1, o2], 1)[0, :, 0], torch.tensor(want_out), atol=1e-5)
    assert torch.allclose(s2[0, 0], torch.tensor(want_state), atol=1e-5)


def test_block_causal_rule_random():
    """MLX == reference on random inputs with GQA-style head sharing; the block-causal
    state is the vanilla state and the first token of every row is the vanilla output."""
    gen = torch.Generator().manual_seed(0)
    B, R, C, Hk, Hv, Dk, Dv = 2, 4, 3, 2, 4, 8, 8
    L = R * C
    q = torch.nn.functional.normalize(torch.randn(B, L, Hk, Dk, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, L, Hk, Dk, generator=gen), dim=-1)
    v = torch.randn(B, L, Hv, Dv, generator=gen)
    g = -0.5 * torch.rand(B, L, Hv, generator=gen)
    beta = torch.rand(B, L, Hv, generator=gen)
    rep = lambda t: t.repeat_interleave(Hv // Hk, dim=2)  # noqa: E731
    ref_out, ref_state = delta_block_causal(rep(q), rep(k), v, g, beta, C)
    van_out, van_state = delta_vanilla(rep(q), rep(k), v, g, beta)
    assert torch.allclose(ref_state, van_state, atol=1e-5)
    assert torch.allclose(ref_out[:, ::C], van_out[:, ::C], atol=1e-5)
    assert not torch.allclose(ref_out[:, 1::C], van_out[:, 1::C], atol=1e-3)

    m = lambda t: mx.array(t.numpy())  # noqa: E731
    out, state = block_causal_delta(m(q) * Dk**-0.5, m(k), m(v), mx.exp(m(g)), m(beta), C)
    assert np.allclose(np.array(out), ref_out.numpy(), atol=1e-5)
    assert np.allclose(np.array(state).swapaxes(-1, -2), ref_state.numpy(), atol=1e-5)


# ----------------------------------------------------------------------- the layer
def _layer_input(cfg, R, seed=0):
    C = cfg["num_channels"]
    return mx.random.normal((2, R * C, cfg["hidden_size"]), key=mx.random.key(seed))


def test_column_layer_is_stock_layer_per_stream():
    """Column mode == mlx-lm's unmodified Qwen3.5 GatedDeltaNet on each stream alone."""
    cfg = tiny_config(num_channels=3, mode="column")
    model = build(cfg)[1]
    layer = model.layers[0].linear_attn
    stock = lm_qwen3_5.GatedDeltaNet(lm_qwen3_5.TextModelArgs.from_dict(cfg))
    stock.update(layer.parameters())
    x = _layer_input(cfg, R=5)
    out = np.array(layer(x))
    for c in range(3):
        # different matmul shapes: OpenBLAS may round differently (seen: 1.2e-7)
        assert np.allclose(out[:, c::3], np.array(stock(x[:, c::3])), atol=1e-5)


def test_block_causal_layer_one_stream_is_stock_layer():
    """With one stream, block_causal (own conv + forked rule) == the stock layer."""
    cfg = tiny_config(num_channels=1, mode="block_causal")
    layer = build(cfg)[1].layers[0].linear_attn
    stock = lm_qwen3_5.GatedDeltaNet(lm_qwen3_5.TextModelArgs.from_dict(cfg))
    stock.update(layer.parameters())
    x = _layer_input(cfg, R=7)
    assert np.allclose(np.array(layer(x)), np.array(stock(x)), atol=1e-5)


def test_column_layer_perturbation_stays_in_its_stream():
    """Column mode: changing stream 1's input from row 2 on changes only stream 1's
    output and only its conv history and recurrent state (bit-exact elsewhere)."""
    cfg = tiny_config(num_channels=3, mode="column")
    layer = build(cfg)[1].layers[0].linear_attn
    x = _layer_input(cfg, R=5)
    bump = np.zeros(x.shape, dtype=np.float32)
    bump[:, 2 * 3 + 1 :: 3] = 1.0  # stream 1, rows 2..4
    outs, caches = [], []
    for xi in (x, x + mx.array(bump)):
        cache = DeltaNetCache()
        outs.append(np.array(layer(xi, cache)))
        caches.append([np.array(a) for a in cache.cache])
    diff = np.abs(outs[0] - outs[1]).max(axis=(0, 2)).reshape(5, 3)  # (row, stream)
    assert (diff[:, [0, 2]] == 0).all() and (diff[:2, 1] == 0).all()
    assert (diff[2:, 1] > 1e-4).all()
    for a, b in zip(*caches):  # (B*C, ...): stream c of batch b at b*C + c
        changed = np.abs(a - b).reshape(2, 3, -1).max(axis=(0, 2))
        assert changed[0] == 0 and changed[2] == 0 and changed[1] > 0


# ----------------------------------------------------------------------- the model
@pytest.mark.parametrize(
    "mode,C,extra",
    [
        ("column", 3, {}),
        ("column", 4, {}),
        ("block_causal", 3, {}),
        ("block_causal", 4, {"tie_word_embeddings": True}),
        ("column", 3, MOE),
    ],
    ids=["column-C3", "column-C4", "block_causal-C3", "block_causal-C4-tied", "moe-column-C3"],
)
def test_logits_parity_with_reference(mode, C, extra):
    cfg = tiny_config(num_channels=C, mode=mode, **extra)
    ref, model = build(cfg)
    ids, ch, pos = rows_batch(C, R=5, B=2, first_row=3)
    diff = np.abs(run_mlx(model, ids, ch, pos) - run_ref(ref, ids, ch, pos)).max()
    assert diff <= PARITY_TOL, f"max |MLX - reference| = {diff:.2e}"
    # decode from a cache too (row by row), on both sides
    mlx_rows = decode_rows(run_mlx, model, model.make_cache(), ids, ch, pos, C)
    ref_rows = decode_rows(run_ref, ref, ref.new_cache(), ids, ch, pos, C)
    assert np.abs(mlx_rows - ref_rows).max() <= PARITY_TOL


@pytest.mark.parametrize("mode", ["column", "block_causal"])
def test_prefill_equals_row_by_row_decode(mode):
    C, R = 3, 6
    ref, model = build(tiny_config(num_channels=C, mode=mode), seed=1)
    ids, ch, pos = rows_batch(C, R, B=2, seed=1)
    whole = run_mlx(model, ids, ch, pos)
    rows = decode_rows(run_mlx, model, model.make_cache(), ids, ch, pos, C)
    assert np.abs(whole - rows).max() < 1e-4
    # prefill 4 rows, then decode the rest
    cache = model.make_cache()
    head = run_mlx(model, ids[:, : 4 * C], ch[:, : 4 * C], pos[:, : 4 * C], cache)
    tail = decode_rows(run_mlx, model, cache, ids[:, 4 * C :], ch[:, 4 * C :], pos[:, 4 * C :], C)
    assert np.abs(whole - np.concatenate([head, tail], 1)).max() < 1e-4
    # the reference agrees with itself the same way
    ref_whole = run_ref(ref, ids, ch, pos)
    ref_rows = decode_rows(run_ref, ref, ref.new_cache(), ids, ch, pos, C)
    assert np.abs(ref_whole - ref_rows).max() < 1e-4


@pytest.mark.parametrize("mode", ["column", "block_causal"])
def test_chunked_prefill_equals_whole(mode):
    C, R = 4, 7
    model = build(tiny_config(num_channels=C, mode=mode), seed=2)[1]
    ids, ch, pos = rows_batch(C, R, seed=2)
    whole = run_mlx(model, ids, ch, pos)[0]
    flat = rows_to_flat(ids.reshape(R, C))
    at = list(range(R * C))
    chunked = np.array(prefill(model, flat, model.make_cache(), logits_at=at, step=2 * C))
    assert np.abs(chunked - whole).max() < 1e-4
    # prefill rounds a step that is not whole rows down to whole rows
    odd = np.array(prefill(model, flat, model.make_cache(), logits_at=at, step=2 * C + 1))
    assert np.abs(odd - whole).max() < 1e-4


def _perturbed(cfg, r, c, R=5):
    """Logits diff (row, stream) when the token of stream c at row r changes."""
    C = cfg["num_channels"]
    model = build(cfg, seed=3)[1]
    ids, ch, pos = rows_batch(C, R, seed=3)
    other = ids.copy()
    other[0, r * C + c] = (other[0, r * C + c] + 1) % 512
    diff = np.abs(run_mlx(model, ids, ch, pos) - run_mlx(model, other, ch, pos))
    return diff.max(axis=-1)[0].reshape(R, C)


def test_column_mode_streams_are_independent_without_attention():
    """All-DeltaNet column model: a token changes its own stream only, from its row on."""
    cfg = tiny_config(num_channels=3, mode="column", num_hidden_layers=3)
    d = _perturbed(cfg, r=2, c=1)
    assert (d[:, [0, 2]] == 0).all() and (d[:2, 1] == 0).all() and (d[2:, 1] > 0).all()


def test_column_mode_cross_stream_path_is_full_attention_only():
    """Hybrid column model: other streams see the change only from the next row (the
    full-attention layer is the only cross-stream path and lags one row)."""
    d = _perturbed(tiny_config(num_channels=3, mode="column"), r=2, c=1)
    assert (d[:2] == 0).all()
    assert d[2, 0] == 0 and d[2, 2] == 0 and d[2, 1] > 0
    assert (d[3:] > 0).all()


def test_block_causal_shared_state_leaks_one_row_later():
    """All-DeltaNet block_causal model: row-mates never see each other (forked output),
    but the shared state carries the change to every stream from the next row on."""
    cfg = tiny_config(num_channels=3, mode="block_causal", num_hidden_layers=3)
    d = _perturbed(cfg, r=2, c=1)
    assert (d[:2] == 0).all()
    assert d[2, 0] == 0 and d[2, 2] == 0 and d[2, 1] > 0
    assert (d[3:] > 0).all()


def test_cache_state_round_trip():
    """``state`` covers every field: a cache rebuilt with ``from_state`` decodes on
    exactly like the original."""
    C = 3
    model = build(tiny_config(num_channels=C, mode="block_causal"), seed=4)[1]
    ids, ch, pos = rows_batch(C, R=4, seed=4)
    cache = model.make_cache()
    run_mlx(model, ids[:, : 3 * C], ch[:, : 3 * C], pos[:, : 3 * C], cache)
    mx.eval([c.state for c in cache])
    clone = [type(c).from_state(c.state) for c in cache]
    last = tuple(x[:, 3 * C :] for x in (ids, ch, pos))
    a, b = run_mlx(model, *last, cache), run_mlx(model, *last, clone)
    assert np.array_equal(a, b)
    assert clone[0].offset == 4 * C and clone[0].max_y.tolist() == [3]


@pytest.mark.parametrize("mode", ["column", "block_causal"])
def test_last_step_can_be_taken_back(mode):
    """A pipelined decode loop trims a launched step off every cache: the DeltaNet
    state steps back over its last call exactly (and refuses any other amount)."""
    C = 3
    model = build(tiny_config(num_channels=C, mode=mode), seed=13)[1]
    ids, ch, pos = rows_batch(C, R=4, seed=13)
    other = ids.copy()
    other[:, 3 * C :] = (other[:, 3 * C :] + 7) % 512
    want = run_mlx(model, other, ch, pos)[:, 3 * C :]
    cache = model.make_cache()
    run_mlx(model, ids[:, : 3 * C], ch[:, : 3 * C], pos[:, : 3 * C], cache)
    run_mlx(model, ids[:, 3 * C :], ch[:, 3 * C :], pos[:, 3 * C :], cache)
    for c in cache:
        c.trim(C)
    got = run_mlx(model, other[:, 3 * C :], ch[:, 3 * C :], pos[:, 3 * C :], cache)
    assert np.abs(got - want).max() < 1e-5
    with pytest.raises(ValueError, match="only step back over its last call"):
        cache[0].trim(2 * C)


def test_bfloat16_runs_and_keeps_A_log_fp32():
    C = 3
    model = build(tiny_config(num_channels=C, mode="column"), seed=5)[1]
    ids, ch, pos = rows_batch(C, R=3, seed=5)
    want = run_mlx(model, ids, ch, pos)
    predicate = model.cast_predicate
    model.update(
        tree_map_with_path(
            lambda p, v: v.astype(mx.bfloat16) if predicate(p) else v, model.parameters()
        )
    )
    assert model.layers[0].linear_attn.A_log.dtype == mx.float32
    args = [mx.array(x, dtype=mx.int32) for x in (ids, ch, pos)]
    got = model(args[0], channels=args[1], positions=args[2])
    assert got.dtype == mx.bfloat16
    got = np.array(got.astype(mx.float32))
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.8


# ----------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "key,value,match",
    [
        ("deltanet_conv", "row_boundary", "row_boundary"),
        ("deltanet_conv", "standard", "'standard' is not supported"),
        ("deltanet_block_causal", "standard", "'standard' is not supported"),
        ("multistream", {"layout": "blocks"}, "rows layout"),
        ("role_gating_enabled", True, "role gating"),
    ],
)
def test_unsupported_configs_are_refused(key, value, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_dict(tiny_config(**{key: value}))


def test_misaligned_or_disordered_rows_are_refused():
    C = 3
    model = build(tiny_config(num_channels=C), seed=6)[1]
    ids, ch, pos = rows_batch(C, R=2, seed=6)
    with pytest.raises(ValueError, match="not a multiple of the 3 channels"):
        run_mlx(model, ids[:, :4], ch[:, :4], pos[:, :4])
    with pytest.raises(ValueError, match="channels 0..2 in order"):
        run_mlx(model, ids, ch[:, ::-1].copy(), pos, model.make_cache())
    with pytest.raises(ValueError, match="share one position"):
        run_mlx(model, ids, ch, np.arange(2 * C)[None], model.make_cache())
    cache = model.make_cache()
    run_mlx(model, ids[:, :C], ch[:, :C], pos[:, :C], cache)
    with pytest.raises(ValueError, match="increasing y"):  # row 0 fed twice
        run_mlx(model, ids[:, :C], ch[:, :C], pos[:, :C], cache)


# ----------------------------------------------------------------------- checkpoints
def test_sanitize_adds_one_exactly_where_the_reference_has_one_plus_w():
    cfg = tiny_config(num_channels=3, mode="column")
    state = random_qwen3_5_state_dict(cfg, seed=7)
    model = Model(ModelArgs.from_dict(cfg))
    raw = {k: mx.array(v.numpy()) for k, v in state.items()}
    out = model.sanitize(dict(raw))
    plus_one = {k for k in raw if raw[k].ndim == 1 and not np.allclose(np.array(out[k]), np.array(raw[k]))}
    assert plus_one == {
        k
        for k in raw
        if k == "model.norm.weight"
        or k.endswith(("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight", "k_norm.weight"))
    }
    for k in plus_one:
        assert np.allclose(np.array(out[k]), np.array(raw[k]) + 1.0)
    conv = "model.layers.0.linear_attn.conv1d.weight"
    assert out[conv].shape == (raw[conv].shape[0], 4, 1)
    assert np.array_equal(np.array(out["model.channel_embedding.weight"]), np.array(raw["model.channel_embedding.weight"]))
    # an MLX-layout folder (already converted) is left alone
    again = model.sanitize(dict(out))
    assert all(np.array_equal(np.array(again[k]), np.array(out[k])) for k in out)


def _write_checkpoint(folder, cfg, state, nested=False):
    if nested:  # VL-style: text_config + model.language_model. keys
        top = {k: cfg[k] for k in ("num_channels", "tie_word_embeddings")}
        text = {k: v for k, v in cfg.items() if k not in top}
        cfg = dict(top, model_type="qwen3_5", text_config=text)
        state = {k.replace("model.", "model.language_model.", 1): v for k, v in state.items()}
    write_reference_checkpoint(folder, cfg, state, architectures=["StreamQwen3_5ForCausalLM"])
    make_tokenizer(folder)
    return folder


@pytest.mark.parametrize("nested", [False, True], ids=["flat-column", "nested-defaults"])
def test_load_reference_checkpoint(tmp_path, capsys, nested):
    C = 4
    if nested:  # no DeltaNet keys: the reference code's defaults (block_causal / column)
        cfg = tiny_config(num_channels=C, tie_word_embeddings=True)
        del cfg["deltanet_block_causal"], cfg["deltanet_conv"]
    else:  # the Stream-27B run's modes
        cfg = tiny_config(num_channels=C, mode="column")
    state = random_qwen3_5_state_dict(cfg, seed=8)
    folder = _write_checkpoint(tmp_path / "ckpt", cfg, state, nested)
    model, tokenizer = mstream_mlx.load(str(folder))
    warned = "no deltanet_block_causal; using the reference code's default"
    assert (warned in capsys.readouterr().err) == nested
    assert model.args.deltanet_block_causal == ("block_causal" if nested else "column")
    assert model.args.deltanet_conv == "column"
    spec = model.streams
    assert spec.layout == ROWS and spec.num_channels == C and spec.inputs == (0,)
    assert spec.silence_token == silence_token_id(tokenizer)
    ref = RefQwen35Model.from_pretrained(folder)
    assert ref.config.delta_mode == model.args.deltanet_block_causal
    ids, ch, pos = rows_batch(C, R=4, seed=8)
    diff = np.abs(run_mlx(model, ids, ch, pos) - run_ref(ref, ids, ch, pos)).max()
    assert diff <= PARITY_TOL


def test_plain_qwen3_5_base_model_loads_as_rows(tmp_path):
    """A Qwen3.5 base checkpoint (no channel table) loads as a 10-channel rows model
    with the channel table initialised for fine-tuning."""
    cfg = tiny_config(num_channels=10)
    state = random_qwen3_5_state_dict(cfg, seed=9)
    del state["model.channel_embedding.weight"]
    for k in ("num_channels", "deltanet_block_causal", "deltanet_conv"):
        cfg.pop(k)
    folder = tmp_path / "base"
    write_reference_checkpoint(folder, cfg, state, architectures=["Qwen3_5ForCausalLM"])
    make_tokenizer(folder)
    model, _ = mstream_mlx.load(str(folder))
    assert model.streams.layout == ROWS and model.streams.num_channels == 10
    assert model.model.channel_embedding.weight.shape == (10, 64)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen3_5_text"


def test_stock_mlx_lm_qwen3_5_folder_loads(tmp_path):
    """A folder mlx-lm wrote for a plain Qwen3.5 (text_config, ``language_model.*`` keys,
    MLX layout: norms already 1+w) loads; with one stream and a zero channel table it
    reproduces mlx-lm's own logits."""
    cfg = tiny_config(num_channels=1)
    text = {k: v for k, v in cfg.items() if not k.startswith(("num_channels", "deltanet"))}
    config = {"model_type": "qwen3_5", "text_config": text}
    stock = lm_qwen3_5.Model(lm_qwen3_5.ModelArgs.from_dict(copy.deepcopy(config)))
    noise = lambda p: p + 0.1 * mx.random.normal(p.shape, key=mx.random.key(p.size))  # noqa: E731
    stock.update(tree_map(noise, stock.parameters()))  # norms away from 1
    folder = tmp_path / "stock"
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(stock.parameters())))
    (folder / "config.json").write_text(json.dumps({**config, "num_channels": 1}))
    make_tokenizer(folder)
    model, _ = mstream_mlx.load(str(folder))
    model.model.channel_embedding.weight = mx.zeros((1, 64))
    ids = rows_batch(1, R=8, seed=11)[0]
    want = np.array(stock(mx.array(ids)))
    got = run_mlx(model, ids, np.zeros_like(ids), np.arange(8)[None])
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("mode", ["column", "block_causal"])
def test_lora_training_step_compiles(mode):
    """What the tuner does: LoRA on every linear layer, a compiled value_and_grad step on
    the next-row loss (target of (c, y) = stream c at y + 1); the loss goes down."""
    C, R = 3, 6
    model = build(tiny_config(num_channels=C, mode=mode), seed=12)[1]
    model.freeze()
    linear_to_lora_layers(model, 4, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    model.train()
    ids, ch, pos = (mx.array(x, dtype=mx.int32) for x in rows_batch(C, R, B=2, seed=12))

    def loss_fn(model):
        logits = model(ids, channels=ch, positions=pos)[:, :-C]
        return nn.losses.cross_entropy(logits, ids[:, C:]).mean()

    opt = optim.Adam(learning_rate=1e-2)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step():
        loss, grads = nn.value_and_grad(model, loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = []
    for _ in range(5):
        losses.append(step().item())
        mx.eval(state)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


# ----------------------------------------------------------------------- HF anchor
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_reference_with_one_stream_is_transformers_qwen3_5(moe):
    """With one stream, both DeltaNet modes are the vanilla layer and the stream mask is
    causal, so the reference must equal transformers' own Qwen3.5 (same weights)."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(num_channels=1, mode="block_causal", **(MOE if moe else {}))
    state = random_qwen3_5_state_dict(cfg, seed=10)
    state["model.channel_embedding.weight"].zero_()  # a plain Qwen3.5 has none
    ref = RefQwen35Model(cfg)
    ref.load_state_dict(state)
    ref.eval()
    names = ("num_channels", "deltanet_block_causal", "deltanet_conv", "model_type")
    hf_cfg = {k: v for k, v in cfg.items() if k not in names}
    if moe:
        cls, conf = transformers.Qwen3_5MoeForCausalLM, transformers.Qwen3_5MoeTextConfig
    else:
        cls, conf = transformers.Qwen3_5ForCausalLM, transformers.Qwen3_5TextConfig
    hf = cls(conf(**hf_cfg, attn_implementation="eager")).eval()
    hf_state = {k: v for k, v in state.items() if k != "model.channel_embedding.weight"}
    hf.load_state_dict({k: hf_state.get(k, v) for k, v in hf.state_dict().items()}, strict=True)
    assert set(hf_state) <= set(hf.state_dict())
    ids = torch.tensor(rows_batch(1, R=9, seed=10)[0])
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = ref(ids, torch.zeros_like(ids), torch.arange(9)[None])
    assert torch.abs(got - want).max() < 1e-4, float(torch.abs(got - want).max())


def test_same_commands_as_qwen3(tmp_path):
    """A reference-style Qwen3.5 checkpoint converts, fine-tunes (LoRA), fuses and
    generates through the CLI exactly like a Qwen3 one (issue: same commands)."""
    import json as _json

    from typer.testing import CliRunner

    from mstream_mlx.cli.main import app

    C = 3
    cfg = tiny_config(num_channels=C, mode="column")
    src = _write_checkpoint(tmp_path / "ref", cfg, random_qwen3_5_state_dict(cfg, seed=9))
    data = tmp_path / "data"
    data.mkdir()
    row = {"streams": {"User": [" one", " two", None, None], "Output": [None, None, " three", None]}}
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text((_json.dumps(row) + "\n") * 8)
    run = CliRunner()
    steps = [
        ["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "mlx")],
        ["lora", "--model", str(tmp_path / "mlx"), "--data", str(data), "--train",
         "--iters", "4", "--batch-size", "2", "--num-layers", "-1",
         "--adapter-path", str(tmp_path / "ad"), "--steps-per-eval", "2", "--val-batches", "1"],
        ["fuse", "--model", str(tmp_path / "mlx"), "--adapter-path", str(tmp_path / "ad"),
         "--save-path", str(tmp_path / "fused")],
        ["generate", "--model", str(tmp_path / "fused"), "-p", "one two", "--max-steps", "6",
         "--format", "jsonl"],
    ]
    for argv in steps:
        res = run.invoke(app, argv)
        assert res.exit_code == 0, f"{argv[0]}: {res.output}{res.exception!r}"
    lines = [_json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")]
    assert len(lines) >= 3 and set(lines[0]["tokens"]) == {"User", "Output", "Analytical"}

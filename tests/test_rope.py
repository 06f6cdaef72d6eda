# Copyright © 2026 mstream-mlx contributors.
"""The two RoPE forms (mstream_mlx/attention.py) are one rotation, and the additive
mask CUDA gets is the boolean mask's attention."""

import mlx.core as mx
import numpy as np
import pytest

import mstream_mlx
from mstream_mlx import attention
from mstream_mlx.attention import StreamRoPE, kernel_mask
from mstream_mlx.mask import make_mask
from mstream_mlx.streams import rows_to_flat

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
]


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("dims", [32, 16])  # whole head, and partial RoPE
@pytest.mark.parametrize("B, L", [(2, 7), (1, 7), (3, 1), (1, 1)])  # L == 1: its own path
def test_fused_rotation_equals_the_tables(scaling, dims, B, L):
    rope = StreamRoPE(dims, 10000.0, scaling)
    rng = np.random.default_rng(0)
    # y out of order and repeated across streams, as in a rows prompt
    positions = mx.array(rng.integers(0, 300, size=(B, L)), dtype=mx.int32)
    x = mx.array(rng.normal(size=(B, L, 3, 32)), dtype=mx.float32)
    fused = rope.at(positions, mx.float32, fused=True)(x)
    table = rope.at(positions, mx.float32, fused=False)(x)
    assert fused.shape == (B, 3, L, 32)
    assert mx.allclose(fused, table, atol=2e-5).item()
    # a wrong offset (positions shifted by one) is caught
    off = rope.at(positions + 1, mx.float32, fused=True)(x)
    assert not mx.allclose(off, table, atol=1e-2).item()


def test_gpu_forward_paths_match_the_cpu_ones(tiny_checkpoint, monkeypatch):
    """The forward with the GPU choices (fused RoPE, additive mask for long chunks),
    run here on the CPU, gives the CPU path's logits."""
    model = mstream_mlx.load(tiny_checkpoint("qwen3", "rows"))[0]
    table = np.random.default_rng(2).integers(0, 400, size=(4, 10))
    ids, ch, pos = rows_to_flat(table).arrays()

    def logits():
        cache = model.make_cache()
        first = model(ids[:, :20], channels=ch[:, :20], positions=pos[:, :20], cache=cache)
        rest = model(ids[:, 20:], channels=ch[:, 20:], positions=pos[:, 20:], cache=cache)
        return mx.concatenate([first, rest], axis=1)

    cpu = logits()
    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    monkeypatch.setattr(attention, "_on_cuda", lambda: False)  # masked_attention stays off
    monkeypatch.setattr(attention, "SMALL_QUERY", 4)
    monkeypatch.setattr(attention.mx.cuda, "is_available", lambda: True)
    gpu = logits()
    assert mx.allclose(gpu, cpu, atol=1e-4).item()


def test_additive_mask_is_the_boolean_mask(monkeypatch):
    positions = mx.array(np.repeat(np.arange(4), 5)[None], dtype=mx.int32)
    mask = make_mask(positions)
    monkeypatch.setattr(attention, "_on_cuda", lambda: False)
    assert kernel_mask(mask, mx.float32) is mask  # CPU, Metal: the boolean mask as is
    monkeypatch.setattr(attention, "_on_cuda", lambda: True)
    row = make_mask(mx.array([[7] * 10], dtype=mx.int32))
    assert kernel_mask(row, mx.float32) is row  # a decode row keeps it too
    add = kernel_mask(mask, mx.bfloat16)
    assert add.dtype == mx.bfloat16 and add.shape == mask.shape
    rng = np.random.default_rng(3)
    q = mx.array(rng.normal(size=(1, 4, 20, 16)), dtype=mx.float32)
    k = mx.array(rng.normal(size=(1, 2, 20, 16)), dtype=mx.float32)
    v = mx.array(rng.normal(size=(1, 2, 20, 16)), dtype=mx.float32)
    sdpa = mx.fast.scaled_dot_product_attention
    want = sdpa(q, k, v, scale=0.25, mask=mask)
    got = sdpa(q, k, v, scale=0.25, mask=add.astype(mx.float32))
    assert mx.allclose(got, want, atol=1e-5).item()

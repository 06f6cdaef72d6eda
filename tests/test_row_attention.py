# Copyright © 2026 mstream-mlx contributors.
"""A decode row's mask (RowMask) and the CUDA kernel that attends it in one pass.

The kernel tests run where MLX has its CUDA backend (they are skipped on the CPU and
on Metal); the GPU run of docs/benchmarks.md runs them with the rest of this file.
"""

import mlx.core as mx
import numpy as np
import pytest

from mstream_mlx import row_attention
from mstream_mlx.attention import masked_attention
from mstream_mlx.cache import StreamKVCache
from mstream_mlx.mask import RowMask, attention_mask, make_mask

cuda = pytest.mark.skipif(
    not (mx.default_device() == mx.gpu and mx.cuda.is_available()),
    reason="the row kernel is CUDA's",
)


def cache_with(ys):
    c = StreamKVCache()
    c.push_positions(np.array([ys], dtype=np.int32))
    c.offset = len(ys)
    return c


def test_a_decode_row_gets_a_row_mask_equal_to_the_rule():
    cache = cache_with([0, 0, 0, 1, 1, 1])
    row = mx.array([[2, 2, 2]], dtype=mx.int32)
    mask = attention_mask(row, cache)
    assert isinstance(mask, RowMask) and mask.offset == 6
    want = make_mask(row, cache)
    assert mask.array.shape == want.shape and mx.array_equal(mask.array, want).item()
    assert mask.array is mask.array  # built once, shared by the layers
    # several timesteps in one call, or an older token: the full array
    assert isinstance(attention_mask(mx.array([[2, 3, 3]]), cache), mx.array)
    assert isinstance(attention_mask(mx.array([[1, 1]]), cache), mx.array)


def test_long_rows_go_to_the_plain_ops():
    q = mx.zeros((1, 32, 10, 128))
    assert row_attention.fits(q, mx.zeros((1, 8, 1100, 128)))
    assert not row_attention.fits(q, mx.zeros((1, 8, 5000, 128)))  # past MAX_READS
    assert not row_attention.fits(mx.zeros((2, 32, 10, 128)), mx.zeros((2, 8, 100, 128)))
    assert not row_attention.fits(mx.zeros((1, 32, 10, 80)), mx.zeros((1, 8, 100, 80)))


def qkv(rng, H, Hkv, L, S, D, dtype):
    q = mx.array(rng.normal(size=(1, L, H, D)), dtype=dtype).transpose(0, 2, 1, 3)
    # keys and values as a cache holds them: a view of a longer buffer
    buf = lambda: mx.array(rng.normal(size=(1, Hkv, S + 37, D)), dtype=dtype)
    return q, buf()[..., :S, :], buf()[..., :S, :]


@cuda
@pytest.mark.parametrize("H,Hkv,L,S,D", [(32, 8, 10, 1100, 128), (16, 8, 2, 3, 128), (4, 4, 4, 70, 64), (8, 2, 16, 600, 256), (8, 8, 3, 3900, 64)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("unroll", [1, row_attention.UNROLL, 8])
def test_kernel_equals_masked_attention(H, Hkv, L, S, D, dtype, unroll):
    q, k, v = qkv(np.random.default_rng(S), H, Hkv, L, S, D, dtype)
    assert row_attention.fits(q, k)
    scale = D**-0.5
    mask = RowMask(mx.full((1, L), 9, dtype=mx.int32), S - L).array
    want = masked_attention(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), scale, mask)
    got = row_attention.row_attention(q, k, v, scale, unroll=unroll)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    assert mx.allclose(got.astype(mx.float32), want, atol=tol).item()
    # a kernel that let a token see its peers would be caught
    peers = mx.ones_like(mask)
    wrong = masked_attention(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), scale, peers)
    if L > 1 and S <= 1100:  # (over more keys a peer's share is below bf16's step)
        assert not mx.allclose(got.astype(mx.float32), wrong, atol=tol).item()


@cuda
def test_decode_steps_with_the_kernel_equal_the_fallback(monkeypatch):
    from mstream_mlx.benchmarks.decode import random_model, set_heads
    from mstream_mlx.prefill import prefill
    from mstream_mlx.step import step
    from mstream_mlx.streams import Flat

    model, _ = random_model("tiny", mx.float32)
    set_heads(model, 6)
    flat = Flat(np.arange(40, 90, dtype=np.int32), np.zeros(50, np.int32), np.arange(50, dtype=np.int32))

    def run():
        cache = model.make_cache()
        prefill(model, flat, cache)
        out = []
        tokens = mx.array(list(range(100, 106)))
        for y in range(50, 54):
            logits = step(model, cache, tokens, list(range(2, 8)), [y] * 6)
            out.append(logits)
            tokens = mx.argmax(logits, axis=-1)
        return mx.stack(out)

    with_kernel = run()
    monkeypatch.setattr(row_attention, "fits", lambda q, k: False)
    assert mx.allclose(with_kernel, run(), atol=1e-3).item()

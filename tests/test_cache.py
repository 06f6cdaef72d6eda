# Copyright © 2026 mstream-mlx contributors.
"""StreamKVCache: trim, save/load and dtype/batch behaviour of the model runner."""

import copy

import mlx.core as mx
import numpy as np
import pytest

import mstream_mlx
from mstream_mlx.atomic import WriteError
from mstream_mlx.cache import StreamKVCache
from mstream_mlx.prompt_cache import load_prompt_cache, save_prompt_cache
from mstream_mlx.streams import rows_to_flat


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return mstream_mlx.load(tiny_checkpoint("qwen3", "rows"))[0]


def feed_rows(model, cache, table, first_row=0):
    out = []
    for r, row in enumerate(table):
        ids, ch, pos = rows_to_flat([row], first_row=first_row + r).arrays()
        out.append(model(ids, channels=ch, positions=pos, cache=cache))
    return mx.concatenate(out, axis=1)


def test_trim_then_refeed_is_exact(model):
    table = np.random.default_rng(0).integers(0, 400, size=(4, 10))
    cache = model.make_cache()
    full = feed_rows(model, cache, table)
    assert all(c.trim(20) == 20 for c in cache)  # drop rows 2 and 3
    assert cache[0].offset == 20 and cache[0].max_y.tolist() == [1]
    again = feed_rows(model, cache, table[2:], first_row=2)
    assert mx.array_equal(again, full[:, 20:])


def test_prompt_cache_round_trip(model, tmp_path):
    table = np.random.default_rng(1).integers(0, 400, size=(3, 10))
    cache = model.make_cache()
    feed_rows(model, cache, table[:2])
    f = tmp_path / "prompt.safetensors"
    save_prompt_cache(str(f), cache, {"note": "two rows"})
    loaded, meta = load_prompt_cache(str(f), return_metadata=True)
    assert meta == {"note": "two rows"} and isinstance(loaded[0], StreamKVCache)
    assert loaded[0].offset == 20 and loaded[0].max_y.tolist() == [1]
    a = feed_rows(model, cache, table[2:], first_row=2)
    b = feed_rows(model, loaded, table[2:], first_row=2)
    assert mx.array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["prompt.safetensors"]
    with pytest.raises(FileNotFoundError, match="No prompt cache file at"):
        load_prompt_cache(str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_runner_dtypes_batch_and_deepcopy(model, dtype):
    m = copy.deepcopy(model)
    m.set_dtype(dtype)
    ids, ch, pos = rows_to_flat(np.random.default_rng(2).integers(0, 400, size=(2, 10))).arrays()
    batch = [mx.concatenate([a, a], axis=0) for a in (ids, ch, pos)]
    out = m(batch[0], channels=batch[1], positions=batch[2])
    assert out.shape == (2, 20, 512) and out.dtype == dtype
    # the two batch rows are the same input; BLAS may round them differently
    tol = 1e-4 if dtype == mx.float32 else 5e-2
    assert mx.allclose(out[0], out[1], atol=tol, rtol=tol)
    cache = m.make_cache()
    step = m(ids[:, :10], channels=ch[:, :10], positions=pos[:, :10], cache=cache)
    assert step.dtype == dtype and cache[0].offset == 10
    assert cache[0].nbytes > 0


def test_shape_mismatch_is_one_line(model):
    with pytest.raises(ValueError, match=r"must have one shape, got \(1, 3\), \(1, 2\)"):
        model(mx.zeros((1, 3), mx.int32), channels=mx.zeros((1, 2), mx.int32), positions=mx.zeros((1, 3), mx.int32))


def test_prompt_cache_files_are_mlx_lm_files(model, tmp_path):
    """Our files load with mlx-lm's own loader (our cache classes are registered with
    it), and a file mlx-lm writes loads with ours."""
    from mlx_lm.models import cache as lm_cache

    table = np.random.default_rng(4).integers(0, 400, size=(2, 10))
    cache = model.make_cache()
    feed_rows(model, cache, table)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_prompt_cache(str(ours), cache, {"k": "v"})
    lm_cache.save_prompt_cache(str(theirs), cache, {"k": "v"})
    for f in (ours, theirs):
        for load in (lm_cache.load_prompt_cache, load_prompt_cache):
            loaded, meta = load(str(f), return_metadata=True)
            assert meta == {"k": "v"} and type(loaded[0]) is StreamKVCache
            assert loaded[0].offset == 20 and mx.array_equal(loaded[0].keys, cache[0].keys)


def test_prompt_cache_bad_names_and_failed_writes_leave_nothing(model, tmp_path):
    cache = model.make_cache()
    feed_rows(model, cache, np.zeros((1, 10), dtype=np.int32))
    with pytest.raises(ValueError, match="must end in .safetensors, got"):
        save_prompt_cache(str(tmp_path / "prompt.bin"), cache)
    with pytest.raises(WriteError, match="nothing was written"):
        save_prompt_cache(str(tmp_path / "missing" / "prompt.safetensors"), cache)
    assert list(tmp_path.iterdir()) == []


def test_deltanet_cache_round_trips_through_mlx_lm(tmp_path):
    """Qwen3.5's recurrent-layer cache is registered with mlx-lm's loader too."""
    from mlx_lm.models import cache as lm_cache

    from mstream_mlx.deltanet import DeltaNetCache

    c = DeltaNetCache()
    c.state = (mx.ones((3, 3, 8)), mx.arange(96.0).reshape(3, 2, 4, 4), 6, mx.array([1]))
    f = tmp_path / "dn.safetensors"
    save_prompt_cache(str(f), [c])
    (loaded,) = lm_cache.load_prompt_cache(str(f))
    assert type(loaded) is DeltaNetCache and loaded.offset == 6
    assert loaded.max_y.tolist() == [1] and mx.array_equal(loaded[1], c[1])


def test_multi_stream_prefill_chunks_fit_the_scores_budget(monkeypatch):
    """Where attention runs unfused (the CPU, a quantized cache), a multi-stream prompt
    is cut so that chunk x context x heads fp32 scores stay within the budget; a
    single-stream prompt (its mask is "causal") keeps whole chunks, and so does any
    prompt on a GPU with a full-precision cache (the fused kernel takes the mask)."""
    from types import SimpleNamespace

    from mstream_mlx import prefill as P
    from mstream_mlx.streams import Flat, rows_to_flat

    model = SimpleNamespace(args=SimpleNamespace(num_attention_heads=16))
    rows = rows_to_flat(np.arange(8190).reshape(-1, 10) % 50)
    assert P._unfused_chunk(model, rows, [SimpleNamespace(offset=0)]) == 512
    held = [SimpleNamespace(offset=8192)]
    assert P._unfused_chunk(model, rows, held) == P.MIN_CHUNK
    single = Flat(np.zeros(8192, np.int32), np.zeros(8192, np.int32), np.arange(8192, dtype=np.int32))
    assert P._unfused_chunk(model, single, [SimpleNamespace(offset=0)]) == 8192
    monkeypatch.setattr(P.mx, "default_device", lambda: P.mx.gpu)
    assert P._unfused_chunk(model, rows, held) == len(rows)
    quantized = [SimpleNamespace(offset=8192, bits=4)]
    assert P._unfused_chunk(model, rows, quantized) == P.MIN_CHUNK

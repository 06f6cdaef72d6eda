# Copyright © 2026 mstream-mlx contributors.
"""Long sessions (docs/long-sessions.md): quantized and windowed KV caches against the
full cache, whole-timestep eviction, the trained position range, prompt caches of
bounded caches, the rows idle pause (in the library and through the full-screen chat
in tmux) and flat memory over a long interactive run, on the bundled demo model."""

import re
import shutil
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

import mstream_mlx
from mstream_mlx import RowsOptions, Session
from mstream_mlx.cache import KVPolicy, QuantizedStreamKVCache, StreamKVCache
from mstream_mlx.cli.main import app
from mstream_mlx.prompt_cache import load_prompt_cache, save_prompt_cache
from mstream_mlx.mask import stream_mask
from mstream_mlx.streams import rows_to_flat
from mstream_mlx.utils import default_model_path
from tests.test_chat import CLI, Tmux, t_of

C = 3  # the bundled model: User, Output, Thinking
SUM = "add five minus two add nine"


@pytest.fixture(scope="module")
def demo():
    return mstream_mlx.load(str(default_model_path()))


def random_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 60, size=(n, C))


def decode_rows(model, table, policy=None, prompt_rows=0):
    """Prefill ``prompt_rows`` rows, then one row per step; logits of every step."""
    cache = model.make_cache()
    if prompt_rows:
        ids, ch, pos = rows_to_flat(table[:prompt_rows]).arrays()
        model(ids, channels=ch, positions=pos, cache=cache)
    out = []
    for r in range(prompt_rows, len(table)):
        ys = [r] * C
        if policy is not None:
            policy.before_step(cache, ys)
        ids, ch, pos = rows_to_flat([table[r]], first_row=r).arrays()
        out.append(model(ids, channels=ch, positions=pos, cache=cache)[0])
        mx.eval(out[-1])
    return out, cache


def test_window_that_never_evicts_is_bit_identical(demo):
    model = demo[0]
    table = random_rows(40)
    full, _ = decode_rows(model, table, prompt_rows=4)
    wide, cache = decode_rows(model, table, KVPolicy(max_kv_timesteps=1000), prompt_rows=4)
    assert all(mx.array_equal(a, b) for a, b in zip(full, wide))
    assert cache[0].offset == 40 * C


def test_window_evicts_whole_timesteps_and_keeps_the_prompt(demo):
    model = demo[0]
    table, P, W = random_rows(30, seed=1), 4, 5
    policy = KVPolicy(max_kv_timesteps=W)
    cache = model.make_cache()
    ids, ch, pos = rows_to_flat(table[:P]).arrays()
    model(ids, channels=ch, positions=pos, cache=cache)
    for r in range(P, len(table)):
        policy.before_step(cache, [r] * C)
        ys = cache[0].host_ys[0]
        assert cache[0].keep == P * C and sorted(ys[: P * C]) == sorted(np.repeat(range(P), C))
        window = ys[P * C:]
        kept = sorted(set(window.tolist()))
        assert kept == list(range(max(P, r - W), r))  # the last W timesteps ...
        assert all((window == y).sum() == C for y in kept)  # ... each whole
        assert np.array_equal(np.array(cache[0].ys[0, : cache[0].offset]), ys)
        assert all(c.offset == cache[0].offset for c in cache)
        ids, ch, pos = rows_to_flat([table[r]], first_row=r).arrays()
        model(ids, channels=ch, positions=pos, cache=cache)
    assert cache[0].offset == (P + W + 1) * C


def test_window_matches_the_full_cache_under_a_window_mask(demo):
    """A windowed cache gives the logits of the whole sequence with the rule narrowed
    to the prompt plus the last W timesteps (atol 1e-4: the keys sit in another order)."""
    model = demo[0]
    table, P, W = random_rows(36, seed=2), 3, 6
    windowed, _ = decode_rows(model, table, KVPolicy(max_kv_timesteps=W), prompt_rows=P)
    ids, ch, pos = rows_to_flat(table).arrays()
    q = pos[0]
    rule = stream_mask(pos, pos)
    seen = (q[None, :] < P) | (q[None, :] >= q[:, None] - W)
    logits = model(ids, channels=ch, positions=pos, mask=rule & seen[None, None])[0]
    for r in range(P, len(table)):
        want = logits[r * C: (r + 1) * C]
        assert mx.allclose(windowed[r - P], want, atol=1e-4), r
    full, _ = decode_rows(model, table, prompt_rows=P)
    assert not mx.allclose(full[-1], windowed[-1], atol=1e-4)  # the window did evict


@pytest.mark.parametrize("bits, max_tol, mean_tol", [(8, 0.05, 0.02), (4, 1.0, 0.3)])
def test_quantized_cache_against_the_full_cache(demo, bits, max_tol, mean_tol):
    """Logits against the full cache's, relative to their largest magnitude (random
    tokens, 28 steps, group size 32; measured 8-bit max 2.2-3.0% / mean 0.8-1.2%,
    4-bit max 35-62% / mean 12-22%); every key keeps its y (the mask is the rule's)."""
    model = demo[0]
    table = random_rows(30, seed=3)
    full, fcache = decode_rows(model, table, prompt_rows=2)
    policy = KVPolicy(kv_bits=bits, kv_group_size=32, quantized_kv_start=0)
    quant, qcache = decode_rows(model, table, policy, prompt_rows=2)
    assert all(isinstance(c, QuantizedStreamKVCache) and c.bits == bits for c in qcache)
    assert np.array_equal(qcache[0].host_ys, fcache[0].host_ys)
    scale = max(float(mx.abs(f).max()) for f in full)
    err = [float(mx.abs(a - b).max()) for a, b in zip(full, quant)]
    assert 0 < max(err) <= max_tol * scale and np.mean(err) <= mean_tol * scale, err
    assert qcache[0].nbytes < fcache[0].nbytes


def test_quantized_and_windowed_prompt_caches_round_trip(demo, tmp_path):
    model = demo[0]
    table = random_rows(24, seed=4)
    policy = KVPolicy(kv_bits=8, kv_group_size=32, quantized_kv_start=0, max_kv_timesteps=5)
    _, cache = decode_rows(model, table[:20], policy, prompt_rows=2)
    f = tmp_path / "bounded.safetensors"
    save_prompt_cache(str(f), cache)
    loaded = load_prompt_cache(str(f))
    assert type(loaded[0]) is QuantizedStreamKVCache and loaded[0].offset == cache[0].offset
    assert np.array_equal(loaded[0].host_ys, cache[0].host_ys)
    for c, d in zip(cache, loaded):
        d.keep = c.keep  # the session marks its prompt again at the next step
    outs = []
    for cc in (cache, loaded):
        out = []
        for r in range(20, 24):
            policy.before_step(cc, [r] * C)
            ids, ch, pos = rows_to_flat([table[r]], first_row=r).arrays()
            out.append(model(ids, channels=ch, positions=pos, cache=cc))
        outs.append(out)
    assert all(mx.array_equal(a, b) for a, b in zip(*outs))


def test_session_prompt_cache_file_with_a_window_and_quantized_kv(demo, tmp_path):
    model, tok = demo
    f = str(tmp_path / "rows.safetensors")
    rows = RowsOptions.for_model(model, prefill_rows=[["-"] * C] * 3)
    kw = dict(rows=rows, kv_bits=8, kv_group_size=32, quantized_kv_start=0,
              max_kv_timesteps=6, max_steps=30, prompt_cache_file=f)
    texts = []
    for _ in range(2):  # writes the file, then reads it
        s = Session(model, tok, **kw)
        s.feed("User", SUM)
        list(s)
        texts.append(s.texts["Output"])
        assert isinstance(s.cache[0], QuantizedStreamKVCache) and s.cache[0].keep == 3 * C
    assert texts[0] == texts[1] and texts[0]


def test_blocks_window_keeps_the_system_block(tiny_checkpoint):
    model, tok = mstream_mlx.load(tiny_checkpoint("qwen3", "blocks"))

    def run(**kw):
        s = Session(model, tok, max_steps=60, **kw)
        s.feed("user", "hello there how are you")
        list(s)
        return s

    full = run()
    assert run(max_kv_timesteps=10_000).tokens == full.tokens  # never evicts
    s = run(max_kv_timesteps=5)
    ys, keep = s.cache[0].host_ys[0], s.cache[0].keep
    prompt = full.cache[0].host_ys[0][:keep]
    assert keep > 0 and np.array_equal(ys[:keep], prompt)  # the system block stays
    assert ys[keep:].min() >= ys.max() - 5


def test_positions_past_the_trained_range_end_the_run(demo):
    model, tok = demo
    saved = model.args.max_position_embeddings
    model.args.max_position_embeddings = 20
    try:
        s = Session(model, tok, interactive=True, max_steps=100)
        events = list(s)
        # row 20 is sampled from the inputs at y 19: the last position the model sees
        assert s.finish_reason == "length" and events[-2].t == 20
        assert int(s.cache[0].host_ys.max()) == 19
        s = Session(model, tok, interactive=True, max_steps=100, max_kv_timesteps=8)
        events = list(s)
        assert events[-1].t == 100  # a window keeps every key within 8 timesteps
        with pytest.raises(ValueError, match="spans 25 timesteps; the model was trained on 20"):
            Session(model, tok, rows=RowsOptions(prefill_rows=[["-"] * C] * 25)).step()
    finally:
        model.args.max_position_embeddings = saved


def test_idle_pause_stops_the_clock_and_resumes_on_input(demo):
    model, tok = demo
    rows = RowsOptions.for_model(model, idle_pause=16)
    s = Session(model, tok, interactive=True, max_steps=100_000, rows=rows)
    events = []
    worker = threading.Thread(target=lambda: events.extend(s), daemon=True)
    s.feed("User", SUM)
    worker.start()
    deadline = time.time() + 30
    while not s.schedule.idle() and time.time() < deadline:
        time.sleep(0.01)
    assert s.schedule.idle() and s.texts["Output"] == "5 3 12"
    n = len(events)
    time.sleep(0.3)
    assert len(events) == n  # the clock stopped: step() waits for input
    s.feed("User", "add three")
    while not s.texts["Output"].endswith("15") and time.time() < deadline:
        time.sleep(0.01)
    assert s.texts["Output"] == "5 3 12 15" and len(events) > n
    s.stop()
    worker.join(10)
    assert not worker.is_alive() and s.finish_reason == "stop"


def test_bad_values_are_one_clear_line(demo):
    model, tok = demo
    for kw, msg in [
        (dict(kv_bits=3), r"kv_bits \(--kv-bits\) must be 4 or 8, got 3\."),
        (dict(max_kv_timesteps=-2), r"max_kv_timesteps \(--kv-window\) must be >= 1, got -2\."),
        (dict(kv_bits=8, kv_group_size=48), r"must be 32, 64 or 128, got 48"),
        (dict(kv_bits=8), r"kv_group_size 64 does not divide the model's head size 32"),
    ]:
        with pytest.raises(ValueError, match=msg):
            Session(model, tok, **kw)
    with pytest.raises(ValueError, match=r"idle_pause \(--idle-pause\) must be >= 0"):
        RowsOptions(idle_pause=-1)
    runner = CliRunner()
    for args, msg in [
        (["--kv-bits", "3"], "Error: kv_bits (--kv-bits) must be 4 or 8, got 3.\n"),
        (["--kv-window", "-1"], "Error: max_kv_timesteps (--kv-window) must be >= 1, got -1.\n"),
    ]:
        res = runner.invoke(app, ["generate", "-p", "add five", *args])
        assert res.exit_code == 1 and res.stderr == msg, res.output


def test_memory_is_flat_over_a_long_windowed_run(demo):
    """3,000 interactive rows with a 64-timestep window, a sum typed every 60 rows: the
    cache stops growing and MLX's active memory stays within 1% between row 1,000 and
    row 3,000 (the issue asks 5%; it was 0.0% when measured: an unevaluated ys array
    used to grow by ~40 bytes a row)."""
    model, tok = demo
    s = Session(model, tok, interactive=True, max_steps=3_000, max_kv_timesteps=64)
    s.feed("User", SUM)
    mem = {}
    for event in s:
        if event.t % 60 == 0 and not s.done:
            s.feed("User", "add three")
        if event.t in (1_000, 3_000):
            mem[event.t] = mx.get_active_memory()
            assert s.cache[0].offset == 65 * C
    assert mem[3_000] <= 1.01 * mem[1_000], mem


def said(screen: str) -> list:
    """What the chat log shows the Output stream saying, in order."""
    return re.findall(r"^ Output: (.*?)\s*$", screen, re.M)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_chat_keeps_the_total_across_a_long_pause():
    """The full-screen chat on the bundled model: a pause of 300 rows of clock (60 s at
    the default tick of 0.2 s, run here at 0.02 s per row; the model was trained on
    pauses of at most 24 rows) keeps the total."""
    tm = Tmux("idle")
    try:
        tm.keys(" ".join(CLI + ["--tick", "0.02"]), "Enter")
        tm.wait(r"model: .*rows|start the clock")
        tm.type(SUM)
        tm.keys("Enter")
        s = tm.wait(r"idle: the clock waits for you", timeout=40)
        assert said(s) == ["5", "3", "12"], s
        t0 = t_of(s)
        time.sleep(6.0)  # 300 ticks of clock
        assert t_of(tm.screen()) == t0
        tm.type("add three")
        tm.keys("Enter")
        s = tm.wait(r"^ Output: 15\b", timeout=40)
        assert said(s) == ["5", "3", "12", "15"] and t_of(s) > t0, s
        tm.keys("C-c")
    finally:
        tm.kill()

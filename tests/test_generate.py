# Copyright © 2026 mstream-mlx contributors.
"""Streaming generation: greedy traces equal the PyTorch reference loops
(tests/reference/loops.py) for rows and blocks, feeds, threads, stop rules, limits,
prompt caches and the CLI."""

import json
import shutil
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

import mstream_mlx
from mstream_mlx.cli.main import app
from mstream_mlx.generate import generate, stream_generate
from mstream_mlx.sample import (
    SamplingSettings,
    SilencePenalty,
    blocks_filter,
    rows_filter,
    sample_tokens,
    silence_ramp,
)
from mstream_mlx.blocks_schedule import BlocksStep
from mstream_mlx.events import StepEvent
from mstream_mlx.plans import LAZY, DecodePlan, PrefillPlan, SeedPlan
from mstream_mlx.prefill import prefill
from mstream_mlx.rows_schedule import RowsStep
from mstream_mlx.schedules import (
    SEED_WORDS,
    BlocksOptions,
    BlocksSchedule,
    RowsOptions,
    RowsSchedule,
    schedule_class,
)
from mstream_mlx.session import Session
from mstream_mlx.step import step
from mstream_mlx.streams import ChatTokens, blocks_to_flat, chat_blocks, rows_to_flat
from tests.reference import RefModel, blocks_generate, rows_generate
from tests.tiny import make_checkpoint

GREEDY = SamplingSettings(temp=0.0)
PROMPT = "what is one plus two"


def boost(src: Path, dst: Path, token: int, factor: float) -> Path:
    """Copy an untied checkpoint and scale one ``lm_head`` row, so that token becomes
    the argmax at some (input-dependent) steps: heads that stop, rows that fall silent.
    """
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    w = load_file(str(f))
    w["lm_head.weight"][token] *= factor
    save_file(w, str(f), metadata={"format": "pt"})
    return dst


class Loaded(tuple):
    """``(model, tokenizer, reference)`` plus the checkpoint ``folder``."""


def pair(folder):
    model, tok = mstream_mlx.load(folder)
    loaded = Loaded((model, tok, RefModel.from_pretrained(folder)))
    loaded.folder = str(folder)
    return loaded


@pytest.fixture(scope="module")
def rows10(tiny_checkpoint):
    return pair(tiny_checkpoint("qwen3", "rows"))


@pytest.fixture(scope="module")
def rows_silent(tmp_path_factory):
    """3 streams (User, Output, Analytical) that often fall silent together."""
    base = make_checkpoint(
        tmp_path_factory.mktemp("rows3"), "qwen3", "rows", num_channels=3, tied=False
    )
    model, tok = mstream_mlx.load(base)
    return pair(
        boost(
            base,
            base.with_name(base.name + "-boosted"),
            model.streams.silence_token,
            4.0,
        )
    )


@pytest.fixture(scope="module", params=[3, 4], ids=["2-stream", "3-stream"])
def blocks(request, tiny_checkpoint):
    heads = ("assistant", "auditor") if request.param == 4 else None  # auditing
    return pair(tiny_checkpoint("qwen3", "blocks", num_channels=request.param, heads=heads))


@pytest.fixture(scope="module")
def blocks_stop(tmp_path_factory):
    """3 streams whose heads emit <|im_end|> at different steps."""
    base = make_checkpoint(
        tmp_path_factory.mktemp("b4"), "qwen3", "blocks", num_channels=4, tied=False,
        heads=("assistant", "auditor"),
    )
    _, tok = mstream_mlx.load(base)
    return pair(
        boost(
            base,
            base.with_name(base.name + "-boosted"),
            ChatTokens.from_tokenizer(tok).im_end,
            2.0,
        )
    )


# ------------------------------------------------------------------ helpers
def user_ids(tok, text):
    return [
        i for w in text.split() for i in tok.encode(" " + w, add_special_tokens=False)
    ]


def seed_row(tok, spec):
    sil = spec.silence_token
    words = [tok.encode(w, add_special_tokens=False)[0] for w in SEED_WORDS]
    return [sil, sil] + words[: spec.num_channels - 2]


def session_rows(events, spec):
    """Rows as the reference yields them: outputs of event k, user cell read at k+1."""
    names, sil = spec.names, spec.silence_token
    events = [e for e in events if any(e.tokens[n] is not None for n in names[1:])]
    rows = []
    for k, e in enumerate(events):
        nxt = events[k + 1].tokens[names[0]] if k + 1 < len(events) else None
        user = sil if nxt is None else nxt
        rows.append([user] + [e.tokens[n] for n in names[1:]])
    return rows


def assert_rows_equal(mine, ref):
    assert len(mine) == len(ref)
    for k, (a, b) in enumerate(zip(mine, ref)):
        assert a[1:] == b[1:], f"row {k} outputs differ"
        if k + 1 < len(mine):
            assert a[0] == b[0], f"row {k} user cell differs"


def ref_rows(ref, tok, spec, text, **kw):
    return rows_generate(
        ref,
        num_channels=spec.num_channels,
        silence=spec.silence_token,
        user_tokens=user_ids(tok, text) if text else [],
        seed_row=None if kw.get("prefill_rows") else seed_row(tok, spec),
        **kw,
    )


def ref_blocks(ref, tok, heads, max_new_tokens, prefill=None, text=PROMPT):
    chat = ChatTokens.from_tokenizer(tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    return blocks_generate(
        ref,
        system_ids=enc("You are a helpful assistant."),
        user_ids=enc(text),
        im_start=chat.im_start,
        im_end=chat.im_end,
        newline=chat.newline,
        role_ids=chat.roles,
        num_heads=heads,
        head_prefill_ids=[enc(p) for p in prefill] if prefill else None,
        max_new_tokens=max_new_tokens,
    )


def head_tokens(events, spec):
    return [
        [e.tokens[spec.names[c]] for e in events if e.tokens[spec.names[c]] is not None]
        for c in spec.outputs
    ]


# ------------------------------------------------ greedy parity: rows (sec7 §7.2)
@pytest.mark.parametrize("pipeline", [False, True])
def test_rows_seed_mode_matches_reference(rows10, pipeline):
    model, tok, ref = rows10
    spec = model.streams
    opts = RowsOptions(think_silence_penalty=3.0)
    s = Session(model, tok, sampling=GREEDY, max_steps=14, rows=opts, pipeline=pipeline)
    s.feed("User", PROMPT)
    events = list(s)
    want = ref_rows(ref, tok, spec, PROMPT, max_rows=14, think_silence_penalty=3.0)
    assert_rows_equal(session_rows(events, spec), want.rows)
    assert events[-1].finish_reason == "length" and len(events) == 15


def test_rows_prefill_rows_match_reference(rows10):
    model, tok, ref = rows10
    spec = model.streams
    table = np.random.default_rng(0).integers(10, 400, size=(3, 10)).tolist()
    s = Session(
        model,
        tok,
        sampling=GREEDY,
        max_steps=8,
        rows=RowsOptions(prefill_rows=table, pre_think=3),
    )
    s.feed("User", "one two")
    events = list(s)
    want = ref_rows(
        ref, tok, spec, "one two", max_rows=8, prefill_rows=table, pre_think=3
    )
    assert_rows_equal(session_rows(events, spec), want.rows[3:])
    assert events[0].prompt_tokens == 30


@pytest.mark.parametrize("prefill", [False, True])
def test_rows_interactive_matches_reference(rows10, prefill):
    """Interactive mode: a token fed after row r overwrites that row's user cell (gen.send)."""
    model, tok, ref = rows10
    spec = model.streams
    sends = dict(zip([1, 2, 3, 7], user_ids(tok, "one two three four")))
    table = (
        np.random.default_rng(1).integers(10, 400, size=(2, 10)).tolist()
        if prefill
        else None
    )
    P = 2 if prefill else 0
    s = Session(
        model,
        tok,
        sampling=GREEDY,
        max_steps=10,
        rows=RowsOptions(prefill_rows=table, keep_sampled_user=prefill),
    )
    events = []
    for e in s:
        events.append(e)
        if e.t + P in sends:
            s.feed("User", [sends[e.t + P]])
    assert s.schedule.interactive and not s.pipeline
    want = ref_rows(
        ref, tok, spec, "", max_rows=10, prefill_rows=table, user_at=sends.get
    )
    assert_rows_equal(session_rows(events, spec), want.rows[P:])


def test_rows_stop_on_all_silent_row(rows_silent):
    model, tok, ref = rows_silent
    spec = model.streams
    opts = RowsOptions(silence_penalty=0.0)
    events = list(
        stream_generate(model, tok, "one two", sampling=GREEDY, rows=opts, max_steps=40)
    )
    want = ref_rows(ref, tok, spec, "one two", max_rows=40, silence_penalty=0.0)
    assert want.stopped_on_silence
    assert events[-1].finish_reason == "stop"
    assert all(
        t is None for t in events[-1].tokens.values()
    )  # the silent row is not yielded
    assert_rows_equal(session_rows(events, spec), want.rows)
    # silence_exit=2 needs two silent rows in a row: the run goes on
    more = list(
        stream_generate(
            model,
            tok,
            "one two",
            sampling=GREEDY,
            max_steps=40,
            rows=RowsOptions(silence_penalty=0.0, silence_exit=2),
        )
    )
    assert len(more) > len(events)


# --------------------------------------------- greedy parity: blocks (sec5 §7)
@pytest.mark.parametrize("pipeline", [False, True])
def test_blocks_match_reference(blocks, pipeline):
    model, tok, ref = blocks
    spec = model.streams
    H = len(spec.outputs)
    prefill = ["so"] * H
    s = Session(
        model,
        tok,
        sampling=GREEDY,
        max_tokens=12,
        pipeline=pipeline,
        blocks=BlocksOptions(head_prefill=prefill),
    )
    s.feed("user", PROMPT)
    events = list(s)
    want = ref_blocks(ref, tok, H, 12, prefill)
    assert head_tokens(events, spec) == want.tokens
    fed_user = [e.tokens["user"] for e in events if e.tokens["user"] is not None]
    assert fed_user == [f[0].token for f in want.steps if f[0].cid == 1]
    assert events[-1].finish_reason == "length"


@pytest.mark.parametrize("pipeline", [False, True])
def test_blocks_heads_stop_at_im_end_like_reference(blocks_stop, pipeline):
    """Per-head <|im_end|>, and the last head's <|im_end|> stopping everyone
    (generate_multistream); pipelined steps that fed a stopped head are redone."""
    model, tok, ref = blocks_stop
    spec = model.streams
    events = list(
        stream_generate(
            model, tok, PROMPT, sampling=GREEDY, max_tokens=30, pipeline=pipeline
        )
    )
    want = ref_blocks(ref, tok, 2, 30)
    got = head_tokens(events, spec)
    assert got == want.tokens
    im_end = ChatTokens.from_tokenizer(tok).im_end
    assert got[0][-1] == im_end and got[1][-1] == im_end and len(got[0]) < len(got[1])
    assert events[-1].finish_reason == "stop"
    assert s_cache_len(model, tok, pipeline) == len(want.prefill) + sum(
        len(f) for f in want.steps
    )


def s_cache_len(model, tok, pipeline):
    s = Session(model, tok, sampling=GREEDY, max_tokens=30, pipeline=pipeline)
    s.feed("user", PROMPT)
    list(s)
    return s.cache[0].offset  # no trace of a cancelled speculative step


def test_blocks_no_stop_all(blocks_stop):
    model, tok, _ = blocks_stop
    opts = BlocksOptions(stop_all_on_last_head=False)
    events = list(
        stream_generate(model, tok, PROMPT, sampling=GREEDY, max_tokens=30, blocks=opts)
    )
    done = {n: e.t for e in events for n in e.finished}
    assert set(done) == {"assistant", "auditor"} and done["assistant"] < done["auditor"]


def test_blocks_3stream_decode_uses_the_rule(tiny_checkpoint):
    """The reference's 3-stream decode mask is broken (a masked_fill_ on an advanced-index
    copy: every decode query sees only itself, sec5 §4.4).  Ours follows the rule: the
    greedy trace equals the argmax of one full forward of the final block layout."""
    model, tok = mstream_mlx.load(
        tiny_checkpoint("qwen3", "blocks", num_channels=4, heads=("assistant", "auditor"))
    )
    spec = model.streams
    s = Session(model, tok, sampling=GREEDY, max_tokens=8)
    s.feed("user", PROMPT)
    events = list(s)
    chat = ChatTokens.from_tokenizer(tok)
    y0 = s.schedule.y0
    from mstream_mlx.streams import Block

    user = tok.encode(PROMPT, add_special_tokens=False) + [chat.im_end]
    fed = user[: s.schedule.u]
    sys_ids = (
        chat.prefix("system")
        + tok.encode("You are a helpful assistant.", add_special_tokens=False)
        + [chat.im_end]
    )
    blocks = [Block(0, sys_ids, 0), Block(1, chat.prefix("user") + fed, y0)]
    heads = head_tokens(events, spec)
    for h, toks in enumerate(heads):
        blocks.append(Block(2 + h, chat.prefix("assistant") + toks[:-1], y0))
    ids, ch, pos = blocks_to_flat(blocks).arrays()
    logits = model(ids, channels=ch, positions=pos)[0]
    start = len(sys_ids) + 3 + len(fed)
    for h, toks in enumerate(heads):
        n = 3 + len(toks) - 1
        pred = np.array(mx.argmax(logits[start + 2 : start + n], axis=-1)).tolist()
        assert pred == toks, f"head {h}"
        start += n


def test_blocks_allow_same_step_visible(blocks_stop):
    """The reference's option: a decode query also sees the tokens fed before it in the
    same step (user first, then the heads in order)."""
    model, tok, _ = blocks_stop
    spec = model.streams
    heads = [spec.names[c] for c in spec.outputs]

    def first_steps(same):
        opts = BlocksOptions(allow_same_step_visible=same)
        s = Session(
            model, tok, sampling=GREEDY, max_tokens=3, blocks=opts, record_logits=True
        )
        s.feed("user", PROMPT)
        return s, [s.step(), s.step()]

    s, (e0, e1) = first_steps(True)
    _, (_, plain) = first_steps(False)
    chat = ChatTokens.from_tokenizer(tok)
    sys_ids = tok.encode("You are a helpful assistant.", add_special_tokens=False)
    prompt = blocks_to_flat(
        chat_blocks(chat, sys_ids, [], [[]] * len(heads), close_user=False)
    )
    y = s.schedule.y0 + 3
    step = [(e1.tokens["user"], 1, y)] + [
        (e0.tokens[h], c, y) for h, c in zip(heads, spec.outputs)
    ]
    ids = mx.array([prompt.ids.tolist() + [t for t, _, _ in step]])
    ch = mx.array([prompt.channels.tolist() + [c for _, c, _ in step]])
    pos = mx.array([prompt.positions.tolist() + [p for _, _, p in step]])
    L, n = ids.shape[1], len(step)
    rule = (pos[0][None, :] < pos[0][:, None]) | mx.eye(L, dtype=mx.bool_)
    same = mx.zeros((L, L), dtype=mx.bool_)
    same[L - n :, L - n :] = mx.tril(mx.ones((n, n), dtype=mx.bool_), k=-1)
    logits = model(ids, channels=ch, positions=pos, mask=(rule | same)[None, None])[0]
    for k, h in enumerate(heads):
        row = np.array(logits[L - n + 1 + k])
        logp = row - np.log(np.exp(row - row.max()).sum()) - row.max()
        entropy = float(-(np.exp(logp) * logp).sum())
        assert e1.tokens[h] == int(row.argmax())
        assert abs(e1.logits_summary[h][0] - entropy) < 2e-5
        assert (
            abs(plain.logits_summary[h][0] - entropy) > 1e-4
        )  # the plain rule differs


# ------------------------------------------------------------ feeds and threads
def test_feed_mid_generation_changes_only_later_rows(rows_silent):
    model, tok, _ = rows_silent  # untied: it reacts to its input (a tied one copies it)
    word = user_ids(tok, "seven")[0]

    def run(feed_at):
        s = Session(
            model, tok, sampling=GREEDY, max_steps=12
        )  # interactive: nothing fed
        events = []
        for e in s:
            events.append(e)
            if e.t == feed_at:
                s.feed("User", [word])
        return events

    base, fed = run(None), run(4)
    outs = lambda evs: [
        [e.tokens[n] for n in model.streams.names[1:]] for e in evs
    ]  # noqa: E731
    # the token lands in row 4's user cell; row 5 is sampled beside it, blind to it
    assert outs(base)[:6] == outs(fed)[:6]
    assert fed[5].tokens["User"] == word and base[5].tokens["User"] is None
    assert outs(base)[6:] != outs(fed)[6:]


@pytest.mark.parametrize("pipeline", [False, True])
def test_blocks_interrupt_changes_only_later_steps(blocks, pipeline):
    model, tok, _ = blocks
    opts = BlocksOptions(close_user=False)

    def run(extra):
        s = Session(
            model, tok, sampling=GREEDY, max_tokens=14, blocks=opts, pipeline=pipeline
        )
        s.feed("user", "one two")
        events = []
        for e in s:
            events.append(e)
            if extra and e.t == 5:
                s.feed("user", extra)
                s.close()
        return events

    base, fed = run(None), run(" three four")
    # fed after event 5: read at the next step launched (6, or 7 when step 6 was already
    # in flight); heads fed in that same step already see it (its y is in their past)
    first_read = 7 if pipeline else 6
    heads = lambda evs: head_tokens(evs[:first_read], model.streams)  # noqa: E731
    assert heads(base) == heads(fed)
    assert all(e.tokens["user"] is None for e in fed[3:first_read])
    assert (
        fed[first_read].tokens["user"]
        == tok.encode(" three", add_special_tokens=False)[0]
    )


def test_threads_ui_feeds_worker_steps(rows10):
    """A UI thread feeds words while a worker iterates the session; stop() ends it."""
    model, tok, _ = rows10
    s = Session(model, tok, sampling=GREEDY, max_steps=10_000, interactive=True)
    events, errors = [], []

    def worker():
        try:
            for e in s:
                events.append(e)
                time.sleep(0.001)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    th = threading.Thread(target=worker)
    th.start()
    words = "one two three four five six seven eight".split()
    sent = []
    for w in words:
        sent += user_ids(tok, w)
        s.feed("User", w)
        time.sleep(0.003)
    deadline = time.time() + 20
    while (
        sum(e.tokens["User"] is not None for e in list(events)) < len(sent)
        and time.time() < deadline
    ):
        time.sleep(0.005)
    s.stop()
    th.join(20)
    assert not th.is_alive() and not errors
    assert [e.tokens["User"] for e in events if e.tokens["User"] is not None] == sent
    assert s.done and s.finish_reason == "stop"
    assert [e.t for e in events] == list(range(len(events)))


# ------------------------------------------------------------ stop rules, limits
def test_rows_per_stream_limits_and_stop_tokens(rows10):
    model, tok, _ = rows10
    first = list(stream_generate(model, tok, PROMPT, sampling=GREEDY, max_steps=6))
    stop_tok = first[2].tokens["Analytical"]
    events = list(
        stream_generate(
            model,
            tok,
            PROMPT,
            sampling=GREEDY,
            max_steps=20,
            max_tokens={"Skeptical": 3},
            stop_tokens={"Analytical": [stop_tok]},
            rows=RowsOptions(ablate=["Void"]),
        )
    )
    reasons = {n: (e.t, r) for e in events for n, r in e.finished.items()}
    assert reasons["Analytical"][1] == "stop" and reasons["Skeptical"][1] == "length"
    t_stop = reasons["Analytical"][0]
    assert events[t_stop].tokens["Analytical"] == stop_tok
    assert all(e.tokens["Analytical"] is None for e in events[t_stop + 1 :])
    sil = model.streams.silence_token
    # the seed row's words are given, not generated: they do not count
    assert sum(e.tokens["Skeptical"] not in (None, sil) for e in events[1:]) == 3
    assert all(e.tokens["Void"] is None for e in events[1:])


def test_blocks_custom_stop_token_and_max_tokens(blocks):
    model, tok, _ = blocks
    first = list(stream_generate(model, tok, PROMPT, sampling=GREEDY, max_tokens=5))
    assert first[-1].finish_reason == "length" and len(first) == 5
    tok3 = first[3].tokens["assistant"]
    events = list(
        stream_generate(
            model,
            tok,
            PROMPT,
            sampling=GREEDY,
            max_tokens=20,
            stop_tokens={"*": [tok3]},
        )
    )
    assert events[-1].finish_reason == "stop"
    assert events[-1].finished and events[-1].tokens["assistant"] in (tok3, None)


def test_max_kv_size_ends_with_length(blocks):
    model, tok, _ = blocks
    s = Session(model, tok, sampling=GREEDY, max_tokens=100, max_kv_size=40)
    s.feed("user", PROMPT)
    events = list(s)
    assert events[-1].finish_reason == "length"
    assert s.cache[0].offset <= 40
    with pytest.raises(ValueError, match="max_kv_size is 10"):
        list(stream_generate(model, tok, PROMPT, max_kv_size=10))


def test_prompt_cache_file_reuses_the_system_block(blocks, tmp_path):
    model, tok, _ = blocks
    f = tmp_path / "sys.safetensors"
    kw = dict(
        sampling=GREEDY, max_tokens=6, system_prompt="you are a helpful assistant"
    )
    plain = list(stream_generate(model, tok, PROMPT, **kw))
    made = list(stream_generate(model, tok, PROMPT, prompt_cache_file=str(f), **kw))
    assert f.exists()
    reused = Session(
        model, tok, sampling=GREEDY, max_tokens=6, prompt_cache_file=str(f)
    )
    reused.feed("system", "you are a helpful assistant")
    reused.feed("user", "one two three")  # another question, same system block
    again = list(reused)
    assert again[0].prompt_tokens > reused._stats.prompt_processed
    trace = lambda evs: [e.tokens for e in evs]  # noqa: E731
    assert trace(plain) == trace(made)
    other = list(stream_generate(model, tok, "one two three", **kw))
    assert trace(again) == trace(other)
    with pytest.raises(ValueError, match="another prompt"):
        list(
            stream_generate(
                model,
                tok,
                PROMPT,
                prompt_cache_file=str(f),
                sampling=GREEDY,
                system_prompt="something else entirely",
            )
        )


def test_rows_prompt_cache_and_skip_silence(rows10, tmp_path):
    model, tok, _ = rows10
    table = [["-"] * 10, [" one"] + ["-"] * 9, [" two"] + [" think"] * 9]
    kw = dict(sampling=GREEDY, max_steps=4)
    plain = list(
        stream_generate(
            model, tok, "hello", rows=RowsOptions(prefill_rows=table, pre_think=3), **kw
        )
    )
    f = str(tmp_path / "rows.safetensors")
    for _ in range(2):  # write, then reuse
        cached = list(
            stream_generate(
                model,
                tok,
                "hello",
                prompt_cache_file=f,
                rows=RowsOptions(prefill_rows=table, pre_think=3),
                **kw,
            )
        )
        assert [e.tokens for e in cached] == [e.tokens for e in plain]
    with pytest.raises(ValueError, match="no shared part"):
        list(
            stream_generate(
                model, tok, "hello", prompt_cache_file=str(tmp_path / "x"), **kw
            )
        )


def test_rows_skip_silence_hides_silence_keys(rows_silent):
    """skip_silence: the greedy trace equals one full forward whose mask also hides
    every silence key (but a token's own), and differs from the plain rule."""
    model, tok, _ = rows_silent
    spec = model.streams
    sil, C = spec.silence_token, spec.num_channels
    table = [["-"] * C, [" one", "-", " think"], [" two", " so", "-"]]

    def run(skip):
        opts = RowsOptions(
            prefill_rows=table, pre_think=3, skip_silence=skip, silence_penalty=0.0
        )
        s = Session(
            model, tok, sampling=GREEDY, max_steps=6, rows=opts, record_logits=True
        )
        s.feed("User", "hello world")
        return s, list(s)

    s, events = run(True)
    outs = [[e.tokens[n] for n in spec.names[1:]] for e in events]
    fed = [list(r) for r in s.schedule.prefill_table] + [
        [events[k + 1].tokens["User"] or sil] + outs[k] for k in range(len(events) - 1)
    ]  # the last row produced is never fed
    ids, ch, pos = rows_to_flat(fed).arrays()
    L = ids.shape[1]
    allowed = (pos[0][None, :] < pos[0][:, None]) & (ids[0] != sil)[None, :]
    allowed = allowed | mx.eye(L, dtype=mx.bool_)
    logits = model(ids, channels=ch, positions=pos, mask=allowed[None, None])[0]
    for k in range(len(events)):  # row 3+k is predicted by row 2+k
        want = mx.argmax(logits[(2 + k) * C + 1 : (3 + k) * C], axis=-1).tolist()
        assert outs[k] == want, f"row {3 + k}"
    _, plain = run(False)
    assert [e.logits_summary for e in events] != [e.logits_summary for e in plain]


# ------------------------------------------------------------------- sampling
def test_reference_filters_keep_the_documented_sets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    logits[0, :3] = 5.0  # ties at the top-k boundary
    for row in logits:
        l = row / 0.7
        kth = np.sort(l)[::-1][4]
        keep_k = l >= kth
        got = np.isfinite(np.array(rows_filter(mx.array(row[None]), 0.7, 5, 1.0))[0])
        assert (got == keep_k).all()  # rows and blocks keep ties at the k-th logit
        p = np.exp(l - l.max())
        p /= p.sum()
        order = np.argsort(-l, kind="stable")
        cum = np.cumsum(p[order])
        keep_rows = np.zeros(50, bool)
        keep_rows[order[(cum - p[order]) <= 0.8]] = True  # the crossing token stays
        keep_blocks = np.zeros(50, bool)
        keep_blocks[order[cum <= 0.8]] = True  # the crossing token goes ...
        keep_blocks[order[0]] = True  # ... but the best always stays
        r = np.isfinite(np.array(rows_filter(mx.array(row[None]), 0.7, 0, 0.8))[0])
        b = np.isfinite(np.array(blocks_filter(mx.array(row[None]), 0.7, 0, 0.8))[0])
        assert (r == keep_rows).all() and (b == keep_blocks).all()


def test_samplers_and_penalties():
    logits = mx.array([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample_tokens(logits, GREEDY).tolist() == [1, 0]
    # blocks min_p is absolute: nothing reaches 0.99 -> argmax
    s = SamplingSettings(temp=1.0, min_p=0.99, method="blocks")
    assert sample_tokens(logits, s, mx.random.key(0)).tolist() == [1, 0]
    for method in ("mlx", "rows", "blocks"):
        s = SamplingSettings(temp=0.8, top_k=2, top_p=0.9, min_p=0.05, method=method)
        assert set(sample_tokens(logits, s, mx.random.key(1)).tolist()) <= {0, 1, 3}
    pen = SilencePenalty(3, [10.0, 1.0], ramp=0.5)(None, logits)
    assert np.allclose(np.array(pen[:, 3]), [2.9 - 5.0, -0.5])
    assert np.allclose(np.array(pen[:, :3]), np.array(logits[:, :3]))
    assert [silence_ramp(r, 3) for r in range(2, 9)] == [
        0.0,
        0.2,
        0.4,
        0.6,
        0.8,
        1.0,
        1.0,
    ]
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0.0)


def test_per_stream_seeds_are_reproducible(blocks):
    model, tok, _ = blocks
    heads = [model.streams.names[c] for c in model.streams.outputs]

    def run(seed, pipeline=True):
        sampling = {
            "*": SamplingSettings(
                temp=30.0,
                method="mlx",
                seed=seed,
                presence_penalty=0.5,
                repetition_penalty=1.2,
            )
        }
        evs = stream_generate(
            model, tok, PROMPT, sampling=sampling, max_tokens=10, pipeline=pipeline
        )
        return [[e.tokens[h] for h in heads] for e in evs]

    assert run(1) == run(1) == run(1, pipeline=False)
    assert run(1) != run(2)


# ------------------------------------------------------------- text and events
def test_multibyte_text_streams_whole_characters(blocks):
    model, tok, _ = blocks
    s = Session(model, tok, sampling=GREEDY, max_tokens=8)
    ids = tok.encode(" é ü", add_special_tokens=False)
    assert len(ids) > 2  # byte-level pieces
    s.feed("user", ids)
    deltas = [e.text["user"] for e in s]
    assert "".join(deltas) == " é ü".lstrip() or "".join(deltas) == " é ü"
    assert not any("\ufffd" in d for d in deltas)


def test_generate_returns_texts_and_events_carry_timing(rows10):
    model, tok, _ = rows10
    texts = generate(model, tok, PROMPT, sampling=GREEDY, max_steps=5)
    assert set(texts) == set(model.streams.names[1:])
    s = Session(model, tok, sampling=GREEDY, max_steps=5, record_logits=True)
    s.feed("User", PROMPT)
    events = list(s)
    last = events[-1]
    assert last.generation_timesteps == 5 and last.timesteps_per_sec > 0
    assert last.generation_tokens == 6 * 9 and last.peak_memory >= 0
    assert set(events[1].logits_summary) == set(model.streams.names[1:])
    ent, p1, top = events[1].logits_summary["Output"]
    assert ent >= 0 and 0 < p1 <= 1
    assert (
        "".join(e.text["User"] for e in events) == "what is one plus"
    )  # "two": row 5, unread
    json.loads(last.to_json())


# ------------------------------------------------------------------ bad inputs
def test_bad_inputs_give_one_line_errors(rows10, blocks):
    model, tok, _ = rows10
    s = Session(model, tok)
    cases = [
        (lambda: s.feed("Nope", "hi"), "Unknown stream 'Nope'"),
        (lambda: s.feed("Output", "hi"), "output stream"),
        (lambda: s.feed("User", "   "), "Nothing to feed"),
        (lambda: s.feed("User", [10**6]), "outside the vocabulary"),
        (lambda: Session(model, tok, sampling={"User": GREEDY}), "input stream"),
        (
            lambda: Session(model, tok, rows=RowsOptions(ablate=["User"])),
            "Only output streams",
        ),
        (lambda: Session(model, tok, blocks=BlocksOptions()), "blocks layout only"),
        (lambda: Session(model, tok, max_kv_size=0), "max_kv_size"),
        (lambda: s.close(), "blocks layout"),
    ]
    bmodel, btok, _ = blocks
    b = Session(bmodel, btok, max_tokens=6)
    b.feed("user", "hi")
    for _ in range(4):  # "hi" and <|im_end|> are read, the heads go on
        b.step()
    cases += [
        (lambda: b.feed("system", "late"), "fixed once generation starts"),
        (lambda: b.feed("user", "late"), "closed"),
        (lambda: list(b) and b.step(), "finished"),
        (lambda: b.feed("user", "late"), "finished"),
        (
            lambda: Session(bmodel, btok, blocks=BlocksOptions(head_prefill=["a"] * 5)),
            "head_prefill",
        ),
    ]
    for call, msg in cases:
        with pytest.raises((ValueError, RuntimeError), match=msg) as info:
            call()
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------ CLI
def test_cli_jsonl_parses(blocks, tmp_path):
    args = ["generate", "--model", blocks.folder, "-p", PROMPT, "-m", "5"]
    args += ["--format", "jsonl", "--streams", "user,assistant"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert [x["t"] for x in lines] == list(range(len(lines)))
    assert all(set(x["tokens"]) == {"user", "assistant"} for x in lines)
    assert lines[-1]["finish_reason"] == "length"
    assert "Prompt:" in res.stderr and "Peak memory:" in res.stderr
    cache = [
        "--prompt-cache-file",
        str(tmp_path / "sys.safetensors"),
        "--system-prompt",
        "hi",
    ]
    runs = [
        CliRunner().invoke(app, [*args, *cache]) for _ in range(2)
    ]  # write, then reuse
    assert runs[0].exit_code == runs[1].exit_code == 0
    assert runs[0].stdout == runs[1].stdout and (tmp_path / "sys.safetensors").exists()


def test_cli_text_rows_with_knobs(rows10, tmp_path):
    folder = rows10.folder
    table = tmp_path / "rows.json"
    table.write_text(json.dumps([["-"] * 10, [" one"] + ["-"] * 9]))
    args = [
        "generate",
        "--model",
        folder,
        "-p",
        PROMPT,
        "--max-steps",
        "6",
        "--pre-think",
        "2",
        "--silence-penalty",
        "5",
        "--think-silence-penalty",
        "1",
        "--ablate",
        "Void",
        "--prefill-rows",
        str(table),
        "--stream-config",
        "Output:temp=0.5,seed=3",
        "--interrupt",
        "3:seven",
        "--streams",
        "User,Output,Analytical",
        "--temp",
        "0",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert res.stdout.count("==========") == 2 and "Output" in res.stdout
    assert "Generation:" in res.stderr
    jl = CliRunner().invoke(app, args[:-4] + ["--format", "jsonl"])
    assert all(json.loads(x) for x in jl.stdout.splitlines())


@pytest.mark.parametrize(
    "args,msg",
    [
        (["-p", "hi", "--streams", "Nope"], "Unknown stream 'Nope'"),
        (["-p", "  "], "--prompt is empty"),
        ([], "Nothing to read"),
        (["-p", "hi", "--format", "xml"], "--format must be"),
        (["-p", "hi", "--stream-config", "Output:warmth=2"], "unknown key 'warmth'"),
    ],
)
def test_cli_errors_are_one_line(rows10, args, msg):
    res = CliRunner().invoke(app, ["generate", "--model", rows10.folder, *args])
    assert res.exit_code == 1
    assert res.stderr.strip().startswith("Error:") and msg in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_without_model_names_the_default_path(monkeypatch, tmp_path):
    import mstream_mlx.utils

    monkeypatch.setattr(mstream_mlx.utils, "__file__", str(tmp_path / "utils.py"))
    res = CliRunner().invoke(app, ["generate", "-p", "hi"])
    assert res.exit_code == 1 and "default model" in res.stderr
    assert str(tmp_path / "assets" / "default_model") in " ".join(res.stderr.split())


def test_cli_without_model_runs_the_bundled_model():
    res = CliRunner().invoke(app, ["generate", "-p", "add five minus two", "--format", "jsonl"])
    assert res.exit_code == 0, res.stderr
    lines = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")]
    answers = [l["text"]["Output"].strip() for l in lines if l["text"]["Output"].strip()]
    assert answers == ["5", "3"]  # the running totals, each 2 rows after its operand


def test_rows_options_come_from_the_model_folder_then_overrides():
    from types import SimpleNamespace

    from mstream_mlx.schedules import RowsOptions

    model = SimpleNamespace(
        args=SimpleNamespace(multistream={"rows_options": {"silence_penalty": 0.0, "seed_words": []}})
    )
    opts = RowsOptions.for_model(model)
    assert opts.silence_penalty == 0.0 and list(opts.seed_words) == [] and opts.pre_think == 1
    opts = RowsOptions.for_model(model, silence_penalty=3.0, pre_think=None)
    assert opts.silence_penalty == 3.0 and opts.pre_think == 1
    plain = SimpleNamespace(args=SimpleNamespace(multistream=None))
    assert RowsOptions.for_model(plain) == RowsOptions()


def test_interactive_runs_never_end_on_silence(rows10):
    """silence_exit ends non-interactive runs only (a deliberate deviation)."""
    model, tok, _ = rows10
    opts = RowsOptions(silence_penalty=0.0, silence_exit=1)
    s = Session(model, tok, sampling=GREEDY, max_steps=12, interactive=True, rows=opts)
    events = list(s)
    assert len(events) == 1 + 12 and s.finish_reason == "length"  # seed row + 12 rows


def test_interactive_input_waits_for_pre_think(rows10):
    """A word fed before the first step enters at row pre_think (1 by default, as in
    the training data); pre_think=0 puts it in the seed row, as the reference's
    interactive gen.send does."""
    model, tok, _ = rows10
    for pre_think, row in ((1, 1), (0, 0)):
        s = Session(model, tok, sampling=GREEDY, max_steps=4, interactive=True,
                    rows=RowsOptions(pre_think=pre_think, silence_penalty=0.0))
        s.feed("User", "one")
        read = [e.y["User"] for e in s if e.tokens["User"] is not None]
        assert read == [row]


# ------------------------------------------------- step, plans, schedules, events
def test_step_equals_one_forward(rows10):
    """step(): a row fed into a prefilled cache gives the full forward's logits; lazy
    tokens and host positions are accepted, logits_at picks rows."""
    model, _, _ = rows10
    table = np.random.default_rng(3).integers(0, 400, size=(3, 10))
    ids, ch, pos = rows_to_flat(table).arrays()
    full = model(ids, channels=ch, positions=pos)[0]
    cache = model.make_cache()
    prefill(model, rows_to_flat(table[:2]), cache)
    tokens = mx.array(table[2]) + 0  # lazy, like the previous step's samples
    logits = step(model, cache, tokens, list(range(10)), [2] * 10, logits_at=[1, 5])
    assert cache[0].offset == 30 and logits.shape == (2, full.shape[-1])
    assert mx.allclose(logits, full[mx.array([21, 25])], atol=1e-4)


def test_schedules_own_their_layout_defaults(rows10, blocks):
    rows_model, rows_tok, _ = rows10
    blocks_model, blocks_tok, _ = blocks
    r, b = Session(rows_model, rows_tok), Session(blocks_model, blocks_tok)
    assert isinstance(r.schedule, RowsSchedule) and isinstance(b.schedule, BlocksSchedule)
    assert schedule_class("rows") is RowsSchedule and schedule_class("blocks") is BlocksSchedule
    assert r.sampler.settings[1].method == "rows" and b.sampler.settings[2].method == "blocks"
    assert r.schedule.max_steps == 200 and b.schedule.max_steps == 4096
    assert set(r.schedule.max_tokens.values()) == {None}
    assert set(b.schedule.max_tokens.values()) == {256}
    im_end = ChatTokens.from_tokenizer(blocks_tok).im_end
    assert r.schedule.stop_tokens == {}
    assert all(v == {im_end} for v in b.schedule.stop_tokens.values())
    with pytest.raises(ValueError, match="blocks options apply to the blocks layout only"):
        Session(rows_model, rows_tok, blocks=BlocksOptions())
    with pytest.raises(ValueError, match="rows options and interactive apply"):
        Session(blocks_model, blocks_tok, interactive=True)
    with pytest.raises(ValueError, match="Only the blocks layout's user stream"):
        r.close("User")


def test_decode_plan_puts_lazy_ids_back_in_plan_order():
    plan = DecodePlan(
        ids=[LAZY, 7, LAZY, 9], channels=[2, 1, 3, 0], ys=[5, 4, 5, 3],
        lazy_src=mx.array([1, 2]), sample_rows=[0, 2], sample_channels=[2, 3],
        read={1: 7, 0: 9},
    )
    assert plan.tokens().tolist() == [[1, 7, 2, 9]]
    assert plan.reads() == {1: (7, 4), 0: (9, 3)}


def test_rows_plans_are_typed(rows10):
    model, tok, _ = rows10
    assert isinstance(Session(model, tok).schedule.first_plan(), SeedPlan)
    table = [["-"] * 10, [" one"] + ["-"] * 9]
    sched = Session(model, tok, rows=RowsOptions(prefill_rows=table)).schedule
    first = sched.first_plan()
    assert isinstance(first, PrefillPlan) and first.shared == 10
    assert first.sample_channels == list(range(1, 10))
    sched.advance(first, mx.arange(9))
    plan = sched.plan()
    assert isinstance(plan, RowsStep) and plan.ys == [2] * 10 and plan.sample_rows == list(range(1, 10))
    assert plan.tokens().tolist() == [[model.streams.silence_token] + list(range(9))]


def test_blocks_plans_are_typed(blocks):
    model, tok, _ = blocks
    s = Session(model, tok)
    s.feed("user", [11, 12])
    sched = s.schedule
    first = sched.first_plan()
    assert isinstance(first, PrefillPlan) and first.shared == sched.y0 > 0
    sched.advance(first, mx.zeros((len(sched.heads),), mx.int32))
    plan = sched.plan()
    assert isinstance(plan, BlocksStep) and plan.user and plan.content
    assert plan.reads() == {1: (11, sched.y0 + 3)}
    assert plan.sample_channels == sched.heads and plan.sample_rows[0] == 1


def test_step_event_json_line_is_stable():
    """The ``generate --format jsonl`` line (a server reuses it): field order, nulls,
    non-ASCII text as is, finish fields only when set."""
    ev = StepEvent(
        t=3, tokens={"user": None, "assistant": 42}, text={"user": "", "assistant": "é"},
        y={"assistant": 7}, finished={"assistant": "stop"}, finish_reason="stop",
        prompt_tokens=5, prompt_tps=1.0, generation_timesteps=3, timesteps_per_sec=1.0,
        generation_tokens=3, tokens_per_sec=1.0, ttft=0.1, ttft_timesteps=2,
        peak_memory=0.0,
    )
    assert ev.to_json() == (
        '{"t": 3, "tokens": {"user": null, "assistant": 42}, '
        '"text": {"user": "", "assistant": "é"}, '
        '"finished": {"assistant": "stop"}, "finish_reason": "stop"}'
    )
    assert ev.to_json(["assistant"]) == (
        '{"t": 3, "tokens": {"assistant": 42}, "text": {"assistant": "é"}, '
        '"finished": {"assistant": "stop"}, "finish_reason": "stop"}'
    )

# Copyright © 2026 mstream-mlx contributors.
"""Heads: the output streams that generate (docs/generation.md#heads).

The reference's §5 code writes a 5-row channel table (system, user, assistant,
auditor, assistant2) whatever it trained, and its evaluation decodes the user stream
plus one assistant head.  These tests build such checkpoints the way the reference
writes them and check: the default run equals the reference's 2-stream loop token for
token, ``heads=("assistant", "auditor")`` its 3-stream loop, the other streams are
never fed, the heads survive convert / export / lora / fuse, and bad values are one
line."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mstream_mlx
from mstream_mlx import RowsOptions, SamplingSettings, Session
from mstream_mlx.cli.main import app
from mstream_mlx.streams import ChatTokens
from tests.reference import RefModel, blocks_generate
from tests.tiny import make_checkpoint

GREEDY = SamplingSettings(temp=0.0)
PROMPT = "what is one plus two"
AUDITING = ("assistant", "auditor")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def ref5(request, tmp_path_factory):
    """A §5-style (qwen3) or §6-style (qwen2) checkpoint with the reference's 5-row table."""
    folder = make_checkpoint(
        tmp_path_factory.mktemp(f"ref5-{request.param}"), request.param, "blocks",
        num_channels=5, tied=False,
    )
    model, tok = mstream_mlx.load(str(folder))
    return folder, model, tok, RefModel.from_pretrained(folder)


def reference_loop(ref, tok, heads: int, max_new_tokens: int):
    chat = ChatTokens.from_tokenizer(tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    return blocks_generate(
        ref, system_ids=enc("You are a helpful assistant."), user_ids=enc(PROMPT),
        im_start=chat.im_start, im_end=chat.im_end, newline=chat.newline,
        role_ids=chat.roles, num_heads=heads, max_new_tokens=max_new_tokens,
    )


def run(model, tok, **kw):
    s = Session(model, tok, sampling=GREEDY, max_tokens=16, **kw)
    s.feed("user", PROMPT)
    events = list(s)
    return s, events


def written(events, name):
    return [e.tokens[name] for e in events if e.tokens[name] is not None]


# ------------------------------------------------------------- the reference loops
def test_default_is_one_assistant_head_like_the_reference(ref5):
    _, model, tok, ref = ref5
    assert model.args.multistream["heads"] == ["assistant"]
    s, events = run(model, tok)
    want = reference_loop(ref, tok, 1, 16)
    assert written(events, "assistant") == want.tokens[0]
    assert not written(events, "auditor") and not written(events, "assistant2")
    # never fed: the cache holds exactly what the reference's 2-stream loop fed
    assert s.cache[0].offset == len(want.prefill) + sum(len(f) for f in want.steps)


def test_auditing_heads_equal_the_3_stream_loop(ref5):
    _, model, tok, ref = ref5
    s, events = run(model, tok, heads=AUDITING)
    want = reference_loop(ref, tok, 2, 16)
    assert [written(events, n) for n in AUDITING] == want.tokens
    assert not written(events, "assistant2")
    assert s.cache[0].offset == len(want.prefill) + sum(len(f) for f in want.steps)


def test_every_output_as_a_head_is_not_the_reference_answer(ref5):
    """What went wrong before heads existed: the table's 3 output rows all decoded,
    so the assistant saw untrained channels' tokens and answered differently."""
    _, model, tok, ref = ref5
    _, events = run(model, tok, heads=("assistant", "auditor", "assistant2"))
    assert written(events, "assistant") != reference_loop(ref, tok, 1, 16).tokens[0]


def test_heads_keep_their_own_channels(ref5):
    """assistant + assistant2: the second head is channel 4 (not 2 + h), and the
    auditor channel between them is never fed."""
    _, model, tok, _ = ref5
    plan = Session(model, tok, heads=("assistant", "assistant2")).schedule.first_plan()
    assert sorted(set(plan.flat.channels.tolist())) == [0, 1, 2, 4]
    assert plan.sample_channels == [2, 4]
    _, events = run(model, tok, heads=("assistant", "assistant2"))
    assert written(events, "assistant2") and not written(events, "auditor")
    assert events[-1].finished.keys() <= {"assistant", "assistant2"}


def test_rows_heads_hold_the_others_silent(tiny_checkpoint):
    """Rows models feed whole rows, so the streams that are not heads are held silent,
    exactly as ``ablate`` does."""
    model, tok = mstream_mlx.load(str(tiny_checkpoint("qwen3", "rows", num_channels=3)))
    others = list(model.streams.names[2:])
    runs = []
    for kw in (dict(heads=("Output",)), dict(rows=RowsOptions(ablate=others))):
        s = Session(model, tok, sampling=GREEDY, max_steps=12, **kw)
        s.feed("User", "one plus two")
        runs.append([e.tokens for e in s])
    assert runs[0] == runs[1]
    assert all(tokens[n] is None for tokens in runs[0][1:] for n in others)


def test_session_refuses_bad_heads_in_one_line(ref5):
    _, model, tok, _ = ref5
    for heads, msg in [
        ((), "heads is empty"),
        (("nope",), "Unknown stream 'nope' in heads"),
        (("user",), "Stream 'user' is an input stream"),
        (("assistant", "Assistant"), "named twice"),
    ]:
        with pytest.raises(ValueError, match=msg) as info:
            Session(model, tok, heads=heads)
        assert "\n" not in str(info.value)


def test_generate_returns_the_heads_texts(ref5):
    _, model, tok, _ = ref5
    assert set(mstream_mlx.generate(model, tok, PROMPT, max_tokens=3)) == {"assistant"}
    texts = mstream_mlx.generate(model, tok, PROMPT, max_tokens=3, heads=AUDITING)
    assert set(texts) == set(AUDITING)


# --------------------------------------------------------- where the default comes from
def test_folder_heads_win_and_plain_folders_run_every_output(tmp_path, tiny_checkpoint):
    folder = make_checkpoint(tmp_path / "aud", "qwen3", "blocks", num_channels=5,
                             heads=AUDITING)
    model, _ = mstream_mlx.load(str(folder))
    assert model.args.multistream["heads"] == list(AUDITING)
    # a plain base model (Qwen3ForCausalLM, no channel table): every output, as before
    base = tiny_checkpoint("qwen3", "rows", channel_embedding=False)
    model, _ = mstream_mlx.load(str(base))
    assert model.streams.layout == "blocks" and "heads" not in model.args.multistream
    from mstream_mlx.convert import convert

    names = ["system", "user", "assistant", "auditor"]
    convert(str(base), str(tmp_path / "base4"), channel_names=names)
    model, tok = mstream_mlx.load(str(tmp_path / "base4"))
    assert "heads" not in model.args.multistream  # every output: nothing to record
    assert Session(model, tok).schedule.heads == [2, 3]


def test_convert_writes_heads_and_load_keeps_them(ref5, tmp_path):
    from mstream_mlx.convert import convert, export

    folder, _, tok, ref = ref5
    convert(str(folder), str(tmp_path / "one"))
    cfg = json.loads((tmp_path / "one" / "config.json").read_text())
    assert cfg["multistream"]["heads"] == ["assistant"]
    convert(str(folder), str(tmp_path / "two"), heads=AUDITING)
    model, tok = mstream_mlx.load(str(tmp_path / "two"))
    assert model.args.multistream["heads"] == list(AUDITING)
    _, events = run(model, tok)  # the folder's heads are the default now
    assert [written(events, n) for n in AUDITING] == reference_loop(ref, tok, 2, 16).tokens
    # MLX -> PyTorch -> MLX keeps them too
    export(str(tmp_path / "two"), str(tmp_path / "torch"))
    convert(str(tmp_path / "torch"), str(tmp_path / "back"))
    model, _ = mstream_mlx.load(str(tmp_path / "back"))
    assert model.args.multistream["heads"] == list(AUDITING)


def test_lora_on_auditor_data_records_both_heads_and_fuse_keeps_them(tmp_path):
    from mstream_mlx.tuner.fuse import fuse

    folder = make_checkpoint(tmp_path / "ck", "qwen3", "blocks", num_channels=5)
    ad = tmp_path / "ad"
    r = CliRunner().invoke(app, [
        "lora", "--model", str(folder), "--data", str(EXAMPLES / "auditor"), "--train",
        "--iters", "2", "--batch-size", "2", "--num-layers", "1",
        "--adapter-path", str(ad),
    ])
    assert r.exit_code == 0, r.output
    saved = json.loads((ad / "adapter_config.json").read_text())
    assert saved["multistream"]["heads"] == list(AUDITING)
    model, tok = mstream_mlx.load(str(folder), adapter_path=str(ad))
    assert Session(model, tok).schedule.heads == [2, 3]
    fuse(str(folder), str(ad), str(tmp_path / "fused"), log=lambda *_: None)
    cfg = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert cfg["multistream"]["heads"] == list(AUDITING)


def test_lora_on_one_head_data_records_one_head(tmp_path, tiny_checkpoint):
    from mstream_mlx.tuner.datasets import load_datasets
    from mstream_mlx.heads import trained_heads

    model, tok = mstream_mlx.load(str(tiny_checkpoint("qwen3", "blocks", num_channels=4,
                                                      heads=AUDITING)))
    data = load_datasets(str(EXAMPLES / "chat"), tok, model.streams,
                         model.args.vocab_size, splits=["train"], log=lambda *_: None)
    assert trained_heads(model.streams, data["train"]) == ["assistant"]
    data = load_datasets(str(EXAMPLES / "auditor"), tok, model.streams,
                         model.args.vocab_size, splits=["train"], log=lambda *_: None)
    assert trained_heads(model.streams, data["train"]) == list(AUDITING)


# --------------------------------------------------------------------------- commands
@pytest.mark.parametrize(
    "heads,msg",
    [
        ("", "--heads '' names no stream"),
        ("nope", "Unknown stream 'nope' in heads"),
        ("user", "Stream 'user' is an input stream"),
        ("assistant,system", "Stream 'system' is an input stream"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "chat", "bench", "server", "convert"])
def test_bad_heads_are_one_line(ref5, tmp_path, command, heads, msg):
    folder = str(ref5[0])
    args = {
        "generate": ["generate", "--model", folder, "-p", PROMPT],
        "chat": ["chat", "--plain", "--model", folder],
        "bench": ["bench", "--model", folder],
        "server": ["server", "--model", folder, "--port", "0"],
        "convert": ["convert", "--hf-path", folder, "--mlx-path", str(tmp_path / "out")],
    }[command]
    res = CliRunner().invoke(app, [*args, "--heads", heads], input="hi\n")
    assert res.exit_code == 1, res.output
    assert res.stderr.strip().startswith("Error:") and msg in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_generate_and_chat_say_which_heads_run(ref5):
    folder = str(ref5[0])
    res = CliRunner().invoke(app, ["generate", "--model", folder, "-p", PROMPT, "-m", "2"])
    assert res.exit_code == 0, res.output
    assert "Heads: assistant (not generating: auditor, assistant2" in res.stderr
    assert "auditor" not in res.stdout  # only the user and the heads are shown
    res = CliRunner().invoke(app, ["generate", "--model", folder, "-p", PROMPT, "-m", "2",
                                   "--heads", "assistant,auditor", "--format", "jsonl"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert set(lines[0]["tokens"]) == {"user", "assistant", "auditor"}
    assert "Heads: assistant, auditor (not generating: assistant2" in res.stderr
    res = CliRunner().invoke(app, ["chat", "--plain", "--model", folder, "-m", "3",
                                   "--heads", "assistant,auditor"], input="hi\n")
    assert res.exit_code == 0, res.output
    assert "[chat] heads: assistant, auditor" in res.stderr


def test_server_requests_choose_heads(ref5):
    import threading
    import urllib.request

    from mstream_mlx.server import ServerConfig, make_server

    with pytest.raises(ValueError, match="Unknown stream 'nope'"):
        make_server(ServerConfig(model=str(ref5[0]), port=0, heads=["nope"]))
    server = make_server(ServerConfig(model=str(ref5[0]), port=0, tick=0.0, max_tokens=3,
                                      heads=list(AUDITING)))
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def post(body):
        req = urllib.request.Request(server.url + "/v1/sessions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        assert post({"text": PROMPT})[1]["outputs"] == list(AUDITING)
        assert post({"text": PROMPT, "heads": ["assistant"]})[1]["outputs"] == ["assistant"]
        code, out = post({"text": PROMPT, "heads": ["user"]})
        assert code == 400 and "input stream" in json.dumps(out)
        code, out = post({"text": PROMPT, "heads": "assistant"})
        assert code == 400 and "list of stream names" in json.dumps(out)
    finally:
        server.shutdown()
        server.server_close()

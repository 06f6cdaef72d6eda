# Copyright © 2026 mstream-mlx contributors.
"""Multi-stream training data: formats, targets, weights, batching, every error."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mstream_mlx
from mstream_mlx.tuner.batching import BatchIterator, collate
from mstream_mlx.tuner.datasets import (
    DataError,
    DataOptions,
    Example,
    ExampleBuilder,
    StreamDataset,
    load_datasets,
    load_jsonl,
    next_in_stream,
    stream_weight_vector,
    targets_and_weights,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(scope="module")
def blocks(tiny_checkpoint):
    return mstream_mlx.load(str(tiny_checkpoint("qwen3", "blocks")))


@pytest.fixture(scope="module")
def blocks4(tiny_checkpoint):
    return mstream_mlx.load(str(tiny_checkpoint("qwen3", "blocks", num_channels=4)))


@pytest.fixture(scope="module")
def rows(tiny_checkpoint):
    return mstream_mlx.load(str(tiny_checkpoint("qwen3", "rows")))


def builder(loaded, **options):
    model, tok = loaded
    return ExampleBuilder(
        tok, model.streams, model.args.vocab_size, DataOptions(**options)
    )


def write_lines(path: Path, lines) -> Path:
    path.write_text(
        "".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines)
    )
    return path


# --------------------------------------------------------------------------------- targets
def test_rows_target_is_shift_by_C(rows):
    model, tok = rows
    C = model.streams.num_channels
    ex = builder(rows).build(
        json.loads((EXAMPLES / "rows" / "train.jsonl").read_text().splitlines()[0])
    )
    assert len(ex) % C == 0
    nxt = next_in_stream(ex.channels, ex.positions)
    L = len(ex)
    assert (nxt[: L - C] == np.arange(C, L)).all() and (nxt[L - C :] == -1).all()
    tgt, w = targets_and_weights(ex, stream_weight_vector(model.streams))
    assert (tgt[: L - C] == ex.ids[C:]).all()
    # user channel never, every output channel (silence included, §7 §6.2) always
    assert (w[ex.channels == 0] == 0).all()
    assert (w[: L - C][ex.channels[: L - C] != 0] == 1).all()


def test_reference_rows_lines_equal_streams_lines(rows):
    b = builder(rows)
    a = [
        b.build(json.loads(l))
        for l in (EXAMPLES / "rows" / "train.jsonl").read_text().splitlines()
    ]
    r = [
        b.build(json.loads(l))
        for l in (EXAMPLES / "rows_reference" / "train.jsonl").read_text().splitlines()
    ]
    for x, y in zip(a, r):
        for u, v in zip(x.arrays(), y.arrays()):
            assert (u == v).all()


def test_blocks_layout_targets_and_labels(blocks):
    model, tok = blocks
    ex = builder(blocks).build(
        {"system": "hello", "user": "one two three", "assistant": "four five"}
    )
    ids = tok.encode
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    system = [im_start, *ids("system"), *ids("\n"), *ids("hello"), im_end]
    user = [im_start, *ids("user"), *ids("\n"), *ids("one two three"), im_end]
    head = [im_start, *ids("assistant"), *ids("\n"), *ids("four five"), im_end]
    assert ex.ids.tolist() == system + user + head
    Ls = len(system)
    assert ex.positions.tolist() == (
        list(range(Ls))
        + list(range(Ls, Ls + len(user)))
        + list(range(Ls, Ls + len(head)))
    )
    assert ex.channels.tolist() == [0] * Ls + [1] * len(user) + [2] * len(head)
    tgt, w = targets_and_weights(ex, stream_weight_vector(model.streams))
    s = Ls + len(user)
    # §5.3: logits from "\n" of the assistant prefix up to the last content token
    # predict the content and <|im_end|>; nothing else carries loss
    want = np.zeros(len(ex))
    want[s + 2 : s + len(head) - 1] = 1
    assert (w == want).all()
    assert tgt[s + 2 : s + len(head) - 1].tolist() == head[3:]


def test_wait_k_and_auditor_offsets(blocks4):
    b = builder(blocks4, wait_k=3, auditor_wait=5)
    ex = b.build({"prompt": "one two", "completion": "three", "auditor": "yes"})
    Ls = int((ex.channels == 0).sum())
    first = {c: int(ex.positions[ex.channels == c].min()) for c in (1, 2, 3)}
    assert first == {1: Ls, 2: Ls + 3, 3: Ls + 5}
    # an explicit "offsets" wins over the rule
    ex = b.build(
        {"user": "one", "assistant": ["two", "three"], "offsets": {"auditor": 1}}
    )
    first = {c: int(ex.positions[ex.channels == c].min()) for c in (2, 3)}
    assert first == {2: Ls + 3, 3: Ls + 1}


def test_chat_and_prompt_completion_give_the_same_blocks(blocks):
    b = builder(blocks, wait_k=2)
    pc = json.loads(
        (EXAMPLES / "prompt_completion" / "train.jsonl").read_text().splitlines()[0]
    )
    chat = json.loads((EXAMPLES / "chat" / "train.jsonl").read_text().splitlines()[0])
    x, y = b.build(pc), b.build(chat)
    for u, v in zip(x.arrays(), y.arrays()):
        assert (u == v).all()


def test_truncation_keeps_whole_timesteps(rows):
    ex = builder(rows).build(
        json.loads((EXAMPLES / "rows" / "train.jsonl").read_text().splitlines()[0])
    )
    cut = ex.truncate(35)  # 10 channels: 3 whole rows fit
    assert len(cut) == 30 and cut.positions.max() == 2
    assert ex.truncate(len(ex)) is ex


def test_stream_weights(rows, blocks):
    spec = rows[0].streams
    w = stream_weight_vector(spec, {"Output": 2.0, "analytical": 0.0})
    assert w[0] == 0 and w[1] == 2 and w[2] == 0 and w[3] == 1
    with pytest.raises(ValueError, match="'User' is an input stream"):
        stream_weight_vector(spec, {"User": 1.0})
    with pytest.raises(ValueError, match="Unknown stream 'Nope'"):
        stream_weight_vector(spec, {"Nope": 1.0})
    with pytest.raises(ValueError, match="must be a number >= 0"):
        stream_weight_vector(spec, {"Output": -1})


# --------------------------------------------------------------------------------- batching
def _dataset(loaded, folder: str, **options):
    model, tok = loaded
    data = load_datasets(
        str(EXAMPLES / folder),
        tok,
        model.streams,
        model.args.vocab_size,
        DataOptions(**options),
    )
    return data


@pytest.mark.parametrize(
    "folder, fixture",
    [
        ("rows", "rows"),
        ("rows_reference", "rows"),
        ("blocks", "blocks"),
        ("prompt_completion", "blocks"),
        ("chat", "blocks"),
        ("auditor", "blocks4"),
    ],
)
def test_example_data_loads(folder, fixture, request):
    data = _dataset(request.getfixturevalue(fixture), folder)
    assert [len(data[s]) for s in ("train", "valid", "test")] == [8, 2, 2]


def test_padding_is_invisible_to_real_tokens(blocks):
    model, _ = blocks
    b = builder(blocks, wait_k=1)
    data = StreamDataset(
        [
            b.build({"user": "one two", "assistant": "three"}),
            b.build(
                {"user": "one two three four five six", "assistant": "seven eight nine"}
            ),
        ],
        stream_weight_vector(model.streams),
    )
    lengths = data.lengths()
    short, long_ = 0, 1
    assert lengths[short] < lengths[long_]
    alone = collate(data, [short], 1, 2048, pad_to=1)
    padded = collate(data, [short, long_], 2, 2048, pad_to=32)
    L = int(lengths[short])
    h1 = model.model(*alone[:3])[0, :L]
    h2 = model.model(*padded[:3])[0, :L]
    assert mx.allclose(h1, h2, atol=1e-5).item()
    ys = np.array(padded[2][0])
    assert (ys[L:] == ys[:L].max() + 1).all()


def test_collate_gathers_supervised_positions(blocks):
    data = _dataset(blocks, "blocks")["train"]
    ids, ch, pos, index, tgt, w = collate(data, [0, 1], 2, 2048, pad_to=8)
    assert index.shape == tgt.shape == w.shape and 0 < index.shape[1] < ids.shape[1]
    for b in range(2):
        ex, t, ww = data.targets(b, 2048)
        sup = np.flatnonzero(ww > 0)
        n = len(sup)
        assert np.array(index[b, :n]).tolist() == sup.tolist()
        assert np.array(tgt[b, :n]).tolist() == t[sup].tolist()
        assert (np.array(w[b, n:]) == 0).all()
        assert (np.array(ch)[b, sup] >= 2).all()  # assistant streams only


def test_batches_sorted_complete_and_resumable(blocks):
    data = _dataset(blocks, "blocks")["train"]
    it = BatchIterator(seed=3, pad_to=1)
    lengths = data.lengths()
    epoch = it.epoch_batches(lengths, 3, 0)
    assert sorted(np.concatenate(epoch).tolist()) == list(range(len(data)))
    spread = sum(lengths[b].max() - lengths[b].min() for b in epoch)
    assert spread <= lengths.max() - lengths.min()  # neighbours by length
    full = [b[0] for b, _ in zip(it(data, 3, 2048, loop=True), range(9))]
    tail = [
        b[0]
        for b, _ in zip(
            BatchIterator(3, 1, start_step=5)(data, 3, 2048, loop=True), range(4)
        )
    ]
    for a, b in zip(full[5:], tail):
        assert mx.array_equal(a, b).item()
    # evaluation: every example exactly once, in length order, last batch padded
    ev = list(it(data, 3, 2048))
    assert len(ev) == 3 and ev[-1][0].shape[0] == 3


# --------------------------------------------------------------------------------- errors
BLOCKS_ERRORS = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (
        {"text": "hi"},
        "unknown format (keys: 'text') (plain {'text'} lines have no streams",
    ),
    ({"foo": 1}, "unknown format (keys: 'foo')"),
    (
        {"streams": {"User": [1]}},
        "a rows example, but the model uses the blocks layout",
    ),
    ({"system": "x", "assistant": "y"}, "a blocks example needs 'user'"),
    ({"user": "x"}, "a blocks example needs 'assistant'"),
    (
        {"user": "x", "assistant": 3},
        "'assistant' must be a string or a list of strings",
    ),
    ({"user": "x", "assistant": []}, "no assistant text"),
    ({"user": "x", "assistant": ""}, "assistant stream 0 is empty"),
    (
        {"user": "x", "assistant": ["a", "b"]},
        "2 assistant streams, but the model has 1 (assistant)",
    ),
    (
        {"user": 5, "assistant": "y"},
        "'user' must be a string (or a list of token ids), got int",
    ),
    (
        {"user": [1, 99999], "assistant": "y"},
        "'user'[1] is token id 99999, outside the vocabulary (0..511)",
    ),
    (
        {"user": "x", "assistant": "y", "offsets": {"auditor": 1}},
        "'offsets' names unknown stream 'auditor'",
    ),
    (
        {"user": "x", "assistant": "y", "offsets": {"user": 1}},
        "'offsets' can delay assistant streams only, not 'user'",
    ),
    (
        {"user": "x", "assistant": "y", "offsets": {"assistant": -2}},
        "the offset of 'assistant' must be an integer >= 0, got -2",
    ),
    ({"user": "x", "assistant": "y", "offsets": [1]}, "'offsets' must be an object"),
    ({"prompt": "x"}, "'completion' must be a string"),
    ({"prompt": "x", "completion": 1}, "'completion' must be a string"),
    ({"messages": "hi"}, "'messages' must be a list of {role, content} objects"),
    ({"messages": [{"role": "user", "content": "a"}]}, "'messages' roles are ['user']"),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ]
        },
        "one user message and one assistant reply",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
        "the assistant message has no string 'content'",
    ),
    (
        {"prompt": "x", "completion": "y", "auditor": "z"},
        "2 assistant streams, but the model has 1",
    ),
]

ROWS_ERRORS = [
    (
        {"prompt": "x", "completion": "y"},
        "a prompt/completion example, but the model uses the rows layout",
    ),
    ({"streams": []}, "'streams' must be a non-empty object"),
    (
        {"streams": {"Nope": [1]}},
        "unknown stream 'Nope'; the model's streams are User, Output",
    ),
    ({"streams": {"User": [1], "user": [2]}}, "stream 'User' is given twice"),
    ({"streams": {"User": 1}}, "stream 'User' must be a list of cells"),
    (
        {"streams": {"User": [1, 2], "Output": [1]}},
        "stream 'Output' has 1 cells but 'User' has 2",
    ),
    ({"streams": {"User": [], "Output": []}}, "the streams have no rows"),
    (
        {"streams": {"User": [1.5, 2]}},
        "cell 0 of stream 'User' is 1.5; a cell is a token id, a text piece or null",
    ),
    ({"streams": {"User": [True, 2]}}, "cell 0 of stream 'User' is true"),
    (
        {"streams": {"Output": [1, 600]}},
        "cell 1 of stream 'Output' is token id 600, outside the vocabulary",
    ),
    (
        {"streams": {"Output": [1, " xyzzy"]}},
        "cell 1 of stream 'Output' (' xyzzy') is 6 tokens",
    ),
    ({"streams": {"User": [1], "Output": [2]}}, "no output-stream token to learn from"),
    (
        {"num_rows": 2, "token_ids": [[1, 2]]},
        "'token_ids' has 1 channels but the model has 10",
    ),
    (
        {"num_rows": 2, "token_ids": [[1, 2]] * 9 + [[1]]},
        "channel 9 of 'token_ids' has 1 ids but num_rows is 2",
    ),
    ({"num_rows": "2", "token_ids": [[1, 2]] * 10}, "'num_rows' must be an integer"),
    (
        {"num_rows": 2, "token_ids": [1, 2]},
        "'token_ids' must be a list of per-channel lists",
    ),
    (
        {"num_rows": 2, "token_ids": [[1, -1]] * 10},
        "token_ids[0][1] is token id -1, outside the vocabulary",
    ),
    ({"num_rows": 0, "token_ids": [[]] * 10}, "num_rows is 0: an empty example"),
]


@pytest.mark.parametrize("line, message", BLOCKS_ERRORS)
def test_blocks_data_errors(blocks, tmp_path, line, message):
    path = write_lines(
        tmp_path / "train.jsonl", [{"user": "one", "assistant": "two"}, "", line]
    )
    with pytest.raises(DataError) as e:
        load_jsonl(path, builder(blocks))
    assert str(e.value).startswith(f"{path}:3: ")
    assert message in str(e.value)


@pytest.mark.parametrize("line, message", ROWS_ERRORS)
def test_rows_data_errors(rows, tmp_path, line, message):
    path = write_lines(tmp_path / "valid.jsonl", [line])
    with pytest.raises(DataError) as e:
        load_jsonl(path, builder(rows))
    assert str(e.value).startswith(f"{path}:1: ")
    assert message in str(e.value)


def test_skip_invalid_counts_and_skips(blocks, tmp_path):
    good = {"user": "one", "assistant": "two"}
    path = write_lines(tmp_path / "train.jsonl", [good, "{", {"foo": 1}, good])
    examples, report = load_jsonl(path, builder(blocks), skip_invalid=True)
    assert len(examples) == 2 and len(report.skipped) == 2
    assert report.skipped[0].startswith(f"{path}:2: invalid JSON")
    logs = []
    model, tok = blocks
    data = load_datasets(
        str(tmp_path),
        tok,
        model.streams,
        model.args.vocab_size,
        DataOptions(skip_invalid=True),
        log=logs.append,
    )
    assert len(data["train"]) == 2 and data["valid"] is None
    assert "Skipped 2 invalid line(s)" in logs[0]
    write_lines(path, ["{"])
    with pytest.raises(DataError, match="no valid examples"):
        load_datasets(
            str(tmp_path),
            tok,
            model.streams,
            model.args.vocab_size,
            DataOptions(skip_invalid=True),
            log=logs.append,
        )


def test_missing_data_folder(blocks):
    model, tok = blocks
    with pytest.raises(FileNotFoundError, match="--data must be a folder"):
        load_datasets("/nonexistent", tok, model.streams, model.args.vocab_size)

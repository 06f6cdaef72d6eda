# Copyright © 2026 mstream-mlx contributors.
"""Parity with the independent PyTorch reference (tests/reference/): same ids,
channels and positions give the same fp32 logits within 1e-4.

The reference runs on CUDA when available (or MSTREAM_REF_DEVICE), else on CPU."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import mstream_mlx
from mstream_mlx import mask as mask_module
from mstream_mlx.attention import StreamRoPE
from mstream_mlx.prefill import prefill
from mstream_mlx.streams import (
    ChatTokens,
    Flat,
    blocks_to_flat,
    chat_blocks,
    rows_to_flat,
)
from mstream_mlx.mask import stream_mask
from tests.reference import RefModel

TOL = 1e-4
FAMILIES = [("qwen3", True), ("qwen3", False), ("qwen2", True), ("qwen2", False)]


def mlx_logits(model, flat: Flat) -> np.ndarray:
    ids, ch, pos = flat.arrays()
    return np.array(model(ids, channels=ch, positions=pos)[0])


def ref_logits(ref: RefModel, flat: Flat) -> np.ndarray:
    t = [torch.tensor(a[None], dtype=torch.long, device=ref.device) for a in flat.astuple()]
    with torch.no_grad():
        return ref(*t)[0].float().cpu().numpy()


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}")
def pair(request, tiny_checkpoint):
    model_type, tied = request.param
    folder = tiny_checkpoint(model_type, "rows", tied=tied)
    model, tokenizer = mstream_mlx.load(folder)
    return model, RefModel.from_pretrained(folder), tokenizer


def rows_flat(rng, rows=6, channels=10) -> Flat:
    return rows_to_flat(rng.integers(0, 400, size=(rows, channels)))


def blocks_flat(tokenizer, rng, heads=2) -> Flat:
    chat = ChatTokens.from_tokenizer(tokenizer)
    content = lambda n: rng.integers(10, 400, size=n).tolist()
    return blocks_to_flat(chat_blocks(chat, content(3), content(5), [content(4 + h) for h in range(heads)]))


def rows_prefill(model, ref, tokenizer) -> float:
    flat = rows_flat(np.random.default_rng(0))
    return max_diff(mlx_logits(model, flat), ref_logits(ref, flat))


def blocks_prefill(model, ref, tokenizer, heads=2) -> float:
    """System, user and `heads` assistant blocks (the 10-channel checkpoint serves as
    a blocks model here: channels 0..1+heads)."""
    flat = blocks_flat(tokenizer, np.random.default_rng(1), heads)
    return max_diff(mlx_logits(model, flat), ref_logits(ref, flat))


def interleaved_order(model, ref, tokenizer) -> float:
    """Block order == any interleaved order, token for token."""
    flat = blocks_flat(tokenizer, np.random.default_rng(2))
    order = np.random.default_rng(3).permutation(len(flat))
    return max_diff(mlx_logits(model, flat.take(order)), ref_logits(ref, flat)[order])


def rows_decode(model, ref, tokenizer) -> float:
    """Row-by-row decode through the cache == the reference's one-pass prefill."""
    table = np.random.default_rng(4).integers(0, 400, size=(5, 10))
    full = ref_logits(ref, rows_to_flat(table))
    cache = model.make_cache()
    steps = []
    for r, row in enumerate(table):
        ids, ch, pos = rows_to_flat([row], first_row=r).arrays()
        steps.append(np.array(model(ids, channels=ch, positions=pos, cache=cache)[0]))
    return max_diff(np.concatenate(steps), full)


def blocks_decode(model, ref, tokenizer) -> float:
    """TV-D/TV-F: prefill the prefixes, then feed [user_t, assistant_t] at y0+3+t;
    equals the reference's one-pass forward of the final block layout."""
    chat = ChatTokens.from_tokenizer(tokenizer)
    rng = np.random.default_rng(5)
    system, user, asst = (rng.integers(10, 400, size=n).tolist() for n in (2, 4, 6))
    whole = blocks_to_flat(chat_blocks(chat, system, user, [asst]))
    full = dict(zip(zip(whole.channels, whole.positions), ref_logits(ref, whole)))

    head = blocks_to_flat(chat_blocks(chat, system, [], [[]], close_user=False))
    cache = model.make_cache()
    out = prefill(model, head, cache, logits_at=range(len(head)), step=5)
    got = dict(zip(zip(head.channels, head.positions), np.array(out)))
    y0 = int(head.positions[-1]) - 2
    user_stream = user + [chat.im_end]
    for t in range(max(len(user_stream), len(asst))):
        feed = [(v[t], c) for v, c in ((user_stream, 1), (asst, 2)) if t < len(v)]
        ids = mx.array([[f[0] for f in feed]])
        ch = mx.array([[f[1] for f in feed]])
        pos = mx.full(ids.shape, y0 + 3 + t)
        logits = np.array(model(ids, channels=ch, positions=pos, cache=cache)[0])
        got.update({(c, y0 + 3 + t): l for (_, c), l in zip(feed, logits)})
    assert got.keys() == full.keys()
    return max(max_diff(got[k], full[k]) for k in full)


def chunked_prefill(model, ref, tokenizer) -> float:
    """`prefill` in chunks of 1, 4 and 2048 tokens == one forward (shuffled input)."""
    flat = blocks_flat(tokenizer, np.random.default_rng(6))
    flat = flat.take(np.random.default_rng(7).permutation(len(flat)))
    full = ref_logits(ref, flat)
    want = [0, 7, len(flat) - 1, 12]
    return max(
        max_diff(prefill(model, flat, model.make_cache(), logits_at=want, step=s), full[want])
        for s in (1, 4, 2048)
    )


CASES = {
    "rows prefill (10 streams x 6 rows)": rows_prefill,
    "blocks prefill (system, user, solver, auditor)": blocks_prefill,
    "interleaved order == block order": interleaved_order,
    "rows: prefill == row-by-row decode": rows_decode,
    "blocks: prefill == reference decode schedule": blocks_decode,
    "chunked prefill == one forward": chunked_prefill,
}


@pytest.mark.parametrize("case", CASES)
def test_parity(pair, case):
    assert CASES[case](*pair) <= TOL


# --- the parity tests above must catch real bugs: break the model, watch them fail ---


def test_parity_catches_wrong_diagonal(pair, monkeypatch):
    def no_self(q_ys, k_ys, offset=0):
        return stream_mask(q_ys, k_ys, offset) & ~(k_ys[:, None, None, :] == q_ys[:, None, :, None])
    monkeypatch.setattr(mask_module, "stream_mask", no_self)
    assert rows_prefill(*pair) > 1e-3


def test_parity_catches_flat_positions(pair, monkeypatch):
    tables = StreamRoPE.tables
    monkeypatch.setattr(StreamRoPE, "tables", lambda self, pos: tables(self, mx.broadcast_to(mx.arange(pos.shape[1]), pos.shape)))
    assert rows_prefill(*pair) > 1e-3


def test_parity_catches_missing_channel_embedding(pair):
    model = pair[0]
    weight = model.model.channel_embedding.weight
    model.model.channel_embedding.weight = mx.zeros_like(weight)
    try:
        assert rows_prefill(*pair) > 1e-3
    finally:
        model.model.channel_embedding.weight = weight

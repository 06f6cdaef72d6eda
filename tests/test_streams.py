# Copyright © 2026 mstream-mlx contributors.
"""The (channel, y) core: the mask rule against the reference test vectors
(the reference code's test vectors), layouts, positions and stream specs."""

import mlx.core as mx
import numpy as np
import pytest

from mstream_mlx.cache import StreamKVCache
from mstream_mlx.mask import make_mask, peer_mask, stream_mask
from mstream_mlx.streams import (
    Block,
    ChatTokens,
    StreamSpec,
    blocks_spec,
    blocks_to_flat,
    chat_blocks,
    rows_spec,
    rows_to_flat,
    timestep_order,
)


def grid(rows: str) -> np.ndarray:
    return np.array([[c == "1" for c in r] for r in rows.split()])


def full_mask(ys) -> np.ndarray:
    y = mx.array([ys])
    return np.array(stream_mask(y, y))[0, 0]


VECTORS = {
    # name: (y of each flat token, visibility rows)
    "TV-A block order": ([0, 1, 2, 0, 1, 2], "100000 110100 111110 000100 100110 110111"),
    "TV-B decode order": ([0, 0, 1, 1, 2, 2], "100000 010000 111000 110100 111110 111101"),
    "TV-C 3 streams": ([0, 1, 0, 1, 0, 1], "100000 111010 001000 101110 000010 101011"),
    "TV-C2 wait as y offset": ([0, 1, 2, 3, 2, 3], "100000 110000 111000 111110 110010 111011"),
    "TV-D generate_stream prefill": (
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8],
        "100000000000 110000000000 111000000000 111100000000 111110000000 "
        "111111000000 111111100000 111111110100 111111111110 111111000100 "
        "111111100110 111111110111",
    ),
    "rows 11.1 (C=3, R=3)": (
        [0, 0, 0, 1, 1, 1, 2, 2, 2],
        "100000000 010000000 001000000 111100000 111010000 111001000 "
        "111111100 111111010 111111001",
    ),
}


@pytest.mark.parametrize("name", VECTORS)
def test_mask_matches_reference_vectors(name):
    ys, rows = VECTORS[name]
    assert (full_mask(ys) == grid(rows)).all()


def test_decode_step_mask_against_cache():
    # §11.1: the cache holds rows 0-1, the step feeds row 2 (positions [2, 2, 2]).
    cache = StreamKVCache()
    cache.push_positions(mx.array([[0, 0, 0, 1, 1, 1]]))
    cache.offset = 6
    step = make_mask(mx.array([[2, 2, 2]]), cache)
    assert (np.array(step)[0, 0] == grid("111111100 111111010 111111001")).all()


def test_tv_d_decode_step_rows():
    # TV-D step 0: user and assistant fed at y = 9 after the 12-token prefill.
    cache = StreamKVCache()
    cache.push_positions(mx.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8]]))
    cache.offset = 12
    step = np.array(make_mask(mx.array([[9, 9]]), cache))[0, 0]
    assert (step == grid("11111111111110 11111111111101")).all()


def test_fast_path_equals_rule_and_out_of_order_keys_use_stored_y():
    cache = StreamKVCache()
    cache.push_positions(mx.array([[0, 3, 1, 2]]))
    cache.offset = 4
    new = mx.array([[2, 4]])
    got = np.array(make_mask(new, cache))[0, 0]
    # key y 3 is newer than the query at y 2: the stored y must hide it
    assert (got == grid("101010 111111")).all()
    older = mx.array([[5, 5]])
    fast = np.array(peer_mask(older, 4))
    rule = np.array(stream_mask(older, mx.array([[0, 3, 1, 2, 5, 5]]), 4))
    assert (fast == rule).all()


def test_rows_layout_positions_and_channels():
    flat = rows_to_flat(np.arange(100, 109).reshape(3, 3))
    assert flat.ids.tolist() == list(range(100, 109))
    assert flat.positions.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert flat.channels.tolist() == [0, 1, 2] * 3
    assert rows_to_flat([[1, 2]], first_row=7).positions.tolist() == [7, 7]
    with pytest.raises(ValueError, match="2-D"):
        rows_to_flat([1, 2, 3])


def test_blocks_layout_and_tv_d_prefill():
    chat = ChatTokens(im_start=1, im_end=2, newline=3, roles={"system": 4, "user": 5, "assistant": 6})
    blocks = chat_blocks(chat, system=[10, 11], user=[], heads=[[]], close_user=False)
    flat = blocks_to_flat(blocks)
    # TV-D: (cid, y) of the 12 prefill tokens
    assert flat.channels.tolist() == [0] * 6 + [1] * 3 + [2] * 3
    assert flat.positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8]
    assert flat.ids.tolist() == [1, 4, 3, 10, 11, 2, 1, 5, 3, 1, 6, 3]
    waited = blocks_to_flat([Block(1, [7, 8, 9, 10], 0), Block(2, [20, 21], 2)])
    assert waited.positions.tolist() == [0, 1, 2, 3, 2, 3]  # TV-C2


def test_timestep_order_is_stable_sort_by_y():
    assert timestep_order(np.array([0, 1, 2, 0, 1, 2])).tolist() == [0, 3, 1, 4, 2, 5]


def test_specs():
    rows = rows_spec(10, silence_token=481)
    assert rows.names[:2] == ("User", "Output") and rows.inputs == (0,)
    assert rows.outputs == tuple(range(1, 10))
    assert rows.index("output") == 1 and rows.index(3) == 3
    blocks = blocks_spec(5)
    assert blocks.names == ("system", "user", "assistant", "auditor", "assistant2")
    assert blocks.inputs == (0, 1)
    again = StreamSpec.from_config(rows.to_config(), 10)
    assert again == rows
    with pytest.raises(ValueError, match=r"Unknown stream 'Bogus'; the model defines User, Output"):
        rows.index("Bogus")
    with pytest.raises(ValueError, match="out of range"):
        rows.index(10)
    with pytest.raises(ValueError, match="Unknown layout 'grid'"):
        StreamSpec(("a",), (), "grid")
    with pytest.raises(ValueError, match="unique"):
        StreamSpec(("a", "A"), (), "rows")
    with pytest.raises(ValueError, match="names 3 streams but the channel embedding has 2"):
        StreamSpec.from_config({"channel_names": ["a", "b", "c"]}, 2)

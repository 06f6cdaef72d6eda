"""Tests of the PyTorch reference itself: masks vs the spec's test vectors, HF anchor, invariants."""

from __future__ import annotations

import json

import pytest
import torch

from .checkpoint import random_state_dict, write_reference_checkpoint
from .loops import Feed, blocks_generate, blocks_prefill_layout, rows_generate, rows_ramp, rows_user_cell
from .torch_model import RefModel, reference_device, stream_mask

torch.set_num_threads(2)
DEV = reference_device()
BASE = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            vocab_size=101, rms_norm_eps=1e-6, num_channels=5)
QWEN3 = dict(BASE, model_type="qwen3", head_dim=16, rope_theta=10000.0, tie_word_embeddings=True)
QWEN2 = dict(BASE, model_type="qwen2", hidden_size=64, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
             tie_word_embeddings=False)
IMS, IME, NL, SIL = 90, 91, 92, 93
ROLES = {"system": 94, "user": 95, "assistant": 96}


def make_model(cfg: dict, seed: int = 0) -> RefModel:
    model = RefModel(cfg)
    model.load_state_dict(random_state_dict(cfg, seed, std=0.1))
    return model.to(DEV).eval()


def run(model: RefModel, ids, cids, ys, mask=None, cache=None) -> torch.Tensor:
    t = lambda x: torch.tensor([x], device=DEV)  # noqa: E731
    with torch.no_grad():
        return model(t(ids), t(cids), t(ys), mask=mask, cache=cache)[0].float().cpu()


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """fp32 re-ordering noise scales with the logits (~50 with tied unit-variance embeddings)."""
    assert (got - want).abs().max() <= tol * max(1.0, float(want.abs().max()))


def parse(rows: str) -> torch.Tensor:
    """A mask written as lines of '1' (visible) and '.'/'0' (blocked); spaces ignored."""
    return torch.tensor([[ch == "1" for ch in line.replace(" ", "")] for line in rows.strip().splitlines()])


# --------------------------------------------------------------------------------- test vectors
BLOCK_VECTORS = {  # the blocks reference's test vectors: y per token, then the mask
    "TV-A": ([0, 1, 2, 0, 1, 2], "1.....\n11.1..\n11111.\n...1..\n1..11.\n11.111"),
    "TV-B": ([0, 0, 1, 1, 2, 2], "1.....\n.1....\n111...\n11.1..\n11111.\n1111.1"),
    "TV-C": ([0, 1, 0, 1, 0, 1], "1.....\n111.1.\n..1...\n1.111.\n....1.\n1.1.11"),
    "TV-C2": ([0, 1, 2, 3, 2, 3], "1.....\n11....\n111...\n11111.\n11..1.\n111.11"),
    "TV-D": ([0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8], """
        1...........
        11..........
        111.........
        1111........
        11111.......
        111111......
        1111111.....
        11111111.1..
        11111111111.
        111111...1..
        1111111..11.
        11111111.111"""),
    "sec7-11.1": ([0, 0, 0, 1, 1, 1, 2, 2, 2], """
        100000000
        010000000
        001000000
        111100000
        111010000
        111001000
        111111100
        111111010
        111111001"""),
}


@pytest.mark.parametrize("name", list(BLOCK_VECTORS))
def test_mask_vectors(name: str) -> None:
    ys, rows = BLOCK_VECTORS[name]
    y = torch.tensor(ys)
    assert torch.equal(stream_mask(y, y), parse(rows))


def test_mask_decode_steps() -> None:
    # TV-D decode step 0: user and assistant at y=9 after the 12-token prefill (y <= 8).
    prefill_y = torch.tensor(BLOCK_VECTORS["TV-D"][0])
    yk = torch.cat([prefill_y, torch.tensor([9, 9])])
    assert torch.equal(stream_mask(torch.tensor([9, 9]), yk), parse("1111111111111.\n111111111111.1"))
    # the rows reference's vector 11.1: the step feeding row 2 with rows 0-1 cached.
    yk = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert torch.equal(stream_mask(torch.tensor([2, 2, 2]), yk), parse("111111100\n111111010\n111111001"))
    # TV-D's layout is what blocks_prefill_layout builds (system of 2 tokens).
    feeds, y0, last = blocks_prefill_layout(system_ids=[1, 2], im_start=IMS, im_end=IME, newline=NL, role_ids=ROLES)
    assert [(f.cid, f.y) for f in feeds] == [(0, y) for y in range(6)] + [(1, 6), (1, 7), (1, 8), (2, 6), (2, 7), (2, 8)]
    assert [f.token for f in feeds][6:] == [IMS, 95, NL, IMS, 96, NL] and y0 == 6 and last == [11]


# ------------------------------------------------------------------------------------ HF anchor
@pytest.mark.parametrize("cfg", [QWEN3, QWEN2], ids=["qwen3-tied", "qwen2-untied"])
def test_matches_transformers(cfg: dict) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cls, config_cls = (Qwen3ForCausalLM, Qwen3Config) if cfg["model_type"] == "qwen3" else (Qwen2ForCausalLM, Qwen2Config)
    hf_cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "num_channels")}
    hf = cls(config_cls(**hf_cfg, attn_implementation="eager")).to(DEV).eval()
    sd = random_state_dict(cfg, 1, std=0.1)
    chan = sd.pop("model.channel_embedding.weight")
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ref = make_model(cfg, 1)
    ids = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(0)).to(DEV)
    with torch.no_grad():
        # 1. zero channel table, one stream, positions = arange: exactly plain causal Qwen.
        ref.model.channel_embedding.weight.zero_()
        pos = torch.arange(12, device=DEV)[None]
        ours = ref(ids, torch.zeros_like(ids), pos)
        assert (ours - hf(input_ids=ids).logits).abs().max() <= 1e-5
        # 2. multi-stream: HF with inputs_embeds = E[id] + C[c], position_ids = y, additive 4-D rule mask.
        ref.model.channel_embedding.weight.copy_(chan)
        ys = torch.tensor([[0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5]], device=DEV)
        cids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3]], device=DEV)
        additive = torch.zeros(1, 1, 12, 12, device=DEV).masked_fill(~stream_mask(ys, ys)[:, None], torch.finfo(torch.float32).min)
        embeds = hf.model.embed_tokens(ids) + chan.to(DEV)[cids]
        theirs = hf(inputs_embeds=embeds, position_ids=ys, attention_mask=additive).logits
        assert (ref(ids, cids, ys) - theirs).abs().max() <= 1e-5


def test_channels_and_mask_matter() -> None:
    """Guards against a test setup too weak to notice a dropped channel table or a wrong mask."""
    model = make_model(QWEN3)
    ids, cids, ys = [5, 6, 7, 8, 9, 10], [1, 1, 1, 2, 2, 2], [0, 1, 2, 0, 1, 2]
    base = run(model, ids, cids, ys)
    assert (base - run(model, ids, [0] * 6, ys)).abs().max() > 0.1
    diag = torch.eye(6, dtype=torch.bool, device=DEV)[None, None]  # the reference's broken 3-stream decode mask
    assert (base - run(model, ids, cids, ys, mask=diag)).abs().max() > 0.1


# ----------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("cfg", [QWEN3, QWEN2], ids=["qwen3", "qwen2"])
def test_block_order_equals_interleaved(cfg: dict) -> None:
    model = make_model(cfg)
    g = torch.Generator().manual_seed(3)
    # system (cid 0, y 0..2), then user / head0 / head1 blocks from y0 = 3 with different lengths.
    toks = [(0, y) for y in range(3)] + [(1, 3 + j) for j in range(5)] + [(2, 3 + j) for j in range(4)] + [(3, 3 + j) for j in range(3)]
    ids = torch.randint(0, 90, (len(toks),), generator=g).tolist()
    block = run(model, ids, [c for c, _ in toks], [y for _, y in toks])
    order = sorted(range(len(toks)), key=lambda i: (toks[i][1], toks[i][0]))  # interleaved by timestep
    inter = run(model, [ids[i] for i in order], [toks[i][0] for i in order], [toks[i][1] for i in order])
    assert_close(inter, block[order])


@pytest.mark.parametrize("cfg", [QWEN3, QWEN2], ids=["qwen3", "qwen2"])
def test_rows_prefill_equals_decode(cfg: dict) -> None:
    model, C, R = make_model(cfg), 4, 5
    ids = torch.randint(0, 90, (R, C), generator=torch.Generator().manual_seed(4)).tolist()
    flat = [t for row in ids for t in row]
    full = run(model, flat, list(range(C)) * R, [r for r in range(R) for _ in range(C)])
    cache = model.new_cache()
    steps = [run(model, ids[r], list(range(C)), [r] * C, cache=cache) for r in range(R)]
    assert cache.length == R * C
    assert_close(torch.cat(steps), full)


@pytest.mark.parametrize("heads", [1, 2])
def test_blocks_prefill_equals_decode(heads: int) -> None:
    model = make_model(dict(QWEN3, tie_word_embeddings=False) if heads == 1 else QWEN2)  # tied: echoes its input
    res = blocks_generate(model, system_ids=[1, 2, 3], user_ids=[10, 11, 12, 13], im_start=IMS, im_end=IME, newline=NL,
                          role_ids=ROLES, num_heads=heads, head_prefill_ids=[[20]] * heads if heads == 2 else None,
                          max_new_tokens=7, keep_logits=True)
    feeds = res.prefill + [f for step in res.steps for f in step]
    full = run(model, [f.token for f in feeds], [f.cid for f in feeds], [f.y for f in feeds])
    assert_close(torch.cat(res.logits), full)
    # Greedy: every token a head generated is the argmax of the full forward at its previous token.
    for h in range(heads):
        rows = [i for i, f in enumerate(feeds) if f.cid == 2 + h]
        assert full[rows].argmax(-1).tolist()[-len(res.tokens[h]):] == res.tokens[h]
        assert len(res.tokens[h]) == 7 or res.tokens[h][-1] == IME


# ---------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("fmt,shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cfg", [QWEN3, QWEN2], ids=["qwen3", "qwen2"])
def test_checkpoint_round_trip(tmp_path, cfg: dict, fmt: str, shards: int, dtype: torch.dtype) -> None:
    sd = random_state_dict(cfg, 5)
    folder = write_reference_checkpoint(tmp_path / "ckpt", dict(cfg, num_channels=99), sd, fmt=fmt, shards=shards, dtype=dtype)
    written = json.loads((folder / "config.json").read_text())
    assert written["architectures"] == ["Qwen3ForMultiStream" if cfg["model_type"] == "qwen3" else "Qwen2ForMultiStream"]
    assert written["torch_dtype"] == str(dtype)[6:] and written["model_type"] == cfg["model_type"]
    stem = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    if shards > 1:
        index = json.loads((folder / f"{stem}.index.json").read_text())
        assert len(set(index["weight_map"].values())) == shards and "total_size" in index["metadata"]
        assert ("lm_head.weight" in index["weight_map"]) == (not cfg["tie_word_embeddings"])
    else:
        assert (folder / stem).exists()
    model = RefModel.from_pretrained(folder, device=DEV)
    assert model.config.num_channels == 5  # from the weight's shape, not config.json's 99
    loaded = model.state_dict()
    assert set(loaded) == {k for k in sd if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")}
    for key, value in sd.items():
        if key in loaded:
            assert torch.equal(loaded[key].cpu(), value.to(dtype).float()), key


def test_from_pretrained_prefix_and_dropped_keys(tmp_path) -> None:
    sd = random_state_dict(QWEN3, 6)
    odd = {k.replace("model.", "model.language_model.", 1): v for k, v in sd.items()}
    odd["model.language_model.layers.0.self_attn.gate_in_norm.weight"] = torch.ones(48)
    odd["model.language_model.layers.0.self_attn.role_gating.net.weight"] = torch.ones(5, 48)
    folder = write_reference_checkpoint(tmp_path, QWEN3, odd, architectures=["Qwen3ForCausalLM"])
    model = RefModel.from_pretrained(folder, device="cpu")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


# ---------------------------------------------------------------------------------------- loops
class FakeModel:
    """Logits are a fixed function of each fed (token, cid, y); records every call and its mask."""

    device = torch.device("cpu")

    def __init__(self, logits_fn) -> None:
        self.logits_fn, self.calls = logits_fn, []

    def new_cache(self) -> dict:
        return {"y": torch.zeros(0, dtype=torch.long)}

    def __call__(self, ids, channels, positions, cache=None):
        cache["y"] = torch.cat([cache["y"], positions[0]])
        self.calls.append((ids[0].tolist(), channels[0].tolist(), positions[0].tolist(), stream_mask(positions[0], cache["y"])))
        return torch.stack([self.logits_fn(*f) for f in zip(*self.calls[-1][:3])])[None]


def row_logits(token: int, cid: int, y: int) -> torch.Tensor:
    out = torch.full((101,), -10.0)
    out[SIL], out[40 + cid] = 1.0, -0.5  # silence wins by 1.5 until the ramped penalty exceeds it
    return out


def test_rows_trace_11_4() -> None:
    C, U, seed = 3, [70, 71], [SIL, SIL, 80]
    fake = FakeModel(row_logits)
    res = rows_generate(fake, num_channels=C, silence=SIL, user_tokens=U, pre_think=1, seed_row=seed, max_rows=7)
    assert res.rows[0] == seed and [row[0] for row in res.rows] == [SIL, 70, 71, SIL, SIL, SIL, SIL, SIL]
    assert [s.ramp for s in res.steps] == pytest.approx([0, 0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert [rows_ramp(r, user_end=3) for r in range(1, 8)] == [s.ramp for s in res.steps]
    assert [rows_user_cell(r, user_tokens=U, pre_think=1, silence=SIL) for r in range(8)] == [row[0] for row in res.rows]
    # Output (ch 1) leaves silence once 10 * ramp > 1.5 (r=3); thinking (ch 2) has no penalty here.
    assert [row[1] for row in res.rows[1:]] == [SIL, SIL, 41, 41, 41, 41, 41] and {row[2] for row in res.rows[1:]} == {SIL}
    for r, (ids, cids, ys, mask) in enumerate(fake.calls, start=1):  # step r feeds row r-1 at pos r-1
        assert ids == res.rows[r - 1] and cids == [0, 1, 2] and ys == [r - 1] * 3
        assert torch.equal(mask, torch.cat([torch.ones(3, 3 * (r - 1), dtype=torch.bool), torch.eye(3, dtype=torch.bool)], 1))


def test_rows_stop_on_silence_and_prefill() -> None:
    fake = FakeModel(row_logits)
    res = rows_generate(fake, num_channels=3, silence=SIL, user_tokens=[70], seed_row=[SIL, SIL, 80], max_rows=9, silence_penalty=0)
    assert res.stopped_on_silence and len(res.rows) == 2 and len(res.steps) == 2  # row 2 all silence: not yielded
    prefill = [[1, 2, 3], [4, 5, 6]]
    res = rows_generate(FakeModel(row_logits), num_channels=3, silence=SIL, user_tokens=[70, 71], pre_think=1,
                        prefill_rows=prefill, max_rows=2)
    assert res.rows[:2] == prefill and res.rows[2][0] == 71 and res.rows[2][1:] == [SIL, SIL]  # U[P - pre_think]
    assert [s.position for s in res.steps] == [2, 3] and res.rows[3][0] == SIL


def test_rows_interactive() -> None:
    sends = {1: 70, 2: 71}
    fake = FakeModel(row_logits)
    res = rows_generate(fake, num_channels=3, silence=SIL, user_tokens=[], seed_row=[SIL, SIL, 80], max_rows=8,
                        user_at=sends.get)
    assert [row[0] for row in res.rows] == [SIL, 70, 71] + [SIL] * 6 and len(res.rows) == 9  # never stops on silence
    assert [call[0][0] for call in fake.calls] == [SIL, 70, 71] + [SIL] * 5  # the sent token is fed in its row
    assert [s.ramp for s in res.steps] == pytest.approx([0, 0, 0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_sampling_is_seeded() -> None:
    model = make_model(QWEN2)
    kw = dict(num_channels=3, silence=SIL, user_tokens=[70, 71], seed_row=[SIL, SIL, 80], max_rows=6, temperature=1.0, top_p=0.9)
    a, b = (rows_generate(model, generator=torch.Generator().manual_seed(7), **kw).rows for _ in range(2))
    assert a == b
    greedy = rows_generate(model, **dict(kw, temperature=0.0)).rows
    assert rows_generate(model, **dict(kw, top_k=1)).rows == greedy


def block_logits_fn(stop_at: dict[int, int]):
    """Head cid emits im_end once its fed token has y >= stop_at[cid]; otherwise echoes y as a token."""
    def fn(token: int, cid: int, y: int) -> torch.Tensor:
        out = torch.zeros(101)
        out[IME if y >= stop_at.get(cid, 10**6) else y % 50] = 1.0
        return out
    return fn


def test_blocks_schedule_tvf_and_multistream_stop() -> None:
    kw = dict(system_ids=[1, 2], user_ids=[10, 11, 12], im_start=IMS, im_end=IME, newline=NL, role_ids=ROLES)
    res = blocks_generate(FakeModel(block_logits_fn({})), max_new_tokens=5, **kw)
    y0 = res.y0
    assert y0 == 6 and res.tokens[0] == [8, 9, 10, 11, 12]  # g0 from the assistant "\n" at y0+2
    assert res.steps[0] == [Feed(10, 1, 9), Feed(8, 2, 9)]  # TV-F: u_t and g_t both at y0+3+t
    assert res.steps[3] == [Feed(IME, 1, 12), Feed(11, 2, 12)] and len(res.steps) == 4
    # 3 streams: user, head0 (2 prefill ids), head1; head1 emits im_end at y0+4 -> everything stops.
    fake = FakeModel(block_logits_fn({3: y0 + 4}))
    res = blocks_generate(fake, num_heads=2, head_prefill_ids=[[30, 31], []], max_new_tokens=20, **kw)
    assert res.steps[0] == [Feed(10, 1, 9), Feed(10, 2, 11), Feed(8, 3, 9)]  # user first, then heads in order
    assert res.tokens[1] == [8, 9, IME] and len(res.tokens[0]) == 3 and IME not in res.tokens[0]
    # Step 0's user query (y=9) must not see head0's prefill tail (y=9, 10): the rule, not "all cached".
    prefill_y = torch.tensor([f.y for f in res.prefill])
    assert torch.equal(fake.calls[1][3][0, :-3], prefill_y < 9) and not fake.calls[1][3][0, -2:].any()

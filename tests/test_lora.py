# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx lora`` / ``fuse``: learning, the output-only loss, exact resume,
fuse == adapters, QLoRA, full fine-tuning, config precedence and the CLI."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

import mstream_mlx
from mstream_mlx.cli.main import app
from mstream_mlx.tuner.adapters import prepare_model
from mstream_mlx.tuner.batching import collate
from mstream_mlx.tuner.datasets import (
    ExampleBuilder,
    StreamDataset,
    stream_weight_vector,
    targets_and_weights,
)
from mstream_mlx.tuner.losses import LongCE, StreamLoss, self_only_mask
from mstream_mlx.tuner.train import LoraArgs, resolve_args, run, train_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
DIGITS = list(range(369, 380))  # single tokens of the tiny tokenizer


def copy_task(loaded, n: int, seed: int) -> StreamDataset:
    """Rows, 3 streams: User says random digits; Output repeats them 2 rows later,
    Analytical 3 rows later (learnable only across streams: the mask lets (c, y) see
    every stream at y' < y)."""
    model, tok = loaded
    spec = model.streams
    b = ExampleBuilder(tok, spec, model.args.vocab_size)
    rng = np.random.default_rng(seed)
    s = spec.silence_token
    out = []
    for _ in range(n):
        u = rng.choice(DIGITS, 12).tolist()
        out.append(
            b.build(
                {
                    "streams": {
                        "User": u,
                        "Output": [s, s] + u[:10],
                        "Analytical": [s, s, s] + u[:9],
                    }
                }
            )
        )
    return StreamDataset(out, stream_weight_vector(spec))


@pytest.fixture(scope="module")
def rows3(tiny_checkpoint):
    return tiny_checkpoint("qwen3", "rows", num_channels=3)


@pytest.fixture(scope="module")
def blocks_ck(tiny_checkpoint):
    return tiny_checkpoint("qwen3", "blocks")


def quiet(*_):
    pass


def args_for(ck, tmp_path, **kw) -> LoraArgs:
    base = dict(
        model=str(ck),
        train=True,
        iters=8,
        batch_size=4,
        learning_rate=1e-3,
        steps_per_report=1,
        steps_per_eval=1000,
        num_layers=-1,
        warmup=0,
        adapter_path=str(tmp_path / "adapters"),
        save_every=4,
        lora_parameters={"rank": 4, "scale": 10.0, "dropout": 0.0},
    )
    base.update(kw)
    return LoraArgs(**base)


# --------------------------------------------------------------------------------- learning
def test_tiny_model_learns_a_multi_stream_copy_task(rows3, tmp_path):
    loaded = mstream_mlx.load(str(rows3))
    train, valid = copy_task(loaded, 256, 0), copy_task(loaded, 16, 1)
    args = args_for(
        rows3,
        tmp_path,
        iters=200,
        batch_size=8,
        steps_per_report=25,
        steps_per_eval=200,
        save_every=200,
        lora_parameters={"rank": 8, "scale": 20.0, "dropout": 0.0},
    )
    result = train_model(args, loaded[0], train, valid, log=quiet)
    first, last = result.val_history[0]["val_loss"], result.val_history[-1]["val_loss"]
    # stated bound: validation loss from > 10 (random tiny model) to < 0.2 in 200 steps
    assert first > 10 and last < 0.2, (first, last)
    assert result.history[-1]["train_loss"] < 0.2
    row = result.history[-1]
    assert row["tokens_per_second"] > 0 and row["peak_memory"] > 0 and "eta" in row


# --------------------------------------------------------------------------------- the loss
def _full_batch(loaded, data, idx):
    """A batch with per-position targets/weights (no gathering)."""
    ids, ch, pos, _, _, _ = collate(data, idx, len(idx), 2048, pad_to=1)
    T = ids.shape[1]
    tgt = np.zeros((len(idx), T), np.int32)
    w = np.zeros((len(idx), T), np.float32)
    for b, i in enumerate(idx):
        ex, t, ww = data.targets(i, 2048)
        tgt[b, : len(ex)], w[b, : len(ex)] = t, ww
    return ids, ch, pos, mx.zeros((len(idx), 0), mx.int32), tgt, w


def test_loss_ignores_input_streams(rows3):
    loaded = mstream_mlx.load(str(rows3))
    model = loaded[0]
    data = copy_task(loaded, 4, 2)
    ids, ch, pos, none, tgt, w = _full_batch(loaded, data, [0, 1])
    loss = StreamLoss(3)
    vg = nn.value_and_grad(model, loss)

    def run_(targets):
        (l, n), g = vg(model, ids, ch, pos, none, mx.array(targets), mx.array(w))
        return l, n, dict(tree_flatten(g))

    l0, n0, g0 = run_(tgt)
    user = np.array(ch) == 0
    assert (w[user] == 0).all() and n0.item() == (w > 0).sum()
    perturbed = tgt.copy()
    perturbed[user] = (perturbed[user] + 7) % 512  # every input-stream target changed
    l1, _, g1 = run_(perturbed)
    assert l1.item() == l0.item()
    assert all(mx.array_equal(g0[k], g1[k]).item() for k in g0)
    out = np.argwhere((np.array(ch) == 1) & (w > 0))[0]
    perturbed = tgt.copy()
    perturbed[tuple(out)] = (perturbed[tuple(out)] + 7) % 512  # one output target
    l2, _, g2 = run_(perturbed)
    assert l2.item() != l0.item()
    assert any(not mx.array_equal(g0[k], g2[k]).item() for k in g0)
    # the gathered batch (LM head on supervised tokens only) gives the same loss
    gathered = collate(data, [0, 1], 2, 2048, pad_to=1)
    assert gathered[3].shape[1] > 0
    lg, ng = loss(model, *gathered)
    assert abs(lg.item() - l0.item()) < 1e-5 and ng.item() == n0.item()


def test_self_only_mask_is_tv_c_without_cross_stream_edges():
    # TV-C: u0 u1 | s0 s1 | c0 c1; channels 1, 2, 3; y 0 1 0 1 0 1
    ch = mx.array([[1, 1, 2, 2, 3, 3]])
    ys = mx.array([[0, 1, 0, 1, 0, 1]])
    m = np.array(self_only_mask(ch, ys)[0, 0]).astype(int)
    want = np.eye(6, dtype=int)
    want[1, 0] = want[3, 2] = want[5, 4] = 1
    assert (m == want).all()
    m = np.array(self_only_mask(ch, ys, context=(1,))[0, 0]).astype(int)
    want[3, 0] = want[5, 0] = 1  # the context stream stays visible
    assert (m == want).all()


def test_long_ce(rows3):
    loaded = mstream_mlx.load(str(rows3))
    model = loaded[0]
    batch = collate(copy_task(loaded, 4, 3), [0, 1, 2], 3, 2048)
    plain = StreamLoss(3)(model, *batch)[0].item()
    model.train()
    neutral = StreamLoss(3, LongCE(gamma=1.0, clamp=True))(model, *batch)[0].item()
    assert abs(neutral - plain) < 1e-5  # every weight is min(exp(>=0), 1) = 1
    long_ce = StreamLoss(3, LongCE())
    reweighted = long_ce(model, *batch)[0].item()
    assert np.isfinite(reweighted) and abs(reweighted - plain) > 1e-4
    (_, _), g = nn.value_and_grad(model, long_ce)(model, *batch)
    assert all(np.isfinite(np.array(v)).all() for _, v in tree_flatten(g))
    model.eval()  # validation reports plain CE
    assert abs(long_ce(model, *batch)[0].item() - plain) < 1e-5


# --------------------------------------------------------------------------------- resume
def test_resume_reproduces_the_loss_curve(rows3, tmp_path):
    kw = dict(
        iters=8,
        save_every=4,
        grad_accumulation_steps=2,
        learning_rate=3e-3,
        warmup=2,
        lora_parameters={"rank": 4, "scale": 10.0, "dropout": 0.1},
    )

    def losses(result):
        return {r["iteration"]: r["train_loss"] for r in result.history}

    loaded = mstream_mlx.load(str(rows3))
    full = losses(
        train_model(
            args_for(rows3, tmp_path / "a", **kw),
            loaded[0],
            copy_task(loaded, 24, 0),
            None,
            log=quiet,
        )
    )

    class Crash(Exception):
        pass

    class CrashAt5:
        def on_train_loss_report(self, info):
            if info["iteration"] == 5:
                raise Crash()

        def on_val_loss_report(self, info):
            pass

    loaded = mstream_mlx.load(str(rows3))
    args = args_for(rows3, tmp_path / "b", **kw)
    with pytest.raises(Crash):
        train_model(
            args,
            loaded[0],
            copy_task(loaded, 24, 0),
            None,
            log=quiet,
            training_callback=CrashAt5(),
        )
    folder = Path(args.adapter_path)
    assert (folder / "0000004_adapters.safetensors").is_file()
    assert not list(folder.glob(".*"))  # atomic writes leave nothing behind

    loaded = mstream_mlx.load(str(rows3))
    args.resume_adapter_file = str(folder / "adapters.safetensors")
    resumed = losses(
        train_model(args, loaded[0], copy_task(loaded, 24, 0), None, log=quiet)
    )
    assert sorted(resumed) == [5, 6, 7, 8]
    for it in resumed:
        assert abs(resumed[it] - full[it]) < 1e-5, (it, resumed[it], full[it])


# --------------------------------------------------------------------------------- fuse
def _logits(model, batch):
    return model(batch[0], channels=batch[1], positions=batch[2])


def _example_batch(loaded, folder="blocks"):
    model, tok = loaded
    b = ExampleBuilder(tok, model.streams, model.args.vocab_size)
    lines = (EXAMPLES / folder / "test.jsonl").read_text().splitlines()
    data = StreamDataset(
        [b.build(json.loads(l)) for l in lines], stream_weight_vector(model.streams)
    )
    return collate(data, [0, 1], 2, 2048)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fuse_gives_the_adapters_logits(blocks_ck, tmp_path, kind):
    args = resolve_args(
        dict(
            model=str(blocks_ck),
            data=str(EXAMPLES / "blocks"),
            train=True,
            iters=6,
            batch_size=4,
            learning_rate=1e-2,
            steps_per_report=3,
            fine_tune_type=kind,
            num_layers=-1,
            adapter_path=str(tmp_path / "ad"),
        )
    )
    run(args, log=quiet)
    adapted, _ = mstream_mlx.load(str(blocks_ck), adapter_path=str(tmp_path / "ad"))
    base, _ = mstream_mlx.load(str(blocks_ck))
    from mstream_mlx.tuner.fuse import fuse

    fuse(str(blocks_ck), str(tmp_path / "ad"), str(tmp_path / "fused"), log=quiet)
    fused, tok = mstream_mlx.load(str(tmp_path / "fused"))
    batch = _example_batch((fused, tok))
    want, got, before = (
        _logits(adapted, batch),
        _logits(fused, batch),
        _logits(base, batch),
    )
    scale = mx.abs(want).max().item()
    assert mx.abs(got - want).max().item() < 1e-5 * scale
    assert (
        mx.abs(before - want).max().item() > 1e-3 * scale
    )  # the adapters did something
    # the trained channel embedding went into the fused folder
    ce = mx.load(str(tmp_path / "ad" / "adapters.safetensors"))[
        "model.channel_embedding.weight"
    ]
    assert mx.array_equal(fused.model.channel_embedding.weight, ce).item()
    assert (
        json.loads((tmp_path / "fused" / "config.json").read_text())["multistream"][
            "layout"
        ]
        == "blocks"
    )


def _quantized_folder(src: Path, dst: Path) -> Path:
    from mlx_lm.utils import quantize_model, save_config, save_model

    from mstream_mlx.utils import load_model

    model, config = load_model(src)
    model, config = quantize_model(
        model, config, 32, 4, quant_predicate=model.quant_predicate
    )
    save_model(dst, model)
    save_config(config, dst / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    return dst


def test_qlora_then_fuse_with_and_without_dequantize(blocks_ck, tmp_path):
    q = _quantized_folder(blocks_ck, tmp_path / "q4")
    args = resolve_args(
        dict(
            model=str(q),
            data=str(EXAMPLES / "blocks"),
            train=True,
            iters=4,
            batch_size=4,
            learning_rate=1e-2,
            num_layers=-1,
            adapter_path=str(tmp_path / "ad"),
        )
    )
    run(args, log=quiet)
    adapted, tok = mstream_mlx.load(str(q), adapter_path=str(tmp_path / "ad"))
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in adapted.named_modules())
    from mstream_mlx.tuner.fuse import fuse

    fuse(
        str(q), str(tmp_path / "ad"), str(tmp_path / "deq"), dequantize=True, log=quiet
    )
    deq, _ = mstream_mlx.load(str(tmp_path / "deq"))
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in deq.named_modules())
    batch = _example_batch((deq, tok))
    want = _logits(adapted, batch)
    assert (
        mx.abs(_logits(deq, batch) - want).max().item()
        < 1e-4 * mx.abs(want).max().item()
    )
    fuse(str(q), str(tmp_path / "ad"), str(tmp_path / "requant"), log=quiet)
    requant, _ = mstream_mlx.load(str(tmp_path / "requant"))
    assert "quantization" in json.loads(
        (tmp_path / "requant" / "config.json").read_text()
    )
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in requant.named_modules())
    with pytest.raises(ValueError, match="Full fine-tuning needs an unquantized model"):
        prepare_model(mstream_mlx.load(str(q))[0], "full", 1)


def test_full_fine_tune_and_channel_embedding_always_trained(blocks_ck, tmp_path):
    args = resolve_args(
        dict(
            model=str(blocks_ck),
            data=str(EXAMPLES / "blocks"),
            train=True,
            iters=3,
            batch_size=4,
            learning_rate=1e-3,
            fine_tune_type="full",
            num_layers=1,
            adapter_path=str(tmp_path / "full"),
        )
    )
    run(args, log=quiet)
    saved = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    assert "model.channel_embedding.weight" in saved
    assert any(k.startswith("model.layers.1.") for k in saved)
    assert not any(k.startswith("model.layers.0.") for k in saved)
    base, _ = mstream_mlx.load(str(blocks_ck))
    tuned, _ = mstream_mlx.load(str(blocks_ck), adapter_path=str(tmp_path / "full"))
    assert not mx.array_equal(
        base.model.channel_embedding.weight, tuned.model.channel_embedding.weight
    ).item()
    cfg = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "full" and cfg["multistream"]["num_channels"] == 3


def test_grad_checkpoint_same_losses_and_class_restored(rows3, tmp_path):
    loaded = mstream_mlx.load(str(rows3))
    layer_cls = type(loaded[0].layers[0])
    call = layer_cls.__call__
    a = train_model(
        args_for(rows3, tmp_path / "a", iters=3),
        loaded[0],
        copy_task(loaded, 12, 0),
        None,
        log=quiet,
    )
    loaded = mstream_mlx.load(str(rows3))
    b = train_model(
        args_for(rows3, tmp_path / "b", iters=3, grad_checkpoint=True),
        loaded[0],
        copy_task(loaded, 12, 0),
        None,
        log=quiet,
    )
    assert layer_cls.__call__ is call
    for x, y in zip(a.history, b.history):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-5


# --------------------------------------------------------------------------------- settings
def test_flags_over_yaml_over_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "batch_size: 7\niters: 9\nlearning_rate: 1e-4\n"
        "lora_parameters: {rank: 16, scale: 2.0}\nstream_weights: {Output: 2}\n"
    )
    args = resolve_args({"iters": 3, "lora_rank": None, "lora_dropout": 0.1}, str(cfg))
    assert (args.batch_size, args.iters, args.learning_rate) == (7, 3, 1e-4)
    assert args.lora_parameters == {"rank": 16, "scale": 2.0, "dropout": 0.1}
    assert args.max_seq_length == 2048 and args.stream_weights == {"Output": 2}
    (tmp_path / "bad.yaml").write_text("bach_size: 3\n")
    with pytest.raises(ValueError, match="Unknown setting.*bach_size"):
        resolve_args({}, str(tmp_path / "bad.yaml"))


def test_alpha_is_an_error_with_a_hint(blocks_ck, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_parameters: {rank: 8, alpha: 16}\n")
    args = resolve_args({}, str(cfg))
    with pytest.raises(
        ValueError, match="Found 'alpha' instead: mlx-lm's LoRA uses 'scale'"
    ):
        prepare_model(
            mstream_mlx.load(str(blocks_ck))[0], "lora", 2, args.lora_parameters
        )


def test_check_messages():
    with pytest.raises(ValueError, match="Nothing to do"):
        LoraArgs(model="m").check()
    with pytest.raises(
        ValueError, match="save_every .* multiple of grad_accumulation_steps"
    ):
        LoraArgs(model="m", train=True, save_every=5, grad_accumulation_steps=2).check()


# --------------------------------------------------------------------------------- CLI
def test_cli_lora_test_and_fuse(blocks_ck, tmp_path):
    ad, out = tmp_path / "ad", tmp_path / "fused"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "iters: 100\nbatch_size: 2\nsteps_per_report: 2\nsave_every: 2\n"
        "learning_rate: 1e-3\nnum_layers: -1\n"
    )
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "lora",
            "--model",
            str(blocks_ck),
            "--data",
            str(EXAMPLES / "chat"),
            "--train",
            "--test",
            "--iters",
            "4",
            "--adapter-path",
            str(ad),
            "--wait-k",
            "2",
            "--stream-weights",
            "assistant=2",
            "-c",
            str(cfg),
        ],
    )
    assert r.exit_code == 0, r.output
    assert (
        "Iter 4: Train loss" in r.output
        and "Tokens/sec" in r.output
        and "Peak mem" in r.output
    )
    assert "Test loss" in r.output
    assert sorted(p.name for p in ad.iterdir()) == [
        "0000002_adapters.safetensors",
        "0000004_adapters.safetensors",
        "adapter_config.json",
        "adapters.safetensors",
        "training_state.safetensors",
    ]
    saved = json.loads((ad / "adapter_config.json").read_text())
    assert saved["iters"] == 4 and saved["batch_size"] == 2 and saved["wait_k"] == 2
    r = runner.invoke(
        app,
        [
            "lora",
            "--model",
            str(blocks_ck),
            "--data",
            str(EXAMPLES / "chat"),
            "--test",
            "--adapter-path",
            str(ad),
        ],
    )
    assert r.exit_code == 0 and "Test loss" in r.output, r.output
    r = runner.invoke(
        app,
        [
            "fuse",
            "--model",
            str(blocks_ck),
            "--adapter-path",
            str(ad),
            "--save-path",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    fused, _ = mstream_mlx.load(str(out))
    r = runner.invoke(
        app,
        [
            "fuse",
            "--model",
            str(blocks_ck),
            "--adapter-path",
            str(ad),
            "--save-path",
            str(out),
        ],
    )
    assert r.exit_code == 1 and "already exists; pass --force" in r.output


def test_cli_reports_data_errors(blocks_ck, tmp_path):
    (tmp_path / "train.jsonl").write_text(
        '{"user": "one", "assistant": "two"}\n{"user": 1, "assistant": "x"}\n'
    )
    r = CliRunner().invoke(
        app,
        [
            "lora",
            "--model",
            str(blocks_ck),
            "--data",
            str(tmp_path),
            "--train",
            "--iters",
            "1",
        ],
    )
    assert r.exit_code == 1
    assert f"Error: {tmp_path / 'train.jsonl'}:2: 'user' must be a string" in r.output
    r = CliRunner().invoke(
        app,
        [
            "lora",
            "--model",
            str(blocks_ck),
            "--data",
            str(tmp_path),
            "--train",
            "--iters",
            "1",
            "--stream-weights",
            "user=3",
        ],
    )
    assert r.exit_code == 1 and "'user' is an input stream" in r.output


def test_example_config_resolves():
    args = resolve_args({}, str(EXAMPLES / "lora_config.yaml"))
    assert args.learning_rate == 1e-4 and args.lora_parameters["scale"] == 20.0
    assert (
        args.optimizer_config == {"adamw": {"weight_decay": 0.01}} and args.wait_k == 2
    )
    args.check()


def test_progress_rich_and_plain_lines():
    from mstream_mlx.tuner.train import Progress

    info = {
        "iteration": 10,
        "train_loss": 1.5,
        "learning_rate": 1e-4,
        "iterations_per_second": 2.0,
        "tokens_per_second": 50.0,
        "trained_tokens": 500,
        "peak_memory": 0.25,
    }
    lines = []
    ui = Progress(100, start=20, tokens=lambda: 4000, log=lines.append, rich=False)
    with ui:
        ui.advance()
        ui.on_train_loss_report(info)
        ui.on_val_loss_report({"iteration": 10, "val_loss": 1.25, "val_time": 0.5})
    assert lines[0] == (
        "Iter 30: Train loss 1.500, Learning Rate 1.000e-04, It/sec 2.000, "
        "Tokens/sec 800.0, Trained Tokens 500, Peak mem 0.250 GB, ETA 0:00:35"
    )
    assert lines[1] == "Iter 30: Val loss 1.250, Val took 0.500s"
    ui = Progress(100, tokens=lambda: 4000, rich=True)
    with ui:
        ui.advance()
        ui.on_train_loss_report(info)
    assert ui.history[0]["eta"] == 45.0


@pytest.mark.slow
def test_benchmark_runs():
    from mstream_mlx.benchmarks.lora import run_bench, table

    rows = run_bench(
        hidden=64,
        layers=2,
        vocab=512,
        seq=160,
        batch=2,
        steps=2,
        warmup=1,
        rounds=1,
        log=quiet,
    )
    assert len(rows) == 4 and all(tps > 0 and peak > 0 for _, tps, peak, _ in rows)
    assert "| mstream rows (10 streams) |" in table(rows, "test", "tiny")

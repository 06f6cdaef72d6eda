# Copyright © 2026 mstream-mlx contributors.
"""LoRA training throughput: multi-stream vs ``mlx_lm.lora``, side by side.

One model shape, one token budget per step (batch x length), one trainer (mlx-lm's
compiled ``train``).  The baseline is mlx-lm's own Qwen3 with its default loss and
batching on single-stream sequences of the same length; the others are our Qwen3 on
rows (paper §7, 10 streams) and blocks (paper §5, system + user + assistant) data,
with and without Long-CE.  Reports tokens/s (every token fed to the model) and peak
memory (docs/benchmarks.md).

    python -m mstream_mlx.benchmarks.lora --hidden 512 --layers 8 --seq 480 --batch 2
"""

import argparse
import contextlib
import os
import platform
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3 as lm_qwen3
from mlx_lm.tuner import trainer as lm_trainer
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..models import qwen3
from ..streams import rows_spec
from ..tuner.batching import BatchIterator
from ..tuner.datasets import Example, StreamDataset, stream_weight_vector
from ..tuner.losses import LongCE, StreamLoss

LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}


def model_config(hidden: int, layers: int, vocab: int, channels: int) -> dict:
    heads = max(1, hidden // 64)
    return {
        "model_type": "qwen3",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 3 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "rope_theta": 1e6,
        "tie_word_embeddings": True,
        "num_channels": channels,
        "max_position_embeddings": 32768,
    }


class _Timer(TrainingCallback):
    def __init__(self):
        self.its = []

    def on_train_loss_report(self, info):
        self.its.append(info["iterations_per_second"])


def _lora(model):
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), LORA)
    if hasattr(model.model, "channel_embedding"):
        model.model.channel_embedding.unfreeze()
    mx.eval(model.parameters())
    return model


def _nbytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _train(model, data, loss, iterate, batch: int, seq: int, steps: int, warmup: int):
    """Seconds of each timed step, and the peak memory of this run in bytes (the
    model's weights plus what training allocated, whatever else is resident)."""
    timer = _Timer()
    mx.clear_cache()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    # mlx-lm's train() draws its own progress UI on stdout (it has no hook to replace
    # it); the numbers come from its training_callback hook, so the UI goes nowhere
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        with tempfile.TemporaryDirectory() as tmp:
            args = lm_trainer.TrainingArgs(
                batch_size=batch,
                iters=warmup + steps,
                steps_per_report=1,
                steps_per_eval=10**9,
                steps_per_save=10**9,
                max_seq_length=seq + 1,
                adapter_file=str(Path(tmp) / "a.safetensors"),
            )
            kw = {} if loss is None else {"loss": loss, "iterate_batches": iterate}
            lm_trainer.train(
                model,
                optim.AdamW(1e-5),
                data,
                None,
                args=args,
                training_callback=timer,
                **kw,
            )
    peak = mx.get_peak_memory() - resident + _nbytes(model)
    return [1 / s for s in timer.its[warmup:]], peak


def rows_examples(n: int, seq: int, channels: int, vocab: int, rng) -> list:
    R = seq // channels
    ids = rng.integers(0, vocab, (n, R * channels))
    ch = np.tile(np.arange(channels), R)
    y = np.repeat(np.arange(R), channels)
    return [
        Example(i.astype(np.int32), ch.astype(np.int32), y.astype(np.int32), ch != 0)
        for i in ids
    ]


def blocks_examples(n: int, seq: int, vocab: int, rng) -> list:
    sys_len = 8
    user = (seq - sys_len) // 2
    head = seq - sys_len - user
    ch = np.array([0] * sys_len + [1] * user + [2] * head, np.int32)
    y = np.array(
        list(range(sys_len))
        + list(range(sys_len, sys_len + user))
        + list(range(sys_len, sys_len + head)),
        np.int32,
    )
    labels = ch == 2
    labels[sys_len + user : sys_len + user + 3] = False  # the assistant prefix
    return [
        Example(rng.integers(0, vocab, seq).astype(np.int32), ch, y, labels)
        for _ in range(n)
    ]


def run_bench(
    hidden=512,
    layers=8,
    vocab=32768,
    seq=480,
    batch=2,
    steps=3,
    warmup=1,
    rounds=3,
    channels=10,
    log=print,
) -> list:
    """Rows of ``(name, tokens/s, peak bytes, supervised tokens per row)``.

    The runs take turns for ``rounds`` rounds and each keeps its fastest step, so
    load from other processes on a shared machine hurts every run alike.
    """
    rng = np.random.default_rng(0)
    n = batch * (warmup + steps)
    runs = []  # (name, model, data, loss, iterate, tokens per row, supervised per row)

    # mlx-lm: its Qwen3, default loss and batching; sequences of `seq` + 1 tokens
    # (the loss shifts by one, so each row feeds `seq` tokens, as ours do)
    base = lm_qwen3.Model(
        lm_qwen3.ModelArgs.from_dict(model_config(hidden, layers, vocab, 1))
    )
    data = [(rng.integers(0, vocab, seq + 1).tolist(), 0) for _ in range(n)]
    runs.append(
        (
            "mlx-lm lora (1 stream, default loss)",
            _lora(base),
            data,
            None,
            None,
            seq,
            seq,
        )
    )
    cases = [
        (f"mstream rows ({channels} streams)", "rows", None),
        ("mstream blocks (system+user+assistant)", "blocks", None),
        (f"mstream rows ({channels} streams) + Long-CE", "rows", LongCE()),
    ]
    for name, layout, long_ce in cases:
        C = channels if layout == "rows" else 3
        cfg = model_config(hidden, layers, vocab, C)
        if layout == "rows":
            cfg["multistream"] = rows_spec(C).to_config()
            examples = rows_examples(n, seq, C, vocab, rng)
        else:
            examples = blocks_examples(n, seq, vocab, rng)
        model = _lora(qwen3.Model(qwen3.ModelArgs.from_dict(cfg)))
        ds = StreamDataset(examples, stream_weight_vector(model.streams))
        tokens = len(examples[0])
        sup = int((ds.targets(0, tokens)[2] > 0).sum())
        loss = StreamLoss(C, long_ce, (0,) if layout == "blocks" else ())
        runs.append((name, model, ds, loss, BatchIterator(pad_to=32), tokens, sup))

    best = {r[0]: (float("inf"), 0) for r in runs}
    for k in range(rounds):
        for name, model, data, loss, iterate, tokens, _ in runs:
            secs, peak = _train(model, data, loss, iterate, batch, seq, steps, warmup)
            best[name] = (min(best[name][0], min(secs)), max(best[name][1], peak))
            log(
                f"round {k + 1}/{rounds} {name}: {batch * tokens / min(secs):,.0f} tokens/s"
            )
    return [
        (name, batch * tokens / best[name][0], best[name][1], sup)
        for name, _, _, _, _, tokens, sup in runs
    ]


def table(rows, machine: str, shape: str) -> str:
    lines = [
        f"Machine: {machine}",
        f"Model: {shape}",
        "",
        "| run | tokens/s | vs mlx-lm | peak memory | loss tokens/row |",
        "|---|---:|---:|---:|---:|",
    ]
    base = rows[0][1]
    for name, tps, peak, sup in rows:
        lines.append(
            f"| {name} | {tps:,.0f} | {tps / base:.2f}x | {peak / 2**20:,.0f} MiB | {sup} |"
        )
    return "\n".join(lines)


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, MLX {mx.__version__} ({mx.default_device()})"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=480, help="tokens per row (all runs)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="turns each run takes")
    p.add_argument("--channels", type=int, default=10, help="streams of the rows runs")
    a = p.parse_args()
    t = time.time()
    rows = run_bench(
        a.hidden,
        a.layers,
        a.vocab,
        a.seq,
        a.batch,
        a.steps,
        a.warmup,
        a.rounds,
        a.channels,
    )
    shape = (
        f"Qwen3 shape, hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, fp32; "
        f"LoRA rank 8 on all layers; batch {a.batch} x {a.seq} tokens; "
        f"fastest step of {a.rounds} interleaved rounds x {a.steps} steps"
    )
    print(table(rows, machine_name(), shape))
    print(f"\n({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()

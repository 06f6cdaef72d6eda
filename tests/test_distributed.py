# Copyright © 2026 mstream-mlx contributors.
"""Data-parallel ``lora`` and sharded Qwen3 over ``mx.distributed``: real processes
on this machine, talking over the ring backend on 127.0.0.1.

Every 2-process test starts real ranks (``mlx.launch``, or ``MLX_RANK`` +
``MLX_HOSTFILE`` by hand where a test must signal one rank), each under a subprocess
timeout, so a hang fails the test instead of the suite.  This file is also the
worker of the sharding test: ``python -m tests.test_distributed shard FOLDER``.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = str(Path(sys.executable).parent / "mlx.launch")
CLI = [sys.executable, "-m", "mstream_mlx.cli.main"]
DISTRIBUTED = ROOT / "mstream_mlx" / "tuner" / "distributed.py"
WORDS = "one two three four five six seven eight nine zero plus minus so then".split()


# ----------------------------------------------------------------------------- helpers
def _env(**extra) -> dict:
    # one BLAS thread per rank: two ranks on two cores, no oversubscription
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (mlx.launch takes p, p + 1)."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
            return p
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def _hostfile(folder: Path) -> Path:
    """The ring backend's own hostfile (what mlx.launch writes for the ranks)."""
    p = _free_port_pair()
    path = folder / "ring.json"
    path.write_text(json.dumps([[f"127.0.0.1:{p}"], [f"127.0.0.1:{p + 1}"]]))
    return path


class Rank:
    """One rank started by hand; its output is collected by a thread."""

    def __init__(self, rank: int, cmd, hostfile: Path, cwd: Path):
        env = _env(MLX_RANK=rank, MLX_HOSTFILE=hostfile)
        self.proc = subprocess.Popen(
            [str(c) for c in cmd],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float):
        end = time.monotonic() + timeout
        while text not in self.output:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"no {text!r} in time:\n{self.output}")
            time.sleep(0.1)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _lora(model, data, adapters, *extra):
    return [
        *CLI,
        "lora",
        "--model",
        str(model),
        "--data",
        str(data),
        "--adapter-path",
        str(adapters),
        "--num-layers",
        "-1",
        "--wait-k",
        "1",
        *map(str, extra),
    ]


def _train_losses(text: str):
    return [
        float(x.split("Train loss ")[1].split(",")[0])
        for x in text.splitlines()
        if "Train loss" in x
    ]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("qwen3", "blocks")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Chat data whose answers have 1 to 12 words: the ranks of a step hold different
    numbers of supervised tokens, which is where a mean of per-rank means would
    differ from the mean over the whole batch."""
    folder = tmp_path_factory.mktemp("chat")
    rng = np.random.default_rng(0)

    def line():
        q = " ".join(rng.choice(WORDS, 4))
        a = " ".join(rng.choice(WORDS, int(rng.integers(1, 13))))
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return json.dumps({"messages": msgs})

    # valid: a short last batch; test: one example, so rank 1's share is empty
    for name, n in (("train", 16), ("valid", 3), ("test", 1)):
        (folder / f"{name}.jsonl").write_text(
            "\n".join(line() for _ in range(n)) + "\n"
        )
    return folder


# -------------------------------------------------------- data sharding (in process)
class _Group:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def _dataset(n=11):
    from mstream_mlx.tuner.datasets import Example, StreamDataset

    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        L = int(rng.integers(3, 9))
        ids = rng.integers(5, 50, L).astype(np.int32)
        ch = np.arange(L, dtype=np.int32) % 2
        pos = np.arange(L, dtype=np.int32) // 2
        out.append(Example(ids, ch, pos, np.ones(L, bool)))
    return StreamDataset(out, np.ones(2, np.float32))


def _rows(batch):
    """The real examples of a batch, as tuples of token ids (order-free)."""
    ids, _, _, _, _, w = (np.array(a) for a in batch)
    return {tuple(r[: int((r != 0).sum())]) for r, ww in zip(ids, w) if ww.any()}


@pytest.mark.parametrize("loop", [True, False])
def test_each_rank_reads_its_share_of_the_global_batch(loop):
    from mstream_mlx.tuner.batching import BatchIterator

    data, steps = _dataset(), 5
    one = BatchIterator(seed=3)(data, 4, 64, loop=loop, comm_group=_Group(0, 1))
    shards = [
        BatchIterator(seed=3)(data, 4, 64, loop=loop, comm_group=_Group(r, 2))
        for r in range(2)
    ]
    for _, whole, a, b in zip(range(steps), one, *shards):
        assert a[0].shape[0] == b[0].shape[0] == 2  # batch 4 = 2 ranks x 2
        assert _rows(a) | _rows(b) == _rows(whole) and not _rows(a) & _rows(b)


def test_a_rank_with_no_examples_gets_an_empty_batch():
    from mstream_mlx.tuner.batching import collate

    ids, ch, pos, index, tgt, w = collate(_dataset(), [], 2, 64)
    assert ids.shape[0] == 2 and not np.array(w).any()


def _with_distributed_module(code: str, timeout: float, **env):
    """Run ``code`` in a fresh interpreter with ``mstream_mlx/tuner/distributed.py``
    loaded as ``d`` (on its own: only mlx is imported, so it starts fast)."""
    load = (
        "import importlib.util, time\n"
        f"spec = importlib.util.spec_from_file_location('d', {str(DISTRIBUTED)!r})\n"
        "d = importlib.util.module_from_spec(spec); spec.loader.exec_module(d)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", load + code],
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_watchdog_lets_a_petted_rank_live():
    code = "with d.Watchdog(1.0, 0) as dog:\n    for _ in range(15):\n"
    code += "        time.sleep(0.2); dog.pet()\nprint('alive')"
    r = _with_distributed_module(code, 60)
    assert r.returncode == 0 and "alive" in r.stdout, r.stderr


def test_a_missing_peer_ends_start_up_with_one_line(tmp_path):
    """Rank 0 of the ring backend waits forever in ``mx.distributed.init`` (which
    holds the GIL) for a peer that never connects: ``init_world`` ends it."""
    tic = time.monotonic()
    r = _with_distributed_module(
        "d.init_world(2)", 60, MLX_RANK=0, MLX_HOSTFILE=_hostfile(tmp_path)
    )
    assert r.returncode == -signal.SIGTERM and time.monotonic() - tic < 30
    assert "Error: rank 0: no progress for 2 s during start-up" in r.stderr, r.stderr


# ---------------------------------------------------------------- 2 real processes
def test_two_ranks_train_as_one_rank_with_the_whole_batch(model, data, tmp_path):
    """``mstream-mlx lora`` under ``mlx.launch -n 2 --backend ring`` with
    ``--batch-size 4`` (2 examples per rank) == one process with ``--batch-size 4``.

    Tolerance: both runs do the same arithmetic on the same examples per step, but
    with other matmul shapes (2 vs 4 rows, per-rank padding) and the gradient sum
    split in two by ``all_sum``, so fp32 rounding differs (~1e-7 relative per op).
    After 6 SGD steps the adapters differed by 8e-7 (weights ~1.3) and the loss by
    1.4e-7 relative (measured); we allow 1e-5 on both.  The mean of per-rank means
    (mlx-lm's trainer without :class:`GlobalMeanLoss`) missed by 8e-2 on the weights
    and 8% on the loss on this data.  SGD, because its weight error is linear in the
    gradient error: AdamW's first steps divide each gradient component by its own
    size, so components whose gradient is ~0 move by +-lr with a rounding-decided
    sign (the loss still agreed to 5e-5 relative after 6 AdamW steps).
    """
    flags = ("--train", "--test", "--iters", 6, "--batch-size", 4, "--save-every", 3)
    flags += ("--steps-per-report", 2, "--steps-per-eval", 3, "--seed", 7)
    flags += (
        "--optimizer",
        "sgd",
        "--learning-rate",
        0.01,
        "--lr-schedule",
        "constant",
    )
    run = dict(env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    one = subprocess.Popen(_lora(model, data, tmp_path / "one", *flags), **run)
    port = _free_port_pair()
    launch = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(port)]
    two = subprocess.Popen(
        launch + ["--", *_lora(model, data, tmp_path / "two", *flags)], **run
    )
    try:
        out1 = one.communicate(timeout=180)[1]
        out = "".join(two.communicate(timeout=180))
    finally:
        one.kill(), two.kill()
    assert one.returncode == 0, out1
    assert two.returncode == 0, out
    # only rank 0 prints; the effective batch and learning rate are reported
    assert out.count("Iter 6: Train loss") == 1 and out.count("Test loss") == 1, out
    assert (
        "Data parallel: 2 processes, 2 examples each per step; effective batch 4" in out
    )
    assert "learning rate 0.01 (not scaled" in out
    # the same files, written by one process
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert out.count("Saved final weights") == 1
    # the same training
    l1, l2 = _train_losses(out1), _train_losses(out)
    assert len(l1) == len(l2) == 3 and np.allclose(l1, l2, atol=1.5e-3), (l1, l2)
    a = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    diff = max(mx.abs(a[k] - b[k]).max().item() for k in a)
    assert diff < 1e-5, diff
    losses = [_loss_after(model, data, tmp_path / d) for d in ("one", "two")]
    assert abs(losses[0] - losses[1]) <= 1e-5 * losses[0], losses


def _loss_after(model, data, adapters) -> float:
    """Training-set loss of the model with these adapters (in this process)."""
    import mstream_mlx
    from mstream_mlx.tuner.datasets import DataOptions, load_datasets
    from mstream_mlx.tuner.train import LoraArgs, evaluate_model

    m, tok = mstream_mlx.load(str(model), adapter_path=str(adapters))
    sets = load_datasets(
        str(data),
        tok,
        m.streams,
        m.args.vocab_size,
        DataOptions(wait_k=1),
        {},
        ["train"],
    )
    return evaluate_model(LoraArgs(batch_size=4), m, sets["train"], -1)


def test_a_killed_rank_stops_the_other_with_a_clear_error(model, data, tmp_path):
    """Two ranks, each in its own folder with a relative --adapter-path (as two Macs
    with their own disks): rank 1 writes nothing; then rank 0 is killed mid-run and
    rank 1 exits with one line, quickly, instead of waiting forever."""
    hostfile = _hostfile(tmp_path)
    cwds = [tmp_path / "rank0", tmp_path / "rank1"]
    cmd = _lora(
        model, data, "adapters", "--train", "--iters", 100000, "--batch-size", 4
    )
    cmd += ["--save-every", 2, "--steps-per-report", 1, "--steps-per-eval", 100000]
    ranks = []
    try:
        for r, cwd in enumerate(cwds):
            cwd.mkdir()
            ranks.append(Rank(r, cmd, hostfile, cwd))
        ranks[0].wait_for("Iter 4: Saved adapter weights", timeout=120)
        assert (cwds[0] / "adapters" / "0000004_adapters.safetensors").is_file()
        assert not (cwds[1] / "adapters").exists()  # rank 1 passed 2 saves, wrote none
        assert ranks[1].output == ""  # and printed nothing
        ranks[0].proc.send_signal(signal.SIGKILL)
        tic = time.monotonic()
        rc = ranks[1].wait(timeout=60)
        took = time.monotonic() - tic
    finally:
        for r in ranks:
            r.kill()
    out = ranks[1].output
    assert rc == 1 and "Error: rank 1 of 2: lost a peer" in out, out
    assert "Traceback" not in out and took < 30, (took, out)


@pytest.mark.slow
def test_a_stuck_rank_stops_the_other_after_dist_timeout(model, data, tmp_path):
    """A peer that is alive but stuck (here SIGSTOP; a sleeping Mac, a pulled cable)
    gives the ring backend no error: the watchdog ends rank 0 after dist_timeout."""
    hostfile = _hostfile(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dist_timeout: 4\n")
    cmd = _lora(model, data, tmp_path / "ad", "--train", "--iters", 100000)
    cmd += ["--batch-size", 4, "--steps-per-report", 1, "--steps-per-eval", 100000]
    cmd += ["--save-every", 1000, "-c", cfg]
    ranks = []
    try:
        ranks = [Rank(r, cmd, hostfile, tmp_path) for r in range(2)]
        ranks[0].wait_for("Iter 3: Train loss", timeout=120)
        ranks[1].proc.send_signal(signal.SIGSTOP)
        tic = time.monotonic()
        rc = ranks[0].wait(timeout=60)
        took = time.monotonic() - tic
    finally:
        for r in ranks:
            r.kill()
    out = ranks[0].output
    assert rc == -signal.SIGTERM and "Error: rank 0: no progress for 4 s" in out, out
    assert 4 <= took < 20, took


@pytest.mark.slow
def test_same_seed_same_adapters_on_two_ranks(model, data, tmp_path):
    """--seed fixes everything for a given world size: two 2-rank runs agree bit for
    bit (LoRA init, data order and dropout come from the seed, step and rank)."""
    flags = ("--train", "--iters", 4, "--batch-size", 4, "--seed", 3)
    flags += ("--lora-dropout", 0.1, "--steps-per-eval", 1000)
    for name in ("a", "b"):
        port = _free_port_pair()
        r = subprocess.run(
            [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(port)]
            + ["--", *_lora(model, data, tmp_path / name, *flags)],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0, r.stdout + r.stderr
    a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_sharded_qwen3_gives_the_logits_of_the_whole_model(model, tmp_path):
    """``Model.shard()`` over 2 ranks: same logits as the unsharded model, with and
    without a cache, and the same sampled generation; and a rank that starts from
    other weights is refused."""
    hostfile = _hostfile(tmp_path)
    cmd = [sys.executable, "-m", "tests.test_distributed", "shard", str(model)]
    ranks = [Rank(r, cmd, hostfile, ROOT) for r in range(2)]
    try:
        codes = [r.wait(timeout=120) for r in ranks]
    finally:
        for r in ranks:
            r.kill()
    for r, rc in enumerate(codes):
        assert rc == 0 and f"rank {r}: shard OK" in ranks[r].output, ranks[r].output


def test_shard_refuses_qwen3_5_with_a_clear_error():
    from mstream_mlx.models.qwen3_5 import Model, ModelArgs
    from tests.test_qwen3_5 import tiny_config

    with pytest.raises(NotImplementedError, match="supports Qwen3 and Qwen2"):
        Model(ModelArgs.from_dict(tiny_config())).shard()


def _shard_worker(folder: str):
    import mstream_mlx
    from mstream_mlx.tuner.distributed import check_same_start, init_world

    world = init_world(60)
    whole, tok = mstream_mlx.load(folder)
    model, _ = mstream_mlx.load(folder, lazy=True)
    model.shard(world.group)
    mx.eval(model.parameters())
    q = model.layers[0].self_attn.q_proj.weight
    assert q.shape[0] * 2 == whole.layers[0].self_attn.q_proj.weight.shape[0]

    L = 12  # blocks of 3 channels, 4 timesteps
    rng = np.random.default_rng(0)
    ids = mx.array(rng.integers(5, 400, (2, L)), mx.int32)
    ch = mx.array(np.tile(np.arange(L) % 3, (2, 1)), mx.int32)
    pos = mx.array(np.tile(np.arange(L) // 3, (2, 1)), mx.int32)
    want = whole(ids, channels=ch, positions=pos)
    got = model(ids, channels=ch, positions=pos)
    assert mx.abs(got - want).max().item() < 1e-4
    cache = model.make_cache()
    first = model(ids[:, :9], channels=ch[:, :9], positions=pos[:, :9], cache=cache)
    last = model(ids[:, 9:], channels=ch[:, 9:], positions=pos[:, 9:], cache=cache)
    assert mx.abs(mx.concatenate([first, last], 1) - want).max().item() < 1e-4

    # generation: every rank runs the same Session steps; a hot, seeded sampler
    # (the random tiny model's greedy answer is one token repeated)
    from mstream_mlx.generate import generate
    from mstream_mlx.sample import SamplingSettings

    hot = SamplingSettings(temp=20.0, seed=5)
    ask = dict(prompt="what is one plus two", max_tokens=8, sampling=hot)
    text = generate(model, tok, **ask)
    assert text == generate(whole, tok, **ask) and len(set(text["assistant"])) > 3

    check_same_start(world, whole)  # same weights everywhere: passes
    if world.rank == 1:
        w = whole.model.norm.weight
        whole.model.norm.weight = w + 1.0
    try:
        check_same_start(world, whole)
        raise AssertionError("different weights on rank 1 were not noticed")
    except ValueError as e:
        assert str(e).startswith("Rank 1 starts with different model weights"), e
    print(f"rank {world.rank}: shard OK", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["shard"]:
        _shard_worker(sys.argv[2])

# Copyright © 2026 mstream-mlx contributors.
"""Data-parallel fine-tuning on ``mx.distributed`` (launched with ``mlx.launch``).

mlx-lm's ``trainer.train`` already does the data-parallel part: it asks
``iterate_batches`` for this rank's share of each global batch (our
:class:`.batching.BatchIterator` takes every ``size``-th example), averages the
gradients with ``average_gradients`` (an ``all_sum`` / N) and all-sums the reported
losses.  This module adds what a multi-machine run needs on top:

* :class:`GlobalMeanLoss`: each rank's loss is its own token mean, so averaging the
  gradients gives the mean of the per-rank means.  When the ranks hold different
  numbers of supervised tokens (multi-stream examples differ a lot) that is not the
  gradient of the whole batch.  Rescaling each rank's loss by
  ``N * own tokens / all tokens`` makes the averaged gradient (and the reported
  loss) the token mean over the global batch: 2 ranks x batch b == 1 rank x 2b.
* :class:`Watchdog`: the ring backend raises ``[ring] connection to a peer was
  lost`` when a peer process dies, but waits forever when a peer is alive and stuck
  (stopped, asleep, a network cable pulled); and rank 0 waits forever at start-up
  for a peer that never comes.  The watchdog ends the process with one clear line
  when no step finishes within a timeout.
* :func:`check_same_start`: every rank must start from the same weights and read
  the same data (each machine loads its own copy); a cheap fingerprint per rank
  turns a silent mismatch into an error.
"""

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

DEFAULT_TIMEOUT = 600.0  # seconds without a finished step before a rank gives up


@dataclass
class World:
    """This process's place in the distributed group (size 1 when not launched)."""

    group: mx.distributed.Group
    rank: int
    size: int

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    def all_sum_int(self, n: int) -> int:
        """The sum of ``n`` over every rank (every rank must call it)."""
        if self.size == 1:
            return int(n)
        total = mx.distributed.all_sum(mx.array(n), group=self.group, stream=mx.cpu)
        return int(total.item())


_world: Optional[World] = None


def init_world(timeout: float = DEFAULT_TIMEOUT) -> World:
    """``mx.distributed.init()`` (the backend ``mlx.launch`` set up, else a group of
    one), once per process.  Under a launcher it is bounded by ``timeout`` seconds:
    rank 0 of the ring backend otherwise waits forever for a peer that never
    connects."""
    global _world
    if _world is None:
        launched = "MLX_RANK" in os.environ  # ring and JACCL ranks get it
        with Watchdog(
            timeout if launched else 0, os.environ.get("MLX_RANK"), "start-up"
        ):
            group = mx.distributed.init()
        _world = World(group, group.rank(), group.size())
    return _world


# The watcher runs in its own small process: a rank stuck in a collective (or in
# mx.distributed.init, which holds the GIL) cannot run a Python thread of its own.
_WATCHER = """
import os, select, signal, sys
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
while True:
    ready = select.select([0], [], [], timeout)[0]
    if ready and not os.read(0, 4096):
        sys.exit(0)  # the rank closed the pipe: done
    if not ready:
        sys.stderr.write(message + "\\n")
        sys.stderr.flush()
        os.kill(pid, signal.SIGTERM)
        sys.exit(0)
"""


class Watchdog:
    """Ends this process (SIGTERM, from a watcher process) when :meth:`pet` is not
    called for ``timeout`` seconds, after one line on stderr.

    Ending the stuck rank also breaks the ring for the other ranks, which then
    fail with ``connection to a peer was lost`` (or are stopped by ``mlx.launch``).

    Args:
        timeout: seconds; ``0`` or ``None`` disables the watchdog.
        rank: named in the message.
        what: the phase, named in the message ("training", "start-up").
    """

    def __init__(self, timeout: Optional[float], rank, what: str = "training"):
        self.timeout = timeout or 0
        self.rank = rank
        self.what = what
        self._watcher = None

    def pet(self):
        if self._watcher is not None:
            try:
                os.write(self._watcher.stdin.fileno(), b".")
            except OSError:
                pass  # the watcher is gone: it has already fired

    def __enter__(self):
        if self.timeout > 0:
            hint = ""
            if self.what == "training":
                hint = " Resume from the last checkpoint with --resume-adapter-file."
            message = (
                f"Error: rank {self.rank}: no progress for {self.timeout:g} s during "
                f"{self.what} (dist_timeout): a peer process is missing, stuck, "
                f"asleep or unreachable.{hint}"
            )
            env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
            self._watcher = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHER]
                + [str(os.getpid()), str(self.timeout), message],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                env=env,
            )
        return self

    def __exit__(self, *exc):
        if self._watcher is not None:
            self._watcher.stdin.close()
            self._watcher.wait()
            self._watcher = None


class GlobalMeanLoss:
    """Wrap a ``loss(model, *batch) -> (mean, ntoks)`` so that mlx-lm's averaged
    gradient is the gradient of the token mean over the *global* batch.

    Each rank returns ``N * sum_r / total`` (``total`` = supervised tokens on all
    ranks); ``average_gradients`` divides the summed gradients by N, and mlx-lm's
    report divides the summed losses by N, leaving ``sum / total`` in both.  Only in
    training mode: ``trainer.evaluate`` already weighs each rank by its tokens.
    """

    def __init__(self, loss, group: mx.distributed.Group):
        self.loss = loss
        self.group = group

    def __call__(self, model, *batch):
        loss, ntoks = self.loss(model, *batch)
        if not model.training or self.group.size() == 1:
            return loss, ntoks
        total = mx.stop_gradient(mx.distributed.all_sum(ntoks, group=self.group))
        # the loss is sum_r / max(ntoks, 1), so this is N * sum_r / total
        scale = self.group.size() * mx.maximum(ntoks, 1) / mx.maximum(total, 1)
        return loss * scale.astype(loss.dtype), ntoks


def _fingerprint(model, dataset) -> np.ndarray:
    # Sums, not hashes: a different checkpoint, quantization, adapter file or data
    # file changes them far beyond the 1e-4 tolerance used below.
    params = [v for _, v in tree_flatten(model.parameters())]
    trainable = [v for _, v in tree_flatten(model.trainable_parameters())]
    out = [float(len(params)), 0.0, 0.0, 0.0, 0.0]
    for i, group in ((1, params), (2, trainable)):
        for v in group:
            out[i] += mx.sum(v.astype(mx.float32)).item()
    if dataset is not None:
        out[3] = float(len(dataset))
        out[4] = float(dataset.lengths().sum())
    return np.array(out, np.float32)


def check_same_start(world: World, model, dataset=None):
    """Raise ``ValueError`` if any rank starts from other weights or other training
    data than rank 0 (one ``all_gather`` of a few numbers)."""
    if world.size == 1:
        return
    mine = mx.array(_fingerprint(model, dataset))
    every = mx.distributed.all_gather(mine[None], group=world.group, stream=mx.cpu)
    every = np.array(every)
    names = ("parameters", "model weights", "trainable weights", "examples", "tokens")
    for r in range(1, world.size):
        bad = ~np.isclose(every[r], every[0], rtol=1e-4, atol=1e-6)
        if bad.any():
            what = ", ".join(n for n, b in zip(names, bad) if b)
            raise ValueError(
                f"Rank {r} starts with different {what} than rank 0: every machine "
                "needs the same model folder, data files, --resume-adapter-file and "
                "--seed (same paths, same contents)."
            )


def _peer_lost(error: BaseException, world: World, adapter_path):
    # The ring backend's words when a peer process is gone: "[ring] connection to a
    # peer was lost" (MPI aborts the whole job instead).
    text = str(error)
    if world.size == 1 or not isinstance(error, RuntimeError):
        return None
    if "[ring]" not in text and "peer" not in text.lower():
        return None
    return ConnectionError(
        f"rank {world.rank} of {world.size}: lost a peer ({text}). Another rank "
        "crashed or was killed: see its output. The last checkpoint is in "
        f"{adapter_path} (resume with --resume-adapter-file)."
    )


@contextlib.contextmanager
def guard(world: World, timeout: Optional[float], adapter_path, what: str):
    """Around work with collectives: a :class:`Watchdog` (multi-process runs only;
    yielded, so the loop can ``pet`` it) and a ``ConnectionError`` instead of the
    backend's ``RuntimeError`` when a peer dies.  ``ConnectionError`` is an
    ``OSError``, so the CLI prints it as one line."""
    with Watchdog(timeout if world.size > 1 else 0, world.rank, what) as dog:
        try:
            yield dog
        except RuntimeError as e:
            lost = _peer_lost(e, world, adapter_path)
            if lost is None:
                raise
            raise lost from e


def petting(iterate_batches, dog: Watchdog):
    """``iterate_batches`` that pets ``dog`` at every batch (one step apart)."""

    def iterate(*args, **kwargs):
        for batch in iterate_batches(*args, **kwargs):
            dog.pet()
            yield batch

    return iterate


def describe(world: World, batch_size: int, grad_accumulation_steps: int, lr) -> str:
    """One line on how a data-parallel run divides the batch."""
    per = batch_size // world.size
    eff = batch_size * grad_accumulation_steps
    return (
        f"Data parallel: {world.size} processes, {per} examples each per "
        f"step; effective batch {batch_size} x {grad_accumulation_steps} "
        f"accumulation = {eff}; learning rate {lr:g} (not scaled: --batch-size is "
        "the global batch, so the same flags train the same way on any world size)."
    )

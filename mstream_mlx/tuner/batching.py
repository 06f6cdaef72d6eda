# Copyright © 2026 mstream-mlx contributors.
"""Length-sorted multi-stream batches for mlx-lm's ``train``/``evaluate``.

A batch is ``(inputs, channels, positions, index, targets, weights)``:

* ``inputs, channels, positions`` ``[B, T]``: the tokens, right-padded.  A pad token
  gets ``y = max_y + 1`` of its row, so by the mask rule (``y_j < y_i``) no real
  token ever sees a pad (the reference does the same) and padding changes nothing.
* ``index`` ``[B, K]``: where the supervised tokens sit, so the loss runs the LM head
  on K tokens instead of T (in the blocks layout the user and system blocks carry no
  loss).  ``K == 0`` means "every position": then ``targets``/``weights`` are
  ``[B, T]``.
* ``targets`` ``[B, K]``: the next token of each one's stream; ``weights`` ``[B, K]``:
  its loss weight (0 = no loss: pads, inputs, unlabelled targets).
"""

from typing import Iterator, Optional, Tuple

import mlx.core as mx
import numpy as np

from .datasets import StreamDataset

DEFAULT_PAD_TO = 32  # as mlx-lm: few distinct shapes, so few mx.compile traces


def _round_up(n: int, k: int) -> int:
    return k * ((n + k - 1) // k)


def collate(
    dataset: StreamDataset,
    indices,
    batch_size: int,
    max_seq_length: int,
    pad_to: int = DEFAULT_PAD_TO,
) -> Tuple[mx.array, ...]:
    """Build one batch from ``indices`` (fewer than ``batch_size``: the rest are
    empty rows with zero weight; none at all, as a rank's share of a short last
    batch can be: all rows empty, so that rank adds no loss and no gradient)."""
    items = [dataset.targets(int(i), max_seq_length) for i in indices]
    longest = max((len(ex) for ex, _, _ in items), default=1)
    # a multiple of pad_to (few compiled shapes) but never past max_seq_length
    cap = max(longest, max_seq_length - max_seq_length % pad_to)
    T = min(_round_up(longest, pad_to), cap)
    ids = np.zeros((batch_size, T), np.int32)
    ch = np.zeros((batch_size, T), np.int32)
    pos = np.zeros((batch_size, T), np.int32)
    sup = [np.flatnonzero(w > 0) for _, _, w in items]
    K = min(_round_up(max(1, max((len(s) for s in sup), default=0)), pad_to), T)
    gather = K < T
    width = K if gather else T
    index = np.zeros((batch_size, K if gather else 0), np.int32)
    tgt = np.zeros((batch_size, width), np.int32)
    wts = np.zeros((batch_size, width), np.float32)
    for b, ((ex, t, w), s) in enumerate(zip(items, sup)):
        L = len(ex)
        ids[b, :L], ch[b, :L], pos[b, :L] = ex.ids, ex.channels, ex.positions
        ch[b, L:] = ex.channels[-1]
        pos[b, L:] = ex.positions.max() + 1  # invisible to every real token
        if gather:
            n = len(s)
            index[b, :n], tgt[b, :n], wts[b, :n] = s, t[s], w[s]
        else:
            tgt[b, :L], wts[b, :L] = t, w
    return tuple(mx.array(a) for a in (ids, ch, pos, index, tgt, wts))


class BatchIterator:
    """mlx-lm's ``iterate_batches`` contract for multi-stream examples.

    Examples are sorted by length (random tie-breaks per epoch) and cut into batches
    of neighbours, so padding stays small; batch order is shuffled each epoch.  Data
    order depends only on ``seed`` and the step, so ``start_step`` resumes it exactly.

    Args:
        seed: data-order seed.
        pad_to: pad lengths to a multiple of this (bounds recompiles).
        start_step: training batches to skip (steps already done).
    """

    def __init__(
        self, seed: int = 0, pad_to: int = DEFAULT_PAD_TO, start_step: int = 0
    ):
        self.seed = seed
        self.pad_to = pad_to
        self.start_step = start_step
        self.tokens_seen = 0  # real tokens fed to the model by the training loop

    def epoch_batches(self, lengths: np.ndarray, batch_size: int, epoch: Optional[int]):
        """The batches (lists of example indices) of one epoch, in yield order."""
        n = len(lengths)
        if epoch is None:  # evaluation: plain length order, every example once
            order = np.argsort(lengths, kind="stable")
            return [order[i : i + batch_size] for i in range(0, n, batch_size)]
        rng = np.random.default_rng([self.seed, epoch])
        order = np.lexsort((rng.random(n), lengths))
        batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __call__(
        self,
        dataset: StreamDataset,
        batch_size: int,
        max_seq_length: int,
        loop: bool = False,
        seed=None,  # mlx-lm passes it; our order comes from self.seed
        comm_group=None,
    ) -> Iterator[Tuple[mx.array, ...]]:
        rank, size = (comm_group.rank(), comm_group.size()) if comm_group else (0, 1)
        if batch_size % size:
            raise ValueError(
                f"The batch size ({batch_size}) must be divisible by the number of "
                f"workers ({size})."
            )
        lengths = dataset.lengths()
        if not loop:
            for idx in self.epoch_batches(lengths, batch_size, None):
                yield collate(
                    dataset,
                    idx[rank::size],
                    batch_size // size,
                    max_seq_length,
                    self.pad_to,
                )
            return
        per_epoch = (len(lengths) + batch_size - 1) // batch_size
        step = self.start_step
        while True:
            epoch, k = divmod(step, per_epoch)
            batches = self.epoch_batches(lengths, batch_size, epoch)
            for idx in batches[k:]:
                idx = idx[rank::size]
                self.tokens_seen += sum(
                    len(dataset.targets(int(i), max_seq_length)[0]) for i in idx
                )
                yield collate(
                    dataset, idx, batch_size // size, max_seq_length, self.pad_to
                )
                step += 1

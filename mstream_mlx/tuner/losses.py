# Copyright © 2026 mstream-mlx contributors.
"""The multi-stream training loss: cross-entropy on output streams only.

The logit of token ``(c, y)`` predicts the token at ``(c, y + 1)``: the next token of
the *same* stream (rows: the flat index plus C; blocks: the next token of
the block; docs/fine-tuning.md).  The batches (:mod:`.batching`) already hold that
target and a weight per token; input streams have weight 0, so they never enter the
loss.  Optionally Long-CE (paper §5.5) reweights tokens by how much the other
streams helped to predict them.
"""

from dataclasses import dataclass
from typing import Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..mask import stream_mask


@dataclass
class LongCE:
    """Long-CE reweighting (paper §5.5, Table 4).

    Per supervised token, ``lsd = log p_full - log p_self`` (detached), where
    ``p_self`` comes from a no-grad forward in which every output token sees only its
    own stream (and the context streams); the loss weight is
    ``min(exp(lsd), gamma)``.  Tokens that need the other streams get more weight.

    Args:
        gamma: weight cap (sec5: 2, sec6: 3, sec7: 50).
        clamp: clamp ``lsd >= 0`` first (sec5), so no token gets weight below 1.
        normalize: rescale the weights to mean 1 per sample and stream (sec5/sec6
            ``per_head_mean1``), so the loss keeps the scale of plain CE.

    Deviations, on purpose: every output stream is reweighted at every training step
    (sec7 picks 3 channels per step; sec5 ramps the probability up to 0.5), and the
    self-only pass blocks the whole user stream, not only its content span.
    """

    gamma: float = 3.0
    clamp: bool = False
    normalize: bool = True


def self_only_mask(
    channels: mx.array, positions: mx.array, context: Sequence[int] = ()
) -> mx.array:
    """The stream mask ``[B, 1, L, L]`` restricted to each token's own stream plus the
    ``context`` channels (e.g. the system block)."""
    mask = stream_mask(positions, positions)[:, 0]  # (B, L, L)
    keys = channels[:, None, :]  # (B, 1, L): key channel
    keep = keys == channels[:, :, None]
    for c in context:
        keep = keep | (keys == c)
    return (mask & keep)[:, None]


def _gather(x: mx.array, index: mx.array) -> mx.array:
    """``x[b, index[b, k]]`` along axis 1 (``index`` empty = all positions)."""
    if index.shape[1] == 0:
        return x
    if x.ndim == 3:
        return mx.take_along_axis(x, index[..., None], axis=1)
    return mx.take_along_axis(x, index, axis=1)


class StreamLoss:
    """``loss(model, inputs, channels, positions, index, targets, weights)`` for
    mlx-lm's trainer: returns ``(mean loss over supervised tokens, their count)``.

    Args:
        num_channels: channels of the model (for Long-CE's per-stream means).
        long_ce: Long-CE settings, or None for plain CE. Applied in training mode
            only, so validation and test report plain CE.
        context_channels: channels the Long-CE self-only pass keeps visible.
    """

    def __init__(self, num_channels: int, long_ce: LongCE = None, context_channels=()):
        self.num_channels = num_channels
        self.long_ce = long_ce
        self.context_channels = tuple(context_channels)

    def logits(self, model, inputs, channels, positions, index, mask=None) -> mx.array:
        """Logits ``[B, K, V]`` at the ``index`` positions only (the LM head is the
        largest matmul of a small model; it runs on supervised tokens only)."""
        h = model.model(inputs, channels, positions, mask=mask)
        return model.lm_logits(_gather(h, index))

    def __call__(
        self, model, inputs, channels, positions, index, targets, weights
    ) -> Tuple[mx.array, mx.array]:
        logits = self.logits(model, inputs, channels, positions, index)
        ce = nn.losses.cross_entropy(logits, targets)  # (B, K)
        valid = weights > 0
        ntoks = valid.sum()
        if self.long_ce is not None and model.training:
            weights = weights * self._long_ce_weights(
                model, inputs, channels, positions, index, targets, ce, valid
            )
        loss = (ce * weights).astype(mx.float32).sum() / mx.maximum(ntoks, 1)
        return loss, ntoks

    def _long_ce_weights(
        self, model, inputs, channels, positions, index, targets, ce, valid
    ):
        cfg = self.long_ce
        mask = self_only_mask(channels, positions, self.context_channels)
        self_logits = self.logits(model, inputs, channels, positions, index, mask)
        ce_self = nn.losses.cross_entropy(self_logits, targets)
        lsd = mx.stop_gradient(ce_self - ce).astype(
            mx.float32
        )  # log p_full - log p_self
        if cfg.clamp:
            lsd = mx.maximum(lsd, 0.0)
        w = mx.minimum(mx.exp(lsd), cfg.gamma)
        if cfg.normalize:
            ch = _gather(channels, index)
            onehot = (ch[..., None] == mx.arange(self.num_channels)) & valid[..., None]
            onehot = onehot.astype(mx.float32)  # (B, K, C)
            mean = (w[..., None] * onehot).sum(1) / mx.maximum(onehot.sum(1), 1.0)
            own = (onehot * mean[:, None, :]).sum(-1)  # (B, K): mean of my stream
            w = mx.where(valid, w / mx.maximum(own, 1e-6), 0.0)
        return mx.stop_gradient(w)

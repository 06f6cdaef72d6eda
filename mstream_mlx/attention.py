# Copyright © 2026 mstream-mlx contributors.
"""Block-causal attention pieces: RoPE at per-token positions and the SDPA call.

``mx.fast.rope`` takes one offset per batch element, not one per token, but a
multi-stream token's position is its timestep ``y``.  We gather cos/sin by position
instead (measured 2x faster than ``fast.rope`` on CPU, and bit-for-bit the HF
formula; shared/reference/mlx_notes.md §2.2).
"""

from typing import Tuple

import mlx.core as mx


class StreamRoPE:
    """Rotate-half RoPE (HF/Qwen convention) at arbitrary per-token positions.

    Args:
        dims: rotated feature count (the full head_dim, or a prefix for partial RoPE).
        base: ``rope_theta``.
        scale: linear position scaling (``1 / factor``).
    """

    def __init__(self, dims: int, base: float, scale: float = 1.0):
        self.dims = dims
        self.scale = scale
        self.inv_freq = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)

    def tables(self, positions: mx.array) -> Tuple[mx.array, mx.array]:
        """cos, sin of shape ``[B, 1, L, dims/2]`` (fp32) for ``positions`` ``[B, L]``."""
        ang = (positions.astype(mx.float32) * self.scale)[..., None] * self.inv_freq
        ang = ang[:, None]  # (B, 1, L, dims/2): broadcast over heads
        return mx.cos(ang), mx.sin(ang)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate the first ``2 * cos.shape[-1]`` features of ``x`` ``[B, H, L, D]``."""
    half = cos.shape[-1]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if 2 * half < x.shape[-1]:
        parts.append(x[..., 2 * half :])  # partial RoPE: the rest passes through
    return mx.concatenate(parts, axis=-1)


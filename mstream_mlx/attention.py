# Copyright © 2026 mstream-mlx contributors.
"""Block-causal attention pieces: RoPE at per-token positions and the SDPA call.

``mx.fast.rope`` takes one offset per batch element, not one per token, but a
multi-stream token's position is its timestep ``y``.  We gather cos/sin by position
instead (measured 2x faster than ``fast.rope`` on CPU, and bit-for-bit the HF
formula).
"""

from typing import Optional, Tuple, Union

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.rope_utils import Llama3RoPE

SMALL_QUERY = 16
"""Most new tokens (a decode row: one per stream) that :func:`stream_attention` sends
through :func:`masked_attention` on CUDA."""


class StreamRoPE:
    """Rotate-half RoPE (HF/Qwen/Llama convention) at arbitrary per-token positions.

    Args:
        dims: rotated feature count (the full head_dim, or a prefix for partial RoPE).
        base: ``rope_theta``.
        scaling: the config's ``rope_scaling`` (or ``rope_parameters``): ``default``,
            ``linear`` (positions times ``1 / factor``) or ``llama3`` (Llama 3's
            per-frequency scaling, mlx-lm's ``Llama3RoPE`` frequencies).  Either way
            the angle of a token is its own ``y`` times the frequencies.
    """

    def __init__(self, dims: int, base: float, scaling: Optional[dict] = None):
        kind = rope_type(scaling)
        self.dims = dims
        self.scale = 1.0
        if kind == "default":
            self.inv_freq = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        elif kind == "linear":
            self.scale = 1.0 / float(scaling["factor"])
            self.inv_freq = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        elif kind == "llama3":
            # mlx-lm keeps wavelengths / 2 pi ("freqs" of mx.fast.rope): invert them
            freqs = Llama3RoPE(dims, base=base, scaling_config=scaling)._freqs
            self.inv_freq = 1.0 / freqs.astype(mx.float32)
        else:
            raise ValueError(f"RoPE scaling {kind!r} is not supported by mstream-mlx.")
        # Not a parameter, so load() does not evaluate it; a lazy array belongs to the
        # thread that built it and could not be evaluated by a worker thread stepping
        # a Session.
        mx.eval(self.inv_freq)

    def tables(self, positions: mx.array) -> Tuple[mx.array, mx.array]:
        """cos, sin of shape ``[B, 1, L, dims/2]`` (fp32) for ``positions`` ``[B, L]``."""
        ang = (positions.astype(mx.float32) * self.scale)[..., None] * self.inv_freq
        ang = ang[:, None]  # (B, 1, L, dims/2): broadcast over heads
        return mx.cos(ang), mx.sin(ang)


def rope_type(scaling: Optional[dict]) -> str:
    """The RoPE kind of a config's ``rope_scaling`` (``"default"`` when absent)."""
    scaling = scaling or {}
    return scaling.get("rope_type") or scaling.get("type", "default")


def rope_pairs(cos: mx.array, sin: mx.array, dtype) -> Tuple[mx.array, mx.array]:
    """The operands of :func:`apply_rope_pairs`, ``[B, 1, L, 2, dims/2]`` in ``dtype``.

    Built once per forward and shared by every layer: ``[cos, cos]`` and
    ``[-sin, sin]`` for the two halves, so rotating is two products and a sum.
    """
    c = mx.stack([cos, cos], axis=-2).astype(dtype)
    s = mx.stack([-sin, sin], axis=-2).astype(dtype)
    return c, s


@mx.compile
def _rotate(x: mx.array, c: mx.array, s: mx.array) -> mx.array:
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), exactly the rotate-half formula;
    # compiled into one kernel on GPUs (it was ~11 small ops per call).
    shape = x.shape
    halves = x.reshape(*shape[:-1], 2, shape[-1] // 2)  # (B, H, L, 2, D/2)
    return (halves * c + halves[..., ::-1, :] * s).reshape(shape)


def apply_rope_pairs(x: mx.array, c: mx.array, s: mx.array) -> mx.array:
    """Rotate the first ``2 * c.shape[-1]`` features of ``x`` ``[B, H, L, D]``."""
    if c.dtype != x.dtype:
        c, s = c.astype(x.dtype), s.astype(x.dtype)
    rot = 2 * c.shape[-1]
    if rot == x.shape[-1]:
        return _rotate(x, c, s)
    # partial RoPE: the rest passes through
    return mx.concatenate([_rotate(x[..., :rot], c, s), x[..., rot:]], axis=-1)


def masked_attention(q, k, v, scale: float, mask: mx.array) -> mx.array:
    """Attention of ``q`` ``[B, H, L, D]`` over ``k``, ``v`` ``[B, Hkv, S, D]`` with a
    boolean ``mask`` ``[B|1, 1, L, S]``, in plain ops (matmul, where, softmax, matmul).

    The same math as SDPA's unfused path: scores in the input dtype, softmax in fp32.
    """
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv  # query heads per kv head (GQA), kept next to their kv head
    q = (q * scale).reshape(B, Hkv, rep * L, D)
    scores = (q @ k.swapaxes(-1, -2)).reshape(B, Hkv, rep, L, S)
    scores = mx.where(mask[:, :, None], scores, mx.array(-mx.inf, scores.dtype))
    probs = mx.softmax(scores, axis=-1, precise=True).reshape(B, Hkv, rep * L, S)
    return (probs @ v).reshape(B, H, L, D)


def _on_cuda() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def stream_attention(
    q, k, v, cache, scale: float, mask: Union[None, str, mx.array]
) -> mx.array:
    """SDPA for the stream rule's masks (``None``, ``"causal"`` or a boolean array).

    A decode row of several streams carries an array mask.  MLX's CUDA backend sends
    such a call to cuDNN, which builds one graph per key length: a new graph every
    step (measured 13-15 steps/s for 3 or 10 streams on an H100, 0.6B).  There, few
    queries go through :func:`masked_attention` instead; elsewhere (CPU, Metal, whose
    fused kernels take masks) through ``mx.fast.scaled_dot_product_attention``.  A
    quantized cache (``cache.bits``) goes through mlx-lm's quantized SDPA.  (Fused SDPA
    over the whole padded KV buffer, one graph per 256 keys, measured no faster on an
    H200: docs/benchmarks.md.)
    """
    quantized = hasattr(cache, "bits")
    if isinstance(mask, mx.array) and q.shape[2] <= SMALL_QUERY and _on_cuda() and not quantized:
        return masked_attention(q, k, v, scale, mask)
    return scaled_dot_product_attention(q, k, v, cache, scale=scale, mask=mask)

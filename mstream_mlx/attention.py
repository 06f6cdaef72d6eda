# Copyright © 2026 mstream-mlx contributors.
"""Block-causal attention pieces: RoPE at per-token positions and the SDPA call.

A multi-stream token's position is its own timestep ``y``, not its index in the
sequence.  Two ways to rotate at such positions (docs/benchmarks.md has the numbers):

* on a GPU, ``mx.fast.rope``'s fused kernel with every token as its own batch element:
  ``fast.rope`` takes one offset per batch element, and a ``[B, L, H, D]`` tensor is
  ``[B*L, H, 1, D]`` without a copy, so the offsets are simply the ``y`` of the tokens
  (:class:`FusedRotation`);
* on the CPU, where ``fast.rope`` has no kernel and runs op by op (measured 2x slower),
  cos/sin gathered at ``y`` once per forward and shared by every layer
  (:class:`TableRotation`), bit-for-bit the HF formula.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.rope_utils import Llama3RoPE

from . import row_attention
from .mask import Mask, RowMask

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
        self.base: Optional[float] = base
        self.freqs: Optional[mx.array] = None  # fast.rope's form of llama3's frequencies
        if kind == "default":
            self.inv_freq = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        elif kind == "linear":
            self.scale = 1.0 / float(scaling["factor"])
            self.inv_freq = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        elif kind == "llama3":
            # mlx-lm keeps wavelengths / 2 pi ("freqs" of mx.fast.rope): invert them
            self.freqs = Llama3RoPE(dims, base=base, scaling_config=scaling)._freqs
            self.base = None
            self.inv_freq = 1.0 / self.freqs.astype(mx.float32)
        else:
            raise ValueError(f"RoPE scaling {kind!r} is not supported by mstream-mlx.")
        # Not parameters, so load() does not evaluate them; a lazy array belongs to the
        # thread that built it and could not be evaluated by a worker thread stepping
        # a Session.
        mx.eval(self.inv_freq, self.freqs)

    def tables(self, positions: mx.array) -> Tuple[mx.array, mx.array]:
        """cos, sin of shape ``[B, 1, L, dims/2]`` (fp32) for ``positions`` ``[B, L]``."""
        ang = (positions.astype(mx.float32) * self.scale)[..., None] * self.inv_freq
        ang = ang[:, None]  # (B, 1, L, dims/2): broadcast over heads
        return mx.cos(ang), mx.sin(ang)

    def at(self, positions: mx.array, dtype, fused: Optional[bool] = None):
        """The rotation of one forward's tokens at ``positions`` ``[B, L]``: a callable
        taking ``[B, L, H, D]`` and giving ``[B, H, L, D]``, shared by every layer.

        ``fused`` (default: on a GPU) picks ``mx.fast.rope``'s kernel over the
        gathered tables; both are the same rotation (tests/test_rope.py).
        """
        if fused is None:
            fused = _on_gpu()
        if fused:
            return FusedRotation(self, positions.reshape(-1).astype(mx.int32))
        return TableRotation(*rope_pairs(*self.tables(positions), dtype))


@dataclass
class TableRotation:
    """RoPE by cos/sin tables gathered at each token's ``y`` (see the module doc)."""

    c: mx.array
    s: mx.array

    def __call__(self, x: mx.array) -> mx.array:
        return apply_rope_pairs(x.transpose(0, 2, 1, 3), self.c, self.s)


@dataclass
class FusedRotation:
    """RoPE by ``mx.fast.rope``, each token its own batch element at offset ``y``."""

    rope: StreamRoPE
    offsets: mx.array  # [B * L] int32: each token's y

    def __call__(self, x: mx.array) -> mx.array:
        B, L, H, D = x.shape
        r = self.rope
        out = mx.fast.rope(
            x.reshape(B * L, H, 1, D),
            r.dims,
            traditional=False,
            base=r.base,
            scale=r.scale,
            offset=self.offsets,
            freqs=r.freqs,
        )
        if L == 1:  # one token per sequence: [B, H, 1, D] already, no node more
            return out
        return out.reshape(B, L, H, D).transpose(0, 2, 1, 3)


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


def _on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def _on_cuda() -> bool:
    return _on_gpu() and mx.cuda.is_available()


def kernel_mask(mask: Mask, dtype) -> Mask:
    """``mask`` in the form the attention kernel takes best, built once per forward.

    MLX's CUDA backend hands an array mask to cuDNN as an additive bias; given a
    boolean mask, ``mx.fast.scaled_dot_product_attention`` first broadcasts it to
    ``[B, heads, L, S]`` and writes that whole additive copy, in every layer (a
    10-stream rows prompt at 8k tokens held 29 GB of them at the 8B shape).  An
    additive mask ``[B, 1, L, S]`` in the model's dtype is passed through as a
    broadcast view.  Few queries (a decode row) keep the boolean mask: they go through
    :func:`masked_attention`.  Elsewhere (CPU, Metal) the boolean mask is best.
    """
    if (
        isinstance(mask, mx.array)
        and mask.dtype == mx.bool_
        and mask.shape[-2] > SMALL_QUERY
        and _on_cuda()
    ):
        return mx.where(mask, mx.array(0, dtype), mx.array(-mx.inf, dtype))
    return mask


def stream_attention(q, k, v, cache, scale: float, mask: Mask) -> mx.array:
    """SDPA for the stream rule's masks (``None``, ``"causal"``, a boolean array or a
    decode row's :class:`~mstream_mlx.mask.RowMask`).

    A decode row of several streams carries a mask.  MLX's CUDA backend sends an
    array mask to cuDNN, which builds one graph per key length: a new graph every
    step (measured 13-15 steps/s for 3 or 10 streams on an H100, 0.6B).  There, a
    decode row runs :func:`~mstream_mlx.row_attention.row_attention`'s kernel while it
    is the faster way (``row_attention.fits``), and other masks with few queries, or
    longer rows, :func:`masked_attention`; elsewhere (CPU, Metal,
    whose fused kernels take masks) everything goes through
    ``mx.fast.scaled_dot_product_attention``.  A quantized cache (``cache.bits``)
    goes through mlx-lm's quantized SDPA.  (Fused SDPA over the whole padded KV
    buffer, one graph per 256 keys, measured no faster on an H200:
    docs/benchmarks.md.)
    """
    quantized = hasattr(cache, "bits")
    cuda = _on_cuda() and not quantized
    if isinstance(mask, RowMask):
        if cuda and row_attention.fits(q, k):
            return row_attention.row_attention(q, k, v, scale)
        mask = mask.array
    if isinstance(mask, mx.array) and q.shape[2] <= SMALL_QUERY and cuda:
        return masked_attention(q, k, v, scale, mask)
    return scaled_dot_product_attention(q, k, v, cache, scale=scale, mask=mask)

# Copyright © 2026 mstream-mlx contributors.
"""Attention of one decode row on CUDA, in one kernel.

A decode step of N streams feeds N tokens at one timestep ``y``.  By the stream rule
(paper §4) each of them sees every cached key (all older) and itself, never a peer:
a mask no fused MLX kernel takes on CUDA (the vector kernel takes no mask, cuDNN
builds one graph per key length).  Done with plain ops (:func:`attention.
masked_attention`) it costs five kernels per layer; this kernel does the whole
attention of the row in one, for every (query head, token) pair a block of 32 warps
that runs an online softmax over the cached keys plus the token's own key, then
merges the warps (docs/benchmarks.md has what it buys).  Metal's fused kernel takes
the boolean mask and the CPU runs it unfused, so only CUDA needs it; everywhere else,
and for any shape it does not cover, :func:`attention.masked_attention` is the
fallback (and the reference it is tested against on CUDA).
"""

from typing import Dict

import mlx.core as mx

WARPS = 32  # warps per block
UNROLL = 4  # keys a warp handles per turn
MAX_READS = 12_000
"""Most tokens x keys a call may cover.  Every block reads all keys of its kv head, so
the kernel's time grows with tokens x keys, while the plain ops' five launches cost
about the same up to long contexts: on an H200 (36 calls, 32/8 heads, bf16) the
kernel took 47 and 77 us a call at 4 and 10 tokens over 1,150 keys (plain ops 87 and
90), 129 and 247 us over 5,000 (plain ops 92 and 81).  Past the crossover (~13k),
:func:`fits` says no and attention takes the plain ops (docs/benchmarks.md)."""

_SOURCE = """
    // q [1, H, NQ, D] (any strides), k/v [1, Hkv, S, D] (views of the cache
    // buffers, last stride 1); the new tokens' keys are the last NQ of S.
    constexpr int E = D / 32;  // features per lane
    __shared__ float part[32][33];
    __shared__ float w_max[32];
    __shared__ float w_sum[32];
    const int lane = threadIdx.x % 32;
    const int w = threadIdx.x / 32;
    const int h = blockIdx.x;
    const int n = blockIdx.y;
    const int kvh = h / REP;
    const int S = k_shape[2];
    const int cached = S - NQ;  // keys 0 .. cached - 1, then the token's own

    const T* qp = q + h * q_strides[1] + n * q_strides[2];
    float qv[E];
    float acc[E];
    for (int i = 0; i < E; i++) {
        qv[i] = SCALE_LOG2 * static_cast<float>(qp[(lane * E + i) * q_strides[3]]);
        acc[i] = 0.f;
    }
    const T* kb = k + kvh * k_strides[1] + lane * E;
    const T* vb = v + kvh * v_strides[1] + lane * E;
    float top = -1e30f;
    float total = 0.f;
    // U keys per warp and turn: their loads and reductions overlap
    for (int j0 = w * U; j0 <= cached; j0 += 32 * U) {
        int key[U];
        float s[U];
        for (int u = 0; u < U; u++) {
            const int j = j0 + u;
            key[u] = j < cached ? j : (j == cached ? cached + n : -1);
        }
        for (int u = 0; u < U; u++) {
            float d = 0.f;
            if (key[u] >= 0) {
                const T* kp = kb + key[u] * k_strides[2];
                for (int i = 0; i < E; i++) {
                    d += qv[i] * static_cast<float>(kp[i]);
                }
            }
            s[u] = d;
        }
        float nt = top;
        for (int u = 0; u < U; u++) {
            s[u] = warp_sum(s[u]);
            if (key[u] >= 0) nt = fmaxf(nt, s[u]);
        }
        const float keep = exp2f(top - nt);
        top = nt;
        total *= keep;
        for (int i = 0; i < E; i++) acc[i] *= keep;
        for (int u = 0; u < U; u++) {
            if (key[u] < 0) continue;
            const float p = exp2f(s[u] - nt);
            total += p;
            const T* vp = vb + key[u] * v_strides[2];
            for (int i = 0; i < E; i++) {
                acc[i] += p * static_cast<float>(vp[i]);
            }
        }
    }
    if (lane == 0) {
        w_max[w] = top;
        w_sum[w] = total;
    }
    __syncthreads();
    const float all_top = warp_max(w_max[lane]);
    const float all_sum = warp_sum(w_sum[lane] * exp2f(w_max[lane] - all_top));
    const float mine = exp2f(top - all_top);
    T* op = out + (h * NQ + n) * D;
    for (int i = 0; i < E; i++) {
        part[lane][w] = acc[i] * mine;  // warp w's share of feature lane * E + i
        __syncthreads();
        const float f = warp_sum(part[w][lane]);
        if (lane == 0) {
            op[w * E + i] = static_cast<T>(f / all_sum);
        }
        __syncthreads();
    }
"""

_HEADER = """
__device__ __forceinline__ float warp_sum(float x) {
    for (int m = 16; m > 0; m /= 2) x += __shfl_xor_sync(0xffffffff, x, m);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
    for (int m = 16; m > 0; m /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, m));
    return x;
}
"""

_kernels: Dict[float, object] = {}


def _kernel(scale: float):
    # the scale is a compile-time constant: one kernel per model, no extra input
    if scale not in _kernels:
        _kernels[scale] = mx.fast.cuda_kernel(
            name=f"mstream_row_attention_{len(_kernels)}",
            input_names=["q", "k", "v"],
            output_names=["out"],
            source=_SOURCE,
            header=_HEADER
            + f"constexpr float SCALE_LOG2 = {scale!r}f * 1.4426950408889634f;\n",
            ensure_row_contiguous=False,
        )
    return _kernels[scale]


def fits(q: mx.array, k: mx.array) -> bool:
    """Whether the kernel covers these shapes (batch 1, head_dim a multiple of 32 up
    to 256, the GQA ratio whole) and is the faster way (:data:`MAX_READS`).  Keys and
    values are a KV cache's buffers, whose features are contiguous."""
    B, H, L, D = q.shape
    return (
        B == 1
        and D % 32 == 0
        and D <= 256
        and H % k.shape[1] == 0
        and k.shape[2] >= L
        and L * k.shape[2] <= MAX_READS
    )


def row_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, unroll: int = UNROLL
) -> mx.array:
    """Attention of ``q`` ``[1, H, L, D]`` (L tokens at one timestep) over ``k``, ``v``
    ``[1, Hkv, S, D]``, whose last ``L`` keys are the tokens' own: token n sees keys
    ``0 .. S-L-1`` and ``S-L+n``.  CUDA only; see :func:`fits`."""
    _, H, L, D = q.shape
    return _kernel(float(scale))(
        inputs=[q, k, v],
        template=[
            ("T", q.dtype),
            ("D", D),
            ("NQ", L),
            ("REP", H // k.shape[1]),
            ("U", unroll),
        ],
        grid=(32 * WARPS * H, L, 1),
        threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[q.shape],
        output_dtypes=[q.dtype],
    )[0]

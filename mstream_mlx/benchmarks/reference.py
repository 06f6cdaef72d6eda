# Copyright © 2026 mstream-mlx contributors.
"""The PyTorch reference decode loop, timed on the weights of an MLX model.

The library ships no PyTorch model of its own: the caller passes the reference
implementation in (a module with ``RefModel`` and ``blocks_generate``, as a source
checkout's ``tests/reference`` has), and this wraps it for the decode table.  torch
is needed (``pip install 'mstream-mlx[torch]'``).
"""

import dataclasses
import platform
import time
from types import ModuleType
from typing import List

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .run import Run


class _Clocked:
    """Records when each model call of the reference loop starts."""

    def __init__(self, model):
        self.model, self.calls = model, []

    @property
    def device(self):
        return self.model.device

    def new_cache(self):
        return self.model.new_cache()

    def __call__(self, *args, **kwargs):
        self.calls.append(time.perf_counter())
        return self.model(*args, **kwargs)


class TorchReference:
    """``impl.RefModel`` holding ``model``'s weights, and ``impl``'s blocks decode loop.

    Args:
        model: a multi-stream Qwen3/Qwen2 MLX model (its weights are copied).
        max_heads: the most assistant heads a run will use (sizes the channel table).
        impl: the reference implementation: ``RefModel(config)`` (a PyTorch module)
            and ``blocks_generate(model, ...)`` (its blocks decode loop).
    """

    def __init__(self, model, max_heads: int, impl: ModuleType):
        import torch

        self.torch = torch
        self.impl = impl
        self.cuda = torch.cuda.is_available()
        device = torch.device("cuda" if self.cuda else "cpu")
        dtype = {
            mx.float32: torch.float32,
            mx.bfloat16: torch.bfloat16,
            mx.float16: torch.float16,
        }[model.model.embed_tokens.weight.dtype]
        config = {**dataclasses.asdict(model.args), "num_channels": max_heads + 2}
        with torch.device("meta"):
            ref = impl.RefModel(config).to(dtype)
        ref = ref.to_empty(device=device)
        state = {}
        for k, v in tree_flatten(model.parameters()):
            if "channel_embedding" not in k:
                state[k] = torch.from_numpy(np.array(v.astype(mx.float32)))
        gen = torch.Generator().manual_seed(0)
        hidden = model.args.hidden_size
        state["model.channel_embedding.weight"] = 0.02 * torch.randn(
            max_heads + 2, hidden, generator=gen
        )
        ref.load_state_dict(state, strict=True)
        self.model = ref.eval()
        self.device_name = (
            torch.cuda.get_device_name(0)
            if self.cuda
            else f"CPU {platform.machine()} (torch {torch.__version__})"
        )

    def run(self, prompt: List[int], heads: int, rows: int) -> Run:
        """The prompt as the system block, ``heads`` greedy heads, ``rows`` steps."""
        torch = self.torch
        clocked = _Clocked(self.model)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        ids = {"system": 3, "user": 4, "assistant": 5}
        start = time.perf_counter()
        out = self.impl.blocks_generate(
            clocked,
            system_ids=list(prompt),
            user_ids=[],
            im_start=1,
            im_end=2,
            newline=6,
            role_ids=ids,
            num_heads=heads,
            max_new_tokens=rows + 1,
        )
        end = time.perf_counter()
        steps = len(out.steps)
        peak = torch.cuda.max_memory_allocated() / 1e9 if self.cuda else 0.0
        first = clocked.calls[1] if steps else end
        tokens = sum(len(feeds) for feeds in out.steps) - sum(
            f.cid == 1 for feeds in out.steps for f in feeds
        )
        return Run(len(out.prefill), first - start, steps, tokens, end - first, peak)

# Copyright © 2026 mstream-mlx contributors.
"""What every multi-stream family shares: the model contract, the stream preamble of a
forward, the :class:`StreamModel` base and the facts a family file declares.

A family file (``qwen3.py``, ``llama.py`` ...) keeps mlx-lm's shape and names; the
multi-stream part is only this: ``h0 = embed_tokens[id] + channel_embedding[c]``, RoPE
at each token's timestep ``y``, the stream mask (``mask.py``) and the ``y`` of every
new key recorded in the cache (paper §3-§4; ``docs/design.md``).
"""

import sys
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Optional,
    Protocol,
    Tuple,
    runtime_checkable,
)

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..attention import kernel_mask
from ..cache import StreamKVCache, push_positions
from ..mask import Mask, attention_mask, make_mask
from ..streams import BLOCKS, LAYOUTS, ROWS, StreamSpec, check_channels
from ..vocab import check_ids

CHANNEL_KEY = "model.channel_embedding.weight"
# Keys the reference checkpoints carry for its (disabled) role gating: never used.
REFERENCE_ONLY_KEYS = ("gate_in_norm", "role_gating")


@runtime_checkable
class Backbone(Protocol):
    """The inner model (``model.model``): hidden states before the head.  Prefill,
    Session and the loss call it directly, so they can take the head of a few rows."""

    embed_tokens: nn.Embedding
    channel_embedding: nn.Embedding
    layers: List[nn.Module]

    def __call__(
        self,
        inputs: mx.array,
        channels: mx.array,
        positions: mx.array,
        cache: Optional[List[Any]] = None,
        mask: Mask = None,
    ) -> mx.array: ...


@runtime_checkable
class MultiStreamModel(Protocol):
    """The contract Session, prefill, the loss, LoRA and the converters rely on.

    ``inputs``, ``channels`` and ``positions`` are ``[B, L]`` int arrays (token id,
    channel, timestep y); the logit of token (c, y) predicts stream c at y + 1.  The
    mask is derived from ``positions`` unless one is passed (give them as host values,
    numpy or an evaluated array: the mask's shortcuts read them on the host, and a
    lazy array would wait for the device); ``cache`` comes from
    :meth:`make_cache` and is changed in place.  ``args`` carries at least
    ``model_type``, ``vocab_size``, ``num_channels``, ``multistream`` and
    ``tie_word_embeddings``.  Optional: ``tokens_per_row`` (calls must carry whole
    rows), ``quant_predicate``, ``cast_predicate`` and ``shard``.
    """

    args: Any
    model: Backbone

    def __call__(
        self,
        inputs: mx.array,
        *,
        channels: mx.array,
        positions: mx.array,
        cache: Optional[List[Any]] = None,
        mask: Mask = None,
    ) -> mx.array: ...

    def lm_logits(self, h: mx.array) -> mx.array: ...

    def make_cache(self) -> List[Any]: ...

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]: ...

    @property
    def layers(self) -> List[nn.Module]: ...

    @property
    def streams(self) -> StreamSpec: ...


def stream_inputs(
    backbone: nn.Module,
    inputs: mx.array,
    channels: mx.array,
    positions: mx.array,
    cache: Optional[List[Any]] = None,
    mask: Mask = None,
    *,
    mask_cache: Optional[int] = 0,
) -> Tuple[mx.array, Callable[[mx.array], mx.array], Mask, List[Any]]:
    """The multi-stream preamble of a forward, shared by every family.

    Args:
        backbone: has ``embed_tokens``, ``channel_embedding``, ``rope`` (a
            :class:`~mstream_mlx.attention.StreamRoPE`) and ``layers``.
        cache: one entry per layer, or None (training: the mask is then the array).
        mask: an explicit mask, or None for the rule in its cheapest form.
        mask_cache: which layer's cache the mask is read from (an attention layer's:
            its keys line up with the mask); None when no layer attends.

    Returns:
        ``(h, rope, mask, cache)``: the embedded inputs, the rotation at each token's
        ``y`` (``rope(x)`` turns ``[B, L, H, D]`` into rotated ``[B, H, L, D]``), the
        mask in the form the attention kernel takes best and one cache entry per
        layer (Nones without a cache).  The new tokens' ``y`` are recorded in the
        caches, after the mask was read from them.
    """
    host = None  # the positions on the host, where they can be read
    if isinstance(positions, np.ndarray):
        # host positions: the mask shortcuts read them without waiting for the device
        # (a lazy mx array here would stall the pipeline; docs/benchmarks.md)
        host = positions.astype(np.int32)
        positions = mx.array(host)
    elif cache is not None:
        host = np.array(positions)  # evaluated, by the contract above
    # paper §3: the channel embedding is added once, before layer 0
    h = backbone.embed_tokens(inputs) + backbone.channel_embedding(channels)
    rope = backbone.rope.at(positions, h.dtype)  # built once for all layers
    if cache is None:
        if mask is None and mask_cache is not None:
            mask = make_mask(positions)
        return h, rope, kernel_mask(mask, h.dtype), [None] * len(backbone.layers)
    if mask is None and mask_cache is not None:
        mask = attention_mask(positions, cache[mask_cache])
    mask = kernel_mask(mask, h.dtype)
    kv = [c for c in cache if isinstance(c, StreamKVCache)]
    if kv:
        push_positions(kv, host)  # one shared ys array for same-offset layers
    for c in cache:
        if not isinstance(c, StreamKVCache):
            c.push_positions(host)
    return h, rope, mask, cache


class StreamModel(nn.Module):
    """A multi-stream causal LM: a family's backbone plus the shared head, the stream
    spec, the stream part of ``sanitize`` and the KV cache."""

    def __init__(self, args: Any, backbone: type):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        *,
        channels: mx.array,
        positions: mx.array,
        cache: Optional[List[Any]] = None,
        mask: Mask = None,
    ) -> mx.array:
        """Logits ``[B, L, V]``; the logit of token (c, y) predicts stream c at y + 1.

        Args:
            inputs, channels, positions: ``[B, L]`` int arrays (token id, channel, y).
            cache: from :meth:`make_cache` for incremental use (changed in place).
            mask: optional boolean ``[B, 1, L, S]``; derived from ``positions`` if None.
        """
        if not inputs.shape == channels.shape == positions.shape:
            raise ValueError(
                f"inputs, channels and positions must have one shape, got "
                f"{inputs.shape}, {channels.shape} and {positions.shape}."
            )
        # The user's entry point: ids and channels are read on the host (inputs are
        # host-built, so no GPU sync).  Session, prefill and the loss call self.model
        # with ids checked where they entered (docs/checks.md).
        check_ids(inputs, self.args.vocab_size)
        check_channels(channels, self.args.num_channels)
        return self.lm_logits(self.model(inputs, channels, positions, cache, mask))

    def lm_logits(self, h: mx.array) -> mx.array:
        """The shared LM head (tied or not) applied to hidden states."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Drop reference-only keys and a tied head, map ``model.language_model.`` to
        ``model.``, and give a plain base model a channel table to fine-tune."""
        out = {}
        for k, v in weights.items():
            if any(r in k for r in REFERENCE_ONLY_KEYS):
                continue
            out[k.replace("model.language_model.", "model.")] = v
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        if CHANNEL_KEY not in out:
            # A plain base model: start the channel table at N(0, 0.02) (the
            # reference's init) so it can be fine-tuned into a multi-stream model.
            print(
                "[WARNING] The checkpoint has no channel embedding; initialised "
                f"{self.args.num_channels} channels at N(0, 0.02) for fine-tuning.",
                file=sys.stderr,
            )
            shape = (self.args.num_channels, self.args.hidden_size)
            out[CHANNEL_KEY] = 0.02 * mx.random.normal(shape, key=mx.random.key(0))
        return out

    def make_cache(self) -> List[Any]:
        return [StreamKVCache() for _ in self.layers]

    @property
    def layers(self):
        return self.model.layers

    @property
    def streams(self) -> StreamSpec:
        """Names, inputs, layout and silence token of this model's streams."""
        return StreamSpec.from_config(self.args.multistream or {}, self.args.num_channels)

    @property
    def quant_predicate(self):
        # Keep the tiny channel table exact; nn.quantize would otherwise take it.
        return lambda path, module: not path.endswith("channel_embedding")


def _same(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    return weights


def _never(key: str) -> bool:
    return False


def _no_facts(config: dict) -> dict:
    return {}


@dataclass(frozen=True)
class Family:
    """What a family file tells the registry (``models/__init__.py``) about itself.

    Args:
        name: the module name, which is also its main ``model_type``.
        model_types: every HF ``model_type`` the file reads (``name`` first).
        architectures: HF/reference class names in ``config.json`` -> the layout
            they imply (None: rows when the checkpoint has a channel table, else
            the flags decide).
        saved_architectures: layout -> the class name written into ``config.json``
            by convert and export.
        variant_architectures: model_type -> layout -> class name, for the model
            types the reference saves under a class of their own (Qwen3.5-MoE:
            ``StreamQwen3_5MoeForCausalLM``); others use ``saved_architectures``.
        layouts: the layouts the family runs; the first is a base model's default.
        sections: layout -> the paper section a stream checkpoint comes from.
        layout_note: why a layout outside ``layouts`` is refused.
        to_reference: the inverse of ``Model.sanitize`` (MLX -> PyTorch layout).
        keep_fp32: keys that export writes in float32 (exact after ``to_reference``).
        extra_facts: config -> family-specific stream facts for ``config.json``
            (defaults filled in), besides ``num_channels`` and ``multistream``.
    """

    name: str
    model_types: Tuple[str, ...]
    architectures: Dict[str, Optional[str]]
    saved_architectures: Dict[str, str]
    layouts: Tuple[str, ...] = (BLOCKS, ROWS)
    sections: Dict[str, str] = field(default_factory=dict)
    layout_note: str = ""
    to_reference: Callable[[Dict[str, mx.array]], Dict[str, mx.array]] = _same
    keep_fp32: Callable[[str], bool] = _never
    extra_facts: Callable[[dict], dict] = _no_facts
    variant_architectures: Dict[str, Dict[str, str]] = field(default_factory=dict)

    def __post_init__(self):
        assert self.model_types[0] == self.name, "model_types must start with name"
        assert set(self.layouts) <= set(LAYOUTS) and self.layouts
        assert set(self.saved_architectures) == set(self.layouts)
        for model_type, saved in self.variant_architectures.items():
            assert model_type in self.model_types and set(saved) == set(self.layouts)

    def saved_architecture(self, layout: str, model_type: Optional[str]) -> str:
        """The class name convert and export write for a ``model_type`` model in
        ``layout``."""
        return self.variant_architectures.get(model_type, self.saved_architectures)[
            layout
        ]

    def check_layout(self, layout: str, source: str) -> None:
        """One clear error when ``layout`` is not one this family runs."""
        if layout not in self.layouts:
            raise ValueError(
                f"{source} is a {self.name} model, which uses the "
                f"{' or '.join(self.layouts)} layout only{self.layout_note}; got "
                f"layout {layout!r}."
            )


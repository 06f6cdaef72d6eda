# Copyright © 2026 mstream-mlx contributors.
"""Which output streams generate in a run: the *heads* (docs/generation.md#heads).

A model's channel table says which streams exist, not which of them a run should
write: the reference's §5 code gives every checkpoint a 5-row table (system, user,
assistant, auditor, assistant2) whatever it trained, and its evaluation decodes the
user stream plus one assistant head.  So the heads of a run come, in this order,
from the caller (``Session(heads=...)``, ``--heads``), the model folder
(``config.json``'s ``"multistream": {"heads": [...]}``, also set by an adapter's
``adapter_config.json``), the reference evaluation's default for a §5-6 checkpoint
read directly (:func:`reference_heads`), and else every output stream.
"""

from typing import Any, Dict, Optional, Sequence, Tuple, Union

from .streams import BLOCKS, StreamSpec

Heads = Optional[Sequence[Union[str, int]]]


def head_channels(spec: StreamSpec, heads: Sequence[Union[str, int]]) -> Tuple[int, ...]:
    """The channels of ``heads`` (names, case-insensitive, or ids), in the given order.

    Raises:
        ValueError: (one line) an empty list, an unknown stream, an input stream, or a
            stream named twice.
    """
    if isinstance(heads, str):
        heads = [heads]
    outputs = ", ".join(spec.names[c] for c in spec.outputs)
    if not heads:
        raise ValueError(f"heads is empty; name at least one output stream: {outputs}.")
    chosen = []
    for h in heads:
        try:
            c = spec.index(h)
        except ValueError:
            raise ValueError(
                f"Unknown stream {h!r} in heads; the model defines {', '.join(spec.names)}."
            ) from None
        if c in spec.inputs:
            raise ValueError(
                f"Stream {spec.names[c]!r} is an input stream (fed, never sampled); "
                f"heads are output streams: {outputs}."
            )
        if c in chosen:
            raise ValueError(f"Stream {spec.names[c]!r} is named twice in heads.")
        chosen.append(c)
    return tuple(chosen)


def model_heads(model, heads: Heads = None) -> Tuple[int, ...]:
    """The heads of a run on ``model``: ``heads`` if given, else the model folder's
    ``multistream.heads``, else every output stream."""
    spec = model.streams
    if heads is None:
        heads = (getattr(model.args, "multistream", None) or {}).get("heads")
    return spec.outputs if heads is None else head_channels(spec, heads)


def head_names(model, heads: Heads = None) -> Tuple[str, ...]:
    """:func:`model_heads` as stream names."""
    return tuple(model.streams.names[c] for c in model_heads(model, heads))


def reference_heads(config: Dict[str, Any], spec: StreamSpec) -> Optional[list]:
    """The reference evaluation's heads for a checkpoint the reference wrote, else None.

    A §5-6 checkpoint (``Qwen*ForMultiStream``, no ``"multistream"`` entry of ours)
    is decoded by the reference's ``generate_stream``: the user stream plus one
    assistant head (channel 2), whatever the size of its channel table.
    """
    from .models import architectures

    if "multistream" in config or spec.layout != BLOCKS or not spec.outputs:
        return None
    known = architectures()
    archs = config.get("architectures") or []
    if any(a in known and known[a][1] == BLOCKS for a in archs):
        return [spec.names[spec.outputs[0]]]
    return None


def with_default_heads(config: Dict[str, Any], ms: dict, spec: StreamSpec) -> dict:
    """``ms`` (a ``"multistream"`` entry) with its ``heads`` checked, or with the
    reference's default when a checkpoint the reference wrote is read directly."""
    if "heads" in ms:
        head_channels(spec, ms["heads"])
        return ms
    default = reference_heads(config, spec)
    return ms if default is None else {**ms, "heads": default}


def set_folder_heads(
    config: Dict[str, Any], ms: dict, num_channels: int, heads: Heads = None
):
    """Set ``ms["heads"]`` (a converted folder's ``"multistream"`` entry) to ``heads``
    (``--heads``), else the source's, else the reference's default for a checkpoint
    the reference wrote; leave the key out when that is every output stream in order
    (what a folder without it runs)."""
    spec = StreamSpec.from_config(ms, num_channels)
    if heads is None:
        heads = ms.get("heads") or reference_heads(config, spec) or spec.outputs
    chosen = head_channels(spec, heads)
    ms.pop("heads", None)
    if chosen != spec.outputs:
        ms["heads"] = [spec.names[c] for c in chosen]


def trained_heads(spec: StreamSpec, dataset) -> list:
    """The output streams a training set supervises (some labelled token, a non-zero
    stream weight), in channel order: what ``lora`` records in ``adapter_config.json``
    (data with an auditor stream: ``["assistant", "auditor"]``)."""
    seen = set()
    for ex in dataset.examples:
        seen.update(int(c) for c in set(ex.channels[ex.labels].tolist()))
    weights = dataset.stream_weights
    return [spec.names[c] for c in spec.outputs if c in seen and weights[c] > 0]


def adopt_heads(model, heads: Sequence[str]):
    """Make ``heads`` the model's default (adapters trained on them are applied)."""
    head_channels(model.streams, heads)
    model.args.multistream = {**model.args.multistream, "heads": list(heads)}


def parse_heads(text: Optional[str]) -> Optional[list]:
    """``"assistant,auditor"`` (``--heads``) -> ``["assistant", "auditor"]``; None: not given.

    Raises:
        ValueError: an empty list (``--heads ""``, ``--heads ,``).
    """
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(
            f"--heads {text!r} names no stream; give output streams, e.g. "
            "--heads assistant,auditor."
        )
    return names

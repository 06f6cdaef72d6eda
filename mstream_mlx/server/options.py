# Copyright © 2026 mstream-mlx contributors.
"""The server's settings (the CLI flags) and how a request's JSON overrides them.

Requests use the OpenAI names (``temperature``, ``top_p``, ``max_tokens``, ``seed``
...) for both APIs; every value is type-checked here, and range checks are left to
:class:`~mstream_mlx.SamplingSettings` and :class:`~mstream_mlx.Session`, whose
``ValueError`` lines become the 400 message.
"""

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from mstream_mlx import BlocksOptions, SamplingSettings
from mstream_mlx.cache import KVFlags

LIVE_ROWS_STEPS = 100_000  # rows: a live session has no row limit worth meeting
SAMPLERS = ("reference", "mlx")


@dataclass
class ServerConfig(KVFlags):
    """What ``mstream-mlx server`` was asked for; the request-free defaults.

    Args:
        model: model folder or Hub id, as ``mstream_mlx.load`` takes it.
        model_id: the id ``/v1/models`` lists and responses echo.
        adapter_path: LoRA adapters to apply.
        host, port: where to listen (mlx_lm.server's defaults).
        temp, top_p, top_k, min_p, repetition_penalty, presence_penalty: default
            sampling for every output stream (a request may override each).
        sampler: ``reference`` (the layout's token selection) or ``mlx``.
        seed: seed of the MLX random generator, set once at start.
        max_tokens: per output stream (``Session``'s ``max_tokens``; ``None``: its default).
        max_steps: decode timesteps of a chat completion (``None``: ``Session``'s default).
        system_prompt: the default system prompt (blocks: the system block; rows: read
            first on the user stream).
        head_prefill: blocks: text after ``assistant\\n`` for each head.
        stop_all_on_last_head: blocks: the last head's stop token stops every head.
        tick: live sessions' default seconds per timestep (0: as fast as the model goes).
        max_sessions: sessions (live ones and running completions) at once; one more is 429.
        max_body: request bodies larger than this many bytes are 413.
        idle_timeout: seconds a live session nobody listens to is kept.
        heads: the output streams that generate (``None``: the model's); a request's
            ``"heads"`` (a list of names) overrides it.
        kv_bits, kv_group_size, quantized_kv_start, kv_window: every session's KV
            cache bounds (:class:`~mstream_mlx.cache.KVFlags`).
    """

    model: str
    model_id: str = "default_model"
    adapter_path: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8080
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 0.0
    presence_penalty: float = 0.0
    sampler: str = "reference"
    seed: Optional[int] = None
    max_tokens: Optional[int] = None
    max_steps: Optional[int] = None
    system_prompt: Optional[str] = None
    head_prefill: Sequence[str] = field(default_factory=tuple)
    stop_all_on_last_head: bool = True
    tick: float = 0.2
    max_sessions: int = 8
    max_body: int = 1 << 20
    idle_timeout: float = 60.0
    heads: Optional[Sequence[str]] = None

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(
                f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}."
            )
        if self.tick < 0:
            raise ValueError(f"--tick must be >= 0 seconds, got {self.tick}.")
        if self.max_sessions < 1:
            raise ValueError(f"--max-sessions must be >= 1, got {self.max_sessions}.")
        if self.max_body < 1:
            raise ValueError(f"--max-body must be >= 1 byte, got {self.max_body}.")
        super().__post_init__()
        # the defaults must make a valid SamplingSettings: fail at start, not per request
        SamplingSettings(
            temp=self.temp, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
        )


def number(body: Mapping[str, Any], key: str, default, kind=float):
    """``body[key]`` as ``kind`` (int or float), ``default`` when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{key!r} must be {what}, got {value!r}.")
    return kind(value)


def text(body: Mapping[str, Any], key: str, default: Optional[str] = None) -> Optional[str]:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}.")
    return value


def heads(body: Mapping[str, Any], default: Optional[Sequence[str]]):
    """A request's ``"heads"``: a list of output stream names (``Session`` checks them)."""
    value = body.get("heads")
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'heads' must be a list of stream names, got {value!r}.")
    return value


def session_kwargs(
    model, cfg: ServerConfig, body: Mapping[str, Any], *, live: bool
) -> dict:
    """``Session`` keyword arguments from the server's defaults and a request body.

    Args:
        live: a live session (rows: interactive, no row limit; blocks: the user block
            stays open until the client closes it) rather than a chat completion (the
            ``generate`` run: the prompt is read, then the model answers and stops).
    """
    blocks = model.streams.layout == "blocks"
    method = cfg.sampler if cfg.sampler == "mlx" else ("blocks" if blocks else "rows")
    max_tokens = number(body, "max_completion_tokens", None, int)
    if max_tokens is None:
        max_tokens = number(body, "max_tokens", cfg.max_tokens, int)
    seed = number(body, "seed", None, int)
    sampling = SamplingSettings(
        temp=number(body, "temperature", cfg.temp),
        top_p=number(body, "top_p", cfg.top_p),
        top_k=number(body, "top_k", cfg.top_k, int),
        min_p=number(body, "min_p", cfg.min_p),
        repetition_penalty=number(body, "repetition_penalty", cfg.repetition_penalty),
        presence_penalty=number(body, "presence_penalty", cfg.presence_penalty),
        frequency_penalty=number(body, "frequency_penalty", 0.0),
        seed=seed,  # a private random stream per output stream: one request, one result
        method=method,
    )
    kwargs = dict(
        sampling=sampling, max_tokens=max_tokens, heads=heads(body, cfg.heads),
        **cfg.session_kwargs(),
    )
    if blocks:
        kwargs["max_steps"] = cfg.max_steps
        kwargs["blocks"] = BlocksOptions(
            head_prefill=tuple(cfg.head_prefill), close_user=not live,
            stop_all_on_last_head=cfg.stop_all_on_last_head,
        )
    elif live:
        kwargs.update(max_steps=LIVE_ROWS_STEPS, interactive=True)
    else:
        kwargs["max_steps"] = cfg.max_steps
    return kwargs


def shown_streams(spec, heads: Optional[Sequence[int]] = None) -> list:
    """The streams an event carries: all but the blocks system stream and the output
    streams that are not ``heads`` (channels), as ``generate --format jsonl`` shows them."""
    return [
        n for c, n in enumerate(spec.names)
        if not (spec.layout == "blocks" and c == 0)
        and (heads is None or c in spec.inputs or c in heads)
    ]

# Copyright © 2026 mstream-mlx contributors.
"""A multi-stream generation session: feed input streams at any time, advance one
timestep at a time, receive every stream's tokens and text as they are born.

The pattern for apps (a UI thread feeds, a worker steps)::

    session = Session(model, tokenizer, sampling=SamplingSettings(temp=0.7))
    session.feed("User", "what is two plus two")   # before or during generation

    def worker():                                   # the only thread that steps
        for event in session:                       # until every output stream stopped
            ui_queue.put(event)

    threading.Thread(target=worker).start()
    session.feed("User", "wait, three plus three")  # from the UI thread: an interrupt
    session.stop()                                  # from any thread: end the run

``feed``, ``close`` and ``stop`` only touch small queues under a lock, so they never
wait for the model; ``step`` is serialised by its own lock (one stepping thread).
"""

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .cache import load_prompt_cache, save_prompt_cache
from .mask import make_mask
from .prefill import DEFAULT_PREFILL_STEP, prefill
from .sample import SamplingSettings, SilencePenalty, StreamSampler
from .schedules import (
    LAZY,
    BlocksOptions,
    BlocksSchedule,
    Plan,
    RowsOptions,
    RowsSchedule,
)
from .streams import BLOCKS, Flat, timestep_order

DEFAULT_MAX_TOKENS = (
    256  # blocks: tokens per assistant head (mlx-lm's generate_step default)
)
DEFAULT_MAX_ROWS = 200  # rows: decode rows (the reference's max_rows)
DEFAULT_MAX_STEPS = 4096  # blocks: decode steps (the reference's max_steps)
PREFIX_KEY = (
    "mstream_prefix"  # prompt-cache metadata: the cached tokens (ids, channels, y)
)

# As mlx-lm does: a stream on the default device just for generation, per thread.
generation_stream = mx.new_thread_local_stream(mx.default_device())


@dataclass
class StepEvent:
    """What one timestep produced (mlx-lm's ``GenerationResponse``, per stream).

    ``tokens``/``text`` have an entry for every stream.  For an output stream: the
    token written at this step (silence included in the rows layout; ``None`` when the
    stream is not producing) and its decoded text delta (silence and stop tokens
    decode to ``""``).  For an input stream: the token the model *read* at this step
    (``None`` for none or silence) — outputs can react to it from the next step on.

    Args:
        t: event index, 0 for the first event after the prompt.
        tokens: ``{stream: id | None}``.
        text: ``{stream: delta}``.
        y: ``{stream: timestep}`` of every token in ``tokens``.
        finished: ``{stream: "stop" | "length"}`` for streams that ended here.
        finish_reason: ``"stop"`` or ``"length"`` on the last event, else ``None``.
        prompt_tokens, prompt_tps: prompt size and prefill speed.
        generation_timesteps, timesteps_per_sec: decode steps so far and their rate.
        generation_tokens, tokens_per_sec: output tokens so far and their rate.
        ttft: seconds from the first ``step()`` to the first token of the first output
            stream that is not silence (``None`` until then).
        ttft_timesteps: timesteps from the first input token (or from the start, with
            no input) to that output token.
        peak_memory: peak memory so far, GB.
        logits_summary: with ``record_logits``: ``{stream: (entropy, top1_prob, top1_id)}``
            of the sampled logits after penalties (the reference's ``logits_summary``).
    """

    t: int
    tokens: Dict[str, Optional[int]]
    text: Dict[str, str]
    y: Dict[str, int]
    finished: Dict[str, str]
    finish_reason: Optional[str]
    prompt_tokens: int
    prompt_tps: float
    generation_timesteps: int
    timesteps_per_sec: float
    generation_tokens: int
    tokens_per_sec: float
    ttft: Optional[float]
    ttft_timesteps: Optional[int]
    peak_memory: float
    logits_summary: Optional[Dict[str, tuple]] = None

    def to_json(self, streams: Optional[Sequence[str]] = None) -> str:
        """One line of ``--format jsonl``: ``{"t", "tokens", "text"}`` (+ finish)."""
        names = list(streams) if streams is not None else list(self.tokens)
        out = {
            "t": self.t,
            "tokens": {n: self.tokens[n] for n in names},
            "text": {n: self.text[n] for n in names},
        }
        if self.finished:
            out["finished"] = {n: r for n, r in self.finished.items() if n in names}
        if self.finish_reason:
            out["finish_reason"] = self.finish_reason
        if self.logits_summary:
            out["logits"] = {n: v for n, v in self.logits_summary.items() if n in names}
        return json.dumps(out, ensure_ascii=False)


@dataclass
class _Inflight:
    plan: Plan
    tokens: object  # mx.array [n] (lazy) or a host list
    n_fed: int = 0
    summary: Optional[mx.array] = None
    keys: Optional[dict] = None  # per-stream RNG keys before this launch


@dataclass
class _Stats:
    start: float = 0.0
    prompt_time: float = 0.0
    prompt_tokens: int = 0
    prompt_processed: int = 0
    gen_start: float = 0.0
    timesteps: int = 0
    tokens: int = 0
    ttft: Optional[float] = None
    ttft_timesteps: Optional[int] = None
    first_input_y: Optional[int] = None
    first_y: Optional[int] = None


class Session:
    """Multi-stream generation over a loaded model, one timestep per :meth:`step`.

    Args:
        model, tokenizer: from ``mstream_mlx.load``; ``model.streams`` says which
            streams exist, which are inputs and the layout.
        sampling: one :class:`SamplingSettings` for every output stream, or a mapping
            ``{stream name: settings}`` (``"*"`` = the default for the others).  Default:
            greedy, with the layout's reference token selection (``method="rows"`` or
            ``"blocks"``; mlx-lm's chain is ``method="mlx"``).
        max_tokens: per output stream (int, or ``{name: int}``): rows count non-silence
            tokens (the stream is then silenced), blocks count every generated token
            (the reference's ``max_new_tokens``).  Default: rows none, blocks 256.
        stop_tokens: ``{name: [ids or single-token strings]}`` ending a stream.  Default:
            blocks ``<|im_end|>`` for every head, rows none.
        max_steps: decode steps after the first event (rows: the reference's
            ``max_rows``, default 200; blocks: ``max_steps``, default 4096).
        rows, blocks: layout knobs (:class:`RowsOptions`, :class:`BlocksOptions`).
        interactive: rows only.  ``None``: the reference's rule, interactive iff
            nothing was fed before the first step.  Interactive runs never stop on
            silence; a token fed between two steps overwrites the user cell of the row
            just produced.
        max_kv_size: most tokens the cache may hold.  Reaching it ends the run with
            ``finish_reason == "length"`` (no eviction: a multi-stream key's visibility
            depends on its timestep, and dropping the prompt would change every answer).
            A prompt larger than this is a ``ValueError``.
        prompt_cache_file: a ``.safetensors`` prompt cache.  If it exists, its tokens
            must be the start (in timestep order) of this prompt and are not recomputed;
            if not, the shared part of the prompt (blocks: the system block; rows: all
            prefill rows but the last) is computed and saved there first.
        prefill_step_size: tokens per prefill chunk.
        pipeline: launch step ``k+1`` before reading step ``k`` (mlx-lm's
            ``async_eval`` double-buffering).  ``None``: on, except in rows interactive
            mode, where a feed must still be able to change the row just produced.
            With pipelining a feed lands one timestep later.  Greedy and per-stream
            seeded results are the same either way; sampling from the global MLX RNG
            may differ when a launched step is redone (a head stopped).
        record_logits: fill ``StepEvent.logits_summary``.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        sampling: Union[SamplingSettings, Mapping[str, SamplingSettings], None] = None,
        max_tokens: Union[int, Mapping[str, int], None] = None,
        stop_tokens: Optional[Mapping[str, Sequence[Union[int, str]]]] = None,
        max_steps: Optional[int] = None,
        rows: Optional[RowsOptions] = None,
        blocks: Optional[BlocksOptions] = None,
        interactive: Optional[bool] = None,
        max_kv_size: Optional[int] = None,
        prompt_cache_file: Optional[str] = None,
        prefill_step_size: int = DEFAULT_PREFILL_STEP,
        pipeline: Optional[bool] = None,
        record_logits: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec = model.streams
        self.names = list(spec.names)
        self.layout = spec.layout
        if max_kv_size is not None and max_kv_size < 1:
            raise ValueError(f"max_kv_size must be >= 1, got {max_kv_size}.")
        if prefill_step_size < 1:
            raise ValueError(
                f"prefill_step_size must be >= 1, got {prefill_step_size}."
            )
        method = "blocks" if self.layout == BLOCKS else "rows"
        per_channel = self._per_output(
            sampling, "sampling", SamplingSettings(method=method)
        )
        caps = self._per_output(
            max_tokens,
            "max_tokens",
            DEFAULT_MAX_TOKENS if self.layout == BLOCKS else None,
        )
        if any(v is not None and v < 1 for v in caps.values()):
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
        stops = self._stop_tokens(stop_tokens)
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}.")
        if self.layout == BLOCKS:
            if rows is not None or interactive is not None:
                raise ValueError(
                    "rows options and interactive apply to the rows layout only."
                )
            self.schedule = BlocksSchedule(
                spec,
                tokenizer,
                blocks or BlocksOptions(),
                max_steps=DEFAULT_MAX_STEPS if max_steps is None else max_steps,
                max_tokens=caps,
                stop_tokens=stops,
            )
        else:
            if blocks is not None:
                raise ValueError("blocks options apply to the blocks layout only.")
            self.schedule = RowsSchedule(
                spec,
                tokenizer,
                rows or RowsOptions.for_model(model),
                max_steps=DEFAULT_MAX_ROWS if max_steps is None else max_steps,
                max_tokens=caps,
                stop_tokens=stops,
                interactive=interactive,
            )
        vocab = model.args.vocab_size
        input_default = per_channel[spec.outputs[0]]
        settings = {**{c: input_default for c in spec.inputs}, **per_channel}
        self.sampler = StreamSampler(
            settings, vocab, exclude_from_history=spec.silence_token
        )
        self.max_kv_size = max_kv_size
        self.prompt_cache_file = prompt_cache_file
        self.prefill_step_size = prefill_step_size
        self._pipeline_arg = pipeline
        self.pipeline = bool(pipeline)
        self.record_logits = record_logits
        self.cache = model.make_cache()
        self._key_sil: Optional[mx.array] = (
            None  # rows skip_silence: silence flag per key
        )
        self._lock = threading.Lock()  # queues and flags (feed/close/stop vs step)
        self._step_lock = threading.Lock()  # one step at a time
        self._inflight: Optional[_Inflight] = None
        self._started = False
        self._stop_requested = False
        self._t = 0
        self._stats = _Stats()
        self.detokenizers = {c: tokenizer.detokenizer for c in range(spec.num_channels)}
        self.tokens: Dict[str, List[int]] = {n: [] for n in self.names}
        self.texts: Dict[str, str] = {n: "" for n in self.names}

    # ------------------------------------------------------------ configuration
    def _output_channel(self, name) -> int:
        c = self.spec.index(name)
        if c in self.spec.inputs:
            raise ValueError(
                f"Stream {self.names[c]!r} is an input stream (fed, never sampled); "
                f"output streams are {', '.join(self.names[o] for o in self.spec.outputs)}."
            )
        return c

    def _per_output(self, value, what: str, default) -> dict:
        if not isinstance(value, Mapping):
            return {c: default if value is None else value for c in self.spec.outputs}
        base = value.get("*", default)
        out = {c: base for c in self.spec.outputs}
        for name, v in value.items():
            if name != "*":
                out[self._output_channel(name)] = v
        return out

    def _token_id(self, tok) -> int:
        if isinstance(tok, str):
            ids = self.tokenizer.encode(tok, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(
                    f"Stop token {tok!r} is {len(ids)} tokens; it must be one."
                )
            return ids[0]
        return int(tok)

    def _stop_tokens(self, stop_tokens) -> Dict[int, set]:
        if stop_tokens is None:
            if self.layout != BLOCKS:
                return {}
            im_end = self._token_id("<|im_end|>")
            return {c: {im_end} for c in self.spec.outputs}
        if not isinstance(stop_tokens, Mapping):
            ids = {self._token_id(t) for t in stop_tokens}
            return {c: ids for c in self.spec.outputs}
        return self._per_output(
            {k: {self._token_id(t) for t in v} for k, v in stop_tokens.items()},
            "stop_tokens",
            set(),
        )

    # ------------------------------------------------------------------ inputs
    def tokenize(self, stream, text: str) -> List[int]:
        """How text enters ``stream``: rows split words and encode each as
        ``" " + word`` (one token per row, sec7 §1.3); blocks encode the text as is."""
        if self.layout == BLOCKS:
            return self.tokenizer.encode(text, add_special_tokens=False)
        ids = []
        for word in text.split():
            ids += self.tokenizer.encode(" " + word, add_special_tokens=False)
        return ids

    def feed(self, stream, text_or_tokens: Union[str, Sequence[int]]) -> int:
        """Queue text or token ids on an input stream; safe from any thread.

        The tokens enter the stream at the next timesteps not yet fed to the model, one
        per timestep.  Returns the number of tokens queued.
        """
        c = self.spec.index(stream)
        name = self.names[c]
        if c not in self.spec.inputs:
            raise ValueError(
                f"Stream {name!r} is an output stream (sampled); feed an input stream: "
                f"{', '.join(self.names[i] for i in self.spec.inputs)}."
            )
        if isinstance(text_or_tokens, str):
            ids = self.tokenize(c, text_or_tokens)
        else:
            ids = [int(t) for t in text_or_tokens]
            vocab = self.model.args.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"Token id {bad[0]} is outside the vocabulary (0..{vocab - 1})."
                )
        if not ids:
            raise ValueError(f"Nothing to feed to {name!r}: the text gives no tokens.")
        with self._lock:
            sched = self.schedule
            if sched.done:
                raise RuntimeError(
                    f"The session has finished ({sched.finish_reason}); nothing reads {name!r}."
                )
            if self.layout == BLOCKS and c == 0 and sched.started:
                raise ValueError(
                    f"{name!r} is fixed once generation starts; feed it before the first step()."
                )
            if self.layout == BLOCKS and c == 1 and sched.closing:
                raise ValueError(
                    f"The {name!r} block was closed with <|im_end|>; feed before it closes, "
                    "or pass BlocksOptions(close_user=False) and call close() when done."
                )
            sched.queues[c].extend(ids)
        return len(ids)

    def close(self, stream="user"):
        """Blocks layout: end the user block with ``<|im_end|>`` once its queue is fed."""
        if self.layout != BLOCKS or self.spec.index(stream) != 1:
            raise ValueError("Only the blocks layout's user stream can be closed.")
        with self._lock:
            self.schedule.close_requested = True

    def stop(self):
        """End the run at the next :meth:`step` (safe from any thread)."""
        with self._lock:
            self._stop_requested = True

    def queued(self, stream=None) -> int:
        """Input tokens fed but not read yet, on ``stream`` or on every input stream."""
        chans = self.spec.inputs if stream is None else (self.spec.index(stream),)
        with self._lock:
            return sum(len(self.schedule.queues[c]) for c in chans)

    @property
    def done(self) -> bool:
        return self.schedule.done

    @property
    def finish_reason(self) -> Optional[str]:
        return self.schedule.finish_reason

    # ------------------------------------------------------------------ running
    def __iter__(self):
        while not self.done:
            yield self.step()

    def step(self) -> StepEvent:
        """Advance one timestep and return what every stream produced.

        Raises:
            RuntimeError: if the session has already finished.
        """
        with self._step_lock, mx.stream(generation_stream):
            if self.done:
                raise RuntimeError(f"The session has finished ({self.finish_reason}).")
            with self._lock:
                stop = self._stop_requested
            if stop:
                self._cancel()
                self.schedule.finish("stop")
                return self._event({}, {}, {})
            sched = self.schedule
            cur = self._inflight
            self._inflight = None
            if cur is None:
                if not self._started:
                    cur = self._start()
                else:
                    with self._lock:
                        plan = sched.plan()
                    if plan is None or not self._fits(plan):
                        sched.finish("length")
                        return self._event({}, {}, {})
                    cur = self._launch(plan)
                    with self._lock:
                        sched.advance(plan, cur.tokens)
                    self.sampler.record(cur.tokens, plan.sample_channels)
            nxt = self._launch_next() if self.pipeline else None
            values = cur.tokens if isinstance(cur.tokens, list) else cur.tokens.tolist()
            with self._lock:
                settled = sched.settle(cur.plan, values)
            if cur.plan.kind != "decode":
                self._stats.prompt_time = time.perf_counter() - self._stats.start
                self._stats.gen_start = time.perf_counter()
            else:
                self._stats.timesteps += 1
            if nxt is not None and sched.invalidates(nxt.plan):
                self._undo(nxt)
                nxt = None if sched.done else self._launch_next()
            if nxt is not None:
                with self._lock:
                    sched.advance(nxt.plan, nxt.tokens)
                self.sampler.record(nxt.tokens, nxt.plan.sample_channels)
            self._inflight = nxt
            if (
                not sched.done
                and nxt is None
                and (
                    sched.exhausted()
                    or (self.max_kv_size is not None and not self._can_fit_next())
                )
            ):
                sched.finish("length")
            if self._stats.timesteps % 256 == 0:
                mx.clear_cache()
            if settled is None:  # rows: an all-silent row ended the run, not reported
                return self._event({}, {}, {})
            summary = None
            if cur.summary is not None:
                summary = {
                    c: tuple(v)
                    for c, v in zip(cur.plan.sample_channels, cur.summary.tolist())
                }
            reads = {c: t for c, t in cur.plan.read.items()}
            return self._event(
                settled.tokens, settled.ys, settled.finished, reads, cur.plan, summary
            )

    # ---------------------------------------------------------------- internals
    def _start(self) -> _Inflight:
        self._started = True
        self._stats.start = time.perf_counter()
        with self._lock:
            plan = self.schedule.first_plan()
        if self._pipeline_arg is None:
            self.pipeline = not (self.layout != BLOCKS and self.schedule.interactive)
        if any(self.schedule.queues[c] for c in self.spec.inputs[-1:]):
            # input queued before the start: it enters at the schedule's first input slot
            rows = self.layout != BLOCKS
            self._stats.first_input_y = (
                self.schedule.pre_think if rows else self.schedule.y0 + 3
            )
        if plan.kind == "seed":
            if self.prompt_cache_file:
                raise ValueError(
                    "This prompt has no shared part to cache: the rows seed mode prefills "
                    "nothing (give prefill rows)."
                )
            cur = _Inflight(plan, list(plan.seed_tokens))
            with self._lock:
                self.schedule.advance(plan, None)
            return cur
        cur = self._prefill(plan)
        with self._lock:
            self.schedule.advance(plan, cur.tokens)
        self.sampler.record(cur.tokens, plan.sample_channels)
        return cur

    def _fits(self, plan: Plan) -> bool:
        return (
            self.max_kv_size is None
            or self.cache[0].offset + len(plan.ids) <= self.max_kv_size
        )

    def _can_fit_next(self) -> bool:
        with self._lock:
            plan = self.schedule.plan()
        return plan is None or self._fits(plan)

    def _launch_next(self) -> Optional[_Inflight]:
        with self._lock:
            plan = self.schedule.plan()
        if plan is None or not self._fits(plan):
            return None
        return self._launch(plan)

    def _undo(self, inflight: _Inflight):
        """Take a launched-but-unwanted step back out of the cache."""
        for c in self.cache:
            c.trim(inflight.n_fed)
        if self._key_sil is not None:
            self._key_sil = self._key_sil[: self.cache[0].offset]
        if inflight.keys is not None:
            self.sampler.keys = inflight.keys

    def _cancel(self):
        if self._inflight is not None:
            self._undo(self._inflight)
            self._inflight = None

    def _assemble(self, plan: Plan) -> mx.array:
        host = [i for i, t in enumerate(plan.ids) if t is not LAZY]
        lazy = [i for i, t in enumerate(plan.ids) if t is LAZY]
        parts = []
        if host:
            parts.append(mx.array([plan.ids[i] for i in host], dtype=mx.int32))
        if lazy:
            parts.append(plan.lazy_src.astype(mx.int32))
        ids = mx.concatenate(parts) if len(parts) > 1 else parts[0]
        order = host + lazy
        if order != list(range(len(order))):
            inverse = np.empty(len(order), dtype=np.int32)
            inverse[order] = np.arange(len(order))
            ids = ids[mx.array(inverse)]
        return ids[None]  # (1, L)

    def _mask(
        self, ids: mx.array, positions: mx.array, decode: bool
    ) -> Optional[mx.array]:
        """An explicit mask for the reference's mask knobs, else ``None`` (the rule)."""
        skip = self.layout != BLOCKS and self.schedule.opts.skip_silence
        same = (
            decode
            and self.layout == BLOCKS
            and self.schedule.opts.allow_same_step_visible
        )
        if not (skip or same):
            return None
        mask = make_mask(positions, self.cache[0])  # (1, 1, L, S)
        L, S = positions.shape[1], mask.shape[-1]
        offset = S - L
        if same:  # a query sees tokens fed before it in this call
            tril = mx.tril(mx.ones((L, L), dtype=mx.bool_), k=-1)
            mask = mx.concatenate(
                [mask[..., :offset], mask[..., offset:] | tril], axis=-1
            )
        if skip:
            sil = ids[0] == self.spec.silence_token
            keys = (
                sil if self._key_sil is None else mx.concatenate([self._key_sil, sil])
            )
            itself = mx.arange(S)[None, :] == (offset + mx.arange(L))[:, None]
            mask = mask & (~keys[None, :] | itself)
            self._key_sil = keys
        return mask

    def _sample(self, logits: mx.array, plan: Plan) -> _Inflight:
        """Penalties and sampling of ``logits`` ``[n, V]`` for ``plan.sample_channels``."""
        logits = logits.astype(mx.float32)
        if plan.penalties is not None and plan.ramp:
            logits = SilencePenalty(self.spec.silence_token, plan.penalties, plan.ramp)(
                None, logits
            )
        keys = dict(self.sampler.keys) if self.sampler.keys else None
        tokens = self.sampler(logits, plan.sample_channels)
        summary = None
        if self.record_logits:
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            entropy = -(mx.exp(logp) * logp).sum(axis=-1)
            top = mx.argmax(logits, axis=-1)
            p1 = mx.exp(mx.take_along_axis(logp, top[:, None], axis=-1)[:, 0])
            summary = mx.stack([entropy, p1, top.astype(mx.float32)], axis=-1)
        mx.async_eval(tokens)
        return _Inflight(plan, tokens, len(plan.ids), summary, keys)

    def _launch(self, plan: Plan) -> _Inflight:
        ids = self._assemble(plan)
        positions = mx.array([plan.ys], dtype=mx.int32)
        channels = mx.array([plan.channels], dtype=mx.int32)
        mask = self._mask(ids, positions, decode=True)
        h = self.model.model(ids, channels, positions, self.cache, mask)
        logits = self.model.lm_logits(h[0, mx.array(plan.sample_rows)])
        return self._sample(logits, plan)

    def _prefill(self, plan: Plan) -> _Inflight:
        flat = plan.flat
        if self.max_kv_size is not None and len(flat) > self.max_kv_size:
            raise ValueError(
                f"The prompt needs {len(flat)} cache entries but max_kv_size is {self.max_kv_size}."
            )
        order = timestep_order(flat.positions)
        where = np.empty_like(order)
        where[order] = np.arange(len(order))
        sflat = flat.take(order)
        wanted = [int(where[i]) for i in plan.sample_at]
        done = 0
        path = Path(self.prompt_cache_file) if self.prompt_cache_file else None
        if path is not None and path.exists():
            done = self._load_prompt_cache(path, sflat, min(wanted))
        elif path is not None:
            if plan.shared == 0:
                raise ValueError(
                    "This prompt has no shared part to cache (rows: give prefill rows; "
                    "a seed row is not cached)."
                )
            self._forward_flat(Flat(*(a[: plan.shared] for a in sflat.astuple())), [])
            meta = {
                PREFIX_KEY: json.dumps(
                    [a[: plan.shared].tolist() for a in sflat.astuple()]
                ),
                "model_type": str(self.model.args.model_type),
                "layout": self.layout,
            }
            save_prompt_cache(str(path), self.cache, meta)
            done = plan.shared
        rest = Flat(*(a[done:] for a in sflat.astuple()))
        logits = self._forward_flat(rest, [w - done for w in wanted])
        self._stats.prompt_tokens = len(flat)
        self._stats.prompt_processed = len(rest)
        return self._sample(logits, plan)

    def _forward_flat(self, flat: Flat, logits_at: List[int]) -> Optional[mx.array]:
        """Prefill ``flat`` (already in timestep order) into the cache."""
        if len(flat) == 0:
            return None
        skip = self.layout != BLOCKS and self.schedule.opts.skip_silence
        return prefill(
            self.model,
            flat,
            self.cache,
            logits_at=logits_at,
            step=self.prefill_step_size,
            # skip_silence needs an explicit mask per chunk
            mask_fn=(lambda i, p: self._mask(i, p, decode=False)) if skip else None,
        )

    def _load_prompt_cache(self, path: Path, sflat: Flat, limit: int) -> int:
        cache, meta = load_prompt_cache(str(path), return_metadata=True)
        if PREFIX_KEY not in meta:
            raise ValueError(
                f"{path} is not an mstream-mlx prompt cache (no {PREFIX_KEY!r})."
            )
        cached = [np.asarray(a, dtype=np.int32) for a in json.loads(meta[PREFIX_KEY])]
        n = len(cached[0])
        mine = [a[:n] for a in sflat.astuple()]
        if n > limit or not all(np.array_equal(a, b) for a, b in zip(cached, mine)):
            raise ValueError(
                f"The prompt cache {path} was made for another prompt; delete it or "
                "pass another --prompt-cache-file."
            )
        if len(cache) != len(self.cache):
            raise ValueError(
                f"The prompt cache {path} has {len(cache)} layers, not {len(self.cache)}."
            )
        self.cache = cache
        if (
            self._key_sil is None
            and self.layout != BLOCKS
            and self.schedule.opts.skip_silence
        ):
            self._key_sil = mx.array(cached[0] == self.spec.silence_token)
        return n

    def _event(
        self, tokens, ys, finished, reads=None, plan=None, summary=None
    ) -> StepEvent:
        st = self._stats
        now = time.perf_counter()
        sil = self.spec.silence_token
        out_tok: Dict[str, Optional[int]] = {n: None for n in self.names}
        text: Dict[str, str] = {n: "" for n in self.names}
        y: Dict[str, int] = {}
        stops = self.schedule.stop_tokens
        for c, tok in (reads or {}).items():
            if tok == sil:
                continue
            name = self.names[c]
            out_tok[name] = tok
            y[name] = plan.ys[plan.channels.index(c)]
            if st.first_input_y is None:
                st.first_input_y = y[name]
            self._add_text(c, tok, text, skip=self._is_close(c, tok))
        first = self.spec.outputs[0]
        for c, tok in tokens.items():
            if tok is None:
                continue
            name = self.names[c]
            out_tok[name] = tok
            y[name] = ys[c]
            st.tokens += 1
            if st.first_y is None:
                st.first_y = ys[c]
            self._add_text(c, tok, text, skip=tok == sil or tok in stops.get(c, ()))
            if (
                c == first
                and st.ttft is None
                and tok != sil
                and tok not in stops.get(c, ())
            ):
                st.ttft = now - st.start
                origin = (
                    st.first_input_y if st.first_input_y is not None else st.first_y
                )
                st.ttft_timesteps = ys[c] - origin
        done = self.done
        for c in range(len(self.names)):
            if done or c in finished:
                det = self.detokenizers[c]
                det.finalize()
                text[self.names[c]] += det.last_segment
        for n, tok in out_tok.items():
            if tok is not None:
                self.tokens[n].append(tok)
        gen_time = max(now - st.gen_start, 1e-9) if st.gen_start else 0.0
        event = StepEvent(
            t=self._t,
            tokens=out_tok,
            text=text,
            y=y,
            finished={self.names[c]: r for c, r in finished.items()},
            finish_reason=self.finish_reason if done else None,
            prompt_tokens=st.prompt_tokens,
            prompt_tps=st.prompt_processed / st.prompt_time if st.prompt_time else 0.0,
            generation_timesteps=st.timesteps,
            timesteps_per_sec=st.timesteps / gen_time if gen_time else 0.0,
            generation_tokens=st.tokens,
            tokens_per_sec=st.tokens / gen_time if gen_time else 0.0,
            ttft=st.ttft,
            ttft_timesteps=st.ttft_timesteps,
            peak_memory=mx.get_peak_memory() / 1e9,
            logits_summary=(
                {self.names[c]: v for c, v in summary.items()} if summary else None
            ),
        )
        for n, delta in text.items():
            self.texts[n] += delta
        self._t += 1
        return event

    def _is_close(self, c: int, tok: int) -> bool:
        return self.layout == BLOCKS and c == 1 and tok == self.schedule.chat.im_end

    def _add_text(self, c: int, tok: int, text: Dict[str, str], skip: bool):
        if skip:
            return
        det = self.detokenizers[c]
        det.add_token(tok)
        text[self.names[c]] += det.last_segment

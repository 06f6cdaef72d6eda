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

import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

import mlx.core as mx

from .cache import KVPolicy
from .events import EventLog, StepEvent
from .plans import DecodePlan, Plan, PrefillPlan, SeedPlan, per_output
from .prefill import DEFAULT_PREFILL_STEP, in_timestep_order, prefill
from .prompt_cache import load_prefix, save_prefix
from .sample import SamplingSettings, StreamSampler, logits_summary
from .schedules import BlocksOptions, RowsOptions, schedule_class
from .step import step as forward_step
from .streams import Flat
from .vocab import check_ids

__all__ = ["Session", "StepEvent", "generation_stream"]

# As mlx-lm does: a stream on the default device just for generation, per thread.
generation_stream = mx.new_thread_local_stream(mx.default_device())


@dataclass
class _Inflight:
    plan: Plan
    tokens: object  # mx.array [n] (lazy) or a host list
    n_fed: int = 0
    summary: Optional[mx.array] = None
    keys: Optional[dict] = None  # per-stream RNG keys before this launch


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
        heads: output streams that generate, in order (default: the model's; docs/generation.md).
        kv_bits, kv_group_size, quantized_kv_start, max_kv_timesteps: a bounded cache
            for long runs (:class:`~mstream_mlx.cache.KVPolicy`, docs/long-sessions.md).
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
        heads: Optional[Sequence[str]] = None,
        kv_bits: Optional[int] = None, kv_group_size: int = 64,
        quantized_kv_start: int = 5000, max_kv_timesteps: Optional[int] = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec = model.streams
        self.names = list(spec.names)
        if prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be >= 1, got {prefill_step_size}.")
        kind = schedule_class(spec.layout)
        default = SamplingSettings(method=kind.sampling_method)
        per_channel = per_output(spec, sampling, default)
        self.schedule = kind.from_options(
            model, tokenizer, rows=rows, blocks=blocks, interactive=interactive,
            max_steps=max_steps, max_tokens=max_tokens, stop_tokens=stop_tokens,
            heads=heads,
        )
        input_default = per_channel[spec.outputs[0]]
        settings = {**{c: input_default for c in spec.inputs}, **per_channel}
        self.sampler = StreamSampler(
            settings, model.args.vocab_size, exclude_from_history=spec.silence_token
        )
        self.max_kv_size = max_kv_size
        self.prompt_cache_file = prompt_cache_file
        self.prefill_step_size = prefill_step_size
        self._pipeline_arg = pipeline
        self.pipeline = bool(pipeline)
        self.record_logits = record_logits
        self.cache = model.make_cache()
        self.kv = KVPolicy.for_model(model, self.cache, max_kv_size, kv_bits, kv_group_size,
                                     quantized_kv_start, max_kv_timesteps)
        self._lock = threading.Condition()  # queues and flags (feed/close/stop vs step)
        self._step_lock = threading.Lock()  # one step at a time
        self._inflight: Optional[_Inflight] = None
        self._started = False
        self._stop_requested = False
        self._log = EventLog(self.schedule, tokenizer)
        self._stats = self._log.stats
        self.detokenizers = self._log.detokenizers
        self.tokens = self._log.tokens  # {stream: every token reported}
        self.texts = self._log.texts  # {stream: its text so far}

    # ------------------------------------------------------------------ inputs
    def tokenize(self, stream, text: str) -> List[int]:
        """How text enters ``stream`` (the layout decides: rows one word per row)."""
        return self.schedule.tokenize(text)

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
            ids = self.schedule.tokenize(text_or_tokens)
        else:
            check_ids(list(text_or_tokens), self.model.args.vocab_size)
            ids = [int(t) for t in text_or_tokens]
        if not ids:
            raise ValueError(f"Nothing to feed to {name!r}: the text gives no tokens.")
        with self._lock:
            sched = self.schedule
            if sched.done:
                raise RuntimeError(
                    f"The session has finished ({sched.finish_reason}); nothing reads {name!r}."
                )
            sched.check_feed(c)
            sched.queues[c].extend(ids)
            self._lock.notify_all()
        return len(ids)

    def close(self, stream="user"):
        """Blocks layout: end the user block with ``<|im_end|>`` once its queue is fed."""
        with self._lock:
            self.schedule.close(stream)

    def stop(self):
        """End the run at the next :meth:`step` (safe from any thread)."""
        with self._lock:
            self._stop_requested = True
            self._lock.notify_all()

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
                while self.schedule.idle() and not self._stop_requested:
                    self._lock.wait()  # rows idle pause: the clock waits for input
                stop = self._stop_requested
            if stop:
                self._cancel()
                self.schedule.finish("stop")
                return self._log.event()
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
                        return self._log.event()
                    cur = self._launch(plan)
                    with self._lock:
                        sched.advance(plan, cur.tokens)
                    self.sampler.record(cur.tokens, plan.sample_channels)
            nxt = self._launch_next() if self.pipeline else None
            values = cur.tokens if isinstance(cur.tokens, list) else cur.tokens.tolist()
            with self._lock:
                settled = sched.settle(cur.plan, values)
            if isinstance(cur.plan, DecodePlan):
                self._stats.timesteps += 1
            else:
                self._stats.prompt_time = time.perf_counter() - self._stats.start
                self._stats.gen_start = time.perf_counter()
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
                return self._log.event()
            summary = None
            if cur.summary is not None:  # {channel: (entropy, top1_prob, top1_id)}
                summary = dict(zip(cur.plan.sample_channels, map(tuple, cur.summary.tolist())))
            return self._log.event(settled, cur.plan.reads(), summary)

    # ---------------------------------------------------------------- internals
    def _start(self) -> _Inflight:
        self._started = True
        self._stats.start = time.perf_counter()
        sched = self.schedule
        with self._lock:
            plan = sched.first_plan()
        if self._pipeline_arg is None:
            self.pipeline = sched.pipelines()
        if any(sched.queues[c] for c in self.spec.inputs[-1:]):
            # input queued before the start: it enters at the schedule's first input slot
            self._stats.first_input_y = sched.first_input_y()
        if isinstance(plan, SeedPlan):
            if self.prompt_cache_file:
                raise ValueError(
                    "This prompt has no shared part to cache: the rows seed mode prefills "
                    "nothing (give prefill rows)."
                )
            cur = _Inflight(plan, list(plan.tokens))
            with self._lock:
                sched.advance(plan, None)
            return cur
        cur = self._prefill(plan)
        with self._lock:
            sched.advance(plan, cur.tokens)
        self.sampler.record(cur.tokens, plan.sample_channels)
        return cur

    def _fits(self, plan: DecodePlan) -> bool:
        return self.kv.fits(self.cache, plan.ys, len(plan.ids))

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
        self.schedule.trimmed(self.cache[0].offset)
        if inflight.keys is not None:
            self.sampler.keys = inflight.keys

    def _cancel(self):
        if self._inflight is not None:
            self._undo(self._inflight)
            self._inflight = None

    def _launch(self, plan: DecodePlan) -> _Inflight:
        ids = plan.tokens()
        positions = mx.array([plan.ys], dtype=mx.int32)
        self.kv.before_step(self.cache, plan.ys)
        mask = self.schedule.mask(ids, positions, self.cache, decode=True)
        logits = forward_step(
            self.model, self.cache, ids, plan.channels, positions,
            mask=mask, logits_at=plan.sample_rows,
        )
        return self._sample(logits, plan)

    def _sample(self, logits: mx.array, plan: Plan) -> _Inflight:
        """Penalties and sampling of ``logits`` ``[n, V]`` for ``plan.sample_channels``."""
        logits = logits.astype(mx.float32)
        if isinstance(plan, DecodePlan) and plan.processor is not None:
            logits = plan.processor(None, logits)
        keys = dict(self.sampler.keys) if self.sampler.keys else None
        tokens = self.sampler(logits, plan.sample_channels)
        summary = logits_summary(logits) if self.record_logits else None
        mx.async_eval(tokens)
        n_fed = len(plan.ids) if isinstance(plan, DecodePlan) else 0
        return _Inflight(plan, tokens, n_fed, summary, keys)

    def _prefill(self, plan: PrefillPlan) -> _Inflight:
        flat = plan.flat
        self.kv.check_prompt(flat.positions)
        sflat, wanted = in_timestep_order(flat, plan.sample_at)
        done, path = 0, self.prompt_cache_file
        if path and Path(path).exists():
            self.cache, ids = load_prefix(str(path), sflat, min(wanted), len(self.cache))
            self.schedule.prefix_loaded(ids)
            done = len(ids)
        elif path:
            done = plan.shared
            shared = sflat.take(slice(0, done))
            self._forward(shared)
            save_prefix(str(path), self.cache, shared, self.model.args, self.spec)
        rest = sflat.take(slice(done, None))
        logits = self._forward(rest, [w - done for w in wanted])
        self._stats.prompt_tokens = len(flat)
        self._stats.prompt_processed = len(rest)
        return self._sample(logits, plan)

    def _forward(self, flat: Flat, logits_at: Sequence[int] = ()) -> Optional[mx.array]:
        """Prefill ``flat`` (already in timestep order) into the cache."""
        mask_fn = partial(self.schedule.mask, decode=False)
        return prefill(
            self.model, flat, self.cache, logits_at=logits_at,
            step=self.prefill_step_size, mask_fn=mask_fn,
        )

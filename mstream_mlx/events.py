# Copyright © 2026 mstream-mlx contributors.
"""What a session reports per timestep: :class:`StepEvent` (and its ``--format jsonl``
line), and :class:`EventLog`, which builds the events from settled steps: per-stream
text, timings, and the first-output latency."""

import json
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from .plans import Schedule, Settled


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
class Stats:
    """Counters behind a :class:`StepEvent`'s rates and latency."""

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


class EventLog:
    """Turns settled steps into :class:`StepEvent` s: one streaming detokenizer per
    stream, the running ``tokens``/``texts`` of every stream, and :class:`Stats`."""

    def __init__(self, schedule: Schedule, tokenizer):
        self.schedule = schedule
        self.spec = schedule.spec
        self.names = list(self.spec.names)
        self.stats = Stats()
        self.detokenizers = {c: tokenizer.detokenizer for c in range(len(self.names))}
        self.tokens: Dict[str, List[int]] = {n: [] for n in self.names}
        self.texts: Dict[str, str] = {n: "" for n in self.names}
        self.t = 0

    def event(
        self,
        settled: Optional[Settled] = None,
        reads: Optional[Dict[int, Tuple[int, int]]] = None,
        summary: Optional[Dict[int, tuple]] = None,
    ) -> StepEvent:
        """The next event: ``settled`` outputs, ``reads`` ``{input channel: (token, y)}``,
        ``summary`` ``{channel: logits summary}``; all empty for a closing event."""
        st, sched = self.stats, self.schedule
        now = time.perf_counter()
        out_tok: Dict[str, Optional[int]] = {n: None for n in self.names}
        text: Dict[str, str] = {n: "" for n in self.names}
        y: Dict[str, int] = {}
        for c, (tok, tok_y) in (reads or {}).items():
            if tok == self.spec.silence_token:
                continue
            name = self.names[c]
            out_tok[name], y[name] = tok, tok_y
            if st.first_input_y is None:
                st.first_input_y = tok_y
            self._add_text(c, tok, text)
        first = sched.heads[0]
        finished = settled.finished if settled else {}
        for c, tok in (settled.tokens if settled else {}).items():
            if tok is None:
                continue
            name = self.names[c]
            out_tok[name], y[name] = tok, settled.ys[c]
            st.tokens += 1
            if st.first_y is None:
                st.first_y = settled.ys[c]
            self._add_text(c, tok, text)
            if c == first and st.ttft is None and sched.is_text(c, tok):
                st.ttft = now - st.start
                origin = st.first_input_y if st.first_input_y is not None else st.first_y
                st.ttft_timesteps = settled.ys[c] - origin
        done = sched.done
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
            t=self.t,
            tokens=out_tok,
            text=text,
            y=y,
            finished={self.names[c]: r for c, r in finished.items()},
            finish_reason=sched.finish_reason if done else None,
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
        self.t += 1
        return event

    def _add_text(self, c: int, tok: int, text: Dict[str, str]):
        if not self.schedule.is_text(c, tok):
            return
        det = self.detokenizers[c]
        det.add_token(tok)
        text[self.names[c]] += det.last_segment

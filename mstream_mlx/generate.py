# Copyright © 2026 mstream-mlx contributors.
"""Generation in mlx-lm's layers: :class:`~mstream_mlx.session.Session` is the step
function (one timestep per ``step()``), :func:`stream_generate` yields its events until
every output stream has stopped, and :func:`generate` returns each stream's text.

    for event in stream_generate(model, tokenizer, "what is two plus two"):
        print(event.text["Output"], end="", flush=True)
"""

import dataclasses
import sys
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Union

from .schedules import BlocksOptions
from .events import StepEvent
from .heads import head_names
from .session import Session
from .streams import BLOCKS

Prompt = Union[str, Sequence[int], Mapping[str, Union[str, Sequence[int]]], None]


def main_input(spec) -> int:
    """The stream a plain prompt goes to: rows ``User``, blocks ``user``."""
    return spec.inputs[-1]


def feed_prompt(session: Session, prompt: Prompt, system_prompt: Optional[str] = None):
    """Queue a prompt: text or ids for the main input stream, or ``{stream: text|ids}``.

    ``system_prompt`` goes to the blocks ``system`` stream; in the rows layout it is read
    first on the user stream, as the reference does (``f"{system}\\n\\n{prompt}"``;
    docs/parity.md).
    """
    spec = session.spec
    if system_prompt:
        target = 0 if spec.layout == BLOCKS else main_input(spec)
        session.feed(target, system_prompt)
    if prompt is None:
        return
    if isinstance(prompt, Mapping):
        for stream, value in prompt.items():
            session.feed(stream, value)
    else:
        session.feed(main_input(spec), prompt)


def stream_generate(
    model,
    tokenizer,
    prompt: Prompt = None,
    *,
    system_prompt: Optional[str] = None,
    interrupts: Optional[Mapping[int, Union[str, Sequence[int]]]] = None,
    **kwargs,
) -> Iterator[StepEvent]:
    """Yield one :class:`StepEvent` per timestep until every output stream stopped.

    Args:
        model, tokenizer: from ``mstream_mlx.load``.
        prompt: text or ids for the main input stream, or ``{stream: text|ids}``.
            ``None``/empty in the rows layout starts an interactive run.
        system_prompt: see :func:`feed_prompt`.
        interrupts: ``{t: text|ids}`` fed to the main input stream right after event
            ``t`` (a scripted interrupt).  In the blocks layout the user block stays
            open until the last interrupt is fed and closes then (with
            ``BlocksOptions(close_user=False)`` it stays open).
        **kwargs: :class:`Session` options (``sampling``, ``max_tokens``, ``rows``, ...).

    Yields:
        StepEvent: the last one has ``finish_reason`` set.
    """
    interrupts = dict(interrupts or {})
    close_after = None  # the interrupt after which the blocks user block closes
    if interrupts and model.streams.layout == BLOCKS:
        blocks = kwargs.get("blocks") or BlocksOptions()
        if blocks.close_user:
            close_after = max(interrupts)
            kwargs["blocks"] = dataclasses.replace(blocks, close_user=False)
    session = Session(model, tokenizer, **kwargs)
    feed_prompt(session, prompt, system_prompt)
    for event in session:
        yield event
        if event.t in interrupts and not session.done:
            session.feed(main_input(session.spec), interrupts[event.t])
            if event.t == close_after:
                session.close()


def generate(
    model,
    tokenizer,
    prompt: Prompt = None,
    *,
    verbose: bool = False,
    **kwargs,
) -> Dict[str, str]:
    """Run to the end and return ``{head: text}`` (the output streams that generate).

    With ``verbose``, print each output stream's text and mlx-lm's timing lines.
    """
    texts: Dict[str, str] = {}
    event = None
    for event in stream_generate(model, tokenizer, prompt, **kwargs):
        for name, delta in event.text.items():
            texts[name] = texts.get(name, "") + delta
    outputs = list(head_names(model, kwargs.get("heads")))
    result = {n: texts.get(n, "") for n in outputs}
    if verbose and event is not None:
        for n in outputs:
            print(f"[{n}] {result[n]}")
        print("\n".join(summary_lines(event)))
    return result


def summary_lines(event: StepEvent) -> List[str]:
    """mlx-lm's closing lines (``Prompt: ...``, ``Generation: ...``, ``Peak memory``)
    plus the multi-stream latency line."""
    lines = [
        f"Prompt: {event.prompt_tokens} tokens, {event.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {event.generation_timesteps} timesteps, "
        f"{event.timesteps_per_sec:.3f} timesteps-per-sec, {event.generation_tokens} tokens, "
        f"{event.tokens_per_sec:.3f} tokens-per-sec",
    ]
    if event.ttft is not None:
        lines.append(
            f"First output: {event.ttft:.3f} s, {event.ttft_timesteps} timesteps after the "
            "first input"
        )
    lines.append(f"Peak memory: {event.peak_memory:.3f} GB")
    return lines


def print_summary(event: StepEvent, file=None):
    print("\n".join(summary_lines(event)), file=file or sys.stderr)

# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx generate``: run a multi-stream model on a prompt and print every stream
live (columns or interleaved lines, a colour per stream) or as JSON lines."""

import contextlib
import itertools
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

import typer

from mstream_mlx.atomic import check_writable
from mstream_mlx.checks import number, read_stdin, sampling_flags

from .common import (
    ADAPTER_PATH,
    HEADS,
    KV_BITS,
    KV_GROUP_SIZE,
    KV_WINDOW,
    MODEL,
    QUANTIZED_KV_START,
    SEED,
    SYSTEM_PROMPT,
    TEMP,
    TOP_K,
    TOP_P,
    choice,
    chosen_heads,
    heads_line,
    user_errors,
)

FORMATS = ("text", "jsonl")
DISPLAYS = ("columns", "lines")
SAMPLERS = ("reference", "mlx")
# the reference demo's colours (docs/chat.md): user blue, output green, then cyan, yellow
COLOURS = ("green", "cyan", "yellow", "magenta", "red")
SAMPLING_KEYS = (
    "temp",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)
# whitespace-only tokens in the column view, so that "-" means silence only
VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "↵"})


def _parse_pairs(text: str, what: str) -> Dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"{what}: expected key=value, got {part!r}.")
        k, v = part.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def _stream_configs(items: List[str], base, caps):
    """``NAME:key=value,...`` -> per-stream SamplingSettings and max_tokens."""
    sampling, max_tokens = {"*": base}, {"*": caps}
    for item in items:
        if ":" not in item:
            raise ValueError(
                f"--stream-config: expected NAME:key=value,..., got {item!r}."
            )
        name, rest = item.split(":", 1)
        pairs = _parse_pairs(rest, "--stream-config")
        if "max_tokens" in pairs:
            max_tokens[name.strip()] = int(pairs.pop("max_tokens"))
        bad = [k for k in pairs if k not in SAMPLING_KEYS]
        if bad:
            raise ValueError(
                f"--stream-config: unknown key {bad[0]!r}; use {', '.join(SAMPLING_KEYS)} "
                "or max_tokens."
            )
        typed = {
            k: (int(v) if k in ("top_k", "seed") else float(v))
            for k, v in pairs.items()
        }
        sampling[name.strip()] = base.with_(**typed)
    return sampling, max_tokens


def _stop_tokens(items: List[str]):
    if not items:
        return None
    out: Dict[str, list] = {}
    for item in items:
        stream, tok = (
            item.split("=", 1)
            if "=" in item and not item.startswith("=")
            else ("*", item)
        )
        out.setdefault(stream.strip(), []).append(int(tok) if tok.isdigit() else tok)
    return out


def _interrupts(items: List[str]) -> Dict[int, str]:
    out = {}
    for item in items:
        t, sep, text = item.partition(":")
        if not sep or not t.strip().isdigit() or not text.strip():
            raise ValueError(
                f"--interrupt: expected T:TEXT (T = event index), got {item!r}."
            )
        out[int(t)] = text
    return out


class _Printer:
    """Live text output: one column per stream, or interleaved ``Name: text`` lines."""

    def __init__(self, spec, tokenizer, shown: List[str], display: str, colour: bool):
        self.spec = spec
        self.tokenizer = tokenizer
        self.shown = shown
        self.display = display
        self.colour = colour
        self.styles = {}
        k = 0
        for c, name in enumerate(spec.names):
            if c in spec.inputs:
                self.styles[name] = dict(fg="blue", bold=True)
            else:
                self.styles[name] = dict(fg=COLOURS[k % len(COLOURS)], bold=k == 0)
                k += 1
        self.width = {n: max(len(n), 10) for n in shown}
        # fit the terminal (COLUMNS or the tty's width; no limit when piped): 6 columns
        # for "  t | ", 3 per separator
        cols = shutil.get_terminal_size((0, 0)).columns
        if cols and display == "columns":
            fit = max(3, (cols - 6 - 3 * (len(shown) - 1)) // max(len(shown), 1))
            self.width = {n: min(w, fit) for n, w in self.width.items()}
        self.last = None

    def style(self, text: str, name: str, dim: bool = False) -> str:
        if not self.colour:
            return text
        return typer.style(text, dim=dim, **self.styles[name])

    def header(self):
        if self.display == "columns":
            cells = [self.style(_cell(n, self.width[n]), n) for n in self.shown]
            typer.echo("  t | " + " | ".join(cells))

    def event(self, ev):
        if self.display == "columns":
            if all(ev.tokens[n] is None for n in self.shown):
                return
            sil = self.spec.silence_token
            cells = []
            for n in self.shown:
                tok = ev.tokens[n]
                word = (
                    ""
                    if tok is None
                    else (
                        "-"
                        if tok == sil
                        else _word(self.tokenizer.decode([tok]))
                    )
                )
                cells.append(
                    self.style(_cell(word, self.width[n]), n, dim=tok in (None, sil))
                )
            typer.echo(f"{ev.t:3d} | " + " | ".join(cells))
            return
        for n in self.shown:
            delta = ev.text[n]
            if not delta:
                continue
            if n != self.last and len(self.shown) > 1:  # a tag where the stream changes
                sep = "" if self.last is None else " "
                sys.stdout.write(sep + self.style(f"[{n}]", n, dim=True) + " ")
                delta = delta.lstrip(" ")
            self.last = n
            sys.stdout.write(self.style(delta, n))
        sys.stdout.flush()

    def end(self):
        if self.display == "lines" and self.last is not None:
            typer.echo()


def _word(text: str) -> str:
    """A token's text in one cell: stripped, or its whitespace made visible."""
    return text.strip() or text.translate(VISIBLE) or "∅"


def _cell(word: str, width: int) -> str:
    """``word`` centred in ``width`` columns, cut with an ellipsis if longer."""
    return (word if len(word) <= width else word[: width - 1] + "…").center(width)


def generate_command(
    model: Optional[str] = MODEL,
    adapter_path: Optional[str] = ADAPTER_PATH,
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p", help="Text for the main input stream ('-' reads stdin)."
    ),
    system_prompt: Optional[str] = SYSTEM_PROMPT,
    heads: Optional[str] = HEADS,
    max_tokens: Optional[int] = typer.Option(
        None,
        "--max-tokens",
        "-m",
        help="Per output stream: blocks 256 by default; rows: non-silence tokens, no limit.",
    ),
    max_steps: Optional[int] = typer.Option(
        None, "--max-steps", help="Decode timesteps (rows: max_rows 200; blocks: 4096)."
    ),
    temp: float = TEMP,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    min_p: float = typer.Option(
        0.0, "--min-p", help="Min-p (mlx: relative; reference blocks: absolute)."
    ),
    min_tokens_to_keep: int = typer.Option(
        1, "--min-tokens-to-keep", help="Min-p keeps at least this many (mlx)."
    ),
    repetition_penalty: float = typer.Option(
        0.0,
        "--repetition-penalty",
        help="mlx-lm repetition penalty per stream (0 = off).",
    ),
    repetition_context_size: int = typer.Option(
        20,
        "--repetition-context-size",
        help="Tokens the repetition penalty looks back.",
    ),
    presence_penalty: float = typer.Option(
        0.0, "--presence-penalty", help="Additive penalty on a stream's earlier tokens."
    ),
    presence_context_size: int = typer.Option(
        20,
        "--presence-context-size",
        help="Tokens the presence penalty looks back (mlx/rows).",
    ),
    sampler: str = typer.Option(
        "reference",
        "--sampler",
        help="reference (the layout's reference token selection) or mlx.",
    ),
    stream_config: List[str] = typer.Option(
        [],
        "--stream-config",
        help="Per-stream settings, repeatable: NAME:temp=0.7,top_k=20,max_tokens=50,seed=1.",
    ),
    seed: Optional[int] = SEED,
    stop_token: List[str] = typer.Option(
        [],
        "--stop-token",
        help="[STREAM=]TOKEN ending a stream, repeatable (blocks default <|im_end|>).",
    ),
    max_kv_size: Optional[int] = typer.Option(
        None,
        "--max-kv-size",
        help="Most cached tokens; reaching it ends the run ('length').",
    ),
    prompt_cache_file: Optional[str] = typer.Option(
        None,
        "--prompt-cache-file",
        help="Prompt cache (.safetensors): reused if it exists, else written (system part).",
    ),
    prefill_step_size: int = typer.Option(
        2048, "--prefill-step-size", help="Tokens per prefill chunk."
    ),
    kv_bits: Optional[int] = KV_BITS,
    kv_group_size: int = KV_GROUP_SIZE,
    quantized_kv_start: int = QUANTIZED_KV_START,
    kv_window: Optional[int] = KV_WINDOW,
    streams: Optional[str] = typer.Option(
        None,
        "--streams",
        help="Comma-separated streams to show (default: all but system).",
    ),
    fmt: str = typer.Option(
        "text", "--format", help="text or jsonl (one JSON object per timestep)."
    ),
    display: Optional[str] = typer.Option(
        None,
        "--display",
        help="columns (side by side; - is silence, ␣ ↵ whitespace tokens) or lines "
        "(interleaved); default columns, lines for one stream.",
    ),
    no_color: bool = typer.Option(False, "--no-color", help="No ANSI colours."),
    interrupt: List[str] = typer.Option(
        [],
        "--interrupt",
        help="T:TEXT feeds TEXT to the main input after event T, repeatable.",
    ),
    record_logits: bool = typer.Option(
        False, "--record-logits", help="jsonl: add entropy, top-1 prob and id."
    ),
    no_pipeline: bool = typer.Option(
        False, "--no-pipeline", help="No async double-buffering."
    ),
    # rows (paper §7)
    interactive: bool = typer.Option(
        False, "--interactive", help="Rows: interactive mode (never stops on silence)."
    ),
    pre_think: Optional[int] = typer.Option(
        None,
        "--pre-think",
        help="Rows: thinking rows before the user's first token (default: the model's, else 1).",
    ),
    silence_penalty: Optional[float] = typer.Option(
        None,
        "--silence-penalty",
        help="Rows: ramped penalty on Output's silence (default: the model's, else 10).",
    ),
    think_silence_penalty: Optional[float] = typer.Option(
        None,
        "--think-silence-penalty",
        help="Rows: the same on thinking streams (default: the model's, else 0).",
    ),
    silence_penalty_during_user_talk: bool = typer.Option(
        False,
        "--silence-penalty-during-user-talk",
        help="Rows: ramp from pre_think, not from the user's last token.",
    ),
    silence_exit: Optional[int] = typer.Option(
        None,
        "--silence-exit",
        help="Rows: all-silent rows in a row that end the run (default 1; interactive: never).",
    ),
    ablate: Optional[str] = typer.Option(
        None, "--ablate", help="Rows: comma-separated streams forced silent."
    ),
    skip_silence: bool = typer.Option(
        False, "--skip-silence", help="Rows: never attend to silence keys."
    ),
    prefill_rows: Optional[Path] = typer.Option(
        None,
        "--prefill-rows",
        help="Rows: JSON table [rows][streams] of ids or words prefilled as header rows.",
    ),
    seed_words: Optional[str] = typer.Option(
        None, "--seed-words", help="Rows: comma-separated seed-row words."
    ),
    keep_sampled_user: bool = typer.Option(
        False,
        "--keep-sampled-user",
        help="Rows, interactive + prefill rows: the reference's sampled-user quirk.",
    ),
    # blocks (paper §5-6)
    head_prefill: List[str] = typer.Option(
        [],
        "--head-prefill",
        help="Blocks: text after 'assistant\\n' for each head, repeatable in head order.",
    ),
    no_stop_all: bool = typer.Option(
        False,
        "--no-stop-all",
        help="Blocks: the last head's <|im_end|> does not stop the other heads.",
    ),
    allow_same_step_visible: bool = typer.Option(
        False,
        "--allow-same-step-visible",
        help="Blocks: decode queries see tokens fed before them in the step.",
    ),
):
    """Generate from a multi-stream model, printing every stream as it is written."""
    with user_errors(RuntimeError):
        choice("--format", fmt, FORMATS)
        if display is not None:
            choice("--display", display, DISPLAYS)
        choice("--sampler", sampler, SAMPLERS)
        sampling_flags(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                       repetition_penalty=repetition_penalty, presence_penalty=presence_penalty)
        number("--silence-penalty", silence_penalty)
        number("--think-silence-penalty", think_silence_penalty)
        if prompt_cache_file and not Path(prompt_cache_file).exists():
            check_writable(prompt_cache_file)  # before loading, not after the prefill
        if prompt == "-":
            prompt = read_stdin("--prompt -")
        interrupts = _interrupts(interrupt)
        if prompt is not None and not prompt.strip():
            raise ValueError("--prompt is empty.")
        if prompt is None and not interrupts and not interactive:
            raise ValueError("Nothing to read: pass --prompt TEXT ('-' reads stdin).")

        import mlx.core as mx

        import mstream_mlx
        from mstream_mlx import BlocksOptions, RowsOptions, SamplingSettings
        from mstream_mlx.checks import read_json
        from mstream_mlx.streams import BLOCKS
        from mstream_mlx.utils import default_model_path

        if seed is not None:
            mx.random.seed(seed)
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the streams only
            net, tokenizer = mstream_mlx.load(
                model or str(default_model_path()), adapter_path=adapter_path
            )
        spec = net.streams
        blocks = spec.layout == BLOCKS
        heads = chosen_heads(net, heads)  # one line for a bad name
        base = SamplingSettings(
            temp=temp,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            min_tokens_to_keep=min_tokens_to_keep,
            repetition_penalty=repetition_penalty,
            repetition_context_size=repetition_context_size,
            presence_penalty=presence_penalty,
            presence_context_size=presence_context_size,
            method=sampler if sampler == "mlx" else ("blocks" if blocks else "rows"),
        )
        sampling, caps = _stream_configs(stream_config, base, max_tokens)
        blocks_options = rows_options = None
        if blocks:
            blocks_options = BlocksOptions(
                head_prefill=head_prefill,
                stop_all_on_last_head=not no_stop_all,
                allow_same_step_visible=allow_same_step_visible,
            )
        else:
            rows_options = RowsOptions.for_model(
                net,
                pre_think=pre_think,
                prefill_rows=(
                    read_json(prefill_rows, "--prefill-rows") if prefill_rows else None
                ),
                seed_words=(
                    [" " + w.strip() for w in seed_words.split(",")]
                    if seed_words
                    else None
                ),
                silence_penalty=silence_penalty,
                think_silence_penalty=think_silence_penalty,
                silence_penalty_during_user_talk=silence_penalty_during_user_talk
                or None,
                silence_exit=silence_exit,
                ablate=[s.strip() for s in ablate.split(",")] if ablate else None,
                skip_silence=skip_silence or None,
                keep_sampled_user=keep_sampled_user or None,
            )
        if streams:
            shown = [
                spec.names[spec.index(s.strip())]
                for s in streams.split(",")
                if s.strip()
            ]
        else:
            shown = [
                n for c, n in enumerate(spec.names)
                if not (blocks and c == 0) and (c in spec.inputs or n in heads)
            ]
        events = mstream_mlx.stream_generate(
            net,
            tokenizer,
            prompt,
            system_prompt=system_prompt,
            interrupts=interrupts,
            sampling=sampling,
            # {"*": None} alone would override the layout's default cap
            max_tokens=caps if len(caps) > 1 else caps["*"],
            stop_tokens=_stop_tokens(stop_token),
            max_steps=max_steps,
            rows=rows_options,
            blocks=blocks_options,
            interactive=True if interactive and not blocks else None,
            max_kv_size=max_kv_size,
            prompt_cache_file=prompt_cache_file,
            prefill_step_size=prefill_step_size,
            kv_bits=kv_bits, kv_group_size=kv_group_size,
            quantized_kv_start=quantized_kv_start, max_kv_timesteps=kv_window,
            record_logits=record_logits,
            pipeline=False if no_pipeline else None,
            heads=heads,
        )
        # the first event builds the Session: a bad setting fails before any output
        first = next(events, None)
        typer.echo(heads_line(net, heads), err=True)
        printer = _Printer(
            spec,
            tokenizer,
            shown,
            display or ("lines" if len(shown) == 1 else "columns"),
            colour=not no_color and sys.stdout.isatty(),
        )
        if first is not None:
            events = itertools.chain([first], events)
        _show(events, printer, shown, fmt == "text")


def _show(events, printer: _Printer, shown: List[str], text: bool):
    """Print every event (text or JSON lines), then mlx-lm's summary on stderr."""
    from mstream_mlx.generate import Tally, print_summary

    if text:
        typer.echo("=" * 10)
        printer.header()
    event = None
    tally = Tally(printer.spec)
    for event in map(tally.add, events):
        if text:
            printer.event(event)
        else:
            typer.echo(event.to_json(shown))
    if text:
        printer.end()
        typer.echo("=" * 10)
    if event is not None:
        print_summary(event, tally=tally)

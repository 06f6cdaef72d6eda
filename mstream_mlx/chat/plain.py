# Copyright © 2026 mstream-mlx contributors.
"""The line mode of ``mstream-mlx chat`` (stdin is not a terminal, or ``--plain``):
read one message per line, run the model until the turn ends, print every stream.

One thread, no pacing worker: the model runs only while a turn runs, so the output of
a script is the same every time for a given ``--seed``.  Per turn it prints::

    You: what is two plus two
    Output: ... (live, as the model writes it)
    Analytical: ...            (each other output stream on one line, unless
                                --hide-thinking)

A rows turn ends once the message has been read and then every output stream is
silent in one row (the reference's stop rule, paper §7), the first output stream has
been silent for :data:`QUIET_ROWS` rows after speaking, or ``--max-steps`` rows
(default :data:`PLAIN_TURN_ROWS`) have passed; the session (and its context) goes on
with the next line.  A blocks turn is one conversation: it ends when the heads stop.
"""

import sys
import time
from typing import Dict, Optional, TextIO

from ..checks import is_text
from ..generate import summary_lines
from ..streams import BLOCKS
from .engine import ChatOptions, load_chat_model, make_session
from .transcript import Transcript

PLAIN_TURN_ROWS = 200  # the reference's max_rows
QUIET_ROWS = 4

HELP = """\
Commands (one per line): /help, /reset (new session, context cleared),
/save FILE (JSON transcript of every stream), /quit. Any other line is a message."""


def run_plain(
    opts: ChatOptions,
    *,
    hide_thinking: bool = False,
    meta: Optional[dict] = None,
    stdin: TextIO = None,
    out: TextIO = None,
    err: TextIO = None,
) -> int:
    """Chat over lines of ``stdin``; returns the exit status."""
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    if hasattr(stdin, "reconfigure"):  # a line that is not UTF-8 is skipped, not fatal
        stdin.reconfigure(errors="surrogateescape")
    model, tokenizer, info = load_chat_model(opts)
    name = info.label if info.label == opts.model else f"{info.label} ({opts.model})"
    print(f"[chat] model: {name} ({info.layout}; streams: {', '.join(info.names)})",
          file=err, flush=True)
    print(f"[chat] heads: {', '.join(info.outputs)}", file=err, flush=True)
    transcript = Transcript(info, meta)
    session, index, last = None, 0, None
    for line in stdin:
        text = line.strip()
        if not text:
            continue
        if not is_text(text):
            print("[chat] skipped a line that is not valid UTF-8.", file=err, flush=True)
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/help":
                print(HELP, file=err, flush=True)
            elif cmd == "/reset":
                if session is not None and not session.done:
                    transcript.end("reset")
                session = None
                transcript.notice("reset")
                print("[chat] reset: a new session starts with the next message.",
                      file=err, flush=True)
            elif cmd == "/save":
                if not arg.strip():
                    print("[chat] usage: /save FILE", file=err, flush=True)
                    continue
                try:
                    path = transcript.save(arg.strip())
                    print(f"[chat] saved {path}", file=err, flush=True)
                except (OSError, ValueError) as e:
                    print(f"[chat] could not save: {e}", file=err, flush=True)
            else:
                print(f"[chat] unknown command {cmd}; /help lists them.", file=err, flush=True)
            continue
        if not stdin.isatty():  # a typed line is on the screen already
            print(f"You: {text}", file=out, flush=True)
        try:
            if info.layout == BLOCKS or session is None or session.done:
                if session is not None and not session.done:
                    transcript.end("cut")
                index += 1
                session = make_session(model, tokenizer, info, opts, [text], close_user=True)
                transcript.start(index, [text])
            else:
                session.feed(info.user, text)
                transcript.sent(text)
        except ValueError as e:
            print(f"[chat] {e}", file=err, flush=True)
            continue
        last = _turn(session, info, opts, transcript, hide_thinking, out) or last
    if last is not None:
        print("\n".join(summary_lines(last)), file=err, flush=True)
    return 0


def _turn(session, info, opts, transcript, hide_thinking, out):
    """Step until the turn ends; print the first output live, then the others."""
    rows = info.layout != BLOCKS
    limit = opts.max_steps or PLAIN_TURN_ROWS
    texts: Dict[str, str] = {n: "" for n in info.outputs}
    out.write(f"{info.primary}: ")
    out.flush()
    steps, spoke, quiet, event, started = 0, False, 0, None, False
    while not session.done:
        event = session.step()
        transcript.add(event)
        steps += 1
        for n in info.outputs:
            texts[n] += event.text[n]
        delta = event.text[info.primary]
        if not started:
            delta = delta.lstrip()
            started = bool(delta)
        if delta:
            out.write(delta)
            out.flush()
        if opts.tick > 0:
            time.sleep(opts.tick)
        if not rows:
            continue
        if session.queued(info.user) or event.tokens[info.user] is not None:
            continue  # still reading the message
        toks = [event.tokens[n] for n in info.outputs]
        if all(t is None or t == info.silence_token for t in toks):
            break
        if event.tokens[info.primary] not in (None, info.silence_token):
            spoke, quiet = True, 0
        elif spoke:
            quiet += 1
            if quiet >= QUIET_ROWS:
                break
        if steps >= limit:
            break
    if session.done:
        transcript.end(session.finish_reason or "stop")
    out.write("\n")
    if not hide_thinking:
        for n in info.thinking:
            out.write(f"{n}: {' '.join(texts[n].split())}\n")  # one line per stream
    out.flush()
    return event

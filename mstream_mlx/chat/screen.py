# Copyright © 2026 mstream-mlx contributors.
"""The full-screen UI of ``mstream-mlx chat``, on :mod:`curses`.

Why curses: it is in the standard library (no new dependency), it reads keys one by
one without blocking (the typing line stays live while the model runs on its worker
thread), it knows Esc, PgUp and resizes, and ``curses.wrapper`` restores the terminal
however the program ends.  ``rich`` (already a dependency) draws well but reads no
keys; ``textual`` would add a large dependency for one screen.  The reference demo
(``demo_interactive.py``; docs/chat.md) is curses too; the layout follows it::

    header      model, layout, state (PAUSED / running), keys      (reverse video)
    log         You: ... / Output: ...  word-wrapped, newest at the bottom, PgUp/PgDn
    ─ streams   ──────────────────────────────────────────────────────────────────
    ticker      one line per stream: the last tokens, one cell per timestep, newest
                at the right; a user token sits in the column of the first outputs
                that can see it (those of the next step), as the reference's grid
    status      timestep, rows/s, tokens/s, queued input tokens, memory
    You: _      the typing line

Only this thread touches the terminal; it feeds text to the engine and draws what the
worker reports.
"""

import curses
import itertools
import os
import textwrap
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

from ..streams import BLOCKS
from .engine import RATE_WINDOW, ChatEngine, Ended, Failed, Ready, Started, Stepped
from .transcript import YOU, Transcript

FRAME_MS = 30  # key poll / redraw period
MAX_COLUMNS = 512  # ticker history kept
MIN_W, MIN_H = 50, 12
COLOURS = {  # per stream role; the reference demo: user blue, output green, others cyan/yellow
    "user": curses.COLOR_BLUE,
    "primary": curses.COLOR_GREEN,
    "others": (curses.COLOR_CYAN, curses.COLOR_YELLOW, curses.COLOR_MAGENTA, curses.COLOR_RED),
}
HELP = [
    "Enter sends · Esc pauses/resumes · Tab shows/hides the thinking streams · "
    "PgUp/PgDn scroll · Ctrl-U clears the line · Ctrl-C quits",
    "/help this text · /reset a new session (context cleared) · "
    "/save FILE the transcript of every stream as JSON · /quit",
]


class ChatScreen:
    """Draw the chat and handle keys until the user quits.

    Args:
        engine: a started :class:`ChatEngine`.
        hide_thinking: start with the thinking (auditor) streams hidden.
        meta: extra fields for saved transcripts.
    """

    def __init__(
        self, engine: ChatEngine, hide_thinking: bool = False, meta: Optional[dict] = None
    ):
        self.engine = engine
        self.meta = meta or {}
        self.show_thinking = not hide_thinking
        self.info = None
        self.transcript: Optional[Transcript] = None
        self.columns: Deque[Dict] = deque(maxlen=MAX_COLUMNS)
        self.buffer = ""
        self.scroll = 0  # log lines scrolled up from the bottom
        self.stats: Optional[Stepped] = None
        self.session = 0
        self.ended: Optional[str] = None
        self.error: Optional[str] = None
        self.quit = False
        self.attrs: Dict[str, int] = {}
        self.pending_notices: List[str] = []
        self.held = None  # the user cell of the last step, shown with the next one

    # ---------------------------------------------------------------- running
    def run(self) -> Optional[str]:
        """Run full screen; returns the worker's error message, if it failed."""
        os.environ.setdefault("ESCDELAY", "25")  # Esc must not wait a second for a sequence
        try:
            curses.wrapper(self._main)
        except KeyboardInterrupt:
            pass  # Ctrl-C during setup or teardown: the wrapper has restored the terminal
        return self.error

    def _main(self, scr):
        self.scr = scr
        if hasattr(curses, "set_escdelay"):
            curses.set_escdelay(25)
        curses.cbreak()
        scr.keypad(True)
        scr.timeout(FRAME_MS)
        try:
            curses.curs_set(1)
        except curses.error:
            pass
        self._colours()
        while not self.quit:
            self._drain()
            self._draw()
            try:
                key = scr.get_wch()
            except curses.error:
                continue  # no key this frame
            except KeyboardInterrupt:
                break
            self._key(key)

    def _colours(self):
        self.attrs = {"dim": curses.A_DIM, "bold": curses.A_BOLD}
        if not curses.has_colors():
            return
        curses.start_color()
        try:
            curses.use_default_colors()
            bg = -1
        except curses.error:
            bg = curses.COLOR_BLACK
        colours = [COLOURS["user"], COLOURS["primary"], *COLOURS["others"]]
        for i, c in enumerate(colours, start=1):
            curses.init_pair(i, c, bg)
        self.pairs = [curses.color_pair(i) for i in range(1, len(colours) + 1)]

    def _stream_attr(self, name: str) -> int:
        """A colour per stream: user blue, the first output green, the others cycle."""
        if not getattr(self, "pairs", None) or self.info is None:
            return 0
        if name in (self.info.user, YOU):
            return self.pairs[0]
        if name == self.info.primary:
            return self.pairs[1]
        others = self.pairs[2:]
        return others[self.info.thinking.index(name) % len(others)]

    # ------------------------------------------------------------- messages
    def _drain(self, limit: int = 2000):
        for _ in range(limit):
            try:
                msg = self.engine.outbox.get_nowait()
            except Exception:
                return
            self._message(msg)

    def _message(self, msg):
        if isinstance(msg, Ready):
            self.info = msg.info
            self.transcript = Transcript(msg.info, self.meta)
            start = (
                "type a message and press Enter; Esc starts the clock without one"
                if msg.info.layout != BLOCKS else "type a message and press Enter"
            )
            where = self.engine.opts.model
            name = msg.info.label if msg.info.label == where else f"{msg.info.label} ({where})"
            self.transcript.notice(
                f"model: {name} · {msg.info.layout} · streams: "
                f"{', '.join(msg.info.names)} · heads: {', '.join(msg.info.outputs)} · "
                f"{start} · /help for keys"
            )
            for text in self.pending_notices:
                self.transcript.notice(text)
        elif isinstance(msg, Started):
            self.session = msg.index
            self.ended = None
            if msg.index > 1:
                word = "turn" if self.info.layout == BLOCKS else "session"
                self.transcript.notice(f"── {word} {msg.index} ──")
                self.columns.append({})  # an empty column marks the break in the ticker
            self.transcript.start(msg.index, msg.texts)
            self.held = None
        elif isinstance(msg, Stepped):
            self.stats = msg
            self.transcript.add(msg.event)
            # the user token a step read goes in the next step's column: the first
            # outputs that can see it (same-timestep tokens never see each other)
            col = dict(msg.cells)
            col[self.info.user], self.held = self.held, msg.cells[self.info.user]
            self.columns.append(col)
        elif isinstance(msg, Ended):
            self.ended = msg.reason
            self.transcript.end(msg.reason)
            if msg.reason == "cut":
                self.transcript.notice("(answer cut: a new message starts a new turn)")
            elif self.info.layout == BLOCKS and msg.reason in ("stop", "length"):
                self.transcript.notice(f"(turn ended: {msg.reason})")
            elif msg.reason == "length":
                self.transcript.notice("(session full: the next message starts a new one)")
        elif isinstance(msg, Failed):
            self.error = msg.message
            self.quit = True

    def notice(self, text: str):
        if self.transcript is None:
            self.pending_notices.append(text)
        else:
            self.transcript.notice(text)
        self.scroll = 0

    # ------------------------------------------------------------------- keys
    def _key(self, key):
        if key in ("\n", "\r", curses.KEY_ENTER):
            self._submit()
        elif key == "\x1b":
            self._pause()
        elif key == "\t":
            self.show_thinking = not self.show_thinking
        elif key in (curses.KEY_BACKSPACE, "\x7f", "\b"):
            self.buffer = self.buffer[:-1]
        elif key == "\x15":  # Ctrl-U
            self.buffer = ""
        elif key == "\x17":  # Ctrl-W
            self.buffer = self.buffer.rstrip()
            self.buffer = self.buffer[: self.buffer.rfind(" ") + 1]
        elif key in ("\x03", "\x04"):  # Ctrl-C (raw terminals), Ctrl-D
            self.quit = True
        elif key == curses.KEY_PPAGE:
            self.scroll += max(1, self._log_height() - 1)
        elif key == curses.KEY_NPAGE:
            self.scroll = max(0, self.scroll - max(1, self._log_height() - 1))
        elif isinstance(key, str) and key.isprintable():
            self.buffer += key

    def _pause(self):
        if self.info is None:
            return
        if self.info.layout == BLOCKS and not self.engine.running:
            self.notice("nothing runs: type a message to start a turn")
            return
        self.engine.toggle_pause()

    def _submit(self):
        text, self.buffer = self.buffer.strip(), ""
        if not text:
            return
        self.scroll = 0
        if text.startswith("/"):
            self._command(text)
            return
        try:
            fed = self.engine.send(text)
        except ValueError as e:
            self.notice(str(e))
            self.buffer = text
            return
        if fed and self.transcript is not None:
            self.transcript.sent(text)

    def _command(self, text: str):
        cmd, _, arg = text.partition(" ")
        if cmd in ("/quit", "/exit"):
            self.quit = True
        elif cmd == "/help":
            for line in HELP:
                self.notice(line)
        elif cmd == "/reset":
            self.engine.reset()
            self.columns.clear()
            self.stats = None
            self.notice("reset: the next message starts a new session with an empty context")
        elif cmd == "/save":
            if not arg.strip():
                self.notice("usage: /save FILE")
            elif self.transcript is None:
                self.notice("nothing to save yet: the model is still loading")
            else:
                try:
                    path = self.transcript.save(arg.strip())
                    self.notice(
                        f"saved {len(self.transcript.sessions)} session(s), "
                        f"{self.transcript.timesteps} timesteps to {path}"
                    )
                except (OSError, ValueError) as e:
                    self.notice(f"could not save: {e}")
        else:
            self.notice(f"unknown command {cmd}; /help lists them")

    # ------------------------------------------------------------------- draw
    def _shown(self) -> Tuple[str, ...]:
        if self.info is None:
            return ()
        if self.show_thinking:
            return self.info.shown
        return (self.info.user, self.info.primary)

    def _log_height(self) -> int:
        h, _ = self.scr.getmaxyx()
        return max(1, h - len(self._shown()) - 4)

    def _put(self, y: int, x: int, text: str, attr: int = 0):
        h, w = self.scr.getmaxyx()
        if not 0 <= y < h or x >= w:
            return
        text = text[: max(0, w - x - (1 if y == h - 1 else 0))]
        try:
            self.scr.addstr(y, x, text, attr)
        except curses.error:
            pass

    def _draw(self):
        scr = self.scr
        scr.erase()
        h, w = scr.getmaxyx()
        if w < MIN_W or h < MIN_H:
            self._put(0, 0, "Terminal too small"[: w - 1])
            scr.refresh()
            return
        self._header(w)
        shown = self._shown()
        log_h = self._log_height()
        self._log(1, log_h, w)
        y = 1 + log_h
        label = f" streams (Tab {'hides' if self.show_thinking else 'shows'} thinking) "
        self._put(y, 0, "─" + label + "─" * w, self.attrs["dim"])
        self._ticker(y + 1, shown, w)
        self._put(h - 2, 0, self._status(w), self.attrs["dim"])
        prompt = f" {YOU}: "
        self._put(h - 1, 0, prompt, self._stream_attr(YOU) | curses.A_BOLD)
        room = w - len(prompt) - 2
        shown_buf = self.buffer[-room:] if room > 0 else ""
        self._put(h - 1, len(prompt), shown_buf)
        try:
            scr.move(h - 1, min(w - 2, len(prompt) + len(shown_buf)))
        except curses.error:
            pass
        scr.refresh()

    def _state(self) -> str:
        if self.info is None:
            return "loading the model…"
        if self.engine.running:
            return "PAUSED  [Esc] resume" if self.engine.paused else "running  [Esc] pause"
        ended = f"ended ({self.ended}) · " if self.ended else ""
        if self.info.layout == BLOCKS:
            return ended + "type a message"
        return ended + "type, or [Esc] start the clock"

    def _header(self, w: int):
        info = self.info
        name, keys = ["mstream-mlx chat"], ["[Tab] thinking", "[^C] quit"]
        about = [info.label, f"{info.layout}, {len(info.names)} streams"] if info else []
        # to fit, drop the least useful first: the keys (/help lists them), the name
        while True:
            left = " " + " · ".join(name + about)
            right = "  ".join([self._state(), *keys]) + " "
            if len(left) + len(right) + 1 <= w or not (keys or name and about):
                break
            (keys if keys else name).pop()
        if len(left) + len(right) + 1 > w:
            left = left[: max(0, w - len(right) - 2)] + "…"
        line = left + " " * max(1, w - len(left) - len(right)) + right
        self._put(0, 0, line[:w], curses.A_REVERSE)

    def _wrap(self, entry, width: int) -> List[Tuple[str, int, str, int]]:
        """One log entry as screen lines ``(prefix, prefix attr, text, text attr)``."""
        if entry.speaker is None:
            dim = self.attrs["dim"]
            parts = textwrap.wrap(entry.text, width - 2) or [""]
            return [("· " if i == 0 else "  ", dim, part, dim) for i, part in enumerate(parts)]
        attr = self._stream_attr(entry.speaker)
        prefix = f"{entry.speaker}: "
        text = "".join(c if c.isprintable() or c == "\n" else " " for c in entry.text)
        lines = []
        for para in text.split("\n"):
            indent = " " * len(prefix) if not lines else ""
            for part in textwrap.wrap(para, width, initial_indent=indent) or [""]:
                if not lines:
                    lines.append((prefix, attr | curses.A_BOLD, part[len(prefix):], attr))
                else:
                    lines.append(("", 0, part, attr))
        return lines

    def _log(self, top: int, height: int, w: int):
        if self.transcript is None:
            self._put(top, 1, "loading the model…", self.attrs["dim"])
            return
        # wrap from the newest entry back, only as far as the view needs
        width = max(10, w - 2)
        lines: List[Tuple[str, int, str, int]] = []
        need = height + self.scroll
        for entry in reversed(self.transcript.log):
            lines[:0] = self._wrap(entry, width)
            if len(lines) >= need:
                break
        self.scroll = min(self.scroll, max(0, len(lines) - height))
        end = len(lines) - self.scroll
        view = lines[max(0, end - height): end]
        for i, (prefix, pattr, text, attr) in enumerate(view):
            y = top + height - len(view) + i
            self._put(y, 1, prefix, pattr)
            self._put(y, 1 + len(prefix), text, attr)
        if self.scroll:
            more = f" ↓ {self.scroll} more lines (PgDn) "
            self._put(top + height - 1, max(0, w - len(more) - 1), more, curses.A_REVERSE)

    def _ticker(self, top: int, shown: Tuple[str, ...], w: int):
        if not shown:
            return
        label_w = min(12, max(len(n) for n in shown)) + 2
        cw = 10 if w >= 110 else 8  # the reference: 10-character cells
        n_cells = max(1, (w - label_w - 1) // cw)
        cols = self._folded(n_cells, shown)
        x0 = label_w + (n_cells - len(cols)) * cw  # newest at the right edge
        for row, name in enumerate(shown):
            y = top + row
            attr = self._stream_attr(name)
            bold = curses.A_BOLD if name in (self.info.user, self.info.primary) else 0
            self._put(y, 0, f"{name[:label_w - 2]}:".ljust(label_w), attr | bold)
            for i, col in enumerate(cols):
                c = col.get(name)
                if c is None:
                    continue
                text, kind = c
                text = text if len(text) <= cw - 1 else text[: cw - 2] + "…"
                cattr = attr | (self.attrs["dim"] if kind == "sil" else 0)
                self._put(y, x0 + i * cw, text.center(cw - 1), cattr)

    def _folded(self, n_cells: int, shown: Tuple[str, ...]) -> List[Dict]:
        """The newest ``n_cells`` ticker columns, each run of columns where every shown
        stream is silent folded into one ``-×N`` column, so the last words stay in view."""
        out: List[Dict] = []
        run: List[Dict] = []

        def flush():
            fold = {n: (f"-×{len(run)}", "sil") for n in shown}
            out.extend(run if len(run) < 2 else [fold])
            run.clear()

        for col in reversed(self.columns):
            if len(out) >= n_cells:
                break
            if col and all(col.get(n) is None or col[n][1] == "sil" for n in shown):
                run.append(col)
                continue
            flush()
            out.append(col)
        flush()
        return out[:n_cells][::-1]

    def _said_per_sec(self, s: Stepped) -> float:
        """Output tokens per second without silence: the engine's rate (silence
        included) times the share of non-silence output cells over its window."""
        k = max(1, round(s.rate * RATE_WINDOW))
        cells = [
            c for col in itertools.islice(reversed(self.columns), k)
            for n, c in col.items() if n in self.info.outputs and c is not None
        ]
        return s.tokens_per_sec * sum(c[1] != "sil" for c in cells) / max(len(cells), 1)

    def _status(self, w: int) -> str:
        s = self.stats
        unit = "steps/s" if self.info is not None and self.info.layout == BLOCKS else "rows/s"
        tick = self.engine.opts.tick
        pace = f"tick {tick:g} s" if tick > 0 else "tick 0 (full speed)"
        if s is None:
            return f" t -  ·  {pace}"
        fields = [
            [f" t {s.event.t}" + (" · idle: the clock waits for you" if s.idle else "")],
            [f"{s.rate:.1f} {unit}", f"(model {s.model_rate:.0f}/s)"],
            [f"{self._said_per_sec(s):.1f} tok/s"],
            [f"queued {s.queued}"],
            [f"mem {_size(s.memory)}", f"(peak {_size(s.event.peak_memory)})"],
            [pace],
        ]
        def line(sep: str) -> str:
            return sep.join(" ".join(f) for f in fields if f)

        # to fit, narrow the separators, then drop the least useful first
        sep = "  ·  " if len(line("  ·  ")) < w else " · "
        for field, piece in [(1, 1), (4, 1), (5, 0), (3, 0), (4, 0)]:
            if len(line(sep)) < w:
                break
            fields[field].pop(piece)
        return line(sep)

def _size(gb: float) -> str:
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1e3:.1f} MB"

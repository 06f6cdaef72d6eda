# Copyright © 2026 mstream-mlx contributors.
"""What a chat said and wrote: the conversation log (You / the first output stream, as
the reference demo shows it; docs/chat.md) and every stream's tokens and text per
session, saved as JSON by ``/save``."""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ..atomic import atomic_file
from .. import StepEvent
from .engine import ModelInfo

YOU = "You"


@dataclass
class Entry:
    """One block of the conversation log: ``speaker`` is ``"You"``, a stream name, or
    ``None`` for a notice (help text, a reset, a saved file)."""

    speaker: Optional[str]
    text: str


class Transcript:
    """Folds :class:`StepEvent` objects into a log and per-session token tables.

    Args:
        info: the model's streams.
        meta: extra top-level fields for the JSON file (model, settings).
    """

    def __init__(self, info: ModelInfo, meta: Optional[dict] = None):
        self.info = info
        self.meta = dict(meta or {})
        self.log: List[Entry] = []
        self.sessions: List[dict] = []
        self._open = False  # the last log entry may still grow

    # ------------------------------------------------------------------ log
    def notice(self, text: str):
        self.log.append(Entry(None, text))
        self._open = False

    def _say(self, speaker: str, delta: str):
        last = self.log[-1] if self.log else None
        if self._open and last is not None and last.speaker == speaker:
            last.text += delta
            return
        delta = delta.lstrip()  # a new turn starts at its first visible character
        if delta:
            self.log.append(Entry(speaker, delta))
            self._open = True

    # ------------------------------------------------------------- sessions
    def start(self, index: int, texts=()):
        """A new session (rows: after /reset; blocks: a new turn)."""
        self.sessions.append({
            "index": index,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "sent": list(texts),
            "finish_reason": None,
            "t": [],
            "tokens": {n: [] for n in self.info.names},
            "text": {n: "" for n in self.info.names},
        })
        self._open = False

    def sent(self, text: str):
        """Text the user sent into the running session."""
        if self.sessions:
            self.sessions[-1]["sent"].append(text)

    def end(self, reason: str):
        if self.sessions and self.sessions[-1]["finish_reason"] is None:
            self.sessions[-1]["finish_reason"] = reason

    def add(self, event: StepEvent):
        """One timestep: every stream's token and text delta; the log grows from the
        user stream (what the model read, when it read it) and the first output."""
        if not self.sessions:
            self.start(len(self.sessions) + 1)
        s = self.sessions[-1]
        s["t"].append(event.t)
        for n in self.info.names:
            s["tokens"][n].append(event.tokens.get(n))
            s["text"][n] += event.text.get(n, "")
        if event.text.get(self.info.user):
            self._say(YOU, event.text[self.info.user])
        if event.text.get(self.info.primary):
            self._say(self.info.primary, event.text[self.info.primary])

    @property
    def timesteps(self) -> int:
        return sum(len(s["t"]) for s in self.sessions)

    # ----------------------------------------------------------------- save
    def to_dict(self) -> dict:
        return {
            **self.meta,
            "layout": self.info.layout,
            "streams": list(self.info.names),
            "user_stream": self.info.user,
            "output_streams": list(self.info.outputs),
            "silence_token": self.info.silence_token,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "conversation": [
                {"speaker": e.speaker or "notice", "text": e.text} for e in self.log
            ],
            "sessions": self.sessions,
        }

    def save(self, path) -> Path:
        """Write the JSON atomically (``mstream_mlx.atomic``), so a crash never leaves
        half a transcript."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise ValueError(f"/save needs a file name; {path} is a folder.")
        if not path.parent.exists():
            raise FileNotFoundError(f"No folder {path.parent} to save {path.name} in.")
        with atomic_file(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, ensure_ascii=False, indent=1)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it the file
        return path

# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx chat``: type while a multi-stream model thinks and talks.

Four small rooms:

* :mod:`.engine`: the model worker thread (load, sessions, pacing, pause, turns);
* :mod:`.transcript`: what was said and written, saved as JSON (``/save``);
* :mod:`.screen`: the full-screen curses UI (conversation log, stream ticker, status,
  typing line);
* :mod:`.plain`: the line mode for pipes and scripts.
"""

from .engine import ChatEngine, ChatOptions, ModelInfo, load_chat_model, make_session
from .plain import run_plain
from .transcript import Transcript

__all__ = [
    "ChatEngine",
    "ChatOptions",
    "ModelInfo",
    "Transcript",
    "load_chat_model",
    "make_session",
    "run_plain",
]

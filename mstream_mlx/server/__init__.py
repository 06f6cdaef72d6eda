# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx server``: a multi-stream model for apps over local HTTP: an
OpenAI-compatible chat endpoint, live sessions you can type into while the model
talks, and a page at ``/`` (docs/server.md)."""

from .app import Server, make_server, serve
from .live import Worker
from .options import ServerConfig

__all__ = ["Server", "ServerConfig", "Worker", "make_server", "serve"]

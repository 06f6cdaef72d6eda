# Copyright © 2026 mstream-mlx contributors.
"""The HTTP side: routing, request bodies, JSON and server-sent events.

Standard library only (``http.server.ThreadingHTTPServer``, as mlx_lm.server): one
thread per connection, every model step on the :class:`~.live.Worker`.  Requests
never name files: the model is fixed at start and the page is read once from the
package, so no request can read or write a file.

Endpoints (docs/server.md has the JSON of each):

======  ==================================  ==========================================
GET     /                                   the live page (page.html)
GET     /health                             ``{"status": "ok", "sessions": n}``
GET     /v1/models                          the served model and its streams
POST    /v1/chat/completions                OpenAI chat completion, ``"stream"`` or not
POST    /v1/sessions                        a live session (201)
GET     /v1/sessions/{id}                   its state
GET     /v1/sessions/{id}/events            its events, one SSE ``data:`` line per timestep
POST    /v1/sessions/{id}/input             feed text (an interrupt while it talks)
POST    /v1/sessions/{id}/pause|resume|step pace it by hand
POST    /v1/sessions/{id}/tick              seconds per timestep
DELETE  /v1/sessions/{id}                   end it
======  ==================================  ==========================================
"""

import json
import logging
import re
import select
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Optional

from mstream_mlx import Session
from mstream_mlx.generate import feed_prompt
from mstream_mlx.heads import head_names

from .live import Live, TooManySessions, Worker
from .openai_api import Completion, models_list, prompt_from_messages, stop_strings
from .options import ServerConfig, number, session_kwargs, text

log = logging.getLogger("mstream_mlx.server")

REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request
KEEPALIVE = 1.0  # seconds between SSE comments on a quiet stream (and disconnect checks)
DRAIN_LIMIT = 64 << 20  # bytes of an oversized body read and dropped after the 413
SESSION_PATH = re.compile(r"^/v1/sessions/([A-Za-z0-9-]{1,64})(?:/([a-z]+))?$")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BodyTooLarge(HTTPError):
    """413; the unread body (``length`` bytes) is drained after the answer."""

    def __init__(self, length: int, limit: int):
        super().__init__(413, f"Request body of {length} bytes is over the limit of {limit}.")
        self.length = length


class Server(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` that holds the worker, the settings and the page."""

    daemon_threads = True

    def __init__(self, cfg: ServerConfig, worker: Worker):
        self.cfg = cfg
        self.worker = worker
        self.created = int(time.time())
        self.page = resources.files(__package__).joinpath("page.html").read_bytes()
        infos = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        self.address_family, _, _, _, address = infos[0]
        super().__init__(address, Handler)

    def server_close(self):
        """Close the socket and park the worker: no session steps after this."""
        super().server_close()
        self.worker.park()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def make_server(cfg: ServerConfig) -> Server:
    """Load the model on a new worker thread and bind ``cfg.host:cfg.port`` (0: a free
    port).  Call ``serve_forever()`` on the result."""
    worker = Worker(cfg)
    worker.start()
    return Server(cfg, worker)


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.0"  # one request per connection; a stream ends with it
    server_version = "mstream-mlx"
    timeout = REQUEST_TIMEOUT

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)

    def _cors(self):
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "*")

    def _send(self, status: int, body: bytes, ctype: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self._cors()
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj, ensure_ascii=False).encode())

    def _error(self, status: int, message: str):
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._json(status, {"error": {"message": message, "type": kind, "code": status}})

    def _start_events(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self._cors()
        self.end_headers()

    def _sse(self, data: str, event: Optional[str] = None):
        head = f"event: {event}\n" if event else ""
        self.wfile.write(f"{head}data: {data}\n\n".encode())
        self.wfile.flush()

    def _client_gone(self) -> bool:
        """The client closed its end (it sends nothing after its request)."""
        try:
            if hasattr(select, "poll"):  # no FD_SETSIZE limit, unlike select()
                poll = select.poll()
                poll.register(self.connection, select.POLLIN)
                readable = bool(poll.poll(0))
            else:
                readable = bool(select.select([self.connection], [], [], 0)[0])
            return readable and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _body(self) -> dict:
        """The request's JSON object (``{}`` for no body)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(411, "Chunked bodies are not supported; send Content-Length.")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return {}
        try:
            length = int(raw_length)
            if length < 0:
                raise ValueError
        except ValueError:
            raise HTTPError(400, f"Invalid Content-Length header {raw_length!r:.40}.")
        if length > self.server.cfg.max_body:
            raise BodyTooLarge(length, self.server.cfg.max_body)
        raw = self.rfile.read(length) if length else b""
        if len(raw) < length:
            raise HTTPError(400, f"Request body truncated: got {len(raw)} of {length} bytes.")
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPError(400, f"Invalid JSON in request body: {e}")
        except RecursionError:
            raise HTTPError(400, "Invalid JSON in request body: nested too deeply.")
        if not isinstance(body, dict):
            kind = type(body).__name__
            raise HTTPError(400, f"The request body must be a JSON object, got {kind}.")
        return body

    def _drain(self, length: int):
        """Read and drop an oversized body so the client can read the 413."""
        self.connection.settimeout(1.0)
        left = min(length, DRAIN_LIMIT)
        try:
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        self.close_connection = True

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, socket.timeout):  # the client left: nothing to answer
            self.close_connection = True

    def _dispatch(self, method: str):
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if len(path) > 1:
            path = path.rstrip("/")
        try:
            self._answer(method, path)
        except (ConnectionError, socket.timeout):  # the client left while we answered
            self.close_connection = True

    def _answer(self, method: str, path: str):
        try:
            self._route(method, path)
        except HTTPError as e:
            self._error(e.status, str(e))
            if isinstance(e, BodyTooLarge):
                self._drain(e.length)
        except TooManySessions as e:
            self._error(429, str(e))
        except ValueError as e:
            self._error(400, " ".join(str(e).split()))
        except RuntimeError as e:  # e.g. feeding a session that has finished
            self._error(409, " ".join(str(e).split()))
        except (ConnectionError, socket.timeout):
            raise
        except Exception as e:  # a bug: one line to the client, the traceback to the log
            log.exception("request %s %s failed", method, path)
            self._error(500, f"Internal error: {type(e).__name__}: {e}")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_OPTIONS(self):
        self.send_response(204)
        self._cors()
        self.end_headers()

    # ------------------------------------------------------------------- routes
    def _route(self, method: str, path: str):
        if method == "GET" and path == "/":
            return self._send(200, self.server.page, "text/html; charset=utf-8")
        if method == "GET" and path == "/health":
            return self._json(200, {"status": "ok", "sessions": self.server.worker.count()})
        if method == "GET" and path == "/v1/models":
            w = self.server.worker
            return self._json(200, models_list(self.server.cfg.model_id, w.model.streams,
                                               self.server.created))
        if method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
            return self._chat_completions(self._body())
        if method == "POST" and path == "/v1/sessions":
            return self._create(self._body())
        m = SESSION_PATH.match(path)
        if m is None:
            raise HTTPError(404, f"No such endpoint: {method} {path[:80]}")
        live = self.server.worker.get(m.group(1))
        if live is None:
            raise HTTPError(404, f"No session {m.group(1)!r} (finished, closed or never made).")
        action = m.group(2)
        routes = {
            ("GET", None): lambda: self._json(200, self._state(live)),
            ("GET", "events"): lambda: self._events(live),
            ("DELETE", None): lambda: self._close(live),
            ("POST", "input"): lambda: self._input(live, self._body()),
            ("POST", "pause"): lambda: self._pace(live, paused=True),
            ("POST", "resume"): lambda: self._pace(live, paused=False),
            ("POST", "step"): lambda: self._pace(live, steps_wanted=live.steps_wanted + 1),
            ("POST", "tick"): lambda: self._tick(live, self._body()),
        }
        if (method, action) not in routes:
            raise HTTPError(404, f"No such endpoint: {method} {path[:80]}")
        routes[(method, action)]()

    # ------------------------------------------------------------ OpenAI API
    def _chat_completions(self, body: dict):
        cfg, worker = self.server.cfg, self.server.worker
        system, user = prompt_from_messages(body.get("messages"))
        system = system if system is not None else cfg.system_prompt
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ValueError(f"'stream' must be true or false, got {stream!r}.")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ValueError("'stream_options' must be an object.")
        stops = stop_strings(body.get("stop"))
        model, tokenizer = worker.model, worker.tokenizer
        kwargs = session_kwargs(model, cfg, body, live=False)

        def make() -> Session:  # on the worker
            session = Session(model, tokenizer, **kwargs)
            feed_prompt(session, user, system)
            return session

        spec = model.streams
        comp = Completion([spec.names[c] for c in spec.inputs],
                          list(head_names(model, kwargs["heads"])), cfg.model_id, stream, stops)
        live = worker.add(make, tick=0.0, paused=False)
        worker.update(live, reader="attached")
        session = live.session
        try:
            if stream:
                self._start_events()
            while not (live.done and not live.events):
                if self._client_gone():
                    return
                for event in worker.take(live, KEEPALIVE):
                    deltas = comp.add(event)
                    if comp.stopped:
                        session.stop()  # a stop string: the run ends at the next step
                    chunk = comp.chunk(deltas) if stream else None
                    if chunk is not None:
                        self._sse(json.dumps(chunk, ensure_ascii=False))
            if live.error:
                if not stream:
                    raise HTTPError(500, f"Generation failed: {live.error}")
                err = {"error": {"message": live.error, "type": "server_error", "code": 500}}
                self._sse(json.dumps(err))
            elif stream:
                self._sse(json.dumps(comp.chunk({}, comp.finish_reason)))
                if options.get("include_usage"):
                    self._sse(json.dumps(comp.usage_chunk()))
            else:
                self._json(200, comp.response())
            if stream:
                self._sse("[DONE]")
        finally:
            worker.leave(live)

    # ---------------------------------------------------------- live sessions
    def _create(self, body: dict):
        cfg, worker = self.server.cfg, self.server.worker
        first = text(body, "text")
        system = text(body, "system", cfg.system_prompt)
        tick = number(body, "tick", cfg.tick)
        if tick < 0:
            raise ValueError(f"'tick' must be >= 0 seconds, got {tick}.")
        paused = body.get("paused", not (first and first.strip()))
        if not isinstance(paused, bool):
            raise ValueError(f"'paused' must be true or false, got {paused!r}.")
        model, tokenizer = worker.model, worker.tokenizer
        kwargs = session_kwargs(model, cfg, body, live=True)

        def make() -> Session:  # on the worker
            session = Session(model, tokenizer, **kwargs)
            feed_prompt(session, first if first and first.strip() else None, system)
            return session

        live = worker.add(make, tick=tick, paused=paused)
        spec = model.streams
        out = self._state(live)
        out.update(
            layout=spec.layout,
            streams=live.names,
            inputs=[spec.names[c] for c in spec.inputs],
            outputs=list(head_names(model, kwargs["heads"])),
            events=f"/v1/sessions/{live.id}/events",
        )
        self._json(201, out)

    def _state(self, live: Live) -> dict:
        with self.server.worker.cond:
            return live.state()

    def _events(self, live: Live):
        worker = self.server.worker
        with worker.cond:
            if live.reader != "none":
                raise HTTPError(409, f"Session {live.id!r} already has a reader.")
            live.reader = "attached"
        try:
            self._start_events()
            while True:
                if self._client_gone():
                    return
                events = worker.take(live, KEEPALIVE)
                for event in events:
                    self._sse(event.to_json(live.names))
                if events and events[-1].finish_reason:
                    return
                if not events:
                    if live.done:
                        if live.error:
                            self._sse(json.dumps({"error": live.error}), event="error")
                        return
                    self.wfile.write(b": keepalive\n\n")
                    self.wfile.flush()
        finally:
            worker.leave(live)

    def _input(self, live: Live, body: dict):
        worker = self.server.worker
        words = text(body, "text", "")
        close = body.get("close", False)
        if not isinstance(close, bool):
            raise ValueError(f"'close' must be true or false, got {close!r}.")
        session = live.session
        if session is None or live.done:
            raise RuntimeError(f"Session {live.id!r} has finished; nothing reads input.")
        spec = worker.model.streams
        stream = text(body, "stream", spec.names[spec.inputs[-1]])
        if not words.strip() and not close:
            raise ValueError("'text' is empty: nothing to feed.")
        queued = session.feed(stream, words) if words.strip() else 0
        if close:
            session.close(stream)
        worker.update(live, paused=False)  # typing starts (or resumes) the clock, as chat's Enter
        self._json(200, {"id": live.id, "queued": queued, "t": live.t})

    def _pace(self, live: Live, **changes):
        self.server.worker.update(live, **changes)
        self._json(200, self._state(live))

    def _tick(self, live: Live, body: dict):
        tick = number(body, "tick", None)
        if tick is None or tick < 0:
            raise ValueError(f"'tick' must be a number of seconds >= 0, got {body.get('tick')!r}.")
        self._pace(live, tick=tick)

    def _close(self, live: Live):
        worker = self.server.worker
        session = live.session
        if session is not None:
            session.stop()  # the next step ends the run: a reader gets a last event
        with worker.cond:
            if live.reader == "none":
                live.reader = "gone"  # nobody to tell: free it now
        worker.update(live, paused=False)
        self._json(200, {"id": live.id, "closed": True})


def serve(cfg: ServerConfig, ready=None) -> None:
    """Run until interrupted; ``ready(server)`` is called once it listens."""
    server = make_server(cfg)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

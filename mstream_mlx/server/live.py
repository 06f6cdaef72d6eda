# Copyright © 2026 mstream-mlx contributors.
"""Sessions on one model: a single worker thread owns every MLX array and steps every
active session in turn; HTTP threads only feed text, flip flags and read events.

MLX arrays and streams belong to the thread that made them, so the model is loaded,
every :class:`~mstream_mlx.Session` is built and stepped, and every finished one is
dropped on the worker (``Worker.call`` runs a function there).  ``Session.feed`` and
``Session.stop`` are safe from any thread, so an HTTP thread calls them directly: text
typed while the model talks reaches it at the next timestep.

Each :class:`Live` holds its events until its reader takes them.  A session whose
reader falls ``MAX_BACKLOG`` events behind is not stepped until the reader catches up,
so a slow client slows only its own session and memory stays bounded.
"""

import atexit
import itertools
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable, Deque, Dict, List, Optional

import mlx.core as mx

import mstream_mlx
from mstream_mlx import Session, StepEvent
from mstream_mlx.heads import head_names

from .options import ServerConfig, shown_streams

MAX_BACKLOG = 256  # unread events a session may hold before the worker waits for its reader
IDLE_WAKE = 0.5  # seconds the worker sleeps at most when nothing is due (reaping idle sessions)


class TooManySessions(Exception):
    """The server already runs ``max_sessions`` sessions (HTTP 429)."""


class Live:
    """One session on the worker plus what its HTTP side needs.

    Every field but ``session`` is guarded by the worker's lock; ``session`` is only
    stepped, built and dropped on the worker (``feed``/``stop``/``close`` are
    thread-safe and may come from anywhere).  ``ready`` wakes this session's reader
    alone, so N readers are not all woken by every step of every session.
    """

    def __init__(self, sid: str, session: Session, names: List[str], tick: float,
                 lock: threading.Lock):
        self.id = sid
        self.ready = threading.Condition(lock)
        self.session: Optional[Session] = session
        self.names = names  # the streams of an event (generate's jsonl)
        self.tick = tick
        self.paused = False
        self.steps_wanted = 0  # single steps asked for while paused
        self.next_at = 0.0  # monotonic time of the next paced step
        self.events: Deque[StepEvent] = deque()
        self.t = 0  # events produced
        self.done = False
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None  # a step that raised: the session ends with it
        self.reader = "none"  # "none" (never attached), "attached", "gone"
        self.touched = time.monotonic()

    def due(self, now: float) -> bool:
        if self.done or self.reader == "gone" or len(self.events) >= MAX_BACKLOG:
            return False
        return self.steps_wanted > 0 or (not self.paused and now >= self.next_at)

    def state(self) -> dict:
        """``GET /v1/sessions/{id}``: where the session stands."""
        s = self.session
        return {
            "id": self.id,
            "t": self.t,
            "paused": self.paused,
            "tick": self.tick,
            "done": self.done,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "queued": s.queued() if s is not None else 0,
            "texts": dict(s.texts) if s is not None else {},
        }


class Worker:
    """The thread that owns the model: loads it, builds, steps and drops sessions."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)  # wakes the worker
        self.lives: Dict[str, Live] = {}
        self.model = self.tokenizer = None
        self._calls: Deque = deque()
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._ids = itertools.count(1)
        self._quit = False
        self._parked = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlx-worker", daemon=True)

    # ---------------------------------------------------------------- any thread
    def start(self):
        """Start the worker and wait until the model is loaded (its error re-raised)."""
        atexit.register(self.park)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def call(self, fn: Callable):
        """Run ``fn()`` on the worker thread and return its result (or raise its error)."""
        fut: Future = Future()
        with self.cond:
            if self._quit:
                raise RuntimeError("The server is shutting down.")
            self._calls.append((fn, fut))
            self.cond.notify_all()
        return fut.result()

    def add(self, make: Callable[[], Session], tick: float, paused: bool) -> Live:
        """Build a session on the worker (``make()``) and register it.

        Raises:
            TooManySessions: when ``max_sessions`` are running.
        """
        with self.cond:
            if len(self.lives) >= self.cfg.max_sessions:
                raise TooManySessions(
                    f"The server runs {len(self.lives)} sessions, its limit "
                    f"(--max-sessions {self.cfg.max_sessions}); close one or retry later."
                )
            sid = f"s{next(self._ids)}-{secrets.token_hex(4)}"
            # reserve the slot before the worker builds, so racing creates stay in bounds
            self.lives[sid] = None
        try:
            session = self.call(make)
        except BaseException:
            with self.cond:
                del self.lives[sid]
            raise
        shown = shown_streams(self.model.streams, session.schedule.heads)
        live = Live(sid, session, shown, tick, self.lock)
        live.paused = paused
        with self.cond:
            self.lives[sid] = live
            self.cond.notify_all()
        return live

    def count(self) -> int:
        """Sessions held (live ones and running completions)."""
        with self.cond:
            return len(self.lives)

    def get(self, sid: str) -> Optional[Live]:
        with self.cond:
            return self.lives.get(sid)

    def update(self, live: Live, **changes):
        """Change ``paused``/``tick``/``steps_wanted``/``reader`` and wake the worker."""
        with self.cond:
            for k, v in changes.items():
                setattr(live, k, v)
            live.touched = time.monotonic()
            if "tick" in changes or changes.get("paused") is False:
                live.next_at = 0.0
            self.cond.notify_all()

    def take(self, live: Live, timeout: float) -> List[StepEvent]:
        """Wait up to ``timeout`` s for ``live``'s events and take them (``[]`` on
        timeout or when the session has ended with nothing left to read)."""
        with self.lock:
            live.ready.wait_for(lambda: live.events or live.done, timeout)
            if len(live.events) >= MAX_BACKLOG:
                self.cond.notify_all()  # the session held back may go on
            out = list(live.events)
            live.events.clear()
            live.touched = time.monotonic()
            return out

    def park(self, timeout: float = 5.0):
        """Stop stepping and park the worker (after the step in flight): when the
        server closes, and at exit.

        MLX 0.32 may abort at exit when a thread that ran MLX work ends, or wakes while
        the interpreter shuts down (ml-explore/mlx#3126): the worker waits, parked, for
        the process to end instead."""
        with self.cond:
            self._quit = True
            self.cond.notify_all()
        if self._thread.is_alive():
            self._parked.wait(timeout)

    def leave(self, live: Live):
        """The reader is gone (finished or disconnected): the session is freed."""
        self.update(live, reader="gone")

    # ------------------------------------------------------------- worker thread
    def _run(self):
        try:
            self._work()
        except BaseException as e:  # loading failed: start() re-raises it
            self._error = e
            self._ready.set()
        # MLX 0.32 may abort at exit when a thread that ran MLX work has ended
        # (ml-explore/mlx#3126): park the daemon thread instead of returning.
        self._parked.set()
        threading.Event().wait()

    def _work(self):
        if self.cfg.seed is not None:
            mx.random.seed(self.cfg.seed)
        self.model, self.tokenizer = mstream_mlx.load(
            self.cfg.model, adapter_path=self.cfg.adapter_path
        )
        head_names(self.model, self.cfg.heads)  # a bad --heads fails at start
        self._ready.set()
        while not self._quit:
            self._run_calls()
            with self.cond:
                if self._quit:
                    return
                now = time.monotonic()
                self._reap(now)
                due = [v for v in self.lives.values() if v is not None and v.due(now)]
                if not due:
                    if not self._calls:
                        self.cond.wait(self._sleep(now))
                    continue
            for live in due:  # one timestep each, round robin
                self._step(live)
                self._run_calls()  # a new session waits at most one step per session

    def _run_calls(self):
        while True:
            with self.cond:
                if not self._calls:
                    return
                fn, fut = self._calls.popleft()
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

    def _step(self, live: Live):
        start = time.monotonic()
        try:
            event, error = live.session.step(), None
        except Exception as e:  # e.g. a cache limit: the session ends, the server goes on
            event, error = None, " ".join(str(e).split()) or type(e).__name__
        with self.cond:
            if live.steps_wanted:
                live.steps_wanted -= 1
            live.next_at = start + live.tick
            if event is not None:
                live.events.append(event)
                live.t += 1
            if error is not None or live.session.done:
                live.done = True
                live.error = error
                live.finish_reason = "error" if error else live.session.finish_reason
            live.ready.notify_all()

    def _reap(self, now: float):
        """Drop sessions whose reader left, and unread ones idle past ``idle_timeout``."""
        for sid, live in list(self.lives.items()):
            if live is None:
                continue
            idle = live.reader == "none" and now - live.touched > self.cfg.idle_timeout
            if live.reader == "gone" or idle:
                del self.lives[sid]
                live.done = True
                live.session = None  # the last reference: its arrays go on this thread
                live.ready.notify_all()

    def _sleep(self, now: float) -> float:
        waits = [
            v.next_at - now
            for v in self.lives.values()
            if v is not None and not v.paused and not v.done and len(v.events) < MAX_BACKLOG
        ]
        return max(0.0, min(waits + [IDLE_WAKE]))

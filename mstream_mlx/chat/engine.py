# Copyright © 2026 mstream-mlx contributors.
"""The model side of ``mstream-mlx chat``: one worker thread loads the model, owns the
:class:`~mstream_mlx.session.Session` objects and steps them at the ``--tick`` pace.
The UI thread only feeds text (``Session.feed`` is thread-safe) and reads messages
from :attr:`ChatEngine.outbox`.

All MLX work happens on the worker thread, loading included: MLX streams belong to a
thread, so an array left unevaluated by one thread cannot be evaluated by another, and
the UI is up (and says "loading") while the weights load.

Turns follow the layout:

* **rows** (§7): one interactive session.  The user may type at any time; a message
  enters the user stream one token per timestep (an interrupt if the model is talking)
  and silence rows go on between messages.  ``/reset`` starts a new session.
* **blocks** (§5-6): one system, user and assistant block per conversation, so each
  conversation is a turn.  Enter starts a turn; text sent while the user block is open
  extends it (an interrupt the model reads while it answers).  The block closes with
  ``<|im_end|>`` once it has been read and nothing new came for ``close_after`` seconds
  (0: at once, as the reference does).  Text sent after that starts a new turn and cuts
  the answer in progress.
"""

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..cache import KVFlags
from ..events import StepEvent
from ..heads import head_names
from ..sample import SamplingSettings
from ..schedules import DEFAULT_SYSTEM, BlocksOptions, RowsOptions, schedule_class
from ..session import Session
from ..streams import BLOCKS

ROWS_SESSION_STEPS = 100_000  # rows: a chat session has no row limit worth meeting
RATE_WINDOW = 2.0  # seconds of steps the status line's rates average over

Cell = Tuple[str, str]
"""A ticker cell: ``(text, kind)``, kind ``"tok"``, ``"sil"`` (silence) or ``"end"``
(a stop token such as ``<|im_end|>``)."""


@dataclass
class ChatOptions(KVFlags):
    """What ``mstream-mlx chat`` was asked for (the CLI flags).

    Args:
        model: a model folder or Hub id, already resolved to a local folder.
        label: what the screen says runs (``None``: ``model``).
        adapter_path: LoRA adapters to apply.
        tick: seconds per timestep (0: as fast as the model goes).
        temp, top_p, top_k, seed: sampling, the same for every output stream.
        max_tokens: per output stream (``Session``'s ``max_tokens``).
        max_steps: timesteps per turn (blocks, and a plain-mode rows turn).
        system_prompt: blocks: the system block; rows: read first on the user stream.
        close_after: blocks: seconds the user block stays open for more text.
        heads: the output streams that generate (``None``: the model's; docs/generation.md).
        kv_bits, kv_group_size, quantized_kv_start, kv_window: the session's KV cache
            bounds (:class:`~mstream_mlx.cache.KVFlags`).
        idle_pause: rows: all-silent rows before the clock stops until the user types
            (0 = never; docs/long-sessions.md).
    """

    model: str
    label: Optional[str] = None
    adapter_path: Optional[str] = None
    tick: float = 0.0
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    max_tokens: Optional[int] = None
    max_steps: Optional[int] = None
    system_prompt: Optional[str] = None
    close_after: float = 2.0
    heads: Optional[Sequence[str]] = None
    idle_pause: int = 0

    def __post_init__(self):
        if self.tick < 0:
            raise ValueError(f"--tick must be >= 0 seconds, got {self.tick}.")
        if self.close_after < 0:
            raise ValueError(f"--close-after must be >= 0 seconds, got {self.close_after}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}.")
        if self.idle_pause < 0:
            raise ValueError(f"--idle-pause must be >= 0, got {self.idle_pause}.")
        super().__post_init__()


@dataclass(frozen=True)
class ModelInfo:
    """The stream facts the UI needs, from ``model.streams``."""

    label: str
    layout: str
    names: Tuple[str, ...]
    user: str  # the main input stream: rows "User", blocks "user"
    outputs: Tuple[str, ...]  # the heads: the output streams that generate
    silence_token: Optional[int]

    @property
    def primary(self) -> str:
        """The stream the conversation log shows (rows ``Output``, blocks ``assistant``)."""
        return self.outputs[0]

    @property
    def thinking(self) -> Tuple[str, ...]:
        """The other output streams (rows: thinking streams; blocks: the auditor)."""
        return self.outputs[1:]

    @property
    def shown(self) -> Tuple[str, ...]:
        """Every stream the ticker can show, user first."""
        return (self.user,) + self.outputs


def load_chat_model(opts: ChatOptions):
    """Load the model on the calling thread; returns ``(model, tokenizer, info)``."""
    import mstream_mlx

    if opts.seed is not None:
        mx.random.seed(opts.seed)
    model, tokenizer = mstream_mlx.load(opts.model, adapter_path=opts.adapter_path)
    spec = model.streams
    info = ModelInfo(
        label=opts.label or opts.model,
        layout=spec.layout,
        names=tuple(spec.names),
        user=spec.names[spec.inputs[-1]],
        outputs=head_names(model, opts.heads),
        silence_token=spec.silence_token,
    )
    return model, tokenizer, info


def make_session(
    model, tokenizer, info: ModelInfo, opts: ChatOptions, texts: Sequence[str] = (),
    close_user: Optional[bool] = None,
) -> Session:
    """A new session with the chat settings, ``texts`` queued on the user stream.

    ``close_user``: blocks: close the user block when its queue runs dry (default: when
    ``opts.close_after`` is 0).
    """
    sampling = SamplingSettings(
        temp=opts.temp, top_p=opts.top_p, top_k=opts.top_k,
        method=schedule_class(info.layout).sampling_method,
    )
    kwargs = dict(
        sampling=sampling, max_tokens=opts.max_tokens, heads=info.outputs,
        **opts.session_kwargs(),
    )
    if info.layout == BLOCKS:
        close = opts.close_after <= 0 if close_user is None else close_user
        session = Session(
            model, tokenizer, max_steps=opts.max_steps,
            blocks=BlocksOptions(system=opts.system_prompt or DEFAULT_SYSTEM, close_user=close),
            **kwargs,
        )
    else:
        # interactive: never stops on silence; a feed lands in the row just produced
        rows = RowsOptions.for_model(model, idle_pause=opts.idle_pause)
        session = Session(
            model, tokenizer, max_steps=ROWS_SESSION_STEPS, interactive=True, rows=rows,
            **kwargs,
        )
        if opts.system_prompt:  # paper §7: the system prompt streams through the user channel
            session.feed(info.user, opts.system_prompt)
    for text in texts:
        session.feed(info.user, text)
    return session


def cell(tokenizer, info: ModelInfo, tok: Optional[int]) -> Optional[Cell]:
    """How one token shows in the ticker (paper §7: ``decode([t]).strip() or "-"``,
    with visible marks for whitespace and stop tokens)."""
    if tok is None:
        return None
    if tok == info.silence_token:
        return ("-", "sil")
    text = tokenizer.decode([tok])
    if text == "<|im_end|>":
        return ("⏹", "end")
    if not text.strip():
        return ("⏎" if "\n" in text else "␣", "tok")
    return ("".join(ch if ch.isprintable() else "?" for ch in text.strip()), "tok")


# ------------------------------------------------------------------- messages
@dataclass
class Ready:
    """The model is loaded."""

    info: ModelInfo


@dataclass
class Started:
    """Session ``index`` (1, 2, ...) started with ``texts`` queued on the user stream
    (none when Esc started a rows session's clock)."""

    index: int
    texts: List[str]


@dataclass
class Stepped:
    """One timestep of session ``index``, with what the status line shows."""

    index: int
    event: StepEvent
    cells: Dict[str, Optional[Cell]]
    queued: int  # user tokens fed but not read yet
    rate: float  # timesteps per second, pacing included
    model_rate: float  # timesteps per second the model could do (step time only)
    tokens_per_sec: float  # output tokens (silence included) per second
    memory: float  # active MLX memory, GB
    idle: bool = False  # rows idle pause: the clock stopped after this step


@dataclass
class Ended:
    """Session ``index`` ended: ``"stop"``/``"length"`` (its own), ``"reset"``, ``"cut"``."""

    index: int
    reason: str


@dataclass
class Failed:
    """The worker stopped on an error (one line)."""

    message: str


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------- engine
class ChatEngine:
    """The model worker: call :meth:`start`, then :meth:`send`, :meth:`toggle_pause`,
    :meth:`reset` and :meth:`close` from the UI thread, and read :attr:`outbox`
    (``Ready``, ``Started``, ``Stepped``, ``Ended``, ``Failed``)."""

    def __init__(self, opts: ChatOptions):
        self.opts = opts
        self.outbox: "queue.Queue" = queue.Queue()
        self.info: Optional[ModelInfo] = None
        self.model = self.tokenizer = None
        self._cond = threading.Condition()
        self._quit = False
        self._paused = False
        self._reset = False
        self._clock = False  # rows: start a session without a message (Esc)
        self._pending: List[str] = []  # texts for a new session
        self._session: Optional[Session] = None
        self._index = 0
        self._last_input = 0.0
        self._closed = False
        self._steps: deque = deque(maxlen=256)  # (done_at, step_seconds, output tokens)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mstream-chat-model", daemon=True)

    # ------------------------------------------------------------- UI thread
    def start(self):
        self._thread.start()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def running(self) -> bool:
        """A session exists and has not finished."""
        s = self._session
        return s is not None and not s.done

    def send(self, text: str) -> bool:
        """Queue a message on the user stream: into the running session at its next
        timesteps (``Session.feed``), or into a new session.  Also resumes.

        Returns:
            ``True`` if the text went into the running session, ``False`` if it starts
            a new one (reported by a ``Started`` message).

        Raises:
            ValueError: the text gives no tokens, or the model is still loading.
        """
        if self.info is None:
            raise ValueError("The model is still loading.")
        text = text.strip()
        with self._cond:
            self._paused = False  # Enter also resumes (the reference demo)
            s = self._session
            if s is not None and not s.done and not self._pending and not self._reset:
                if self.info.layout == BLOCKS:
                    text = " " + text  # blocks text is encoded as is: keep messages apart
                ids = s.tokenize(self.info.user, text)
                if not ids:
                    raise ValueError(f"Nothing to send: {text!r} gives no tokens.")
                try:
                    s.feed(self.info.user, ids)
                    self._last_input = time.perf_counter()
                    self._cond.notify_all()
                    return True
                except ValueError:
                    if self.info.layout != BLOCKS:
                        raise
                    # blocks: the user block is closed; the text starts a new turn
            self._pending.append(text.strip())
            self._cond.notify_all()
            return False

    def toggle_pause(self) -> bool:
        """Pause or resume the clock; returns whether it is paused now.  With no
        session, a rows model starts one (the clock runs silence rows)."""
        with self._cond:
            if not self.running and not self._pending:
                self._paused = False
                if self.info is not None and self.info.layout != BLOCKS:
                    self._clock = True
            else:
                self._paused = not self._paused
            self._cond.notify_all()
            return self._paused

    def reset(self):
        """End the current session; the next message (rows: or Esc) starts a new one."""
        with self._cond:
            self._reset = True
            self._pending.clear()
            self._clock = False
            self._paused = False
            self._cond.notify_all()

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the worker after the step in flight; returns whether it stopped within
        ``timeout`` seconds."""
        with self._cond:
            self._quit = True
            if self._session is not None:
                self._session.stop()
            self._cond.notify_all()
        return self._stopped.wait(timeout) if self._thread.is_alive() else True

    # --------------------------------------------------------- worker thread
    def _run(self):
        try:
            self._work()
        finally:
            self._stopped.set()
            # Park instead of returning: with MLX 0.32 a thread that ran MLX work and
            # then ends can make the process abort at exit ("terminate called without
            # an active exception", ml-explore/mlx#3126); a parked daemon thread never
            # tears down its MLX state.
            threading.Event().wait()

    def _work(self):
        try:
            self.model, self.tokenizer, info = load_chat_model(self.opts)
        except Exception as e:  # reported to the UI, which exits with it
            self.outbox.put(Failed(one_line(e)))
            return
        self.info = info
        self.outbox.put(Ready(info))
        while True:
            with self._cond:
                while not self._quit and not self._has_work():
                    self._cond.wait()
                if self._quit:
                    return
                try:
                    s = self._prepare()
                except Exception as e:
                    self.outbox.put(Failed(one_line(e)))
                    return
            if s is None:
                continue
            t0 = time.perf_counter()
            try:
                event = s.step()
            except Exception as e:
                self.outbox.put(Failed(one_line(e)))
                return
            self._publish(s, event, t0)
            self._pace(t0)

    def _live(self) -> bool:
        s = self._session
        return s is not None and not s.done

    def _has_work(self) -> bool:
        return (
            self._reset or bool(self._pending) or self._clock
            or (self._live() and not self._paused and not self._session.schedule.idle())
        )

    def _prepare(self) -> Optional[Session]:
        """Apply reset and new-session requests (under the lock); the session to step."""
        if self._reset:
            self._reset = False
            self._end("reset")
        if self._pending or (self._clock and not self._live()):
            texts, self._pending, self._clock = self._pending, [], False
            self._end("cut")
            self._index += 1
            self._session = make_session(self.model, self.tokenizer, self.info, self.opts, texts)
            self._closed = False
            self._last_input = time.perf_counter()
            self._steps.clear()
            self.outbox.put(Started(self._index, texts))
        self._clock = False
        return self._session if self._live() and not self._paused else None

    def _end(self, reason: str):
        if self._live():
            self._session.stop()
            self.outbox.put(Ended(self._index, reason))
        self._session = None

    def _publish(self, s: Session, event: StepEvent, t0: float):
        info = self.info
        now = time.perf_counter()
        cells = {n: cell(self.tokenizer, info, event.tokens[n]) for n in info.shown}
        if info.layout != BLOCKS and cells[info.user] is None:
            cells[info.user] = ("-", "sil")  # rows: an empty user cell is read as silence
        n_out = sum(event.tokens[n] is not None for n in info.outputs)
        self._steps.append((now, now - t0, n_out))
        recent = [x for x in self._steps if x[0] >= now - RATE_WINDOW]
        span = recent[-1][0] - recent[0][0] if len(recent) > 1 else 0.0
        rate = (len(recent) - 1) / span if span > 0 else 0.0
        busy = sum(x[1] for x in recent)
        model_rate = len(recent) / busy if busy > 0 else 0.0
        per_step = sum(x[2] for x in recent) / len(recent)
        if event.tokens[info.user] is not None:
            self._last_input = now
        queued = s.queued(info.user)
        if (
            info.layout == BLOCKS and self.opts.close_after > 0 and not self._closed
            and queued == 0 and now - self._last_input >= self.opts.close_after
        ):
            s.close()  # the user block ends with <|im_end|> at the next timestep
            self._closed = True
        self.outbox.put(Stepped(
            self._index, event, cells, queued, rate, model_rate, rate * per_step,
            mx.get_active_memory() / 1e9, s.schedule.idle(),
        ))
        if s.done:
            self.outbox.put(Ended(self._index, s.finish_reason or "stop"))

    def _pace(self, t0: float):
        """Wait out the rest of the tick; a reset, a new message or quit cuts it short."""
        if self.opts.tick <= 0:
            return
        deadline = t0 + self.opts.tick
        with self._cond:
            while not (self._quit or self._reset or self._pending):
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)

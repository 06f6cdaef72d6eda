# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx chat``: the model worker in process, the plain line mode end to end
(subprocess, stdin piped), and the real full-screen UI driven in tmux (type, interrupt
mid-generation, Esc, Tab, /save, /reset, Ctrl-C restores the terminal), on tiny
random rows and blocks models."""

import io
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import time

from pathlib import Path

import pytest
from typer.testing import CliRunner

import mstream_mlx
import mstream_mlx.utils
from mstream_mlx.chat import ChatEngine, ChatOptions, Transcript, run_plain
from mstream_mlx.chat.engine import Ended, Failed, ModelInfo, Ready, Started, Stepped
from mstream_mlx.cli.main import app
from tests.tiny import make_checkpoint

CLI = [sys.executable, "-m", "mstream_mlx.cli.main", "chat"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def rows_model(tiny_checkpoint):
    return tiny_checkpoint("qwen3", "rows", tied=False)


@pytest.fixture(scope="module")
def blocks_model(tmp_path_factory):
    """Solver + auditor heads that (almost) never say <|im_end|>: every other logit is
    scaled 4x (std ~3) and im_end's is 0, so a turn ends only when the test says so."""
    from safetensors.numpy import load_file, save_file

    folder = make_checkpoint(tmp_path_factory.mktemp("chat-blocks"), "qwen3", "blocks",
                             num_channels=4, tied=False, heads=("assistant", "auditor"))
    f = folder / "model.safetensors"
    w = load_file(str(f))
    im_end = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]["<|im_end|>"]
    w["lm_head.weight"] *= 4.0
    w["lm_head.weight"][im_end] = 0.0
    save_file(w, str(f), metadata={"format": "pt"})
    return folder


def ids(folder, text, blocks=False):
    """The user stream's ids: rows encode ``" " + word`` per word, blocks the text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if blocks:
        return tok.encode(text, add_special_tokens=False)
    return [i for w in text.split() for i in tok.encode(" " + w, add_special_tokens=False)]


# ------------------------------------------------------------- model worker
def drain(engine, until, timeout=20.0):
    """Messages from the engine until ``until(messages)`` holds."""
    got, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            got.append(engine.outbox.get(timeout=0.05))
        except queue.Empty:
            continue
        if isinstance(got[-1], Failed):
            raise AssertionError(got[-1].message)
        if until(got):
            return got
    raise AssertionError(f"timed out; last messages: {got[-3:]}")


def user_reads(msgs, info):
    return [m.event.tokens[info.user] for m in msgs
            if isinstance(m, Stepped) and m.event.tokens[info.user] is not None]


def test_engine_rows_interrupt_pause_reset(rows_model):
    """Words sent mid-generation enter the user stream at the next rows, after the
    first message; pause stops the clock; reset ends the session."""
    engine = ChatEngine(ChatOptions(model=str(rows_model), seed=0))
    engine.start()
    try:
        (ready,) = drain(engine, lambda m: isinstance(m[-1], Ready))
        info = ready.info
        assert info.layout == "rows" and info.user == "User" and info.primary == "Output"
        assert len(info.thinking) == 8
        assert engine.send("one two") is False  # no session yet: starts one
        msgs = drain(engine, lambda m: len(user_reads(m, info)) >= 1)
        assert isinstance(msgs[0], Started) and msgs[0].texts == ["one two"]
        assert engine.send("plus three") is True  # into the running session: an interrupt
        msgs += drain(engine, lambda m: len(user_reads(msgs + m, info)) >= 4)
        assert user_reads(msgs, info) == ids(rows_model, "one two plus three")
        steps = [m for m in msgs if isinstance(m, Stepped)]
        assert [m.event.t for m in steps] == list(range(len(steps)))
        assert all(set(m.cells) == set(info.shown) for m in steps)
        assert steps[-1].cells["User"] == ("three", "tok")
        # the outputs wrote at every row, silence included
        assert all(m.cells["Output"] is not None for m in steps[1:])

        assert engine.toggle_pause() is True
        time.sleep(0.1)
        while not engine.outbox.empty():
            engine.outbox.get()
        time.sleep(0.2)
        assert engine.outbox.empty()  # paused: no steps
        assert engine.toggle_pause() is False
        drain(engine, lambda m: any(isinstance(x, Stepped) for x in m))

        engine.reset()
        msgs = drain(engine, lambda m: any(isinstance(x, Ended) for x in m))
        assert [m.reason for m in msgs if isinstance(m, Ended)] == ["reset"]
        assert not engine.running
        engine.send("hello")
        msgs = drain(engine, lambda m: any(isinstance(x, Started) for x in m))
        assert [m.index for m in msgs if isinstance(m, Started)] == [2]
    finally:
        engine.close()
    assert engine.close()  # the worker stopped (closing twice is harmless)


def test_engine_blocks_extend_close_new_turn(blocks_model):
    """Blocks: text sent while the user block is open extends it; the block closes
    with <|im_end|> after close_after seconds; a later message starts a new turn."""
    engine = ChatEngine(ChatOptions(model=str(blocks_model), seed=0, tick=0.02,
                                    close_after=0.3, max_tokens=400))
    engine.start()
    try:
        (ready,) = drain(engine, lambda m: isinstance(m[-1], Ready))
        info = ready.info
        assert info.layout == "blocks" and info.user == "user"
        assert info.outputs == ("assistant", "auditor")
        engine.send("what is one")
        msgs = drain(engine, lambda m: len(user_reads(m, info)) >= 1)
        assert engine.send("plus two") is True
        msgs += drain(engine, lambda m: any(
            isinstance(x, Stepped) and x.cells["user"] == ("⏹", "end") for x in m))
        # a message that extends the block is sent with a space before it
        want = ids(blocks_model, "what is one", True) + ids(blocks_model, " plus two", True)
        assert user_reads(msgs, info)[:-1] == want
        steps = [m for m in msgs if isinstance(m, Stepped)]
        assert all(m.cells["assistant"] is not None for m in steps)
        # closed: the next message cuts the answer and starts turn 2
        assert engine.send("hello") is False
        msgs = drain(engine, lambda m: any(isinstance(x, Started) for x in m))
        assert [(type(m).__name__, getattr(m, "reason", None)) for m in msgs
                if isinstance(m, (Ended, Started))][-2:] in (
            [("Ended", "cut"), ("Started", None)], [("Ended", "stop"), ("Started", None)],
            [("Ended", "length"), ("Started", None)])
        assert msgs[-1].index == 2 and msgs[-1].texts == ["hello"]
    finally:
        engine.close()


def test_engine_reports_load_errors(tmp_path):
    engine = ChatEngine(ChatOptions(model=str(tmp_path)))
    engine.start()
    msg = engine.outbox.get(timeout=20)
    assert isinstance(msg, Failed) and "config.json" in msg.message
    with pytest.raises(ValueError, match="still loading"):
        engine.send("hi")
    engine.close()


def test_options_are_checked():
    with pytest.raises(ValueError, match="--tick must be >= 0"):
        ChatOptions(model="m", tick=-1)
    with pytest.raises(ValueError, match="--close-after"):
        ChatOptions(model="m", close_after=-0.5)


# --------------------------------------------------------------- transcript
def test_transcript_log_and_atomic_save(tmp_path):
    from mstream_mlx.session import StepEvent

    info = ModelInfo("m", "rows", ("User", "Output", "Analytical"), "User",
                     ("Output", "Analytical"), 9)

    def ev(t, tokens, text):
        return StepEvent(t, tokens, text, {}, {}, None, 0, 0.0, t, 0.0, 0, 0.0,
                         None, None, 0.0)

    tr = Transcript(info, {"model": "m"})
    tr.start(1, ["hi there"])
    def add(t, toks, texts):
        names = ("User", "Output", "Analytical")
        tr.add(ev(t, dict(zip(names, toks)), dict(zip(names, texts))))

    add(0, (5, 9, 7), (" hi", "", " a"))  # silence is 9
    add(1, (6, 8, 9), (" there", " yo", ""))
    add(2, (None, 8, 9), ("", " yo", ""))
    tr.notice("reset")
    assert [(e.speaker, e.text) for e in tr.log] == [
        ("You", "hi there"), ("Output", "yo yo"), (None, "reset")]
    path = tr.save(tmp_path / "t.json")
    data = json.loads(path.read_text())
    assert data["streams"] == ["User", "Output", "Analytical"] and data["model"] == "m"
    s = data["sessions"][0]
    assert s["tokens"]["User"] == [5, 6, None] and s["text"]["Output"] == " yo yo"
    assert s["t"] == [0, 1, 2] and s["sent"] == ["hi there"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no temp file left
    with pytest.raises(ValueError, match="is a folder"):
        tr.save(tmp_path)
    with pytest.raises(FileNotFoundError, match="No folder"):
        tr.save(tmp_path / "missing" / "t.json")


# ---------------------------------------------------------------- the CLI
def test_no_default_model_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(mstream_mlx.utils, "__file__", str(tmp_path / "pkg" / "utils.py"))
    r = CliRunner().invoke(app, ["chat", "--plain"], input="hi\n")
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1
    assert str(tmp_path / "pkg" / "assets" / "default_model") in lines[0]
    assert "pass --model" in lines[0]


def test_default_model_answers(monkeypatch):
    """No --model: the bundled demo model runs, says so, and keeps the running total."""
    from mstream_mlx.utils import default_model_path

    try:
        path = default_model_path()
    except ValueError:
        pytest.skip("no bundled default model in this checkout")
    r = CliRunner().invoke(app, ["chat"], input="add five\nminus two\n")
    assert r.exit_code == 0, r.stderr
    assert f"model: bundled default model ({path})" in r.stderr
    assert re.findall(r"^Output: (.*)$", r.stdout, re.M) == ["5", "3"]


def test_plain_mode_end_to_end(rows_model, tmp_path):
    """Line mode over a pipe (a subprocess): every stream printed, /save writes valid
    JSON, /reset starts a new session."""
    save = tmp_path / "rows.json"
    script = f"one two three\n/save {save}\n/reset\nhello world\n/save {save}\n/help\n"
    r = subprocess.run(
        CLI + ["--model", str(rows_model), "--max-steps", "8", "--seed", "0"],
        input=script, capture_output=True, text=True, env=ENV, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    # the first output stream is printed as written (newlines too), the others one line each
    labels = [m.group(1) for m in re.finditer(r"^(\w+): ", r.stdout, re.M)]
    names = ["Output", "Analytical", "Skeptical", "Intuitive", "Between", "Curious",
             "Void", "Instinct", "Synthesis"]
    assert labels == ["You", *names, "You", *names]
    assert r.stdout.startswith("You: one two three\nOutput: ")
    assert "\nYou: hello world\nOutput: " in r.stdout
    assert "[chat] model:" in r.stderr and "/reset" in r.stderr and "Peak memory" in r.stderr
    data = json.loads(save.read_text())
    assert data["layout"] == "rows" and data["streams"][:2] == ["User", "Output"]
    assert [s["finish_reason"] for s in data["sessions"]] == ["reset", None]
    first = data["sessions"][0]["tokens"]["User"]
    assert [t for t in first if t is not None] == ids(rows_model, "one two three")
    assert any(e["speaker"] == "notice" and e["text"] == "reset" for e in data["conversation"])


def test_plain_mode_blocks(blocks_model):
    """Blocks in line mode: each line is a turn (a new session), both heads printed."""
    out, err = io.StringIO(), io.StringIO()
    opts = ChatOptions(model=str(blocks_model), seed=0, max_tokens=12)
    code = run_plain(opts, stdin=io.StringIO("what is one plus two\n\n/nope\nhello\n"),
                     out=out, err=err)
    assert code == 0
    text = out.getvalue()
    labels = [m.group(1) for m in re.finditer(r"^(\w+): ", text, re.M)]
    assert labels == ["You", "assistant", "auditor"] * 2
    assert text.startswith("You: what is one plus two\nassistant: ")
    assert "\nYou: hello\nassistant: " in text
    assert "unknown command /nope" in err.getvalue()
    assert re.search(r"Generation: .*, 24 tokens,", err.getvalue())  # -m 12: 2 heads x 12


# ------------------------------------------------------------ full screen
needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    """A private tmux server running a shell in a 120x40 pane."""

    def __init__(self, name: str):
        self.sock = f"mstream-chat-test-{os.getpid()}-{name}"
        self.tmux("new-session", "-d", "-s", "t", "-x", "120", "-y", "40",
                  "env", "-i", f"PATH={os.environ['PATH']}", "TERM=xterm-256color",
                  f"HOME={os.environ.get('HOME', '/tmp')}", "bash", "--norc", "--noprofile")
        self.keys("PS1='READY$ '", "Enter")

    def tmux(self, *args) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], check=True,
                              capture_output=True, text=True).stdout

    def keys(self, *keys):
        self.tmux("send-keys", "-t", "t", *keys)

    def type(self, text: str):
        self.tmux("send-keys", "-t", "t", "-l", text)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t")

    def wait(self, pattern: str, timeout: float = 25.0) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.screen()
            if re.search(pattern, s, re.M):
                return s
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} never showed; the screen:\n{self.screen()}")

    def kill(self):
        path = subprocess.run(["tmux", "-L", self.sock, "display", "-p", "#{socket_path}"],
                              capture_output=True, text=True).stdout.strip()
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)
        if path:
            Path(path).unlink(missing_ok=True)


def line(screen: str, label: str) -> str:
    for ln in screen.splitlines():
        if ln.startswith(label + ":"):
            return ln
    return ""


def t_of(screen: str) -> int:
    m = re.search(r"^ t (\d+) ", screen, re.M)
    return int(m.group(1)) if m else -1


@needs_tmux
def test_screen_rows(rows_model, tmp_path):
    """Type, interrupt mid-generation, Esc pause, Tab, /save, /reset, Ctrl-C."""
    tm = Tmux("rows")
    save = tmp_path / "chat.json"
    try:
        tm.keys(" ".join(CLI + ["--model", str(rows_model), "--tick", "0.1", "--seed", "0"])
                + "; echo EXIT=$?; stty -a | tr ' ' '\\n' | grep -x -e '-*icanon' -e '-*echo'",
                "Enter")
        s = tm.wait(r"model: .*rows")
        assert "waiting" in s.splitlines()[0] or "start the clock" in s.splitlines()[0]
        assert all(line(s, n) for n in ("User", "Output", "Analytical", "Synthesis"))
        tm.type("one two")
        tm.keys("Enter")
        tm.wait(r"^User: .*\btwo\b")  # the model is reading, and writing at every row
        tm.type("plus three")  # typing while it runs: the typing line shows it
        tm.wait(r"^ You: plus three")
        tm.keys("Enter")  # an interrupt: enters the user stream at the next rows
        s = tm.wait(r"^User: .*\bthree\b")
        cells = line(s, "User").split()[1:]
        assert cells.index("plus") < cells.index("three")
        assert "running" in s.splitlines()[0]
        # the log: what the model read, when it read it (the outputs write every row)
        said = " ".join(m.group(1) for m in re.finditer(r"^ You: (.*?)\s*$", s, re.M))
        assert said.split()[:4] == ["one", "two", "plus", "three"], s
        assert re.search(r"rows/s .* tok/s .* queued \d+ .* mem ", s)

        tm.keys("Escape")  # pause: the clock stops
        s = tm.wait(r"PAUSED")
        time.sleep(0.3)
        t0 = t_of(tm.screen())
        time.sleep(0.4)
        assert t_of(tm.screen()) == t0 > 0
        tm.keys("Escape")
        tm.wait(r"running")
        deadline = time.time() + 5
        while t_of(tm.screen()) <= t0 and time.time() < deadline:
            time.sleep(0.05)
        assert t_of(tm.screen()) > t0

        tm.keys("Tab")  # hide the thinking streams
        s = tm.wait(r"Tab shows thinking")
        assert not line(s, "Analytical") and line(s, "Output")
        tm.keys("Tab")
        s = tm.wait(r"Tab hides thinking")
        assert line(s, "Analytical")

        tm.type(f"/save {save}")
        tm.keys("Enter")
        tm.wait(r"saved 1 session")
        data = json.loads(save.read_text())
        user = [t for t in data["sessions"][0]["tokens"]["User"] if t is not None]
        assert user == ids(rows_model, "one two plus three")
        out = data["sessions"][0]["tokens"]["Output"]
        first_plus = data["sessions"][0]["tokens"]["User"].index(user[2])
        assert all(t is not None for t in out[1:first_plus])  # it ran while we typed

        tm.type("/reset")
        tm.keys("Enter")
        s = tm.wait(r"ended \(reset\)")
        assert "reset: the next message starts a new session" in s

        tm.keys("C-c")
        s = tm.wait(r"^READY\$$")  # the shell prompt is back
        assert "EXIT=0" in s, s
        assert re.search(r"^icanon$", s, re.M) and re.search(r"^echo$", s, re.M)
        assert "mstream-mlx chat ·" not in s  # the alternate screen is gone
    finally:
        tm.kill()


@needs_tmux
def test_screen_blocks(blocks_model):
    """Blocks: Enter starts a turn, a second message extends the open user block."""
    tm = Tmux("blocks")
    try:
        tm.keys(" ".join(CLI + ["--model", str(blocks_model), "--tick", "0.1", "--seed", "0",
                                "--close-after", "1.5", "-m", "300"]) + "; echo EXIT=$?",
                "Enter")
        s = tm.wait(r"model: .*blocks")
        assert line(s, "user") and line(s, "assistant") and line(s, "auditor")
        assert not line(s, "system")
        tm.type("what is one")
        tm.keys("Enter")
        tm.wait(r"^user: .*\bone\b")
        tm.type("plus two")
        tm.keys("Enter")
        s = tm.wait(r"^user: .*\bplus\b.*\btwo\b")
        assert "running" in s.splitlines()[0]
        s = tm.wait(r"^user: .*⏹")  # the block closes once read and idle
        assert line(s, "assistant").split()[1:]
        said = " ".join(m.group(1) for m in re.finditer(r"^ You: (.*?)\s*$", s, re.M))
        assert said.split() == ["what", "is", "one", "plus", "two"], s
        tm.keys("C-c")
        s = tm.wait(r"EXIT=\d+")
        assert "EXIT=0" in s, s
    finally:
        tm.kill()

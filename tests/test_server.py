# Copyright © 2026 mstream-mlx contributors.
"""``mstream-mlx server`` on loopback: the OpenAI endpoint through the official
``openai`` client (streamed and not) against the library's own ``generate``, live
sessions (feed while the model talks, pause/step/resume/tick, close), several clients
at once, and bad input: 400/404/409/413/429, disconnects that free sessions, a fuzz
of malformed and truncated requests, and paths that never reach a file.

The bundled model (rows, 3 streams) and a tiny blocks model (4 streams: system, user,
assistant, auditor) cover both layouts."""

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

import mstream_mlx
from mstream_mlx.utils import default_model_path
from mstream_mlx.cli.main import app
from mstream_mlx.server import ServerConfig, make_server

openai = pytest.importorskip("openai")

SUM = "add five minus two add nine"  # the bundled model keeps a running total: 5 3 12


def start(cfg: ServerConfig):
    server = make_server(cfg)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def rows():
    """The bundled model; live sessions at full speed unless a test sets the tick."""
    server = start(ServerConfig(model=str(default_model_path()), port=0, tick=0.0))
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def blocks_folder(tiny_checkpoint):
    return tiny_checkpoint("qwen3", "blocks", num_channels=4, heads=("assistant", "auditor"))


@pytest.fixture(scope="module")
def blocks(blocks_folder):
    """A tiny blocks model with small limits, for the 413 and 429 paths."""
    cfg = ServerConfig(model=str(blocks_folder), model_id="tiny-blocks", port=0, tick=0.0,
                       max_tokens=12, max_sessions=3, max_body=4096, idle_timeout=30)
    server = start(cfg)
    yield server
    server.shutdown()
    server.server_close()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=20, max_retries=0)


def request(server, method, path, body=None, raw=None, headers=None):
    """``(status, JSON or text)`` of one request."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=20)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


class Events:
    """A live session's event stream, read line by line."""

    def __init__(self, server, sid):
        host, port = server.server_address[:2]
        self.conn = http.client.HTTPConnection(host, port, timeout=20)
        self.conn.request("GET", f"/v1/sessions/{sid}/events")
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        assert self.resp.getheader("Content-Type") == "text/event-stream"

    def next(self):
        """The next event's JSON (``None`` at the end of the stream)."""
        while True:
            line = self.resp.fp.readline()
            if not line:
                return None
            line = line.decode().rstrip("\n")
            if line.startswith("data: "):
                return json.loads(line[6:])

    def until(self, done, limit=400):
        """Events until ``done(texts)`` holds; returns ``(events, texts)``."""
        seen, texts = [], {}
        for _ in range(limit):
            ev = self.next()
            assert ev is not None, f"stream ended early: {texts}"
            seen.append(ev)
            for n, d in ev["text"].items():
                texts[n] = texts.get(n, "") + d
            if done(texts):
                return seen, texts
        raise AssertionError(f"condition never held: {texts}")

    def close(self):
        self.conn.close()


def wait_for(cond, timeout=8.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def sessions(server):
    return request(server, "GET", "/health")[1]["sessions"]


# ----------------------------------------------------------------- OpenAI API
def test_models_list_names_the_streams(rows):
    models = client(rows).models.list().data
    assert [m.id for m in models] == ["default_model"]
    assert models[0].model_extra["streams"] == ["User", "Output", "Thinking"]
    assert models[0].model_extra["layout"] == "rows"


def test_rows_completion_matches_generate(rows):
    """Content is the first output stream, message.streams the others, exactly the
    texts the library's generate gives for the same user text."""
    model, tokenizer = mstream_mlx.load(str(default_model_path()))
    want = mstream_mlx.generate(model, tokenizer, SUM)
    assert want["Output"].split() == ["5", "3", "12"]  # the demo task, for the record
    resp = client(rows).chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": SUM}]
    )
    msg = resp.choices[0].message
    assert msg.content == want["Output"]
    assert msg.model_extra["streams"] == {"Thinking": want["Thinking"]}
    assert resp.choices[0].finish_reason == "stop"
    usage = resp.usage
    assert usage.prompt_tokens == len(SUM.split())  # rows read the prompt word by word
    assert usage.model_extra["streams"]["Output"] == usage.model_extra["streams"]["Thinking"] > 0
    assert usage.completion_tokens == sum(usage.model_extra["streams"].values())
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_rows_streamed_completion_equals_the_whole(rows):
    c = client(rows)
    messages = [{"role": "user", "content": SUM}]
    whole = c.chat.completions.create(model="m", messages=messages)
    chunks = list(c.chat.completions.create(
        model="m", messages=messages, stream=True, stream_options={"include_usage": True}
    ))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    others = "".join(
        (ch.choices[0].delta.model_extra.get("streams") or {}).get("Thinking", "")
        for ch in chunks if ch.choices
    )
    assert content == whole.choices[0].message.content
    assert others == whole.choices[0].message.model_extra["streams"]["Thinking"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len({ch.id for ch in chunks}) == 1


def test_stop_strings_end_the_content(rows):
    """A stop string ends the content and is left out, streamed or not; text that might
    start one is held back until it cannot."""
    c = client(rows)
    messages = [{"role": "user", "content": SUM}]  # 5 3 12
    for stop in (" 12", ["3 1", "zzz"]):
        whole = c.chat.completions.create(model="m", messages=messages, stop=stop)
        chunks = list(c.chat.completions.create(model="m", messages=messages, stop=stop,
                                                stream=True))
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        want = "5 3" if stop == " 12" else "5 "
        assert whole.choices[0].message.content == streamed == want
        assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="'stop' must be"):
        c.chat.completions.create(model="m", messages=messages, stop=[""])


def test_blocks_completion_reads_system_and_user_blocks(blocks, blocks_folder):
    """Blocks: the system message is the system block, the user message the user block;
    the same texts as the library's generate, streamed or not."""
    model, tokenizer = mstream_mlx.load(str(blocks_folder))
    want = mstream_mlx.generate(model, tokenizer, "what is two plus two",
                                system_prompt="you are a helpful assistant", max_tokens=12)
    messages = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": [{"type": "text", "text": "what is two plus two"}]}]
    c = client(blocks)
    resp = c.chat.completions.create(model="tiny-blocks", messages=messages)
    assert resp.model == "tiny-blocks"
    msg = resp.choices[0].message
    assert msg.content == want["assistant"]
    assert msg.model_extra["streams"] == {"auditor": want["auditor"]}
    assert resp.usage.model_extra["streams"] == {"assistant": 12, "auditor": 12}
    assert resp.choices[0].finish_reason == "length"
    chunks = list(c.chat.completions.create(model="tiny-blocks", messages=messages, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want["assistant"]


def test_request_settings_reach_the_sampler(blocks):
    """A seeded request at a high temperature repeats itself and differs from greedy;
    max_tokens caps each output stream."""
    c = client(blocks)
    msgs = [{"role": "user", "content": "hello world"}]
    hot = [c.chat.completions.create(model="m", messages=msgs, temperature=20.0, seed=3,
                                     max_tokens=6) for _ in range(2)]
    greedy = c.chat.completions.create(model="m", messages=msgs, max_tokens=6)
    assert hot[0].choices[0].message.content == hot[1].choices[0].message.content
    assert hot[0].choices[0].message.content != greedy.choices[0].message.content
    assert greedy.usage.model_extra["streams"] == {"assistant": 6, "auditor": 6}


def test_openai_client_sees_bad_requests(blocks):
    c = client(blocks)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                  temperature="hot")
    with pytest.raises(openai.BadRequestError, match="top_p must be in"):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                  top_p=3)
    with pytest.raises(openai.BadRequestError, match="no user text"):
        c.chat.completions.create(model="m", messages=[{"role": "system", "content": "x"}])
    assert sessions(blocks) == 0  # a refused request holds no session


# -------------------------------------------------------------- live sessions
def test_live_rows_session_answers_while_the_user_types(rows):
    """Text fed mid-run is read at the next timesteps: the running total follows."""
    status, made = request(rows, "POST", "/v1/sessions", {})
    assert status == 201 and made["paused"] and made["streams"] == ["User", "Output", "Thinking"]
    ev = Events(rows, made["id"])
    assert request(rows, "POST", f"/v1/sessions/{made['id']}/input",
                   {"text": "add five"})[1]["queued"] == 2
    seen, texts = ev.until(lambda t: "5" in t.get("Output", ""))
    assert [e["t"] for e in seen] == list(range(len(seen)))
    assert set(seen[0]) == {"t", "tokens", "text"}  # the generate --format jsonl line
    assert texts["User"].split() == ["add", "five"]
    request(rows, "POST", f"/v1/sessions/{made['id']}/input", {"text": "add nine"})
    _, more = ev.until(lambda t: "14" in t.get("Output", ""))
    assert more["User"].split() == ["add", "nine"]
    assert request(rows, "DELETE", f"/v1/sessions/{made['id']}")[0] == 200
    last = None
    while (e := ev.next()) is not None:
        last = e
    assert last["finish_reason"] == "stop"
    ev.close()
    assert wait_for(lambda: request(rows, "GET", f"/v1/sessions/{made['id']}")[0] == 404)


def test_live_pause_step_resume_tick(rows):
    sid = request(rows, "POST", "/v1/sessions", {"paused": False, "tick": 0.01})[1]["id"]
    ev = Events(rows, sid)
    ev.until(lambda t: True)
    state = request(rows, "POST", f"/v1/sessions/{sid}/pause")[1]
    assert state["paused"] is True
    time.sleep(0.3)  # events already made may drain; then nothing moves
    t0 = request(rows, "GET", f"/v1/sessions/{sid}")[1]["t"]
    time.sleep(0.3)
    assert request(rows, "GET", f"/v1/sessions/{sid}")[1]["t"] == t0
    request(rows, "POST", f"/v1/sessions/{sid}/step")
    assert wait_for(lambda: request(rows, "GET", f"/v1/sessions/{sid}")[1]["t"] == t0 + 1)
    time.sleep(0.2)
    assert request(rows, "GET", f"/v1/sessions/{sid}")[1]["t"] == t0 + 1
    state = request(rows, "POST", f"/v1/sessions/{sid}/tick", {"tick": 0.25})[1]
    assert state["tick"] == 0.25
    request(rows, "POST", f"/v1/sessions/{sid}/resume")
    time.sleep(1.0)
    t1 = request(rows, "GET", f"/v1/sessions/{sid}")[1]["t"]
    assert 2 <= t1 - (t0 + 1) <= 6  # ~4 steps a second at tick 0.25
    request(rows, "DELETE", f"/v1/sessions/{sid}")
    ev.close()


def test_live_blocks_session_takes_interrupts_and_closes(blocks):
    status, made = request(blocks, "POST", "/v1/sessions",
                           {"text": "what is two plus two", "max_tokens": 40})
    assert status == 201 and not made["paused"]
    assert made["streams"] == ["user", "assistant", "auditor"]
    sid = made["id"]
    ev = Events(blocks, sid)
    seen, texts = ev.until(lambda t: t.get("assistant"))
    status, fed = request(blocks, "POST", f"/v1/sessions/{sid}/input",
                          {"text": " and three", "close": True})
    assert status == 200 and fed["queued"] > 0
    while (e := ev.next()) is not None:
        seen.append(e)
        for n, d in e["text"].items():
            texts[n] = texts.get(n, "") + d
    assert texts["user"] == "what is two plus two and three"  # read while it answered
    assert seen[-1]["finish_reason"] in ("stop", "length")
    ev.close()
    status, err = request(blocks, "POST", f"/v1/sessions/{sid}/input", {"text": "more"})
    assert status in (404, 409)


def test_loadtest_measures_every_session(rows):
    from mstream_mlx.server.loadtest import measure

    rates = measure(*rows.server_address[:2], sessions=2, steps=20)
    assert len(rates) == 2 and all(r > 0 for r in rates)
    assert wait_for(lambda: sessions(rows) == 0)


def test_live_events_are_generate_jsonl_lines(blocks, blocks_folder):
    """One parser serves both: a live session's event lines are the lines
    `mstream-mlx generate --format jsonl` prints for the same input."""
    res = CliRunner().invoke(app, ["generate", "--model", str(blocks_folder), "-p",
                                   "what is two plus two", "-m", "12", "--format", "jsonl"])
    assert res.exit_code == 0, res.output
    want = [line for line in res.stdout.splitlines() if line.startswith("{")]
    sid = request(blocks, "POST", "/v1/sessions",
                  {"text": "what is two plus two", "paused": True})[1]["id"]
    ev = Events(blocks, sid)
    request(blocks, "POST", f"/v1/sessions/{sid}/input", {"close": True})  # then it starts
    got = []
    while (line := ev.resp.fp.readline()):
        if line.startswith(b"data: "):
            got.append(line[6:].decode().rstrip("\n"))
    ev.close()
    assert len(want) > 5 and got == want


def test_sessions_run_concurrently(blocks):
    """Three clients at once on one worker: every session advances."""
    ids = [request(blocks, "POST", "/v1/sessions", {"paused": False})[1]["id"]
           for _ in range(3)]
    readers = [Events(blocks, sid) for sid in ids]
    for r in readers:
        assert r.next()["t"] == 0
    firsts = [r.until(lambda t: True, limit=5)[0][-1]["t"] for r in readers]
    assert all(t >= 1 for t in firsts)
    for sid, r in zip(ids, readers):
        request(blocks, "DELETE", f"/v1/sessions/{sid}")
        r.close()
    assert wait_for(lambda: sessions(blocks) == 0)


# ------------------------------------------------------------------ bad input
def test_errors_have_status_and_message(blocks):
    status, body = request(blocks, "POST", "/v1/chat/completions", raw=b'{"messages": [')
    assert status == 400 and "Invalid JSON" in body["error"]["message"]
    status, body = request(blocks, "POST", "/v1/chat/completions", raw=b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = request(blocks, "POST", "/v1/chat/completions", raw=b"[" * 2000 + b"]" * 2000)
    assert status == 400 and "nested too deeply" in body["error"]["message"]
    status, body = request(blocks, "GET", "/v1/sessions/s99-deadbeef")
    assert status == 404 and "No session" in body["error"]["message"]
    status, body = request(blocks, "POST", "/v1/sessions/s99-deadbeef/input", {"text": "hi"})
    assert status == 404
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    status, body = request(blocks, "POST", "/v1/chat/completions", big)
    assert status == 413 and "over the limit of 4096" in body["error"]["message"]
    status, body = request(blocks, "POST", "/v1/sessions", {"tick": -1})
    assert status == 400 and "tick" in body["error"]["message"]
    status, body = request(blocks, "POST", "/v1/sessions", raw=b"2\r\n{}\r\n0\r\n\r\n",
                           headers={"Transfer-Encoding": "chunked"})
    assert status == 411 and "Content-Length" in body["error"]["message"]


def test_too_many_sessions_is_429_and_a_second_reader_409(blocks):
    ids = [request(blocks, "POST", "/v1/sessions", {})[1]["id"] for _ in range(3)]
    status, body = request(blocks, "POST", "/v1/sessions", {})
    assert status == 429 and "--max-sessions 3" in body["error"]["message"]
    status, _ = request(blocks, "POST", "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 429
    ev = Events(blocks, ids[0])
    status, body = request(blocks, "GET", f"/v1/sessions/{ids[0]}/events")
    assert status == 409
    ev.close()
    for sid in ids:
        request(blocks, "DELETE", f"/v1/sessions/{sid}")
    assert wait_for(lambda: sessions(blocks) == 0)
    status, made = request(blocks, "POST", "/v1/sessions", {})
    assert status == 201  # room again
    request(blocks, "DELETE", f"/v1/sessions/{made['id']}")
    assert wait_for(lambda: sessions(blocks) == 0)


def test_a_client_that_disconnects_frees_its_session(rows):
    host, port = rows.server_address[:2]
    sid = request(rows, "POST", "/v1/sessions", {"paused": False, "tick": 0.05})[1]["id"]
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(f"GET /v1/sessions/{sid}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert b"data: " in sock.recv(4096) + sock.recv(4096)
    sock.close()
    assert wait_for(lambda: request(rows, "GET", f"/v1/sessions/{sid}")[0] == 404, 5)
    # a streamed completion whose client leaves mid-answer frees its slot too
    sock = socket.create_connection((host, port), timeout=10)
    long = " ".join([SUM] * 30)
    body = json.dumps({"stream": True, "messages": [{"role": "user", "content": long}]})
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                 f"{len(body)}\r\n\r\n{body}".encode())
    assert b"chat.completion.chunk" in sock.recv(4096) + sock.recv(4096)
    sock.close()
    assert wait_for(lambda: sessions(rows) == 0, 5)


def test_no_request_reaches_a_file(rows, tmp_path):
    for path in ("/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/page.html",
                 "/mstream_mlx/server/app.py", "//etc/passwd", "/v1/models/../../config.json"):
        status, body = request(rows, "GET", path)
        assert status == 404, path
        assert "root:" not in json.dumps(body)
    # the model is fixed at start: a request naming a folder is served by that model
    cache = tmp_path / "cache.safetensors"
    resp = client(rows).chat.completions.create(
        model="/etc", messages=[{"role": "user", "content": "add five"}],
        extra_body={"adapters": "/etc", "prompt_cache_file": str(cache)})
    assert resp.model == "default_model" and resp.choices[0].message.content == "5"
    assert not cache.exists()


@pytest.fixture
def fuzzed(blocks_folder):
    """Its own server: fuzzed creates leave sessions nobody reads (idle after 1 s)."""
    cfg = ServerConfig(model=str(blocks_folder), port=0, tick=0.0, max_tokens=12,
                       max_sessions=3, max_body=4096, idle_timeout=1.0)
    server = start(cfg)
    yield server
    server.shutdown()
    server.server_close()


def test_fuzz_leaves_the_server_answering(fuzzed):
    """A few hundred malformed, truncated and random requests; then a normal one."""
    blocks = fuzzed
    host, port = blocks.server_address[:2]
    rng = random.Random(0)
    good = json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    heads = ["POST /v1/chat/completions", "POST /v1/sessions", "GET /v1/models",
             "POST /v1/sessions/s1-00000000/input", "DELETE /v1/sessions/x", "PUT /",
             "GET /v1/sessions/" + "a" * 300, "BREW /coffee"]
    statuses = {}
    for i in range(300):
        kind = i % 6
        body = good.encode()
        if kind == 0:  # random bytes instead of a request
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        else:
            head = rng.choice(heads)
            if kind == 1:  # a body cut short of its Content-Length
                body = body[: rng.randrange(len(body))]
                length = len(good)
            elif kind == 2:  # corrupted JSON
                b = bytearray(body)
                for _ in range(3):
                    b[rng.randrange(len(b))] = rng.randrange(256)
                body, length = bytes(b), len(b)
            elif kind == 3:  # a nonsense or negative Content-Length
                length = rng.choice(["-5", "abc", "99999999999", "1e3"])
            elif kind == 4:  # typed JSON of the wrong shapes
                body = json.dumps(rng.choice([
                    {"messages": "hi"}, {"messages": [1]}, {"messages": [{"role": "x"}]},
                    {"messages": [{"role": "user", "content": {"a": 1}}]}, {"stream": "yes"},
                    {"text": 5}, {"tick": "fast"}, {"max_tokens": -1, "messages": [
                        {"role": "user", "content": "hi"}]}, None, 3.5, "text"])).encode()
                length = len(body)
            else:  # a request cut anywhere, headers included
                full = (f"{head} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
                data = full[: rng.randrange(len(full))]
            if kind in (1, 2, 3, 4):
                data = f"{head} HTTP/1.1\r\nContent-Length: {length}\r\n\r\n".encode() + body
        s = socket.create_connection((host, port), timeout=5)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            reply = s.recv(64)
        except OSError:
            reply = b""
        finally:
            s.close()
        code = reply[9:12].decode(errors="replace") if reply.startswith(b"HTTP/") else "none"
        statuses[code] = statuses.get(code, 0) + 1
    # every answer is a client error or a success, never a 500; only random bytes and
    # requests cut short (kinds 0 and 5, 100 of them) may get no answer at all
    known = {"none", "200", "201", "400", "404", "411", "413", "429", "501"}
    assert set(statuses) <= known, statuses
    assert statuses.get("none", 0) <= 100 and statuses.get("400", 0) >= 50, statuses
    assert wait_for(lambda: sessions(blocks) == 0)
    resp = client(blocks).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=3)
    assert resp.usage.model_extra["streams"]["assistant"] == 3


def test_an_unread_session_is_dropped_after_the_idle_timeout(fuzzed):
    sid = request(fuzzed, "POST", "/v1/sessions", {"text": "hello"})[1]["id"]
    assert request(fuzzed, "GET", f"/v1/sessions/{sid}")[0] == 200
    assert wait_for(lambda: request(fuzzed, "GET", f"/v1/sessions/{sid}")[0] == 404, 5)


def test_a_reader_that_falls_behind_holds_its_session_back(rows):
    """Events nobody takes stop the session at MAX_BACKLOG; taking them lets it go on."""
    from mstream_mlx import Session
    from mstream_mlx.server.live import MAX_BACKLOG

    worker = rows.worker

    def make():
        return Session(worker.model, worker.tokenizer, interactive=True, max_steps=10_000)

    live = worker.add(make, tick=0.0, paused=False)
    worker.update(live, reader="attached")
    assert wait_for(lambda: live.t == MAX_BACKLOG)
    time.sleep(0.3)
    assert live.t == MAX_BACKLOG
    assert len(worker.take(live, 1.0)) == MAX_BACKLOG
    assert wait_for(lambda: live.t > MAX_BACKLOG)
    worker.leave(live)
    assert wait_for(lambda: sessions(rows) == 0)


# ------------------------------------------------------------------------ CLI
def test_cli_bad_flags_are_one_line_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["server", "--model", str(tmp_path / "none"), "--port", "0"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "Error:" in res.output
    res = runner.invoke(app, ["server", "--sampler", "magic", "--port", "0"])
    assert res.exit_code == 1 and "--sampler must be one of" in res.output
    res = runner.invoke(app, ["server", "--tick", "-1", "--port", "0"])
    assert res.exit_code == 1 and "--tick must be >= 0" in res.output


def test_cli_serves_and_exits_cleanly_on_ctrl_c(blocks_folder):
    """The command end to end: flags reach the server, and Ctrl-C exits 0 (the worker
    parks, so MLX does not abort at exit)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mstream_mlx.cli.main", "server", "--model", str(blocks_folder),
         "--port", "0", "--max-tokens", "5", "--log-level", "WARNING"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stderr.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert url, line
        c = openai.OpenAI(base_url=url.group(1) + "/v1", api_key="none", timeout=20)
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert r.usage.model_extra["streams"] == {"assistant": 5, "auditor": 5}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0, proc.stderr.read()
    finally:
        proc.kill()

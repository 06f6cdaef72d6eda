# Copyright © 2026 mstream-mlx contributors.
"""Timesteps per second per live session with 1, 2, 4 ... sessions at once on one
server (docs/server.md has the measured table)::

    python -m mstream_mlx.server.loadtest [--model M] [--sessions 1 2 4] [--steps 300] [--repeat 3]

A server is started in this process on a free loopback port.  Each session is fed the
same text, runs at full speed (tick 0) and is read by its own client thread over SSE;
a session's rate is its events over the time between its first and last event.  The
first row is the library alone: ``Session.step`` in a loop, no server.  Each row is
the best of ``--repeat`` interleaved runs (the least disturbed by other work).
"""

import argparse
import http.client
import json
import statistics
import threading
import time
from typing import List

TEXT = "add five minus two add nine minus four add one"


def read_rate(host: str, port: int, sid: str, steps: int) -> float:
    """Timesteps per second of one session's event stream over ``steps`` events."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("GET", f"/v1/sessions/{sid}/events")
    resp = conn.getresponse()
    stamps = []
    while len(stamps) < steps:
        line = resp.fp.readline()
        if not line:
            raise RuntimeError(f"session {sid} ended after {len(stamps)} events")
        if line.startswith(b"data: "):
            stamps.append(time.perf_counter())
    conn.close()
    return (steps - 1) / (stamps[-1] - stamps[0])


def measure(host: str, port: int, sessions: int, steps: int) -> List[float]:
    """Per-session timesteps/s with ``sessions`` sessions running at once."""

    def call(method, path, body=None):
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request(method, path, body=None if body is None else json.dumps(body))
        out = json.loads(conn.getresponse().read())
        conn.close()
        return out

    ids = [call("POST", "/v1/sessions", {"paused": True, "tick": 0})["id"] for _ in range(sessions)]
    rates: List[float] = [0.0] * sessions

    def run(i):
        rates[i] = read_rate(host, port, ids[i], steps)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for sid in ids:  # start the clocks together
        call("POST", f"/v1/sessions/{sid}/input", {"text": TEXT})
    for t in threads:
        t.join()
    for sid in ids:
        call("DELETE", f"/v1/sessions/{sid}")
    return rates


def library_rate(model, tokenizer, steps: int) -> float:
    """``Session.step`` in a loop on this thread: the rate without a server."""
    from mstream_mlx import Session

    session = Session(model, tokenizer, interactive=True, max_steps=steps + 10)
    session.feed(model.streams.names[model.streams.inputs[-1]], TEXT)
    session.step()
    start = time.perf_counter()
    for _ in range(steps - 1):
        session.step()
    return (steps - 1) / (time.perf_counter() - start)


def main():
    import mstream_mlx
    from mstream_mlx.utils import default_model_path

    from . import ServerConfig, make_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Model folder (default: the bundled one).")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=300, help="Events read per session.")
    parser.add_argument("--repeat", type=int, default=3, help="Runs per row; the best is shown.")
    args = parser.parse_args()
    model = args.model or str(default_model_path())
    server = make_server(ServerConfig(model=model, port=0, tick=0.0,
                                      max_sessions=max(args.sessions)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    measure(host, port, 1, 50)  # warm up
    own = mstream_mlx.load(model)  # the library's copy, stepped on this thread
    lib, best = 0.0, {n: [0.0] for n in args.sessions}
    for _ in range(args.repeat):  # interleaved, so every row gets the same quiet moments
        lib = max(lib, library_rate(*own, args.steps))
        for n in args.sessions:
            best[n] = max(best[n], measure(host, port, n, args.steps), key=sum)
    print("| sessions | timesteps/s per session (mean, min) | timesteps/s, all sessions |")
    print("|---|---|---|")
    print(f"| library, no server | {lib:.0f} | {lib:.0f} |")
    for n, rates in best.items():
        print(f"| {n} | {statistics.mean(rates):.0f} ({min(rates):.0f}) | {sum(rates):.0f} |")
    server.shutdown()


if __name__ == "__main__":
    main()

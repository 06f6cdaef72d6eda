# Copyright © 2026 mstream-mlx contributors.
"""The live page of ``mstream-mlx server`` in a real headless Chromium: type into the
text box, watch every stream update, type again while the model talks (the bundled
rows model, and a tiny blocks model whose user block stays open until End input).

Chromium is driven over its DevTools protocol on a pipe (``--remote-debugging-pipe``:
JSON messages separated by NUL bytes on file descriptors 3 and 4), so the test needs
the browser and nothing else: no driver binary, no WebSocket library.

``python tests/test_server_page.py docs/server.png`` renders the screenshot again.
"""

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)


class Browser:
    """Headless Chromium and a minimal DevTools client: ``call(method, **params)``."""

    def __init__(self, width: int = 1200, height: int = 560):
        self.profile = tempfile.mkdtemp(prefix="mstream-chromium-")
        to_chrome, self._in = os.pipe()  # we write, Chromium reads fd 3
        self._out, from_chrome = os.pipe()  # Chromium writes fd 4, we read

        def fds():  # in the child: the pipe ends on fd 3 and 4, inheritable
            a, b = os.dup(to_chrome), os.dup(from_chrome)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-pipe",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"],
            preexec_fn=fds, close_fds=False,
            # the OpenBLAS preload meant for MLX makes Chromium's GPU process fail
            env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf = b""
        self._id = 0
        self.session = None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, timeout: float = 15.0, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session is not None:
            msg["sessionId"] = self.session
        os.write(self._in, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                left = end - time.monotonic()
                if left <= 0 or not select.select([self._out], [], [], left)[0]:
                    raise TimeoutError(f"Chromium did not answer {method}")
                chunk = os.read(self._out, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed its DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait(self, expression: str, timeout: float = 10.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"never true in the page: {expression}")

    def type(self, text: str):
        """Type into the focused element, then press Enter."""
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, text="\r" if kind == "keyDown" else "")

    def screenshot(self, path: Path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self):
        self.proc.kill()
        self.proc.wait(10)
        os.close(self._in)
        os.close(self._out)
        shutil.rmtree(self.profile, ignore_errors=True)


def column(name: str) -> str:
    return f"document.querySelector('.stream[data-stream=\"{name}\"] .text').textContent"


def run_page(shot: Path):
    """Serve the bundled model, drive the page, leave a screenshot at ``shot``."""
    from mstream_mlx.utils import default_model_path
    from mstream_mlx.server import ServerConfig, make_server

    server = make_server(ServerConfig(model=str(default_model_path()), port=0, tick=0.05))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser = Browser()
    try:
        browser.call("Page.navigate", url=server.url + "/")
        browser.wait("document.querySelectorAll('.stream').length === 3")
        assert browser.js("[...document.querySelectorAll('.stream h2')].map(h => h.textContent)") \
            == ["User  (read)", "Output", "Thinking"]
        browser.wait("document.getElementById('status').textContent.includes('paused')")
        browser.js("document.getElementById('say').focus()")
        browser.type("add five minus two")
        browser.wait(f"{column('Output')}.trim().split(/\\s+/).join(' ') === '5 3'")
        assert browser.js(column("User")).split() == ["add", "five", "minus", "two"]
        assert browser.js(column("Thinking")).split() == ["+5", "-2"]
        # the box is cleared and keeps the focus: type again while the clock runs
        focus = "document.activeElement.id + '|' + document.getElementById('say').value"
        assert browser.js(focus) == "say|"
        t0 = browser.js("document.getElementById('status').textContent")
        browser.type("add nine")
        browser.wait(f"{column('Output')}.includes('12')")
        assert browser.js(column("User")).split()[-2:] == ["add", "nine"]
        assert browser.js("document.getElementById('status').textContent") != t0
        # the Output ticker shows a cell per timestep (silence as "-"), capped at 24
        cells = "document.querySelectorAll('.stream[data-stream=\"Output\"] .ticker span')"
        assert browser.js(cells + ".length") >= 10
        browser.type("minus four")
        browser.wait(f"{column('Output')}.includes('8')")
        time.sleep(0.3)
        browser.screenshot(shot)
        # pause: the page says so and the timestep stops moving
        browser.js("document.getElementById('pause').click()")
        browser.wait("document.getElementById('pause').textContent === 'Resume'")
        time.sleep(0.3)
        t1 = browser.js("document.getElementById('status').textContent")
        time.sleep(0.4)
        assert browser.js("document.getElementById('status').textContent") == t1
    finally:
        browser.close()
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (CI installs it)")
def test_page_on_a_blocks_model_reads_until_end_input(tiny_checkpoint):
    """Blocks: the heads answer while the user block stays open for more text; the
    End input button closes it and the heads finish."""
    from mstream_mlx.server import ServerConfig, make_server

    folder = tiny_checkpoint("qwen3", "blocks", num_channels=4, heads=("assistant", "auditor"))
    server = make_server(ServerConfig(model=str(folder), port=0, tick=0.02, max_tokens=60))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser = Browser()
    try:
        browser.call("Page.navigate", url=server.url + "/")
        browser.wait("document.querySelectorAll('.stream').length === 3")
        assert browser.js("document.getElementById('close').hidden") is False
        browser.js("document.getElementById('say').focus()")
        browser.type("what is two plus two")
        browser.wait(f"{column('assistant')}.length > 0")
        browser.type("and three")  # while the heads answer: the block is still open
        browser.wait(f"{column('user')} === 'what is two plus two and three'")
        browser.js("document.getElementById('close').click()")
        browser.wait("document.getElementById('status').textContent.includes('finished')")
        assert browser.js(column("auditor"))
    finally:
        browser.close()
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (CI installs it)")
def test_page_shows_every_stream_live_while_the_user_types(tmp_path):
    shot = tmp_path / "server.png"
    run_page(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    run_page(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/server.png"))

# Copyright © 2026 mstream-mlx contributors.
"""Render ``docs/chat.png`` from a real run of ``mstream-mlx chat`` in tmux.

    python docs/chat_screenshot.py                  # the bundled default model
    python docs/chat_screenshot.py --model PATH --message "..." --message "..."

It starts the chat in a 120x36 tmux pane, types the messages (each one while the model
is still busy with the last: interrupts), captures the pane with its colours
(``tmux capture-pane -e``) and draws the cells with Pillow and DejaVu Sans Mono.  Needs
tmux and Pillow (for rendering only; not a dependency of the package).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

W, H = 120, 36
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"
FONT_BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf"
BG, FG = (30, 30, 30), (212, 212, 212)
PALETTE = [  # ANSI 0-7, then bright 8-15
    (30, 30, 30), (241, 76, 76), (78, 201, 100), (220, 200, 120),
    (90, 160, 240), (200, 130, 200), (80, 190, 230), (212, 212, 212),
    (110, 110, 110), (255, 110, 110), (110, 230, 130), (240, 225, 150),
    (130, 190, 255), (225, 160, 225), (120, 215, 245), (255, 255, 255),
]


def capture(model, messages, sock: str) -> str:
    tmux = lambda *a: subprocess.run(["tmux", "-L", sock, *a], check=True,  # noqa: E731
                                     capture_output=True, text=True).stdout
    tmux("new-session", "-d", "-s", "s", "-x", str(W), "-y", str(H),
         "env", "TERM=xterm-256color", "bash", "--norc", "--noprofile")
    try:
        cmd = [sys.executable, "-m", "mstream_mlx.cli.main", "chat", "--tick", "0.15",
               "--seed", "1"] + (["--model", model] if model else [])
        tmux("send-keys", "-t", "s", " ".join(cmd), "Enter")
        for _ in range(400):
            if "model:" in tmux("capture-pane", "-p", "-t", "s"):
                break
            time.sleep(0.05)
        *sent, typing = messages
        for text in sent:
            tmux("send-keys", "-t", "s", "-l", text)
            time.sleep(0.3)
            tmux("send-keys", "-t", "s", "Enter")
            time.sleep(0.15 * len(text.split()))  # read, then the next one
        tmux("send-keys", "-t", "s", "-l", typing)  # left on the typing line
        time.sleep(0.3)
        return tmux("capture-pane", "-e", "-p", "-t", "s")
    finally:
        path = tmux("display", "-p", "#{socket_path}").strip()
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
        Path(path).unlink(missing_ok=True)


def cells(ansi: str):
    """Parse SGR-coloured lines into rows of ``(char, fg, bg, bold)``."""
    rows = []
    for line in ansi.split("\n")[:H]:
        fg, bg, bold, dim, rev = FG, BG, False, False, False
        row = []
        for m in re.finditer(r"\x1b\[([0-9;:]*)m|([^\x1b])", line):
            if m.group(2) is not None:
                f, b = (bg, fg) if rev else (fg, bg)
                if dim:
                    f = tuple((x + y) // 2 for x, y in zip(f, b))
                row.append((m.group(2), f, b, bold))
                continue
            codes = [int(c) for c in re.split("[;:]", m.group(1)) if c] or [0]
            i = 0
            while i < len(codes):
                c = codes[i]
                if c == 0:
                    fg, bg, bold, dim, rev = FG, BG, False, False, False
                elif c == 1:
                    bold = True
                elif c == 2:
                    dim = True
                elif c == 7:
                    rev = True
                elif c == 22:
                    bold = dim = False
                elif c == 27:
                    rev = False
                elif 30 <= c <= 37:
                    fg = PALETTE[c - 30 + (8 if bold else 0)]
                elif 90 <= c <= 97:
                    fg = PALETTE[c - 90 + 8]
                elif c == 39:
                    fg = FG
                elif 40 <= c <= 47:
                    bg = PALETTE[c - 40]
                elif c == 49:
                    bg = BG
                elif c in (38, 48) and i + 2 < len(codes) and codes[i + 1] == 5:
                    col = PALETTE[codes[i + 2]] if codes[i + 2] < 16 else FG
                    fg, bg = (col, bg) if c == 38 else (fg, col)
                    i += 2
                i += 1
        rows.append(row)
    return rows


def render(ansi: str, out: Path, size: int = 15):
    from PIL import Image, ImageDraw, ImageFont

    font, bold = ImageFont.truetype(FONT, size), ImageFont.truetype(FONT_BOLD, size)
    cw = round(font.getlength("M"))
    ch = round(size * 1.3)
    pad = 12
    img = Image.new("RGB", (W * cw + 2 * pad, H * ch + 2 * pad), BG)
    draw = ImageDraw.Draw(img)
    for y, row in enumerate(cells(ansi)):
        for x, (c, fg, bg, b) in enumerate(row[:W]):
            px, py = pad + x * cw, pad + y * ch
            if bg != BG:
                draw.rectangle([px, py, px + cw - 1, py + ch - 1], fill=bg)
            if c != " ":
                draw.text((px, py + 2), c, font=bold if b else font, fill=fg)
    img = img.quantize(colors=64)
    img.save(out, optimize=True)
    return img.size


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder or Hub id (default: the bundled model)")
    p.add_argument("--message", action="append", help="typed in order; the last is left "
                   "unsent on the typing line (default: the demo task's running total)")
    p.add_argument("--out", default=str(Path(__file__).with_name("chat.png")))
    p.add_argument("--ansi", help="also write the captured pane (ANSI text) here")
    args = p.parse_args()
    if shutil.which("tmux") is None:
        sys.exit("tmux is not installed.")
    messages = args.message or ["add five", "minus two add nine", "add three", "minus"]
    ansi = capture(args.model, messages, f"chat-shot-{os.getpid()}")
    if args.ansi:
        Path(args.ansi).write_text(ansi)
    size = render(ansi, Path(args.out))
    print(f"{args.out}: {size[0]}x{size[1]}, {Path(args.out).stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()

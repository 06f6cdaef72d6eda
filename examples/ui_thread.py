# Copyright © 2026 mstream-mlx contributors.
"""Drive a Session from a UI: one worker thread owns the model and steps, the UI
thread feeds what the user types and shows what comes back.

    python examples/ui_thread.py [MODEL]

`feed` and `stop` only touch small queues under a lock, so the UI never waits for the
model; events come back through a queue.  Everything MLX (loading included) stays on
the worker: MLX arrays and streams belong to the thread that made them.
"""

import queue
import sys
import threading
import time

import mstream_mlx
from mstream_mlx import Session
from mstream_mlx.utils import default_model_path

# --- settings ---------------------------------------------------------------------
MODEL = sys.argv[1] if len(sys.argv) > 1 else str(default_model_path())
TYPED = ["add five", "minus two", "add nine"]  # what the "user" types, one per tick
TICK = 0.05  # seconds between the UI's actions
# ---------------------------------------------------------------------------------

ready: "queue.Queue" = queue.Queue()  # the worker hands over (session, output name)
events: "queue.Queue" = queue.Queue()


def worker():  # the only thread that touches MLX
    model, tokenizer = mstream_mlx.load(MODEL)
    session = Session(model, tokenizer, interactive=True, max_steps=100_000)
    ready.put((session, model.streams.names))
    for event in session:
        events.put(event)
        time.sleep(TICK / 2)  # pace the model so a human could read along
    # MLX 0.32 may abort at exit when a thread that ran MLX work has ended
    # (ml-explore/mlx#3126): park the daemon thread instead of returning.
    threading.Event().wait()


def show(answers):
    while not events.empty():
        text = events.get().text[names[1]].strip()
        if text:
            answers.append(text)
            print(f"{names[1]}: {text}")


threading.Thread(target=worker, daemon=True).start()
session, names = ready.get()
answers = []
for words in TYPED:  # the UI thread: type, then show whatever arrived
    session.feed(names[0], words)
    time.sleep(TICK * 8)
    show(answers)
time.sleep(TICK * 8)
session.stop()  # from any thread: the run ends at the next step
time.sleep(TICK * 2)
show(answers)
print("answers:", answers)

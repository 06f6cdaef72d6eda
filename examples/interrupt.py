# Copyright © 2026 mstream-mlx contributors.
"""A feed/step loop with an interrupt: the user keeps talking mid-generation.

    python examples/interrupt.py [MODEL]

The model is already answering the first words when more arrive; they enter the user
stream at the next timesteps and the answer follows them.
"""

import sys

import mstream_mlx
from mstream_mlx import Session
from mstream_mlx.utils import default_model_path

# --- settings ---------------------------------------------------------------------
MODEL = sys.argv[1] if len(sys.argv) > 1 else str(default_model_path())
FIRST = "add five minus two"
LATER = "add nine"  # typed while the model is answering
INTERRUPT_AT = 5  # timestep at which the user goes on
STEPS = 16
# ---------------------------------------------------------------------------------

model, tokenizer = mstream_mlx.load(MODEL)
session = Session(model, tokenizer, interactive=True, max_steps=STEPS)
user, output = model.streams.names[0], model.streams.names[1]

session.feed(user, FIRST)
for t in range(STEPS):
    if t == INTERRUPT_AT:
        session.feed(user, LATER)  # an interrupt: same call, any time
    event = session.step()
    heard = tokenizer.decode([event.tokens[user]]) if event.tokens[user] is not None else ""
    print(f"t={t:2d}  {user}: {heard.strip():6s} {output}: {event.text[output].strip()}")
    if session.done:
        break
print("answer stream:", session.texts[output].split())

# Copyright © 2026 mstream-mlx contributors.
"""Load a multi-stream model and let it answer while it reads.

    python examples/generate.py [MODEL] [PROMPT]

With no MODEL it uses the bundled demo model (running totals: "add five minus two").
"""

import sys

import mstream_mlx
from mstream_mlx.utils import default_model_path

# --- settings ---------------------------------------------------------------------
MODEL = sys.argv[1] if len(sys.argv) > 1 else str(default_model_path())
PROMPT = sys.argv[2] if len(sys.argv) > 2 else "add five minus two add nine"
MAX_STEPS = 40  # timesteps (rows) at most
# ---------------------------------------------------------------------------------

model, tokenizer = mstream_mlx.load(MODEL)
print("streams:", ", ".join(model.streams.names), f"({model.streams.layout} layout)")

# one event per timestep; every stream's token and text delta
for event in mstream_mlx.stream_generate(model, tokenizer, PROMPT, max_steps=MAX_STEPS):
    cells = [f"{name}={event.text[name].strip() or '.'}" for name in event.text]
    print(f"t={event.t:3d}  " + "  ".join(cells))

print(f"first answer {event.ttft_timesteps} timesteps after the first input token; "
      f"{event.timesteps_per_sec:.0f} timesteps/s")

# Copyright © 2026 mstream-mlx contributors.
"""Convert a checkpoint written by the reference PyTorch code into an MLX folder,
optionally quantized, then load it and look at its streams.

    python examples/convert_checkpoint.py SRC DST [--quantize] [--force]

SRC is a local folder or a Hub id (Qwen3ForMultiStream, Qwen2ForMultiStream, a §7
Qwen3ForCausalLM with num_channels, StreamQwen3_5ForCausalLM, or a plain Qwen base).
The same as `mstream-mlx convert --hf-path SRC --mlx-path DST [-q] [--force]`.
"""

import sys

import mstream_mlx
from mstream_mlx.convert import convert
from mstream_mlx.streams import rows_to_flat

# --- settings ---------------------------------------------------------------------
SRC, DST = sys.argv[1], sys.argv[2]
QUANTIZE = "--quantize" in sys.argv  # 4-bit affine, group 64 (a Mac feature; slow on CPU)
FORCE = "--force" in sys.argv  # replace an existing DST
# ---------------------------------------------------------------------------------

try:
    folder = convert(SRC, DST, quantize=QUANTIZE, force=FORCE)
except (ValueError, OSError) as e:  # a bad SRC, an existing DST: one line, no traceback
    sys.exit(f"Error: {e}")
model, tokenizer = mstream_mlx.load(str(folder))
spec = model.streams
print(f"{folder}: {spec.layout} model with streams {', '.join(spec.names)}")

# one row: every stream reads its first token; the logits predict row 1
ids, channels, positions = rows_to_flat([[0] * spec.num_channels]).arrays()
logits = model(ids, channels=channels, positions=positions)
print("logits", logits.shape, "next tokens", logits[0].argmax(axis=-1).tolist())

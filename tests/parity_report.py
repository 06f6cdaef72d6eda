# Copyright © 2026 mstream-mlx contributors.
"""Print the parity table of the README: max |logit diff| per case, MLX vs the PyTorch
reference, fp32, with the devices named.  Run: ``python -m tests.parity_report``."""

import os
import platform
import tempfile
from pathlib import Path

import mlx.core as mx

import mstream_mlx
from tests.reference import RefModel, reference_device
from tests.test_parity import CASES, FAMILIES
from tests.tiny import make_checkpoint


def main():
    ref_dev = reference_device()
    if ref_dev.type == "cuda":
        import torch

        ref_name = f"PyTorch on {torch.cuda.get_device_name(ref_dev)} (CUDA)"
    else:
        ref_name = f"PyTorch on CPU ({platform.processor() or platform.machine()})"
    tf32 = os.environ.get("MLX_ENABLE_TF32", "default")
    with tempfile.TemporaryDirectory() as tmp:
        # built before the table: the tokenizer trainer writes blank lines to stdout
        pairs = []
        for t, tied in FAMILIES:
            folder = make_checkpoint(Path(tmp) / f"{t}-{tied}", t, "rows", tied=tied)
            model, tok = mstream_mlx.load(folder)
            pairs.append((model, RefModel.from_pretrained(folder), tok))
        print(f"MLX device: {mx.default_device()} (MLX_ENABLE_TF32={tf32}) | reference: {ref_name}\n")
        header = " | ".join(f"{t} {'tied' if tied else 'untied'}" for t, tied in FAMILIES)
        print(f"| case | {header} |")
        print("|---" * (len(FAMILIES) + 1) + "|")
        for name, case in CASES.items():
            cells = " | ".join(f"{case(*p):.1e}" for p in pairs)
            print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()

# Copyright © 2026 mstream-mlx contributors.
"""The benchmark probes of docs/probes/ (docs/benchmarks.md cites their numbers) still
run against the package: the ablation switches take effect and undo, the A/B check runs
here on the CPU, and the GPU-only probes import."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mstream_mlx import attention, row_attention
from mstream_mlx.models import base

PROBES = Path(__file__).resolve().parents[1] / "docs" / "probes"


def load(name):
    spec = importlib.util.spec_from_file_location(f"probe_{name}", PROBES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["ablations", "row_kernel", "matmuls", "pieces"])
def test_probes_import(name):
    assert callable(load(name).main)


def test_ablation_switches_take_effect_and_undo():
    ab = load("ablations")
    ab.variant("oldrope,oldys,oldmask,nokernel,oldturn")
    try:
        assert attention.FusedRotation.__call__ is ab.rotate_then_reshape
        assert base.push_positions is ab.push_with_device_ys
        assert base.kernel_mask(mx.array([True]), mx.float32).dtype == mx.bool_
        assert row_attention.fits(mx.zeros((1, 32, 2, 128)), mx.zeros((1, 8, 9, 128))) is False
        rope = attention.StreamRoPE(8, 10000.0)
        assert type(rope.at(mx.zeros((1, 2), mx.int32), mx.float32, fused=True)).__name__ == "TableRotation"
    finally:
        ab.variant("new")
    assert base.push_positions is ab.ORIGINAL["push"]
    assert row_attention.fits is ab.ORIGINAL["fits"]
    assert attention.FusedRotation.__call__ is ab.ORIGINAL["turn"]


def test_ablation_check_runs():
    root = PROBES.parents[1]
    out = subprocess.run(
        [sys.executable, str(PROBES / "ablations.py"), "tiny", "check"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("check ")]
    assert len(lines) == 2, out.stdout  # two variants against the shipped code
    for line in lines:
        diffs = [float(x) for x in line.split() if x[0].isdigit()]
        assert len(diffs) == 3 and max(diffs) < 1e-4, line

# Copyright © 2026 mstream-mlx contributors.
"""Every example runs, on the bundled demo model or a tiny checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd, cwd=ROOT, timeout=300):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_generate_example():
    out = run(sys.executable, "examples/generate.py")
    assert "Output=5" in out and "Output=3" in out and "Output=12" in out
    assert "first answer 3 timesteps after the first input token" in out


def test_interrupt_example():
    out = run(sys.executable, "examples/interrupt.py")
    assert "answer stream: ['5', '3', '12']" in out


def test_ui_thread_example():
    out = run(sys.executable, "examples/ui_thread.py")
    assert "answers: ['5', '3', '12']" in out


def test_convert_example(tmp_path):
    from tests.tiny import make_checkpoint

    src = make_checkpoint(tmp_path / "ref", "qwen3", "rows")
    out = run(sys.executable, "examples/convert_checkpoint.py", str(src), str(tmp_path / "mlx"))
    assert "rows model with streams User, Output" in out and "logits (1, 10, 512)" in out


def test_finetune_example(tmp_path):
    out = run("bash", "examples/finetune_demo.sh", str(tmp_path / "run"))
    assert (tmp_path / "run" / "fused" / "config.json").is_file()
    assert "5" in out and "12" in out


@pytest.mark.parametrize("script", ["task.py"])
def test_demo_task_renders_consistent_tables(script):
    sys.path.insert(0, str(ROOT / "examples" / "demo"))
    import random

    import task

    for seed in range(50):
        ep = task.sample_episode(random.Random(seed))
        table = task.multistream_table(ep)
        assert len({len(c) for c in table.values()}) == 1
        answers = [c for c in table["Output"] if c is not None]
        assert answers == [str(t) for t in ep.totals]
        for r, c in enumerate(table["Output"]):  # each answer 2 rows after its operand
            if c is not None:
                assert table["User"][r - 2] in task.NUMBERS
        base = task.baseline_table(ep)
        assert base["User"][len(ep.user_rows())] == task.END_OF_TURN
        assert task.first_answer_row(base) == len(ep.user_rows()) + 2

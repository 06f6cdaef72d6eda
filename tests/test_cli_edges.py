# Copyright © 2026 mstream-mlx contributors.
"""The command line's rough edges (issue 18): start-up imports, -h, flag help,
diagnostics on stderr, widths, summary numbers. Fast: the bundled model at most."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from mstream_mlx.cli.main import app

HEAVY = ("torch", "transformers", "mlx_lm", "mlx.core")


def run_main(*argv: str, env=None) -> dict:
    """Run ``mstream-mlx ARGV`` through its console entry in a fresh interpreter and
    return its exit code, output and which heavy modules it imported."""
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.argv = ["mstream-mlx", *{list(argv)!r}]
        from mstream_mlx.cli.main import main
        try:
            main()
            rc = 0
        except SystemExit as e:
            rc = e.code or 0
        sys.stdout.flush()
        print(json.dumps({{"rc": rc, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}),
              file=sys.stderr)
        """
    )
    env = dict(os.environ, MSTREAM_MLX_NO_PRELOAD="1", COLUMNS="80", **(env or {}))
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    *err, last = p.stderr.strip().splitlines()
    return dict(json.loads(last), out=p.stdout, err="\n".join(err))


# ------------------------------------------------------------------- start-up


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["version"], ["generate", "-h"]])
def test_help_and_version_import_nothing_heavy(argv):
    r = run_main(*argv)
    assert r["rc"] == 0, r
    assert r["heavy"] == [], f"mstream-mlx {' '.join(argv)} imported {r['heavy']}"


def test_generate_runs_without_importing_torch():
    r = run_main("generate", "-p", "add five minus two add nine", "--no-color")
    assert r["rc"] == 0, r
    assert "torch" not in r["heavy"] and "transformers" in r["heavy"]
    assert "12" in r["out"]  # the bundled model's running total


def test_package_names_resolve_lazily():
    code = (
        "import sys, mstream_mlx\n"
        "assert 'mlx_lm' not in sys.modules\n"
        "import mstream_mlx.generate\n"  # binds the submodule: must stay the function
        "from mstream_mlx import generate, Session, load\n"
        "assert callable(generate) and generate.__module__ == 'mstream_mlx.generate'\n"
        "assert set(mstream_mlx.__all__) <= set(dir(mstream_mlx))\n"
        "assert all(getattr(mstream_mlx, n) is not None for n in mstream_mlx.__all__)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with pytest.raises(AttributeError):
        import mstream_mlx

        mstream_mlx.no_such_name

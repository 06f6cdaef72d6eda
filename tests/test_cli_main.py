# Copyright © 2026 mstream-mlx contributors.
import os
import sys

import pytest

from mstream_mlx.cli import main as cli_main


def test_openblas_preload_reexecs_once(monkeypatch, tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    calls = []
    monkeypatch.setattr(cli_main, "OPENBLAS", str(lib))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(sys, "argv", ["mstream-mlx", "version"])
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((argv, env)))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MSTREAM_MLX_NO_PRELOAD", raising=False)
    cli_main._prefer_openblas()
    (argv, env), = calls
    assert argv[1:] == ["-m", "mstream_mlx.cli.main", "version"]
    assert env["LD_PRELOAD"] == str(lib)
    monkeypatch.setenv("LD_PRELOAD", env["LD_PRELOAD"])
    cli_main._prefer_openblas()  # already preloaded: no second exec
    assert len(calls) == 1


def test_version_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main.app(["version"], prog_name="mstream-mlx")
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == __import__("mstream_mlx").__version__

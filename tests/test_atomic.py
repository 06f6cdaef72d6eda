# Copyright © 2026 mstream-mlx contributors.
"""``mstream_mlx.atomic``: a failed write leaves nothing behind and says so in one line."""

import errno

import mlx.core as mx
import pytest

from mstream_mlx.atomic import WriteError, atomic_file, atomic_folder


def test_atomic_file_appears_only_when_complete(tmp_path):
    path = tmp_path / "a.safetensors"
    with atomic_file(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".safetensors"
        mx.save_safetensors(str(tmp), {"x": mx.arange(3)})
        assert not path.exists()
    assert mx.load(str(path))["x"].tolist() == [0, 1, 2]
    with pytest.raises(KeyError):  # not a write failure: passes through unchanged
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise KeyError("boom")
    assert mx.load(str(path))["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_write_failures_become_one_line(tmp_path):
    missing = tmp_path / "no" / "a.safetensors"
    with pytest.raises(WriteError) as e:  # MLX's RuntimeError: no error number
        with atomic_file(missing) as tmp:
            mx.save_safetensors(str(tmp), {"x": mx.arange(3)})
    assert str(e.value).startswith(f"Writing {missing} failed (")
    assert str(e.value).endswith("; nothing was written.")
    path = tmp_path / "b.json"
    with pytest.raises(WriteError) as e:
        with atomic_file(path) as tmp:
            tmp.write_text("{}")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value) == (
        f"[Errno 28] Writing {path} failed (No space left on device); "
        "nothing was written."
    )
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_keeps_the_old_folder_on_failure(tmp_path):
    dst = tmp_path / "out"
    with atomic_folder(dst, force=False) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError, match="pass --force"):
        with atomic_folder(dst, force=False):
            pass
    with pytest.raises(WriteError, match="nothing was written"):
        with atomic_folder(dst, force=True) as tmp:
            (tmp / "a").write_text("2")
            raise OSError(errno.EIO, "I/O error")
    assert (dst / "a").read_text() == "1"
    with atomic_folder(dst, force=True) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in dst.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left

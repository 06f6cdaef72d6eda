# Copyright © 2026 mstream-mlx contributors.
"""Atomic writes: the one home for "write to a temporary name, then rename".

Every file and folder the package writes for a user (adapters, training state, prompt
caches, transcripts, benchmark reports, converted and fused model folders) goes
through here, so an interrupted or failed write never leaves a half-written file or
folder under the final name.
"""

import errno
import glob
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

_MLX_WRITE_ERRORS = ("Unable to write", "Failed to open file", "[write]")


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        if e.errno == errno.ENOSPC:
            return "No space left on device"
        return e.strerror or str(e) or type(e).__name__
    return str(e) or type(e).__name__


def is_write_failure(e: BaseException) -> bool:
    """True for an ``OSError`` or MLX's write ``RuntimeError`` (MLX reports a full
    disk as ``[write] Unable to write ...`` and an unwritable path as
    ``[save_safetensors] Failed to open file ...``)."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(m in text for m in _MLX_WRITE_ERRORS)


class WriteError(OSError):
    """A write that failed and left nothing behind.  ``str(e)`` is the one line to
    show: ``[Errno N] Writing PATH failed (REASON); nothing was written.`` (without
    ``[Errno N]`` when the failure came from MLX, which gives no error number)."""

    def __str__(self) -> str:
        return self.strerror if self.errno is None else super().__str__()


def _write_error(path: Path, e: BaseException) -> WriteError:
    return WriteError(
        getattr(e, "errno", None),
        f"Writing {path} failed ({_reason(e)}); nothing was written.",
    )


@contextmanager
def atomic_file(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` when the block
    succeeds and is removed when it fails.  The temporary name keeps the suffix, so
    writers that pick a format from the extension (``mx.save_safetensors``) work.

    A failed write (``OSError`` or MLX's write ``RuntimeError``) is re-raised as a
    :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_write_failure(e) and not isinstance(e, WriteError):
            raise _write_error(path, e) from e
        raise


# ------------------------------------------------------------------- folders
def check_destination(dst: Union[str, Path], force: bool) -> Path:
    """``dst`` made absolute; an existing one is an error unless ``force``."""
    dst = Path(dst).expanduser().absolute()
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; pass --force to replace it.")
    return dst


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap(new: Path, dst: Path) -> None:
    """Put ``new`` in place of the existing ``dst``; on failure ``dst`` is restored
    (and never deleted: if even the restore fails, it stays in the ``.old`` folder)."""
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    try:
        os.replace(dst, old / dst.name)
    except BaseException:
        os.rmdir(old)
        raise
    try:
        os.replace(new, dst)
    except BaseException:
        os.replace(old / dst.name, dst)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_writable(path: Union[str, Path]) -> Path:
    """Fail now, before a long run, when ``path`` cannot be written: one
    :class:`WriteError` naming it (a file is created beside it and removed)."""
    path = Path(path)
    probe = path.with_name(f".{path.stem}.{os.getpid()}.probe{path.suffix}")
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise WriteError(e.errno, f"Cannot write {path} ({_reason(e)}).") from e
    return path


STALE_HOURS = 24  # a partial folder this old is stale whoever made it


def _stale(folder: Path) -> bool:
    """A ``.NAME.PID.XXXX.partial`` folder whose process is gone, or any older
    than :data:`STALE_HOURS` (folders of older versions carry no pid)."""
    try:
        if time.time() - folder.stat().st_mtime > STALE_HOURS * 3600:
            return True
        pid = int(folder.name[: -len(".partial")].rsplit(".", 2)[-2])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def remove_stale(dst: Path) -> None:
    """Remove the hidden partial folders that interrupted runs (Ctrl-C can be
    handled, SIGKILL or a power cut cannot) left beside ``dst``, and say so."""
    for old in sorted(dst.parent.glob(f".{glob.escape(dst.name)}.*.partial")):
        if old.is_dir() and not old.is_symlink() and _stale(old):
            shutil.rmtree(old, ignore_errors=True)
            print(f"[INFO] Removed {old}, left by an interrupted run.", file=sys.stderr)


@contextmanager
def atomic_folder(dst: Union[str, Path], force: bool) -> Iterator[Path]:
    """Yield an empty hidden sibling folder of ``dst`` that becomes ``dst`` when the
    block succeeds; any error (disk full, Ctrl-C, a bad tensor found late) removes it,
    so ``dst`` is either absent, untouched (``force`` over an old folder) or complete.

    ``dst`` must not exist unless ``force``.  A failed write is re-raised as a
    :class:`WriteError` naming ``dst``.
    """
    dst = check_destination(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dst)
    tmp = Path(
        tempfile.mkdtemp(
            prefix=f".{dst.name}.{os.getpid()}.", suffix=".partial", dir=dst.parent
        )
    )
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
    try:
        yield tmp
        if dst.exists():  # force: swap only now that the new folder is complete
            _swap(tmp, dst)
        else:
            os.replace(tmp, dst)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        own = isinstance(e, (FileExistsError, FileNotFoundError)) and e.errno is None
        if is_write_failure(e) and not own and not isinstance(e, WriteError):
            raise _write_error(dst, e) from e
        raise  # one of our own messages, or not a write failure

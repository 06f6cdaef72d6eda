"""Atomic writes: the one home for "write to a temporary name, then rename".

Every file the package writes for a user (adapters, training state, prompt caches,
transcripts, converted folders) goes through here, so an interrupted or failed write
never leaves a half-written file under the final name.
"""

import errno
import os
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
    """A write that failed and left nothing behind; ``str(e)`` is the one line to show."""

    def __str__(self) -> str:
        return self.strerror


@contextmanager
def atomic_file(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` when the block
    succeeds and is removed when it fails.  The temporary name keeps the suffix, so
    writers that pick a format from the extension (``mx.save_safetensors``) work.

    A failed write (``OSError`` or MLX's write ``RuntimeError``) is re-raised as a
    :class:`WriteError` naming ``path``: ``Writing PATH failed (REASON); nothing was
    written.``
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_write_failure(e) and not isinstance(e, WriteError):
            raise WriteError(
                getattr(e, "errno", None),
                f"Writing {path} failed ({_reason(e)}); nothing was written.",
            ) from e
        raise

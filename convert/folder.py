# Copyright © 2026 mstream-mlx contributors.
"""Write an output folder all at once: into a hidden sibling, renamed at the end.

Any error (disk full, Ctrl-C, a bad tensor found late) removes the sibling, so the
destination is either absent, untouched (``--force`` over an old folder) or complete.
"""

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Files next to the weights that belong to the tokenizer or to generation.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def check_destination(dst: Path, force: bool) -> Path:
    """``dst`` made absolute; an existing one is an error unless ``force``."""
    dst = Path(dst).expanduser().absolute()
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; pass --force to replace it.")
    return dst


def check_apart(dst: Path, src: Path, flag: str) -> None:
    """Refuse an output that is, holds or lies inside the source (``--force`` would
    delete the source when it replaces the output)."""
    d, s = dst.resolve(), src.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise ValueError(
            f"{flag} {dst} must lie outside the source {src} (and not hold it)."
        )


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


@contextmanager
def output_folder(dst: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``dst`` when the block succeeds."""
    dst = check_destination(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    )
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
    try:
        yield tmp
        if dst.exists():  # --force: swap only now that the new folder is complete
            _swap(tmp, dst)
        else:
            os.replace(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (FileExistsError, FileNotFoundError)) and e.errno is None:
            raise  # one of our own messages
        reason = e.strerror or str(e) or type(e).__name__
        if e.errno == errno.ENOSPC:
            reason = "No space left on device"
        raise OSError(
            e.errno, f"Writing {dst} failed ({reason}); nothing was written."
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(src: Path, dst: Path, names=SIDE_FILES) -> None:
    """Copy the tokenizer and generation files of ``src`` that exist into ``dst``."""
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)

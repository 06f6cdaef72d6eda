# Copyright © 2026 mstream-mlx contributors.
"""What every writer of a model folder (convert, export, fuse) shares: the side files
to copy, and the rule that an output never holds its source.  The folder itself is
written all at once by :func:`mstream_mlx.atomic.atomic_folder`."""

import shutil
from pathlib import Path

from .checks import inside

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


def check_apart(dst: Path, src: Path, flag: str) -> None:
    """Refuse an output that is, holds or lies inside the source (``--force`` would
    delete the source when it replaces the output)."""
    d, s = dst.resolve(), src.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise ValueError(
            f"{flag} {dst} must lie outside the source {src} (and not hold it)."
        )


def copy_side_files(src: Path, dst: Path, names=SIDE_FILES) -> None:
    """Copy the tokenizer and generation files of ``src`` that exist into ``dst``."""
    for name in names:
        if (src / name).is_file():
            inside(src, name, f"The side file {src / name}")  # never copy from outside
            shutil.copy2(src / name, dst / name)

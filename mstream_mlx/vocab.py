# Copyright © 2026 mstream-mlx contributors.
"""The tokenizer and the model's vocabulary: the one home for checking that token
ids fit the embedding table.

MLX does not bounds-check an embedding lookup: an id at or past ``vocab_size``
reads past the table (garbage, or a crash), so ids are checked on the host where
they enter, and a tokenizer with more ids than the model has rows is refused at
load.
"""

from typing import Optional


def tokenizer_size(tokenizer) -> int:
    """How many ids ``tokenizer`` can produce: one past its largest id (added
    tokens included)."""
    n = 0
    try:
        n = len(tokenizer)
    except TypeError:
        pass
    vocab = getattr(tokenizer, "get_vocab", None)
    if callable(vocab):
        ids = vocab().values()
        if ids:
            n = max(n, max(ids) + 1)
    return n


def check_tokenizer_fits(tokenizer, vocab_size: int, where: Optional[str] = None) -> None:
    """Raise one ``ValueError`` naming both sizes when ``tokenizer`` has ids the
    model's embedding table (``vocab_size`` rows) does not.

    Args:
        tokenizer: an mlx-lm ``TokenizerWrapper`` or a Hugging Face tokenizer.
        vocab_size: the model's ``vocab_size``.
        where: the model folder, named in the message when given.
    """
    n = tokenizer_size(tokenizer)
    if n > vocab_size:
        of = f" of {where}" if where else ""
        raise ValueError(
            f"The tokenizer{of} has {n} token ids but the model's vocab_size is "
            f"{vocab_size}: ids {vocab_size}..{n - 1} have no embedding; use the "
            "tokenizer the model was trained with."
        )


def first_outside(values, n: int, what: str) -> Optional[int]:
    """The first of ``values`` (any nesting of ints, or an array) outside ``0 .. n - 1``,
    or ``None``; one ``ValueError`` when they are not integers.  The one home of the
    host-side range check for token ids and channels."""
    import numpy as np

    a = np.asarray(values)
    if a.size == 0:
        return None
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what}s must be integers, got {a.dtype} values.")
    bad = a[(a < 0) | (a >= n)]
    return int(bad.flat[0]) if bad.size else None


def check_ids(ids, vocab_size: int, what: str = "Token id") -> None:
    """Raise one ``ValueError`` when any of ``ids`` (any nesting of ints, or an
    array) is not an integer in ``0 .. vocab_size - 1``.

    ``what`` starts the message (``"A prefill row's token id"`` ...); the message
    names the first offending id and the vocabulary's range.
    """
    bad = first_outside(ids, vocab_size, what)
    if bad is not None:
        raise ValueError(f"{what} {bad} is outside the vocabulary (0..{vocab_size - 1}).")

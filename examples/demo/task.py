# Copyright © 2026 mstream-mlx contributors.
"""The demo task: a running total, answered while the question is still arriving.

The user dictates operations word by word ("add five minus two add nine"). In the
multi-stream schedule the Output stream writes the new total two rows after each
operand arrives (a token at row r sees rows <= r-2: paper §4), and a Thinking stream
writes the operation it parsed ("+5") in the same row. In the read-then-answer
schedule (the baseline) the Output stream waits until the user is done, then writes
the totals one per row.  Same words, same model, only the schedule differs.
"""

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

NUMBERS = "zero one two three four five six seven eight nine".split()
OPS = {"add": 1, "minus": -1}
SILENCE = "-"
PRE_THINK = 1  # row 0 is the silent seed row; user words start at row 1
LONG_GAP = 24  # the longest pause (silent user rows) between two operations
END_OF_TURN = "</s>"  # the tokenizer's end-of-sequence token (baseline only)
MAX_TOTAL = 29  # small enough that a 1 M-parameter model learns every sum
STREAMS = ("User", "Output", "Thinking")
BASELINE_STREAMS = ("User", "Output")


def vocabulary() -> List[str]:
    """Every word the task uses, one SentencePiece piece each."""
    totals = [str(i) for i in range(MAX_TOTAL + 1)]
    signed = [f"{s}{k}" for s in "+-" for k in range(1, 10)]
    return list(OPS) + NUMBERS + [SILENCE] + totals + signed


@dataclass
class Episode:
    ops: List[Tuple[str, int]]  # ("add", 5), ("minus", 2), ...
    gaps: List[int]  # silent user rows before each operation

    @property
    def totals(self) -> List[int]:
        out, t = [], 0
        for op, k in self.ops:
            t += OPS[op] * k
            out.append(t)
        return out

    @property
    def words(self) -> List[str]:
        return [w for op, k in self.ops for w in (op, NUMBERS[k])]

    def user_rows(self) -> List[Optional[str]]:
        """The user cell of every row from row 0 (None = silence)."""
        rows: List[Optional[str]] = [None] * PRE_THINK
        for (op, k), gap in zip(self.ops, self.gaps):
            rows += [None] * gap + [op, NUMBERS[k]]
        return rows


def sample_episode(rng: random.Random, max_ops: int = 8) -> Episode:
    ops, total = [], 0
    for _ in range(rng.randint(1, max_ops)):
        down = [k for k in range(1, 10) if total - k >= 0]
        up = [k for k in range(1, 10) if total + k <= MAX_TOTAL]
        op = "minus" if down and (not up or rng.random() < 0.4) else "add"
        k = rng.choice(down if op == "minus" else up)
        ops.append((op, k))
        total += OPS[op] * k
    # mostly short pauses; sometimes a long one (a chat user thinking), so the model
    # learns that a total carries over any silence and sees timesteps up to ~200
    gaps = [0] + [
        rng.randint(4, LONG_GAP) if rng.random() < 0.25 else rng.randint(0, 3)
        for _ in ops[1:]
    ]
    return Episode(ops, gaps)


def operand_rows(ep: Episode) -> List[int]:
    user = ep.user_rows()
    return [r for r, w in enumerate(user) if w in NUMBERS]


def multistream_table(ep: Episode) -> Dict[str, List[Optional[str]]]:
    """User, Output, Thinking cells per row; the answer lags each operand by 2 rows."""
    user = ep.user_rows()
    answer_rows = [r + 2 for r in operand_rows(ep)]
    n = answer_rows[-1] + 2  # one trailing all-silent row ends the episode
    table = {s: [None] * n for s in STREAMS}
    table["User"][: len(user)] = user
    for r, total, (op, k) in zip(answer_rows, ep.totals, ep.ops):
        table["Output"][r] = str(total)
        table["Thinking"][r] = f"{'+' if op == 'add' else '-'}{k}"
    return table


def baseline_table(ep: Episode) -> Dict[str, List[Optional[str]]]:
    """Read-then-answer: the user ends the question with an end-of-turn token (a
    pause cannot say "done"), and the totals start once it is visible."""
    user = ep.user_rows() + [END_OF_TURN]
    first = len(user) + 1  # the last cell (row len-1) is visible from row len+1
    n = first + len(ep.ops) + 1
    table = {s: [None] * n for s in BASELINE_STREAMS}
    table["User"][: len(user)] = user
    for i, total in enumerate(ep.totals):
        table["Output"][first + i] = str(total)
    return table


def first_answer_row(table: Dict[str, List[Optional[str]]]) -> int:
    return next(r for r, c in enumerate(table["Output"]) if c is not None)


def make_split(seed: int, n: int, baseline: bool = False) -> List[dict]:
    rng = random.Random(seed)
    render = baseline_table if baseline else multistream_table
    return [{"streams": render(sample_episode(rng))} for _ in range(n)]

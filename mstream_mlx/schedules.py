# Copyright © 2026 mstream-mlx contributors.
"""What enters the model at each timestep: one schedule class per layout, the one place
that picks it, and the layouts' public options.

The schedules are the reference decode loops as small state machines that
:class:`~mstream_mlx.session.Session` drives (the contract: :mod:`mstream_mlx.plans`).
Each owns its layout: defaults (sampling method, ``max_tokens``, ``max_steps``, stop
tokens), which options apply, how text enters a stream, its masks beyond the rule.
"""

from typing import Dict, Type

from .blocks_schedule import DEFAULT_SYSTEM, BlocksOptions, BlocksSchedule
from .plans import Schedule
from .rows_schedule import SEED_WORDS, RowsOptions, RowsSchedule

SCHEDULES: Dict[str, Type[Schedule]] = {
    RowsSchedule.layout: RowsSchedule,
    BlocksSchedule.layout: BlocksSchedule,
}

__all__ = [
    "DEFAULT_SYSTEM",
    "SEED_WORDS",
    "SCHEDULES",
    "BlocksOptions",
    "BlocksSchedule",
    "RowsOptions",
    "RowsSchedule",
    "Schedule",
    "schedule_class",
]


def schedule_class(layout: str) -> Type[Schedule]:
    """The schedule of ``layout`` (``model.streams.layout``)."""
    return SCHEDULES[layout]

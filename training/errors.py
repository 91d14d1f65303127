"""The trainer's user-facing error.

Training code raises :class:`TrainError` for bad input (dataset, run
directory, config, training checkpoint) and lets ``creps.errors.CheckpointError``
from generator files travel unchanged, since its message already names the
file.  Only ``train.py`` turns either into one ``error: ...`` line and an exit
code (``creps.errors.run_cli``), so library callers and tests get the
exception itself, and ``--debug`` can show where it came from.
"""

from __future__ import annotations

from creps.errors import UserError


class TrainError(UserError):
    """Bad input to the trainer; the message says what to fix, and nothing was started."""

    exit_code = 2


# The name this exception had before it joined the UserError family; kept so
# that `from training import TrainingError` in existing scripts keeps working.
TrainingError = TrainError

__all__ = ["TrainError", "TrainingError"]

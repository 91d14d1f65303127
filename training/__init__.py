"""Trainer for CREPS generators: dataset tool, discriminator, losses, ADA, loop, metrics.

Imports point down only: ``training`` uses ``creps`` and nothing else of ours.
Every user-facing failure raises :class:`TrainError` (a ``creps.errors.UserError``)
with one line a user can act on, before any expensive work starts; checkpoint
files that ``creps`` cannot read raise its ``CheckpointError`` unchanged.
"""

from .errors import TrainError, TrainingError

__all__ = ["TrainError", "TrainingError"]

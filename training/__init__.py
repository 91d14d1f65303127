"""Trainer for CREPS generators: dataset tool, discriminator, losses, ADA, loop, metrics.

Imports point down only: ``training`` uses ``creps`` and nothing else of ours.
Every user-facing failure raises :class:`TrainingError` with one line a user
can act on, before any expensive work starts.
"""


class TrainingError(Exception):
    """Bad input to the trainer (dataset, checkpoint, config); the message says what to fix."""


__all__ = ["TrainingError"]

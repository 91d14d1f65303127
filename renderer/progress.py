"""The progress bar of export work, counted in pixels (on a terminal only)."""

from __future__ import annotations

from typing import Any


def pixel_bar(progress: bool, total: int, desc: str) -> Any:
    """A tqdm bar of ``total`` pixels, or None when ``progress`` is off.

    disable=None: only on a terminal, so a log or a pipe gets the result lines
    (and one error line) alone.
    """
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="px", unit_scale=True, desc=desc, leave=False, disable=None)

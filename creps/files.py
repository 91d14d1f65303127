"""Temporary files beside their target, with the permissions a plain ``open()`` would give.

Atomic writes (temp file + ``os.replace``) use ``tempfile.mkstemp``, which
creates files readable by their owner alone (0600). Put in place, such a file
would keep that mode: a TIFF, a DeepZoom tile or a checkpoint that the web
server, a colleague or a batch job running as another user cannot read,
unlike the same file written by ``open()`` (0666 less the umask). So every
temp file made here gets the mode ``open()`` would have given it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _read_umask() -> int:
    """The process umask (read once, at import: ``os.umask`` can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()
FILE_MODE = 0o666 & ~UMASK  # what open(path, "w") creates


def open_temp_beside(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(fd, name) of a new empty temp file in ``path``'s folder (created if missing), mode ``FILE_MODE``."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def temp_beside(path: str | os.PathLike[str]) -> str:
    """Name of a new empty temp file beside ``path`` (closed), for writers that open it themselves."""
    fd, tmp = open_temp_beside(path)
    os.close(fd)
    return tmp


def put_in_place(tmp: str, path: str | os.PathLike[str]) -> None:
    """``os.replace(tmp, path)`` with ``FILE_MODE`` first: some writers (safetensors' ``save_file``)
    recreate the file they are given as 0600 whatever its mode was."""
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)

"""Files written atomically get the permissions a plain open() gives (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat

import creps
from creps.files import FILE_MODE
from renderer.fsio import atomic_local_write


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_have_the_mode_open_gives(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x")  # what open() makes under this process's umask
    assert FILE_MODE == _mode(plain)

    atomic_local_write(str(tmp_path / "sub" / "record.json"), b"{}")
    assert _mode(tmp_path / "sub" / "record.json") == _mode(plain)

    G = creps.load("preset:tiny")
    creps.save(G, tmp_path / "g.safetensors")
    assert _mode(tmp_path / "g.safetensors") == _mode(plain)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

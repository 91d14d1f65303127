"""Atomic publishing of an export: staged under temporary names, put in place only once whole.

Never half an export (``Target``): every export is written under a temporary
name next to its target (``.<name>.creps-tmp-<token>...``) and put in place only
once it is whole, so a failure at any point (a corrupt chunk, a full disk, an
outage, Ctrl-C) leaves the previous exports as they were and removes its own
temporary files.

- Local: files by ``os.replace``; a folder (DeepZoom's ``<base>_files``) by
  renaming the old one aside, the new one in, then deleting the old (rolled
  back if the rename fails); the parts go in the order given (the ``.dzi``
  last, as it is what viewers open). Debris of a run killed outright (kill -9)
  is removed by the next run for the same target; an old folder found aside
  with no live one is put back first. (So two assembles must not write the
  same target at once: the second would take the first one's files for
  debris.) A part not asked for this time (``.szi`` with ``szi=False``) is
  left as it was, with its own sidecar.
- Remote (any fsspec URL): written locally in a temporary folder (or, for a
  folder the block work writes itself, straight to temporary keys next to
  the target, so tasks on any node can write them), uploaded to temporary
  keys next to the target, then copied into place (folders first, the last
  part last) and the temporary keys removed; old files of a folder that the
  new one does not have are deleted only after the new ones are all in
  place. Object stores have no rename, so that final server-side copy is not
  atomic: a failure during it can leave a mix of old and new files (re-run to
  fix); everything before it -- reading, encoding, uploading -- leaves the
  old export untouched.
- Each part's sidecar ``<part>.source.json`` (its record: renderer.provenance)
  is written atomically right after the export is put in place.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from creps.errors import UserError, first_line

from .errors import RendererError
from .fsio import atomic_local_write, filesystem, fresh_ls, is_local, local_path, write_bytes

SIDECAR = ".source.json"  # provenance record next to each export: <export>.source.json
TEMP_TAG = ".creps-tmp-"  # temporary names: .<name>.creps-tmp-<token>...


def check_target(url: str, storage_options: dict | None = None) -> None:
    """Fail early (one line) when ``url``'s parent cannot be written."""
    if is_local(url):
        parent = os.path.dirname(os.path.abspath(local_path(url))) or "."
        probe = parent
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.access(probe, os.W_OK) or (os.path.exists(parent) and not os.path.isdir(parent)):
            raise RendererError(f"cannot write {url!r}: {parent} is not a writable folder")
    else:
        filesystem(url, storage_options)


def check_replaceable(url: str, marker: str, what: str, storage_options: dict | None = None) -> None:
    """Refuse (one line) to replace ``url`` when something is there that this kind of export did not write:
    a folder without ``marker`` inside (``info.json`` of an IIIF tree), or a file without its sidecar
    (``marker`` empty). Publishing replaces a folder whole, so a mistyped target must not be a store or
    the folder of other files."""
    if is_local(url):
        path = local_path(url)
        there = os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path))  # empty: free
        ours = os.path.exists(os.path.join(path, marker)) if marker else os.path.exists(path + SIDECAR)
    else:
        fs, path = filesystem(url, storage_options)
        there = fs.exists(path)
        ours = fs.exists(f"{path}/{marker}") if marker else fs.exists(path + SIDECAR)
    if there and not ours:
        mark = f"no {marker} in it" if marker else f"no {posixpath.basename(path)}{SIDECAR} beside it"
        raise RendererError(f"refusing to replace {url!r}: it is not {what} ({mark}); choose another path")


@contextmanager
def writing(what: str, url: str) -> Iterator[None]:
    """Around an export writer: a plain OSError (disk full, permissions) becomes one RendererError."""
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        raise RendererError(f"cannot write the {what} {url!r}: {first_line(e)}") from e


def _rm_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.unlink(path)
        except OSError:
            pass


def _local_files(folder: str) -> list[str]:
    """Paths of the files under ``folder``, relative to it, '/'-separated."""
    out = []
    for root, _, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        for f in files:
            out.append(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
    return sorted(out)


class Target:
    """One export at ``url``: staged under temporary names, then put in place whole.

    ``parts`` are the suffixes that make up the export (``("",)`` for one file;
    ``renderer.dzi.dzi_parts`` for DeepZoom, ``url`` then being the base name) in the order
    they are put in place; ``folders`` those that are folders. Writers write
    ``stage + part``; ``publish`` swaps every part in and writes the sidecars;
    ``abort`` removes what was staged. Use it through ``staged``.
    """

    def __init__(
        self,
        url: str,
        parts: tuple[str, ...],
        folders: tuple[str, ...] = (),
        storage_options: dict | None = None,
    ) -> None:
        self.url, self.parts, self.folders = url, parts, folders
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.local = is_local(url)
        self._tmpdir: str | None = None
        self._uploaded: list[str] = []
        self._direct: dict[str, list[str] | None] = {}  # remote folders the block work writes itself
        if self.local:
            self.fs: Any = None
            self.final = os.path.abspath(local_path(url))
            self.folder = os.path.dirname(self.final)
            self.name = os.path.basename(self.final)
            os.makedirs(self.folder, exist_ok=True)
            self.stage = os.path.join(self.folder, f".{self.name}{TEMP_TAG}{self.token}")
        else:
            self.fs, self.final = filesystem(url, storage_options)
            self.folder = posixpath.dirname(self.final)
            self.name = posixpath.basename(self.final)
            self._tmpdir = tempfile.mkdtemp(prefix="creps-export-")
            self.stage = os.path.join(self._tmpdir, self.name)
            self.remote_stage = f"{self.folder}/.{self.name}{TEMP_TAG}{self.token}"
        try:
            self.clean_debris()
        except BaseException as e:
            self.cleanup()
            if isinstance(e, Exception) and not isinstance(e, UserError):
                raise RendererError(f"cannot prepare {url!r}: {first_line(e)}") from e
            raise

    # ------------------------------------------------------------ names
    def tile_folder(self, part: str) -> str:
        """Where the block work writes folder ``part``: the staged local folder, or temporary keys
        next to a remote target (a URL any node can write; the upload step then skips it)."""
        if self.local:
            return self.stage + part
        self._direct[part] = None
        return self.fs.unstrip_protocol(self.remote_stage + part)

    def tiles_written(self, part: str, rels: list[str]) -> None:
        """The files the block work wrote under ``tile_folder(part)``, relative to it."""
        if not self.local:
            self._direct[part] = sorted(rels)

    def folder_files(self, part: str) -> list[str]:
        """The files of staged folder ``part``, relative to it."""
        rels = self._direct.get(part)
        return rels if rels is not None else _local_files(self.stage + part)

    def direct_parts(self) -> set[str]:
        """Folders written straight to temporary keys of a remote target (``tile_folder``)."""
        return set(self._direct)

    def scratch(self) -> str:
        """A scratch folder next to the staged files (same disk), removed with them."""
        path = self.stage + ".scratch"
        os.makedirs(path, exist_ok=True)
        return path

    def _debris_prefix(self) -> str:
        return f".{self.name}{TEMP_TAG}"

    def clean_debris(self) -> None:
        """Remove what a killed earlier run left for this target; put back an old folder left aside."""
        prefix = self._debris_prefix()
        if self.local:
            for entry in sorted(os.listdir(self.folder)):
                if not entry.startswith(prefix) or entry.startswith(os.path.basename(self.stage)):
                    continue
                path = os.path.join(self.folder, entry)
                restored = False
                for part in self.folders:
                    live = self.final + part
                    if entry.endswith(".old" + part) and os.path.isdir(path) and not os.path.lexists(live):
                        os.rename(path, live)  # killed between moving the old one aside and the new one in
                        restored = True
                if not restored:
                    _rm_local(path)
            return
        try:
            entries = fresh_ls(self.fs, self.folder)
        except FileNotFoundError:
            return
        for entry in entries:
            if posixpath.basename(str(entry).rstrip("/")).startswith(prefix):
                self.fs.rm(entry, recursive=True)

    # ------------------------------------------------------------ publish / abort
    def publish(self, records: dict[str, dict]) -> None:
        """Put every staged part in place (``.dzi`` last), then write ``records[part]`` as its sidecar."""
        try:
            if self.local:
                self._publish_local()
            else:
                self._publish_remote()
            for part, record in records.items():
                self._write_sidecar(part, record)
        except UserError:
            raise
        except Exception as e:
            raise RendererError(f"cannot put {self.url!r} in place: {first_line(e)}") from e
        finally:
            self.cleanup()

    def _publish_local(self) -> None:
        moved: list[tuple[str, str, str]] = []  # (new, live, aside) of swapped folders, for a rollback
        try:
            for part in self.parts:
                src, dst = self.stage + part, self.final + part
                if part in self.folders:
                    aside = f"{self.stage}.old{part}"
                    if os.path.lexists(dst):
                        os.rename(dst, aside)
                    try:
                        os.rename(src, dst)
                    except BaseException:  # Ctrl-C included: never leave the live name empty
                        if os.path.lexists(aside) and not os.path.lexists(dst):
                            os.rename(aside, dst)
                        raise
                    moved.append((src, dst, aside))
                else:
                    os.replace(src, dst)
        except BaseException:
            for src, dst, aside in reversed(moved):  # new folders back out, old ones back in
                os.rename(dst, src)
                if os.path.lexists(aside):
                    os.rename(aside, dst)
            raise
        for _, _, aside in moved:
            _rm_local(aside)

    def _publish_remote(self) -> None:
        fs = self.fs
        # 1. the whole new export under temporary keys (the long step; the old one is untouched)
        lpaths, rpaths = [], []
        for part in self.parts:
            if part in self._direct:
                continue  # already under the temporary keys
            if part in self.folders:
                for rel in _local_files(self.stage + part):
                    lpaths.append(os.path.join(self.stage + part, *rel.split("/")))
                    rpaths.append(f"{self.remote_stage}{part}/{rel}")
            else:
                lpaths.append(self.stage + part)
                rpaths.append(self.remote_stage + part)
        self._uploaded = rpaths
        if lpaths:
            fs.put(lpaths, rpaths)
        # 2. copied into place, folders first and the .dzi last; then old tiles the new one lacks
        for part in self.parts:
            if part in self.folders:
                rels = self.folder_files(part)
                live = self.final + part
                fs.copy([f"{self.remote_stage}{part}/{r}" for r in rels], [f"{live}/{r}" for r in rels])
                fs.invalidate_cache(live)
                try:
                    old = {str(p)[len(live) + 1 :] for p in fs.find(live)}
                except FileNotFoundError:
                    old = set()
                stale = sorted(old - set(rels))
                if stale:
                    fs.rm([f"{live}/{r}" for r in stale])
            else:
                fs.copy([self.remote_stage + part], [self.final + part])
        # 3. the temporary keys
        if rpaths:
            fs.rm(rpaths)
        self._uploaded = []
        self._remove_direct()

    def _remove_direct(self) -> None:
        for part in self._direct:
            try:
                self.fs.rm(self.remote_stage + part, recursive=True)
            except FileNotFoundError:
                pass
        self._direct = {}

    def _write_sidecar(self, part: str, record: dict) -> None:
        path = self.final + part + SIDECAR
        if part not in self.folders and self.local:
            record = {**record, "bytes": os.path.getsize(self.final + part)}
        elif part not in self.folders:
            record = {**record, "bytes": os.path.getsize(self.stage + part)}
        data = json.dumps(record, indent=1).encode()
        if self.local:
            atomic_local_write(path, data)
        else:
            write_bytes(self.fs, path, data)

    def abort(self) -> None:
        """Remove everything staged (local files, temporary keys); the old export stays as it was."""
        if self.local:
            for part in self.parts:
                _rm_local(self.stage + part)
        else:
            try:
                if self._uploaded:
                    self.fs.rm(self._uploaded)
                self._remove_direct()
            except Exception:
                pass  # best effort: the next run removes them (clean_debris)
            self._uploaded = []
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the scratch folder and, for remote targets, the local staging folder."""
        _rm_local(self.stage + ".scratch")
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


@contextmanager
def staged(
    url: str,
    parts: tuple[str, ...],
    folders: tuple[str, ...] = (),
    storage_options: dict | None = None,
) -> Iterator[Target]:
    """A ``Target`` whose staged files are removed if the body (or its ``publish``) fails."""
    target = Target(url, parts, folders, storage_options)
    try:
        yield target
    except BaseException:
        target.abort()
        raise
    finally:
        target.cleanup()

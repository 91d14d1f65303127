"""Image datasets: build once (``train.py dataset``), stream fast during training.

A built dataset is a directory with ``images.u8`` (raw uint8, N x R x R x 3,
read through a memory map so the loop never decodes an image) and
``index.json`` (shape, source names, what was skipped).  Any folder, zip or
glob of png/jpg/webp images of any size and aspect can also be given straight
to the trainer; it is converted in memory with the same code.

Each image is converted to RGB, center-cropped to a square and resized with
Lanczos (PIL, antialiased).  ``crops > 0`` adds that many random square crops
per image (side between half and all of the short side), which turns a few
large photos into a texture dataset.  Unreadable or non-image files are
counted, the first few named, and skipped; a dataset with fewer than
``min_images`` usable images is refused before anything is written.
"""

from __future__ import annotations

import functools
import glob as globlib
import io
import json
import os
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import TrainError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
MIN_IMAGES = 8
INDEX = "index.json"
DATA = "images.u8"


@dataclass
class Report:
    """What a conversion kept and skipped (printed, and stored in index.json)."""

    names: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.names)} images"]
        for label, items in (("unreadable", self.unreadable), ("non-image files", self.not_images)):
            if items:
                first = ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
                parts.append(f"skipped {len(items)} {label} ({first})")
        return "; ".join(parts)


# ------------------------------------------------------------------ sources
def _list_source(src: str) -> tuple[list[tuple[str, Callable[[], bytes]]], list[str]]:
    """(image entries as (name, read-bytes), non-image names) of a folder, zip or glob."""
    entries: list[tuple[str, Callable[[], bytes]]] = []
    others: list[str] = []

    def add(name: str, reader: Callable[[], bytes]) -> None:
        (entries.append((name, reader)) if name.lower().endswith(IMAGE_EXTS) else others.append(name))

    p = Path(src)
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            add(str(f.relative_to(p)), f.read_bytes)
    elif p.is_file() and zipfile.is_zipfile(p):
        zf = zipfile.ZipFile(p)
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if not info.is_dir():
                add(info.filename, functools.partial(zf.read, info.filename))
    elif p.is_file():
        add(p.name, p.read_bytes)
    elif any(c in src for c in "*?["):
        for name in sorted(globlib.glob(src, recursive=True)):
            if os.path.isfile(name):
                add(name, Path(name).read_bytes)
    else:
        raise TrainError(f"dataset source {src} does not exist (give a folder, a .zip or a glob)")
    return entries, others


def _square(img: Image.Image, box: tuple[int, int, int] | None, resolution: int) -> np.ndarray:
    w, h = img.size
    if box is None:
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, s)
    x0, y0, s = box
    img = img.crop((x0, y0, x0 + s, y0 + s))
    if s != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def to_rgb8(im: Image.Image) -> Image.Image:
    """8-bit RGB of any image Pillow reads.

    ``convert("RGB")`` clips 16-bit grey (modes ``I;16*``, and ``I`` as PNG
    loads it) at 255, so a 16-bit photo would come out white: scale those by
    their bit depth instead.
    """
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        bits = 16 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 8
        a = np.clip(a >> (bits - 8), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        top = 1.0 if a.max(initial=0.0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def iter_images(
    src: str, resolution: int, crops: int = 0, seed: int = 0, report: Report | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, uint8 [R, R, 3]) for every readable image of ``src``."""
    report = report if report is not None else Report()
    entries, others = _list_source(src)
    report.not_images.extend(others)
    for i, (name, read) in enumerate(entries):
        try:
            with Image.open(io.BytesIO(read())) as im:
                im.load()
                img = to_rgb8(im)
        except Exception:
            report.unreadable.append(name)
            continue
        yield name, _square(img, None, resolution)
        rng = np.random.default_rng([seed, i])
        w, h = img.size
        for k in range(crops):
            s = int(rng.integers(max(1, min(w, h) // 2), min(w, h) + 1))
            box = (int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1)), s)
            yield f"{name}#crop{k}", _square(img, box, resolution)


def _check_resolution(resolution: int) -> None:
    if resolution < 8 or resolution & (resolution - 1):
        raise TrainError(f"--resolution must be a power of two >= 8, got {resolution}")


def _check_count(report: Report, src: str, min_images: int) -> None:
    if len(report.names) < min_images:
        raise TrainError(
            f"dataset {src} has {len(report.names)} usable images, need at least {min_images} ({report.summary()})"
        )


# ------------------------------------------------------------------ build
def build_dataset(
    src: str,
    dest: str,
    resolution: int,
    mirror: bool = False,
    crops: int = 0,
    seed: int = 0,
    min_images: int = MIN_IMAGES,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> Report:
    """Convert ``src`` into a dataset directory ``dest`` (written atomically; never overwrites)."""
    _check_resolution(resolution)
    out = Path(dest)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainError(f"{dest} already exists; choose a new DEST (nothing was overwritten)")
    _list_source(src)  # fail on a missing source before creating anything
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    report = Report()
    try:
        with open(tmp / DATA, "wb") as f:
            for name, arr in iter_images(src, resolution, crops, seed, report):
                f.write(arr.tobytes())
                report.names.append(name)
                if mirror:
                    f.write(np.ascontiguousarray(arr[:, ::-1]).tobytes())
                    report.names.append(name + "#xflip")
        _check_count(report, src, min_images)
        index = {
            "format": "creps-dataset-v1",
            "shape": [len(report.names), resolution, resolution, 3],
            "dtype": "uint8",
            "names": report.names,
            "mirror": mirror,
            "crops": crops,
            "unreadable": report.unreadable,
            "not_images": report.not_images,
        }
        (tmp / INDEX).write_text(json.dumps(index))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"dataset {dest}: {report.summary()}")
    return report


# ------------------------------------------------------------------ load
class ImageDataset:
    """uint8 images [N, R, R, 3] with a deterministic sample order per (seed, position)."""

    def __init__(self, images: np.ndarray, names: list[str], seed: int = 0) -> None:
        self.images, self.names, self.seed = images, names, seed
        self._perms: dict[int, np.ndarray] = {}

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def order(self, start: int, count: int) -> np.ndarray:
        """Indices of samples ``start .. start+count`` of the infinite shuffled stream.

        Epoch e is the permutation drawn from (seed, e), so the data a step sees
        depends only on (seed, step) and never on restarts."""
        pos = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        n = len(self)
        for e in np.unique(pos // n):
            if e not in self._perms:
                self._perms = {e: np.random.default_rng([self.seed, int(e)]).permutation(n)}
            m = pos // n == e
            out[m] = self._perms[e][pos[m] % n]
        return out

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        """uint8 [B, 3, R, R]."""
        arr = np.stack([self.images[int(i)] for i in indices])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def open_dataset(path: str, resolution: int = 0, seed: int = 0, min_images: int = MIN_IMAGES) -> ImageDataset:
    """A built dataset directory, or any image source converted in memory."""
    p = Path(path)
    if (p / INDEX).is_file():
        try:
            index = json.loads((p / INDEX).read_text())
            shape = tuple(index["shape"])
            images = np.memmap(p / DATA, dtype=np.uint8, mode="r", shape=shape)
        except (OSError, ValueError, KeyError) as e:
            raise TrainError(f"dataset {path} is damaged ({e}); rebuild it with `train.py dataset`") from None
        return ImageDataset(images, index["names"], seed)
    if not resolution:
        raise TrainError(f"{path} is not a built dataset; give --resolution to convert it on the fly")
    _check_resolution(resolution)
    report = Report()
    arrays = [arr for _, arr in iter_images(path, resolution, report=report)]
    report.names = [f"{i}" for i in range(len(arrays))]
    _check_count(report, path, min_images)
    print(f"dataset {path} (converted in memory): {report.summary()}", file=sys.stderr)
    return ImageDataset(np.stack(arrays), report.names, seed)

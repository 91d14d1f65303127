"""The landscape/nature dataset of the bundled model, rebuilt from Debian packages.

  python -m training.landscapes data/landscapes128 [--resolution 128] [--crops 12] [--debs DIR]

Every photograph of an outdoor scene (and outdoor nature close-ups) that
Debian's desktop wallpaper packages ship, chosen by eye from contact sheets
of all 110 large images in them (abstract art, renders and logos left out);
the list, with each file's licence from the package's ``copyright`` file, is
``SOURCES`` below and docs/training.md. The ``.deb`` files are fetched with
``apt-get download`` (no root needed) into ``--debs`` and unpacked there with
``dpkg-deb -x``; nothing is installed. Duplicates (the same photo in two
packages or sizes) are dropped by a hash of a 16x16 thumbnail. Then
``training.dataset.build_dataset`` makes the dataset: each photo centre-cropped
plus ``--crops`` random square crops, Lanczos-resized, and x-mirrored.

Licences are all free: CC-BY-4.0, CC-BY-SA-3.0/4.0, CC0-1.0, GPL-2+, LGPL-3;
the attribution requirements are met by the list in docs/training.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .dataset import build_dataset
from .errors import TrainError


@dataclass(frozen=True)
class Source:
    package: str
    path: str  # inside the package's file tree
    licence: str
    author: str


_LOMIRI16 = "usr/share/backgrounds"
_PLASMA = "usr/share/wallpapers"
_MATE = "usr/share/backgrounds/mate/nature"

SOURCES: tuple[Source, ...] = (
    Source(
        "lomiri-wallpapers-16.04", f"{_LOMIRI16}/Bridge_by_Sander_Klootwijk.jpg", "CC-BY-SA-4.0", "Sander Klootwijk"
    ),
    Source("lomiri-wallpapers-16.04", f"{_LOMIRI16}/Dragonfly_by_Bolly.jpg", "CC-BY-4.0", "Bolly"),
    Source(
        "lomiri-wallpapers-16.04", f"{_LOMIRI16}/aitzgorri_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi"
    ),
    Source("lomiri-wallpapers-16.04", f"{_LOMIRI16}/life_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi"),
    Source(
        "lomiri-wallpapers-16.04",
        f"{_LOMIRI16}/picosdeeuropa_by_Aitzol_Berasategi.jpg",
        "CC-BY-4.0",
        "Aitzol Berasategi",
    ),
    Source(
        "lomiri-wallpapers-16.04", f"{_LOMIRI16}/seeding_by_Clements_Engelhardt.jpg", "CC-BY-SA-4.0", "C. Engelhardt"
    ),
    Source("lomiri-wallpapers-16.04", f"{_LOMIRI16}/sunset_by_Aitzol_Berasategi.jpg", "CC0-1.0", "Aitzol Berasategi"),
    Source("lomiri-wallpapers-20.04", f"{_LOMIRI16}/Kleiber_by_Lukas_Baubkus.jpg", "CC-BY-SA-3.0", "Lukas Baubkus"),
    Source("mate-backgrounds", f"{_MATE}/Blinds.jpg", "GPL-2+", "MATE artwork team"),
    Source("mate-backgrounds", f"{_MATE}/Dune.jpg", "GPL-2+", "MATE artwork team"),
    Source("mate-backgrounds", f"{_MATE}/Garden.jpg", "GPL-2+", "MATE artwork team"),
    Source("mate-backgrounds", f"{_MATE}/GreenMeadow.jpg", "GPL-2+", "MATE artwork team"),
    Source("mate-backgrounds", f"{_MATE}/LadyBird.jpg", "GPL-2+", "MATE artwork team"),
    Source("mate-backgrounds", f"{_MATE}/RainDrops.jpg", "GPL-2+", "MATE artwork team"),
    Source("mate-backgrounds", f"{_MATE}/Storm.jpg", "GPL-2+", "MATE artwork team"),
    Source("mate-backgrounds", f"{_MATE}/TwoWings.jpg", "GPL-2+", "MATE artwork team"),
    Source("mate-backgrounds", f"{_MATE}/YellowFlower.jpg", "GPL-2+", "MATE artwork team"),
    Source("plasma-workspace-wallpapers", f"{_PLASMA}/BytheWater/contents/images/1920x1080.jpg", "LGPL-3", "KDE"),
    Source("plasma-workspace-wallpapers", f"{_PLASMA}/ColdRipple/contents/images/1920x1080.jpg", "LGPL-3", "KDE"),
    Source("plasma-workspace-wallpapers", f"{_PLASMA}/DarkestHour/contents/images/1920x1080.jpg", "LGPL-3", "KDE"),
    Source("plasma-workspace-wallpapers", f"{_PLASMA}/EveningGlow/contents/images/1920x1080.jpg", "LGPL-3", "KDE"),
    Source("plasma-workspace-wallpapers", f"{_PLASMA}/FallenLeaf/contents/images/1920x1080.jpg", "LGPL-3", "KDE"),
    Source("plasma-workspace-wallpapers", f"{_PLASMA}/Kite/contents/images/1920x1080.jpg", "LGPL-3", "KDE"),
    Source("plasma-workspace-wallpapers", f"{_PLASMA}/OneStandsOut/contents/images/1920x1080.jpg", "LGPL-3", "KDE"),
    Source("plasma-workspace-wallpapers", f"{_PLASMA}/Path/contents/images/1920x1080.jpg", "LGPL-3", "KDE"),
    Source("plasma-workspace-wallpapers", f"{_PLASMA}/Volna/contents/images/5120x2880.jpg", "CC-BY-SA-4.0", "KDE"),
    Source("plasma-workspace-wallpapers", f"{_PLASMA}/summer_1am/contents/images/1920x1080.jpg", "LGPL-3", "KDE"),
)


def fetch(debs: Path) -> Path:
    """Download and unpack the source packages into ``debs``; return the unpacked root."""
    root = debs / "unpacked"
    for package in sorted({s.package for s in SOURCES}):
        target = root / package
        if target.is_dir():
            continue
        have = sorted(debs.glob(f"{package}_*.deb"))
        if not have:
            got = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
            if got.returncode != 0:
                raise TrainError(f"apt-get download {package} failed: {got.stderr.strip().splitlines()[-1:]}")
            have = sorted(debs.glob(f"{package}_*.deb"))
        tmp = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=root.parent))
        subprocess.run(["dpkg-deb", "-x", str(have[-1]), str(tmp)], check=True)
        root.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    return root


def collect(root: Path, dest: Path) -> list[Source]:
    """Copy the chosen photos into ``dest`` (one flat folder), dropping duplicates; return those kept."""
    dest.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    kept = []
    for src in SOURCES:
        path = root / src.package / src.path
        if not path.is_file():
            raise TrainError(f"{src.package} has no {src.path} (a different package version?)")
        with Image.open(path) as im:
            thumb = np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BILINEAR)) // 16
        digest = hashlib.sha256(thumb.tobytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        name = f"{src.package}__{Path(src.path).parent.parent.name if 'contents' in src.path else ''}{path.name}"
        shutil.copyfile(path, dest / name)
        kept.append(src)
    return kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.landscapes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("dest", help="new dataset directory")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--crops", type=int, default=12, help="random square crops per photo [12]")
    p.add_argument("--debs", default="data/debs", help="where .deb files are downloaded and unpacked [data/debs]")
    args = p.parse_args(argv)
    debs = Path(args.debs)
    debs.mkdir(parents=True, exist_ok=True)
    photos = debs / "photos"
    kept = collect(fetch(debs), photos)
    print(f"{len(kept)} photos from {len({s.package for s in kept})} packages -> {photos}", file=sys.stderr)
    build_dataset(str(photos), args.dest, args.resolution, mirror=True, crops=args.crops, seed=0, min_images=8)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The wheel: built from the source alone (no npm install), installed into a fresh venv, it serves the
viewer page, OpenSeadragon and its button images; the vendored OpenSeadragon is the npm package's."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, free_port, wait_port

OSD = REPO / "viewer" / "static" / "osd"
NPM_OSD = REPO / "viewer" / "node_modules" / "openseadragon"
# what the page needs from the wheel (paths inside it), besides every button image
ASSETS = ["viewer/static/index.html", "viewer/static/viewer.js", "viewer/static/viewer.css"]
ASSETS += ["viewer/static/osd/openseadragon.min.js", "viewer/static/osd/LICENSE.txt"]
# what the wheel must not carry: build leftovers and npm installs
SOURCE_IGNORE = shutil.ignore_patterns(
    "node_modules", ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "out", "runs", "data", ".whl"
)


def _buttons() -> list[str]:
    names = sorted(p.name for p in (OSD / "images").glob("*.png"))
    assert len(names) >= 40 and "zoomin_rest.png" in names and "fullpage_hover.png" in names
    return names


def test_vendored_openseadragon_is_the_pinned_npm_package():
    header = (OSD / "openseadragon.min.js").read_bytes()[:200].decode()
    assert (
        header.startswith("//! openseadragon 6.1.1\n")
        and '"openseadragon": "6.1.1"' in (REPO / "viewer" / "package.json").read_text()
    )
    assert "BSD" in (OSD / "LICENSE.txt").read_text() or "Redistribution and use" in (OSD / "LICENSE.txt").read_text()
    if not (NPM_OSD / "build" / "openseadragon").is_dir():
        pytest.skip("viewer/node_modules is not installed (npm ci in viewer/): nothing to compare with")
    build = NPM_OSD / "build" / "openseadragon"
    assert (OSD / "openseadragon.min.js").read_bytes() == (build / "openseadragon.min.js").read_bytes()
    assert (OSD / "LICENSE.txt").read_bytes() == (NPM_OSD / "LICENSE.txt").read_bytes()
    assert _buttons() == sorted(p.name for p in (build / "images").glob("*.png"))
    for name in _buttons():
        assert (OSD / "images" / name).read_bytes() == (build / "images" / name).read_bytes(), name


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _fresh_env() -> dict:
    """The environment of an installed tool: no PYTHONPATH pointing at the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def test_wheel_installs_and_serves_the_viewer_with_its_assets(tmp_path):
    # 1. the wheel, from a copy of the source without node_modules (the PEP 639 licence: no warning)
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=SOURCE_IGNORE)
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(dist), "-v"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    log = build.stdout + build.stderr
    assert "project.license" not in log and "License classifiers are deprecated" not in log
    (wheel,) = dist.glob("creps_gigapixel-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    buttons = [f"viewer/static/osd/images/{name}" for name in _buttons()]
    assert not [a for a in ASSETS + buttons if a not in names]
    assert not [n for n in names if "node_modules" in n]
    assert "License-Expression: MIT AND BSD-3-Clause" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    # 2. a fresh venv with the wheel installed; its dependencies come from this venv's site-packages,
    # added as a plain path (so the editable install's finder there is not run)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel), "-q"]
    subprocess.run(pip, check=True, timeout=600)
    where = subprocess.check_output(
        [py, "-c", "import render, viewer.server as s; print(render.__file__); print(s.OSD_DIR)"],
        cwd=tmp_path,
        env=_fresh_env(),
        text=True,
        timeout=300,
    ).split()
    assert all(Path(p).is_relative_to(purelib) for p in where), where

    # 3. the installed command makes a store and serves it: page, OpenSeadragon, a button image
    from PIL import Image

    Image.new("RGB", (96, 64), (200, 30, 90)).save(tmp_path / "pic.png")
    tool = venv / "bin" / "creps-render"
    made = subprocess.run(
        [tool, "import", "pic.png", "pic.zarr", "--tile", "32", "--quiet"],
        cwd=tmp_path,
        env=_fresh_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0 and "imported 6 of 6 tiles" in made.stdout, made.stderr[-2000:]
    port = free_port()
    proc = subprocess.Popen(
        [tool, "view", "pic.zarr", "--port", str(port)],
        cwd=tmp_path,
        env=_fresh_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_port(port, timeout=300)
        status, page = _get(port, "/")
        assert status == 200 and b"/osd/openseadragon.min.js" in page
        assert page == (REPO / "viewer" / "static" / "index.html").read_bytes()
        assert _get(port, "/osd/openseadragon.min.js") == (200, (OSD / "openseadragon.min.js").read_bytes())
        for name in ("home_rest.png", "zoomin_hover.png", "fullpage_pressed.png"):
            assert _get(port, f"/osd/images/{name}") == (200, (OSD / "images" / name).read_bytes()), name
        status, info = _get(port, "/api/info")
        assert status == 200 and (json.loads(info)["width"], json.loads(info)["height"]) == (96, 64)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

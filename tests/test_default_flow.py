"""The default `render.py render` flow on a small canvas: render, pyramid, TIFF, DeepZoom and the
printed view command that really serves it; and an export failure that exits 1 with the render kept."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import urllib.request
import zipfile

import numpy as np
import tifffile
import zarr
from conftest import REPO, free_port, render_cli_env, wait_port

FLOW = [
    sys.executable,
    str(REPO / "render.py"),
    "render",
    "--checkpoint",
    "preset:tiny",
    "--size",
    "200x136",
    "--tile",
    "64",
    "--workers",
    "1",
    "--threads-per-worker",
    "1",
    "--quiet",
]


def test_default_flow_renders_exports_and_prints_a_working_view_command(tmp_path, render_reference):
    out = tmp_path / "flow.zarr"
    proc = subprocess.run(
        [*FLOW, "--out", str(out)], env=render_cli_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    summary = json.loads(next(ln for ln in lines if ln.startswith("summary "))[8:])
    assert summary["status"] == "done" and summary["tiles_rendered"] == 12
    assert any(ln == f"exports: {tmp_path}/flow.tif, {tmp_path}/flow.dzi" for ln in lines), lines
    # the store, its pyramid, the TIFF and the DeepZoom pyramid all hold the render
    ref = render_reference(136, 200)
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(np.asarray(group["0"][:]), ref)
    assert "1" in group and "2" in group
    with tifffile.TiffFile(tmp_path / "flow.tif") as tif:
        assert tif.series[0].shape[:2] == (136, 200) and len(tif.series[0].levels) >= 2
    dzi = (tmp_path / "flow.dzi").read_text()
    assert 'Width="200"' in dzi and 'Height="136"' in dzi
    assert (tmp_path / "flow_files" / "8" / "0_0.jpg").is_file()
    assert zipfile.is_zipfile(tmp_path / "flow.szi")
    # the view command as printed, started as a user would (on a free port), serves the DZI
    view = next(ln for ln in lines if ln.startswith("view it: "))[len("view it: ") :]
    argv = shlex.split(view)
    assert argv[1:3] == ["render.py", "view"] and argv[3] == f"{tmp_path}/flow.dzi", view
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(REPO / "render.py"), *argv[2:], "--port", str(port)],
        env=render_cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        wait_port(port)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert "openseadragon" in page.lower()
    finally:
        server.terminate()
        server.wait(30)


def test_export_failure_exits_1_keeps_the_render_and_says_how_to_retry(tmp_path, render_reference):
    out = tmp_path / "kept.zarr"
    (tmp_path / "kept.tif").mkdir()  # a folder where the TIFF goes: the export cannot be written
    proc = subprocess.run(
        [*FLOW, "--out", str(out)], env=render_cli_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-2000:])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: exports failed: "), proc.stderr[-2000:]
    assert f"the render in {out} is kept" in errors[0] and "render.py assemble" in errors[0]
    np.testing.assert_array_equal(np.asarray(zarr.open_group(str(out), mode="r")["0"][:]), render_reference(136, 200))
    # the retry the line names works once the obstacle is gone
    (tmp_path / "kept.tif").rmdir()
    retry = shlex.split(errors[0].split("retry them with `", 1)[1].rstrip(")").rstrip("`"))
    assert retry[1:3] == ["render.py", "assemble"], retry
    again = subprocess.run(
        [sys.executable, str(REPO / "render.py"), *retry[2:]],
        env=render_cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "kept.tif").is_file() and (tmp_path / "kept.dzi").is_file()

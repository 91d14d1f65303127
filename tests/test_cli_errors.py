"""One exit-code rule for every command of render.py and train.py, pinned by a table.

Bad input exits 2 with exactly one line on stderr, starting ``error:``, no
traceback, and writes nothing (the case's folder is byte for byte what it
was).  Each row is (script, argv, the words the line must hold).  The rows of
the table run in two interpreters side by side (``main(argv)`` per row, as the
script runs it, each in its own folder): an interpreter costs seconds of
imports on a loaded machine, a row then costs its own work only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, render_cli_env

R, T = "render.py", "train.py"
TINY = ["--checkpoint", "preset:tiny"]
NO_CACHE = ["--cache-max-gb", "0"]

# (script, argv, words the error line holds); every row must exit 2 and write nothing.
CASES: list[tuple[str, list[str], str]] = [
    # render
    (R, ["render", "jobdir"], "job file 'jobdir' cannot be read"),
    (R, ["render", "jobdir/"], "cannot be read"),
    (R, ["render", "missing.toml"], "job file 'missing.toml' not found"),
    (R, ["render", "notes.txt"], "is not valid TOML"),
    (R, ["render", "--tile", "x"], "argument --tile: invalid int value: 'x'"),
    (R, ["render", "--bogus"], "unrecognized arguments: --bogus"),
    (R, ["render", *TINY, "--size", "64", "--tile", "17", "--out", "a.zarr"], "tile"),
    (R, ["render", *TINY, "--size", "0x5", "--out", "a.zarr"], "size"),
    (R, ["render", "--checkpoint", "junk.pkl", "--size", "64", "--out", "a.zarr"], "junk.pkl"),
    (R, ["render", "--checkpoint", "preset:nope", "--size", "64", "--out", "a.zarr"], "nope"),
    (R, ["render", *TINY, "--size", "64", "--tile", "32", "--out", "foreign"], "not an image store"),
    (R, ["render", *TINY, "--size", "64", "--out", "a.zarr", "--storage-options", "{"], "storage options"),
    (R, ["render", *TINY, "--size", "64", "--out", "a.zarr", "--max-tiles", "-1"], "--max-tiles"),
    (
        R,
        ["render", *TINY, "--size", "64", "--out", "a.zarr", "--workers", "0", "--threads-per-worker", "4096"],
        "threads_per_worker",
    ),
    (
        R,
        ["render", *TINY, "--size", "1048576", "--tile", "16", "--out", "a.zarr", "--workers", "0"],
        "(limit 67,108,864)",
    ),
    (R, ["nosuch"], "invalid choice: 'nosuch'"),
    # verify
    (R, ["verify", "missing.zarr"], "no image store at 'missing.zarr'"),
    (R, ["verify", "foreign"], "no image store at 'foreign'"),
    (R, ["verify", "missing.zarr", "--threads", "0"], "--threads must be >= 1"),
    (R, ["verify", "missing.zarr", "--storage-options", "[1]"], "storage options must be a JSON object"),
    # assemble
    (R, ["assemble", "missing.zarr"], "no image store at 'missing.zarr'"),
    (R, ["assemble", "foreign", "--dzi", "out/x"], "no image store at 'foreign'"),
    (R, ["assemble", "missing.zarr", "--quality", "0"], "--quality must be 1..100"),
    (R, ["assemble", "missing.zarr", "--tiff", "notes.txt/x.tif"], "cannot write 'notes.txt/x.tif'"),
    (R, ["assemble"], "the following arguments are required: url"),
    # view
    (R, ["view"], "give either URL_OR_DZI"),
    (R, ["view", "missing.zarr"], "no image store at 'missing.zarr'"),
    (R, ["view", "missing.dzi"], "cannot read 'missing.dzi'"),
    (R, ["view", "--checkpoint", "junk.pkl", *NO_CACHE], "junk.pkl"),
    (R, ["view", *TINY, *NO_CACHE, "--port", "70000"], "--port 70000 is not a TCP port"),
    (R, ["view", *TINY, *NO_CACHE, "--host", "0.0.0.0"], "refusing to serve on non-loopback address"),
    (R, ["view", *TINY, *NO_CACHE, "--size", "3x0"], "--size"),
    (R, ["view", "missing.zarr", "--seed", "3"], "only apply to --checkpoint"),
    # bench, bench-assemble
    (R, ["bench", "--device", "cpu", "--e2e-size", "0x5"], "size"),
    (R, ["bench", "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (R, ["bench-assemble", "--sizes", "x"], "--sizes"),
    (R, ["bench-assemble", "--sides", "nope"], "--sides"),
    # convert
    (R, ["convert", "missing.pkl", "out.safetensors"], "missing.pkl"),
    (R, ["convert", "junk.pkl", "out.safetensors"], "junk.pkl"),
    (R, ["convert", "junk.pkl", "out.bin"], "output must end in .safetensors"),
    (R, ["convert", "junk.pkl", "notes.txt"], "notes.txt exists"),
    # compare
    (R, ["compare", *TINY, "--out", "c.png", "--scale", "1"], "--scale must be a number > 1"),
    (R, ["compare", "--checkpoint", "junk.pkl", "--out", "c.png"], "junk.pkl"),
    (R, ["compare", *TINY, "--out", "c.png", "--magnify", "0"], "--magnify must be 1..16"),
    (R, ["compare", *TINY], "the following arguments are required: --out"),
    # video
    (R, ["video", "preset:tiny", "--out", "v.mp4"], "give --zoom"),
    (R, ["video", "preset:tiny", "--seeds", "1", "--out", "v.mp4"], "--seeds needs at least two seeds"),
    (R, ["video", "missing.zarr", "--zoom", "0.5,0.5,4", "--out", "v.mp4"], "missing.zarr"),
    (R, ["video", "preset:tiny", "--zoom", "0.5,0.5,4", "--size", "33x32", "--out", "v.mp4"], "--size"),
    # train (the default subcommand), dataset, metrics
    (T, ["--data", "missing", "--out", "run"], "missing"),
    (T, ["--data", "foreign", "--out", "run"], "foreign"),
    (T, ["--data", "missing", "--out", "run", "--batch", "x"], "argument --batch: invalid int value: 'x'"),
    (T, ["train", "--data", "missing", "--out", "run", "--resume", "junk.pkl"], "missing"),
    (T, ["dataset", "empty", "ds.zip", "--resolution", "32"], "empty"),
    (T, ["dataset", "missing", "ds.zip", "--resolution", "32"], "missing"),
    (T, ["dataset", "empty", "ds.zip"], "the following arguments are required: --resolution"),
    (T, ["metrics", "junk.pkl", "--scale-consistency"], "junk.pkl"),
    (T, ["metrics", "missing.safetensors", "--data", "missing"], "missing"),
    (T, ["metrics", "preset:tiny"], "--data is required"),
    (T, ["--data", "x", "--out", "run", "nosuch"], "unrecognized arguments: nosuch"),
]

# Runs the rows of one group in one interpreter: each in its folder, as `python SCRIPT ARGV` would
# (main's return value is the exit code; SystemExit's code for argparse; an uncaught exception
# prints its traceback and is exit 1, as the interpreter does).
DRIVER = """
import importlib, json, os, sys, traceback
sys.path.insert(0, os.environ["REPO"])
rows = json.loads(sys.argv[1])
for folder, script, argv in rows:
    os.chdir(folder)
    main = importlib.import_module(script[:-3]).main
    print("@@case", folder, file=sys.stderr, flush=True)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(); sys.stderr.flush()
    print("@@code", code, file=sys.stderr, flush=True)
"""


def _fixtures(folder: Path) -> None:
    """What the rows point at: a folder, a non-TOML file, a folder that is no store, junk weights."""
    (folder / "jobdir").mkdir(parents=True)
    (folder / "notes.txt").write_text("not [toml\n")
    (folder / "foreign").mkdir()
    (folder / "foreign" / "keep.txt").write_text("mine")
    (folder / "junk.pkl").write_bytes(b"\x00not a checkpoint" * 8)
    (folder / "empty").mkdir()


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
        for p in sorted(folder.rglob("*"))
    }


def _run_group(rows: list[tuple[str, str, list[str]]]) -> str:
    env = {**render_cli_env(), "REPO": str(REPO), "CREPS_DEBUG": ""}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(rows)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=rows[0][0],
    )
    return proc.stderr


def _parse(stderr: str) -> dict[str, tuple[int | None, list[str]]]:
    """folder -> (exit code, stderr lines) of each row the driver ran."""
    out: dict[str, tuple[int | None, list[str]]] = {}
    folder, lines = None, []
    for line in stderr.splitlines():
        if line.startswith("@@case "):
            folder, lines = line[len("@@case ") :], []
        elif line.startswith("@@code ") and folder is not None:
            code = line[len("@@code ") :]
            out[folder] = (int(code) if code.lstrip("-").isdigit() else None, lines)
            folder = None
        elif folder is not None:
            lines.append(line)
    return out


def test_every_subcommand_refuses_bad_input_with_one_line_exit_2_and_writes_nothing(tmp_path):
    folders, groups, before = {}, [[], []], {}
    for i, (script, argv, _) in enumerate(CASES):
        folder = tmp_path / f"case{i:02d}"
        _fixtures(folder)
        folders[i] = str(folder)
        before[i] = _tree(folder)
        groups[i % 2].append((str(folder), script, argv))
    with ThreadPoolExecutor(2) as pool:  # two interpreters, this machine's share
        results = {}
        for stderr in pool.map(_run_group, groups):
            results.update(_parse(stderr))
    failures = []
    for i, (script, argv, words) in enumerate(CASES):
        code, lines = results.get(folders[i], (None, ["(the row did not run)"]))
        shown = f"{script} {' '.join(argv)} -> exit {code}: {lines}"
        if code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or words not in lines[0]:
            failures.append(shown)
        elif _tree(Path(folders[i])) != before[i]:
            failures.append(f"{shown}; wrote {set(_tree(Path(folders[i]))) ^ set(before[i]) or 'into a file'}")
    assert not failures, "\n".join(failures)


def test_an_unexpected_exception_is_one_line_exit_1(capsys, monkeypatch):
    """A failure no message was written for (a bug, an OSError part-way) is still one line, exit 1;
    --debug shows the traceback."""
    from creps.cli import command

    monkeypatch.delenv("CREPS_DEBUG", raising=False)

    @command(failed_hint=" (re-run the same command to resume)")
    def run(args):
        raise OSError(28, "No space left on device")

    import argparse

    assert run(argparse.Namespace()) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: OSError: [Errno 28] No space left on device (re-run the same command to resume) "
        "(unexpected; --debug or CREPS_DEBUG=1 shows the traceback)"
    ]
    with pytest.raises(OSError):
        run(argparse.Namespace(debug=True))


@pytest.mark.parametrize("argv", [["render", "jobdir"], ["assemble", "missing.zarr"]])
def test_the_two_known_cases_as_the_user_runs_them(tmp_path, argv):
    """The script itself (its ``__main__``), not a driver: a folder as the job TOML and assemble
    of a missing store exit 2 with one line, as verify and view do."""
    _fixtures(tmp_path)
    before = _tree(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(REPO / "render.py"), *argv],
        env={k: v for k, v in render_cli_env().items() if k != "CREPS_DEBUG"},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and _tree(tmp_path) == before

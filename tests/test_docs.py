"""Every command in README.md and docs/*.md runs as written.

The fenced shell blocks (```bash, ```sh, ```shell, ```console: there only the
``$ `` lines) of README.md and then docs/*.md (in name order) are run, in
document order, in one temporary copy of the tree, as a new user would run them
one after the other on a fresh clone: a later doc may use what an earlier one
made (the README's dataset, runs and stores), never the other way round.  A
command is a line, with its ``\\`` continuations; comments and blank lines are
skipped; ``&&`` chains and the like run as bash runs them.

How the test runs them (the only differences from a terminal):

- ``CREPS_QUICK=1`` (``creps.cli``, README "Tests") shrinks the work a
  command starts: canvases and video frames at most 128 px a side, one
  training step of 4 images, three video frames, 8 images per FID/KID, two
  seeds per scale-consistency check.
- ``HOME`` is a temporary folder whose ``photos/`` holds 12 generated
  pictures, so ``~/photos`` exists.
- The S3 endpoint the docs name, ``127.0.0.1:9000``, is replaced by the
  ``moto_s3`` fixture's port, the environment has the credentials that
  docs/object-stores.md exports, and the bucket ``bucket`` exists (as its
  setup makes it).  ``PET_MASTER_PORT`` gives ``torchrun`` a free port,
  ``RAY_TMPDIR`` the embedded Rays a directory of their own.
- ``render.py view`` serves until stopped: it is started with ``--port 0``
  appended, the page at the URL it prints must be the OpenSeadragon viewer,
  then it is stopped like Ctrl-C.

A block that cannot run here (a GPU, an official .pkl, a cluster, a long
benchmark, network, root) says so in the doc itself, with an HTML comment on
the line before it (blank lines between are fine)::

    <!-- docs-test: skip (needs a CUDA GPU) -->

and its commands are reported as skipped with that reason; so is a command
that an earlier one already ran word for word (the README's, repeated in a
later doc: there it would only resume what is done).  Each command is
one test, ``test_doc_command_runs[FILE:LINE]``; one that fails fails with the
doc's file and line and the end of its output.  Selected alone, a command's
test first runs the commands before it that it may depend on.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, free_port, kill_session, stop_session
from PIL import Image

DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
SKIP = re.compile(r"skip \((.+)\)")
S3_ENDPOINT = "127.0.0.1:9000"  # the endpoint the docs name; replaced by the moto_s3 fixture's
COMMAND_TIMEOUT = 300
SERVE_TIMEOUT = 180


# ----------------------------------------------------------------------------
# Reading the docs
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DocCommand:
    file: str
    line: int  # 1-based, the command's first line
    text: str  # as written, continuations included
    skip: str | None  # the marker's reason, or None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def serves(self) -> bool:
        return re.search(r"\brender\.py\s+view\b", self.text) is not None


def parse_doc(text: str, file: str) -> list[DocCommand]:
    """The shell commands of one markdown text, in order, each with its block's skip reason."""
    out: list[DocCommand] = []
    lines = text.splitlines()
    marker: str | None = None
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        found = MARKER.fullmatch(stripped)
        if found:
            reason = SKIP.fullmatch(found.group(1))
            if reason is None:
                raise ValueError(f"{file}:{i + 1}: unknown docs-test marker {stripped!r} (known: skip (REASON))")
            marker = reason.group(1)
        elif stripped.startswith("```"):
            lang = stripped[3:].strip().lower()
            i, block = _block(lines, i + 1)
            if lang in SHELL_LANGS:
                out += [DocCommand(file, n, cmd, marker) for n, cmd in _commands(block, console=lang == "console")]
            marker = None
        elif stripped:
            marker = None  # a marker applies to the block right after it
        i += 1
    return out


def _block(lines: list[str], start: int) -> tuple[int, list[tuple[int, str]]]:
    """(index of the closing fence, [(1-based line number, text)] of the block's body)."""
    body = []
    i = start
    while i < len(lines) and not lines[i].strip().startswith("```"):
        body.append((i + 1, lines[i]))
        i += 1
    return i, body


def _commands(block: list[tuple[int, str]], console: bool) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    current: list[str] = []
    first = 0
    for number, line in block:
        if not current:
            stripped = line.strip()
            if console:
                if not stripped.startswith("$ "):
                    continue  # output shown in the doc
                stripped = stripped[2:].strip()
            if not stripped or stripped.startswith("#"):
                continue
            first, line = number, stripped
        current.append(line)
        if not line.rstrip().endswith("\\"):
            out.append((first, "\n".join(current)))
            current = []
    if current:
        out.append((first, "\n".join(current)))
    return out


def all_commands() -> list[DocCommand]:
    return [c for doc in DOCS for c in parse_doc((REPO / doc).read_text(), doc)]


COMMANDS = all_commands()  # one test each, ``test_doc_command_runs[FILE:LINE]``


def _words(cmd: DocCommand) -> str:
    return " ".join(cmd.text.replace("\\\n", " ").split())


def _first_runs() -> dict[int, DocCommand]:
    """index -> the earlier command that is the very same one (run there; here it would only
    resume what is done)."""
    first: dict[str, DocCommand] = {}
    repeats = {}
    for i, cmd in enumerate(COMMANDS):
        if cmd.skip is None:
            before = first.setdefault(_words(cmd), cmd)
            if before is not cmd:
                repeats[i] = before
    return repeats


REPEATS = _first_runs()


# ----------------------------------------------------------------------------
# Cheap checks of the docs and the CLIs first
# ----------------------------------------------------------------------------
def test_parse_doc_reads_blocks_markers_continuations_and_console():
    doc = "\n".join(
        [
            "text",  # 1
            "```bash",  # 2
            "# a comment",  # 3
            "echo one \\",  # 4
            "    two   # trailing",  # 5
            "",  # 6
            "true && echo three",  # 7
            "```",  # 8
            "<!-- docs-test: skip (needs a CUDA GPU) -->",  # 9
            "",  # 10
            "```sh",  # 11
            "nvidia-smi",  # 12
            "```",  # 13
            "```python",  # 14
            "print('not shell')",  # 15
            "```",  # 16
            "```console",  # 17
            "$ echo four",  # 18
            "four",  # 19
            "```",  # 20
        ]
    )
    got = [(c.line, c.text, c.skip) for c in parse_doc(doc, "x.md")]
    assert got == [
        (4, "echo one \\\n    two   # trailing", None),
        (7, "true && echo three", None),
        (12, "nvidia-smi", "needs a CUDA GPU"),
        (18, "echo four", None),
    ]
    with pytest.raises(ValueError, match=r"x.md:1: unknown docs-test marker"):
        parse_doc("<!-- docs-test: maybe -->\n```bash\ntrue\n```", "x.md")


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


def test_every_doc_example_writes_its_own_output():
    """Two different commands never write one --out (a user running the docs in order would see
    "holds a different job" or "started with a different config"); re-running the very same
    command is a resume and is fine.  A render without --out or a job file writes the default
    job's out/demo.zarr, which the quick start fills: it must name its own."""
    seen: dict[str, DocCommand] = {}
    problems = []
    for cmd in COMMANDS:
        if cmd.skip is not None:
            continue
        argv = shlex.split(cmd.text.replace("\\\n", " "), comments=True)
        out = _flag(argv, "--out")
        is_render = argv[1:3] == ["render.py", "render"]
        if is_render and out is None and not any(a.endswith(".toml") for a in argv):
            problems.append(f"{cmd.where}: a render without --out writes out/demo.zarr: {cmd.text}")
        if out is None:
            continue
        before = seen.setdefault(out, cmd)
        if before is not cmd and _words(before) != _words(cmd):
            problems.append(f"{cmd.where}: --out {out} is also written by {before.where}")
    assert not problems, "\n".join(problems)


def _main_modules() -> list[str]:
    """Every file of ours with a ``__main__`` block, as ``python -m`` module or script path."""
    found = []
    for path in sorted(REPO.glob("*.py")) + sorted(REPO.glob("*/*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("tests", ".venv") or "__main__" not in path.read_text():
            continue
        found.append(str(rel) if len(rel.parts) == 1 else ".".join(rel.with_suffix("").parts))
    return found


@pytest.mark.parametrize("target", _main_modules())
def test_every_main_module_answers_help(target):
    argv = [target] if target.endswith(".py") else ["-m", target]
    proc = subprocess.run(
        [sys.executable, *argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120, env=_base_env(REPO)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ") and "--help" in proc.stdout, proc.stdout[:500]


def test_follow_up_names_the_interpreter_as_typed(tmp_path, monkeypatch):
    """Render, assemble and verify print their next command through ``creps.cli.follow_up``."""
    from creps.cli import follow_up

    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.chdir(tmp_path)  # under the current directory: the path as typed from here
    assert follow_up("render.py view a.dzi") == ".venv/bin/python render.py view a.dzi"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("PATH", str(python.parent))  # what PATH finds (an activated venv)
    assert follow_up("render.py view a.dzi") == "python render.py view a.dzi"
    monkeypatch.setenv("PATH", str(tmp_path))  # else the absolute path
    assert follow_up("render.py view a.dzi") == f"{python} render.py view a.dzi"


# ----------------------------------------------------------------------------
# Running the docs
# ----------------------------------------------------------------------------
def _base_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = str(tree)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _copy_tree(dest: Path) -> None:
    """The repository's files (tracked and untracked, not ignored: a fresh clone plus work in progress),
    with the shared installs (.venv, node_modules) linked in."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if rel.startswith(".venv") or "node_modules" in Path(rel).parts or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    for link in (".venv", "viewer/node_modules", "tests/emulators/node_modules"):
        if (REPO / link).exists():
            (dest / link).parent.mkdir(parents=True, exist_ok=True)
            (dest / link).symlink_to((REPO / link).resolve())


def _photos(folder: Path, n: int = 12) -> None:
    """Stand-ins for the user's ~/photos: smooth colour fields with some texture, of mixed sizes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = 96 + 8 * (i % 3), 128 - 8 * (i % 4)
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        img = np.stack([yy, xx, (yy + xx) / 2], axis=-1) * rng.random(3) + 0.25 * rng.random((h, w, 3))
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"photo{i:02d}.jpg")


class DocRun:
    """One temporary tree in which the documented commands run in order, each once."""

    def __init__(self, tree: Path, env: dict[str, str], s3: str) -> None:
        self.tree, self.env, self.s3 = tree, env, s3
        self.done: set[int] = set()
        self.failed: list[str] = []

    def run_up_to(self, index: int) -> None:
        """Run the commands before ``COMMANDS[index]`` that have not run yet (when tests are selected,
        a command still finds what the ones before it made), then that one."""
        for i in range(index + 1):
            cmd = COMMANDS[i]
            if i in self.done or cmd.skip is not None or i in REPEATS:
                continue
            self.done.add(i)
            try:
                self.run(cmd)
            except BaseException:
                self.failed.append(cmd.where)
                if i == index:
                    raise
                # an earlier command's own test reports it; this one may still run

    def run(self, cmd: DocCommand) -> None:
        text = cmd.text.replace(S3_ENDPOINT, self.s3)
        if cmd.serves:
            self._serve(cmd, text)
            return
        proc = self._start(["bash", "-c", text])
        try:
            output, _ = proc.communicate(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            output, _ = proc.communicate()
            pytest.fail(f"{cmd.where}: still running after {COMMAND_TIMEOUT} s: {cmd.text}\n{output[-3000:]}")
        kill_session(proc.pid)  # anything it left running in the background
        if proc.returncode != 0:
            earlier = f" (earlier failures: {', '.join(self.failed)})" if self.failed else ""
            pytest.fail(f"{cmd.where}: exit {proc.returncode}{earlier}: {cmd.text}\n{output[-3000:]}")

    def _start(self, argv: list[str]) -> subprocess.Popen[str]:
        """A command of the docs in the docs' tree and environment, output merged, in a session of
        its own (so ``kill_session`` stops whatever it starts)."""
        return subprocess.Popen(
            argv,
            cwd=self.tree,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def _serve(self, cmd: DocCommand, text: str) -> None:
        argv = [*shlex.split(text.replace("\\\n", " "), comments=True), "--port", "0"]
        proc = self._start(argv)
        lines: list[str] = []
        url = threading.Event()
        found: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                m = re.search(r"^viewing .* at (http://\S+)", line)
                if m and not found:
                    found.append(m.group(1))
                    url.set()
            url.set()  # it exited

        threading.Thread(target=read, daemon=True).start()
        try:
            url.wait(SERVE_TIMEOUT)
            if not found:
                pytest.fail(f"{cmd.where}: no `viewing ... at URL` line: {cmd.text}\n{''.join(lines)[-3000:]}")
            address = found[0].replace("://0.0.0.0:", "://127.0.0.1:")
            with urllib.request.urlopen(address, timeout=60) as response:
                page = response.read().decode()
            assert response.status == 200 and "openseadragon" in page.lower(), f"{cmd.where}: {page[:300]}"
        finally:
            stop_session(proc)


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory, moto_s3):
    import tempfile

    import s3fs

    # the commands' embedded Rays keep to a directory of their own (short: Ray's socket paths have
    # a length limit), so no other Ray on this machine is found by, or finds, theirs
    ray_tmp = tempfile.mkdtemp(prefix="creps-docs-ray-", dir="/tmp")
    root = tmp_path_factory.mktemp("docs")
    tree, home = root / "tree", root / "home"
    tree.mkdir()
    _copy_tree(tree)
    _photos(home / "photos")
    env = _base_env(tree)
    env.update(
        HOME=str(home),
        CREPS_QUICK="1",
        # what docs/object-stores.md sets up next to its moto_server
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        PET_MASTER_PORT=str(free_port()),
        RAY_TMPDIR=ray_tmp,
    )
    env.pop("AWS_PROFILE", None)
    s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": moto_s3}).mkdir("bucket")
    yield DocRun(tree, env, moto_s3.removeprefix("http://"))
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.timeout(3600)  # selected alone, a command runs those before it first; each has COMMAND_TIMEOUT
@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[c.where for c in COMMANDS])
def test_doc_command_runs(doc_run, index):
    cmd = COMMANDS[index]
    if cmd.skip is not None:
        pytest.skip(cmd.skip)
    if index in REPEATS:
        pytest.skip(f"the same command as {REPEATS[index].where}, which runs first")
    doc_run.run_up_to(index)

"""DDP training that has run: `torchrun --nproc_per_node 2` (gloo, CPU) trains the tiny preset,
is stopped and resumed under torchrun, and ends where one process with the same global batch
ends (the same 8 images a step, done as the same two parts of 4 with gradient accumulation):
every parameter and buffer (w_avg included) of G, G_ema and D within 1e-5, ADA state equal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, VENV_BIN, free_port, render_cli_env
from test_training_e2e import make_images

from training.dataset import build_dataset
from training.state import latest_checkpoint, read_checkpoint

STEPS = 6  # batch 8: 0.048 kimg
TRAIN = [
    "--preset",
    "tiny",
    "--batch",
    "8",  # 4 per rank: a multiple of the default minibatch-std group (4)
    "--snap",
    "0.024",  # a checkpoint every 3 steps
    "--tick",
    "0.008",
    "--seed",
    "5",
    "--target",
    "-1",  # E[sign D(real)] > -1 at once: p climbs, so later steps run the augmentations
    "--ada-kimg",
    "0.01",
    "--threads",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ddp-data")
    build_dataset(str(make_images(root / "src")), str(root / "ds"), 32, log=lambda s: None)
    return str(root / "ds")


def _train(cmd: list[str], data: str, out: str, kimg: float, *extra: str) -> None:
    proc = subprocess.run(
        [*cmd, str(REPO / "train.py"), "--data", data, "--out", out, "--kimg", str(kimg), *TRAIN, *extra],
        env={**render_cli_env(), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _torchrun() -> list[str]:
    return [
        str(VENV_BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]


def test_torchrun_two_ranks_equal_one_process_and_resume(dataset, tmp_path):
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    _train([sys.executable], dataset, single, STEPS * 8 / 1000, "--batch-gpu", "4")
    # two ranks, stopped after 3 steps, then the same command resumes them to 6
    _train(_torchrun(), dataset, ddp, 3 * 8 / 1000)
    assert latest_checkpoint(ddp).name == "ckpt-00000003.safetensors"
    _train(_torchrun(), dataset, ddp, STEPS * 8 / 1000)

    a, b = read_checkpoint(latest_checkpoint(single)), read_checkpoint(latest_checkpoint(ddp))
    assert a.meta["step"] == b.meta["step"] == STEPS
    # ADA: the same statistic and p (p moved, so the augmentations ran in the later steps)
    assert b.meta["ada"] == a.meta["ada"] and a.meta["ada"]["p"] > 0, (a.meta["ada"], b.meta["ada"])
    modules = [k for k in a.tensors if k.split("/")[0] in ("G", "G_ema", "D")]
    assert modules and set(modules) <= set(b.tensors)
    worst = max(modules, key=lambda k: float((a.tensors[k] - b.tensors[k]).abs().max()))
    diff = float((a.tensors[worst] - b.tensors[worst]).abs().max())
    assert diff <= 1e-5, (worst, diff)
    for key in ("G/mapping.w_avg", "G_ema/mapping.w_avg"):  # reduced over ranks, and it moved
        assert torch.allclose(a.tensors[key], b.tensors[key], atol=1e-5, rtol=0) and a.tensors[key].abs().sum() > 0
    # the training moved the weights (G and its EMA differ): not two untouched initialisations
    assert not torch.equal(a.tensors["G/mapping.fc0.weight"], a.tensors["G_ema/mapping.fc0.weight"])
    print(json.dumps({"max_abs_diff": diff, "worst": worst}))
    # log lines: one per tick from rank 0 only, and the resume continued the log
    steps = [json.loads(x)["step"] for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), steps

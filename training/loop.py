"""The training loop: one step = a D update (logistic loss, lazy R1) and a G update
(non-saturating loss) on the same generated batch, then the G EMA and the ADA
controller.

Determinism (CPU): every random draw of step s (latents, augmentation, x-flip)
comes from a generator seeded by (seed, s), and the data order from
(seed, epoch), so the state at step s is a function of the checkpointed state
only: an interrupted and resumed run equals an uninterrupted one, bit for bit.

Resume = re-run the same command: the latest ``ckpt-*.safetensors`` in the
run directory is loaded.  A run stopped by SIGINT, SIGTERM or ``--minutes``
writes one at the step boundary where it stops, so nothing is lost.  ``--resume PATH`` starts a new run from other
weights (a training checkpoint, one of our generator files, an official CREPS
pickle).

Distributed (``torchrun --nproc_per_node N``; NCCL on GPUs, gloo on CPUs):
rank r of W takes images r, r+W, r+2W, ... of the global batch.  Every random
draw is made for the whole global batch from the same (seed, step) generator on
every rank and each rank keeps its images' share, gradients are averaged
with one all-reduce, and the two pieces of state a rank would otherwise
compute from its own images alone are reduced too: the ADA sign statistic and
the mapping's ``w_avg`` (the mean of the global batch's w).  So W processes
train the same run as one process with the same global batch, to float
rounding (the test holds them within 1e-5), as long as ``mbstd_group``
divides the per-rank batch (minibatch-std groups are images r, r+W, ...;
the official code also groups per GPU).  Rank 0 writes the run directory;
every rank reads the checkpoint it resumes from.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from creps import Generator, GeneratorConfig

from .augment import AdaController, augment
from .config import TrainConfig
from .dataset import ImageDataset, open_dataset
from .errors import TrainError
from .losses import d_loss, g_loss, r1_loss
from .networks import Discriminator
from .state import (
    ckpt_name,
    is_training_checkpoint,
    latest_checkpoint,
    load_modules,
    read_checkpoint,
    save_checkpoint,
)

GRID_SEED = 123456789
KEEP_CHECKPOINTS = 3


# ----------------------------------------------------------------- helpers
def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def ema_update(G_ema: nn.Module, G: nn.Module, beta: float) -> None:
    """p_ema <- p + beta * (p_ema - p) (= lerp(p, p_ema, beta)); buffers copied."""
    with torch.no_grad():
        for pe, p in zip(G_ema.parameters(), G.parameters(), strict=False):
            pe.copy_(p.lerp(pe, beta))
        for be, b in zip(G_ema.buffers(), G.buffers(), strict=False):
            be.copy_(b)


def ema_beta(batch: int, nimg: int, ema_nimg: float, rampup: float) -> float:
    if rampup > 0:
        ema_nimg = min(ema_nimg, nimg * rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


def save_grid(images: torch.Tensor, path: Path) -> None:
    """uint8-converted grid PNG of float images [N, 3, R, R] in [-1, 1]."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    arr = (images.detach().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = arr[i]
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def init_from(path: str, G: Generator, G_ema: Generator, D: Discriminator, log: Callable[[str], None]) -> None:
    """Fine-tuning start: copy weights from a checkpoint whose shapes match ours."""
    if is_training_checkpoint(path):
        snap = read_checkpoint(path)
        src_g, src_d = snap.module_state("G_ema"), snap.module_state("D")
    else:
        # A generator file creps cannot read raises creps.errors.CheckpointError, whose
        # message already names the file; it reaches the CLI boundary unchanged.
        from creps.checkpoint import load

        src_g = load(path).state_dict()
        src_d = {}
    ours = G.state_dict()
    skip = {"synthesis.b4.input.coords"}  # resolution-dependent, never used in the forward
    missing = [k for k in ours if k not in skip and k not in src_g]
    wrong = [k for k in ours if k not in skip and k in src_g and src_g[k].shape != ours[k].shape]
    if missing or wrong:
        blocks = sorted(
            {k.split(".")[1] for k in src_g if k.startswith("synthesis.b") and k.split(".")[1][1:].isdigit()},
            key=lambda b: int(b[1:]),
        )
        want = sorted(
            {k.split(".")[1] for k in ours if k.startswith("synthesis.b") and k.split(".")[1][1:].isdigit()},
            key=lambda b: int(b[1:]),
        )
        raise TrainError(
            f"--resume {path}: generator shapes differ from preset/resolution "
            f"(checkpoint blocks {','.join(blocks) or '?'}, ours {','.join(want)}; "
            f"{len(missing)} missing, {len(wrong)} mismatched, e.g. {(missing + wrong)[0]}); "
            "use the checkpoint's preset, variant and resolution, or give --resolution explicitly "
            "to transfer the checkpoint to that resolution (its coordinate vectors get longer)"
        )
    for k in skip:
        src_g[k] = ours[k]
    G.load_state_dict({k: src_g[k] for k in ours}, strict=True)
    G_ema.load_state_dict(G.state_dict())
    d_ours = D.state_dict()
    if src_d and all(k in src_d and src_d[k].shape == v.shape for k, v in d_ours.items()):
        D.load_state_dict({k: src_d[k] for k in d_ours})
        log(f"initialised G, G_ema and D from {path}")
    else:
        log(f"initialised G and G_ema from {path} (D starts fresh)")


def resume_generator_config(path: str) -> GeneratorConfig:
    """The generator config of a ``--resume`` source: a training checkpoint's, or a generator file's."""
    if is_training_checkpoint(path):
        return GeneratorConfig.from_dict(read_checkpoint(path).meta["config"]["generator"])
    from creps.checkpoint import read_config

    return read_config(path)  # CheckpointError (a UserError) naming the file when it is not one


# ----------------------------------------------------------------- the run
FIRST_RATE_S = 30.0  # throughput is reported once over the first this many seconds


class Trainer:
    """Holds networks, optimisers and state of one run; ``run()`` trains to ``cfg.kimg``."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str,
        force: bool = False,
        device: str | None = None,
        log: Callable[[str], None] | None = None,
        dataset: ImageDataset | None = None,
    ) -> None:
        self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        self.log = log or (lambda s: print(s, file=sys.stderr) if self.rank == 0 else None)
        self.ds = dataset or open_dataset(cfg.data, cfg.resolution, cfg.seed)
        self.ds.seed = cfg.seed
        # An explicit --resolution with --resume may be a resolution transfer (TrainConfig.resolve).
        transfer_from = resume_generator_config(cfg.resume) if cfg.resume and cfg.resolution else None
        cfg = cfg.resolve(self.ds.resolution, transfer_from)
        if cfg.batch % self.world:
            raise TrainError(f"--batch {cfg.batch} is not divisible by {self.world} processes")
        self.batch_gpu = cfg.batch_gpu or cfg.batch // self.world
        if cfg.batch % (self.batch_gpu * self.world):
            raise TrainError(
                f"--batch {cfg.batch} is not a multiple of --batch-gpu {self.batch_gpu} x {self.world} processes"
            )
        self.run_dir = Path(run_dir)
        self.latest = latest_checkpoint(self.run_dir)
        self._check_run_dir(cfg, force)
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.world > 1:
            self._init_distributed()
        self.amp = cfg.amp and self.device.type == "cuda"
        torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed
        self.G = Generator(cfg.gen).to(self.device).train()
        self.D = Discriminator(cfg.resolution, cfg.d_channel_base, cfg.d_channel_max, cfg.mbstd_group).to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        ratio = cfg.r1_interval / (cfg.r1_interval + 1)  # lazy-regularisation correction (StyleGAN2)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=cfg.betas, eps=1e-8)
        self.opt_D = torch.optim.Adam(
            self.D.parameters(), lr=cfg.lr_d * ratio, betas=(cfg.betas[0] ** ratio, cfg.betas[1] ** ratio), eps=1e-8
        )
        self.ada = AdaController(cfg.ada_target, cfg.ada_kimg, cfg.ada_interval)
        self.step = 0
        self._signalled = False  # SIGINT / SIGTERM seen: stop at the next step boundary
        if self.latest is not None:
            snap = read_checkpoint(self.latest)
            load_modules(snap, self.modules, self.opts)
            self.step = int(snap.meta["step"])
            self.ada.load(snap.meta["ada"])
            self.log(f"resuming {self.run_dir} from {self.latest.name} (step {self.step}, {self.kimg:.1f} kimg)")
        elif cfg.resume:
            init_from(cfg.resume, self.G, self.G_ema, self.D, self.log)

    # --------------------------------------------------------------- setup
    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"G": self.G, "G_ema": self.G_ema, "D": self.D}

    @property
    def opts(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt_G": self.opt_G, "opt_D": self.opt_D}

    @property
    def kimg(self) -> float:
        return self.step * self.cfg.batch / 1000

    def _check_run_dir(self, cfg: TrainConfig, force: bool) -> None:
        cfg_path = self.run_dir / "config.json"
        if cfg_path.is_file():
            try:
                old = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
            except (ValueError, TypeError, TrainError) as e:
                raise TrainError(f"{cfg_path} is unreadable ({e}); use a new --out or --force") from None
            diff = old.differences(cfg)
            if diff and not force:
                raise TrainError(
                    f"{self.run_dir} was started with a different config ({', '.join(diff)} changed); "
                    "use a new --out, or --force to continue with the new settings"
                )
        elif self.latest is not None and not force:
            raise TrainError(f"{self.run_dir} has checkpoints but no config.json; use --force to resume it")

    def _init_distributed(self) -> None:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)

    def _finish_distributed(self) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # no rank leaves while another may still need the group
            dist.destroy_process_group()

    def _sync(self, module: nn.Module) -> None:
        """Gradients of the global batch: this process's shares' sum, divided by the number of
        shares, summed over ranks (one flat all-reduce).  With two shares, halving is exact, so
        ``(g0 + g1) / 2`` here equals ``g0 / 2 + g1 / 2`` of two ranks bit for bit."""
        if self.shares == 1:
            return
        grads = [(p, p.grad) for p in module.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for _, g in grads]) / self.shares
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(flat)
        for (p, g), avg in zip(grads, flat.split([p.numel() for p, _ in grads]), strict=False):
            g.copy_(avg.view_as(p))

    @property
    def shares(self) -> int:
        """Parts of the global batch per step, over all ranks: ``batch / batch_gpu``."""
        return self.cfg.batch // self.batch_gpu

    # ---------------------------------------------------------------- step
    def train_step(self) -> dict:
        """One step on the global batch, done as ``shares`` parts of ``batch_gpu`` images.

        Part s of S is images s, s+S, s+2S, ... of the step's batch; this rank
        does parts rank, rank+world, ...  Each part draws its randomness from
        its own copy of the (seed, step) generator, for the whole global batch,
        and keeps its images' values, so a part computes the same whichever
        process runs it, and a run's result depends on ``batch`` and
        ``batch_gpu`` only, not on how many processes share the parts.
        """
        cfg, dev, n = self.cfg, self.device, self.shares
        mine = range(self.rank, n, self.world)
        order = self.ds.order(self.step * cfg.batch, cfg.batch)
        parts = []
        for s in mine:
            gen = step_generator(cfg.seed, self.step)
            take = slice(s, None, n)
            real = self.ds.batch(order[take]).to(dev, torch.float32) / 127.5 - 1
            if cfg.mirror:
                flip = (torch.rand(cfg.batch, generator=gen)[take] < 0.5).to(dev).reshape(-1, 1, 1, 1)
                real = torch.where(flip, real.flip(3), real)
            z = torch.randn(cfg.batch, cfg.gen.z_dim, generator=gen)[take].to(dev)
            parts.append((s, gen, real, z))
        p = self.ada.p if cfg.aug == "ada" else 0.0
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)
        keep_graph = len(parts) == 1  # one part: keep G's graph for the G update; several: recompute it there

        if n == 1:
            fakes = [self.G(parts[0][3], update_w_avg=True)]
        else:
            with torch.set_grad_enabled(keep_graph):
                fakes = [self.G(z) for _, _, _, z in parts]
            self._update_w_avg([z for _, _, _, z in parts])

        # D: logistic loss on real vs fake; lazy R1 on the (augmented) reals every r1_interval steps.
        self.D.requires_grad_(True)
        do_r1 = cfg.r1_interval > 0 and cfg.r1_gamma > 0 and self.step % cfg.r1_interval == 0
        self.opt_D.zero_grad(set_to_none=True)
        loss_d_sum, r1_sum, signs = 0.0, 0.0, []
        for (s, gen, real, _), fake in zip(parts, fakes, strict=True):
            real_aug = augment(real, p, gen, (s, n)).detach().requires_grad_(do_r1)
            with autocast:
                real_logits = self.D(real_aug)
                fake_logits = self.D(augment(fake.detach(), p, gen, (s, n)))
            loss_d = d_loss(real_logits, fake_logits)
            total_d = loss_d
            if do_r1:
                r1 = r1_loss(real_aug, real_logits, cfg.r1_gamma, cfg.r1_interval)
                total_d = total_d + r1
                r1_sum += r1.item()
            total_d.backward()
            loss_d_sum += loss_d.item()
            signs.append(real_logits.detach())
        self._sync(self.D)
        self.opt_D.step()
        self._accumulate_ada(signs)

        # G: non-saturating loss through the updated D.
        self.D.requires_grad_(False)
        self.opt_G.zero_grad(set_to_none=True)
        loss_g_sum = 0.0
        for (s, gen, _, z), fake in zip(parts, fakes, strict=True):
            if not keep_graph:
                fake = self.G(z)  # the same values as above, now with a graph
            with autocast:
                loss_g = g_loss(self.D(augment(fake, p, gen, (s, n))))
            loss_g.backward()
            loss_g_sum += loss_g.item()
        self._sync(self.G)
        self.opt_G.step()

        self.step += 1
        ema_update(self.G_ema, self.G, ema_beta(cfg.batch, self.step * cfg.batch, cfg.ema_nimg, cfg.ema_rampup))
        if cfg.aug == "ada":
            self.ada.step(self.step - 1, cfg.batch)
        k = len(parts)
        return {
            "loss_G": loss_g_sum / k,
            "loss_D": loss_d_sum / k,
            "r1": r1_sum / k if do_r1 else None,
            "real_sign": float(torch.cat(signs).sign().mean()),
        }

    def _accumulate_ada(self, real_logits: list[torch.Tensor]) -> None:
        """Add this step's sign statistic of D(real) over the global batch to the ADA controller.

        The step's sums are integers (so exact in any order); with several
        ranks they are all-reduced and every rank adds the same totals: the
        controller's state, and so p, is the single-process one on every rank.
        """
        if self.shares == 1:
            self.ada.accumulate(real_logits[0])
            return
        logits = torch.cat(real_logits)
        t = torch.tensor([float(logits.sign().sum()), float(logits.numel())], dtype=torch.float64, device=self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        self.ada.sign_sum += float(t[0])
        self.ada.count += int(t[1])

    def _update_w_avg(self, zs: list[torch.Tensor]) -> None:
        """The mapping's running w average from the mean w of the *global* batch.

        ``G(z, update_w_avg=True)`` would move it by one part's images only, so
        ranks would drift apart (and G_ema copies it); the sum of w over every
        part (all-reduced over ranks) is used instead, the same on every rank.
        """
        mapping = self.G.mapping
        with torch.no_grad():
            total = mapping(zs[0])[:, 0].sum(dim=0)  # the same w the forward pass computed
            for z in zs[1:]:
                total = total + mapping(z)[:, 0].sum(dim=0)
            if self.world > 1:
                import torch.distributed as dist

                dist.all_reduce(total)
            mapping.w_avg.copy_((total / self.cfg.batch).lerp(mapping.w_avg, self.cfg.gen.w_avg_beta))

    # ---------------------------------------------------------------- io
    def grid_latents(self, n: int = 0) -> torch.Tensor:
        n = n or (64 if self.cfg.resolution <= 64 else 16)
        return torch.randn(n, self.cfg.gen.z_dim, generator=torch.Generator().manual_seed(GRID_SEED))

    def snapshot(self) -> Path:
        """Checkpoint + grid + exported G_ema, all atomic; prune old checkpoints."""
        from creps.checkpoint import save

        path = save_checkpoint(
            self.run_dir / ckpt_name(self.step),
            self.modules,
            self.opts,
            {
                "step": self.step,
                "nimg": self.step * self.cfg.batch,
                "kimg": self.kimg,
                "ada": self.ada.state(),
                "config": self.cfg.to_dict(),
            },
        )
        with torch.no_grad():
            imgs = torch.cat([self.G_ema(z.to(self.device)) for z in self.grid_latents().split(16)])
        save_grid(imgs, self.run_dir / f"fakes{self.step:08d}.png")
        save(copy.deepcopy(self.G_ema).cpu(), self.run_dir / "G_ema.safetensors")
        old = sorted(p for p in self.run_dir.glob("ckpt-*.safetensors") if p != path)
        for p in old[: max(0, len(old) - (KEEP_CHECKPOINTS - 1))]:
            p.unlink(missing_ok=True)
        return path

    def run(self, progress: bool = True) -> dict:
        """Train to ``cfg.total_steps``; stop early, with a checkpoint, on --minutes or a signal.

        SIGINT (Ctrl-C) and SIGTERM stop at the next step boundary: the step
        in progress finishes, a checkpoint is written, then KeyboardInterrupt
        (exit 130 at the CLI: re-run the same command to resume, bit-exactly).
        A second signal stops at once, without a checkpoint.
        """
        with self._signals_stop_at_step_boundary():
            last, stop = self._loop(progress)
        self._finish_distributed()
        if stop == "signal":
            raise KeyboardInterrupt
        return last

    def _loop(self, progress: bool) -> tuple[dict, str]:
        """The steps; (the last tick record, why it stopped early: "", "minutes" or "signal")."""
        cfg, master = self.cfg, self.rank == 0
        if master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.run_dir / "config.json", cfg.to_json() + "\n")
            if not (self.run_dir / "reals.png").exists():
                idx = self.ds.order(0, min(64, len(self.ds)))
                save_grid(self.ds.batch(idx).float() / 127.5 - 1, self.run_dir / "reals.png")
        total = cfg.total_steps
        snap_steps = max(1, round(cfg.snap * 1000 / cfg.batch))
        tick_steps = max(1, round(cfg.tick_kimg * 1000 / cfg.batch))
        from tqdm import tqdm

        bar = tqdm(
            total=total,
            initial=self.step,
            unit="step",
            disable=not (progress and master),
            mininterval=5,
            dynamic_ncols=True,
        )
        acc: list[dict] = []
        t_tick, last, stop = time.time(), {}, ""
        t_start, kimg_start, first_rate_logged = time.monotonic(), self.kimg, False
        while self.step < total and not stop:
            stats = self.train_step()
            acc.append(stats)
            bar.update(1)
            elapsed = time.monotonic() - t_start
            if not first_rate_logged and elapsed >= FIRST_RATE_S:
                first_rate_logged = True
                rate = (self.kimg - kimg_start) / elapsed
                self.log(f"throughput: {rate:.3f} kimg/s over the first {elapsed:.0f} s")
                self._log_record({"step": self.step, "first_kimg_per_s": rate, "seconds": elapsed})
            stop = self._stop_reason(elapsed)
            if acc and (self.step % tick_steps == 0 or self.step == total or stop):
                now = time.time()
                last = self._tick(acc, now - t_tick)
                t_tick, acc = now, []
                bar.set_postfix_str(
                    f"kimg {self.kimg:.1f} s/kimg {last['sec_per_kimg']:.0f} "
                    f"G {last['loss_G']:.3f} D {last['loss_D']:.3f} p {self.ada.p:.3f}"
                )
            if master and (self.step % snap_steps == 0 or self.step == total or stop):
                self.snapshot()
                if cfg.metrics and not stop:
                    self._metrics()
            if stop == "minutes":
                self.log(f"time budget of {cfg.minutes:g} min reached at {self.kimg:.2f} kimg; stopped cleanly")
            elif stop:
                self.log(f"stopped at step {self.step} ({self.kimg:.2f} kimg); checkpoint written")
        bar.close()
        return last, stop

    def _stop_reason(self, elapsed: float) -> str:
        """Why to stop after this step: "signal", "minutes" or "" (every rank gets the same answer).

        With several processes the flags are all-reduced (max): a signal seen
        by one rank, or a budget spent on one clock, stops them all at this step.
        """
        flags = [1.0 if self._signalled else 0.0, 1.0 if 0 < self.cfg.minutes * 60 <= elapsed else 0.0]
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor(flags, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = t.tolist()
        return "signal" if flags[0] else "minutes" if flags[1] else ""

    @contextlib.contextmanager
    def _signals_stop_at_step_boundary(self) -> Iterator[None]:
        """SIGINT / SIGTERM set a flag the loop reads between steps; a second one interrupts at once."""
        self._signalled = False
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers belong to the main thread; elsewhere the defaults stay
            return

        def handler(signum: int, frame: object) -> None:
            if self._signalled:
                raise KeyboardInterrupt
            self._signalled = True
            self.log(
                f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                "(again to stop at once, without one)"
            )

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _log_record(self, rec: dict) -> None:
        if self.rank == 0:
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _tick(self, acc: list[dict], seconds: float) -> dict:
        r1 = [a["r1"] for a in acc if a["r1"] is not None]
        rec = {
            "step": self.step,
            "kimg": round(self.kimg, 3),
            "time": time.time(),
            "sec_per_kimg": seconds / max(len(acc) * self.cfg.batch / 1000, 1e-9),
            "loss_G": float(np.mean([a["loss_G"] for a in acc])),
            "loss_D": float(np.mean([a["loss_D"] for a in acc])),
            "r1": float(np.mean(r1)) if r1 else None,
            "real_sign": float(np.mean([a["real_sign"] for a in acc])),
            "augment_p": self.ada.p,
        }
        self._log_record(rec)
        return rec

    def _metrics(self) -> None:
        from .metrics import compute_metrics

        res = compute_metrics(self.G_ema, self.ds, self.cfg.metrics, self.cfg.metrics_num, device=self.device)
        res.update(step=self.step, kimg=self.kimg)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")
        self.log(f"metrics at {self.kimg:.1f} kimg: {res}")

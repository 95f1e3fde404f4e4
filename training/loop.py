"""The training loop: steps, epochs, evaluation, checkpoints, divergence and interruption.

`Trainer` owns the live state of a run (model, optimizer, EMA, loss scaler, counters) and can
write all of it to a checkpoint and read it back, which is what makes a resumed run's losses
equal, step for step, to an uninterrupted one: the learning rate is a function of the step,
the data order a function of (seed, epoch), each sample's augmentation a function of
(seed, epoch, index), and the remaining randomness (stochastic depth) comes from RNG states
stored per rank.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..checkpoint import write_model_file
from ..errors import CheckpointError
from . import checkpoint
from .checkpoint import FORMAT, FORMAT_VERSION
from .data import EvalView, TrainView
from .distributed import Dist
from .ema import ModelEma
from .errors import ConfigError, DataError, DivergenceError
from .evaluate import EvalResult, autocast, evaluate
from .loss import OverlockLoss
from .optim import build_optimizer, load_optimizer_state
from .plot import plot_curves
from .progress import Reporter
from .rundir import MetricsLog, RunDir
from .sampler import ResumableSampler, ShardSampler
from .schedule import WarmupCosine
from .setup import Plan


def seed_everything(seed: int) -> None:
    """Seed every generator the training process draws from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Trade speed for bitwise repeatability on GPUs (CPU kernels are deterministic already).

    The switches are process-wide, so they are restored on exit: a caller of the Python API
    (a notebook, a test) keeps its own settings after the run.
    """
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn


@dataclass
class Running:
    """Sums over the batches since a reset, reduced over ranks (for epoch and log averages)."""

    loss: float = 0.0
    main: float = 0.0
    aux: float = 0.0
    correct: float = 0.0
    images: float = 0.0
    seconds: float = 0.0

    def add(self, loss: float, main: float, aux: float, correct: float, images: float, seconds: float) -> None:
        self.loss += loss
        self.main += main
        self.aux += aux
        self.correct += correct
        self.images += images
        self.seconds += seconds

    def as_list(self) -> list[float]:
        return [self.loss, self.main, self.aux, self.correct, self.images, self.seconds]

    def mean(self, total: float) -> float:
        return total / max(self.images, 1.0)


@dataclass
class Outcome:
    """How a call to `Trainer.run` ended."""

    finished: bool
    steps_this_run: int
    seconds: float
    images: float
    last_eval: EvalResult | None = None
    last_ema_eval: EvalResult | None = None
    notes: list[str] = field(default_factory=list)


@contextmanager
def stop_on_sigint(flag: list[bool]) -> Iterator[None]:
    """First Ctrl-C asks the loop to stop at the next step boundary (and save); a second one aborts."""

    def handler(signum: int, frame: Any) -> None:
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ignore_sigint(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which stops at a step boundary and saves.

    A terminal sends SIGINT to the whole process group; a worker killed by it would make the
    main process fail on its next batch instead of saving.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _clean_worker_error(error: DataError) -> DataError:
    """A DataError raised in a loader worker arrives wrapped in worker traceback text; keep the message."""
    text = str(error)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].removeprefix("overlock.training.errors.DataError: ")
    return DataError(text)


class Trainer:
    """One training run on one process (DDP-wrapped when several processes take part)."""

    def __init__(self, plan: Plan, model: nn.Module, dist: Dist, run: RunDir | None, reporter: Reporter) -> None:
        config = self.config = plan.config
        self.plan, self.dist, self.run, self.reporter = plan, dist, run, reporter
        if config.sync_bn and dist.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(dist.device)
        self.optimizer = build_optimizer(self.model, config.lr, config.weight_decay)
        self.ema = ModelEma(self.model, config.ema) if config.ema else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp and dist.device.type == "cuda")
        module: nn.Module = self.model
        if dist.distributed:
            module = DistributedDataParallel(
                self.model, device_ids=[dist.device] if dist.device.type == "cuda" else None
            )
        self.train_forward = torch.compile(module) if config.compile else module
        self.eval_forward = torch.compile(self.model) if config.compile else self.model
        self.loss = OverlockLoss(config.aux_weight, config.label_smoothing)
        self.schedule = WarmupCosine(config.lr, plan.total_steps, plan.warmup_steps, config.min_lr)
        self.metrics = MetricsLog(run.metrics) if run is not None and dist.is_main else None

        data = plan.data
        self.sampler = ResumableSampler(len(data.train), config.batch_size, config.seed, dist.rank, dist.world_size)
        loader_args: dict[str, Any] = {"num_workers": plan.workers, "pin_memory": dist.device.type == "cuda"}
        if plan.workers > 0:
            loader_args.update(persistent_workers=True, worker_init_fn=_ignore_sigint)
        self.train_loader = DataLoader(
            TrainView(data.train, data.train_transform, data.eval_transform, config.seed),
            batch_size=config.batch_size,
            sampler=self.sampler,
            drop_last=True,
            # A private generator: creating a loader iterator must not consume the global torch
            # RNG, or a resumed run (which creates one mid-epoch) would draw different drop paths.
            generator=torch.Generator().manual_seed(config.seed),
            **loader_args,
        )
        self.val_loader = DataLoader(
            EvalView(data.val, data.eval_transform),
            batch_size=config.batch_size,
            sampler=ShardSampler(len(data.val), dist.rank, dist.world_size),
            **loader_args,
        )

        self.step = 0  # optimizer steps completed
        self.epoch = 0  # index of the epoch in progress
        self.batch_in_epoch = 0  # batches of that epoch already trained on
        self.epoch_sums = Running()
        self.best_top1 = -1.0
        self.best_epoch = 0
        self.saved_step: int | None = None
        self.window = Running()  # sums since the last step record

    # -----------------------------------------------------------------------------------------
    # torch.compile

    def compile_now(self) -> None:
        """Compile the training and evaluation graphs before the run starts (with --compile).

        torch.compile works lazily, at the first call; a compiler failure would otherwise surface
        in the middle of a run, after the run directory was written. One forward/backward on a
        real batch (then undone: weights, BatchNorm statistics, gradients and random state are
        restored) moves that failure here, where it becomes a clear error.
        """
        if not self.config.compile:
            return
        from torch._dynamo.exc import TorchDynamoException

        saved = {name: value.clone() for name, value in self.model.state_dict().items()}
        rng = checkpoint.capture_rng()
        self.sampler.set_epoch(0)
        images, labels = next(iter(self.train_loader))
        images, labels = images.to(self.dist.device), labels.to(self.dist.device)
        try:
            with autocast(self.dist.device, self.config.amp):
                output = self.train_forward(images)
                parts = self.loss(output, labels)
            self.scaler.scale(parts.total).backward()
            self.model.eval()
            with torch.no_grad(), autocast(self.dist.device, self.config.amp):
                self.eval_forward(images)
        except TorchDynamoException as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ConfigError(
                f"--compile: torch.compile cannot compile this model at {tuple(images.shape[-2:])} px "
                f"({type(error).__name__}: {first_line[:300]}).\nTrain without --compile; at small image sizes, where "
                "Focus-Net maps are resized to the ContMix kernel, a larger --img-size may also help."
            ) from None
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.train()
            self.model.load_state_dict(saved)
            checkpoint.restore_rng(rng)

    # -----------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here, as weights_only-loadable values."""
        sums = self.epoch_sums
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": self.config.model_dump(mode="json"),
            "spec": self.plan.spec.to_yaml(),
            "classes": list(self.plan.data.classes),
            "img_size": self.plan.data.img_size,
            "channels": self.plan.data.channels,
            "world_size": self.dist.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "progress": {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "epoch_sums": sums.as_list(),
                "window_sums": self.window.as_list(),
                "best_top1": self.best_top1,
                "best_epoch": self.best_epoch,
            },
            "rng": self.dist.gather(checkpoint.capture_rng()),
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        """Restore a run; a file whose parts do not fit this run (hand-edited, another run's) is a CheckpointError.

        Every part is read before the run changes anything on disk, so a bad file leaves the run as it was.
        """
        try:
            progress = state["progress"]
            for key in ("step", "epoch", "batch_in_epoch", "best_epoch"):
                value = progress[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"progress.{key} is {value!r}, not a count")
            rng = state["rng"]
            if not isinstance(rng, list) or len(rng) <= self.dist.rank:
                raise ValueError(f"it holds random states for {len(rng) if isinstance(rng, list) else 0} processes")
            self._load_state_dict(state)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{source} cannot be resumed: its contents do not fit this run ({type(exc).__name__}: {detail[:300]}); "
                "it was changed by hand or written by another program"
            ) from None

    def _load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        progress = state["progress"]
        self.step, self.epoch, self.batch_in_epoch = progress["step"], progress["epoch"], progress["batch_in_epoch"]
        self.epoch_sums = Running(*progress["epoch_sums"])
        self.window = Running(*progress["window_sums"])
        self.best_top1, self.best_epoch = progress["best_top1"], progress["best_epoch"]
        self.saved_step = self.step
        checkpoint.restore_rng(state["rng"][self.dist.rank])

    def _weights_finite(self) -> bool:
        modules = [self.model] + ([self.ema.module] if self.ema is not None else [])
        local = all(
            bool(torch.isfinite(t).all()) for m in modules for t in m.state_dict().values() if t.is_floating_point()
        )
        return self.dist.all_agree(local)

    def save(self, best: bool = False) -> None:
        """Write last.pt (and best.pt); refuses non-finite weights so a good checkpoint is never replaced by NaNs."""
        if not self._weights_finite():
            raise DivergenceError(self._divergence_message("the weights became non-finite"))
        state = self.state_dict()  # collective (RNG gather): every rank takes part
        if self.run is not None and self.dist.is_main:
            # best.pt first: last.pt is what --resume trusts, so it must never name a best epoch that is
            # not on disk yet. A kill between the two leaves the old last.pt, and the resume redoes the save.
            # best.safetensors (best.pt's weights as a model file) follows best.pt; a resume rewrites it
            # from best.pt, so a kill between those two cannot leave them apart either.
            if best:
                checkpoint.save_atomic(state, self.run.best)
                write_model_file(checkpoint.model_file_of(state), self.run.best_model)
            checkpoint.save_atomic(state, self.run.last)
        self.saved_step = self.step

    def _divergence_message(self, what: str) -> str:
        where = f"at step {self.step + 1} (epoch {self.epoch + 1})"
        if self.run is not None and self.saved_step is not None:
            kept = f"The last good checkpoint is kept: {self.run.last} (step {self.saved_step})."
        else:
            kept = "No checkpoint had been written yet."
        return (
            f"training diverged: {what} {where}; stopped.\n{kept}\n"
            "Try a lower --lr, a longer --warmup, --clip-grad, or training without --amp."
        )

    # -----------------------------------------------------------------------------------------
    # steps and epochs

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, stop_requested: bool) -> bool:
        """One optimizer step; returns whether any rank asked to stop after it."""
        started = time.perf_counter()
        images = images.to(self.dist.device, non_blocking=True)
        labels = labels.to(self.dist.device, non_blocking=True)
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.dist.device, self.config.amp):
            output = self.train_forward(images)
            parts = self.loss(output, labels)
        n = labels.numel()
        total = parts.total.item()
        correct = (parts.logits.argmax(dim=1) == labels).sum().item()
        aux = parts.aux.item() if parts.aux is not None else 0.0
        finite = math.isfinite(total)
        # One reduction per step carries the metrics, the divergence check and stop requests, so
        # all ranks see the same numbers and take the same decisions (no rank left in a collective).
        loss_sum, main_sum, aux_sum, correct_sum, count, bad, stop = self.dist.all_sum(
            [
                total * n if finite else 0.0,
                parts.main.item() * n,
                aux * n,
                correct,
                n,
                0.0 if finite else 1.0,
                float(stop_requested),
            ]
        )
        if bad:
            what = f"the loss is {total}" if not finite else "the loss of another process is not finite"
            self.log({"kind": "diverged", "step": self.step + 1, "loss": str(total)})
            raise DivergenceError(self._divergence_message(what))
        self.scaler.scale(parts.total).backward()
        if self.config.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.batch_in_epoch += 1
        seconds = time.perf_counter() - started
        self.epoch_sums.add(loss_sum, main_sum, aux_sum, correct_sum, count, seconds)
        self.window.add(loss_sum, main_sum, aux_sum, correct_sum, count, seconds)
        if self.step % self.config.log_every == 0 or self.step == self.plan.total_steps:
            self._log_window(lr, has_aux=parts.aux is not None)
        self.reporter.step(self.step, loss_sum / count, correct_sum / count, lr, count / max(seconds, 1e-9))
        return bool(stop)

    def _log_window(self, lr: float, has_aux: bool) -> None:
        window = self.window
        record: dict[str, Any] = {
            "kind": "step",
            "step": self.step,
            "epoch": self.epoch + 1,
            "epoch_progress": self.step / self.plan.steps_per_epoch,
            "loss": window.mean(window.loss),
            "loss_main": window.mean(window.main),
        }
        if has_aux:
            record["loss_aux"] = window.mean(window.aux)
        record.update(
            {"acc": window.mean(window.correct), "lr": lr, "images_per_s": window.images / max(window.seconds, 1e-9)}
        )
        self.log(record)
        self.window = Running()

    def log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.append(record)

    def _end_epoch(self, final: bool) -> tuple[EvalResult | None, EvalResult | None]:
        """Evaluate (when due), log the epoch, update the plot and save last.pt/best.pt."""
        number = self.epoch + 1
        evaluated = final or number % self.config.eval_every == 0
        result = ema_result = None
        record: dict[str, Any] = {
            "kind": "epoch",
            "epoch": number,
            "step": self.step,
            "train_loss": self.epoch_sums.mean(self.epoch_sums.loss),
            "train_acc": self.epoch_sums.mean(self.epoch_sums.correct),
        }
        best = False
        self.dist.broadcast_buffers(self.model)
        if evaluated:
            result = self._evaluate(self.eval_forward, self.model)
            record.update(result.as_dict())
            if self.ema is not None:
                ema_result = self._evaluate(self.ema.module, self.ema.module)
                record.update(ema_result.as_dict("ema_val_"))
            if result.top1 > self.best_top1:
                self.best_top1, self.best_epoch, best = result.top1, number, True
        self.log(record)
        line = f"epoch {number}/{self.plan.epochs}  train loss {record['train_loss']:.4f}  acc {100 * record['train_acc']:.1f}%"
        if result is not None:
            line += f"  |  val loss {result.loss:.4f}  top-1 {100 * result.top1:.2f}%  top-5 {100 * result.top5:.2f}%"
        if ema_result is not None:
            line += f"  |  EMA top-1 {100 * ema_result.top1:.2f}%"
        self.reporter.line(line)
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_sums = Running()
        self.save(best=best)
        self._plot()
        return result, ema_result

    def _evaluate(self, forward: Any, module: nn.Module) -> EvalResult:
        module.eval()
        try:
            return evaluate(forward, self.val_loader, self.dist, amp=self.config.amp)
        finally:
            self.model.train()

    def _plot(self) -> None:
        if self.metrics is not None and self.run is not None:
            plot_curves(self.metrics.read(), self.run.plot)

    def run_loop(self) -> Outcome:
        """Train until the planned number of steps, --stop-after, or a Ctrl-C (then save and return)."""
        total = self.plan.total_steps
        self.reporter.start(total, self.step, f"train {self.plan.spec.name or 'model'}")
        started, first_step = time.perf_counter(), self.step
        stop_flag = [False]
        outcome = Outcome(finished=False, steps_this_run=0, seconds=0.0, images=0.0)
        self.model.train()
        try:
            with stop_on_sigint(stop_flag):
                while self.step < total:
                    self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                    stop = False
                    try:
                        for images, labels in self.train_loader:
                            stop_here = stop_flag[0] or (
                                self.config.stop_after is not None
                                and self.step - first_step + 1 >= self.config.stop_after
                            )
                            stop = self._train_step(images, labels, stop_here)
                            outcome.images += len(labels) * self.dist.world_size
                            if stop or self.step >= total:
                                break
                    except DataError as error:
                        raise _clean_worker_error(error) from None
                    epoch_done = self.batch_in_epoch >= self.plan.steps_per_epoch or self.step >= total
                    if epoch_done:
                        outcome.last_eval, outcome.last_ema_eval = self._end_epoch(final=self.step >= total)
                    if stop and self.step < total:
                        if not epoch_done:
                            self.dist.broadcast_buffers(self.model)
                            self.save()
                            self._plot()
                        reason = (
                            "interrupted (Ctrl-C)"
                            if stop_flag[0]
                            else f"stopped after {self.step - first_step} steps (--stop-after)"
                        )
                        self.log({"kind": "stopped", "step": self.step, "reason": reason})
                        outcome.notes.append(f"{reason} at step {self.step}/{total}; continue with --resume")
                        break
                else:
                    outcome.finished = True
        finally:
            self.reporter.stop()
            outcome.seconds = time.perf_counter() - started
            outcome.steps_this_run = self.step - first_step
        return outcome

"""The Python API behind `overlock train` and `overlock eval`: validate, build, run, summarise.

Both functions take the options a user gave (a dict of field -> value, see `config.py`) so the
CLI stays a thin typer layer and tests can call the same code with plain dicts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console
from torch import nn

from .. import archspec
from ..builder.estimate import check_fits
from ..checkpoint import MODEL_FORMAT, write_model_file
from ..errors import CheckpointError, OverlockError, plain
from . import checkpoint, distributed
from .config import EvalConfig, TrainConfig, validated
from .data import EvalView, default_workers, load_data
from .distributed import Dist
from .errors import ConfigError, DataError
from .evaluate import EvalResult, evaluate
from .loop import Outcome, Trainer, deterministic_algorithms, seed_everything
from .progress import Reporter, summary_table
from .rundir import MetricsLog, RunDir
from .sampler import ShardSampler
from .setup import Plan, fit_spec_to_data, plan_training, resume_config


@dataclass
class TrainResult:
    """What a finished (or stopped) `train` call leaves for its caller."""

    run_dir: Path | None
    outcome: Outcome
    model: nn.Module
    best_top1: float
    best_epoch: int
    step: int
    total_steps: int


def convert_official(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from ..builder import convert_official as convert

    return convert(model, weights)


def build_model(spec: archspec.Spec, contmix_backend: str = "auto", deploy: bool = False) -> nn.Module:
    """The builder's module for a spec (re-parameterised with `deploy`), with the requested ContMix implementation."""
    from .. import kernels
    from ..builder import build

    if contmix_backend != "auto" and contmix_backend not in kernels.BACKENDS:
        raise ConfigError(
            f"--contmix-backend {contmix_backend!r} is not known; valid: auto, {', '.join(kernels.BACKENDS)}"
        )
    model = build(spec, deploy=deploy)
    if contmix_backend != "auto":
        model.set_contmix_backend(contmix_backend)
    return model


def default_out(spec: archspec.Spec, source: str) -> Path:
    name = spec.name or Path(source).stem
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(
    options: dict[str, Any],
    *,
    out: Path | None = None,
    resume: Path | None = None,
    overwrite: bool = False,
    console: Console | None = None,
) -> TrainResult:
    """Run `overlock train` with the given options (None values mean "not given").

    Validation (options, spec, data, output directory) happens on every process before any file
    is written; if any process fails it, all stop with an error.
    """
    console = console or Console()
    given = {key: value for key, value in options.items() if value is not None}
    state = None
    if resume is not None:
        if out is not None or overwrite:
            raise ConfigError("--resume continues a run in its own directory; drop --out and --overwrite")
        run = RunDir(resume)
        run.check_resumable()
        state = checkpoint.load_file(run.last)
        config, stored_spec = resume_config(state, given, str(run.last))
    else:
        if "spec" not in given:
            raise ConfigError(
                "missing SPEC: give a preset name (pico, xt, t, s, b) or a spec YAML file, or --resume RUN_DIR"
            )
        config, stored_spec = validated(TrainConfig, given), None
    dist = distributed.setup(config.device)
    try:
        with deterministic_algorithms(config.deterministic):
            return _train(config, stored_spec, state, dist, out, resume, overwrite, console)
    finally:
        dist.close()


def _train(
    config: TrainConfig,
    spec: archspec.Spec | None,
    state: dict | None,
    dist: Dist,
    out: Path | None,
    resume: Path | None,
    overwrite: bool,
    console: Console,
) -> TrainResult:
    """Check everything, agree across ranks, then (and only then) create the run and train."""

    def prepare() -> tuple[Plan, RunDir, nn.Module]:
        plan = plan_training(config, dist, spec)
        if state is not None and state["world_size"] != dist.world_size:
            raise ConfigError(
                f"the run was trained with {state['world_size']} process(es) and is resumed with {dist.world_size}; "
                "resume with the same number (the data order and global batch depend on it)"
            )
        run = RunDir(resume) if resume is not None else RunDir(out or default_out(plan.spec, config.spec))
        if resume is None and dist.is_main:
            run.check_new(overwrite)
        torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        model = build_model(plan.spec, config.contmix_backend)
        model.set_grad_checkpointing(config.grad_checkpoint)
        return plan, run, model

    plan, run, model = _on_every_rank(dist, prepare)
    reporter = Reporter(console, enabled=dist.is_main)

    def make_trainer() -> Trainer:
        trainer = Trainer(plan, model, dist, run, reporter)  # wraps DDP: a collective, hence after the first check
        trainer.compile_now()
        return trainer

    trainer = _on_every_rank(dist, make_trainer)

    def result(outcome: Outcome) -> TrainResult:
        root = run.root if dist.is_main else None
        return TrainResult(
            root, outcome, trainer.model, trainer.best_top1, trainer.best_epoch, trainer.step, plan.total_steps
        )

    if state is not None:
        trainer.load_state_dict(state, str(run.last))
        if dist.is_main:
            run.remove_stale_temporaries()
            rebuilt = _reconcile_best(run, state, trainer, plan)
            # The model file follows best.pt: after a repair, when it is missing (a run of an older
            # overlock) or when the run goes on; a finished, consistent run is left exactly as it is.
            if rebuilt or not run.best_model.exists() or trainer.step < plan.total_steps:
                _sync_best_model(run, reporter)
        if trainer.step >= plan.total_steps:  # nothing left: leave the finished run exactly as it is
            reporter.line(
                f"{plain(str(run.root))} is already finished ({trainer.step}/{plan.total_steps} steps): nothing to resume"
            )
            return result(Outcome(finished=True, steps_this_run=0, seconds=0.0, images=0.0))
        if dist.is_main:
            MetricsLog(run.metrics).truncate_after(trainer.step)
            reporter.line(
                f"resuming {plain(str(run.root))} at step {trainer.step}/{plan.total_steps} (epoch {trainer.epoch + 1})"
            )
    else:
        if dist.is_main:
            run.create(overwrite)
            run.write_header(plan.spec.to_yaml(), config.model_dump(mode="json"))
        seed_everything(config.seed + dist.rank)
    if dist.is_main:
        _announce(plan, trainer, dist, run, reporter)
        trainer.log(
            {
                "kind": "start",
                "step": trainer.step,
                "world_size": dist.world_size,
                "global_batch": config.batch_size * dist.world_size,
            }
        )
    try:
        outcome = trainer.run_loop()
    except DataError as exc:
        # Bad data found mid-run (a truncated image) before the first checkpoint: a run directory with
        # no last.pt cannot be resumed, so a new run leaves nothing behind rather than half a run.
        if state is None and dist.is_main and not run.last.exists():
            run.discard()
            raise type(exc)(
                f"{exc}\n(the new run directory {run.root} was removed: no checkpoint had been written)"
            ) from None
        raise
    if dist.is_main:
        console.print(_summary(plan, trainer, outcome, run, dist))
    return result(outcome)


def _sync_best_model(run: RunDir, reporter: Reporter) -> None:
    """Rewrite best.safetensors from best.pt when a run resumes.

    A run writes the two one after the other; a kill between them would leave them apart (or a run
    of an older overlock has no best.safetensors). From here on they hold the same weights again.
    """
    if not run.best.is_file():
        return
    try:
        write_model_file(checkpoint.model_file_of(checkpoint.load_file(run.best)), run.best_model)
    except (CheckpointError, KeyError, TypeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reporter.line(f"{plain(str(run.best))} is unreadable ({plain(detail)}); {run.best_model.name} left as it is")


def _reconcile_best(run: RunDir, state: dict[str, Any], trainer: Trainer, plan: Plan) -> bool:
    """Make best.pt agree with the best epoch last.pt records, or say why it cannot (before resuming);
    True when best.pt was rewritten.

    A kill during best.pt's save (or a best.pt left by an older overlock, which wrote last.pt first)
    leaves last.pt naming a best epoch whose weights best.pt does not hold. When last.pt was written
    at the end of that very epoch it holds the same state best.pt was given, and best.pt is rebuilt
    from it (atomically). Otherwise those weights are gone: the run's best falls back to what best.pt
    really holds (nothing, if it is missing or unreadable), so a later epoch that beats it replaces it.
    """
    problem, best = checkpoint.best_problem(state, run.best)
    if problem is None:
        return False
    progress = state["progress"]
    epoch, top1 = progress["best_epoch"], progress["best_top1"]
    record = checkpoint.describe_best(epoch, top1) if epoch else "no evaluated epoch yet"
    lines = [f"{run.best} {problem}, but last.pt records the run's best as {record}."]
    if epoch and progress["epoch"] == epoch and progress["batch_in_epoch"] == 0:
        checkpoint.save_atomic(state, run.best)
        _warn(f"{lines[0]}\nRebuilt {run.best} from last.pt, which was saved at the end of epoch {epoch}.")
        return True
    if epoch:
        lines.append(
            f"The weights of epoch {epoch} are no longer on disk (last.pt was saved later, at step {progress['step']}), "
            "so best.pt cannot be rebuilt."
        )
    finished = trainer.step >= plan.total_steps
    if best is not None:
        trainer.best_top1, trainer.best_epoch = best["progress"]["best_top1"], best["progress"]["best_epoch"]
        held = checkpoint.describe_best(trainer.best_epoch, trainer.best_top1)
        lines.append(
            f"best.pt is kept as the run's best, {held}"
            + ("; the run is finished." if finished else ": a later epoch that beats it replaces it.")
        )
    else:
        trainer.best_top1, trainer.best_epoch = -1.0, 0
        lines.append(
            "The run is finished and has no usable best.pt; last.pt holds its final weights."
            if finished
            else "The resumed run writes a new best.pt at its next evaluated epoch."
        )
    _warn("\n".join(lines))
    return False


def _warn(message: str) -> None:
    """A one-screen warning on stderr (the run goes on): user paths are shown, never read as markup."""
    from rich.markup import escape

    from ..errors import one_screen

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold yellow]warning:[/] {escape(one_screen(message))}"
    )


T = TypeVar("T")


def _on_every_rank(dist: Dist, check: Callable[[], T]) -> T:
    """Run a checking step on every process; if it fails on any, all stop with an error.

    Without the agreement, the processes that passed would wait forever in the next collective
    for the one that stopped.
    """
    error: OverlockError | None = None
    result = None
    try:
        result = check()
    except OverlockError as caught:
        error = caught
    if not dist.all_agree(error is None):
        raise error or OverlockError("another training process failed its checks; see the first process's message")
    return result  # type: ignore[return-value]


def _announce(plan: Plan, trainer: Trainer, dist: Dist, run: RunDir, reporter: Reporter) -> None:
    config, data = plan.config, plan.data
    where = f"{dist.world_size} processes ({dist.device.type})" if dist.distributed else str(dist.device)
    reporter.line(
        f"[bold]{plain(plan.spec.name or config.spec)}[/] ({_params(trainer.model) / 1e6:.2f}M params) on {plain(data.name)}: "
        f"{len(data.train)} train / {len(data.val)} val images, {data.num_classes} classes, {data.img_size}px, "
        f"{plan.epochs} epochs x {plan.steps_per_epoch} steps, batch {config.batch_size * dist.world_size}, {where} -> {plain(str(run.root))}"
    )


def _peak_memory(dist: Dist) -> str:
    """Peak GPU memory of this process on CUDA, else its peak resident set size."""
    if dist.device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(dist.device) / 2**30:.2f} GiB (CUDA, allocated)"
    try:
        import resource  # POSIX only
    except ImportError:
        return "n/a"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def _summary(plan: Plan, trainer: Trainer, outcome: Outcome, run: RunDir, dist: Dist) -> Any:
    rows = [
        ("run", str(run.root)),
        ("status", "finished" if outcome.finished else "; ".join(outcome.notes) or "stopped"),
        ("steps", f"{trainer.step}/{plan.total_steps} ({outcome.steps_this_run} in this run)"),
        ("epochs", f"{trainer.epoch}/{plan.epochs}"),
        ("parameters", f"{_params(trainer.model):,}"),
    ]
    if outcome.last_eval is not None:
        ev = outcome.last_eval
        rows += [
            ("val top-1", f"{100 * ev.top1:.2f}%"),
            ("val top-5", f"{100 * ev.top5:.2f}%"),
            ("val loss", f"{ev.loss:.4f}"),
        ]
    if outcome.last_ema_eval is not None:
        rows.append(("EMA val top-1", f"{100 * outcome.last_ema_eval.top1:.2f}%"))
    if trainer.best_epoch:
        rows.append(
            (
                "best val top-1",
                f"{100 * trainer.best_top1:.2f}% (epoch {trainer.best_epoch}) -> {run.best} "
                f"(model file: {run.best_model.name})",
            )
        )
    rows += [
        ("time", f"{outcome.seconds:.1f} s"),
        ("throughput", f"{outcome.images / max(outcome.seconds, 1e-9):,.0f} images/s (incl. evaluation)"),
        ("processes", f"{dist.world_size} on {dist.device.type}"),
        ("peak memory", _peak_memory(dist)),
    ]
    return summary_table("overlock train", rows)


# ---------------------------------------------------------------------------------------------
# eval


def _load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str, hint: str) -> None:
    """Strict load with a readable list of what does not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        lines = [f"the weights in {source} do not fit this spec:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                more = f" ... and {len(items) - 5} more" if len(items) > 5 else ""
                lines.append(f"  {title} ({len(items)}): {', '.join(items[:5])}{more}")
        lines.append(hint)
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(weights)


def evaluate_weights(options: dict[str, Any], console: Console | None = None) -> EvalResult:
    """Run `overlock eval`: top-1, top-5 and loss of a checkpoint on a source's validation split."""
    console = console or Console()
    config: EvalConfig = validated(EvalConfig, {k: v for k, v in options.items() if v is not None})
    state = checkpoint.load_file(config.weights)
    run_ckpt = checkpoint.is_run_checkpoint(state)
    hint = "check that SPEC (and --set) are the ones the weights were trained with"
    if run_ckpt:
        checkpoint.check_run_checkpoint(state, config.weights)
        trained = (
            archspec.loads(state["spec"], f"the spec recorded in {config.weights}").name or state["config"]["spec"]
        )
        hint += f"; this run trained {trained!r} (its resolved spec is the run's spec.yaml)"
    weights = checkpoint.model_state(state, use_ema=config.ema)
    # A run checkpoint knows its data, image size and channels; a plain state dict does not.
    source = config.data or (state["config"]["data"] if run_ckpt else "digits")
    img_size = config.img_size or (state["img_size"] if run_ckpt else None)
    channels = config.channels or (state["channels"] if run_ckpt else 3)
    data = load_data(source, img_size, channels)
    spec = fit_spec_to_data(archspec.load(config.spec, list(config.overrides)), data, config.spec)
    check_fits(
        spec,
        f"evaluating {spec.name or config.spec} at batch size {config.batch_size}",
        image_size=(data.img_size, data.img_size),
        batch=config.batch_size,
        device=distributed.pick_device(config.device),
    )
    # `overlock build --save` / `convert --deploy` files say which form their weights are in.
    deploy = isinstance(state, dict) and state.get("format") == MODEL_FORMAT and bool(state.get("deploy"))
    model = build_model(spec, config.contmix_backend, deploy=deploy)
    if set(weights) != set(model.state_dict()) and not run_ckpt:
        try:  # a published checkpoint (reference layout)?
            weights = convert_official(model, weights)
        except CheckpointError:
            pass  # report the mismatch in our own layout below
    _load_weights(model, weights, config.weights, hint)
    dist = Dist(device=distributed.pick_device(config.device))
    model.to(dist.device).eval()
    workers = config.workers if config.workers is not None else default_workers(data)
    loader = torch.utils.data.DataLoader(
        EvalView(data.val, data.eval_transform),
        batch_size=config.batch_size,
        sampler=ShardSampler(len(data.val)),
        num_workers=workers,
    )
    started = time.perf_counter()
    result = evaluate(model, loader, dist, amp=config.amp)
    seconds = time.perf_counter() - started
    rows = [
        ("weights", config.weights + (" (EMA)" if config.ema else "")),
        ("data", f"{data.name} validation split, {result.images} images, {data.img_size}px"),
        ("top-1", f"{100 * result.top1:.2f}%"),
        ("top-5", f"{100 * result.top5:.2f}%"),
        ("loss", f"{result.loss:.4f}"),
        ("time", f"{seconds:.1f} s ({result.images / max(seconds, 1e-9):,.0f} images/s)"),
    ]
    console.print(summary_table("overlock eval", rows))
    return result

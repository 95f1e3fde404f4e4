"""The `overlock` command: validate, build, measure and convert specs (and train, see training/).

Commands only parse arguments and render results; the work lives in archspec/ and builder/.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from . import archspec
from .errors import OverlockError, exit_on_user_error, is_out_of_memory, plain
from .training.progress import HelpCommand, fit_table, make_console

app = typer.Typer(
    name="overlock",
    help="Design, build, measure and train OverLoCK-style ConvNets from declarative YAML specs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output is not squeezed into 80 columns (tables are read in logs and CI output too).
console = make_console()

SpecArg = Annotated[
    str, typer.Argument(help="A preset name (xt, t, s, b, pico) or a path to a YAML spec.", show_default=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a field: dotted KEY=VALUE, e.g. focus.stages.0.groups=8 (repeatable).",
        show_default=False,
    ),
]
DeployOpt = Annotated[bool, typer.Option("--deploy", help="Build the re-parameterised (inference) form.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def _build(spec: str, overrides: list[str] | None, deploy: bool):
    from .builder import build

    return build(spec, deploy=deploy, overrides=overrides)


def _refuse_overwriting_an_input(output: Path, flag: str, **inputs: str | Path) -> None:
    """An output that names one of the command's own inputs (a file, or the preset a name stands
    for), or any shipped preset, would replace what the user or the installation owns."""
    if str(output) == "-" or not output.exists():
        return
    target = output.resolve()
    if target.parent == archspec.preset_dir().resolve():
        raise OverlockError(
            f"{flag} {output} is a shipped preset file of overlock; give a file name outside {target.parent}"
        )
    for what, source in inputs.items():
        source_path = Path(source) if Path(source).is_file() else archspec.preset_dir() / f"{source}.yaml"
        if source_path.is_file() and target == source_path.resolve():
            raise OverlockError(
                f"{flag} {output} is the {what} file this command reads; give another file name so it is kept"
            )


def _fmt(n: int) -> str:
    return f"{n:,}"


@app.command(cls=HelpCommand)
@exit_on_user_error
def validate(spec: SpecArg, set_: SetOpt = None) -> None:
    """Check a spec (schema and cross-field rules) without building anything."""
    resolved = archspec.load(spec, set_)
    blocks = resolved.total_blocks
    if isinstance(resolved, archspec.DDSSpec):
        shape = (
            f"{len(resolved.base.stages)} Base-Net stages, {len(resolved.focus.stages)} Focus-Net stages, "
            f"{blocks} blocks, context width {resolved.context_width}"
        )
    else:
        shape = f"pyramid of {len(resolved.stages)} stages, {blocks} blocks" + (
            ", with feedback" if resolved.feedback else ""
        )
    console.print(f"[green]ok[/]: {plain(resolved.name or spec)}: {shape}")


@app.command(cls=HelpCommand)
@exit_on_user_error
def build(
    spec: SpecArg,
    deploy: DeployOpt = False,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    save: Annotated[
        Path | None,
        typer.Option(
            "--save",
            help="Write the built model (spec + weights) to this file (safetensors if it ends in .safetensors).",
        ),
    ] = None,
) -> None:
    """Validate and build a spec; print widths, depths, block parts (mixer, FFN, SE) and parameters per stage."""
    from .builder.summary import summarize
    from .checkpoint import save_model_file

    if save is not None:
        _refuse_overwriting_an_input(save, "--save", spec=spec)
    from .builder import inference_params

    model = _build(spec, set_, deploy)
    summary = summarize(model)
    summary["inference_params"] = inference_params(model.spec)
    if save is not None:
        save_model_file(model, deploy, save)
    if as_json:
        print(json.dumps(summary))
        return
    form = "deploy (re-parameterised)" if deploy else "training"
    title = f"{summary['name'] or spec}: {form} form"
    table = Table(title=plain(title), title_justify="left", min_width=len(title))
    columns = ("subnet", "stage", "width", "depth", "mixer", "ffn", "se", "params")
    for column in columns:
        table.add_column(column, justify="right" if column in ("depth", "params") else "left", no_wrap=True)
    for row in summary["stages"]:
        depth = str(row["depth"]) if row["depth"] else "-"
        cells = [plain(str(row[c])) for c in columns[:-1]]
        table.add_row(*cells[:3], depth, *cells[4:], _fmt(row["params"]))
    table.add_section()
    blank = [""] * (len(columns) - 2)
    for name, count in summary["subnetworks"].items():
        table.add_row(f"[bold]{name}[/]", *blank, _fmt(count))
    table.add_row("[bold]total[/]", *blank, f"[bold]{_fmt(summary['params'])}[/]")
    console.print(fit_table(table))
    console.print(f"inference parameters (deploy form, no aux head): {_fmt(summary['inference_params'])}")
    if save is not None:
        console.print(f"saved {plain(str(save))}")


def _parse_input_size(text: str, option: str = "--input-size") -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:[x, ]\s*(\d+))?\s*", text)
    if not match:
        raise OverlockError(f"{option} {text!r}: expected S (square) or H W (also HxW), e.g. 224 or 160 192")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if height < 32 or width < 32:
        raise OverlockError(f"{option} {height}x{width}: each side must be at least 32 (the network downsamples 32x)")
    return height, width


@app.command(cls=HelpCommand)
@exit_on_user_error
def flops(
    spec: SpecArg,
    input_size: Annotated[str, typer.Option("--input-size", help="S for SxS, or H W (also HxW).")] = "224",
    deploy: DeployOpt = False,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """FLOPs (fvcore; one multiply-add = one FLOP; ContMix counted) per sub-network and in total."""
    from .builder.estimate import check_fits
    from .builder.flops import count_flops
    from .builder.summary import count_params

    size = _parse_input_size(input_size)
    resolved = archspec.load(spec, set_)
    if resolved.head.num_classes is not None:
        check_fits(
            resolved, f"a forward of {resolved.name or spec} at {size[0]}x{size[1]}", image_size=size, traced=True
        )
    model = _build(spec, set_, deploy)
    try:
        report = count_flops(model, size)
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise OverlockError(
            f"--input-size {size[0]}x{size[1]}: not enough memory to trace the model at this size; give a smaller size"
        ) from None
    by_module = report.by_module
    # Sub-networks: the model's top-level modules (base, overview, context, focus, head / stem, stages, head).
    subnets = {name: int(by_module.get(name, 0)) for name, _ in model.named_children()}
    subnets = {k: v for k, v in subnets.items() if v}
    params = count_params(model)
    if as_json:
        print(
            json.dumps(
                {
                    "name": model.spec.name,
                    "input_size": list(size),
                    "deploy": deploy,
                    "flops": report.total,
                    "params": params,
                    "subnetworks": subnets,
                    "stages": {path: int(by_module.get(path, 0)) for path, _, _ in model.spec.stages_in_order()},
                    "operators": {k: int(v) for k, v in report.by_operator.items()},
                }
            )
        )
        return
    title = f"{model.spec.name or spec}: {size[0]}x{size[1]}, {'deploy' if deploy else 'training'} form"
    table = Table(title=plain(title), title_justify="left", min_width=len(title))
    table.add_column("part")
    table.add_column("block")
    table.add_column("GFLOPs", justify="right")
    table.add_column("share", justify="right")
    for path, _, _ in model.spec.stages_in_order():  # every stage, with the block it is made of
        count = int(by_module.get(path, 0))
        block = plain(model.spec.resolved_block(path).describe())
        table.add_row(path, block, f"{count / 1e9:.3f}", f"{100 * count / max(report.total, 1):.1f}%")
    table.add_section()
    for name, count in subnets.items():
        table.add_row(name, "", f"{count / 1e9:.3f}", f"{100 * count / max(report.total, 1):.1f}%")
    table.add_section()
    table.add_row("[bold]total[/]", "", f"[bold]{report.total / 1e9:.3f}[/]", "100%")
    console.print(fit_table(table))
    ops = ", ".join(f"{k} {v / 1e9:.3f}G" for k, v in sorted(report.by_operator.items(), key=lambda kv: -kv[1]))
    console.print(f"by operator: {ops}")
    console.print(f"params: {_fmt(params)}   (eval-mode forward of 1 image; the aux head runs only in training)")


@app.command(cls=HelpCommand)
def presets() -> None:
    """List the shipped presets."""
    table = Table(title="presets (use the name anywhere a spec is expected)", title_justify="left")
    table.add_column("name")
    table.add_column("reproduces")
    for name in archspec.preset_names():
        table.add_row(name, plain(archspec.preset_description(name)))
    console.print(fit_table(table))


@app.command(cls=HelpCommand)
@exit_on_user_error
def schema(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to a file instead of stdout.")] = None,
) -> None:
    """Print the JSON Schema of a spec (point YAML-aware editors at it for completion and checks)."""
    from .checkpoint import write_atomic

    text = json.dumps(spec_json_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        write_atomic(output, lambda handle: handle.write(text.encode("utf-8")))


spec_json_schema = archspec.spec_json_schema


@app.command(cls=HelpCommand)
@exit_on_user_error
def convert(
    spec: SpecArg,
    checkpoint: Annotated[Path, typer.Argument(help="A state dict in the published checkpoints' layout (.pth).")],
    output: Annotated[
        Path, typer.Argument(help="Where to write the overlock model file (safetensors if it ends in .safetensors).")
    ],
    deploy: Annotated[bool, typer.Option("--deploy", help="The checkpoint is in re-parameterised form.")] = False,
    set_: SetOpt = None,
) -> None:
    """Import a published OverLoCK checkpoint into overlock's own model format (strict)."""
    from .builder import load_official
    from .checkpoint import MODEL_FORMAT, load_file, save_model_file

    _refuse_overwriting_an_input(output, "OUTPUT", checkpoint=checkpoint, spec=spec)
    state = load_file(checkpoint)
    if not isinstance(state, dict):
        raise OverlockError(f"{checkpoint} holds a {type(state).__name__}, not a state dict")
    if state.get("format") in (MODEL_FORMAT, "overlock-run"):
        raise OverlockError(
            f"{checkpoint} is already an overlock file (written by overlock build --save, convert or train), "
            "not a published checkpoint: there is nothing to convert; `overlock eval` reads it as it is"
        )
    model = _build(spec, set_, deploy)
    load_official(model, state)
    save_model_file(model, deploy, output)
    console.print(
        plain(f"converted {checkpoint} -> {output} ({model.spec.name}, {'deploy' if deploy else 'training'} form)")
    )


@app.command(cls=HelpCommand)
@exit_on_user_error
def bench(
    spec: SpecArg,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per call.")] = 8,
    img_size: Annotated[
        str,
        typer.Option("--img-size", help="S for SxS, or H W (also HxW): e.g. 1280 384 for a dense-prediction input."),
    ] = "224",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU intra-op threads.")] = None,
    train: Annotated[bool, typer.Option("--train", help="Time a training step (fwd, loss, bwd, AdamW).")] = False,
    deploy: DeployOpt = False,
    amp: Annotated[bool, typer.Option("--amp", help="bfloat16 autocast.")] = False,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model first.")] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Model and input in channels_last.")] = False,
    grad_checkpoint: Annotated[
        bool, typer.Option("--grad-checkpoint", help="Gradient checkpointing per block (with --train).")
    ] = False,
    profile: Annotated[bool, typer.Option("--profile", help="Time per sub-network, block part and operator.")] = False,
    reps: Annotated[int, typer.Option("--reps", min=1, help="Timed calls after the warm-up.")] = 10,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Images/s, latency (median, spread) and peak memory of a spec; --profile: where the time goes."""
    from .bench import BenchSettings, render
    from .bench import bench as run_bench

    if device not in ("cpu", "cuda"):
        raise OverlockError(f"--device {device!r}: valid devices are cpu and cuda")
    height, width = _parse_input_size(img_size, "--img-size")
    settings = BenchSettings(
        batch_size=batch_size,
        img_size=height if height == width else (height, width),
        device=device,
        threads=threads,
        train=train,
        deploy=deploy,
        amp=amp,
        compile=compile_,
        channels_last=channels_last,
        grad_checkpoint=grad_checkpoint,
        profile=profile,
        reps=reps,
    )
    model = _build(spec, set_, False)
    result = run_bench(model, settings, name=model.spec.name or spec)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    for table in render(result):
        console.print(table)


@app.command(cls=HelpCommand)
@exit_on_user_error
def export(
    spec: SpecArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write.", show_default=False)],
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights", "-w", help="Whatever `overlock eval` takes (default: random weights).", show_default=False
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="onnx, exported-program or torchscript.")] = "onnx",
    img_size: Annotated[tuple[int, int], typer.Option("--img-size", help="Input height and width.")] = (224, 224),
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Any batch size.")] = False,
    dynamic_size: Annotated[
        bool,
        typer.Option(
            "--dynamic-size",
            help="Any image size from 33 px (torchscript: a size-generic trace; without it the trace takes only --img-size).",
        ),
    ] = False,
    deploy: DeployOpt = False,
    ema: Annotated[bool, typer.Option("--ema", help="The EMA weights of a run checkpoint.")] = False,
    set_: SetOpt = None,
) -> None:
    """Export a model for deployment and check that the file computes what PyTorch computes."""
    from .export import export_model, load_model

    if weights is not None:
        _refuse_overwriting_an_input(output, "--output", weights=weights)
    model = load_model(spec, weights, overrides=set_, deploy=deploy, ema=ema)
    report = export_model(model, output, fmt, tuple(img_size), dynamic_batch=dynamic_batch, dynamic_size=dynamic_size)
    console.print(plain(f"wrote {report.path} ({fmt}, {img_size[0]}x{img_size[1]})"))
    if report.skipped_check:
        console.print(plain(f"not checked against PyTorch: {report.skipped_check}"))
    for check in report.checks:
        shape = "x".join(str(n) for n in check.shape)
        if check.error is not None:
            console.print(f"[bold red]FAILS[/] to run at {shape}: " + plain(check.error[:300]))
            continue
        verdict = "[green]equal[/]" if check.ok else "[bold red]DIFFERENT[/]"
        console.print(f"{verdict} to PyTorch at {shape}: max |diff| {check.max_abs:.2e}, relative {check.relative:.2e}")
    if not report.ok:
        hint = ""
        if fmt == "torchscript" and any(check.error for check in report.checks):
            hint = (
                "; the trace of this spec does not follow the input size everywhere: use --format onnx or "
                "exported-program for dynamic sizes, or export TorchScript at the size you will run"
            )
        raise OverlockError(f"{report.path} does not compute what the PyTorch model computes (tolerance 1e-4){hint}")


# ---------------------------------------------------------------------------------------------
# Design-space exploration (issue 12): diagram, compare, sweep, erf. The work is in explore/.

InputSizeOpt = Annotated[str, typer.Option("--input-size", help="S for SxS, or H W (also HxW).")]
TrainOpt = Annotated[
    str | None,
    typer.Option(
        "--train",
        help="Also train each spec briefly on this data source (as for `overlock train --data`) and report "
        "its best validation top-1.",
        show_default=False,
    ),
]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1, help="Epochs of each --train run.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size of each --train run.")]
MeasureOpt = Annotated[
    bool, typer.Option("--measure", help="Also measure inference images/s and peak memory (deploy form).")
]
CsvOpt = Annotated[bool, typer.Option("--csv", help="Print CSV instead of tables.")]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Write a trade-off plot: FLOPs (or images/s with --measure) vs top-1 (with --train, else params), "
        "Pareto front marked.",
        show_default=False,
    ),
]


@app.command(cls=HelpCommand)
@exit_on_user_error
def diagram(
    spec: SpecArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The drawing: .svg, .png or .pdf.")],
    input_size: InputSizeOpt = "224",
    set_: SetOpt = None,
) -> None:
    """Draw the network like the paper's overview figure: every stage with width x depth, block and resolution."""
    from .explore.diagram import draw

    _refuse_overwriting_an_input(output, "-o", spec=spec)
    boxes = draw(archspec.load(spec, set_), output, _parse_input_size(input_size))
    console.print(f"wrote {plain(str(output))} ({len(boxes)} parts)")


def _render_rows(rows: list[dict], title: str, as_json: bool, as_csv: bool, labels: list[str] | None = None) -> None:
    from .explore.compare import format_cell, table_columns, to_csv

    if as_json:
        print(json.dumps(rows))
        return
    if as_csv:
        sys.stdout.write(to_csv(rows))
        return
    columns = table_columns(rows)
    table = Table(title=plain(title), title_justify="left", min_width=len(title))
    if labels is None and len({r["name"] for r in rows}) < len(rows):  # same names: say which file each is
        labels = [r["source"] for r in rows]
    if labels is not None and len({r["name"] for r in rows}) == 1:  # a sweep: one name, the variant says it all
        columns.remove("name")
    table.add_column("#", justify="right")  # the number a crowded --plot labels each point with
    if labels is not None:
        table.add_column("variant")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="left" if column == "name" else "right")
    for i, row in enumerate(rows):
        cells = [plain(format_cell(c, row.get(c))) for c in columns]
        table.add_row(str(i + 1), *([plain(labels[i])] if labels is not None else []), *cells)
    console.print(fit_table(table))


def _explore_progress(quiet_stdout: bool = False):
    """Progress on the terminal; on stderr when stdout carries --json/--csv."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True) if quiet_stdout else console,
        transient=True,
    )


@app.command(cls=HelpCommand)
@exit_on_user_error
def compare(
    specs: Annotated[list[str], typer.Argument(help="Preset names or spec YAML files.", show_default=False)],
    set_: SetOpt = None,
    input_size: InputSizeOpt = "224",
    measure: MeasureOpt = False,
    train: TrainOpt = None,
    epochs: EpochsOpt = 1,
    batch_size: BatchOpt = 32,
    runs: Annotated[
        Path | None,
        typer.Option(
            "--runs", help="Keep the --train runs in this directory (default: a temporary one).", show_default=False
        ),
    ] = None,
    as_json: JsonOpt = False,
    as_csv: CsvOpt = False,
    plot: PlotOpt = None,
) -> None:
    """One table, one row per spec: parameters, inference parameters, FLOPs (and measured speed, top-1)."""
    import tempfile

    from .explore.compare import TrainSettings, check_trainable, compare_one
    from .explore.compare import plot as draw_plot

    size = _parse_input_size(input_size)
    for source in specs:  # every spec valid before anything runs
        archspec.load(source, set_)
    settings = TrainSettings(train, epochs=epochs, batch_size=batch_size) if train else None
    if settings is not None:  # and every one trainable on the data: a bad 5th spec fails before the 1st trains
        check_trainable([(source, source, list(set_ or [])) for source in specs], settings)
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="overlock-compare-") as scratch,
        _explore_progress(as_json or as_csv) as progress,
    ):
        task = progress.add_task("compare", total=len(specs))
        for i, source in enumerate(specs):
            progress.update(task, description=f"compare {plain(source)}")
            train_dir = (runs or Path(scratch)) / f"{i:02d}-{Path(source).stem}" if settings else None
            rows.append(
                compare_one(source, list(set_ or []), size, measure_speed=measure, train=settings, train_dir=train_dir)
            )
            progress.advance(task)
    if plot is not None:
        draw_plot(rows, plot)
    _render_rows(rows, f"compare at {size[0]}x{size[1]} (FLOPs and inference params: deploy form)", as_json, as_csv)
    if plot is not None and not (as_json or as_csv):
        console.print(f"wrote {plain(str(plot))}")


@app.command(cls=HelpCommand)
@exit_on_user_error
def sweep(
    spec: SpecArg,
    grid: Annotated[
        list[str],
        typer.Option(
            "--grid",
            help="KEY=V1,V2,...: one axis of the grid (repeatable; every combination is a variant). Values are "
            "split at commas; a value holding commas is a YAML flow item, bracketed or quoted: "
            "'base.stages.2={width: 64, depth: 1},{width: 96, depth: 2}' is two variants.",
            show_default=False,
        ),
    ],
    set_: SetOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Sweep directory (default: sweeps/NAME); rerun to resume.", show_default=False),
    ] = None,
    input_size: InputSizeOpt = "224",
    measure: MeasureOpt = False,
    train: TrainOpt = None,
    epochs: EpochsOpt = 1,
    batch_size: BatchOpt = 32,
    as_json: JsonOpt = False,
    as_csv: CsvOpt = False,
    plot: PlotOpt = None,
) -> None:
    """Expand a grid of --set overrides on SPEC, validate each, write them to --out and compare the valid ones."""
    from .explore.compare import TrainSettings
    from .explore.compare import plot as draw_plot
    from .explore.sweep import SweepDir, expand, parse_grid, run_sweep, short_label

    size = _parse_input_size(input_size)
    plan = expand(spec, list(set_ or []), parse_grid(grid))
    out = out or Path("sweeps") / (archspec.load(spec, set_).name or Path(spec).stem)
    SweepDir(out)  # a file in the way is an error before anything is printed or run
    settings = TrainSettings(train, epochs=epochs, batch_size=batch_size) if train else None
    err = make_console() if not (as_json or as_csv) else console.__class__(stderr=True, highlight=False)
    for v in plan.invalid:
        first = (v.error or "").splitlines()
        err.print(
            f"[yellow]skipped[/] {plain(v.label)}: {plain(' '.join(line.strip() for line in first[1:] or first))}"
        )
    err.print(f"{len(plan.valid)} valid of {len(plan.variants)} variants -> {plain(str(out))}")
    done = {"cached": 0, "run": 0}
    try:
        with _explore_progress(as_json or as_csv) as progress:
            task = progress.add_task("sweep", total=len(plan.valid))

            def report(event, variant, row) -> None:
                if event == "start":
                    progress.update(task, description=f"sweep {plain(variant.label)}")
                    return
                done["cached" if event == "cached" else "run"] += 1
                progress.advance(task)

            rows = run_sweep(plan, out, size, measure=measure, train=settings, on_progress=report)
    except KeyboardInterrupt:
        err.print(
            f"[yellow]interrupted[/]: {done['cached'] + done['run']} of {len(plan.valid)} variants have results in "
            f"{plain(str(out))}; run the same command again to resume"
        )
        raise typer.Exit(130) from None
    if plot is not None and rows:
        draw_plot(rows, plot, labels=[short_label(r["overrides"]) for r in rows])
    _render_rows(
        rows,
        f"sweep of {spec} at {size[0]}x{size[1]} ({done['cached']} reused, {done['run']} run)",
        as_json,
        as_csv,
        labels=[r["label"] for r in rows],
    )


@app.command(cls=HelpCommand)
@exit_on_user_error
def erf(
    spec: SpecArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The heatmap: .png, .svg or .pdf.")],
    layer: Annotated[
        str | None,
        typer.Option(
            "--layer",
            help="Stage whose output centre is measured, e.g. base.stages.2, focus.stages.0, stages.1 "
            "(default: the last stage).",
            show_default=False,
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            help="Weights (model file, run checkpoint or published state dict); default: random (seed 0).",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", help="Images from this source's validation split (default: Gaussian noise).", show_default=False
        ),
    ] = None,
    images: Annotated[int, typer.Option("--images", min=1, help="Images averaged over.")] = 8,
    input_size: InputSizeOpt = "224",
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Effective receptive field of a stage (paper, Figure 2): log-scaled heatmap and the area holding 20/50/90%."""
    from .explore.erf import build_model, input_images, measure_erf, plot_erf

    _refuse_overwriting_an_input(output, "-o", spec=spec)
    size = _parse_input_size(input_size)
    resolved = archspec.load(spec, set_)
    layer = layer or resolved.stages_in_order()[-1][0]
    model = build_model(resolved, weights)
    result = measure_erf(model, layer, input_images(data, images, size, resolved.in_channels))
    plot_erf(result, output, f"{resolved.name or spec}" + (" (random weights)" if weights is None else ""))
    if as_json:
        print(json.dumps(result.as_json()))
        return
    table = Table(
        title=plain(f"ERF of {layer} in {resolved.name or spec}: share of the image area holding"),
        title_justify="left",
    )
    for column in ("contribution", "centred square", "fewest pixels"):
        table.add_column(column, justify="right")
    for t in result.square:
        table.add_row(f"{int(100 * t)}%", f"{100 * result.square[t]:.2f}%", f"{100 * result.pixels[t]:.2f}%")
    console.print(fit_table(table))
    console.print(f"wrote {plain(str(output))}")


def _register_training() -> None:
    from .training.commands import register

    register(app)


_register_training()


def _split_input_size(argv: list[str]) -> list[str]:
    """Accept `--input-size H W` (and `overlock bench`'s `--img-size H W`) as two words by joining
    them into `HxW` for typer. (`overlock export --img-size` takes its two words as they are.)"""
    out = list(argv)
    options = {"--input-size", "--img-size"} if out[:1] == ["bench"] else {"--input-size"}
    for i, word in enumerate(out[:-2]):
        if word in options and out[i + 1].isdigit() and out[i + 2].isdigit():
            out[i + 1 : i + 3] = [f"{out[i + 1]}x{out[i + 2]}"]
            break
    return out


def main() -> None:
    """Console-script entry point."""
    app(args=_split_input_size(sys.argv[1:]), prog_name="overlock")


if __name__ == "__main__":
    main()

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
from rich.markup import escape
from rich.table import Table

from . import archspec
from .errors import OverlockError, exit_on_user_error, is_out_of_memory
from .training.progress import make_console

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
    """An output that names one of the command's own input files would replace the user's original."""
    for what, source in inputs.items():
        source = Path(source)
        if output.is_file() and source.is_file() and output.resolve() == source.resolve():
            raise OverlockError(
                f"{flag} {output} is the {what} file this command reads; give another file name so it is kept"
            )


def _fmt(n: int) -> str:
    return f"{n:,}"


@app.command()
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
    console.print(f"[green]ok[/]: {escape(resolved.name or spec)}: {shape}")


@app.command()
@exit_on_user_error
def build(
    spec: SpecArg,
    deploy: DeployOpt = False,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    save: Annotated[
        Path | None, typer.Option("--save", help="Write the built model (spec + weights) to this file.")
    ] = None,
) -> None:
    """Validate and build a spec; print widths, depths, kernels, groups and parameters per stage."""
    from .builder.summary import summarize
    from .checkpoint import model_file, save_atomic

    if save is not None:
        _refuse_overwriting_an_input(save, "--save", spec=spec)
    from .builder import inference_params

    model = _build(spec, set_, deploy)
    summary = summarize(model)
    summary["inference_params"] = inference_params(model.spec)
    if save is not None:
        save_atomic(model_file(model, deploy), save)
    if as_json:
        print(json.dumps(summary))
        return
    form = "deploy (re-parameterised)" if deploy else "training"
    title = f"{summary['name'] or spec}: {form} form"
    table = Table(title=escape(title), title_justify="left", min_width=len(title))
    columns = ("subnet", "stage", "width", "depth", "mixer", "ffn", "se", "params")
    for column in columns:
        table.add_column(column, justify="right" if column in ("depth", "params") else "left", no_wrap=True)
    for row in summary["stages"]:
        depth = str(row["depth"]) if row["depth"] else "-"
        cells = [escape(str(row[c])) for c in columns[:-1]]
        table.add_row(*cells[:3], depth, *cells[4:], _fmt(row["params"]))
    table.add_section()
    blank = [""] * (len(columns) - 2)
    for name, count in summary["subnetworks"].items():
        table.add_row(f"[bold]{name}[/]", *blank, _fmt(count))
    table.add_row("[bold]total[/]", *blank, f"[bold]{_fmt(summary['params'])}[/]")
    console.print(table)
    console.print(f"inference parameters (deploy form, no aux head): {_fmt(summary['inference_params'])}")
    if save is not None:
        console.print(f"saved {escape(str(save))}")


def _parse_input_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:[x, ]\s*(\d+))?\s*", text)
    if not match:
        raise OverlockError(f"--input-size {text!r}: expected S (square) or H W (also HxW), e.g. 224 or 160 192")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if height < 32 or width < 32:
        raise OverlockError(
            f"--input-size {height}x{width}: each side must be at least 32 (the network downsamples 32x)"
        )
    return height, width


@app.command()
@exit_on_user_error
def flops(
    spec: SpecArg,
    input_size: Annotated[str, typer.Option("--input-size", help="S for SxS, or H W (also HxW).")] = "224",
    deploy: DeployOpt = False,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """FLOPs (fvcore; one multiply-add = one FLOP; ContMix counted) per sub-network and in total."""
    from .builder.flops import count_flops
    from .builder.summary import count_params

    size = _parse_input_size(input_size)
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
    table = Table(title=escape(title), title_justify="left", min_width=len(title))
    table.add_column("part")
    table.add_column("block")
    table.add_column("GFLOPs", justify="right")
    table.add_column("share", justify="right")
    for path, _, _ in model.spec.stages_in_order():  # every stage, with the block it is made of
        count = int(by_module.get(path, 0))
        block = escape(model.spec.resolved_block(path).describe())
        table.add_row(path, block, f"{count / 1e9:.3f}", f"{100 * count / max(report.total, 1):.1f}%")
    table.add_section()
    for name, count in subnets.items():
        table.add_row(name, "", f"{count / 1e9:.3f}", f"{100 * count / max(report.total, 1):.1f}%")
    table.add_section()
    table.add_row("[bold]total[/]", "", f"[bold]{report.total / 1e9:.3f}[/]", "100%")
    console.print(table)
    ops = ", ".join(f"{k} {v / 1e9:.3f}G" for k, v in sorted(report.by_operator.items(), key=lambda kv: -kv[1]))
    console.print(f"by operator: {ops}")
    console.print(f"params: {_fmt(params)}   (eval-mode forward of 1 image; the aux head runs only in training)")


@app.command()
def presets() -> None:
    """List the shipped presets."""
    table = Table(title="presets (use the name anywhere a spec is expected)", title_justify="left")
    table.add_column("name")
    table.add_column("reproduces")
    for name in archspec.preset_names():
        table.add_row(name, escape(archspec.preset_description(name)))
    console.print(table)


@app.command()
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


@app.command()
@exit_on_user_error
def convert(
    spec: SpecArg,
    checkpoint: Annotated[Path, typer.Argument(help="A state dict in the published checkpoints' layout (.pth).")],
    output: Annotated[Path, typer.Argument(help="Where to write the overlock model file.")],
    deploy: Annotated[bool, typer.Option("--deploy", help="The checkpoint is in re-parameterised form.")] = False,
    set_: SetOpt = None,
) -> None:
    """Import a published OverLoCK checkpoint into overlock's own model format (strict)."""
    from .builder import load_official
    from .checkpoint import MODEL_FORMAT, load_file, model_file, save_atomic

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
    save_atomic(model_file(model, deploy), output)
    console.print(
        escape(f"converted {checkpoint} -> {output} ({model.spec.name}, {'deploy' if deploy else 'training'} form)")
    )


def _register_training() -> None:
    from .training.commands import register

    register(app)


_register_training()


def _split_input_size(argv: list[str]) -> list[str]:
    """Accept `--input-size H W` (two words) by joining it into `--input-size HxW` for typer."""
    out = list(argv)
    for i, word in enumerate(out[:-2]):
        if word == "--input-size" and out[i + 1].isdigit() and out[i + 2].isdigit():
            out[i + 1 : i + 3] = [f"{out[i + 1]}x{out[i + 2]}"]
            break
    return out


def main() -> None:
    """Console-script entry point."""
    app(args=_split_input_size(sys.argv[1:]), prog_name="overlock")


if __name__ == "__main__":
    main()

"""Fuzzing the spec reader and the CLI: YAML text, spec trees, `--set` values and file names (issue 13).

Every generated input must end in success or a one-screen `OverlockError` (exit status 2 through the
CLI): never another exception (a traceback), never a hang, never unbounded memory. The CI run is
small and derandomised (fixed cases, well under a minute); a longer, random run is opt-in:

    OVERLOCK_FUZZ_EXAMPLES=1500 python -m pytest -q tests/test_fuzz.py -s

runs 1500 cases per target (4 targets: 6,000 cases) and prints cases, slowest case and peak memory.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from overlock import archspec
from overlock.cli import app
from overlock.errors import OverlockError

EXAMPLES = int(os.environ.get("OVERLOCK_FUZZ_EXAMPLES", "0") or 0)
LONG = EXAMPLES > 0
FUZZ = settings(
    max_examples=EXAMPLES or 40,
    deadline=None,  # timed below instead: two shared CPU cores make hypothesis's deadline flaky
    derandomize=not LONG,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
MAX_SECONDS = 20  # per case; the slowest honest case (a full spec validated and estimated) takes ~1 s
runner = CliRunner()
STATS: dict[str, list[float]] = {}
PICO = archspec.load("pico").model_dump(mode="json")


@pytest.fixture(autouse=True, scope="module")
def small_memory_limit():
    """Valid but huge specs are refused by the memory check rather than built."""
    previous = os.environ.get("OVERLOCK_MEMORY_LIMIT")
    os.environ["OVERLOCK_MEMORY_LIMIT"] = "256M"
    yield
    if previous is None:
        os.environ.pop("OVERLOCK_MEMORY_LIMIT")
    else:
        os.environ["OVERLOCK_MEMORY_LIMIT"] = previous
    if LONG:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        for target, times in STATS.items():
            print(
                f"\nfuzz {target}: {len(times)} cases, slowest {max(times):.2f} s, mean {sum(times) / len(times):.3f} s"
            )
        print(f"fuzz: peak memory of the test process {peak:.2f} GiB")


def check(target: str, action) -> None:
    """Run one case: success or OverlockError only, within MAX_SECONDS."""
    started = time.perf_counter()
    try:
        action()
    except OverlockError:
        pass
    elapsed = time.perf_counter() - started
    STATS.setdefault(target, []).append(elapsed)
    assert elapsed < MAX_SECONDS, f"{target} took {elapsed:.1f} s"


def check_cli(target: str, *args: str) -> None:
    started = time.perf_counter()
    result = runner.invoke(app, list(args))
    elapsed = time.perf_counter() - started
    STATS.setdefault(target, []).append(elapsed)
    assert result.exit_code in (0, 2), (args, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert elapsed < MAX_SECONDS, f"{args} took {elapsed:.1f} s"


# ---------------------------------------------------------------------------------------------
# Strategies

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 3, 4, 7, 13, 64, 2**24, 2**24 + 1, 2**31, 2**63 - 1, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Pieces of YAML that exercise anchors, aliases, merge keys, tags, flow and block nesting, control characters.
TOKENS = st.sampled_from(
    [
        "extends: pico\n", "name: ", "description: ", "base:\n  stages:\n", "    - ", "width: ", "depth: ",
        "kernel_size: ", "&a ", "*a", "&b ", "*b", "<<: ", "[", "]", "{", "}", ", ", ": ", "\n", "  ", "- ",
        "!!python/object/apply:os.system ['true']", "!!binary aGk=", "!!float", ".inf", ".nan", "1e308", "true",
        "'12'", "0x10", "99999999999999999999999", "~", "? ", "|\n  ", "\x00", "\x1b[31m", "\x7f", "\t", "#",
        "---\n", "...\n", "%YAML 1.1\n", "focus:\n  stages:\n", "overview: ", "head: {num_classes: ", "}\n",
    ]
)  # fmt: skip
YAML_TEXT = st.one_of(st.lists(TOKENS, max_size=40).map("".join), st.text(max_size=200))
SET_PATHS = st.sampled_from(
    [
        "name", "extends", "stem.width", "base.stages.0.width", "base.stages.-1.depth", "base.stages.9.width",
        "overview.mlp_ratio", "overview.kernel_size", "focus.stages.0.groups", "focus.stagez.0.groups",
        "context.width", "head.num_classes", "head.dropout", "norm.block", "drop_path_rate", "in_channels",
        "base.stages", "focus", "", ".", "a..b", "focus.stages.²", "base.stages.0",
    ]
)  # fmt: skip
SET_VALUES = st.one_of(YAML_TEXT, SCALARS.map(str), st.sampled_from(["[" * 100 + "]" * 100, "&a [*a]", "null"]))
FILE_NAMES = st.one_of(
    st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s and "/" not in s),
    st.sampled_from(["a" * 300 + ".yaml", "-", ".", "..", " ", "pico", "x.yaml"]),
)


def mutated_pico(draw) -> dict:
    """pico's resolved spec with a few values replaced anywhere in the tree."""
    tree = yaml.safe_load(yaml.safe_dump(PICO))
    for _ in range(draw(st.integers(1, 4))):
        node = tree
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, dict | list) and child and draw(st.booleans()):
                node = child
                continue
            node[key] = draw(VALUES)
            break
    return tree


SPEC_TREES = st.composite(mutated_pico)()


# ---------------------------------------------------------------------------------------------
# Targets


@FUZZ
@given(text=YAML_TEXT)
def test_fuzz_yaml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("y") / "spec.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass") if text.isascii() else path.write_bytes(
        text.encode("utf-8", "surrogatepass")
    )
    check("yaml text", lambda: archspec.load(path))


@FUZZ
@given(tree=SPEC_TREES)
def test_fuzz_spec_trees(tmp_path_factory, tree):
    from overlock.builder.estimate import check_fits

    def action():
        spec = archspec.load(tree)
        if spec.head.num_classes is not None:
            check_fits(spec, "fuzz")  # may refuse, never allocates
        path = tmp_path_factory.mktemp("t") / "spec.yaml"
        path.write_text(spec.to_yaml())
        assert archspec.load(path) == spec

    check("spec trees", action)


@FUZZ
@given(overrides=st.lists(st.tuples(SET_PATHS, SET_VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=3))
def test_fuzz_set_values(overrides):
    args = [part for text in overrides for part in ("--set", text)]
    check_cli("--set values", "validate", "pico", *args)


@FUZZ
@given(name=FILE_NAMES, command=st.sampled_from(["validate", "build", "schema", "eval"]))
def test_fuzz_file_names(tmp_path_factory, name, command):
    folder: Path = tmp_path_factory.mktemp("f")
    previous = os.getcwd()
    os.chdir(folder)
    try:
        if command == "schema":
            check_cli("file names", "schema", "-o", name)
        elif command == "eval":
            check_cli("file names", "eval", "pico", "--weights", name, "--data", "synthetic:classes=10,train=8,val=8")
        else:
            check_cli("file names", command, name)
    finally:
        os.chdir(previous)

"""overlock's own compiled CPU kernels (kernels/csrc/*.c), built on first use with the machine's C compiler.

Why C and not a PyTorch C++ extension: the kernels need nothing from PyTorch but pointers, so a
plain C file compiles in about a second (a C++ extension that includes torch's headers takes a
minute) and loads with ctypes, which releases the GIL during the call, so that callers can run
several calls in parallel threads. It is compiled for this machine's CPU (`-march=native`) and
cached per source (with csrc/*.h), compiler, flags and CPU in `$OVERLOCK_CACHE_DIR` (default
`~/.cache/overlock/native`), written atomically, so concurrent processes share one build.
`$OVERLOCK_NATIVE_FLAGS` adds compiler flags (`flags()`).

Without a working C compiler (or with `OVERLOCK_NATIVE=0`) `library()` returns None and callers
run their PyTorch composition instead: same results, slower. `status()` says which and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .cpu import _pool, _workers

SOURCE_DIR = Path(__file__).with_name("csrc")
DISABLE_ENV = "OVERLOCK_NATIVE"
CACHE_ENV = "OVERLOCK_CACHE_DIR"
FLAGS_ENV = "OVERLOCK_NATIVE_FLAGS"
COMPILE_TIMEOUT_S = 120

_POINTER, _LONG, _DOUBLE = ctypes.c_void_p, ctypes.c_long, ctypes.c_double
# Every exported function: (name, argument types); all return an int status (0: done, -1: no memory).
SIGNATURES = {
    "gelu_dwconv": {
        "overlock_gelu_dwconv3x3_forward": [_POINTER] * 5 + [_LONG] * 7,
        "overlock_gelu_dwconv3x3_backward": [_POINTER] * 6 + [_LONG] * 7,
        "overlock_gelu_dwconv3x3_grn_forward": [_POINTER] * 6 + [_LONG] * 3 + [_DOUBLE] * 2 + [_LONG] * 2,
    },
    "depthwise_weight_grad": {
        "overlock_depthwise_weight_grad": [_POINTER] * 3 + [_LONG] * 7,
    },
    "depthwise_conv": {
        "overlock_depthwise_conv_forward": [_POINTER] * 4 + [_LONG] * 7,
    },
    "grn": {
        "overlock_grn_backward_sums": [_POINTER] * 4 + [_LONG] * 4,
        "overlock_grn_input_grad": [_POINTER] * 5 + [_LONG] * 4,
    },
    "contmix": {
        "overlock_contmix_forward": [_POINTER] * 8 + [_LONG] * 21,
        "overlock_contmix_backward": [_POINTER] * 14 + [_LONG] * 23,
    },
}


def compiler() -> str | None:
    """$CC, else cc, else gcc, else clang: the first found on PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def flags() -> list[str]:
    """Optimise for this CPU: fused multiply-adds (ISO C mode leaves a * b + c unfused: 1.5-2x slower
    here), 512-bit vectors where the CPU has them (gcc keeps 256 by default). `$OVERLOCK_NATIVE_FLAGS`
    comes last, so it can override: `-mno-avx512f` builds for AVX2's 8-float vectors, `-mno-avx` for
    4 (how the tests check every vector width on one machine), `-march=x86-64-v3` for a cluster."""
    extra = ["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else []
    user = shlex.split(os.environ.get(FLAGS_ENV, ""))
    return [
        "-O3",
        "-std=c11",
        "-ffp-contract=fast",
        "-march=native",
        "-fno-math-errno",
        "-fPIC",
        "-shared",
        *extra,
        *user,
    ]


def cpuinfo_value(field: str) -> str | None:
    """The first `field` line of /proc/cpuinfo ("model name", "vendor_id", ...), or None where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == field:
            return value.strip()
    return None


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "overlock" / "native")


def _build(name: str, cc: str) -> Path:
    """Compile csrc/<name>.c (or reuse the cached build) and return the shared library's path."""
    source = SOURCE_DIR / f"{name}.c"
    headers = [header.read_text() for header in sorted(SOURCE_DIR.glob("*.h"))]  # what it may #include
    key = hashlib.sha256(
        "\0".join([source.read_text(), *headers, cc, " ".join(flags()), _cpu_id(), platform.machine()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{name}-", suffix=".so")
    except OSError:  # an unwritable cache folder: a private folder for this process
        target = Path(tempfile.mkdtemp(prefix="overlock-native-")) / target.name
        handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{name}-", suffix=".so")
    os.close(handle)
    try:
        subprocess.run(
            [cc, *flags(), str(source), "-o", partial],
            check=True,
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
        )
        os.replace(partial, target)  # atomic: another process sees the whole library or none
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@functools.cache
def _load(name: str) -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"{DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    cc = compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    try:
        library = ctypes.CDLL(str(_build(name, cc)))
    except subprocess.CalledProcessError as error:
        lines = (error.stderr or "").strip().splitlines()
        return None, f"{Path(cc).name} failed on csrc/{name}.c: {lines[0] if lines else error}"
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"could not build or load csrc/{name}.c: {error}"
    except ValueError as error:  # shlex: unbalanced quotes
        return None, f"{FLAGS_ENV} does not parse as shell words: {error}"
    for function, argtypes in SIGNATURES[name].items():
        getattr(library, function).argtypes = argtypes
        getattr(library, function).restype = ctypes.c_int
    return library, f"compiled with {Path(cc).name} {' '.join(flags())}"


def library(name: str) -> ctypes.CDLL | None:
    """The compiled csrc/<name>.c, or None where it cannot be built (callers fall back to PyTorch)."""
    return _load(name)[0]


def status(name: str) -> str:
    """One line: whether csrc/<name>.c is in use and why (for `overlock bench` and bug reports)."""
    library_, reason = _load(name)
    return f"{name}: {'native' if library_ is not None else 'PyTorch fallback'} ({reason})"


def summary() -> str:
    """One line for every csrc/*.c library, the libraries that share an outcome and its reason named
    together: all native and how they were built, or all on PyTorch's ops and why once."""
    groups: dict[tuple[bool, str], list[str]] = {}
    for name in SIGNATURES:
        library_, reason = _load(name)
        groups.setdefault((library_ is not None, reason), []).append(name)
    return "; ".join(
        f"{', '.join(names)}: {'native' if built else 'PyTorch fallback'} ({reason})"
        for (built, reason), names in groups.items()
    )


def pointer(tensor: torch.Tensor) -> ctypes.c_void_p:
    """The tensor's data address, for a C call (the caller keeps the tensor alive through the call)."""
    return ctypes.c_void_p(tensor.data_ptr())


def workers() -> int:
    """How many calls to run at once: torch's intra-op thread count (1 inside overlock's own workers)."""
    return _workers(torch.device("cpu"))


def image_ranges(batch: int, count: int) -> list[tuple[int, int]]:
    """[first, end) image ranges that split a batch between `count` calls as evenly as whole images can."""
    count = max(1, min(count, batch))
    edges = [batch * i // count for i in range(count + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


_NO_RANGE = contextlib.nullcontext()


def run(name: str, function: str, tasks: Sequence[tuple[int, ...]], arguments: Callable[[int], tuple]) -> None:
    """function(*arguments(i), *tasks[i]) from csrc/<name>.c for every task; several at once in the
    shared worker pool (kernels/cpu.py) when torch has several threads (ctypes releases the GIL for
    the call). Raises MemoryError if a call could not allocate its buffers."""
    call = getattr(library(name), function)

    def one(index: int) -> int:
        return call(*arguments(index), *tasks[index])

    indices = range(len(tasks))
    count = workers()
    # While a profiler runs (torch.profiler, `overlock bench --profile`), a named range: ctypes
    # calls are not aten ops, so the profile would not see them otherwise.
    profiled = torch.autograd.profiler._is_profiler_enabled
    with torch.profiler.record_function(function.replace("overlock_", "overlock::", 1)) if profiled else _NO_RANGE:
        statuses = [one(i) for i in indices] if count == 1 or len(tasks) == 1 else list(_pool(count).map(one, indices))
    if any(statuses):
        raise MemoryError(f"{function}: could not allocate its buffers")

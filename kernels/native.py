"""overlock's own compiled CPU kernels (kernels/csrc/*.c), built on first use with the machine's C compiler.

Why C and not a PyTorch C++ extension: the kernels need nothing from PyTorch but pointers, so a
plain C file compiles in about a second (a C++ extension that includes torch's headers takes a
minute) and loads with ctypes. Each call covers a batch split into tasks (csrc/tasks.h) that run on
torch's own OpenMP threads: where torch runs on GNU OpenMP (Linux wheels), the library is built with
-fopenmp and linked against the libgomp torch loaded (`OVERLOCK_NATIVE_OPENMP=0`: not). Elsewhere
ctypes releases the GIL during a call, and overlock's thread pool runs the tasks. It is compiled
for this machine's CPU (`-march=native`) and cached per source (with csrc/*.h), compiler, flags,
OpenMP runtime and CPU in `$OVERLOCK_CACHE_DIR` (default
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
from collections.abc import Sequence
from pathlib import Path

import torch

from .cpu import _pool, _workers

SOURCE_DIR = Path(__file__).with_name("csrc")
DISABLE_ENV = "OVERLOCK_NATIVE"
CACHE_ENV = "OVERLOCK_CACHE_DIR"
FLAGS_ENV = "OVERLOCK_NATIVE_FLAGS"
OPENMP_ENV = "OVERLOCK_NATIVE_OPENMP"
COMPILE_TIMEOUT_S = 120

_POINTER, _LONG, _DOUBLE = ctypes.c_void_p, ctypes.c_long, ctypes.c_double
# Every kernel Python calls: (name, the argument types of its entry point `<name>_tasks` before the
# three every one ends with: tasks, ntasks, threads; csrc/tasks.h). All return an int status (0: done).
SIGNATURES = {
    "gelu_dwconv": {
        "overlock_gelu_dwconv3x3_forward": [_POINTER] * 5 + [_LONG] * 4,
        "overlock_gelu_dwconv3x3_backward": [_POINTER] * 5 + [_LONG, _POINTER] + [_LONG] * 4,
        "overlock_gelu_dwconv3x3_grn_forward": [_POINTER] * 6 + [_LONG] * 3 + [_DOUBLE] * 2,
    },
    "depthwise_weight_grad": {
        "overlock_depthwise_weight_grad": [_POINTER] * 3 + [_LONG] * 6,
    },
    "depthwise_conv": {
        "overlock_depthwise_conv_forward": [_POINTER] * 4 + [_LONG] * 5,
    },
    "grn": {
        "overlock_grn_backward_sums": [_POINTER] * 4 + [_LONG] * 2,
        "overlock_grn_input_grad": [_POINTER] * 5 + [_LONG] * 2,
    },
    "contmix": {
        "overlock_contmix_forward": [_POINTER] * 8 + [_LONG] * 19,
        "overlock_contmix_backward": [_POINTER] * 14 + [_LONG] * 21,
    },
}
_TASK_ARGUMENTS = [_POINTER, _LONG, _LONG]  # tasks, ntasks, threads


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


def _openmp_runtime() -> Path | None:
    """The GNU OpenMP runtime this process's torch runs on (the `libgomp*.so*` mapped into it), which
    the kernels are linked against so that they run on torch's own threads (csrc/tasks.h): torch's
    own copy where it ships one, else the only one mapped. None where that is not clear (torch on
    macOS's libomp or Intel's libiomp5, or several runtimes mapped), or with
    `OVERLOCK_NATIVE_OPENMP=0`: then the kernels are built without OpenMP and run on overlock's
    thread pool."""
    if _off(OPENMP_ENV):
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return _runtime_among(maps, Path(torch.__file__).parent)


def _runtime_among(maps: str, torch_dir: Path) -> Path | None:
    """`_openmp_runtime`'s choice among the files a /proc/<pid>/maps text lists."""
    mapped = {Path(line.split(maxsplit=5)[-1]) for line in maps.splitlines() if ".so" in line}
    if any(path.name.startswith(("libomp.", "libiomp")) for path in mapped):
        return None
    gnu = sorted(path for path in mapped if path.name.startswith("libgomp") and path.exists())
    torchs = [path for path in gnu if torch_dir in path.parents]
    if torchs:
        return torchs[0]
    return gnu[0] if len(gnu) == 1 else None


def _off(variable: str) -> bool:
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def _commands(source: Path, cc: str, output: str, runtime: Path | None) -> list[list[str]]:
    """The compiler runs that build `source` into `output`. With an OpenMP runtime: compile with
    -fopenmp, then link against that very file (not the compiler's own -lgomp, which may be another
    copy of the runtime: two runtimes, two thread pools)."""
    if runtime is None:
        return [[cc, *flags(), str(source), "-o", output]]
    objects = output + ".o"
    link = [flag for flag in flags() if flag != "-shared"]
    return [
        [cc, *link, "-fopenmp", "-c", str(source), "-o", objects],
        [cc, *flags(), objects, str(runtime), f"-Wl,-rpath,{runtime.parent}", "-o", output],
    ]


def _build(name: str, cc: str, runtime: Path | None) -> Path:
    """Compile csrc/<name>.c (or reuse the cached build) and return the shared library's path."""
    source = SOURCE_DIR / f"{name}.c"
    headers = [header.read_text() for header in sorted(SOURCE_DIR.glob("*.h"))]  # what it may #include
    key = hashlib.sha256(
        "\0".join(
            [source.read_text(), *headers, cc, " ".join(flags()), str(runtime), _cpu_id(), platform.machine()]
        ).encode()
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
        for command in _commands(source, cc, partial, runtime):
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        os.replace(partial, target)  # atomic: another process sees the whole library or none
    finally:
        for leftover in (partial, partial + ".o"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return target


@functools.cache
def _load(name: str) -> tuple[ctypes.CDLL | None, str]:
    if _off(DISABLE_ENV):
        return None, f"{DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    cc = compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    runtime = _openmp_runtime()
    if runtime is not None:
        threads = "tasks on torch's OpenMP threads"
    elif _off(OPENMP_ENV):
        threads = f"tasks on overlock's thread pool: {OPENMP_ENV}={os.environ[OPENMP_ENV]}"
    else:
        threads = "tasks on overlock's thread pool: torch runs on no GNU OpenMP runtime here"
    try:
        try:
            library = ctypes.CDLL(str(_build(name, cc, runtime)))
        except (OSError, subprocess.CalledProcessError) as error:
            if runtime is None:
                raise
            # (a compiler whose OpenMP is not GNU's, e.g. clang's, which calls libomp's entry points)
            library = ctypes.CDLL(str(_build(name, cc, None)))
            threads = f"tasks on overlock's thread pool: the OpenMP build failed ({_first_line(error)})"
    except subprocess.CalledProcessError as error:
        return None, f"{Path(cc).name} failed on csrc/{name}.c: {_first_line(error)}"
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"could not build or load csrc/{name}.c: {error}"
    except ValueError as error:  # shlex: unbalanced quotes
        return None, f"{FLAGS_ENV} does not parse as shell words: {error}"
    for function, argtypes in SIGNATURES[name].items():
        entry = getattr(library, f"{function}_tasks")
        entry.argtypes = argtypes + _TASK_ARGUMENTS
        entry.restype = ctypes.c_int
    return library, f"compiled with {Path(cc).name} {' '.join(flags())}; {threads}"


def _first_line(error: Exception) -> str:
    lines = (getattr(error, "stderr", None) or "").strip().splitlines()
    return lines[0] if lines else str(error)


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


def openmp(name: str) -> bool:
    """Whether csrc/<name>.c runs its tasks on torch's OpenMP threads (else on overlock's pool)."""
    library_ = library(name)
    return library_ is not None and bool(library_.overlock_openmp())


def run(name: str, function: str, tasks: Sequence[tuple[int, ...]], arguments: tuple) -> None:
    """function(*arguments, *tasks[i]) from csrc/<name>.c for every task, through its entry point
    (csrc/tasks.h; each task's index goes with it, for the kernels that write a buffer row per task).
    With torch's thread count above 1 the tasks run at once: in one call on torch's OpenMP threads,
    or, in a library built without OpenMP, one call per task in the shared worker pool
    (kernels/cpu.py; ctypes releases the GIL for the call). Raises MemoryError if a call could not
    allocate its buffers."""
    if not tasks:  # an empty batch
        return
    entry = getattr(library(name), f"{function}_tasks")
    width = 1 + len(tasks[0])
    rows = (ctypes.c_long * (width * len(tasks)))(*(n for index, task in enumerate(tasks) for n in (index, *task)))
    count = workers()
    # While a profiler runs (torch.profiler, `overlock bench --profile`), a named range: ctypes
    # calls are not aten ops, so the profile would not see them otherwise.
    profiled = torch.autograd.profiler._is_profiler_enabled
    with torch.profiler.record_function(function.replace("overlock_", "overlock::", 1)) if profiled else _NO_RANGE:
        if count == 1 or len(tasks) == 1 or openmp(name):
            failed = entry(*arguments, rows, len(tasks), count)
        else:
            row = ctypes.sizeof(ctypes.c_long) * width
            start = ctypes.addressof(rows)
            failed = any(_pool(count).map(lambda i: entry(*arguments, start + i * row, 1, 1), range(len(tasks))))
    if failed:
        raise MemoryError(f"{function}: could not allocate its buffers")

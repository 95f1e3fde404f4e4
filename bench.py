"""Speed and memory of a built model: what `overlock bench` measures (images/s, latency, peak memory, profile).

FLOPs do not predict the speed of this family (large depthwise kernels, dynamic convolutions and
many element-wise layers cost far more per FLOP than 1x1 convolutions), so variants are compared
on measured time too. Everything here works on any `nn.Module` that maps an image batch to logits
(or to the dict/list the OverLoCK forward returns), so benchmarks can run timm models through it.

Timing: `warmup` untimed calls, then up to `reps` timed calls (stopping early once `budget_s` is
spent, after at least three); median and spread (min, max, interquartile range) per call. The
first call is timed on its own (`first_call_s`): it compiles what later calls run (torch.compile;
on a GPU the Triton kernels and their tuning per shape), which can take a minute.

Peak memory (`PeakMemory`): CUDA allocator statistics, or on Linux CPUs the resident-set
high-water mark, reset before the call (glibc malloc_trim, then 5 into /proc/self/clear_refs) and
read back (VmHWM) after it: the peak physical memory the call added above what was resident.
That is what the operating system charges, and it includes memory glibc keeps after a free and
cannot reuse for a larger request (its heap's holes): for OverLoCK, whose many map sizes fragment
the heap, far above the tensors alive at once (`python benchmarks/allocator.py`). So on the CPU a
second number, `LiveMemory`: the peak of the bytes malloc has handed out and not taken back
(glibc's mallinfo2), sampled after every aten op: the tensors alive at once, as the CUDA
allocator's max_memory_allocated counts them, whatever the allocator does with freed memory.

Profile (`profile_step`): torch.profiler with one `record_function` range per module (forward
hooks, so any module tree works). Forward time goes to the innermost module range around each op;
backward time to the module whose forward op created the autograd node (matched by the autograd
sequence number the profiler records for both). Reported per sub-network (the model's children),
per part (modules grouped by their attribute name and class, e.g. `large_kernel (DilatedRepConv)`,
inclusive time, so nested parts overlap) and per operator (ContMix's `overlock::` ops or, where the C
kernels form its logits, `ContMixFromQueries`, and the calls of overlock's C kernels included). On
CUDA the time is the GPU's: each operator is charged its kernels' device time (its CPU time there
is only the asynchronous launches). `PROFILE_CALLS` calls are profiled one by one and the median
one by total is reported, with every call's total beside it. The profiled calls run the path the
timed calls run: the range hooks are marked as observers (builder/layers.py `observer`), which the
fast paths ignore, and a path that does a module's work without calling it (a BN folded into its
conv, GELU -> dwconv -> GRN as one compiled kernel) opens that module's range itself
(`standing_in`), so that work is timed under the module it stands for (the MLP's middle under its
`dwconv`; GELU and GRN then have no rows of their own).

On the CPU, `cpu_kernels` says whether overlock's compiled C kernels ran (kernels/native.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.autograd import DeviceType

from .builder.layers import PROFILE_SCOPE, observer
from .errors import OverlockError
from .kernels import native
from .training.optim import build_optimizer

_SCOPE = "module::"


@dataclass
class BenchSettings:
    """What to measure; the defaults are the issue's CPU measurement (batch 8, 224, inference)."""

    batch_size: int = 8
    img_size: int | tuple[int, int] = 224  # side of a square input, or (height, width)
    device: str = "cpu"
    threads: int | None = None
    train: bool = False
    deploy: bool = False
    amp: bool = False
    compile: bool = False
    channels_last: bool = False
    grad_checkpoint: bool = False
    profile: bool = False
    warmup: int = 2
    reps: int = 10
    budget_s: float = 60.0


@dataclass
class BenchResult:
    name: str
    settings: dict
    device_name: str
    threads: int
    median_s: float
    min_s: float
    max_s: float
    iqr_s: float
    reps: int
    images_per_s: float
    peak_memory_mib: float | None
    peak_memory_method: str
    # On the CPU: the peak of the tensors alive at once (`LiveMemory`), without the allocator's slack.
    live_memory_mib: float | None = None
    profile: dict | None = field(default=None)
    # On the CPU: whether overlock's compiled C kernels ran, or PyTorch's composition and why (kernels.native).
    cpu_kernels: str | None = None
    # The first (untimed) call: it compiles what runs later (torch.compile, the Triton kernels and
    # their tuning per shape on a GPU, cuDNN's algorithm choice), which can take a minute.
    first_call_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@functools.cache
def _glibc() -> ctypes.CDLL:
    """The C library's malloc controls (malloc_trim, mallinfo2); OSError where there is no glibc."""
    return ctypes.CDLL("libc.so.6")


class PeakMemory:
    """Peak memory added by a call: CUDA allocator stats, or the RSS high-water mark on Linux CPUs."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.libc = None
        if self.device.type == "cpu":
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
                self.libc = _glibc()
            except OSError:
                self.libc = None

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated() above the allocation before the call"
        if self.libc is None:
            return "unavailable (needs Linux /proc/self/clear_refs)"
        return "peak resident set (VmHWM after malloc_trim + clear_refs) above the resident set before the call"

    @staticmethod
    def _status(key: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024

    def measure(self, fn: Callable[[], object]) -> float | None:
        """MiB added at the peak of fn()."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        if self.libc is None:
            fn()
            return None
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = self._status("VmRSS")
        fn()
        return max(0, self._status("VmHWM") - before) / 2**20


class _MallocInfo(ctypes.Structure):
    """glibc's `struct mallinfo2` (glibc 2.33 and later)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


class LiveMemory:
    """Peak bytes in use by malloc during a call, above those in use before it (CPU, glibc only).

    In use = handed out by the heap (`uordblks`) plus mmapped chunks (`hblkhd`), read after every
    aten op of the call through a dispatch mode: the peak of the tensors alive at once (every op's
    output is allocated inside the op), which RSS overstates by the heap's holes. Not under
    torch.compile (its graphs' buffers are not ops the mode sees one by one).
    """

    def __init__(self) -> None:
        try:
            self._mallinfo = _glibc().mallinfo2
            self._mallinfo.restype = _MallocInfo
        except (OSError, AttributeError):
            self._mallinfo = None

    @property
    def available(self) -> bool:
        return self._mallinfo is not None

    def in_use(self) -> int:
        info = self._mallinfo()
        return info.uordblks + info.hblkhd

    def measure(self, fn: Callable[[], object]) -> float | None:
        """MiB of tensors alive at the peak of fn(), above those alive before it."""
        if self._mallinfo is None:
            fn()
            return None
        from torch.utils._python_dispatch import TorchDispatchMode

        _dispatch_modes_ready()
        sample = self.in_use
        # Earlier garbage collected first and none during the call: a collection in the middle
        # would free tensors that are not the call's and read as a lower peak.
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        before = peak = sample()

        class _Sampler(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                nonlocal peak
                out = func(*args, **(kwargs or {}))
                peak = max(peak, sample())
                return out

        try:
            with _Sampler():
                fn()
        finally:
            if collecting:
                gc.enable()
        return (peak - before) / 2**20


@functools.cache
def _dispatch_modes_ready() -> None:
    """Enter a dispatch mode once, outside any measurement. The first one of a process imports about
    900 modules (dynamo's, sympy's): some 26 MiB that malloc hands out, which `LiveMemory` counted
    as the measured call's tensors (pico's inference at batch 8 read 40 MiB instead of 15)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Idle(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with _Idle():
        torch.zeros(1).add_(1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, reps: int, budget_s: float) -> list[float]:
    """Seconds per call over up to `reps` calls (at least 3), stopping early once `budget_s` is spent."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        _sync(device)
        tick = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - tick)
    return times


def spread(times: list[float]) -> dict[str, float]:
    """Median, min, max and interquartile range of per-call times."""
    ordered = sorted(times)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "max_s": ordered[-1], "iqr_s": q[2] - q[0]}


def _loss(output: torch.Tensor | dict | list, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the main logits, plus 0.4 x the aux head's when present (OverLoCK's training loss)."""
    if isinstance(output, dict):
        loss = nn.functional.cross_entropy(output["main"], target)
        if "aux" in output:
            loss = loss + 0.4 * nn.functional.cross_entropy(output["aux"], target)
        return loss
    if isinstance(output, (list, tuple)):  # features_only: a stand-in loss that touches every level
        return sum(level.float().square().mean() for level in output)
    return nn.functional.cross_entropy(output, target)


def image_size(settings: BenchSettings) -> tuple[int, int]:
    size = settings.img_size
    return (size, size) if isinstance(size, int) else tuple(size)


def make_step(model: nn.Module, settings: BenchSettings, num_classes: int) -> Callable[[], object]:
    """One inference forward (no grad), or one training step (forward, loss, backward, AdamW as
    `overlock train` builds it)."""
    device = torch.device(settings.device)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    height, width = image_size(settings)
    channels = getattr(getattr(model, "spec", None), "in_channels", 3)
    image = torch.randn(settings.batch_size, channels, height, width, generator=gen)
    image = image.to(device).contiguous(memory_format=memory_format)
    target = torch.randint(0, num_classes, (settings.batch_size,), generator=gen).to(device)
    runner = torch.compile(model) if settings.compile else model

    def autocast():
        if not settings.amp:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    if not settings.train:

        def infer() -> object:
            with torch.inference_mode(), autocast():
                return runner(image)

        return infer

    # `overlock train`'s optimizer (groups, fused kernel where the device has one): the step it runs
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05)

    def train_step() -> object:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = _loss(runner(image), target)
        loss.backward()
        optimizer.step()
        return loss

    return train_step


def prepare(model: nn.Module, settings: BenchSettings) -> nn.Module:
    """Put the model in the measured form: deploy, mode, device, layout, gradient checkpointing."""
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise OverlockError("--device cuda: no CUDA device is available here; use --device cpu")
    if settings.deploy and hasattr(model, "reparameterize"):
        model.reparameterize()
    if settings.deploy and settings.train:
        raise OverlockError("--deploy with --train: the deploy form is for inference; drop one of the two")
    if settings.grad_checkpoint:
        if not settings.train:
            raise OverlockError(
                "--grad-checkpoint without --train: checkpointing changes only a training step "
                "(inference keeps no activations for a backward); add --train or drop the flag"
            )
        if not hasattr(model, "set_grad_checkpointing"):
            raise OverlockError("--grad-checkpoint: this model has no set_grad_checkpointing(); drop the flag")
        model.set_grad_checkpointing(True)
    model.train(settings.train)
    model.to(settings.device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[int]:
    """Run with `count` intra-op threads (None: leave torch's setting), restoring it afterwards."""
    before = torch.get_num_threads()
    if count is not None:
        if count < 1:
            raise OverlockError(f"--threads {count}: give a positive number of threads")
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from .kernels.native import cpuinfo_value

    return cpuinfo_value("model name") or "CPU"


def warm_up(step: Callable[[], object], settings: BenchSettings) -> None:
    """One untimed call; with --compile, a compiler failure is the user's one-screen error, not a traceback
    (the compiler's own messages stay above it in the log)."""
    if not settings.compile:
        step()
        return
    try:
        step()
    except Exception as exc:  # torch._dynamo / inductor errors have no common public base class
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise OverlockError(
            f"--compile: torch.compile failed ({type(exc).__name__}: {reason[:300]}); "
            "run without --compile to measure the eager model"
        ) from None


def bench(model: nn.Module, settings: BenchSettings, name: str = "", num_classes: int | None = None) -> BenchResult:
    """Measure `model` as `settings` say (the model is changed in place: mode, device, form).

    `num_classes` (for the training targets) defaults to an OverLoCK model's head, else 1000.
    """
    device = torch.device(settings.device)
    if num_classes is None:
        head = getattr(getattr(model, "spec", None), "head", None)
        num_classes = getattr(head, "num_classes", None) or 1000
    with threads(settings.threads) as count:
        model = prepare(model, settings)
        step = make_step(model, settings, num_classes)
        started = time.perf_counter()
        warm_up(step, settings)
        _sync(device)
        first_call = time.perf_counter() - started
        for _ in range(max(1, settings.warmup) - 1):
            warm_up(step, settings)
        times = timed(step, device, settings.reps, settings.budget_s)
        memory = PeakMemory(device)
        peak = memory.measure(step)
        live = None
        if device.type == "cpu" and not settings.compile:
            live = LiveMemory().measure(step)
        profile = profile_step(model, step, device) if settings.profile else None
    stats = spread(times)
    return BenchResult(
        name=name,
        settings=asdict(settings),
        device_name=device_name(device),
        threads=count,
        reps=len(times),
        images_per_s=settings.batch_size / stats["median_s"],
        peak_memory_mib=peak,
        peak_memory_method=memory.method,
        live_memory_mib=live,
        profile=profile,
        cpu_kernels=native.summary() if device.type == "cpu" else None,
        first_call_s=first_call,
        **stats,
    )


# --- profile --------------------------------------------------------------------------------------


@contextlib.contextmanager
def module_scopes(model: nn.Module) -> Iterator[None]:
    """A profiler range named `module::<qualified name>` around every module's forward."""
    handles = []
    open_ranges: dict[int, list] = defaultdict(list)

    def enter(name: str):
        @observer
        def hook(module, args):
            open_ranges[id(module)].append(torch.ops.profiler._record_function_enter_new(_SCOPE + name, None))

        return hook

    @observer
    def leave(module, args, output):
        stack = open_ranges[id(module)]
        if stack:
            torch.ops.profiler._record_function_exit._RecordFunction(stack.pop())

    names = {module: name or "<model>" for name, module in model.named_modules()}

    def stand_in(module: nn.Module) -> contextlib.AbstractContextManager:
        name = names.get(module)
        return torch.profiler.record_function(_SCOPE + name) if name else contextlib.nullcontext()

    for module, name in names.items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    token = PROFILE_SCOPE.set(stand_in)
    try:
        yield
    finally:
        PROFILE_SCOPE.reset(token)
        for handle in handles:
            handle.remove()


def _innermost_scope(event) -> str | None:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(_SCOPE):
            return parent.name[len(_SCOPE) :]
        parent = parent.cpu_parent
    return None


def _op_events(events) -> list:
    """Top-level operator events (not module ranges, not nested inside another operator, not the
    GPU kernels themselves: their time counts in the operator that launched them)."""
    tops = []
    for event in events:
        if event.name.startswith(_SCOPE) or event.name.startswith("ProfilerStep"):
            continue
        if event.device_type != DeviceType.CPU:
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name.startswith(_SCOPE):
            parent = parent.cpu_parent
        if parent is None:
            tops.append(event)
    return tops


def attribute(events, device_time: bool = False) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Seconds per innermost module ({name: {"forward", "backward"}}) and per top-level operator.

    device_time: count each operator's GPU kernels' time (what a GPU step costs; its CPU time is
    only the launches), else its CPU time."""
    per_module: dict[str, dict[str, float]] = defaultdict(lambda: {"forward": 0.0, "backward": 0.0})
    per_op: dict[str, float] = defaultdict(float)
    owner_of_sequence: dict[int, str] = {}
    backward_prefix = "autograd::engine::evaluate_function: "
    for event in events:  # forward ops (nested ones too) name the owner of each autograd sequence number
        if event.name.startswith(backward_prefix) or getattr(event, "sequence_nr", -1) < 0:
            continue
        scope = _innermost_scope(event)
        if scope is not None:
            owner_of_sequence.setdefault(event.sequence_nr, scope)
    tops = _op_events(events)
    for event in tops:
        seconds = (event.device_time_total if device_time else event.cpu_time_total) / 1e6
        if event.name.startswith(backward_prefix):
            node = event.name[len(backward_prefix) :]
            per_op[f"{node} (backward)"] += seconds
            owner = owner_of_sequence.get(event.sequence_nr, "<unattributed>")
            per_module[owner]["backward"] += seconds
        else:
            per_op[event.name] += seconds
            per_module[_innermost_scope(event) or "<outside modules>"]["forward"] += seconds
    return dict(per_module), dict(per_op)


def _part_key(name: str, module: nn.Module) -> str:
    """`mlp (ConvMLP)`: the module's last non-numeric attribute name and its class."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    return f"{parts[-1] if parts else '<model>'} ({type(module).__name__})"


# Calls `profile_step` profiles; it reports the one whose total is their median. On a shared machine
# one call now and then runs several times slower in some ops (seen here: the dilated depthwise
# convs of one training step 10x slower than in the steps around it), and one profiled call would
# put that in the table.
PROFILE_CALLS = 3


def _profile_call(
    model: nn.Module, step: Callable[[], object], device: torch.device | None, on_gpu: bool
) -> tuple[dict, dict]:
    """`attribute` of one profiled call of `step`, in a profiler session of its own."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with module_scopes(model), profile(activities=activities) as prof:
        step()
        _sync(device or torch.device("cpu"))
    return attribute(prof.events(), device_time=on_gpu)


def profile_step(
    model: nn.Module, step: Callable[[], object], device: torch.device | None = None, calls: int = PROFILE_CALLS
) -> dict:
    """Profile `calls` calls of `step` and report the median one (by total): seconds per sub-network,
    per part and per operator (see module doc), and every call's total (`call_totals_s`), so the
    spread shows. One call's breakdown, not medians per row: those would not add up to a total.
    On CUDA the seconds are the GPU kernels' time, each charged to the operator that launched it."""
    on_gpu = device is not None and device.type == "cuda"
    profiled = []
    for _ in range(max(1, calls)):
        per_module, per_op = _profile_call(model, step, device, on_gpu)
        total = sum(t["forward"] + t["backward"] for t in per_module.values())
        profiled.append((total, per_module, per_op))
    totals = [total for total, _, _ in profiled]
    total, per_module, per_op = sorted(profiled, key=lambda entry: entry[0])[(len(profiled) - 1) // 2]
    modules = dict(model.named_modules())

    def inclusive(prefix: str) -> dict[str, float]:
        total = {"forward": 0.0, "backward": 0.0}
        for name, times in per_module.items():
            if name == prefix or name.startswith(prefix + "."):
                for key in total:
                    total[key] += times[key]
        return total

    subnets = {name: inclusive(name) for name, _ in model.named_children()}
    subnets["<model itself>"] = per_module.get("<model>", {"forward": 0.0, "backward": 0.0})
    parts: dict[str, dict[str, float]] = defaultdict(lambda: {"forward": 0.0, "backward": 0.0, "count": 0})
    for name, module in modules.items():
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # containers only repeat their children
            continue
        if not name or not any(k == name or k.startswith(name + ".") for k in per_module):
            continue
        times = inclusive(name)
        entry = parts[_part_key(name, module)]
        entry["forward"] += times["forward"]
        entry["backward"] += times["backward"]
        entry["count"] += 1
    return {
        "clock": "GPU kernels" if on_gpu else "CPU",
        "total_s": total,
        "call_totals_s": totals,
        "subnetworks": subnets,
        "parts": dict(parts),
        "operators": dict(sorted(per_op.items(), key=lambda kv: -kv[1])),
        "unattributed_s": sum(per_module.get(k, {}).get("backward", 0.0) for k in ("<unattributed>",))
        + sum(per_module.get(k, {}).get("forward", 0.0) for k in ("<outside modules>",)),
    }


# `render` says how long the first call took where it took this many times a timed call, and at
# least this many seconds (a first call always does some one-time work: below that, none worth a line).
FIRST_CALL_NOTE = 3
FIRST_CALL_NOTE_S = 1.0


def render(result: BenchResult) -> list:
    """Rich renderables of a result: the timing summary, and with a profile its total and the three breakdowns."""
    from rich.table import Table
    from rich.text import Text

    s = result.settings
    form = "training step" if s["train"] else ("inference, deploy form" if s["deploy"] else "inference")
    extras = [flag for flag in ("amp", "compile", "channels_last", "grad_checkpoint") if s[flag]]
    size = "x".join(map(str, image_size(BenchSettings(img_size=s["img_size"]))))
    title = (
        f"{result.name}: {form}, batch {s['batch_size']}, {size}, {result.device_name}, "
        f"{result.threads} thread(s)" + (f", {', '.join(extras)}" if extras else "")
    )
    summary = Table(title=title, title_justify="left")
    columns = ["images/s", "median ms", "min ms", "max ms", "IQR ms", "reps", "peak MiB"]
    cells = [
        f"{result.images_per_s:.2f}",
        *(f"{1e3 * v:.1f}" for v in (result.median_s, result.min_s, result.max_s, result.iqr_s)),
        str(result.reps),
        "n/a" if result.peak_memory_mib is None else f"{result.peak_memory_mib:,.0f}",
    ]
    if result.live_memory_mib is not None:
        columns.append("live tensors MiB")
        cells.append(f"{result.live_memory_mib:,.0f}")
    for column in columns:
        summary.add_column(column, justify="right")
    summary.add_row(*cells)
    if result.cpu_kernels:
        summary.caption = f"C kernels: {result.cpu_kernels}"
        if result.live_memory_mib is not None:
            summary.caption += (
                "\npeak MiB: resident memory added; live tensors MiB: tensors alive at once (no allocator slack)"
            )
        summary.caption_justify = "left"
    tables = [summary]
    worth_a_line = max(FIRST_CALL_NOTE * result.median_s, FIRST_CALL_NOTE_S)
    if result.first_call_s is not None and result.first_call_s > worth_a_line:
        tables.append(
            Text(
                f"first call: {result.first_call_s:,.1f} s (one-time work: compiling and tuning for these "
                "shapes; not in the timings)"
            )
        )
    if not result.profile:
        return tables
    profile = result.profile
    total = max(profile["total_s"], 1e-12)

    def breakdown(title: str, rows: dict[str, dict], limit: int | None = None) -> Table:
        table = Table(title=title, title_justify="left")
        for column in ("", "forward ms", "backward ms", "share"):
            table.add_column(column, justify="left" if not column else "right")
        ordered = sorted(rows.items(), key=lambda kv: -(kv[1]["forward"] + kv[1]["backward"]))
        for name, times in ordered[:limit]:
            both = times["forward"] + times["backward"]
            label = f"{name} x{times['count']}" if times.get("count", 1) > 1 else name
            table.add_row(
                label, f"{1e3 * times['forward']:.1f}", f"{1e3 * times['backward']:.1f}", f"{100 * both / total:.1f}%"
            )
        return table

    # (a line of its own: as a table's title it would wrap at the narrow table's width)
    calls = profile.get("call_totals_s") or [total]
    which = f"the median of {len(calls)} calls" if len(calls) > 1 else "one call"
    clock = profile.get("clock", "CPU")
    tables.append(Text(f"profile: {which}, {1e3 * total:,.0f} ms of operators ({clock} time)"))
    if len(calls) > 1:
        tables.append(Text(f"the calls' totals: {', '.join(f'{1e3 * t:,.0f}' for t in calls)} ms"))
    tables.append(breakdown("by sub-network", profile["subnetworks"]))
    tables.append(breakdown("by part (inclusive; nested parts overlap)", profile["parts"], limit=30))
    ops = Table(title="by operator (forward ops, and backward nodes)", title_justify="left")
    ops.add_column("")
    ops.add_column("ms", justify="right")
    ops.add_column("share", justify="right")
    for name, seconds in list(profile["operators"].items())[:15]:
        ops.add_row(name, f"{1e3 * seconds:.1f}", f"{100 * seconds / total:.1f}%")
    tables.append(ops)
    return tables

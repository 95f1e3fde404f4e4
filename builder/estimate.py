"""Memory a spec needs, estimated before anything is allocated, and a clear refusal when it cannot fit.

A spec that validates can still describe a network far larger than the machine (`overview.width=24000`,
`depth=1000000`, a 4096 px input): building or running it would swap, hang or die in the allocator.
So before `build()`, `overlock flops` and `overlock train` allocate, `check_fits` estimates:

- parameters, exactly: the model is built on the meta device (no memory), once with every stage at
  depth 1 and once per stage with that stage at depth 2. Parameters are linear in each stage's depth,
  so these few small builds give the count of any depth, even 10^6, in well under a second;
- activations, from a meta forward of the same small models at the real input size (the ContMix ops
  have fake implementations), extrapolated in depth the same way: the most bytes alive at once,
  doubled (`LIVE_MARGIN`) for what the meta forward cannot see (kernels' own workspaces, a
  backward's temporaries, allocator fragmentation: a CPU step's resident peak is 1.2-2.3x its live
  tensors). For training, that of a training forward whose graph is kept (what it holds for the
  backward, and its temporaries). The meta forward takes the model's saved-tensor hooks
  (`layers.recompute_saved`: the maps a real step remakes in its backward are not held), but none
  of the compiled CPU ops, which keep less still (the fused MLP middle, ContMix's logits formed in
  the kernel): it holds 1.6-3.2x the tensors a real CPU step has alive, and a whole step is estimated
  at 1.8-3.2x its measured CPU peak (pico, XT and T at 64-224 px; XT and T 1.8-2.2x, where the meta
  forward without the hooks and the margin read 2.0-2.7x: benchmarks/results/memory_estimate.md).
  Without the hooks it held 2.8x more for XT (187 against 66 MiB per image at 224); counting every
  tensor an operator returns, as the first version did, 1.5x more again. A traced forward (`overlock
  flops`, which records every output) is still counted that way. For inference, which frees each
  tensor after its last use, counting every output made `eval` of XT at its default batch of 128
  look like 35 GiB when it needs about 2. With gradient checkpointing (`overlock train
  --grad-checkpoint`), what a checkpointed forward keeps (each block's input) plus the largest
  block's whole graph, which its recomputation holds in the backward: 1.6-2.5x the measured peak.

benchmarks/memory_estimate.py compares both with measured peaks (benchmarks/results/memory_estimate.md).

The limit is 3/4 of the memory available now (MemAvailable on Linux), free GPU memory for CUDA runs, or
`OVERLOCK_MEMORY_LIMIT` (e.g. `64G`; `off` turns the check off).
"""

from __future__ import annotations

import contextlib
import os
import re
import weakref
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..archspec import DDSSpec, Spec, load
from ..errors import SpecError

LIMIT_ENV = "OVERLOCK_MEMORY_LIMIT"
AVAILABLE_FRACTION = 0.75
#: Bytes per parameter: fp32 weights; training adds the gradient, AdamW's two moments and one
#: parameter-sized temporary of its multi-tensor (foreach) step, the default on GPUs.
WEIGHT_BYTES, TRAINING_BYTES = 4, 20
#: Activations: the peak of live tensors in the meta forward times this, for inference and training
#: (measured on CPU: resident peaks 1.2-2.3x the tensors alive at once, glibc's heap fragments; see
#: benchmarks/results/memory_estimate.md).
LIVE_MARGIN = 2

# Tensor factories that `torch.device("meta")` would redirect; small index helpers (linspace,
# arange) stay on the CPU so that builder code such as `linspace(...).tolist()` keeps working.
_FACTORIES = {
    torch.empty,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.empty_like,
    torch.zeros_like,
    torch.ones_like,
}


class _MetaFactories(TorchFunctionMode):
    """Builds on the meta device; weight initialisation (in-place ops on meta tensors) is skipped.

    Meta tensors have no data, so initialising them computes nothing, yet `trunc_normal_` on meta goes
    through torch's slow reference implementations (most of a meta build's time).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and args and getattr(args[0], "is_meta", False):
            return args[0]
        return func(*args, **kwargs)


class _ForwardBytes(TorchDispatchMode):
    """Bytes of a forward's operator outputs: every one's (`total`, what a traced forward keeps) and
    the most alive at once (`peak`: an inference forward frees each after its last use; a training
    forward's graph keeps what the backward needs).

    Meta tensors die when real ones would (Python and autograd references alike), so a weak
    reference per new tensor tracks its lifetime. Views and in-place results own no new memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = self.live = self.peak = 0
        self.owned: set[int] = set()

    def _free(self, key: int, size: int) -> None:
        self.owned.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, tuple | list) else (out,):
            if not isinstance(item, torch.Tensor):
                continue
            size = item.numel() * item.element_size()
            self.total += size
            if not item._is_view() and id(item) not in self.owned:
                self.owned.add(id(item))
                self.live += size
                weakref.finalize(item, self._free, id(item), size)
        self.peak = max(self.peak, self.live)
        return out


@dataclass
class Estimate:
    params: int
    activation_bytes_per_image: int | None  # every output of a training forward; None: not estimated
    inference_bytes_per_image: int | None = None  # inference: peak of live tensors x LIVE_MARGIN
    training_bytes_per_image: int | None = None  # training: the same, the graph kept

    def bytes(self, *, training: bool = False, batch: int = 1, keeps_outputs: bool = False) -> int:
        """Bytes for `batch` images: the weights (with gradients and AdamW's moments when training)
        and the activations of a training step, of an inference forward, or where something keeps
        every output of the forward (`keeps_outputs`: a traced forward), all of them. A figure not
        estimated falls back to every output, which bounds the others."""
        weights = self.params * (TRAINING_BYTES if training else WEIGHT_BYTES)
        if keeps_outputs:
            per_image = self.activation_bytes_per_image
        elif training:
            per_image = self.training_bytes_per_image
        else:
            per_image = self.inference_bytes_per_image
        if per_image is None:
            per_image = self.activation_bytes_per_image
        return weights + batch * (per_image or 0)


def _stages(spec: Spec) -> list[str]:
    """Dotted paths of every stage with a depth."""
    return [path for path, _, _ in spec.stages_in_order()]


def meta_build(spec: Spec, deploy: bool = False) -> torch.nn.Module:
    """The model of `spec` on the meta device: shapes and parameter counts, no memory, no values."""
    from . import MODELS

    with _MetaFactories():
        return MODELS[spec.topology](spec, deploy=deploy)


def _measure(
    spec: Spec, image_size: tuple[int, int] | None, training: bool | None, grad_checkpoint: bool = False
) -> tuple[int, int, int, int]:
    """Parameters; bytes of every output of a training forward; peak live bytes of an inference
    forward; peak live bytes of a training forward with its graph kept (`grad_checkpoint`: of a
    checkpointed one, and what the recomputation of its largest block adds in the backward).

    `training` None measures both forwards, True or False only the one needed (each meta forward of
    a large model takes seconds).
    """
    model = meta_build(spec)
    params = sum(p.numel() for p in model.parameters())
    if image_size is None:
        return params, 0, 0, 0
    image = torch.empty(1, spec.in_channels, *image_size, device="meta")
    input_bytes = image.numel() * 4  # the batch itself is in memory during the step too
    outputs = live = kept = 0
    if training is not False:
        model.train()
        if grad_checkpoint:
            model.set_grad_checkpointing(True)
        blocks = _BlockInputs(model) if grad_checkpoint else contextlib.nullcontext([])
        with blocks as calls, _ForwardBytes() as counter:
            out = model(image)  # (held: its graph keeps what the backward needs until the peak is read)
        outputs, kept = counter.total + input_bytes, counter.peak + input_bytes
        del out
        if grad_checkpoint:
            kept += max((_block_graph_bytes(block, inputs) for block, inputs in calls), default=0)
    if training is not True:
        model.eval()
        tracker = _ForwardBytes()
        with torch.no_grad(), tracker:
            model(image)
        live = tracker.peak + input_bytes
    return params, outputs, live, kept


class _BlockInputs:
    """The blocks a checkpointed model runs (`network.Checkpointed`) and the shapes they are called
    with: shapes only, as a held input would count as alive in the forward being measured."""

    def __init__(self, model: torch.nn.Module) -> None:
        from .network import Checkpointed

        self.blocks = [b for m in model.modules() if isinstance(m, Checkpointed) for b in m.blocks]
        self.calls: list[tuple[torch.nn.Module, list]] = []

    def _record(self, block: torch.nn.Module, args: tuple) -> None:
        shapes = [(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
        self.calls.append((block, shapes))

    def __enter__(self) -> list[tuple[torch.nn.Module, list]]:
        self.handles = [block.register_forward_pre_hook(self._record) for block in self.blocks]
        return self.calls

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def _block_graph_bytes(block: torch.nn.Module, shapes: list) -> int:
    """Peak live bytes of one block's training forward with its whole graph kept: what a checkpoint
    holds while it recomputes the block in the backward (the remaking hooks off, as it runs them)."""
    from .layers import recomputation_off

    inputs = [
        torch.empty_strided(a[0], a[1], dtype=a[2], device="meta", requires_grad=True) if isinstance(a, tuple) else a
        for a in shapes
    ]
    with recomputation_off(), _ForwardBytes() as counter:
        out = block(*inputs)
    del out
    return counter.peak


def estimate(
    spec: Spec, image_size: tuple[int, int] | None = None, training: bool | None = None, grad_checkpoint: bool = False
) -> Estimate:
    """Parameters (exact) and, given an input size, activation bytes per image (upper bounds).

    Training: the most bytes alive in a training forward whose graph is kept, times LIVE_MARGIN,
    and every tensor it returns (for a traced forward). Inference: the most alive at once, times
    LIVE_MARGIN.
    `training` True or False estimates only that one (None: both). All are extrapolated in depth from
    depth-1 and depth-2 stages; a stage whose blocks run one after the other adds little or nothing
    to the inference peak, so that difference is taken as it is (at least 0). `grad_checkpoint`: the
    training figures are those of `model.set_grad_checkpointing(True)`.
    """
    if spec.head.num_classes is None:
        spec = load(spec, ["head.num_classes=1"])
    stages = _stages(spec)
    shallow = load(spec, [f"{stage}.depth=1" for stage in stages])
    base_params, base_act, base_live, base_kept = _measure(shallow, image_size, training, grad_checkpoint)
    params, act, live, kept = base_params, base_act, base_live, base_kept
    for stage in stages:
        depth = _depth(spec, stage)
        if depth > 1:
            deeper = load(shallow, [f"{stage}.depth=2"])
            p2, a2, l2, k2 = _measure(deeper, image_size, training, grad_checkpoint)
            params += (depth - 1) * (p2 - base_params)
            act += (depth - 1) * (a2 - base_act)
            live += (depth - 1) * max(0, l2 - base_live)
            kept += (depth - 1) * max(0, k2 - base_kept)
    if image_size is None:
        return Estimate(params, None)
    return Estimate(
        params,
        act if training is not False else None,
        LIVE_MARGIN * live if training is not True else None,
        LIVE_MARGIN * kept if training is not False else None,
    )


def rough_estimate(spec: Spec, image_size: tuple[int, int] | None = None) -> Estimate:
    """An over-estimate from widths, depths and resolutions alone (microseconds, no torch).

    Used only to skip the exact measurement for models that are obviously small (4x below the limit):
    within a factor of 2 of the exact value, or above it, for the shipped presets and the odd specs of
    tests/test_memory_estimate.py.
    """
    height, width = image_size or (0, 0)
    params = act = 0
    for (path, stage, full), down in zip(spec.stages_in_order(), _strides(spec), strict=True):
        hidden = full * stage.mlp_ratio
        k = getattr(spec.resolved_block(path).mixer, "kernel_size", None) or 3
        kernels = 2 * k**2 + getattr(stage, "small_kernel_size", 0) ** 2 + 64
        params += stage.depth * int(4 * full * full + 2 * full * hidden + full * kernels)
        pixels = -(-height // down) * -(-width // down)
        act += stage.depth * int(full * (120 + 12 * stage.mlp_ratio) + 12 * kernels) * pixels * 4
    last = spec.stages_in_order()[-1][2]
    classes = spec.head.num_classes or 1
    projection = spec.head.projection or last
    aux = spec.overview.width if isinstance(spec, DDSSpec) else 0
    params += 2 * (last * projection + (projection + aux) * classes)
    first = spec.stages_in_order()[0][1].width
    params += 2 * spec.stem_width * (spec.in_channels + spec.stem_width * 3 + first) * 9
    act += 8 * spec.stem_width * height * width * 4
    return Estimate(params, act if image_size is not None else None)


def _strides(spec: Spec) -> list[int]:
    """Downsampling factor of every stage of `spec.stages_in_order()`."""
    if not isinstance(spec, DDSSpec):
        return [4 * 2**i for i in range(len(spec.stages))]
    overview = 4 * 2 ** len(spec.base.stages)
    return [
        *(4 * 2**i for i in range(len(spec.base.stages))),
        overview,
        *(overview // 2 * 2**i for i in range(len(spec.focus.stages))),
    ]


def _depth(spec: Spec, stage: str) -> int:
    node = spec
    for part in stage.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node.depth


def memory_limit(device: torch.device | None = None) -> int | None:
    """Bytes the check allows: OVERLOCK_MEMORY_LIMIT, else what the device has free; None: no check."""
    setting = os.environ.get(LIMIT_ENV, "").strip()
    if setting:
        if setting.lower() in ("off", "none", "0"):
            return None
        return parse_size(setting)
    if device is not None and device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * AVAILABLE_FRACTION)
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    # Not all of it: initialisation and the allocator need room beyond the tensors themselves, and a
    # machine pushed to its last byte swaps or kills something else.
    return int(available * AVAILABLE_FRACTION)


def _limit_source(device: torch.device | None) -> str:
    if os.environ.get(LIMIT_ENV, "").strip():
        return f"{LIMIT_ENV}"
    where = "GPU memory free" if device is not None and device.type == "cuda" else "memory available"
    return f"3/4 of the {where} now"


def parse_size(text: str) -> int:
    """'64G', '512M', '1.5T', '1000000' -> bytes (powers of 1024)."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not found:
        raise SpecError(f"{LIMIT_ENV}={text!r}: expected a size such as 64G, 512M or off")
    return int(float(found.group(1)) * 1024 ** " kmgt".index(found.group(2) or " "))


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(
    spec: Spec,
    what: str,
    *,
    image_size: tuple[int, int] | None = None,
    batch: int = 1,
    training: bool = False,
    traced: bool = False,
    grad_checkpoint: bool = False,
    device: torch.device | None = None,
) -> Estimate | None:
    """Refuse (SpecError) when `what` needs more memory than the limit; the estimate otherwise.

    `grad_checkpoint`: the training step runs with `model.set_grad_checkpointing(True)`, which
    keeps far less (T at 1280x384: 0.48x the tensors alive), so it is estimated that way.

    `traced`: the forward is recorded (`overlock flops` traces it with fvcore), which keeps every
    output alive, so every output is counted: `flops pico --input-size 2048` peaked at about 2.3 GiB, against
    0.6 GiB estimated for an inference forward and 3.1 GiB counting every output.
    """
    limit = memory_limit(device)
    if limit is None:
        return None
    if 4 * rough_estimate(spec, image_size).bytes(training=training, batch=batch) < limit:
        return None  # obviously small: not worth the exact measurement
    found = estimate(spec, image_size, training=training or traced, grad_checkpoint=training and grad_checkpoint)
    need = found.bytes(training=training, batch=batch, keeps_outputs=traced)
    if need > limit:
        parts = [f"{found.params:,} parameters ({gib(found.params * (TRAINING_BYTES if training else WEIGHT_BYTES))}"]
        parts[0] += " with gradients and optimizer state)" if training else ")"
        if image_size is not None:
            activations = need - found.bytes(training=training, batch=0, keeps_outputs=traced)
            parts.append(f"activations {gib(activations)} ({batch} x {image_size[0]}x{image_size[1]})")
        checkpointing = (
            ", turn on gradient checkpointing (--grad-checkpoint)" if training and not grad_checkpoint else ""
        )
        raise SpecError(
            f"{what} needs about {gib(need)} of memory ({'; '.join(parts)}), more than the limit of "
            f"{gib(limit)} ({_limit_source(device)}); reduce widths, depths, mlp_ratio, the image or batch size"
            f"{checkpointing}, or set {LIMIT_ENV} (e.g. 64G, or off) to override"
        )
    return found

"""Compile overlock's Triton kernels ahead of time for an NVIDIA GPU, without one, and read what they cost.

Why this exists: CI runs the kernels through Triton's interpreter, which checks their numbers but
neither that they compile for a real GPU (the interpreter accepts code the compiler rejects) nor
what they cost in registers. A kernel that needs more registers than the SM grants spills to local
memory and runs several times slower. Triton ships ptxas for its CUDA backend, so
both questions have answers on any machine: this module compiles exactly the variants the
launchers would launch (`triton_kernels.launch_configs`) for a target architecture and reads
ptxas's report of each: registers, stack frame, spill stores and loads, and shared memory.

    python -m overlock.kernels.triton_aot 14:13:16 7:7:16 --dtype bfloat16 --arch 90

prints one JSON object per compiled kernel (shapes are WIDTH:K:C). It needs a process where
TRITON_INTERPRET is unset: under the interpreter `triton.jit` makes interpreted functions, which
cannot be compiled.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_kernels

_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
# bias table, statistics, bias gradient; the depthwise weight gradient's partial sums
_FLOAT32_POINTERS = ("rpb_ptr", "lse_ptr", "drpb_ptr", "delta_ptr", "part_ptr")


@dataclass(frozen=True)
class KernelResources:
    """One compiled kernel: its launch parameters, per-thread registers, stack frame and spill traffic
    (bytes of spill stores + loads, ptxas's count), and shared memory per program."""

    kernel: str
    config: dict
    registers: int
    stack_bytes: int
    spill_bytes: int
    shared_bytes: int


def _signature(fn, dtype: torch.dtype, constexprs: dict) -> dict[str, str]:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _FLOAT32_POINTERS else _POINTER_TYPES[dtype]
        else:
            signature[name] = "i32"  # sizes and strides (the launcher passes Python ints)
    return signature


def _ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """ptxas -v on the kernel's PTX, with the flags Triton uses: registers, stack frame and spill bytes."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        command = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2"]
        command += [f"--gpu-name={sm_arch_from_capability(arch)}", str(source), "-o", str(Path(tmp) / "kernel.o")]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    numbers = {
        "registers": re.search(r"Used (\d+) registers", log),
        "stack": re.search(r"(\d+) bytes stack frame", log),
        "spill_stores": re.search(r"(\d+) bytes spill stores", log),
        "spill_loads": re.search(r"(\d+) bytes spill loads", log),
    }
    missing = [name for name, match in numbers.items() if match is None]
    if missing:
        raise RuntimeError(f"could not read {', '.join(missing)} from the ptxas log:\n{log}")
    return {name: int(match.group(1)) for name, match in numbers.items()}


def compile_ahead(
    width: int,
    kernel_size: int,
    channels: int,
    dtype: torch.dtype = torch.float32,
    *,
    softmax: bool = True,
    arch: int = 90,
    num_warps: int = 4,
    neighborhood: bool = False,
    depthwise: bool = False,
) -> list[KernelResources]:
    """Compile the forward and both backward kernels of one call shape for `sm_<arch>`; return their resources.

    softmax=True is the fused `contmix`, False the plain `aggregate`; neighborhood=True compiles the
    neighbourhood-attention kernels instead (triton_neighborhood.py; softmax then means "with a bias"),
    depthwise=True the depthwise convolution's (triton_depthwise.py; a width x width map, channels C).
    Raises RuntimeError when the kernels were defined for the interpreter, or when the CUDA tools are missing.
    """
    if triton_kernels.INTERPRETED:
        raise RuntimeError(
            "the Triton kernels were defined under TRITON_INTERPRET=1; compile them in a process without it"
        )
    if dtype not in _POINTER_TYPES:
        raise ValueError(f"dtype must be one of {sorted(str(d) for d in _POINTER_TYPES)}, got {dtype}")
    target = GPUTarget("cuda", arch, 32)
    results = []
    if depthwise:  # every autotuning config, each with its own warps
        from . import triton_depthwise as module

        variants = module.aot_variants(width, kernel_size, channels)
    else:
        module = triton_kernels
        if neighborhood:
            from . import triton_neighborhood as module
        configs = module.launch_configs(width, kernel_size, channels, softmax)
        variants = [(name, config, num_warps) for name, config in configs.items()]
    for name, config, warps in variants:
        fn = getattr(module, name)
        source = ASTSource(fn, _signature(fn, dtype, config), constexprs=config)
        compiled = triton.compile(source, target=target, options={"num_warps": warps})
        usage = _ptxas_report(compiled.asm["ptx"], arch)
        results.append(
            KernelResources(
                name,
                dict(config) if warps == num_warps else {**config, "num_warps": warps},
                usage["registers"],
                usage["stack"],
                usage["spill_stores"] + usage["spill_loads"],
                compiled.metadata.shared,
            )
        )
    return results


def _shape(text: str) -> tuple[int, int, int]:
    try:
        width, kernel_size, channels = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTH:K:C (three integers), got {text!r}") from None
    return width, kernel_size, channels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="+", type=_shape, help="call shapes as WIDTH:K:C (map width, kernel, channels)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    parser.add_argument("--aggregate", action="store_true", help="the plain aggregation instead of the fused op")
    parser.add_argument("--neighborhood", action="store_true", help="the neighbourhood-attention kernels instead")
    parser.add_argument("--depthwise", action="store_true", help="the depthwise-convolution kernels instead")
    args = parser.parse_args(argv)
    for width, kernel_size, channels in args.shapes:
        for item in compile_ahead(
            width,
            kernel_size,
            channels,
            getattr(torch, args.dtype),
            softmax=not args.aggregate,
            arch=args.arch,
            neighborhood=args.neighborhood,
            depthwise=args.depthwise,
        ):
            print(json.dumps({"width": width, "kernel_size": kernel_size, "channels": channels, **asdict(item)}))


if __name__ == "__main__":
    main()

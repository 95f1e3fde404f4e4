"""Process-group setup for `torchrun` and the few collectives the training loop needs.

Under `torchrun --nproc-per-node N -m overlock.cli train ...` every process runs the same
command; torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) tells this
module to join a process group: gloo on CPU, nccl on CUDA. Without it, `Dist` is a single
process and every collective is a no-op, so the loop has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, OverlockError


@dataclass
class Dist:
    """Rank, world size and device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all processes (float64, so counts stay exact)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_agree(self, ok: bool) -> bool:
        """True when every process reports ok; lets all ranks stop together after one fails a check."""
        if not self.distributed:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def gather(self, value: Any) -> list[Any]:
        """`value` from every rank, in rank order (on every rank)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics).

        DDP broadcasts them at the start of each forward, so after the last step of an epoch
        each rank holds statistics of its own last batch; evaluating and checkpointing after this
        call makes all ranks agree, down to the last bit of the state dict.
        """
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.initialized and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized = False


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """The device for `--device auto|cpu|cuda` on this process."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def setup(device_choice: str = "auto") -> Dist:
    """Join the torchrun process group if this process was started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if world_size <= 1:
        return Dist(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=10))
    except Exception as error:
        raise OverlockError(
            f"cannot join the {backend} process group (RANK/WORLD_SIZE/MASTER_ADDR from torchrun): {error}"
        ) from None
    return Dist(rank=dist.get_rank(), world_size=world_size, local_rank=local_rank, device=device, initialized=True)

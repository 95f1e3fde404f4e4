"""Samplers: a resumable, rank-sharded training order and an exact validation shard.

The training order per epoch is torch's `DistributedSampler` (seeded shuffle by seed + epoch,
sharded by rank; with one process it is a plain seeded shuffle). This wrapper adds what resume
needs: it can start an epoch after its first `skip` batches, and it yields `(index, epoch)` pairs
so the dataset derives each sample's augmentation from them (see `data.TrainView`).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler
from torch.utils.data.distributed import DistributedSampler


class ResumableSampler(Sampler[tuple[int, int]]):
    """Shuffled, sharded training order that can resume mid-epoch at a batch boundary."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.batch_size = batch_size
        self.order = DistributedSampler(
            range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.epoch, self.skip = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.order.num_samples // self.batch_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order and how many of its batches were already trained on."""
        self.epoch, self.skip = epoch, skip_batches
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.order)[self.skip * self.batch_size : self.batches_per_epoch * self.batch_size]
        return iter([(index, self.epoch) for index in indices])


class ShardSampler(Sampler[int]):
    """Every `world_size`-th index from `rank`: each validation image is seen by exactly one rank.

    Unlike `DistributedSampler`, nothing is padded, so sums reduced across ranks are exact.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, size, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

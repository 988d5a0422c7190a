"""Data-parallel training across processes: where this process stands in a `torchrun` launch.

`torchrun --nproc_per_node N train.py ...` (on one machine, or with --nnodes on many) starts N copies of the command
and tells each, in environment variables, its rank among all processes (RANK), on its machine (LOCAL_RANK), and how
many there are (WORLD_SIZE). Each copy joins the same process group, so that DistributedDataParallel can average
the gradients across them during backward. The trainer reads everything it needs from `Distributed`: whether it is
the main process (the one that writes files and prints), and a barrier to wait for the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun launch (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def main_value(self, value: object) -> object:
        """The main process's `value` (every process calls this with its own), so that all decide alike."""
        if not self.enabled:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)  # in memory, between this run's own processes
        return holder[0]

    def close(self) -> None:
        """Leave the process group, if this process joined one."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_name: str) -> Distributed:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK...).

    The backend is NCCL for GPUs and gloo for CPUs. Outside torchrun this is a single process, rank 0 of 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank=rank, local_rank=local_rank, world_size=world_size)

"""torchrun: the process group, and waiting for the other processes without hanging.

Without torchrun everything here is a no-op for a single process. Each process takes every
N-th image by index (see batch_run); the first process merges the summary.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import faults

if TYPE_CHECKING:
    import torch


def cores_per_process() -> int:
    """The cores this process may use: those the system lets it run on (a container's or a
    batch job's share, not the whole machine's), split evenly between the torchrun processes
    on this machine. Imports no torch, so the command line can size its helpers early."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, cores // max(1, local_world))


class Distributed:
    """The process group torchrun sets up (a single process when there is none)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.active = self.world > 1

    def start(self, device: torch.device) -> None:
        if not self.active:
            return
        import torch
        import torch.distributed as dist
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        if device.type == "cpu":  # share the cores instead of oversubscribing them
            torch.set_num_threads(cores_per_process())

    def barrier(self) -> None:
        """Wait for every process, polling, so that a stop signal still gets through while a
        slower process finishes its share, and a lost process is an error, not a hang."""
        if not self.active:
            return
        import torch.distributed as dist
        try:
            work = dist.barrier(async_op=True)
            while not work.is_completed():
                time.sleep(0.05)
            work.wait()
        except RuntimeError as error:
            raise faults.RunFault(f"lost another process of the torchrun run "
                                  f"({str(error).splitlines()[0]})") from None

    def gather(self, value):
        """Every process's ``value``, in rank order (on every process); all are at hand."""
        if not self.active:
            return [value]
        import torch.distributed as dist
        self.barrier()
        values = [None] * self.world
        try:
            dist.all_gather_object(values, value)
        except RuntimeError as error:
            raise faults.RunFault(f"lost another process of the torchrun run "
                                  f"({str(error).splitlines()[0]})") from None
        return values

    def stop(self) -> None:
        if self.active:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()

    @property
    def leader(self) -> bool:
        return self.rank == 0

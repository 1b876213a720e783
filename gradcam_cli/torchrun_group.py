"""torchrun: the process group, waiting for the other processes without hanging, and each
process's share of the machine's cores.

Without torchrun, ``Distributed`` is a no-op for a single process, and that process has all
the cores it may use. Each process takes every N-th image by index (see batch_run); the first
process merges the summary.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import faults

if TYPE_CHECKING:
    import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cores_per_process() -> int:
    """The cores this process may use, split evenly between the torchrun processes on this
    machine: the CPUs it is pinned to (taskset, cpuset, a batch job's allocation), capped by a
    CPU quota (``docker --cpus``, a Kubernetes CPU limit), never the whole machine by default.
    Imports no torch, so the command line can size its helper processes early."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores // local_world_size())


def local_world_size() -> int:
    """How many torchrun processes share this machine (1 without torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))


def images_per_process(n_images: int) -> int:
    """The most images one torchrun process takes (every N-th): all of them without torchrun."""
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    return -(-n_images // world)


def cpu_quota(root: Path = CGROUP_ROOT) -> int | None:
    """The CPUs a cgroup quota allows (rounded up), or None where there is none or it cannot
    be read: cgroup v2's ``cpu.max`` ("200000 100000": 2 CPUs; "max ...": none), else cgroup
    v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (a quota of -1: none)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


class Distributed:
    """The process group torchrun sets up (a single process when there is none)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
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

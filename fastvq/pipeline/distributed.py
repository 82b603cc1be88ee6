"""torchrun support for the training commands: one process per device, DistributedDataParallel.

Under torchrun (WORLD_SIZE > 1 in the environment) `setup()` starts the process group (nccl on
CUDA, gloo on CPU), pins each rank to its GPU, and returns a Runtime; without torchrun it returns
a single-process Runtime and nothing else changes. Only the main process, rank 0, writes files
(is_main_process, Runtime.is_main).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_main_process(rank: int | None = None) -> bool:
    """Whether `rank` is the main process: rank 0, the one that writes files, logs and shows progress.
    rank None means this process: its rank in the process group once there is one, before that the
    RANK variable torchrun sets (none without torchrun: a single process is the main one)."""
    if rank is None:
        initialised = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if initialised else int(os.environ.get("RANK", "0"))
    return rank == 0


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return is_main_process(self.rank)


def setup(device: str | None = None) -> Runtime:
    """Start torch.distributed when torchrun launched us; pick the device (cuda when present,
    unless device says otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(rank, world_size, local_rank, dev)


def teardown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, runtime: Runtime, **kwargs) -> torch.nn.Module:
    """DistributedDataParallel around module when distributed, module itself otherwise."""
    if not runtime.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, **kwargs)


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def mean_over_ranks(values: dict, runtime: Runtime) -> dict:
    """Average a dict of float metrics over the ranks (for logging: every rank logs the same)."""
    if not runtime.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=runtime.device if runtime.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: v / runtime.world_size for k, v in zip(keys, t.tolist())}


def broadcast_flag(flag: bool, runtime: Runtime) -> bool:
    """Rank 0's decision, everywhere (e.g. 'a checkpoint exists, resume from it')."""
    if not runtime.distributed:
        return flag
    t = torch.tensor([int(flag)], device=runtime.device if runtime.device.type == "cuda" else "cpu")
    dist.broadcast(t, 0)
    return bool(t.item())


def check_same_on_every_rank(tensors: dict, runtime: Runtime) -> None:
    """Raise if any of the named tensors differs between ranks (e.g. the codebook and its EMA
    statistics, which the quantizer keeps in sync by all-reduce: a cheap end-of-run invariant)."""
    if not runtime.distributed:
        return
    for name, t in tensors.items():
        mine = t.detach().double().sum().reshape(1).to("cpu" if runtime.device.type != "cuda" else runtime.device)
        low, high = mine.clone(), mine.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError(f"{name} differs between ranks (sums from {low.item()} to {high.item()})")

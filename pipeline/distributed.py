"""torchrun-aware process groups: nccl on GPUs, gloo on CPU; a single process needs none of it."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_type: str | None = None) -> DistInfo:
    """Join the process group torchrun set up (env://); returns rank info (world size 1 otherwise).

    On CUDA each process takes GPU ``LOCAL_RANK`` and talks nccl; on CPU it talks gloo.
    """
    if not launched_by_torchrun():
        return DistInfo()
    import torch
    import torch.distributed as dist

    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def device_for(info: DistInfo, requested: str | None = None):
    """The device of this rank: ``cuda:LOCAL_RANK`` under torchrun with GPUs, else ``pick_device``."""
    import torch

    from pipeline.runtime import pick_device

    dev = pick_device(requested)
    if info.enabled and dev.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return dev


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

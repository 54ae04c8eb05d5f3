"""Process-group set-up shared by every trainer: nccl on GPU hosts, gloo on CPU.

Works under ``torchrun``/TorchX (reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and in
a single plain process (no process group at all: world size 1).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``device`` -- "auto" (cuda when available), "cpu" or "cuda" -- as a ``torch.device``;
    cuda asked for where none is visible is an error."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but no CUDA device is visible")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def init_distributed(device: str = "auto") -> DistContext:
    """Initialise the default process group if launched with several processes.

    ``device``: "auto" (cuda when available), "cpu" or "cuda".
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, dev, backend)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on localhost right now (for a rendezvous of local ranks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

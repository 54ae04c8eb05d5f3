"""Process-group set-up shared by every trainer: nccl on GPU hosts, gloo on CPU.

Works under ``torchrun``/TorchX (reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and in
a single plain process (no process group at all: world size 1).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, NoReturn, Optional

import torch
import torch.distributed as dist

from mim_rec.utils.text import counted


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


def current_rank() -> int:
    """This process's rank: the process group's, else the launcher's RANK (torchrun sets it
    before any group exists), else 0. Lets every rank of a launch agree on which one speaks
    or writes before it initialises anything."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """The number of ranks this process runs among: the process group's, else the launcher's
    WORLD_SIZE (torchrun sets it before any group exists), else 1. Lets a command check a
    per-rank split before it initialises anything."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device: str = "auto", local_rank: Optional[int] = None,
                   local_world_size: Optional[int] = None) -> torch.device:
    """``device`` -- "auto", "cpu" or "cuda" -- as a ``torch.device`` for local rank
    ``local_rank`` of ``local_world_size`` (by default this process's, as torchrun sets
    LOCAL_RANK and LOCAL_WORLD_SIZE; 0 of 1 in a plain process).

    "auto" picks CUDA only where every local rank has a GPU of its own: each rank decides alone,
    and all must pick the same backend (two ranks on one visible GPU would otherwise ask for
    ``cuda:1``). "cuda" where fewer GPUs are visible than there are local ranks is an error on
    every rank, and so is any other name."""
    from mim_rec.config import ConfigError

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={device!r}: choose auto, cpu or cuda")
    if device == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_world_size is None else local_world_size
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return torch.device("cuda", local_rank) if gpus >= local_world_size else torch.device("cpu")
    if gpus == 0:
        raise ConfigError("device=cuda: no CUDA device is visible on this host (device=auto picks the CPU)")
    if gpus < local_world_size:  # refused on every rank, not only on those past the last GPU
        raise ConfigError(f"device=cuda: {local_world_size} local ranks and {counted(gpus, 'GPU')} visible on this "
                          "host: launch at most one rank per GPU (--nproc-per-node, TorchX -j 1xN), or device=cpu")
    return torch.device("cuda", local_rank)


def process_group_timeout() -> timedelta:
    """How long a collective may wait: ``MIM_DIST_TIMEOUT_MIN`` minutes (60 by default), for
    gloo and nccl alike. nccl's own default is 10 minutes, and ranks wait that long for rank 0
    at a barrier while it alone fills a large feature cache (C-SFT)."""
    minutes = os.environ.get("MIM_DIST_TIMEOUT_MIN", "60")
    try:
        value = float(minutes)
    except ValueError:
        value = 0.0  # not a number: refused below, as NaN and infinity are
    if not 0 < value < float("inf"):
        from mim_rec.config import ConfigError
        raise ConfigError(f"MIM_DIST_TIMEOUT_MIN={minutes!r}: a positive number of minutes")
    return timedelta(minutes=value)


def init_distributed(device: str = "auto") -> DistContext:
    """Initialise the default process group if launched with several processes.

    ``device``: "auto" (cuda when every local rank has a GPU), "cpu" or "cuda".
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if device == "auto" and not use_cuda and torch.cuda.is_available() and rank == 0:
        print(f"note: device=auto: {counted(torch.cuda.device_count(), 'GPU')} visible for "
              f"{os.environ.get('LOCAL_WORLD_SIZE', '1')} local ranks, so every rank runs on the CPU (gloo); "
              "launch one rank per GPU to train on them", file=sys.stderr)
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=process_group_timeout())
    return DistContext(rank, world_size, local_rank, dev, backend)


def ensure_process_group(device: str = "auto") -> DistContext:
    """The DistContext with the default process group up, also for a single rank: TorchRec's
    DistributedModelParallel and the planner's collective plan need one. Under torchrun/TorchX
    it joins the launcher's group -- one launched process too (WORLD_SIZE=1, where
    :func:`init_distributed` starts none); in a plain process it makes a one-rank group on a
    free local port."""
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    ctx = init_distributed(device)
    if not dist.is_initialized():
        dist.init_process_group(ctx.backend, rank=ctx.rank, world_size=ctx.world_size,
                                timeout=process_group_timeout())
    return ctx


def collective_device() -> torch.device:
    """Where tensors must live for the default process group's collectives: the current GPU
    under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over the ranks (a collective: every rank calls it). Logged losses go
    through it, so a multi-rank run logs the loss of its global batch, not rank 0's share."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values.detach()
    total = values.detach().to(collective_device(), torch.float32, copy=True)
    dist.all_reduce(total)
    return total / dist.get_world_size()


def losses_over_ranks(losses: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """A step's named scalar losses, each averaged over the ranks (:func:`mean_over_ranks`,
    one collective for all of them), as the floats a log records."""
    means = mean_over_ranks(torch.stack([value.detach().float() for value in losses.values()]))
    return dict(zip(losses, means.tolist()))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a process that ran collectives, skipping the interpreter's teardown.

    Why: a gloo worker thread drops its reference to a finished collective (and to that
    collective's tensors, which takes the GIL) only after ``wait()`` has returned to the caller.
    TorchRec's sharded modules keep the process group alive past ``destroy_process_group()``, so
    those threads are never joined; when one asks for the GIL while the interpreter finalises,
    it is unwound inside a ``noexcept`` destructor and the process aborts ("terminate called
    without an active exception", SIGABRT) after all of its work succeeded -- a few runs in a
    hundred on a busy host. Everything the process wrote is flushed first; files are closed by
    the code that opened them.
    """
    destroy()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def print_error_once(message: str, wait_s: float = 10.0) -> None:
    """Print ``message``, a command's one-line error, on stderr, unless this is a rank > 0 of a
    torchrun launch whose rank 0 printed the very same line.

    Why: a user error every rank raises alike (a config key, a missing folder) was printed once
    per rank, above torchrun's own failure report. Rank 0 prints its line, then posts it on the
    launcher's store (``TORCHELASTIC_USE_AGENT_STORE``: the agent's, which serves every rank
    whatever state its process group is in); a rank > 0 waits up to ``wait_s`` seconds for that
    post and stays silent only when it is the same line. A line of its own -- an error on that
    rank alone, while rank 0 works on or waits in a collective -- is printed, ``wait_s`` later.
    Without such a store, or when it cannot be reached, every rank prints as before."""
    rank = current_rank()
    key = f"mim/error_line/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # a restarted rank's own
    store = None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and launched_world_size() > 1:
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=timedelta(seconds=wait_s))
            if rank > 0 and store.get(key).decode(errors="replace") == message:
                return
        except RuntimeError:  # torch's DistError: no store reached, or no line from rank 0 in time
            store = None
    print(message, file=sys.stderr, flush=True)
    if store is not None and rank == 0:
        try:
            store.set(key, message)
        except RuntimeError:  # the other ranks print their own line, as they did before
            pass


def free_port() -> int:
    """A TCP port free on localhost right now (for a rendezvous of local ranks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_spawned_ranks(work: Callable[..., Any], ranks: int, device_type: str, *args: Any) -> List[Any]:
    """``work(rank, device, *args)`` on ``ranks`` freshly spawned processes, joined in one
    process group (nccl on ``device_type="cuda"``, one GPU a rank; gloo otherwise); returns each
    rank's result, in rank order. ``work`` must be a module-level function (spawn pickles it)
    and its result picklable. Fresh processes give each measurement its own peak memory; a rank
    that succeeded leaves through :func:`exit_process`."""
    import tempfile

    import torch.multiprocessing as mp

    # A file, not a queue: a pipe holds 64 KiB, and a rank blocked writing more never exits to
    # be joined; pickled by value, since shared-memory tensors die with the rank that made them.
    with tempfile.TemporaryDirectory(prefix="mim-ranks-") as folder:
        results = os.path.join(folder, "results.pkl")
        mp.start_processes(_spawned_rank, args=(work, ranks, device_type, free_port(), args, results),
                           nprocs=ranks, start_method="spawn")
        with open(results, "rb") as file:
            return pickle.load(file)


def _spawned_rank(rank: int, work: Callable[..., Any], ranks: int, device_type: str, port: int, args: tuple,
                  results: str) -> None:
    # RANK and friends too, for code that reads them as torchrun sets them (init_distributed)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks))
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=ranks,
                            timeout=process_group_timeout())
    try:
        gathered: List[Any] = [None] * ranks
        dist.all_gather_object(gathered, work(rank, device, *args))
        if rank == 0:
            with open(results, "wb") as file:
                pickle.dump(gathered, file)
    except BaseException:
        destroy()
        raise  # torch.multiprocessing reports it to the parent
    exit_process(0)

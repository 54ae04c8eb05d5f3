"""``torch.distributed.checkpoint`` (DCP) checkpoints of ``mim train``: model, optimizer and
progress, written by every rank and resharded on load, so a run resumes exactly after a kill
and a model trained on many ranks can be evaluated on one."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from mim_rec.data.errors import DataError
from mim_rec.utils.run import DAMAGED_FILE_ERRORS, atomic_write_bytes

# The checkpoint folders DcpCheckpoints writes (step-000000040), as a glob: another stage's
# folder check finds them by it (pretrain and C-SFT keep step-N.pt files).
DCP_STEP_GLOB = "step-[0-9]*[0-9]"


def _without_stateless(optimizer_state: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(the optimizer's state dict less its empty per-parameter entries, those entries)``.

    The frozen MM table's zero-step optimizer keeps no state, and TorchRec lists it on the
    ranks that hold a shard as an empty entry. DCP writes nothing for an empty entry but asks
    for it on load, so a multi-rank run could not resume ("Missing key in checkpoint
    state_dict: optimizer.state.sparse_arch.mm..."). Leaving the empty entries out of both
    save and load keeps them agreeing; checkpoints written before this load as they are."""
    entries = optimizer_state["state"]
    stateless = {key: value for key, value in entries.items() if not value}
    trimmed = dict(optimizer_state)
    trimmed["state"] = {key: value for key, value in entries.items() if value}
    return trimmed, stateless


class DcpCheckpoints:
    """``DIR/step-N/`` DCP checkpoints of model + optimizer + progress, and ``DIR/latest``
    naming the newest complete one (written after every rank finished saving). The newest
    ``keep`` are kept: every checkpoint holds the model's frozen MM table shards too (RIM rows
    applied during training included), so keeping them all would repeat the table each time."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def named(self) -> Optional[Path]:
        """The folder ``latest`` names (the newest checkpoint every rank finished saving), or None."""
        latest = self.directory / "latest"
        return self.directory / latest.read_text().strip() if latest.is_file() else None

    def newest(self) -> Optional[Path]:
        """The newest whole checkpoint's folder: the one ``latest`` names or, where that one is
        damaged (:func:`checkpoint_damage`), the newest whole one kept before it (:meth:`restore`
        says so); None when there is none. A damaged one ended the run in DCP's unpickler with a
        bare ``EOFError``; pretrain and C-SFT fall back alike."""
        return self.newest_and_skipped()[0]

    def newest_and_skipped(self) -> Tuple[Optional[Path], Optional[str]]:
        """:meth:`newest`, and why the checkpoint ``latest`` names was skipped (None: it was
        not), for :meth:`restore` to say: the damage is seen by reading the metadata, and
        restore's warning read it a second time. Public: ``mim train`` finds the checkpoint
        once, to check, evaluate and restore (each read every checkpoint's metadata again)."""
        named = self.named()
        if named is None:
            return None, None
        damage = checkpoint_damage(named)
        if damage is None:
            return named, None
        earlier = [p for p in sorted(self.directory.glob(DCP_STEP_GLOB), reverse=True) if p.name < named.name]
        for checkpoint in earlier:
            if checkpoint_damage(checkpoint) is None:
                return checkpoint, f"{named} does not load ({damage})"
        raise DataError(str(named), f"{damage}, and no whole checkpoint was kept before it; "
                                    "use a new out= (or delete the checkpoints to train from the start)")

    def save(self, model, optimizer, progress: Dict[str, int]) -> None:
        name = f"step-{progress['global_step']:09d}"
        optimizer_state, _ = _without_stateless(optimizer.state_dict())
        state = {"model": model.state_dict(), "optimizer": optimizer_state,
                 "progress": {k: torch.tensor(v) for k, v in progress.items()},
                 "world_size": torch.tensor(dist.get_world_size()),
                 "on_cuda": torch.tensor(int(dist.get_backend() == "nccl"))}
        target = self.directory / name
        if dist.get_rank() == 0 and target.exists():
            # A save of this step cut short, or one found damaged and fallen back from: DCP would
            # write into it under its old .metadata, which a kill mid-save would leave naming a
            # mix of old and new bytes. Saving into a fresh folder keeps "has .metadata" meaning
            # "finished" (overwrite=False pins that, whatever DCP's default becomes).
            shutil.rmtree(target)
        dist.barrier()
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(target), overwrite=False))
        dist.barrier()
        if dist.get_rank() == 0:
            atomic_write_bytes(self.directory / "latest", name.encode())
            # Zero-padded names sort by step. A save a kill cut short has no .metadata (DCP writes
            # it last); after a resume with another checkpoint_every it may sit before or past this
            # step. It is never counted as kept: one before this step goes, one past it stays
            # until this run's saves pass it.
            earlier = [p for p in sorted(self.directory.glob("step-*")) if p.name <= name]
            complete = [p for p in earlier if (p / ".metadata").is_file()]
            for old in [p for p in earlier if p not in complete] + complete[:-self.keep]:
                shutil.rmtree(old)

    def restore(self, model, optimizer, with_optimizer: bool = True,
                found: Optional[Tuple[Optional[Path], Optional[str]]] = None) -> Optional[Dict[str, int]]:
        """Load the newest checkpoint into ``model`` (and ``optimizer``); its progress (every
        integer :meth:`save` was given), or None. ``found``: :meth:`newest_and_skipped` when the
        caller asked it since the last save, else asked here.

        The model's weights load on any number of ranks (DCP reshards them), so a run trained
        on many can be evaluated on one (``with_optimizer=False``). Training on needs the ranks
        that wrote it (checked before anything is written: :func:`train.ciubm._refuse_foreign_checkpoints`)."""
        checkpoint, skipped = found or self.newest_and_skipped()
        if checkpoint is None:
            return None
        if skipped is not None and dist.get_rank() == 0:  # every rank falls back alike
            print(f"warning: {skipped}; using {checkpoint.name}, the checkpoint kept before it", file=sys.stderr)
        state = {"model": model.state_dict(), "progress": {k: torch.tensor(0) for k in _progress_keys(checkpoint)}}
        if with_optimizer:
            optimizer.init_state()  # Adam's state is lazy; DCP loads in place, so it must exist
            optimizer_state, stateless = _without_stateless(optimizer.state_dict())
            state["optimizer"] = optimizer_state
        dcp.load(state, checkpoint_id=str(checkpoint))
        model.load_state_dict(state["model"])
        progress = {k: int(v) for k, v in state["progress"].items()}
        if with_optimizer:
            optimizer_state["state"].update(stateless)
            optimizer.load_state_dict(optimizer_state)
            # FBGEMM's fused Adam counts its steps (for its bias correction) in a kernel buffer
            # that no state dict holds. Left at 0, a resumed GPU run took several times too large
            # ID-table steps: its losses left the straight run's from the second step on.
            optimizer.set_optimizer_step(progress["global_step"])
        return progress


def _progress_keys(checkpoint: Path) -> List[str]:
    """The progress entries a checkpoint holds: the step counters, and what else the run
    counted (a RIM applier's log position); a checkpoint written before an entry existed lacks it."""
    return [key.split(".", 1)[1] for key in _metadata(checkpoint) if key.startswith("progress.")]


def checkpoint_world_size(checkpoint: Path) -> Optional[int]:
    """How many ranks wrote a DCP checkpoint; None for one written before that was recorded (or
    not readable at all: its load then names the problem)."""
    return _recorded(checkpoint, "world_size")


def checkpoint_on_cuda(checkpoint: Path) -> Optional[bool]:
    """Whether a DCP checkpoint was written on GPUs (nccl), whose ID tables train with fused Adam
    (two moments), not the CPU's row-wise Adagrad; None for one written before that was recorded."""
    on_cuda = _recorded(checkpoint, "on_cuda")
    return None if on_cuda is None else bool(on_cuda)


# An embedding table's weight in the model, by table name (group 1)
_TABLE = r"sparse_arch\.\w+\.(?:embedding_bags|embeddings)\.(\w+)\.weight"
_TABLE_WEIGHT = re.compile(rf"model\.{_TABLE}")
_ADAM_TABLE_STATE = re.compile(rf"optimizer\.state\.{_TABLE}\.exp_avg")


def checkpoint_damage(checkpoint: Path) -> Optional[str]:
    """Why a DCP checkpoint cannot load, seen without loading it, or None: its folder or
    metadata missing or unreadable, or a data file the metadata names missing or shorter than
    the bytes it records there (a disk that filled, a file cut or deleted by hand)."""
    if not (checkpoint / ".metadata").is_file():
        return "no such checkpoint" if not checkpoint.is_dir() else "its save did not finish (no .metadata)"
    try:
        stored = dcp.FileSystemReader(str(checkpoint)).read_metadata().storage_data
    except DAMAGED_FILE_ERRORS as exc:
        return f"its .metadata does not read ({type(exc).__name__})"
    needed: Dict[str, int] = {}
    for where in stored.values():
        needed[where.relative_path] = max(needed.get(where.relative_path, 0), where.offset + where.length)
    for name, size in sorted(needed.items()):
        data = checkpoint / name
        held = data.stat().st_size if data.is_file() else None
        if held is None or held < size:
            return f"{name} is {'missing' if held is None else f'{held:,} bytes'}, its metadata reads {size:,}"
    return None


def _metadata(checkpoint: Path) -> Dict[str, Any]:
    """A DCP checkpoint's entries by key, from its metadata (nothing is loaded)."""
    return dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata


def checkpoint_adam_tables(checkpoint: Path) -> List[str]:
    """The embedding tables a DCP checkpoint holds Adam state for, from its metadata. On the CPU
    only a data-parallel table written before 2026-12-06 has any: the dense Adam trained it."""
    if not (checkpoint / ".metadata").is_file():
        return []
    return sorted({m.group(1) for m in map(_ADAM_TABLE_STATE.fullmatch, _metadata(checkpoint)) if m})


def _recorded(checkpoint: Path, key: str) -> Optional[int]:
    """The integer a DCP checkpoint holds under ``key``, None where it holds none."""
    if not (checkpoint / ".metadata").is_file() or key not in _metadata(checkpoint):
        return None
    state = {key: torch.tensor(0)}
    dcp.load(state, checkpoint_id=str(checkpoint))
    return int(state[key])


def checkpoint_table_rows(checkpoint: Path) -> Dict[str, int]:
    """Rows of each embedding table a DCP checkpoint holds, by table name, from its metadata
    (nothing is loaded)."""
    return {match.group(1): int(entry.size[0]) for key, entry in _metadata(checkpoint).items()
            if (match := _TABLE_WEIGHT.fullmatch(key))}

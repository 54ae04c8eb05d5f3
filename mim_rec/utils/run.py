"""Helpers every trainer uses: seeding, JSONL metric logging, atomic file writes, the
divergence error."""

from __future__ import annotations

import json
import os
import pickle
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mim_rec.data.manifest import staging_name


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite: the run stops before it checkpoints NaN weights that
    every resume would load."""


def require_finite(tensors: Sequence[torch.Tensor], step: int, newest: Optional[str],
                   describe: Callable[[], str], remedy: str) -> None:
    """Raise :class:`TrainingDiverged`, on every rank alike, unless every value of ``tensors``
    on every rank is finite. Trainers call it just before they save a step: a NaN checkpoint
    would be loaded by every resume, and NaN embeddings rank as perfect (no NaN score outranks
    the own item's). One flag, all-reduced, at save time only (no device sync per step).
    ``describe()`` says which values failed on this rank; ``newest``: the checkpoint kept."""
    import torch.distributed as dist

    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() < 1:
        raise TrainingDiverged(f"step {step}: {describe()}; no checkpoint was written for it (the newest is "
                               f"{newest or 'none'}). {remedy}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class JsonlLogger:
    """Append one JSON object per line; optionally mirror scalars to TensorBoard.

    Only rank 0 should own one. Lines are flushed as they are written so a killed run
    keeps every logged step.
    """

    def __init__(self, path: Union[str, Path], tensorboard_dir: Optional[Union[str, Path]] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def log(self, record: Dict[str, Any], step: Optional[int] = None) -> None:
        record = {"time": time.time(), **({"step": step} if step is not None else {}), **record}
        self._fh.write(json.dumps(record, default=_to_builtin) + "\n")
        if self._tb is not None and step is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("time", "step"):
                    self._tb.add_scalar(key, value, step)

    def forget_after(self, step: int, redone: Sequence[str] = (),
                     unheld: Optional[Callable[[Dict[str, Any]], bool]] = None) -> None:
        """Drop the records of steps after ``step``, where a run resumes: the steps a killed run
        logged past its last checkpoint are trained and logged again, and would otherwise be
        in the log twice. A line cut short by the kill goes too; records without a step stay.
        ``redone``: events this run logs again from ``step`` on (an evaluation of the resumed
        model, say); their records at ``step`` or without a step go as well. ``unheld``: the
        records of work the restored state lacks whatever their step (done after the
        checkpoint was saved, within its step): the run does that work again and logs it."""
        self._fh.close()
        kept = []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            at = record.get("step")
            if record.get("event") in redone and (at is None or at >= step) or unheld and unheld(record):
                continue
            if at is None or at <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        atomic_write_bytes(self.path, "".join(kept).encode())
        self._fh = self.path.open("a", buffering=1)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


# What ``torch.load`` raises for a file cut short or damaged (a disk that filled, an edit by
# hand): readers of files that can be written again fall back instead of failing.
DAMAGED_FILE_ERRORS = (RuntimeError, EOFError, OSError, pickle.UnpicklingError)


class WeightsUnreadable(ValueError):
    """A weights file ``torch.load`` cannot read; the message is torch's first line (its own
    runs on for paragraphs, and advises turning off ``weights_only``)."""


def load_weights(path: Union[str, Path], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a damaged or foreign file raises
    :class:`WeightsUnreadable`, which callers turn into a one-line error naming their setting."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (*DAMAGED_FILE_ERRORS, KeyError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        # the cause, not torch's preamble about weights_only and where to file an issue
        cause = next((line for line in lines if "weights_only" not in line
                      and not line.startswith(("Please file", "Check the documentation"))), lines[0])
        raise WeightsUnreadable(f"{type(exc).__name__}: {cause}") from None


def read_json_or_none(path: Union[str, Path]) -> Any:
    """A JSON file's value, or None when it is missing or not whole JSON (cut short by a kill
    or a full disk): readers that decide "is this finished?" must not trust a torn file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(path)
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _to_builtin(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def visible_entries(folder: Path) -> List[Path]:
    """``folder``'s entries by name, dot files left out (they are the machinery's own: the
    run lock, a table's build state); none when ``folder`` is not a folder. The checks that
    refuse a folder holding someone else's files each list it so, then apply their own rule."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def some_names(names: Sequence[str], shown: int = 3) -> str:
    """``a, b, c, ...``: the first ``shown`` of ``names``, enough for a one-line error to say
    whose folder it is without listing a run's thousands of files."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


LOCK_NAME = ".mim.lock"


@contextmanager
def run_folder_lock(out: Union[str, Path]) -> Iterator[None]:
    """Hold ``out`` for one training run: a second run on the same folder (a resume started
    while the first, orphaned by a killed launcher, still writes) is refused instead of racing
    it for the checkpoints. Rank 0 takes the lock (``RANK`` of torchrun, 0 without one); the
    OS frees it when the holder exits, however it exits, so a kill leaves nothing to clean.
    A run refused before it wrote anything leaves no folder behind, nor its parents: where this
    call made ``out`` and the lock file is all it holds, the file goes, while still held
    (:func:`_lock_file`), and then the folders. Elsewhere the file stays in the run's folder:
    the pipeline moves a folder away under this lock, after which the path may name the lock
    file of a run in a new folder there, which removing would let a third run take beside it."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    path = Path(out) / LOCK_NAME
    with _lock_file(path, out, remove=lambda made: made and [p.name for p in path.parent.iterdir()] == [LOCK_NAME]):
        yield


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: the default ``out=runs/pretrain``
    made ``runs/`` too, which a refused run left behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # something else was written there meanwhile
            return


@contextmanager
def sole_writer(out: Union[str, Path]) -> Iterator[None]:
    """Hold the folder ``out`` for one writer that builds it beside itself and renames it into
    place (``mim embeddings fold``, ``quantise_table``): a second writer into the same ``out``
    is refused at once, where it used to delete the first one's staging folder and race it for
    the rename. The lock is an flock on ``.OUT.lock`` beside ``out``; the OS frees it when the
    holder exits, however it exits, so a killed holder blocks no later writer. The holder
    removes the file while it still holds it (:func:`_lock_file`), and a folder this call
    created for it is removed again if nothing else went there."""
    out = Path(out)
    with _lock_file(out.parent / f".{out.name}.lock", out, remove=lambda made: True):
        yield


@contextmanager
def _lock_file(path: Path, out: Union[str, Path], remove: Callable[[bool], bool]) -> Iterator[None]:
    """Hold the lock file ``path`` for ``out`` (:func:`_held`), making its folder (and parents)
    first (:func:`_taken`). When the holder is done, the file is removed where ``remove(made)``
    says so (``made``: this call made the file's folder), while it is still held: removed once
    the flock was freed, it could be locked in between by another writer, which would then hold
    a removed file beside any writer after it (a file removed before it is locked is not taken,
    :func:`_locked`). Then the folders this call made are removed again if nothing else went there."""
    handle, created = _taken(path, out)
    try:
        with _held(handle):
            try:
                yield
            finally:
                if remove(path.parent in created):
                    path.unlink(missing_ok=True)
    finally:
        _remove_empty(created)


def _taken(path: Path, out: Union[str, Path]) -> Tuple[IO[str], List[Path]]:
    """The lock file ``path`` opened (made if absent) and flocked by this process, and the
    folders made for it, deepest first; while another writer holds it, refused naming its pid.
    A holder that is done removes its lock file, and the folders it made once empty
    (:func:`_lock_file`), also as this call opens and locks it: its open then failed with a
    FileNotFoundError traceback (the folder gone after the mkdir), or its flock was of the
    removed file (gone after the open), and the writer was refused naming that finished holder.
    That holder is done, so the folders are made and the file opened and locked once more, and
    this writer goes on (the flock and :func:`_locked`'s file-identity check still decide who
    holds it); a second such removal is refused in one line."""
    from mim_rec.config import ConfigError

    created: List[Path] = []
    for _ in range(2):
        missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
        created = max(created, missing, key=len)  # both run up from path.parent: the longer holds the other
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            handle = path.open("a+")
        except FileNotFoundError:  # its folder was removed after the mkdir
            continue
        if _locked(handle, path):
            return handle, created
        with handle:
            if _names(path, handle):  # not removed: a writer holds it
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                _remove_empty(created)
                raise ConfigError(f"out={out}: another run is writing this folder (pid {holder}); wait for it, "
                                  f"stop it, or use another out=")
    _remove_empty(created)
    raise ConfigError(f"out={out}: its lock file {path} was removed twice as this run took it "
                      "(runs finishing there meanwhile); run again")


@contextmanager
def _held(handle: IO[str]) -> Iterator[None]:
    """The lock file open as ``handle``, flocked by this process (:func:`_taken`), holding this
    process's pid for the ``with`` block, which frees the flock and closes the file."""
    import fcntl

    with handle:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _locked(handle, path: Path) -> bool:
    """Take the exclusive flock of the lock file ``path`` through its open ``handle``, without
    waiting: False when another process holds it, or when the file was removed since ``handle``
    opened it (by a holder that finished: a writer after it may hold a new file there)."""
    import fcntl

    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return _names(path, handle)


def _names(path: Path, handle) -> bool:
    """Whether ``path`` still names the file open as ``handle`` (a finished holder removes it)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

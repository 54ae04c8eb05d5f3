"""Write a whole folder (a world, an imported data set) aside and swap it in when done.

A writer that fills its output in place leaves, when it fails or is killed, a mix of old and
new files; and one that writes over a used folder leaves the old folder's extra files (another
data set's pairs, its MM table) beside the new ones, where ``validate`` cannot tell them apart.
:func:`staged_folder` avoids both: the new contents are written in a hidden folder and replace
the destination's contents whole only after the writer returns.

The hidden folders live *inside* the destination, so every move is a rename on one file
system even when the destination is a mount point (a cluster volume), and the destination
folder itself is never renamed (it may be the shell's working directory).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from mim_rec.data.errors import DataError, ManifestMismatch
from mim_rec.data.manifest import MANIFEST_NAME, read_manifest

STAGING, REPLACED = ".mim_staging", ".mim_replaced"


@contextmanager
def staged_folder(out: Path, purpose: str, kind: str = "world") -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without an error, ``out`` holds
    exactly what was written there, its manifest moved in last.

    ``out`` may be new, empty, or an earlier output of the same ``kind`` (its
    ``manifest.json`` says so), whose contents are replaced whole. Any other non-empty folder
    is refused before anything is written -- a user's files, and mim_rec's other outputs (an
    MM table, trained encoders) -- so a mistyped ``--out`` cannot delete them. On an error
    ``out`` is left as it was (and removed if this call created it).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(str(out), f"is a file; {purpose} writes a folder")
    created = not out.exists()
    if not created and not _replaceable(out, kind):
        found = _manifest_kind(out)
        held = (f"holds a {found!r} output, not a {kind!r} one" if found else
                f"holds no readable {MANIFEST_NAME}, so it is not an output of mim_rec")
        raise DataError(str(out), f"is not empty and {held}; {purpose} replaces its output folder whole "
                                  f"and will not delete these files: pass a new or empty folder")
    staging, replaced = out / STAGING, out / REPLACED
    out.mkdir(parents=True, exist_ok=True)
    for leftover in (staging, replaced):  # from a run killed part-way
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    # The old manifest leaves first and the new one arrives last: killed in between, ``out``
    # holds no manifest and so never passes for a whole world.
    replaced.mkdir()
    for entry in sorted(_contents(out), key=lambda path: path.name != MANIFEST_NAME):
        entry.rename(replaced / entry.name)
    for entry in sorted(staging.iterdir(), key=lambda path: path.name == MANIFEST_NAME):
        entry.rename(out / entry.name)
    shutil.rmtree(staging)
    shutil.rmtree(replaced)


def require_outside(out: Path, source: Path, option: str = "--out") -> None:
    """Refuse an ``out`` that is ``source`` or a folder holding it: :func:`staged_folder`
    replaces ``out``'s contents whole, so the source being read would be deleted with them
    (a raw data set kept inside the world folder it was imported into, a validation world
    held out inside its own ``--out``)."""
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or out in source.parents:
        where = "is" if out == source else "lies inside"
        raise DataError(str(source), f"the source {where} {option}={out}, whose contents the output "
                                     "replaces whole (the source would be deleted); write to a folder "
                                     "outside the source")


def _contents(folder: Path) -> list:
    return [entry for entry in folder.iterdir() if entry.name not in (STAGING, REPLACED)]


def _replaceable(folder: Path, kind: str) -> bool:
    """Empty, an output of ``kind`` (its manifest), or one whose replacement was killed part-way."""
    return not _contents(folder) or _manifest_kind(folder) == kind or (folder / REPLACED).is_dir()


def _manifest_kind(folder: Path) -> Optional[str]:
    """The ``kind`` the folder's manifest names; None without a readable one."""
    try:
        return read_manifest(folder).kind
    except (ManifestMismatch, OSError, ValueError):  # not JSON, not UTF-8, a folder named manifest.json
        return None


@contextmanager
def written_beside(out: Path, purpose: str) -> Iterator[Path]:
    """Yield an empty folder beside ``out`` (new or empty; the caller checks) that is renamed
    to ``out`` when the block ends without an error and removed otherwise: a write that fails
    leaves no half-written table. ``purpose`` names the hidden folder (``.OUT.purpose``)."""
    out = Path(out)
    staging = out.parent / f".{out.name}.{purpose}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty (the caller checked)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

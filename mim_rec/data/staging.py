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
from typing import Iterator

from mim_rec.data.errors import DataError
from mim_rec.data.manifest import MANIFEST_NAME

STAGING, REPLACED = ".mim_staging", ".mim_replaced"


@contextmanager
def staged_folder(out: Path, purpose: str) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without an error, ``out`` holds
    exactly what was written there, its manifest moved in last.

    ``out`` may be new, empty, or a folder this project wrote (it holds a ``manifest.json``),
    whose contents are replaced whole. Any other non-empty folder is refused before anything
    is written, so a mistyped ``--out`` cannot delete a user's files. On an error ``out`` is
    left as it was (and removed if this call created it).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(str(out), f"is a file; {purpose} writes a folder")
    created = not out.exists()
    if not created and not _ours(out):
        raise DataError(str(out), f"is not empty and holds no {MANIFEST_NAME}, so it is not an "
                                  f"output of mim_rec; {purpose} replaces its output folder whole "
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


def _contents(folder: Path) -> list:
    return [entry for entry in folder.iterdir() if entry.name not in (STAGING, REPLACED)]


def _ours(folder: Path) -> bool:
    """Empty, a mim_rec output (its manifest), or one whose replacement was killed part-way."""
    return (not _contents(folder) or (folder / MANIFEST_NAME).is_file()
            or (folder / REPLACED).is_dir())

"""Write a whole folder (a world, an imported data set) beside its destination and swap it in.

A writer that fills its output in place leaves, when it fails or is killed, a mix of old and
new files; and one that writes over a used folder leaves the old folder's extra files (another
data set's pairs, its MM table) beside the new ones, where ``validate`` cannot tell them apart.
:func:`staged_folder` avoids both: the new folder is written under a hidden name in the same
parent and replaces the destination whole only after the writer returns.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mim_rec.data.errors import DataError
from mim_rec.data.manifest import MANIFEST_NAME


@contextmanager
def staged_folder(out: Path, purpose: str) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without an error, ``out`` becomes it.

    ``out`` may be new, empty, or a folder this project wrote (it holds a ``manifest.json``),
    which is replaced whole. Any other non-empty folder is refused before anything is
    written, so a mistyped ``--out`` cannot delete a user's files. On an error the staging
    folder is removed and ``out`` is left as it was.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(str(out), f"is a file; {purpose} writes a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise DataError(str(out), f"is not empty and holds no {MANIFEST_NAME}, so it is not an "
                                  f"output of mim_rec; {purpose} replaces its output folder whole "
                                  f"and will not delete these files: pass a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging"
    retired = out.parent / f".{out.name}.replaced"
    if retired.is_dir() and not out.exists():  # killed between the two renames below
        retired.rename(out)
    for leftover in (staging, retired):  # from a run killed part-way
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            out.rename(retired)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)

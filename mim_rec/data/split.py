"""Time splits: the latest share of a world's training rows, held out to choose settings on.

A setting chosen on the test events is a setting tuned to them, and the test AUC it then
reports is optimistic. Holding out the *latest* share of the training period (not a random
share) keeps what is scored after everything trained on, as the world's own train/test split
does, so the choice is made under the same conditions as the test it is reported on.

:func:`holdout_world` writes such a split as a world folder of its own (``events_test`` = the
held-out period), so every command that takes a world (``mim train``, ``mim experiment
--world``, ``mim csft``) runs on it unchanged.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Dict, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mim_rec.config import ConfigError
from mim_rec.data.errors import DataError
from mim_rec.data.io import absolute_image_paths, category_count, link_or_copy, validate_file, write_table
from mim_rec.data.manifest import (Manifest, carried_age_caveat, fingerprint_file, fingerprint_tree,
                                   read_manifest, write_manifest)
from mim_rec.data.schemas import EVENTS, ITEMS, PAIRS, Contract
from mim_rec.data.staging import require_outside, staged_folder

PathLike = Union[str, Path]
HOLDOUT_STAGE = "holdout"


def time_cut(ts: np.ndarray, fraction: float, path: PathLike, option: str = "data.validation") -> int:
    """The time from which the latest ``fraction`` of rows (by ``ts``) is held out: rows at or
    after it validate, the earlier ones train. ``option`` names the setting in errors."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"{option}={fraction}: must lie strictly between 0 and 1")
    if len(ts) == 0:
        raise DataError(str(path), f"{option}={fraction}: there are no rows to split", field="ts")
    ordered = np.sort(ts)
    # The held-out count rounds up, computed from ``fraction`` itself: ``1 - 0.9`` is 0.0999...
    # (the epsilon keeps 100 * 0.9 = 90.00000000000001 from rounding up to 91).
    train_rows = len(ordered) - math.ceil(len(ordered) * fraction - 1e-9)
    cut = int(ordered[min(len(ordered) - 1, train_rows)])
    if not (ordered < cut).any():
        why = ("every row shares the cut's timestamp" if train_rows > 0
               else f"it holds out all {len(ordered)} rows")
        raise DataError(str(path), f"{option}={fraction} leaves no rows to train on ({why})", field="ts")
    return cut


def _write_split(table: pa.Table, held: np.ndarray, out: Path, stem: str, contract: Contract,
                 item_count: int) -> Dict[str, int]:
    """``table``'s rows outside ``held`` as ``out/{stem}_train.parquet``, those in it as
    ``{stem}_test.parquet`` (checked and written atomically by :func:`write_table`); the counts."""
    for split, rows in (("train", ~held), ("test", held)):
        write_table(table.filter(pa.array(rows)), out / f"{stem}_{split}.parquet", contract,
                    item_count=item_count)
    return {f"{stem}_train": int((~held).sum()), f"{stem}_test": int(held.sum())}


def holdout_world(source: PathLike, out: PathLike, fraction: float) -> Dict[str, int]:
    """Write the world ``out``: ``source``'s items, its ``events_train`` before the cut as
    ``events_train`` and from the cut on as ``events_test``; ``pairs_train`` split at the same
    time into ``pairs_train`` / ``pairs_test`` (so C-SFT on ``out`` never trains on the
    held-out period either); the synthetic ground truth split alike where present; the world's
    own ``mm_table/`` (an import's) linked as it is. Relative image paths are written absolute,
    so they name the source world's images. The
    source's test files are not read. Returns the row counts; the manifest, written last,
    records the source files' fingerprints, the fraction and the cut."""
    source, out = Path(source), Path(out)
    require_outside(out, source)
    items_path, events_path = source / "items.parquet", source / "events_train.parquet"
    for path in (items_path, events_path):
        if not path.is_file():
            raise DataError(str(path), "a world to hold out from needs this file")
    if out.exists() and not out.is_dir():
        raise DataError(str(out), "a file, not a folder to write the validation world to")
    items = validate_file(items_path, ITEMS)
    item_count, item_category = items.rows, items.item_category
    # the cross-file rules a world check applies, so the split is a world validate accepts
    categories = category_count(item_category)
    events = validate_file(events_path, EVENTS, item_count=item_count, category_count=categories,
                           item_category=item_category).table
    ts = events.column("ts").to_numpy()
    cut = time_cut(ts, fraction, events_path, option="--fraction")
    validating = ts >= cut

    # Written aside and swapped in whole (as synth and import write): a failed split leaves
    # ``out`` as it was, and a folder that is not a world is refused, not written into.
    with staged_folder(out, "mim data holdout") as staging:
        _carry_items(items.table, items_path, staging / "items.parquet")
        counts = {"items": item_count, **_write_split(events, validating, staging, "events", EVENTS, item_count)}
        inputs = {"items": fingerprint_file(items_path), "events_train": fingerprint_file(events_path)}
        pairs_path = source / "pairs_train.parquet"
        if pairs_path.is_file():
            pairs = absolute_image_paths(validate_file(pairs_path, PAIRS, item_count=item_count,
                                                       category_count=categories,
                                                       item_category=item_category).table, source)
            later = pairs.column("ts").to_numpy() >= cut
            inputs["pairs_train"] = fingerprint_file(pairs_path)
            if later.all() or not later.any():  # a world file must hold rows: leave the pairs out
                print(f"mim data holdout: warning: the {len(pairs):,} pairs of {pairs_path} all fall "
                      f"{'after' if later.all() else 'before'} the cut at --fraction {fraction}, so the "
                      "validation world has no pairs (C-SFT cannot run on it; CTR can)", file=sys.stderr)
            else:
                counts.update(_write_split(pairs, later, staging, "pairs", PAIRS, item_count))
        _split_truth(source / "truth", staging / "truth", validating)
        if _carry_mm_table(source / "mm_table", staging / "mm_table"):
            inputs["mm_table"] = fingerprint_tree(source / "mm_table")
        write_manifest(staging, Manifest(
            kind="world", stage=HOLDOUT_STAGE, row_count=item_count, inputs=inputs,
            config={"source": str(source.resolve()), "fraction": fraction, "cut_ts": cut},
            extra={"counts": counts, "source_config": _source_config(source), **carried_age_caveat(source)}))
    return counts


def _carry_items(items: pa.Table, source: Path, out: Path) -> None:
    """The source's items (``items``: as checked), hard-linked; written anew with absolute image
    paths where they name image files relative to the source world, which ``out``'s folder
    does not have."""
    if "image_path" in items.column_names:
        pq.write_table(absolute_image_paths(items, source.parent), out)
    else:
        link_or_copy(source, out)


def _carry_mm_table(source: Path, out: Path) -> bool:
    """The world's own MM table (an import's, e.g. TAOBAO-MM's release embeddings), linked file
    by file with its manifest: it is keyed by item id and the items are the source's, so it is
    valid for the split world unchanged (``mm_table=DIR_VAL/mm_table``). Whether one was there."""
    if not source.is_dir():
        return False
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        target = out / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(path, target)
    return True


def _split_truth(source: Path, out: Path, validating: np.ndarray) -> None:
    """The synthetic ground truth, kept row-aligned with the split events files."""
    if not source.is_dir():
        return
    out.mkdir(parents=True)
    for name in ("items.npz", "users.npz", "README.md"):
        if (source / name).is_file():
            link_or_copy(source / name, out / name)
    truth_events = source / "events_train.parquet"
    if truth_events.is_file():
        table = pq.read_table(truth_events)
        if table.num_rows != len(validating):
            raise DataError(str(truth_events), f"{table.num_rows} rows, but events_train.parquet has "
                            f"{len(validating)}: the ground truth is not row-aligned with the events")
        pq.write_table(table.filter(pa.array(~validating)), out / "events_train.parquet")
        pq.write_table(table.filter(pa.array(validating)), out / "events_test.parquet")


def _source_config(source: Path) -> Dict:
    """The source world's own config (a synthetic world's generator settings), if it has one."""
    if not (source / "manifest.json").is_file():
        return {}
    return read_manifest(source).config

"""What every importer shares: dense id maps, negative sampling, the import report and the
world folder writer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import pyarrow as pa

from mim_rec.data.errors import DataError
from mim_rec.data.io import write_table
from mim_rec.data.manifest import Manifest, fingerprint_file, write_manifest
from mim_rec.data.schemas import EVENTS, ITEMS, PAIRS
from mim_rec.data.staging import staged_folder


class DenseIds:
    """Raw ids -> dense ``0..N-1`` in sorted raw order (deterministic, and a lookup is one
    ``searchsorted``, so mapping a row group of 1000-long histories stays vectorised)."""

    def __init__(self, raw_sorted_unique: np.ndarray):
        self.raw = raw_sorted_unique

    @classmethod
    def from_chunks(cls, chunks: Iterable[np.ndarray]) -> "DenseIds":
        """Union of raw ids seen chunk by chunk (each chunk de-duplicated as it arrives)."""
        parts = [np.unique(np.asarray(c)) for c in chunks]
        return cls(np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.raw)

    def lookup(self, raw: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Dense ids of ``raw`` and a mask of which were known (unknown ones map to 0)."""
        raw = np.asarray(raw)
        index = np.searchsorted(self.raw, raw)
        index = np.minimum(index, max(len(self.raw) - 1, 0))
        found = (self.raw[index] == raw) if len(self.raw) else np.zeros(len(raw), bool)
        return np.where(found, index, 0).astype(np.int64), found


def sample_negatives(users: np.ndarray, count: int, item_count: int,
                     positives: Mapping[int, np.ndarray], method: str,
                     popularity: Optional[np.ndarray], rng: np.random.Generator,
                     source: str) -> np.ndarray:
    """``count`` negative items per row of ``users`` (rows of ``source``, named in errors),
    never a positive of that row's user.

    ``uniform`` draws every item with equal probability; ``popularity`` draws in proportion
    to ``popularity + 1`` (training interaction counts, add-one smoothed so items first seen
    in test can still be drawn). Draws hitting a positive, or an item already drawn for the
    same row (it would count one non-click twice), are redrawn until none is left.
    Returns ``[len(users), count]`` item ids.
    """
    if method not in ("uniform", "popularity"):
        raise ValueError(f"unknown negative sampling {method!r} (uniform | popularity)")
    p = None
    if method == "popularity":
        weights = popularity.astype(np.float64) + 1.0
        p = weights / weights.sum()
    # A sorted array of user * item_count + item keys answers "is this a positive?" in bulk.
    keys = np.unique(np.concatenate(
        [u * item_count + np.asarray(items, np.int64) for u, items in positives.items()]
        or [np.zeros(0, np.int64)]))
    rows = np.repeat(np.asarray(users, np.int64), count)
    draws = rng.choice(item_count, size=len(rows), p=p)
    todo = np.arange(len(rows))
    for _ in range(1000):
        hit = np.zeros(len(rows), bool)  # only a redrawn item can be a new positive; any can repeat
        hit[todo] = _contains(keys, rows[todo] * item_count + draws[todo])
        todo = np.flatnonzero(hit | _drawn_before(draws, count))
        if len(todo) == 0:
            return draws.reshape(len(users), count)
        draws[todo] = rng.choice(item_count, size=len(todo), p=p)
    raise DataError(source, f"{len(todo)} rows could not draw a non-positive item (users who "
                            f"interacted with nearly every item?); lower --negatives", field="negatives")


def _drawn_before(draws: np.ndarray, count: int) -> np.ndarray:
    """Flat mask of the draws that repeat an earlier draw of the same row (rows of ``count``)."""
    per_row = draws.reshape(-1, count)
    order = np.argsort(per_row, axis=1, kind="stable")  # equal items keep their draw order
    ranked = np.take_along_axis(per_row, order, axis=1)
    again = np.zeros(per_row.shape, bool)
    again[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    repeated = np.zeros(per_row.shape, bool)
    np.put_along_axis(repeated, order, again, axis=1)
    return repeated.reshape(-1)


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), bool)
    index = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[index] == keys


@dataclass
class ImportReport:
    """Counts and caveats printed at the end of an import and kept in the world manifest."""

    format: str
    counts: Dict[str, int] = field(default_factory=dict)
    missing: Dict[str, int] = field(default_factory=dict)  # rows filled with counted defaults
    # The --allow-missing kinds the import was told to admit (mim_rec.data.importers.missing),
    # and each missing count's kind: the summary names each admitted kind with its counts.
    admitted: Tuple[str, ...] = ()
    kind_of: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    # Set when ``created_at`` is no calendar time: why the item-age buckets (S1..S10) of this
    # world measure something else. Reports print it under their age tables (world_age_caveat).
    item_age: Optional[str] = None

    def lines(self) -> List[str]:
        out = [f"import {self.format}:"]
        out += [f"  {k:<40} {v:>12,}" for k, v in self.counts.items()]
        if self.admitted:
            out.append(f"  missing rows filled with counted defaults (--allow-missing {','.join(self.admitted)}):")
            for kind in self.admitted:
                filled = {k: v for k, v in self.missing.items() if self.kind_of[k] == kind}
                out.append(f"    {kind}" + ("" if filled else ": none missing"))
                out += [f"      {k:<36} {v:>12,}" for k, v in filled.items()]
        out += [f"  note: {n}" for n in self.notes]
        if self.item_age:
            out.append(f"  item age: {self.item_age}")
        return out


def refuse_missing(source: str, missing: Dict[str, int], kind_of: Mapping[str, str],
                   admitted: Collection[str], explanation: str) -> None:
    """Stop unless every nonzero count is of a kind the user admitted (``--allow-missing
    KINDS``); ``kind_of`` gives each count's kind, in the format's order of kinds. Admitting
    one kind never admits another: the refusal lists the counts refused and the flag that
    would admit them too."""
    refused = {k: v for k, v in missing.items() if v and kind_of[k] not in admitted}
    if refused:
        listed = "; ".join(f"{k}: {v:,}" for k, v in refused.items())
        wanted = {*admitted, *(kind_of[k] for k in refused)}
        kinds = ",".join(kind for kind in dict.fromkeys(kind_of.values()) if kind in wanted)
        raise DataError(source, f"the source files do not join ({listed}). {explanation} "
                                f"Re-run with --allow-missing {kinds} to fill counted defaults.")


def write_world(out: Path, items: pa.Table, pairs: Dict[str, pa.Table],
                events: Dict[str, pa.Table], report: ImportReport, config: dict,
                sources: Iterable[Path]) -> Manifest:
    """Write a world folder (items, pairs_*, events_*) through the validating writer, then
    its manifest (kind="world", stage="import"), in a staging folder that replaces ``out``
    whole when done: nothing of an earlier world there is kept, nor lost if this fails."""
    with staged_folder(out, "mim data import") as staging:
        return _write_world(staging, items, pairs, events, report, config, sources)


def _write_world(out: Path, items: pa.Table, pairs: Dict[str, pa.Table],
                 events: Dict[str, pa.Table], report: ImportReport, config: dict,
                 sources: Iterable[Path]) -> Manifest:
    item_count = items.num_rows
    write_table(items, out / "items.parquet", ITEMS)
    for split, table in pairs.items():
        write_table(table, out / f"pairs_{split}.parquet", PAIRS, item_count=item_count)
    for split, table in events.items():
        write_table(table, out / f"events_{split}.parquet", EVENTS, item_count=item_count)
    manifest = Manifest(
        kind="world", stage="import", config=config,
        inputs={Path(p).name: fingerprint_file(p) for p in sources},
        row_count=item_count,
        extra={"format": report.format, "counts": report.counts, "missing": report.missing,
               "notes": report.notes, "item_age": report.item_age})
    write_manifest(out, manifest)
    return manifest


def list_column(lists: List[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """A list column from per-row NumPy arrays without a Python loop over values."""
    lengths = np.fromiter((len(x) for x in lists), np.int64, count=len(lists))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(lists) if lists else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(value_type.to_pandas_dtype())))

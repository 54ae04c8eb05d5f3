"""Reading a representation-center table folder: ``part-*.parquet`` + ``manifest.json``.

Parts hold ``(item_id, vector)`` rows in the ``MM_TABLE_FP`` contract, or row-wise quantised
``(item_id, vector int8, scale, bias)`` in ``MM_TABLE_INT8`` (value = int8 * scale + bias).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mim_rec.data.errors import DataError, ManifestMismatch
from mim_rec.data.io import open_parquet
from mim_rec.data.manifest import Manifest, fingerprint_file, manifest_path, read_manifest
from mim_rec.data.validate import repeated_entries
from mim_rec.utils.text import counted


def table_parts(table_dir: Union[str, Path], manifest: Optional[Manifest] = None) -> List[Path]:
    """The table's parts. Where the manifest lists them (``extra.shards``), a listed part that is
    absent and a part it does not list are errors: read as they are, the first gives zero
    vectors and the second overwrites rows, and neither would be noticed. ``manifest``: the
    folder's, when the caller has read it already."""
    table_dir = Path(table_dir)
    parts = sorted(table_dir.glob("part-*.parquet"))
    if not parts:
        raise DataError(str(table_dir), "no part-*.parquet files: not an MM table folder")
    if manifest is None and manifest_path(table_dir).is_file():
        manifest = read_manifest(table_dir)
    listed = manifest.extra.get("shards") if manifest is not None else None
    if listed is not None:
        names = {part.name for part in parts}
        absent, stray = sorted(set(listed) - names), sorted(names - set(listed))
        if absent:
            raise DataError(str(table_dir / absent[0]), f"a part the manifest lists is missing ({len(absent)} "
                                                        f"missing in all); rebuild the table")
        if stray:
            raise DataError(str(table_dir / stray[0]), "a part the manifest does not list (left by another "
                                                       "build?); remove it or rebuild the table")
    return parts


def table_identity(table_dir: Union[str, Path]) -> str:
    """Which table ``table_dir`` is: the fingerprint of its manifest, which every build, fold and
    quantise writes anew (its creation time included), so two tables never share one, while a
    copied folder keeps it. Cheap at any table size: the parts are not read."""
    return fingerprint_file(manifest_path(table_dir))


MISSING_POLICIES = ("error", "default")


def catalogue_fingerprint(items_path: Union[str, Path], rows: int) -> str:
    """What a table's rows were embedded from: the raw ids and titles of items ``0..rows-1``.

    An MM table built for another catalogue of as many items (another world, other content
    under the same ids) passes every size check, and its vectors would be trained on as if they
    were this catalogue's. A catalogue that has grown since (new items, not embedded yet) still
    matches on the rows the table holds."""
    items = pq.read_table(items_path, columns=["item_id", "raw_item_id", "title"]).sort_by("item_id").slice(0, rows)
    digest = hashlib.sha256()
    for column in ("raw_item_id", "title"):
        for value in items[column].to_pylist():
            digest.update(str(value).encode() + b"\0")
    return digest.hexdigest()[:16]


def check_table(table_dir: Union[str, Path], num_items: int, dim: int, missing: str = "error",
                items_path: Optional[Union[str, Path]] = None) -> int:
    """Refuse a folder that is not an MM table of ``dim`` for a catalogue of ``num_items``;
    returns how many catalogue items it lacks.

    ``missing="error"`` wants a complete table (one row per item). ``missing="default"``
    accepts a table lacking some items (new ones that RIM has not embedded yet): they read as
    the default vector, zeros, and the returned count says how many there are. With
    ``items_path``, a table that records its catalogue (:func:`catalogue_fingerprint`) must have
    been built from these items.
    """
    _check_policy(missing)
    manifest = read_manifest(table_dir)
    if manifest.kind != "mm_table":
        raise ManifestMismatch(f"{table_dir}: manifest kind is {manifest.kind!r}, not 'mm_table'")
    if manifest.dim != dim:
        raise ManifestMismatch(f"{table_dir}: table dim {manifest.dim} != model.mm_dim {dim}")
    if manifest.row_count is None:  # written by hand: every size check below reads it
        raise ManifestMismatch(f"{table_dir}: its manifest gives no row_count; an MM table's manifest must "
                               "(docs/interfaces.md)")
    _, high = manifest.extra.get("id_range", [0, manifest.row_count])
    if high > num_items:
        raise ManifestMismatch(f"{table_dir}: table ids reach {high - 1}, the catalogue has {num_items} items")
    built_for = manifest.extra.get("catalogue")
    if items_path is not None and built_for is not None and \
            catalogue_fingerprint(items_path, built_for["rows"]) != built_for["fingerprint"]:
        raise ManifestMismatch(f"{table_dir}: built for other items than {items_path} (the raw ids and titles of "
                               f"its {built_for['rows']} items differ); build the table from this world's items")
    # An id past the range (or none) would be read as no row at all, and not counted missing.
    held = 0
    for part in table_parts(table_dir, manifest):
        rows, nulls, low, top = _id_summary(part)
        if nulls:
            raise DataError(str(part), f"{counted(nulls, 'row')} without an item id", field="item_id")
        if low < 0 or top >= high:
            raise DataError(str(part), f"item ids {low}..{top} reach outside the table's id range [0, {high})",
                            field="item_id")
        held += rows
    if held != manifest.row_count:
        raise DataError(str(table_dir), f"its parts hold {held} rows, its manifest says {manifest.row_count}: "
                                        "a part is missing or was added; rebuild the table")
    lacking = num_items - manifest.row_count
    if lacking and missing == "error":
        raise ManifestMismatch(f"{table_dir}: table has {manifest.row_count} rows, the catalogue {num_items} items "
                               "(missing=default reads the absent items as zero vectors)")
    return lacking


def read_mm_rows(table_dir: Union[str, Path], start: int, stop: int, dim: int,
                 missing: str = "error") -> torch.Tensor:
    """Vectors of items ``start..stop-1`` as ``[stop - start, dim]`` float32 (one range of
    :class:`MMTableRows`; a reader of many ranges should keep one of those)."""
    return MMTableRows(table_dir, dim, missing)(start, stop)


class MMTableRows:
    """An MM table read range by range: ``rows(start, stop)`` is items ``start..stop-1`` as
    ``[stop - start, dim]`` float32.

    The parts and their id bounds are listed once, here: a fill reads a table chunk by chunk,
    and listing the folder and every part's footer for each chunk grew as parts x chunks.
    A range reads only the parts (and, inside them, the row groups) whose ``item_id``
    statistics overlap it, so a rank holding one shard of a sharded table never reads the rest.
    Rows of the wrong length and non-finite values are errors; ids the table lacks are an
    error too, or with ``missing="default"`` zero vectors (the default, never garbage).
    """

    def __init__(self, table_dir: Union[str, Path], dim: int, missing: str = "error") -> None:
        _check_policy(missing)
        self.table_dir, self.dim, self.missing = str(table_dir), dim, missing
        self.parts = [(part, *_id_summary(part)[2:]) for part in table_parts(table_dir)]

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        out = torch.zeros(stop - start, self.dim)
        seen = np.zeros(stop - start, dtype=bool)
        for part, low, high in self.parts:
            if high < start or low >= stop:
                continue
            ids, vectors = read_part_rows(part, self.dim, start, stop)
            again = seen[ids - start]
            if again.any():
                raise DataError(str(part), f"item {ids[again][0]} has a second row (in this or an earlier "
                                           "part); rebuild the table", field="item_id")
            out[torch.from_numpy(ids - start)] = torch.from_numpy(vectors)
            seen[ids - start] = True
        if not seen.all() and self.missing == "error":
            raise DataError(self.table_dir, f"{int((~seen).sum())} of {stop - start} items in {start}..{stop - 1} "
                            f"have no vector (first: item {start + int(np.flatnonzero(~seen)[0])}); "
                            "rebuild the table for this catalogue")
        return out


def read_part_rows(part: Path, dim: int, start: Optional[int] = None,
                   stop: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors [n, dim] float32)`` of one part (those in ``start..stop-1`` if given),
    int8 rows dequantised. A repeated id, a row of another length and a non-finite value are
    errors naming the part."""
    filters = None if start is None else [("item_id", ">=", start), ("item_id", "<", stop)]
    try:
        table = pq.read_table(part, filters=filters)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(part), f"unreadable Parquet data ({exc})") from exc
    ids = table["item_id"].to_numpy()
    repeated = repeated_entries(ids)
    if repeated.any():
        raise DataError(str(part), f"item {ids[repeated][0]} has a second row (in this or an earlier "
                                   "part); rebuild the table", field="item_id")
    # Each row's own length: rows of 7 and 9 add up to two of 8 and would reshape into neighbours.
    lengths = pc.list_value_length(table["vector"]).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(lengths != dim)
    if len(wrong):
        raise DataError(str(part), f"item {ids[wrong[0]]}'s vector is {lengths[wrong[0]]} long, not {dim} "
                                   f"({len(wrong)} such rows)", field="vector")
    flat = pc.list_flatten(table["vector"]).to_numpy(zero_copy_only=False).astype(np.float32)
    vectors = flat.reshape(len(ids), dim)
    if "scale" in table.column_names:
        vectors = vectors * table["scale"].to_numpy()[:, None] + table["bias"].to_numpy()[:, None]
    nonfinite = np.flatnonzero(~np.isfinite(vectors).all(1))
    if len(nonfinite):
        raise DataError(str(part), f"non-finite vector of item {ids[nonfinite[0]]}", field="vector")
    return ids, vectors


def read_mm_table(table_dir: Union[str, Path], num_items: int, dim: int) -> torch.Tensor:
    """All vectors as ``[num_items, dim]`` float32, row i = item i (see :func:`read_mm_rows`)."""
    check_table(table_dir, num_items, dim)
    return read_mm_rows(table_dir, 0, num_items, dim)


def table_item_ids(table_dir: Union[str, Path]) -> np.ndarray:
    """Every item id the table holds, sorted (reads only the ``item_id`` column)."""
    ids = [pq.read_table(part, columns=["item_id"])["item_id"].to_numpy() for part in table_parts(table_dir)]
    return np.sort(np.concatenate(ids))


def _check_policy(missing: str) -> None:
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing={missing!r}: choose one of {MISSING_POLICIES}")


def _id_summary(part: Path) -> tuple:
    """``(rows, rows without an item id, min id, max id)`` of a part, from one read of its
    footer: its row-group statistics where every row group has them (no data read), else its
    ``item_id`` column."""
    meta = open_parquet(part).metadata
    column = meta.schema.to_arrow_schema().get_field_index("item_id")
    stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
    if stats and all(s is not None and s.has_min_max and s.has_null_count for s in stats):
        return meta.num_rows, sum(s.null_count for s in stats), min(s.min for s in stats), max(s.max for s in stats)
    ids = pq.read_table(part, columns=["item_id"])["item_id"]
    bounds = pc.min_max(ids)
    low, high = (bounds["min"].as_py(), bounds["max"].as_py()) if len(ids) else (np.inf, -np.inf)
    return meta.num_rows, ids.null_count, low, high

"""Fold RIM's window messages into the next MM table version (``mim embeddings fold``).

The next version holds the base table's parts unchanged (hard-linked where the file system
allows, else copied) plus one new part with the log's rows, and a manifest naming the base
table and the log offset folded. Folding a folded table again with the same log starts at that
offset, so each version adds exactly the items that arrived since the last one. Every record
must have been served against the base table, or against a table the base was folded from with
this same log (:func:`served_tables`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import pyarrow as pa

from mim_rec.data.errors import DataError, ManifestMismatch
from mim_rec.data.io import link_or_copy, write_table
from mim_rec.data.manifest import Manifest, fingerprint_file, require, write_manifest
from mim_rec.data.schemas import MM_TABLE_FP, MM_TABLE_INT8
from mim_rec.data.staging import written_beside
from mim_rec.utils.run import sole_writer

from embeddings.compact import int8_rows_table
from embeddings.rim_log import NUM_ITEMS_HINT, check_message, check_new_ids, check_served_table, read_messages
from embeddings.table import table_identity, table_item_ids, table_parts


# How much of a log's head identifies it: a log rotated to a new file at the same path starts
# with other records, so its head differs from the one a fold recorded.
LOG_HEAD_BYTES = 1 << 20


def log_head_digest(log_path: Union[str, Path], length: int) -> str:
    """sha256 of the log's first ``min(length, LOG_HEAD_BYTES)`` bytes (16 hex chars)."""
    with Path(log_path).open("rb") as fh:
        return hashlib.sha256(fh.read(min(length, LOG_HEAD_BYTES))).hexdigest()[:16]


def folded_offset(table_dir: Union[str, Path], log_path: Union[str, Path]) -> int:
    """The log offset a table already contains: 0 unless it was folded from this very log.

    "This very log" is the path *and* the file: a log rotated at the same path, shorter than
    the offset or with another head, is refused rather than read from the old offset, which
    would skip its first records for good."""
    rim = require(table_dir, kind="mm_table").extra.get("rim") or {}
    log_path = Path(log_path)
    if rim.get("log") != str(log_path.resolve()):
        return 0
    offset = int(rim["offset"])
    require_same_log(log_path, offset, rim.get("head"), f"{table_dir} was folded from", "the table")
    return offset


def served_tables(table_dir: Union[str, Path], manifest: Manifest, log_path: Union[str, Path]) -> List[str]:
    """The tables (:func:`~embeddings.table.table_identity`) a record of the log at ``log_path``
    may have been served against to go into the table ``table_dir`` (its ``manifest``): the table
    itself first, then, where it is a fold of this very log, the tables of that chain of folds
    (``extra.rim.tables``). A service that went on serving the log against the fold's base
    checked each later id against the base and every earlier record of the log, which is what
    the fold holds; the fold of another log is another table, whose rows such a service never
    saw. A log is "this very log" as for :func:`folded_offset`, which every consumer calls first."""
    rim = manifest.extra.get("rim") or {}
    folded_from_it = rim.get("log") == str(Path(log_path).resolve())
    return [table_identity(table_dir), *(rim.get("tables", []) if folded_from_it else [])]


def require_same_log(log_path: Path, offset: int, head: Optional[str], read_as: str, holder: str) -> None:
    """Refuse the file at ``log_path`` unless it is the log whose first ``offset`` bytes
    ``holder`` holds (``head``: their :func:`log_head_digest`, None where not recorded). A log
    rotated at the same path is shorter than the offset or starts with other bytes; reading it
    from the old offset would skip its first records for good."""
    size = log_path.stat().st_size if log_path.is_file() else 0
    if offset > size or (head is not None and offset and log_head_digest(log_path, offset) != head):
        raise ManifestMismatch(f"{log_path}: not the log {read_as} ({offset} bytes of it are in {holder}; "
                               f"this file has {size} bytes{'' if offset > size else ' and another head'}); "
                               "give a rotated log a new name")


def table_encoder(table_dir: Union[str, Path], manifest: Manifest) -> str:
    """The encoder fingerprint the table's ``manifest`` names: every log record is checked
    against it, so a table naming none is refused rather than taking any encoder's vectors."""
    fingerprint = manifest.extra.get("encoder_fingerprint")
    if fingerprint is None:
        raise ManifestMismatch(f"{table_dir}: its manifest names no encoder (extra.encoder_fingerprint), so "
                               "no log's vectors can be checked against it")
    return fingerprint


def new_id_space(table_dir: Union[str, Path], manifest: Manifest, num_items: Optional[int]) -> int:
    """The id space new items of the table ``table_dir`` (its ``manifest``) must fall in:
    ``num_items``, or the table's own ``id_range`` where it is not given. One below that
    range is refused: the table holds ids up to its end, so no id could be new and fit."""
    table_ids = int(manifest.extra.get("id_range", [0, manifest.row_count])[1])
    if num_items and num_items < table_ids:
        raise ManifestMismatch(f"num_items={num_items}: {table_dir} already spans ids 0..{table_ids - 1}")
    return num_items or table_ids


def fold_log(table_dir: Union[str, Path], log_path: Union[str, Path], out_dir: Union[str, Path],
             num_items: Optional[int] = None) -> Path:
    """Write ``out_dir``: the table ``table_dir`` plus every log row it does not hold yet.

    ``num_items`` is the catalogue's id space (default: the base table's ``id_range``); a new
    id outside it, an id the table already has, a vector from another encoder, or a record
    served against another table (:func:`served_tables`) is an error. A second fold (or
    quantise) into the same ``out_dir`` while this one runs is refused at once (:func:`sole_writer`).
    """
    with sole_writer(out_dir):
        return _fold_into(Path(table_dir), Path(log_path), Path(out_dir), num_items)


def _fold_into(table_dir: Path, log_path: Path, out: Path, num_items: Optional[int]) -> Path:
    """:func:`fold_log`, once this process is the only writer of ``out``."""
    base = require(table_dir, kind="mm_table")
    if not log_path.is_file():
        raise DataError(str(log_path), "a folder, not a RIM log file" if log_path.is_dir() else "no such log file")
    if out.exists() and not out.is_dir():
        raise ManifestMismatch(f"out={out}: a file, not a folder; fold into a new folder")
    if out.exists() and any(out.iterdir()):
        raise ManifestMismatch(f"{out}: not empty; fold into a new folder")
    if out.resolve().is_relative_to(table_dir.resolve()):
        raise ManifestMismatch(f"out={out} lies inside the base table {table_dir}, whose parts it shares: "
                               "removing the old version would remove the new one's; fold into a folder beside it")
    fingerprint = table_encoder(table_dir, base)
    num_items = new_id_space(table_dir, base, num_items)
    start = end = folded_offset(table_dir, log_path)
    tables = served_tables(table_dir, base, log_path)
    size = log_path.stat().st_size  # before reading: what the service appends meanwhile is not torn
    ids, vectors = [np.zeros(0, np.int64)], [np.zeros((0, base.dim), np.float32)]
    for end, message in read_messages(log_path, start):
        check_message(message, fingerprint, base.dim, log_path, end, f"the table {table_dir}")
        check_served_table(message, tables, log_path, end, table_dir)
        ids.append(message.item_ids)
        vectors.append(message.vectors)
    ids, vectors = np.concatenate(ids), np.concatenate(vectors)
    # An incomplete last record (being appended, or torn by a crash) is not folded; the next
    # fold starts at ``end`` and takes it if it has been completed by then. Said, not hidden.
    unfolded = max(size - end, 0)
    check_new_ids(ids, [table_item_ids(table_dir)], num_items, log_path, str(table_dir), NUM_ITEMS_HINT)

    # Written beside ``out`` and renamed into place: a fold that fails leaves no half-table.
    with written_beside(out, "folding") as staging:
        parts = table_parts(table_dir)
        names = [f"part-{k:05d}.parquet" for k in range(len(parts) + (len(ids) > 0))]
        for part, name in zip(parts, names):
            link_or_copy(part, staging / name)
        if len(ids):
            order = np.argsort(ids)
            write_table(_new_part(ids[order], vectors[order], base.dtype, log_path), staging / names[-1],
                        MM_TABLE_INT8 if base.dtype == "int8" else MM_TABLE_FP, item_count=num_items,
                        vector_dims={"vector": base.dim})
        write_manifest(staging, Manifest(
            kind="mm_table", stage="rim_fold", config={"num_items": num_items},
            row_count=base.row_count + len(ids), dim=base.dim, dtype=base.dtype,
            inputs={"base_table": tables[0], "log": fingerprint_file(log_path)},
            extra={"encoder_fingerprint": fingerprint, "id_range": [0, num_items], "shards": names,
                   **({"catalogue": base.extra["catalogue"]} if "catalogue" in base.extra else {}),
                   "base_table": str(table_dir.resolve()),
                   "rim": {"log": str(log_path.resolve()), "from_offset": start, "offset": end,
                           "head": log_head_digest(log_path, end), "items": int(len(ids)),
                           "unfolded_bytes": unfolded, "tables": tables}}))
    return out


def _new_part(ids: np.ndarray, vectors: np.ndarray, dtype: str, source: Path) -> pa.Table:
    """The log rows (of ``source``, named in errors) in the base table's own contract, so every
    part of the next version reads alike: fp32 rows, or row-wise int8 codes with a scale and
    bias where the base is int8."""
    if dtype != "int8":
        return pa.table({"item_id": pa.array(ids, pa.int64()),
                         "vector": pa.array(list(vectors), pa.list_(pa.float32()))})
    return int8_rows_table(ids, vectors, source)

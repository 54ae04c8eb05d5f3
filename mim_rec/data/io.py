"""Validating readers and writers of the data contracts.

Readers never trust a file. :func:`validate_file` streams a Parquet file by record batches,
runs the contract's vectorised row checks (:mod:`mim_rec.data.validate`) and either

* raises a :class:`~mim_rec.data.errors.DataError` naming the file, the FIRST bad row
  (0-based, counted over the whole file) and the field, or
* with ``drop_invalid=True``, writes EVERY bad row to ``<file>.rejected.parquet`` (the row as
  read, plus ``source_row`` and ``reason``), prints the count and returns only good rows.

Nothing is coerced silently: columns must have the contract's type or one of the documented
lossless widenings (:data:`mim_rec.data.validate.WIDENINGS`). Columns outside the contract are
passed through unchanged and unchecked.

:func:`write_table` runs the same checks before writing, and writes atomically (temp file +
rename), so a half-written or invalid artifact never appears under its final name.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mim_rec.data.errors import DataError, ManifestMismatch
from mim_rec.data.manifest import Manifest, read_manifest, staging_name, write_manifest
from mim_rec.data.schemas import (EVENTS, ITEMS, MM_TABLE_FP, MM_TABLE_INT8, PAIRS,
                                  Contract)
from mim_rec.data.validate import (CheckContext, RowCheck, cast_batch, conform_schema,
                                   item_id_checks, row_checks, vector_columns, vector_dimensions)
from mim_rec.utils.text import counted

PathLike = Union[str, Path]
BATCH_ROWS = 16384
"""Rows per record batch when streaming, and per row group when writing: small enough that
an events batch with 1000-long histories stays around 100 MB in memory."""

CONTRACT_BY_PREFIX = {"items": ITEMS, "pairs": PAIRS, "events": EVENTS}
WORLD_FILES = (("items.parquet", ITEMS), ("pairs_train.parquet", PAIRS),
               ("pairs_test.parquet", PAIRS), ("events_train.parquet", EVENTS),
               ("events_test.parquet", EVENTS))
REQUIRED_WORLD_FILES = ("items.parquet", "events_train.parquet", "events_test.parquet")


@dataclass
class ValidationResult:
    """What :func:`validate_file` found: rows kept, rows quarantined, the table if kept."""

    path: Path
    contract: str
    rows: int
    rejected: int
    table: Optional[pa.Table] = None
    rejected_path: Optional[Path] = None
    # Items only: each kept item's category_id (row i: item i), for the events' and pairs' category rules
    item_category: Optional[np.ndarray] = None


def rejected_path_for(path: PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name.replace(".parquet", "") + ".rejected.parquet")


# ---------------------------------------------------------------- readers

def read_items(path: PathLike, drop_invalid: bool = False) -> pa.Table:
    """The items table, validated, ordered by ``item_id`` (row i is item i)."""
    return validate_file(path, ITEMS, drop_invalid=drop_invalid).table


def read_pairs(path: PathLike, item_count: int, drop_invalid: bool = False,
               columns: Optional[List[str]] = None,
               item_category: Optional[np.ndarray] = None) -> pa.Table:
    """C-SFT pairs; ``item_id`` must lie in ``0..item_count-1``, and with ``item_category``
    (row i: item i's category) each pair's ``category_id`` must be its item's."""
    return validate_file(path, PAIRS, item_count=item_count, drop_invalid=drop_invalid,
                         columns=columns, item_category=item_category).table


def read_events(path: PathLike, item_count: int, drop_invalid: bool = False,
                columns: Optional[List[str]] = None) -> pa.Table:
    """CTR events; target and behaviour item ids must lie in ``0..item_count-1``."""
    return validate_file(path, EVENTS, item_count=item_count, drop_invalid=drop_invalid,
                         columns=columns).table


def validate_file(path: PathLike, contract: Contract, *, item_count: Optional[int] = None,
                  category_count: Optional[int] = None, drop_invalid: bool = False, keep: bool = True,
                  columns: Optional[List[str]] = None,
                  vector_dims: Optional[Dict[str, int]] = None,
                  item_category: Optional[np.ndarray] = None,
                  batch_rows: int = BATCH_ROWS, copy_to: Optional[PathLike] = None) -> ValidationResult:
    """Check one Parquet file against ``contract``; see the module docstring.

    ``keep=False`` streams without holding the table (for ``mim data validate`` on files larger
    than memory). ``columns`` reads a subset (contract columns are always all read, since the
    checks need them). ``vector_dims`` fixes the expected length of vector columns (a
    manifest's ``dim``); without it a column's dimension is the length most of its rows have
    (:func:`~mim_rec.data.validate.vector_dimensions`: a first pass over that column).
    ``item_category`` (an items result's :attr:`ValidationResult.item_category`) lets events and
    pairs be checked against their items: each behaviour's and each pair's category must be its
    item's.
    ``copy_to`` streams the rows kept (cast to the contract's types, relative image paths made
    absolute) into a new Parquet file, which appears only once the whole file passed.
    """
    path = Path(path)
    file = str(path)
    parquet = open_parquet(path)
    schema = conform_schema(parquet.schema_arrow, contract, file)
    read_columns = None
    if columns is not None:
        read_columns = [n for n in schema.names if n in contract.fields or n in columns]
        schema = pa.schema([schema.field(n) for n in read_columns])
    vector_dims = vector_dimensions(schema.names, lambda names: read_batches(parquet, file, batch_rows, names),
                                    file, vector_dims)
    ctx = CheckContext(file, item_count=item_count, category_count=category_count, base_dir=path.parent,
                       vector_dims=vector_dims, item_category=item_category)
    checks = row_checks(contract, schema.names, ctx)

    if contract is ITEMS:  # duplicate/density rules need every id at once
        whole = read_parquet_columns(path, read_columns or parquet.schema_arrow.names, batch_rows)
        batches = whole.combine_chunks().to_batches() or [pa.RecordBatch.from_pylist([], whole.schema)]
        checks += item_id_checks(whole.num_rows)
    else:
        batches = read_batches(parquet, file, batch_rows, read_columns)

    quarantine = _Quarantine(path) if drop_invalid else None
    keep_table = keep or contract is ITEMS  # items are always checked for density
    copy = _AtomicParquet(Path(copy_to)) if copy_to is not None else None
    kept: List[pa.RecordBatch] = []
    rows = 0
    kept_categories = None  # items: each kept item's category_id
    try:
        for batch in _scan((cast_batch(b, schema, file) for b in batches), checks, file, quarantine):
            rows += batch.num_rows
            if keep_table:
                kept.append(batch)
            elif copy is not None:
                copy.write(absolute_image_paths(pa.Table.from_batches([batch], schema=schema), path.parent))
        rejected = quarantine.close() if quarantine else 0
        if rejected:
            print(f"{file}: quarantined {counted(rejected, 'invalid row')} -> {quarantine.path}")

        table = pa.Table.from_batches(kept, schema=schema) if keep_table else None
        if contract is ITEMS:
            table = _dense_items(table, file, rejected)
            kept_categories = table.column("category_id").to_numpy().astype(np.int64)
        if copy is not None:
            if table is not None:
                copy.write(absolute_image_paths(table, path.parent))
            copy.close(schema)
    except BaseException:
        if copy is not None:
            copy.abort()
        raise
    if not keep:
        table = None
    return ValidationResult(path, contract.name, rows, rejected, table,
                            quarantine.path if rejected else None, kept_categories)


def open_parquet(path: PathLike) -> pq.ParquetFile:
    """Open a Parquet file; a missing file, a folder (a world given for its items file, which
    read as "no such file" of a folder that was there) or a broken footer is a :class:`DataError`."""
    path = Path(path)
    if path.is_dir():
        raise DataError(str(path), "a folder, not a Parquet file")
    if not path.is_file():
        raise DataError(str(path), "no such file")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(path), f"not a readable Parquet file ({_one_line(exc)})") from exc


def read_batches(parquet: pq.ParquetFile, file: str, batch_rows: int,
                 columns: Optional[Sequence[str]] = None) -> Iterator[pa.RecordBatch]:
    """``parquet``'s record batches; a corrupt page is a :class:`DataError` naming the file and
    the first row that could not be read (Arrow's own error names neither)."""
    batches = parquet.iter_batches(batch_size=batch_rows, columns=None if columns is None else list(columns))
    rows = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise DataError(file, f"unreadable Parquet data from this row on ({_one_line(exc)})", row=rows) from exc
        rows += batch.num_rows
        yield batch


def _one_line(exc: BaseException) -> str:
    """Arrow's message on one line: a broken page header's spans three ("...Invalid data",
    "Deserializing page header failed.", ""), and an error is one line naming file and row."""
    return " ".join(str(exc).split())


def read_parquet_columns(path: PathLike, columns: Sequence[str], batch_rows: int = 1 << 16) -> pa.Table:
    """Some columns of a Parquet file as a table, for readers that need no contract check
    (summaries); a missing file or column and corrupt data raise :class:`DataError`."""
    parquet = open_parquet(path)
    stored = parquet.schema_arrow
    for name in columns:
        if name not in stored.names:
            raise DataError(str(path), f"missing column (has {stored.names})", field=name)
    schema = pa.schema([stored.field(n) for n in columns])
    return pa.Table.from_batches(list(read_batches(parquet, str(path), batch_rows, columns)), schema)


def _dense_items(table: pa.Table, file: str, rejected: int) -> pa.Table:
    """Order by item id; after quarantining, refuse ids that are no longer ``0..N-1``."""
    ids = table.column("item_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    if not np.array_equal(ids[order], np.arange(len(ids))):
        raise DataError(file, f"after quarantining {counted(rejected, 'row')} the item ids are no longer "
                              f"dense 0..{len(ids) - 1}; fix the file or re-map the ids",
                        field="item_id")
    return table if np.array_equal(order, np.arange(len(ids))) else table.take(order)


def _scan(batches: Iterable[pa.RecordBatch], checks: List[RowCheck], file: str,
          quarantine: Optional["_Quarantine"], start: int = 0) -> Iterator[pa.RecordBatch]:
    """Yield the good part of each batch; raise at the first bad row unless quarantining.
    ``start`` is the file row of the first batch's first row."""
    offset = start
    for batch in batches:
        reason = np.full(batch.num_rows, -1, dtype=np.int64)  # index of the first failed check
        for index, check in enumerate(checks):
            flagged = check.flags(batch) & (reason < 0)
            reason[flagged] = index
        bad = reason >= 0
        if bad.any():
            if quarantine is None:
                row = int(np.argmax(bad))
                check = checks[reason[row]]
                expected = f"; {check.expected(batch, row)}" if check.expected else ""
                raise DataError(file, f"{check.reason} (value: {_show(batch, row, check.field)}{expected})",
                                row=offset + row, field=check.field)
            quarantine.add(batch, offset, bad, [checks[i].field + ": " + checks[i].reason
                                                for i in reason[bad]])
            batch = batch.filter(pa.array(~bad))
        offset += len(bad)
        yield batch


def _show(batch: pa.RecordBatch, row: int, field: str, limit: int = 120) -> str:
    names = [n for n in field.split("|") if n in batch.schema.names]
    if field.startswith("hist_") and field != "hist_item_ids":  # unequal lengths: show both
        names = ["hist_item_ids", field]
    shown = ", ".join(_short(_plain(batch.column(n))[row].as_py(), limit) for n in names)
    return shown


def _plain(column: pa.Array) -> pa.Array:
    """A timestamp column as its int64 seconds: a millisecond value read as seconds lies past
    the year 9999, which Python's datetime cannot show."""
    return column.cast(pa.int64()) if pa.types.is_timestamp(column.type) else column


def _short(value, limit: int) -> str:
    if isinstance(value, list) and len(value) > 8:
        text = f"list of {len(value)}: {value[:4]}...{value[-2:]}"
    elif isinstance(value, bytes):
        text = f"{len(value)} bytes {value[:12]!r}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _AtomicParquet:
    """A Parquet file written table by table under a temporary name, renamed into place by
    :meth:`close` (an empty file of ``schema`` if nothing was written); :meth:`abort` leaves
    nothing."""

    def __init__(self, path: Path):
        self.path = path
        self._tmp = staging_name(path)
        self._writer: Optional[pq.ParquetWriter] = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, table.schema)
        self._writer.write_table(table)

    @property
    def started(self) -> bool:
        return self._writer is not None

    def close(self, schema: Optional[pa.Schema] = None) -> None:
        if self._writer is None and schema is not None:
            self.write(schema.empty_table())
        if self._writer is not None:
            self._writer.close()
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._tmp.unlink(missing_ok=True)


class _Quarantine:
    """Streams rejected rows, with ``source_row`` and ``reason``, to ``<file>.rejected.parquet``
    (atomically: the file appears only once complete; a stale one is removed)."""

    def __init__(self, source: Path):
        self._file = _AtomicParquet(rejected_path_for(source))
        self.path = self._file.path
        self.count = 0

    def add(self, batch: pa.RecordBatch, offset: int, bad: np.ndarray, reasons: List[str]) -> None:
        rows = batch.filter(pa.array(bad))
        self._file.write(pa.Table.from_batches([rows]).append_column(
            "source_row", pa.array(np.flatnonzero(bad) + offset, pa.int64())).append_column(
            "reason", pa.array(reasons, pa.string())))
        self.count += len(reasons)

    def close(self) -> int:
        if self._file.started:
            self._file.close()
        elif self.path.exists():
            self.path.unlink()
        return self.count


# ---------------------------------------------------------------- writers

class ContractWriter:
    """Stream record batches into one Parquet file of a contract, checking each batch.

    For outputs larger than memory (an importer writing events row group by row group).
    The file appears under its final name only on a clean ``close()``; an exception inside
    the ``with`` block leaves no file behind. A schema with vector columns needs
    ``vector_dims``: rows not yet written cannot tell a column's dimension.
    """

    def __init__(self, path: PathLike, contract: Contract, schema: pa.Schema,
                 item_count: Optional[int] = None,
                 vector_dims: Optional[Dict[str, int]] = None):
        self.path = Path(path)
        self.rows = 0
        self._file = str(self.path)
        self._schema = conform_schema(schema, contract, self._file)
        if vector_dims is None and vector_columns(self._schema.names):
            raise ValueError(f"{self._file}: streaming vector columns needs their vector_dims")
        self._checks = row_checks(contract, self._schema.names,
                                  CheckContext(self._file, item_count=item_count,
                                               base_dir=self.path.parent, vector_dims=vector_dims))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = staging_name(self.path)
        self._writer = pq.ParquetWriter(self._tmp, self._schema)

    def write(self, table: Union[pa.Table, pa.RecordBatch],
              extra_checks: Iterable[RowCheck] = ()) -> None:
        batches = table.to_batches(max_chunksize=BATCH_ROWS) if isinstance(table, pa.Table) else [table]
        checks = self._checks + list(extra_checks)
        for batch in _scan((cast_batch(b, self._schema, self._file) for b in batches), checks,
                           self._file, None, start=self.rows):
            self._writer.write_batch(batch, row_group_size=BATCH_ROWS)
            self.rows += batch.num_rows

    def close(self) -> Path:
        self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ContractWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


IMAGE_PATH_COLUMNS = ("image_path", "query_image_path")


def absolute_image_paths(table: pa.Table, folder: PathLike) -> pa.Table:
    """``table`` (read from a file in ``folder``) with its relative image paths made absolute,
    for writing it into another folder: a path relative to the source file's folder, copied
    unchanged, named an image the new folder does not have."""
    prefix = str(Path(folder).resolve()) + os.sep
    for name in IMAGE_PATH_COLUMNS:
        if name in table.column_names:
            paths = table.column(name)
            absolute = pc.if_else(pc.starts_with(paths, os.sep), paths,
                                  pc.binary_join_element_wise(prefix, paths, ""))
            table = table.set_column(table.column_names.index(name), name, absolute)
    return table


def link_or_copy(source: PathLike, target: PathLike) -> None:
    """``target`` as a hard link to ``source`` where the filesystem allows (no second copy of a
    large catalogue or table part), else a copy; a file already at ``target`` is replaced."""
    Path(target).unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_table(table: pa.Table, path: PathLike, contract: Contract,
                manifest: Optional[Manifest] = None, item_count: Optional[int] = None,
                vector_dims: Optional[Dict[str, int]] = None) -> Path:
    """Check ``table`` against ``contract`` (raising on the first bad row), cast it to the
    contract's types and write it atomically; write ``manifest`` beside it (row_count filled).
    A vector column not in ``vector_dims`` has the length most of its rows have.
    """
    path = Path(path)
    if contract is ITEMS:  # duplicate/density rules need the whole id column in one batch
        table = table.combine_chunks()
    whole_file = item_id_checks(table.num_rows) if contract is ITEMS else ()
    vector_dims = vector_dimensions(table.schema.names, lambda names: table.select(names).to_batches(),
                                    str(path), vector_dims)
    with ContractWriter(path, contract, table.schema, item_count, vector_dims) as writer:
        if contract is ITEMS:
            for batch in table.to_batches():
                writer.write(batch, whole_file)
        else:
            writer.write(table)
    if manifest is not None:
        if manifest.row_count is None:
            manifest.row_count = table.num_rows
        write_manifest(path, manifest)
    return path


# ---------------------------------------------------------------- world folders

def validate_world(directory: PathLike, drop_invalid: bool = False,
                   echo=print, clean_out: Optional[PathLike] = None) -> List[ValidationResult]:
    """Check every file of a world folder (see ``docs/interfaces.md``), cross-file rules
    included: the items and both event splits present (a missing split used to pass here and
    fail a CTR run after its training), pair and event item ids in the items table, no file
    empty, and an ``mm_table/`` folder matching its manifest. Pairs are optional (only C-SFT
    reads them; a release without query images has none). Prints one ``OK`` line per file with
    its row count.

    ``clean_out`` (with ``drop_invalid``) writes a new world folder there: each file's valid
    rows and a world manifest naming the source files. An ``mm_table/`` and a synthetic
    world's ``truth/`` (row-aligned with the events) are not copied. A check that fails, the
    ``mm_table/``'s included, leaves no clean folder."""
    directory = Path(directory)
    missing = [name for name in REQUIRED_WORLD_FILES if not (directory / name).is_file()]
    if missing:
        raise DataError(str(directory / missing[0]), f"no such file; a world folder needs "
                        f"{', '.join(REQUIRED_WORLD_FILES)} (missing: {', '.join(missing)})")
    clean = _clean_world_folder(directory, clean_out) if clean_out is not None else None
    try:
        results = _check_world_files(directory, drop_invalid, echo, clean)
        check_world_manifest(directory, results[0].rows)
        mm_table = directory / "mm_table"
        mm_results = validate_mm_table(mm_table, results[0].rows, echo=echo) if mm_table.is_dir() else []
        if clean is not None:  # of the world files only: an mm_table/ is not copied
            _write_clean_manifest(clean, directory, results)
            echo(f"clean world -> {clean} ({counted(sum(r.rejected for r in results), 'row')} left out)")
    except BaseException:
        if clean is not None:
            shutil.rmtree(clean, ignore_errors=True)
        raise
    return results + mm_results


def _check_world_files(directory: Path, drop_invalid: bool, echo, clean: Optional[Path]) -> List[ValidationResult]:
    results: List[ValidationResult] = []
    item_count = categories = item_category = None  # known once items.parquet (the first of WORLD_FILES) passed
    for name, contract in WORLD_FILES:
        path = directory / name
        if not path.is_file():
            continue
        result = validate_file(path, contract, item_count=item_count, category_count=categories,
                               item_category=item_category, drop_invalid=drop_invalid, keep=False,
                               copy_to=None if clean is None else clean / name)
        require_rows(result)
        if contract is ITEMS:
            item_count, item_category = result.rows, result.item_category
            categories = category_count(item_category)
        check_dense_ids(result, contract)
        results.append(result)
        echo(ok_line(result))
        if contract is EVENTS and (label := single_label(path)) is not None:
            echo(f"note: {path}: every label is {label}; mim train refuses a split of one class")
    return results


def _clean_world_folder(source: Path, clean_out: PathLike) -> Path:
    """``clean_out``, checked to be a new (or empty) folder other than the source world."""
    clean = Path(clean_out)
    if clean.resolve() == source.resolve():
        raise DataError(str(clean), "the clean world must be a new folder, not the world being checked")
    if clean.exists() and (not clean.is_dir() or any(clean.iterdir())):
        raise DataError(str(clean), "not an empty folder; write the clean world into a new one")
    clean.mkdir(parents=True, exist_ok=True)
    return clean


def _write_clean_manifest(clean: Path, source: Path, results: List[ValidationResult]) -> None:
    from mim_rec.data.manifest import carried_age_caveat, fingerprint_file

    write_manifest(clean, Manifest(
        kind="world", stage="validate --drop-invalid", row_count=results[0].rows,
        inputs={r.path.name: fingerprint_file(r.path) for r in results},
        extra={"counts": {r.path.name.replace(".parquet", ""): r.rows for r in results},
               "source": str(source.resolve()),
               "rejected": {r.path.name: r.rejected for r in results if r.rejected},
               **carried_age_caveat(source)}))


def require_rows(result: ValidationResult) -> ValidationResult:
    """Refuse a checked file that kept no rows: the stage reading it would fail later or train
    on nothing, so ``mim data validate`` must not call it OK."""
    if result.rows == 0:
        quarantined = f" ({result.rejected} quarantined -> {result.rejected_path})" if result.rejected else ""
        raise DataError(str(result.path), f"holds no rows{quarantined}; a world file must hold data")
    return result


# An ID table is sized by its largest id. Ids this far past the number of distinct ones (and past
# a table size that could be meant) are unmapped raw keys, which would allocate rows for nothing.
SPARSE_ID_ROWS, SPARSE_ID_RATIO = 1_000_000, 100


def dense_id_rows(ids: Union[pa.Array, pa.ChunkedArray], path: PathLike, field: str, what: str,
                  file_rows: Optional[np.ndarray] = None) -> int:
    """Rows of the ID table ``ids`` index: ``max(ids) + 1`` (0 for no ids), refused by file, row and
    field when the ids are too sparse to be table rows (see ``SPARSE_ID_ROWS``). ``file_rows``:
    the file's row of each id, where ``ids`` are a subset of the file's."""
    top = pc.max(ids).as_py()
    if top is None:
        return 0
    distinct = pc.count_distinct(ids).as_py()
    if top + 1 > SPARSE_ID_ROWS and top + 1 > SPARSE_ID_RATIO * distinct:
        row = pc.index(ids, top).as_py()
        raise DataError(str(path), f"{field} {top} would size a {top + 1:,}-row table for {distinct:,} "
                                   f"distinct {what}; ids must be dense (remap them to 0..{distinct - 1})",
                        row=row if file_rows is None else int(file_rows[row]), field=field)
    return int(top) + 1


def check_dense_ids(result: ValidationResult, contract: Contract) -> None:
    """Refuse a checked items or events file whose category or user ids are too sparse to size a
    CTR model's ID table (a file-wide rule no row check sees; mim train applies it too). Only
    the rows the check kept count: a quarantined row's id is not the table's."""
    if contract is ITEMS:
        field, what = "category_id", "categories"
    elif contract is EVENTS:
        field, what = "user_id", "users"
    else:
        return
    ids = pq.read_table(result.path, columns=[field])[field]
    kept = None
    if result.rejected:
        left_out = pq.read_table(result.rejected_path, columns=["source_row"])["source_row"].to_numpy()
        keep = np.ones(len(ids), dtype=bool)
        keep[left_out] = False
        ids, kept = ids.filter(pa.array(keep)), np.flatnonzero(keep)
    dense_id_rows(ids, result.path, field, what, file_rows=kept)


def single_label(events_path: PathLike) -> Optional[int]:
    """The one ``label`` value a checked events file holds, or None when it holds both. A file
    of one class is valid data but gives a CTR model nothing to learn (or an AUC nothing to rank)."""
    labels = pq.read_table(events_path, columns=["label"]).column("label")
    present = pc.unique(labels).to_pylist()
    return int(present[0]) if len(present) == 1 else None


def category_count(item_category: np.ndarray) -> int:
    """How many categories the items span (``item_category``: an items result's
    :attr:`ValidationResult.item_category`): ``max(category_id) + 1``; pair and event category
    ids must lie below it."""
    return int(item_category.max()) + 1 if len(item_category) else 0


def validate_mm_table(table_dir: PathLike, item_count: Optional[int] = None,
                      echo=print) -> List[ValidationResult]:
    """Check each ``part-*.parquet`` of a table folder against its manifest's dtype and dim."""
    table_dir = Path(table_dir)
    manifest = read_manifest(table_dir)
    if manifest.kind != "mm_table":
        raise ManifestMismatch(f"{table_dir}: manifest kind is {manifest.kind!r}, not 'mm_table'")
    contract = MM_TABLE_INT8 if manifest.dtype == "int8" else MM_TABLE_FP
    parts = sorted(table_dir.glob("part-*.parquet"))
    if not parts:
        raise DataError(str(table_dir), "no part-*.parquet files")
    results = []
    for part in parts:
        result = validate_file(part, contract, item_count=item_count, keep=False,
                               vector_dims={"vector": manifest.dim} if manifest.dim else None)
        results.append(result)
        echo(ok_line(result))
    total = sum(r.rows for r in results)
    if manifest.row_count is not None and total != manifest.row_count:
        raise DataError(str(table_dir), f"parts hold {total} rows, manifest says {manifest.row_count}")
    return results


def check_world_manifest(directory: PathLike, item_rows: int) -> None:
    """Refuse a world folder whose manifest is not a world's, or counts other items than
    ``item_rows`` (its items.parquet's rows): the items were replaced or edited after the world
    was written, so its pairs and events may name other items than the ones they were made
    for. ``mim data validate`` applies it, and so do ``mim pretrain`` and ``mim csft`` before
    their encoders load. A folder without a manifest (a world made by hand) is not checked."""
    path = Path(directory) / "manifest.json"
    if not path.exists():
        return
    manifest = read_manifest(directory)
    if manifest.kind != "world":
        raise ManifestMismatch(f"{path}: kind is {manifest.kind!r}, expected 'world'")
    declared = manifest.extra.get("counts", {}).get("items")
    if declared is not None and declared != item_rows:
        raise DataError(str(path), f"manifest counts {declared} items, items.parquet has "
                                   f"{item_rows}", field="extra.counts.items")


def ok_line(result: ValidationResult) -> str:
    dropped = f", {result.rejected} quarantined -> {result.rejected_path}" if result.rejected else ""
    return f"OK  {result.path}  {result.contract}: {result.rows} rows{dropped}"

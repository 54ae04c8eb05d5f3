"""Import TAOBAO-MM (alimama-tech/MUSE's multimodal CTR release) into a world folder plus a
frozen INT8 MM table.

Source files (each ``<name>.parquet``, or a folder ``<name>/`` of Parquet parts, as a
sharded full release would be)::

    {train,test}_samples        label_0 list<int8>[2] one-hot [no-click, click], 129_1 user, 205 item
    {train,test}_user_features  129_1 user, 130_1..130_5 user features,
                                150_2_180 behaviour items list<int64>, 151_2_180 their categories
    item_features               205 item, 206 category, 213, 214 (hashed item features)
    scl_embedding_int8_p90      205 item, 205_c list<int8>[128] multimodal SCL embedding

Mapping onto the contracts:

* ids: raw int64 ids map to dense ids in sorted raw order (``DenseIds``), the raw id kept
  as a string in ``raw_item_id``/``raw_user_id``. The item table holds every item the release
  names (sample targets, behaviours, item features, embeddings). Category ids: 0 = unknown,
  1.. = the raw category ids of ``206`` and ``151_2_180`` in sorted order.
* items: ``category_id`` from ``206``, else from the behaviour lists' categories; the release has
  no titles, so ``title`` holds the item's hashed feature tokens (``"205=<id> 206=<v> 213=<v>
  214=<v>"``); it has no images, so ``image_feature`` holds the SCL embedding as float32
  (exact: int8 values) to satisfy the one-of-image rule. ``created_at``: the release has no
  times; items seen in any behaviour list or only in side files are placed at 0 (before the
  logged samples), items first seen as a sample target at that sample's ordinal.
* events: one per sample; ``label`` = ``label_0[1]``; ``ts`` = the sample's ordinal (train
  samples first, then test, so test is later); the history joins the split's user features
  by ``129_1``; the release's list order is kept as oldest first (not verifiable from the
  release); ``hist_ts`` = 0 (unknown: every behaviour precedes the logged samples).
  ``hist_category_ids`` = each behaviour item's ``category_id``: a ``151_2_180`` value that
  disagrees (with ``206``, or with the item's first behaviour row) is replaced, counted in the
  report and the manifest and the first one located on stderr, since the validator refuses a
  behaviour whose category is not its item's (see docs/data.md, "behaviour categories").
  An empty ``{train,test}_samples`` is refused: the world would have an empty split.
  User features ``130_*`` and item features ``213/214`` have no column in the contracts and are
  not imported. There are no pairs: the release has no query images.
* the MM table: ``205_c`` rows as ``MM_TABLE_INT8`` with ``scale=1, bias=0`` (the release
  gives already-quantised values, no per-row scale; cosine-based content interest does not
  depend on a global scale), in ``mm_table/`` with its own manifest.

Everything streams by row groups except the user-feature join: the split's user histories
(users x history length ids) are held in memory while its samples stream past.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mim_rec.data.errors import DataError
from mim_rec.data.importers.common import DenseIds, ImportReport, refuse_missing
from mim_rec.data.importers.missing import check_kinds
from mim_rec.data.io import ContractWriter, open_parquet, read_batches, write_table
from mim_rec.data.manifest import Manifest, fingerprint_file, write_manifest
from mim_rec.data.schemas import EVENTS, FLOAT_VECTOR, ITEMS, MM_TABLE_INT8
from mim_rec.data.staging import require_outside, staged_folder
from mim_rec.data.validate import repeated_entries, type_accepted
from mim_rec.utils.text import counted

USER, ITEM, LABEL, EMBEDDING = "129_1", "205", "label_0", "205_c"
HIST_ITEMS, HIST_CATEGORIES = "150_2_180", "151_2_180"
CATEGORY, ITEM_SIDE = "206", ("213", "214")
EMBEDDING_DIM = 128
ENCODER_FINGERPRINT = "taobao-mm-scl-int8"
SPLITS = ("train", "test")

INT64, IDS = pa.int64(), pa.list_(pa.int64())
SOURCES = {
    "samples": {LABEL: pa.list_(pa.int8()), USER: INT64, ITEM: INT64},
    "user_features": {USER: INT64, HIST_ITEMS: IDS, HIST_CATEGORIES: IDS},
    "item_features": {ITEM: INT64, CATEGORY: INT64, ITEM_SIDE[0]: INT64, ITEM_SIDE[1]: INT64},
    "embedding": {ITEM: INT64, EMBEDDING: pa.list_(pa.int8())},
}


@dataclass
class TaobaoOptions:
    # The kinds of missing rows filled with counted defaults (MISSING_KINDS["taobao-mm"]);
    # a missing row of any other kind refuses the import
    allow_missing: Tuple[str, ...] = ()
    batch_rows: int = 8192

    def __post_init__(self) -> None:
        self.allow_missing = check_kinds(self.allow_missing, "taobao-mm")


# Each count of _join_gaps -> its --allow-missing kind (in MISSING_KINDS' order of kinds)
GAP_KIND: Dict[str, str] = {
    **{f"{split} sample items without embedding": "target-embedding" for split in SPLITS},
    "behaviour items without embedding": "behaviour-embedding",
    **{f"{split} sample items without features": "item-features" for split in SPLITS},
    **{f"{split} sample users without features": "user-features" for split in SPLITS},
}


def _part_order(path: Path) -> Tuple[Any, ...]:
    """Sort key reading the runs of digits in a part's name as numbers: ``part-2`` before
    ``part-10`` (text order puts it after), since the parts' order is the samples' order."""
    return tuple(int(run) if run.isdigit() else run for run in re.split(r"([0-9]+)", path.name))


class _Source:
    """One logical source file: ``<name>.parquet`` or the parts of ``<name>/``, streamed by
    record batches with each row's 0-based index within its part; columns checked up front."""

    def __init__(self, src: Path, name: str, kind: str, batch_rows: int):
        single = src / f"{name}.parquet"
        self.src = src
        self.parts = [single] if single.is_file() else sorted((src / name).glob("*.parquet"), key=_part_order)
        if not self.parts:
            raise DataError(str(single), f"no such file (nor a folder {src / name} of parts)")
        self.columns = SOURCES[kind]
        self.batch_rows = batch_rows
        for part in self.parts:
            schema = open_parquet(part).schema_arrow
            for column, want in self.columns.items():
                if column not in schema.names:
                    raise DataError(str(part), f"missing column (has {schema.names})", field=column)
                if not type_accepted(schema.field(column).type, want):
                    raise DataError(str(part), f"has type {schema.field(column).type}, expected {want}",
                                    field=column)

    def fingerprints(self) -> Dict[str, str]:
        """Each part's fingerprint under its path below the source root: parts of different
        sources share names (train_samples/part-0 and test_samples/part-0)."""
        return {part.relative_to(self.src).as_posix(): fingerprint_file(part) for part in self.parts}

    def batches(self, columns: Sequence[str]) -> Iterator[Tuple[str, int, pa.RecordBatch]]:
        for part in self.parts:
            offset = 0
            for batch in read_batches(open_parquet(part), str(part), self.batch_rows, columns):
                batch = pa.RecordBatch.from_arrays(
                    [pc.cast(batch.column(c), self.columns[c]) for c in columns], names=list(columns))
                _check_batch(str(part), offset, batch)
                yield str(part), offset, batch
                offset += batch.num_rows


def _check_batch(file: str, offset: int, batch: pa.RecordBatch) -> None:
    """Source-level rules: no nulls, one-hot labels, equal behaviour lists, 128-d embeddings."""
    names = batch.schema.names
    for name in names:
        column = batch.column(name)
        _refuse(file, offset, name, column.is_null(), "null value")
        if pa.types.is_list(column.type):
            _refuse(file, offset, name, _rows_with(column, column.flatten().is_null()),
                    "null element in list")
    if LABEL in names:
        label = batch.column(LABEL)
        binary = _rows_with(label, pc.invert(pc.is_in(label.flatten(),
                                                      value_set=pa.array([0, 1], pa.int8()))))
        not_pair = pc.not_equal(pc.list_value_length(label), 2)
        _refuse(file, offset, LABEL, pc.or_(pc.or_(not_pair, binary), pc.not_equal(_row_sums(label), 1)),
                "label is not a one-hot [no-click, click] pair")
    if HIST_ITEMS in names and HIST_CATEGORIES in names:
        _refuse(file, offset, HIST_CATEGORIES,
                pc.not_equal(pc.list_value_length(batch.column(HIST_ITEMS)),
                             pc.list_value_length(batch.column(HIST_CATEGORIES))),
                f"behaviour lists of unequal length ({HIST_ITEMS} vs {HIST_CATEGORIES})")
    if EMBEDDING in names:
        _refuse(file, offset, EMBEDDING,
                pc.not_equal(pc.list_value_length(batch.column(EMBEDDING)), EMBEDDING_DIM),
                f"embedding is not {EMBEDDING_DIM}-dimensional")


def _row_sums(label: pa.Array) -> pa.Array:
    """Sum of each row's list values (1 for a valid one-hot row)."""
    sums = np.zeros(len(label), np.int64)
    np.add.at(sums, pc.list_parent_indices(label).to_numpy(), label.flatten().to_numpy().astype(np.int64))
    return pa.array(sums)


def _rows_with(column: pa.Array, value_flags: pa.Array) -> pa.Array:
    rows = np.zeros(len(column), bool)
    flags = np.asarray(pc.fill_null(value_flags, False).to_numpy(zero_copy_only=False), bool)
    rows[pc.list_parent_indices(column).to_numpy()[flags]] = True
    return pa.array(rows)


def _refuse(file: str, offset: int, field: str, flags: pa.Array, message: str) -> None:
    mask = np.asarray(pc.fill_null(flags, False).to_numpy(zero_copy_only=False), bool)
    if mask.any():
        raise DataError(file, message, row=offset + int(np.argmax(mask)), field=field)


def _refuse_empty(source: _Source, why: str) -> None:
    """A source with no rows in any part is refused, named (the file, or its folder of parts)."""
    if sum(open_parquet(part).metadata.num_rows for part in source.parts) == 0:
        where = source.parts[0] if len(source.parts) == 1 else source.parts[0].parent
        raise DataError(str(where), f"holds no rows: {why}")


# ---------------------------------------------------------------- the import

def import_taobao_mm(src: Path, out: Path, options: TaobaoOptions) -> ImportReport:
    src, out = Path(src), Path(out)
    require_outside(out, src)  # before anything is read: the output replaces out's contents whole
    sources = {
        **{f"{s}_samples": _Source(src, f"{s}_samples", "samples", options.batch_rows) for s in SPLITS},
        **{f"{s}_user_features": _Source(src, f"{s}_user_features", "user_features", options.batch_rows)
           for s in SPLITS},
        "item_features": _Source(src, "item_features", "item_features", options.batch_rows),
        "embedding": _Source(src, "scl_embedding_int8_p90", "embedding", options.batch_rows),
    }
    for split in SPLITS:  # an empty split would only be refused downstream (validate, train)
        _refuse_empty(sources[f"{split}_samples"], f"the world's {split} split would be empty")
    for name, what in (("item_features", "feature"), ("embedding", "embedding")):
        _refuse_repeated_items(sources[name], f"item has a second {what} row")
    ids = _collect_ids(sources)
    report = ImportReport("taobao-mm", item_age=(
        "the release has no timestamps: an item's created_at is its first sample ordinal (0 for "
        "items of any behaviour list), so the S1..S10 buckets are not item ages"))
    gaps = _join_gaps(sources, ids)
    refuse_missing(str(src), gaps, GAP_KIND, options.allow_missing,
                   "Sample items need an SCL embedding and item features, sample users "
                   "need user features (behaviour lists), and behaviour items need an SCL "
                   "embedding; the demo files are independent samples whose ids do not join.")
    report.missing = {k: v for k, v in gaps.items() if v}
    report.admitted, report.kind_of = options.allow_missing, GAP_KIND

    with staged_folder(out, "mim data import") as staging:
        _write_world(sources, ids, staging, src, options, report)
    return report


def _write_world(sources: Dict[str, _Source], ids: _Ids, out: Path, src: Path,
                 options: TaobaoOptions, report: ImportReport) -> None:
    """Pass 2: the MM table, the events of each split, the items, then the manifest."""
    embedded = _write_mm_table(sources["embedding"], ids, out / "mm_table", src)
    item_category = _item_categories(sources, ids)
    first_sample = np.full(len(ids.items), np.iinfo(np.int64).max)
    ordinal = 1
    event_counts = {}
    replaced = _Replaced()
    for split in SPLITS:
        histories = _UserHistories(sources[f"{split}_user_features"], ids, item_category, replaced)
        with ContractWriter(out / f"events_{split}.parquet", EVENTS, _EVENTS_SCHEMA,
                            item_count=len(ids.items)) as writer:
            for batch in _events(sources[f"{split}_samples"], ids, histories, ordinal, first_sample):
                writer.write(batch)
            event_counts[split] = writer.rows
        ordinal += writer.rows
    items = _items(sources, ids, first_sample, embedded, item_category)
    write_table(items, out / "items.parquet", ITEMS)

    clicks = {s: int(pc.sum(pq.read_table(out / f"events_{s}.parquet", columns=["label"])
                            .column("label").cast(pa.int64())).as_py() or 0) for s in SPLITS}
    report.counts = {
        # what the items table holds, as ``mim data summary`` counts it (0 = unknown included)
        "items": len(ids.items), "users": len(ids.users), "categories": len(np.unique(item_category)),
        "items of unknown category (0)": int((item_category == 0).sum()),
        **{f"events_{s}": event_counts[s] for s in SPLITS},
        **{f"clicks_{s}": clicks[s] for s in SPLITS},
        "mm_table rows with embedding": int(embedded.sum()),
        "behaviour categories set to the item's": replaced.entries,
    }
    report.notes = [
        "no timestamps in the release: ts = sample ordinal (train then test), hist_ts = 0",
        f"hist_category_ids = the item's category_id (206, else its first behaviour category): "
        f"{replaced.describe()}",
        "no titles or images: title = hashed feature tokens, image_feature = SCL embedding",
        "user features 130_* and item features 213/214 are not imported (no contract column)",
        "no pairs: the release has no query images",
    ]
    manifest = Manifest(
        kind="world", stage="import",
        config={"format": "taobao-mm", "src": str(src), "allow_missing": options.allow_missing},
        inputs={name: fp for s in sources.values() for name, fp in s.fingerprints().items()},
        row_count=len(ids.items),
        extra={"format": "taobao-mm", "counts": report.counts, "missing": report.missing,
               "notes": report.notes, "item_age": report.item_age})
    write_manifest(out, manifest)
    if replaced.entries:
        print(f"mim data import: warning: {replaced.describe()}", file=sys.stderr)


@dataclass
class _Ids:
    items: DenseIds
    users: DenseIds
    categories: DenseIds  # dense category = 1 + index; 0 = unknown
    behaviour_category: Tuple[np.ndarray, np.ndarray]  # (sorted raw items, their raw category)


def _collect_ids(sources: Dict[str, _Source]) -> _Ids:
    """Pass 1: every raw item, user and category id, streamed; plus each behaviour item's
    first-seen category (for items without item features)."""
    items, users, categories, pairs = [], [], [], []
    for split in SPLITS:
        for _, _, b in sources[f"{split}_samples"].batches([USER, ITEM]):
            users.append(b.column(USER).to_numpy())
            items.append(b.column(ITEM).to_numpy())
        for _, _, b in sources[f"{split}_user_features"].batches([USER, HIST_ITEMS, HIST_CATEGORIES]):
            users.append(b.column(USER).to_numpy())
            hist = b.column(HIST_ITEMS).flatten().to_numpy()
            cats = b.column(HIST_CATEGORIES).flatten().to_numpy()
            items.append(hist)
            categories.append(cats)
            first = np.unique(hist, return_index=True)[1]
            pairs.append(np.stack([hist[first], cats[first]]))
    for _, _, b in sources["item_features"].batches([ITEM, CATEGORY]):
        items.append(b.column(ITEM).to_numpy())
        categories.append(b.column(CATEGORY).to_numpy())
    for _, _, b in sources["embedding"].batches([ITEM]):
        items.append(b.column(ITEM).to_numpy())
    pairs = np.concatenate(pairs, axis=1) if pairs else np.zeros((2, 0), np.int64)
    first = np.unique(pairs[0], return_index=True)[1]
    return _Ids(DenseIds.from_chunks(items), DenseIds.from_chunks(users),
                DenseIds.from_chunks(categories), (pairs[0][first], pairs[1][first]))


def _unique_column(source: _Source, column: str) -> np.ndarray:
    return DenseIds.from_chunks(b.column(column).to_numpy() for _, _, b in source.batches([column])).raw


def _join_gaps(sources: Dict[str, _Source], ids: _Ids) -> Dict[str, int]:
    """How badly the files join: counted before anything is written."""
    embedded = DenseIds(_unique_column(sources["embedding"], ITEM))
    featured = DenseIds(_unique_column(sources["item_features"], ITEM))
    gaps: Dict[str, int] = {}
    for split in SPLITS:
        sample_items = _unique_column(sources[f"{split}_samples"], ITEM)
        sample_users = _unique_column(sources[f"{split}_samples"], USER)
        with_history = DenseIds(_unique_column(sources[f"{split}_user_features"], USER))
        gaps[f"{split} sample items without embedding"] = int((~embedded.lookup(sample_items)[1]).sum())
        gaps[f"{split} sample items without features"] = int((~featured.lookup(sample_items)[1]).sum())
        gaps[f"{split} sample users without features"] = int((~with_history.lookup(sample_users)[1]).sum())
    behaviour = ids.behaviour_category[0]
    gaps["behaviour items without embedding"] = int((~embedded.lookup(behaviour)[1]).sum())
    return gaps


@dataclass
class _Replaced:
    """Behaviour categories (``151_2_180``) that disagreed with their item's category and were
    replaced by it: counted, the first one located."""

    entries: int = 0
    rows: int = 0
    first: str = ""

    def add(self, file: str, offset: int, column: pa.Array, listed: np.ndarray, own: np.ndarray,
            raw: DenseIds) -> None:
        differs = listed != own
        if not differs.any():
            return
        parents = pc.list_parent_indices(column).to_numpy()
        if not self.entries:
            at = int(np.argmax(differs))
            position = at - int(column.offsets[parents[at]].as_py() - column.offsets[0].as_py())
            self.first = (f"first: {file}, row {offset + int(parents[at])}, field '{HIST_CATEGORIES}' "
                          f"position {position}: {raw.raw[listed[at] - 1]} listed, the item's is "
                          f"{raw.raw[own[at] - 1] if own[at] else 'unknown'}")
        self.entries += int(differs.sum())
        self.rows += len(np.unique(parents[differs]))

    def describe(self) -> str:
        if not self.entries:
            return "no behaviour listed another category"
        return (f"{counted(self.entries, 'behaviour category', 'behaviour categories')} (in "
                f"{counted(self.rows, 'user-feature row')}) differed from the item's and "
                f"{'was' if self.entries == 1 else 'were'} replaced by it ({self.first})")


class _UserHistories:
    """A split's user histories in dense ids, held in memory for the join with its samples.

    Behaviour categories are the items' own (``item_category``, dense): the contract wants a
    behaviour's category to be its item's, and ``151_2_180`` may disagree with ``206`` (or with
    another behaviour row of the item); each replaced value is counted in ``replaced``."""

    def __init__(self, source: _Source, ids: _Ids, item_category: np.ndarray, replaced: _Replaced):
        raw_users, hist_items, hist_categories, where = [], [], [], []
        for file, offset, b in source.batches([USER, HIST_ITEMS, HIST_CATEGORIES]):
            raw_users.append(b.column(USER).to_numpy())
            where.append((file, offset))
            items = _remap_list(b.column(HIST_ITEMS), ids.items)
            hist_items.append(items)
            listed = ids.categories.lookup(b.column(HIST_CATEGORIES).flatten().to_numpy())[0] + 1
            own = item_category[items.flatten().to_numpy()]
            replaced.add(file, offset, b.column(HIST_CATEGORIES), listed, own, ids.categories)
            hist_categories.append(pa.ListArray.from_arrays(items.offsets, pa.array(own.astype(np.int32))))
        _refuse_duplicates(raw_users, where, USER, "user listed twice")
        raw = np.concatenate(raw_users) if raw_users else np.zeros(0, np.int64)
        order = np.argsort(raw, kind="stable")
        self.users = DenseIds(raw[order])
        self.items = pa.concat_arrays(hist_items).take(pa.array(order)) if hist_items else pa.array([], IDS)
        self.categories = (pa.concat_arrays(hist_categories).take(pa.array(order))
                           if hist_categories else pa.array([], pa.list_(pa.int32())))

    def take(self, raw_users: np.ndarray) -> Tuple[pa.Array, pa.Array]:
        """Histories of ``raw_users``; users without features get empty histories."""
        rows, found = self.users.lookup(raw_users)
        empty = pa.array([[]] * len(rows), IDS)
        if len(self.users) == 0:
            return empty, empty.cast(pa.list_(pa.int32()))
        index = pa.array(rows, mask=~found)  # null index -> null list, replaced by []
        items = self.items.take(index)
        categories = self.categories.take(index)
        return (pc.if_else(pa.array(found), items, empty),
                pc.if_else(pa.array(found), categories, empty.cast(pa.list_(pa.int32()))))


def _refuse_repeated_items(source: _Source, message: str) -> None:
    """A side file (features, embeddings) gives each item once: a second row would silently
    replace the first, so it is refused, located."""
    chunks, where = [], []
    for file, offset, b in source.batches([ITEM]):
        chunks.append(b.column(ITEM).to_numpy())
        where.append((file, offset))
    _refuse_duplicates(chunks, where, ITEM, message)


def _refuse_duplicates(chunks: List[np.ndarray], where: List[Tuple[str, int]], field: str,
                       message: str) -> None:
    """Raise at the first repeated id across batches (``where`` = each batch's file, offset)."""
    if not chunks:
        return
    dup = repeated_entries(np.concatenate(chunks))
    if dup.any():
        index = int(np.argmax(dup))
        ends = np.cumsum([len(c) for c in chunks])
        batch = int(np.searchsorted(ends, index, side="right"))
        file, offset = where[batch]
        raise DataError(file, message, row=offset + index - (ends[batch] - len(chunks[batch])),
                        field=field)


def _remap_list(column: pa.Array, dense: DenseIds) -> pa.Array:
    """Map a list column's raw ids to dense ids, keeping its offsets."""
    mapped, _ = dense.lookup(column.flatten().to_numpy())
    offsets = pc.subtract(column.offsets, column.offsets[0])
    return pa.ListArray.from_arrays(offsets, pa.array(mapped.astype(np.int64)))


_EVENTS_SCHEMA = pa.schema([EVENTS.fields[n] for n in EVENTS.required_names] +
                           [EVENTS.fields["raw_user_id"]])


def _events(samples: _Source, ids: _Ids, histories: _UserHistories, first_ordinal: int,
            first_sample: np.ndarray) -> Iterator[pa.RecordBatch]:
    """Event batches of one split; lowers ``first_sample`` to each target's first ordinal."""
    ordinal = first_ordinal
    for _, _, b in samples.batches([LABEL, USER, ITEM]):
        n = b.num_rows
        raw_users = b.column(USER).to_numpy()
        targets, _ = ids.items.lookup(b.column(ITEM).to_numpy())
        ts = np.arange(ordinal, ordinal + n, dtype=np.int64)
        np.minimum.at(first_sample, targets, ts)
        hist_items, hist_categories = histories.take(raw_users)
        users, _ = ids.users.lookup(raw_users)
        hist_ts = pa.ListArray.from_arrays(hist_items.offsets,
                                           pa.array(np.zeros(len(hist_items.flatten()), np.int64)))
        yield pa.RecordBatch.from_arrays([
            pa.array(users), pa.array([""] * n, pa.string()), pa.array(targets),
            pc.cast(pc.list_element(b.column(LABEL), 1), pa.int8()), pa.array(ts),
            hist_items, hist_categories, hist_ts,
            pa.array(raw_users.astype(str).tolist(), pa.string())], schema=_EVENTS_SCHEMA)
        ordinal += n


def _write_mm_table(source: _Source, ids: _Ids, table_dir: Path, src: Path) -> np.ndarray:
    """Stream ``205_c`` into ``mm_table/part-*.parquet`` (MM_TABLE_INT8); items without an
    embedding get a zero row in a last part. Returns the mask of items with an embedding."""
    table_dir.mkdir()
    embedded = np.zeros(len(ids.items), bool)
    schema = pa.schema([f for f in MM_TABLE_INT8.required])
    part = 0
    for _, _, b in source.batches([ITEM, EMBEDDING]):
        dense, _ = ids.items.lookup(b.column(ITEM).to_numpy())
        embedded[dense] = True
        _write_part(table_dir / f"part-{part:05d}.parquet", schema, dense, b.column(EMBEDDING), ids)
        part += 1
    missing = np.flatnonzero(~embedded)
    if len(missing):
        zeros = pa.ListArray.from_arrays(
            pa.array(np.arange(len(missing) + 1, dtype=np.int32) * EMBEDDING_DIM),
            pa.array(np.zeros(len(missing) * EMBEDDING_DIM, np.int8)))
        _write_part(table_dir / f"part-{part:05d}.parquet", schema, missing, zeros, ids)
    write_manifest(table_dir, Manifest(
        kind="mm_table", stage="import", dim=EMBEDDING_DIM, dtype="int8",
        row_count=len(ids.items),
        inputs=source.fingerprints(),
        config={"format": "taobao-mm", "src": str(src)},
        extra={"encoder_fingerprint": ENCODER_FINGERPRINT, "id_range": [0, len(ids.items)],
               "missing_rows_zero": int(len(missing)),
               "quantisation": "release int8 values as given; scale=1, bias=0"}))
    return embedded


def _write_part(path: Path, schema: pa.Schema, dense: np.ndarray, vectors: pa.Array, ids: _Ids) -> None:
    n = len(dense)
    with ContractWriter(path, MM_TABLE_INT8, schema, item_count=len(ids.items),
                        vector_dims={"vector": EMBEDDING_DIM}) as writer:
        writer.write(pa.RecordBatch.from_arrays([
            pa.array(dense, pa.int64()), vectors,
            pa.array(np.ones(n, np.float32)), pa.array(np.zeros(n, np.float32))], schema=schema))


def _feature_tokens(columns: Dict[str, pa.Array]) -> pa.Array:
    """``"205=<id> 206=<v> ..."`` per row, built column-wise."""
    parts = [pc.binary_join_element_wise(name + "=", pc.cast(values, pa.string()), "")
             for name, values in columns.items()]
    return pc.binary_join_element_wise(*parts, " ")


def _item_categories(sources: Dict[str, _Source], ids: _Ids) -> np.ndarray:
    """Each item's dense category: from ``206``, else its first behaviour row's, else 0.

    Needed before the events are written (behaviours take their item's category), so it reads
    the two id columns of ``item_features`` on its own; the titles are built after the events
    by :func:`_items`, so the per-item token strings are not held beside the histories."""
    category = np.zeros(len(ids.items), np.int32)
    behaviour_items, behaviour_cats = ids.behaviour_category
    dense, _ = ids.items.lookup(behaviour_items)
    category[dense] = ids.categories.lookup(behaviour_cats)[0] + 1
    for _, _, b in sources["item_features"].batches([ITEM, CATEGORY]):
        dense, _ = ids.items.lookup(b.column(ITEM).to_numpy())
        category[dense] = ids.categories.lookup(b.column(CATEGORY).to_numpy())[0] + 1
    return category


def _items(sources: Dict[str, _Source], ids: _Ids, first_sample: np.ndarray,
           embedded: np.ndarray, category: np.ndarray) -> pa.Table:
    """The items table; ``created_at`` = first sample ordinal, 0 for items in any behaviour
    list or never a sample target (they predate the logged samples)."""
    n = len(ids.items)
    dense, _ = ids.items.lookup(ids.behaviour_category[0])
    created = first_sample.copy()
    created[dense] = 0
    created[created == np.iinfo(np.int64).max] = 0
    tokens = np.array(_feature_tokens({ITEM: pa.array(ids.items.raw)}).to_pylist(), dtype=object)
    for _, _, b in sources["item_features"].batches([ITEM, CATEGORY, *ITEM_SIDE]):
        dense, _ = ids.items.lookup(b.column(ITEM).to_numpy())
        tokens[dense] = _feature_tokens({c: b.column(c) for c in (ITEM, CATEGORY, *ITEM_SIDE)}).to_pylist()
    vectors = np.zeros((n, EMBEDDING_DIM), np.float32)
    for _, _, b in sources["embedding"].batches([ITEM, EMBEDDING]):
        dense, _ = ids.items.lookup(b.column(ITEM).to_numpy())
        vectors[dense] = b.column(EMBEDDING).flatten().to_numpy().reshape(-1, EMBEDDING_DIM)
    return pa.table({
        "item_id": pa.array(np.arange(n, dtype=np.int64)),
        "raw_item_id": pa.array(ids.items.raw.astype(str).tolist(), pa.string()),
        "category_id": pa.array(category),
        "title": pa.array(tokens.tolist(), pa.string()),
        "created_at": pa.array(created, pa.int64()).cast(pa.timestamp("s")),
        "image_feature": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.reshape(-1)), EMBEDDING_DIM).cast(FLOAT_VECTOR),
    })

"""Vectorised checks of Arrow record batches against the data contracts.

A file is checked in two passes of very different cost:

* :func:`conform_schema` looks only at the file's schema: every required column present, at
  least one column of each ``one_of`` group, and each column of exactly the contract's type or
  a documented lossless widening (:data:`WIDENINGS`). Nothing is ever coerced silently.
* :func:`row_checks` builds the per-row checks for one contract. Each :class:`RowCheck` turns a
  record batch into a boolean mask of bad rows with ``pyarrow.compute``/NumPy (list columns are
  checked on their flattened values and mapped back to rows with ``list_parent_indices``), so
  a 500k-row events file with 1000-long histories costs a few vector passes, not a Python loop
  per row. Only image decoding is per row (PIL has no batch decoder).

:mod:`mim_rec.data.io` runs these over a file's row groups and turns the first flagged row into a
:class:`~mim_rec.data.errors.DataError`, or quarantines every flagged row.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mim_rec.data.errors import DataError
from mim_rec.data.schemas import EVENTS, HISTORY_FIELDS, ITEMS, PAIRS, SIGNALS, Contract

# Lossless widenings accepted on read (cast on the fly); any other type difference is an error.
# Integers widen to a wider signed type; large_string/large_binary/large_list narrow offsets
# only (values unchanged, checked by a safe cast); timestamps of finer units are accepted when
# every value is a whole second (a safe cast refuses sub-second values).
_INT_RANK = {pa.int8(): 8, pa.int16(): 16, pa.int32(): 32, pa.int64(): 64,
             pa.uint8(): 9, pa.uint16(): 17, pa.uint32(): 33}
WIDENINGS = ("signed/unsigned integers to a wider signed integer", "float16 -> float32",
             "large_string/large_binary/large_list -> string/binary/list",
             "timestamp[ms|us|ns] -> timestamp[s] when all values are whole seconds")


def type_accepted(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether a column of type ``have`` may be read as the contract's ``want``."""
    if have == want:
        return True
    if pa.types.is_integer(want) and pa.types.is_signed_integer(want) and have in _INT_RANK:
        return _INT_RANK[have] < _INT_RANK[want]
    if want == pa.float32():
        return have == pa.float16()
    if want == pa.string():
        return have == pa.large_string()
    if want == pa.binary():
        return have == pa.large_binary()
    if pa.types.is_list(want) and (pa.types.is_list(have) or pa.types.is_large_list(have)):
        return type_accepted(have.value_type, want.value_type)
    if pa.types.is_timestamp(want) and pa.types.is_timestamp(have):
        return have.tz == want.tz
    return False


def conform_schema(schema: pa.Schema, contract: Contract, file: str) -> pa.Schema:
    """The schema to cast the file's batches to: contract types for contract columns,
    unknown columns passed through unchanged. Raises ``DataError`` for a missing column,
    a missing ``one_of`` group or a type that is neither exact nor a safe widening."""
    names = set(schema.names)
    for f in contract.required:
        if f.name not in names:
            raise DataError(file, f"missing required column (the {contract.name} contract "
                                  f"requires {list(contract.required_names)})", field=f.name)
    for group in contract.one_of:
        if not names.intersection(group):
            raise DataError(file, f"needs at least one of the columns {list(group)}",
                            field="|".join(group))
    wanted = contract.fields
    target = []
    for f in schema:
        want = wanted.get(f.name)
        if want is None:
            target.append(f)
            continue
        if not type_accepted(f.type, want.type):
            raise DataError(file, f"has type {f.type}, the {contract.name} contract requires "
                                  f"{want.type} (accepted widenings: {'; '.join(WIDENINGS)})",
                            field=f.name)
        target.append(pa.field(f.name, want.type))
    return pa.schema(target)


def cast_batch(batch: pa.RecordBatch, schema: pa.Schema, file: str) -> pa.RecordBatch:
    """Cast to ``schema`` with safe casts only (refuses overflow and truncation)."""
    if batch.schema.equals(schema):
        return batch
    columns = []
    for name, want in zip(schema.names, schema.types):
        column = batch.column(name)
        try:
            columns.append(column if column.type == want else pc.cast(column, want, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(file, f"cannot be read losslessly as {want}: {exc}", field=name) from exc
    return pa.RecordBatch.from_arrays(columns, schema=schema)


@dataclass(frozen=True)
class RowCheck:
    """One rule over rows: ``flags(batch)`` is a bool mask, True where a row breaks it.

    ``expected(batch, row)``, when given, says what a flagged row's value was compared with
    (another table's value): the row's own value alone does not tell the user which side to fix;
    or what was found in it (an image's format or declared size), which its first bytes do not show.
    """

    field: str
    reason: str
    flags: Callable[[pa.RecordBatch], np.ndarray]
    expected: Optional[Callable[[pa.RecordBatch, int], str]] = None


@dataclass
class CheckContext:
    """What row checks need beyond the batch itself."""

    file: str
    item_count: Optional[int] = None   # ids must lie in 0..item_count-1 (None: unchecked)
    category_count: Optional[int] = None  # category ids in 0..category_count-1 (None: only >= 0)
    base_dir: Optional[Path] = None    # image paths are relative to the file's folder
    # Expected length per vector column (:func:`vector_dimensions`); one without is not checked
    vector_dims: Optional[Dict[str, int]] = None
    # Per item (row i: item i), from the items table: behaviours and pairs must agree (None: unchecked)
    item_category: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.vector_dims = dict(self.vector_dims or {})


# ---------------------------------------------------------------- array helpers

def _mask(array: pa.Array) -> np.ndarray:
    """A BooleanArray (nulls counted as False) as a NumPy bool mask."""
    return np.asarray(pc.fill_null(array, False).to_numpy(zero_copy_only=False), dtype=bool)


def _nulls(batch: pa.RecordBatch, name: str) -> np.ndarray:
    return _mask(batch.column(name).is_null())


def _rows_of_values(list_array: pa.Array, value_mask: np.ndarray) -> np.ndarray:
    """Map a mask over a list column's flattened values back to a mask over its rows."""
    rows = np.zeros(len(list_array), dtype=bool)
    if value_mask.any():
        parents = pc.list_parent_indices(list_array).to_numpy()
        rows[parents[value_mask]] = True
    return rows


def _values(array: pa.Array) -> pa.Array:
    """The flattened values of a (possibly sliced) list column, or the column itself."""
    return array.flatten() if pa.types.is_list(array.type) else array


def _out_of_range(values: pa.Array, high: Optional[int]) -> np.ndarray:
    filled = pc.fill_null(values, 0)
    bad = pc.less(filled, 0)
    if high is not None:
        bad = pc.or_(bad, pc.greater_equal(filled, high))
    return _mask(bad)


def _non_finite(values: pa.Array) -> np.ndarray:
    return ~_mask(pc.is_finite(pc.fill_null(values, 0.0)))


def _per_row(name: str, value_mask: Callable[[pa.Array], np.ndarray]):
    """Apply a value check to a column, mapping list values back to their rows."""
    def flags(batch: pa.RecordBatch) -> np.ndarray:
        column = batch.column(name)
        values = _values(column)
        bad = value_mask(values)
        return _rows_of_values(column, bad) if values is not column else bad
    return flags


def _list_elements(column: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """``(row of every element, the elements)`` of a list column, nulls as 0 (their own rule
    flags them)."""
    values = pc.fill_null(_values(column), 0).to_numpy(zero_copy_only=False)
    return pc.list_parent_indices(column).to_numpy(), values


def _rows_where(rows: np.ndarray, element_mask: np.ndarray, num_rows: int) -> np.ndarray:
    flagged = np.zeros(num_rows, dtype=bool)
    flagged[rows[element_mask]] = True
    return flagged


# ---------------------------------------------------------------- reusable rules

def _not_null(name: str) -> RowCheck:
    return RowCheck(name, "null value", lambda b: _nulls(b, name))


def _no_null_elements(name: str) -> RowCheck:
    return RowCheck(name, "null element in list", _per_row(name, lambda v: _mask(v.is_null())))


def _id_in_range(name: str, high: Optional[int], what: str, table: str = "the item table") -> RowCheck:
    span = f"0..{high - 1}" if high is not None else ">= 0"
    return RowCheck(name, f"{what} outside {table} ({span})" if high is not None
                    else f"negative {what}", _per_row(name, lambda v: _out_of_range(v, high)))


def _category_in_range(name: str, ctx: CheckContext, what: str) -> RowCheck:
    """A category id must be one the items table has: an id past it would be looked up in rows
    the category embedding table does not have."""
    return _id_in_range(name, ctx.category_count, what, "the items' categories")


def _finite(name: str) -> RowCheck:
    return RowCheck(name, "NaN or infinite value", _per_row(name, _non_finite))


# Times are Unix seconds; milliseconds since March 1973 are past this. Item ages are ``ts``
# minus ``created_at`` in days, so a millisecond ``ts`` passed every other rule and trained on
# ages of 2e7 days, and a millisecond ``created_at`` had every item created after every event
# (mim train took each age as 0).
MAX_UNIX_SECONDS = 10**11


def _in_seconds(name: str) -> RowCheck:
    """A time column (int64 or timestamp[s]) must hold Unix seconds, not milliseconds."""
    def flags(batch: pa.RecordBatch) -> np.ndarray:
        seconds = pc.fill_null(batch.column(name).cast(pa.int64()), 0)
        return _mask(pc.greater_equal(seconds, MAX_UNIX_SECONDS))
    return RowCheck(name, f"{name} past 10^11 Unix seconds (the year 5138): milliseconds? times are seconds", flags)


# Text towers read a title's first ``encoders.text.max_length`` tokens (32 by default, at most
# 512 for MiniLM) and drop the rest, as text encoders do; a few thousand characters hold that
# many tokens. The tokenizer still reads the whole string first, every batch (10 MB: 21 s with
# the bundled one), so a title past this is refused: a description or a page in the title column.
MAX_TITLE_CHARS = 10_000
TITLE_TOO_LONG = (f"title longer than {MAX_TITLE_CHARS:,} characters (text towers read only its first "
                  "encoders.text.max_length tokens)")


def _title_not_too_long() -> RowCheck:
    """A title of at most :data:`MAX_TITLE_CHARS` characters; the error says how long it is
    (the value shown is cut to its first characters)."""
    def lengths(batch: pa.RecordBatch) -> pa.Array:
        return pc.utf8_length(pc.fill_null(batch.column("title"), ""))
    return RowCheck("title", TITLE_TOO_LONG,
                    lambda b: _mask(pc.greater(lengths(b), MAX_TITLE_CHARS)),
                    lambda b, row: f"it has {lengths(b)[row].as_py():,} characters")


def _vector_length(name: str, ctx: CheckContext) -> List[RowCheck]:
    """Rows must have the column's dimension; a column without one holds no vector to check."""
    dim = ctx.vector_dims.get(name)
    if dim is None:
        return []

    def flags(batch: pa.RecordBatch) -> np.ndarray:
        lengths = pc.list_value_length(batch.column(name)).to_numpy(zero_copy_only=False)
        return ~np.isnan(lengths.astype(float)) & (lengths != dim)
    return [RowCheck(name, f"vector length differs from the column's dimension {dim}", flags)]


VECTOR_COLUMNS = ("image_feature", "query_feature", "vector")


def vector_columns(names: Sequence[str]) -> List[str]:
    """The vector columns among ``names`` (their rows must all have one length)."""
    return [name for name in VECTOR_COLUMNS if name in names]


def vector_dimensions(names: Sequence[str], read: Callable[[List[str]], Iterable[pa.RecordBatch]],
                      file: str, declared: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """The dimension of each vector column among ``names``: the ``declared`` one (a manifest's
    ``dim``), else the length most of its rows have over the whole file (``read(columns)``
    yields the file's batches of those columns). The first row's length was taken, so one
    wrong first row flagged every right row and --clean-out kept only the wrong one. Two
    lengths equally common are refused, since which rows are wrong cannot be told; a column
    with no vector in any row gets no dimension (it has no length to check)."""
    dims = dict(declared or {})
    undeclared = [name for name in vector_columns(names) if name not in dims]
    if not undeclared:
        return dims
    counts = {name: Counter() for name in undeclared}
    for batch in read(undeclared):
        for name in undeclared:
            lengths, seen = np.unique(pc.list_value_length(batch.column(name)).drop_null().to_numpy(),
                                      return_counts=True)
            counts[name].update(dict(zip(lengths.tolist(), seen.tolist())))
    for name, by_length in counts.items():
        ranked = sorted(by_length.items(), key=lambda entry: (-entry[1], entry[0]))
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            raise DataError(file, f"{ranked[0][1]} rows each have vectors of length {ranked[0][0]} and "
                                  f"{ranked[1][0]}: the column's dimension cannot be told; fix the file",
                            field=name)
        if ranked:
            dims[name] = ranked[0][0]
    return dims


def _one_of_present(group: List[str]) -> RowCheck:
    def flags(batch: pa.RecordBatch) -> np.ndarray:
        missing = np.ones(batch.num_rows, dtype=bool)
        for name in group:
            missing &= _nulls(batch, name)
        return missing
    return RowCheck("|".join(group), "all of these columns are null", flags)


def _image_outcomes(name: str, ctx: CheckContext,
                    is_path: bool) -> Callable[[pa.RecordBatch], List[Optional[Exception]]]:
    """Per row, what opening and decoding its image raised (None: a PNG/JPEG that decodes, or
    no image). Kept for the last batch: three rules read it, and decoding is the per-row cost."""
    from mim_rec.data.images import open_image

    def outcome(value) -> Optional[Exception]:
        try:
            source = (ctx.base_dir / value) if is_path else io.BytesIO(value)
            with open_image(source) as image:
                image.load()
            return None
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
            return exc

    last: Dict[str, object] = {}

    def outcomes(batch: pa.RecordBatch) -> List[Optional[Exception]]:
        if last.get("batch") is not batch:
            last.update(batch=batch, outcomes=[None if v is None else outcome(v)
                                               for v in batch.column(name).to_pylist()])
        return last["outcomes"]
    return outcomes


def _decodes(name: str, ctx: CheckContext, is_path: bool) -> List[RowCheck]:
    """PIL must decode the image (bytes, or the file at a path relative to the data file), and
    its header must declare a PNG/JPEG within PIL's decompression-bomb limit: those two are
    told apart from damage, with what the header declares (its format, its pixel count)."""
    from mim_rec.data.images import ImageFormatRefused, ImageRefused, ImageTooLarge

    outcomes = _image_outcomes(name, ctx, is_path)

    def raised(kind: type, other_than: tuple = ()) -> Callable[[pa.RecordBatch], np.ndarray]:
        return lambda batch: np.fromiter(
            (isinstance(o, kind) and not isinstance(o, other_than) for o in outcomes(batch)),
            dtype=bool, count=batch.num_rows)

    def found(batch: pa.RecordBatch, row: int) -> str:
        return outcomes(batch)[row].found
    return [RowCheck(name, "image too large (a decompression bomb?)",
                     raised(ImageTooLarge), found),
            RowCheck(name, "image format not PNG/JPEG", raised(ImageFormatRefused), found),
            RowCheck(name, "image path missing or not decodable" if is_path
                     else "image bytes not decodable (PNG/JPEG)", raised(Exception, ImageRefused))]


def _image_checks(names: List[str], ctx: CheckContext, binary: str, path: str,
                  feature: str, group: tuple) -> List[RowCheck]:
    checks = [_one_of_present([n for n in group if n in names])]
    if binary in names:
        checks += _decodes(binary, ctx, is_path=False)
    if path in names:
        checks += _decodes(path, ctx, is_path=True)
    if feature in names:
        checks += [_no_null_elements(feature), _finite(feature), *_vector_length(feature, ctx)]
    return checks


# ---------------------------------------------------------------- per-contract rules

def _items_checks(names: List[str], ctx: CheckContext) -> List[RowCheck]:
    checks = [_not_null(f) for f in ITEMS.required_names]
    checks += [
        _id_in_range("category_id", None, "category id"),
        RowCheck("title", "empty title",
                 lambda b: _mask(pc.equal(pc.utf8_trim_whitespace(pc.fill_null(b.column("title"), "x")), ""))),
        _title_not_too_long(),
        _in_seconds("created_at"),
    ]
    checks += _image_checks(names, ctx, "image", "image_path", "image_feature", ITEMS.one_of[0])
    if "price" in names:
        checks.append(_finite("price"))
    return checks


def repeated_entries(values: np.ndarray) -> np.ndarray:
    """Which entries of ``values`` repeat an earlier one (the first sight of each is False)."""
    repeated = np.ones(len(values), dtype=bool)
    repeated[np.unique(values, return_index=True)[1]] = False
    return repeated


def item_id_checks(count: int) -> List[RowCheck]:
    """Whole-file rules for the items table: ids unique and dense ``0..N-1``.

    They need every id at once, so items are checked as one batch (an items table is small
    next to events: one row per item). ``count`` is the file's row count."""

    def duplicate(batch: pa.RecordBatch) -> np.ndarray:
        return repeated_entries(pc.fill_null(batch.column("item_id"), -1).to_numpy())

    return [RowCheck("item_id", "duplicate item id", duplicate),
            RowCheck("item_id", f"item ids are not dense 0..N-1 (N={count} rows)",
                     _per_row("item_id", lambda v: _out_of_range(v, count)))]


def _pairs_checks(names: List[str], ctx: CheckContext) -> List[RowCheck]:
    checks = [_not_null(f) for f in PAIRS.required_names]
    checks += [
        _id_in_range("item_id", ctx.item_count, "item id"),
        _category_in_range("category_id", ctx, "category id"),
        RowCheck("signal", f"unknown signal (expected one of {list(SIGNALS)})",
                 lambda b: ~_mask(pc.is_in(pc.fill_null(b.column("signal"), SIGNALS[0]),
                                           value_set=pa.array(SIGNALS)))),
        _in_seconds("ts"),  # holdout splits pairs at an events time
    ]
    checks += _image_checks(names, ctx, "query_image", "query_image_path", "query_feature",
                            PAIRS.one_of[0])
    if "user_id" in names:
        checks.append(_id_in_range("user_id", None, "user id"))
    if ctx.item_category is not None:
        checks.append(_pair_category_matches_item(ctx))
    return checks


def _where_lists_pair(batch: pa.RecordBatch, first: str, second: str,
                      flags: Callable[[pa.RecordBatch], np.ndarray]) -> np.ndarray:
    """``flags`` applied to the rows whose lists ``first`` and ``second`` have equal length
    (a ragged or null row is named by its own rule; comparing the flattened lists would pair
    elements across row boundaries), mapped back to ``batch``'s rows."""
    aligned = np.flatnonzero(_mask(pc.equal(pc.list_value_length(batch.column(first)),
                                            pc.list_value_length(batch.column(second)))))
    paired = batch if len(aligned) == batch.num_rows else batch.take(pa.array(aligned))  # usually all
    flagged = np.zeros(batch.num_rows, dtype=bool)
    flagged[aligned[flags(paired)]] = True
    return flagged


def _behaviour_categories_match_items(ctx: CheckContext) -> RowCheck:
    """The loader embeds a behaviour with the category the events list: one that is not its
    item's would give it another category's embedding and mislead SIM's category search."""
    def differs(paired: pa.RecordBatch) -> np.ndarray:
        rows, ids = _list_elements(paired.column("hist_item_ids"))
        _, categories = _list_elements(paired.column("hist_category_ids"))
        known = (ids >= 0) & (ids < len(ctx.item_category))
        return _rows_where(rows, known & (ctx.item_category[np.where(known, ids, 0)] != categories),
                           paired.num_rows)
    return RowCheck("hist_category_ids", "behaviour category differs from its item's in the items table",
                    lambda b: _where_lists_pair(b, "hist_item_ids", "hist_category_ids", differs))


def _pair_category_matches_item(ctx: CheckContext) -> RowCheck:
    """A pair's ``category_id`` must be its item's in the items table. C-SFT takes categories
    from the items table (the same-category negatives, the category loss), so a pair that
    disagrees is a pairs file written against another catalogue or another id mapping (item
    ids shifted by an importer), whose pairs would train on the wrong items; the world check
    refuses it, as it refuses a behaviour whose category is not its item's."""
    def items_of(batch: pa.RecordBatch) -> Tuple[np.ndarray, np.ndarray]:
        ids = pc.fill_null(batch.column("item_id"), -1).to_numpy(zero_copy_only=False)
        known = (ids >= 0) & (ids < len(ctx.item_category))  # others: the item id rule names them
        return ids, known

    def differs(batch: pa.RecordBatch) -> np.ndarray:
        ids, known = items_of(batch)
        categories = pc.fill_null(batch.column("category_id"), -1).to_numpy(zero_copy_only=False)
        return known & (ctx.item_category[np.where(known, ids, 0)] != categories)

    def expected(batch: pa.RecordBatch, row: int) -> str:
        item = int(items_of(batch)[0][row])
        return f"item {item}'s category in the items table is {int(ctx.item_category[item])}"

    return RowCheck("category_id", "pair category differs from its item's in the items table",
                    differs, expected)


def _behaviours_before_the_event(batch: pa.RecordBatch) -> np.ndarray:
    """A behaviour after its event leaks the future into the features (label leakage)."""
    rows, times = _list_elements(batch.column("hist_ts"))
    ts = pc.fill_null(batch.column("ts"), 0).to_numpy(zero_copy_only=False)
    return _rows_where(rows, times > ts[rows], batch.num_rows)


def _event_in_its_history(paired: pa.RecordBatch) -> np.ndarray:
    """A behaviour on the target item at the event's own time is the event itself: an importer
    off by one (a history up to and including the event) leaks the label, and ``hist_ts > ts``
    does not see it."""
    rows, items = _list_elements(paired.column("hist_item_ids"))
    _, times = _list_elements(paired.column("hist_ts"))
    ts = pc.fill_null(paired.column("ts"), 0).to_numpy(zero_copy_only=False)
    target = pc.fill_null(paired.column("target_item_id"), -1).to_numpy(zero_copy_only=False)
    return _rows_where(rows, (times == ts[rows]) & (items == target[rows]), paired.num_rows)


def _behaviours_oldest_first(batch: pa.RecordBatch) -> np.ndarray:
    """The loader keeps the last ``max_hist_len`` behaviours as the most recent: a history
    stored newest first would silently keep the oldest."""
    rows, times = _list_elements(batch.column("hist_ts"))
    earlier = np.zeros(len(times), dtype=bool)
    earlier[1:] = (times[1:] < times[:-1]) & (rows[1:] == rows[:-1])
    return _rows_where(rows, earlier, batch.num_rows)


def _events_checks(names: List[str], ctx: CheckContext) -> List[RowCheck]:
    checks = [_not_null(f) for f in EVENTS.required_names]
    checks += [
        _id_in_range("user_id", None, "user id"),
        _id_in_range("target_item_id", ctx.item_count, "item id"),
        RowCheck("label", "label not in {0, 1}",
                 lambda b: ~_mask(pc.is_in(pc.fill_null(b.column("label"), 0),
                                           value_set=pa.array([0, 1], pa.int8())))),
    ]
    checks += [_no_null_elements(f) for f in HISTORY_FIELDS]
    for other in HISTORY_FIELDS[1:]:
        checks.append(RowCheck(other, f"history lists of unequal length ({HISTORY_FIELDS[0]} vs {other})",
                               lambda b, other=other: _mask(pc.not_equal(
                                   pc.list_value_length(b.column(HISTORY_FIELDS[0])),
                                   pc.list_value_length(b.column(other))))))
    checks += [_id_in_range("hist_item_ids", ctx.item_count, "behaviour item id"),
               _category_in_range("hist_category_ids", ctx, "behaviour category id"),
               _in_seconds("ts"),
               RowCheck("hist_ts", "behaviour after its event (hist_ts > ts)", _behaviours_before_the_event),
               RowCheck("hist_ts", "the event itself in its history (a behaviour on the target item at the "
                        "event's ts: label leakage)",
                        lambda b: _where_lists_pair(b, "hist_item_ids", "hist_ts", _event_in_its_history)),
               RowCheck("hist_ts", "history not oldest first (hist_ts decreases)", _behaviours_oldest_first)]
    if ctx.item_category is not None:
        checks.append(_behaviour_categories_match_items(ctx))
    return checks


def _mm_checks(names: List[str], ctx: CheckContext) -> List[RowCheck]:
    checks = [_not_null(n) for n in names if n in ("item_id", "vector", "scale", "bias")]
    checks += [_id_in_range("item_id", ctx.item_count, "item id"),
               _no_null_elements("vector"), *_vector_length("vector", ctx)]
    checks += [_finite(n) for n in ("vector", "scale", "bias")
               if n in names and not (n == "vector" and "scale" in names)]
    return checks


_RULES = {"items": _items_checks, "pairs": _pairs_checks, "events": _events_checks,
          "mm_table": _mm_checks, "mm_table_int8": _mm_checks}


def row_checks(contract: Contract, names: List[str], ctx: CheckContext) -> List[RowCheck]:
    """The row rules of ``contract`` for a file holding columns ``names``, in report order."""
    return _RULES[contract.name](list(names), ctx)

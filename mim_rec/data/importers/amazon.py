"""Import an Amazon reviews subset in the UniSRec/RecBole atomic format.

Source folder (``<name>`` is the data set, e.g. ``Scientific``)::

    <name>.item2index  <name>.user2index        ASIN|user <TAB> dense index
    <name>.text                                 item_id:token <TAB> text:token_seq
    <name>.{train,valid,test}.inter             user_id:token <TAB> item_id_list:token_seq <TAB> item_id:token
    <name>.feat1CLS  <name>.feat3CLS            raw float32 [items, 512] text / image features

Mapping onto the contracts (each choice is forced by what the format lacks):

* **items**: ``item_id`` = the format's item index (already dense; checked), ``raw_item_id`` =
  ASIN, ``title`` = the full UniSRec text ("title. categories. brand.", what the text tower
  reads), ``image_feature`` = the ``feat3CLS`` row (there are no pixels: stages 1/2 run the
  "precomputed" vision input), ``brand_id`` from the brand segment (0 = none). ``category_id``
  = the first category phrase below the data set's root category in the text (see
  :func:`category_phrase`). The text features (``feat1CLS``) are not imported (nor read, nor
  fingerprinted; the file may be absent): the contract has no column for them, and the text
  tower runs on the real text.
* **time**: the format has no timestamps. Each user's sequence is rebuilt from the
  ``.inter`` rows (histories must extend one another; no row may repeat an interaction, and a
  valid or test row adds exactly its target to the user's sequence: see :class:`_Sequences`)
  and every interaction gets a
  pseudo-time: its ordinal when the files are read in order train, valid, test (an item
  seen first in a history gets the ordinal of that first sight). ``ts``/``hist_ts`` and
  ``created_at`` (the item's first appearance, as seconds after the epoch) are these
  ordinals: item-age deciles are first-appearance deciles, not calendar ages.
* **events**: each ``.inter`` row is a positive (label 1) with its ``item_id_list`` as the
  history; train and valid rows form ``events_train``, test rows ``events_test``. There are no
  non-clicks, so each positive gets ``negatives`` sampled items (label 0, same user, history
  and time), uniform or by training popularity, seeded, never an item of that user's sequence.
* **pairs** (C-SFT): consecutive interactions, the earlier item's image feature as the query
  (``query_feature``) and the next item as the interest, ``signal="purchase"`` (a review
  follows a purchase); train/valid transitions -> ``pairs_train``, test -> ``pairs_test``.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from mim_rec.config import ConfigError
from mim_rec.data.errors import DataError
from mim_rec.data.importers.common import (ImportReport, list_column, refuse_missing,
                                           sample_negatives, write_world)
from mim_rec.data.importers.missing import check_kinds
from mim_rec.data.schemas import FLOAT_VECTOR
from mim_rec.data.staging import require_outside
from mim_rec.utils.text import counted

INTER_HEADER = ("user_id:token", "item_id_list:token_seq", "item_id:token")
TEXT_HEADER = ("item_id:token", "text:token_seq")
SPLITS = ("train", "valid", "test")
NO_CATEGORY = "(none)"


@dataclass
class AmazonOptions:
    negatives: int = 1
    negative_sampling: str = "popularity"
    seed: int = 0
    # The kinds of missing rows filled with counted defaults (MISSING_KINDS["amazon"]); a
    # missing row of any other kind refuses the import
    allow_missing: Tuple[str, ...] = ()
    feature_dim: int = 512
    name: Optional[str] = None  # data set name; default: the single *.inter prefix in SRC

    def __post_init__(self) -> None:
        self.allow_missing = check_kinds(self.allow_missing, "amazon")


# Each missing count -> its --allow-missing kind
GAP_KIND: Dict[str, str] = {"items without text": "text", "users without a valid row": "inter-rows",
                            "users without a test row": "inter-rows",
                            "interactions that are no row's target": "inter-rows"}


def import_amazon(src: Path, out: Path, options: AmazonOptions) -> ImportReport:
    src = Path(src)
    require_outside(out, src)  # before anything is read: the output replaces out's contents whole
    name = options.name or _dataset_name(src)
    path = {kind: src / f"{name}.{kind}" for kind in
            ("item2index", "user2index", "text", "feat3CLS",
             *(f"{s}.inter" for s in SPLITS))}
    asins = _read_index(path["item2index"])
    users = _read_index(path["user2index"])
    n_items = len(asins)
    if not 0 < options.negatives < n_items:
        raise ConfigError(f"--negatives {options.negatives}: the reviews hold no non-clicks, so each positive "
                          f"needs 1 to {n_items - 1} sampled negatives ({n_items} items in {path['item2index']})")
    report = ImportReport("amazon", item_age=(
        "the format has no timestamps: an item's created_at is its first appearance in the "
        "interaction files, which are ordered by user, not by time, so the S1..S10 buckets group "
        "items by the index of the first user who reviewed them, not by their age"))

    texts, missing_text = _read_texts(path["text"], asins)
    image_features = read_feature_file(path["feat3CLS"], n_items, options.feature_dim)
    missing = {"items without text": len(missing_text)}
    refuse_missing(str(path["text"]), missing, GAP_KIND, options.allow_missing,
                   "Every item of item2index needs a text line.")
    sequences = _Sequences(len(users), n_items, allow_gaps="inter-rows" in options.allow_missing)
    rows = {}
    for split in SPLITS:
        rows[split] = sequences.read(path[f"{split}.inter"])
        if not rows[split] and split != "valid":  # a split without rows would only be refused downstream
            raise DataError(str(path[f"{split}.inter"]), f"holds no rows (header only): the world's "
                                                         f"{split} split would be empty")
        if split == "train":
            continue
        # UniSRec splits leave-one-out: every user has one valid and one test row, so a user
        # without one means a file cut short (at a line boundary, which no row check can see).
        # Checked as each file is read, so a short valid file is not blamed on the test file.
        gap = {f"users without a {split} row": len(users) - len({r.user for r in rows[split]})}
        refuse_missing(str(path[f"{split}.inter"]), gap, GAP_KIND, options.allow_missing,
                       "The format splits leave-one-out, one row per user of user2index: "
                       "is the file truncated?")
        missing.update(gap)
    gap = {"interactions that are no row's target": sequences.untargeted_positions(rows)}
    refuse_missing(str(path["train.inter"]), gap, GAP_KIND, options.allow_missing,
                   "The train file lists every prefix of a user's sequence before its valid row, "
                   "each interaction the target of one row: is a file truncated or missing rows?")
    missing.update(gap)
    for index in missing_text:  # counted default: the ASIN is the only text there is
        texts[index] = asins[index]
    report.missing = {k: v for k, v in missing.items() if v}
    report.admitted, report.kind_of = options.allow_missing, GAP_KIND

    root = _root_phrase(texts)
    category_names, category_id = _dense_names([_below_root(t, root) for t in texts])
    brand_names, brand_id = _dense_names([_segments(t, root)[2] for t in texts], reserve_empty=True)

    unseen = sequences.first_seen < 0  # in item2index but in no interaction: newest of all
    created = np.where(unseen, sequences.interactions, sequences.first_seen)
    items = pa.table({
        "item_id": pa.array(np.arange(n_items, dtype=np.int64)),
        "raw_item_id": pa.array(asins, pa.string()),
        "category_id": pa.array(category_id),
        "title": pa.array(texts, pa.string()),
        "created_at": pa.array(created, pa.int64()).cast(pa.timestamp("s")),
        "image_feature": pa.FixedSizeListArray.from_arrays(
            pa.array(image_features.reshape(-1)), options.feature_dim).cast(FLOAT_VECTOR),
        "brand_id": pa.array(brand_id),
    })

    rng = np.random.default_rng(options.seed)
    popularity = sequences.train_counts(rows["train"] + rows["valid"])  # events_train's rows
    positives = sequences.user_items()
    _refuse_negatives_past_sequences(options.negatives, positives, users, n_items, path["user2index"])
    raw_users = np.array(users, dtype=object)
    events, pairs = {}, {}
    for split, parts in (("train", ("train", "valid")), ("test", ("test",))):
        split_rows = [r for p in parts for r in rows[p]]
        source = ", ".join(str(path[f"{p}.inter"]) for p in parts)
        events[split] = _events(split_rows, sequences, category_id, raw_users, options,
                                positives, popularity, rng, source)
        pairs[split] = _pairs(split_rows, sequences, category_id, image_features)
        if pairs[split].num_rows == 0:
            raise DataError(source, f"no row has a history (an earlier item), so pairs_{split} "
                                    f"would be empty", field=INTER_HEADER[1])

    report.counts = {
        "items": n_items, "users": len(users), "categories": len(category_names),
        "brands": len(brand_names) - 1, "interactions": sequences.interactions,
        **{f"inter rows {s}": len(rows[s]) for s in SPLITS},
        **{f"events_{s}": t.num_rows for s, t in events.items()},
        **{f"pairs_{s}": t.num_rows for s, t in pairs.items()},
        "items first seen after train": int((sequences.first_split > 0).sum()),
        "items in no interaction": int(unseen.sum()),
    }
    report.notes = [
        f"negatives: {options.negatives} per positive, {options.negative_sampling}, "
        f"seed {options.seed}, never an item of the user's sequence",
        "times are interaction ordinals (the format has no timestamps); created_at = first appearance",
        f"category = first phrase below the root '{root}' in the item text",
        "image_feature = feat3CLS (no pixels); feat1CLS text features not imported",
    ]
    config = {"format": "amazon", "src": str(src), **vars(options), "name": name}
    # Only the files read are fingerprinted: feat1CLS is not imported and may be absent.
    write_world(Path(out), items, pairs, events, report, config, list(path.values()))
    return report


def _refuse_negatives_past_sequences(negatives: int, positives: Dict[int, np.ndarray], users: List[str],
                                     n_items: int, user_index: Path) -> None:
    """Refuse ``--negatives`` above what the longest sequence leaves to draw from: a non-click
    is never an item of the user's sequence nor drawn twice for one positive, so the sampler
    would redraw that user's rows in vain (on Scientific, ``--negatives 1584`` ran for over
    ten minutes at 1 GB before it was stopped)."""
    user = max(positives, key=lambda u: len(positives[u]))
    room = n_items - len(positives[user])
    if negatives > room:
        raise ConfigError(f"--negatives {negatives}: user {users[user]!r} (index {user} of {user_index}) has "
                          f"{len(positives[user])} of the {n_items} items in its sequence, and a non-click is "
                          f"never one of them nor drawn twice for one positive, so each of its positives can "
                          f"have at most {room}; give --negatives {room} or fewer")


# ---------------------------------------------------------------- source files

def _dataset_name(src: Path) -> str:
    if not src.exists():
        raise DataError(str(src), "no such folder (SRC: the folder of the <name>.* source files)")
    if not src.is_dir():
        raise DataError(str(src), "is a file, not the folder of the <name>.* source files")
    names = sorted({p.name.split(".")[0] for p in src.glob("*.train.inter")})
    if len(names) != 1:
        raise DataError(str(src), f"expected exactly one <name>.train.inter, found {names}; "
                                  f"pass the data set name with --name")
    return names[0]


def _tsv(path: Path, header: Optional[Tuple[str, ...]], columns: int) -> Iterator[Tuple[int, List[str]]]:
    """(0-based data row, fields) of a TSV file; header and column count checked."""
    if not path.is_file():
        raise DataError(str(path), "no such file")
    if path.stat().st_size == 0:
        raise DataError(str(path), "is empty" + (f" (expected the header {list(header)})" if header else ""))
    with path.open("rb") as fh:
        # A UTF-8 byte-order mark (some editors save one) is not text: read as text it started
        # the first token, an item2index ASIN that no .text line matched (the text file blamed
        # for it) or a user2index name written into raw_user_id
        if fh.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
            fh.seek(0)
        lines = (_decode(path, row, raw) for row, raw in enumerate(fh, start=-1 if header else 0))
        if header is not None:
            got = tuple(_without_line_end(next(lines, "")).split("\t"))
            for name in header:
                if name not in got:
                    raise DataError(str(path), f"missing column (header is {list(got)})", field=name)
            if got != header:
                raise DataError(str(path), f"header {list(got)} is not {list(header)}")
        for row, line in enumerate(lines):
            if line and not line.endswith("\n"):
                # Every file of the format ends its rows with a newline: a last row without one
                # was cut short, and a cut number ("142" -> "14") can still be a valid id.
                raise DataError(str(path), "the last row has no line end: the file looks cut short "
                                           "(if it is whole, end it with a newline)", row=row)
            line = _without_line_end(line)
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != columns:
                raise DataError(str(path), f"has {len(fields)} tab-separated fields, "
                                           f"expected {columns}", row=row)
            yield row, fields


def _without_line_end(line: str) -> str:
    """``line`` without its line end, LF or CRLF: a file saved on Windows is the same text (its
    '\\r' ended the last field, so a header's last column was refused as missing)."""
    return line.removesuffix("\n").removesuffix("\r")


def _decode(path: Path, row: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = "the header" if row < 0 else f"byte {exc.start} of the line"
        raise DataError(str(path), f"is not UTF-8 text ({exc.reason} at {where})",
                        row=None if row < 0 else row) from None


def _int(path: Path, row: int, field: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(str(path), f"not an integer: {text!r}", row=row, field=field) from None


def _read_index(path: Path) -> List[str]:
    """``token<TAB>index`` lines -> tokens ordered by index; indices must be dense 0..N-1."""
    by_index: Dict[int, str] = {}
    seen = set()
    for row, (token, index) in _tsv(path, None, 2):
        index = _int(path, row, "index", index)
        if index in by_index:
            raise DataError(str(path), f"index {index} given twice", row=row, field="index")
        if token in seen:
            raise DataError(str(path), f"token {token!r} given twice", row=row, field="token")
        by_index[index] = token
        seen.add(token)
    count = len(by_index)
    if not count:
        raise DataError(str(path), "holds no rows (expected one token<TAB>index line per entry)")
    if set(by_index) != set(range(count)):
        gap = min(set(range(count)) - set(by_index))
        raise DataError(str(path), f"indices are not dense 0..{count - 1} (first gap: {gap})",
                        field="index")
    return [by_index[i] for i in range(count)]


def _read_texts(path: Path, asins: List[str]) -> Tuple[List[str], List[int]]:
    index = {a: i for i, a in enumerate(asins)}
    texts: List[Optional[str]] = [None] * len(asins)
    for row, (asin, text) in _tsv(path, TEXT_HEADER, 2):
        if asin not in index:
            raise DataError(str(path), f"ASIN {asin!r} is not in item2index", row=row,
                            field="item_id:token")
        if texts[index[asin]] is not None:
            raise DataError(str(path), f"second text for {asin!r}", row=row, field="item_id:token")
        if not text.strip():
            raise DataError(str(path), "empty text", row=row, field="text:token_seq")
        texts[index[asin]] = text.strip()
    missing = [i for i, t in enumerate(texts) if t is None]
    return texts, missing


def read_feature_file(path: Path, rows: int, dim: int) -> np.ndarray:
    """A raw little-endian float32 ``[rows, dim]`` file; a truncated or oversized file is refused."""
    if not path.is_file():
        raise DataError(str(path), "no such file")
    size = path.stat().st_size
    row_bytes = dim * 4
    if size % row_bytes:
        raise DataError(str(path), f"{size} bytes is not a whole number of {dim}-float32 rows "
                                   f"(truncated, or another dimension?)", row=size // row_bytes)
    if size // row_bytes != rows:
        raise DataError(str(path), f"holds {size // row_bytes} rows of {dim} float32, "
                                   f"item2index has {rows} items",
                        row=min(size // row_bytes, rows))
    features = np.fromfile(path, dtype="<f4").reshape(rows, dim)
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise DataError(str(path), "NaN or infinite feature value", row=int(np.argmax(bad)))
    return features


@dataclass
class _InterRow:
    split: int
    user: int
    position: int  # the target's position in the user's sequence


class _Sequences:
    """Each user's full item sequence rebuilt from the ``.inter`` rows, with pseudo-times.

    A row ``(u, [s0..s_{k-1}], s_k)`` says positions 0..k of user u's sequence; rows must agree
    with each other (a history that contradicts an earlier row is refused). Positions get a
    global ordinal the first time any row reveals them.

    Each row is one interaction (its target), so a row must not repeat one: a train row whose
    target position an earlier train row already had is refused (the real train file lists a
    user's prefixes longest first, each once), and a valid or test row must extend the user's
    sequence by exactly its target, the item right after everything the earlier files said (a
    duplicated or stale valid/test row would score, or train on, an interaction twice: its
    target would already sit in the training histories).
    """

    def __init__(self, users: int, items: int, allow_gaps: bool = False):
        self.users, self.items, self.allow_gaps = users, items, allow_gaps
        self.has_row = np.zeros((len(SPLITS), users), bool)  # [split, user]
        self.seq: List[List[int]] = [[] for _ in range(users)]
        self.clock: List[List[int]] = [[] for _ in range(users)]
        self.first_seen = np.full(items, -1, np.int64)
        self.first_split = np.full(items, -1, np.int64)
        self.interactions = 0
        self._split = -1
        self._train_targets: Dict[Tuple[int, int], int] = {}  # (user, position) -> train row

    def read(self, path: Path) -> List[_InterRow]:
        self._split += 1
        rows = []
        for row, (user, history, target) in _tsv(path, INTER_HEADER, 3):
            user = _int(path, row, INTER_HEADER[0], user)
            if not 0 <= user < self.users:
                raise DataError(str(path), f"user {user} outside user2index (0..{self.users - 1})",
                                row=row, field=INTER_HEADER[0])
            items = [_int(path, row, INTER_HEADER[1], t) for t in history.split()]
            items.append(_int(path, row, INTER_HEADER[2], target))
            known = len(self.seq[user])
            for position, item in enumerate(items):
                field = INTER_HEADER[2] if position == len(items) - 1 else INTER_HEADER[1]
                if not 0 <= item < self.items:
                    raise DataError(str(path), f"item {item} outside item2index "
                                               f"(0..{self.items - 1})", row=row, field=field)
                self._agree(path, row, field, user, position, item)
            self._refuse_repeat(path, row, user, len(items) - 1, known)
            for item in items[known:]:
                self._reveal(user, item)
            self.has_row[self._split, user] = True
            rows.append(_InterRow(self._split, user, len(items) - 1))
        return rows

    def _refuse_repeat(self, path: Path, row: int, user: int, position: int, known: int) -> None:
        """A row's target must be a new interaction (see the class docstring)."""
        if self._split == 0:
            first = self._train_targets.setdefault((user, position), row)
            if first != row:
                raise DataError(str(path), f"repeats row {first}: user {user}'s item at position "
                                           f"{position} is the target of both (duplicated row)",
                                row=row, field=INTER_HEADER[2])
            return
        if self.allow_gaps and position > known:
            return  # rows missing before it (counted: untrained_positions, users without a row)
        if known and position != known:
            split = SPLITS[self._split]
            if position < known:
                why = (f"its target, position {position} of user {user}'s sequence, is already in "
                       f"the earlier rows (which reach position {known - 1}): a duplicated or stale "
                       f"{split} row")
            else:
                why = (f"its history adds {counted(position - known, 'item')} that no earlier row has, but a "
                       f"{split} row extends user {user}'s sequence by exactly one item (position "
                       f"{known}, after the earlier rows): an earlier file lacks rows (cut short?), or "
                       f"this row is not the next interaction; --allow-missing inter-rows counts such gaps")
            raise DataError(str(path), why, row=row, field=INTER_HEADER[2])

    def _agree(self, path: Path, row: int, field: str, user: int, position: int, item: int) -> None:
        seq = self.seq[user]
        if position < len(seq) and seq[position] != item:
            raise DataError(str(path), f"user {user}'s item at position {position} is {item} "
                                       f"here but {seq[position]} in an earlier row",
                            row=row, field=field)

    def _reveal(self, user: int, item: int) -> None:
        """The next position of ``user``'s sequence (every row lists positions 0..k in order)."""
        self.seq[user].append(item)
        self.clock[user].append(self.interactions)
        if self.first_seen[item] < 0:
            self.first_seen[item] = self.interactions
            self.first_split[item] = self._split
        self.interactions += 1

    def untargeted_positions(self, rows: Dict[str, List[_InterRow]]) -> int:
        """Interactions that no row has as its target, below a user's last row.

        The train file lists every prefix of a user's sequence up to the valid row (positions
        1..v-1 as targets; position 0 is only ever history), and the test row follows the valid
        row, so a row missing from a file -- or a file cut short -- leaves interactions that are
        history only, neither a positive nor a C-SFT pair, which nothing else would count. A
        missing valid row is counted apart (users without a valid row): where it is missing,
        the slot before the test row is its."""
        valid = np.full(self.users, -1, np.int64)  # the valid row's position (or slot) per user
        test = np.full(self.users, -1, np.int64)
        for row in rows["test"]:
            test[row.user] = row.position
        valid[test >= 0] = test[test >= 0] - 1
        for row in rows["valid"]:
            valid[row.user] = row.position
        # Train targets are distinct positions (see read); one at or past the valid slot (a
        # user without a valid row whose train file reaches it) fills no gap below the slot.
        trained = np.zeros(self.users, np.int64)
        for row in rows["train"]:
            trained[row.user] += 0 < row.position < valid[row.user]
        known = valid >= 0
        before_valid = (np.maximum(valid - 1, 0) - trained)[known].sum()
        after_valid = np.where(test >= 0, test - valid - 1, 0)[known].sum()
        return int(before_valid + after_valid)

    def train_counts(self, train_rows: List[_InterRow]) -> np.ndarray:
        """Interactions per item in the training split (``train_rows``: the train and valid
        rows, whose targets are all events_train positives; and each user's first item)."""
        counts = np.zeros(self.items, np.int64)
        for r in train_rows:
            counts[self.seq[r.user][r.position]] += 1
        firsts = [s[0] for s in self.seq if s]
        np.add.at(counts, firsts, 1)
        return counts

    def user_items(self) -> Dict[int, np.ndarray]:
        return {u: np.unique(s) for u, s in enumerate(self.seq) if s}


def _events(rows: List[_InterRow], seqs: _Sequences, category: np.ndarray,
            raw_users: np.ndarray, options: AmazonOptions, positives, popularity,
            rng: np.random.Generator, source: str) -> pa.Table:
    users = np.array([r.user for r in rows], np.int64)
    targets = np.array([seqs.seq[r.user][r.position] for r in rows], np.int64)
    ts = np.array([seqs.clock[r.user][r.position] for r in rows], np.int64)
    hist = [np.array(seqs.seq[r.user][:r.position], np.int64) for r in rows]
    hist_ts = [np.array(seqs.clock[r.user][:r.position], np.int64) for r in rows]
    negatives = sample_negatives(users, options.negatives, seqs.items, positives, options.negative_sampling,
                                 popularity, rng, source)
    k = 1 + options.negatives  # each positive followed by its negatives
    repeat = np.repeat(np.arange(len(rows)), k)
    target = np.concatenate([targets[:, None], negatives], axis=1).reshape(-1)
    label = np.tile(np.array([1] + [0] * options.negatives, np.int8), len(rows))
    hist_rep = [hist[i] for i in repeat]
    return pa.table({
        "user_id": pa.array(users[repeat]),
        "query": pa.array([""] * len(repeat), pa.string()),
        "target_item_id": pa.array(target),
        "label": pa.array(label),
        "ts": pa.array(ts[repeat]),
        "hist_item_ids": list_column(hist_rep, pa.int64()),
        "hist_category_ids": list_column([category[h] for h in hist_rep], pa.int32()),
        "hist_ts": list_column([hist_ts[i] for i in repeat], pa.int64()),
        "raw_user_id": pa.array(raw_users[users[repeat]].tolist(), pa.string()),
    })


def _pairs(rows: List[_InterRow], seqs: _Sequences, category: np.ndarray,
           image_features: np.ndarray) -> pa.Table:
    rows = [r for r in rows if r.position > 0]
    query = np.array([seqs.seq[r.user][r.position - 1] for r in rows], np.int64)
    item = np.array([seqs.seq[r.user][r.position] for r in rows], np.int64)
    dim = image_features.shape[1]
    return pa.table({
        "item_id": pa.array(item),
        "signal": pa.array(["purchase"] * len(rows), pa.string()),
        "category_id": pa.array(category[item]),
        "ts": pa.array(np.array([seqs.clock[r.user][r.position] for r in rows], np.int64)),
        "query_feature": pa.FixedSizeListArray.from_arrays(
            pa.array(image_features[query].reshape(-1)), dim).cast(FLOAT_VECTOR),
        "user_id": pa.array(np.array([r.user for r in rows], np.int64)),
    })


def _dense_names(names: List[str], reserve_empty: bool = False) -> Tuple[List[str], np.ndarray]:
    """Sorted distinct names and each row's index among them (``""`` -> 0 when reserved)."""
    distinct = sorted(set(names) - ({""} if reserve_empty else set()))
    if reserve_empty:
        distinct = [""] + distinct
    index = {n: i for i, n in enumerate(distinct)}
    return distinct, np.array([index[n] for n in names], np.int32)


# ---------------------------------------------------------------- categories from text

def _segments(text: str, root: str = "") -> Tuple[str, str, str]:
    """UniSRec's ``"title. categories. brand."`` -> (title, categories, brand).

    The title may contain '. ', so the last two segments are taken from the right. A brand
    may contain it too ("K.S. Choi Corp."): given the data set's ``root`` category, a text
    whose second-last segment does not start with it takes the last segment that does as its
    categories and all after it as the brand (a brand starting with the root, "Beauty Without
    Cruelty", is still read from the right).
    """
    body = text.strip().rstrip(".")
    parts = body.split(". ")
    at_root = re.compile(re.escape(root) + r"(?= |$)") if root else None
    if at_root is not None and not (len(parts) >= 3 and at_root.match(parts[-2].strip())):
        starts = list(re.finditer(r"\. " + at_root.pattern, body))
        if starts:
            title, rest = body[:starts[-1].start()], body[starts[-1].start() + 2:]
            categories, _, brand = rest.partition(". ")
            return title, categories.strip(), brand.strip().rstrip(".")
    if len(parts) < 3:
        return text, "", ""
    return ". ".join(parts[:-2]), parts[-2].strip(), parts[-1].strip().rstrip(".")


def category_phrase(categories: str, index: int = 0) -> str:
    """The ``index``-th phrase of a category path whose levels were joined by spaces.

    Level names are runs of capitalised words, so a level boundary is only recoverable where
    the name cannot continue: a phrase goes on after a word ending in ',' and around '&'
    ("Tapes, Adhesives & Sealants"), and ends at any other word boundary. Multi-word names
    without connectors ("Additive Manufacturing Products") therefore yield their first word,
    which still names the branch of the tree.
    """
    words = categories.split()
    phrases, current = [], []
    for i, word in enumerate(words):
        current.append(word)
        following = words[i + 1] if i + 1 < len(words) else ""
        if not (word.endswith(",") or word == "&" or following == "&"):
            phrases.append(" ".join(current))
            current = []
    if current:
        phrases.append(" ".join(current))
    return phrases[index] if index < len(phrases) else ""


def _root_phrase(texts: List[str]) -> str:
    """The data set's root category (the most common first phrase, e.g. 'Industrial & Scientific')."""
    firsts = [category_phrase(_segments(t)[1]) for t in texts]
    firsts = [f for f in firsts if f]
    return max(set(firsts), key=firsts.count) if firsts else ""


def _below_root(text: str, root: str) -> str:
    categories = _segments(text, root)[1]
    first = category_phrase(categories)
    if not first:
        return NO_CATEGORY
    if first == root:
        return category_phrase(categories, 1) or root
    return first

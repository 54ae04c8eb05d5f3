"""RIM's window-message log: an append-only file of embedded new items.

Each record is one *window message*, the items the RIM service embedded in one batch window::

    frame    = magic b"RIM1" | payload length (uint32 LE) | CRC32 of payload (uint32 LE)
    payload  = header length (uint32 LE) | header (UTF-8 JSON) | vectors (float32 LE, n x dim)
    header   = {"fingerprint", "dim", "embedded_at", "item_ids": [n], "arrived_at": [n],
                "table": {"path", "fingerprint"} | null}

``table`` is the MM table the service checked the items' ids against (None: it was told none);
a consumer folds or applies a record only into that table (:func:`check_served_table`).

Offsets are byte offsets of record boundaries, so a consumer (the table fold, a live CTR
model) remembers how far it has read and resumes there.

Durability: :meth:`RimLog.append` writes one record and ``fsync``s it before returning, and the
service acknowledges an item only after that, so an acknowledged item survives a crash. After
each ``fsync`` the writer publishes the durable end in ``<log>.durable``, and readers stop
there: a whole record whose ``fsync`` is still running (or fails, and is cut) is never read. A
crash can only tear the record being written, i.e. the last one, which lies past the durable
end: on open, a damaged last record there is a torn tail and is truncated (the dropped byte
count is reported) when it looks like what a cut-short write leaves -- a prefix of a frame (its
magic, or a prefix of it, and no more bytes than its declared length) or zeros. Anything else
was never left by a crash, and is refused with its offset, never truncated or skipped: a damaged
record before the published durable end (acknowledged data), a log that ends before it, a
damaged record with an intact one after it, or bytes that do not start a frame (another file
given as the log). Readers refuse a log that ends before the durable end they read too, unless
their view of the file may lag the writer's (:func:`_records` says why that order is sound). A
durable end inside an intact record is refused as ``<log>.durable``'s error, not the
record's: the writer publishes only record ends.

Without a ``<log>.durable`` nothing says the file is a RIM log but its bytes, so only a damaged
record after an intact one may be taken for a torn tail there: an intact record (magic, CRC, a
window header) shows the file is a RIM log, while zeros or a frame prefix at byte 0 are just as
well another program's file, which a truncation would destroy. Such a file is refused. This
costs no crash recovery: a writer publishes its durable end with an ``fsync`` when it opens the
log, before any append, so a first record a crash tore always has a ``<log>.durable`` beside it.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Set, Tuple, Union

import numpy as np

from mim_rec.data.errors import DataError, ManifestMismatch
from mim_rec.utils.text import counted

MAGIC = b"RIM1"
_FRAME = struct.Struct("<4sII")     # magic, payload length, crc32(payload)
_HEADER_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class ServedTable:
    """The MM table a service checked new ids against: its folder, to name it in errors, and its
    :func:`~embeddings.table.table_identity`, to know it (a folder may be replaced or moved)."""

    path: str
    fingerprint: str


@dataclass(frozen=True)
class WindowMessage:
    """Items embedded in one batch window: ``vectors[i]`` is item ``item_ids[i]``'s vector."""

    item_ids: np.ndarray       # [n] int64
    vectors: np.ndarray        # [n, dim] float32
    fingerprint: str           # the item encoder that produced the vectors
    arrived_at: np.ndarray     # [n] float64, Unix seconds each item reached the service
    embedded_at: float         # Unix seconds the window was embedded
    table: Optional[ServedTable] = None  # the table the service served against; None: none

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != n or len(self.arrived_at) != n:
            raise ValueError(f"window message of {n} ids has vectors {self.vectors.shape} "
                             f"and {len(self.arrived_at)} arrival times")

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def encode(self) -> bytes:
        header = json.dumps({"fingerprint": self.fingerprint, "dim": self.dim,
                             "embedded_at": self.embedded_at,
                             "item_ids": [int(i) for i in self.item_ids],
                             "arrived_at": [float(t) for t in self.arrived_at],
                             "table": None if self.table is None else asdict(self.table)}).encode()
        payload = _HEADER_LEN.pack(len(header)) + header + self.vectors.astype("<f4").tobytes()
        return _FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload

    @staticmethod
    def decode(payload: bytes) -> "WindowMessage":
        """The message a record holds; ``ValueError`` names what is malformed. The CRC only
        proves the bytes are the ones written, so a writer's bug still has to be caught here."""
        (header_len,) = _HEADER_LEN.unpack_from(payload)
        try:
            header = json.loads(payload[_HEADER_LEN.size:_HEADER_LEN.size + header_len])
            ids, arrived_at = header["item_ids"], header["arrived_at"]
            dim, fingerprint, embedded_at = header["dim"], header["fingerprint"], float(header["embedded_at"])
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"header is not a window header ({type(exc).__name__}: {exc})") from None
        table = _served_table(header)
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise ValueError("item_ids are not all integers")
        if not all(-2 ** 63 <= i < 2 ** 63 for i in ids):  # numpy would raise a bare OverflowError
            raise ValueError("item_ids do not all fit int64")
        if type(dim) is not int or dim <= 0:
            raise ValueError(f"dim {dim!r} is not a positive integer")
        vectors = np.frombuffer(payload, dtype="<f4", offset=_HEADER_LEN.size + header_len)
        if vectors.size != len(ids) * dim:
            raise ValueError(f"{vectors.size} floats for {len(ids)} items of dim {dim}")
        return WindowMessage(np.asarray(ids, dtype=np.int64), vectors.reshape(len(ids), dim).astype(np.float32),
                             str(fingerprint), np.asarray(arrived_at, dtype=np.float64), embedded_at, table)


def _served_table(header: dict) -> Optional[ServedTable]:
    """The header's ``table``. A header without one was written before records named their
    table: which table its ids were checked against is unknown, so it is refused, not guessed."""
    if "table" not in header:
        raise ValueError("its header names no table (written before records named the table they were served "
                         "against); serve new items into a new log")
    table = header["table"]
    if table is None:
        return None
    if not (isinstance(table, dict) and set(table) == {"path", "fingerprint"}
            and all(isinstance(value, str) for value in table.values())):
        raise ValueError(f"table {table!r} is neither null nor a {{path, fingerprint}} of strings")
    return ServedTable(**table)


class _TornTail(Exception):
    """The record at this offset looks cut short by a crash (only possible for the last one).
    ``cut_short``: the bytes end inside its frame, as they also do where a reader's view of the
    file lags the writer's; else they are zeros, or a whole frame whose CRC fails."""

    def __init__(self, cut_short: bool) -> None:
        super().__init__(cut_short)
        self.cut_short = cut_short


def _intact_end(data: memoryview, offset: int) -> Optional[int]:
    """End offset of the record at ``offset`` if it is whole and passes its CRC, else None."""
    if len(data) - offset < _FRAME.size:
        return None
    magic, length, crc = _FRAME.unpack_from(data, offset)
    end = offset + _FRAME.size + length
    if magic != MAGIC or end > len(data) or zlib.crc32(data[offset + _FRAME.size:end]) != crc:
        return None
    return end


def _frame_end(data: memoryview, offset: int, path: Path, base: int) -> int:
    """End offset of the intact record at ``offset``. A damaged record is a torn tail
    (:class:`_TornTail`) when no intact record follows it and it looks cut short
    (:func:`_looks_torn`), else corruption (:class:`DataError`). ``data`` starts at byte
    ``base`` of the file: errors name the file's offsets, which a reader can look up."""
    end = _intact_end(data, offset)
    if end is not None:
        return end
    raw = bytes(data)
    at = raw.find(MAGIC, offset + 1)
    while at >= 0:
        if _intact_end(data, at) is not None:
            raise DataError(str(path), f"damaged record at byte {base + offset} with an intact one at byte {base + at} "
                            "after it; the log is corrupt, not torn")
        at = raw.find(MAGIC, at + 1)
    if not _looks_torn(raw[offset:]):
        raise DataError(str(path), f"the bytes from byte {base + offset} do not start a RIM record (they begin "
                        f"{raw[offset:offset + 8]!r}): not a RIM window-message log, or one that was overwritten")
    raise _TornTail(_cut_short(raw[offset:]))


def _looks_torn(tail: bytes) -> bool:
    """Whether ``tail`` is what a write cut short by a crash leaves: zeros (blocks allocated,
    never written) or the start of one frame -- its magic or a prefix of it, and no more bytes
    than that frame declares."""
    if not tail.strip(b"\0"):
        return True
    if not (tail[:len(MAGIC)] == MAGIC or MAGIC.startswith(tail)):
        return False
    if len(tail) < _FRAME.size:
        return True
    _, length, _ = _FRAME.unpack_from(tail)
    return len(tail) <= _FRAME.size + length


def _cut_short(tail: bytes) -> bool:
    """Whether ``tail``, which looks torn, ends inside its frame (fewer bytes than the frame
    header, or than the frame declares), rather than being zeros or a whole frame."""
    if not tail.strip(b"\0"):
        return False
    return len(tail) < _FRAME.size or len(tail) < _FRAME.size + _FRAME.unpack_from(tail)[1]


def durable_end_path(path: Union[str, Path]) -> Path:
    """Where a log's writer publishes how far the log is durable: ``<log>.durable``."""
    path = Path(path)
    return path.with_name(path.name + ".durable")


def _published_end(path: Path, writer: bool = False) -> Optional[int]:
    """The durable end the log's writer last published; None for a log no writer published one
    for (written by hand, or before the writer did). It is not fsynced, so a crash can empty
    it: readers refuse that (and a negative offset, which no writer publishes), while the
    ``writer`` reopening the log takes it as unpublished (it protects nothing this once) and
    publishes again."""
    published = durable_end_path(path)
    try:
        end = int(published.read_text())
        if end < 0:
            raise ValueError(end)
        return end
    except FileNotFoundError:
        return None
    except ValueError:  # UnicodeDecodeError is a ValueError too
        if writer:
            return None
        raise DataError(str(published), "not a byte offset (the durable end of the log beside it); reopen the "
                        "log with its writer (restart `mim embeddings serve`) to publish it again") from None


def _records(path: Path, offset: int, stop: Optional[int], durable: Optional[int],
             view_may_lag: bool) -> Iterator[Tuple[int, memoryview]]:
    """``(end offset, payload)`` of every intact record from ``offset`` (to ``stop``).

    Bytes before ``durable``, the end the writer published after their ``fsync``, were
    acknowledged: a damaged record there is refused with its offset, never taken for a torn
    tail, and so is a log that ends before ``durable``, even while its writer appends. The
    writer publishes an end only once the log holds it, and never cuts the log below an end it
    published (a failed append is cut back to the last one, recovery to the intact records,
    which reach it or are refused); so ``durable``, read before the log is opened (as every
    caller does), is a size the log had then, and a smaller size now means the log was cut --
    at a record boundary too, where no scan of the records can tell the cut from their end.
    That needs the view of the log to be as fresh as the view of ``<log>.durable`` read before
    it (one machine, or a shared file system with close-to-open consistency). A view that may
    lag (``view_may_lag``: a reader on another machine whose file system caches do not keep
    that order) may end before ``durable`` without a cut, so it stops at the end it sees, or at
    a record that end cuts short, as at one being appended (the live apply waits for the rest,
    for a bounded time). One race is left: a writer that creates a log where a removed log's
    ``<log>.durable`` remains publishes its own just after creating the file, and a reader
    in between is refused (reading again succeeds).

    With no ``durable`` a damaged first record is refused, never a torn tail (see the module's
    notes), except by a view that may lag, which may not show ``<log>.durable`` yet.

    The writer publishes only record ends, so a ``durable`` inside an intact record blames the
    ``<log>.durable``, not the record (:func:`_durable_inside`). A reader's range stops at
    ``durable`` and cuts that record short, so the bytes after are read for it: only on the
    way to an error, and only the bytes of that record."""
    if not path.is_file():
        return
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        fh.seek(offset)
        data = memoryview(fh.read(-1 if stop is None else max(stop - offset, 0)))
    view_end = offset + len(data)
    ends_early = stop is not None and view_end < stop  # the file, as seen, ends before the range does
    position = 0
    while position < len(data):
        start = offset + position
        try:
            end = offset + _frame_end(data, position, path, offset)
        except _TornTail as torn:
            if durable is None:
                if start == 0 and not view_may_lag:
                    raise DataError(str(path), f"the bytes from byte 0 do not start a whole RIM record (they begin "
                                    f"{bytes(data[:8])!r}) and no {durable_end_path(path).name} beside it says a "
                                    "writer began this log: not a RIM window-message log, refused, not truncated "
                                    "as a torn write (a RIM log whose first record a crash tore before any writer "
                                    "published its durable end holds no acknowledged item, and may be removed)")
                return
            if start < durable:
                whole = _intact_record_end(path, start)
                if whole is not None and whole > durable:
                    raise _durable_inside(path, durable, start, whole) from None
                if not (view_may_lag and ends_early and torn.cut_short):
                    raise DataError(str(path), f"damaged record at byte {start}, before the durable end {durable} "
                                    "its writer published: acknowledged records are corrupt (never truncated; "
                                    "restore the log from a copy)") from None
            return
        if durable is not None and start < durable < end:
            raise _durable_inside(path, durable, start, end)
        yield end, data[position + _FRAME.size:end - offset]
        position = end - offset
    if durable is not None and size < durable and not view_may_lag:
        raise DataError(str(path), f"the log ends at byte {size}, before the durable end {durable} its writer "
                        f"published: acknowledged records are missing (if this file replaced the log on purpose, "
                        f"remove {durable_end_path(path).name})")


def _intact_record_end(path: Path, start: int) -> Optional[int]:
    """End offset of the record at byte ``start`` of the file as it is now, if it is whole and
    passes its CRC, else None (a frame that declares more bytes than the file holds is not read)."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:  # removed (rotated) since the reader read it
        return None
    with fh:
        fh.seek(start)
        frame = fh.read(_FRAME.size)
        length = _FRAME.unpack(frame)[1] if len(frame) == _FRAME.size else None
        if length is None or start + _FRAME.size + length > os.fstat(fh.fileno()).st_size:
            return None
        end = _intact_end(memoryview(frame + fh.read(length)), 0)
    return None if end is None else start + end


def _durable_inside(path: Path, durable: int, start: int, end: int) -> DataError:
    """The error for a published durable end inside the intact record from ``start`` to ``end``:
    the writer only ever publishes record ends, so it is ``<log>.durable`` that is wrong (or
    was published for another log), not the record."""
    return DataError(str(durable_end_path(path)), f"durable end {durable} falls inside the record from byte {start} "
                     f"to byte {end} of {path.name}, where its writer never publishes one: not this log's durable "
                     f"end (if the log replaced the one it was published for on purpose, remove this file; its "
                     f"writer publishes it again on open)")


def _messages(path: Path, records: Iterator[Tuple[int, memoryview]]) -> Iterator[Tuple[int, WindowMessage]]:
    """The decoded ``records`` of the log at ``path``."""
    for end, payload in records:
        try:
            message = WindowMessage.decode(bytes(payload))
        except (ValueError, TypeError, struct.error) as exc:
            raise DataError(str(path), f"the record ending at byte {end} passes its CRC but is malformed "
                                       f"({exc}): written by another program or version?") from None
        yield end, message


def read_messages(path: Union[str, Path], offset: int = 0, stop: Optional[int] = None,
                  view_may_lag: bool = False) -> Iterator[Tuple[int, WindowMessage]]:
    """Yield ``(end offset, message)`` for every complete record from byte ``offset`` (up to
    byte ``stop``, a record boundary, and the durable end the writer published).

    Stops at the durable end (and quietly at an incomplete last record of a log no writer
    published one for), so a consumer can call again later from the last offset it got
    (tailing the log). A damaged record before the durable end is refused, and so is a log
    that ends before it, once the records before that end are yielded; ``view_may_lag``: this
    reader's view of the log may lag its view of ``<log>.durable`` (another machine of a shared
    file system), so a log that ends early is not refused but read to the end it shows
    (:func:`_records`).
    """
    path = Path(path)
    durable = _published_end(path)  # before the log is opened: see _records
    yield from _messages(path, _records(path, offset, _lowered(stop, durable), durable, view_may_lag))


def complete_end(path: Union[str, Path], offset: int = 0, view_may_lag: bool = False) -> int:
    """The offset after the last complete durable record (frames and CRCs checked, nothing decoded;
    a damaged record before the durable end, or a log that ends before it, refused, as by
    :func:`read_messages`)."""
    path, end = Path(path), offset
    durable = _published_end(path)  # before the log is opened: see _records
    for end, _ in _records(path, offset, _lowered(None, durable), durable, view_may_lag):
        pass
    return end


def _lowered(stop: Optional[int], durable: Optional[int]) -> Optional[int]:
    """``stop`` lowered to the published durable end (``stop`` itself where none is published)."""
    return stop if durable is None else durable if stop is None else min(stop, durable)


def check_fingerprint(message: WindowMessage, expected: str, source: Union[str, Path],
                      expected_of: str = "the table") -> None:
    """Refuse vectors from another encoder than ``expected_of``'s (they live in another space)."""
    if message.fingerprint != expected:
        raise ManifestMismatch(f"{source}: window message of items {message.item_ids[:3].tolist()}... "
                               f"was embedded by encoder {message.fingerprint!r}, {expected_of} by "
                               f"{expected!r}; vectors from two encoders cannot share a table")


def check_served_table(message: WindowMessage, tables: Sequence[str], source: Union[str, Path], end: int,
                       table_dir: Union[str, Path],
                       remedy: str = "fold or apply a log only into the table it was served against, or a fold "
                                     "of that table from this log") -> None:
    """Refuse a record served against another table than ``table_dir``: ``tables`` are the
    identities a record may name to go into it, its own first (:func:`embeddings.rim_fold.served_tables`).
    The service checked the record's ids against its table only: in another table (another
    catalogue, or one that gained rows the service never saw) the same id may name another item
    or a row already taken. A record served against no table (the service was told none, and
    warned) was checked against none, and goes into any table whose checks it passes.
    ``remedy`` ends the error: what the caller (a fold, a live apply, a service restarting on
    the log) can do instead."""
    served = message.table
    if served is not None and served.fingerprint not in tables:
        folds = " or a table it was folded from with this log" if len(tables) > 1 else ""
        raise ManifestMismatch(f"{source}: the record ending at byte {end} was served against the table "
                               f"{served.path} (manifest {served.fingerprint}), not {table_dir} (manifest "
                               f"{tables[0]}){folds}; {remedy}")


def check_message(message: WindowMessage, fingerprint: str, dim: int, source: Union[str, Path], end: int,
                  expected_of: str = "the table") -> None:
    """Refuse a record whose rows no table or model may take: vectors from another encoder
    than ``expected_of``'s, of another width, or not finite, or a negative item id. Every consumer (the writer
    reopening its log, the fold, the live apply) checks each record with this before using it;
    the CRC only proves the bytes are the ones written, not that the writer wrote good rows."""
    check_fingerprint(message, fingerprint, source, expected_of)
    if message.dim != dim:
        raise ManifestMismatch(f"{source}: the record ending at byte {end} holds vectors of dim {message.dim}, "
                               f"{expected_of} has dim {dim}")
    negative = message.item_ids[message.item_ids < 0]
    if len(negative):  # dense ids start at 0: every later fold and apply would refuse the log
        raise DataError(str(source), f"the record ending at byte {end} holds a negative item id "
                        f"({negative[0]})", field="item_id")
    broken = ~np.isfinite(message.vectors).all(axis=1)
    if broken.any():
        raise DataError(str(source), f"the record ending at byte {end} holds a NaN or infinite vector "
                        f"(item {message.item_ids[broken][0]})", field="vector")


def check_new_ids(ids: np.ndarray, known_ids: Sequence[np.ndarray], num_items: int, source: Union[str, Path],
                  known_as: str, range_hint: str = "") -> None:
    """Refuse log rows that would not each fill one empty row of an id space of ``num_items``:
    an id outside it (``range_hint`` says what to do), an id twice, or an id in one of the
    sorted arrays ``known_ids`` (``known_as`` names where those rows already are). A table row
    is never replaced from a log. Looked up by binary search, so a record costs O(n log N)
    against a table of N ids, not a sort of the table."""
    check_id_space(ids, num_items, source, range_hint)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(str(source), f"item {unique[counts > 1][0]} appears twice in the log",
                        field="item_id")
    known = ids[np.any([holds(sorted_ids, ids) for sorted_ids in known_ids], axis=0)] if len(ids) else ids
    if len(known):
        raise DataError(str(source), f"item {known[0]} is already in {known_as}; a table row is never "
                        "replaced from a log", field="item_id")


# How a fold (or a service restarting on its log) refused for an id outside its id space can go on.
NUM_ITEMS_HINT = "; pass num_items=<catalogue size>"


def check_id_space(ids: np.ndarray, num_items: int, source: Union[str, Path], range_hint: str = "") -> None:
    """Refuse log rows with an id outside an id space of ``num_items`` (``range_hint`` says
    what to do): the fold's refusal, which the service restarting on its log gives too."""
    outside = ids[(ids < 0) | (ids >= num_items)]
    if len(outside):
        raise DataError(str(source), f"{counted(len(outside), 'item')} outside the id range [0, {num_items}) "
                        f"(first: {outside[0]}){range_hint}", field="item_id")


def holds(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of ``ids`` the sorted array holds (by binary search: no sort of the array)."""
    if not len(sorted_ids):
        return np.zeros(len(ids), bool)
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[at] == ids


class RimLog:
    """The single writer of a window-message log (an exclusive lock refuses a second one).

    Opening recovers the file: a torn tail past the published durable end is truncated
    (``recovered_bytes`` says how much), damage before it is refused, as is a damaged first
    record with no durable end published (another program's file), and every record already
    there must come from ``fingerprint`` with vectors of ``dim``.
    """

    def __init__(self, path: Union[str, Path], fingerprint: str, dim: int) -> None:
        self.path, self.fingerprint, self.dim = Path(path), fingerprint, dim
        if self.path.is_dir():
            raise DataError(str(self.path), "a folder, not a log file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise DataError(str(self.path), "another process is writing this log") from None
        if created:
            _fsync_dir(self.path.parent)
        self.item_ids: Set[int] = set()
        self.records = self.end = 0
        self.failed = ""  # the error of a failed append; the writer refuses appends after one
        try:
            self.recovered_bytes = self._recover(created)
            self._publish_durable_end(sync=True)
        except BaseException:
            self.close()
            raise

    def _recover(self, created: bool) -> int:
        """Check every record, truncate a torn tail; returns the bytes truncated. Records past
        the published durable end are kept too: a crash may have come between a record's fsync
        and its publication. Damage before that end (acknowledged records) is refused, never
        truncated; a ``<log>.durable`` beside a log this writer created was a removed log's."""
        durable = None if created else _published_end(self.path, writer=True)
        records = _records(self.path, 0, None, durable, view_may_lag=False)
        for self.end, message in _messages(self.path, records):
            check_message(message, self.fingerprint, self.dim, self.path, self.end, "this writer's encoder")
            self.item_ids.update(self._new_ids(message, f"the record ending at byte {self.end}"))
            self.records += 1
        torn = os.fstat(self._fd).st_size - self.end
        if torn:
            os.ftruncate(self._fd, self.end)
        # Then published as durable: a record a killed writer wrote but never fsynced is only in
        # the page cache, and a power loss after publishing it would leave a log that ends, or
        # breaks, before its durable end, which the next open refuses.
        os.fsync(self._fd)
        return torn

    def append(self, message: WindowMessage) -> int:
        """Write one record and make it durable; returns the offset after it."""
        data = message.encode()
        check_message(message, self.fingerprint, self.dim, self.path, self.end + len(data), "this writer's encoder")
        ids = self._new_ids(message, f"the record that would end at byte {self.end + len(data)}")
        if self.failed:
            raise OSError(f"{self.path}: an earlier write to this log failed ({self.failed}); what reached "
                          "the disk is unknown, so this writer takes no more records: reopen the log "
                          "(restart the service), which checks every record and truncates a torn tail")
        try:
            written = os.pwrite(self._fd, data, self.end)
            if written != len(data):
                raise OSError(f"{self.path}: short write ({written} of {len(data)} bytes)")
            os.fsync(self._fd)
        except BaseException as exc:
            # The record is not durable: cut its bytes so no reader folds what the client was
            # told failed, and stop, since after a failed fsync the page cache is no proof.
            self.failed = repr(exc)
            os.ftruncate(self._fd, self.end)
            raise
        self.end += len(data)
        self.records += 1
        self.item_ids.update(ids)
        self._publish_durable_end()
        return self.end

    def _publish_durable_end(self, sync: bool = False) -> None:
        """Tell readers the log is durable up to ``end`` (:func:`read_messages` stops there).
        Renamed into place; after an append not fsynced: a crash may lose that value, which only
        holds readers back until the writer reopens the log and publishes again. On open
        (``sync``) it is fsynced with its folder, before any append: then a crash can never leave
        a torn first record without a ``<log>.durable``, which is how another program's file,
        refused as such, is told from a log (see the module's notes)."""
        published = durable_end_path(self.path)
        staged = published.with_name(f".{published.name}.tmp")
        with staged.open("w") as fh:
            fh.write(str(self.end))
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(staged, published)
        if sync:
            _fsync_dir(self.path.parent)

    def _new_ids(self, message: WindowMessage, record: str) -> Set[int]:
        """The message's ids, refused if one repeats within it or is already in this log."""
        ids = {int(i) for i in message.item_ids}
        if len(ids) < len(message.item_ids) or ids & self.item_ids:
            raise DataError(str(self.path), f"{record} repeats an item of this log; a writer never logs an "
                            "item twice", field="item_id")
        return ids

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "RimLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fsync_dir(folder: Path) -> None:
    """Make a new file's directory entry durable (else a crash can lose the whole file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

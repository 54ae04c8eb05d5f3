"""RIM window-message log: exact round trip, torn tails truncated on open (never half-read),
corruption before intact records refused, foreign encoders and second writers refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from embeddings.rim_log import MAGIC, RimLog, WindowMessage, complete_end, durable_end_path, read_messages
from mim_rec.data.errors import DataError, ManifestMismatch

DIM = 4


def message(ids, fingerprint="enc:a", dim=DIM) -> WindowMessage:
    ids = np.asarray(ids, dtype=np.int64)
    vectors = np.stack([np.arange(dim, dtype=np.float32) + 10 * i for i in ids]) if len(ids) else \
        np.zeros((0, dim), np.float32)
    return WindowMessage(ids, vectors, fingerprint, ids * 0.5 + 1000.0, 2000.0)


def published(path):
    """Every byte of the log published as durable, as a writer that wrote them would have:
    readers stop at the published end, so bytes a test adds past it are read only then."""
    durable_end_path(path).write_text(str(path.stat().st_size))


def write_log(path, windows):
    with RimLog(path, "enc:a", DIM) as log:
        ends = [log.append(message(ids)) for ids in windows]
    return ends


def test_records_round_trip_exactly_from_any_offset(tmp_path):
    path = tmp_path / "rim.log"
    ends = write_log(path, [[3, 1], [7], [9, 8, 5]])
    read = list(read_messages(path))
    assert [end for end, _ in read] == ends == sorted(ends)
    for (_, got), ids in zip(read, [[3, 1], [7], [9, 8, 5]]):
        want = message(ids)
        assert got.item_ids.tolist() == ids and got.fingerprint == "enc:a" and got.embedded_at == 2000.0
        assert np.array_equal(got.vectors, want.vectors) and np.array_equal(got.arrived_at, want.arrived_at)
    assert [m.item_ids.tolist() for _, m in read_messages(path, ends[0])] == [[7], [9, 8, 5]]
    assert list(read_messages(path, ends[0], stop=ends[1]))[0][0] == ends[1]
    assert complete_end(path) == ends[-1] == path.stat().st_size


def test_a_torn_last_record_is_never_read_and_is_truncated_on_open(tmp_path):
    path = tmp_path / "rim.log"
    ends = write_log(path, [[1], [2, 3], [4, 5, 6]])
    whole = path.read_bytes()
    for cut in range(ends[1] + 1, ends[2]):  # every prefix of the last record
        path.write_bytes(whole[:cut])
        durable_end_path(path).write_text(str(ends[1]))  # a crash while the last record was written
        assert [m.item_ids.tolist() for _, m in read_messages(path)] == [[1], [2, 3]]
        with RimLog(path, "enc:a", DIM) as log:
            assert (log.recovered_bytes, log.end, log.records) == (cut - ends[1], ends[1], 2)
            assert log.item_ids == {1, 2, 3}
        assert path.stat().st_size == ends[1]
    with RimLog(path, "enc:a", DIM) as log:  # appends continue after the cut, readable again
        assert log.recovered_bytes == 0
        log.append(message([4]))
    assert [m.item_ids.tolist() for _, m in read_messages(path)] == [[1], [2, 3], [4]]


@pytest.mark.parametrize("tail", [b"\0" * 37, b"RI", message([4]).encode()[:30],
                                  message([4]).encode()[:30] + b"\0" * 10])
def test_a_damaged_tail_is_torn_but_a_bad_record_before_good_ones_is_corruption(tmp_path, tail):
    path = tmp_path / "rim.log"
    ends = write_log(path, [[1], [2], [3]])
    with path.open("ab") as fh:
        fh.write(tail)
    with RimLog(path, "enc:a", DIM) as log:
        assert log.recovered_bytes == len(tail) and log.records == 3
    data = bytearray(path.read_bytes())
    data[ends[0] + 20] ^= 0xFF  # inside record 2's payload: its CRC fails, record 3 follows
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"damaged record at byte {ends[0]} with an intact one at byte {ends[1]}"):
        RimLog(path, "enc:a", DIM)
    with pytest.raises(DataError, match="corrupt, not torn"):
        list(read_messages(path))


@pytest.mark.parametrize("content, at", [
    (b"PAR1" + bytes(range(200)), 0),      # another file given as log=: never truncated
    (None, None),                          # text after the last record: not what a crash leaves
])
def test_bytes_no_writer_leaves_are_refused_and_never_truncated(tmp_path, content, at):
    path = tmp_path / "rim.log"
    if content is None:
        at = write_log(path, [[1], [2]])[-1]
        content = path.read_bytes() + b"garbage after the last record"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"bytes from byte {at} do not start a RIM record.*not a RIM"):
        RimLog(path, "enc:a", DIM)
    published(path)
    with pytest.raises(DataError, match=f"bytes from byte {at} do not start a RIM record"):
        list(read_messages(path))
    assert path.read_bytes() == content



@pytest.mark.parametrize("content", [
    bytes(4096),                                                   # a zero-filled file (a fresh image, a sparse file)
    MAGIC + (2 ** 31).to_bytes(4, "little") + bytes(range(200)),   # RIM1 and a length far past the file's end
    message([4]).encode()[:30],                                    # even a prefix of a record of ours
], ids=["zeros", "magic and a huge length", "a record's prefix"])
def test_a_file_without_a_durable_end_whose_first_record_is_damaged_is_refused_not_truncated(tmp_path, content):
    """Such a file looked like a torn tail and was truncated to nothing on open: another
    program's file, given as log=, silently destroyed. Without <log>.durable only a damaged
    record after an intact one can be taken for a torn write."""
    path = tmp_path / "rim.log"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"bytes from byte 0 do not start a whole RIM record .*no rim.log.durable "
                                        "beside it.*not a RIM window-message log"):
        RimLog(path, "enc:a", DIM)
    for read in (lambda: list(read_messages(path)), lambda: complete_end(path)):
        with pytest.raises(DataError, match="bytes from byte 0 do not start a whole RIM record"):
            read()
    assert path.read_bytes() == content and not durable_end_path(path).exists()
    ends = write_log(path.with_name("ours.log"), [[1], [2]])  # after an intact record: a torn tail
    durable_end_path(path.with_name("ours.log")).unlink()
    path.write_bytes(path.with_name("ours.log").read_bytes() + content)
    with RimLog(path, "enc:a", DIM) as log:
        assert (log.end, log.recovered_bytes) == (ends[-1], len(content))


def test_the_writer_makes_the_durable_end_it_publishes_on_open_durable_before_any_append(tmp_path, monkeypatch):
    """Else a crash in the first append could leave a torn first record and no <log>.durable,
    which the next open refuses as another program's file."""
    path, events = tmp_path / "rim.log", fsyncs_and_publications(monkeypatch)
    with RimLog(path, "enc:a", DIM) as log:
        assert events == [f"fsync {tmp_path.name}", "fsync rim.log", "fsync .rim.log.durable.tmp", "publish",
                          f"fsync {tmp_path.name}"]
        events.clear()
        log.append(message([1]))
    assert events == ["fsync rim.log", "publish"]  # an append's publication stays cheap



def damaged(data: bytes, start: int, how: str) -> bytes:
    """``data`` with the record at byte ``start`` (its last) damaged ``how``."""
    body = bytearray(data)
    if how == "crc":
        body[start + 20] ^= 0xFF
    elif how == "zeros":
        body[start:] = bytes(len(body) - start)
    elif how == "length":  # a frame that now declares more bytes than the file holds
        body[start + 4:start + 8] = (2 ** 31).to_bytes(4, "little")
    elif how == "cut":
        del body[-5:]
    elif how == "missing":
        del body[start:]
    return bytes(body)


@pytest.mark.parametrize("how", ["crc", "zeros", "length", "cut", "missing"])
def test_damage_before_the_durable_end_is_refused_not_truncated(tmp_path, how):
    """Such a last record looked like a torn tail and was truncated on open: an acknowledged
    record, fsynced and published, silently dropped. Only a record past the published end can
    be torn by a crash."""
    path = tmp_path / "rim.log"
    ends = write_log(path, [[1], [2], [3]])
    content = damaged(path.read_bytes(), ends[1], how)
    path.write_bytes(content)
    refusal = (f"the log ends at byte {ends[1]}, before the durable end {ends[2]}" if how == "missing" else
               f"damaged record at byte {ends[1]}, before the durable end {ends[2]} its writer published")
    with pytest.raises(DataError, match=refusal):
        RimLog(path, "enc:a", DIM)
    assert path.read_bytes() == content and durable_end_path(path).read_text() == str(ends[2])
    for read in (lambda: list(read_messages(path)), lambda: complete_end(path, ends[0])):
        with pytest.raises(DataError, match=refusal):  # readers refused too, where they used to stop quietly
            read()
    if how in ("cut", "missing"):  # but a view that may lag the writer's may end early: it stops there
        assert [m.item_ids.tolist() for _, m in read_messages(path, view_may_lag=True)] == [[1], [2]]
        assert complete_end(path, view_may_lag=True) == ends[1]
    durable_end_path(path).write_text(str(ends[1]))  # the same damage past the durable end is a torn tail
    with RimLog(path, "enc:a", DIM) as log:
        assert (log.end, log.recovered_bytes) == (ends[1], len(content) - ends[1])
    assert durable_end_path(path).read_text() == str(ends[1]) == str(path.stat().st_size)


@pytest.mark.parametrize("record, into", [(0, 3), (1, 20), (2, 50)],
                         ids=["the first frame", "a record's payload", "the last record"])
def test_a_durable_end_inside_an_intact_record_is_blamed_on_the_durable_file(tmp_path, record, into):
    """Readers reported "damaged record at byte ..." for a sound record that a <log>.durable
    (edited, or published for another log) ends inside, sending the operator to restore a sound
    log from a copy; the writer took that durable end and published over it without a word."""
    path = tmp_path / "rim.log"
    ends = write_log(path, [[1], [2], [3]])
    start = [0, *ends][record]
    durable = start + into
    durable_end_path(path).write_text(str(durable))
    content = path.read_bytes()
    refusal = f"durable end {durable} falls inside the record from byte {start} to byte {ends[record]} of rim.log"
    for read in (lambda: list(read_messages(path)), lambda: list(read_messages(path, start)),
                 lambda: complete_end(path), lambda: RimLog(path, "enc:a", DIM)):
        with pytest.raises(DataError, match=refusal) as caught:
            read()
        assert caught.value.file == str(durable_end_path(path))
    assert path.read_bytes() == content and durable_end_path(path).read_text() == str(durable)


def test_a_negative_durable_end_is_not_a_byte_offset(tmp_path):
    """Readers took it as the end of the log: nothing read, complete_end 0, no error."""
    path = tmp_path / "rim.log"
    write_log(path, [[1]])
    durable_end_path(path).write_text("-7")
    for read in (lambda: list(read_messages(path)), lambda: complete_end(path)):
        with pytest.raises(DataError, match="rim.log.durable: not a byte offset"):
            read()


def test_readers_refuse_a_log_cut_at_a_record_boundary_before_its_durable_end(tmp_path, monkeypatch):
    """Readers stopped there quietly, as at the end of a lagging view, and a tailing consumer
    waited for good on records that are gone. They read <log>.durable before opening the log,
    and the writer publishes an end only once the log holds it and never cuts the log below
    one, so a log shorter than the durable end they read was cut, even while the writer appends."""
    import embeddings.rim_log as rim_log

    path = tmp_path / "rim.log"
    ends = write_log(path, [[1], [2], [3]])
    whole = path.read_bytes()
    path.write_bytes(whole[:ends[0]])
    refusal = f"rim.log: the log ends at byte {ends[0]}, before the durable end {ends[2]} its writer published"
    for read in (lambda: list(read_messages(path)), lambda: list(read_messages(path, ends[0])),
                 lambda: list(read_messages(path, 0, ends[0])), lambda: complete_end(path),
                 lambda: list(read_messages(path, ends[1]))):  # a consumer past the cut is told too
        with pytest.raises(DataError, match=refusal):
            read()
    with pytest.raises(DataError, match=refusal):
        RimLog(path, "enc:a", DIM)
    assert path.read_bytes() == whole[:ends[0]]

    def failing_fsync(fd):
        raise OSError(5, "EIO (simulated)")

    path.write_bytes(whole)  # the writer's own cut, of an append whose fsync failed, keeps its durable end
    with RimLog(path, "enc:a", DIM) as log:
        monkeypatch.setattr(rim_log.os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="EIO"):
            log.append(message([4]))
        monkeypatch.undo()
        assert [m.item_ids.tolist() for _, m in read_messages(path)] == [[1], [2], [3]]
        assert complete_end(path) == ends[2] == path.stat().st_size


def test_a_writer_that_creates_its_log_ignores_a_removed_logs_durable_end(tmp_path):
    path = tmp_path / "rim.log"
    write_log(path, [[1], [2]])
    path.unlink()  # rotated away; its <log>.durable stays
    assert write_log(path, [[7]]) == [complete_end(path)]
    assert [m.item_ids.tolist() for _, m in read_messages(path)] == [[7]]


def test_a_durable_end_a_crash_emptied_is_refused_by_readers_and_republished_by_the_writer(tmp_path):
    path = tmp_path / "rim.log"
    end = write_log(path, [[1]])[-1]
    durable_end_path(path).write_text("")  # renamed into place, its bytes never written
    with pytest.raises(DataError, match="rim.log.durable: not a byte offset"):
        complete_end(path)
    with RimLog(path, "enc:a", DIM) as log:
        assert (log.end, log.recovered_bytes) == (end, 0)
    assert complete_end(path) == end


def test_recovery_makes_the_records_it_keeps_durable_before_publishing_them(tmp_path, monkeypatch):
    """A record a killed writer had written but not fsynced sits in the page cache: the reopen
    published it as durable without an fsync, so a power loss then left a log that ends before
    its published durable end (refused on open) and readers had taken a record that is gone."""
    path = tmp_path / "rim.log"
    first = write_log(path, [[1]])[-1]
    with path.open("ab") as fh:  # the writer was killed after its pwrite, before its fsync
        fh.write(message([2]).encode())
    events = fsyncs_and_publications(monkeypatch)
    with RimLog(path, "enc:a", DIM) as log:
        assert (log.recovered_bytes, log.records) == (0, 2) and log.end > first
    assert events.index("fsync rim.log") < events.index("publish")


def fsyncs_and_publications(monkeypatch) -> list:
    """The list the log module's fsyncs (``fsync <name of the file or folder>``) and
    ``<log>.durable`` publications (``publish``) are recorded in, in order."""
    import embeddings.rim_log as rim_log

    events = []
    monkeypatch.setattr(rim_log.os, "fsync",
                        lambda fd: events.append(f"fsync {Path(os.readlink(f'/proc/self/fd/{fd}')).name}"))
    replace = rim_log.os.replace
    monkeypatch.setattr(rim_log.os, "replace", lambda *a: (events.append("publish"), replace(*a)))
    return events


def test_errors_of_a_read_from_mid_file_name_the_files_byte_offsets(tmp_path):
    """A read from a non-zero offset named bytes counted from that offset: the damaged third
    record read from the second was "at byte 121", and from the third "at byte 0"."""
    path = tmp_path / "rim.log"
    ends = write_log(path, [[1], [2], [3], [4]])
    data = bytearray(path.read_bytes())
    data[ends[1] + 20] ^= 0xFF  # inside record 3's payload; record 4 is intact
    path.write_bytes(bytes(data) + b"garbage after the last record")
    published(path)
    for start in (0, ends[0], ends[1]):
        with pytest.raises(DataError, match=f"damaged record at byte {ends[1]} with an intact one at byte {ends[2]}"):
            list(read_messages(path, start))
    with pytest.raises(DataError, match=f"bytes from byte {ends[3]} do not start a RIM record"):
        list(read_messages(path, ends[2]))

def test_a_reopened_log_refuses_rows_no_consumer_may_take(tmp_path):
    """The writer's own checks, met again on open: a non-finite vector, a negative id, an item
    logged twice."""
    path = tmp_path / "rim.log"
    with RimLog(path, "enc:a", DIM) as log:
        bad = message([1])
        bad.vectors[0, 2] = np.nan
        with pytest.raises(DataError, match="NaN or infinite vector \\(item 1\\)"):
            log.append(bad)
        assert log.end == 0
        with pytest.raises(DataError, match="negative item id \\(-5\\)"):
            log.append(message([-5]))  # every later fold and apply would refuse the log for good
        assert log.end == 0
        log.append(message([1]))
        with pytest.raises(DataError, match="would end at byte .* repeats an item of this log"):
            log.append(message([1]))  # a log its own writer could not reopen
    with open(path, "ab") as raw:
        raw.write(message([1]).encode())
    with pytest.raises(DataError, match="repeats an item of this log"):
        RimLog(path, "enc:a", DIM)


def test_another_encoder_is_refused(tmp_path):
    path = tmp_path / "rim.log"
    write_log(path, [[1]])
    with pytest.raises(ManifestMismatch, match="embedded by encoder 'enc:a', this writer's encoder by 'enc:b'"):
        RimLog(path, "enc:b", DIM)
    with RimLog(path, "enc:a", DIM) as log, pytest.raises(ManifestMismatch, match="enc:b"):
        log.append(message([2], fingerprint="enc:b"))


def test_one_writer_at_a_time(tmp_path):
    with RimLog(tmp_path / "rim.log", "enc:a", DIM):
        with pytest.raises(DataError, match="another process is writing"):
            RimLog(tmp_path / "rim.log", "enc:a", DIM)


def framed(header: dict, floats: int) -> bytes:
    """A record with a valid frame and CRC around whatever header and vector bytes it is given:
    what a buggy writer would leave, which the CRC cannot catch."""
    import json
    import zlib

    from embeddings.rim_log import _FRAME, _HEADER_LEN, MAGIC

    raw = json.dumps(header).encode()
    payload = _HEADER_LEN.pack(len(raw)) + raw + np.zeros(floats, "<f4").tobytes()
    return _FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


GOOD_HEADER = {"fingerprint": "enc:a", "dim": DIM, "embedded_at": 1.0, "item_ids": [5], "arrived_at": [0.5],
               "table": None}


@pytest.mark.parametrize("header, floats, reason", [
    ({**GOOD_HEADER, "dim": 2 * DIM}, DIM, f"{DIM} floats for 1 items of dim {2 * DIM}"),
    ({k: v for k, v in GOOD_HEADER.items() if k != "embedded_at"}, DIM, "KeyError"),
    ({**GOOD_HEADER, "arrived_at": [0.5, 0.6]}, DIM, "2 arrival times"),
    ({**GOOD_HEADER, "arrived_at": ["soon"]}, DIM, "malformed"),
    ({**GOOD_HEADER, "item_ids": [5.7]}, DIM, "item_ids are not all integers"),  # was folded as item 5
    ({**GOOD_HEADER, "item_ids": [2 ** 63]}, DIM, "item_ids do not all fit int64"),  # was an OverflowError
    ({**GOOD_HEADER, "dim": 0}, 0, "dim 0 is not a positive integer"),
    # which table the ids were checked against is unknown: folded into any table, they might name other items
    ({k: v for k, v in GOOD_HEADER.items() if k != "table"}, DIM, "its header names no table"),
    ({**GOOD_HEADER, "table": "runs/mm_table"}, DIM, "neither null nor a {path, fingerprint}"),
])
def test_a_record_with_a_valid_crc_but_a_malformed_body_is_refused_naming_file_and_byte(tmp_path, header,
                                                                                          floats, reason):
    path = tmp_path / "rim.log"
    end = write_log(path, [[1, 2]])[-1]
    record = framed(header, floats)
    with open(path, "ab") as log:
        log.write(record)
    published(path)
    with pytest.raises(DataError, match=f"the record ending at byte {end + len(record)} .*malformed") as caught:
        list(read_messages(path))
    assert str(path) in str(caught.value) and reason in str(caught.value)


def test_a_header_that_is_not_json_is_refused(tmp_path):
    import zlib

    from embeddings.rim_log import _FRAME, _HEADER_LEN, MAGIC

    path = tmp_path / "rim.log"
    payload = _HEADER_LEN.pack(5) + b"{oops"
    path.write_bytes(_FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload)
    with pytest.raises(DataError, match="header is not a window header"):
        list(read_messages(path))


def test_a_failed_fsync_leaves_no_bytes_and_stops_the_writer(tmp_path, monkeypatch):
    """The record's bytes used to stay after a failed fsync while the end did not move: a
    shorter next record left the tail of the failed one after it, and every reader and the
    restarted writer refused the log from there on."""
    import embeddings.rim_log as rim_log

    path = tmp_path / "rim.log"
    log = RimLog(path, "enc:a", DIM)
    first = log.append(message([1]))

    def failing_fsync(fd):
        raise OSError(5, "EIO (simulated)")

    monkeypatch.setattr(rim_log.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="EIO"):
        log.append(message([2, 3, 4, 5]))
    monkeypatch.undo()
    assert path.stat().st_size == first == log.end
    with pytest.raises(OSError, match="an earlier write to this log failed"):
        log.append(message([6]))  # what reached the disk is unknown: only a reopen decides
    log.close()
    with RimLog(path, "enc:a", DIM) as reopened:
        reopened.append(message([2]))
    assert [m.item_ids.tolist() for _, m in read_messages(path)] == [[1], [2]]


def test_readers_take_only_records_the_writer_made_durable(tmp_path, monkeypatch):
    """Readers took a whole, CRC-good record the writer had written but not yet fsynced: when
    the fsync failed the writer cut it and answered 500, but a fold or live apply running
    meanwhile had already taken its items."""
    import embeddings.rim_log as rim_log

    path = tmp_path / "rim.log"
    log = RimLog(path, "enc:a", DIM)
    first = log.append(message([1]))
    seen = []

    def failing_fsync(fd):  # a reader runs while the record is written, not yet durable
        seen.append((path.stat().st_size > first, [m.item_ids.tolist() for _, m in read_messages(path)],
                     complete_end(path)))
        raise OSError(5, "EIO (simulated)")

    monkeypatch.setattr(rim_log.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="EIO"):
        log.append(message([2]))
    monkeypatch.undo()
    log.close()
    assert seen == [(True, [[1]], first)]
    with RimLog(path, "enc:a", DIM) as reopened:  # what a reopen keeps is durable: readers take it all
        second = reopened.append(message([2]))
    assert [m.item_ids.tolist() for _, m in read_messages(path)] == [[1], [2]] and complete_end(path) == second

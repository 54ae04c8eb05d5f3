"""RIM end to end with a CTR model: a new item scores with the zero default vector (counted)
before the live update and with its real MM vector after it; the fold writes the same rows as
the next table version; foreign encoders, out-of-range and duplicate ids are refused."""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from embeddings.build import build_table
from embeddings.rim import RimConfig, RimService
from embeddings.rim_fold import fold_log
from embeddings.rim_live import LiveMMTable
from embeddings.rim_log import RimLog, ServedTable, WindowMessage, read_messages
from embeddings.table import read_mm_rows, read_mm_table, table_identity
from mim_rec.ciubm import mm_shards
from mim_rec.data.errors import DataError, ManifestMismatch
from mim_rec.data.io import read_items, write_table
from mim_rec.data.loader import CtrEventsLoader, ItemInfo
from mim_rec.data.manifest import read_manifest, write_manifest
from mim_rec.data.schemas import ITEMS
from mim_rec.data.synth import SynthConfig, generate_world, tiny
from mim_rec.utils.dist import ensure_process_group
from train import ciubm, cli

DIM = 8


class IdEncoder:
    """Item i -> a fixed vector derived from i, whatever its image and title."""

    dim, fingerprint = DIM, "ids:v1"

    def embed_items(self, items: pa.Table, source) -> torch.Tensor:
        ids = torch.from_numpy(items["item_id"].to_numpy().copy()).float()
        return torch.stack([torch.cos(ids * (k + 1) / 7) for k in range(DIM)], dim=1)


def vectors_of(ids) -> torch.Tensor:
    return IdEncoder().embed_items(pa.table({"item_id": np.asarray(ids, np.int64)}), None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rim_world")
    yield generate_world(replace(tiny(SynthConfig(seed=4)), items=200, users=60, events=1500), folder)
    if dist.is_initialized():
        dist.destroy_process_group()
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)


@pytest.fixture(scope="module")
def catalogue(world):
    """``(all items, cut)``: items ``cut..`` are the new ones, absent from the base table."""
    items = read_items(world / "items.parquet")
    return items, items.num_rows * 3 // 4


@pytest.fixture(scope="module")
def base_table(world, catalogue, tmp_path_factory):
    items, cut = catalogue
    folder = tmp_path_factory.mktemp("rim_base")
    write_table(items.slice(0, cut), folder / "items_old.parquet", ITEMS)
    return build_table(IdEncoder(), folder / "items_old.parquet", folder / "table", shard_rows=64)


@pytest.fixture(scope="module")
def log(catalogue, base_table, tmp_path_factory):
    """The new items, sent through the RIM service (in process) into its log."""
    items, cut = catalogue
    path = tmp_path_factory.mktemp("rim_log") / "rim.log"
    service = RimService(RimConfig(log=str(path), table=str(base_table), num_items=items.num_rows,
                                   window_ms=1), IdEncoder())
    new = items.slice(cut).to_pylist()
    for start in range(0, len(new), 16):
        body = {"items": [{"item_id": row["item_id"], "title": row["title"], "category_id": row["category_id"],
                           "image": base64.b64encode(row["image"]).decode()} for row in new[start:start + 16]]}
        service.submit(json.dumps(body).encode())
    service.close()
    return path


def _model(world, base_table, tmp_path, *overrides: str):
    config = ciubm.load_train_config(None, [
        f"data.world={world}", f"mm_table={base_table}", "mm_missing=default", f"out={tmp_path}",
        "loader.batch_size=128", "loader.max_hist_len=10", "model.over_arch=[16]", "model.ubm=avg", *overrides])
    ctx = ensure_process_group("cpu")
    items = ItemInfo.from_items(world / "items.parquet")
    model, _, _ = ciubm.build_sharded_model(config, ciubm.table_sizes(config.data.world, items), ctx)
    rows_of, source = ciubm.mm_rows(config, items.count, DIM)
    mm_shards.load_mm_table(model, rows_of, items.count)
    return model.eval(), items, config, source


def _mm_rows(model, ids) -> torch.Tensor:
    (row_offset, _, tensor), = mm_shards.local_mm_shards(model)  # one rank: the whole table
    return tensor[torch.as_tensor(ids) - row_offset].clone()


def test_a_new_item_scores_with_the_default_before_and_its_vector_after_the_live_update(
        world, catalogue, base_table, log, tmp_path):
    items, cut = catalogue
    model, info, config, source = _model(world, base_table, tmp_path)
    new_ids = np.arange(cut, items.num_rows)
    assert f"{len(new_ids)} of {items.num_rows} items missing: zero vectors" in source
    assert torch.equal(_mm_rows(model, new_ids), torch.zeros(len(new_ids), DIM))
    assert torch.equal(_mm_rows(model, np.arange(cut)), vectors_of(np.arange(cut)))

    batch = next(iter(CtrEventsLoader(world / "events_test.parquet", info, replace(config.loader, shuffle=False))))
    events = pq.read_table(world / "events_test.parquet").slice(0, 128).to_pylist()
    touches_new = torch.tensor([e["target_item_id"] >= cut or any(i >= cut for i in e["hist_item_ids"][-10:])
                                for e in events])
    new_target = torch.tensor([e["target_item_id"] >= cut for e in events])
    assert new_target.any() and (~touches_new).any()
    with torch.no_grad():
        before = model(batch)[0]

    live = LiveMMTable(log, base_table, items.num_rows)
    assert live.apply(model) == len(new_ids) and live.apply(model) == 0  # nothing twice
    assert torch.equal(_mm_rows(model, new_ids), vectors_of(new_ids))
    with torch.no_grad():
        after = model(batch)[0]
    assert torch.equal(after[~touches_new], before[~touches_new])  # old items: untouched
    assert (after[new_target] != before[new_target]).all()         # new targets: rescored

    # The fold writes the same rows: the model refilled from the next table version scores alike.
    folded = fold_log(base_table, log, tmp_path / "next", num_items=items.num_rows)
    mm_shards.fill_mm_table(model, lambda start, stop: read_mm_rows(folded, start, stop, DIM))
    with torch.no_grad():
        assert torch.equal(model(batch)[0], after)


def test_fold_writes_the_next_table_version(catalogue, base_table, log, tmp_path):
    items, cut = catalogue
    out = fold_log(base_table, log, tmp_path / "v2", num_items=items.num_rows)
    assert torch.equal(read_mm_table(out, items.num_rows, DIM), vectors_of(np.arange(items.num_rows)))
    manifest = read_manifest(out)
    assert manifest.row_count == items.num_rows and manifest.extra["id_range"] == [0, items.num_rows]
    assert manifest.extra["rim"]["offset"] == log.stat().st_size
    assert manifest.extra["rim"]["items"] == items.num_rows - cut
    assert manifest.extra["base_table"] == str(base_table.resolve())
    again = fold_log(out, log, tmp_path / "v3")  # the same log again: nothing new to fold
    assert read_manifest(again).extra["rim"]["items"] == 0 and read_manifest(again).row_count == items.num_rows
    assert LiveMMTable(log, out, items.num_rows).offset == log.stat().st_size
    with pytest.raises(ManifestMismatch, match="v2: not empty"):
        fold_log(base_table, log, out, num_items=items.num_rows)


def test_int8_tables_fold_and_folded_tables_quantise(catalogue, base_table, tmp_path):
    """A fold into an int8 base wrote an fp32 part under an int8 manifest, which validation then
    refused; quantising a folded table failed on its RIM part's scattered ids, half-written."""
    from embeddings.compact import quantise_table
    from mim_rec.data.io import validate_mm_table

    items, cut = catalogue
    log = _log_of(tmp_path / "rim.log", [cut, cut + 5])

    folded_int8 = fold_log(quantise_table(base_table, tmp_path / "base_int8"), log, tmp_path / "v2_int8",
                           num_items=items.num_rows)
    quantised_fold = quantise_table(fold_log(base_table, log, tmp_path / "v2", num_items=items.num_rows),
                                    tmp_path / "v2_q")
    for table in (folded_int8, quantised_fold):
        assert read_manifest(table).dtype == "int8"
        validate_mm_table(table, items.num_rows, echo=lambda line: None)
        ids = np.r_[np.arange(cut), cut, cut + 5]
        rows, want = read_mm_rows(table, 0, items.num_rows, DIM, missing="default")[ids], vectors_of(ids)
        half_step = (want.max(1).values - want.min(1).values) / 510  # row-wise int8's worst error
        assert ((rows - want).abs().max(1).values <= half_step + 1e-6).all()

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(ValueError, match="taken: not a new or empty folder"):
        quantise_table(base_table, tmp_path / "taken")
    assert not list(tmp_path.glob(".*quantising"))


def test_fold_refuses_a_file_as_out_a_folder_inside_the_base_table_and_a_folder_as_log(catalogue, base_table, log,
                                                                                       tmp_path):
    """Each was a traceback (out a file), a misleading 'no such log file' (log a folder), or a new
    version that deleting the old one would break (out inside the base table)."""
    items, _ = catalogue
    (tmp_path / "afile").touch()
    with pytest.raises(ManifestMismatch, match="out=.*afile: a file, not a folder"):
        fold_log(base_table, log, tmp_path / "afile", num_items=items.num_rows)
    with pytest.raises(ManifestMismatch, match="lies inside the base table"):
        fold_log(base_table, log, base_table / "v2", num_items=items.num_rows)
    assert not (base_table / "v2").exists()
    with pytest.raises(DataError, match="a folder, not a RIM log file"):
        fold_log(base_table, tmp_path, tmp_path / "v2", num_items=items.num_rows)


def test_a_second_writer_into_the_same_out_is_refused_at_once_and_a_killed_one_blocks_no_later_run(
        catalogue, base_table, tmp_path):
    """Two folds (or a fold and a quantise) into one out= deleted each other's staging folders:
    each began by removing a leftover ``.OUT.folding``, then renamed whichever it found."""
    import re
    import subprocess
    import sys

    from embeddings.compact import quantise_table
    from mim_rec.config import ConfigError
    from mim_rec.utils.run import sole_writer

    items, cut = catalogue
    log, out = _log_of(tmp_path / "rim.log", [cut]), tmp_path / "v2"
    staging = tmp_path / ".v2.folding"
    with sole_writer(out):  # a fold half-way through writing its staging folder
        staging.mkdir()
        (staging / "part-00000.parquet").write_text("half")
        for write in (lambda: fold_log(base_table, log, out, num_items=items.num_rows),
                      lambda: quantise_table(base_table, out)):
            with pytest.raises(ConfigError, match=rf"out={re.escape(str(out))}: another run is writing this folder "
                                                  rf"\(pid {os.getpid()}\)"):
                write()
        assert (staging / "part-00000.parquet").read_text() == "half" and not out.exists()
    shutil.rmtree(staging)

    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; lock = open(sys.argv[1], 'a'); "
                               "fcntl.flock(lock, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(tmp_path / ".v2.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ConfigError, match="another run is writing this folder"):
            fold_log(base_table, log, out, num_items=items.num_rows)
    finally:
        holder.kill()
        holder.wait()
    assert fold_log(base_table, log, out, num_items=items.num_rows) == out  # the kill freed the lock
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rim.log", "rim.log.durable", "v2"]


def test_fold_says_how_many_bytes_of_an_incomplete_last_record_it_left(catalogue, base_table, tmp_path, capsys):
    """A torn or half-written last record was left out without a word."""
    items, cut = catalogue
    path = _log_of(tmp_path / "rim.log", [cut, cut + 1])
    whole = path.stat().st_size
    torn = WindowMessage(np.array([cut + 2]), vectors_of([cut + 2]).numpy(), IdEncoder.fingerprint,
                         np.zeros(1), 0.0).encode()[:-5]
    with path.open("ab") as log_file:
        log_file.write(torn)
    assert cli.main(["embeddings", "fold", f"table={base_table}", f"log={path}", f"out={tmp_path / 'v2'}",
                     f"num_items={items.num_rows}"]) == 0
    rim = read_manifest(tmp_path / "v2").extra["rim"]
    assert (rim["items"], rim["offset"], rim["unfolded_bytes"]) == (2, whole, len(torn))
    assert f"the {len(torn)} bytes after byte {whole} are not a complete record" in capsys.readouterr().err


def test_a_fold_of_a_log_with_nothing_new_writes_the_version_and_says_so(catalogue, base_table, tmp_path, capsys):
    """A log holding no record past the table's offset (an idle period) was folded into a version
    with no new items without a word. The version is written (a scheduled job folding each
    version into the next goes on), with a note and rim.items 0."""
    items, cut = catalogue
    path = _log_of(tmp_path / "rim.log", [cut])
    fold = ["embeddings", "fold", f"log={path}", f"num_items={items.num_rows}"]
    assert cli.main([*fold, f"table={base_table}", f"out={tmp_path / 'v2'}"]) == 0
    assert "nothing to fold" not in capsys.readouterr().err
    assert cli.main([*fold, f"table={tmp_path / 'v2'}", f"out={tmp_path / 'v3'}"]) == 0
    end = path.stat().st_size
    assert capsys.readouterr().err.strip() == (f"note: nothing to fold: {path} holds no complete record past byte "
                                               f"{end}; {tmp_path / 'v3'} holds the rows of {tmp_path / 'v2'} "
                                               "alone (rim.items 0 in its manifest)")
    rim = read_manifest(tmp_path / "v3").extra["rim"]
    assert (rim["items"], rim["from_offset"], rim["offset"]) == (0, end, end)
    assert read_manifest(tmp_path / "v3").row_count == read_manifest(tmp_path / "v2").row_count


def test_records_appended_while_a_fold_reads_are_not_reported_as_an_incomplete_record(catalogue, base_table,
                                                                                     tmp_path, monkeypatch, capsys):
    """Folding while the service runs is the normal use. The fold measured the log's size after
    reading it, so a record the service appended meanwhile was counted in ``unfolded_bytes`` and
    the command warned that those bytes were 'not a complete record (... torn by a crash)'."""
    import embeddings.rim_fold as rim_fold

    items, cut = catalogue
    path = _log_of(tmp_path / "rim.log", [cut])
    whole = path.stat().st_size
    reader = rim_fold.read_messages

    def read_then_service_appends(*args, **kwargs):
        yield from reader(*args, **kwargs)
        with RimLog(path, IdEncoder.fingerprint, DIM) as writer:
            writer.append(WindowMessage(np.array([cut + 1]), vectors_of([cut + 1]).numpy(), IdEncoder.fingerprint,
                                        np.zeros(1), 0.0))

    monkeypatch.setattr(rim_fold, "read_messages", read_then_service_appends)
    assert cli.main(["embeddings", "fold", f"table={base_table}", f"log={path}", f"out={tmp_path / 'v2'}",
                     f"num_items={items.num_rows}"]) == 0
    rim = read_manifest(tmp_path / "v2").extra["rim"]
    assert (rim["items"], rim["offset"], rim["unfolded_bytes"]) == (1, whole, 0)
    assert "not a complete record" not in capsys.readouterr().err


def test_fold_refuses_ids_outside_the_id_space_known_ids_and_other_encoders(catalogue, base_table, log, tmp_path):
    items, cut = catalogue
    with pytest.raises(DataError, match=rf"outside the id range \[0, {cut}\).*num_items="):
        fold_log(base_table, log, tmp_path / "a")  # the base table's own id range
    known = tmp_path / "known.log"
    with RimLog(known, IdEncoder.fingerprint, DIM) as writer:
        writer.append(WindowMessage(np.array([3]), vectors_of([3]).numpy(), IdEncoder.fingerprint,
                                    np.zeros(1), 0.0))
    with pytest.raises(DataError, match="item 3 is already in"):
        fold_log(base_table, known, tmp_path / "b", num_items=items.num_rows)
    foreign = tmp_path / "foreign.log"
    with RimLog(foreign, "other:v1", DIM) as writer:
        writer.append(WindowMessage(np.array([cut]), np.zeros((1, DIM), np.float32), "other:v1", np.zeros(1), 0.0))
    with pytest.raises(ManifestMismatch, match="other:v1"):
        fold_log(base_table, foreign, tmp_path / "c", num_items=items.num_rows)
    with pytest.raises(ManifestMismatch, match="other:v1"):
        RimService(RimConfig(log=str(foreign), table=str(base_table)), IdEncoder())


def _log_of(path, ids, vectors=None, table=None):
    """A log of one record per id (appended where ``path`` is a log already), served against
    ``table`` (a :class:`ServedTable`). Given ``vectors``, the records are written raw, as a
    buggy writer would leave them (RimLog itself refuses a non-finite row)."""
    messages = [WindowMessage(np.array([item]), vectors_of([item]).numpy() if vectors is None else vectors,
                              IdEncoder.fingerprint, np.zeros(1), 0.0, table) for item in ids]
    if vectors is not None:
        path.write_bytes(b"".join(message.encode() for message in messages))
        return path
    with RimLog(path, IdEncoder.fingerprint, DIM) as writer:
        for message in messages:
            writer.append(message)
    return path


def test_the_fold_and_the_live_apply_refuse_a_log_served_against_another_table(catalogue, base_table, log,
                                                                              tmp_path, monkeypatch):
    """A log named only its encoder: folded into another table that encoder built (a rebuild,
    another catalogue's), its rows landed among ids the service never checked them against."""
    import re

    items, _ = catalogue
    assert next(read_messages(log))[1].table == ServedTable(str(base_table.resolve()), table_identity(base_table))
    other = build_table(IdEncoder(), base_table.parent / "items_old.parquet", tmp_path / "other", shard_rows=64)
    refusal = (rf"rim.log: the record ending at byte \d+ was served against the table {re.escape(str(base_table))} "
               rf"\(manifest {table_identity(base_table)}\), not {re.escape(str(other))} \(manifest "
               rf"{table_identity(other)}\); fold or apply a log only into the table it was served against")
    with pytest.raises(ManifestMismatch, match=refusal):
        fold_log(other, log, tmp_path / "v2", num_items=items.num_rows)
    assert not (tmp_path / "v2").exists()
    rows = torch.zeros(items.num_rows, DIM)
    monkeypatch.setattr(mm_shards, "local_mm_shards", lambda model: [(0, 0, rows)])
    with pytest.raises(ManifestMismatch, match=refusal):
        LiveMMTable(log, other, items.num_rows).apply(None)
    assert not rows.any()


def test_a_fold_takes_records_served_against_its_base_from_the_log_it_was_folded_from_only(catalogue, base_table,
                                                                                           tmp_path, monkeypatch):
    """A service that goes on serving a log against the base after a fold checked each new id
    against the base and every earlier record of that log, which is what the fold holds; a
    service serving another log against the base never saw the fold's new rows."""
    items, cut = catalogue
    against_base = ServedTable(str(base_table), table_identity(base_table))
    path = _log_of(tmp_path / "rim.log", [cut], table=against_base)
    v2 = fold_log(base_table, path, tmp_path / "v2", num_items=items.num_rows)
    _log_of(path, [cut + 1], table=against_base)  # the service goes on
    v3 = fold_log(v2, path, tmp_path / "v3")
    assert read_manifest(v3).extra["rim"]["items"] == 1
    assert read_manifest(v3).extra["rim"]["tables"] == [table_identity(v2), table_identity(base_table)]
    _log_of(path, [cut + 2], table=against_base)
    assert fold_log(v3, path, tmp_path / "v4").exists()  # a chain of folds of one log
    rows = torch.zeros(items.num_rows, DIM)
    monkeypatch.setattr(mm_shards, "local_mm_shards", lambda model: [(0, 0, rows)])
    assert LiveMMTable(path, v2, items.num_rows).apply(None) == 2

    another = _log_of(tmp_path / "another.log", [cut + 3], table=against_base)
    with pytest.raises(ManifestMismatch, match=rf"another.log: .* not .*v2 \(manifest {table_identity(v2)}\); "):
        fold_log(v2, another, tmp_path / "v3_another")
    served_v2 = _log_of(tmp_path / "after_v2.log", [cut + 3], table=ServedTable(str(v2), table_identity(v2)))
    assert read_manifest(fold_log(v2, served_v2, tmp_path / "v3_after")).extra["rim"]["items"] == 1


def _restart(log, table=None, num_items: int = 0) -> None:
    """Start (and stop) the service on ``log`` with ``table=`` (None: none) and ``num_items``."""
    RimService(RimConfig(log=str(log), table=table and str(table), num_items=num_items), IdEncoder()).close()


def test_serve_restarted_on_a_log_refuses_a_table_that_would_not_take_its_records(catalogue, base_table, tmp_path):
    """Restarted on a log with another table= (or none), the service went on appending to a log
    that no single table takes whole; the fold and the live apply refused it only later."""
    import re

    items, cut = catalogue
    against_base = ServedTable(str(base_table.resolve()), table_identity(base_table))
    path = _log_of(tmp_path / "rim.log", [cut], table=against_base)
    size = path.stat().st_size
    other = build_table(IdEncoder(), base_table.parent / "items_old.parquet", tmp_path / "other", shard_rows=64)
    served = rf"rim.log: the record ending at byte {size} was served against the table {re.escape(str(base_table))} "
    with pytest.raises(ManifestMismatch, match=served + rf"\(manifest {table_identity(base_table)}\), not "
                       rf"table={re.escape(str(other))} \(manifest {table_identity(other)}\); restart on this log "
                       "with table= set to the table it was served against or a fold of that table from this log"):
        _restart(path, other)
    with pytest.raises(ManifestMismatch, match=served + r".*, and this service has no table=, so it would check "
                       "new ids against none; restart on this log with table="):
        _restart(path, None)
    assert path.stat().st_size == size and len(list(read_messages(path))) == 1

    _restart(path, base_table)  # its own table (and the refusals above closed the log: no lock is left)
    v2 = fold_log(base_table, path, tmp_path / "v2", num_items=items.num_rows)
    _log_of(path, [cut + 1], table=against_base)  # served on against the base after the fold
    _restart(path, v2)  # a fold of the base from this log takes both
    _log_of(path, [cut + 2], table=ServedTable(str(v2), table_identity(v2)))
    with pytest.raises(ManifestMismatch, match=r"served against the table .*v2 .* not table=.*table \(manifest"):
        _restart(path, base_table)  # the base lacks v2's rows, which the record's ids were checked against
    folded_elsewhere = fold_log(base_table, _log_of(tmp_path / "another.log", [cut + 3]), tmp_path / "v2_another",
                                num_items=items.num_rows)
    with pytest.raises(ManifestMismatch, match=r"not table=.*v2_another \(manifest"):
        _restart(path, folded_elsewhere)

    unnamed = _log_of(tmp_path / "unnamed.log", [cut + 4])  # served with no table=: checked now, as a fold checks it
    _restart(unnamed, base_table)
    _log_of(unnamed, [3])
    with pytest.raises(DataError, match=r"unnamed.log, field 'item_id': the record ending at byte \d+ was served "
                       rf"against no table and holds item 3, which table={re.escape(str(base_table))} holds"):
        _restart(unnamed, base_table)
    _restart(unnamed, None)  # served against none, as before

    path.unlink()  # rotated at the path v2 was folded from: a fold of v2 refuses it, and so does serve
    with pytest.raises(ManifestMismatch, match=r"rim.log: not the log .*v2 was folded from"):
        _restart(path, v2)
    assert not path.exists()


def test_serve_restarted_on_a_log_refuses_ids_outside_its_num_items_as_the_fold_does(base_table, catalogue,
                                                                                     tmp_path):
    """Restarted with a smaller num_items than an earlier start's, the service went on appending
    to a log whose records the fold (and the live apply) refused only later."""
    _, cut = catalogue
    path = _log_of(tmp_path / "rim.log", [cut, cut + 5, cut + 9],
                   table=ServedTable(str(base_table.resolve()), table_identity(base_table)))
    size = path.stat().st_size
    with pytest.raises(DataError) as folding:
        fold_log(base_table, path, tmp_path / "v2", num_items=cut + 5)
    with pytest.raises(DataError) as serving:
        _restart(path, base_table, num_items=cut + 5)
    assert str(serving.value) == str(folding.value) == (
        f"{path}, field 'item_id': 2 items outside the id range [0, {cut + 5}) (first: {cut + 5}); "
        "pass num_items=<catalogue size>")
    assert path.stat().st_size == size
    _restart(path, base_table, num_items=cut + 10)  # the refusal closed the log: no lock is left
    _restart(path, base_table)  # no num_items: any id, as before


def test_a_table_that_names_no_encoder_is_refused_by_the_fold_and_the_live_apply(catalogue, base_table, log,
                                                                                tmp_path):
    """The live apply (``mim train rim_log=...``) died on a bare ``KeyError: 'encoder_fingerprint'``
    after the model was built and filled; the fold already refused such a table in a sentence."""
    items, _ = catalogue
    unnamed = tmp_path / "unnamed"
    shutil.copytree(base_table, unnamed)
    manifest = read_manifest(unnamed)
    del manifest.extra["encoder_fingerprint"]
    write_manifest(unnamed, manifest)
    for consume in (lambda: fold_log(unnamed, log, tmp_path / "next", num_items=items.num_rows),
                    lambda: LiveMMTable(log, unnamed, items.num_rows)):
        with pytest.raises(ManifestMismatch, match="unnamed: its manifest names no encoder"):
            consume()


@pytest.mark.parametrize("rotated_to", ["shorter", "longer"])
def test_a_log_rotated_at_the_folded_path_is_refused_not_read_from_the_old_offset(
        catalogue, base_table, tmp_path, rotated_to):
    """Folding the new file from the old offset used to skip its first records for good."""
    items, cut = catalogue
    path = _log_of(tmp_path / "rim.log", [cut, cut + 1])
    folded = fold_log(base_table, path, tmp_path / "v2", num_items=items.num_rows)
    path.unlink()
    _log_of(path, [cut + 2] if rotated_to == "shorter" else [cut + 2, cut + 3, cut + 4])
    with pytest.raises(ManifestMismatch, match=r"rim.log: not the log .*v2 was folded from.*give a rotated log a new name"):
        fold_log(folded, path, tmp_path / "v3")
    with pytest.raises(ManifestMismatch, match="not the log"):
        LiveMMTable(path, folded, items.num_rows)
    assert not (tmp_path / "v3").exists()


@pytest.mark.parametrize("case", ["nan", "in_table", "twice", "wider"])
def test_the_live_apply_refuses_what_the_fold_refuses_before_writing_a_row(world, catalogue, base_table,
                                                                           tmp_path, case):
    """The live apply used to write these rows into the running model: a NaN vector, a new
    vector over an item the table holds, an item twice (the last won), a row of another width
    (cut or zero-padded to the table's)."""
    items, cut = catalogue
    path = tmp_path / "bad.log"
    good = WindowMessage(np.array([cut]), vectors_of([cut]).numpy(), IdEncoder.fingerprint, np.zeros(1), 0.0)
    bad_ids, bad_vectors = {"nan": ([cut + 1], np.full((1, DIM), np.nan, np.float32)),
                            "in_table": ([3], vectors_of([cut + 1]).numpy()),
                            "twice": ([cut], vectors_of([cut + 1]).numpy()),
                            "wider": ([cut + 1], np.ones((1, DIM + 2), np.float32))}[case]
    bad = WindowMessage(np.array(bad_ids), bad_vectors, IdEncoder.fingerprint, np.zeros(1), 0.0)
    path.write_bytes(good.encode() + bad.encode())
    reason = {"nan": "NaN or infinite vector", "in_table": "item 3 is already in .*table",
              "twice": f"item {cut} (is already in .* an earlier record|appears twice in the log)",
              "wider": f"dim {DIM + 2}, .* has dim {DIM}"}
    model, *_ = _model(world, base_table, tmp_path / "run")
    before = _mm_rows(model, np.arange(items.num_rows))
    with pytest.raises((DataError, ManifestMismatch), match=reason[case]):
        LiveMMTable(path, base_table, items.num_rows).apply(model)
    changed = torch.nonzero((_mm_rows(model, np.arange(items.num_rows)) != before).any(1)).flatten().tolist()
    assert changed == [cut]  # the good record before it, nothing of the bad one
    with pytest.raises((DataError, ManifestMismatch), match=reason[case]):
        fold_log(base_table, path, tmp_path / "next", num_items=items.num_rows)


def test_a_value_fp16_storage_cannot_hold_is_refused_by_the_fill_and_the_live_apply(world, catalogue, base_table,
                                                                                  tmp_path):
    """A finite value past fp16's range (65504) used to be stored as inf under
    ``model.mm_dtype=fp16``: every score looking that row up was NaN, and ``mim train`` stopped
    at its first step with a non-finite loss that suggested lowering the learning rate."""
    from mim_rec.config import ConfigError

    items, cut = catalogue
    model, *_ = _model(world, base_table, tmp_path / "run", "model.mm_dtype=fp16")
    before = _mm_rows(model, np.arange(items.num_rows))
    big = np.full((1, DIM), 1e5, np.float32)
    with pytest.raises(ConfigError, match=rf"item {cut}'s MM vector holds 100000, .*model.mm_dtype=fp32"):
        LiveMMTable(_log_of(tmp_path / "big.log", [cut], vectors=big), base_table, items.num_rows).apply(model)
    assert torch.equal(_mm_rows(model, np.arange(items.num_rows)), before)  # not a row written
    with pytest.raises(ConfigError, match=r"item 0's MM vector holds 100000, .*model.mm_dtype=fp32"):
        mm_shards.fill_mm_table(model, lambda start, stop: torch.full((stop - start, DIM), 1e5))


def test_only_a_storage_narrower_than_the_vectors_is_checked_for_overflow():
    """fp32 storage of float32 rows is not scanned (it holds them all), a narrower one still is."""
    from mim_rec.config import ConfigError

    ids = torch.arange(2)
    mm_shards.check_storable(torch.full((2, DIM), torch.finfo(torch.float32).max), ids, torch.float32)
    wide = torch.tensor([[1.0] * DIM, [1e39] * DIM], dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"item 1's MM vector holds 1e\+39, beyond the 3.40282e\+38 that "
                                          r"torch.float32"):
        mm_shards.check_storable(wide, ids, torch.float32)
    with pytest.raises(ConfigError, match=r"item 1's MM vector holds 1e\+39, beyond the 65504 that torch.float16"):
        mm_shards.check_storable(wide, ids, torch.float16)


def test_an_apply_that_failed_part_way_is_refused_again_for_its_own_reason(world, catalogue, base_table, tmp_path):
    """An apply that wrote a record and then refused the next one moved the applier's offset but
    left its head digest at the previous apply's: applied again (a serving loop that retries),
    the log was refused as rotated, and the applied count missed the record it had written."""
    items, cut = catalogue

    def record(item, vectors=None):
        return WindowMessage(np.array([item]), vectors_of([item]).numpy() if vectors is None else vectors,
                             IdEncoder.fingerprint, np.zeros(1), 0.0).encode()

    path = tmp_path / "rim.log"  # written raw, as a writer with a bug would leave it: no durable end
    path.write_bytes(record(cut))
    model, *_ = _model(world, base_table, tmp_path / "run")
    live = LiveMMTable(path, base_table, items.num_rows)
    assert live.apply(model) == 1
    with path.open("ab") as log_file:
        log_file.write(record(cut + 1) + record(cut + 2, np.full((1, DIM), np.nan, np.float32)))
    for _ in range(2):
        with pytest.raises(DataError, match=f"NaN or infinite vector .*item {cut + 2}"):
            live.apply(model)
    assert live.applied == 2
    torch.testing.assert_close(_mm_rows(model, [cut, cut + 1]), vectors_of([cut, cut + 1]))


def test_a_fold_that_fails_leaves_no_folder_and_names_what_failed(catalogue, base_table, tmp_path):
    items, cut = catalogue
    broken = np.full((1, DIM), np.nan, np.float32)
    nan_log = _log_of(tmp_path / "nan.log", [cut], vectors=broken)
    with pytest.raises(DataError, match=rf"nan.log, field 'vector': the record ending at byte \d+ holds a NaN .*item {cut}"):
        fold_log(base_table, nan_log, tmp_path / "out", num_items=items.num_rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.log"]  # no out, no staging folder
    with pytest.raises(DataError, match="absent.log: no such log file"):
        fold_log(base_table, tmp_path / "absent.log", tmp_path / "out", num_items=items.num_rows)
    with pytest.raises(ManifestMismatch, match=rf"num_items=10: .* already spans ids 0..{cut - 1}"):
        fold_log(base_table, nan_log, tmp_path / "out", num_items=10)


def test_the_trainer_refuses_a_partial_table_unless_told_to_default(world, base_table, tmp_path):
    config = ciubm.load_train_config(None, [f"data.world={world}", f"mm_table={base_table}", f"out={tmp_path}"])
    with pytest.raises(ManifestMismatch, match="missing=default"):
        ciubm.mm_rows(config, ItemInfo.from_items(world / "items.parquet").count, DIM)
    run = ciubm.load_train_config(None, [f"data.world={world}", f"mm_table={base_table}", f"out={tmp_path / 'run'}"])
    with pytest.raises(ManifestMismatch, match="missing=default"):
        ciubm.run(run)
    assert not (tmp_path / "run").exists()  # refused before a log or a plan was written


def test_mim_train_applies_the_rim_log_between_steps(world, catalogue, base_table, log, tmp_path):
    from mim_rec.config import ConfigError

    items, cut = catalogue
    common = [f"data.world={world}", f"out={tmp_path / 'run'}", "loader.batch_size=128", "loader.max_hist_len=10",
              "model.over_arch=[16]", "model.ubm=avg", f"rim_log={log}"]
    config = ciubm.load_train_config(None, [*common, f"mm_table={base_table}", "mm_missing=default",
                                            "rim_apply_every=2", "max_steps=3"])
    ciubm.run(config)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["items"]) for e in events if e.get("event") == "rim_apply"] == [(2, items.num_rows - cut)]
    assert "missing: zero vectors" in next(e["source"] for e in events if e.get("event") == "mm_table")
    with pytest.raises(ConfigError, match="rim_log: RIM rows are applied to the MM table"):
        ciubm.load_train_config(None, common)


def test_a_rim_log_path_that_does_not_exist_is_named_on_stderr(world, base_table, tmp_path, capsys):
    """A mistyped rim_log= read as an empty log: the run trained the new items on their
    missing-row vectors and said nothing."""
    missing = tmp_path / "no_such.log"
    ciubm.run(ciubm.load_train_config(None, [
        f"data.world={world}", f"out={tmp_path / 'run'}", "loader.batch_size=128", "loader.max_hist_len=10",
        "model.over_arch=[16]", "model.ubm=avg", f"rim_log={missing}", f"mm_table={base_table}",
        "mm_missing=default", "max_steps=1"]))
    assert f"rim_log={missing} does not exist" in capsys.readouterr().err



def test_a_resumed_run_applies_and_logs_only_the_rim_items_its_checkpoint_does_not_hold(
        world, catalogue, base_table, tmp_path):
    """A restored applier started again at the table's offset: the resumed run re-applied every
    item its checkpoint already held and logged them as new rim_apply events, and every re-run
    of a finished run did so again."""
    items, cut = catalogue
    half = (cut + items.num_rows) // 2
    log = _log_of(tmp_path / "rim.log", range(cut, half))
    run = tmp_path / "run"

    def train(steps: int) -> list:
        ciubm.run(ciubm.load_train_config(None, [
            f"data.world={world}", f"out={run}", "loader.batch_size=128", "loader.max_hist_len=10",
            "model.over_arch=[16]", "model.ubm=avg", f"rim_log={log}", f"mm_table={base_table}",
            "mm_missing=default", "rim_apply_every=2", f"max_steps={steps}"]))
        events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(e["step"], e["items"]) for e in events if e.get("event") == "rim_apply"]

    assert train(3) == [(2, half - cut)]
    _log_of(log, range(half, items.num_rows))  # arrives after the checkpoint of step 3
    # re-runs of the finished run: the evaluation applies what the checkpoint lacks, once on record
    assert train(3) == train(3) == [(2, half - cut), (3, items.num_rows - half)]
    assert train(6) == [(2, half - cut), (4, items.num_rows - half)]  # trained on: applied at step 4
    scored = json.loads((run / "metrics.json").read_text())["auc"]
    assert train(6) == [(2, half - cut), (4, items.num_rows - half)]
    assert json.loads((run / "metrics.json").read_text())["auc"] == scored  # the checkpoint holds every row


def test_rim_log_with_an_mm_table_kernel_that_caches_rows_is_refused_before_training(
        world, base_table, log, tmp_path, monkeypatch):
    """A fused_uvm_caching MM table looks rows up in fbgemm's GPU cache, which the live apply's
    write to the storage misses, and its next state_dict() flushes that cache back over the
    new rows: the run was taken and served stale rows. Refused whether the setting names the
    kernel or the planner picks it (a mocked plan: no GPU here)."""
    from types import SimpleNamespace

    from mim_rec.config import ConfigError

    common = [f"data.world={world}", f"out={tmp_path / 'run'}", f"mm_table={base_table}", "mm_missing=default",
              "loader.batch_size=128", "loader.max_hist_len=10", "model.over_arch=[16]", "model.ubm=avg"]
    with pytest.raises(ConfigError, match=r"rim_log=.*rim.log with model.constraints.mm_item.compute_kernels="
                                          r"\['fused_uvm_caching'\]: .*GPU cache"):
        ciubm.load_train_config(None, [*common, f"rim_log={log}", "model.constraints.mm_item.compute_kernels="
                                                                   "[fused_uvm_caching]"])
    cached = SimpleNamespace(plan={"sparse_arch.mm": {"mm_item": SimpleNamespace(compute_kernel="fused_uvm_caching")}})
    monkeypatch.setattr(ciubm, "_plan", lambda *args: cached)
    config = ciubm.load_train_config(None, [*common, f"rim_log={log}"])
    ctx = ensure_process_group("cpu")
    items = ItemInfo.from_items(world / "items.parquet")
    with pytest.raises(ConfigError, match=r"rim_log=.*rim.log with the planner's fused_uvm_caching kernel for "
                                          r"the MM table mm_item: .*compute_kernels=\[fused\]"):
        ciubm.build_sharded_model(config, ciubm.table_sizes(config.data.world, items), ctx)

def test_a_table_rebuilt_under_the_same_path_does_not_resume(world, catalogue, tmp_path):
    """Steps 1-3 on one table and 4-6 on another used to finish as one run: the checkpoint's
    copy of the frozen table replaced the rebuilt one without a word."""
    from mim_rec.config import ConfigError

    items, _ = catalogue
    write_table(items, tmp_path / "items.parquet", ITEMS)
    table = build_table(IdEncoder(), tmp_path / "items.parquet", tmp_path / "table", shard_rows=64)
    common = [f"data.world={world}", f"mm_table={table}", f"out={tmp_path / 'run'}", "loader.batch_size=128",
              "loader.max_hist_len=10", "model.over_arch=[16]", "model.ubm=avg"]
    ciubm.run(ciubm.load_train_config(None, [*common, "max_steps=3"]))
    assert "mm_table" in json.loads((tmp_path / "run" / "inputs.json").read_text())
    assert ciubm._finished(ciubm.load_train_config(None, [*common, "max_steps=3"]))
    part = sorted(table.glob("part-*.parquet"))[0]
    rows = pq.read_table(part)
    flipped = pa.array([[-x for x in vector] for vector in rows["vector"].to_pylist()], rows.schema.field("vector").type)
    pq.write_table(rows.set_column(rows.schema.get_field_index("vector"), "vector", flipped), part)
    assert not ciubm._finished(ciubm.load_train_config(None, [*common, "max_steps=3"]))
    with pytest.raises(ConfigError, match=rf"trained on other data: mm_table={table} changed since"):
        ciubm.run(ciubm.load_train_config(None, [*common, "max_steps=6"]))

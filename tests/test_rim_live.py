"""Live apply on 2 gloo ranks: under row-wise and column-wise sharding every rank writes only its
own shards, both apply the same records, and every id then looks up its RIM vector. The table is
10 wide, stored 12 wide (FBGEMM's alignment): RIM's writes pad the way the initial fill does."""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pytest
import torch

from embeddings.build import build_table
from embeddings.rim_live import LiveMMTable
from embeddings.rim_log import RimLog, WindowMessage, durable_end_path, read_messages
from embeddings.table import read_mm_rows
from mim_rec.data.io import write_table
from mim_rec.data.schemas import ITEMS
from mim_rec.utils.dist import run_on_spawned_ranks
from test_mm_sharding import ITEMS_COUNT, IdEncoder, MMOnly, _plan
from mim_rec.ciubm.mm_shards import fill_mm_table, local_mm_shards

OLD = 40  # items 0..39 are in the base table; 40..95 arrive through RIM
DIM = 10


def _every_sharding(rank: int, device, table: str, log: str, shardings) -> list:
    torch.set_num_threads(1)  # one process group, a fresh model per sharding
    return [(sharding, rank, *_fill_apply_look_up(table, log, sharding)) for sharding in shardings]


def _fill_apply_look_up(table: str, log: str, sharding: str) -> tuple:
    """``(items applied, rows this rank changed, its shards, every id's looked-up vector)``."""
    from torchrec import KeyedJaggedTensor
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from mim_rec.ciubm.sparse import FrozenSharder

    model = MMOnly(DIM)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=_plan(model, sharding),
                                   sharders=[FrozenSharder()])
    fill_mm_table(dmp, lambda start, stop: read_mm_rows(table, start, stop, DIM, missing="default"))
    before = [t.clone() for _, _, t in local_mm_shards(dmp)]
    applied = LiveMMTable(log, table, ITEMS_COUNT).apply(dmp)
    shards = local_mm_shards(dmp)
    changed = sorted({r + int(i) for (r, _, t), old in zip(shards, before)
                      for i in torch.nonzero((t != old).any(1)).flatten()})
    ids = torch.arange(ITEMS_COUNT)
    kjt = KeyedJaggedTensor(keys=["mm_item_seq"], values=ids, lengths=torch.ones(ITEMS_COUNT, dtype=torch.long))
    with torch.no_grad():
        looked_up = dmp.module.mm(kjt).to_dict()["mm_item_seq"]
    assert not looked_up[:, DIM:].any(), "the alignment padding must stay zero"
    return applied, changed, [(r, c, tuple(t.shape)) for r, c, t in shards], looked_up[:, :DIM].numpy().copy()


@pytest.fixture(scope="module")
def table_and_log(tmp_path_factory):
    from PIL import Image
    import io

    folder = tmp_path_factory.mktemp("rim_live")
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    items = pa.table({"item_id": pa.array(np.arange(OLD), pa.int64()), "raw_item_id": [str(i) for i in range(OLD)],
                      "category_id": pa.array(np.zeros(OLD), pa.int32()), "title": ["t"] * OLD,
                      "created_at": pa.array(np.zeros(OLD, np.int64), pa.timestamp("s")),
                      "image": pa.array([buffer.getvalue()] * OLD, pa.binary())})
    write_table(items, folder / "items.parquet", ITEMS)
    table = build_table(IdEncoder(DIM), folder / "items.parquet", folder / "table", shard_rows=16)
    with RimLog(folder / "rim.log", IdEncoder.fingerprint, DIM) as log:
        for window in np.array_split(np.arange(OLD, ITEMS_COUNT), 5):
            vectors = IdEncoder(DIM).embed_items(pa.table({"item_id": window}), None).numpy()
            log.append(WindowMessage(window, vectors, IdEncoder.fingerprint, np.zeros(len(window)), 0.0))
    return table, folder / "rim.log"


@pytest.mark.slow
def test_each_rank_applies_the_same_records_to_its_own_shards(table_and_log):
    table, log = table_and_log
    shardings = ("row_wise", "column_wise")
    results = sorted(result for rank in run_on_spawned_ranks(_every_sharding, 2, "cpu", str(table), str(log),
                                                             shardings) for result in rank)
    expected = IdEncoder(DIM).embed_items(pa.table({"item_id": np.arange(ITEMS_COUNT)}), None).numpy()
    for sharding, rank, applied, changed, shards, looked_up in results:
        assert applied == ITEMS_COUNT - OLD
        assert np.array_equal(looked_up, expected), f"{sharding}: rank {rank} looks up other vectors"
        own_rows = {row for r, _, (rows, _) in shards for row in range(r, r + rows)}
        assert changed == sorted(row for row in own_rows if row >= OLD)  # its new rows, no other
    row_wise = [changed for sharding, _, _, changed, _, _ in results if sharding == "row_wise"]
    assert [min(c) for c in row_wise] == [OLD, ITEMS_COUNT // 2]  # the new rows split by row range


def _behind_rank_zero(table_and_log, tmp_path, monkeypatch):
    """A rank whose copy of the log holds the first record and part of the second, while rank 0
    read it all. Its copy of ``<log>.durable`` is already the newest: the part record lies
    before the durable end, and is still only the end of a lagging view, not damage."""
    import embeddings.rim_live as rim_live
    from mim_rec.ciubm import mm_shards

    table, log = table_and_log
    whole = log.read_bytes()
    first_end = next(read_messages(log))[0]
    lagging = tmp_path / "rim.log"
    lagging.write_bytes(whole[:first_end + 20])
    durable_end_path(lagging).write_text(str(len(whole)))
    monkeypatch.setattr(rim_live, "_agreed", lambda offset: len(whole))
    rows = torch.zeros(ITEMS_COUNT, DIM)
    monkeypatch.setattr(mm_shards, "local_mm_shards", lambda model: [(0, 0, rows)])
    return lagging, whole, rows


def test_a_rank_whose_view_of_the_log_lags_waits_for_the_bytes_rank_zero_read(table_and_log, tmp_path,
                                                                             monkeypatch):
    """It used to stop quietly at the end it saw: fewer rows than the other ranks, no error."""
    import embeddings.rim_live as rim_live

    lagging, whole, rows = _behind_rank_zero(table_and_log, tmp_path, monkeypatch)
    monkeypatch.setattr(rim_live.time, "sleep", lambda s: lagging.write_bytes(whole))  # the bytes arrive
    live = LiveMMTable(lagging, table_and_log[0], ITEMS_COUNT)
    assert live.apply(None) == ITEMS_COUNT - OLD and live.offset == len(whole)
    assert rows[OLD:].any(1).all() and not rows[:OLD].any()


def test_a_rank_that_never_sees_rank_zeros_bytes_is_refused(table_and_log, tmp_path, monkeypatch):
    import embeddings.rim_live as rim_live
    from mim_rec.data.errors import DataError

    lagging, whole, _ = _behind_rank_zero(table_and_log, tmp_path, monkeypatch)
    monkeypatch.setattr(rim_live, "VIEW_LAG_PATIENCE_S", 0.2)
    with pytest.raises(DataError, match=rf"rank 0 reads the log complete to byte \d+ of the {len(whole)} "
                                        "rank 0 read") as info:
        LiveMMTable(lagging, table_and_log[0], ITEMS_COUNT).apply(None)
    assert info.value.file == str(lagging)


def _log_of(path, windows) -> None:
    with RimLog(path, IdEncoder.fingerprint, DIM) as log:
        for window in windows:
            vectors = IdEncoder(DIM).embed_items(pa.table({"item_id": window}), None).numpy()
            log.append(WindowMessage(window, vectors, IdEncoder.fingerprint, np.zeros(len(window)), 0.0))


@pytest.mark.parametrize("rotated_to", ["shorter", "longer"])
def test_a_log_rotated_while_a_model_tails_it_is_refused_not_read_from_the_old_offset(
        table_and_log, tmp_path, monkeypatch, rotated_to):
    """The rotation check ran only when the applier was made: a log rotated at the same path
    later was read from the old offset, its first records skipped for good without a word."""
    from mim_rec.ciubm import mm_shards
    from mim_rec.data.errors import ManifestMismatch

    rows = torch.zeros(ITEMS_COUNT, DIM)
    monkeypatch.setattr(mm_shards, "local_mm_shards", lambda model: [(0, 0, rows)])
    path = tmp_path / "rim.log"
    _log_of(path, [np.arange(OLD, OLD + 10), np.arange(OLD + 10, OLD + 20)])
    live = LiveMMTable(path, table_and_log[0], ITEMS_COUNT)
    assert live.apply(None) == 20
    path.rename(tmp_path / "rim.log.1")
    _log_of(path, [np.arange(OLD + 20, OLD + 25)] if rotated_to == "shorter" else
            [np.arange(start, start + 10) for start in range(OLD + 20, ITEMS_COUNT - 10, 10)])
    with pytest.raises(ManifestMismatch, match=r"rim.log: not the log .*give a rotated log a new name"):
        live.apply(None)
    assert not rows[OLD + 20:].any()


def test_an_applier_resumed_from_a_position_skips_what_it_applied_and_still_knows_its_ids(
        table_and_log, tmp_path, monkeypatch):
    """A restored applier started at the table's offset and applied (and logged) the
    checkpoint's records again; resumed past them, it must still refuse a later record that
    repeats one of their ids, and refuse a log rotated since the checkpoint."""
    from mim_rec.ciubm import mm_shards
    from mim_rec.data.errors import DataError, ManifestMismatch

    rows = torch.zeros(ITEMS_COUNT, DIM)
    monkeypatch.setattr(mm_shards, "local_mm_shards", lambda model: [(0, 0, rows)])
    path = tmp_path / "rim.log"
    _log_of(path, [np.arange(OLD, OLD + 10)])
    first = LiveMMTable(path, table_and_log[0], ITEMS_COUNT)
    assert first.apply(None) == 10
    position = first.position()
    rows.zero_()
    with path.open("ab") as fh:  # a record no writer would append: it repeats an applied item
        window = np.array([OLD + 3])
        fh.write(WindowMessage(window, IdEncoder(DIM).embed_items(pa.table({"item_id": window}), None).numpy(),
                               IdEncoder.fingerprint, np.zeros(1), 0.0).encode())
    durable_end_path(path).write_text(str(path.stat().st_size))  # as a writer would publish it
    resumed = LiveMMTable(path, table_and_log[0], ITEMS_COUNT, resume=position)
    assert resumed.offset == first.offset
    with pytest.raises(DataError, match=f"item {OLD + 3} is already in .*an earlier record"):
        resumed.apply(None)
    assert not rows.any()  # nothing of the checkpoint's records written again
    path.rename(tmp_path / "rim.log.1")
    _log_of(path, [np.arange(OLD + 20, OLD + 40)])
    with pytest.raises(ManifestMismatch, match="rim.log: not the log this run's checkpoint was applied from"):
        LiveMMTable(path, table_and_log[0], ITEMS_COUNT, resume=position)

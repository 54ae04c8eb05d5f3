"""Build -> load -> lookup of the MM table round-trips exact fp32 vectors for every id under
table-wise, row-wise and column-wise sharding on 2 gloo ranks, each rank reading only its rows,
for a table width FBGEMM takes as it is (8) and one it must be padded for (10)."""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
from torch import nn

from embeddings.build import build_table
from embeddings.table import read_mm_rows
from mim_rec.ciubm.sparse import MM_TABLE, FrozenEmbeddingBagCollection, FrozenSharder, mm_table_config
from mim_rec.data.io import write_table
from mim_rec.data.schemas import ITEMS
from mim_rec.utils.dist import run_on_spawned_ranks
from mim_rec.ciubm.mm_shards import fill_mm_table

ITEMS_COUNT = 96


class IdEncoder:
    fingerprint = "ids"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def embed_items(self, items: pa.Table, source) -> torch.Tensor:
        ids = torch.from_numpy(items["item_id"].to_numpy().astype(np.float32))
        return torch.stack([ids * 100 + k for k in range(self.dim)], dim=1)


class MMOnly(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mm = FrozenEmbeddingBagCollection(tables=[mm_table_config(ITEMS_COUNT, dim, "fp32")],
                                               device=torch.device("meta"))


def _plan(model: MMOnly, sharding: str):
    from torchrec.distributed import sharding_plan as sp
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingPlan

    if sharding == "row_wise":  # the planner offers row-wise for EBC only on cuda: a manual plan
        return ShardingPlan({"mm": sp.construct_module_sharding_plan(
            model.mm, {MM_TABLE: sp.row_wise()}, local_size=2, world_size=2, device_type="cpu",
            sharder=FrozenSharder())})
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"), constraints={
        MM_TABLE: ParameterConstraints(sharding_types=[sharding], compute_kernels=["fused"])})
    return planner.collective_plan(model, [FrozenSharder()], dist.GroupMember.WORLD)


def _fill_and_look_up(rank: int, device, table: str, dim: int, sharding: str) -> tuple:
    """``(rank, the row ranges this rank read, every id's looked-up vector)``."""
    from torchrec import KeyedJaggedTensor
    from torchrec.distributed.model_parallel import DistributedModelParallel

    torch.set_num_threads(1)
    model = MMOnly(dim)
    dmp = DistributedModelParallel(model, device=device, plan=_plan(model, sharding), sharders=[FrozenSharder()])
    asked = []

    def rows_of(start: int, stop: int) -> torch.Tensor:
        asked.append((start, stop))
        return read_mm_rows(table, start, stop, dim)

    fill_mm_table(dmp, rows_of)
    ids = torch.arange(ITEMS_COUNT)
    kjt = KeyedJaggedTensor(keys=["mm_item_seq"], values=ids, lengths=torch.ones(ITEMS_COUNT, dtype=torch.long))
    with torch.no_grad():
        looked_up = dmp.module.mm(kjt).to_dict()["mm_item_seq"]
    assert not looked_up[:, dim:].any(), "the alignment padding must stay zero"
    return rank, asked, looked_up[:, :dim].numpy().copy()


@pytest.fixture(scope="module", params=[8, 10], ids=["dim8", "dim10"])
def table(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp(f"mm_sharding_{request.param}")
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    items = pa.table({"item_id": pa.array(np.arange(ITEMS_COUNT), pa.int64()),
                      "raw_item_id": [str(i) for i in range(ITEMS_COUNT)],
                      "category_id": pa.array(np.zeros(ITEMS_COUNT), pa.int32()),
                      "title": ["t"] * ITEMS_COUNT,
                      "created_at": pa.array(np.zeros(ITEMS_COUNT, np.int64), pa.timestamp("s")),
                      "image": pa.array([buffer.getvalue()] * ITEMS_COUNT, pa.binary())})
    write_table(items, folder / "items.parquet", ITEMS)
    return build_table(IdEncoder(request.param), folder / "items.parquet", folder / "table", shard_rows=16), \
        request.param


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "column_wise"])
def test_every_id_round_trips_exactly(table, sharding):
    folder, dim = table
    results = run_on_spawned_ranks(_fill_and_look_up, 2, "cpu", str(folder), dim, sharding)
    expected = IdEncoder(dim).embed_items(pa.table({"item_id": np.arange(ITEMS_COUNT)}), None)
    for rank, asked, looked_up in results:
        assert np.array_equal(looked_up, expected.numpy()), f"{sharding}: rank {rank} looked up other vectors"
    if sharding == "row_wise":  # each rank read only its half of the rows
        assert results[0][1] == [(0, ITEMS_COUNT // 2)] and results[1][1] == [(ITEMS_COUNT // 2, ITEMS_COUNT)]
    if sharding == "table_wise":  # one rank holds the table, the other reads nothing
        assert sorted(len(r[1]) for r in results) == [0, 1]

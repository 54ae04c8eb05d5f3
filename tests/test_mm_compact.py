"""Compact MM storage: build -> load -> lookup round-trips within the stated tolerance for
fp16 storage and for an int8 (row-wise quantised) table folder, under table-wise, row-wise
and column-wise sharding on 2 gloo ranks, and the fp16 shards take half the fp32 bytes; TorchRec
still refuses an INT8 training table (if it stops refusing, ``model.mm_dtype=int8`` can open).

Tolerances: fp16 rounding is at most half an ulp, ``|v| * 2**-11`` (plus 2**-24 for fp16
subnormals); int8 adds at most half a quantisation step, ``scale / 2``, per row.
"""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
from torch import nn

from embeddings.compact import (dequantise_rows, fbgemm_table_bytes, quantise_rows, quantise_table,
                                row_bytes)
from embeddings.table import read_mm_rows
from mim_rec.ciubm.sparse import MM_TABLE, FrozenEmbeddingBagCollection, FrozenSharder, mm_data_type
from mim_rec.config import ConfigError
from mim_rec.data.io import write_table
from mim_rec.data.manifest import Manifest, write_manifest
from mim_rec.data.schemas import MM_TABLE_FP
from mim_rec.utils.dist import run_on_spawned_ranks
from mim_rec.ciubm.mm_shards import fill_mm_table, mm_table_state_key

ITEMS_COUNT, DIM, PART_ROWS = 64, 8, 16
FP16_RTOL, FP16_ATOL = 2.0 ** -11, 2.0 ** -24
SHARDINGS = ("table_wise", "row_wise", "column_wise")


def _vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((ITEMS_COUNT, DIM)) * rng.uniform(0.01, 3, (ITEMS_COUNT, 1))).astype(np.float32)


class MMOnly(nn.Module):
    def __init__(self, dtype: str) -> None:
        super().__init__()
        from torchrec import EmbeddingBagConfig
        self.mm = FrozenEmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name=MM_TABLE, num_embeddings=ITEMS_COUNT, embedding_dim=DIM, feature_names=["mm_item_seq"],
            data_type=mm_data_type(dtype))], device=torch.device("meta"))


def _plan(model: MMOnly, sharding: str):
    from torchrec.distributed import sharding_plan as sp
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingPlan

    if sharding == "row_wise":  # the planner offers row-wise for EBC only on cuda: a manual plan
        return ShardingPlan({"mm": sp.construct_module_sharding_plan(
            model.mm, {MM_TABLE: sp.row_wise(compute_kernel="fused")}, local_size=2, world_size=2, device_type="cpu",
            sharder=FrozenSharder())})
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"), constraints={
        MM_TABLE: ParameterConstraints(sharding_types=[sharding], compute_kernels=["fused"])})
    return planner.collective_plan(model, [FrozenSharder()], dist.GroupMember.WORLD)


def _lookup_all(table: str, dtype: str, sharding: str):
    """``(vectors of every id looked up through the sharded table, this rank's MM bytes, dtype)``."""
    from torchrec import KeyedJaggedTensor
    from torchrec.distributed.model_parallel import DistributedModelParallel

    model = MMOnly(dtype)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=_plan(model, sharding),
                                   sharders=[FrozenSharder()])
    fill_mm_table(dmp, lambda start, stop: read_mm_rows(table, start, stop, DIM))
    ids = torch.arange(ITEMS_COUNT)
    kjt = KeyedJaggedTensor(keys=["mm_item_seq"], values=ids, lengths=torch.ones(ITEMS_COUNT, dtype=torch.long))
    with torch.no_grad():
        looked_up = dmp.module.mm(kjt).to_dict()["mm_item_seq"].float()
    weight = dmp.state_dict()[mm_table_state_key(dmp)]
    shards = [s.tensor for s in weight.local_shards()]
    return looked_up.numpy().copy(), sum(t.numel() * t.element_size() for t in shards), str(weight.dtype)


def _torchrec_refuses_int8(sharding: str) -> str:
    """The error TorchRec raises when asked to shard an INT8 training table (or '' if none)."""
    from torchrec import EmbeddingBagConfig
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.modules.embedding_configs import DataType

    model = nn.Module()
    model.mm = FrozenEmbeddingBagCollection(tables=[EmbeddingBagConfig(
        name=MM_TABLE, num_embeddings=ITEMS_COUNT, embedding_dim=DIM, feature_names=["mm_item_seq"],
        data_type=DataType.INT8)], device=torch.device("meta"))
    try:
        DistributedModelParallel(model, device=torch.device("cpu"), plan=_plan(model, sharding),
                                 sharders=[FrozenSharder()])
    except ValueError as error:
        return str(error)
    return ""


def _every_sharding(rank: int, device, tables: dict) -> dict:
    """Every sharding type in one pair of processes (spawning costs more than the checks)."""
    torch.set_num_threads(1)
    results = {(sharding, name): _lookup_all(tables[source], "fp16", sharding)
               for sharding in SHARDINGS for name, source in (("fp16", "fp"), ("int8", "int8"))}
    # row-wise: both ranks hold rows, so both reach TorchRec's INT8 failure
    results["int8_refused"] = _torchrec_refuses_int8("row_wise")
    return results


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mm_compact")
    vectors = _vectors()
    for start in range(0, ITEMS_COUNT, PART_ROWS):
        rows = vectors[start:start + PART_ROWS]
        write_table(pa.table({"item_id": pa.array(np.arange(start, start + len(rows)), pa.int64()),
                              "vector": pa.array(list(rows), pa.list_(pa.float32()))}),
                    folder / "fp" / f"part-{start // PART_ROWS:05d}.parquet", MM_TABLE_FP,
                    item_count=ITEMS_COUNT, vector_dims={"vector": DIM})
    write_manifest(folder / "fp", Manifest(kind="mm_table", stage="mfm", row_count=ITEMS_COUNT,
                                           dim=DIM, dtype="float32"))
    return {"fp": str(folder / "fp"), "int8": str(quantise_table(folder / "fp", folder / "int8"))}


def test_quantise_rows_error_is_at_most_half_a_step():
    vectors = _vectors()
    codes, scale, bias = quantise_rows(vectors)
    error = np.abs(dequantise_rows(codes, scale, bias) - vectors)
    assert codes.dtype == np.int8 and (error <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert codes.min() == -128 and codes.max() == 127  # the full code range is used
    constant = quantise_rows(np.full((1, DIM), 0.5, np.float32))
    assert np.allclose(dequantise_rows(*constant), 0.5)


def test_a_row_int8_cannot_scale_is_refused_before_a_table_is_written(tmp_path):
    """Values spanning past float32's range gave an infinite scale and bias: the quantised table
    was written, and refused only when read ("non-finite vector")."""
    from mim_rec.data.errors import DataError

    vectors = _vectors()
    vectors[3, :2] = [-3e38, 3e38]
    write_table(pa.table({"item_id": pa.array(np.arange(len(vectors)), pa.int64()),
                          "vector": pa.array(list(vectors), pa.list_(pa.float32()))}),
                tmp_path / "fp" / "part-00000.parquet", MM_TABLE_FP, item_count=len(vectors),
                vector_dims={"vector": DIM})
    write_manifest(tmp_path / "fp", Manifest(kind="mm_table", stage="mfm", row_count=len(vectors),
                                             dim=DIM, dtype="float32"))
    with pytest.raises(DataError, match="item 3: its values span more than float32 holds") as info:
        quantise_table(tmp_path / "fp", tmp_path / "int8")
    assert info.value.file.endswith("part-00000.parquet") and not (tmp_path / "int8").exists()


def test_int8_storage_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="metadata.shard_lengths"):
        mm_data_type("int8")
    with pytest.raises(ConfigError, match="fp16"):
        mm_data_type("bf8")
    assert row_bytes("int8", 128) == 136 and row_bytes("fp16", 128) == 256


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_fbgemm_allocates_the_stated_row_bytes(dtype):
    assert fbgemm_table_bytes(100, 16, dtype) == 100 * row_bytes(dtype, 16)


@pytest.mark.slow
def test_compact_tables_round_trip_under_sharding(tables):
    results = dict(enumerate(run_on_spawned_ranks(_every_sharding, 2, "cpu", tables)))
    vectors = _vectors()
    codes, scale, bias = quantise_rows(vectors)
    int8_values = dequantise_rows(codes, scale, bias)
    for sharding in SHARDINGS:
        for rank, result in results.items():
            fp16, fp16_bytes, fp16_type = result[sharding, "fp16"]
            int8, int8_bytes, _ = result[sharding, "int8"]
            where = f"{sharding}, rank {rank}"
            assert fp16_type == "torch.float16", where
            assert np.allclose(fp16, vectors, rtol=FP16_RTOL, atol=FP16_ATOL), f"{where}: fp16"
            assert not np.array_equal(fp16, vectors), where  # really stored in half precision
            assert np.allclose(int8, int8_values, rtol=FP16_RTOL, atol=FP16_ATOL), f"{where}: int8"
            assert (np.abs(int8 - vectors) <= scale[:, None] / 2 + np.abs(vectors) * FP16_RTOL + 1e-6).all(), where
            assert int8_bytes == fp16_bytes, where
        # every row stored once, at 2 bytes a value: half the fp32 table (exact in test_mm_sharding.py)
        assert sum(r[sharding, "fp16"][1] for r in results.values()) == ITEMS_COUNT * DIM * 2, sharding
    for rank, result in results.items():
        assert "metadata.shard_lengths" in result["int8_refused"], (rank, result["int8_refused"])

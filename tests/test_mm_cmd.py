"""CMD on TorchRec: tables pinned to "parameter" ranks by configuration, and a lookup that
moves only the rows of the batch's ids.

Two gloo ranks build the trainer's plan (``train.ciubm._plan``) for the real CiUBM with the MM
table pinned to rank 1 and the item table to rank 0; each rank then looks up its own batch of
ids, and a hook on each rank's embedding kernel records the ids it actually served.
"""

from __future__ import annotations

import re

import pytest
import torch

from mim_rec.ciubm.config import ModelConfig, TableConstraint
from mim_rec.config import ConfigError
from mim_rec.utils.dist import run_on_spawned_ranks

ITEMS, USERS, CATEGORIES, MM_DIM = 1000, 50, 5, 8
BATCHES = {0: [3, 3, 17, 512], 1: [999, 17, 40]}  # each rank's ids: duplicates, shared ids, both ends


def _config(**mm_pin):
    from train.ciubm import DataPaths, TrainConfig

    model = ModelConfig(mm_dim=MM_DIM, query_buckets=100, constraints={
        "mm_item": TableConstraint(**mm_pin), "item": TableConstraint(ranks=[0])})
    return TrainConfig(data=DataPaths(world="unused"), model=model)


def _served_ids(collection) -> list:
    """Install hooks that record the ids each local embedding kernel of ``collection`` serves."""
    served: list = []
    for lookup in collection._lookups:
        for kernel in getattr(lookup, "_emb_modules", []):
            kernel.register_forward_pre_hook(lambda module, args: served.append(args[0].values().tolist()))
    return served


def _run(rank: int, config) -> dict:
    from torchrec import KeyedJaggedTensor

    from mim_rec.utils.dist import DistContext
    from mim_rec.ciubm.mm_shards import mm_table_bytes
    from train.ciubm import build_sharded_model

    ctx = DistContext(rank, 2, rank, torch.device("cpu"), "gloo")
    model, _, plan = build_sharded_model(config, {"items": ITEMS, "users": USERS, "categories": CATEGORIES}, ctx)
    mm = model.module.sparse_arch.mm
    served = _served_ids(mm)
    ids = torch.tensor(BATCHES[rank])
    with torch.no_grad():
        rows = mm(KeyedJaggedTensor(keys=["mm_item_seq"], values=ids,
                                    lengths=torch.ones(len(ids), dtype=torch.long))).to_dict()["mm_item_seq"]
    types = {name: p.sharding_type for module in plan.plan.values() for name, p in module.items()}
    ranks = {name: sorted(set(p.ranks or [])) for module in plan.plan.values() for name, p in module.items()}
    return {"served": sorted(i for call in served for i in call), "bytes": mm_table_bytes(model),
            "rows": tuple(rows.shape), "types": types, "ranks": ranks}


def _both_placements(rank: int, device) -> dict:
    torch.set_num_threads(1)
    return {"table_wise": _run(rank, _config(ranks=[1])),
            "column_wise": _run(rank, _config(ranks=[0, 1], sharding_types=["column_wise"]))}


@pytest.mark.slow
def test_pinned_tables_serve_only_the_batch_rows():
    results = dict(enumerate(run_on_spawned_ranks(_both_placements, 2, "cpu")))
    every_id = sorted(BATCHES[0] + BATCHES[1])
    pinned = {rank: results[rank]["table_wise"] for rank in (0, 1)}
    assert pinned[0]["types"]["mm_item"] == "table_wise" and pinned[0]["ranks"]["mm_item"] == [1]
    assert pinned[0]["ranks"]["item"] == [0]
    # the parameter rank holds the whole MM table and serves exactly the ids of both ranks' batches
    assert (pinned[0]["bytes"], pinned[1]["bytes"]) == (0, ITEMS * MM_DIM * 4)
    assert pinned[0]["served"] == [] and pinned[1]["served"] == every_id
    for rank in (0, 1):  # every rank gets the rows of its own batch back
        assert pinned[rank]["rows"] == (len(BATCHES[rank]), MM_DIM)
    split = {rank: results[rank]["column_wise"] for rank in (0, 1)}
    assert split[0]["ranks"]["mm_item"] == [0, 1]
    assert split[0]["bytes"] == split[1]["bytes"] == ITEMS * MM_DIM * 4 // 2
    assert split[0]["served"] == split[1]["served"] == every_id  # each half-width shard: the same ids


def test_impossible_pins_are_refused():
    from mim_rec.ciubm.placement import check_pinned

    assert check_pinned("mm_item", TableConstraint(ranks=[3]), world_size=4) == "table_wise"
    with pytest.raises(ConfigError, match="0..1"):
        check_pinned("mm_item", TableConstraint(ranks=[2]), world_size=2)
    with pytest.raises(ConfigError, match="one rank"):
        check_pinned("mm_item", TableConstraint(ranks=[0, 1], sharding_types=["table_wise"]), world_size=2)
    with pytest.raises(ConfigError, match="row_wise"):
        check_pinned("mm_item", TableConstraint(ranks=[0], sharding_types=["row_wise"]), world_size=2)


def _pin(mm_dim: int, ranks: list):
    """``pin_tables`` on a stand-in plan (the planner's choice for the MM table, replaced by the pin)
    for a meta CiUBM with an ``mm_dim``-wide MM table; the ranks its shards were placed on."""
    from types import SimpleNamespace

    from mim_rec.ciubm.placement import pin_tables
    from mim_rec.ciubm.sparse import SparseArch, sharders

    arch = SparseArch(ModelConfig(mm_dim=mm_dim), num_items=10, num_users=4, num_categories=3,
                      device=torch.device("meta"))
    plan = SimpleNamespace(plan={"mm": {"mm_item": None}})
    world = max(ranks) + 1
    pin_tables(arch, plan, {"mm_item": TableConstraint(ranks=ranks, sharding_types=["column_wise"])},
               sharders(0.1, False), world, world, "cpu")
    return sorted(int(shard.placement.rank()) for shard in plan.plan["mm"]["mm_item"].sharding_spec.shards)


@pytest.mark.parametrize("kernels", [["dense", "fused"], None])
def test_a_pinned_table_keeps_a_kernel_its_sharding_offers(kernels):
    """The pin took the first constrained kernel: [dense, fused] gave a table-wise table the
    dense kernel (offered only data-parallel), which put it in the dense Adam at lr."""
    from types import SimpleNamespace

    from mim_rec.ciubm.placement import pin_tables
    from mim_rec.ciubm.sparse import SparseArch, sharders

    arch = SparseArch(ModelConfig(mm_dim=8), num_items=10, num_users=4, num_categories=3, device=torch.device("meta"))
    plan = SimpleNamespace(plan={"mm": {"mm_item": SimpleNamespace(compute_kernel="fused")}})
    pin_tables(arch, plan, {"mm_item": TableConstraint(ranks=[0], compute_kernels=kernels)},
               sharders(0.1, False), 2, 2, "cpu")
    assert plan.plan["mm"]["mm_item"].compute_kernel == "fused"


@pytest.mark.parametrize("mm_dim, ranks", [(8, [0, 1]), (24, [0, 1, 2]), (16, [1, 3])])
def test_a_column_wise_pin_puts_a_block_on_every_rank(mm_dim, ranks):
    assert _pin(mm_dim, ranks) == ranks


@pytest.mark.parametrize("mm_dim, ranks, counts", [
    (10, [0, 1], "3"),       # stored 12 wide
    (20, [0, 1], "5"),
    (24, [0, 1, 2, 3], "2, 3 or 6"),
    (256, [0, 1, 2], "2, 4, 8, 16, 32 or 64"),
])
def test_a_column_wise_pin_whose_width_does_not_split_into_one_block_per_rank_is_refused(mm_dim, ranks, counts):
    """TorchRec's column_wise generator falls back to fewer, wider blocks and zips them with the
    ranks: a 12- or 20-wide table pinned to [0, 1] went to rank 0 alone, 24 columns over 4 ranks
    to 3 of them, and 256 over 3 ranks was TorchRec's ValueError after the process group was up."""
    with pytest.raises(ConfigError, match=re.escape(f"model.constraints.mm_item.ranks={ranks}: column_wise")
                       + rf" .* pin it over {counts} ranks, or table_wise on one"):
        _pin(mm_dim, ranks)


def test_a_pin_torchrec_places_on_other_ranks_is_refused(monkeypatch):
    """Should TorchRec's generator cut the table otherwise, a rank left without a shard is named
    instead of the pin quietly holding on fewer ranks."""
    from torchrec.distributed import sharding_plan

    column_wise = sharding_plan.column_wise
    monkeypatch.setattr(sharding_plan, "column_wise", lambda ranks, **kw: column_wise(ranks=ranks[:1], **kw))
    with pytest.raises(ConfigError, match=r"model.constraints.mm_item.ranks=\[0, 1\]: .* on ranks \[0\], none on \[1\]"):
        _pin(8, [0, 1])

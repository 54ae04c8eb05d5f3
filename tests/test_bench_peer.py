"""``mim bench peer``: DeepCTR-Torch gets exactly the samples mim_rec trains on, both learn, and
the command prints both side by side."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from mim_rec.data.loader import CtrEventsLoader, ItemInfo, LoaderConfig, hash_tokens
from mim_rec.data.synth import SynthConfig, generate_world, tiny
from train.bench_peer import PeerBenchConfig, peer_input, peer_model
from train.ciubm import table_sizes
from train.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # four times the tiny world's events, so that two epochs of either Base model learn
    config = replace(tiny(SynthConfig(seed=13)), events=24_000)
    yield generate_world(config, tmp_path_factory.mktemp("peer_world"))
    if dist.is_initialized():  # mim train's one-rank gloo group
        dist.destroy_process_group()
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)


@pytest.mark.parametrize("ubm", ["din", "dien"])
def test_peer_input_holds_each_event_as_deepctr_reads_it(world, ubm):
    length = 5
    config = PeerBenchConfig(world=str(world), loader=LoaderConfig(batch_size=64, max_hist_len=length, shuffle=False))
    items = ItemInfo.from_items(world / "items.parquet")
    batch = next(iter(CtrEventsLoader(world / "events_train.parquet", items, config.loader)))
    model = peer_model(ubm, table_sizes(world, items), config, seed=0, device=torch.device("cpu"))
    matrix = peer_input(batch, model.feature_index, items, config.query_len,
                        torch.Generator().manual_seed(0) if ubm == "dien" else None)
    column = {name: matrix[:, start:end].long() for name, (start, end) in model.feature_index.items()}
    events = pq.read_table(world / "events_train.parquet").slice(0, 64)
    _, words = hash_tokens(events["query"], config.loader.query_buckets)
    word_rows = np.repeat(np.arange(64), [len(q.split()) for q in events["query"].to_pylist()])
    for row in range(64):
        hist = events["hist_item_ids"][row].as_py()[-length:]
        cats = events["hist_category_ids"][row].as_py()[-length:]
        n = len(hist)
        assert column["item"][row, 0] == events["target_item_id"][row].as_py() + 1
        assert column["cate"][row, 0] == items.category[events["target_item_id"][row].as_py()] + 1
        assert column["user"][row, 0] == events["user_id"][row].as_py() + 1
        assert column["seq_length"][row, 0] == n
        # behaviours first (oldest to newest, as mim_rec orders them), then padding
        assert column["hist_item"][row].tolist() == [h + 1 for h in hist] + [0] * (length - n)
        assert column["hist_cate"][row].tolist() == [c + 1 for c in cats] + [0] * (length - n)
        query = [w + 1 for w in words[word_rows == row]]
        assert column["query"][row].tolist() == query + [0] * (config.query_len - len(query))
        if ubm == "dien":
            negatives = column["neg_hist_item"][row]
            assert (negatives[:n] >= 1).all() and (negatives[n:] == 0).all()
            real = negatives[:n] - 1
            assert column["neg_hist_cate"][row, :n].tolist() == (items.category[real.numpy()] + 1).tolist()
    assert torch.equal(matrix[:, model.feature_index["log1p_item_age_days"][0]], batch.dense_features[:, 0])


def test_a_query_len_below_the_longest_query_is_refused_before_training(world, capsys):
    """It was a ValueError traceback from the peer's first batch, after mim_rec had trained."""
    import pyarrow.parquet as pq

    longest = max(len(q.split()) for split in ("train", "test")
                  for q in pq.read_table(world / f"events_{split}.parquet", columns=["query"])["query"].to_pylist())
    assert main(["bench", "peer", f"world={world}", f"query_len={longest - 1}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"query_len={longest - 1}: the longest query of {world} has {longest} words" in err
    assert len(err.splitlines()) == 1


def test_a_query_longer_than_the_input_is_refused(world):
    config = PeerBenchConfig(world=str(world), query_len=1, loader=LoaderConfig(batch_size=64, shuffle=False))
    items = ItemInfo.from_items(world / "items.parquet")
    batch = next(iter(CtrEventsLoader(world / "events_train.parquet", items, config.loader)))
    model = peer_model("din", table_sizes(world, items), config, seed=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="query_len=1"):
        peer_input(batch, model.feature_index, items, config.query_len)


def test_both_libraries_train_on_the_same_steps_and_beat_chance(world, tmp_path, capsys):
    out_json = tmp_path / "peer.json"
    code = main(["bench", "peer", "--json", str(out_json), f"world={world}", "epochs=2", "threads=1",
                 "loader.batch_size=256", "loader.max_hist_len=10", "model.over_arch=[32]"])
    out = capsys.readouterr().out
    assert code == 0, out
    for label in ("mim_rec", "DeepCTR-Torch", "mim − peer"):
        assert sum(line.split()[1:2] == [label.split()[0]] for line in out.splitlines()) == 2, out
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["ubm"], r["implementation"]) for r in rows] == [
        (u, i) for u in ("din", "dien") for i in ("mim_rec", "deepctr_torch")]
    for ubm in ("din", "dien"):
        ours, peer = (r for r in rows if r["ubm"] == ubm)
        assert ours["steps"] == peer["steps"] > 0
    for row in rows:
        assert row["auc"] > 0.6, row  # both learn from the same samples
        assert row["train_samples_per_s"] > 0


@pytest.mark.parametrize("setting, message", [
    ("ubms=[twin]", "DeepCTR-Torch has no ['twin']"),
    ("ubms=[]", "give at least one of each"),
    ("seeds=[]", "give at least one of each"),
    ("max_steps=0", "max_steps=0: must be positive"),
    ("loader.batch_size=-2", "loader.batch_size=-2: must be positive"),
    ("world=", "needs world=DIR"),
    ("ubms=[din,din]", "ubms=['din', 'din']: each may appear once"),  # printed a spread "over seeds"
    ("seeds=[0,0]", "seeds=[0, 0]: each may appear once"),
    ("model.user_dim=6", "model.user_dim=6: FBGEMM's embedding kernels need a multiple of 4"),
    # mim train's checks, which the peer's run of it bypassed: TorchRec's planner divided by zero,
    # the loader's range() and numpy's generator refused these mid-run
    ("model.item_dim=0", "model.item_dim=0: must be positive"),
    ("loader.shuffle_row_groups=0", "loader.shuffle_row_groups=0: must be positive"),
    ("loader.seed=-1", "loader.seed=-1: must not be negative"),
    ("seeds=[0,-2]", "seeds[1]=-2: must not be negative"),
    # base_model overwrote these without a word
    ("model.ubm=sim", "model.ubm=sim: mim bench peer sets it; it is set by ubms="),
    ("model.fusion_interest=false", "model.fusion_interest=False: mim bench peer sets it; it is set by the bench "
                                    "(Base: the ID interest alone)"),
    # refused as all three interest modules off, content and fusion named though never set
    ("model.id_interest=false", "model.id_interest=False: mim bench peer sets it; it is set by the bench "
                                "(Base: the ID interest alone)"),
    pytest.param("model.constraints.item.sharding_types=[row_wise]", "row-wise sharding needs CUDA",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="row-wise is offered on CUDA")),
])
def test_a_setting_that_cannot_run_is_refused_before_training(world, capsys, setting, message):
    """These used to end in a traceback, or (seeds=[]) in an empty table."""
    assert main(["bench", "peer", f"world={world}", setting]) == 2
    assert message in capsys.readouterr().err


def test_both_libraries_hash_queries_into_the_models_table(world):
    """run_ours built its TrainConfig past mim train's loader sync: with model.query_buckets=64
    the loader still hashed into 20,000 ids, and fbgemm zeroed every id past row 63."""
    from mim_rec.config import load_config
    from train.bench_peer import check_config

    config = load_config(PeerBenchConfig, None, [f"world={world}", "model.query_buckets=64"])
    check_config(config)
    assert config.loader.query_buckets == 64


def test_one_seed_is_printed_without_a_spread():
    from train.bench_peer import format_table, summarise

    rows = [{"ubm": "din", "seed": 0, "implementation": impl, "auc": 0.7, "gauc": 0.6, "logloss": 0.5,
             "s1_auc": 0.65, "train_samples_per_s": 100.0} for impl in ("mim_rec", "deepctr_torch")]
    table = format_table({"world": "w", "sizes": {}, "seeds": [0], "rows": rows, "summary": summarise(rows)})
    assert "±" not in table and "one seed: no spread" in table

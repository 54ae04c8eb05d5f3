"""CiUBM on TorchRec: batches, frozen MM table, training beats a constant, exact resume,
refusal of bad events, and a 2-rank gloo run. Marked ``cuda``: under MIM_TEST_DEVICE=cuda the
one-process tests train on the GPU (nccl, FBGEMM's CUDA kernels, fused Adam for the ID tables)."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from mim_rec.ciubm.config import ModelConfig
from mim_rec.ciubm.interest import content_match
from mim_rec.ciubm import mm_shards
from mim_rec.ciubm.model import CiUBM
from mim_rec.ciubm.sparse import FrozenSequenceSharder, FrozenSharder, sharders
from mim_rec.config import ConfigError
from mim_rec.data.errors import DataError
from mim_rec.utils.dist import ensure_process_group, free_port, run_on_spawned_ranks
from mim_rec.data.loader import CtrEventsLoader, ItemInfo, LoaderConfig
from mim_rec.data.synth import SynthConfig, generate_world, tiny
from train import ciubm
from train.common import config_dict
from train.dcp_checkpoints import DcpCheckpoints

pytestmark = pytest.mark.cuda

FAST = ["loader.batch_size=256", "loader.max_hist_len=10", "checkpoint_every=1000", "log_every=5",
        "model.over_arch=[32]", "model.mm_dim=16"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    yield generate_world(tiny(SynthConfig(seed=11)), tmp_path_factory.mktemp("ciubm_world"))
    if dist.is_initialized():
        dist.destroy_process_group()
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)


def _config(world, out, *extra):
    return ciubm.load_train_config(None, [f"data.world={world}", f"out={out}", *FAST, *extra])


def test_batch_layout_matches_the_events(world):
    config = LoaderConfig(batch_size=64, max_hist_len=5, shuffle=False)
    items = ItemInfo.from_items(world / "items.parquet")
    batch = next(iter(CtrEventsLoader(world / "events_train.parquet", items, config)))
    events = pq.read_table(world / "events_train.parquet").slice(0, 64)
    slots = 1 + config.max_hist_len
    assert batch.sequence.stride() == 64 * slots and batch.slots == slots
    lengths = batch.sequence["item_seq"].lengths().view(64, slots)
    hist_len = np.minimum(pc.list_value_length(events["hist_item_ids"]).to_numpy(), 5)
    assert (lengths[:, 0] == 1).all()
    assert (lengths[:, 1:].sum(1).numpy() == hist_len).all()
    assert (lengths[:, 1:].diff(dim=1) >= 0).all()  # empty slots first, behaviours right-aligned
    values = batch.sequence["item_seq"].values()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.sum(1).cumsum(0)])
    for row in (0, 17, 63):
        ids = values[offsets[row]:offsets[row + 1]].tolist()
        hist = events["hist_item_ids"][row].as_py()
        assert ids[0] == events["target_item_id"][row].as_py()
        assert ids[1:] == hist[-5:]
    assert torch.equal(batch.sequence["mm_item_seq"].values(), values)
    assert (batch.pooled["user_id"].lengths() == 1).all()
    assert batch.dense_features.shape == (64, 2) and (batch.meta["weight"] == 1).all()


def test_every_rank_steps_the_same_number_of_times(world):
    items = ItemInfo.from_items(world / "items.parquet")
    config = LoaderConfig(batch_size=512, max_hist_len=3)
    counts = [sum(1 for _ in CtrEventsLoader(world / "events_test.parquet", items, config, r, 2,
                                             drop_last=False).iterate(0)) for r in range(2)]
    assert counts[0] == counts[1] >= 1


@pytest.mark.parametrize("ranks, said", [(1, "on 1 rank"), (2, "on 2 ranks")])
def test_events_too_few_for_a_batch_are_refused_naming_the_ranks(world, ranks, said):
    """One rank read "per rank on 1 ranks"."""
    items = ItemInfo.from_items(world / "items.parquet")
    with pytest.raises(DataError, match=rf"events_test.parquet: \d+ events are fewer than one batch of 1000000 per "
                                        rf"rank {said}$"):
        CtrEventsLoader(world / "events_test.parquet", items, LoaderConfig(batch_size=1_000_000), 0, ranks)


def _mm_optimizer_state(optimizer) -> list:
    return [v for k, v in optimizer.state_dict()["state"].items() if "mm_item" in k and v]


def _layout_twins(ubm: str, layout_sizes: dict):
    """A CiUBM per sequence layout with the same weights (the tables mapped by name)."""
    torch.manual_seed(0)
    models = {layout: CiUBM(ModelConfig(ubm=ubm, mm_dim=10, sequence_layout=layout), **layout_sizes)
              for layout in ("ebc", "ec")}
    source = models["ebc"].state_dict()
    by_table = {key.rsplit(".", 2)[-2]: value for key, value in source.items() if "sparse_arch" in key}
    target = {key: by_table[key.rsplit(".", 2)[-2]] if "sparse_arch" in key else source[key]
              for key in models["ec"].state_dict()}
    models["ec"].load_state_dict(target)
    return models



def test_right_aligned_slots_put_the_target_first_and_the_behaviours_last():
    from mim_rec.ciubm.sparse import right_aligned_slots

    # a target alone; a target and 2 behaviours; a target and 1 behaviour; 4 slots each
    index, present = right_aligned_slots(torch.tensor([1, 3, 2]), 4, 6)
    assert index.tolist() == [0, 4 + 0, 4 + 2, 4 + 3, 8 + 0, 8 + 3]
    assert present.int().tolist() == [[1, 0, 0, 0], [1, 0, 1, 1], [1, 0, 0, 1]]

def _dien_model_and_batch(world, **options):
    """A small DIEN CiUBM with every interest module on, and its first training batch."""
    items = ItemInfo.from_items(world / "items.parquet")
    sizes = ciubm.table_sizes(str(world), items)
    torch.manual_seed(0)
    model = CiUBM(ModelConfig(ubm="dien", mm_dim=16, over_arch=[8], **options), num_items=sizes["items"],
                  num_users=sizes["users"], num_categories=sizes["categories"]).eval()
    config = LoaderConfig(batch_size=32, max_hist_len=6, shuffle=False)
    return model, next(iter(CtrEventsLoader(world / "events_train.parquet", items, config)))


def test_non_finite_padding_slots_reach_no_logit_and_no_gradient(world, monkeypatch):
    """NaN or inf in a padded slot's ID or MM row used to reach the logits (cos * mask, the
    einsum over padded rows) and the gradients (scorers run on padded behaviours): the behaviours
    enter the interest modules with padding zeroed, so the result is that of zero padding."""
    model, batch = _dien_model_and_batch(world, content_metric=True)
    lookup = model.sparse_arch.forward
    results = []
    for fill in (None, float("nan"), float("inf")):
        def poisoned(*args, fill=fill):
            pooled, ids, mm, present, categories = lookup(*args)
            if fill is not None:
                ids, mm = (values.masked_fill(~present.unsqueeze(-1), fill) for values in (ids, mm))
            return pooled, ids, mm, present, categories

        monkeypatch.setattr(model.sparse_arch, "forward", poisoned)
        model.zero_grad(set_to_none=True)
        logits, aux = model(batch)
        (logits.sum() + aux).backward()
        results.append([logits, aux] + [p.grad for p in model.parameters() if p.grad is not None])
    clean, *poisoned_runs = results
    assert (~lookup(batch.pooled, batch.sequence, 32, batch.slots)[3]).any()  # the batch has padded slots
    assert all(torch.isfinite(t).all() for t in clean)
    for other in poisoned_runs:
        assert len(other) == len(clean) and all(torch.equal(a, b) for a, b in zip(clean, other))


def test_the_auxiliary_loss_counts_only_rows_of_weight_above_zero(world):
    """DIEN's auxiliary loss used to train on the weight-0 rows a loader pads a batch with, so a
    rank's all-padding filler batch still moved the extractor."""
    model, batch = _dien_model_and_batch(world)
    logits, aux = model(batch)
    assert aux > 0 and torch.equal(aux, model.id_interest.auxiliary_loss())  # every weight 1: unchanged
    batch.meta["weight"] = torch.zeros_like(batch.meta["weight"])
    logits, aux = model(batch)
    loss, parts = ciubm.ctr_loss(logits, aux, batch, aux_weight=1.0)
    loss.backward()
    assert parts.tolist() == [0.0, 0.0, 0.0]
    assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("ubm", ["avg", "din", "dien", "bst", "sim", "twin"])
def test_ec_and_ebc_layouts_compute_the_same_logits(world, ubm):
    """The loader's per-sample sequences and the EmbeddingCollections place every row in the slot
    the single-bag layout gives it, padding included (SIM reads the slots' categories; BST
    their positions), and the MM table reads the same rows (10 wide: stored padded in both)."""
    items = ItemInfo.from_items(world / "items.parquet")
    sizes = ciubm.table_sizes(str(world), items)
    models = _layout_twins(ubm, {"num_items": sizes["items"], "num_users": sizes["users"],
                                 "num_categories": sizes["categories"]})
    logits = {}
    for layout, model in models.items():
        config = LoaderConfig(batch_size=96, max_hist_len=12, shuffle=False, sequence_layout=layout)
        batch = next(iter(CtrEventsLoader(world / "events_train.parquet", items, config)))
        assert batch.slots == 13 and batch.sequence.stride() == (96 * 13 if layout == "ebc" else 96)
        model.eval()
        with torch.no_grad():
            logits[layout], _ = model(batch)
    torch.testing.assert_close(logits["ec"], logits["ebc"], rtol=1e-5, atol=1e-6)

def test_training_beats_a_constant_predictor(world, tmp_path, capsys):
    config = _config(world, tmp_path / "run", "epochs=2", "model.ubm=din")
    report = ciubm.run(config)
    assert "no mm_table= given" in capsys.readouterr().err  # it trained on random vectors silently
    labels = pq.read_table(world / "events_test.parquet")["label"].to_numpy()
    rate = labels.mean()
    constant_logloss = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert report["auc"] > 0.6 and report["logloss"] < constant_logloss


def test_content_match_is_the_mean_and_max_weight_over_real_behaviours():
    weights = torch.tensor([[0.5, -0.2, 0.0], [0.0, 0.0, 0.0], [-0.4, -0.1, 0.0]])
    mask = torch.tensor([[True, True, False], [False, False, False], [True, True, False]])
    expected = torch.tensor([[0.15, 0.5], [0.0, 0.0], [-0.25, -0.1]])
    assert torch.allclose(content_match(weights, mask), expected)


def test_content_weights_are_the_cosines_of_the_real_behaviours_and_zero_elsewhere():
    """``a_ti = cos(h_t, h_i)`` on real behaviours, 0 for an item without a vector and on padding,
    whatever the padded slot holds: ``cos * mask`` gave NaN there for a NaN or inf, and a NaN
    gradient to the target (CiUBM itself zeroes padding before calling it)."""
    from mim_rec.ciubm.interest import content_weights

    generator = torch.Generator().manual_seed(4)
    target, behaviours = torch.randn(2, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    behaviours[0, 1] = 0.0  # a real behaviour without an MM vector
    mask = torch.tensor([[True, True, False], [True, True, True]])
    expected = torch.where(mask, torch.nn.functional.cosine_similarity(target[:, None], behaviours, dim=-1), 0.0)
    torch.testing.assert_close(content_weights(target, behaviours, mask), expected)
    gradients = []
    for fill in (0.0, float("nan"), float("inf")):
        weighted_target = target.clone().requires_grad_(True)
        weights = content_weights(weighted_target, behaviours.masked_fill(~mask.unsqueeze(-1), fill), mask)
        weights.sum().backward()
        assert torch.equal(weights, content_weights(target, behaviours.masked_fill(~mask.unsqueeze(-1), 0.0), mask))
        gradients.append(weighted_target.grad)
    assert torch.isfinite(gradients[0]).all() and all(torch.equal(g, gradients[0]) for g in gradients)


def test_mean_content_pool_divides_the_weighted_sum_by_the_real_behaviours():
    from mim_rec.ciubm.interest import ContentInterestArch

    weights = torch.tensor([[0.5, -0.2, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    vectors = torch.tensor([[[2.0, 0.0], [0.0, 5.0], [9.0, 9.0]], [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])
    summed = ContentInterestArch("sum")(weights, vectors, mask)
    assert torch.allclose(summed, torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    assert torch.allclose(ContentInterestArch("mean")(weights, vectors, mask), summed / torch.tensor([[2.0], [1.0]]))


def test_content_metric_starts_at_the_fixed_cosine_ignores_padding_and_learns():
    from mim_rec.ciubm.interest import ContentMetric, content_weights

    generator = torch.Generator().manual_seed(2)
    target, behaviours = torch.randn(3, 5, generator=generator), torch.randn(3, 4, 5, generator=generator)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [False] * 4])
    metric = ContentMetric(5)
    weights = metric(target, behaviours, mask)
    torch.testing.assert_close(weights, content_weights(target, behaviours, mask))  # the paper's a_ti at start
    assert torch.all(weights[~mask] == 0)
    # whatever sits in a padded slot changes nothing
    noisy = behaviours.clone()
    noisy[~mask] = 100 * torch.randn(int((~mask).sum()), 5, generator=generator)
    torch.testing.assert_close(metric(target, noisy, mask), weights)
    weights.sum().backward()
    assert metric.map.weight.grad is not None and metric.map.weight.grad.abs().sum() > 0
    sizes = {"num_items": 50, "num_users": 10, "num_categories": 4}
    assert CiUBM(ModelConfig(ubm="avg", mm_dim=16), **sizes).content_metric is None  # off by default
    learned = CiUBM(ModelConfig(ubm="avg", mm_dim=16, mm_whiten=6, content_metric=True), **sizes)
    assert learned.content_metric.map.weight.shape == (6, 6)  # acts on the whitened view


def test_mm_projection_and_content_match_set_the_over_arch_width():
    sizes = {"num_items": 50, "num_users": 10, "num_categories": 4}
    plain = CiUBM(ModelConfig(ubm="avg", mm_dim=16), **sizes)
    projected = CiUBM(ModelConfig(ubm="avg", mm_dim=16, mm_projection=4, content_match=True), **sizes)
    first = lambda model: model.over_arch.mlp[0].in_features
    # target MM and content interest each shrink from 16 to 4; content match adds 2 scalars
    assert first(plain) - first(projected) == 2 * (16 - 4) - 2
    assert isinstance(plain.mm_projection, torch.nn.Identity)
    whitened = CiUBM(ModelConfig(ubm="avg", mm_dim=16, mm_whiten=6), **sizes)
    assert first(plain) - first(whitened) == 2 * (16 - 6)
    assert not any("mm_whitening" in name for name, _ in whitened.named_parameters())  # buffers only
    # a table narrower than mm_whiten is whitened in full (one setting for a grid of tables)
    narrow = CiUBM(ModelConfig(ubm="avg", mm_dim=4, mm_whiten=6), **sizes)
    assert narrow.mm_whitening.projection.shape == (4, 4)
    assert first(narrow) - first(CiUBM(ModelConfig(ubm="avg", mm_dim=4), **sizes)) == 0
    no_target = CiUBM(ModelConfig(ubm="avg", mm_dim=16, target_mm=False), **sizes)
    assert first(plain) - first(no_target) == 16  # the target's MM vector left out


def test_whitening_statistics_give_unit_covariance_in_any_chunking():
    from mim_rec.ciubm.whitening import MMWhitening, whitening_statistics

    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(500, 6, generator=generator) @ torch.randn(6, 6, generator=generator) + 3.0
    mean, projection = whitening_statistics(lambda a, b: rows[a:b], 500, components=4)
    chunked = whitening_statistics(lambda a, b: rows[a:b], 500, components=4, chunk=37)
    torch.testing.assert_close(chunked[0], mean)
    torch.testing.assert_close(chunked[1].abs(), projection.abs(), rtol=1e-4, atol=1e-5)  # up to signs
    layer = MMWhitening(6, 4)
    layer.mean.copy_(mean)
    layer.projection.copy_(projection)
    white = layer(rows)
    torch.testing.assert_close(white.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(white.T @ white / 500, torch.eye(4), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="mm_whiten must be in 1..6"):
        MMWhitening(6, 7)


def test_items_without_a_vector_stay_without_content_after_whitening():
    """Under mm_missing=default an item the table lacks reads a zero row; whitening centred it
    into one shared vector, so every two such items had cosine 1, and the zero rows skewed
    the fitted mean and directions."""
    from mim_rec.ciubm.whitening import MMWhitening, whitening_statistics

    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(400, 6, generator=generator) + 2.0
    with_missing = torch.cat([rows[:200], torch.zeros(100, 6), rows[200:]])
    fitted = whitening_statistics(lambda a, b: with_missing[a:b], 500, components=4, chunk=64)
    expected = whitening_statistics(lambda a, b: rows[a:b], 400, components=4)
    torch.testing.assert_close(fitted[0], expected[0])
    torch.testing.assert_close(fitted[1].abs(), expected[1].abs(), rtol=1e-4, atol=1e-5)
    layer = MMWhitening(6, 4)
    layer.mean.copy_(fitted[0])
    layer.projection.copy_(fitted[1])
    white = layer(torch.cat([torch.zeros(2, 6), rows[:3]]))
    assert torch.equal(white[:2], torch.zeros(2, 4)) and bool(white[2:].ne(0).any(dim=1).all())
    with pytest.raises(ConfigError, match="no non-zero row"):
        whitening_statistics(lambda a, b: torch.zeros(b - a, 6), 10, components=4)


def test_whitening_zeroes_directions_the_table_does_not_span():
    from mim_rec.ciubm.whitening import whitening_statistics

    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 6, generator=generator).repeat(50, 1)  # 3 distinct rows: rank 2 after centring
    _, projection = whitening_statistics(lambda a, b: rows[a:b], 150, components=5)
    assert torch.count_nonzero(projection.abs().sum(0) > 0) == 2
    white = (rows - rows.mean(0)) @ projection
    assert white.abs().max() < 10  # no amplified rounding noise
    torch.testing.assert_close(white.T @ white / 150, torch.diag(torch.tensor([1.0, 1, 0, 0, 0])),
                               atol=1e-3, rtol=0)


def test_whitening_refuses_a_table_without_variance():
    """Identical non-zero rows have rounding noise for variance; measured only against the
    largest eigenvalue (noise too) every direction passed and was scaled by about 1e7, so an
    item RIM wrote later came out of the whitening with a norm of thousands."""
    from mim_rec.ciubm.whitening import whitening_statistics

    row = torch.randn(16, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([row.repeat(1000, 1), torch.zeros(5, 16)])
    with pytest.raises(ConfigError, match="no variance"):
        whitening_statistics(lambda a, b: rows[a:b], len(rows), components=4)


def test_a_one_item_world_is_refused_for_whitening_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    """One item's MM row has no variance to whiten: it was refused only once the model was
    built and sharded, as whitening 'a collapsed encoder'. mim bench train's check, up front."""
    from tests.test_bench_train import _small_world
    from train.cli import main

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the world was refused")

    monkeypatch.setattr(ciubm, "build_sharded_model", built)
    world = _small_world(tmp_path, items=1, users=2)
    assert main(["train", f"data.world={world}", f"out={tmp_path / 'run'}", "loader.batch_size=2"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mim train: error: data.world={world} holds 1 item: the model whitens its MM table (model.mm_whiten=16), "
        "which needs 2 items or more; use more items or model.mm_whiten=0")


@pytest.mark.parametrize("options", [(), ("model.mm_projection=8", "model.content_match=true"),
                                     ("model.mm_whiten=0", "model.content_pool=sum"),  # the paper's CiUBM
                                     ("model.target_mm=false",), ("model.content_metric=true",),
                                     ("model.mm_dim=10",),  # stored 12 wide: FBGEMM's alignment
                                     ("model.sequence_layout=ec",)])
def test_mm_table_is_bit_identical_after_training_steps(world, tmp_path, options, test_device):
    config = _config(world, tmp_path / "frozen", "max_steps=4", "model.ubm=avg", f"device={test_device}", *options)
    ctx = ensure_process_group(test_device)
    items = ItemInfo.from_items(world / "items.parquet")
    model, optimizer, _ = ciubm.build_sharded_model(config, ciubm.table_sizes(config.data.world, items), ctx)
    rows_of, _ = ciubm.mm_rows(config, items.count, config.model.mm_dim)
    mm_shards.load_mm_table(model, rows_of, items.count)
    whitening = {n: b.clone() for n, b in model.named_buffers() if "mm_whitening" in n}
    assert bool(config.model.mm_whiten) == bool(whitening)
    assert all(b.abs().sum() > 0 for b in whitening.values())
    key = mm_shards.mm_table_state_key(model)
    before = [s.tensor.clone() for s in model.state_dict()[key].local_shards()]
    loader = CtrEventsLoader(world / "events_train.parquet", items, config.loader)
    progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    ciubm._train(config, model, optimizer, loader, progress, DcpCheckpoints(tmp_path / "ck"), None, ctx)
    after = [s.tensor for s in model.state_dict()[key].local_shards()]
    assert progress["global_step"] == 4
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(b, whitening[n]) for n, b in model.named_buffers() if n in whitening)  # fixed
    item_state = [v for k, v in optimizer.state_dict()["state"].items() if k.endswith(".item.weight")]
    assert item_state and item_state[0]          # the ID table trains with optimizer state
    # fused Adam where FBGEMM has its CUDA kernel (two moments), row-wise Adagrad on the CPU (one)
    assert len(item_state[0]) == (2 if test_device == "cuda" else 1), sorted(item_state[0])
    assert _mm_optimizer_state(optimizer) == []  # the MM table has none
    if config.model.content_metric:  # the learned metric is a dense parameter and trains
        metric = [w for n, w in model.named_parameters() if n.endswith("content_metric.map.weight")]
        assert len(metric) == 1 and not torch.equal(metric[0].detach().cpu(), torch.eye(16))


def test_a_data_parallel_id_table_trains_with_the_id_tables_optimizer(world, tmp_path):
    """A table the planner makes data-parallel (the small category table on one CPU rank) is a
    dense parameter to TorchRec: it was trained by the dense Adam at ``lr``, so ``id_lr`` did
    nothing to it and the same model trained differently on one rank and on two. (The ``ec``
    layout's collections are never data-parallel: TorchRec 1.9 fails on them.)"""
    from train.ciubm import PlainStep

    with pytest.raises(ConfigError, match=r"model.constraints.category.sharding_types=\['data_parallel'\]"):
        _config(world, tmp_path / "ec", "model.sequence_layout=ec", "model.constraints.category.sharding_types=[data_parallel]")
    ctx = ensure_process_group()
    items = ItemInfo.from_items(world / "items.parquet")
    moved = {}
    for id_lr in (0.05, 0.5):
        config = _config(world, tmp_path / f"dp{id_lr}", "model.ubm=avg", f"id_lr={id_lr}", "lr=0.001",
                         "model.constraints.category.sharding_types=[data_parallel]")
        model, optimizer, plan = ciubm.build_sharded_model(config, ciubm.table_sizes(config.data.world, items), ctx)
        assert [t["category"].sharding_type for t in plan.plan.values() if "category" in t] == ["data_parallel"]
        weight = next(p for n, p in model.named_parameters() if n.endswith(".category.weight"))
        before = weight.detach().clone()
        PlainStep(model, optimizer, ctx.device, 0.0).progress(iter(CtrEventsLoader(
            world / "events_train.parquet", items, config.loader)))
        moved[id_lr] = (weight.detach() - before).abs().max().item()
    assert moved[0.5] == pytest.approx(10 * moved[0.05], rel=1e-3) and moved[0.05] > 0.01


def test_the_frozen_mm_table_is_never_data_parallel(world, tmp_path):
    """A data-parallel MM table was a dense parameter: the dense Adam took it in, and a resumed
    run then failed on Adam state the checkpoint never held."""
    with pytest.raises(ConfigError, match="mm_item.sharding_types=.*never data-parallel"):
        _config(world, tmp_path / "mmdp", "model.constraints.mm_item.sharding_types=[data_parallel]")
    config = _config(world, tmp_path / "mm", "model.ubm=avg")
    items = ItemInfo.from_items(world / "items.parquet")
    _, _, plan = ciubm.build_sharded_model(config, ciubm.table_sizes(config.data.world, items),
                                           ensure_process_group())
    assert plan.plan["sparse_arch.mm"]["mm_item"].sharding_type != "data_parallel"
    assert all("data_parallel" not in s.sharding_types("cpu") + s.sharding_types("cuda")
               for s in sharders(0.1, False) if isinstance(s, (FrozenSharder, FrozenSequenceSharder)))


def test_resumed_run_equals_uninterrupted_run(world, tmp_path):
    """Resumed after its folder was moved, too: a run folder is not tied to where it was written
    (copied off a cluster, renamed)."""
    straight = ciubm.run(_config(world, tmp_path / "a", "max_steps=6", "model.ubm=sim", "log_every=1"))
    ciubm.run(_config(world, tmp_path / "b", "max_steps=3", "model.ubm=sim", "log_every=1"))
    with (tmp_path / "b" / "metrics.jsonl").open("a") as log:  # what a kill after step 4 leaves
        log.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + '{"step": 5, "lo')
    (tmp_path / "b").rename(tmp_path / "moved")
    resumed = ciubm.run(_config(world, tmp_path / "moved", "max_steps=6", "model.ubm=sim", "log_every=1"))
    assert resumed["steps"] == straight["steps"] == 6
    assert [r["step"] for r in _step_records(tmp_path / "moved")] == [1, 2, 3, 4, 5, 6]
    assert _step_losses(tmp_path / "moved") == pytest.approx(_step_losses(tmp_path / "a"), abs=1e-6)
    assert resumed["logloss"] == pytest.approx(straight["logloss"], abs=1e-7)
    assert resumed["auc"] == pytest.approx(straight["auc"], abs=1e-9)
    (tmp_path / "moved").rename(tmp_path / "moved_again")
    assert ciubm._finished(_config(world, tmp_path / "moved_again", "max_steps=6", "model.ubm=sim", "log_every=1"))
    with pytest.raises(ConfigError, match=r"holds a run trained 6 steps, more than the 3 this config trains"):
        ciubm.run(_config(world, tmp_path / "moved_again", "max_steps=3", "model.ubm=sim", "log_every=1"))


def test_a_rerun_logs_one_record_per_trained_state_and_no_shorter_run_reuses_the_folder(world, tmp_path):
    """Re-running with fewer epochs reported the longer run as the shorter one (and a grid then
    took the folder for a finished shorter run); every re-run or resume added another step-less
    eval and mm_table record, stale ones no reader could tell from the final one; and rewrote its
    newest checkpoint in place, where a kill would have left none whole."""
    two_epochs = ciubm.run(_config(world, tmp_path, "loader.batch_size=1024", "epochs=2"))
    config_json = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match=rf"trained {two_epochs['steps']} steps, more than the "
                                          rf"{two_epochs['steps'] // 2} this config trains \(epochs=1"):
        ciubm.run(_config(world, tmp_path, "loader.batch_size=1024", "epochs=1"))
    assert (tmp_path / "config.json").read_text() == config_json  # the refused run wrote nothing
    saved = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    ciubm.run(_config(world, tmp_path, "loader.batch_size=1024", "epochs=2"))  # a re-run: no step trained
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()} == saved
    three_epochs = ciubm.run(_config(world, tmp_path, "loader.batch_size=1024", "epochs=3"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [(r["event"], r["step"]) for r in records if "event" in r]
    # the 2-epoch state's evaluation stays its record when the run trains on from it (it was
    # dropped, so the state was never evaluated in the log); the re-run's repeat of it is not added
    assert events == [("mm_table", 0), ("eval", two_epochs["steps"]), ("mm_table", two_epochs["steps"]),
                      ("eval", three_epochs["steps"])]
    assert [r["auc"] for r in records if r.get("event") == "eval"] == [two_epochs["auc"], three_epochs["auc"]]


def _step_records(out) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def _step_losses(out) -> list:
    return [record["loss"] for record in _step_records(out)]


@pytest.mark.parametrize("layout, collections", [("ebc", ("pooled", "sequence", "mm")),
                                                 ("ec", ("pooled", "sequence_items", "sequence_categories", "mm"))])
def test_sparse_dist_pipeline_trains_like_the_plain_loop(world, tmp_path, caplog, layout, collections):
    """Same batches in the same order, same losses step by step (DIEN: its auxiliary loss
    too), and every sharded collection -- the frozen MM one included -- pipelined, in either
    sequence layout."""
    common = ("max_steps=5", "log_every=1", "model.ubm=dien", f"model.sequence_layout={layout}")
    plain = ciubm.run(_config(world, tmp_path / "plain", *common, "train_pipeline=plain"))
    with caplog.at_level("INFO", logger="torchrec.distributed.train_pipeline"):
        piped = ciubm.run(_config(world, tmp_path / "piped", *common, "train_pipeline=sparse_dist"))
    for name in collections:
        assert f"Module 'sparse_arch.{name}' will be pipelined" in caplog.text
    assert "will NOT be pipelined" not in caplog.text
    assert piped["steps"] == plain["steps"] == 5
    assert len(_step_losses(tmp_path / "piped")) == 5
    assert _step_losses(tmp_path / "piped") == pytest.approx(_step_losses(tmp_path / "plain"), abs=1e-6)
    assert piped["auc"] == pytest.approx(plain["auc"], abs=1e-6)
    assert piped["logloss"] == pytest.approx(plain["logloss"], abs=1e-6)
    for out in ("plain", "piped"):  # the log splits the objective into its parts
        for record in _step_records(tmp_path / out):
            assert record["aux_loss"] > 0
            assert record["loss"] == pytest.approx(record["bce"] + record["aux_loss"], rel=1e-6)


def test_a_world_changed_under_the_same_path_does_not_resume(world, tmp_path):
    """Steps 1-3 on one world and 4-6 on another used to finish as one run."""
    changing = _world_with_events(world, tmp_path / "world", lambda events: events)
    ciubm.run(_config(changing, tmp_path / "run", "max_steps=3"))
    assert set(json.loads((tmp_path / "run" / "inputs.json").read_text())) == {"items.parquet", "events_train.parquet"}
    events = pq.read_table(changing / "events_train.parquet")
    pq.write_table(events.slice(0, events.num_rows - 1), changing / "events_train.parquet")
    with pytest.raises(ConfigError, match=r"checkpoints trained on other data: .*world/events_train.parquet changed"):
        ciubm.run(_config(changing, tmp_path / "run", "max_steps=6"))
    assert ciubm.run(_config(changing, tmp_path / "run", "max_steps=3"), train=False)["steps"] == 3  # evaluates


def test_eval_only_scores_the_checkpoints_table_and_needs_no_table_folder(world, tmp_path):
    """--eval-only read mm_table= only to have the checkpoint's copy restored over it: a table
    moved since training could not be evaluated at all, and one rebuilt under the same path was
    required yet not what was scored (eval.json named it all the same)."""
    import shutil
    from dataclasses import replace

    from embeddings.build import build_table
    from tests.test_rim_ctr import IdEncoder

    table = build_table(IdEncoder(), world / "items.parquet", tmp_path / "table", shard_rows=256)
    config = _config(world, tmp_path / "run", "max_steps=2", "model.ubm=avg", f"mm_table={table}",
                     f"model.mm_dim={IdEncoder.dim}")
    trained = ciubm.run(config)
    shutil.rmtree(table)
    evaluated = ciubm.run(config, train=False)
    assert evaluated["auc"] == trained["auc"]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["mm_table"] == "the checkpoint's copy (step-000000002)"
    moved = replace(config, mm_table=str(tmp_path / "moved_table"))  # another path: not refused
    assert ciubm.run(moved, train=False)["auc"] == trained["auc"]


def test_runs_written_before_newer_settings_existed_resume_and_stay_finished(world, tmp_path):
    import torch.distributed.checkpoint as dcp

    config = _config(world, tmp_path / "old")
    # a whole (if tiny) checkpoint: a `latest` naming no checkpoint folder is damage, not a run
    dcp.save({"progress": {"global_step": torch.tensor(3)}},
             checkpoint_id=str(tmp_path / "old" / "checkpoints" / "step-000000003"))
    (tmp_path / "old" / "checkpoints" / "latest").write_text("step-000000003")
    older = {k: v for k, v in config_dict(config).items() if k != "train_pipeline"}
    for newer_setting in ("mm_projection", "content_match"):  # read back as their defaults
        del older["model"][newer_setting]
    (tmp_path / "old" / "config.json").write_text(json.dumps(older))
    (tmp_path / "old" / "metrics.json").write_text('{"steps": 3}')
    ensure_process_group()
    ciubm._refuse_foreign_checkpoints(config, DcpCheckpoints(tmp_path / "old" / "checkpoints").newest(),
                                      ciubm._training_inputs(config), 3)  # no ConfigError
    assert ciubm._finished(config)
    older["seed"] = 1
    (tmp_path / "old" / "config.json").write_text(json.dumps(older))
    assert not ciubm._finished(config)


def test_bad_events_are_refused_before_training(world, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("items.parquet", "events_test.parquet"):
        (bad / name).write_bytes((world / name).read_bytes())
    events = pq.read_table(world / "events_train.parquet")
    target = events["target_item_id"].to_numpy().copy()
    target[5] = 10_000
    events = events.set_column(events.schema.get_field_index("target_item_id"), "target_item_id",
                               pa.array(target, pa.int64()))
    pq.write_table(events, bad / "events_train.parquet")
    with pytest.raises(DataError, match=r"events_train.parquet, row 5, field 'target_item_id'"):
        ciubm.run(_config(bad, tmp_path / "never"))
    assert not (tmp_path / "never" / "checkpoints").exists()


def _world_with_events(world, folder, edit_train):
    """A copy of ``world`` whose events_train is ``edit_train(table)``."""
    folder.mkdir()
    for name in ("items.parquet", "events_test.parquet"):
        (folder / name).write_bytes((world / name).read_bytes())
    pq.write_table(edit_train(pq.read_table(world / "events_train.parquet")), folder / "events_train.parquet")
    return folder


def test_an_mm_table_manifest_without_a_dim_is_refused_in_a_sentence(world, tmp_path):
    """The table's width is read from its manifest when model.mm_dim is not given; a manifest
    without one (written by hand) stopped ``mim train`` with a bare ``TypeError`` from ``int(None)``."""
    from mim_rec.data.errors import ManifestMismatch
    from mim_rec.data.manifest import Manifest, write_manifest

    write_manifest(tmp_path / "table", Manifest(kind="mm_table", stage="mfm", row_count=10))
    with pytest.raises(ManifestMismatch, match=r"table: its manifest gives no dim"):
        ciubm.load_train_config(None, [f"data.world={world}", f"out={tmp_path / 'run'}",
                                       f"mm_table={tmp_path / 'table'}"])


def test_raw_unmapped_user_ids_are_refused_before_sizing_a_table(world, tmp_path):
    """A user id of 1e11 used to reach the planner as an 800 GB table."""
    def raw_user(events):
        users = events["user_id"].to_numpy().copy()
        users[5] = 10 ** 11
        return events.set_column(events.schema.get_field_index("user_id"), "user_id", pa.array(users, pa.int64()))

    bad = _world_with_events(world, tmp_path / "bad", raw_user)
    with pytest.raises(DataError, match=r"events_train.parquet, row 5, field 'user_id': user_id 100000000000 "
                                        r"would size a 100,000,000,001-row table") as info:
        ciubm.run(_config(bad, tmp_path / "never"))
    assert "ids must be dense" in str(info.value)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_events_file_is_named_before_training(world, tmp_path, split):
    """An empty test split used to be found only by the evaluation, after the whole run."""
    empty = _world_with_events(world, tmp_path / "empty", lambda events: events)
    path = empty / f"events_{split}.parquet"
    pq.write_table(pq.read_table(path).slice(0, 0), path)
    with pytest.raises(DataError, match=rf"events_{split}.parquet: holds no events: a CTR run needs {split} events"):
        ciubm.run(_config(empty, tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_an_empty_items_file_is_named_before_training(world, tmp_path):
    """An items.parquet without rows ended mim train in a bare numpy ValueError (the largest
    category of no items), naming no file."""
    empty = _world_with_events(world, tmp_path / "empty", lambda events: events)
    path = empty / "items.parquet"
    pq.write_table(pq.read_table(path).slice(0, 0), path)
    with pytest.raises(DataError, match=r"items.parquet: holds no rows") as info:
        ciubm.run(_config(empty, tmp_path / "never"))
    assert info.value.file == str(path)
    assert not (tmp_path / "never").exists()


def test_a_world_without_its_test_split_is_refused_before_training(world, tmp_path):
    """It used to train every step, then fail at the evaluation with a raw FileNotFoundError."""
    partial = _world_with_events(world, tmp_path / "partial", lambda events: events)
    (partial / "events_test.parquet").unlink()
    with pytest.raises(DataError, match=r"events_test.parquet: no such file"):
        ciubm.run(_config(partial, tmp_path / "never", "max_steps=2"))
    assert not (tmp_path / "never" / "checkpoints").exists()


def test_grid_runs_equal_single_runs_and_skip_finished_ones(world, tmp_path, capsys):
    base = [f"data.world={world}", *FAST, "max_steps=3"]
    grid = [{"name": "avg", "overrides": [f"out={tmp_path / 'g_avg'}", "model.ubm=avg"]},
            {"name": "din_base", "overrides": [f"out={tmp_path / 'g_din'}", "model.ubm=din",
                                               "model.content_interest=false", "seed=3"]}]
    ciubm.run_grid(None, base, grid)
    single = ciubm.run(ciubm.load_train_config(None, [*base, f"out={tmp_path / 's_din'}", "model.ubm=din",
                                                      "model.content_interest=false", "seed=3"]))
    gridded = json.loads((tmp_path / "g_din" / "metrics.json").read_text())
    assert gridded["auc"] == pytest.approx(single["auc"], abs=1e-9) and gridded["steps"] == 3
    assert json.loads((tmp_path / "g_avg" / "config.json").read_text())["model"]["ubm"] == "avg"
    capsys.readouterr()
    ciubm.run_grid(None, base, grid)
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    changed = [{"name": "avg", "overrides": [f"out={tmp_path / 'g_avg'}", "model.ubm=avg", "seed=5"]}]
    with pytest.raises(ConfigError, match=r"another config \(differs in: seed\)"):
        ciubm.run_grid(None, base, changed)  # never resumed from the seed-0 run's checkpoints
    # --eval-only --grid starts each run from its own config.json, as a single --eval-only does
    # (it rebuilt them from the defaults and refused the runs as "another config")
    by_folder = [{"name": e["name"], "overrides": e["overrides"][:1]} for e in grid]
    ciubm.run_grid(None, [f"data.world={world}"], by_folder, train=False)
    assert json.loads((tmp_path / "g_din" / "eval.json").read_text())["auc"] == pytest.approx(gridded["auc"], abs=1e-9)
    shared = [{"name": "a", "overrides": ["model.ubm=avg"]}, {"name": "b", "overrides": ["model.ubm=din"]}]
    with pytest.raises(ConfigError, match=r"--grid: runs 'a' and 'b' both write out=.*shared; give each its own"):
        ciubm.run_grid(None, [*base, f"out={tmp_path / 'shared'}"], shared)  # refused before run a trained
    assert not (tmp_path / "shared").exists()


def test_a_changed_setting_is_named_by_its_dotted_key(tmp_path):
    """A refused resume (and a grid's or report's "other settings") named only the section,
    "differs in: model", whichever of its settings changed; a section --eval-only may change
    (``data``) still covers every key inside it, and a key it may change (``loader.batch_size``)
    only that key."""
    from train.common import changed_settings

    settings = [f"out={tmp_path}", "model.mm_dim=8"]
    trained = ciubm.load_train_config(None, ["data.world=w", *settings], check_device=False)
    (tmp_path / "config.json").write_text(json.dumps(config_dict(trained)))
    now = ciubm.load_train_config(None, ["data.world=other", *settings, "model.ubm=bst", "loader.batch_size=64",
                                         "loader.max_hist_len=5", "model.constraints.item.sharding_types=[table_wise]"],
                                  check_device=False)
    assert changed_settings(now, ciubm.EXECUTION_ONLY, ciubm.PATH_SETTINGS) == [
        "data.world", "loader.batch_size", "loader.max_hist_len", "model.constraints.item.sharding_types", "model.ubm"]
    assert changed_settings(now, ciubm.EXECUTION_ONLY | ciubm.EVAL_ONLY_CHANGES, ciubm.PATH_SETTINGS) == [
        "loader.max_hist_len", "model.constraints.item.sharding_types", "model.ubm"]


def test_the_help_says_which_seed_orders_the_data(capsys):
    """`mim train --help` said the data order was a function of ``(seed, epoch)``, the run's
    seed, which orders nothing: a grid over seeds trains on the same batches (docs/ciubm.md)."""
    from train.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "a pure function of ``(loader.seed, epoch)``" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("rank, announced", [("0", True), ("1", False)])
def test_only_rank_zero_announces_the_grid_runs(tmp_path, monkeypatch, capsys, rank, announced):
    """Under torchrun every rank printed each "grid [i/n]" line, so each run read as started twice."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # as before a launch's first run
    trained = []
    monkeypatch.setattr(ciubm, "run", lambda config, train=True: trained.append(config.out))
    monkeypatch.setattr(ciubm, "_finished", lambda config: config.out.endswith("done"))
    grid = [{"name": name, "overrides": [f"out={tmp_path / name}"]} for name in ("done", "todo")]
    ciubm.run_grid(None, ["data.world=w", "model.mm_dim=8"], grid)
    assert trained == [str(tmp_path / "todo")]
    lines = capsys.readouterr().out.splitlines()
    assert lines == (["grid [1/2] done: finished earlier, skipped", f"grid [2/2] todo: {tmp_path / 'todo'}"]
                     if announced else [])


@pytest.mark.parametrize("text, message", [
    ('{"name": "a"}', "expected a JSON list"),
    ('[{"name": "a", "overrides": "model.ubm=din"}]', "run 0 must be"),
    ('[{"name": "a", "overrides": []}, {"name": "a", "overrides": []}]', "run 1: duplicate name 'a'"),
    ("[{", "grid.json"),
    ("[]", "the list of runs is empty"),  # exited 0 having trained nothing
    ('[{"name": "caf\xe9"}]', "'utf-8' codec can't decode"),  # written in Latin-1: was a traceback
])
def test_bad_grid_files_are_refused(tmp_path, text, message):
    path = tmp_path / "grid.json"
    path.write_text(text, encoding="latin-1")
    with pytest.raises(ConfigError, match=message):
        ciubm.load_grid(str(path))


def test_a_missing_grid_file_is_named_as_such(tmp_path, capsys):
    """A --grid path that did not exist was refused with a raw ``[Errno 2] No such file or directory``."""
    from train.cli import main

    missing = tmp_path / "absent.json"
    assert main(["train", "--grid", str(missing), f"out={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip() == f"mim train: error: --grid {missing}: no such file"
    with pytest.raises(ConfigError, match=r"--grid .*: a folder, not a grid file"):
        ciubm.load_grid(str(tmp_path))



@pytest.mark.parametrize("override, message", [
    ("loader.batch_size=0", r"loader.batch_size=0: must be positive"),
    ("checkpoint_every=0", r"checkpoint_every=0: must be positive"),
    ("loader.max_hist_len=-1", r"loader.max_hist_len=-1: must be positive"),
    ("epochs=0", r"epochs=0: must be positive"),
    ("lr=-0.1", r"lr=-0.1: must be positive"),
    ("model.ubm=dinn", r"model.ubm='dinn': choose one of avg, bst, dien, din, sim, twin"),
    ("model.item_dim=10", r"model.item_dim=10: FBGEMM's embedding kernels need a multiple of 4"),
    ("model.dien_aux_weight=nan", r"model.dien_aux_weight=nan: must not be negative"),
    ("model.dien_aux_weight=-5", r"model.dien_aux_weight=-5.0: must not be negative"),
    ("model.mm_whiten=-1", r"model.mm_whiten=-1: must not be negative"),
    ("loader.seed=-5", r"loader.seed=-5: must not be negative"),
    ("model.ubm=twin model.ubm_options={num_heads: 0}", r"num_heads=0: must be a positive integer"),
    ("model.ubm=bst model.ubm_options={max_positions: 0}", r"max_positions=0: must be a positive integer"),
    ("out=", r"out='': a run folder is required"),
    ("out={tmp_path}/a_file", r"a_file': a run folder is required, not a file"),
])
def test_settings_that_cannot_train_are_refused_by_key(tmp_path, override, message):
    """Before any data is read: a zero batch size or interval used to surface as a
    ZeroDivisionError mid-run, zero epochs as a silently untrained model, out= a file as a
    FileExistsError traceback."""
    (tmp_path / "a_file").write_text("")
    override = override.replace("{tmp_path}", str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        ciubm.load_train_config(None, [f"data.world={tmp_path}", *override.split(" ", 1)])


def test_a_diverged_run_stops_before_checkpointing_nan_weights(world, tmp_path, capsys):
    """A NaN loss used to be checkpointed (poisoning every resume) and then fail the
    evaluation with a message about applying sigmoid to logits."""
    from train.cli import main

    out = tmp_path / "diverged"
    assert main(["train", f"data.world={world}", f"out={out}", *FAST, "max_steps=4",
                 "lr=1e30", "id_lr=1e30"]) == 1
    assert "the training loss is not finite" in capsys.readouterr().err
    assert not (out / "checkpoints" / "latest").is_file() and not (out / "metrics.json").exists()

def _csft_run(folder):
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "step-000000003.pt").write_bytes(b"a C-SFT checkpoint")
    (folder / "config.json").write_text(json.dumps({"encoders": "runs/p/encoders", "steps": 300, "negatives": {},
                                                    "loss": {}, "data": {}}))
    (folder / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
    return "holds checkpoints/step-000000003.pt, which is not a `mim train` run's"


def _csft_config_only(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"encoders": "e", "steps": 300, "negatives": {}, "loss": {},
                                                    "data": {}}))
    return "its config.json is a `mim csft` run's, not a `mim train` run's (settings encoders, loss, negatives, steps)"


def _pretrain_run(folder):
    (folder / "encoders").mkdir(parents=True)
    return "holds encoders, which is not a `mim train` run's"


@pytest.mark.parametrize("fill", [_csft_run, _csft_config_only, _pretrain_run])
def test_training_refuses_a_folder_that_is_not_a_train_runs(world, tmp_path, fill):
    """mim train looked only for its own (DCP) checkpoints: it rewrote another stage's
    config.json and trimmed its metrics.jsonl, leaving that run unusable."""
    out = tmp_path / "out"
    message = fill(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=re.escape(message)):
        ciubm.run(_config(world, out, "max_steps=1", "model.ubm=avg"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_training_refuses_the_world_folder(world, tmp_path):
    with pytest.raises(ConfigError, match=r"holds events_test.parquet, events_train.parquet, items.parquet"):
        ciubm.run(_config(world, world, "max_steps=1", "model.ubm=avg"))
    assert not (world / "checkpoints").exists()


def test_eval_only_runs_on_another_kind_of_host(world, tmp_path):
    """docs/ciubm.md says --eval-only scores a GPU-trained run on a CPU host and the reverse;
    the changed device= was refused as another config."""
    trained = ciubm.run(_config(world, tmp_path, "max_steps=2", "model.ubm=avg", "device=cpu"))
    evaluated = ciubm.run(_config(world, tmp_path, "max_steps=2", "model.ubm=avg", "device=auto"), train=False)
    assert evaluated["auc"] == pytest.approx(trained["auc"], abs=1e-9)


def _counts(report: dict) -> dict:
    """A report's event and click counts: overall, per category and per item-age bucket."""
    return {"all": (report["n"], report["positives"]),
            **{f"category {c}": (row["n"], row["positives"]) for c, row in report["per_category"].items()},
            **{row["bucket"]: (row["n"], row["positives"]) for row in report["age_deciles"]}}


def test_the_written_metrics_count_every_categorys_events_and_clicks(world, tmp_path):
    """metrics.json gave a category's AUC without its clicks: one over 3 read like one over 3,000."""
    ciubm.run(_config(world, tmp_path, "max_steps=1", "model.ubm=avg"))
    written = json.loads((tmp_path / "metrics.json").read_text())
    events = pq.read_table(world / "events_test.parquet", columns=["target_item_id", "label"])
    category = ItemInfo.from_items(world / "items.parquet").category[events["target_item_id"].to_numpy()]
    labels = events["label"].to_numpy()
    assert {c: (row["n"], row["positives"]) for c, row in written["per_category"].items()} == {
        str(c): (int((category == c).sum()), int(labels[category == c].sum())) for c in np.unique(category)}


def _evaluated_events(world, batch_size: int, ranks: int) -> collections.Counter:
    """The rows of weight > 0 that evaluation's loaders give ``ranks`` ranks, as a multiset."""
    items = ItemInfo.from_items(world / "items.parquet")
    config = LoaderConfig(batch_size=batch_size, max_hist_len=3, shuffle=False)
    rows = collections.Counter()
    for rank in range(ranks):
        for batch in CtrEventsLoader(world / "events_test.parquet", items, config, rank, ranks, drop_last=False):
            keep = batch.meta["weight"] > 0
            rows.update(zip(batch.meta["user_id"][keep].tolist(), batch.meta["item_age_days"][keep].tolist(),
                            batch.labels[keep].tolist()))
    return rows


def test_evaluation_scores_every_test_event_once_whatever_the_batch_and_ranks(world):
    """What lets --eval-only take another loader.batch_size: no event is dropped or counted twice."""
    every = _evaluated_events(world, 100_000, 1)
    assert sum(every.values()) == pq.read_metadata(world / "events_test.parquet").num_rows
    for batch_size, ranks in ((100, 1), (100, 3), (256, 2), (100_000, 2)):
        assert _evaluated_events(world, batch_size, ranks) == every, (batch_size, ranks)


def test_eval_only_with_another_batch_size_scores_the_same(world, tmp_path):
    """Another loader.batch_size was refused as "another config", though evaluation scores
    every test event once whatever the batch (a short or padding batch's repeated rows weigh 0
    and are left out) and each event's logit reads its own row only; so were the training
    order's settings, though the test events are read in file order."""
    trained = ciubm.run(_config(world, tmp_path, "max_steps=2", "model.ubm=din"))
    for changed in (["loader.batch_size=100"],  # a short last batch
                    ["loader.batch_size=100000"],  # one batch holding every event
                    ["loader.seed=7", "loader.shuffle_row_groups=1", "loader.shuffle=false"]):  # the training order
        evaluated = ciubm.run(_config(world, tmp_path, "max_steps=2", "model.ubm=din", *changed), train=False)
        assert _counts(evaluated) == _counts(trained)
        assert [evaluated[k] for k in ("auc", "gauc", "logloss")] == pytest.approx(
            [trained[k] for k in ("auc", "gauc", "logloss")], abs=1e-6)
        assert {c: row["auc"] for c, row in evaluated["per_category"].items()} == pytest.approx(
            {c: row["auc"] for c, row in trained["per_category"].items()}, abs=1e-6)


def test_eval_only_without_a_checkpoint_is_refused(world, tmp_path):
    """It used to evaluate an untrained model and write its AUC into metrics.json."""
    with pytest.raises(ConfigError, match=r"--eval-only: out=.*empty holds no checkpoint"):
        ciubm.run(_config(world, tmp_path / "empty"), train=False)
    assert not (tmp_path / "empty" / "metrics.json").exists()


def _two_rank_work(rank: int, device, world: str, out: str) -> dict:
    torch.set_num_threads(1)
    return ciubm.run(ciubm.load_train_config(None, [f"data.world={world}", f"out={out}", *FAST,
                                                    "max_steps=8", "model.ubm=twin", "device=cpu"]))


@pytest.mark.slow
def test_two_gloo_ranks_train_and_evaluate(world, tmp_path):
    report, _ = run_on_spawned_ranks(_two_rank_work, 2, "cpu", str(world), str(tmp_path / "two"))
    assert report["steps"] == 8 and report["n"] == pq.read_metadata(world / "events_test.parquet").num_rows
    assert (tmp_path / "two" / "checkpoints" / "latest").is_file()


def _one_category_ec_work(rank: int, device, world: str, out: str, *extra: str):
    torch.set_num_threads(1)
    try:
        return ciubm.run(ciubm.load_train_config(None, [f"data.world={world}", f"out={out}", *FAST, "max_steps=2",
                                                        "model.ubm=din", "model.sequence_layout=ec", "device=cpu",
                                                        *extra]))
    except ConfigError as exc:
        return str(exc)


@pytest.mark.slow
def test_a_table_too_small_for_a_row_block_on_every_rank_is_planned_table_wise(tmp_path, capsys):
    """The planner split the ec layout's 1-row category table into row blocks 1 and 0, and the
    rank with none died in fbgemm's lookup ("weights[0] must be a GPU or MTIA tensor")."""
    world = generate_world(dataclasses.replace(tiny(SynthConfig(seed=4)), categories=1), tmp_path / "world")
    report, _ = run_on_spawned_ranks(_one_category_ec_work, 2, "cpu", str(world), str(tmp_path / "run"))
    assert report["steps"] == 2
    assert re.search(r"^category\s*\|\s*table_wise\s*\|", (tmp_path / "run" / "plan.txt").read_text(), re.M)
    refusal, _ = run_on_spawned_ranks(_one_category_ec_work, 2, "cpu", str(world), str(tmp_path / "pinned"),
                                      "model.constraints.category.sharding_types=[row_wise]")
    assert "model.constraints.category.sharding_types=['row_wise']: row-wise over 2 ranks splits the table " \
           "into row blocks [1, 0]" in refusal
    narrowed, _ = run_on_spawned_ranks(_one_category_ec_work, 2, "cpu", str(world), str(tmp_path / "either"),
                                       "model.constraints.category.sharding_types=[row_wise,table_wise]")
    assert narrowed["steps"] == 2  # a constraint that allows table_wise is narrowed to it


@pytest.mark.slow
def test_a_one_process_torchrun_launch_trains(world, tmp_path, test_device):
    """torchrun (or TorchX's dist.ddp -j 1x1) with one process sets WORLD_SIZE=1: the trainer
    must still start the process group DMP's planner needs ("The default process group is not
    yet initialized" on a one-GPU host before)."""
    out = tmp_path / "one"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", f"--master-port={free_port()}",
         "-m", "train.cli", "train", f"data.world={world}", f"out={out}", *FAST, "max_steps=3", "model.ubm=din",
         "model.sequence_layout=ec", f"device={test_device}"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


def _two_rank_resume_work(rank: int, device, world: str, folder: str, layout: str) -> list:
    """Straight 6 steps in ``a``; 3 steps in ``b``, then ``b`` resumed to 6, in one process group."""
    torch.set_num_threads(1)
    return [ciubm.run(ciubm.load_train_config(None, [
        f"data.world={world}", f"out={folder}/{out}", *FAST, f"max_steps={steps}", "model.ubm=din",
        f"model.sequence_layout={layout}", "log_every=1", "device=cpu"]))
        for out, steps in (("a", 6), ("b", 3), ("b", 6))]


def _one_rank_after_two(rank: int, device, world: str, folder: str, layout: str):
    """``(report, refusal)``: the 2-rank run ``a`` evaluated on one rank, and the error that
    refuses to train it on there."""
    one_rank = [f"data.world={world}", f"out={folder}/a", *FAST, "model.ubm=din",
                f"model.sequence_layout={layout}", "log_every=1", "device=cpu"]
    evaluated = ciubm.run(ciubm.load_train_config(None, [*one_rank, "max_steps=6"]), train=False)
    try:
        ciubm.run(ciubm.load_train_config(None, [*one_rank, "max_steps=8"]))
    except ConfigError as err:
        return evaluated, str(err)
    return evaluated, ""


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ebc", "ec"])
def test_two_gloo_ranks_resume_exactly(world, tmp_path, layout):
    """On 2 ranks the frozen MM table's stateless optimizer entry used to break DCP's load
    ('Missing key in checkpoint state_dict: optimizer.state.sparse_arch.mm...')."""
    (straight, _, resumed), _ = run_on_spawned_ranks(_two_rank_resume_work, 2, "cpu", str(world), str(tmp_path),
                                                     layout)
    assert straight["steps"] == resumed["steps"] == 6
    assert _step_losses(tmp_path / "b") == pytest.approx(_step_losses(tmp_path / "a"), abs=1e-6)
    assert resumed["auc"] == pytest.approx(straight["auc"], abs=1e-6)
    assert resumed["logloss"] == pytest.approx(straight["logloss"], abs=1e-6)

    # One process: the 2-rank checkpoint evaluates (DCP reshards the weights to this plan) and
    # gives the same figures; training on from it is refused, naming the ranks it needs. A
    # fresh process, so its gloo group is its own whatever this one runs on.
    [(evaluated, refusal)] = run_on_spawned_ranks(_one_rank_after_two, 1, "cpu", str(world), str(tmp_path), layout)
    assert evaluated["steps"] == 6
    assert evaluated["auc"] == pytest.approx(straight["auc"], abs=1e-6)
    assert evaluated["logloss"] == pytest.approx(straight["logloss"], abs=1e-6)
    assert "written by 2 ranks and this run has 1: resume it on 2" in refusal
    assert (tmp_path / "a" / "metrics.json").is_file()  # refused before the run folder was touched


def test_a_run_trained_on_gpus_is_not_trained_on_on_the_cpu(world, tmp_path, monkeypatch):
    """The ID tables' optimizer differs by device (fused Adam on CUDA, row-wise Adagrad on the
    CPU), and device=auto is recorded unresolved: a GPU run resumed on a CPU host failed deep
    in DCP's load, naming no device."""
    from train import dcp_checkpoints

    ciubm.run(_config(world, tmp_path, "max_steps=2", "model.ubm=avg", "device=cpu"))
    checkpoint = dcp_checkpoints.DcpCheckpoints(tmp_path / "checkpoints").newest()
    assert dcp_checkpoints.checkpoint_on_cuda(checkpoint) is False  # recorded
    monkeypatch.setattr(dcp_checkpoints, "checkpoint_on_cuda", lambda path: True)  # as a GPU run writes it
    with pytest.raises(ConfigError, match="was trained on GPUs .* and this run is on the CPU"):
        ciubm.run(_config(world, tmp_path, "max_steps=4", "model.ubm=avg", "device=cpu"))
    assert ciubm.run(_config(world, tmp_path, "max_steps=2", "model.ubm=avg", "device=cpu"), train=False)["steps"] == 2


def test_a_run_of_other_ranks_is_refused_for_its_ranks_before_its_step_count(world, tmp_path, monkeypatch):
    """The steps a config trains follow the ranks (batches per epoch): a finished 1-rank run
    restarted on 2 was refused for its step count, and raising epochs only led to the real
    refusal."""
    from train import dcp_checkpoints

    ciubm.run(_config(world, tmp_path, "max_steps=4", "model.ubm=avg", "device=cpu"))
    monkeypatch.setattr(dcp_checkpoints, "checkpoint_world_size", lambda path: 2)  # as 2 ranks write it
    with pytest.raises(ConfigError, match=r"written by 2 ranks and this run has 1: resume it on 2"):
        ciubm.run(_config(world, tmp_path, "max_steps=2", "model.ubm=avg", "device=cpu"))


@pytest.mark.parametrize("record", ["config.json", "inputs.json"])
def test_a_torn_run_record_is_a_one_line_error(world, tmp_path, record):
    """Written in place, a kill or a full disk could cut them short; the next run died in a
    JSONDecodeError traceback."""
    ciubm.run(_config(world, tmp_path, "max_steps=2", "model.ubm=avg", "device=cpu"))
    path = tmp_path / record
    path.write_text(path.read_text()[:40])
    with pytest.raises(ConfigError, match=rf"{record}: not a whole JSON object \(a write cut short\?\)"):
        ciubm.run(_config(world, tmp_path, "max_steps=4", "model.ubm=avg", "device=cpu"))


def test_a_run_whose_data_parallel_table_trained_with_the_dense_adam_is_refused_by_name(world, tmp_path, monkeypatch):
    """Such a run (one CPU rank, before 2026-12-06) failed in DCP's load, on a missing key."""
    from train import dcp_checkpoints

    saved = tmp_path / "dcp"
    dcp_checkpoints.dcp.save({"optimizer": {"state": {"sparse_arch.sequence.embedding_bags.category.weight": {
        "exp_avg": torch.zeros(2), "step": torch.tensor(1.0)}}}}, checkpoint_id=str(saved))
    assert dcp_checkpoints.checkpoint_adam_tables(saved) == ["category"]
    ciubm.run(_config(world, tmp_path / "run", "max_steps=2", "model.ubm=avg", "device=cpu"))
    assert dcp_checkpoints.checkpoint_adam_tables(  # today's CPU checkpoints hold none
        dcp_checkpoints.DcpCheckpoints(tmp_path / "run" / "checkpoints").newest()) == []
    monkeypatch.setattr(dcp_checkpoints, "checkpoint_on_cuda", lambda path: None)  # as written before
    monkeypatch.setattr(dcp_checkpoints, "checkpoint_adam_tables", lambda path: ["category"])
    with pytest.raises(ConfigError, match=r"data-parallel ID table \(category\) trained with the dense Adam"):
        ciubm.run(_config(world, tmp_path / "run", "max_steps=4", "model.ubm=avg", "device=cpu"))


def test_a_run_scored_on_other_test_events_is_not_finished(world, tmp_path):
    """Only the training inputs were compared: a grid kept the old metrics of a world whose
    events_test had changed, and mim experiment reported them."""
    copy = _world_with_events(world, tmp_path / "world", lambda events: events)
    config = _config(copy, tmp_path / "run", "max_steps=2", "model.ubm=avg")
    ciubm.run(config)
    assert ciubm._finished(config)
    test = pq.read_table(copy / "events_test.parquet")
    pq.write_table(test.slice(0, test.num_rows // 2), copy / "events_test.parquet")
    assert not ciubm._finished(config)
    assert ciubm.run(config)["n"] == test.num_rows // 2 and ciubm._finished(config)


def test_a_torn_metrics_json_is_not_a_finished_run(world, tmp_path):
    """A grid skipped a run whose metrics.json a kill had cut short, as finished."""
    config = _config(world, tmp_path / "run", "max_steps=2", "model.ubm=avg")
    ciubm.run(config)
    assert ciubm._finished(config)
    metrics = tmp_path / "run" / "metrics.json"
    metrics.write_text(metrics.read_text()[:12])
    assert not ciubm._finished(config)


def test_eval_only_accepts_the_same_paths_written_relative_and_another_world(world, tmp_path, monkeypatch):
    """The same world given as a relative path was "another config", and so was evaluating
    the checkpoint on another world's events, which docs/ciubm.md does."""
    import shutil

    trained = ciubm.run(_config(world, tmp_path / "run", "max_steps=2", "model.ubm=avg"))
    monkeypatch.chdir(world.parent)
    again = ciubm.run(_config(world.name, tmp_path / "run", "max_steps=2", "model.ubm=avg"), train=False)
    assert again["auc"] == trained["auc"]
    other = tmp_path / "other_world"
    shutil.copytree(world, other)
    assert ciubm.run(_config(other, tmp_path / "run", "max_steps=2", "model.ubm=avg"), train=False)["auc"] \
        == trained["auc"]  # the same events under another path


def test_eval_only_leaves_the_run_records_and_starts_from_the_run_config(world, tmp_path, capsys):
    """--eval-only used to rewrite the run's config.json and metrics.json: evaluated on another
    world, a grid then took the run as finished on that world (and the pipeline reported its
    numbers), and training on was refused as "another config". It also needed the whole
    training command again; now the run folder is enough."""
    import shutil

    from train import cli

    run_dir = tmp_path / "run"
    config = _config(world, run_dir, "max_steps=2", "model.ubm=avg")
    trained = ciubm.run(config)
    records = {name: (run_dir / name).read_bytes() for name in ("config.json", "metrics.json", "inputs.json")}
    other = tmp_path / "other_world"
    shutil.copytree(world, other)
    events = pq.read_table(other / "events_test.parquet")
    pq.write_table(events.slice(0, events.num_rows // 2), other / "events_test.parquet")
    capsys.readouterr()
    assert cli.main(["train", "--eval-only", f"out={run_dir}", f"data.world={other}"]) == 0
    assert "AUC" in capsys.readouterr().out
    assert {name: (run_dir / name).read_bytes() for name in records} == records
    evaluated = json.loads((run_dir / "eval.json").read_text())
    assert evaluated["events_test"] == str((other / "events_test.parquet").resolve())
    assert evaluated["checkpoint"] == "step-000000002" and evaluated["n"] == events.num_rows // 2
    assert evaluated["n"] != trained["n"]
    assert ciubm._finished(config)  # still the run training finished, on its own world


def test_eval_only_without_out_reads_the_default_run_folder(tmp_path, monkeypatch):
    """`mim train --eval-only` (and TorchX's evaluate with no args) asked for data.world although
    the default run folder held the run's config.json."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ciubm.TrainConfig.out).mkdir(parents=True)
    assert ciubm._run_config([]) is None
    (tmp_path / ciubm.TrainConfig.out / "config.json").write_text("{}")
    assert ciubm._run_config([]) == str(Path(ciubm.TrainConfig.out) / "config.json")


def test_eval_only_refuses_a_folder_that_is_no_ciubm_run(tmp_path, capsys):
    """A missing folder read as "data.world: the world folder ... is required", and a pretrain
    run's folder as its config.json's dozen unknown keys."""
    from train import cli

    assert cli.main(["train", "--eval-only", f"out={tmp_path / 'absent'}"]) == 2
    assert capsys.readouterr().err.strip() == (f"mim train: error: --eval-only: out={tmp_path / 'absent'}: no such "
                                               "folder; point out= at a trained `mim train` run's folder")
    pretrain = tmp_path / "pretrain"
    (pretrain / "encoders").mkdir(parents=True)
    (pretrain / "config.json").write_text(json.dumps({"dda_steps": 20, "dma_steps": 100}))
    assert cli.main(["train", "--eval-only", f"out={pretrain}"]) == 2
    assert capsys.readouterr().err.strip() == (f"mim train: error: out={pretrain}: holds encoders, which is not a "
                                               "`mim train` run's; point out= at a trained `mim train` run's folder")


def test_a_metrics_file_of_fewer_steps_than_the_checkpoint_is_not_finished(world, tmp_path):
    config = _config(world, tmp_path / "run", "max_steps=2", "model.ubm=avg")
    ciubm.run(config)
    metrics = tmp_path / "run" / "metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "steps": 1}))
    assert not ciubm._finished(config)


def test_only_the_newest_checkpoints_are_kept(world, tmp_path):
    """Every DCP checkpoint holds the frozen MM table's shards: a run kept them all."""
    config = _config(world, tmp_path / "run", "max_steps=4", "checkpoint_every=2", "checkpoint_keep=2",
                     "model.ubm=avg")
    checkpoints = tmp_path / "run" / "checkpoints"
    for cut_short in ("step-000000003", "step-000000009"):  # saves a kill cut short (no .metadata)
        (checkpoints / cut_short).mkdir(parents=True)
    # one before this run's saves (a resume with another checkpoint_every) was counted as kept,
    # and a complete checkpoint went in its place
    ciubm.run(config)
    folders = sorted(p.name for p in checkpoints.glob("step-*"))
    assert folders == ["step-000000002", "step-000000004", "step-000000009"]
    assert ciubm.run(config, train=False)["steps"] == 4


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_kept_before_it(world, tmp_path, capsys):
    """A checkpoint cut short (a disk that filled, a file cut by hand) ended the run in DCP's
    unpickler with a bare ``EOFError``. Like pretrain and C-SFT, the run now goes on from the
    checkpoint kept before it, to the uninterrupted run's result, and saves the damaged step
    again into a fresh folder; with none whole it is one line naming the checkpoint."""
    common = ("model.ubm=avg", "log_every=1", "checkpoint_every=2")
    straight = ciubm.run(_config(world, tmp_path / "a", "max_steps=6", *common))
    ciubm.run(_config(world, tmp_path / "b", "max_steps=4", *common))
    checkpoints = tmp_path / "b" / "checkpoints"

    def cut_short(step: str) -> None:
        for data in (checkpoints / step).glob("*.distcp"):
            data.write_bytes(data.read_bytes()[:1000])

    cut_short("step-000000004")
    (checkpoints / "step-000000004" / "__9_0.distcp").write_bytes(b"a file of the save that failed")
    resumed = ciubm.run(_config(world, tmp_path / "b", "max_steps=6", *common))
    # step 4 is saved again into a fresh folder, not under the damaged one's .metadata
    assert not (checkpoints / "step-000000004" / "__9_0.distcp").exists()
    assert re.search(r"step-000000004 does not load \(__0_0\.distcp is 1,000 bytes, its metadata reads [\d,]+\); "
                     r"using step-000000002", capsys.readouterr().err)
    assert [r["step"] for r in _step_records(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    assert _step_losses(tmp_path / "b") == pytest.approx(_step_losses(tmp_path / "a"), abs=1e-6)
    assert resumed["auc"] == pytest.approx(straight["auc"], abs=1e-9)
    for step in ("step-000000004", "step-000000006"):
        cut_short(step)
    with pytest.raises(DataError, match=r"step-000000006: __0_0\.distcp is 1,000 bytes, its metadata reads [\d,]+, "
                                        r"and no whole checkpoint was kept before it; use a new out="):
        ciubm.run(_config(world, tmp_path / "b", "max_steps=6", *common))


def test_a_damaged_checkpoint_is_read_once_when_fallen_back_from(tmp_path, capsys):
    """restore's warning computed the damage of the checkpoint ``latest`` names a second time
    (reading its metadata again) after the fallback had found it."""
    from unittest import mock

    from train import dcp_checkpoints

    ensure_process_group("cpu")
    model = torch.nn.Linear(2, 1)
    checkpoints = DcpCheckpoints(tmp_path)
    for step in (2, 4):
        checkpoints.save(model, torch.optim.SGD(model.parameters(), lr=0.1), {"global_step": step})
    for data in (tmp_path / "step-000000004").glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:10])
    with mock.patch.object(dcp_checkpoints, "checkpoint_damage", wraps=dcp_checkpoints.checkpoint_damage) as damage:
        assert checkpoints.restore(model, None, with_optimizer=False) == {"global_step": 2}
    assert [call.args[0].name for call in damage.call_args_list] == ["step-000000004", "step-000000002"]
    assert re.search(r"warning: \S+step-000000004 does not load \(__0_0\.distcp is 10 bytes, its metadata reads "
                     r"[\d,]+\); using step-000000002, the checkpoint kept before it", capsys.readouterr().err)


def test_a_run_reads_its_checkpoints_once_to_check_evaluate_and_restore_them(world, tmp_path):
    """The foreign-checkpoint check, --eval-only's choice of the checkpoint and the restore each
    found the newest checkpoint again, reading its metadata (megabytes for a large model's) each
    time: three reads for --eval-only, two for a run restarted with nothing left to train."""
    from unittest import mock

    from train import dcp_checkpoints

    config = _config(world, tmp_path / "run", "max_steps=2", "model.ubm=avg")
    ciubm.run(config)
    for train in (False, True):
        with mock.patch.object(dcp_checkpoints, "checkpoint_damage", wraps=dcp_checkpoints.checkpoint_damage) as seen:
            assert ciubm.run(config, train=train)["steps"] == 2
        assert [call.args[0].name for call in seen.call_args_list] == ["step-000000002"]


def test_a_clickless_split_is_refused_before_training(world, tmp_path):
    """A world without clicks used to train to a constant and report no AUC."""
    def no_clicks(events):
        return events.set_column(events.schema.get_field_index("label"), "label",
                                 pa.array(np.zeros(len(events), np.int8)))

    clickless = _world_with_events(world, tmp_path / "clickless", no_clicks)
    with pytest.raises(DataError, match=r"events_train.parquet, field 'label': every row has label 0"):
        ciubm.run(_config(clickless, tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_eval_only_scores_a_world_of_fewer_users_and_refuses_another_catalogue(world, tmp_path):
    """Both ended in DCP's size-mismatch traceback, or (another catalogue of the same sizes)
    were scored as if its item ids were the trained items."""
    import shutil

    config = _config(world, tmp_path / "run", "max_steps=2", "model.ubm=avg")
    ciubm.run(config)
    fewer = tmp_path / "fewer_users"
    shutil.copytree(world, fewer)
    last_user = max(pc.max(pq.read_table(world / f"events_{split}.parquet")["user_id"]).as_py()
                    for split in ("train", "test"))
    for split in ("train", "test"):
        events = pq.read_table(fewer / f"events_{split}.parquet")
        pq.write_table(events.filter(pc.less(events["user_id"], last_user)), fewer / f"events_{split}.parquet")
    assert ciubm.table_sizes(str(fewer), ItemInfo.from_items(fewer / "items.parquet"))["users"] < last_user + 1
    assert ciubm.run(_config(fewer, tmp_path / "run", "max_steps=2", "model.ubm=avg"), train=False)["n"] > 0

    other = generate_world(tiny(SynthConfig(seed=12)), tmp_path / "other")  # the same sizes, other items
    with pytest.raises(ConfigError, match=r"other/items.parquet is not the catalogue out=.* trained on"):
        ciubm.run(_config(other, tmp_path / "run", "max_steps=2", "model.ubm=avg"), train=False)

"""scripts/truth_diagnostics.py: the measuring sticks the docs quote must measure what they say."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from embeddings.build import build_table
from embeddings.encoders import load_item_encoder
from mim_rec.data.synth import SynthConfig, generate_world, tiny

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "truth_diagnostics.py"


def _diagnostics():
    spec = importlib.util.spec_from_file_location("truth_diagnostics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _RandomEncoder:
    fingerprint, dim = "random:test", 12

    def embed_items(self, items, source):
        return torch.randn(items.num_rows, self.dim, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    yield generate_world(tiny(SynthConfig(seed=5)), tmp_path_factory.mktemp("diag_world"))
    if dist.is_initialized():  # mim train's one-rank gloo group
        dist.destroy_process_group()
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)


def _rows(text: str, table: Path) -> list:
    return [line.split("|")[1:-1] for line in text.splitlines() if line.startswith(f"| {table} |")]


def test_geometry_scores_the_true_table_one_and_a_random_table_near_zero(world, tmp_path, capsys):
    diagnostics = _diagnostics()
    truth = build_table(load_item_encoder(world / "truth"), world / "items.parquet", tmp_path / "truth", shard_rows=256)
    noise = build_table(_RandomEncoder(), world / "items.parquet", tmp_path / "noise", shard_rows=256)
    diagnostics.geometry(world, [Path(truth), Path(noise)], pairs=20_000, whiten=8)
    out = capsys.readouterr().out
    (true_row,) = _rows(out, Path(truth))  # as wide as the whitened view: raw only
    assert [float(v) for v in true_row[2:4]] == [1.0, 1.0]
    assert all(float(v) > 0.99 for v in true_row[4:])  # its readout, and every style coordinate read out
    noise_rows = _rows(out, Path(noise))
    assert [r[1].strip() for r in noise_rows] == ["raw", "whitened 8"]
    assert all(abs(float(v)) < 0.15 for row in noise_rows for v in row[2:5])  # 600 items: pairs share items


def test_heldout_r2_and_within_category_remove_what_they_should():
    diagnostics = _diagnostics()
    rng = np.random.default_rng(0)
    categories = rng.integers(0, 4, 1000)
    values = rng.normal(size=(1000, 3)) + 10 * categories[:, None]
    residual = diagnostics.within_category(values, categories)
    for category in range(4):
        np.testing.assert_allclose(residual[categories == category].mean(0), 0, atol=1e-9)
    features = rng.normal(size=(1000, 5))
    targets = np.stack([features @ rng.normal(size=5), rng.normal(size=1000)], axis=1)
    r2 = diagnostics.heldout_r2(features, targets, ridge=1e-6)
    assert r2[0] > 0.999 and abs(r2[1]) < 0.05  # a linear target is read out, noise is not


def test_checkpoint_readouts_read_a_train_checkpoint(world, tmp_path, capsys):
    """--id-embeddings and --learned-views on a real (3-step) mim train checkpoint."""
    from train import ciubm

    table = build_table(load_item_encoder(world / "truth"), world / "items.parquet", tmp_path / "truth", shard_rows=256)
    out = tmp_path / "ctr"
    config = ciubm.load_train_config(None, [f"data.world={world}", f"out={out}", f"mm_table={table}", "model.ubm=avg",
                                            "model.content_metric=true", "loader.batch_size=256",
                                            "loader.max_hist_len=10", "max_steps=3", "checkpoint_every=3",
                                            "model.over_arch=[16]"])
    ciubm.run(config)
    (checkpoint,) = sorted((out / "checkpoints").glob("step-*"))
    diagnostics = _diagnostics()
    # its S1..S10 are mim train's: created_at cast straight to int64 stayed in milliseconds, and
    # the buckets sorted items by creation date
    import json
    deciles = json.loads((out / "metrics.json").read_text())["age_deciles"]
    buckets = diagnostics.age_buckets(world)
    assert np.bincount(buckets, minlength=10).tolist() == [d["n"] for d in deciles]
    import pyarrow as pa
    import pyarrow.parquet as pq
    events = pq.read_table(world / "events_test.parquet")
    created = pq.read_table(world / "items.parquet")["created_at"].cast(pa.timestamp("s")).cast(pa.int64())
    age_days = (events["ts"].to_numpy() - created.to_numpy()[events["target_item_id"].to_numpy()]) / 86_400
    assert [age_days[buckets == b].max() for b in range(10)] == pytest.approx([d["age_days_max"] for d in deciles])
    diagnostics.id_embeddings(world, [checkpoint])
    diagnostics.learned_views(world, [checkpoint], pairs=20_000)
    rows = _rows(capsys.readouterr().out, checkpoint)
    (readout,) = [row for row in rows if len(row) == 2 + 8]
    assert all(np.isfinite(float(v)) for v in readout[1:])
    views = {row[1].strip(): [float(v) for v in row[2:]] for row in rows if len(row) == 4}
    assert set(views) == {"whitened", "learned metric"}
    assert views["whitened"][1] > 0.9  # the whitened true styles still rank same-category pairs


def test_towers_trace_every_step_and_end_at_the_table_the_center_builds(world, tmp_path, capsys):
    """--towers on a stage-1 and a C-SFT folder: six steps, each with its raw and whitened row,
    and the last step (the item embedding) scores exactly as the MM table built from it."""
    from mim_rec.csft import CsftModel, FusionConfig, ModelConfig, save_mm_encoder
    from mim_rec.encoders import EncoderPair, load_encoders, save_encoders
    from tests.encoder_fixtures import tiny_encoders

    torch.manual_seed(0)
    stage1 = tmp_path / "encoders"
    save_encoders(stage1, EncoderPair(tiny_encoders(shared_dim=24)))
    csft = tmp_path / "mm_encoder"
    model = CsftModel(load_encoders(stage1), ModelConfig(fusion=FusionConfig(hidden=8)))
    with torch.no_grad():  # a trained fusion: the C-SFT item embedding differs from stage 1's
        for param in model.items.fusion.parameters():
            param.add_(0.1 * torch.randn_like(param))
    save_mm_encoder(csft, model)
    diagnostics = _diagnostics()
    diagnostics.towers(world, [stage1, csft], tmp_path / "features", pairs=20_000, whiten=8)
    towers_out = capsys.readouterr().out
    steps = ("image features", "title features", "image + title features", "image head", "title head",
             "item embedding")
    for folder in (stage1, csft):
        for step in steps:
            rows = _rows(towers_out, f"{folder}: {step}")
            assert [r[1].strip() for r in rows] == ["raw", "whitened 8"], (folder, step)
            assert all(np.isfinite(float(v)) for row in rows for v in row[2:])
        tables = build_table(load_item_encoder(folder), world / "items.parquet", tmp_path / f"table_{folder.name}",
                             shard_rows=256)
        diagnostics.geometry(world, [Path(tables)], pairs=20_000, whiten=8)
        built = [row[1:] for row in _rows(capsys.readouterr().out, Path(tables))]
        traced = [row[1:] for row in _rows(towers_out, f"{folder}: item embedding")]
        assert traced == built
    assert _rows(towers_out, f"{stage1}: item embedding") != _rows(towers_out, f"{csft}: item embedding")

"""The C-SFT towers and the MM encoder artifact (the representation center's seam)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from embeddings.build import build_table
from embeddings.encoders import CsftItemEncoder, Stage1ItemEncoder, load_item_encoder
from mim_rec.csft import (CsftModel, FusionConfig, ModelConfig, load_csft_model,
                          load_mm_encoder, save_mm_encoder)
from mim_rec.csft.config import QueryConfig
from mim_rec.csft.model import vision_input
from mim_rec.data.errors import ManifestMismatch
from mim_rec.data.io import read_items
from mim_rec.data.manifest import read_manifest
from mim_rec.encoders import EncoderPair, save_encoders
from tests.encoder_fixtures import tiny_encoders, write_items

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("csft_model")
    torch.manual_seed(0)
    save_encoders(folder / "encoders", EncoderPair(tiny_encoders(shared_dim=8)))
    return folder / "encoders", write_items(folder / "items.parquet", count=20)


def _model(stage1_dir, **changes) -> CsftModel:
    from mim_rec.encoders import load_encoders
    torch.manual_seed(1)
    return CsftModel(load_encoders(stage1_dir), ModelConfig(**changes))


def _perturb(model: CsftModel) -> None:
    """Stand-in for training: move every trainable weight."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))


def test_untrained_model_reproduces_the_stage1_embeddings(stage1):
    encoders, items_path = stage1
    items = read_items(items_path)
    model = _model(encoders)
    expected = Stage1ItemEncoder(encoders).embed_items(items, items_path)
    torch.testing.assert_close(model.items.embed_items(items, items_path), expected,
                               rtol=1e-5, atol=1e-5)
    pixels = vision_input(model.queries.vision,
                          model.queries.vision.image_processor.to_uint8(items["image"].to_pylist()))
    with torch.no_grad():
        torch.testing.assert_close(model.queries(pixels), model.items.pair.embed_images(pixels))


def test_frozen_backbones_train_only_heads_and_fusion(stage1):
    model = _model(stage1[0])
    trainable = {n.split(".")[1] if n.startswith("items.") else n.split(".")[0] + "." + n.split(".")[1]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"pair", "fusion", "queries.head"}
    assert all(not p.requires_grad for p in model.items.pair.vision.parameters())
    assert all(not p.requires_grad for p in model.items.pair.text.parameters())
    assert any(p.requires_grad for p in model.items.pair.vision_head.parameters())
    unfrozen = _model(stage1[0], train_backbones=True)
    assert any(p.requires_grad for p in unfrozen.items.pair.text.parameters())


@pytest.mark.parametrize("share_vision", [True, False])
def test_save_load_round_trip_and_fingerprint(stage1, tmp_path, share_vision):
    encoders, items_path = stage1
    items = read_items(items_path)
    config = dict(fusion=FusionConfig(kind="lowrank", hidden=8, rank=2),
                  query=QueryConfig(share_vision=share_vision), train_backbones=True)
    model = _model(encoders, **config)
    _perturb(model)
    fingerprint = save_mm_encoder(tmp_path / "mm", model)
    manifest = read_manifest(tmp_path / "mm")
    assert (manifest.kind, manifest.dim, manifest.extra["fingerprint"]) == ("mm_encoder", 8, fingerprint)
    encoder, loaded_fingerprint = load_mm_encoder(tmp_path / "mm")
    assert loaded_fingerprint == fingerprint == encoder.fingerprint and fingerprint.startswith("csft:")
    torch.testing.assert_close(encoder.embed_items(items, items_path),
                               model.items.embed_items(items, items_path))
    loaded = load_csft_model(tmp_path / "mm")
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.queries(pixels), model.eval().queries(pixels))
    assert (loaded.queries.vision is loaded.items.pair.vision) == share_vision


def test_fingerprint_follows_the_weights_and_tampering_is_refused(stage1, tmp_path):
    model = _model(stage1[0])
    before = model.items.fingerprint
    assert model.items.fingerprint == before  # deterministic
    _perturb(model)
    assert model.items.fingerprint != before
    save_mm_encoder(tmp_path / "mm", model)
    state = torch.load(tmp_path / "mm" / "csft.pt")
    state["fusion"]["output.bias"] += 1.0
    torch.save(state, tmp_path / "mm" / "csft.pt")
    with pytest.raises(ManifestMismatch, match="modified"):
        load_mm_encoder(tmp_path / "mm")


def test_representation_center_builds_a_table_from_it(stage1, tmp_path):
    encoders, items_path = stage1
    model = _model(encoders, fusion=FusionConfig(hidden=8))
    _perturb(model)
    save_mm_encoder(tmp_path / "mm", model)
    encoder, fingerprint = load_mm_encoder(tmp_path / "mm")
    table = build_table(encoder, items_path, tmp_path / "table", shard_rows=8)
    manifest = read_manifest(table)
    assert manifest.extra["encoder_fingerprint"] == fingerprint and manifest.dim == 8


def test_paper_fusion_without_residual_is_unit_norm(stage1):
    encoders, items_path = stage1
    model = _model(encoders, fusion=FusionConfig(hidden=8, residual=False))
    vectors = model.items.embed_items(read_items(items_path), items_path)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(20))
    assert dataclasses.asdict(model.config)["fusion"]["residual"] is False


def test_load_item_encoder_picks_the_tower_by_manifest_kind(stage1, tmp_path):
    encoders, items_path = stage1
    model = _model(encoders, fusion=FusionConfig(hidden=8))
    _perturb(model)
    fingerprint = save_mm_encoder(tmp_path / "mm", model)
    csft = load_item_encoder(tmp_path / "mm")
    assert isinstance(csft, CsftItemEncoder) and csft.fingerprint == fingerprint
    assert isinstance(load_item_encoder(encoders), Stage1ItemEncoder)
    items = read_items(items_path)
    assert torch.allclose(csft.embed_items(items, items_path), model.items.embed_items(items, items_path))
    table = build_table(csft, items_path, tmp_path / "table", shard_rows=8)
    with pytest.raises(ManifestMismatch, match="not an item encoder"):
        load_item_encoder(table)


@pytest.mark.parametrize("artifact", ["stage1", "csft"])
def test_table_build_reads_the_frozen_backbones_features_from_the_csft_cache(stage1, tmp_path, artifact):
    """``feature_cache``: the table is the one the backbones would give, yet they never run."""
    from embeddings.table import read_mm_table
    from mim_rec.csft.data import FeatureCache, WorldInputs

    encoders, items_path = stage1
    model = _model(encoders, fusion=FusionConfig(hidden=8))
    _perturb(model)  # heads and fusion move; the frozen backbones do not
    folder = encoders if artifact == "stage1" else tmp_path / "mm"
    if artifact == "csft":
        save_mm_encoder(folder, model)
    # What mim csft caches before its first step, with its own (in-memory) backbones.
    world = WorldInputs(items_path.parent, FeatureCache(tmp_path / "features"), batch_size=7)
    world.item_image_features(model.items.pair.vision)
    world.item_title_features(model.items.pair.text)

    expected = read_mm_table(build_table(load_item_encoder(folder), items_path, tmp_path / "plain",
                                         shard_rows=8), 20, 8)
    cached = load_item_encoder(folder, batch_size=3, feature_cache=tmp_path / "features")
    pair = cached.pair if artifact == "stage1" else cached.tower.pair

    def never(*_):
        raise AssertionError("a backbone ran although its features were cached")

    pair.vision.forward = pair.text.forward = never
    table = build_table(cached, items_path, tmp_path / "cached", shard_rows=8)
    torch.testing.assert_close(read_mm_table(table, 20, 8), expected, rtol=1e-5, atol=1e-5)
    assert read_manifest(table).extra["encoder_fingerprint"] == cached.fingerprint


def test_a_feature_cache_that_is_another_output_is_refused_before_anything_is_written(stage1, tmp_path):
    """``feature_cache=`` the encoders folder wrote the cache's files into it, which changed the
    encoders' fingerprint: the table just built no longer matched its encoder, and serve and the
    bench refused the pair."""
    import shutil

    from mim_rec.data.errors import DataError
    from mim_rec.data.manifest import fingerprint_tree

    encoders = shutil.copytree(stage1[0], tmp_path / "encoders")
    before = fingerprint_tree(encoders)
    with pytest.raises(DataError, match=rf"{encoders}: holds a manifest.json, so it is an output of mim_rec"):
        build_table(load_item_encoder(encoders, feature_cache=encoders), stage1[1], tmp_path / "table")
    assert fingerprint_tree(encoders) == before and not (tmp_path / "table").exists()


def test_feature_cache_keys_follow_the_style_stages(tmp_path):
    """Style statistics change what a backbone computes but not its weights; the cache must
    not serve one setting's features to the other."""
    from mim_rec.csft.data import FeatureCache, WorldInputs
    from mim_rec.encoders import build_vision_encoder
    from tests.encoder_fixtures import tiny_vision, write_items

    items_path = write_items(tmp_path / "world" / "items.parquet", count=6)
    plain = build_vision_encoder(tiny_vision()).eval()
    styled = build_vision_encoder(tiny_vision(style_stages=[1])).eval()
    styled.load_state_dict(plain.state_dict())
    world = WorldInputs(items_path.parent, FeatureCache(tmp_path / "features"), batch_size=4)
    assert world.item_image_features(plain).shape == (6, plain.feature_dim)
    assert world.item_image_features(styled).shape == (6, styled.feature_dim)
    assert world.item_image_features(plain).shape == (6, plain.feature_dim)


def test_feature_cache_keys_follow_the_towers_architecture(tmp_path):
    """Padding and batch-norm eps are not weights: an encoders folder saved before the bundled
    weights got TF padding reloads symmetric-padded with the same weights, and was served the
    other tower's cached features."""
    from mim_rec.csft.data import FeatureCache, WorldInputs
    from mim_rec.encoders import build_vision_encoder
    from tests.encoder_fixtures import tiny_vision, write_items

    items_path = write_items(tmp_path / "world" / "items.parquet", count=6)
    tf_padded = build_vision_encoder(tiny_vision("efficientnet_lite0", weights="bundled")).eval()
    symmetric = build_vision_encoder(tiny_vision("efficientnet_lite0")).eval()
    symmetric.load_state_dict(tf_padded.state_dict())
    symmetric.image_processor = tf_padded.image_processor  # the same inputs: only the padding differs
    world = WorldInputs(items_path.parent, FeatureCache(tmp_path / "features"), batch_size=4)
    first = world.item_image_features(tf_padded)
    assert not torch.allclose(world.item_image_features(symmetric), first)


def test_a_damaged_feature_cache_entry_is_computed_again(tmp_path, capsys):
    """A cut cache file used to fail every later run with torch's zip-archive error."""
    from mim_rec.csft.data import FeatureCache

    cache = FeatureCache(tmp_path)
    first = cache.get("items-image", ["key"], lambda: torch.arange(6.0))
    (entry,) = tmp_path.glob("items-image-*.pt")
    entry.write_bytes(entry.read_bytes()[:40])
    again = cache.get("items-image", ["key"], lambda: torch.arange(6.0) * 2)
    assert torch.equal(again, first * 2) and "does not load" in capsys.readouterr().err
    assert torch.equal(cache.get("items-image", ["key"], lambda: torch.zeros(1)), first * 2)  # rewritten whole

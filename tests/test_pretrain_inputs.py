"""`mim pretrain` / `pretrain-eval` / `csft` refuse a user's mistake in one line, naming the
setting, before anything is written (each case below used to end in a traceback, or to write
into the wrong place)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import pytest
import torch

from mim_rec.config import to_dict
from mim_rec.pretrain.config import PretrainConfig
from mim_rec.pretrain.evaluate import EvalConfig
from tests.encoder_fixtures import write_items
from tests.test_pretrain_trainer import _config, _write_config
from train import cli

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_items(tmp_path_factory.mktemp("world") / "items.parquet", count=24).parent


@pytest.mark.parametrize("override, message", [
    ("encoders.vision.std=[0,0,0]", "encoders.vision.std=[0.0, 0.0, 0.0]: every value must be positive"),
    ("encoders.vision.mean=[1,2]", "encoders.vision.mean=[1.0, 2.0]: need 3 values"),
    ("encoders.vision.image_size=16", "encoders.vision.image_size=16: ConvNeXt cannot take 16x16 images"),
    ("encoders.text.overrides.num_hidden_layer=1", "BertConfig has no setting num_hidden_layer"),
    ("data.heldout_fraction=0.99", "only 0 training items; data.heldout_fraction=0.99 of the 24 items is held out "
                                   "for evaluation; lower data.batch_size or data.heldout_fraction"),
    ("out=null", "out: expected text, got null"),  # trained into a folder named "None"
    # a batch of one has no negative: every InfoNCE was identically 0 and nothing trained
    ("data.batch_size=1", "data.batch_size=1: a contrastive batch needs at least 2 items"),
    ("head_warmup_batch_size=1", "head_warmup_batch_size=1: a contrastive batch needs at least 2 items"),
    ("eval.probe_batch_size=1", "eval.probe_batch_size=1: a contrastive batch needs at least 2 items"),
])
def test_a_bad_setting_is_one_line_and_writes_nothing(world, tmp_path, capsys, override, message):
    config_file = _write_config(_config(world, tmp_path / "out"), tmp_path / "c.yaml")
    assert cli.main(["pretrain", "--config", str(config_file), override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_a_batch_of_one_is_refused_only_where_an_info_nce_reads_it():
    """The head warm-up's batch size was refused with the warm-up off, and the training batch
    of an MLM-only run (precomputed image features, no DMA)."""
    from train.pretrain import _contrastive_batches

    config = PretrainConfig()
    assert _contrastive_batches(config) == ["data.batch_size", "head_warmup_batch_size", "eval.probe_batch_size"]
    config.head_warmup_steps = 0
    assert "head_warmup_batch_size" not in _contrastive_batches(config)
    config.dma_steps, config.encoders.vision.name = 0, "precomputed"
    assert _contrastive_batches(config) == ["eval.probe_batch_size"]


def test_a_world_that_is_not_parquet_names_the_file(world, tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{}")  # data.world=world/manifest.json: ArrowInvalid before
    config_file = _write_config(_config(tmp_path / "manifest.json", tmp_path / "out"), tmp_path / "c.yaml")
    assert cli.main(["pretrain", "--config", str(config_file)]) == 2
    assert "manifest.json: not a readable Parquet file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["pretrain", "pretrain-eval", "csft", "csft-eval"])
def test_an_empty_out_is_refused(world, tmp_path, capsys, monkeypatch, command):
    """`out=` wrote the run (config.json, checkpoints/...) into the current directory."""
    monkeypatch.chdir(tmp_path)
    overrides = [f"data.world={world}", "out="] + (["encoders=enc"] if command.startswith("csft") else [])
    assert cli.main([command, *overrides]) == 2
    assert "out: empty; give the run folder" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["pretrain", "csft"])
def test_a_world_whose_manifest_counts_other_items_is_refused_as_validate_refuses_it(tmp_path, capsys, monkeypatch,
                                                                                      command):
    """`mim data validate` refused a world whose manifest counts other items than its items.parquet
    holds (items replaced after the world was written); pretrain and csft trained on it."""
    import mim_rec.encoders
    from mim_rec.data.synth import SynthConfig, generate_world, tiny

    world = generate_world(replace(tiny(SynthConfig()), items=240, users=60, events=1200, pairs_train=160,
                                   pairs_test=40, image_size=32), tmp_path / "world")
    manifest = json.loads((world / "manifest.json").read_text())
    manifest["extra"]["counts"]["items"] += 1
    (world / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["data", "validate", str(world)]) == 2
    refusal = capsys.readouterr().err.split("mim data validate: error: ")[1].strip()
    assert refusal.endswith("manifest counts 241 items, items.parquet has 240")

    def loaded(*args, **kwargs):
        raise AssertionError("the encoders loaded before the world was refused")

    monkeypatch.setattr(mim_rec.encoders, "EncoderPair", loaded)
    monkeypatch.setattr(mim_rec.encoders, "load_encoders", loaded)
    csft = [f"encoders={world}", "data.batch_size=8"] if command == "csft" else []  # encoders never read
    assert cli.main([command, f"data.world={world}", f"out={tmp_path / 'out'}", *csft]) == 2
    assert capsys.readouterr().err.strip() == f"mim {command}: error: {refusal}"
    assert not (tmp_path / "out").exists()


def test_evaluation_on_a_few_held_out_items_says_recall_is_trivial(tmp_path, capsys):
    small = write_items(tmp_path / "small" / "items.parquet", count=12).parent  # 3 items held out
    run = tmp_path / "run"
    run.mkdir()
    config = _config(small, run, eval=EvalConfig(probe_steps=2))
    (run / "config.json").write_text(json.dumps(to_dict(config)))
    assert cli.main(["pretrain-eval", "--config", str(_write_config(config, tmp_path / "c.yaml"))]) == 0
    assert "note: only 3 held-out items" in capsys.readouterr().err


def _refuse_towers(monkeypatch) -> None:
    """Make building or loading any encoders an error: what is refused first must not need them."""
    import mim_rec.encoders

    def built(*args, **kwargs):
        raise AssertionError("encoders built before the held-out split was checked")

    monkeypatch.setattr(mim_rec.encoders, "EncoderPair", built)
    monkeypatch.setattr(mim_rec.encoders, "load_encoders", built)


def _probe_refusal(count: int) -> str:
    return (f"data.heldout_fraction=0.2: {count - 1} of the {count} items left to train the probe heads on; their "
            "contrastive batch needs at least 2")


@pytest.mark.parametrize("count", [1, 2])
def test_evaluation_on_too_few_training_items_for_the_probe_is_refused(tmp_path, capsys, monkeypatch, count):
    """Item 0 is always held out. A plain row on a world of one item embedded no training item
    (a TypeError traceback); on two, the probe's contrastive batch held one item, whose loss
    is 0, and its heads trained nothing. Refused before the plain row's towers are built and
    the images decoded."""
    small = write_items(tmp_path / "small" / "items.parquet", count=count).parent
    run = tmp_path / "run"
    run.mkdir()
    config = _config(small, run, eval=EvalConfig(probe_steps=2))
    (run / "config.json").write_text(json.dumps(to_dict(config)))
    _refuse_towers(monkeypatch)
    assert cli.main(["pretrain-eval", "--config", str(_write_config(config, tmp_path / "c.yaml"))]) == 2
    err = capsys.readouterr().err
    assert _probe_refusal(count) in err and "Traceback" not in err


def test_pretrain_eval_on_a_split_the_probe_cannot_score_is_refused_before_training(tmp_path, capsys,
                                                                                    monkeypatch):
    """A batch of one item (no InfoNCE reads it: DDA's MLM alone) trains on a world of two items,
    one held out; pretrain --eval refused the split's single training item only after training."""
    import train.pretrain

    def trained(config):
        raise AssertionError("trained before the held-out split was checked")

    monkeypatch.setattr(train.pretrain, "run_pretrain", trained)
    small = write_items(tmp_path / "small" / "items.parquet", count=2).parent
    config = replace(_config(small, tmp_path / "out", eval=EvalConfig(probe_steps=2)), dma_steps=0,
                     image_ssl_weight=0.0)
    config = replace(config, data=replace(config.data, batch_size=1))
    assert cli.main(["pretrain", "--config", str(_write_config(config, tmp_path / "c.yaml")), "--eval"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"mim pretrain: error: {_probe_refusal(2)}")
    assert not (tmp_path / "out").exists()


def test_the_linear_probe_over_one_category_is_not_a_perfect_accuracy():
    """Every item in one category: any probe predicts it, and the table read 1.000."""
    from mim_rec.pretrain.evaluate import linear_probe_accuracy
    from train.pretrain import format_table
    features = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    one, two = torch.zeros(12, dtype=torch.long), torch.arange(12) % 2
    assert linear_probe_accuracy(features[:8], one[:8], features[8:], one[8:], steps=2) is None
    assert linear_probe_accuracy(features[:8], two[:8], features[8:], two[8:], steps=2) is not None
    row = dict.fromkeys(["own_i2t_r1", "own_i2t_r10", "own_t2i_r1", "own_t2i_r10", "probe_i2t_r1", "probe_i2t_r10",
                         "probe_t2i_r1", "probe_t2i_r10"], 0.5) | {"image_linear_probe_acc": None,
                                                                    "title_linear_probe_acc": None}
    assert format_table({"plain": row}).splitlines()[-1].endswith("| n/a (one category) | n/a (one category) |")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A synthetic world (pixels) and stage-1 encoders of a pixel and a precomputed (4-d) tower."""
    from mim_rec.data.synth import SynthConfig, generate_world, tiny
    from mim_rec.encoders import EncoderPair, EncodersConfig, VisionConfig, save_encoders
    from tests.encoder_fixtures import tiny_encoders, tiny_text

    folder = tmp_path_factory.mktemp("synthetic")
    world = generate_world(replace(tiny(SynthConfig()), items=120, categories=2, users=10, events=200, pairs_train=30,
                                   pairs_test=10, image_size=32), folder / "world")
    save_encoders(folder / "pixel", EncoderPair(tiny_encoders(shared_dim=8)))
    save_encoders(folder / "precomputed", EncoderPair(EncodersConfig(
        vision=VisionConfig(name="precomputed", feature_dim=4), text=tiny_text(), shared_dim=8)))
    return world, folder


def _with_image_features(items, row: int = -1, length: int = 4):
    """``items`` with an image_feature vector of ``length`` beside each image, null in ``row``."""
    import pyarrow as pa

    features = [None if i == row else [0.5] * length for i in range(len(items))]
    return items.append_column("image_feature", pa.array(features, pa.list_(pa.float32())))


def _null_image_beside_a_feature(items):
    import pyarrow as pa

    images = items.column("image").to_pylist()
    images[1] = None
    return _with_image_features(items.set_column(items.column_names.index("image"), "image",
                                                 pa.array(images, pa.binary())))


@pytest.mark.parametrize("command", ["pretrain", "pretrain-eval", "csft", "csft-eval", "csft-tune",
                                     "embeddings build"])
@pytest.mark.parametrize("tower, rewrite, message", [
    ("pixel", _null_image_beside_a_feature, "row 1, field 'image': null: the item has no image, which the vision "
                                            "encoder 'convnext_atto' reads"),
    ("precomputed", lambda items: _with_image_features(items, row=1),
     "row 1, field 'image_feature': null: the item has no image feature, which the vision encoder 'precomputed' "
     "reads"),
    ("precomputed", lambda items: _with_image_features(items, length=8).drop_columns(["image"]),
     "row 0, field 'image_feature': a vector of length 8; the vision encoder 'precomputed' reads feature_dim=4")],
    ids=["pixel tower, a null image beside a feature", "precomputed tower, a null feature beside an image",
         "precomputed tower, features of another length"])
def test_items_the_vision_tower_cannot_read_are_refused_before_any_encoder_loads(synthetic, tmp_path, capsys,
                                                                                monkeypatch, command, tower,
                                                                                rewrite, message):
    """Validation accepts a row whose image column the tower reads is null beside another image
    column, and compares a vector's length only with the file's other rows: mim pretrain found
    such items after building its towers, mim csft after loading the encoders, mim embeddings
    build after loading its encoder (a row past the first shard, after writing the shards before
    it), pretrain-eval after building the plain row's towers, csft-eval after loading the
    encoders, csft-tune in its stage-1 pass. Each refuses them first, by file, row and field, and
    writes nothing."""
    import pyarrow.parquet as pq

    source, folder = synthetic
    world = tmp_path / "world"
    world.mkdir()
    for each in source.iterdir():
        if each.name != "items.parquet":
            (world / each.name).symlink_to(each)
    pq.write_table(rewrite(pq.read_table(source / "items.parquet")), world / "items.parquet")
    _refuse_towers(monkeypatch)
    out = tmp_path / "out"
    if command.startswith("pretrain"):
        config = _config(world, out)
        if tower == "precomputed":
            config.encoders.vision = folder_config(folder / tower)
        args = [command, "--config", str(_write_config(config, tmp_path / "c.yaml"))]
    elif command.startswith("csft"):
        # a batch of 4: csft-tune's validation split leaves 7 training pairs
        args = [command, f"data.world={world}", f"encoders={folder / tower}", f"out={out}", "data.batch_size=4"]
        if command == "csft-tune":
            args[1:1] = ["--grid", "loss.temperature=0.1"]
    else:
        args = ["embeddings", "build", f"world={world}", f"encoders={folder / tower}", f"out={out}"]
    run = _finished_run(command, out, config if command == "pretrain-eval" else None)
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {world / 'items.parquet'}, {message}")
    assert sorted(out.rglob("*")) == run


def _finished_run(command: str, out: Path, config: Optional[PretrainConfig]) -> List[Path]:
    """For an evaluation ``command``, the run in ``out`` it checks before the items (the config
    of ``mim pretrain``'s, a C-SFT model's manifest); what ``out`` then holds (nothing for
    the other commands, which must not make it)."""
    from mim_rec.data.manifest import Manifest, write_manifest

    if command == "pretrain-eval":
        out.mkdir()
        (out / "config.json").write_text(json.dumps(to_dict(config)))
    elif command == "csft-eval":
        write_manifest(out / "mm_encoder", Manifest(kind="mm_encoder", stage="csft"))
    return sorted(out.rglob("*"))


def folder_config(encoders: Path):
    """The vision settings an encoders folder was saved with."""
    from mim_rec.encoders.pair import saved_config

    return saved_config(encoders).vision

"""`mim pretrain` end to end on tiny random encoders: exact resume after a real SIGKILL,
a 2-process gloo run under torchrun, and clear errors for bad or empty corpora."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mim_rec.config import ConfigError, to_dict
from mim_rec.pretrain.config import PretrainConfig, PretrainDataConfig
from mim_rec.pretrain.evaluate import EvalConfig
from tests.encoder_fixtures import tiny_encoders, write_items
from train import cli
from train.pretrain import run_pretrain
from mim_rec.utils.dist import free_port

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _config(world: Path, out: Path, **changes) -> PretrainConfig:
    return dataclasses.replace(PretrainConfig(
        encoders=tiny_encoders(), data=PretrainDataConfig(world=str(world), batch_size=8),
        eval=EvalConfig(probe_steps=20), dda_steps=4, dma_steps=8, checkpoint_every=3,
        log_every=1, out=str(out)), **changes)


def _write_config(config: PretrainConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(config)))))
    return path


def _weights(run: Path) -> dict:
    return torch.load(run / "encoders" / "weights.pt", weights_only=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_items(tmp_path_factory.mktemp("world") / "items.parquet", count=48).parent


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(world, tmp_path):
    straight = run_pretrain(_config(world, tmp_path / "straight")).parent
    killed = tmp_path / "killed"
    config_file = _write_config(_config(world, killed), tmp_path / "killed.yaml")
    process = subprocess.Popen([sys.executable, "-m", "train.cli", "pretrain", "--config",
                                str(config_file)], cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("step-*.pt")) and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "encoders").exists()
    run_pretrain(_config(world, killed))
    records = [json.loads(line) for line in (killed / "metrics.jsonl").open()]
    assert "resume" in [record.get("event") for record in records]
    # each step once: the steps logged after the checkpoint before the kill are not kept twice
    steps = [record["step"] for record in records if "phase" in record]
    assert steps == sorted(set(steps))
    want, got = _weights(straight), _weights(killed)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_two_process_gloo_run(world, tmp_path):
    out = tmp_path / "ddp"
    config_file = _write_config(_config(world, out, dda_steps=2, dma_steps=2), tmp_path / "c.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         f"--master-port={free_port()}", "-m", "train.cli", "pretrain", "--config",
         str(config_file), "--eval"], cwd=ROOT, env=ENV, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    start = json.loads((out / "metrics.jsonl").open().readline())
    assert start["world_size"] == 2
    assert (out / "encoders" / "manifest.json").exists()
    report = json.loads((out / "eval.json").read_text())
    assert set(report) == {"inputs", "plain", "dda", "dda+dma"}
    assert [report[row]["steps"] for row in ("plain", "dda", "dda+dma")] == [0, 2, 4]
    assert "| dda+dma | 4 |" in result.stdout


def test_corrupt_image_names_file_row_and_field(tmp_path, capsys):
    items = write_items(tmp_path / "bad" / "items.parquet", count=12, bad_image_row=5)
    config_file = _write_config(_config(items.parent, tmp_path / "out"), tmp_path / "c.yaml")
    assert cli.main(["pretrain", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "items.parquet, row 5, field 'image'" in err and "decodable" in err


def test_empty_corpus_is_an_error(tmp_path, capsys):
    items = write_items(tmp_path / "empty" / "items.parquet", count=0)
    config_file = _write_config(_config(items.parent, tmp_path / "out"), tmp_path / "c.yaml")
    assert cli.main(["pretrain", "--config", str(config_file)]) == 2
    assert "corpus is empty" in capsys.readouterr().err


def test_missing_world_is_an_error(tmp_path, capsys):
    config_file = _write_config(_config(tmp_path / "nowhere", tmp_path / "out"), tmp_path / "c.yaml")
    assert cli.main(["pretrain", "--config", str(config_file)]) == 2
    assert f"data.world={tmp_path / 'nowhere'}: no such file or folder" in capsys.readouterr().err


def _rewrite(path: Path, column: str, row: int, value) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[row] = value
    index = table.column_names.index(column)
    pq.write_table(table.set_column(index, table.schema.field(column),
                                    pa.array(values, table.schema.field(column).type)), path)


@pytest.mark.parametrize("column, value, message", [
    ("title", "  ", "row 4, field 'title': empty title"),
    ("image", None, "row 4, field 'image'"),  # read_items: all image columns null
])
def test_bad_titles_and_missing_images_are_reported(tmp_path, column, value, message):
    from mim_rec.encoders import build_vision_encoder
    from mim_rec.pretrain.corpus import load_corpus
    from mim_rec.data.errors import DataError
    from tests.encoder_fixtures import tiny_vision

    items = write_items(tmp_path / "items.parquet", count=8)
    _rewrite(items, column, 4, value)
    with pytest.raises(DataError, match=message):
        load_corpus(items, build_vision_encoder(tiny_vision()))


def _features_only(pixels: Path, out: Path, dim: int = 6) -> Path:
    """The items of ``pixels`` as an imported data set ships them: ``image_feature`` vectors, no image."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pixels).drop_columns(["image"])
    vectors = np.random.default_rng(0).normal(size=(table.num_rows, dim)).astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.append_column("image_feature", pa.array(list(vectors), pa.list_(pa.float32()))), out)
    return out


def test_vision_tower_follows_the_items_columns(world, tmp_path):
    from mim_rec.pretrain.corpus import vision_for_items
    from tests.encoder_fixtures import tiny_vision

    features = _features_only(world / "items.parquet", tmp_path / "features" / "items.parquet")
    pixel_tower = tiny_vision()
    assert vision_for_items(pixel_tower, world) == pixel_tower
    switched = vision_for_items(pixel_tower, features.parent)
    assert (switched.name, switched.feature_dim) == ("precomputed", 6)
    assert vision_for_items(switched, world) == switched  # an explicit precomputed tower is kept


@pytest.mark.slow
def test_pixel_config_pretrains_on_features_only_items(world, tmp_path, capsys):
    """`mim pretrain` configured for pixels (as `mim pipeline`/`mim experiment` run it) on an
    imported world whose items carry only image_feature: the precomputed tower is used."""
    features = _features_only(world / "items.parquet", tmp_path / "features" / "items.parquet")
    config = _config(features.parent, tmp_path / "out", dda_steps=1, dma_steps=2)
    assert cli.main(["pretrain", "--config", str(_write_config(config, tmp_path / "c.yaml"))]) == 0
    assert "vision tower 'precomputed' (6-d)" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "encoders" / "manifest.json").read_text())
    assert manifest["config"]["vision"]["name"] == "precomputed"


def test_evaluation_refuses_a_folder_without_a_run_and_a_larger_held_out_share(world, tmp_path, capsys):
    """pretrain-eval used to score any folder (writing a plain-only eval.json into a new one),
    and with heldout_fraction above the run's it scored trained-on items as held out."""
    config_file = _write_config(_config(world, tmp_path / "none"), tmp_path / "c.yaml")
    assert cli.main(["pretrain-eval", "--config", str(config_file)]) == 2
    assert "no `mim pretrain` run here" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(_config(world, run))))  # held out 0.2
    config_file = _write_config(_config(world, run), tmp_path / "c.yaml")
    assert cli.main(["pretrain-eval", "--config", str(config_file), "data.heldout_fraction=0.9"]) == 2
    assert "held out 0.2, so the items past that were trained on" in capsys.readouterr().err
    assert not (run / "eval.json").exists()
    # a run that has not reached its DDA artifact yet: the rows it lacks are named, not dropped silently
    assert cli.main(["pretrain-eval", "--config", str(config_file)]) == 0
    assert f"note: no {run / 'dda'}: row 'dda' left out" in capsys.readouterr().err
    assert set(json.loads((run / "eval.json").read_text())) == {"inputs", "plain"}


def test_an_out_that_is_a_file_is_refused(world, tmp_path, capsys):
    (tmp_path / "afile").touch()
    config_file = _write_config(_config(world, tmp_path / "afile"), tmp_path / "c.yaml")
    assert cli.main(["pretrain", "--config", str(config_file)]) == 2  # FileExistsError traceback before
    assert "a file, not a run folder" in capsys.readouterr().err


def test_a_diverged_run_stops_before_it_saves_nan_weights(world, tmp_path):
    """A zero std turns every pixel into inf: the loss went NaN, and the run used to save NaN
    encoders (and checkpoints every resume loads) and exit 0."""
    from mim_rec.utils.run import TrainingDiverged

    out = tmp_path / "nan"
    config = _config(world, out, encoders=tiny_encoders(std=[0.0, 0.0, 0.0]), checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match=r"step 1: training diverged .*the newest is none"):
        run_pretrain(config)
    assert not list(out.glob("checkpoints/*.pt")) and not (out / "dda").exists() and not (out / "encoders").exists()


def test_evaluation_refuses_nan_encoders(world, tmp_path, capsys):
    """A NaN score never outranks the own item's: NaN encoders scored recall 1.000."""
    from mim_rec.encoders import EncoderPair, save_encoders

    run = tmp_path / "run"
    config = _config(world, run, eval=EvalConfig(probe_steps=2))
    pair = EncoderPair(config.encoders)
    with torch.no_grad():
        pair.vision_head.net[1].weight.fill_(float("nan"))
    save_encoders(run / "dda", pair, extra={"steps": 4})
    (run / "config.json").write_text(json.dumps(to_dict(config)))
    assert cli.main(["pretrain-eval", "--config", str(_write_config(config, tmp_path / "c.yaml"))]) == 2
    assert f"{run / 'dda'}: the own heads embed the images of" in capsys.readouterr().err
    assert not (run / "eval.json").exists()


def test_evaluation_refuses_another_stages_run(world, tmp_path, capsys):
    """pretrain-eval pointed at a C-SFT run found a config.json there and overwrote its eval.json."""
    run = tmp_path / "csft"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"encoders": "runs/p/encoders", "steps": 300, "data": {}}))
    (run / "eval.json").write_text("{}")
    config_file = _write_config(_config(world, run), tmp_path / "c.yaml")
    assert cli.main(["pretrain-eval", "--config", str(config_file)]) == 2
    assert "config.json is not the config of a `mim pretrain` run" in capsys.readouterr().err
    assert (run / "eval.json").read_text() == "{}"


def test_a_checkpoint_of_the_tower_before_tf_padding_is_not_trained_on(world, tmp_path):
    """The bundled EfficientNet-Lite0 weights run with TF SAME padding since 2026-12-07: not
    weights, so a run begun before resumed silently and trained on in another architecture."""
    config = _config(world, tmp_path / "run", dda_steps=1, dma_steps=2, checkpoint_every=1,
                     encoders=tiny_encoders(name="efficientnet_lite0", weights="bundled"))
    run_pretrain(config)
    (checkpoint,) = sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))
    state = torch.load(checkpoint, weights_only=False)
    assert state["extra"]["vision_architecture"] == {"pad_type": "same", "bn_eps": 1e-3}
    del state["extra"]["vision_architecture"]  # as a checkpoint written before it was recorded
    torch.save(state, checkpoint)
    with pytest.raises(ConfigError, match=r"trained with the vision tower built with \{\} and this code builds it "
                                          r"with \{'pad_type': 'same', 'bn_eps': 0.001\}"):
        run_pretrain(config)  # a re-run resumes from its last checkpoint

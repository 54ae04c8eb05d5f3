"""What `mim pretrain` and `pretrain-eval` take from the run folder: training refuses a folder
that is not a pretrain run's, a fresh start drops the artifacts an earlier run left, and the
evaluation builds its plain row from the run's own encoder settings and decodes each row's
images at that row's input size."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mim_rec.config import to_dict
from mim_rec.encoders import EncoderPair, save_encoders
from tests.encoder_fixtures import tiny_encoders, write_items
from tests.test_pretrain_trainer import _config, _write_config
from train import cli
from train.pretrain import evaluate_run, run_pretrain

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_items(tmp_path_factory.mktemp("world") / "items.parquet", count=24).parent


def _csft_run(folder: Path) -> str:
    (folder / "config.json").write_text(json.dumps({"encoders": "runs/p/encoders", "steps": 300, "data": {}}))
    (folder / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    return "config.json is not the config of a `mim pretrain` run"


def _own_config(folder: Path) -> str:
    (folder / "config.json").write_text('{"notes": "mine"}')
    (folder / "notes.txt").write_text("keep me")
    return "config.json is not the config of a `mim pretrain` run"


def _files_only(folder: Path) -> str:
    (folder / "notes.txt").write_text("keep me")
    return "holds notes.txt, which is not a `mim pretrain` run's; use an empty or new out="


@pytest.mark.parametrize("fill", [_csft_run, _own_config, _files_only], ids=["csft-run", "own-config", "files"])
def test_training_refuses_a_folder_that_is_not_a_pretrain_runs(world, tmp_path, capsys, fill):
    """Training rewrote config.json and trimmed metrics.jsonl: a C-SFT run's metrics were wiped
    and a folder's own config.json replaced."""
    out = tmp_path / "out"
    out.mkdir()
    message = fill(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    config_file = _write_config(_config(world, out), tmp_path / "c.yaml")
    assert cli.main(["pretrain", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_training_refuses_the_world_folder(world, tmp_path, capsys):
    """out= naming the world folder wrote config.json and checkpoints next to items.parquet."""
    config_file = _write_config(_config(world, world), tmp_path / "c.yaml")
    assert cli.main(["pretrain", "--config", str(config_file)]) == 2
    assert "holds items.parquet, which is not a `mim pretrain` run's" in capsys.readouterr().err
    assert sorted(p.name for p in world.iterdir()) == ["items.parquet"]


def test_a_fresh_start_drops_the_artifacts_an_earlier_run_left(world, tmp_path):
    """An earlier run's dda/ (this run, with dda_steps=0, writes none) was reported as +DDA."""
    out = tmp_path / "out"
    earlier = _config(world, out, dda_steps=4, dma_steps=8)
    save_encoders(out / "dda", EncoderPair(earlier.encoders), extra={"steps": 4})
    (out / "config.json").write_text(json.dumps(to_dict(earlier)))
    (out / "eval.json").write_text("{}")
    run_pretrain(_config(world, out, dda_steps=0, dma_steps=1, head_warmup_steps=0, seed=7))
    assert not (out / "dda").exists() and not (out / "eval.json").exists()
    assert (out / "encoders" / "manifest.json").is_file()


def test_evaluation_takes_the_runs_encoders_and_each_rows_input_size(world, tmp_path, capsys, monkeypatch):
    """`pretrain-eval data.world=W out=R` built the plain row from the command line's encoders
    (the real EfficientNet + MiniLM at 64 px for a tiny 32 px run), and decoded the images once,
    at the first row's size, for every row."""
    import mim_rec.pretrain.evaluate as evaluate

    seen = {}

    def record(pair, train_items, heldout_items, config, source):
        seen[source] = (pair.vision.image_processor.size, pair.shared_dim,
                        train_items.images.shape[-1], heldout_items.images.shape[-1])
        return {}

    monkeypatch.setattr(evaluate, "evaluate_pair", record)
    run = tmp_path / "run"
    trained = _config(world, run)  # 32 px, shared_dim 16
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(trained)))
    save_encoders(run / "dda", EncoderPair(tiny_encoders(image_size=48)), extra={"steps": 4})
    evaluate_run(dataclasses.replace(trained, encoders=tiny_encoders(shared_dim=8, image_size=40)))
    assert seen == {"the plain encoders": (32, 16, 32, 32), str(run / "dda"): (48, 16, 48, 48)}
    assert "note: the plain row uses the encoders.* settings of" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--eval", "--eval-only"])
def test_eval_checks_the_held_out_split_once(world, tmp_path, capsys, monkeypatch, flag):
    """mim pretrain --eval (and --eval-only) checked the held-out split before training, reading
    the item ids, and the evaluation read and checked them again."""
    import mim_rec.pretrain.evaluate as evaluate
    import train.pretrain

    columns = ["own_i2t_r1", "own_i2t_r10", "own_t2i_r1", "own_t2i_r10", "probe_i2t_r1", "probe_i2t_r10",
               "probe_t2i_r1", "probe_t2i_r10", "image_linear_probe_acc", "title_linear_probe_acc"]
    monkeypatch.setattr(evaluate, "evaluate_pair", lambda *args, **kwargs: dict.fromkeys(columns, 0.5))
    monkeypatch.setattr(train.pretrain, "run_pretrain", lambda config: None)  # the run below is trained
    checks = []
    monkeypatch.setattr(train.pretrain, "_check_split_sizes", lambda *args: checks.append(args))
    run = tmp_path / "run"
    trained = _config(world, run)
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(trained)))
    assert cli.main(["pretrain", "--config", str(_write_config(trained, tmp_path / "c.yaml")), flag]) == 0
    assert len(checks) == 1
    assert "| plain | 0 |" in capsys.readouterr().out


def test_evaluation_refuses_a_world_other_than_the_runs(world, tmp_path):
    """The held-out split hashes item ids, so on another world (a re-import that numbers the
    same items otherwise) items the run trained on were scored as held out, without a word."""
    from mim_rec.config import ConfigError
    from mim_rec.data.manifest import fingerprint_file

    run = tmp_path / "run"
    trained = _config(world, run)
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(trained)))
    save_encoders(run / "encoders", EncoderPair(trained.encoders), extra={"steps": 4},
                  inputs={"items": fingerprint_file(world / "items.parquet")})
    other = write_items(tmp_path / "other" / "items.parquet", count=24, seed=5).parent
    with pytest.raises(ConfigError, match=rf"data.world={other}: the run in {run} trained on another items.parquet"):
        evaluate_run(dataclasses.replace(trained, data=dataclasses.replace(trained.data, world=str(other))))
    assert not (run / "eval.json").exists()

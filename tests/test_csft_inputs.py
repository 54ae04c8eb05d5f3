"""Bad settings of the commands that train C-SFT runs (`mim csft`, `csft-ablations`,
`csft-tune`) are refused up front, naming the setting, before any run trains or any folder is
written; their tables follow `eval.ks`."""

from __future__ import annotations


import pytest

from mim_rec.config import ConfigError
from tests.test_csft_trainer import _config, _write_config, inputs  # noqa: F401 (inputs: the shared world)
from train import cli

COMMANDS = {"csft": ["csft"], "ablations": ["csft-ablations", "--only", "full"],
            "tune": ["csft-tune", "--grid", "loss.alpha=0.5"]}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("setting, named", [
    ("steps=0", "steps=0: must be positive"),                       # ablations reported an untrained model
    ("loss.temperature=-1", "loss.temperature=-1.0: must be positive"),  # a ValueError traceback
    ("data.batch_size=0", "data.batch_size=0: must be positive"),   # a ZeroDivisionError
    ("seed=-1", "seed=-1: must not be negative"),                   # a numpy ValueError traceback
])
def test_every_training_command_checks_the_settings_before_any_work(inputs, tmp_path, capsys,  # noqa: F811
                                                                    command, setting, named):
    out = tmp_path / "out"
    config_file = _write_config(_config(inputs, out), tmp_path / "c.yaml")
    assert cli.main([*COMMANDS[command], "--config", str(config_file), setting]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_a_batch_larger_than_the_training_pairs_names_the_pairs(inputs, tmp_path, capsys, monkeypatch):  # noqa: F811
    """C-SFT counted its training pairs and called them items: on a world of 40 items with 22
    purchase pairs it said "only 22 training items", a count the world has nowhere. And it said
    so only after loading the encoders and extracting every backbone feature (~30 s)."""
    import mim_rec.encoders

    def refused_too_late(folder):
        raise AssertionError(f"the encoders at {folder} loaded before the batch size was refused")

    monkeypatch.setattr(mim_rec.encoders, "load_encoders", refused_too_late)
    config_file = _write_config(_config(inputs, tmp_path / "out"), tmp_path / "c.yaml")
    assert cli.main(["csft", "--config", str(config_file), "data.batch_size=100000"]) == 2
    err = capsys.readouterr().err
    assert "data.batch_size=100000: only " in err
    assert "training pairs of data.signals=['purchase', 'click']; lower the batch size" in err


@pytest.mark.parametrize("grid, named", [("loss.temperature=0.1,-1", "loss.temperature=-1.0: must be positive"),
                                         ("steps=2,0", "steps=0: must be positive")])
def test_tune_checks_every_combination_before_the_first_trains(inputs, tmp_path, capsys, grid, named):  # noqa: F811
    out = tmp_path / "out"
    config_file = _write_config(_config(inputs, out), tmp_path / "c.yaml")
    assert cli.main(["csft-tune", "--config", str(config_file), "--grid", grid]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_tune_refuses_a_batch_the_pairs_cannot_fill_before_the_first_point_trains(inputs, tmp_path, capsys,  # noqa: F811
                                                                                   monkeypatch):
    """A grid point whose data.batch_size exceeds the training pairs was refused only when its
    run started, after the stage-1 pass and every earlier point had trained."""
    import train.csft_runs

    def trained(*args, **kwargs):
        raise AssertionError("a grid point trained before the too-large batch was refused")

    monkeypatch.setattr(train.csft_runs, "stage1_result", trained)
    monkeypatch.setattr(train.csft_runs, "csft_result", trained)
    config_file = _write_config(_config(inputs, tmp_path / "out"), tmp_path / "c.yaml")
    assert cli.main(["csft-tune", "--config", str(config_file), "--grid", "data.batch_size=8,100000"]) == 2
    err = capsys.readouterr().err
    assert "--grid point data.batch_size=100000: data.batch_size=100000: only " in err
    assert "training pairs of data.signals=" in err


@pytest.mark.parametrize("validation", ["0", "1", "-0.2", "nan"])
def test_tune_never_chooses_on_the_test_files(inputs, tmp_path, capsys, validation):  # noqa: F811
    """--validation 0 meant the test split, silently."""
    config_file = _write_config(_config(inputs, tmp_path / "out"), tmp_path / "c.yaml")
    assert cli.main(["csft-tune", "--config", str(config_file), "--grid", "loss.alpha=0.5",
                     "--validation", validation]) == 2
    assert f"--validation {float(validation)}: must lie strictly between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["data.validation", "out", "data.feature_cache", "data.world", "encoders"])
def test_tune_refuses_a_grid_over_what_it_sets_itself(key):
    """Its own value came after the grid's, so the grid silently changed nothing; a trial of
    another world or encoders was scored on the base's world (its images decoded for the base's
    tower) against the base's stage-1 row."""
    from train.csft_tune import parse_grid
    with pytest.raises(ConfigError, match=f"--grid '{key}=a,b': csft-tune sets {key} for every run itself"):
        parse_grid(["loss.alpha=0.5", f"{key}=a,b"])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_out_a_file_or_nothing_is_refused(inputs, tmp_path, capsys, command):  # noqa: F811
    """csft-ablations raised FileExistsError, csft-tune NotADirectoryError; an empty out= wrote
    the runs into the current directory."""
    out = tmp_path / "out"
    out.write_text("not a folder")
    config_file = _write_config(_config(inputs, out), tmp_path / "c.yaml")
    assert cli.main([*COMMANDS[command], "--config", str(config_file)]) == 2
    assert f"out={out}: a file, not a run folder" in capsys.readouterr().err
    empty = _write_config(_config(inputs, ""), tmp_path / "empty.yaml")  # it wrote into the current directory
    assert cli.main([*COMMANDS[command], "--config", str(empty)]) == 2
    assert "out: empty; give the run folder" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_out_holding_another_run_is_refused_and_left_as_it_was(inputs, tmp_path, capsys, command):  # noqa: F811
    """csft-ablations and csft-tune wrote their runs, reports and feature cache among a pretrain
    run's files (out=RUN/pretrain), and mim pretrain then refused its own folder."""
    out = tmp_path / "pretrain"
    for name in ("dda", "encoders"):
        (out / name).mkdir(parents=True)
    config_file = _write_config(_config(inputs, out), tmp_path / "c.yaml")
    assert cli.main([*COMMANDS[command], "--config", str(config_file)]) == 2
    prog = {"csft": "mim csft", "ablations": "mim csft-ablations", "tune": "mim csft-tune"}[command]
    assert f"out={out}: holds dda, encoders, which is not a `{prog}` run's; use an empty or new out=" \
        in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["dda", "encoders"]


def _metrics(recall: float, pair_auc: float, ks=(5, 20)):
    return {**{f"recall@{k}": recall for k in ks}, "pair_auc": pair_auc, "gauc": pair_auc}


def test_tables_and_the_balanced_score_follow_eval_ks():
    """eval.ks without 10 and 100 crashed both reports (KeyError 'recall@10') after all training."""
    from train.csft_ablations import format_ablations
    from train.csft_tune import format_tune, score

    stage1 = _metrics(0.1, 0.6)
    ablations = format_ablations({"stage1": stage1, "full": {**_metrics(0.2, 0.7), "overrides": []}})
    assert "| variant | overrides | recall@5 | recall@20 | pair_auc | gauc |" in ablations
    trial = _metrics(0.2, 0.65)
    assert score(trial, stage1, "balanced") == pytest.approx(1.5)  # recall@5 doubles, the AUC lift grows 1.5x
    tune = format_tune({"validation": 0.2, "validation_pairs": 9, "select": "balanced", "stage1": stage1,
                        "trials": [{"settings": ["loss.alpha=0.5"], "metrics": trial, "score": 1.5}],
                        "chosen": ["loss.alpha=0.5"], "final": {"stage1": stage1, "csft": trial}})
    assert "| settings | recall@5 | recall@20 | pair_auc | gauc | score |" in tune
    assert "| **loss.alpha=0.5** | 0.2000 | 0.2000 | 0.6500 | 0.6500 | 1.5000 |" in tune


def test_recall_columns_are_ordered_by_cut_off():
    from train.csft_runs import metric_columns
    assert metric_columns(_metrics(0.1, 0.6, ks=(100, 5, 20))) == ["recall@5", "recall@20", "recall@100",
                                                                   "pair_auc", "gauc"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_encoders_that_cannot_load_leave_no_out_folder(inputs, tmp_path, capsys, command):  # noqa: F811
    """csft-ablations made out= before it loaded encoders=, and a folder that holds no encoders
    left an empty out= behind."""
    out, not_encoders = tmp_path / "out", tmp_path / "not-encoders"
    not_encoders.mkdir()
    config_file = _write_config(_config(inputs, out, encoders=str(not_encoders)), tmp_path / "c.yaml")
    assert cli.main([*COMMANDS[command], "--config", str(config_file)]) == 2
    assert str(not_encoders) in capsys.readouterr().err
    assert not out.exists()

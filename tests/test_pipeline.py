"""`mim pipeline --preset tiny`: every stage runs as its own process (C-SFT and CiUBM on 2 ranks
through TorchX local_cwd), the report is written, a re-run reuses every stage, a failure names
its stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from conftest import REPO, run_mim
from train.pipeline import Stage, run_stage, stage_record


@pytest.mark.slow
def test_tiny_pipeline_runs_every_stage_and_reuses_them(tiny_pipeline):
    out, done = tiny_pipeline
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / "REPORT.md").read_text()
    assert "| Base |" in report and "| Base+MIM |" in report
    assert all(f"| S{i} |" in report for i in range(1, 11))
    assert "not item ages" not in report  # a synthetic world's items have creation times
    for model in ("base_din", "mim_din"):
        metrics = json.loads((out / model / "metrics.json").read_text())
        assert 0.5 < metrics["auc"] < 1 and metrics["n"] > 0
    for stage in ("csft", "train_mim"):  # TorchX local_cwd jobs
        assert "SUCCEEDED" in (out / "logs" / f"{stage}.log").read_text()
    table = json.loads((out / "mm_table" / "manifest.json").read_text())
    assert table["extra"]["encoder_fingerprint"].startswith("csft:")  # built from the C-SFT tower
    config = json.loads((out / "base_din" / "config.json").read_text())
    assert config["model"]["content_interest"] is False and config["mm_table"].endswith("mm_table")

    again = run_mim("pipeline", "--preset", "tiny", "--out", str(out))
    assert again.returncode == 0
    assert again.stdout.count(": reused") == 7


def test_a_failing_stage_is_named_with_its_log(tmp_path):
    (tmp_path / "world").mkdir()
    done = run_mim("pipeline", "--preset", "tiny", "--world", str(tmp_path / "world"), "--out", str(tmp_path / "run"))
    assert done.returncode != 0
    assert "stage 'validate' failed" in done.stderr and "logs/validate.log" in done.stderr
    assert "items.parquet" in done.stderr  # the log's tail says what was wrong


@dataclass
class StageSettings:
    """Stands for a stage's config class in the test below."""
    temperature: float = 0.07


@dataclass
class NewerStageSettings:
    temperature: float = 0.14


def test_a_stage_made_under_other_defaults_is_not_reused(tmp_path, monkeypatch):
    """Same command line, changed default: the record no longer describes what the command
    would make now, so the stage runs again."""
    marker = tmp_path / "artifact.txt"
    stage = Stage("touch", [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"], marker,
                  f"{__name__}:StageSettings")
    run_stage(stage, tmp_path, 1, 1)
    assert stage_record(stage, tmp_path) is not None
    monkeypatch.setattr(sys.modules[__name__], "StageSettings", NewerStageSettings)
    assert stage_record(stage, tmp_path) is None
    assert run_stage(stage, tmp_path, 1, 1)[1] is False  # ran again
    assert stage_record(stage, tmp_path) is not None   # and is current now


def test_a_finished_stage_is_recorded_and_then_reused(tmp_path):
    """A stage that succeeds leaves its record (argv, wall time), and the next call reuses it."""
    marker = tmp_path / "artifact.txt"
    stage = Stage("touch", [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"], marker)
    wall, reused = run_stage(stage, tmp_path, 1, 1)
    record = stage_record(stage, tmp_path)
    assert not reused and record["wall_s"] == wall
    assert set(record["code"]) == {"commit", "dirty"}  # the code version the stage ran from
    assert run_stage(stage, tmp_path, 1, 1) == (wall, True)
    # a record cut short (a killed write) means "not finished": the stage runs again
    record_path = tmp_path / "stages" / "touch.json"
    record_path.write_text(record_path.read_text()[:20])
    assert stage_record(stage, tmp_path) is None  # it was a JSONDecodeError traceback
    assert run_stage(stage, tmp_path, 1, 1)[1] is False


def test_a_stage_after_one_that_ran_again_is_not_reused(tmp_path):
    """A new --synth seed re-ran synth and reused every later stage, made from the old world."""
    from train.pipeline import run_chain

    def stage(name: str, text: str, after=()) -> Stage:
        marker = tmp_path / f"{name}.txt"
        return Stage(name, [sys.executable, "-c", f"open({str(marker)!r}, 'a').write({text!r})"], marker,
                     after=after)

    chain = [stage("first", "a"), stage("second", "b", after=("first",)), stage("third", "c", after=("second",)),
             stage("apart", "d")]
    run_chain(chain, tmp_path)
    assert all(reused for _, reused in run_chain(chain, tmp_path).values())  # nothing changed
    done = run_chain([stage("first", "A"), *chain[1:]], tmp_path)  # the first stage's command changed
    assert {name: reused for name, (_, reused) in done.items()} == {
        "first": False, "second": False, "third": False, "apart": True}  # along the chain; not what reads none of it
    assert [(tmp_path / f"{n}.txt").read_text() for n in ("first", "second", "third", "apart")] == \
        ["aA", "bb", "cc", "d"]


def test_a_given_world_changed_under_the_same_path_runs_its_reader_again(tmp_path):
    """Stages were reused by their command alone: `mim experiment --world W` after W's files
    changed reported the CTR metrics of the old world."""
    from train.pipeline import run_chain

    world = tmp_path / "world"
    world.mkdir()
    (world / "events_test.parquet").write_bytes(b"old")

    def stage(name: str, after=(), reads=None) -> Stage:
        marker = tmp_path / f"{name}.txt"
        return Stage(name, [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"], marker,
                     after=after, reads=reads)

    chain = [stage("validate", reads=world), stage("train", after=("validate",))]
    run_chain(chain, tmp_path)
    assert all(reused for _, reused in run_chain(chain, tmp_path).values())
    (world / "events_test.parquet").write_bytes(b"new")
    assert not any(reused for _, reused in run_chain(chain, tmp_path).values())
    assert all(reused for _, reused in run_chain(chain, tmp_path).values())  # current again


@pytest.mark.parametrize("flag, value, message", [
    ("--out", "a_file", "is a file, not a run folder"), ("--nproc", "0", "--nproc 0"),
    ("--nproc", "3", "--nproc 3: the C-SFT stage's data.batch_size=128 is not divisible by the 3 ranks"),
    # settings of later stages were read only when the chain reached them (mim train: after
    # pre-training and C-SFT)
    ("--ubm", "foo", "model.ubm"), ("--train", "bogus=1", "bogus"), ("--train", "lr=-1", "lr"),
    ("--csft", "steps=0", "steps=0"), ("--pretrain", "dda_steps=-1", "dda_steps"),
    # settings the chain gives a stage itself: they won, and trained SIM in folders named din,
    # Base+MIM without the content interest, or both runs into one folder
    ("--train", "model.ubm=sim", "--train model.ubm=sim: the chain sets model.ubm; it is set by --ubm"),
    ("--train", "model.content_interest=false", "the chain sets model.content_interest"),
    ("--train", "out=/tmp/shared", "the chain sets out; it is set by --out"),
    ("--train", "model={ubm: sim}", "--train model={ubm: sim}: the chain sets model.ubm"),
    ("--pretrain", "out=/tmp/enc", "--pretrain out=/tmp/enc: the chain sets out"),
    ("--csft", "encoders=/tmp/enc", "the chain sets encoders; it is set by the pretrain stage"),
    # found by the validate stage, after its log was written into --out
    ("--world", "/nonexistent/world", "--world /nonexistent/world: no such folder")])
def test_bad_arguments_are_refused_before_any_stage(tmp_path, capsys, flag, value, message):
    from train.cli import main

    (tmp_path / "a_file").write_text("")
    argv = ["pipeline", "--out", str(tmp_path / ("a_file" if flag == "--out" else "run"))]
    assert main(argv + ([flag, value] if flag != "--out" else [])) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_out_holding_another_run_is_refused_before_any_stage(tmp_path, capsys):
    """--out RUN/pretrain (a pretrain run's folder) ran the whole chain there: the stages' folders
    went among the run's files, and mim pretrain then refused its own folder."""
    from train.cli import main
    from train.pipeline import require_chain_folder

    run = tmp_path / "pretrain"
    (run / "encoders").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert main(["pipeline", "--out", str(run), "--preset", "tiny"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mim pipeline: error: --out {run}: holds config.json, encoders and no chain's logs/ or stages/, so it is "
        "not a run folder of mim pipeline or mim experiment; use a new or empty folder")
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "encoders"]
    (tmp_path / "failed_first" / "logs").mkdir(parents=True)  # a chain whose first stage failed
    for accepted in ("new", "failed_first"):
        require_chain_folder(str(tmp_path / accepted), None)
    (tmp_path / "exp" / "world").mkdir(parents=True)  # the world the chain reads may lie in its folder
    require_chain_folder(str(tmp_path / "exp"), str(tmp_path / "exp" / "world"))


def test_the_report_gives_each_age_bucket_its_rows_and_clicks(tmp_path):
    """A bucket's n/a said nothing of why: on a world with a small test split, an empty bucket, a
    one-class bucket and an AUC over a handful of rows looked alike apart from the AUC."""
    from train.pipeline import report

    buckets = [{"bucket": "S1", "age_days_max": 1.0, "auc": 0.6, "n": 1200, "positives": 130},
               {"bucket": "S2", "age_days_max": 2.0, "auc": None, "n": 0, "positives": 0},
               {"bucket": "S3", "age_days_max": 3.0, "auc": None, "n": 5, "positives": 0}]
    for model in ("base_din", "mim_din"):
        (tmp_path / model).mkdir()
        (tmp_path / model / "metrics.json").write_text(json.dumps(
            {"auc": 0.6, "gauc": 0.6, "logloss": 0.3, "n": 1205, "positives": 130, "age_edges": [1.0, 2.0],
             "age_deciles": buckets}))
    text = report(tmp_path, "din", {}, tmp_path)
    assert "| Base | 0.6000 | 0.6000 | 0.3000 | 1,205 (130) |" in text  # the overall AUC's clicks too
    assert "| S1 | 1,200 (130) | 0.6000 | 0.6000 | 0.0000 |" in text
    assert "| S2 | 0 (0) | n/a | n/a | n/a |" in text
    assert "| S3 | 5 (0) | n/a | n/a | n/a |" in text


def test_the_report_says_when_a_worlds_age_buckets_are_not_ages(tmp_path):
    from mim_rec.data.manifest import Manifest, write_manifest
    from train.pipeline import report

    world = tmp_path / "world"
    world.mkdir()
    write_manifest(world, Manifest(kind="world", stage="import", extra={"item_age": "ordinals by user"}))
    bucket = {"bucket": "S1", "age_days_max": 1.0, "auc": 0.6, "n": 10}
    for model in ("base_din", "mim_din"):
        (tmp_path / model).mkdir()
        (tmp_path / model / "metrics.json").write_text(json.dumps(
            {"auc": 0.6, "gauc": 0.6, "logloss": 0.3, "n": 10, "age_edges": [], "age_deciles": [bucket]}))
    assert "**These buckets are not item ages on this world:** ordinals by user." in report(tmp_path, "din", {}, world)


def test_a_stage_failing_under_torchx_shows_the_commands_own_error(tmp_path):
    """Under TorchX the log's tail is torchrun's failure report, which names no cause: the
    stage's `mim ...: error:` line was only in the log file."""
    from train.pipeline import failure_lines

    log = ["csft/0 [0]:loading", "csft/0 [0]:mim csft: error: data.batch_size=32: only 8 training items",
           *[f"csft/0 torchrun report line {i}" for i in range(20)]]
    shown = failure_lines("\n".join(log)).splitlines()
    assert shown[0].endswith("mim csft: error: data.batch_size=32: only 8 training items")
    assert shown[-1] == "csft/0 torchrun report line 19" and len(shown) == 1 + 1 + 15
    assert failure_lines("a\nb") == "a\nb"  # nothing above the tail: the tail only
    grouped = failure_lines("\n".join(["mfm/0 [0]:mim embeddings build: error: out=T: holds x", *log[2:]]))
    assert grouped.splitlines()[0] == "mfm/0 [0]:mim embeddings build: error: out=T: holds x"


def test_a_failing_stage_whose_log_is_not_utf8_is_still_named(tmp_path):
    """A log cut inside a multi-byte character (a progress bar's block, when a stage killed
    with its pipeline kept writing the log a re-run had truncated) ended the failure report in
    a UnicodeDecodeError traceback that hid the stage's own error line."""
    code = ("import sys; sys.stdout.buffer.write(b'bar \\x96\\x88\\nmim csft: error: another run is writing "
            "this folder\\n'); sys.exit(1)")
    stage = Stage("csft", [sys.executable, "-c", code], tmp_path / "never.txt")
    with pytest.raises(SystemExit, match="stage 'csft' failed") as failed:
        run_stage(stage, tmp_path, 1, 1)
    assert "mim csft: error: another run is writing this folder" in str(failed.value)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_pipeline_stopped_with_sigterm_stops_its_stage(tmp_path):
    """`kill PID` of the pipeline ended it at once and left its stage running: a TorchX stage's
    ranks, in process groups of their own, kept training in the run folder, and a re-run of
    the same command started a second job beside them."""
    started = tmp_path / "stage.pid"
    stage_code = f"import os, time; open({str(started)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    pipeline_code = ("import sys; from pathlib import Path; from train.pipeline import Stage, run_stage; "
                     f"run_stage(Stage('csft', [sys.executable, '-c', {stage_code!r}], Path({str(tmp_path)!r}) / "
                     f"'never.txt'), Path({str(tmp_path)!r}), 1, 1)")
    pipeline = subprocess.Popen([sys.executable, "-c", pipeline_code], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (started.is_file() and started.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    stage_pid = int(started.read_text())
    try:
        pipeline.send_signal(signal.SIGTERM)
        _, err = pipeline.communicate(timeout=60)
        assert not _alive(stage_pid)  # ended, and reaped by the pipeline
        assert "stage 'csft' stopped by SIGTERM" in err and "logs/csft.log" in err
    finally:
        if _alive(stage_pid):
            os.kill(stage_pid, signal.SIGKILL)


def test_stage_settings_go_after_the_presets(tmp_path):
    """A world too small for a preset's batch size could not be run through the pipeline at all."""
    import argparse

    from mim_rec.config import ConfigError
    from train.pipeline import stages

    args = argparse.Namespace(out=str(tmp_path), preset="tiny", world=None, ubm="din", nproc=2, synth=["seed=3"],
                              pretrain=[], csft=["data.batch_size=8"], train=["max_steps=5"])
    plan = {stage.name: stage.argv for stage in stages(args)}
    assert plan["synth"][-1] == "seed=3"
    assert plan["csft"][-1] == "data.batch_size=8" and "data.batch_size=32" in plan["csft"]  # later wins
    assert all("max_steps=5" in plan[name] for name in ("train_base", "train_mim"))
    with pytest.raises(ConfigError, match="--synth"):
        stages(argparse.Namespace(**{**vars(args), "world": str(tmp_path)}))


@pytest.mark.parametrize("ending", ["fails", "is killed"])
def test_a_stage_rerun_for_its_upstream_is_not_reused_after_that_rerun_fails(tmp_path, monkeypatch, ending):
    """Running again because an upstream stage ran held for one invocation only: when that run
    failed or was killed, the next invocation reused the stage's old record (same command) and
    its artifact, made from the upstream stage's old output."""
    from train import pipeline

    def stage(name: str, text: str, after=()) -> Stage:
        marker = tmp_path / f"{name}.txt"
        return Stage(name, [sys.executable, "-c", f"open({str(marker)!r}, 'a').write({text!r})"], marker,
                     after=after)

    second = stage("second", "b", after=("first",))
    pipeline.run_chain([stage("first", "a"), second], tmp_path)
    real_run = pipeline.run_logged

    def broken(argv, log):
        if argv != second.argv:
            return real_run(argv, log)
        if ending == "fails":
            return 137, False
        raise KeyboardInterrupt  # the whole invocation stops inside the stage

    monkeypatch.setattr(pipeline, "run_logged", broken)
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        pipeline.run_chain([stage("first", "A"), second], tmp_path)  # first runs again; second does not finish
    monkeypatch.setattr(pipeline, "run_logged", real_run)
    assert stage_record(second, tmp_path) is None
    done = pipeline.run_chain([stage("first", "A"), second], tmp_path)
    assert {name: reused for name, (_, reused) in done.items()} == {"first": True, "second": False}
    assert (tmp_path / "second.txt").read_text() == "bb"


def test_a_rank_count_that_does_not_split_the_csft_batch_is_refused_up_front(tmp_path):
    """--nproc sets C-SFT's ranks too: --nproc 3 with the tiny preset's C-SFT batch of 32 was
    refused only by the C-SFT stage, after synth and pre-training had run."""
    import argparse

    from mim_rec.config import ConfigError
    from train.pipeline import stages

    args = argparse.Namespace(out=str(tmp_path), preset="tiny", world=None, ubm="din", nproc=3, synth=[],
                              pretrain=[], csft=[], train=[])
    with pytest.raises(ConfigError, match=r"--nproc 3: .*data\.batch_size=32 .*3 ranks"):
        stages(args)
    assert stages(argparse.Namespace(**{**vars(args), "csft": ["data.batch_size=30"]}))  # a multiple of 3


SMALL_CSFT = ["--csft", "data.batch_size=8"]  # within the small world's 15 pairs, and a multiple of 2 ranks


@pytest.mark.parametrize("synth, flags, message", [
    (False, [], "stage 'csft': data.batch_size=32: only 15 training pairs of data.signals=['purchase']; "
                "lower the batch size"),
    (False, SMALL_CSFT, "stage 'train_base': {world}/events_train.parquet: 220 events are fewer than one batch of "
                        "128 per rank on 2 ranks"),
    (False, [*SMALL_CSFT, "--pretrain", "data.batch_size=1000"],
     "stage 'pretrain': data.batch_size=1000: only 480 training items; data.heldout_fraction=0.2 of the 600 items "
     "is held out for evaluation; lower data.batch_size or data.heldout_fraction"),
    # a world the chain makes is counted once made, before pre-training
    (True, ["--synth", "events=300", "test_days=20", *SMALL_CSFT],
     "stage 'train_base': {world}/events_train.parquet: 220 events are fewer than one batch of 128 per rank on 2 "
     "ranks"),
    # a clickless world fills every batch, and gives the CTR runs no AUC
    (True, ["--synth", "click.bias=-60"],
     "stage 'train_base': {world}/events_train.parquet, field 'label': every row has label 0: a CTR run needs "
     "clicks and non-clicks in both splits (the AUC is undefined on one class)")])
def test_a_world_too_small_for_a_stages_batch_is_refused_before_pre_training(small_world, tmp_path, capsys,
                                                                            monkeypatch, synth, flags, message):
    """A world too small for a later stage's batch (or without clicks) was refused only when that
    stage started: the CTR runs' 128 events per rank on 2 ranks after pre-training and C-SFT had
    run. Each stage's own refusal now comes once the world is made and validated, before
    pre-training."""
    from train import pipeline
    from train.cli import main

    ran, real = [], pipeline.run_logged

    def run_logged(argv, log):  # the world's stages run; a stage after them would only fail
        ran.append(log.stem)
        return real(argv, log) if log.stem in ("synth", "validate") else (1, False)

    monkeypatch.setattr(pipeline, "run_logged", run_logged)
    out = tmp_path / "run"
    world = out / "world" if synth else small_world
    assert main(["pipeline", "--preset", "tiny", "--out", str(out), *([] if synth else ["--world", str(small_world)]),
                 *flags]) == 2
    assert capsys.readouterr().err.strip() == f"mim pipeline: error: {message.format(world=world)}"
    assert ran == (["synth", "validate"] if synth else ["validate"])


def test_a_world_without_pairs_is_refused_naming_the_csft_stage(small_world, tmp_path, capsys, monkeypatch):
    """A TAOBAO-MM import has no pairs: the check before pre-training stopped on C-SFT's
    "pairs file not found" without the stage's name, unlike every other stage's refusal."""
    import shutil

    from train import pipeline
    from train.cli import main

    world = tmp_path / "world"
    shutil.copytree(small_world, world)
    for pairs in world.glob("pairs_*.parquet"):
        pairs.unlink()
    ran, real = [], pipeline.run_logged

    def run_logged(argv, log):  # only validate may run
        ran.append(log.stem)
        return real(argv, log) if log.stem == "validate" else (1, False)

    monkeypatch.setattr(pipeline, "run_logged", run_logged)
    assert main(["pipeline", "--preset", "tiny", "--out", str(tmp_path / "run"), "--world", str(world)]) == 2
    assert capsys.readouterr().err.strip() == (f"mim pipeline: error: stage 'csft': {world}/pairs_train.parquet: "
                                               f"pairs file not found")
    assert ran == ["validate"]


def test_a_stage_run_again_under_other_settings_moves_its_old_folder_aside(tmp_path, monkeypatch):
    """A changed setting in a run folder failed further down: the stages before it ran again,
    then its trainer refused a folder holding the old configuration's checkpoints. The old
    folder is moved aside (never deleted), with its record; a re-run killed in turn is not moved
    again, so it resumes in its own folder."""
    from train import pipeline

    folder = tmp_path / "stage_out"

    def stage(text: str) -> Stage:  # like a trainer: refuses a folder another configuration wrote
        code = (f"import pathlib, sys; f = pathlib.Path({str(folder)!r}); f.mkdir(exist_ok=True); "
                f"c = f / 'config.txt'; sys.exit('other configuration') if c.exists() and c.read_text() != {text!r} "
                f"else c.write_text({text!r}); (f / 'done').write_text('x')")
        return Stage("train", [sys.executable, "-c", code], folder / "done", folder=folder)

    run_stage(stage("a"), tmp_path, 1, 1)
    assert run_stage(stage("a"), tmp_path, 1, 1)[1] is True  # same settings: reused, nothing moved
    real_run = pipeline.run_logged
    monkeypatch.setattr(pipeline, "run_logged", lambda argv, log: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # settings changed; the re-run is killed before it ends
        run_stage(stage("b"), tmp_path, 1, 1)
    [moved] = (tmp_path / "replaced").iterdir()
    assert (moved / "config.txt").read_text() == "a" and (moved / "stage_record.json").is_file()
    assert not (tmp_path / "stages" / "train.json").exists()
    folder.mkdir()
    (folder / "config.txt").write_text("b")  # what the killed re-run had written
    monkeypatch.setattr(pipeline, "run_logged", real_run)
    assert run_stage(stage("b"), tmp_path, 1, 1)[1] is False  # resumed where it was, not moved again
    assert len(list((tmp_path / "replaced").iterdir())) == 1 and stage_record(stage("b"), tmp_path) is not None


def test_a_stale_folder_that_a_run_still_writes_is_not_moved(tmp_path):
    """The move takes the trainers' folder lock: an orphaned run still writing the folder (its
    pipeline killed) is named, and its folder stays where that run writes."""
    from mim_rec.config import ConfigError

    folder = tmp_path / "stage_out"

    def stage(text: str) -> Stage:
        write = f"import pathlib; pathlib.Path({str(folder / 'done')!r}).write_text({text!r})"
        return Stage("train", [sys.executable, "-c", write], folder / "done", folder=folder)

    folder.mkdir()
    run_stage(stage("a"), tmp_path, 1, 1)
    hold = ("import sys, time; sys.path.insert(0, sys.argv[1]); from mim_rec.utils.run import run_folder_lock; "
            "lock = run_folder_lock(sys.argv[2]); lock.__enter__(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(REPO), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="another run is writing this folder"):
            run_stage(stage("b"), tmp_path, 1, 1)
        assert (folder / "done").read_text() == "a" and not list((tmp_path / "replaced").iterdir())
    finally:
        holder.kill()
        holder.wait()

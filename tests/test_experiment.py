"""`mim experiment`: which stages and CTR runs each table needs, refusal of bad arguments, and the
quick preset end to end on the tiny pipeline's run folder (its shared stages are reused, the
report has every table, and the paper's claims it checks agree with the numbers beside them)."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from conftest import run_mim
from mim_rec.config import ConfigError
from train import experiment


def _plan(tmp_path, **kwargs) -> experiment.Plan:
    args = dict(out=str(tmp_path / "exp"), preset="quick", world=None, tables="2,3,4,5,6", ubms=None,
                seeds=None, nproc=2, ctr=[], pretrain=[], csft=[])
    args.update(kwargs)
    return experiment.make_plan(argparse.Namespace(**args))


def test_every_table_asks_for_its_own_runs(tmp_path):
    names = [run["name"] for run in experiment.ctr_runs(_plan(tmp_path, seeds="0,1,2"))]
    for seed in (0, 1, 2):
        for ubm in experiment.ALL_UBMS:
            assert f"base_{ubm}_s{seed}" in names and f"mim_{ubm}_s{seed}" in names
        for variant in ("stage1table", "nocontent", "nofusion", "truthtable"):
            assert f"{variant}_din_s{seed}" in names
    assert len(names) == len(set(names)) == 3 * (2 * 6 + 4)

    only_costs = _plan(tmp_path, tables="6")
    assert experiment.ctr_runs(only_costs) == []
    assert [s.name for s in experiment.stages(only_costs)][-2:] == ["bench_train", "bench_lookup"]

    ablations = _plan(tmp_path, tables="5", seeds="4")
    runs = {run["name"]: run["overrides"] for run in experiment.ctr_runs(ablations)}
    assert sorted(runs) == ["base_din_s4", "mim_din_s4", "nocontent_din_s4", "nofusion_din_s4", "stage1table_din_s4"]
    assert "model.content_interest=false" in runs["nocontent_din_s4"] and "seed=4" in runs["nofusion_din_s4"]
    assert any(o.endswith("mm_table_stage1") for o in runs["stage1table_din_s4"])
    assert {"mfm_stage1", "ctr_grid", "csft_tables"} <= {s.name for s in experiment.stages(ablations)}


def test_the_true_style_table_runs_only_where_the_world_has_truth(tmp_path):
    synthesised = _plan(tmp_path, tables="3", seeds="0")
    truth = next(s for s in experiment.stages(synthesised) if s.name == "mfm_truth")
    assert f"encoders={synthesised.world / 'truth'}" in truth.argv
    runs = {run["name"]: run["overrides"] for run in experiment.ctr_runs(synthesised)}
    assert any(o.endswith("mm_table_truth") for o in runs["truthtable_din_s0"])
    imported = tmp_path / "imported"
    imported.mkdir()
    plan = _plan(tmp_path, tables="3", seeds="0", world=str(imported))  # no truth/ folder
    assert "mfm_truth" not in {s.name for s in experiment.stages(plan)}
    assert "truthtable_din_s0" not in {run["name"] for run in experiment.ctr_runs(plan)}


def test_each_stage_names_earlier_stages_as_its_inputs(tmp_path):
    """A stage runs again after one it reads has run again (pipeline.run_chain): its ``after``
    must name stages that come before it (synth is absent with --world)."""
    plan = experiment.stages(_plan(tmp_path, seeds="0"))
    seen = {"synth"}
    for stage in plan:
        assert set(stage.after) <= seen, (stage.name, stage.after)
        seen.add(stage.name)
    after = {stage.name: set(stage.after) for stage in plan}
    assert {"mfm", "mfm_stage1"} <= after["ctr_grid"] and "csft" in after["mfm"]
    assert "csft" not in after["pretrain_eval"] and "ctr_grid" not in after["csft_tables"]


def test_the_training_cost_bench_measures_the_plans_ubms(tmp_path):
    """--ubms never reached bench_train: Table 6 measured the bench preset's UBMs whatever the
    plan ran."""
    from mim_rec.config import load_config
    from train.bench_train import TrainBenchConfig

    from train.cli import build_parser

    bench = next(s for s in experiment.stages(_plan(tmp_path, tables="6", ubms="din,sim")) if s.name == "bench_train")
    args = build_parser().parse_args(bench.argv[bench.argv.index("bench"):])  # as the stage's command line parses
    assert load_config(TrainBenchConfig, None, args.overrides, preset=TrainBenchConfig.quick()).ubms == ["din", "sim"]


def test_the_grid_file_name_follows_its_content(tmp_path):
    first = next(s for s in experiment.stages(_plan(tmp_path, ubms="din")) if s.name == "ctr_grid")
    second = next(s for s in experiment.stages(_plan(tmp_path, ubms="din,sim")) if s.name == "ctr_grid")
    grid = lambda stage: stage.argv[stage.argv.index("--grid") + 1]  # noqa: E731
    assert grid(first) != grid(second)
    assert not (tmp_path / "exp").exists()  # naming the stages (a dry run) writes nothing
    experiment.write_grid(_plan(tmp_path, ubms="din,sim"))
    assert [r["name"] for r in json.loads(open(grid(second)).read())][:4] == \
        ["base_din_s0", "mim_din_s0", "base_sim_s0", "mim_sim_s0"]


def test_ctr_overrides_reach_every_run_in_a_folder_of_their_own(tmp_path):
    default = _plan(tmp_path, tables="2", ubms="din")
    small = _plan(tmp_path, tables="2", ubms="din", ctr=["epochs=5", "loader.batch_size=256"])
    grid = next(s for s in experiment.stages(small) if s.name == "ctr_grid")
    assert grid.argv[-2:] == ["epochs=5", "loader.batch_size=256"]  # after the preset's, so they win
    assert small.ctr_dir != default.ctr_dir and small.ctr_dir.parent == default.ctr_dir.parent
    assert all(run["overrides"][0].startswith(f"out={small.ctr_dir}/") for run in experiment.ctr_runs(small))


def test_encoder_stage_settings_reach_their_stages_and_the_report(tmp_path):
    """On a world of 40 items C-SFT refused the quick preset's batch of 32 ("only 22 training
    items; lower the batch size") and the experiment had no way to lower it, as mim pipeline has."""
    plan = _plan(tmp_path, world=str(tmp_path), pretrain=["data.batch_size=8"], csft=["data.batch_size=8"])
    argv = {stage.name: stage.argv for stage in experiment.stages(plan)}
    for name in ("pretrain", "pretrain_eval", "csft", "csft_tables"):
        assert argv[name][-1] == "data.batch_size=8", name  # after the preset's, so they win
    assert plan.settings()["csft_overrides"] == plan.settings()["pretrain_overrides"] == ["data.batch_size=8"]
    with pytest.raises(ConfigError, match="--csft data.world"):  # the chain sets it, as in mim pipeline
        experiment.stages(_plan(tmp_path, csft=["data.world=elsewhere"]))


def test_report_only_runs_nothing_and_reports_what_finished(tmp_path):
    plan = _plan(tmp_path, tables="2", ubms="avg", seeds="0")
    finished = plan.ctr_dir / "base_avg_s0"
    finished.mkdir(parents=True)
    metrics = {"auc": 0.61, "gauc": 0.6, "logloss": 0.4, "n": 10, "per_category": {}, "age_edges": [],
               "age_deciles": [], "steps": 3}
    (finished / "metrics.json").write_text(json.dumps(metrics))
    results = experiment.run_experiment(plan, report_only=True)
    assert results["stages"] == [] and not (plan.out / "logs").exists()  # nothing ran
    assert results["ctr"] == {"base_avg_s0": metrics, "mim_avg_s0": None}
    assert json.loads((plan.out / "results.json").read_text())["ctr"]["base_avg_s0"]["auc"] == 0.61


def test_the_din_ablations_get_din_runs_to_compare_with_whatever_ubms_table_2_has(tmp_path):
    """--tables 2,3,5 --ubms sim trained the DIN ablations and reported each against a DIN
    Base+MIM nobody ran."""
    names = [run["name"] for run in experiment.ctr_runs(_plan(tmp_path, tables="2,3,5", ubms="sim", seeds="0"))]
    assert {"base_sim_s0", "mim_sim_s0", "base_din_s0", "mim_din_s0", "nocontent_din_s0"} <= set(names)
    assert len(names) == len(set(names))


def test_report_only_reads_runs_a_gpu_trained_with_row_wise_pins(tmp_path, capsys):
    """Comparing a run's settings ran the training device check: on a host without CUDA a
    row-wise pin (CUDA only) made every GPU-trained run count as not run."""
    from train.ciubm import load_train_config
    from train.common import config_dict

    plan = _plan(tmp_path, tables="2", ubms="avg", seeds="0", ctr=["model.constraints.mm_item.sharding_types=[row_wise]"])
    for run in experiment.ctr_runs(plan):
        config = load_train_config(None, ["model.mm_dim=16", *experiment.grid_overrides(plan), *run["overrides"]],
                                   check_device=False)
        folder = plan.ctr_dir / run["name"]
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"auc": 0.6}))
        (folder / "config.json").write_text(json.dumps(config_dict(config)))
    results = experiment.run_experiment(plan, report_only=True)
    assert results["ctr"] == {"base_avg_s0": {"auc": 0.6}, "mim_avg_s0": {"auc": 0.6}}, capsys.readouterr().err


def test_report_only_counts_a_run_with_other_settings_as_not_run(tmp_path, capsys):
    """CTR runs were read by name: --report-only with another preset (or none) published the
    numbers of runs trained with other settings under this invocation's header."""
    from train.ciubm import load_train_config
    from train.common import config_dict

    plan = _plan(tmp_path, tables="2", ubms="avg", seeds="0")
    metrics = {"auc": 0.61, "gauc": 0.6, "logloss": 0.4, "n": 10, "per_category": {}, "age_edges": [],
               "age_deciles": [], "steps": 3}
    for run in experiment.ctr_runs(plan):
        config = load_train_config(None, ["model.mm_dim=16", *experiment.grid_overrides(plan), *run["overrides"]])
        folder = plan.ctr_dir / run["name"]
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(metrics))
        if run["name"].startswith("mim_"):
            config.epochs += 1  # trained under another preset
        (folder / "config.json").write_text(json.dumps(config_dict(config)))
    results = experiment.run_experiment(plan, report_only=True)
    assert results["ctr"] == {"base_avg_s0": metrics, "mim_avg_s0": None}
    assert "mim_avg_s0 ran with other settings than this plan's (differs in: epochs)" in capsys.readouterr().err


@pytest.mark.parametrize("changed", ["events_test.parquet", "items.parquet", "mm_table"])
def test_report_only_counts_a_run_scored_on_other_data_as_not_run(tmp_path, capsys, changed):
    """Only the settings were compared: after the world or the MM table was rebuilt in place,
    --report-only published the old runs' numbers under the new stages (the grid re-scores them)."""
    from train.ciubm import _test_events_fingerprint, _training_inputs, load_train_config
    from train.common import config_dict

    plan = _plan(tmp_path, tables="2", ubms="avg", seeds="0")
    plan.world.mkdir(parents=True)
    for name in ("items.parquet", "events_train.parquet", "events_test.parquet"):
        (plan.world / name).write_bytes(b"rows of " + name.encode())
    metrics = {"auc": 0.61, "steps": 3}
    for run in experiment.ctr_runs(plan):
        config = load_train_config(None, ["model.mm_dim=16", *experiment.grid_overrides(plan), *run["overrides"]])
        if config.mm_table:
            (plan.out / "mm_table").mkdir(parents=True, exist_ok=True)
            (plan.out / "mm_table" / "part-0.parquet").write_bytes(b"a table")
        folder = plan.ctr_dir / run["name"]
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({**metrics, "events_test_fingerprint":
                                                          _test_events_fingerprint(config)}))
        (folder / "config.json").write_text(json.dumps(config_dict(config)))
        (folder / "inputs.json").write_text(json.dumps(_training_inputs(config)))
    assert experiment.run_experiment(plan, report_only=True)["ctr"]["mim_avg_s0"] is not None
    target = plan.out / "mm_table" / "part-0.parquet" if changed == "mm_table" else plan.world / changed
    target.write_bytes(b"rebuilt in place")
    results = experiment.run_experiment(plan, report_only=True)
    assert results["ctr"]["mim_avg_s0"] is None
    assert (results["ctr"]["base_avg_s0"] is None) == (changed != "mm_table")  # Base reads no MM table
    assert f"mim_avg_s0 was trained or scored on other data ({changed} changed since)" in capsys.readouterr().err


def _finished(stage, out, argv=None) -> None:
    """Leave ``stage`` as a successful run of ``argv`` (its own by default) would: its artifact
    and a record made after its upstream stages' current records."""
    from train.pipeline import defaults_fingerprint, record_file, upstream_fingerprint

    stage.done_marker.parent.mkdir(parents=True, exist_ok=True)
    stage.done_marker.write_text(json.dumps({"from": stage.name}))
    record_file(stage, out).parent.mkdir(parents=True, exist_ok=True)
    record_file(stage, out).write_text(json.dumps({
        "argv": argv or stage.argv, "wall_s": 1.0, "defaults": defaults_fingerprint(stage.settings),
        "upstream": upstream_fingerprint(stage, out)}))


def test_report_only_reads_a_stage_artifact_only_under_a_current_record(tmp_path, capsys):
    """--report-only read eval.json, ablations.json and the bench files whatever their stage's
    record said: a benchmark run with other settings was reported under this plan's header."""
    plan = _plan(tmp_path, tables="6")
    todo = {stage.name: stage for stage in experiment.stages(plan)}
    _finished(todo["bench_train"], plan.out, todo["bench_train"].argv + ["steps=99"])  # another preset's run
    _finished(todo["bench_lookup"], plan.out)
    results = experiment.run_experiment(plan, report_only=True)
    assert results["bench_train"] is None and results["bench_lookup"] == {"from": "bench_lookup"}
    assert "bench_train.json is not from this plan's bench_train stage" in capsys.readouterr().err


def test_dry_run_says_run_for_a_stage_after_one_that_runs(tmp_path, capsys):
    """--dry-run said "reuse" for every stage with a current record, though one after a stage
    that runs runs too (pipeline.run_chain)."""
    from train.cli import main

    plan = _plan(tmp_path, tables="6")
    todo = experiment.stages(plan)
    for stage in todo:
        _finished(stage, plan.out)
    argv = ["experiment", "--out", str(plan.out), "--tables", "6", "--dry-run"]
    assert main(argv) == 0
    assert capsys.readouterr().out.count(" [reuse]: ") == len(todo)
    (plan.world / "manifest.json").unlink()  # synth runs again; every stage reads its world
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert shown.count(" [run]: ") == len(todo) and "bench_lookup [run]: " in shown


@pytest.mark.parametrize("field, value, message", [
    ("tables", "2,7", "--tables"), ("ubms", "din,gru4rec", "--ubms"), ("seeds", "1,x", "--seeds"),
    ("tables", "", "--tables"), ("seeds", "0,1,0", r"--seeds: 0 given more than once"),
    ("ubms", "din,din", "--ubms: din given more than once"), ("nproc", 0, "--nproc 0"),
    ("out", "a_file", "is a file, not a run folder"),
    ("out", "a_world", "holds items.parquet and no chain's logs/ or stages/")])
def test_bad_arguments_are_refused(tmp_path, field, value, message):
    """Repeated seeds used to get as far as the CTR grid, after every stage before it had run;
    a world folder given as --out had the experiment's stages written into it."""
    if field == "out":
        value = tmp_path / value
        if value.name == "a_file":
            value.write_text("")
        else:
            value.mkdir()
            (value / "items.parquet").write_text("")
    with pytest.raises(ConfigError, match=message):
        _plan(tmp_path, **{field: value})


def test_a_rank_count_that_does_not_split_the_csft_batch_is_refused_before_any_stage(tmp_path, capsys):
    """--nproc 3 with the quick preset's C-SFT batch of 32 was refused by the C-SFT stage, after
    synth and pre-training had run."""
    from train.cli import main

    out = tmp_path / "exp"
    assert main(["experiment", "--out", str(out), "--tables", "6", "--nproc", "3"]) == 2
    assert "--nproc 3: the C-SFT stage's data.batch_size=32" in capsys.readouterr().err
    assert not out.exists()


def test_a_world_too_small_for_the_ctr_batch_is_refused_before_pre_training(small_world, tmp_path, capsys,
                                                                            monkeypatch):
    """The quick preset's CTR runs take 128 events per rank on 2 ranks: a world of fewer than 256
    training events was refused by the CTR grid, after pre-training and C-SFT had run."""
    from train import pipeline
    from train.cli import main

    ran, real = [], pipeline.run_logged

    def run_logged(argv, log):  # the world's gate runs; a stage after it would only fail
        ran.append(log.stem)
        return real(argv, log) if log.stem == "validate" else (1, False)

    monkeypatch.setattr(pipeline, "run_logged", run_logged)
    out = tmp_path / "exp"
    assert main(["experiment", "--out", str(out), "--world", str(small_world), "--tables", "2", "--ubms", "din",
                 "--csft", "data.batch_size=8"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mim experiment: error: stage 'ctr_grid': {small_world}/events_train.parquet: 220 events are fewer than "
        "one batch of 128 per rank on 2 ranks")
    assert ran == ["validate"]


@pytest.mark.parametrize("ctr, flag", [
    ("seed=7", "--seeds"), ("model.ubm=sim", "--ubms"), ("out=runs/x", "--out"), ("mm_table=runs/t", "mfm"),
    ("data.world=runs/w", "--world"), ("model.content_interest=false", "Base+MIM")])
def test_ctr_settings_the_experiment_sets_per_run_are_refused(tmp_path, ctr, flag):
    """--ctr seed=7 model.ubm=sim was accepted and then overridden by every run's own seed and
    UBM without a word (data.world and the interest switches silently changed what each run was)."""
    with pytest.raises(ConfigError, match=f"--ctr {re.escape(ctr)}: .*{re.escape(flag)}"):
        _plan(tmp_path, tables="2", ubms="din", ctr=["epochs=5", ctr])


@pytest.mark.parametrize("ctr, message", [("bogus=1", "bogus"), ("model.over_arch=[0]", "model.over_arch")])
def test_bad_ctr_settings_are_refused_before_any_stage(tmp_path, capsys, ctr, message):
    """--ctr was read only by the CTR grid, after pre-training and C-SFT (a dry run said nothing)."""
    from train.cli import main

    out = tmp_path / "exp"
    assert main(["experiment", "--out", str(out), "--preset", "quick", "--tables", "2", "--ctr", ctr, "--dry-run"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_quick_experiment_reuses_the_pipeline_and_reports_every_table(tiny_pipeline):
    out, done = tiny_pipeline  # the experiment's own stages and runs never touch the pipeline's
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ran = run_mim("experiment", "--preset", "quick", "--out", str(out), timeout=1800)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    for stage in ("validate", "pretrain", "csft", "mfm"):
        assert f"{stage}: reused" in ran.stdout

    results = json.loads((out / "results.json").read_text())
    assert all(results["ctr"].values()), [k for k, v in results["ctr"].items() if not v]
    for name, metrics in results["ctr"].items():
        assert 0.5 < metrics["auc"] < 1, name
    assert set(results["csft"]) >= {"stage1", "full", "no_tfn", "no_st_nsg", "no_multi_level", "category_ce",
                                    "click_ce", "purchase_ce", "click_infonce"}
    assert set(results["pretrain_eval"]) == {"inputs", "plain", "dda", "dda+dma"}
    assert results["bench_train"] and results["bench_lookup"]
    assert results["code"]["commit"]

    report = (out / "report" / "REPORT.md").read_text()
    for heading in ("Table 2", "Table 3", "Table 4", "Table 5", "Table 6", "Figure 6", "claims"):
        assert heading in report, heading
    for ubm in experiment.ALL_UBMS:
        assert f"| {ubm}" in report.lower()
    for png in ("fig6_age_gain.png", "fig5_encoders.png", "table2_auc.png"):
        assert (out / "report" / png).stat().st_size > 1000

    from mim_rec.report import paper_claims
    claims = {c["id"]: c for c in paper_claims(results)}
    assert all(c["holds"] is not None for c in claims.values())  # every table ran
    # The representation center's claim holds on any world: a table lookup is far cheaper than
    # running the encoder for every behaviour of every sample.
    assert claims["10-lookup"]["holds"] is True, claims["10-lookup"]

    again = run_mim("experiment", "--preset", "quick", "--out", str(out))
    assert again.returncode == 0 and ": running" not in again.stdout

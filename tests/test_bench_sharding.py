"""``mim bench sharding``: planner rows per sharding type, paper-scale fit, measured 2-rank steps."""

import pytest

from mim_rec.config import ConfigError, load_config
from train.bench_sharding import (ShardingBenchConfig, TableSpec, build_model, format_table, make_plans,
                                  measure)
from train.cli import main


def _tiny(**overrides) -> ShardingBenchConfig:
    """Two pooled ID tables, one behaviour table (item_id: 1 + L bags) and the MM table (L = 4)."""
    fields = dict(mm_rows=128, mm_dim=16, mm_pooling=4, batch_size=8, world_size=2, warmup_steps=1, steps=2)
    fields.update(overrides)
    if "id_tables" not in fields:
        fields["id_tables"] = [TableSpec("user_id", 64, 8, 1), TableSpec("query_token", 96, 8, 3),
                               TableSpec("item_id", 80, 8, 1, per_slot=True)]
    return ShardingBenchConfig(**fields)


def test_cpu_rows_say_where_each_plan_comes_from():
    rows = {r.plan: r for r in make_plans(_tiny(plans=[
        "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel", "planner"]))}
    for name in ("table_wise", "column_wise", "data_parallel", "planner"):
        row = rows[name]
        assert row.source == "planner" and row.fits is True, name
        assert len(row.est_mem_gb) == 2 and row.est_step_ms > 0
    for name in ("row_wise", "table_row_wise"):  # not offered to the planner on CPU
        assert rows[name].source == "manual" and rows[name].est_step_ms is None
        assert set(rows[name].table_types.values()) == {name}
    assert set(rows["table_wise"].table_types.values()) == {"table_wise"}
    # data-parallel replicates every table: each rank holds at least the whole MM table
    mm_gb = 128 * 16 * 4 / 1e9
    assert min(rows["data_parallel"].est_mem_gb) >= mm_gb
    table = format_table(list(rows.values()), measured=False)
    assert "row_wise" in table and "planner offers it only on cuda" in table


def test_paper_scale_fits_only_when_the_mm_table_is_split_across_ranks():
    rows = {r.plan: r for r in make_plans(ShardingBenchConfig.paper_scale())}
    assert rows["table_wise"].fits is False and rows["data_parallel"].fits is False
    assert rows["row_wise"].fits is True
    # 1.4e9 x 128 fp16 = 358.4 GB over 64 ranks = 5.6 GB each, + the lookup buffers: a row-wise
    # shard's output is every rank's B (1 + L) rows (2048 x 64 x 51 x 128 x 2 B = 1.71 GB for
    # the MM table), + the inputs and the category table's outputs
    mm_outputs_gb = 2048 * 64 * 51 * 128 * 2 / 1e9
    assert all(5.6 + mm_outputs_gb <= gb < 5.6 + mm_outputs_gb + 1 for gb in rows["row_wise"].est_mem_gb)
    assert rows["planner"].fits is True


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="plans"):
        _tiny(plans=["diagonal"]).validate()
    with pytest.raises(ConfigError, match=r"plans=\['table_wise', 'table_wise'\]: each may appear once"):
        _tiny(plans=["table_wise", "table_wise"]).validate()  # printed (and measured) the same row twice
    with pytest.raises(ConfigError, match="local_world_size"):
        _tiny(world_size=6, local_world_size=4).validate()
    with pytest.raises(ConfigError, match="int8"):
        _tiny(mm_dtype="int8").validate()
    assert main(["bench", "sharding", "--paper-scale", "--config", "x.yaml"]) == 2
    # each of these ended in a traceback, or (batch_size=0) was planned silently as 512
    for bad, message in (({"mm_rows": 0}, "mm_rows=0: must be positive"),
                         ({"mm_dim": 0}, "mm_dim=0: must be positive"),
                         ({"batch_size": 0}, "batch_size=0: must be positive"),
                         ({"world_size": 0}, "world_size=0: must be positive"),
                         ({"steps": 0}, "steps=0: must be positive"),
                         ({"id_tables": [TableSpec("a", 0, 4)]}, r"id_tables\[0\].rows=0: must be positive"),
                         ({"id_tables": [TableSpec("a", 5, 4, pooling=0)]},
                          r"id_tables\[0\].pooling=0: must be positive")):
        with pytest.raises(ConfigError, match=message):
            _tiny(**bad).validate()
    config = load_config(ShardingBenchConfig, None, ["id_tables=[{name: a, rows: 5, dim: 4}]"])
    assert config.id_tables == [TableSpec("a", 5, 4, 1)]


def test_the_mm_and_behaviour_tables_are_looked_up_once_a_slot_as_in_ciubm():
    """CiUBM's ebc layout looks the MM, item and category tables up in 1 + L single-id bags a
    sample (target + L behaviours), B (1 + L) rows; the bench summed L ids into one bag a
    sample, so its steps moved B rows of the MM table, (1 + L) times too few."""
    import torch

    from train.bench_sharding import _random_batch, describe
    mm_only = _random_batch(_tiny(id_tables=[]), torch.Generator().manual_seed(0))  # batch 8, L = 4
    mm = mm_only[-2]
    assert mm.keys() == ["mm_table"] and mm.stride() == 8 * 5
    assert mm.lengths().tolist() == [1] * 40
    config = _tiny()
    batch = _random_batch(config, torch.Generator().manual_seed(0))
    pooled, sequence, mm = batch[0], batch[1], batch[2]
    assert pooled.keys() == ["user_id", "query_token"] and pooled.stride() == 8
    assert sequence.keys() == ["item_id"] and sequence.stride() == 8 * 5
    model = build_model(config, device="cpu")
    assert model.mm_table(mm).values().shape == (40, 16)
    assert torch.isfinite(model(*batch))  # each sample's 5 rows averaged before the over arch
    assert "pooling 1 x 5 bags" in describe(config) and "pooling 3 x 1 bag\n" in describe(config)


def _torchrec_mm_estimate(config: ShardingBenchConfig, **load) -> tuple:
    """TorchRec's own (comms ms, storage GB) for the MM table alone, table-wise, fused kernel."""
    import torch
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.planner import ParameterConstraints
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.shard_estimators import (EmbeddingPerfEstimator,
                                                               EmbeddingStorageEstimator)

    from train.bench_sharding import _sharders, _topology
    topology = _topology(config)
    constraints = {"mm_table": ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"],
                                                    **load)}
    model = torch.nn.Module()
    model.mm_table = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        name="mm_table", embedding_dim=config.mm_dim, num_embeddings=config.mm_rows,
        feature_names=["mm_table"])], device=torch.device("meta"))
    estimators = [EmbeddingPerfEstimator(topology=topology, constraints=constraints),
                  EmbeddingStorageEstimator(topology=topology, constraints=constraints)]
    enumerator = EmbeddingEnumerator(topology=topology, batch_size=config.batch_size, constraints=constraints,
                                     estimator=estimators)
    [option] = enumerator.enumerate(model, _sharders())
    [shard] = option.shards
    return (shard.perf.fwd_comms + shard.perf.bwd_comms + shard.perf.input_dist_comms,
            (shard.storage.hbm + shard.storage.ddr) / 1e9)


def test_the_planner_is_told_the_mm_tables_bags_per_sample():
    """The planner priced the MM table as one bag of L ids a sample (B output rows); CiUBM's
    lookup is 1 + L single-id bags (B (1 + L) rows): ParameterConstraints.num_poolings."""
    config = _tiny(id_tables=[], compute_device="cuda", plans=["table_wise"], batch_size=512)
    row = make_plans(config)[0]
    per_slot = _torchrec_mm_estimate(config, pooling_factors=[1.0], num_poolings=[5.0])
    one_bag = _torchrec_mm_estimate(config, pooling_factors=[4.0])
    assert (sum(row.est_comms_ms), sum(row.est_mem_gb)) == pytest.approx(per_slot)
    assert per_slot[0] > 2 * one_bag[0]  # 5 output rows a sample instead of 1


@pytest.mark.slow
def test_measured_two_ranks_hold_exactly_the_tables():
    """Table-wise and row-wise both store every row once across the two ranks."""
    config = _tiny(plans=["table_wise", "row_wise"])
    rows = make_plans(config)
    measure(config, rows)
    total_mb = (64 * 8 + 96 * 8 + 80 * 8 + 128 * 16) * 4 / 1e6  # decimal MB, as the estimates' GB
    for row in rows:
        assert row.step_ms > 0 and row.samples_per_s > 0, row.plan
        assert len(row.shard_mb) == 2 and len(row.peak_mem_mb) == 2
        assert sum(row.shard_mb) == pytest.approx(total_mb), row.plan
    row_wise = rows[1]
    assert row_wise.shard_mb[0] == pytest.approx(row_wise.shard_mb[1])


@pytest.mark.slow
def test_a_ranks_peak_memory_is_its_own_not_its_callers():
    """ru_maxrss survives fork and exec: every plan's ranks reported the caller's peak when
    that was larger (a test run, a notebook), whatever the plan held."""
    import numpy as np

    from train.bench_sharding import _peak_resident_bytes

    held = np.ones(3_000_000_000 // 8)  # 3 GB touched, then freed: the caller's high-water mark
    del held
    callers = _peak_resident_bytes() / 1e6
    config = _tiny(plans=["table_wise"])
    rows = make_plans(config)
    measure(config, rows)
    assert all(0 < mb < callers - 2_000 for mb in rows[0].peak_mem_mb), (rows[0].peak_mem_mb, callers)


def test_column_wise_says_when_no_table_is_split_and_splits_when_asked():
    """Every table of <= 128 columns stayed whole, so the column_wise row was table_wise's."""
    whole = {r.plan: r for r in make_plans(_tiny(plans=["table_wise", "column_wise"]))}
    assert "no table was split by columns" in whole["column_wise"].note
    assert whole["column_wise"].est_mem_gb == whole["table_wise"].est_mem_gb
    split = make_plans(_tiny(plans=["column_wise"], column_wise_min_dim=8))[0]
    assert split.note == ""
    mm_shards = split.sharding_plan.plan["mm_table"]["mm_table"].sharding_spec.shards
    assert [shard.shard_sizes for shard in mm_shards] == [[128, 8], [128, 8]]  # 16 columns in two


def test_cli_refuses_a_json_path_before_planning(tmp_path, capsys):
    assert main(["bench", "sharding", "mm_rows=64", "mm_dim=8", "plans=[table_wise]",
                 "--json", str(tmp_path / "missing" / "rows.json")]) == 2
    err = capsys.readouterr()
    assert "no folder" in err.err and "est mem/rank" not in err.out


def test_cli_prints_the_comparison_table(capsys):
    assert main(["bench", "sharding", "id_tables=[{name: a, rows: 50, dim: 8}]", "mm_rows=64",
                 "mm_dim=8", "plans=table_wise,column_wise,planner"]) == 0
    out = capsys.readouterr().out
    assert "est mem/rank GB" in out and "topology: 2 ranks (1 host x 2)," in out  # not "1 hosts"
    assert sum(line.startswith(("table_wise", "column_wise", "planner")) for line in
               out.splitlines()) == 3


def test_cli_writes_strict_json_with_the_wall_time(tmp_path, capsys, monkeypatch):
    """The bench wrote its JSON itself: no wall_s, and a NaN estimate as a bare NaN, which
    strict JSON readers refuse. It goes the other benches' way now (run_and_report)."""
    import json

    import train.bench_sharding

    def with_a_nan_estimate(config):
        rows = make_plans(config)
        rows[0].est_step_ms = float("nan")
        return rows

    monkeypatch.setattr(train.bench_sharding, "make_plans", with_a_nan_estimate)
    path = tmp_path / "rows.json"
    assert main(["bench", "sharding", "mm_rows=64", "mm_dim=8", "plans=[table_wise]", "--json", str(path)]) == 0
    result = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"bare {name} in the JSON"))
    assert result["wall_s"] > 0 and result["rows"][0]["est_step_ms"] is None
    assert "wall time" in capsys.readouterr().out


def test_measuring_a_plan_made_for_several_hosts_is_refused(capsys):
    """The measured ranks all run on this host: TorchRec cut a table-row-wise plan made for
    one rank per host by the runtime's host size and failed with an IndexError."""
    assert main(["bench", "sharding", "--measure", "mm_rows=64", "mm_dim=8", "local_world_size=1",
                 "plans=[table_row_wise]"]) == 2
    err = capsys.readouterr().err
    assert "--measure runs all 2 ranks on this host: set local_world_size=2" in err


def test_an_empty_plan_list_is_refused_by_name(capsys):
    """plans=[] used to end in a TypeError inside format_table."""
    with pytest.raises(ConfigError, match="plans: empty"):
        _tiny(plans=[]).validate()
    assert main(["bench", "sharding", "plans=[]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mim bench sharding: error: plans: empty") and len(err.strip().splitlines()) == 1


def test_a_manual_plan_gets_the_planners_storage_estimate():
    """On a (simulated) GPU the planner offers row-wise itself: the manual plan's estimate is the same."""
    config = _tiny(compute_device="cuda")
    from train.bench_sharding import plan_manually, plan_with_planner
    model = build_model(config)
    for sharding_type in ("row_wise", "table_row_wise"):
        manual = plan_manually(config, model, sharding_type)
        assert manual.source == "manual" and manual.fits is True
        assert manual.est_mem_gb == pytest.approx(plan_with_planner(config, model, sharding_type).est_mem_gb)
    cpu = {r.plan: r for r in make_plans(_tiny(plans=["row_wise", "table_row_wise"]))}
    tables_gb = (64 * 8 + 96 * 8 + 80 * 8 + 128 * 16) * 4 / 1e9
    for row in cpu.values():
        assert row.fits is True and len(row.est_mem_gb) == 2
        assert sum(row.est_mem_gb) >= tables_gb  # every row once, plus the batch's buffers
    assert "EmbeddingStorageEstimator" in format_table(list(cpu.values()), measured=False)


def test_a_manual_plan_that_does_not_fit_is_not_measured():
    """It was shown 'fits ?' and run at 18 MB per rank against a 0.1 MB limit."""
    config = _tiny(plans=["row_wise", "table_row_wise", "table_wise"], ddr_gb_per_device=1e-7)
    rows = make_plans(config)
    assert [r.fits for r in rows] == [False, False, False]
    assert all(len(r.est_mem_gb) == 2 for r in rows[:2])
    measure(config, rows)  # spawns no rank: nothing fits
    assert all(r.step_ms is None and not r.shard_mb for r in rows)
    table = format_table(rows, measured=True)
    assert "does not fit: rank" in table and "not run" in table
    fits_column = table.splitlines()[0].index("fits")
    assert [line[fits_column:fits_column + 4].strip() for line in table.splitlines()[2:5]] == ["no"] * 3


def test_a_manual_plan_the_estimator_splits_otherwise_is_refused_by_table():
    """Pricing it some other way would put rows priced unlike the others in one table."""
    from train.bench_sharding import estimate_manual_storage, plan_manually
    config = _tiny(compute_device="cuda")
    model = build_model(config)
    row = plan_manually(config, model, "row_wise")
    shards = row.sharding_plan.plan["mm_table"]["mm_table"].sharding_spec.shards
    shards[0].shard_sizes[0] -= 1  # no longer the estimator's even row split
    with pytest.raises(RuntimeError, match="'mm_table'"):
        estimate_manual_storage(config, model, row)

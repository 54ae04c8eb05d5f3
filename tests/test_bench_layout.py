"""``mim bench layout``: both behaviour-lookup layouts run on fbgemm's kernels, and sharded by
DistributedModelParallel on 2 gloo ranks, return the same rows (checked before timing) and are
printed side by side with their ratio."""

from __future__ import annotations

import json

import pytest

from mim_rec.config import ConfigError
from train import bench_layout
from train.cli import main


def test_quick_run_times_both_layouts_and_writes_the_ratio(tmp_path, capsys):
    out = tmp_path / "layout.json"
    assert main(["bench", "layout", "--quick", "--json", str(out), "hist_len=4"]) == 0
    result = json.loads(out.read_text())
    assert [row["pooling"] for row in result["layouts"]] == ["SUM", "NONE"]
    assert result["rows_per_step"] == 16 * (1 + 4)
    assert all(row["train_ms"] > 0 and row["inference_ms"] > 0 for row in result["layouts"])
    ebc, ec = result["layouts"]
    assert result["ec_over_ebc_train_time"] == pytest.approx(ec["train_ms"] / ebc["train_ms"])
    printed = capsys.readouterr().out
    assert "EC / EBC time" in printed and "single-behaviour bags" in printed
    assert "median of 1 round x 2 steps" in printed  # the quick preset's one round read "1 rounds"


def test_a_layout_that_returns_other_rows_voids_the_bench(monkeypatch):
    # sum-pooling whole sequences is another lookup ([B, D], not a row per slot): never timed
    monkeypatch.setattr(bench_layout, "LAYOUTS", (bench_layout.LAYOUTS[0], ("pooled", "SUM", "sample", "pooled")))
    with pytest.raises(RuntimeError, match="different rows"):
        bench_layout.measure(bench_layout.quick())


def test_a_sharded_batch_holds_the_drawn_behaviours_and_the_target():
    """Slot 0 (the target) was counted among the behaviours: a sample drawn with b got b + 1,
    so min_hist_len=1 meant 2 and a draw of L - 1 came out full."""
    import torch

    config = bench_layout.LayoutBenchConfig(sharded=True, items=50, batch_size=64, hist_len=5, min_hist_len=1)
    _, sequence_kjt, filled = bench_layout._rank_batch(config, 0, torch.device("cpu"))
    filled = filled.view(config.batch_size, 1 + config.hist_len)
    generator = torch.Generator().manual_seed(config.seed * 1_000)
    drawn = torch.randint(config.min_hist_len, config.hist_len + 1, (config.batch_size,), generator=generator)
    assert torch.equal(filled[:, 1:].sum(1), drawn) and filled[:, 0].all()
    assert torch.equal(sequence_kjt.lengths(), drawn + 1)
    # right-aligned: the behaviours fill the last slots
    assert all(row[1 + config.hist_len - b:].all() for row, b in zip(filled, drawn.tolist()))


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_sharded_run_times_both_collections_through_dmp_on_two_ranks(tmp_path, capsys, sharding):
    out = tmp_path / "sharded.json"
    assert main(["bench", "layout", "--quick", "--json", str(out), "sharded=true", f"sharding={sharding}",
                 "hist_len=6", "min_hist_len=2"]) == 0
    result = json.loads(out.read_text())
    # each of the 2 ranks looked up its 16 targets and 2..6 behaviours per sample
    assert len(result["rows_per_rank"]) == 2
    assert all(16 * 3 <= rows <= 16 * 7 for rows in result["rows_per_rank"])
    ebc, ec = result["layouts"]
    assert ebc["train_samples_per_s"] == pytest.approx(2 * 16 / (ebc["train_ms"] / 1e3))  # both ranks' samples
    assert result["ec_over_ebc_train_time"] == pytest.approx(ec["train_ms"] / ebc["train_ms"])
    assert f"2 ranks, {sharding}" in capsys.readouterr().out


@pytest.mark.parametrize("override, needle", [("batch_size=0", "batch_size=0: must be positive"),
                                              ("warmup=-1", "warmup=-1: must not be negative"),
                                              ("rounds=0", "rounds=0: must be positive"),
                                              ("device=tpu", "device"), ("min_hist_len=9", "min_hist_len"),
                                              ("sharding=diagonal", "sharding"),
                                              ("dim=3", "dim=3: FBGEMM's embedding kernels need a multiple of 4"),
                                              ("sharded=true ranks=3 sharding=column_wise", "column_wise over ranks=3")])
def test_bad_settings_are_refused_by_name(override, needle, capsys):
    assert main(["bench", "layout", "--quick", *override.split()]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("override", ["sharding=row_wise", "ranks=4", "min_hist_len=2"])
def test_a_sharded_setting_without_sharded_is_refused(override, capsys):
    """The kernel mode reads none of them: sharding=row_wise timed the bare kernels, exit code 0."""
    assert main(["bench", "layout", "--quick", override]) == 2
    assert capsys.readouterr().err.strip() == (f"mim bench layout: error: {override}: a setting of sharded=true; "
                                               "the kernel mode times full histories on the bare kernels of one "
                                               "process")


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_threads_must_be_positive(threads, capsys):
    """threads=-1 ended in torch's 'set_num_threads expects a positive integer'; 0 passed silently."""
    assert main(["bench", "layout", "--quick", f"threads={threads}"]) == 2
    err = capsys.readouterr().err
    assert f"threads={threads}: must be positive" in err and len(err.strip().splitlines()) == 1


def test_the_help_keeps_the_docstrings_list(capsys):
    """argparse's default formatter ran the two modes' bullet list into one paragraph."""
    with pytest.raises(SystemExit):
        main(["bench", "layout", "--help"])
    assert "\n* kernels (default): " in capsys.readouterr().out


def test_row_wise_refuses_a_rank_with_no_row(capsys):
    """items=1 over 2 ranks crashed inside fbgemm ('weights[0] must be a GPU or MTIA tensor')."""
    assert main(["bench", "layout", "--quick", "sharded=true", "ranks=2", "items=1", "sharding=row_wise",
                 "dim=8", "batch_size=4", "hist_len=3"]) == 2
    assert "items=1: row_wise over ranks=2 splits the table into TorchRec's row blocks [1, 0]" in \
        capsys.readouterr().err
    # TorchRec's ceil-sized blocks can leave the last rank empty even with items >= ranks
    with pytest.raises(ConfigError, match=r"\[2, 2, 1, 0\]"):
        bench_layout.LayoutBenchConfig(sharded=True, ranks=4, items=5, sharding="row_wise").validate()
    bench_layout.LayoutBenchConfig(sharded=True, ranks=4, items=7, sharding="row_wise").validate()


def test_row_wise_blocks_are_torchrecs():
    from torchrec.distributed.sharding_plan import _calculate_rw_shard_sizes_and_offsets

    for rows in range(1, 30):
        for ranks in range(1, 9):
            sizes, _ = _calculate_rw_shard_sizes_and_offsets(rows, ranks, 4)
            assert bench_layout.row_wise_blocks(rows, ranks) == [size[0] for size in sizes], (rows, ranks)


def test_json_to_a_folder_is_refused_before_measuring_and_dash_is_stdout(tmp_path, capsys, monkeypatch):
    """A folder was refused only after the whole measurement (IsADirectoryError, the result
    lost); '-' wrote a file literally named '-'."""
    assert main(["bench", "layout", "--quick", "--json", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "a folder; give a file path" in captured.err and "wall time" not in captured.out
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "layout", "--quick", "--json", "-", "hist_len=4"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "-").exists()
    assert json.loads(out[out.index("\n{") + 1:])["wall_s"] > 0

"""``mim data holdout``: the latest share of the training period becomes the test split of a
world of its own; nothing of the source's test files is read; errors name the file."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_mim
from mim_rec.data.errors import DataError
from mim_rec.data.io import validate_world
from mim_rec.data.split import holdout_world, time_cut
from mim_rec.data.synth import SynthConfig, generate_world, tiny


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tiny(SynthConfig(seed=3)), tmp_path_factory.mktemp("world"))


def _ts(path):
    return pq.read_table(path, columns=["ts"]).column("ts").to_numpy()


def test_the_latest_share_validates_and_the_rest_trains(world, tmp_path):
    counts = holdout_world(world, tmp_path / "val", 0.2)
    source = pq.read_table(world / "events_train.parquet")
    train, held = (pq.read_table(tmp_path / "val" / f"events_{s}.parquet") for s in ("train", "test"))
    assert train.num_rows + held.num_rows == source.num_rows
    assert counts["events_test"] == held.num_rows and 0.15 < held.num_rows / source.num_rows <= 0.25
    assert train.column("ts").to_numpy().max() < held.column("ts").to_numpy().min()  # split by time
    assert sorted(train.column("ts").to_pylist() + held.column("ts").to_pylist()) == \
        sorted(source.column("ts").to_pylist())  # every row once, none changed
    cut = json.loads((tmp_path / "val" / "manifest.json").read_text())["config"]["cut_ts"]
    assert (_ts(tmp_path / "val" / "pairs_train.parquet") < cut).all()
    assert (_ts(tmp_path / "val" / "pairs_test.parquet") >= cut).all()
    truth = pq.read_table(tmp_path / "val" / "truth" / "events_test.parquet")
    assert truth.num_rows == held.num_rows  # the ground truth stays row-aligned
    validate_world(tmp_path / "val", echo=lambda line: None)


def test_the_source_test_files_are_not_read(world, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("items.parquet", "events_train.parquet", "pairs_train.parquet"):
        (source / name).symlink_to(world / name)
    (source / "events_test.parquet").write_bytes(b"not parquet")
    holdout_world(source, tmp_path / "val", 0.1)  # the unreadable events_test is never opened
    assert _ts(tmp_path / "val" / "events_test.parquet").max() <= _ts(world / "events_test.parquet").min()


def test_a_missing_events_file_is_named(tmp_path, world):
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "items.parquet").symlink_to(world / "items.parquet")
    with pytest.raises(DataError, match="events_train.parquet"):
        holdout_world(tmp_path / "source", tmp_path / "val", 0.1)


def test_a_cut_that_leaves_nothing_to_train_on_is_named():
    with pytest.raises(DataError, match="events_train.parquet.*leaves no rows"):
        time_cut(np.full(10, 7), 0.2, "events_train.parquet", option="--fraction")
    with pytest.raises(ValueError, match="--fraction"):
        time_cut(np.arange(10), 1.0, "events_train.parquet", option="--fraction")


@pytest.mark.parametrize("rows, fraction, held", [(10, 0.9, 9), (100, 0.9, 90), (1000, 0.9, 900),
                                                   (1000, 0.3, 300), (25, 0.1, 3), (7, 0.5, 4)])
def test_the_cut_holds_out_the_share_asked_for_rounded_up(rows, fraction, held):
    """``1 - 0.9`` is 0.0999...: floored, 100 rows held 91 out, and 10 rows all 10 (refused)."""
    ts = np.arange(rows)
    assert int((ts >= time_cut(ts, fraction, "events_train.parquet")).sum()) == held


@pytest.mark.parametrize("fraction", ["0", "1.5", "nan"])
def test_cli_refuses_a_fraction_outside_zero_and_one_in_one_line(world, tmp_path, fraction):
    done = run_mim("data", "holdout", str(world), "--out", str(tmp_path / "val"), "--fraction", fraction)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--fraction={float(fraction)}: must lie strictly between 0 and 1" in done.stderr


def test_cli_writes_a_world_the_trainer_can_take(world, tmp_path):
    done = run_mim("data", "holdout", str(world), "--out", str(tmp_path / "val"), "--fraction", "0.25")
    assert done.returncode == 0, done.stderr
    assert "events_test" in done.stdout
    manifest = json.loads((tmp_path / "val" / "manifest.json").read_text())
    assert manifest["kind"] == "world" and manifest["stage"] == "holdout"
    assert manifest["config"]["fraction"] == 0.25


def test_no_rows_and_an_out_that_is_a_file_are_named(world, tmp_path):
    """Both were tracebacks: IndexError on an empty split, FileExistsError on a file."""
    with pytest.raises(DataError, match="no rows to split"):
        time_cut(np.zeros(0, np.int64), 0.1, "events_train.parquet")
    (tmp_path / "afile").touch()
    with pytest.raises(DataError, match="a file, not a folder"):
        holdout_world(world, tmp_path / "afile", 0.1)


def test_a_worlds_own_mm_table_is_carried(world, tmp_path):
    """A TAOBAO-MM world's mm_table/ was left behind: `mim train data.world=VAL
    mm_table=VAL/mm_table` failed, though DIR_VAL is meant to run every command unchanged."""
    from mim_rec.data.importers.taobao_mm import TaobaoOptions, import_taobao_mm
    from mim_rec.data.manifest import require
    from tests.test_import_taobao_mm import write_taobao

    source = tmp_path / "tb"
    import_taobao_mm(write_taobao(tmp_path / "src")[0], source, TaobaoOptions())
    val = tmp_path / "val"
    holdout_world(source, val, 0.25)
    results = validate_world(val, echo=lambda line: None)
    assert [r.rows for r in results][-1] == pq.read_metadata(val / "items.parquet").num_rows
    assert sorted(p.name for p in (val / "mm_table").iterdir()) == \
        sorted(p.name for p in (source / "mm_table").iterdir())
    assert require(val / "mm_table", kind="mm_table", dtype="int8").dim == 128
    assert "mm_table" in json.loads((val / "manifest.json").read_text())["inputs"]

    holdout_world(world, val, 0.25)  # a world without one leaves none behind
    assert not (val / "mm_table").exists()


def test_pairs_that_all_fall_on_one_side_of_the_cut_are_left_out(world, tmp_path, capsys):
    """An empty pairs_test.parquet was written (exit 0), which `mim data validate` then refused."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("items.parquet", "events_train.parquet", "events_test.parquet", "manifest.json"):
        (source / name).symlink_to(world / name)
    pairs = pq.read_table(world / "pairs_train.parquet")
    early = pairs.filter(pa.array(pairs["ts"].to_numpy() <= np.quantile(_ts(world / "events_train.parquet"), 0.5)))
    pq.write_table(early, source / "pairs_train.parquet")
    counts = holdout_world(source, tmp_path / "val", 0.1)
    assert "pairs_train" not in counts and not list((tmp_path / "val").glob("pairs_*"))
    assert f"the {early.num_rows:,} pairs of {source / 'pairs_train.parquet'} all fall before the cut" \
        in capsys.readouterr().err
    validate_world(tmp_path / "val", echo=lambda line: None)


def test_an_out_holding_another_output_is_refused_and_left_alone(world, tmp_path):
    """The split was written into any folder, after deleting its manifest.json."""
    from mim_rec.data.manifest import Manifest, write_manifest

    table = tmp_path / "table"
    table.mkdir()
    write_manifest(table, Manifest(kind="mm_table", stage="mfm", row_count=1, dim=4, dtype="float32"))
    before = (table / "manifest.json").read_bytes()
    with pytest.raises(DataError, match="holds a 'mm_table' output, not a 'world' one"):
        holdout_world(world, table, 0.1)
    assert [p.name for p in table.iterdir()] == ["manifest.json"] and (table / "manifest.json").read_bytes() == before


def test_a_source_the_world_check_refuses_is_refused_before_anything_is_written(world, tmp_path):
    """A behaviour category that is not its item's passed the holdout, which wrote a finished
    validation world that `mim data validate` and `mim train` then refused."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("items.parquet", "pairs_train.parquet", "events_test.parquet", "manifest.json"):
        (source / name).symlink_to(world / name)
    events = pq.read_table(world / "events_train.parquet")
    categories = events["hist_category_ids"].to_pylist()
    row = next(i for i, c in enumerate(categories) if c)
    categories[row][-1] = (categories[row][-1] + 1) % 6  # another real category, not the item's
    pq.write_table(events.set_column(events.schema.get_field_index("hist_category_ids"), "hist_category_ids",
                                     pa.array(categories, pa.list_(pa.int32()))), source / "events_train.parquet")
    with pytest.raises(DataError, match="behaviour category differs from its item's") as info:
        holdout_world(source, tmp_path / "val", 0.1)
    assert (info.value.row, info.value.field) == (row, "hist_category_ids")
    assert not (tmp_path / "val").exists()


def test_an_imports_item_age_caveat_survives_holdout_and_clean_out(world, tmp_path):
    """Both wrote a fresh manifest without it: S1..S10 of an Amazon or Taobao import's split
    or clean copy read as real ages, and the report scored the cold-start claim on them."""
    import shutil
    from dataclasses import replace
    from mim_rec.data.manifest import read_manifest, world_age_caveat, write_manifest

    imported = tmp_path / "imported"
    shutil.copytree(world, imported)
    manifest = read_manifest(imported)
    write_manifest(imported, replace(manifest, extra={**manifest.extra, "item_age": "first appearance"}))
    holdout_world(imported, tmp_path / "val", 0.2)
    validate_world(imported, drop_invalid=True, echo=lambda line: None, clean_out=tmp_path / "clean")
    assert world_age_caveat(tmp_path / "val") == world_age_caveat(tmp_path / "clean") == "first appearance"
    assert world_age_caveat(world) is None  # a synthetic world has real ages
    holdout_world(world, tmp_path / "synth_val", 0.2)
    assert world_age_caveat(tmp_path / "synth_val") is None


def test_relative_image_paths_still_name_the_images_in_the_validation_world(world, tmp_path):
    """The items were hard-linked and the pairs rewritten with their relative image paths
    unchanged, in a folder that has no images: the pairs split failed ("image path missing"),
    and the items named files that are not there."""
    source = tmp_path / "src"
    (source / "img").mkdir(parents=True)
    for name in ("events_train.parquet", "events_test.parquet", "manifest.json"):
        (source / name).symlink_to(world / name)
    for name, column in (("items", "image"), ("pairs_train", "query_image")):
        table = pq.read_table(world / f"{name}.parquet")
        paths = []
        for row, blob in enumerate(table[column].to_pylist()):
            (source / "img" / f"{name}{row}.png").write_bytes(blob)
            paths.append(f"img/{name}{row}.png")
        pq.write_table(table.drop([column]).append_column(f"{column}_path", pa.array(paths)),
                       source / f"{name}.parquet")
    holdout_world(source, tmp_path / "val", 0.2)
    validate_world(tmp_path / "val", echo=lambda line: None)
    items = pq.read_table(tmp_path / "val" / "items.parquet")
    assert items["image_path"][0].as_py() == str(source.resolve() / "img" / "items0.png")


def test_an_out_that_holds_the_source_is_refused_before_it_is_replaced(world, tmp_path):
    """A source world inside --out (held out into OUT/val, then OUT/val held out into OUT) was
    deleted when OUT's contents were replaced, and OUT's manifest named a source gone."""
    outer = tmp_path / "outer"
    holdout_world(world, outer, 0.2)
    holdout_world(outer, outer / "val", 0.2)  # an out inside the source deletes nothing
    before = sorted(p.name for p in outer.iterdir())
    for out in (outer, outer / "val" / ".."):
        with pytest.raises(DataError, match=r"the source (lies inside|is) --out=.*would be deleted"):
            holdout_world(outer / "val", out, 0.2)
    with pytest.raises(DataError, match="the source is --out="):
        holdout_world(outer, outer, 0.2)
    assert sorted(p.name for p in outer.iterdir()) == before
    validate_world(outer / "val", echo=lambda line: None)


@pytest.mark.parametrize("command", ["holdout", "synth"])
def test_the_out_help_says_the_folder_is_replaced_whole(command, capsys):
    """holdout's --out help said 'its split files are replaced' and synth's 'files are replaced':
    both replace the folder's contents whole (an earlier world's mm_table/ and truth/ too) and
    refuse a non-empty folder that is not a world."""
    from train.cli import main

    with pytest.raises(SystemExit):
        main(["data", command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "new, empty, or an earlier world, whose contents are replaced whole" in help_text
    assert "other non-empty folder is refused" in help_text

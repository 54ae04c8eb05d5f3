"""TAOBAO-MM importer, on fixtures in the release's format written here."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mim_rec.data.errors import DataError
from mim_rec.data.importers.missing import MISSING_KINDS
from mim_rec.data.importers.taobao_mm import GAP_KIND, TaobaoOptions, import_taobao_mm
from mim_rec.data.io import read_events, read_items, validate_mm_table, validate_world
from mim_rec.data.manifest import read_manifest, require

ITEMS = np.array([-9_000_000_000_000, -5, 17, 4_000_000_000_123, 88, 901], np.int64)  # raw ids
USERS = np.array([-77, 1_234_567_890_123], np.int64)
HIST = {-77: ([17, -5, 17, 88], [300, 200, 300, 400]),
        1_234_567_890_123: ([901, 88, -9_000_000_000_000, 17], [100, 400, 100, 300])}
ITEM_CATEGORY = {-9_000_000_000_000: 100, -5: 200, 17: 300, 4_000_000_000_123: 500, 88: 400, 901: 100}
LIST8 = pa.list_(pa.int8())
EVERY_KIND = tuple(MISSING_KINDS["taobao-mm"])


def mm_rows(table_dir):
    return pa.concat_tables(pq.read_table(p) for p in sorted(table_dir.glob("part-*.parquet"))).to_pylist()


def write_taobao(root, samples_as_parts=False, embedding_items=ITEMS, user_rows=None,
                 labels=None, hist=HIST, dim=128):
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    users = [-77, -77, 1_234_567_890_123, 1_234_567_890_123]
    targets = [4_000_000_000_123, 17, 88, 901]
    labels = labels or [[1, 0], [0, 1], [0, 1], [1, 0]]
    samples = pa.table({"label_0": pa.array(labels, LIST8), "129_1": pa.array(users, pa.int64()),
                        "205": pa.array(targets, pa.int64())})
    for split in ("train", "test"):
        if samples_as_parts:
            (root / f"{split}_samples").mkdir()
            pq.write_table(samples.slice(0, 2), root / f"{split}_samples" / "part-0.parquet")
            pq.write_table(samples.slice(2), root / f"{split}_samples" / "part-1.parquet")
        else:
            pq.write_table(samples, root / f"{split}_samples.parquet")
        user_ids = list(hist) if user_rows is None else user_rows
        table = {"129_1": pa.array(user_ids, pa.int64())}
        for k in range(1, 6):
            table[f"130_{k}"] = pa.array(rng.integers(-10, 10, len(user_ids)), pa.int64())
        table["150_2_180"] = pa.array([hist[u][0] for u in user_ids], pa.list_(pa.int64()))
        table["151_2_180"] = pa.array([hist[u][1] for u in user_ids], pa.list_(pa.int64()))
        pq.write_table(pa.table(table), root / f"{split}_user_features.parquet")
    pq.write_table(pa.table({
        "205": pa.array(ITEMS), "206": pa.array([ITEM_CATEGORY[i] for i in ITEMS], pa.int64()),
        "213": pa.array(rng.integers(0, 9, len(ITEMS)), pa.int64()),
        "214": pa.array(rng.integers(0, 9, len(ITEMS)), pa.int64())}), root / "item_features.parquet")
    vectors = rng.integers(-38, 39, (len(embedding_items), dim)).astype(np.int8)
    pq.write_table(pa.table({"205": pa.array(embedding_items, pa.int64()),
                             "205_c": pa.array(list(vectors), LIST8)}),
                   root / "scl_embedding_int8_p90.parquet")
    return root, dict(zip(embedding_items.tolist(), vectors))


def test_import_maps_ids_histories_labels_and_the_int8_table(tmp_path):
    src, vectors = write_taobao(tmp_path / "src", samples_as_parts=True)
    out = tmp_path / "world"
    report = import_taobao_mm(src, out, TaobaoOptions(batch_rows=3))
    assert report.missing == {} and report.counts["items"] == len(ITEMS)
    assert report.counts["events_train"] == 4 and report.counts["clicks_train"] == 2
    validate_world(out)
    require(out, kind="world", stage="import")
    table_manifest = require(out / "mm_table", kind="mm_table", dtype="int8", dim=128,
                             extra__encoder_fingerprint="taobao-mm-scl-int8")
    assert table_manifest.extra["id_range"] == [0, len(ITEMS)]

    items = read_items(out / "items.parquet")
    raw = [int(r) for r in items.column("raw_item_id").to_pylist()]
    assert raw == sorted(ITEMS.tolist())  # dense ids in sorted raw order
    assert items.column("title")[raw.index(-5)].as_py().startswith("205=-5 206=200 213=")
    categories = items.column("category_id").to_pylist()
    assert categories[raw.index(-9_000_000_000_000)] == categories[raw.index(901)] != 0

    test = read_events(out / "events_test.parquet", len(ITEMS))
    assert test.column("ts").to_pylist() == [5, 6, 7, 8]  # after the 4 train samples
    first = test.slice(0, 1).to_pylist()[0]
    assert first["label"] == 0 and raw[first["target_item_id"]] == 4_000_000_000_123
    assert [raw[i] for i in first["hist_item_ids"]] == HIST[-77][0]
    assert first["raw_user_id"] == "-77"
    hist_cats = first["hist_category_ids"]
    assert hist_cats[0] == hist_cats[2] == categories[raw.index(17)]
    assert test.column("label").to_pylist() == [0, 1, 1, 0]

    rows = mm_rows(out / "mm_table")
    assert len(rows) == len(ITEMS)
    for row in rows:
        assert row["vector"] == vectors[raw[row["item_id"]]].tolist()
        assert (row["scale"], row["bias"]) == (1.0, 0.0)
    assert read_manifest(out).extra["counts"]["users"] == 2
    assert "not item ages" in read_manifest(out).extra["item_age"]
    # every source part's fingerprint, under its path: the two splits' part-0 used to collide
    assert sorted(read_manifest(out).inputs) == sorted(
        p.relative_to(src).as_posix() for p in src.rglob("*.parquet"))


def test_files_that_do_not_join_are_refused_or_counted(tmp_path):
    src, _ = write_taobao(tmp_path / "src", embedding_items=ITEMS[:3], user_rows=[-77])
    with pytest.raises(DataError, match="do not join") as info:
        import_taobao_mm(src, tmp_path / "out", TaobaoOptions())
    message = str(info.value)
    assert "train sample users without features: 1" in message
    assert "train sample items without embedding: 3" in message
    assert not (tmp_path / "out").exists()

    report = import_taobao_mm(src, tmp_path / "out", TaobaoOptions(allow_missing=EVERY_KIND))
    assert report.missing["train sample items without embedding"] == 3
    assert report.missing["train sample users without features"] == 1
    events = read_events(tmp_path / "out" / "events_train.parquet", len(ITEMS)).to_pylist()
    assert [len(e["hist_item_ids"]) for e in events] == [4, 4, 0, 0]  # user without features
    results = validate_mm_table(tmp_path / "out" / "mm_table", len(ITEMS))
    assert sum(r.rows for r in results) == len(ITEMS)
    zero = [r for r in mm_rows(tmp_path / "out" / "mm_table") if not any(r["vector"])]
    assert len(zero) == len(ITEMS) - 3


def test_each_kind_of_missing_row_is_admitted_on_its_own(tmp_path):
    """--allow-missing admitted every kind at once: accepting users without features also
    accepted sample items without an embedding, whose events then had no content to model."""
    assert tuple(dict.fromkeys(GAP_KIND.values())) == EVERY_KIND  # every count has a kind, every kind a count
    src, _ = write_taobao(tmp_path / "src", embedding_items=ITEMS[:3], user_rows=[-77])
    out = tmp_path / "out"
    with pytest.raises(DataError, match="do not join") as info:
        import_taobao_mm(src, out, TaobaoOptions(allow_missing=("user-features",)))
    message = str(info.value)
    assert "train sample items without embedding: 3" in message and "behaviour items without embedding: 1" in message
    assert "users without features" not in message  # admitted
    assert message.endswith("Re-run with --allow-missing target-embedding,behaviour-embedding,user-features "
                            "to fill counted defaults.")
    assert not out.exists()

    admitted = ("target-embedding", "behaviour-embedding", "user-features")
    report = import_taobao_mm(src, out, TaobaoOptions(allow_missing=admitted))
    summary = report.lines()
    start = summary.index("  missing rows filled with counted defaults (--allow-missing "
                          "target-embedding,behaviour-embedding,user-features):")
    assert [" ".join(line.split()) for line in summary[start + 1:start + 9]] == [
        "target-embedding", "train sample items without embedding 3", "test sample items without embedding 3",
        "behaviour-embedding", "behaviour items without embedding 1",
        "user-features", "train sample users without features 1", "test sample users without features 1"]
    assert summary[start + 9].startswith("  note:")  # item-features, not admitted, has no line
    assert read_manifest(out).config["allow_missing"] == list(admitted)
    validate_world(out)


def test_cli_allow_missing_takes_named_kinds_or_all(tmp_path, capsys):
    """A bare --allow-missing still admits every kind; a list admits only its kinds, and a
    kind no format has, or another format's, is refused naming the kinds there are."""
    from train.cli import main

    src, _ = write_taobao(tmp_path / "src", embedding_items=ITEMS[:3], user_rows=[-77])
    out = tmp_path / "w"
    base = ["data", "import", "--format", "taobao-mm", str(src), "--out", str(out)]
    assert main(base + ["--allow-missing", "user-features"]) == 2
    assert "Re-run with --allow-missing target-embedding,behaviour-embedding,user-features" in capsys.readouterr().err
    assert main(base + ["--allow-missing", "text"]) == 2  # amazon's
    assert capsys.readouterr().err.strip() == (
        "mim data import: error: --allow-missing text: 'text' is not a kind of missing row (--format taobao-mm: "
        "target-embedding, behaviour-embedding, item-features, user-features; give a comma list of them, "
        "or all for every kind)")
    with pytest.raises(SystemExit) as exit_:
        main(base + ["--allow-missing", "user-features,images"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --allow-missing: --allow-missing user-features,images: 'images' is not a kind" in err
    assert "--format amazon: text, inter-rows" in err and not out.exists()
    with pytest.raises(SystemExit):  # a bare flag before SRC took SRC as its kinds
        main(["data", "import", "--format", "taobao-mm", "--out", str(out), "--allow-missing", str(src)])
    assert f"{src} is a path: a bare --allow-missing written before SRC takes SRC as its kinds" in capsys.readouterr().err
    assert main(base + ["--allow-missing", "user-features, target-embedding,behaviour-embedding"]) == 0
    assert main(base + ["--allow-missing"]) == 0
    printed = capsys.readouterr().out
    assert "(--allow-missing target-embedding,behaviour-embedding,item-features,user-features):" in printed
    assert "    item-features: none missing" in printed


def test_an_out_that_holds_the_source_is_refused_before_the_import(tmp_path, capsys):
    """A release kept inside the world folder it was imported into was deleted by the next
    import there, which replaces the folder's contents whole."""
    import shutil

    from train.cli import main

    src, out = write_taobao(tmp_path / "src")[0], tmp_path / "w"
    import_taobao_mm(src, out, TaobaoOptions())
    inside = shutil.copytree(src, out / "raw")
    assert main(["data", "import", "--format", "taobao-mm", str(inside), "--out", str(out)]) == 2
    assert f"{inside}: the source lies inside --out={out}" in capsys.readouterr().err
    assert sorted(p.name for p in inside.iterdir()) == sorted(p.name for p in src.iterdir())
    validate_world(out, echo=lambda line: None)


@pytest.mark.parametrize("case", ["missing column", "unequal lists", "embedding size",
                                  "label not one-hot", "duplicate embedding", "duplicate features",
                                  "not parquet"])
def test_bad_sources_are_refused_with_file_row_field(tmp_path, case):
    src = tmp_path / "src"
    if case == "missing column":
        write_taobao(src)
        t = pq.read_table(src / "item_features.parquet").drop(["206"])
        pq.write_table(t, src / "item_features.parquet")
        file, row, field = "item_features.parquet", None, "206"
    elif case == "unequal lists":
        bad = dict(HIST)
        bad[1_234_567_890_123] = (HIST[1_234_567_890_123][0], [100, 400, 100])
        write_taobao(src, hist=bad)
        file, row, field = "train_user_features.parquet", 1, "151_2_180"
    elif case == "embedding size":
        write_taobao(src, dim=64)
        file, row, field = "scl_embedding_int8_p90.parquet", 0, "205_c"
    elif case == "label not one-hot":
        write_taobao(src, labels=[[1, 0], [1, 1], [0, 1], [1, 0]])
        file, row, field = "train_samples.parquet", 1, "label_0"
    elif case == "duplicate embedding":
        write_taobao(src, embedding_items=np.concatenate([ITEMS, ITEMS[2:3]]))
        file, row, field = "scl_embedding_int8_p90.parquet", len(ITEMS), "205"
    elif case == "duplicate features":  # the second row used to replace the first silently
        write_taobao(src)
        t = pq.read_table(src / "item_features.parquet")
        pq.write_table(pa.concat_tables([t, t.slice(4, 1)]), src / "item_features.parquet")
        file, row, field = "item_features.parquet", len(ITEMS), "205"
    else:  # used to be Arrow's traceback, naming no file
        write_taobao(src)
        (src / "test_user_features.parquet").write_bytes(b"PAR1 cut short")
        file, row, field = "test_user_features.parquet", None, None
    with pytest.raises(DataError) as info:
        import_taobao_mm(src, tmp_path / "out", TaobaoOptions())
    assert info.value.file.endswith(file)
    assert (info.value.row, info.value.field) == (row, field)


def test_an_import_replaces_its_output_whole_and_a_failed_one_changes_nothing(tmp_path, monkeypatch):
    """Imports used to write over ``--out`` in place: an Amazon world's pairs stayed beside a
    TAOBAO-MM import (and validated), and a failed re-import had already deleted the MM table."""
    from mim_rec.data.importers import taobao_mm
    from mim_rec.data.importers.amazon import import_amazon
    from tests.test_import_amazon import options, write_amazon

    out = tmp_path / "world"
    import_amazon(write_amazon(tmp_path / "amazon"), out, options())
    assert (out / "pairs_train.parquet").exists()
    src, _ = write_taobao(tmp_path / "src")
    import_taobao_mm(src, out, TaobaoOptions())
    assert sorted(p.name for p in out.iterdir()) == [
        "events_test.parquet", "events_train.parquet", "items.parquet", "manifest.json", "mm_table"]
    validate_world(out)

    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def killed(*args, **kwargs):  # after the MM table and the events are written
        raise RuntimeError("killed")

    monkeypatch.setattr(taobao_mm, "_items", killed)
    with pytest.raises(RuntimeError, match="killed"):
        import_taobao_mm(src, out, TaobaoOptions())
    monkeypatch.undo()
    (src / "item_features.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        import_taobao_mm(src, out, TaobaoOptions())
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["amazon", "src", "world"]  # no staging left

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("someone's files")
    with pytest.raises(DataError, match="not empty and holds no readable manifest.json"):
        import_taobao_mm(write_taobao(tmp_path / "src2")[0], mine, TaobaoOptions())
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_behaviour_category_that_is_not_its_items_is_replaced_and_counted(tmp_path, capsys):
    """The importer wrote such behaviours as listed, and its own validator (and mim train)
    refused the world: 'behaviour category differs from its item's in the items table'."""
    hist = dict(HIST)
    hist[-77] = ([17, -5, 17, 88], [300, 200, 400, 400])  # item 17 is category 300 (its 206)
    src, _ = write_taobao(tmp_path / "src", hist=hist)
    out = tmp_path / "world"
    report = import_taobao_mm(src, out, TaobaoOptions())
    validate_world(out, echo=lambda line: None)
    assert report.counts["behaviour categories set to the item's"] == 2  # train and test features
    warning = capsys.readouterr().err
    assert "2 behaviour categories (in 2 user-feature rows) differed from the item's and were " \
           "replaced by it" in warning
    assert "train_user_features.parquet, row 0, field '151_2_180' position 2: 400 listed, " \
           "the item's is 300" in warning
    manifest = read_manifest(out)
    assert manifest.extra["counts"]["behaviour categories set to the item's"] == 2
    assert any("were replaced by it (first: " in note for note in manifest.extra["notes"])
    items = read_items(out / "items.parquet")
    raw = [int(r) for r in items.column("raw_item_id").to_pylist()]
    first = read_events(out / "events_train.parquet", len(ITEMS)).slice(0, 1).to_pylist()[0]
    assert first["hist_category_ids"][2] == items.column("category_id")[raw.index(17)].as_py()


def test_parts_are_read_in_number_order_not_text_order(tmp_path):
    """``part-10`` sorted before ``part-2``, so sample ordinals (``ts``), and with them the
    holdout's "latest" share, followed the names' text order."""
    src, _ = write_taobao(tmp_path / "src", samples_as_parts=True)
    for split in ("train", "test"):
        parts = src / f"{split}_samples"
        (parts / "part-0.parquet").rename(parts / "part-2.parquet")    # rows 0-1
        (parts / "part-1.parquet").rename(parts / "part-10.parquet")   # rows 2-3
    out = tmp_path / "world"
    import_taobao_mm(src, out, TaobaoOptions())
    raw = read_items(out / "items.parquet").column("raw_item_id").to_pylist()
    events = read_events(out / "events_train.parquet", len(ITEMS))
    ts_of = {int(raw[t]): ts for t, ts in zip(events.column("target_item_id").to_pylist(),
                                              events.column("ts").to_pylist())}
    assert ts_of[4_000_000_000_123] < ts_of[17] < ts_of[88] < ts_of[901]


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("as_parts", [False, True])
def test_an_empty_split_is_refused(tmp_path, split, as_parts):
    """A test_samples file of 0 rows was imported (exit 0) into a world validate refuses."""
    src, _ = write_taobao(tmp_path / "src", samples_as_parts=as_parts)
    if as_parts:
        for part in (src / f"{split}_samples").glob("*.parquet"):
            pq.write_table(pq.read_table(part).slice(0, 0), part)
    else:
        path = src / f"{split}_samples.parquet"
        pq.write_table(pq.read_table(path).slice(0, 0), path)
    with pytest.raises(DataError, match=f"holds no rows: the world's {split} split would be empty") as info:
        import_taobao_mm(src, tmp_path / "out", TaobaoOptions(allow_missing=EVERY_KIND))
    assert info.value.file.endswith(f"{split}_samples" if as_parts else f"{split}_samples.parquet")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_amazon_options_with_taobao_mm(tmp_path, capsys):
    """--negatives, --seed, --negative-sampling and --name were silently ignored."""
    from train.cli import main

    src, _ = write_taobao(tmp_path / "src")
    base = ["data", "import", "--format", "taobao-mm", str(src), "--out", str(tmp_path / "w")]
    assert main(base + ["--negatives", "1", "--seed", "0"]) == 2  # even at their default values
    err = capsys.readouterr().err
    assert "--negatives, --seed: amazon options, not used by --format taobao-mm" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()
    for flag in (["--negative-sampling", "uniform"], ["--name", "X"]):
        assert main(base + flag) == 2 and f"{flag[0]}: amazon options" in capsys.readouterr().err
    assert main(base) == 0  # the defaults do not trigger it


@pytest.mark.parametrize("kinds, named", [(("user-feature",), "'user-feature'"), (("text",), "'text'"),
                                          ("user-features", None)])
def test_the_options_check_their_kinds_through_the_python_api_too(kinds, named):
    """A misspelt kind admitted nothing: the import was refused with a remedy naming the right
    spelling, or (for another format's kind) it went unnoticed. A bare string is one kind, not
    its letters."""
    from mim_rec.config import ConfigError
    from mim_rec.data.importers.amazon import AmazonOptions

    if named is None:
        assert TaobaoOptions(allow_missing=kinds).allow_missing == ("user-features",)
        with pytest.raises(ConfigError, match="'user-features' is not a kind of missing row .--format amazon: text, "
                                              "inter-rows; give a tuple of them"):
            AmazonOptions(allow_missing=kinds)
        return
    with pytest.raises(ConfigError, match=f"allow_missing=.*: {named} is not a kind of missing row"):
        TaobaoOptions(allow_missing=kinds)

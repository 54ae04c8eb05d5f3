"""Validating readers/writers: every rejected input names file, row and field."""

import io
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mim_rec.data.errors import DataError
from mim_rec.data.io import (ContractWriter, read_events, read_items, read_pairs, rejected_path_for,
                             validate_file, validate_world, write_table)
from mim_rec.data.manifest import Manifest, read_manifest, write_manifest
from mim_rec.data.schemas import EVENTS, ITEMS, PAIRS
from mim_rec.data.validate import MAX_TITLE_CHARS
from tests.encoder_fixtures import image_in, png_declaring
from train.cli import main as mim

N_ITEMS = 6


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def items_rows():
    return {
        "item_id": list(range(N_ITEMS)),
        "raw_item_id": [f"sku{i}" for i in range(N_ITEMS)],
        "category_id": [i % 2 for i in range(N_ITEMS)],
        "title": [f"item {i}" for i in range(N_ITEMS)],
        "created_at": [1_600_000_000 + i for i in range(N_ITEMS)],
        "image": [png(i) for i in range(N_ITEMS)],
        "image_feature": [[0.5, float(i)] for i in range(N_ITEMS)],
    }


def pairs_rows():
    return {"item_id": [0, 1, 2, 3], "signal": ["click", "purchase", "click", "click"],
            "category_id": [0, 1, 0, 1], "ts": [10, 11, 12, 13],
            "query_feature": [[1.0, 0.0]] * 4}


def events_rows():
    return {"user_id": [0, 1, 2, 3], "query": ["", "q", "", ""],
            "target_item_id": [0, 1, 2, 5], "label": [0, 1, 1, 0], "ts": [1, 2, 3, 4],
            "hist_item_ids": [[1, 2], [], [3], [0, 1, 2]],
            "hist_category_ids": [[1, 0], [], [1], [0, 1, 0]],
            "hist_ts": [[0, 1], [], [2], [0, 0, 1]]}


def table(contract, rows):
    fields = contract.fields
    return pa.table({k: pa.array(v, fields[k].type if k in fields else None) for k, v in rows.items()})


def write_raw(tmp_path, name, contract, rows, **types):
    """Write without validation, as a foreign producer might."""
    fields = {k: f.type for k, f in contract.fields.items()}
    t = pa.table({k: pa.array(v, types.get(k, fields.get(k))) for k, v in rows.items()})
    path = tmp_path / name
    pq.write_table(t, path)
    return path


READERS = {"items": lambda p: read_items(p), "pairs": lambda p: read_pairs(p, N_ITEMS),
           "events": lambda p: read_events(p, N_ITEMS)}
CONTRACTS = {"items": (ITEMS, items_rows), "pairs": (PAIRS, pairs_rows),
             "events": (EVENTS, events_rows)}


def edit(rows, column, row, value):
    rows[column] = list(rows[column])
    rows[column][row] = value
    return rows


# (kind, mutation of the rows, expected row, expected field, message fragment)
BAD_CASES = {
    "null id": ("events", lambda r: edit(r, "user_id", 2, None), 2, "user_id", "null"),
    "null required": ("items", lambda r: edit(r, "created_at", 3, None), 3, "created_at", "null"),
    "unequal history": ("events", lambda r: edit(r, "hist_ts", 3, [0, 1]), 3, "hist_ts", "unequal length"),
    "unequal category history": ("events", lambda r: edit(r, "hist_category_ids", 0, [1]), 0,
                                 "hist_category_ids", "unequal length"),
    "target out of range": ("events", lambda r: edit(r, "target_item_id", 1, N_ITEMS), 1,
                            "target_item_id", "outside the item table"),
    "hist out of range": ("events", lambda r: edit(r, "hist_item_ids", 2, [-1]), 2,
                          "hist_item_ids", "outside the item table"),
    "pair item out of range": ("pairs", lambda r: edit(r, "item_id", 3, 99), 3, "item_id",
                               "outside the item table"),
    "nan vector": ("items", lambda r: edit(r, "image_feature", 4, [math.nan, 0.0]), 4,
                   "image_feature", "NaN"),
    "inf vector": ("pairs", lambda r: edit(r, "query_feature", 1, [math.inf, 0.0]), 1,
                   "query_feature", "NaN or infinite"),
    "vector size": ("items", lambda r: edit(r, "image_feature", 2, [1.0, 2.0, 3.0]), 2,
                    "image_feature", "vector length"),
    "undecodable image": ("items", lambda r: edit(r, "image", 1, png(1)[:40]), 1, "image",
                          "not decodable"),
    # reported as "not decodable" before: a decompression bomb's header is valid, its size is not
    "image past PIL's error limit": ("items", lambda r: edit(r, "image", 1, png_declaring(100_000, 100_000)), 1,
                                     "image", rf"image too large .*it declares 10000000000 pixels, over the "
                                              rf"limit of {Image.MAX_IMAGE_PIXELS} \(PIL's Image.MAX_IMAGE_PIXELS\)"),
    "image past PIL's warning limit": ("items", lambda r: edit(r, "image", 2, png_declaring(12_000, 12_000)), 2,
                                       "image", r"image too large .*it declares 12000x12000 = 144000000 pixels"),
    # accepted before, though the contract is PNG/JPEG
    **{f"{kind} image": ("items", lambda r, kind=kind: edit(r, "image", 3, image_in(kind)), 3, "image",
                         rf"image format not PNG/JPEG .*it is {kind}")
       for kind in ("GIF", "BMP", "WEBP", "TIFF")},
    "duplicate id": ("items", lambda r: edit(r, "item_id", 5, 1), 5, "item_id", "duplicate"),
    "non-dense id": ("items", lambda r: edit(r, "item_id", 5, 7), 5, "item_id", "not dense"),
    "unknown signal": ("pairs", lambda r: edit(r, "signal", 2, "like"), 2, "signal", "unknown signal"),
    "label": ("events", lambda r: edit(r, "label", 3, 2), 3, "label", "label not in"),
    "behaviour after its event": ("events", lambda r: edit(r, "hist_ts", 2, [9]), 2, "hist_ts",
                                  r"behaviour after its event \(hist_ts > ts\)"),
    # accepted before (hist_ts == ts is not after the event): an importer that listed each
    # event's own interaction in its history passed validation
    "event in its own history": ("events", lambda r: edit(edit(edit(r, "hist_item_ids", 2, [0, 2]),
                                                               "hist_category_ids", 2, [0, 0]), "hist_ts", 2, [1, 3]),
                                 2, "hist_ts", r"the event itself in its history"),
    # accepted before: item ages became 2e7 days, and S1..S10 followed the event time
    "milliseconds": ("events", lambda r: edit(r, "ts", 3, 1_700_000_000_000), 3, "ts",
                     r"ts past 10\^11 Unix seconds \(the year 5138\): milliseconds\?"),
    # accepted before: mim train clamped every item age to 0 (created "after" every event)
    "created_at in milliseconds": ("items", lambda r: edit(r, "created_at", 3, 1_700_000_000_000), 3, "created_at",
                                   r"created_at past 10\^11 Unix seconds \(the year 5138\): milliseconds\?"),
    # accepted before: mim data holdout then put every pair after the (seconds) cut
    "pair ts in milliseconds": ("pairs", lambda r: edit(r, "ts", 2, 1_700_000_000_000), 2, "ts",
                                r"ts past 10\^11 Unix seconds \(the year 5138\): milliseconds\?"),
    "history newest first": ("events", lambda r: edit(r, "hist_ts", 3, [1, 0, 0]), 3, "hist_ts",
                             "history not oldest first"),
    "empty title": ("items", lambda r: edit(r, "title", 0, "  "), 0, "title", "empty title"),
    # accepted before: the tokenizer read all of it every batch, and the tower its first tokens
    "title too long": ("items", lambda r: edit(r, "title", 4, "é" * (MAX_TITLE_CHARS + 1)), 4, "title",
                       r"title longer than 10,000 characters \(text towers read only its first "
                       r"encoders.text.max_length tokens\) .*it has 10,001 characters"),
    "no image at all": ("items", lambda r: edit(edit(r, "image", 2, None), "image_feature", 2, None),
                        2, "image|image_feature", "all of these columns are null"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_row_is_reported_with_file_row_field(tmp_path, case):
    kind, mutate, row, field, fragment = BAD_CASES[case]
    contract, rows = CONTRACTS[kind]
    path = write_raw(tmp_path, f"{kind}.parquet", contract, mutate(rows()))
    with pytest.raises(DataError, match=fragment) as info:
        READERS[kind](path)
    assert (info.value.file, info.value.row, info.value.field) == (str(path), row, field)
    with pytest.raises(DataError, match=fragment):  # the writer refuses the same table
        write_table(table(contract, mutate(rows())), tmp_path / "out.parquet", contract,
                    item_count=N_ITEMS)
    assert not (tmp_path / "out.parquet").exists()


def test_missing_column(tmp_path):
    rows = events_rows()
    del rows["hist_ts"]
    path = write_raw(tmp_path, "events.parquet", EVENTS, rows)
    with pytest.raises(DataError, match="missing required column") as info:
        read_events(path, N_ITEMS)
    assert info.value.field == "hist_ts" and info.value.row is None


def test_wrong_type_is_not_coerced(tmp_path):
    path = write_raw(tmp_path, "events.parquet", EVENTS, events_rows(), label=pa.float32())
    with pytest.raises(DataError, match="has type float") as info:
        read_events(path, N_ITEMS)
    assert info.value.field == "label"
    rows = items_rows()
    rows["category_id"] = [str(c) for c in rows["category_id"]]
    path = write_raw(tmp_path, "items.parquet", ITEMS, rows, category_id=pa.string())
    with pytest.raises(DataError, match="category_id"):
        read_items(path)


def test_safe_widening_is_accepted_and_overflow_is_not(tmp_path):
    path = write_raw(tmp_path, "events.parquet", EVENTS, events_rows(),
                     user_id=pa.int32(), hist_category_ids=pa.list_(pa.int8()))
    got = read_events(path, N_ITEMS)
    assert got.schema.field("user_id").type == pa.int64()
    assert got.schema.field("hist_category_ids").type == pa.list_(pa.int32())
    path = write_raw(tmp_path, "events2.parquet", EVENTS, events_rows(), label=pa.int64())
    with pytest.raises(DataError, match="label"):  # int64 -> int8 is narrowing, refused
        read_events(path, N_ITEMS)


def test_image_path_must_exist_and_decode(tmp_path):
    (tmp_path / "img").mkdir()
    rows = items_rows()
    for i, blob in enumerate(rows.pop("image")):
        (tmp_path / "img" / f"{i}.png").write_bytes(blob)
    rows["image_path"] = [f"img/{i}.png" for i in range(N_ITEMS)]
    path = write_raw(tmp_path, "items.parquet", ITEMS, rows)
    assert read_items(path).num_rows == N_ITEMS
    (tmp_path / "img" / "3.png").unlink()
    with pytest.raises(DataError, match="image path") as info:
        read_items(path)
    assert (info.value.row, info.value.field) == (3, "image_path")


def test_jpeg_images_are_accepted_with_png_and_refused_images_are_quarantined_by_reason(tmp_path):
    """A JPEG holding several pictures opens in PIL as MPO; it is a JPEG file all the same."""
    rows = items_rows()
    rows["image"][1] = image_in("JPEG")
    rows["image"][2] = image_in("MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    assert read_items(write_raw(tmp_path, "items.parquet", ITEMS, rows)).num_rows == N_ITEMS
    for row, blob in {3: image_in("GIF"), 4: png_declaring(100_000, 100_000), 5: b"junk"}.items():
        rows["image"][row] = blob  # the last rows: the ids left are dense
    path = write_raw(tmp_path, "items.parquet", ITEMS, rows)
    assert validate_file(path, ITEMS, drop_invalid=True, batch_rows=2).rows == 3  # rules see each batch
    rejected = pq.read_table(rejected_path_for(path))
    assert dict(zip(rejected.column("source_row").to_pylist(), rejected.column("reason").to_pylist())) == {
        3: "image: image format not PNG/JPEG", 4: "image: image too large (a decompression bomb?)",
        5: "image: image bytes not decodable (PNG/JPEG)"}


def test_first_bad_row_across_batches_and_quarantine_counts_all(tmp_path):
    n = 1000
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 20, n)
    hist = [rng.integers(0, N_ITEMS, k).tolist() for k in lengths]
    rows = {"user_id": list(range(n)), "query": [""] * n,
            "target_item_id": rng.integers(0, N_ITEMS, n).tolist(),
            "label": rng.integers(0, 2, n).tolist(), "ts": list(range(n)),
            "hist_item_ids": hist, "hist_category_ids": [[0] * len(h) for h in hist],
            "hist_ts": [[0] * len(h) for h in hist]}
    rows["label"][700] = rows["label"][901] = 5
    rows["target_item_id"][350] = -3
    rows["hist_ts"][123] = rows["hist_ts"][123] + [9]
    path = tmp_path / "events.parquet"
    pq.write_table(table(EVENTS, rows), path, row_group_size=100)

    with pytest.raises(DataError) as info:
        validate_file(path, EVENTS, item_count=N_ITEMS, batch_rows=64)
    assert (info.value.row, info.value.field) == (123, "hist_ts")

    result = validate_file(path, EVENTS, item_count=N_ITEMS, drop_invalid=True, batch_rows=64)
    assert result.rejected == 4 and result.rows == n - 4 and result.table.num_rows == n - 4
    rejected = pq.read_table(rejected_path_for(path))
    assert sorted(rejected.column("source_row").to_pylist()) == [123, 350, 700, 901]
    reasons = dict(zip(rejected.column("source_row").to_pylist(), rejected.column("reason").to_pylist()))
    assert reasons[350].startswith("target_item_id") and reasons[700].startswith("label")
    assert -3 not in result.table.column("target_item_id").to_pylist()

    pq.write_table(table(EVENTS, events_rows()), path)  # clean file: stale quarantine removed
    assert validate_file(path, EVENTS, item_count=N_ITEMS, drop_invalid=True).rejected == 0
    assert not rejected_path_for(path).exists()


def test_items_quarantine_refuses_holes_in_ids(tmp_path):
    rows = edit(items_rows(), "item_id", 5, 2)  # duplicate of 2, id 5 missing
    path = write_raw(tmp_path, "items.parquet", ITEMS, rows)
    result = validate_file(path, ITEMS, drop_invalid=True)
    assert result.rejected == 1 and result.table.num_rows == 5  # dense 0..4 after dropping
    rows = edit(items_rows(), "title", 2, "")
    path = write_raw(tmp_path, "items.parquet", ITEMS, rows)
    with pytest.raises(DataError, match="no longer dense"):
        read_items(path, drop_invalid=True)


def test_round_trip_and_world(tmp_path, capsys):
    shuffled = table(ITEMS, items_rows()).take([3, 0, 5, 1, 4, 2])
    write_table(shuffled, tmp_path / "items.parquet", ITEMS,
                manifest=Manifest(kind="items", stage="test"))
    write_table(table(PAIRS, pairs_rows()), tmp_path / "pairs_train.parquet", PAIRS, item_count=N_ITEMS)
    write_table(table(EVENTS, events_rows()), tmp_path / "events_train.parquet", EVENTS,
                item_count=N_ITEMS)
    items = read_items(tmp_path / "items.parquet")
    assert items.column("item_id").to_pylist() == list(range(N_ITEMS))  # row i is item i
    assert items.column("image").to_pylist() == items_rows()["image"]
    assert read_manifest(tmp_path / "items.parquet").row_count == N_ITEMS
    events = read_events(tmp_path / "events_train.parquet", N_ITEMS)
    assert events.equals(table(EVENTS, events_rows()).cast(events.schema))

    with pytest.raises(DataError, match=r"no such file; a world folder needs .* \(missing: events_test.parquet\)") \
            as info:
        validate_world(tmp_path)  # a CTR run used to fail on the missing split only after training
    assert info.value.file == str(tmp_path / "events_test.parquet")
    _complete_world(tmp_path)
    results = validate_world(tmp_path)
    assert [r.rows for r in results] == [N_ITEMS, 4, 4, 4, 4]
    out = capsys.readouterr().out
    assert out.count("OK ") == 5 and "note:" not in out
    write_table(table(EVENTS, events_rows() | {"label": [0, 0, 0, 0]}),
                tmp_path / "events_test.parquet", EVENTS, item_count=N_ITEMS)
    validate_world(tmp_path)  # valid data, but a CTR run would have nothing to rank: said
    assert f"note: {tmp_path / 'events_test.parquet'}: every label is 0" in capsys.readouterr().out
    # cross-file: events valid alone are refused against a smaller item table
    write_table(table(ITEMS, items_rows()).slice(0, 3), tmp_path / "items.parquet", ITEMS)
    with pytest.raises(DataError, match="outside the item table") as info:
        validate_world(tmp_path)
    assert info.value.file.endswith("pairs_train.parquet") and info.value.row == 3


def _complete_world(folder: Path) -> None:
    """Write the world files ``folder`` lacks, each with valid rows."""
    for name, contract, rows in (("pairs_train.parquet", PAIRS, pairs_rows()), ("pairs_test.parquet", PAIRS, pairs_rows()),
                                 ("events_train.parquet", EVENTS, events_rows()),
                                 ("events_test.parquet", EVENTS, events_rows())):
        if not (folder / name).is_file():
            write_table(table(contract, rows), folder / name, contract, item_count=N_ITEMS)


def test_clean_out_writes_a_world_of_the_valid_rows_that_validates(tmp_path, capsys):
    """--drop-invalid only reported: the world stayed unusable until its files were fixed by hand."""
    world = tmp_path / "world"
    world.mkdir()
    write_table(table(ITEMS, items_rows()), world / "items.parquet", ITEMS)
    write_raw(world, "events_train.parquet", EVENTS, edit(events_rows(), "label", 2, 5))
    _complete_world(world)
    assert mim(["data", "validate", str(world), "--clean-out", str(tmp_path / "clean")]) == 0
    printed = capsys.readouterr().out
    assert "events_train.parquet: quarantined 1 invalid row -> " in printed  # it read "1 invalid row(s)"
    assert re.search(r"clean world -> \S+ \(1 row left out\)", printed)
    results = validate_world(tmp_path / "clean")  # the clean world passes without quarantine
    assert [r.rows for r in results] == [N_ITEMS, 4, 4, 3, 4] and not any(r.rejected for r in results)
    kept = pq.read_table(tmp_path / "clean" / "events_train.parquet")
    assert kept.column("label").to_pylist() == [l for i, l in enumerate(events_rows()["label"]) if i != 2]
    manifest = read_manifest(tmp_path / "clean")
    assert manifest.extra["rejected"] == {"events_train.parquet": 1}
    assert manifest.extra["counts"]["events_train"] == 3 and manifest.extra["source"] == str(world.resolve())
    # never into the world itself or a folder with files; a world that fails leaves no clean folder
    assert mim(["data", "validate", str(world), "--clean-out", str(world)]) == 2
    assert mim(["data", "validate", str(world), "--clean-out", str(tmp_path / "clean")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    write_raw(world, "events_test.parquet", EVENTS, {name: [] for name in events_rows()})
    assert mim(["data", "validate", str(world), "--clean-out", str(tmp_path / "other")]) == 2
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("drop_invalid", [False, True])
def test_a_world_file_without_rows_is_refused(tmp_path, capsys, drop_invalid):
    """`mim data validate` used to print OK for an events file with no rows."""
    write_table(table(ITEMS, items_rows()), tmp_path / "items.parquet", ITEMS)
    rows = events_rows()
    if drop_invalid:  # rows that are all quarantined leave none either
        rows["label"] = [7] * len(rows["label"])
    else:
        rows = {name: [] for name in rows}
    events = write_raw(tmp_path, "events_train.parquet", EVENTS, rows)
    _complete_world(tmp_path)
    with pytest.raises(DataError, match="holds no rows" + (r" \(4 quarantined" if drop_invalid else "")) as info:
        validate_world(tmp_path, drop_invalid=drop_invalid)
    assert info.value.file == str(events)
    # the one-file form of the command too
    assert mim(["data", "validate", str(events), *(["--drop-invalid"] if drop_invalid else [])]) == 2
    assert f"{events}: holds no rows" in capsys.readouterr().err


@pytest.mark.parametrize("file, field", [("events_test.parquet", "user_id"), ("items.parquet", "category_id")])
def test_ids_too_sparse_for_a_table_are_refused_as_mim_train_refuses_them(tmp_path, capsys, file, field):
    """Raw user ids passed `mim data validate` and were refused only by mim train ("ids must be dense")."""
    items = edit(items_rows(), "category_id", 4, 10 ** 9) if field == "category_id" else items_rows()
    write_raw(tmp_path, "items.parquet", ITEMS, items)
    if field == "user_id":
        write_raw(tmp_path, file, EVENTS, edit(events_rows(), "user_id", 2, 10 ** 11))
    _complete_world(tmp_path)
    with pytest.raises(DataError, match="ids must be dense") as info:
        validate_world(tmp_path)
    assert (info.value.file, info.value.row, info.value.field) == (str(tmp_path / file), 2 if field == "user_id" else 4,
                                                                   field)
    assert mim(["data", "validate", str(tmp_path / file)]) == 2  # the one-file form too
    assert "would size a 1" in capsys.readouterr().err


def test_a_quarantined_rows_id_does_not_count_against_the_kept_rows(tmp_path, capsys):
    """--clean-out drops a bad row, yet its raw user id refused the whole world."""
    write_table(table(ITEMS, items_rows()), tmp_path / "items.parquet", ITEMS)
    write_raw(tmp_path, "events_train.parquet", EVENTS,
              edit(edit(events_rows(), "label", 2, 5), "user_id", 2, 10 ** 11))
    _complete_world(tmp_path)
    assert mim(["data", "validate", str(tmp_path), "--clean-out", str(tmp_path / "clean")]) == 0
    assert [r.rows for r in validate_world(tmp_path / "clean")] == [N_ITEMS, 4, 4, 3, 4]
    # a kept row's raw id is still refused, at its row in the file
    write_raw(tmp_path, "events_train.parquet", EVENTS,
              edit(edit(events_rows(), "label", 1, 5), "user_id", 3, 10 ** 11))
    with pytest.raises(DataError, match="ids must be dense") as info:
        validate_world(tmp_path, drop_invalid=True)
    assert info.value.row == 3


def test_a_behaviour_category_that_is_not_its_items_is_refused(tmp_path):
    """The loader embeds the category the events list; one that disagrees with the items table
    gave a behaviour another category's embedding and misled SIM's category search."""
    write_table(table(ITEMS, items_rows()), tmp_path / "items.parquet", ITEMS)  # item i has category i % 2
    events = write_raw(tmp_path, "events_test.parquet", EVENTS, edit(events_rows(), "hist_category_ids", 3, [0, 0, 0]))
    _complete_world(tmp_path)
    with pytest.raises(DataError, match="behaviour category differs from its item's in the items table") as info:
        validate_world(tmp_path)
    assert (info.value.file, info.value.row, info.value.field) == (str(events), 3, "hist_category_ids")
    validate_file(events, EVENTS, item_count=N_ITEMS)  # without the items' categories it is not checked


def test_one_file_validated_beside_its_items_gets_the_world_rules(tmp_path, capsys):
    """`mim data validate events_*.parquet` read the items beside it yet printed OK for a
    behaviour category that the world check, and mim train, refuse."""
    write_table(table(ITEMS, items_rows()), tmp_path / "items.parquet", ITEMS)
    events = write_raw(tmp_path, "events_test.parquet", EVENTS, edit(events_rows(), "hist_category_ids", 3, [0, 0, 0]))
    assert mim(["data", "validate", str(events)]) == 2
    assert "row 3, field 'hist_category_ids': behaviour category differs" in capsys.readouterr().err


def test_a_ragged_row_does_not_hide_or_invent_category_mismatches(tmp_path):
    """The check compared the flattened lists: one ragged row switched it off for its whole
    batch (a later ragged row was named first; a clean-out kept the mismatching row), and two
    that cancelled out paired elements across rows, throwing away valid rows as mismatches."""
    write_table(table(ITEMS, items_rows()), tmp_path / "items.parquet", ITEMS)  # item i has category i % 2
    rows = edit(events_rows(), "hist_category_ids", 0, [1, 1])         # row 0: a wrong category
    rows = edit(rows, "hist_category_ids", 3, [0, 1])                  # row 3: one short
    events = write_raw(tmp_path, "events_test.parquet", EVENTS, rows)
    _complete_world(tmp_path)
    with pytest.raises(DataError, match="behaviour category differs") as info:
        validate_world(tmp_path)
    assert (info.value.row, info.value.field) == (0, "hist_category_ids")

    rows = edit(events_rows(), "hist_category_ids", 0, [1, 0, 1])      # one long ...
    rows = edit(rows, "hist_category_ids", 3, [0, 1])                  # ... one short: totals match
    write_raw(tmp_path, "events_test.parquet", EVENTS, rows)
    result = [r for r in validate_world(tmp_path, drop_invalid=True, echo=lambda line: None)
              if r.path == events][0]
    assert result.rejected == 2  # rows 0 and 3; rows 1 and 2 are valid and kept


def test_category_ids_past_the_items_categories_are_refused(tmp_path):
    """An unknown category id would be looked up in rows the category table does not have."""
    write_table(table(ITEMS, items_rows()), tmp_path / "items.parquet", ITEMS)  # categories 0 and 1
    events = write_raw(tmp_path, "events_train.parquet", EVENTS,
                       edit(events_rows(), "hist_category_ids", 2, [2]))
    _complete_world(tmp_path)
    with pytest.raises(DataError, match=r"behaviour category id outside the items' categories \(0\.\.1\)") as info:
        validate_world(tmp_path)
    assert (info.value.file, info.value.row, info.value.field) == (str(events), 2, "hist_category_ids")
    pairs = write_raw(tmp_path, "pairs_test.parquet", PAIRS, edit(pairs_rows(), "category_id", 1, 7))
    with pytest.raises(DataError, match="category id outside the items' categories") as info:
        validate_file(pairs, PAIRS, item_count=N_ITEMS, category_count=2)
    assert (info.value.row, info.value.field) == (1, "category_id")
    validate_file(pairs, PAIRS, item_count=N_ITEMS)  # without the items' categories, only >= 0 is checked


def test_a_pair_whose_category_is_not_its_items_is_refused(tmp_path, capsys):
    """The pairs' category_id was checked only to be a category of the items table: a pairs file
    written against another id mapping, each pair on the wrong item, passed the world check,
    mim data holdout and C-SFT's loader."""
    from mim_rec.csft.data import read_pair_file
    from mim_rec.data.split import holdout_world

    write_table(table(ITEMS, items_rows()), tmp_path / "items.parquet", ITEMS)  # item 3: category 1
    pairs = write_raw(tmp_path, "pairs_train.parquet", PAIRS, edit(pairs_rows(), "category_id", 3, 0))
    _complete_world(tmp_path)
    named = "pair category differs from its item's in the items table (value: 0; item 3's category in the items table is 1)"
    with pytest.raises(DataError) as info:
        validate_world(tmp_path, echo=lambda line: None)
    assert (info.value.file, info.value.row, info.value.field) == (str(pairs), 3, "category_id")
    assert info.value.reason == named
    assert mim(["data", "validate", str(pairs)]) == 2  # one file: the items beside it give the categories
    assert f"{pairs}, row 3, field 'category_id': {named}" in capsys.readouterr().err
    with pytest.raises(DataError, match="pair category differs") as info:
        read_pair_file(pairs, read_items(tmp_path / "items.parquet").column("category_id").to_numpy())
    assert (info.value.row, info.value.field) == (3, "category_id")
    with pytest.raises(DataError, match="pair category differs") as info:  # nor carried into a validation world
        holdout_world(tmp_path, tmp_path / "validation", 0.5)
    assert (info.value.file, info.value.row) == (str(pairs), 3)
    results = validate_world(tmp_path, drop_invalid=True, echo=lambda line: None, clean_out=tmp_path / "clean")
    assert [r.rejected for r in results] == [0, 1, 0, 0, 0]
    assert pq.read_table(rejected_path_for(pairs)).column("reason").to_pylist() == [
        "category_id: pair category differs from its item's in the items table"]


def test_validate_names_a_missing_path_and_a_bad_item_count(tmp_path, capsys):
    """A missing path was reported as a file name the command could not read a contract from."""
    assert mim(["data", "validate", str(tmp_path / "absent")]) == 2
    assert "absent: no such file or world folder" in capsys.readouterr().err
    events = write_raw(tmp_path, "events_train.parquet", EVENTS, events_rows())
    assert mim(["data", "validate", str(events), "--item-count", "-1"]) == 2
    assert "--item-count=-1: must be positive" in capsys.readouterr().err


def test_a_folder_given_for_a_parquet_file_is_named_as_a_folder(tmp_path, capsys):
    """``mim bench lookup items=WORLD`` (the world folder for its items file) said
    "WORLD: no such file" of a folder that was there."""
    assert mim(["bench", "lookup", "--quick", f"items={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == f"mim bench lookup: error: {tmp_path}: a folder, not a Parquet file"


def test_corrupt_parquet_is_a_data_error_naming_the_file(tmp_path, capsys):
    """A corrupt data page (validate) and a broken footer (summary) used to end in Arrow's
    OSError traceback, which names no file."""
    write_table(table(ITEMS, items_rows()), tmp_path / "items.parquet", ITEMS)
    _complete_world(tmp_path)
    events = tmp_path / "events_train.parquet"
    pq.write_table(table(EVENTS, {k: v * 50 for k, v in events_rows().items()}), events,
                   row_group_size=100, compression="snappy")
    chunk = pq.ParquetFile(events).metadata.row_group(1).column(1)  # the query strings
    data = bytearray(events.read_bytes())
    end = chunk.data_page_offset + chunk.total_compressed_size
    data[end - 40:end] = b"\xff" * 40
    events.write_bytes(bytes(data))
    with pytest.raises(DataError, match="unreadable Parquet data") as info:
        validate_world(tmp_path, echo=lambda _: None)
    assert info.value.file == str(events)

    items = tmp_path / "items.parquet"
    items.write_bytes(items.read_bytes()[:-30])
    assert mim(["data", "summary", str(tmp_path)]) == 2
    assert f"{items}: not a readable Parquet file" in capsys.readouterr().err


def test_a_broken_page_header_is_refused_in_one_line(tmp_path):
    """Arrow's message for it spans three lines, which the error quoted as they were."""
    items = tmp_path / "items.parquet"
    write_table(table(ITEMS, items_rows()), items, ITEMS)
    data = bytearray(items.read_bytes())
    data[4:204] = bytes(200)  # the first column chunk's page header
    items.write_bytes(bytes(data))
    with pytest.raises(DataError, match="unreadable Parquet data from this row on") as info:
        validate_file(items, ITEMS)
    assert "\n" not in str(info.value) and "Deserializing page header failed." in str(info.value)


def test_a_duplicate_item_row_does_not_shift_the_items_categories(tmp_path):
    """The behaviour-category check read the item->category map from the raw items file,
    quarantined rows included: one extra row for item 0 shifted every later item's category,
    so --clean-out dropped good events and kept the one whose category is wrong."""
    items = items_rows()
    items = {name: values + values[:1] for name, values in items.items()}  # item 0 listed twice
    write_raw(tmp_path, "items.parquet", ITEMS, items)
    events = write_raw(tmp_path, "events_train.parquet", EVENTS,
                       edit(events_rows(), "hist_category_ids", 2, [0]))  # item 3 has category 1
    _complete_world(tmp_path)
    results = validate_world(tmp_path, drop_invalid=True, echo=lambda line: None, clean_out=tmp_path / "clean")
    assert [r.rejected for r in results] == [1, 0, 0, 1, 0]
    assert pq.read_table(rejected_path_for(events)).column("source_row").to_pylist() == [2]
    assert [r.rows for r in validate_world(tmp_path / "clean", echo=lambda line: None)] == [N_ITEMS, 4, 4, 3, 4]


def test_a_vector_columns_dimension_is_its_most_common_length_not_its_first_rows(tmp_path):
    """The first row's length was the column's dimension: one wrong first row flagged every
    right row, and --clean-out kept the wrong row and quarantined all the others."""
    rows = edit(pairs_rows(), "query_feature", 0, [1.0, 0.0, 0.0])  # rows 1..3 have length 2
    path = write_raw(tmp_path, "pairs_train.parquet", PAIRS, rows)
    with pytest.raises(DataError, match="vector length differs from the column's dimension 2") as info:
        read_pairs(path, N_ITEMS)
    assert (info.value.row, info.value.field) == (0, "query_feature")
    result = validate_file(path, PAIRS, item_count=N_ITEMS, drop_invalid=True)
    assert result.rejected == 1 and result.table.column("query_feature").to_pylist() == [[1.0, 0.0]] * 3
    with pytest.raises(DataError, match="dimension 2") as info:  # the writer refuses the same row
        write_table(table(PAIRS, rows), tmp_path / "out.parquet", PAIRS, item_count=N_ITEMS)
    assert info.value.row == 0
    # as many rows of each length: which are wrong cannot be told, so the file is refused whole
    rows = edit(rows, "query_feature", 1, [1.0, 0.0, 0.0])
    path = write_raw(tmp_path, "pairs_train.parquet", PAIRS, rows)
    with pytest.raises(DataError, match="2 rows each have vectors of length 2 and 3") as info:
        validate_file(path, PAIRS, item_count=N_ITEMS, drop_invalid=True)
    assert (info.value.file, info.value.row, info.value.field) == (str(path), None, "query_feature")
    with pytest.raises(ValueError, match="needs their vector_dims"):  # a stream's rows are not all seen
        ContractWriter(tmp_path / "stream.parquet", PAIRS, table(PAIRS, pairs_rows()).schema)


def test_a_failed_mm_table_check_leaves_no_clean_world(tmp_path):
    """The mm_table/ folder was checked after the clean world was written, outside the clean-up:
    its failure left DIR behind, manifest and all, though a failed check must leave none."""
    write_table(table(ITEMS, items_rows()), tmp_path / "items.parquet", ITEMS)
    _complete_world(tmp_path)
    (tmp_path / "mm_table").mkdir()
    vectors = [[0.5, 0.5]] * (N_ITEMS - 1) + [[math.nan, 0.0]]
    pq.write_table(pa.table({"item_id": pa.array(range(N_ITEMS), pa.int64()),
                             "vector": pa.array(vectors, pa.list_(pa.float32()))}),
                   tmp_path / "mm_table" / "part-00000.parquet")
    write_manifest(tmp_path / "mm_table", Manifest(kind="mm_table", stage="test", dtype="float32", dim=2,
                                                   row_count=N_ITEMS))
    with pytest.raises(DataError, match="NaN") as info:
        validate_world(tmp_path, drop_invalid=True, echo=lambda line: None, clean_out=tmp_path / "clean")
    assert info.value.file == str(tmp_path / "mm_table" / "part-00000.parquet")
    assert not (tmp_path / "clean").exists()


def test_clean_out_keeps_relative_image_paths_naming_the_images(tmp_path):
    """The clean world got the image paths verbatim, relative to a folder that has no images:
    the world it reported as clean was refused ("image path missing")."""
    world = tmp_path / "world"
    (world / "img").mkdir(parents=True)
    items = items_rows()
    for i, blob in enumerate(items.pop("image")):
        (world / "img" / f"{i}.png").write_bytes(blob)
    items["image_path"] = [f"img/{i}.png" for i in range(N_ITEMS)]
    write_raw(world, "items.parquet", ITEMS, items)
    write_raw(world, "events_train.parquet", EVENTS, edit(events_rows(), "label", 2, 5))
    _complete_world(world)
    validate_world(world, drop_invalid=True, echo=lambda line: None, clean_out=tmp_path / "clean")
    assert [r.rows for r in validate_world(tmp_path / "clean", echo=lambda line: None)] == [N_ITEMS, 4, 4, 3, 4]
    paths = pq.read_table(tmp_path / "clean" / "items.parquet").column("image_path").to_pylist()
    assert paths == [str(world.resolve() / "img" / f"{i}.png") for i in range(N_ITEMS)]

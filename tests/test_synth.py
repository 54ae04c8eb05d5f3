"""The synthetic world does what docs/synth.md claims: it is deterministic, valid, and its
clicks depend on content, ID-level effects and position the way the generative model says."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mim_rec.data.io import validate_world
from mim_rec.data.synth import ClickModel, SynthConfig, generate_world, render, tiny
from mim_rec.data.synth.text import COLOURS, category_nouns, colour_bin
from train.cli import main as mim

FILES = ("items", "events_train", "events_test", "pairs_train", "pairs_test")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tiny(SynthConfig(seed=7)), tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def truth(world):
    return dict(np.load(world / "truth" / "items.npz"))


def _train(world):
    events = pq.read_table(world / "events_train.parquet")
    components = pq.read_table(world / "truth" / "events_train.parquet")
    return events, components


def test_same_seed_same_world_other_seed_other_world(world, tmp_path):
    again = generate_world(tiny(SynthConfig(seed=7)), tmp_path / "again")
    for name in FILES:
        assert pq.read_table(world / f"{name}.parquet").equals(pq.read_table(again / f"{name}.parquet")), name
    other = generate_world(tiny(SynthConfig(seed=8)), tmp_path / "other")
    assert not pq.read_table(world / "events_train.parquet").equals(pq.read_table(other / "events_train.parquet"))


def test_searches_ranked_in_blocks_give_the_same_world(world, tmp_path, monkeypatch):
    """A category's searches are ranked in row blocks so memory stays flat (one category of a
    full-size world needed three items x items float64 arrays); the world must not change."""
    from mim_rec.data.synth import world as synth_world

    monkeypatch.setattr(synth_world, "SEARCH_BLOCK_CELLS", 50)  # a few rows per block
    blocked = generate_world(tiny(SynthConfig(seed=7)), tmp_path / "blocked")
    for name in FILES:
        assert pq.read_table(world / f"{name}.parquet").equals(pq.read_table(blocked / f"{name}.parquet")), name


def test_world_passes_the_contract_validators(world):
    rows = {r.path.name: r.rows for r in validate_world(world, echo=lambda _: None)}
    assert rows["items.parquet"] == 600 and rows["events_train.parquet"] > 1000


def test_content_matched_items_are_clicked_more(world):
    events, parts = _train(world)
    label, content = events["label"].to_numpy(), parts["content"].to_numpy()
    low, high = np.quantile(content, [0.25, 0.75])
    assert label[content >= high].mean() > 2.5 * label[content <= low].mean()


def test_id_effect_raises_clicks_at_equal_content(world):
    """Within each content quartile, items with a positive hidden ID effect get more clicks."""
    events, parts = _train(world)
    label, content, effect = (events["label"].to_numpy(), parts["content"].to_numpy(),
                              parts["item_effect"].to_numpy())
    bins = np.digitize(content, np.quantile(content, [0.25, 0.5, 0.75]))
    gaps = [label[(bins == b) & (effect > 0)].mean() - label[(bins == b) & (effect <= 0)].mean()
            for b in range(4)]
    assert min(gaps) > 0 and np.mean(gaps) > 0.04


def test_top_positions_are_clicked_more(world):
    events, _ = _train(world)
    label, position = events["label"].to_numpy(), events["position"].to_numpy()
    assert label[position == 0].mean() > label[position >= 7].mean()


def test_newest_items_have_fewest_interactions(world):
    items = pq.read_table(world / "items.parquet")
    events, _ = _train(world)
    created = items["created_at"].cast(pa.timestamp("s")).cast("int64").to_numpy()
    shown = np.bincount(events["target_item_id"].to_numpy(), minlength=items.num_rows)
    last_ts = events["ts"].to_numpy().max()
    age_days = (last_ts - created) / 86_400
    assert shown[age_days < 30].mean() < 0.5 * shown[age_days > 120].mean()


def test_histories_precede_the_event_and_end_with_the_most_recent(world):
    events, _ = _train(world)
    hist_ts = events["hist_ts"]
    offsets = hist_ts.combine_chunks().offsets.to_numpy()
    values = pc.list_flatten(hist_ts).to_numpy()
    row_ts = np.repeat(events["ts"].to_numpy(), np.diff(offsets))
    assert (values < row_ts).all()
    same_row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    ascending = np.diff(values) >= 0
    assert ascending[same_row[1:] == same_row[:-1]].all()
    test_ts = pq.read_table(world / "events_test.parquet")["ts"].to_numpy()
    assert test_ts.min() > events["ts"].to_numpy().max() - 86_400


def _colour_histograms(blobs, bins: int = 4) -> np.ndarray:
    """Translation-invariant image features: a normalised bins^3 RGB histogram per image."""
    out = []
    for blob in blobs:
        rgb = np.asarray(Image.open(io.BytesIO(blob)), dtype=np.int64) * bins // 256
        codes = (rgb[..., 0] * bins + rgb[..., 1]) * bins + rgb[..., 2]
        out.append(np.bincount(codes.ravel(), minlength=bins ** 3) / codes.size)
    return np.stack(out)


def _hue_histograms(blobs, bins: int = 12) -> np.ndarray:
    """Hue histogram of the saturated (foreground: the backdrop is grey) pixels."""
    out = []
    for blob in blobs:
        hsv = np.asarray(Image.open(io.BytesIO(blob)).convert("HSV"), dtype=np.int64)
        hue = hsv[..., 0][hsv[..., 1] > 80] * bins // 256
        out.append(np.bincount(hue, minlength=bins) / max(hue.size, 1))
    return np.stack(out)


def _ridge_accuracy(x: np.ndarray, labels: np.ndarray, train: int) -> float:
    x = np.hstack([x, np.ones((len(x), 1))])
    y = np.eye(int(labels.max()) + 1)[labels]
    w = np.linalg.solve(x[:train].T @ x[:train] + 0.01 * np.eye(x.shape[1]), x[:train].T @ y[:train])
    return float(((x[train:] @ w).argmax(1) == labels[train:]).mean())


def test_images_show_the_category_and_the_colour(world, truth):
    """A ridge probe on colour histograms predicts the title's colour word and the category
    far above chance (13 colours, 6 categories)."""
    x = _colour_histograms(pq.read_table(world / "items.parquet")["image"].to_pylist())
    colour_accuracy = _ridge_accuracy(x, colour_bin(truth["style"]), 450)
    category_accuracy = _ridge_accuracy(x, truth["category"], 450)
    print(f"colour probe {colour_accuracy:.2f}, category probe {category_accuracy:.2f}")
    assert colour_accuracy > 4 / len(COLOURS)
    # twice chance: categories c and c + 5 share a silhouette, and seeds 0 to 11 give 0.40-0.48
    assert category_accuracy > 2 / 6


def test_titles_name_category_and_colour(world, truth):
    titles = pq.read_table(world / "items.parquet")["title"].to_pylist()
    has_noun = [any(n in t for n in category_nouns(int(c))) for t, c in zip(titles, truth["category"])]
    colours = colour_bin(truth["style"])
    has_colour = [any(w in t.split() for w in COLOURS[b]) for t, b in zip(titles, colours)]
    assert np.mean(has_noun) == 1.0
    assert 0.75 < np.mean(has_colour) < 1.0  # named most of the time, but sellers drop words


def test_two_renderings_of_a_style_look_alike(truth):
    """A query (a fresh rendering with more pose jitter) shows the same colours as the catalogue
    photo of that style, more than a photo of another style does."""
    rng = np.random.default_rng(0)
    styles, categories = truth["style"][:300], truth["category"][:300]
    photos = _hue_histograms(render.encode_png(render.render(styles, categories, rng)))
    queries = _hue_histograms(render.encode_png(render.render(styles, categories, rng, pose_jitter=1.5)))
    same = np.abs(queries - photos).sum(1)
    other = np.abs(queries - np.roll(photos, 1, axis=0)).sum(1)
    assert (same < other).mean() > 0.8


def test_cli_generates_validates_and_summarises(tmp_path, capsys):
    assert mim(["data", "synth", "--tiny", "--seed", "3", "--out", str(tmp_path / "w"), "items=300",
                "users=80", "events=2000", "pairs_train=100", "pairs_test=20"]) == 0
    out = capsys.readouterr().out
    assert "items: 300" in out and "click rate" in out and "item-age decile edges" in out
    assert mim(["data", "validate", str(tmp_path / "w")]) == 0
    assert mim(["data", "synth", "--tiny", "--out", str(tmp_path / "x"), "itemz=3"]) == 2
    # --seed used to win silently over a seed= override
    assert mim(["data", "synth", "--tiny", "--seed", "3", "--out", str(tmp_path / "x"), "seed=5"]) == 2
    assert "--seed 3 and seed=5: give the seed once" in capsys.readouterr().err


def test_fewer_pairs_than_asked_for_are_said(tmp_path, capsys):
    """A pair is one search session's: a split with fewer sessions gave fewer pairs silently."""
    generate_world(tiny(SynthConfig(seed=7)), tmp_path / "w")
    err = capsys.readouterr().err
    drawn = pq.read_metadata(tmp_path / "w" / "pairs_test.parquet").num_rows
    assert drawn < 150 and f"pairs_test=150 asked for, {drawn} drawn" in err


def test_histories_cut_to_their_candidate_items_are_said(tmp_path, capsys):
    """A user draws its history from its favourite categories' items and 100 random ones: a
    mean_history above that gave shorter histories than asked for, silently."""
    from dataclasses import replace

    config = replace(tiny(SynthConfig(seed=3)), users=20, events=1000, mean_history=5000.0, max_history=2000)
    generate_world(config, tmp_path / "w")
    assert re.search(r"note: 20 of 20 users drew a history longer than their candidate items .*"
                     r"\(mean_history=5000.0, max_history=2000\)", capsys.readouterr().err)
    generate_world(replace(config, mean_history=20.0, max_history=60), tmp_path / "short")
    assert "candidate items" not in capsys.readouterr().err


@pytest.mark.parametrize("override, named", [
    ({"style_dim": 4}, "style_dim=4"),          # the renderer reads eight style coordinates
    ({"categories": 0}, "categories=0"),
    ({"items": 3}, "categories=6 exceeds items=3"),
    ({"cf_groups": 1_000_000}, "cf_groups=1000000 exceeds both users=200 and items=600"),  # a 7 TiB traceback
    ({"events": 5}, "events=5"),
    ({"test_days": 60}, "test_days=60"),        # the test split must leave training days
    # these passed: a NaN click weight gave a world without clicks that validated, the others
    # ended in numpy or datetime tracebacks
    ({"click": ClickModel(content=float("nan"))}, "click.content=nan: must be a finite number"),
    ({"style_spread": float("nan")}, "style_spread=nan"),
    ({"search_sharpness": float("inf")}, "search_sharpness=inf"),
    ({"search_sharpness": -6.0}, "search_sharpness=-6.0: must not be negative"),
    ({"mean_history": float("nan")}, "mean_history=nan"),
    ({"days_before": 0}, "days_before=0"),
    ({"seed": -1}, "seed=-1"),
    ({"brands": 2941}, "brands=2941: the title generator spells at most 2940"),  # drew names forever
    ({"t0": "notadate"}, "t0='notadate': not an ISO date"),
    ({"click": ClickModel(noise_std=-1.0)}, "click.noise_std=-1.0: a spread"),
    ({"image_size": 1_000_000}, "image_size=1000000: at most 1024"),  # a 3.6 TiB numpy traceback
    ({"t0": "2026-01-01T23:00:00+05:00"}, "not an ISO date"),           # its offset was dropped unseen
    # a user's (user, time) search keys overlapped the next user's: numpy's 'negative repeats'
    ({"days": 60_000, "event_days": 60_000}, "days=60000: the timeline must lie within 1970-01-01"),
    ({"t0": "1970-06-01"}, "days_before=365, days=180: the timeline must lie within"),
    ({"page_size": 33_000, "events": 70_000}, "page_size=33000: at most 32767"),  # negative positions
])
def test_a_world_the_generator_cannot_draw_is_refused_by_field(override, named):
    from dataclasses import replace

    from mim_rec.config import ConfigError
    with pytest.raises(ConfigError, match=named):
        replace(tiny(SynthConfig()), **override)


@pytest.mark.parametrize("override, named", [
    ({"search_results": 10_000}, r"search_results=10000: category \d+ has only \d+ items"),
    ({"items": 60, "users": 50, "categories": 20, "events": 2000},
     r"page_size=10: its 8 in-category slots need more items of category \d+ than exist before some "
     r"session \(items=60 over categories=20\); raise items, or lower categories or page_size"),
    # no session in the test days: it failed writing the empty test split, naming a column type
    ({"events": 200, "seed": 7}, r"events=200: none of the \d+ search sessions fell in the test split"),
])
def test_sizes_a_category_cannot_fill_are_setting_errors(tmp_path, override, named):
    """They used to end in numpy tracebacks halfway through writing the world."""
    from dataclasses import replace

    from mim_rec.config import ConfigError
    with pytest.raises(ConfigError, match=named):
        generate_world(replace(tiny(SynthConfig(seed=3)), **override), tmp_path)


def test_summary_edges_are_the_evaluations_and_an_empty_split_is_summarised(world, tmp_path, capsys):
    """The decile edges used another quantile method than metrics.json's age_edges, and an
    empty events file crashed the command."""
    import shutil

    import torch

    from mim_rec.data.summary import summarize_world
    from mim_rec.metrics.functional import age_bucket_edges

    events = pq.read_table(world / "events_test.parquet", columns=["target_item_id", "ts"])
    created = pq.read_table(world / "items.parquet", columns=["item_id", "created_at"]).sort_by("item_id")
    created_s = created["created_at"].cast(pa.timestamp("s")).cast(pa.int64()).to_numpy()
    ages = (events["ts"].to_numpy() - created_s[events["target_item_id"].to_numpy()]) / 86_400
    expected = [round(x, 2) for x in age_bucket_edges(torch.from_numpy(ages))]
    assert summarize_world(world)["events_test"]["item_age_decile_edges_days"] == expected
    assert summarize_world(world)["events_test"]["events_before_item_created"] == 0
    copy = tmp_path / "copy"
    shutil.copytree(world, copy)
    items = pq.read_table(copy / "items.parquet")  # one item dated after every event that shows it
    item = int(events["target_item_id"][0].as_py())
    moved = items["created_at"].cast(pa.timestamp("s")).cast(pa.int64()).to_numpy().copy()
    moved[items["item_id"].to_numpy() == item] = int(events["ts"].to_numpy().max()) + 365 * 86_400
    pq.write_table(items.set_column(items.schema.get_field_index("created_at"), "created_at",
                                    pa.array(moved).cast(pa.timestamp("s"))), copy / "items.parquet")
    early = int((events["target_item_id"].to_numpy() == item).sum())
    summary = summarize_world(copy)["events_test"]
    assert summary["events_before_item_created"] == early and summary["item_age_days"]["p10"] >= 0  # taken at age 0
    assert mim(["data", "summary", str(copy)]) == 0
    assert f"{early} events precede their target item's created_at" in capsys.readouterr().out
    pq.write_table(pq.read_table(copy / "events_test.parquet").slice(0, 0), copy / "events_test.parquet")
    assert mim(["data", "summary", str(copy)]) == 0
    assert "events_test: 0 rows" in capsys.readouterr().out

    # created_at in microseconds (which validation accepts) was read as seconds: every age 0
    micro = tmp_path / "micro"
    shutil.copytree(world, micro)
    items = pq.read_table(micro / "items.parquet")
    at = items.schema.get_field_index("created_at")
    pq.write_table(items.set_column(at, "created_at", items["created_at"].cast(pa.timestamp("us"))),
                   micro / "items.parquet")
    assert summarize_world(micro)["events_test"]["item_age_decile_edges_days"] == expected

    # An id outside the items table was an IndexError traceback (-1 silently read item N-1's age)
    from mim_rec.data.errors import DataError

    events = pq.read_table(micro / "events_test.parquet")
    for bad in (-1, created_s.size):
        target = events["target_item_id"].to_numpy().copy()
        target[5] = bad
        pq.write_table(events.set_column(events.schema.get_field_index("target_item_id"), "target_item_id",
                                         pa.array(target)), micro / "events_test.parquet")
        with pytest.raises(DataError, match="outside the item table") as info:
            summarize_world(micro)
        assert (info.value.row, info.value.field) == (5, "target_item_id")


def test_summary_percentiles_of_history_lengths_are_lengths_that_occur(world):
    """An integer quantity's percentiles were interpolated between neighbours ("p10 2.9"), a
    history length no row has; they are the lower neighbour now."""
    from mim_rec.data.summary import PERCENTILES, summarize_world

    events = pq.read_table(world / "events_test.parquet", columns=["hist_item_ids"])
    lengths = pc.list_value_length(events["hist_item_ids"]).to_numpy()
    summary = summarize_world(world)["events_test"]
    assert any(np.percentile(lengths, p) % 1 for p in PERCENTILES)  # the tiny world has fractional ones
    assert [summary["history_length"][f"p{p}"] for p in PERCENTILES] == [
        float(np.percentile(lengths, p, method="lower")) for p in PERCENTILES]
    assert set(summary["history_length"][f"p{p}"] for p in PERCENTILES) <= set(lengths.tolist())


def test_summary_and_the_train_report_say_when_item_ages_are_not_ages(world, tmp_path, capsys):
    """An imported world's ages are ordinals (its manifest says so); the summary printed them
    as days, and mim train printed S1..S10, without a word."""
    import shutil
    from dataclasses import replace

    from mim_rec.data.manifest import read_manifest, write_manifest
    from mim_rec.metrics.report import format_report

    copy = tmp_path / "imported"
    shutil.copytree(world, copy)
    manifest = read_manifest(copy)
    write_manifest(copy, replace(manifest, extra={**manifest.extra, "item_age": "ordinals by user"}))
    assert mim(["data", "summary", str(copy)]) == 0
    assert "note: these are not item ages on this world: ordinals by user" in capsys.readouterr().out
    assert mim(["data", "summary", str(world)]) == 0
    assert "not item ages" not in capsys.readouterr().out
    report = {"auc": 0.6, "gauc": 0.6, "logloss": 0.3, "n": 10,
              "age_deciles": [{"bucket": "S1", "age_days_max": 1.0, "auc": 0.6, "n": 10}]}
    assert "not item ages on this world: ordinals by user" in format_report(report, "ordinals by user")
    assert "note" not in format_report(report)


def test_a_synth_killed_part_way_leaves_no_world_that_validates(world, tmp_path, monkeypatch):
    """It used to leave the files written so far, events without pairs, which validated and
    trained (the pairs are optional); now a failed run leaves its output folder as it was."""
    import shutil

    import mim_rec.data.synth as synth
    from mim_rec.data.errors import DataError

    shutil.copytree(world, tmp_path / "old")
    before = {path.name: path.read_bytes() for path in (tmp_path / "old").iterdir() if path.is_file()}
    crash = RuntimeError("killed")

    def killed(*args, **kwargs):
        raise crash

    monkeypatch.setattr(synth, "_pairs_table", killed)
    for out in (tmp_path / "new", tmp_path / "old"):
        with pytest.raises(RuntimeError, match="killed"):
            generate_world(tiny(SynthConfig(seed=8)), out)
    assert not (tmp_path / "new").exists()
    with pytest.raises(DataError, match="items"):
        validate_world(tmp_path / "new", echo=lambda _: None)
    # the world it was replacing is untouched, manifest included
    assert {path.name: path.read_bytes() for path in (tmp_path / "old").iterdir() if path.is_file()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["old"]  # no staging left


def test_a_synth_replaces_a_world_whole_and_refuses_a_folder_of_other_files(world, tmp_path):
    """Written over another world it used to keep that world's extra files (an imported data
    set's ``mm_table/``, a quarantine), which then passed for part of the new world."""
    import shutil

    from mim_rec.data.errors import DataError

    out = tmp_path / "world"
    shutil.copytree(world, out)
    (out / "mm_table").mkdir()
    (out / "mm_table" / "part-00000.parquet").write_bytes(b"another data set's table")
    (out / "events_train.parquet.rejected.parquet").write_bytes(b"an old quarantine")
    generate_world(tiny(SynthConfig(seed=8)), out)
    assert not (out / "mm_table").exists()
    assert not (out / "events_train.parquet.rejected.parquet").exists()
    validate_world(out, echo=lambda _: None)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a world")
    with pytest.raises(DataError, match="not empty and holds no readable manifest.json"):
        generate_world(tiny(SynthConfig(seed=8)), mine)
    assert [path.name for path in mine.iterdir()] == ["notes.txt"]

    # Another mim_rec output (an MM table, trained encoders) was replaced whole: its manifest
    # was taken as leave to delete it.
    from mim_rec.data.manifest import Manifest, write_manifest

    table = tmp_path / "table"
    table.mkdir()
    (table / "part-00000.parquet").write_bytes(b"a trained table")
    write_manifest(table, Manifest(kind="mm_table", stage="mfm", row_count=1, dim=4, dtype="float32"))
    with pytest.raises(DataError, match="holds a 'mm_table' output, not a 'world' one"):
        generate_world(tiny(SynthConfig(seed=8)), table)
    assert sorted(path.name for path in table.iterdir()) == ["manifest.json", "part-00000.parquet"]
    (table / "manifest.json").write_bytes(b"\xff\xfe not utf-8")  # was a UnicodeDecodeError traceback
    with pytest.raises(DataError, match="holds no readable manifest.json"):
        generate_world(tiny(SynthConfig(seed=8)), table)


def test_a_synth_into_the_working_directory_keeps_the_folder(world, tmp_path, monkeypatch):
    """``--out .``: the folder is refilled, never renamed away from under the shell."""
    monkeypatch.chdir(tmp_path)
    generate_world(tiny(SynthConfig(seed=8)), ".")
    inode = tmp_path.stat().st_ino
    generate_world(tiny(SynthConfig(seed=9)), ".")
    assert tmp_path.stat().st_ino == inode
    assert not any(path.name.startswith(".mim_") for path in tmp_path.iterdir())
    validate_world(tmp_path, echo=lambda _: None)

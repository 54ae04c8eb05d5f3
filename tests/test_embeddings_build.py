"""MFM build: exact vectors in, resumable by whole shards, other encoders refused."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from embeddings.build import build_table
import pyarrow.parquet as pq

from embeddings.table import read_mm_rows, read_mm_table
from mim_rec.data.errors import DataError, ManifestMismatch
from mim_rec.data.manifest import read_manifest
from mim_rec.data.synth import SynthConfig, generate_world, tiny


class FakeEncoder:
    """A deterministic encoder: item i -> a vector derived from i (and a salt)."""

    def __init__(self, salt: int = 0, fail_after: int = -1) -> None:
        self.dim, self.fingerprint, self.calls, self.fail_after = 8, f"fake:{salt}", 0, fail_after
        self.salt = salt

    def embed_items(self, items: pa.Table, source) -> torch.Tensor:
        if self.calls == self.fail_after:
            raise KeyboardInterrupt("killed mid-build")
        self.calls += 1
        ids = torch.from_numpy(items["item_id"].to_numpy().astype(np.float32))
        return torch.stack([torch.sin(ids * (k + 1) + self.salt) for k in range(self.dim)], dim=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    config = replace(tiny(SynthConfig(seed=5)), items=300, users=60, events=1000, pairs_train=20, pairs_test=5)
    return generate_world(config, tmp_path_factory.mktemp("mfm_world"))


def test_build_then_read_round_trips_exact_vectors(world, tmp_path):
    out = build_table(FakeEncoder(), world / "items.parquet", tmp_path / "table", shard_rows=64)
    manifest = read_manifest(out)
    assert (manifest.kind, manifest.dim, manifest.row_count) == ("mm_table", 8, 300)
    assert len(manifest.extra["shards"]) == 5 and manifest.extra["encoder_fingerprint"] == "fake:0"
    expected = FakeEncoder().embed_items(pa.table({"item_id": np.arange(300)}), None)
    assert torch.equal(read_mm_table(out, 300, 8), expected)


def test_a_row_range_reads_only_the_parts_that_hold_it(world, tmp_path, monkeypatch):
    out = build_table(FakeEncoder(), world / "items.parquet", tmp_path / "table", shard_rows=64)
    opened = []
    real_read = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda path, **kw: opened.append(path.name) or real_read(path, **kw))
    rows = read_mm_rows(out, 100, 150, 8)
    expected = FakeEncoder().embed_items(pa.table({"item_id": np.arange(300)}), None)
    assert torch.equal(rows, expected[100:150])
    assert opened == ["part-00001.parquet", "part-00002.parquet"]


def test_a_range_reader_reads_each_parts_footer_once(world, tmp_path, monkeypatch):
    """The fill reads the table chunk by chunk; each chunk listed the folder and read every
    part's footer again (parts x chunks footers for a 10M-row table: 374k)."""
    import embeddings.table as table

    out = build_table(FakeEncoder(), world / "items.parquet", tmp_path / "table", shard_rows=64)
    bounds, read = [], table._id_summary
    monkeypatch.setattr(table, "_id_summary", lambda part: bounds.append(part) or read(part))
    rows = table.MMTableRows(out, 8)
    chunked = torch.cat([rows(first, min(first + 16, 300)) for first in range(0, 300, 16)])
    assert len(bounds) == len(table.table_parts(out)) == 5
    assert torch.equal(chunked, read_mm_table(out, 300, 8))


def test_killed_build_resumes_from_whole_shards(world, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        build_table(FakeEncoder(fail_after=2), world / "items.parquet", tmp_path / "t", shard_rows=64)
    assert sorted(p.name for p in (tmp_path / "t").glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    assert not (tmp_path / "t" / "manifest.json").exists()  # incomplete tables have no manifest
    # read as a table, it is named unfinished (it read "was it produced by mim_rec?")
    with pytest.raises(ManifestMismatch, match=r"/t: its build has not finished \(no manifest yet, only the "
                                               r"build's \.build\.json\); rerun the build with the same settings"):
        read_mm_table(tmp_path / "t", 300, 8)
    resumed = FakeEncoder()
    build_table(resumed, world / "items.parquet", tmp_path / "t", shard_rows=64)
    assert resumed.calls == 3  # only the missing shards were embedded
    straight = build_table(FakeEncoder(), world / "items.parquet", tmp_path / "s", shard_rows=64)
    assert torch.equal(read_mm_table(tmp_path / "t", 300, 8), read_mm_table(straight, 300, 8))


def test_a_resumed_build_embeds_a_damaged_shard_again(world, tmp_path):
    """A truncated part used to count as finished, and the table read back failed later."""
    built = build_table(FakeEncoder(), world / "items.parquet", tmp_path / "t", shard_rows=64)
    (built / "manifest.json").unlink()  # as if killed before the manifest
    part = built / "part-00002.parquet"
    part.write_bytes(part.read_bytes()[:300])
    resumed = FakeEncoder()
    build_table(resumed, world / "items.parquet", built, shard_rows=64)
    assert resumed.calls == 1
    assert torch.equal(read_mm_table(built, 300, 8), FakeEncoder().embed_items(pa.table({"item_id": np.arange(300)}), None))


def test_another_encoder_is_refused_instead_of_mixed(world, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        build_table(FakeEncoder(fail_after=1), world / "items.parquet", tmp_path / "t", shard_rows=64)
    with pytest.raises(ManifestMismatch, match="encoder_fingerprint"):
        build_table(FakeEncoder(salt=1), world / "items.parquet", tmp_path / "t", shard_rows=64)


def test_a_build_refused_before_its_first_shard_leaves_the_folder_to_the_corrected_build(world, tmp_path):
    """Another world's truth folder is refused at the first shard; its build state, with no
    shard beside it, used to refuse the corrected build as 'built by another run'."""
    class Refusing(FakeEncoder):
        def embed_items(self, items, source):
            raise DataError(str(source), "not this world's items")

    with pytest.raises(DataError, match="not this world's items"):
        build_table(Refusing(salt=1), world / "items.parquet", tmp_path / "t", shard_rows=64)
    built = build_table(FakeEncoder(), world / "items.parquet", tmp_path / "t", shard_rows=64)
    assert read_manifest(built).extra["encoder_fingerprint"] == "fake:0"
    assert torch.equal(read_mm_table(built, 300, 8), FakeEncoder().embed_items(pa.table({"item_id": np.arange(300)}), None))


def test_a_folder_holding_a_table_this_build_did_not_start_is_refused(world, tmp_path):
    """A fold's or quantiser's output has no build state; its parts used to be taken for this
    build's finished shards, under a manifest naming the new encoder."""
    import shutil

    built = build_table(FakeEncoder(), world / "items.parquet", tmp_path / "t", shard_rows=64)
    shutil.copytree(built, tmp_path / "copy", ignore=shutil.ignore_patterns(".build.json"))
    with pytest.raises(ManifestMismatch, match=r"copy: holds manifest.json, part-00000.parquet, part-00001"):
        build_table(FakeEncoder(salt=1), world / "items.parquet", tmp_path / "copy", shard_rows=64)
    assert read_manifest(tmp_path / "copy").extra["encoder_fingerprint"] == "fake:0"  # left as it was


def test_a_folder_holding_anything_else_is_refused_and_left_as_it_was(world, tmp_path):
    """A run's folder given as out= (``mim embeddings build out=RUN/pretrain``) had the table's
    parts and manifest.json written among its files, and `mim pretrain` then refused its own run."""
    run = tmp_path / "pretrain"
    (run / "encoders").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    with pytest.raises(ManifestMismatch, match=r"pretrain: holds config.json, encoders, and no build of a table "
                                               r"started there; build into a new or empty folder"):
        build_table(FakeEncoder(), world / "items.parquet", run, shard_rows=64)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "encoders"]


def test_a_table_built_for_other_items_of_the_same_count_is_refused(world, tmp_path):
    from embeddings.table import check_table

    out = build_table(FakeEncoder(), world / "items.parquet", tmp_path / "table", shard_rows=64)
    assert check_table(out, 300, 8, items_path=world / "items.parquet") == 0
    items = pq.read_table(world / "items.parquet")
    titles = items["title"].to_pylist()
    titles[7] = "another world's item"
    other = tmp_path / "other_items.parquet"
    pq.write_table(items.set_column(items.schema.get_field_index("title"), "title", pa.array(titles)), other)
    with pytest.raises(ManifestMismatch, match=r"table: built for other items than .*other_items.parquet"):
        check_table(out, 300, 8, items_path=other)
    check_table(out, 300, 8)  # without the items, only sizes are checked


def test_reader_refuses_wrong_dim_and_missing_items(world, tmp_path):
    out = build_table(FakeEncoder(), world / "items.parquet", tmp_path / "table", shard_rows=64)
    with pytest.raises(ManifestMismatch, match="dim"):
        read_mm_table(out, 300, 16)
    from mim_rec.data.errors import DataError
    with pytest.raises(DataError, match="10 of 310 items in 0..309 have no vector"):
        read_mm_rows(out, 0, 310, 8)  # a catalogue grown past the table


def test_rows_whose_lengths_only_add_up_are_refused_not_shifted_into_their_neighbours(world, tmp_path):
    """A 7-long and a 9-long row pass a check of the total length; reshaped, item 1's vector
    was item 0's last value followed by 7 of its own."""
    from mim_rec.data.errors import DataError

    out = build_table(FakeEncoder(), world / "items.parquet", tmp_path / "table", shard_rows=64)
    part = pq.read_table(out / "part-00000.parquet")
    rows = part["vector"].to_pylist()
    rows[0], rows[1] = rows[0][:7], rows[0][7:] + rows[1]
    pq.write_table(part.set_column(part.column_names.index("vector"), "vector",
                                   pa.array(rows, part.schema.field("vector").type)),
                   out / "part-00000.parquet")
    with pytest.raises(DataError, match="item 0's vector is 7 long, not 8") as info:
        read_mm_rows(out, 0, 300, 8)
    assert info.value.file.endswith("part-00000.parquet") and info.value.field == "vector"


@pytest.mark.parametrize("shift", [10**12, -1000])
def test_a_part_with_ids_outside_the_id_range_is_refused_even_under_missing_default(world, tmp_path, shift):
    """Those rows used to be skipped by every range read: their items trained on zero vectors
    while the table reported none missing."""
    from embeddings.table import check_table
    from mim_rec.data.errors import DataError

    out = build_table(FakeEncoder(), world / "items.parquet", tmp_path / "table", shard_rows=64)
    part = pq.read_table(out / "part-00001.parquet")
    moved = part.set_column(0, "item_id", pa.array(part["item_id"].to_numpy() + shift, pa.int64()))
    pq.write_table(moved, out / "part-00001.parquet")
    with pytest.raises(DataError, match=r"item ids .* reach outside the table's id range \[0, 300\)") as info:
        check_table(out, 300, 8, missing="default")
    assert info.value.file.endswith("part-00001.parquet")


def test_a_part_with_a_null_item_id_is_refused_even_under_missing_default(world, tmp_path):
    """A row without an id passed the row count, and every range read filtered it out: its item
    trained on a zero vector while the table reported none missing."""
    from embeddings.table import check_table
    from mim_rec.data.errors import DataError

    out = build_table(FakeEncoder(), world / "items.parquet", tmp_path / "table", shard_rows=64)
    part = pq.read_table(out / "part-00001.parquet")
    ids = part["item_id"].to_pylist()
    ids[5] = None
    pq.write_table(part.set_column(0, "item_id", pa.array(ids, pa.int64())), out / "part-00001.parquet")
    with pytest.raises(DataError, match=r"1 row without an item id") as info:
        check_table(out, 300, 8, missing="default")
    assert info.value.file.endswith("part-00001.parquet") and info.value.field == "item_id"


def test_a_manifest_without_a_row_count_is_refused_in_a_sentence(world, tmp_path):
    """A hand-written manifest without row_count (and id_range) stopped the check on a bare
    ``TypeError`` comparing None with the catalogue's size."""
    import json

    from embeddings.table import check_table
    from mim_rec.data.errors import ManifestMismatch

    out = build_table(FakeEncoder(), world / "items.parquet", tmp_path / "table", shard_rows=64)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("row_count")
    manifest.get("extra", {}).pop("id_range", None)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestMismatch, match="its manifest gives no row_count"):
        check_table(out, 300, 8)


def test_a_table_missing_a_part_or_holding_a_stray_one_is_refused(world, tmp_path):
    """A missing part used to read as zero vectors even under missing=default, counted nowhere;
    a stray part's rows silently replaced the table's; a cut part was Arrow's traceback."""
    from embeddings.table import check_table
    from mim_rec.data.errors import DataError
    from mim_rec.data.manifest import write_manifest

    out = build_table(FakeEncoder(), world / "items.parquet", tmp_path / "table", shard_rows=64)
    part = (out / "part-00002.parquet").read_bytes()
    (out / "part-00002.parquet").unlink()
    with pytest.raises(DataError, match="a part the manifest lists is missing") as info:
        check_table(out, 300, 8, missing="default")
    assert info.value.file.endswith("part-00002.parquet")

    (out / "part-00002.parquet").write_bytes(part)
    pq.write_table(pq.read_table(out / "part-00000.parquet"), out / "part-00099.parquet")
    with pytest.raises(DataError, match="a part the manifest does not list"):
        read_mm_table(out, 300, 8)

    manifest = read_manifest(out)  # a table whose manifest lists no parts (e.g. an import's)
    write_manifest(out, replace(manifest, extra={k: v for k, v in manifest.extra.items() if k != "shards"}))
    with pytest.raises(DataError, match="its parts hold 364 rows, its manifest says 300"):
        check_table(out, 300, 8)
    with pytest.raises(DataError, match="item 0 has a second row") as info:
        read_mm_rows(out, 0, 300, 8)
    assert info.value.file.endswith("part-00099.parquet")

    (out / "part-00099.parquet").unlink()
    (out / "part-00001.parquet").write_bytes((out / "part-00001.parquet").read_bytes()[:200])
    with pytest.raises(DataError, match="not a readable Parquet file") as info:
        read_mm_rows(out, 0, 300, 8)
    assert info.value.file.endswith("part-00001.parquet")


def test_a_synthetic_worlds_truth_folder_builds_the_true_style_table(world, tmp_path):
    from embeddings.encoders import LatentStyleEncoder, load_item_encoder
    from mim_rec.data.errors import DataError

    encoder = load_item_encoder(world / "truth")
    assert isinstance(encoder, LatentStyleEncoder) and encoder.fingerprint.startswith("truth:")
    table = build_table(encoder, world / "items.parquet", tmp_path / "truth_table", shard_rows=128)
    styles = np.load(world / "truth" / "items.npz")["style"]
    torch.testing.assert_close(read_mm_table(table, 300, styles.shape[1]), torch.from_numpy(styles).float())
    other = tmp_path / "other_truth"
    other.mkdir()
    categories = np.load(world / "truth" / "items.npz")["category"]
    np.savez(other / "items.npz", style=styles[:100], category=categories[:100])  # another (smaller) world's truth
    with pytest.raises(DataError, match="another world's truth"):
        build_table(load_item_encoder(other), world / "items.parquet", tmp_path / "mixed", shard_rows=128)
    # Another world of as many items: every size fits, only its items' categories tell it apart.
    np.savez(other / "items.npz", style=styles[::-1], category=categories[::-1])
    with pytest.raises(DataError, match=r"in category \d+ here and \d+ in .*the truth folder of another world") \
            as info:
        build_table(load_item_encoder(other), world / "items.parquet", tmp_path / "swapped", shard_rows=128)
    assert info.value.field == "category_id"


def test_a_build_refused_before_it_starts_leaves_no_folder_behind(tmp_path):
    """A missing items file used to leave an empty out/ folder, which then looked like a build."""
    from mim_rec.data.errors import DataError, ManifestMismatch

    with pytest.raises(DataError):
        build_table(FakeEncoder(), tmp_path / "no_world" / "items.parquet", tmp_path / "table")
    assert not (tmp_path / "table").exists()
    (tmp_path / "afile").touch()
    with pytest.raises(ManifestMismatch, match="a file, not a table folder"):
        build_table(FakeEncoder(), tmp_path / "no_world" / "items.parquet", tmp_path / "afile")


def test_an_empty_catalogue_is_refused_before_anything_is_written(world, tmp_path):
    """It used to be 'built': a manifest of 0 rows and no part, reported as an MM table, which
    every reader then refused as 'no part-*.parquet files: not an MM table folder'."""
    from mim_rec.data.errors import DataError

    empty = tmp_path / "items.parquet"
    pq.write_table(pq.read_table(world / "items.parquet").slice(0, 0), empty)
    with pytest.raises(DataError, match=r"items.parquet: no items, so no MM table to build"):
        build_table(FakeEncoder(), empty, tmp_path / "table")
    assert not (tmp_path / "table").exists()

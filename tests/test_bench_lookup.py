"""``mim bench lookup``: the quick mode runs end to end and prints both per-sample costs and
their ratio; the table it times is the one it was given, looked up exactly."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from mim_rec.data.io import write_table
from mim_rec.data.manifest import Manifest, write_manifest
from mim_rec.data.schemas import ITEMS, MM_TABLE_FP
from train.cli import main

ITEMS_COUNT, DIM = 40, 8
TABLE_ENCODER = SimpleNamespace(dim=16, fingerprint="stage1:table")  # what _table_rows reads of an encoder


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_lookup")
    items = pa.table({"item_id": pa.array(np.arange(ITEMS_COUNT), pa.int64()),
                      "raw_item_id": [str(i) for i in range(ITEMS_COUNT)],
                      "category_id": pa.array(np.arange(ITEMS_COUNT) % 3, pa.int32()),
                      "title": [f"red square item {i}" for i in range(ITEMS_COUNT)],
                      "created_at": pa.array(np.zeros(ITEMS_COUNT, np.int64), pa.timestamp("s")),
                      "image": pa.array([_png(i) for i in range(ITEMS_COUNT)], pa.binary())})
    write_table(items, folder / "items.parquet", ITEMS)
    vectors = np.arange(ITEMS_COUNT * DIM, dtype=np.float32).reshape(ITEMS_COUNT, DIM)
    write_table(pa.table({"item_id": pa.array(np.arange(ITEMS_COUNT), pa.int64()),
                          "vector": pa.array(list(vectors), pa.list_(pa.float32()))}),
                folder / "table" / "part-00000.parquet", MM_TABLE_FP, item_count=ITEMS_COUNT,
                vector_dims={"vector": DIM})
    write_manifest(folder / "table", Manifest(kind="mm_table", stage="mfm", row_count=ITEMS_COUNT,
                                              dim=DIM, dtype="float32",
                                              extra={"encoder_fingerprint": TABLE_ENCODER.fingerprint}))
    return folder


def test_quick_mode_prints_both_costs_and_their_ratio(catalogue, capsys):
    code = main(["bench", "lookup", "--quick", f"items={catalogue / 'items.parquet'}",
                 f"mm_table={catalogue / 'table'}", "mm_dtype=fp16", "batch_size=4", "hist_len=3",
                 "repeats=1", "lookup_repeats=3"])
    out = capsys.readouterr().out
    assert code == 0, out
    lookup = float(re.search(r"^lookup\s+([\d,.]+)$", out, re.M).group(1).replace(",", ""))
    encoder = float(re.search(r"^encoder\s+([\d,.]+)$", out, re.M).group(1).replace(",", ""))
    ratio = float(re.search(r"encoder / lookup per sample: ([\d,.]+)x", out).group(1).replace(",", ""))
    assert lookup > 0 and encoder > 0
    # the ratio is printed to a whole number and both costs to 0.05 us, so a ratio from the
    # printed costs can differ by 0.5 plus what their rounding moves it
    rounding = encoder / lookup * (0.05 / lookup + 0.05 / encoder)
    assert ratio == pytest.approx(encoder / lookup, abs=0.5 + rounding)
    assert "4 samples x (1 target + 3 behaviours) = 16 items" in out and "fp16, 8-d" in out


def test_the_timed_table_holds_the_given_vectors(catalogue):
    from train.bench_lookup import LookupBenchConfig, _process_group, _table_rows, sharded_mm_table
    from torchrec import KeyedJaggedTensor

    config = LookupBenchConfig(items=str(catalogue / "items.parquet"), mm_table=str(catalogue / "table"))
    rows_of, dim = _table_rows(config, ITEMS_COUNT, TABLE_ENCODER)
    assert dim == DIM  # the table's own dim, not the encoder's
    ids = torch.tensor([5, 0, 39, 5])
    with _process_group():
        table = sharded_mm_table(ITEMS_COUNT, dim, "fp32", rows_of)
        with torch.no_grad():
            looked_up = table.module.mm(KeyedJaggedTensor(
                keys=["mm_item_seq"], values=ids, lengths=torch.ones(4, dtype=torch.long))).to_dict()["mm_item_seq"]
    assert torch.equal(looked_up, rows_of(0, ITEMS_COUNT)[ids])


def test_a_table_of_another_encoder_is_refused(catalogue):
    """It was timed against the encoder as if it held that encoder's vectors."""
    from mim_rec.data.errors import ManifestMismatch
    from train.bench_lookup import LookupBenchConfig, _table_rows

    config = LookupBenchConfig(items=str(catalogue / "items.parquet"), mm_table=str(catalogue / "table"))
    other = SimpleNamespace(dim=16, fingerprint="csft:other")
    with pytest.raises(ManifestMismatch, match="built by encoder 'stage1:table', encoder= is 'csft:other'"):
        _table_rows(config, ITEMS_COUNT, other)
    assert _table_rows(config, ITEMS_COUNT, other, quick=True)[1] == DIM  # --quick's throwaway encoder


def test_missing_encoder_is_a_clear_error(catalogue, capsys):
    assert main(["bench", "lookup", f"items={catalogue / 'items.parquet'}"]) == 2
    assert "--quick" in capsys.readouterr().err


def test_an_encoder_with_quick_is_refused(catalogue, capsys):
    """--quick timed its tiny random encoder in place of encoder=, whose path the JSON's config kept."""
    assert main(["bench", "lookup", "--quick", f"items={catalogue / 'items.parquet'}", "encoder=runs/encoders"]) == 2
    assert capsys.readouterr().err.strip() == ("mim bench lookup: error: encoder=runs/encoders with --quick: --quick "
                                               "times a tiny random encoder instead; give one of them")


@pytest.mark.parametrize("setting, message", [("batch_size=0", "batch_size=0: must be positive"),
                                              ("hist_len=-1", "hist_len=-1: must not be negative"),
                                              ("repeats=0", "repeats=0: must be positive"),
                                              ("seed=-1", "seed=-1: must not be negative")])  # numpy's traceback
def test_a_setting_that_cannot_be_timed_is_refused(catalogue, capsys, setting, message):
    """batch_size=0 and hist_len=-1 ended in a traceback; repeats=0 in a median of nothing."""
    assert main(["bench", "lookup", "--quick", f"items={catalogue / 'items.parquet'}", setting]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["bogus", "int8"])
def test_mm_dtype_is_refused_by_its_own_name_before_loading(tmp_path, capsys, dtype):
    """It was refused only after loading the items and the encoder, as 'model.mm_dtype'."""
    missing = tmp_path / "no" / "items.parquet"  # loading it first would fail differently
    assert main(["bench", "lookup", "--quick", f"items={missing}", f"mm_dtype={dtype}"]) == 2
    err = capsys.readouterr().err
    assert f"mim bench lookup: error: mm_dtype='{dtype}': choose one of ['fp16', 'fp32']" in err
    assert "model.mm_dtype" not in err and len(err.strip().splitlines()) == 1


def test_an_empty_catalogue_is_refused_before_the_encoder_loads(catalogue, tmp_path, capsys, monkeypatch):
    """The batches draw their items from the catalogue: an empty one ended in numpy's traceback
    ('high <= 0'), after the encoder had loaded."""
    import pyarrow.parquet as pq

    import train.bench_lookup

    def loaded(*args, **kwargs):
        raise AssertionError("the encoder loaded before the empty catalogue was refused")

    monkeypatch.setattr(train.bench_lookup, "_tiny_encoder_folder", loaded)
    empty = tmp_path / "items.parquet"
    write_table(pq.read_table(catalogue / "items.parquet").slice(0, 0), empty, ITEMS)
    assert main(["bench", "lookup", "--quick", f"items={empty}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mim bench lookup: error: {empty}: holds no rows; a world file must hold data"

"""Items and C-SFT pairs read their pictures through one reader: inline bytes or a file named
relative to the table's folder, and a clear error with row and field otherwise."""

from __future__ import annotations

import pyarrow as pa
import pytest

from mim_rec.data.errors import DataError
from mim_rec.pretrain.corpus import encoded_images


def test_inline_bytes_and_relative_paths_are_read_row_by_row(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "b.png").write_bytes(b"file-b")
    table = pa.table({"query_image": [b"inline-a", None], "query_image_path": [None, "pics/b.png"]})
    got = encoded_images(table, tmp_path / "pairs.parquet", "query_image", "query_image_path", "pairs",
                         "query_feature")
    assert got == [b"inline-a", b"file-b"]


def test_an_absent_file_names_its_row_and_the_path_field(tmp_path):
    table = pa.table({"image_path": ["here.png", "gone.png"]})
    (tmp_path / "here.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"gone.png not found") as caught:
        encoded_images(table, tmp_path / "items.parquet")
    assert "row 1" in str(caught.value) and "image_path" in str(caught.value)


def test_a_row_without_a_picture_and_a_table_without_the_columns_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"missing query image") as caught:
        encoded_images(pa.table({"query_image": [b"a", None]}), tmp_path / "pairs.parquet", "query_image",
                       "query_image_path", "pairs", "query_feature")
    assert "row 1" in str(caught.value)
    with pytest.raises(DataError, match=r"no 'image' or 'image_path' column.*items with only image_feature"):
        encoded_images(pa.table({"title": ["t"]}), tmp_path / "items.parquet")

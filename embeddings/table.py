"""Reading a representation-center table folder: ``part-*.parquet`` + ``manifest.json``.

Parts hold ``(item_id, vector)`` rows in the ``MM_TABLE_FP`` contract, or row-wise quantised
``(item_id, vector int8, scale, bias)`` in ``MM_TABLE_INT8`` (value = int8 * scale + bias).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Union

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mim_rec.data.errors import DataError, ManifestMismatch
from mim_rec.data.manifest import read_manifest


def table_parts(table_dir: Union[str, Path]) -> List[Path]:
    parts = sorted(Path(table_dir).glob("part-*.parquet"))
    if not parts:
        raise DataError(str(table_dir), "no part-*.parquet files: not an MM table folder")
    return parts


def read_mm_table(table_dir: Union[str, Path], num_items: int, dim: int) -> torch.Tensor:
    """All vectors as ``[num_items, dim]`` float32, row i = item i.

    Refuses a table whose manifest is not an ``mm_table`` of this ``dim``, rows of the wrong
    length or non-finite values, and ids outside ``0..num_items-1``; ids the table lacks are an
    error (a table must cover the catalogue it is trained with).
    """
    manifest = read_manifest(table_dir)
    if manifest.kind != "mm_table":
        raise ManifestMismatch(f"{table_dir}: manifest kind is {manifest.kind!r}, not 'mm_table'")
    if manifest.dim != dim:
        raise ManifestMismatch(f"{table_dir}: table dim {manifest.dim} != model.mm_dim {dim}")
    out = torch.zeros(num_items, dim)
    seen = np.zeros(num_items, dtype=bool)
    for part in table_parts(table_dir):
        table = pq.read_table(part)
        ids = table["item_id"].to_numpy()
        flat = pc.list_flatten(table["vector"]).to_numpy(zero_copy_only=False).astype(np.float32)
        if flat.size != len(ids) * dim:
            raise DataError(str(part), f"vectors are not all {dim} long", field="vector")
        vectors = flat.reshape(len(ids), dim)
        if "scale" in table.column_names:
            vectors = vectors * table["scale"].to_numpy()[:, None] + table["bias"].to_numpy()[:, None]
        bad = np.flatnonzero((ids < 0) | (ids >= num_items))
        if len(bad):
            raise DataError(str(part), f"item id {ids[bad[0]]} outside 0..{num_items - 1}", row=int(bad[0]), field="item_id")
        nonfinite = np.flatnonzero(~np.isfinite(vectors).all(1))
        if len(nonfinite):
            raise DataError(str(part), "non-finite vector", row=int(nonfinite[0]), field="vector")
        out[torch.from_numpy(ids)] = torch.from_numpy(vectors)
        seen[ids] = True
    if not seen.all():
        raise DataError(str(table_dir), f"{int((~seen).sum())} of {num_items} items have no vector "
                        f"(first: item {int(np.flatnonzero(~seen)[0])}); rebuild the table for this catalogue")
    return out

"""Compact MM tables: row-wise INT8 quantisation of a table folder, and its memory arithmetic.

A row ``v`` is stored as int8 codes ``q`` with one fp32 ``scale`` and ``bias`` per row,
``v ~ q * scale + bias`` (the ``MM_TABLE_INT8`` contract, which :func:`embeddings.table.read_mm_rows`
dequantises). The codes span the row's own ``[min, max]``, so the error of any value is at most
``scale / 2 = (max - min) / 510``. This is the layout fbgemm's INT8 embedding rows use (codes
plus a per-row scale and bias), so a quantised folder measures the CTR effect of int8 values
exactly, whatever precision the trainer then stores them in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from mim_rec.data.errors import DataError
from mim_rec.data.manifest import Manifest, fingerprint_file, manifest_path, read_manifest, write_manifest
from mim_rec.data.schemas import MM_TABLE_INT8
from mim_rec.data.staging import written_beside
from mim_rec.utils.run import sole_writer

from embeddings.table import read_part_rows, table_parts

# Bytes one stored row takes, by precision: fbgemm's INT8 row carries an fp32 scale and bias.
INT8_ROW_OVERHEAD = 8
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


def row_bytes(dtype: str, dim: int) -> int:
    """Bytes of one table row stored at ``dtype`` (fp32 | fp16 | int8)."""
    return dim * ELEMENT_BYTES[dtype] + (INT8_ROW_OVERHEAD if dtype == "int8" else 0)


def fbgemm_table_bytes(rows: int, dim: int, dtype: str) -> int:
    """Bytes fbgemm's CPU embedding kernel (the TBE TorchRec's fused kernel wraps) allocates
    for a ``rows x dim`` table at ``dtype`` -- measured by building one, INT8 included."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)

    precision = {"fp32": SparseType.FP32, "fp16": SparseType.FP16, "int8": SparseType.INT8}[dtype]
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)], weights_precision=precision,
        optimizer=EmbOptimType.EXACT_SGD, learning_rate=0.0)
    return tbe.weights_host.numel() * tbe.weights_host.element_size()


def quantise_rows(vectors: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes int8 [n, d], scale fp32 [n], bias fp32 [n])`` with ``codes * scale + bias ~ vectors``."""
    vectors = np.asarray(vectors, dtype=np.float32)
    low, high = vectors.min(axis=1), vectors.max(axis=1)
    scale = np.maximum((high - low) / 255.0, np.finfo(np.float32).tiny).astype(np.float32)
    bias = (low + 128.0 * scale).astype(np.float32)
    codes = np.clip(np.rint((vectors - bias[:, None]) / scale[:, None]), -128, 127).astype(np.int8)
    return codes, scale, bias


def int8_rows_table(ids: np.ndarray, vectors: np.ndarray, source: Union[str, Path]) -> pa.Table:
    """``vectors`` of items ``ids`` (read from ``source``, named in errors) as ``MM_TABLE_INT8``
    rows: codes, scale, bias. A row whose values span more than float32 holds gets an infinite
    scale; it is refused here, not written into a table that every reader would refuse."""
    codes, scale, bias = quantise_rows(vectors)
    broken = ~(np.isfinite(scale) & np.isfinite(bias))
    if broken.any():
        raise DataError(str(source), f"item {ids[broken][0]}: its values span more than float32 holds, so no "
                        "int8 scale can store the row", field="vector")
    return pa.table({"item_id": pa.array(ids, pa.int64()), "vector": pa.array(list(codes), pa.list_(pa.int8())),
                     "scale": scale, "bias": bias})


def dequantise_rows(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale[:, None] + bias[:, None]


def quantise_table(source: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """Write an ``MM_TABLE_INT8`` copy of the fp table folder ``source`` into ``out_dir``.

    Part for part (same item ids), so a rank loading one shard still reads one part, and a
    folded table (whose RIM part holds scattered new ids) quantises like a built one. The copy
    is written beside ``out_dir`` and renamed into place when whole; ``out_dir`` must be new or
    empty, and a second writer into it (a fold, another quantise) is refused at once while this
    one runs (:func:`~mim_rec.utils.run.sole_writer`). The manifest keeps the source's lineage
    and records the worst per-row step.
    """
    with sole_writer(out_dir):
        return _quantise_into(Path(source), Path(out_dir))


def _quantise_into(source: Path, out: Path) -> Path:
    """:func:`quantise_table`, once this process is the only writer of ``out``."""
    from mim_rec.data.io import write_table

    manifest = read_manifest(source)
    if manifest.kind != "mm_table" or manifest.dtype not in ("float32", "float16"):
        raise ValueError(f"{source}: not an fp MM table (kind {manifest.kind!r}, dtype {manifest.dtype!r})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: not a new or empty folder; quantise into a new one")
    with written_beside(out, "quantising") as staging:
        dim, worst_step = int(manifest.dim), 0.0
        id_space = int(manifest.extra.get("id_range", [0, manifest.row_count])[1])
        for part in tqdm(table_parts(source, manifest), desc="int8 quantise", unit="part"):
            ids, rows = read_part_rows(part, dim)
            order = np.argsort(ids)
            table = int8_rows_table(ids[order], rows[order], part)
            worst_step = max(worst_step, float(pc.max(table["scale"]).as_py() or 0.0))
            write_table(table, staging / part.name, MM_TABLE_INT8, item_count=id_space,
                        vector_dims={"vector": dim})
        write_manifest(staging, Manifest(
            kind="mm_table", stage="quantise", config={"scheme": "row-wise int8, value = q * scale + bias"},
            row_count=manifest.row_count, dim=dim, dtype="int8",
            inputs={"mm_table": fingerprint_file(manifest_path(source))},
            extra={**manifest.extra, "source": str(source), "max_scale": worst_step}))
    return out

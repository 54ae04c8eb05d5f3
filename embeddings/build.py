"""MFM: build the MM table -- every item's vector, written as Parquet shards + manifest.

Shard ``k`` holds items ``[k * shard_rows, (k + 1) * shard_rows)`` in ``part-0000k.parquet``.
A shard is written to a temp file and renamed (whole or absent), so a killed build resumes by
skipping the shards already there -- but only if ``.build.json`` says they came from the same
encoder fingerprint, catalogue and shard size; anything else is refused, never mixed (a state
left with no shard beside it, by a build refused at its first shard, is replaced). Under
``torchrun`` rank ``r`` of ``W`` builds shards ``r, r + W, ...``; rank 0 writes the manifest
once every shard exists, and the manifest marks the table complete.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from mim_rec.data.errors import DataError, ManifestMismatch
from mim_rec.data.io import read_items, write_table
from mim_rec.data.manifest import BUILD_STATE_NAME, Manifest, fingerprint_file, write_manifest
from mim_rec.data.schemas import MM_TABLE_FP
from mim_rec.utils.run import atomic_write_bytes, some_names, visible_entries

from embeddings.encoders import ItemEncoder
from embeddings.table import catalogue_fingerprint


def _check_state(out: Path, state: dict) -> None:
    """Resume only a build of exactly ``state``; start one only in a new or empty folder, or
    in one where a build left its state and no shard."""
    path = out / BUILD_STATE_NAME
    # Dot files are the machinery's own; anything else is a shard or someone else's file.
    present = [p.name for p in visible_entries(out)]
    if path.is_file():
        old = json.loads(path.read_text())
        if old == state:
            return
        if present:
            diff = {k: (old.get(k), v) for k, v in state.items() if old.get(k) != v}
            raise ManifestMismatch(f"{out}: shards there were built by another run {diff}; "
                                   "use a new folder (or delete it) instead of mixing tables")
        # A build refused at its first shard (its encoder refused the items: another world's
        # truth folder) wrote no shard, so there is nothing to mix: the corrected build may
        # start here, as it was refused "built by another run" until 2026-12-07.
    elif present:
        # A fold's or quantiser's output (or any table) has no build state: its parts would be
        # taken for this build's finished shards, whatever encoder made them. Any other folder
        # (a run's, a world) would have a table's parts and manifest.json mixed into it, which
        # that folder's own stage then refuses.
        raise ManifestMismatch(f"{out}: holds {some_names(present)}, "
                               "and no build of a table started there; build into a new or empty folder")
    atomic_write_bytes(path, json.dumps(state, indent=2).encode())


def _whole_shard(part: Path, rows: int) -> bool:
    """Whether a resumed build may keep ``part``: a readable Parquet file of ``rows`` rows. Parts
    are written atomically, so anything else (truncated, damaged by hand) is embedded again."""
    if not part.is_file():
        return False
    try:
        return pq.read_metadata(part).num_rows == rows
    except (OSError, pa.ArrowException):
        return False


def build_table(encoder: ItemEncoder, items_path: Union[str, Path], out_dir: Union[str, Path],
                shard_rows: int = 4096, rank: int = 0, world_size: int = 1) -> Path:
    """Embed every item of ``items_path`` with ``encoder`` into the table folder ``out_dir``."""
    import torch.distributed as dist

    items_path, out = Path(items_path), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ManifestMismatch(f"out={out}: a file, not a table folder")
    items = read_items(items_path)  # before making out/: a missing world leaves no empty folder behind
    if not items.num_rows:  # a manifest of no parts would pass for a table that no reader can open
        raise DataError(str(items_path), "no items, so no MM table to build")
    out.mkdir(parents=True, exist_ok=True)
    count = items.num_rows
    state = {"encoder_fingerprint": encoder.fingerprint, "items": fingerprint_file(items_path),
             "item_count": count, "shard_rows": shard_rows, "dim": encoder.dim}
    if rank == 0:
        _check_state(out, state)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    shards = range(0, (count + shard_rows - 1) // shard_rows)
    mine = [k for k in shards if k % world_size == rank
            and not _whole_shard(out / f"part-{k:05d}.parquet", min(shard_rows, count - k * shard_rows))]
    started, done = time.time(), 0
    bar = tqdm(mine, desc=f"MFM build (rank {rank})", unit="shard", disable=not mine)
    for k in bar:
        rows = items.slice(k * shard_rows, shard_rows)
        vectors = encoder.embed_items(rows, items_path).float().cpu().numpy()
        if vectors.shape != (rows.num_rows, encoder.dim) or not np.isfinite(vectors).all():
            raise ValueError(f"encoder returned {vectors.shape} (finite: {np.isfinite(vectors).all()}) "
                             f"for shard {k}; expected ({rows.num_rows}, {encoder.dim})")
        table = pa.table({"item_id": rows["item_id"],
                          "vector": pa.array(list(vectors), pa.list_(pa.float32()))})
        write_table(table, out / f"part-{k:05d}.parquet", MM_TABLE_FP, item_count=count,
                    vector_dims={"vector": encoder.dim})
        done += rows.num_rows
        bar.set_postfix(items_per_s=f"{done / max(time.time() - started, 1e-9):.0f}")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank == 0:
        write_manifest(out, Manifest(
            kind="mm_table", stage="mfm", config={"shard_rows": shard_rows}, row_count=count,
            dim=encoder.dim, dtype="float32", inputs={"items": state["items"]},
            extra={"encoder_fingerprint": encoder.fingerprint, "id_range": [0, count],
                   "shards": [f"part-{k:05d}.parquet" for k in shards],
                   "catalogue": {"rows": count, "fingerprint": catalogue_fingerprint(items_path, count)}}))
    return out

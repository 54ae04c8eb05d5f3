"""The CTR loader's settings (:class:`~mim_rec.data.loader.CtrEventsLoader`), apart from the
loader so that config classes holding them (``mim train``'s, the benches') import without
torch, pyarrow or TorchRec: ``mim --help`` registers every command."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class LoaderConfig:
    batch_size: int = 1024
    max_hist_len: int = 50          # behaviours kept per row (most recent); SIM/TWIN use more
    query_buckets: int = 20_000     # query words are hashed into this many ids
    shuffle: bool = True
    shuffle_row_groups: int = 4     # rows are shuffled within this many row groups
    seed: int = 0
    # The sequence KJT's shape: "ebc", a single-id bag per slot (stride B*(1+L)); "ec", one
    # sequence per sample (stride B). mim train sets it from model.sequence_layout.
    sequence_layout: Literal["ebc", "ec"] = "ebc"

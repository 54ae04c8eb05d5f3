"""Item encoders the table builder can run: anything with ``fingerprint``, ``dim`` and
``embed_items(items: pyarrow.Table) -> Tensor [n, dim]``.

:class:`Stage1ItemEncoder` embeds an item as the mean of its aligned image and title
embeddings from the stage-1 encoders (``mim pretrain``) -- MIM without C-SFT, the paper's
ablation row; the C-SFT encoder provides the same interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Union

import pyarrow as pa
import torch
import torch.nn.functional as F

from mim_rec.data.manifest import fingerprint_tree


class ItemEncoder(Protocol):
    fingerprint: str
    dim: int

    def embed_items(self, items: pa.Table, source: Path) -> torch.Tensor:
        """Vectors of ``items`` (rows of the items contract read from ``source``)."""


class Stage1ItemEncoder:
    """``unit(mean(image embedding, title embedding))`` with the stage-1 encoder pair."""

    def __init__(self, encoders_dir: Union[str, Path], batch_size: int = 256) -> None:
        from mim_rec.encoders import load_encoders

        self.source = Path(encoders_dir)
        self.pair = load_encoders(self.source).eval()
        self.dim = self.pair.shared_dim
        self.fingerprint = f"stage1:{fingerprint_tree(self.source)}"
        self.batch_size = batch_size

    @torch.no_grad()
    def embed_items(self, items: pa.Table, source: Path) -> torch.Tensor:
        from mim_rec.pretrain.corpus import corpus_from_table
        from mim_rec.pretrain.evaluate import embed

        corpus = corpus_from_table(items, Path(source), self.pair.vision)
        embedded = embed(self.pair, corpus, self.batch_size)
        return F.normalize(embedded.image_embeddings + embedded.title_embeddings, dim=-1)

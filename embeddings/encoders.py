"""Item encoders the table builder can run: anything with ``fingerprint``, ``dim`` and
``embed_items(items: pyarrow.Table) -> Tensor [n, dim]``.

:class:`Stage1ItemEncoder` embeds an item as the mean of its aligned image and title
embeddings from the stage-1 encoders (``mim pretrain``) -- MIM without C-SFT, the paper's
ablation row. :class:`CsftItemEncoder` is the C-SFT item tower (``mim csft``), the paper's
``h^MM``. :func:`load_item_encoder` picks one by the artifact's manifest kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Union

import pyarrow as pa
import torch
import torch.nn.functional as F

from mim_rec.data.errors import ManifestMismatch
from mim_rec.data.manifest import fingerprint_tree, read_manifest


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


class CsftItemEncoder:
    """The C-SFT item tower (TFN-fused ``h^MM``) of an MM encoder folder written by ``mim csft``."""

    def __init__(self, mm_encoder_dir: Union[str, Path], batch_size: int = 256) -> None:
        from mim_rec.csft import load_mm_encoder

        self.source = Path(mm_encoder_dir)
        self.tower, self.fingerprint = load_mm_encoder(self.source)  # checks the fingerprint
        self.tower.eval()
        self.dim = self.tower.dim
        self.batch_size = batch_size

    def embed_items(self, items: pa.Table, source: Path) -> torch.Tensor:
        return self.tower.embed_items(items, source, self.batch_size)


def load_item_encoder(artifact_dir: Union[str, Path], batch_size: int = 256) -> ItemEncoder:
    """The item encoder an artifact folder holds, chosen by its manifest kind:
    ``encoders`` (``mim pretrain``: MIM w/o C-SFT) or ``mm_encoder`` (``mim csft``)."""
    kind = read_manifest(artifact_dir).kind
    if kind == "encoders":
        return Stage1ItemEncoder(artifact_dir, batch_size)
    if kind == "mm_encoder":
        return CsftItemEncoder(artifact_dir, batch_size)
    raise ManifestMismatch(f"{artifact_dir}: manifest kind {kind!r} is not an item encoder "
                           "(expected 'encoders' from mim pretrain or 'mm_encoder' from mim csft)")

"""Item encoders the table builder can run: anything with ``fingerprint``, ``dim`` and
``embed_items(items: pyarrow.Table) -> Tensor [n, dim]``.

:class:`Stage1ItemEncoder` embeds an item as the mean of its aligned image and title
embeddings from the stage-1 encoders (``mim pretrain``) -- MIM without C-SFT, the paper's
ablation row. :class:`CsftItemEncoder` is the C-SFT item tower (``mim csft``), the paper's
``h^MM``. :class:`LatentStyleEncoder` is no encoder at all: it reads a synthetic world's true
item styles (``truth/items.npz``), the MM table a perfect content encoder would write, so an
experiment can tell what CiUBM makes of content from what the encoders capture of it.
:func:`load_item_encoder` picks one by the artifact's manifest kind (or a truth folder).

Both towers are heads over frozen backbones by default, and ``mim csft`` caches those
backbones' features of the whole catalogue (its ``OUT/features``). Given that folder as
``feature_cache``, an encoder reads the features from it instead of running the backbones
again: the cache key is the items file's fingerprint plus a content hash of the backbone, so
an entry is used only when it is exactly what this encoder's backbone computes (any other
backbone, e.g. one fine-tuned in C-SFT, computes and stores its own entry). On the default
world this turns a 20-minute table build into seconds of head and fusion passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol, Tuple, Union

import pyarrow as pa
import torch
import torch.nn.functional as F

from mim_rec.data.errors import DataError, ManifestMismatch
from mim_rec.data.manifest import fingerprint_tree, read_manifest

if TYPE_CHECKING:
    from mim_rec.encoders.config import VisionConfig


class ItemEncoder(Protocol):
    fingerprint: str
    dim: int

    def embed_items(self, items: pa.Table, source: Path) -> torch.Tensor:
        """Vectors of ``items`` (rows of the items contract read from ``source``)."""


def _item_rows(items: pa.Table, count: int, source: Path, what: str) -> torch.Tensor:
    """``items``' ids as row indices into a ``count``-row per-item tensor; ids outside it are
    an error naming ``source`` and ``what`` holds the rows (the ids are dense ``0..N-1``)."""
    from mim_rec.data.errors import DataError

    ids = torch.from_numpy(items.column("item_id").to_numpy().astype("int64"))
    if len(ids) and (ids.min() < 0 or ids.max() >= count):
        raise DataError(str(source), f"item ids {int(ids.min())}..{int(ids.max())} fall outside the "
                                     f"{count} rows of {what}", field="item_id")
    return ids


class CatalogueFeatures:
    """Backbone features of every item of an items file, read from (or added to) a C-SFT
    feature cache, kept in memory for the shards of one build."""

    def __init__(self, folder: Union[str, Path], batch_size: int) -> None:
        from mim_rec.csft.data import FeatureCache

        self.cache = FeatureCache(folder)  # checked here, before a build writes anything
        self.batch_size = batch_size
        self._loaded: Optional[Tuple[Path, torch.Tensor, torch.Tensor]] = None

    def of(self, items: pa.Table, source: Path, vision: torch.nn.Module,
           text: torch.nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(image features, title features)`` of the rows of ``items``, which must come from
        ``source``, a world's ``items.parquet`` (the cache is keyed by that whole file)."""
        from mim_rec.csft.data import WorldInputs
        from mim_rec.data.errors import DataError

        source = Path(source).resolve()
        if self._loaded is None or self._loaded[0] != source:
            if source.name != "items.parquet":
                raise DataError(str(source), "feature_cache reads whole-catalogue features keyed by a "
                                             "world's items.parquet; build from that file or drop feature_cache")
            world = WorldInputs(source.parent, self.cache, self.batch_size)
            self._loaded = (source, world.item_image_features(vision), world.item_title_features(text))
        _, images, titles = self._loaded
        ids = _item_rows(items, len(images), source, "the catalogue the cached features cover")
        return images[ids], titles[ids]


def _batched_heads(fn, images: torch.Tensor, titles: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``fn(image features, title features)`` over batches, concatenated."""
    parts = [fn(images[start:start + batch_size], titles[start:start + batch_size])
             for start in range(0, len(images), batch_size)]
    return torch.cat(parts) if parts else images.new_empty(0, 0)


class Stage1ItemEncoder:
    """``unit(mean(image embedding, title embedding))`` with the stage-1 encoder pair."""

    def __init__(self, encoders_dir: Union[str, Path], batch_size: int = 256,
                 feature_cache: Optional[Union[str, Path]] = None) -> None:
        from mim_rec.encoders import load_encoders

        self.source = Path(encoders_dir)
        self.pair = load_encoders(self.source).eval()
        self.dim = self.pair.shared_dim
        self.fingerprint = f"stage1:{fingerprint_tree(self.source)}"
        self.batch_size = batch_size
        self.features = CatalogueFeatures(feature_cache, batch_size) if feature_cache else None

    @torch.no_grad()
    def embed_items(self, items: pa.Table, source: Path) -> torch.Tensor:
        from mim_rec.pretrain.corpus import corpus_from_table
        from mim_rec.pretrain.evaluate import embed

        if self.features is not None:
            images, titles = self.features.of(items, source, self.pair.vision, self.pair.text)
            return _batched_heads(lambda i, t: F.normalize(self.pair.vision_head(i) + self.pair.text_head(t), dim=-1),
                                  images, titles, self.batch_size)
        corpus = corpus_from_table(items, Path(source), self.pair.vision)
        embedded = embed(self.pair, corpus, self.batch_size)
        return F.normalize(embedded.image_embeddings + embedded.title_embeddings, dim=-1)


class CsftItemEncoder:
    """The C-SFT item tower (TFN-fused ``h^MM``) of an MM encoder folder written by ``mim csft``."""

    def __init__(self, mm_encoder_dir: Union[str, Path], batch_size: int = 256,
                 feature_cache: Optional[Union[str, Path]] = None) -> None:
        from mim_rec.csft import load_mm_encoder

        self.source = Path(mm_encoder_dir)
        self.tower, self.fingerprint = load_mm_encoder(self.source)  # checks the fingerprint
        self.tower.eval()
        self.dim = self.tower.dim
        self.batch_size = batch_size
        self.features = CatalogueFeatures(feature_cache, batch_size) if feature_cache else None

    @torch.no_grad()
    def embed_items(self, items: pa.Table, source: Path) -> torch.Tensor:
        if self.features is None:
            return self.tower.embed_items(items, source, self.batch_size)
        images, titles = self.features.of(items, source, self.tower.pair.vision, self.tower.pair.text)
        return _batched_heads(lambda i, t: self.tower.from_features(i, t).mm, images, titles, self.batch_size)


class LatentStyleEncoder:
    """A synthetic world's ground-truth item styles as the MM table (the content ceiling).

    The click model of ``mim data synth`` scores content as ``cos(wanted style, item style)``,
    so these vectors hold all the content signal there is and nothing else (no ID effect):
    CiUBM's gain with this table bounds what any encoder's table can give on that world."""

    def __init__(self, truth_dir: Union[str, Path]) -> None:
        import numpy as np

        from mim_rec.data.errors import DataError
        from mim_rec.data.manifest import fingerprint_file

        self.path = Path(truth_dir) / "items.npz"
        with np.load(self.path) as truth:
            missing = [name for name in ("style", "category") if name not in truth.files]
            if missing:
                raise DataError(str(self.path), f"no {missing[0]!r} array: not a synthetic world's truth folder",
                                field=missing[0])
            self.styles = torch.from_numpy(truth["style"]).float()
            self.categories = truth["category"].astype(np.int64)
        self.dim = self.styles.shape[1]
        self.fingerprint = f"truth:{fingerprint_file(self.path)}"

    def embed_items(self, items: pa.Table, source: Path) -> torch.Tensor:
        import numpy as np

        from mim_rec.data.errors import DataError

        rows = _item_rows(items, len(self.styles), source, "the true styles (another world's truth folder?)")
        # Another world of as many items fits every size check; its items' categories do not
        # match these (a world of one category is the only one this cannot tell apart).
        given = items.column("category_id").to_numpy().astype(np.int64)
        differ = np.flatnonzero(given != self.categories[rows.numpy()])
        if len(differ):
            first = differ[0]
            raise DataError(str(source), f"item {int(rows[first])} is in category {given[first]} here and "
                                         f"{self.categories[rows[first]]} in {self.path}: the truth folder of "
                                         f"another world ({len(differ)} of {len(given)} items differ)",
                            field="category_id")
        return self.styles[rows]


def is_truth_folder(folder: Union[str, Path]) -> bool:
    """A synthetic world's ``truth/`` folder (``mim data synth`` writes ``items.npz`` there)."""
    return (Path(folder) / "items.npz").is_file() and not (Path(folder) / "manifest.json").is_file()


def item_encoder_vision(artifact_dir: Union[str, Path]) -> Optional["VisionConfig"]:
    """The vision tower settings of the item encoder :func:`load_item_encoder` would load from
    ``artifact_dir``, read from its manifests alone, so that the items can be checked for that
    tower before it loads. None for a truth folder (it reads no image) and for a folder
    :func:`load_item_encoder` refuses (its message is the one to give)."""
    from mim_rec.csft.model import ENCODERS_DIR
    from mim_rec.encoders.pair import saved_config

    if is_truth_folder(artifact_dir):
        return None
    kind = read_manifest(artifact_dir).kind
    if kind not in ("encoders", "mm_encoder"):
        return None
    return saved_config(Path(artifact_dir) / ENCODERS_DIR if kind == "mm_encoder" else artifact_dir).vision


def load_item_encoder(artifact_dir: Union[str, Path], batch_size: int = 256,
                      feature_cache: Optional[Union[str, Path]] = None) -> ItemEncoder:
    """The item encoder an artifact folder holds, chosen by its manifest kind:
    ``encoders`` (``mim pretrain``: MIM w/o C-SFT) or ``mm_encoder`` (``mim csft``).
    ``feature_cache``: a C-SFT backbone-feature folder to read catalogue features from.
    A synthetic world's ``truth/`` folder gives its :class:`LatentStyleEncoder`."""
    if feature_cache and Path(feature_cache).exists() and not Path(feature_cache).is_dir():
        raise DataError(str(feature_cache), "feature_cache: a file, not a folder of cached features")
    if is_truth_folder(artifact_dir):
        return LatentStyleEncoder(artifact_dir)
    kind = read_manifest(artifact_dir).kind
    if kind == "encoders":
        return Stage1ItemEncoder(artifact_dir, batch_size, feature_cache)
    if kind == "mm_encoder":
        return CsftItemEncoder(artifact_dir, batch_size, feature_cache)
    raise ManifestMismatch(f"{artifact_dir}: manifest kind {kind!r} is not an item encoder "
                           "(expected 'encoders' from mim pretrain or 'mm_encoder' from mim csft)")

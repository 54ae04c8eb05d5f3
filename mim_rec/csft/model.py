"""The two C-SFT towers and the saved MM encoder artifact.

* :class:`MMItemEncoder` -- the item tower: the stage-1 image and title encoders with their
  projection heads give ``h_img`` and ``h_txt`` (unit vectors in the shared space), fused
  into ``h^MM`` (:mod:`mim_rec.csft.fusion`). This is what the representation center runs
  over the catalogue (``embed_items``).
* :class:`QueryEncoder` -- the query tower: the query image through a vision backbone (the
  item tower's own, or a copy) and its own head, initialised from the stage-1 image head.

Both towers start from stage 1, so with the default residual fusion an untrained C-SFT model
reproduces the stage-1 embeddings exactly; what C-SFT changes is what it learned.

A saved MM encoder folder holds ``encoders/`` (the item tower's encoder pair, as
:func:`mim_rec.encoders.save_encoders` writes it), ``csft.pt`` (fusion, query head, and the
query backbone when not shared) and ``manifest.json`` (kind ``mm_encoder``, the model
config, ``dim``, ``extra.fingerprint``: a content hash of the item tower's weights and
config, which the MM table records and checks).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from mim_rec.config import from_dict
from mim_rec.csft.config import FusionConfig, ModelConfig
from mim_rec.csft.fusion import FusionMLP
from mim_rec.data.errors import ManifestMismatch
from mim_rec.data.manifest import Manifest, read_manifest, require, write_manifest
from mim_rec.encoders.freeze import PartlyFrozen
from mim_rec.encoders.heads import ProjectionHead
from mim_rec.encoders.pair import EncoderPair, load_encoders, read_artifact_weights, save_encoders
from mim_rec.encoders.vision import PrecomputedVisionEncoder, VisionEncoder
from mim_rec.utils.run import atomic_write_bytes

ENCODERS_DIR = "encoders"
WEIGHTS_NAME = "csft.pt"
MANIFEST_KIND = "mm_encoder"


@dataclass
class ItemEmbeddings:
    """Unit vectors ``[B, d]`` of a batch of items at the three levels the loss uses."""

    mm: torch.Tensor
    img: torch.Tensor
    txt: torch.Tensor


def vision_input(vision: VisionEncoder, images: torch.Tensor) -> torch.Tensor:
    """The vision tower's input from stored images: uint8 pixels are normalised, precomputed
    feature vectors pass unchanged."""
    if isinstance(vision, PrecomputedVisionEncoder):
        return images
    return vision.image_processor.normalize(images)


def freeze_backbone(encoder: nn.Module) -> None:
    """Freeze a whole tower (parameters and batch-norm statistics)."""
    if isinstance(encoder, PartlyFrozen):
        encoder.freeze(list(encoder.children()))


def content_fingerprint(module: nn.Module, config: Any) -> str:
    """sha256 (16 hex) over every tensor of ``module`` (names, dtypes, shapes, bytes) and
    ``config``: equal exactly when the function the module computes is the same."""
    digest = hashlib.sha256(json.dumps(_plain(config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _plain(config: Any) -> Any:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config


class MMItemEncoder(nn.Module):
    """Item tower: ``(images, titles) -> ItemEmbeddings``; ``embed_items`` for whole tables.

    Also an ``embeddings.encoders.ItemEncoder`` (``fingerprint``, ``dim``, ``embed_items``),
    so the representation center can build the MM table from it.
    """

    def __init__(self, pair: EncoderPair, fusion: FusionConfig) -> None:
        super().__init__()
        self.pair = pair
        self.fusion_config = fusion
        dim = pair.shared_dim
        self.fusion = FusionMLP(fusion.kind, dim, dim, fusion.hidden, dim, fusion.rank,
                                zero_init_output=fusion.residual)

    @property
    def dim(self) -> int:
        return self.pair.shared_dim

    @property
    def fingerprint(self) -> str:
        """``csft:<hash>`` of the weights and config (recomputed: weights change in training)."""
        resolved = self.pair.resolved_config()
        # What the weights do not say: how inputs are prepared, and the fusion's wiring.
        # (Not where the text model was loaded from: a reloaded pair names its own folder.)
        config = {"vision": dataclasses.replace(resolved.vision, weights=None),
                  "text_max_length": resolved.text.max_length, "fusion": self.fusion_config}
        return f"csft:{content_fingerprint(self, config)}"

    def features(self, images: torch.Tensor, titles: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Backbone features: ``images`` as :func:`vision_input` returns them, raw titles."""
        return self.pair.vision(images), self.pair.text(titles)

    def from_features(self, image_features: torch.Tensor, title_features: torch.Tensor) -> ItemEmbeddings:
        img = self.pair.vision_head(image_features)
        txt = self.pair.text_head(title_features)
        fused = self.fusion(img, txt).float()
        mm = F.normalize(img + txt + fused if self.fusion_config.residual else fused, dim=-1)
        return ItemEmbeddings(mm=mm, img=img, txt=txt)

    def forward(self, images: torch.Tensor, titles: Sequence[str]) -> ItemEmbeddings:
        return self.from_features(*self.features(images, titles))

    @torch.no_grad()
    def embed_items(self, items: pa.Table, source: Union[str, Path] = "<items>",
                    batch_size: int = 256) -> torch.Tensor:
        """``h^MM`` of every row of an items table (``source`` names it in errors), in eval
        mode, batched; returns ``[N, dim]`` float32 on the CPU."""
        from mim_rec.pretrain.corpus import corpus_from_table

        corpus = corpus_from_table(items, Path(source), self.pair.vision)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(corpus), batch_size):
            images = vision_input(self.pair.vision, corpus.images[start:start + batch_size])
            out.append(self(images.to(device), corpus.titles[start:start + batch_size]).mm.cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.dim)


class QueryEncoder(nn.Module):
    """Query tower: a query image -> unit ``[B, d]`` in the item tower's space."""

    def __init__(self, vision: VisionEncoder, head: ProjectionHead) -> None:
        super().__init__()
        self.vision = vision
        self.head = head

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision(images)

    def from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.from_features(self.features(images))


class CsftModel(nn.Module):
    """Both towers. Built from a stage-1 encoder pair; the query head starts as a copy of
    the stage-1 image head (a query is an image), so query and item start in one space."""

    def __init__(self, pair: EncoderPair, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.items = MMItemEncoder(pair, config.fusion)
        query_vision = pair.vision if config.query.share_vision else copy.deepcopy(pair.vision)
        self.queries = QueryEncoder(query_vision, copy.deepcopy(pair.vision_head))
        if not config.train_backbones:
            for tower in {id(t): t for t in (pair.vision, pair.text, query_vision)}.values():
                freeze_backbone(tower)

    def backbone_modules(self) -> Dict[str, nn.Module]:
        """The (possibly shared) backbones, by name, for optimizer groups and feature caches."""
        modules = {"vision": self.items.pair.vision, "text": self.items.pair.text}
        if not self.config.query.share_vision:
            modules["query_vision"] = self.queries.vision
        return modules


# ----------------------------------------------------------------------------- artifact

def save_mm_encoder(directory: Union[str, Path], model: CsftModel,
                    inputs: Optional[Dict[str, str]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> str:
    """Write the MM encoder folder (manifest last: its presence marks it complete); returns
    the item tower's fingerprint."""
    directory = Path(directory)
    save_encoders(directory / ENCODERS_DIR, model.items.pair, stage="csft", inputs=inputs)
    state = {"fusion": model.items.fusion.state_dict(), "query_head": model.queries.head.state_dict()}
    if not model.config.query.share_vision:
        state["query_vision"] = model.queries.vision.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(directory / WEIGHTS_NAME, buffer.getvalue())
    fingerprint = model.items.fingerprint
    write_manifest(directory, Manifest(
        kind=MANIFEST_KIND, stage="csft", config=dataclasses.asdict(model.config),
        inputs=inputs or {}, dim=model.items.dim, dtype="float32",
        extra={"fingerprint": fingerprint, **(extra or {})}))
    return fingerprint


def load_csft_model(directory: Union[str, Path], map_location: str = "cpu") -> CsftModel:
    """Both towers from an MM encoder folder, weights loaded strictly, in eval mode; the
    item tower's weights must hash to the manifest's fingerprint."""
    directory = Path(directory)
    manifest = require(directory, kind=MANIFEST_KIND)
    config = from_dict(ModelConfig, manifest.config)
    pair = load_encoders(directory / ENCODERS_DIR, map_location=map_location)
    model = CsftModel(pair, config)
    state = read_artifact_weights(directory / WEIGHTS_NAME, map_location)
    expected = {"fusion", "query_head"} | (set() if config.query.share_vision else {"query_vision"})
    if set(state) != expected:
        raise ManifestMismatch(f"{directory / WEIGHTS_NAME}: holds {sorted(state)}, the manifest's "
                               f"config needs {sorted(expected)}")
    model.items.fusion.load_state_dict(state["fusion"], strict=True)
    model.queries.head.load_state_dict(state["query_head"], strict=True)
    if "query_vision" in state:
        model.queries.vision.load_state_dict(state["query_vision"], strict=True)
    found = model.items.fingerprint
    if found != manifest.extra.get("fingerprint"):
        raise ManifestMismatch(f"{directory}: weights hash to {found}, the manifest says "
                               f"{manifest.extra.get('fingerprint')}; the folder was modified "
                               "after it was written")
    return model.eval()


def load_mm_encoder(directory: Union[str, Path], map_location: str = "cpu") -> Tuple[MMItemEncoder, str]:
    """The item tower of an MM encoder folder and its fingerprint (the representation
    center's seam: ``encoder.embed_items(items, source)`` -> ``[N, encoder.dim]``)."""
    model = load_csft_model(directory, map_location)  # checks the fingerprint
    return model.items, read_manifest(directory).extra["fingerprint"]


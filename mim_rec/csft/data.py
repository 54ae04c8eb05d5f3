"""What C-SFT reads from a world folder: the catalogue, the <query image, item> pairs, and the
backbone features of both, cached.

With frozen backbones (the CPU default) a backbone is a fixed function, so its features of an
item or a query image are computed once and cached on disk under a key made of the input
file's fingerprint and a content hash of the backbone's weights and preprocessing: a cached
tensor is exactly what the backbone would compute, and any other backbone (a fine-tuned
one, another stage-1 run) gets its own entry. Training then runs only the heads and the
fusion. With ``model.train_backbones=true`` steps read decoded pixels and titles instead.
"""

from __future__ import annotations

import hashlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from tqdm.auto import tqdm

from mim_rec.csft.model import CsftModel, content_fingerprint, vision_input
from mim_rec.csft.objective import CsftBatch
from mim_rec.data.errors import DataError
from mim_rec.data.io import check_world_manifest, read_items, read_pairs
from mim_rec.data.manifest import MANIFEST_NAME, fingerprint_file
from mim_rec.data.schemas import PAIRS, SIGNALS
from mim_rec.data.split import time_cut
from mim_rec.encoders.text import HFTextEncoder
from mim_rec.encoders.vision import PrecomputedVisionEncoder, VisionEncoder
from mim_rec.pretrain.corpus import (ContentKeys, ItemCorpus, content_keys, corpus_from_table,
                                     encoded_images, image_columns, require_stored_column,
                                     stored_images)
from mim_rec.utils.run import DAMAGED_FILE_ERRORS, atomic_write_bytes

PathLike = Union[str, Path]

# The stored signals a requested one selects. A pairs file labels each pair with its strongest
# signal, and a purchase was clicked first, so the click pairs are every pair (paper Table 4
# trains on clicks or on their purchased subset). The synthetic world marks a picked pair
# "purchase" or else "click"; the Amazon importer writes "purchase" only; Taobao has no pairs.
SELECTED_BY: Dict[str, Tuple[str, ...]] = {"click": ("click", "purchase"), "purchase": ("purchase",)}


@dataclass
class Pairs:
    """One pairs file, possibly filtered by signal; ``rows`` index the file's rows."""

    path: Path
    rows: np.ndarray          # [n] row numbers in the file
    item_ids: np.ndarray      # [n] int64
    categories: np.ndarray    # [n] int32
    signals: List[str]
    ts: np.ndarray            # [n] int64 Unix seconds

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, keep: np.ndarray) -> "Pairs":
        """The pairs where the boolean mask ``keep`` is true (rows still index the file)."""
        return Pairs(self.path, self.rows[keep], self.item_ids[keep], self.categories[keep],
                     [s for s, k in zip(self.signals, keep) if k], self.ts[keep])


def read_pair_file(path: PathLike, item_categories: np.ndarray, signals: Optional[Sequence[str]] = None) -> Pairs:
    """Validated pairs, keeping rows whose ``signal`` is in ``signals`` (all when None).
    ``item_categories`` (row i: item i's category) bounds the item ids and must give each
    pair's ``category_id``, as ``mim data validate`` checks a world."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "pairs file not found")
    table = read_pairs(path, len(item_categories), columns=["item_id", "signal", "category_id", "ts"],
                       item_category=item_categories)
    signal = np.asarray(table.column("signal").to_pylist(), dtype=object)
    unknown = sorted(set(signal) - set(SIGNALS))
    if unknown:
        row = int(np.flatnonzero(~np.isin(signal, SIGNALS))[0])
        raise DataError(str(path), f"unknown signal {unknown[0]!r}; expected one of {SIGNALS}",
                        row=row, field="signal")
    # Arrow hands out read-only views; the pairs own writable copies (torch wraps them in place).
    every = Pairs(path, np.arange(len(signal)), table.column("item_id").to_numpy().astype(np.int64),
                  table.column("category_id").to_numpy().astype(np.int32), [str(s) for s in signal],
                  table.column("ts").to_numpy().astype(np.int64))
    return every if signals is None else with_signals(every, signals)


def with_signals(pairs: Pairs, signals: Sequence[str]) -> Pairs:
    """The pairs carrying any of ``signals`` (``click`` selects the purchases too:
    :data:`SELECTED_BY`); none is an error naming the file."""
    stored = {kept for signal in signals for kept in SELECTED_BY.get(signal, (signal,))}
    keep = np.isin(np.asarray(pairs.signals, dtype=object), sorted(stored))
    if not keep.any():
        raise DataError(str(pairs.path), f"no pairs with signal in {list(signals)}", field="signal")
    return pairs.where(keep)


@dataclass
class HeldOut:
    """What an evaluation scores: pairs of one pairs file (their queries are that file's
    rows ``pairs.rows``) and the impressions of ``events_path`` at or after ``since``."""

    name: str                 # "test" or "validation"
    split: str                # the pairs file the queries come from: "test" or "train"
    pairs: Pairs
    events_path: Path
    since: Optional[int]      # None: every impression of the file


def read_query_inputs(path: PathLike, item_count: int, vision: VisionEncoder) -> torch.Tensor:
    """Every row's query, decoded: uint8 pixels ``[n, 3, S, S]``, or ``query_feature``
    vectors for a precomputed vision tower. Errors name file, row and field (the query
    column(s), not the items' ``image``/``image_feature`` the towers' readers default to)."""
    path = Path(path)
    table = read_pairs(path, item_count)
    rows = list(range(table.num_rows))
    precomputed = isinstance(vision, PrecomputedVisionEncoder)
    require_stored_column(table.column_names, path, precomputed, PAIRS)
    if precomputed:
        return vision.preprocess(table.column("query_feature").to_pylist(), str(path), rows, "query_feature")
    images = encoded_images(table, path, "query_image", "query_image_path", "pairs", "query_feature")
    return vision.image_processor.to_uint8(images, str(path), rows, "|".join(image_columns(table.column_names, PAIRS)))


# ----------------------------------------------------------------------------- features

@torch.no_grad()
def vision_features(vision: VisionEncoder, images: torch.Tensor, batch_size: int,
                    desc: str = "image features") -> torch.Tensor:
    """Backbone features of stored images (uint8 pixels or feature vectors), eval mode."""
    device = _device(vision)
    return _batched(lambda s: vision(vision_input(vision, images[s]).to(device)),
                    len(images), batch_size, vision, desc)


@torch.no_grad()
def text_features(text: HFTextEncoder, titles: Sequence[str], batch_size: int,
                  desc: str = "title features") -> torch.Tensor:
    return _batched(lambda s: text(titles[s]), len(titles), batch_size, text, desc)


def _batched(fn: Callable[[slice], torch.Tensor], count: int, batch_size: int, module: nn.Module,
             desc: str) -> torch.Tensor:
    was_training = module.training
    module.eval()
    parts = [fn(slice(start, start + batch_size)).float().cpu()
             for start in tqdm(range(0, count, batch_size), desc=desc, unit="batch",
                               disable=count <= batch_size)]
    module.train(was_training)
    return torch.cat(parts)


def _device(module: nn.Module) -> torch.device:
    """Where a module's weights live (the CPU for a weightless pass-through)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


class FeatureCache:
    """``FOLDER/<name>-<key>.pt`` tensors; the key hashes everything the tensor depends on."""

    def __init__(self, folder: PathLike) -> None:
        self.folder = Path(folder)
        # Another output of mim_rec given as the cache (a world, an encoders folder) would get
        # the cache's files among its own: an encoders folder's fingerprint covers every file
        # in it, so the encoder would no longer match the tables it built.
        if (self.folder / MANIFEST_NAME).exists():
            raise DataError(str(self.folder), f"holds a {MANIFEST_NAME}, so it is an output of mim_rec (a world, "
                                              "encoders, a table), not a feature cache, and cached features would "
                                              "be written among its files; give mim csft's OUT/features or a new folder")

    def get(self, name: str, parts: Sequence[str], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
        path = self.folder / f"{name}-{key}.pt"
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except DAMAGED_FILE_ERRORS as err:  # a cache: computed again
                print(f"warning: {path} does not load ({err}); computing it again", file=sys.stderr)
        tensor = compute()
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        return tensor


class WorldInputs:
    """A world folder's items and pairs, as backbone features (cached) or decoded inputs.

    ``vision``/``text`` are the backbones whose features are asked for; their weights and
    preprocessing are part of every cache key.
    """

    def __init__(self, world: PathLike, cache: FeatureCache, batch_size: int = 256) -> None:
        self.world = Path(world)
        self.items_path = self.world / "items.parquet"
        if not self.items_path.is_file():
            raise DataError(str(self.items_path), "items file not found (give a world folder)")
        self.items: pa.Table = read_items(self.items_path)
        check_world_manifest(self.world, self.items.num_rows)  # before any encoder loads
        if self.items.num_rows < 2:
            raise DataError(str(self.items_path), "C-SFT needs a catalogue of at least two items")
        self.item_categories = self.items.column("category_id").to_numpy()
        self.cache = cache
        self.batch_size = batch_size
        self._corpus: Optional[ItemCorpus] = None
        self._content: Optional[ContentKeys] = None

    @property
    def item_count(self) -> int:
        return self.items.num_rows

    def pairs_path(self, split: str) -> Path:
        return self.world / f"pairs_{split}.parquet"

    def pairs(self, split: str, signals: Optional[Sequence[str]] = None) -> Pairs:
        return read_pair_file(self.pairs_path(split), self.item_categories, signals)

    def training_pairs(self, signals: Sequence[str], validation: float = 0.0) -> Pairs:
        """The pairs C-SFT learns from: ``pairs_train`` with ``signals``, less the held-out
        validation period when ``validation > 0`` (see :meth:`held_out`)."""
        if not validation:
            return self.pairs("train", signals)
        every = self.pairs("train")  # the cut is placed over every signal, as held_out places it
        cut = time_cut(every.ts, validation, every.path)
        chosen = with_signals(every, signals)
        return chosen.where(chosen.ts < cut)

    def held_out(self, validation: float = 0.0) -> HeldOut:
        """The evaluation data. ``validation = 0``: the test files (``pairs_test`` and
        ``events_test``). ``validation = f``: the latest share ``f`` of ``pairs_train`` (every
        signal) and the ``events_train`` impressions of the same period, which no C-SFT run
        with that setting trains on: the data to choose settings on (``mim csft-tune``)."""
        if not validation:
            if not self.pairs_path("test").is_file():
                raise DataError(str(self.pairs_path("test")), "pairs file not found; the evaluation reads it "
                                "(or set data.validation=f to evaluate on the latest share f of pairs_train)")
            pairs = self.pairs("test")
            if not len(pairs):  # the recall would average over no query (a torch.cat traceback)
                raise DataError(str(pairs.path), "holds no pairs; the query->item recall needs held-out pairs")
            return HeldOut("test", "test", pairs, self.world / "events_test.parquet", None)
        pairs = self.pairs("train")
        cut = time_cut(pairs.ts, validation, pairs.path)
        return HeldOut("validation", "train", pairs.where(pairs.ts >= cut),
                       self.world / "events_train.parquet", cut)

    def corpus(self, vision: VisionEncoder) -> ItemCorpus:
        """Decoded item images (or features) and titles, decoded once."""
        if self._corpus is None:
            self._corpus = corpus_from_table(self.items, self.items_path, vision)
        return self._corpus

    def item_content(self, vision: VisionEncoder) -> ContentKeys:
        """Digests of the items' titles and of their images as stored for ``vision``, computed
        once and without decoding (evaluation tells the catalogue's repeats by them), or the
        decoded corpus's own when :meth:`corpus` ran first (the same digests; computing them
        again reads every stored image again). Like :meth:`corpus`, the first call's ``vision``
        decides (stage 1 and C-SFT share it)."""
        if self._content is None:
            self._content = self._corpus.content if self._corpus is not None else \
                content_keys(self.items.column("title").to_pylist(), stored_images(self.items, self.items_path, vision))
        return self._content

    def item_image_features(self, vision: VisionEncoder) -> torch.Tensor:
        return self.cache.get("items-image", self._key(self.items_path, vision),
                              lambda: vision_features(vision, self.corpus(vision).images,
                                                      self.batch_size, "item image features"))

    def item_title_features(self, text: HFTextEncoder) -> torch.Tensor:
        titles = self.items.column("title").to_pylist()  # read_items refuses empty titles
        return self.cache.get("items-title", self._key(self.items_path, text),
                              lambda: text_features(text, titles, self.batch_size,
                                                    "item title features"))

    def query_features(self, split: str, vision: VisionEncoder) -> torch.Tensor:
        path = self.pairs_path(split)
        return self.cache.get(f"queries-{split}", self._key(path, vision),
                              lambda: vision_features(vision, read_query_inputs(path, self.item_count, vision),
                                                      self.batch_size, f"{split} query features"))

    def _key(self, path: Path, backbone: nn.Module) -> List[str]:
        return [fingerprint_file(path), content_fingerprint(backbone, _preprocessing(backbone))]


def _preprocessing(backbone: nn.Module) -> object:
    """What turns stored inputs into the backbone's input, beyond its weights."""
    if isinstance(backbone, HFTextEncoder):
        return {"max_length": backbone.max_length, "vocab": backbone.tokenizer.vocab_size}
    processor = getattr(backbone, "image_processor", None)
    if processor is None:
        return {"precomputed": getattr(backbone, "feature_dim", None)}
    mean, std = processor.stats
    prepared = {"size": processor.size, "mean": mean, "std": std}
    if getattr(backbone, "style_stages", None):  # only when set: older caches keep their keys
        prepared["style_stages"] = backbone.style_stages
    if getattr(backbone, "architecture", None):  # the same weights padded otherwise compute other features
        prepared["architecture"] = backbone.architecture
    return prepared


class TrainingInputs:
    """The training pairs' queries and the catalogue's items, ready for :class:`CsftBatch`:
    backbone features (``features=True``, cached) or decoded images and titles."""

    def __init__(self, world: WorldInputs, pairs: Pairs, model: CsftModel, features: bool) -> None:
        self.features = features
        self.item_vision, self.query_vision = model.items.pair.vision, model.queries.vision
        if features:
            self.item_images = world.item_image_features(self.item_vision)
            self.item_titles = world.item_title_features(model.items.pair.text)
            queries = world.query_features("train", self.query_vision)
        else:
            corpus = world.corpus(self.item_vision)
            self.item_images, self.item_titles = corpus.images, corpus.titles
            queries = read_query_inputs(pairs.path, world.item_count, self.query_vision)
        self.queries = queries[torch.from_numpy(pairs.rows)]  # row i = pair i of ``pairs``

    def items(self, ids: np.ndarray, device: torch.device) -> Tuple[torch.Tensor, Union[torch.Tensor, List[str]]]:
        """The item tower's inputs for items ``ids``."""
        index = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        if self.features:
            return self.item_images[index].to(device), self.item_titles[index].to(device)
        images = vision_input(self.item_vision, self.item_images[index]).to(device)
        return images, [self.item_titles[i] for i in index.tolist()]

    def batch(self, pair_index: np.ndarray, item_ids: np.ndarray, item_categories: np.ndarray,
              device: torch.device) -> CsftBatch:
        queries = self.queries[torch.from_numpy(np.asarray(pair_index, dtype=np.int64))]
        if not self.features:
            queries = vision_input(self.query_vision, queries)
        images, titles = self.items(item_ids, device)
        return CsftBatch(queries=queries.to(device), item_images=images, item_titles=titles,
                         item_ids=torch.as_tensor(item_ids, dtype=torch.long, device=device),
                         item_categories=torch.as_tensor(item_categories, dtype=torch.long,
                                                         device=device),
                         features=self.features)

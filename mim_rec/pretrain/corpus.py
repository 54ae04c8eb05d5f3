"""The item corpus pre-training reads: titles, decoded images (or image features),
categories, and the fixed held-out split used by evaluation.

Images are decoded once, up front, into a uint8 tensor at the model's input size (the
synthetic world's images are 64x64 PNGs, a few KB each), so a bad image is reported before
training starts, with its file, row and field, and steps never pay for decoding.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mim_rec.data.errors import DataError
from mim_rec.data.io import BATCH_ROWS, open_parquet, read_batches, read_parquet_columns
from mim_rec.data.schemas import ITEMS, Contract
from mim_rec.data.validate import conform_schema, vector_dimensions
from mim_rec.encoders.config import PRECOMPUTED, VisionConfig
from mim_rec.encoders.vision import PrecomputedVisionEncoder, VisionEncoder

_GOLDEN = 2654435761  # Knuth's multiplicative hash: a stable split that needs no RNG


def heldout_mask(item_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Items held out from pre-training for evaluation: a fixed hash of the item id, so the
    split is the same for every run, seed and world size."""
    return ((item_ids.astype(np.uint64) * np.uint64(_GOLDEN)) % np.uint64(2**32)) < fraction * 2**32


@dataclass(frozen=True)
class ContentKeys:
    """The exact content of each item, per modality, as a 128-bit BLAKE2b digest: of the UTF-8
    title, and of the stored image the vision tower reads (the encoded file's bytes, or the
    float32 bytes of the ``image_feature`` vector). Evaluation uses it to tell a catalogue's
    repeats apart from retrieval errors: two ids with the same digest carry the same input, and
    no tower can rank one above the other. Digests of the stored bytes, not of decoded pixels,
    so that every encoder row of an evaluation sees the same repeats whatever its input size."""

    titles: np.ndarray   # [N] S16
    images: np.ndarray   # [N] S16

    def subset(self, index: np.ndarray) -> "ContentKeys":
        return ContentKeys(self.titles[index], self.images[index])

    def title_groups(self) -> np.ndarray:
        """[N] int64: equal for items whose titles are identical."""
        return content_groups(self.titles)

    def image_groups(self) -> np.ndarray:
        """[N] int64: equal for items whose stored images are identical."""
        return content_groups(self.images)

    def item_groups(self) -> np.ndarray:
        """[N] int64: equal for items identical in both title and image."""
        return content_groups(self.titles, self.images)


def content_groups(*keys: np.ndarray) -> np.ndarray:
    """One int64 group per row, shared by the rows whose ``keys`` are all equal."""
    columns = np.stack([np.unique(key, return_inverse=True)[1].reshape(-1) for key in keys], axis=1)
    return np.unique(columns, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def content_keys(titles: Sequence[str],
                 stored_images: Sequence[Union[bytes, Sequence[float]]]) -> ContentKeys:
    """Digest each title and each stored image (encoded bytes, or an image feature vector,
    digested as float32 as the precomputed tower reads it)."""
    def digest(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=16).digest()

    image_bytes = (image if isinstance(image, bytes) else np.asarray(image, dtype=np.float32).tobytes()
                   for image in stored_images)
    return ContentKeys(np.array([digest(title.encode("utf-8")) for title in titles], dtype="S16"),
                       np.array([digest(data) for data in image_bytes], dtype="S16"))


@dataclass
class ItemCorpus:
    item_ids: np.ndarray          # [N] int64
    titles: List[str]             # N titles
    images: torch.Tensor          # [N, 3, S, S] uint8, or [N, F] float32 features
    categories: np.ndarray        # [N] int32
    source: str
    content: ContentKeys          # digests of the titles and stored images (evaluation's repeats)

    def __len__(self) -> int:
        return len(self.titles)

    def subset(self, mask: np.ndarray) -> "ItemCorpus":
        index = np.flatnonzero(mask)
        return ItemCorpus(self.item_ids[index], [self.titles[i] for i in index],
                          self.images[torch.from_numpy(index)], self.categories[index],
                          self.source, self.content.subset(index))


def items_path(world_or_file: Union[str, Path]) -> Path:
    path = Path(world_or_file)
    return path / "items.parquet" if path.is_dir() else path


def vision_for_items(vision: VisionConfig, world_or_file: Union[str, Path]) -> VisionConfig:
    """The vision tower the items can feed. Imported data sets (Amazon, TAOBAO-MM) ship an
    ``image_feature`` vector and no pixels, which a pixel tower cannot read; for them the
    precomputed tower with the vectors' length is returned, so that every stage configured for
    pixels runs unchanged on them. Items with pixels, and a precomputed config, are returned
    as given (a missing or unreadable file is left to :func:`load_corpus` to report)."""
    path = items_path(world_or_file)
    if vision.name == PRECOMPUTED or not path.is_file():
        return vision
    items = open_parquet(path)  # not Parquet (a manifest.json given as data.world): a DataError naming it
    names = set(items.schema_arrow.names)
    if names & {"image", "image_path"} or "image_feature" not in names:
        return vision
    # the vectors' dimension as the items' validation tells it, the length most rows have (the
    # first row's was taken, and the other rows were then checked against it, however many)
    dim = vector_dimensions(["image_feature"], lambda columns: read_batches(items, str(path), BATCH_ROWS, columns),
                            str(path)).get("image_feature")
    return vision if dim is None else dataclasses.replace(vision, name=PRECOMPUTED, feature_dim=dim)


def load_corpus(world_or_file: Union[str, Path], vision: VisionEncoder) -> ItemCorpus:
    """Read, validate and decode the items; errors name file, row and field."""
    from mim_rec.data.io import read_items

    path = items_path(world_or_file)
    if not path.exists():
        raise DataError(str(path), "items file not found (give a world folder or items.parquet)")
    table = read_items(path)
    if table.num_rows == 0:
        raise DataError(str(path), "the item corpus is empty; pre-training needs items")
    return corpus_from_table(table, path, vision)


def corpus_from_table(table: pa.Table, path: Path, vision: VisionEncoder) -> ItemCorpus:
    """Decode an already validated items table (``path`` names it in errors)."""
    titles = table.column("title").to_pylist()
    for row, title in enumerate(titles):
        if not title or not title.strip():
            raise DataError(str(path), "empty title", row=row, field="title")
    rows = list(range(table.num_rows))
    stored = stored_images(table, path, vision)
    if isinstance(vision, PrecomputedVisionEncoder):
        images = vision.preprocess(stored, str(path), rows)
    else:
        images = vision.image_processor.to_uint8(stored, str(path), rows)
    return ItemCorpus(table.column("item_id").to_numpy(), titles, images,
                      table.column("category_id").to_numpy(), str(path), content_keys(titles, stored))


def stored_images(table: pa.Table, path: Path, vision: VisionEncoder) -> list:
    """The items' images as stored for ``vision``: the ``image_feature`` vectors for the
    precomputed tower, the encoded image bytes for a pixel tower (not yet decoded)."""
    if isinstance(vision, PrecomputedVisionEncoder):
        require_stored_column(table.column_names, path, True)
        return table.column("image_feature").to_pylist()
    return encoded_images(table, path)


def require_stored_column(names: Sequence[str], path: Path, precomputed: bool, contract: Contract = ITEMS) -> None:
    """Refuse a file of ``contract`` (items, or C-SFT pairs and their queries) whose columns
    ``names`` hold no picture the vision tower reads: the feature column (``image_feature``,
    ``query_feature``) for a ``precomputed`` tower, an image column for a pixel one
    (:func:`require_image_columns`). The schema alone tells."""
    inline, by_path, feature = contract.one_of[0]
    if not precomputed:
        require_image_columns(names, path, inline, by_path, contract.name, feature)
    elif feature not in names:
        raise DataError(str(path), f"no '{feature}' column; the vision encoder is '{PRECOMPUTED}'", field=feature)


def require_stored_images(path: Union[str, Path], vision: VisionConfig, contract: Contract = ITEMS) -> None:
    """Refuse a file of ``contract`` (items, or C-SFT pairs) whose rows the tower ``vision``
    configures cannot read, by file, row and field, before any encoder loads: the commands
    that read them found them after loading their encoders (C-SFT, after extracting every item's
    features; ``mim embeddings build``, at the shard holding the row). Beyond
    :func:`require_stored_column`: a row null in the column(s) the tower reads (the file's
    validation accepts it when another image column has a value: an ``image_feature`` beside a
    null image, or the reverse), and a feature vector whose length is not the tower's
    ``feature_dim`` (validation compares a row only with the file's other rows). The values
    themselves (NaN/inf, images that do not decode, a path to no file) are the validation's;
    the schema is checked as it checks it, so this may run before it. Columnar: only the
    image columns are read, and no image is decoded."""
    path = Path(path)
    names = conform_schema(open_parquet(path).schema_arrow, contract, str(path)).names
    precomputed = vision.name == PRECOMPUTED
    require_stored_column(names, path, precomputed, contract)
    feature = contract.one_of[0][2]
    row_is = contract.name[:-1]  # "item", "pair"
    if precomputed:
        _require_feature_rows(path, feature, vision.feature_dim, row_is)
    else:
        _require_image_rows(path, image_columns(names, contract), vision.name, row_is)


def image_columns(names: Sequence[str], contract: Contract = ITEMS) -> List[str]:
    """The columns among ``names`` that hold a ``contract`` file's images for a pixel tower (the
    bytes, a path), in that order: where a reader looks, and what its errors name."""
    inline, by_path, _ = contract.one_of[0]
    return [name for name in (inline, by_path) if name in names]


def _require_feature_rows(path: Path, feature: str, feature_dim: int, row_is: str) -> None:
    """Every row's ``feature`` vector present, of length ``feature_dim``."""
    features = read_parquet_columns(path, [feature]).column(feature)
    lengths = pc.list_value_length(features)
    row = _first_row(pc.fill_null(pc.not_equal(lengths, feature_dim), True))
    if row is None:
        return
    if not features[row].is_valid:
        raise DataError(str(path), f"null: the {row_is} has no {feature.replace('_', ' ')}, which the vision "
                                   f"encoder '{PRECOMPUTED}' reads", row=row, field=feature)
    raise DataError(str(path), f"a vector of length {lengths[row].as_py()}; the vision encoder '{PRECOMPUTED}' "
                               f"reads feature_dim={feature_dim}", row=row, field=feature)


def _require_image_rows(path: Path, columns: List[str], tower: str, row_is: str) -> None:
    """Every row with an image in one of ``columns`` (the bytes, or a path)."""
    table = read_parquet_columns(path, columns)
    missing = table.column(columns[0]).is_null()
    for name in columns[1:]:
        missing = pc.and_(missing, table.column(name).is_null())
    row = _first_row(missing)
    if row is not None:
        raise DataError(str(path), f"null: the {row_is} has no {columns[0].replace('_', ' ')}, which the vision "
                                   f"encoder '{tower}' reads", row=row, field="|".join(columns))


def _first_row(flags: Union[pa.Array, pa.ChunkedArray]) -> Optional[int]:
    """The first row ``flags`` marks, or None."""
    row = pc.index(flags, True).as_py()
    return None if row < 0 else row


def require_image_columns(names: Sequence[str], path: Path, inline: str = "image", by_path: str = "image_path",
                          rows_are: str = "items", feature: str = "image_feature") -> None:
    """Refuse a file whose columns ``names`` hold neither image column :func:`encoded_images`
    reads. The schema alone tells, so the commands refuse such a file with it before their
    encoders load (:func:`require_stored_column`)."""
    if inline not in names and by_path not in names:
        raise DataError(str(path), f"no '{inline}' or '{by_path}' column; use vision.name=precomputed "
                        f"for {rows_are} with only {feature}", field=inline)


def encoded_images(table: pa.Table, path: Path, inline: str = "image", by_path: str = "image_path",
                   rows_are: str = "items", feature: str = "image_feature") -> List[bytes]:
    """Each row's encoded image, from the ``inline`` bytes column or the file the ``by_path``
    column names (relative to ``path``'s folder). Items and C-SFT pairs (``query_image``,
    ``query_image_path``) store their pictures the same two ways; a row with neither, or a named
    file that is absent, is a :class:`DataError` with its row and field."""
    require_image_columns(table.column_names, path, inline, by_path, rows_are, feature)
    inline_values = table.column(inline).to_pylist() if inline in table.column_names else None
    paths = table.column(by_path).to_pylist() if by_path in table.column_names else None
    out = []
    for row in range(table.num_rows):
        if inline_values is not None and inline_values[row] is not None:
            out.append(inline_values[row])
        elif paths is not None and paths[row] is not None:
            image_file = path.parent / paths[row]
            if not image_file.is_file():
                raise DataError(str(path), f"image file {image_file} not found", row=row, field=by_path)
            out.append(image_file.read_bytes())
        else:
            raise DataError(str(path), f"missing {inline.replace('_', ' ')}", row=row, field=inline)
    return out

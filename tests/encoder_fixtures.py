"""Tiny random-init encoder configs and item fixtures shared by the encoder/pretrain tests."""

from __future__ import annotations

import io
import struct
import zlib
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mim_rec.encoders import EncodersConfig, TextConfig, VisionConfig

TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64)


def tiny_vision(name: str = "convnext_atto", **changes) -> VisionConfig:
    kwargs = {
        "convnext_atto": dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)),
        "vit_tiny_patch16_224": dict(img_size=32, patch_size=8, depth=2, embed_dim=32,
                                     num_heads=2),
        "eva02_tiny_patch14_224": dict(img_size=28, depth=2, embed_dim=32, num_heads=2),
        "efficientnet_lite0": {},
    }[name]
    size = {"vit_tiny_patch16_224": 32, "eva02_tiny_patch14_224": 28}.get(name, 32)
    return VisionConfig(**{"name": name, "weights": None, "model_kwargs": kwargs,
                           "image_size": size, **changes})


def tiny_text(**changes) -> TextConfig:
    return TextConfig(**{"name": "bert", "pretrained": False, "overrides": dict(TINY_TEXT),
                         "max_length": 16, **changes})


def tiny_encoders(shared_dim: int = 16, **vision_changes) -> EncodersConfig:
    return EncodersConfig(vision=tiny_vision(**vision_changes), text=tiny_text(),
                          shared_dim=shared_dim)


COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["square", "stripe", "dot"]


def png_bytes(colour_index: int, shape_index: int, size: int = 64, seed: int = 0) -> bytes:
    """A small synthetic product photo whose colour and shape its title names."""
    rng = np.random.default_rng(seed)
    palette = np.array([[220, 30, 30], [30, 200, 40], [30, 60, 220], [230, 220, 30],
                        [150, 40, 180], [250, 140, 20]], dtype=np.int16)
    image = np.full((size, size, 3), 235, dtype=np.int16)
    colour = palette[colour_index]
    if shape_index == 0:
        image[16:48, 16:48] = colour
    elif shape_index == 1:
        image[:, ::8] = colour
        image[:, 1::8] = colour
    else:
        yy, xx = np.mgrid[:size, :size]
        image[(yy - 32) ** 2 + (xx - 32) ** 2 < 180] = colour
    image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header declares ``width x height`` pixels and that holds none:
    what a decompression bomb shows PIL before a pixel is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def image_in(kind: str, **save) -> bytes:
    """A small image saved in PIL format ``kind`` (GIF, BMP, WEBP, TIFF, JPEG, MPO...)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format=kind, **save)
    return buffer.getvalue()


def write_items(path: Path, count: int = 36, seed: int = 0,
                bad_image_row: Optional[int] = None) -> Path:
    """An ITEMS parquet file: titles name the colour and shape drawn in the image."""
    rows = []
    for i in range(count):
        colour, shape = i % len(COLOURS), (i // len(COLOURS)) % len(SHAPES)
        image = b"not a png" if i == bad_image_row else png_bytes(colour, shape, seed=seed + i)
        rows.append(dict(item_id=i, raw_item_id=f"raw{i}", category_id=colour,
                         title=f"{COLOURS[colour]} {SHAPES[shape]} item {i % 5}",
                         created_at=datetime(2024, 1, 1 + i % 28), image=image))
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("raw_item_id", pa.string(), nullable=False),
        pa.field("category_id", pa.int32(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("s"), nullable=False),
        pa.field("image", pa.binary())]))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path

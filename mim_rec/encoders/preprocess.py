"""Turning encoded images (PNG/JPEG bytes) or uint8 arrays into a model's input tensor."""

from __future__ import annotations

import io
import struct
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from mim_rec.data.errors import DataError
from mim_rec.data.images import ImageRefused, open_image

# What PIL raises for damaged bytes: OSError (UnidentifiedImageError, truncated data), but also
# ValueError (a short IHDR), SyntaxError (a broken PNG chunk), EOFError and struct.error.
IMAGE_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)

ImageLike = Union[bytes, np.ndarray]


def decode_image(data: ImageLike) -> Image.Image:
    """An RGB PIL image from encoded bytes or an ``H x W x 3`` uint8 array."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ValueError("empty image bytes")
        try:
            image = open_image(io.BytesIO(bytes(data)))
            image.load()
        except ImageRefused:  # a ValueError that already says why (too large, not PNG/JPEG)
            raise
        except IMAGE_DECODE_ERRORS as exc:
            raise ValueError(f"not a decodable PNG/JPEG ({exc})") from exc
        return _sixteen_to_eight_bit(image).convert("RGB")
    array = np.asarray(data)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 array, got shape {array.shape} {array.dtype}")
    return Image.fromarray(array)


def _sixteen_to_eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (PIL modes ``I;16*`` and ``I``) scaled to 8 bits: PIL's own
    conversion clips at 255, which turned every such product photo nearly white."""
    if not (image.mode == "I" or image.mode.startswith("I;16")):
        return image
    pixels = np.asarray(image).astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


class ImagePreprocessor:
    """Resize to a square ``size`` and normalise with the weights' own mean and std."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def to_uint8(self, images: Sequence[ImageLike], source: str = "<images>",
                 rows: Optional[Sequence[int]] = None, field: str = "image") -> torch.Tensor:
        """Decode and resize into a ``[B, 3, size, size]`` uint8 tensor (augmentations run
        on this before :meth:`normalize`). A bad image raises DataError naming its row and
        ``field``, the column(s) the images came from (a pairs file's query images)."""
        out = torch.empty((len(images), 3, self.size, self.size), dtype=torch.uint8)
        for i, data in enumerate(images):
            try:
                image = decode_image(data)
            except ValueError as exc:
                raise DataError(source, str(exc), row=rows[i] if rows is not None else i,
                                field=field) from exc
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), Image.BICUBIC)
            out[i] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        return out

    def normalize(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        return (pixels_uint8.float() / 255.0 - self.mean) / self.std

    def __call__(self, images: Sequence[ImageLike], source: str = "<images>",
                 rows: Optional[Sequence[int]] = None, field: str = "image") -> torch.Tensor:
        return self.normalize(self.to_uint8(images, source, rows, field))

    @property
    def stats(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        return tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist())

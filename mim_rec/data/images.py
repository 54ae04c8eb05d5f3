"""Opening item and query images under the data contract: PNG or JPEG, of a size PIL's
decompression-bomb guard accepts.

Validation, the encoders' decoding and the embedding service open images here, so an image one
of them takes is taken by the others, and each names the same reason for one it refuses.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import BinaryIO, Union

from PIL import Image

# PIL's names for the formats the contract takes. A JPEG holding more than one picture (a phone
# or stereo camera's Multi-Picture Format) opens as "MPO"; it is a JPEG file all the same.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO")

# The pixel count in the message of PIL's DecompressionBombError, whose image is not returned.
_DECLARED_PIXELS = re.compile(r"Image size \((\d+) pixels\)")


class ImageRefused(ValueError):
    """An image the contract refuses from its header alone, before a pixel is decoded;
    ``found`` says what the header declares (the format, the size)."""

    def __init__(self, message: str, found: str) -> None:
        super().__init__(message)
        self.found = found


class ImageTooLarge(ImageRefused):
    """An image declaring more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``: a decompression bomb
    (a few bytes that decode to gigabytes), or a picture far past any tower's input size."""


class ImageFormatRefused(ImageRefused):
    """A GIF, BMP, WebP, TIFF... image: PIL decodes it, but the contract is PNG/JPEG."""


def open_image(source: Union[str, Path, BinaryIO]) -> Image.Image:
    """``Image.open`` (the header only), refusing an image that is too large or not PNG/JPEG.

    PIL raises past twice ``MAX_IMAGE_PIXELS``, but between the limit and that it only warns
    and then decodes. The size is checked here rather than by turning the warning into an error:
    warning filters are process-wide, and the embedding service opens images on several threads
    at once. The filter below only keeps PIL's warning off stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except Image.DecompressionBombError as exc:
            declared = _DECLARED_PIXELS.search(str(exc))
            pixels = declared.group(1) if declared else f"over {2 * Image.MAX_IMAGE_PIXELS}"
            raise _too_large(pixels) from None
    width, height = image.size
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        image.close()
        raise _too_large(f"{width}x{height} = {width * height}")
    if image.format not in IMAGE_FORMATS:
        image.close()
        raise ImageFormatRefused(f"image is {image.format}, not PNG/JPEG", f"it is {image.format}")
    return image


def _too_large(pixels: str) -> ImageTooLarge:
    found = (f"it declares {pixels} pixels, over the limit of {Image.MAX_IMAGE_PIXELS} "
             "(PIL's Image.MAX_IMAGE_PIXELS)")
    return ImageTooLarge(f"image too large: {found}", found)

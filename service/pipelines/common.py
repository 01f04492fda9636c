"""Plain request data shared by every task pipeline (no protobuf, no gRPC)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument
from ..imaging import Decoded, decode_encoded, decode_raw


@dataclass(frozen=True)
class ImageInput:
    """One request image: `encoded` bytes, or `raw` uint8 HWC RGB pixels with their size."""

    encoded: bytes | None = None
    raw: bytes | None = None
    height: int = 0
    width: int = 0


def decode_image(image: ImageInput, index: int, max_pixels: int) -> Decoded:
    """Decode request image number `index`; errors name ``images[index]``."""
    if image.encoded is not None:
        return decode_encoded(image.encoded, f"images[{index}].encoded", max_pixels)
    if image.raw is not None:
        return decode_raw(image.raw, image.height, image.width, f"images[{index}].raw", max_pixels)
    raise InvalidArgument(f"images[{index}]", "neither encoded nor raw is set")

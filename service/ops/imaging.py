"""Pure image ops: decoding, normalization, scores. No gRPC, no Triton, no torch.

Images are handled as Pillow RGB images until the resize (`ops.resize`), which yields
a uint8 array in CHW layout.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import Internal, InvalidArgument

# Only these decoders are ever used: a smaller attack surface than Pillow's full set.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Our pixel limit (checked right after the header is read) replaces Pillow's warning
# tier, which would otherwise only print. Pillow's error tier (2 x MAX_IMAGE_PIXELS,
# ~179 MP) stays as a backstop; it fires inside Image.open, even before WebP's decoder
# allocates its canvas. A filter, not warnings.catch_warnings: decoding runs in a
# thread pool, and catch_warnings swaps the process-wide filters without a lock.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# The largest `max_image_pixels` setting that means anything: Pillow refuses more.
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class Decoded:
    """An upright RGB image; `width`/`height` are its original size after EXIF orientation."""

    image: Image.Image

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def decode_encoded(data: bytes, field: str, max_pixels: int) -> Decoded:
    """Decode JPEG/PNG/WebP/BMP bytes to an upright RGB image.

    The pixel count is checked from the header, before any pixel is decoded. EXIF
    orientation is applied; alpha is dropped and grayscale/palette become RGB (as
    `Image.convert("RGB")` does in torchvision's loaders). Truncated or corrupt files
    raise InvalidArgument: a partly decoded image is never returned.

    The encoded size is bounded before this is called (DataPlane.check_images).
    """
    if not data:
        raise InvalidArgument(field, "empty image")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A process-wide Pillow switch that pads truncated images with grey instead
        # of failing. Fail closed: a server misconfiguration, never a partial inference.
        raise Internal("image decoding is misconfigured (PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on)")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidArgument(field, f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise InvalidArgument(
                field, f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
    except InvalidArgument:
        raise
    except Image.UnidentifiedImageError:
        raise InvalidArgument(field, f"not a decodable image (allowed: {', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        # Pillow's own backstop, raised from the header for sizes far past any limit.
        raise InvalidArgument(field, f"image is over the limit of {max_pixels} pixels: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidArgument(field, f"corrupt or truncated image: {exc}") from None
    return Decoded(image)


def decode_raw(data: bytes, height: int, width: int, field: str, max_pixels: int) -> Decoded:
    """Wrap uint8 HWC RGB pixels; `len(data)` must equal height * width * 3."""
    if height <= 0 or width <= 0:
        raise InvalidArgument(field, f"height and width must be positive, got {height}x{width}")
    if height * width > max_pixels:
        raise InvalidArgument(field, f"image is {width}x{height} pixels, over the limit of {max_pixels}")
    expected = height * width * 3
    if len(data) != expected:
        raise InvalidArgument(
            field, f"data has {len(data)} bytes, expected height*width*3 = {height}*{width}*3 = {expected}")
    array = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    return Decoded(Image.fromarray(array, mode="RGB"))


def normalize(batch: np.ndarray, mean, std) -> np.ndarray:
    """float32 ``(x / 255 - mean) / std`` per channel for a uint8 [N, 3, H, W] batch."""
    scale = np.asarray([1.0 / (255.0 * s) for s in std], dtype=np.float32).reshape(1, 3, 1, 1)
    shift = np.asarray([m / s for m, s in zip(mean, std)], dtype=np.float32).reshape(1, 3, 1, 1)
    return batch.astype(np.float32) * scale - shift


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, float32."""
    shifted = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest scores of a 1-D array, highest first; equal
    scores keep index order."""
    k = min(k, scores.shape[0])
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=scores.dtype)
    part = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(scores.shape[0])
    order = np.lexsort((part, -scores[part]))
    idx = part[order]
    return idx, scores[idx]


"""Pure image ops: decoding to upright 8-bit RGB, normalization, scores. No gRPC, no
Triton, no torch.

Images are handled as Pillow RGB images (8 bits per channel) until the resize
(`ops.resize`), which yields a uint8 array in CHW layout.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageFile

from ..errors import Internal, InvalidArgument
from ._jpeg import EOI, JpegStructureError, jpeg_body

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
# Only the Orientation tag is read from EXIF; Pillow's complaints about the other tags
# (wrong types, bad counts) would print once per bad file, in the client's words.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")

# Pillow formats decoded by libjpeg (MPO: a JPEG followed by more JPEGs; its first is used).
JPEG_FORMATS = ("JPEG", "MPO")
# The one libjpeg warning that strict decoding lets through: bytes between the last
# scan and the end marker (0xD9), which complete camera files carry. Before the end
# marker nothing is left to decode, so it can hide no later fault; the same warning
# before any other marker (e.g. from a damaged header) refuses the file.
JPEG_BENIGN_WARNING = re.compile(r"extraneous bytes before marker 0xd9\b")

# 16-bit samples become 8-bit by keeping their high byte, v >> 8 == floor(v / 256): the
# rule Pillow itself applies to 48/64-bit RGB(A) and 16-bit grey+alpha PNGs, so every
# PNG colour type maps alike, and k * 257 (8-bit k written as 16 bits) maps back to k.
SIXTEEN_BIT_SHIFT = 8
SIXTEEN_BIT_MAX = 0xFFFF
SIXTEEN_BIT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Pillow's 32-bit modes: "I" holds 16-bit PNG samples in older Pillows; "F" is float.
INT32_MODE = "I"
FLOAT_MODE = "F"

# EXIF Orientation (tag 0x0112, EXIF 2.32 section 4.6.4): where the stored rows and
# columns belong. Each value maps to the transpose that shows the image upright.
ORIENTATION_TAG = 0x0112
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,   # row 0 at top, column 0 at right
    3: Image.Transpose.ROTATE_180,        # row 0 at bottom, column 0 at right
    4: Image.Transpose.FLIP_TOP_BOTTOM,   # row 0 at bottom, column 0 at left
    5: Image.Transpose.TRANSPOSE,         # row 0 at left, column 0 at top
    6: Image.Transpose.ROTATE_270,        # row 0 at right, column 0 at top (turn 90 clockwise)
    7: Image.Transpose.TRANSVERSE,        # row 0 at right, column 0 at bottom
    8: Image.Transpose.ROTATE_90,         # row 0 at left, column 0 at bottom (turn 90 counter-clockwise)
}


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
    """Decode JPEG/PNG/WebP/BMP bytes to an upright 8-bit RGB image.

    The pixel count is checked from the header, before any pixel is decoded. Then:

    - Samples become 8 bits (`to_rgb8`): 16-bit ones keep their high byte, never clip.
    - EXIF orientation (`exif_orientation`): a readable Orientation tag (an integer
      1..8) is applied; an unreadable one leaves the image as stored, and nothing else
      in EXIF can fail the decode. `Decoded.width`/`height` are the size after it.
    - JPEG (`_load_jpeg`): a file that lacks only its end marker is decoded; one whose
      scans stop early, with or without an end marker, is refused.
    - Alpha is dropped and grayscale/palette become RGB (as `Image.convert("RGB")` does
      in torchvision's loaders).

    Truncated or corrupt files raise InvalidArgument: a partly decoded image is never
    returned. The encoded size is bounded before this is called (DataPlane.check_images).
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
        if image.format in JPEG_FORMATS:
            orientation = exif_orientation(image)  # APP1 is read with the header
            image = _load_jpeg(data, field, image.mode)
        else:
            image.load()  # a PNG's eXIf chunk may follow its pixels: EXIF after the load
            orientation = exif_orientation(image)
        image = to_rgb8(image)
        if orientation in UPRIGHT:
            image = image.transpose(UPRIGHT[orientation])
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


def _load_jpeg(data: bytes, field: str, mode: str) -> Image.Image:
    """Decode a JPEG (Pillow `mode` from its header) whose scans are all there; its end
    marker may be missing.

    libjpeg pads a scan that stops early with grey and carries on with a warning that
    Pillow drops, so a cut file with an end marker put back would decode "fine". Two
    checks refuse it: the marker structure (`_jpeg.jpeg_body`: the data ends inside or
    after a scan, and the scans cover the whole image, every coefficient of a
    progressive one), and libjpeg's own verdict on the scans: simplejpeg (libjpeg-turbo)
    in strict mode turns its warnings into errors (`JPEG_BENIGN_WARNING` aside).

    Grey and YCbCr files are decoded by that strict pass itself, to RGB: libjpeg-turbo
    with its default (accurate) IDCT and upsampling, the same pixels as Pillow's decode
    (`tests/ops/test_imaging.py` holds them equal), in one pass. CMYK and YCCK files,
    which libjpeg-turbo outputs only as CMYK, are checked at 1/8 scale and decoded by
    Pillow, whose CMYK to RGB conversion torchvision's loaders use.
    """
    try:
        body = jpeg_body(data)
    except JpegStructureError as exc:
        raise InvalidArgument(field, f"corrupt or truncated image: {exc}") from None
    scans = data[:body.end] + EOI
    cmyk = mode == "CMYK"
    try:
        if cmyk:
            simplejpeg.decode_jpeg(scans, fastdct=True, strict=True, min_height=1, min_width=1, colorspace="CMYK")
        else:
            return Image.fromarray(simplejpeg.decode_jpeg(scans, strict=True, colorspace="RGB"), mode="RGB")
    except ValueError as exc:
        problem = str(exc)
        if not JPEG_BENIGN_WARNING.search(problem.lower()):
            what = problem
            if "premature end" in problem.lower():
                what = "its last scan stops early" if body.has_eoi else "it stops inside its image data"
            raise InvalidArgument(field, f"corrupt or truncated image: JPEG is cut short or damaged ({what})") \
                from None
        if not cmyk:  # complete, with bytes before its end marker: the same decode, not strict
            return Image.fromarray(simplejpeg.decode_jpeg(scans, colorspace="RGB"), mode="RGB")
    image = Image.open(io.BytesIO(scans), formats=("JPEG",))
    image.load()
    return image


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF Orientation (1..8), or 1 when it has none or it is unreadable.

    Only tag 0x0112 is read. Any failure to parse the EXIF block, and any value that is
    not an integer 1..8 (wrong type such as ASCII or RATIONAL, several values, 0, 9),
    means "as stored": EXIF is metadata, and no part of it fails a request.
    """
    try:
        value = image.getexif().get(ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - Pillow's EXIF parser raises many types on bad input
        return 1
    if type(value) is not int or not 1 <= value <= 8:
        return 1
    return value


def to_rgb8(image: Image.Image) -> Image.Image:
    """An RGB image with 8 bits per channel; grey samples are copied to R, G and B.

    - 16-bit grey (I;16, I;16L, I;16B, I;16N): ``v >> 8``, i.e. ``floor(v / 256)``,
      the rule Pillow applies when it decodes 48/64-bit RGB(A) and 16-bit grey+alpha
      PNGs (to RGB/RGBA); ``k * 257`` maps to ``k`` exactly.
    - "I" (32-bit integer; what a 16-bit PNG decodes to in older Pillows): taken as
      16-bit samples, clipped to 0..65535, then as above.
    - "F" (32-bit float; none of the allowed decoders gives it): taken as the usual
      float image range 0.0..1.0, ``floor(clip(v, 0, 1) * 255 + 0.5)``; NaN is 0. A
      range guessed from the values (e.g. 0..1 when max <= 1) would make one pixel's
      brightness depend on the others', so none is guessed.
    - Anything else goes through `Image.convert("RGB")` (alpha dropped, palette looked up).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_GRAY_MODES or mode == INT32_MODE:
        samples = np.asarray(image)
        if mode == INT32_MODE:
            samples = np.clip(samples, 0, SIXTEEN_BIT_MAX)
        gray = (samples >> SIXTEEN_BIT_SHIFT).astype(np.uint8)
    elif mode == FLOAT_MODE:
        samples = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        gray = np.floor(np.clip(samples, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        return image.convert("RGB")
    return Image.fromarray(np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)))


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


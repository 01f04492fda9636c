"""Image-to-image generation (Pix2Pix, CycleGAN): image in, image out, at the input's size.

Per image:

1. decode (EXIF-upright RGB; data plane);
2. bring it to a size the model takes, as the spec's resize mode says:
   - ``stretch`` (pix2pix, fixed 256x256): resize to the input size, aspect ignored;
   - ``none`` (CycleGAN, fully convolutional, input [3, -1, -1]): keep the size, but
     first downscale (aspect kept) so the longer side is at most the ``max_side``
     option, then reflect-pad at the bottom and right to a multiple of ``size_multiple``
     and at least ``min_side``;
3. the model: it takes uint8 and normalizes to [-1, 1] itself (or, for a float input,
   the data plane feeds ``(x / 255 - mean) / std``, mean = std = 0.5 for GANs);
4. denormalize: ``round((y + 1) * 127.5)`` for ``image_nchw_tanh`` outputs in [-1, 1]
   (``round(y * 255)`` for ``image_nchw_01``), clipped to uint8;
5. undo step 2: crop the padding away, resize back to the original size if the image
   was stretched or downscaled (bilinear);
6. encode PNG (default) or JPEG.

Why reflection padding: CycleGAN's generator pads its own borders by reflection
(ReflectionPad2d), so a reflected strip continues the image's texture and statistics
the way the network saw at training time; zero or edge padding would add a flat
border that the instance norms and the receptive field near the seam pick up. The
strip is at most ``size_multiple - 1`` pixels (more only for images under
``min_side``) and is cropped away.

Why downscale instead of tiling for large inputs: CycleGAN normalizes each feature map
with its own instance statistics, so tiles normalized separately show seams; one
downscaled pass bounds memory and compute (both grow with the pixel count) and gives
one consistent image. Step 5 upsamples the result to the original size.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from ..imaging import Decoded, resize_stretch, to_chw
from ..spec import ModelSpec
from .common import Task, Tensors

# output_format -> (Pillow format, mime type); "" means the default.
FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "jpg": ("JPEG", "image/jpeg")}
DEFAULT_FORMAT = "png"
DEFAULT_JPEG_QUALITY = 90
JPEG_QUALITY_RANGE = (1, 100)
# zlib level 1: the gateway encodes on its own CPUs for every request; level 1 is
# several times faster than Pillow's default 6 for files ~10-20% larger.
PNG_COMPRESS_LEVEL = 1
# Denormalization per output layout: pixel = y * scale + shift, then rounded.
LAYOUTS = {"image_nchw_tanh": (127.5, 127.5), "image_nchw_01": (255.0, 0.0)}
# Defaults for fully convolutional models whose spec lacks the options.
DEFAULT_SIZE_MULTIPLE = 4
DEFAULT_MIN_SIDE = 1


@dataclass(frozen=True)
class GeneratedImage:
    """An encoded generated image at the input's (upright) size."""

    image: bytes
    mime_type: str
    width: int
    height: int


@dataclass(frozen=True)
class Options:
    pil_format: str
    mime_type: str
    jpeg_quality: int


@dataclass(frozen=True)
class Plan:
    """How one image of `width` x `height` reaches the model: resized to
    `scaled_width` x `scaled_height`, then padded to `padded_width` x `padded_height`
    (bottom and right). The model's output is cropped to the scaled size and resized
    back to width x height."""

    width: int
    height: int
    scaled_width: int
    scaled_height: int
    padded_width: int
    padded_height: int

    @property
    def resized(self) -> bool:
        return (self.scaled_width, self.scaled_height) != (self.width, self.height)


# ----------------------------------------------------------------------- options
def resolve_options(output_format: str, jpeg_quality: int | None) -> Options:
    """Validate `output_format` ("png", "jpeg"/"jpg", any case; "" = png) and
    `jpeg_quality` (1-100; unset = 90; checked whatever the format)."""
    key = (output_format or DEFAULT_FORMAT).strip().lower()
    if key not in FORMATS:
        raise InvalidArgument("output_format", f"must be png or jpeg (or empty for png), got {output_format!r}")
    if jpeg_quality is None:
        quality = DEFAULT_JPEG_QUALITY
    else:
        lo, hi = JPEG_QUALITY_RANGE
        if not lo <= jpeg_quality <= hi:
            raise InvalidArgument("jpeg_quality", f"must be between {lo} and {hi}, got {jpeg_quality}")
        quality = int(jpeg_quality)
    pil_format, mime = FORMATS[key]
    return Options(pil_format, mime, quality)


def _int_option(spec: ModelSpec, key: str, default: int) -> int:
    value = spec.option(key)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise FailedPrecondition(f"model {spec.name!r} has a bad option {key}={value!r} (not an integer)") from None
    if number < 0:
        raise FailedPrecondition(f"model {spec.name!r} has a bad option {key}={value!r} (negative)")
    return number


# ------------------------------------------------------------------- geometry
def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan(width: int, height: int, spec: ModelSpec) -> Plan:
    """The resize/pad plan for an image of `width` x `height` (pure; computed again in
    postprocess, so nothing travels between the stages)."""
    if spec.resize_mode == "stretch":
        if spec.input_width <= 0 or spec.input_height <= 0:
            raise FailedPrecondition(f"model {spec.name!r}: resize mode stretch needs a fixed input size")
        return Plan(width, height, spec.input_width, spec.input_height, spec.input_width, spec.input_height)
    if spec.resize_mode != "none":
        raise FailedPrecondition(f"model {spec.name!r}: generation supports resize modes stretch and none, "
                                 f"not {spec.resize_mode!r}")
    if spec.input_width > 0 or spec.input_height > 0:
        raise FailedPrecondition(f"model {spec.name!r}: resize mode none needs a variable input size [3, -1, -1]")
    multiple = max(1, _int_option(spec, "size_multiple", DEFAULT_SIZE_MULTIPLE))
    min_side = max(1, _int_option(spec, "min_side", DEFAULT_MIN_SIDE))
    max_side = _int_option(spec, "max_side", 0)  # 0: no limit
    scaled_w, scaled_h = width, height
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
        scaled_w = min(max_side, max(1, round(width * scale)))
        scaled_h = min(max_side, max(1, round(height * scale)))
    padded_w = _round_up(max(scaled_w, min_side), multiple)
    padded_h = _round_up(max(scaled_h, min_side), multiple)
    return Plan(width, height, scaled_w, scaled_h, padded_w, padded_h)


def reflect_pad(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad uint8 [3, h, w] at the bottom and right to [3, height, width] by reflection
    (the border pixel is not repeated, as torch's ReflectionPad2d). A 1-pixel side,
    which has nothing to reflect, is repeated instead."""
    _, h, w = chw.shape
    for axis, have, want in ((1, h, height), (2, w, width)):
        if want > have:
            pad = [(0, 0)] * 3
            pad[axis] = (0, want - have)
            chw = np.pad(chw, pad, mode="reflect" if have > 1 else "edge")
    return chw


def to_model_input(image: Image.Image, p: Plan) -> np.ndarray:
    """uint8 [3, padded_height, padded_width] for the model, from an upright RGB image."""
    if p.resized:
        chw = resize_stretch(image, p.scaled_width, p.scaled_height)
    else:
        chw = to_chw(image)
    return reflect_pad(chw, p.padded_height, p.padded_width)


def to_pixels(output: np.ndarray, layout: str) -> np.ndarray:
    """float [3, H, W] model output -> uint8 [H, W, 3] pixels (rounded, clipped)."""
    try:
        scale, shift = LAYOUTS[layout]
    except KeyError:
        raise FailedPrecondition(f"generation output layout {layout!r} is not one of {', '.join(LAYOUTS)}") from None
    pixels = np.rint(output.astype(np.float32) * scale + shift)
    return np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def from_model_output(output: np.ndarray, p: Plan, layout: str) -> Image.Image:
    """The generated image at the original size: crop the padding, denormalize, and
    resize back (bilinear) when the input was stretched or downscaled."""
    if output.ndim != 3 or output.shape[0] != 3 or output.shape[1] < p.scaled_height \
            or output.shape[2] < p.scaled_width:
        raise FailedPrecondition(f"generator output has shape {list(output.shape)}; expected "
                                 f"[3, {p.padded_height}, {p.padded_width}]")
    image = Image.fromarray(to_pixels(output[:, :p.scaled_height, :p.scaled_width], layout), mode="RGB")
    if p.resized:
        image = image.resize((p.width, p.height), Image.BILINEAR)
    return image


def encode(image: Image.Image, options: Options) -> bytes:
    buffer = io.BytesIO()
    if options.pil_format == "JPEG":
        image.save(buffer, format="JPEG", quality=options.jpeg_quality)
    else:
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def check_answer_size(results: list[GeneratedImage], limit_bytes: int) -> None:
    """Refuse an answer that gRPC could not send (over the gateway's message limit)
    with a message that says what to do, instead of a transport error."""
    total = sum(len(r.image) for r in results)
    if total > limit_bytes:
        raise ResourceExhausted(f"the generated images take {total} bytes, over the {limit_bytes}-byte message "
                                "limit; send fewer or smaller images per request, or ask for output_format jpeg")


# -------------------------------------------------------------------------- task
class Generation(Task):
    tasks = ("generation",)

    def options(self, request, spec) -> Options:
        options = resolve_options(request.get("output_format", ""), request.get("jpeg_quality"))
        if spec.output_layout not in LAYOUTS:
            raise FailedPrecondition(f"model {spec.name!r} has output layout {spec.output_layout!r}; "
                                     f"generation reads {', '.join(LAYOUTS)}")
        return options

    def preprocess(self, decoded: Decoded, spec: ModelSpec, options) -> Tensors:
        p = plan(decoded.width, decoded.height, spec)
        return {spec.image_input.name: to_model_input(decoded.image, p)[None]}

    def postprocess(self, outputs: Tensors, spec: ModelSpec, decoded: Decoded, options: Options) -> GeneratedImage:
        p = plan(decoded.width, decoded.height, spec)
        image = from_model_output(outputs[spec.outputs[0].name][0], p, spec.output_layout)
        return GeneratedImage(encode(image, options), options.mime_type, image.width, image.height)


TASK = Generation()

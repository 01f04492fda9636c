"""Image-to-image generation (Pix2Pix, CycleGAN): image in, image out, at the input's size.

Per image:

1. decode (EXIF-upright RGB; data plane);
2. bring it to a size the model takes, as the spec's resize plan (`ops.resize`) says:
   - ``stretch`` (pix2pix, fixed 256x256): resize to the input size, aspect ignored;
   - ``none`` (CycleGAN, fully convolutional, input [3, -1, -1]): keep the size, but
     first downscale (aspect kept) so the longer side is at most the ``max_side``
     option, then reflect-pad at the bottom and right to a multiple of ``size_multiple``
     and at least ``min_side``;
3. the model: it takes uint8 and normalizes to [-1, 1] itself (or, for a float input,
   preprocess feeds ``(x / 255 - mean) / std``, mean = std = 0.5 for GANs);
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
from ..ops.resize import ResizePlan
from . import layouts
from .common import Task, check_layout, resized_inputs

# output_format -> (Pillow format, mime type); "" means the default.
FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "jpg": ("JPEG", "image/jpeg")}
DEFAULT_FORMAT = "png"
DEFAULT_JPEG_QUALITY = 90
JPEG_QUALITY_RANGE = (1, 100)
# zlib level 1: the gateway encodes on its own CPUs for every request; level 1 is
# several times faster than Pillow's default 6 for files ~10-20% larger.
PNG_COMPRESS_LEVEL = 1
# The resize modes a generator's input can have.
RESIZE_MODES = ("stretch", "none")


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


# ------------------------------------------------------------------- the way back
def from_model_output(output: np.ndarray, plan: ResizePlan, layout: str) -> Image.Image:
    """The generated image at the original size: crop the padding, denormalize, and
    resize back (bilinear) when the input was stretched or downscaled."""
    if output.ndim != 3 or output.shape[0] != 3 or output.shape[1] < plan.scaled_height \
            or output.shape[2] < plan.scaled_width:
        raise FailedPrecondition(f"generator output has shape {list(output.shape)}; expected "
                                 f"[3, {plan.input_height}, {plan.input_width}]")
    image = Image.fromarray(layouts.to_pixels(plan.crop_output(output), layout), mode="RGB")
    return plan.image_to_original(image)


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
        check_layout(spec, "generation")
        if spec.resize_mode not in RESIZE_MODES:
            raise FailedPrecondition(f"model {spec.name!r}: generation supports resize modes "
                                     f"{' and '.join(RESIZE_MODES)}, not {spec.resize_mode!r}")
        return options

    def preprocess(self, decoded, spec, options):
        return resized_inputs(decoded, spec)

    def postprocess(self, outputs, context, spec, options: Options) -> GeneratedImage:
        image = from_model_output(outputs[spec.outputs[0].name][0], context.plan, spec.output_layout)
        return GeneratedImage(encode(image, options), options.mime_type, image.width, image.height)


TASK = Generation()

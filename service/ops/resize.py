"""Resize plans: how an original image becomes a model input, and the exact way back.

One `ResizePlan` per image holds the geometry of every resize mode in the same terms:

    original (width x height)
      -> resized to scaled_width x scaled_height
      -> placed at (left, top) in a canvas of input_width x input_height
         (a negative offset crops, a positive one pads)

- ``resize_center_crop``: torchvision's ``Resize(resize_size)`` (shorter side, PIL
  bilinear or bicubic with antialiasing, as the plan's ``resample`` says) then
  ``CenterCrop``; offsets are the negative crop corner.
- ``letterbox``: Ultralytics' ``LetterBox(center=True)``: aspect kept, OpenCV
  INTER_LINEAR, centred on grey (114) padding.
- ``stretch``: resized to the input size, aspect ignored (PIL, ``resample``).
- ``none``: the model takes any size. The image keeps its size unless its longer side
  is over ``max_side`` (then it is downscaled, aspect kept, PIL bilinear); it is then
  padded at the bottom and right by reflection to a multiple of ``multiple`` and at
  least ``min_side`` (generators) -- with the defaults, not padded at all.

`apply` is the forward transform (uint8 [3, input_height, input_width]); `to_original`
maps boxes back, and `crop_output` + `image_to_original` bring an image-shaped output
back to the original size. Coordinates are continuous pixel edges (0 is the left edge
of the first pixel), the convention boxes use: resizing maps edges to edges, so the
inverse scale per axis is ``width / scaled_width`` exactly (not the ratio before
rounding the resized size).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image


RESIZE_MODES = ("resize_center_crop", "letterbox", "stretch", "none")
# The PIL filters a plan can resample with, by torchvision's InterpolationMode names:
# torchvision's ImageClassification presets use bilinear for most weights and bicubic
# for some (EfficientNet, ViT, Swin, RegNet's SWAG weights). On PIL images torchvision's
# Resize calls PIL's own resize with that filter (antialiased), so these match it.
RESAMPLE_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


class ResizeError(ValueError):
    """A resize mode that does not fit the model's input (e.g. ``none`` with a fixed size)."""


@dataclass(frozen=True)
class ResizePlan:
    """The geometry of one image's resize (see the module docstring); all sizes in pixels."""

    mode: str
    width: int
    height: int
    scaled_width: int
    scaled_height: int
    input_width: int
    input_height: int
    left: int = 0
    top: int = 0
    # resize_center_crop: the shorter side's size before the crop.
    resize_size: int = 0
    # How `apply` resizes in modes stretch and none: "pil" (antialiased, as torchvision's
    # Resize on PIL images) or "cv2" (INTER_LINEAR, no antialiasing).
    interpolation: str = "pil"
    # The PIL filter (a `RESAMPLE_FILTERS` key) of resize_center_crop and of "pil" resizes.
    resample: str = "bilinear"

    @property
    def resized(self) -> bool:
        return (self.scaled_width, self.scaled_height) != (self.width, self.height)

    # --- forward
    def apply(self, image: Image.Image) -> np.ndarray:
        """uint8 [3, input_height, input_width]: the model input for `image` (RGB, the
        plan's width x height)."""
        if image.size != (self.width, self.height):
            raise ValueError(f"the plan is for a {self.width}x{self.height} image, got {image.width}x{image.height}")
        if self.mode == "resize_center_crop":
            return resize_center_crop(image, self.resize_size, self.input_width, self.input_height, self.resample)
        if self.mode == "letterbox":
            return letterbox(image, self.input_width, self.input_height)
        if not self.resized:
            chw = to_chw(image)
        elif self.interpolation == "cv2":
            chw = cv2.resize(np.asarray(image), (self.scaled_width, self.scaled_height),
                             interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
        else:
            chw = resize_stretch(image, self.scaled_width, self.scaled_height, self.resample)
        return reflect_pad(np.ascontiguousarray(chw), self.input_height, self.input_width)

    # --- inverse
    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """``boxes`` [N, 4] (x1, y1, x2, y2) in model-input pixels -> original pixels, in
        the boxes' float dtype (float32 for anything else). Not clipped."""
        b = np.asarray(boxes)
        dtype = b.dtype if b.dtype == np.float64 else np.float32
        offset = np.array([self.left, self.top] * 2, dtype)
        scale = np.array([self.width / self.scaled_width, self.height / self.scaled_height] * 2, dtype)
        return (b.astype(dtype, copy=False) - offset) * scale

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """The inverse of `to_original`: original pixels -> model-input pixels, float32."""
        b = np.asarray(boxes, np.float32)
        offset = np.array([self.left, self.top] * 2, np.float32)
        scale = np.array([self.scaled_width / self.width, self.scaled_height / self.height] * 2, np.float32)
        return b * scale + offset

    def crop_output(self, output: np.ndarray) -> np.ndarray:
        """The part of an input-sized output [..., input_height, input_width] that covers
        the resized image ([..., scaled_height, scaled_width]): padding cropped away.
        Only for plans without a crop (stretch, none)."""
        if self.left < 0 or self.top < 0:
            raise ResizeError(f"a {self.mode} plan crops the image; its output cannot be mapped back whole")
        return output[..., self.top:self.top + self.scaled_height, self.left:self.left + self.scaled_width]

    def image_to_original(self, image: Image.Image) -> Image.Image:
        """A scaled_width x scaled_height image (e.g. a generator's cropped output) back
        at the original size (PIL bilinear), or as it is when nothing was resized."""
        return image.resize((self.width, self.height), Image.BILINEAR) if self.resized else image


def plan(mode: str, width: int, height: int, input_width: int, input_height: int, *, resize_size: int = 0,
         max_side: int = 0, multiple: int = 1, min_side: int = 1, shorter_side: int = 0,
         interpolation: str = "pil", resample: str = "bilinear") -> ResizePlan:
    """The plan for a `width` x `height` image and a model input of `input_width` x
    `input_height` (-1 each for a model that takes any size, mode ``none``).

    ``resize_size`` is resize_center_crop's shorter side. Mode ``none`` takes
    ``max_side``, ``multiple`` and ``min_side`` (0 / 1 / 1: unchanged), and
    ``shorter_side``: when set, the image is scaled (up or down) so that its shorter
    side is ``shorter_side`` and its longer side at most ``max_side``, torchvision
    GeneralizedRCNNTransform's rule (Fast R-CNN). ``resample`` is the PIL filter
    (`RESAMPLE_FILTERS`). Raises ResizeError when the mode and the input size disagree
    or the filter is unknown."""
    if resample not in RESAMPLE_FILTERS:
        raise ResizeError(f"unknown interpolation {resample!r} (known: {', '.join(RESAMPLE_FILTERS)})")
    variable = input_width <= 0 or input_height <= 0
    if (mode == "none") != variable:
        raise ResizeError(f"resize mode {mode!r} with input size {input_width}x{input_height}: 'none' needs a "
                          "variable size, every other mode a fixed one")
    if mode == "resize_center_crop":
        new_w, new_h = resized_size_shorter_side(width, height, resize_size)
        top = int(round((new_h - input_height) / 2.0))
        left = int(round((new_w - input_width) / 2.0))
        return ResizePlan(mode, width, height, new_w, new_h, input_width, input_height, -left, -top, resize_size,
                          resample=resample)
    if mode == "letterbox":
        new_w, new_h, left, top = letterbox_geometry(width, height, input_width, input_height)
        return ResizePlan(mode, width, height, new_w, new_h, input_width, input_height, left, top)
    if mode == "stretch":
        return ResizePlan(mode, width, height, input_width, input_height, input_width, input_height,
                          resample=resample)
    if mode == "none":
        scaled_w, scaled_h = width, height
        if shorter_side > 0:
            r = min(shorter_side / min(width, height), max_side / max(width, height) if max_side > 0 else np.inf)
            scaled_w, scaled_h = max(1, round(width * r)), max(1, round(height * r))
        elif max_side > 0 and max(width, height) > max_side:
            r = max_side / max(width, height)
            scaled_w = min(max_side, max(1, round(width * r)))
            scaled_h = min(max_side, max(1, round(height * r)))
        multiple, min_side = max(1, multiple), max(1, min_side)
        return ResizePlan(mode, width, height, scaled_w, scaled_h, _round_up(max(scaled_w, min_side), multiple),
                          _round_up(max(scaled_h, min_side), multiple), interpolation=interpolation,
                          resample=resample)
    raise ResizeError(f"unknown resize mode {mode!r} (known: {', '.join(RESIZE_MODES)})")


def letterbox_geometry(width: int, height: int, out_w: int, out_h: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, left pad, top pad) for letterboxing a
    width x height image into out_w x out_h, as Ultralytics' `LetterBox(center=True)`:
    scale ``r = min(out_h / height, out_w / width)``, size ``round(width * r)`` x
    ``round(height * r)``, centered; an odd leftover pixel goes right / bottom."""
    r = min(out_h / height, out_w / width)
    new_w = min(out_w, max(1, int(round(width * r))))
    new_h = min(out_h, max(1, int(round(height * r))))
    return new_w, new_h, (out_w - new_w) // 2, (out_h - new_h) // 2


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


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


# ------------------------------------------------------------- the transforms
def resized_size_shorter_side(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `size`, keeping the aspect
    ratio, rounded down as torchvision's `Resize(int)` does."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_center_crop(image: Image.Image, resize_size: int, crop_w: int, crop_h: int,
                       resample: str = "bilinear") -> np.ndarray:
    """torchvision `Resize(resize_size, interpolation=resample)` then
    `CenterCrop((crop_h, crop_w))` on a PIL image.

    Returns uint8 [3, crop_h, crop_w]. The crop is folded into the resize as a source
    box, so only the kept pixels are computed: each output pixel samples the same
    source positions as resize-then-crop would.
    """
    new_w, new_h = resized_size_shorter_side(image.width, image.height, resize_size)
    if new_w < crop_w or new_h < crop_h:
        raise ValueError(f"resize to {new_w}x{new_h} is smaller than the {crop_w}x{crop_h} crop")
    top = int(round((new_h - crop_h) / 2.0))
    left = int(round((new_w - crop_w) / 2.0))
    scale_x = image.width / new_w
    scale_y = image.height / new_h
    box = (left * scale_x, top * scale_y, (left + crop_w) * scale_x, (top + crop_h) * scale_y)
    # Pillow's filter support scales with box/size; with the box above it equals the
    # support of the full resize, hence the same weights as resize-then-crop.
    out = image.resize((crop_w, crop_h), RESAMPLE_FILTERS[resample], box=box)
    return to_chw(out)


def resize_stretch(image: Image.Image, width: int, height: int, resample: str = "bilinear") -> np.ndarray:
    """Resize to exactly width x height (PIL filter `resample`), ignoring the aspect
    ratio. uint8 [3, H, W]."""
    if image.size == (width, height):
        return to_chw(image)
    return to_chw(image.resize((width, height), RESAMPLE_FILTERS[resample]))


# Letterbox padding value: Ultralytics' gray, so padded borders look like its training data.
LETTERBOX_PAD = 114


def letterbox(image: Image.Image, out_w: int, out_h: int) -> np.ndarray:
    """Aspect-preserving resize into out_w x out_h, centered on gray (114) padding.

    Returns uint8 [3, out_h, out_w]. The resize is OpenCV's ``INTER_LINEAR`` (bilinear,
    half-pixel centers, no antialiasing), exactly what Ultralytics' LetterBox runs, so
    an Ultralytics-trained model sees the pixels it was trained and validated on. The
    geometry is `letterbox_geometry`; `letterbox_placement` inverts it."""
    new_w, new_h, left, top = letterbox_geometry(image.width, image.height, out_w, out_h)
    pixels = np.asarray(image, dtype=np.uint8)
    if (new_w, new_h) != image.size:
        pixels = cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = np.full((3, out_h, out_w), LETTERBOX_PAD, np.uint8)
    out[:, top:top + new_h, left:left + new_w] = pixels.transpose(2, 0, 1)
    return out


def to_chw(image: Image.Image) -> np.ndarray:
    """uint8 [3, H, W] from an RGB image."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))

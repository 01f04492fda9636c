"""Segmentation: semantic label maps (U-Net, SegNet) and instance masks (Mask R-CNN).

One RPC serves both; the model's spec task picks the pipeline.

Semantic (`semantic_segmentation`, output layout `logits_nchw`): the image is stretched
to the model's input size; the model returns logits [C, h, w]. The label map is made at
the ORIGINAL (EXIF-upright) size by resizing the logits bilinearly
(align_corners=False) and taking the per-pixel argmax. Why this method and not nearest
upsampling of the model-resolution class ids: it is the rule segmentation models are
evaluated with (torchvision's FCN/DeepLab heads interpolate logits, not ids), so class
boundaries come out smooth and where the model put them, not as blocky steps of the
model's pixel grid. Its naive cost, C x H x W floats, is avoided:
`masks.upsample_argmax` takes the argmax at model resolution and interpolates in full
only the pixels on class boundaries; the result equals torch's
``F.interpolate(..., "bilinear").argmax(1)`` (see there for the two near-tie caveats).
Per-class pixel counts come with it, for the classes present only.

Instance (`instance_segmentation`, output layout `rcnn_candidates`): the model takes
the upright image as it is (uint8 [3, H, W]; it resizes and normalizes itself) and
returns per-class candidates before the final NMS, best first:

    boxes__0  float32 [K, 4]   (x1, y1, x2, y2) in input (= original) pixels
    scores__1 float32 [K]
    labels__2 int64   [K]      the model's class index (COCO: 91 entries)
    count__3  int32   [1]      valid rows; rows past it are zero padding
    masks__4  float32 [K, 28, 28]  mask probabilities of each candidate's own class

The gateway keeps the valid rows, selects with `boxes.select_detections` (score >
threshold, class-aware NMS, top N), then pastes ONLY the kept masks into the original
image (torchvision's `paste_masks_in_image`, threshold 0.5) and encodes them: COCO
uncompressed RLE (column-major runs, zeros first) or a 1-bit PNG. Masks are pasted with
the model's own boxes, as torchvision does; the boxes returned are clipped to the image.

Request fields: `score_threshold`, `iou_threshold`, `max_detections` and `mask_format`
are validated for every model (a bad value is INVALID_ARGUMENT naming the field), and
semantic models ignore them: one request works against any segmentation model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import masks
from ..boxes import clip_boxes, select_detections
from ..errors import FailedPrecondition, InvalidArgument
from ..imaging import Decoded, resize_stretch, to_chw
from ..spec import ModelSpec
from .classification import LabelScore, label_name
from .common import Task, Tensors

SEMANTIC_LAYOUT = "logits_nchw"
INSTANCE_LAYOUT = "rcnn_candidates"
# The rcnn_candidates contract's output names.
BOXES, SCORES, LABELS, COUNT, MASKS = "boxes__0", "scores__1", "labels__2", "count__3", "masks__4"
INSTANCE_OUTPUTS = (BOXES, SCORES, LABELS, COUNT, MASKS)
# Defaults when neither the request nor the model's spec options set them: torchvision
# Mask R-CNN's `box_score_thresh`, `box_nms_thresh` and `box_detections_per_img`.
DEFAULT_SCORE_THRESHOLD = 0.05
DEFAULT_IOU_THRESHOLD = 0.5
DEFAULT_MAX_DETECTIONS = 100
MASK_FORMATS = ("rle", "png")


@dataclass(frozen=True)
class ClassPixels:
    """A class present in the label map: its label (score = its share of the image's
    pixels) and its pixel count."""

    label: LabelScore
    pixels: int


@dataclass(frozen=True)
class Instance:
    """One kept instance: box (x1, y1, x2, y2) in original pixels, clipped to the image;
    its label and score; its mask as RLE counts (``rle``) or PNG bytes (``png``)."""

    box: tuple[float, float, float, float]
    label: LabelScore
    rle: list[int] | None = None
    png: bytes | None = None


@dataclass(frozen=True)
class SegmentationResult:
    """One image's answer; width/height are the original (upright) size."""

    width: int
    height: int
    label_map_png: bytes = b""
    classes: list[ClassPixels] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)


@dataclass(frozen=True)
class InstanceOptions:
    score_threshold: float
    iou_threshold: float
    max_detections: int
    mask_format: str


# ------------------------------------------------------------------------ options
def _unit_interval(value, field_name: str) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidArgument(field_name, f"must lie in [0, 1], got {value}")
    return value


def resolve_options(request: dict[str, Any], spec: ModelSpec) -> InstanceOptions:
    """Validate the request's fields (INVALID_ARGUMENT naming the field) and fill the
    unset ones from the model's spec options, then the defaults above.

    request: ``mask_format`` (None = unspecified = RLE, "rle", "png", anything else is
    refused), ``score_threshold`` and ``iou_threshold`` (None or a float in [0, 1]),
    ``max_detections`` (None or >= 1)."""
    mask_format = request.get("mask_format") or "rle"
    if mask_format not in MASK_FORMATS:
        raise InvalidArgument("mask_format", f"unknown mask format {mask_format!r} (use RLE or PNG)")
    score = _unit_interval(request.get("score_threshold"), "score_threshold")
    iou = _unit_interval(request.get("iou_threshold"), "iou_threshold")
    max_detections = request.get("max_detections")
    if max_detections is not None and int(max_detections) < 1:
        raise InvalidArgument("max_detections", f"must be at least 1, got {max_detections}")
    return InstanceOptions(
        score_threshold=score if score is not None else
        float(spec.option("score_threshold", str(DEFAULT_SCORE_THRESHOLD))),
        iou_threshold=iou if iou is not None else float(spec.option("iou_threshold", str(DEFAULT_IOU_THRESHOLD))),
        max_detections=int(max_detections) if max_detections is not None else
        int(spec.option("max_detections", str(DEFAULT_MAX_DETECTIONS))),
        mask_format=mask_format,
    )


# ----------------------------------------------------------------------- semantic
def semantic_input(decoded: Decoded, spec: ModelSpec) -> np.ndarray:
    """uint8 [3, h, w]: the image stretched to the model's input size (`stretch`), or
    as it is for a model that takes any size (`none`)."""
    if spec.resize_mode == "stretch":
        return resize_stretch(decoded.image, spec.input_width, spec.input_height)
    if spec.resize_mode == "none" and spec.input_width < 0 and spec.input_height < 0:
        return to_chw(decoded.image)
    raise FailedPrecondition(f"model {spec.name!r}: semantic segmentation needs resize mode stretch (or none "
                             f"with a variable input size), not {spec.resize_mode!r}")


def semantic_result(logits: np.ndarray, spec: ModelSpec, width: int, height: int) -> SegmentationResult:
    """Label map PNG and per-class pixel counts at width x height from one image's
    logits [C, h, w] (model resolution)."""
    if logits.ndim != 3 or logits.shape[0] != len(spec.labels):
        raise FailedPrecondition(f"model {spec.name!r} returned logits of shape {list(logits.shape)}; "
                                 f"expected [{len(spec.labels)}, H, W] for its {len(spec.labels)} labels")
    label_map = masks.upsample_argmax(logits, height, width)
    counts = np.bincount(label_map.ravel(), minlength=logits.shape[0])
    total = float(height * width)
    present = np.flatnonzero(counts)
    classes = [ClassPixels(LabelScore(int(c), label_name(spec, int(c)), float(counts[c] / total)), int(counts[c]))
               for c in present]
    return SegmentationResult(width, height, masks.label_map_png(label_map), classes)


class SemanticSegmentation(Task):
    tasks = ("semantic_segmentation",)

    def options(self, request, spec):
        resolve_options(request, spec)  # validated, then ignored: no instance fields apply
        return None

    def preprocess(self, decoded, spec, options) -> Tensors:
        return {spec.image_input.name: semantic_input(decoded, spec)[None]}

    def postprocess(self, outputs, spec, decoded, options) -> SegmentationResult:
        logits = outputs[spec.outputs[0].name][0]
        return semantic_result(logits, spec, decoded.width, decoded.height)


# ----------------------------------------------------------------------- instance
def check_instance_spec(spec: ModelSpec) -> None:
    names = {t.name for t in spec.outputs}
    missing = [n for n in INSTANCE_OUTPUTS if n not in names]
    if spec.output_layout != INSTANCE_LAYOUT or missing:
        raise FailedPrecondition(f"model {spec.name!r} does not follow the {INSTANCE_LAYOUT} layout "
                                 f"(layout {spec.output_layout!r}, missing outputs {missing})")
    if spec.resize_mode != "none":
        raise FailedPrecondition(f"model {spec.name!r}: instance segmentation models resize the image "
                                 f"themselves (resize mode none), not {spec.resize_mode!r}")


def select_instances(outputs: Tensors, options: InstanceOptions) -> tuple[np.ndarray, ...]:
    """One image's kept candidates: (boxes [N, 4], scores [N], labels [N], masks
    [N, M, M]), best first. ``outputs`` holds the rcnn_candidates tensors with the item
    axis first (one item)."""
    boxes = np.asarray(outputs[BOXES][0], dtype=np.float32).reshape(-1, 4)
    count = int(np.asarray(outputs[COUNT]).reshape(-1)[0])
    count = min(max(count, 0), boxes.shape[0])
    boxes = boxes[:count]
    scores = np.asarray(outputs[SCORES][0], dtype=np.float32)[:count]
    labels = np.asarray(outputs[LABELS][0]).astype(np.int64, copy=False)[:count]
    keep = select_detections(boxes, scores, labels, score_threshold=options.score_threshold,
                             iou_threshold=options.iou_threshold, max_detections=options.max_detections)
    return boxes[keep], scores[keep], labels[keep], np.asarray(outputs[MASKS][0][keep], dtype=np.float32)


def instance_result(outputs: Tensors, spec: ModelSpec, width: int, height: int,
                    options: InstanceOptions) -> SegmentationResult:
    """The kept instances of one image, each with its mask pasted at width x height
    and encoded as ``options.mask_format`` says. Only kept candidates are pasted, and
    only inside their boxes (RLE) or one at a time (PNG)."""
    boxes, scores, labels, probs = select_instances(outputs, options)
    if options.mask_format == "rle":
        encoded = [{"rle": c} for c in masks.paste_and_encode(probs, boxes, height, width)]
    else:
        encoded = [{"png": masks.encode_png_mask(masks.paste_masks(probs[i:i + 1], boxes[i:i + 1], height, width)[0])}
                   for i in range(len(boxes))]
    clipped = clip_boxes(boxes, width, height)
    instances = [
        Instance(tuple(float(v) for v in box), LabelScore(int(label), label_name(spec, int(label)), float(score)),
                 **mask)
        for box, score, label, mask in zip(clipped, scores, labels, encoded)
    ]
    return SegmentationResult(width, height, instances=instances)


class InstanceSegmentation(Task):
    tasks = ("instance_segmentation",)

    def options(self, request, spec):
        check_instance_spec(spec)
        return resolve_options(request, spec)

    def preprocess(self, decoded, spec, options) -> Tensors:
        return {spec.image_input.name: to_chw(decoded.image)[None]}

    def postprocess(self, outputs, spec, decoded, options) -> SegmentationResult:
        return instance_result(outputs, spec, decoded.width, decoded.height, options)


# ------------------------------------------------------------------------ the RPC
class Segmentation(Task):
    """What the Segment RPC runs: the semantic or the instance pipeline, by the
    model's task."""

    tasks = SemanticSegmentation.tasks + InstanceSegmentation.tasks

    def __init__(self):
        self.by_task = {t: task for task in (SemanticSegmentation(), InstanceSegmentation()) for t in task.tasks}

    def options(self, request, spec):
        return self.by_task[spec.task].options(request, spec)

    def preprocess(self, decoded, spec, options) -> Tensors:
        return self.by_task[spec.task].preprocess(decoded, spec, options)

    def postprocess(self, outputs, spec, decoded, options) -> SegmentationResult:
        return self.by_task[spec.task].postprocess(outputs, spec, decoded, options)


TASK = Segmentation()

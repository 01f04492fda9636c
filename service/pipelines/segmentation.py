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

Instance (`instance_segmentation`, output layout `rcnn_candidates`, its tensors in
`layouts.LAYOUTS`): the model takes the upright image as it is (uint8 [3, H, W]; it
resizes and normalizes itself) and returns per-class candidates before the final NMS,
best first, with each candidate's mask probabilities [M, M].

The gateway decodes and selects exactly as Detect does (`detection.candidates` and
`detection.select`: score > threshold, class-aware NMS, top N), then pastes ONLY the kept masks into the original
image (torchvision's `paste_masks_in_image`, threshold 0.5) and encodes them: COCO
uncompressed RLE (column-major runs, zeros first) or a 1-bit PNG. Masks are pasted with
the model's own boxes, as torchvision does; the boxes returned are clipped to the image.

Request fields: `score_threshold`, `iou_threshold`, `max_detections` and `mask_format`
are validated for every model as Detect validates them (a bad value is
INVALID_ARGUMENT naming the field), and semantic models ignore them: one request works
against any segmentation model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import FailedPrecondition, InvalidArgument
from ..ops import masks
from ..spec import ModelSpec
from . import detection
from .classification import LabelScore
from .common import Context, Task, Tensors, check_layout, label_name, resized_inputs

MASK_FORMATS = ("rle", "png")


@dataclass(frozen=True)
class ClassPixels:
    """A class present in the label map: its label (score = its share of the image's
    pixels) and its pixel count."""

    label: LabelScore
    pixels: int


@dataclass(frozen=True)
class SegmentationResult:
    """One image's answer; width/height are the original (upright) size. Semantic
    models fill the label map and classes, instance models `instances` (detections
    with masks)."""

    width: int
    height: int
    label_map_png: bytes = b""
    classes: list[ClassPixels] = field(default_factory=list)
    instances: detection.Detections | None = None


@dataclass(frozen=True)
class InstanceOptions:
    detect: detection.DetectOptions
    mask_format: str


# ------------------------------------------------------------------------ options
def mask_format(request: dict) -> str:
    """The request's mask format: None (unspecified) = RLE, "rle", "png"; anything else
    is refused naming `mask_format`."""
    value = request.get("mask_format") or "rle"
    if value not in MASK_FORMATS:
        raise InvalidArgument("mask_format", f"unknown mask format {value!r} (use RLE or PNG)")
    return value


# ----------------------------------------------------------------------- semantic
def semantic_result(logits: np.ndarray, spec: ModelSpec, width: int, height: int) -> SegmentationResult:
    """Label map PNG and per-class pixel counts at width x height from one image's
    logits [C, h, w] (the resized image's part of the model's output)."""
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
        check_layout(spec, "semantic_segmentation")
        mask_format(request)  # validated, then ignored: no instance fields apply
        detection.check_request(request)
        if spec.resize_mode not in ("stretch", "none"):
            raise FailedPrecondition(f"model {spec.name!r}: semantic segmentation needs resize mode stretch (or "
                                     f"none with a variable input size), not {spec.resize_mode!r}")
        return None

    def preprocess(self, decoded, spec, options):
        return resized_inputs(decoded, spec)

    def postprocess(self, outputs, context, spec, options) -> SegmentationResult:
        logits = context.plan.crop_output(outputs[spec.outputs[0].name][0])
        return semantic_result(logits, spec, context.width, context.height)


# ----------------------------------------------------------------------- instance
def instance_result(outputs: Tensors, context: Context, spec: ModelSpec,
                    options: InstanceOptions) -> SegmentationResult:
    """The kept instances of one image, each with its mask pasted at the original size
    and encoded as ``options.mask_format`` says. Only kept candidates are pasted, and
    only inside their boxes (RLE) or one at a time (PNG)."""
    kept = detection.select(detection.candidates(outputs, spec, context), options.detect, context)
    height, width = context.height, context.width
    if options.mask_format == "rle":
        encoded = tuple({"rle": c} for c in masks.paste_and_encode(kept.masks, kept.boxes, height, width))
    else:
        encoded = tuple(
            {"png": masks.encode_png_mask(masks.paste_masks(kept.masks[i:i + 1], kept.boxes[i:i + 1], height,
                                                            width)[0])}
            for i in range(len(kept.boxes)))
    return SegmentationResult(width, height, instances=detection.detections(kept, spec, context, encoded))


class InstanceSegmentation(Task):
    tasks = ("instance_segmentation",)

    def options(self, request, spec):
        check_layout(spec, "instance_segmentation")
        missing = [n for n in spec.layout.output_names if n not in {t.name for t in spec.outputs}]
        if missing or spec.resize_mode != "none":
            raise FailedPrecondition(f"model {spec.name!r} does not follow the {spec.output_layout} layout of "
                                     f"instance segmentation (missing outputs {missing}, resize mode "
                                     f"{spec.resize_mode!r}: the model resizes the image itself, mode none)")
        return InstanceOptions(detection.resolve_options(request, spec), mask_format(request))

    def preprocess(self, decoded, spec, options):
        return detection.preprocess(decoded, spec)

    def postprocess(self, outputs, context, spec, options) -> SegmentationResult:
        return instance_result(outputs, context, spec, options)


# ------------------------------------------------------------------------ the RPC
class Segmentation(Task):
    """What the Segment RPC runs: the semantic or the instance pipeline, by the
    model's task."""

    tasks = SemanticSegmentation.tasks + InstanceSegmentation.tasks

    def __init__(self):
        self.by_task = {t: task for task in (SemanticSegmentation(), InstanceSegmentation()) for t in task.tasks}

    def options(self, request, spec):
        return self.by_task[spec.task].options(request, spec)

    def preprocess(self, decoded, spec, options):
        return self.by_task[spec.task].preprocess(decoded, spec, options)

    def postprocess(self, outputs, context, spec, options) -> SegmentationResult:
        return self.by_task[spec.task].postprocess(outputs, context, spec, options)


TASK = Segmentation()

"""Detection: resize as the spec says, decode the model's layout, select, map back.

Detect and instance Segment share this module: one options resolver, one decoder per
output layout (`layouts`), one selection and one result type (`Detections`).

Per image, in this order (the API's):
  1. decode the output layout to candidates: boxes (x1, y1, x2, y2), one score and
     one class per candidate (`layouts.decode_candidates` in model-input pixels,
     `layouts.decode_regions` in original pixels for the region formats);
  2. ``score > score_threshold``;
  3. the ``class_ids`` filter (empty: every class);
  4. class-aware NMS (IoU > iou_threshold suppresses; `boxes.batched_nms`), or one NMS
     over all classes when the model's ``class_agnostic`` option is true;
  5. the first ``max_detections``, by decreasing score;
  6. boxes mapped to the original (EXIF-upright) image's pixels (the resize plan's
     inverse) and clipped to it.

The layouts and their tensors are described in `layouts.LAYOUTS`. All numpy,
vectorized: no loop over candidates or boxes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgument
from ..ops.boxes import clip_boxes, select_detections
from ..ops.imaging import Decoded
from ..spec import ModelSpec
from . import layouts
from .common import Context, Task, Tensors, check_layout, resized_inputs, unit_interval
from .regions import REGION_INPUTS


@dataclass(frozen=True)
class DetectOptions:
    """A request's detection options, validated, with the model's defaults filled in."""

    score_threshold: float
    iou_threshold: float
    max_detections: int
    class_ids: tuple[int, ...] = ()
    class_agnostic: bool = False


@dataclass(frozen=True)
class Detections:
    """One image's detections, best first: ``boxes`` float32 [K, 4] (x1, y1, x2, y2) in
    original-image pixels, clipped; ``scores`` float32 [K]; ``labels`` int64 [K] (the
    model's class indices); ``names`` their labels; the original image size; for
    instance segmentation ``masks``, one encoded mask per detection (``{"rle": counts}``
    or ``{"png": bytes}``, at the original size), else None."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]
    width: int
    height: int
    masks: tuple[dict, ...] | None = None


# ----------------------------------------------------------------------- options
def check_request(request: dict) -> tuple[float | None, float | None, int | None]:
    """The request's score_threshold, iou_threshold (each in [0, 1]) and max_detections
    (1 to the cap), validated without a model (None: unset)."""
    score = unit_interval(request.get("score_threshold"), "score_threshold")
    iou = unit_interval(request.get("iou_threshold"), "iou_threshold")
    max_det = request.get("max_detections")
    if max_det is not None and not 1 <= max_det <= layouts.MAX_DETECTIONS_CAP:
        raise InvalidArgument("max_detections", f"must be in [1, {layouts.MAX_DETECTIONS_CAP}], got {max_det}")
    return score, iou, max_det


def resolve_options(request: dict, spec: ModelSpec) -> DetectOptions:
    """Validate score_threshold, iou_threshold, max_detections and class_ids against the
    model; unset fields take the model's defaults (its parsed spec options, whose own
    defaults are its layout's)."""
    score, iou, max_det = check_request(request)
    settings = spec.settings
    class_ids = tuple(int(c) for c in request.get("class_ids") or ())
    n_labels = len(spec.labels)
    for i, c in enumerate(class_ids):
        if not 0 <= c < n_labels:
            raise InvalidArgument(f"class_ids[{i}]", f"{c} is not a class of model {spec.name!r} "
                                  f"(valid: 0 to {n_labels - 1})")
    return DetectOptions(settings.score_threshold if score is None else score,
                         settings.iou_threshold if iou is None else iou,
                         settings.max_detections if max_det is None else int(max_det),
                         class_ids, settings.class_agnostic)


# ------------------------------------------------------------------- the steps
def preprocess(decoded: Decoded, spec: ModelSpec) -> tuple[Tensors, Context]:
    """The model's inputs for one image and its context: the region formats' proposals
    and warps (`regions`), or the image resized as the spec's resize plan says."""
    region_inputs = REGION_INPUTS.get(spec.output_layout)
    if region_inputs is not None:
        return region_inputs(decoded, spec)
    return resized_inputs(decoded, spec)


def candidates(outputs: Tensors, spec: ModelSpec, context: Context,
               score_threshold: float | None = None) -> layouts.Candidates:
    """Step 1: one image's outputs (item axis first) -> its candidates."""
    if context.proposals is not None:  # rcnn_regions: [P, ...] items; fast_rcnn: [1, R, ...], R >= P
        logits, deltas = (outputs[t.name] for t in spec.outputs[:2])
        p = len(context.proposals)
        return layouts.decode_regions(logits.reshape(-1, logits.shape[-1])[:p],
                                      deltas.reshape(-1, deltas.shape[-1])[:p], context.proposals,
                                      context.width, context.height)
    return layouts.decode_candidates(outputs, spec.output_layout, tuple(t.name for t in spec.outputs),
                                     score_threshold)


def select(found: layouts.Candidates, options: DetectOptions, context: Context) -> layouts.Candidates:
    """Steps 2-5, then the kept boxes in original pixels (not clipped: instance masks
    are pasted with the model's own boxes, as torchvision does)."""
    keep = select_detections(found.boxes, found.scores, found.labels, score_threshold=options.score_threshold,
                             iou_threshold=options.iou_threshold, max_detections=options.max_detections,
                             class_ids=options.class_ids, class_agnostic=options.class_agnostic)
    kept = found.take(keep)
    if kept.space == "input":
        kept = layouts.Candidates(context.plan.to_original(kept.boxes), kept.scores, kept.labels, kept.masks,
                                  "original")
    return kept


def label_names(spec: ModelSpec, labels: np.ndarray) -> tuple[str, ...]:
    """Label names for class indices; an index outside the labels is named by its number."""
    names = np.asarray(spec.labels + ("",), dtype=object)
    known = (labels >= 0) & (labels < len(spec.labels))
    out = names[np.where(known, labels, len(spec.labels))]
    out[~known] = labels[~known].astype(str)
    return tuple(out)


def detections(kept: layouts.Candidates, spec: ModelSpec, context: Context,
               masks: tuple[dict, ...] | None = None) -> Detections:
    """Step 6's clip, and the answer."""
    return Detections(clip_boxes(kept.boxes, context.width, context.height),
                      kept.scores.astype(np.float32, copy=False), kept.labels.astype(np.int64, copy=False),
                      label_names(spec, kept.labels), context.width, context.height, masks)


def postprocess(outputs: Tensors, context: Context, spec: ModelSpec, options: DetectOptions) -> Detections:
    kept = select(candidates(outputs, spec, context, options.score_threshold), options, context)
    return detections(kept, spec, context)


class Detection(Task):
    tasks = ("detection",)

    def options(self, request, spec):
        check_layout(spec, "detection")
        return resolve_options(request, spec)

    def preprocess(self, decoded, spec, options):
        return preprocess(decoded, spec)

    def postprocess(self, outputs, context, spec, options):
        return postprocess(outputs, context, spec, options)


TASK = Detection()

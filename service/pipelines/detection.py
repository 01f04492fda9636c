"""Detection: resize as the spec says, decode the model's layout, select, map back.

Per image, in this order (the API's):
  1. decode the output layout to candidate boxes (x1, y1, x2, y2, model-input pixels),
     one score and one class per candidate;
  2. ``score > score_threshold``;
  3. the ``class_ids`` filter (empty: every class);
  4. class-aware NMS (IoU > iou_threshold suppresses; `boxes.batched_nms`), or one NMS
     over all classes when the model's ``class_agnostic`` option is true;
  5. the first ``max_detections``, by decreasing score;
  6. boxes mapped to the original (EXIF-upright) image's pixels and clipped to it.

Output layouts (`spec.output_layout`):
  ``yolov8``          one float [4 + C, A] output: cx, cy, w, h in input pixels, then C
                      class scores (Ultralytics' export). Each candidate keeps its best
                      class, as Ultralytics' non-multi-label NMS does.
  ``yolov5``          one float [A, 5 + C] output: cx, cy, w, h, objectness, C class
                      scores; score = objectness x class score, best class per candidate.
  ``rcnn_candidates`` ``boxes__0`` [K, 4] (x1, y1, x2, y2, input pixels), ``scores__1``
                      [K], ``labels__2`` [K] int64, ``count__3`` [1] valid rows (the rest
                      is padding): per-class candidates before NMS (Faster/Mask R-CNN).
  ``rcnn_regions``,   R-CNN and Fast R-CNN over selective search proposals: their own
  ``fast_rcnn``       preprocess and decoding (`pipelines/regions.py`), then steps 2-5,
                      in original pixels.

All numpy, vectorized: no loop over candidates or boxes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..boxes import clip_boxes, select_detections
from ..errors import FailedPrecondition, InvalidArgument
from ..imaging import (IDENTITY, Decoded, Placement, center_crop_placement, letterbox, letterbox_placement,
                       resize_center_crop, resize_stretch, stretch_placement, to_chw)
from ..spec import ModelSpec
from .common import Task, Tensors
from .regions import LAYOUTS as REGION_LAYOUTS

LAYOUTS = ("yolov8", "yolov5", "rcnn_candidates", *REGION_LAYOUTS)
# Defaults when neither the request nor the model's spec options say otherwise
# (torchvision's RoIHeads defaults).
DEFAULT_SCORE_THRESHOLD = 0.05
DEFAULT_IOU_THRESHOLD = 0.5
DEFAULT_MAX_DETECTIONS = 100
# Upper bound on max_detections: keeps responses bounded whatever a client asks.
MAX_DETECTIONS_CAP = 1000
# rcnn_candidates tensor names (the contract with the exported R-CNN models).
RCNN_BOXES, RCNN_SCORES, RCNN_LABELS, RCNN_COUNT = "boxes__0", "scores__1", "labels__2", "count__3"


@dataclass(frozen=True)
class DetectOptions:
    score_threshold: float
    iou_threshold: float
    max_detections: int
    class_ids: tuple[int, ...] = ()
    class_agnostic: bool = False


@dataclass(frozen=True)
class Detections:
    """One image's detections, best first: ``boxes`` float32 [K, 4] (x1, y1, x2, y2) in
    original-image pixels, clipped; ``scores`` float32 [K]; ``labels`` int64 [K] (the
    model's class indices); ``names`` their labels; the original image size."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]
    width: int
    height: int


@dataclass(frozen=True)
class Kept:
    """What `detect_candidates` keeps: ``indices`` int64 [K] into the candidates, best
    first, and their boxes (original pixels, clipped), scores and labels."""

    indices: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


# ----------------------------------------------------------------------- options
def _truthy(text: str | None) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes", "on")


def _unit_interval(value: float | None, field: str, default: str | None, fallback: float) -> float:
    if value is None:
        return float(default) if default is not None else fallback
    if not (0.0 <= value <= 1.0):  # also refuses NaN
        raise InvalidArgument(field, f"must be in [0, 1], got {value}")
    return float(value)


def resolve_options(request: dict, spec: ModelSpec) -> DetectOptions:
    """Validate score_threshold, iou_threshold, max_detections and class_ids against the
    model; unset fields take the model's defaults (its spec options)."""
    score = _unit_interval(request.get("score_threshold"), "score_threshold", spec.option("score_threshold"),
                           DEFAULT_SCORE_THRESHOLD)
    iou = _unit_interval(request.get("iou_threshold"), "iou_threshold", spec.option("iou_threshold"),
                         DEFAULT_IOU_THRESHOLD)
    max_det = request.get("max_detections")
    if max_det is None:
        max_det = min(int(spec.option("max_detections", str(DEFAULT_MAX_DETECTIONS))), MAX_DETECTIONS_CAP)
    elif not 1 <= max_det <= MAX_DETECTIONS_CAP:
        raise InvalidArgument("max_detections", f"must be in [1, {MAX_DETECTIONS_CAP}], got {max_det}")
    class_ids = tuple(int(c) for c in request.get("class_ids") or ())
    n_labels = len(spec.labels)
    for i, c in enumerate(class_ids):
        if not 0 <= c < n_labels:
            raise InvalidArgument(f"class_ids[{i}]", f"{c} is not a class of model {spec.name!r} "
                                  f"(valid: 0 to {n_labels - 1})")
    return DetectOptions(score, iou, int(max_det), class_ids, _truthy(spec.option("class_agnostic")))


# -------------------------------------------------------------------- geometry
def _max_side(spec: ModelSpec) -> int:
    return int(spec.option("max_input_side", "0") or 0)


def placement(spec: ModelSpec, width: int, height: int) -> Placement:
    """How an original width x height image lies in this model's input (see
    `imaging.Placement`); a pure function of the sizes, so postprocess recomputes it."""
    mode = spec.resize_mode
    if mode == "letterbox":
        return letterbox_placement(width, height, spec.input_width, spec.input_height)
    if mode == "stretch":
        return stretch_placement(width, height, spec.input_width, spec.input_height)
    if mode == "resize_center_crop":
        return center_crop_placement(width, height, spec.resize_size, spec.input_width, spec.input_height)
    if mode == "none":
        out_w, out_h = _downscaled(spec, width, height)
        return IDENTITY if (out_w, out_h) == (width, height) else stretch_placement(width, height, out_w, out_h)
    raise InvalidArgument("model", f"detection does not support resize mode {mode!r}")


def _downscaled(spec: ModelSpec, width: int, height: int) -> tuple[int, int]:
    """For resize_mode none: the size sent to the model. Unchanged unless the longer
    side exceeds the spec option ``max_input_side`` (the model resizes internally
    anyway; this only bounds the bytes sent)."""
    limit = _max_side(spec)
    if limit <= 0 or max(width, height) <= limit:
        return width, height
    r = limit / max(width, height)
    return max(1, round(width * r)), max(1, round(height * r))


def preprocess(decoded: Decoded, spec: ModelSpec) -> np.ndarray:
    """uint8 [3, H, W] as the spec's resize mode says."""
    image = decoded.image
    mode = spec.resize_mode
    if (mode == "none") != (spec.input_width <= 0 or spec.input_height <= 0):
        raise FailedPrecondition(f"model {spec.name!r} has resize mode {mode!r} but input size "
                                 f"{spec.input_width}x{spec.input_height}: 'none' needs a variable size, "
                                 "every other mode a fixed one")
    if mode == "letterbox":
        return letterbox(image, spec.input_width, spec.input_height)
    if mode == "stretch":
        return resize_stretch(image, spec.input_width, spec.input_height)
    if mode == "resize_center_crop":
        return resize_center_crop(image, spec.resize_size, spec.input_width, spec.input_height)
    if mode == "none":
        size = _downscaled(spec, image.width, image.height)
        return to_chw(image) if size == image.size else resize_stretch(image, *size)
    raise InvalidArgument("model", f"detection does not support resize mode {mode!r}")


# -------------------------------------------------------------------- decoding
def xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    """[N, 4] (cx, cy, w, h) -> [N, 4] (x1, y1, x2, y2), float32."""
    xywh = xywh.astype(np.float32, copy=False).reshape(-1, 4)
    half = xywh[:, 2:] / 2
    return np.concatenate([xywh[:, :2] - half, xywh[:, :2] + half], axis=1)


def _best_class(class_scores: np.ndarray, axis: int, score_threshold: float | None):
    """The rows (along `axis` of [C, A] or [A, C] scores) whose best score is above the
    threshold (all rows when None), with that score and its class (the first on ties).
    The max is taken over every row; the slower argmax only over the rows kept."""
    best = class_scores.max(axis=axis)
    rows = np.flatnonzero(best > score_threshold) if score_threshold is not None else np.arange(len(best))
    labels = np.take(class_scores, rows, axis=1 - axis).argmax(axis=axis)
    return rows, best[rows].astype(np.float32, copy=False), labels.astype(np.int64)


def decode(outputs: Tensors, spec: ModelSpec, score_threshold: float | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image's outputs (item axis first, one item) -> its candidates: boxes float32
    [K, 4] (x1, y1, x2, y2, input pixels), scores float32 [K], labels int64 [K], and
    rows int64 [K], each candidate's row (anchor) in the model's output.

    With `score_threshold`, only candidates scoring above it are decoded (step 2 done
    early: a YOLO output has thousands of anchors and few candidates)."""
    layout = spec.output_layout
    if layout == "yolov8":
        pred = outputs[spec.outputs[0].name][0]       # [4 + C, A]
        rows, scores, labels = _best_class(pred[4:], 0, score_threshold)
        return xywh_to_xyxy(pred[:4, rows].T), scores, labels, rows
    if layout == "yolov5":
        pred = outputs[spec.outputs[0].name][0]       # [A, 5 + C]
        rows, scores, labels = _best_class(pred[:, 5:] * pred[:, 4:5], 1, score_threshold)
        return xywh_to_xyxy(pred[rows, :4]), scores, labels, rows
    if layout == "rcnn_candidates":
        count = int(outputs[RCNN_COUNT].reshape(-1)[0])
        scores = outputs[RCNN_SCORES][0, :count].astype(np.float32, copy=False)
        rows = np.flatnonzero(scores > score_threshold) if score_threshold is not None else np.arange(count)
        return (outputs[RCNN_BOXES][0, rows].astype(np.float32, copy=False), scores[rows],
                outputs[RCNN_LABELS][0, rows].astype(np.int64, copy=False), rows)
    raise InvalidArgument("model", f"unknown detection output layout {layout!r} (known: {', '.join(LAYOUTS)})")


# ------------------------------------------------------------------- selection
def detect_candidates(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, options: DetectOptions,
                      where: Placement, width: int, height: int) -> Kept:
    """Steps 2-6 for one image's candidates (boxes [A, 4] in input pixels): threshold,
    class filter, NMS and top-N in input space (`boxes.select_detections`), then the
    kept boxes mapped to the original width x height image and clipped. Instance
    segmentation calls this too, and pastes masks for the kept rows only: with `decode`'s
    ``rows``, ``rows[kept.indices]`` are the model's output rows (``masks__4`` rows)."""
    keep = select_detections(boxes, scores, labels, score_threshold=options.score_threshold,
                             iou_threshold=options.iou_threshold, max_detections=options.max_detections,
                             class_ids=options.class_ids, class_agnostic=options.class_agnostic)
    kept_boxes = clip_boxes(where.to_original(boxes[keep]), width, height)
    return Kept(keep, kept_boxes, scores[keep].astype(np.float32, copy=False), labels[keep])


def label_names(spec: ModelSpec, labels: np.ndarray) -> tuple[str, ...]:
    """Label names for class indices; an index outside the labels is named by its number."""
    names = np.asarray(spec.labels + ("",), dtype=object)
    known = (labels >= 0) & (labels < len(spec.labels))
    out = names[np.where(known, labels, len(spec.labels))]
    out[~known] = labels[~known].astype(str)
    return tuple(out)


def postprocess(outputs: Tensors, spec: ModelSpec, decoded: Decoded, options: DetectOptions) -> Detections:
    boxes, scores, labels, _ = decode(outputs, spec, options.score_threshold)
    kept = detect_candidates(boxes, scores, labels, options, placement(spec, decoded.width, decoded.height),
                             decoded.width, decoded.height)
    return Detections(kept.boxes, kept.scores, kept.labels, label_names(spec, kept.labels),
                      decoded.width, decoded.height)


class Detection(Task):
    tasks = ("detection",)

    def options(self, request, spec):
        return resolve_options(request, spec)

    def preprocess(self, decoded, spec, options) -> Tensors:
        region = REGION_LAYOUTS.get(spec.output_layout)
        if region is not None:  # R-CNN / Fast R-CNN: proposals, then warp or scale
            return region.preprocess(decoded, spec, options)
        return {spec.image_input.name: preprocess(decoded, spec)[None]}

    def postprocess(self, outputs, spec, decoded, options):
        region = REGION_LAYOUTS.get(spec.output_layout)
        if region is not None:
            kept = region.postprocess(outputs, spec, decoded, options)
            return Detections(kept.boxes, kept.scores, kept.labels, label_names(spec, kept.labels),
                              decoded.width, decoded.height)
        return postprocess(outputs, spec, decoded, options)


TASK = Detection()

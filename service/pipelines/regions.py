"""R-CNN and Fast R-CNN: detection over selective search proposals (gateway side).

The detection Task (`pipelines/detection.py`) hands the `rcnn_regions` and `fast_rcnn`
layouts to `LAYOUTS` here, with its `DetectOptions`, and wraps what they return into
its `Detections`; this module does not import it.

Both layouts share the proposal step (`service.proposals`, timed as the `proposals`
stage) and the decoding of their outputs:

    softmax over C+1 classes -> per-class boxes from the deltas relative to each
    proposal (torchvision's BoxCoder, weights (10, 10, 5, 5), as its Fast R-CNN heads)
    -> clip to the image -> drop the background column and tiny boxes
    -> `select_detections` (score > threshold, class filter, class-aware NMS, top N).

- `rcnn_regions` (R-CNN): every proposal is dilated so that the warped region has
  exactly `context_padding` (16) pixels of context on each side (R-CNN paper,
  appendix A), then warped (stretched) to S x S. Context outside the image is filled
  with the model's mean pixel, i.e. zero after the model's normalization, as in the
  paper ("replaced with the image mean"). One image becomes P items [P, 3, S, S]; the
  data plane batches them through Triton in chunks of max_batch_size.
- `fast_rcnn` (Fast R-CNN): the image is resized so its shorter side is `min_side`
  and its longer side at most `max_side`; the proposals, scaled alike and padded to
  the model's fixed RoI count by repeating the first one, are the second input. The
  padded rows are dropped before decoding.

Boxes are decoded relative to the proposals in original pixels (BoxCoder's decoding
commutes with per-axis scaling), so both layouts end in original pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING
import cv2
import numpy as np

from ..gateway import metrics
from ..boxes import clip_boxes, select_detections
from ..errors import InvalidArgument
from ..imaging import Decoded, softmax
from ..proposals import proposal_settings, selective_search
from ..spec import ModelSpec
from .common import Tensors

if TYPE_CHECKING:
    from .detection import DetectOptions

# torchvision's Fast/Faster R-CNN box coder: deltas are (dx, dy, dw, dh) scaled by these.
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# torchvision's cap on dw, dh before exp(): boxes at most 1000/16 times the proposal.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
# torchvision's RoIHeads drops boxes narrower/shorter than this after clipping.
MIN_BOX_SIZE = 1e-2
DEFAULT_CONTEXT_PADDING = 16
# Gateway-side arrays that travel with an image's outputs (not model inputs).
PROPOSALS_KEY = "proposals"


@dataclass(frozen=True)
class Selected:
    """One image's detections, best first: boxes float32 [k, 4] (x1, y1, x2, y2,
    original pixels, clipped), scores float32 [k], labels int64 [k] (the model's class
    index; background is 0 and never returned)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


# ------------------------------------------------------------------ pure steps
def image_proposals(decoded: Decoded, spec: ModelSpec) -> np.ndarray:
    """Selective search proposals for one image, float32 [P, 4] original pixels, timed
    as the `proposals` stage. An image where the search finds nothing gets the whole
    image as its one proposal."""
    count, side, min_size = proposal_settings(spec)
    with metrics.stage(spec.name, "proposals"):
        boxes = selective_search(np.asarray(decoded.image), count, side, min_size)
    if len(boxes) == 0:
        boxes = np.array([[0, 0, decoded.width, decoded.height]], np.float32)
    return boxes


def context_boxes(boxes: np.ndarray, size: int, padding: int) -> np.ndarray:
    """The source rectangles R-CNN warps: each box (float [P, 4], x1, y1, x2, y2)
    dilated so that, once stretched to `size` x `size`, the box itself fills the centre
    `size - 2 * padding` pixels and `padding` pixels of context surround it."""
    if not 0 <= 2 * padding < size:
        raise InvalidArgument("model", f"context_padding {padding} does not fit input size {size}")
    boxes = np.asarray(boxes, np.float64)
    grow = padding / (size - 2 * padding)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return np.stack([boxes[:, 0] - w * grow, boxes[:, 1] - h * grow,
                     boxes[:, 2] + w * grow, boxes[:, 3] + h * grow], axis=1)


def warp_regions(image: np.ndarray, rects: np.ndarray, size: int, fill: tuple[int, int, int]) -> np.ndarray:
    """Crop and stretch each rectangle of `image` (uint8 [H, W, 3]) to `size` x `size`
    with bilinear sampling; pixels outside the image are `fill`.

    Pixel centres are at +0.5: output pixel j samples source x = x1 + (j + 0.5) *
    (x2 - x1) / size - 0.5 (in pixel-index coordinates), likewise for y.

    Returns uint8 [P, 3, size, size]."""
    out = np.empty((len(rects), size, size, 3), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(rects, np.float64)):
        sx, sy = (x2 - x1) / size, (y2 - y1) / size
        to_source = np.array([[sx, 0.0, x1 + 0.5 * sx - 0.5], [0.0, sy, y1 + 0.5 * sy - 0.5]])
        cv2.warpAffine(image, to_source, (size, size), dst=out[i],
                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(float(v) for v in fill))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def decode_deltas(deltas: np.ndarray, boxes: np.ndarray, weights=BOX_CODER_WEIGHTS,
                  clip: float = BBOX_XFORM_CLIP) -> np.ndarray:
    """torchvision `BoxCoder.decode_single`: deltas float32 [P, 4 M] (dx, dy, dw, dh
    per class) relative to `boxes` float32 [P, 4] (x1, y1, x2, y2) -> boxes
    float32 [P, M, 4] in the proposals' coordinates."""
    boxes = np.asarray(boxes, np.float32)
    d = np.asarray(deltas, np.float32).reshape(len(boxes), -1, 4)
    wx, wy, ww, wh = (np.float32(w) for w in weights)
    widths = (boxes[:, 2] - boxes[:, 0])[:, None]
    heights = (boxes[:, 3] - boxes[:, 1])[:, None]
    ctr_x = boxes[:, 0][:, None] + np.float32(0.5) * widths
    ctr_y = boxes[:, 1][:, None] + np.float32(0.5) * heights
    dx, dy = d[..., 0] / wx, d[..., 1] / wy
    dw = np.minimum(d[..., 2] / ww, np.float32(clip))
    dh = np.minimum(d[..., 3] / wh, np.float32(clip))
    pred_ctr_x, pred_ctr_y = dx * widths + ctr_x, dy * heights + ctr_y
    half_w, half_h = np.float32(0.5) * np.exp(dw) * widths, np.float32(0.5) * np.exp(dh) * heights
    return np.stack([pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h],
                    axis=2).astype(np.float32, copy=False)


def region_detections(logits: np.ndarray, deltas: np.ndarray, proposals: np.ndarray, width: int, height: int,
                      options: DetectOptions) -> Selected:
    """Detections from per-proposal logits [P, C+1] and deltas [P, 4 (C+1)] relative to
    `proposals` [P, 4] (original pixels), for an image of width x height."""
    logits = np.asarray(logits, np.float32).reshape(len(proposals), -1)
    classes = logits.shape[1]
    # Class probabilities, background included.
    scores = softmax(logits)
    # One box per proposal and class, clipped to the image.
    boxes = clip_boxes(decode_deltas(deltas, proposals).reshape(-1, 4), width, height).reshape(-1, classes, 4)
    # Drop the background column and flatten: (proposal, class) pairs, labels 1..C.
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = scores[:, 1:].reshape(-1)
    labels = np.tile(np.arange(1, classes, dtype=np.int64), len(proposals))
    # Drop tiny boxes (torchvision's remove_small_boxes).
    big = np.flatnonzero(((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIZE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIZE))
    # Score threshold, class filter, class-aware NMS, top N.
    keep = big[select_detections(boxes[big], scores[big], labels[big], score_threshold=options.score_threshold,
                                 iou_threshold=options.iou_threshold, max_detections=options.max_detections,
                                 class_ids=options.class_ids, class_agnostic=options.class_agnostic)]
    return Selected(boxes[keep], scores[keep].astype(np.float32), labels[keep])


# ------------------------------------------------------------------- layouts
class RCNNRegions:
    """`rcnn_regions`: P warped proposals per image, one model item each."""

    def preprocess(self, decoded: Decoded, spec: ModelSpec, options: DetectOptions) -> Tensors:
        proposals = image_proposals(decoded, spec)
        size = spec.input_width
        padding = int(spec.option("context_padding", str(DEFAULT_CONTEXT_PADDING)))
        fill = tuple(int(round(255 * m)) for m in spec.mean)
        regions = warp_regions(np.asarray(decoded.image), context_boxes(proposals, size, padding), size, fill)
        return {spec.image_input.name: regions, PROPOSALS_KEY: proposals}

    def postprocess(self, outputs: Tensors, spec: ModelSpec, decoded: Decoded, options: DetectOptions) -> Selected:
        logits, deltas = (outputs[t.name] for t in spec.outputs[:2])
        return region_detections(logits, deltas, outputs[PROPOSALS_KEY], decoded.width, decoded.height, options)


def fast_rcnn_scale(width: int, height: int, min_side: int, max_side: int) -> tuple[int, int]:
    """The model-input size (width, height): shorter side `min_side`, longer side at most
    `max_side`, aspect ratio kept (torchvision GeneralizedRCNNTransform's rule)."""
    scale = min(min_side / min(width, height), max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class FastRCNN:
    """`fast_rcnn`: the resized image plus its proposals, padded to the model's RoI count."""

    def preprocess(self, decoded: Decoded, spec: ModelSpec, options: DetectOptions) -> Tensors:
        proposals = image_proposals(decoded, spec)
        rois_spec = spec.inputs[1]
        count = rois_spec.dims[0]
        proposals = proposals[:count]
        width, height = fast_rcnn_scale(decoded.width, decoded.height, int(spec.option("min_side", "600")),
                                        int(spec.option("max_side", "1000")))
        image = cv2.resize(np.asarray(decoded.image), (width, height), interpolation=cv2.INTER_LINEAR)
        scale = np.array([width / decoded.width, height / decoded.height] * 2, np.float32)
        rois = np.empty((count, 4), np.float32)
        rois[:len(proposals)] = proposals * scale
        rois[len(proposals):] = rois[0]  # padding rows, dropped in postprocess
        return {spec.image_input.name: image.transpose(2, 0, 1)[None], rois_spec.name: rois[None],
                PROPOSALS_KEY: proposals}

    def postprocess(self, outputs: Tensors, spec: ModelSpec, decoded: Decoded, options: DetectOptions) -> Selected:
        proposals = outputs[PROPOSALS_KEY]
        logits, deltas = (outputs[t.name][0, :len(proposals)] for t in spec.outputs[:2])
        return region_detections(logits, deltas, proposals, decoded.width, decoded.height, options)


LAYOUTS = {"rcnn_regions": RCNNRegions(), "fast_rcnn": FastRCNN()}


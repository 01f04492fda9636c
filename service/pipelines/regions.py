"""R-CNN and Fast R-CNN inputs: selective search proposals, then warp or scale.

The detection Task (`pipelines/detection.py`) calls these for the `rcnn_regions` and
`fast_rcnn` layouts; the proposals go to its postprocess in the image's `Context`,
where `layouts.decode_regions` decodes the outputs relative to them:

    softmax over C+1 classes -> per-class boxes from the deltas relative to each
    proposal (torchvision's BoxCoder, weights (10, 10, 5, 5), as its Fast R-CNN heads)
    -> clip to the image -> drop the background column and tiny boxes
    -> the detection selection (score > threshold, class filter, class-aware NMS, top N).

- `rcnn_regions` (R-CNN): every proposal is dilated so that the warped region has
  exactly `context_padding` (16) pixels of context on each side (R-CNN paper,
  appendix A), then warped (stretched) to S x S. Context outside the image is filled
  with the model's mean pixel, i.e. zero after the model's normalization, as in the
  paper ("replaced with the image mean"). One image becomes P items [P, 3, S, S]; the
  data plane batches them through Triton in chunks of max_batch_size.
- `fast_rcnn` (Fast R-CNN): the image is resized so its shorter side is `min_side`
  and its longer side at most `max_side` (the resize plan); the proposals, scaled
  alike and padded to the model's fixed RoI count by repeating the first one, are the
  second input. The padded rows are dropped before decoding.

Boxes are decoded relative to the proposals in original pixels (BoxCoder's decoding
commutes with per-axis scaling), so both layouts end in original pixels.
"""
from __future__ import annotations

import cv2
import numpy as np

from ..errors import InvalidArgument
from ..ops.imaging import Decoded
from ..ops.proposals import selective_search
from ..spec import ModelSpec
from .common import Context, Tensors, model_inputs, resize_plan, timed


def image_proposals(decoded: Decoded, spec: ModelSpec) -> np.ndarray:
    """Selective search proposals for one image, float32 [P, 4] original pixels, timed
    as the `proposals` stage. An image where the search finds nothing gets the whole
    image as its one proposal."""
    s = spec.settings
    with timed(spec.name, "proposals"):
        boxes = selective_search(np.asarray(decoded.image), s.proposals, s.proposal_side, s.proposal_min_size)
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


def rcnn_inputs(decoded: Decoded, spec: ModelSpec) -> tuple[Tensors, Context]:
    """`rcnn_regions`: P warped proposals, one model item each: [P, 3, S, S]."""
    proposals = image_proposals(decoded, spec)
    size = spec.input_width
    fill = tuple(int(round(255 * m)) for m in spec.mean)
    rects = context_boxes(proposals, size, spec.settings.context_padding)
    regions = warp_regions(np.asarray(decoded.image), rects, size, fill)
    return model_inputs(spec, regions), Context(decoded.width, decoded.height, proposals=proposals)


def fast_rcnn_inputs(decoded: Decoded, spec: ModelSpec) -> tuple[Tensors, Context]:
    """`fast_rcnn`: the resized image [1, 3, h, w] and its proposals in input pixels,
    padded to the model's RoI count [1, R, 4] by repeating the first one."""
    proposals = image_proposals(decoded, spec)
    count = spec.inputs[1].dims[0]
    proposals = proposals[:count]
    plan = resize_plan(spec, decoded.width, decoded.height)
    rois = np.empty((count, 4), np.float32)
    rois[:len(proposals)] = plan.to_input(proposals)
    rois[len(proposals):] = rois[0]  # padding rows, dropped in postprocess
    tensors = model_inputs(spec, plan.apply(decoded.image)[None], rois[None])
    return tensors, Context(decoded.width, decoded.height, plan, proposals)


# layout -> its preprocess (the detection Task's dispatch for the region formats).
REGION_INPUTS = {"rcnn_regions": rcnn_inputs, "fast_rcnn": fast_rcnn_inputs}

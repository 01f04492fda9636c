"""R-CNN / Fast R-CNN pieces against independent references: the warp geometry
against a slow per-pixel loop, delta decoding and postprocessing against torchvision's
BoxCoder and RoIHeads, the Fast R-CNN RoI step against a slow per-RoI RoIAlign."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.export import zoo  # noqa: F401  (installs the torchvision op shim)
from service.ops import resize
from service.ops.boxes import decode_deltas
from service.pipelines import detection, layouts
from service.pipelines.common import Context
from service.pipelines.detection import DetectOptions
from service.pipelines.regions import context_boxes, warp_regions

from helpers import assert_close_scaled
from references import reference_roi_align

import torchvision  # noqa: E402  (after the shim)
from torchvision.models.detection._utils import BoxCoder  # noqa: E402
from torchvision.models.detection.roi_heads import RoIHeads  # noqa: E402


def slow_warp(image, box, size, padding, fill):
    """The paper's warp from first principles: the output's continuous x in [padding,
    size - padding] covers the box's [x1, x2]; each output pixel centre samples the
    image bilinearly (pixel centres at +0.5), `fill` outside the image."""
    height, width = image.shape[:2]
    x1, y1, x2, y2 = box
    out = np.zeros((size, size, 3))

    def pixel(r, c):
        return image[r, c].astype(float) if 0 <= r < height and 0 <= c < width else np.asarray(fill, float)

    for j in range(size):
        for i in range(size):
            x = x1 + (i + 0.5 - padding) * (x2 - x1) / (size - 2 * padding) - 0.5
            y = y1 + (j + 0.5 - padding) * (y2 - y1) / (size - 2 * padding) - 0.5
            c0, r0 = math.floor(x), math.floor(y)
            fx, fy = x - c0, y - r0
            out[j, i] = ((1 - fy) * ((1 - fx) * pixel(r0, c0) + fx * pixel(r0, c0 + 1))
                         + fy * ((1 - fx) * pixel(r0 + 1, c0) + fx * pixel(r0 + 1, c0 + 1)))
    return out.transpose(2, 0, 1)


def test_warp_with_context_matches_slow_reference():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
    boxes = np.array([[5.0, 4.0, 30.0, 20.0],      # inside, with context inside
                      [0.0, 0.0, 12.5, 36.0],      # context spills over the top-left
                      [20.3, 10.7, 44.9, 36.2],    # fractional, spills bottom-right
                      [2.0, 3.0, 6.0, 40.0]])      # thin and tall: anisotropic stretch
    size, padding, fill = 20, 4, (124, 116, 104)
    got = warp_regions(image, context_boxes(boxes, size, padding), size, fill)
    assert got.shape == (4, 3, size, size) and got.dtype == np.uint8
    for k, box in enumerate(boxes):
        want = slow_warp(image, box, size, padding, fill)
        # OpenCV's bilinear weights are fixed point (1/32 steps, so each axis's weight
        # is off by at most 1/64): on noise whose neighbours differ by up to 255 that is
        # at most 2 * 255/64 + rounding, while a geometry error of 0.2 px would already
        # cost tens of levels (and shift the mean error far above 1).
        assert np.abs(got[k].astype(float) - want).max() <= 2 * 255 / 64 + 0.5
        assert np.abs(got[k].astype(float) - want).mean() < 1.0


def test_context_is_padding_pixels_at_the_warped_size():
    boxes = np.array([[10.0, 20.0, 110.0, 70.0]])
    rect = context_boxes(boxes, 224, 16)[0]
    # The box spans 192 of 224 output pixels, so 16 px of output hold context.
    scale_x, scale_y = 224 / (rect[2] - rect[0]), 224 / (rect[3] - rect[1])
    assert (boxes[0, 0] - rect[0]) * scale_x == pytest.approx(16)
    assert (rect[3] - boxes[0, 3]) * scale_y == pytest.approx(16)


def test_decode_matches_torchvision_box_coder():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(30, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 1 + torch.rand(30, 2, generator=g) * 80], dim=1)
    deltas = torch.randn(30, 4 * 5, generator=g) * 3
    deltas[0, 2] = 80.0  # beyond the clip on dw
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    want = coder.decode_single(deltas, boxes).reshape(30, 5, 4)
    got = decode_deltas(deltas.numpy(), boxes.numpy())
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-3)


def region_detections(logits, deltas, proposals, width, height, options) -> layouts.Candidates:
    """The region formats' decoding and the shared selection, as the detection task runs them."""
    found = layouts.decode_regions(logits, deltas, proposals, width, height)
    return detection.select(found, options, Context(width, height, proposals=proposals))


def fast_rcnn_scale(width, height, min_side, max_side):
    plan = resize.plan("none", width, height, -1, -1, shorter_side=min_side, max_side=max_side)
    return plan.scaled_width, plan.scaled_height


def torchvision_postprocess(logits, deltas, proposals, width, height, options):
    """torchvision's own RoIHeads.postprocess_detections: the reference."""
    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, options.score_threshold,
                     options.iou_threshold, options.max_detections)
    boxes, scores, labels = heads.postprocess_detections(
        torch.as_tensor(logits), torch.as_tensor(deltas), [torch.as_tensor(proposals)], [(height, width)])
    return boxes[0].numpy(), scores[0].numpy(), labels[0].numpy()


@pytest.mark.parametrize("seed", range(3))
def test_postprocess_matches_torchvision_roi_heads(seed):
    g = torch.Generator().manual_seed(seed)
    count, classes, width, height = 60, 6, 160, 120
    xy = torch.rand(count, 2, generator=g) * torch.tensor([140.0, 100.0])
    proposals = torch.cat([xy, xy + 5 + torch.rand(count, 2, generator=g) * 60], dim=1)
    logits = torch.randn(count, classes, generator=g) * 4
    deltas = torch.randn(count, 4 * classes, generator=g)
    options = DetectOptions(score_threshold=0.1, iou_threshold=0.4, max_detections=25)
    got = region_detections(logits.numpy(), deltas.numpy(), proposals.numpy(), width, height, options)
    boxes, scores, labels = torchvision_postprocess(logits, deltas, proposals, width, height, options)
    assert len(labels) > 5
    np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_allclose(got.scores, scores, rtol=1e-5)
    np.testing.assert_allclose(got.boxes, boxes, rtol=1e-5, atol=1e-3)
    # The class filter keeps exactly the reference's detections of those classes.
    only = region_detections(logits.numpy(), deltas.numpy(), proposals.numpy(), width, height,
                             DetectOptions(0.1, 0.4, 1000, class_ids=(2, 3)))
    assert set(only.labels.tolist()) <= {2, 3} and len(only.labels)


def test_fast_rcnn_roi_step_matches_slow_roi_align():
    """The exported Fast R-CNN: conv5 once, then per RoI exactly the slow reference
    RoIAlign (6 x 6, scale 1/16, 2 samples) and the shared head."""
    from service.export.zoo.regions import FastRCNNExport, RegionHead

    torch.manual_seed(0)
    model = RegionHead(4).eval()
    export = FastRCNNExport(model, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 80, 96), generator=g, dtype=torch.uint8)
    corners = torch.rand(2, 5, 2, 2, generator=g) * torch.tensor([96.0, 80.0])
    rois = torch.cat([corners.min(2).values, corners.max(2).values], dim=2)
    with torch.inference_mode():
        logits, deltas = export(images, rois)
        features = model.features(export.normalize(images))
        flat = torch.cat([torch.arange(2.0).repeat_interleave(5)[:, None], rois.reshape(-1, 4)], dim=1)
        pooled = reference_roi_align(features, flat, 1 / 16, 6, 6, 2, False)
        want_logits, want_deltas = model.head(pooled)
    assert logits.shape == (2, 5, 4) and deltas.shape == (2, 5, 16)
    # Another RoIAlign and normalization arithmetic: rounding scales with each output.
    assert_close_scaled(logits.reshape(10, 4), want_logits, rtol=1e-4, atol=1e-5)
    assert_close_scaled(deltas.reshape(10, 16), want_deltas, rtol=1e-4, atol=1e-5)


def test_fast_rcnn_scale_follows_torchvisions_rule():
    assert fast_rcnn_scale(640, 480, 600, 1000) == (800, 600)
    assert fast_rcnn_scale(2000, 500, 600, 1000) == (1000, 250)
    assert fast_rcnn_scale(50, 100, 64, 1000) == (64, 128)

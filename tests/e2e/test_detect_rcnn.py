"""Faster R-CNN through the real gateway and Triton equals STOCK torchvision.

The stack's ``fasterrcnn_mobilenet_v3_large_fpn`` entry (tests/stack_rcnn.py) returns
per-class candidates before NMS (layout rcnn_candidates); the gateway's Detect runs the
threshold, class-aware NMS, top-N and the mapping. The reference is torchvision's own
``model.eval()([image])`` with the same checkpoint and thresholds (score 0.05, IoU 0.5,
100 detections: RoIHeads' defaults, the entry's spec defaults).
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import as_array, encode, photo
from service._proto import vision_pb2
from stack_rcnn import RCNN_STACK_SIZE
from references import stock_model

pytestmark = pytest.mark.e2e

ARCH = "fasterrcnn_mobilenet_v3_large_fpn"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png")
MIN_DETECTIONS = 5


@pytest.fixture(scope="module")
def stock(stack):
    return stock_model(ARCH, stack.checkpoints[ARCH], min_size=RCNN_STACK_SIZE)


def torchvision_detect(model, image, **thresholds):
    import torch

    heads = model.roi_heads
    saved = (heads.score_thresh, heads.nms_thresh, heads.detections_per_img)
    heads.score_thresh = thresholds.get("score_threshold", saved[0])
    heads.nms_thresh = thresholds.get("iou_threshold", saved[1])
    heads.detections_per_img = thresholds.get("max_detections", saved[2])
    try:
        tensor = torch.from_numpy(np.array(as_array(image))).permute(2, 0, 1).float() / 255
        with torch.inference_mode():
            out = model([tensor])[0]
    finally:
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = saved
    return out["labels"].numpy(), out["scores"].numpy(), out["boxes"].numpy()


def gateway_detect(vision, image, **fields):
    response = vision.Detect(vision_pb2.DetectRequest(model=ARCH, images=[vision_pb2.Image(
        encoded=encode(image, "PNG"))], **fields), timeout=120)
    result = response.results[0]
    assert (result.image_width, result.image_height) == image.size
    labels = np.array([d.label.index for d in result.detections])
    scores = np.array([d.label.score for d in result.detections])
    boxes = np.array([[d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max] for d in result.detections])
    return labels, scores, boxes.reshape(-1, 4), [d.label.name for d in result.detections]


@pytest.mark.parametrize("name", PHOTOS)
def test_detect_equals_stock_torchvision(vision, stock, name):
    image = photo(name)
    want_labels, want_scores, want_boxes = torchvision_detect(stock, image)
    labels, scores, boxes, names = gateway_detect(vision, image)
    assert len(want_labels) >= MIN_DETECTIONS
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(scores, want_scores, atol=1e-4)
    np.testing.assert_allclose(boxes, want_boxes, atol=1.0)
    assert all(n and n != "__background__" for n in names)


def test_request_thresholds_equal_torchvision_with_the_same_thresholds(vision, stock):
    image = photo("astronaut.png")
    fields = {"score_threshold": 0.2, "iou_threshold": 0.3, "max_detections": 10}
    want_labels, want_scores, want_boxes = torchvision_detect(stock, image, **fields)
    labels, scores, boxes, _ = gateway_detect(vision, image, **fields)
    assert len(want_labels) >= MIN_DETECTIONS
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(scores, want_scores, atol=1e-4)
    np.testing.assert_allclose(boxes, want_boxes, atol=1.0)

"""Mask R-CNN through the real gateway and Triton equals STOCK torchvision: the
`MaskRCNN` model torchvision's builder makes for trained weights, loaded with the same
test checkpoint and run eagerly (`model.eval()([image])`, default thresholds 0.05 / 0.5
/ 100, the ones the exported entry's spec carries)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from helpers import as_array, encode, photo, served_threads, torch_threads
from service._proto import vision_pb2
from stack_rcnn import RCNN_STACK_SIZE

pytestmark = pytest.mark.e2e

MODEL = "maskrcnn_resnet50_fpn"
PHOTOS = ("motorcycle_left.png", "astronaut.png")
MIN_INSTANCES = 5
BOX_ATOL_PX = 1.0
SCORE_ATOL = 1e-4
MASK_IOU = 0.99


@pytest.fixture(scope="module")
def stock(stack):
    """fn(PIL image) -> torchvision's detections dict (boxes, labels, scores, masks > 0.5)."""
    import torch

    from service.export import tvshim

    tvshim.install()
    from references import stock_model

    model = stock_model(MODEL, stack.checkpoints[MODEL], min_size=RCNN_STACK_SIZE)

    threads = served_threads(stack.repo)

    def run(image):
        pixels = torch.from_numpy(np.array(as_array(image))).permute(2, 0, 1).float() / 255.0
        # With the served thread count: the same sums, so the same near-tied candidates.
        with torch.inference_mode(), torch_threads(threads):
            out = model([pixels])[0]
        return {"boxes": out["boxes"].numpy(), "labels": out["labels"].numpy(), "scores": out["scores"].numpy(),
                "masks": (out["masks"][:, 0] > 0.5).numpy()}
    return run


def segment(vision, image, **fields):
    request = vision_pb2.SegmentRequest(model=MODEL, images=[vision_pb2.Image(encoded=encode(image, "PNG"))],
                                        **fields)
    return vision.Segment(request, timeout=300).results[0]


def decode_rle(detection, height, width) -> np.ndarray:
    rle = detection.mask.rle
    assert (rle.height, rle.width) == (height, width)
    coco = coco_mask.frPyObjects({"size": [height, width], "counts": list(rle.counts)}, height, width)
    return coco_mask.decode(coco).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.parametrize("name", PHOTOS)
def test_maskrcnn_equals_stock_torchvision(vision, stock, name):
    image = photo(name)
    result = segment(vision, image)
    expected = stock(image)
    assert (result.image_width, result.image_height) == image.size
    assert len(result.instances) == len(expected["boxes"]) >= MIN_INSTANCES
    for i, detection in enumerate(result.instances):
        box = (detection.box.x_min, detection.box.y_min, detection.box.x_max, detection.box.y_max)
        np.testing.assert_allclose(box, expected["boxes"][i], atol=BOX_ATOL_PX)
        assert detection.label.index == expected["labels"][i]
        assert detection.label.score == pytest.approx(float(expected["scores"][i]), abs=SCORE_ATOL)
        mask = decode_rle(detection, image.height, image.width)
        assert iou(mask, expected["masks"][i]) >= MASK_IOU, f"instance {i}"


def test_png_masks_decode_to_the_rle_masks(vision):
    image = photo(PHOTOS[0])
    rle = segment(vision, image, mask_format=vision_pb2.MASK_FORMAT_RLE)
    png = segment(vision, image, mask_format=vision_pb2.MASK_FORMAT_PNG)
    assert len(png.instances) == len(rle.instances) >= MIN_INSTANCES
    for a, b in zip(rle.instances, png.instances):
        assert a.box == b.box and a.label == b.label
        decoded = np.asarray(Image.open(io.BytesIO(b.mask.png))).astype(bool)
        np.testing.assert_array_equal(decoded, decode_rle(a, image.height, image.width))

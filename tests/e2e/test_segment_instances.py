"""Instance Segment through the real gateway and Triton, with an rcnn_candidates model
added by `export --from-file` (tests/stack_segmentation.py), against an independent
reference: the same TorchScript file run eagerly, then torchvision's own steps (score
threshold, `batched_nms`, top N, `paste_masks_in_image` > 0.5) and pycocotools."""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image, ImageOps
from pycocotools import mask as coco_mask

from helpers import as_array, encode, photo, with_exif_orientation
from service._proto import vision_pb2

pytestmark = pytest.mark.e2e

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png")
MIN_INSTANCES = 5


@pytest.fixture(scope="module")
def reference(stack):
    """fn(upright PIL image, score, iou, top) -> (boxes, scores, labels, bool masks [N, H, W])."""
    import torch

    from service.export import tvshim

    tvshim.install()
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    from torchvision.ops import batched_nms

    model = torch.jit.load(str(stack.checkpoints["candidates"])).eval()

    def run(image, score_threshold=0.05, iou_threshold=0.5, max_detections=100):
        pixels = torch.from_numpy(as_array(image).transpose(2, 0, 1).copy())[None]
        with torch.inference_mode():
            boxes, scores, labels, count, masks = (t[0] for t in model(pixels))
        n = int(count[0])
        boxes, scores, labels, masks = boxes[:n], scores[:n], labels[:n], masks[:n]
        keep = torch.where(scores > score_threshold)[0]
        boxes, scores, labels, masks = boxes[keep], scores[keep], labels[keep], masks[keep]
        keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
        boxes, scores, labels, masks = boxes[keep], scores[keep], labels[keep], masks[keep]
        pasted = paste_masks_in_image(masks[:, None], boxes, (image.height, image.width))[:, 0] > 0.5
        return boxes.numpy(), scores.numpy(), labels.numpy(), pasted.numpy()
    return run


def segment(vision, images, **fields):
    return vision.Segment(vision_pb2.SegmentRequest(model="candidates", images=images, **fields), timeout=120)


def rle_mask(detection, height, width) -> np.ndarray:
    rle = detection.mask.rle
    assert (rle.height, rle.width) == (height, width)
    coco = coco_mask.frPyObjects({"size": [height, width], "counts": list(rle.counts)}, height, width)
    mask = coco_mask.decode(coco).astype(bool)
    # pycocotools' own encoding of the mask equals ours, compressed.
    assert coco["counts"] == coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
    return mask


def assert_matches(result, expected, height, width):
    boxes, scores, labels, masks = expected
    assert (result.image_width, result.image_height) == (width, height)
    assert not result.label_map_png and not result.classes
    assert len(result.instances) == len(boxes)
    for detection, box, score, label, mask in zip(result.instances, boxes, scores, labels, masks):
        got = (detection.box.x_min, detection.box.y_min, detection.box.x_max, detection.box.y_max)
        np.testing.assert_allclose(got, np.clip(box, 0, [width, height, width, height]), atol=1e-3)
        assert detection.label.index == label and detection.label.name
        assert detection.label.score == pytest.approx(float(score), abs=1e-6)
        np.testing.assert_array_equal(rle_mask(detection, height, width), mask)


@pytest.mark.parametrize("fields", [{}, {"score_threshold": 0.6, "iou_threshold": 0.3, "max_detections": 6}])
def test_instances_equal_eager_plus_torchvision_postprocessing(vision, reference, fields):
    thresholds = {"score_threshold": 0.05, "iou_threshold": 0.5, "max_detections": 100, **fields}
    for name in PHOTOS:
        image = photo(name)
        result = segment(vision, [vision_pb2.Image(encoded=encode(image, "PNG"))], **fields).results[0]
        expected = reference(image, *thresholds.values())
        assert_matches(result, expected, image.height, image.width)
        assert len(result.instances) >= (MIN_INSTANCES if not fields else 1)


def test_png_masks_equal_rle_masks(vision):
    image = [vision_pb2.Image(encoded=encode(photo("coffee.png"), "PNG"))]
    rle = segment(vision, image, mask_format=vision_pb2.MASK_FORMAT_RLE).results[0]
    png = segment(vision, image, mask_format=vision_pb2.MASK_FORMAT_PNG).results[0]
    default = segment(vision, image).results[0]
    assert default == rle
    assert len(png.instances) == len(rle.instances) >= MIN_INSTANCES
    for a, b in zip(rle.instances, png.instances):
        assert a.box == b.box and a.label == b.label and b.mask.WhichOneof("encoding") == "png"
        decoded = np.asarray(Image.open(io.BytesIO(b.mask.png))).astype(bool)
        np.testing.assert_array_equal(decoded, rle_mask(a, rle.image_height, rle.image_width))


def test_exif_rotated_input_is_answered_upright(vision, reference):
    data = with_exif_orientation(photo("astronaut.png", max_side=200).crop((0, 0, 200, 150)), 6)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    result = segment(vision, [vision_pb2.Image(encoded=data)]).results[0]
    assert_matches(result, reference(upright), 150, 200)


@pytest.mark.parametrize("fields, field", [
    ({"score_threshold": -1.0}, "score_threshold"), ({"iou_threshold": 1.01}, "iou_threshold"),
    ({"max_detections": 0}, "max_detections"), ({"mask_format": 3}, "mask_format"),
])
def test_bad_fields_are_invalid_argument(vision, fields, field):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    image = [vision_pb2.Image(encoded=encode(photo("chelsea.png"), "PNG"))]
    with pytest.raises(grpc.RpcError) as info:
        segment(vision, image, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in rpc_status.from_call(info.value).details)
    assert bad.field_violations[0].field == field


def test_predict_cli_lists_instances_and_draws_them(stack, vision, tmp_path):
    import json
    import subprocess
    import sys

    image = photo("astronaut.png")
    path = tmp_path / "astronaut.png"
    image.save(path)
    out = tmp_path / "out.png"
    run = subprocess.run([sys.executable, "-m", "service.cli", "predict", str(path), "--model", "candidates",
                          "--server", stack.address, "--json", "--mask-format", "png", "--out", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    listed = json.loads(run.stdout[:run.stdout.rindex("}") + 1])["results"][0]["instances"]
    result = segment(vision, [vision_pb2.Image(encoded=encode(image, "PNG"))]).results[0]
    assert [(d["index"], d["mask_pixels"]) for d in listed] == \
        [(d.label.index, int(rle_mask(d, image.height, image.width).sum())) for d in result.instances]
    with Image.open(out) as drawn:
        assert drawn.size == image.size and np.any(as_array(drawn) != as_array(image))

"""Segmentation pipelines without Triton: the label-map upsampling against torch's
``F.interpolate(bilinear) + argmax``, and the instance postprocessing against
torchvision's own steps (class-aware NMS, paste_masks_in_image) and pycocotools."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from service.ops import masks
from service.errors import FailedPrecondition, InvalidArgument
from service.ops.imaging import Decoded
from service.pipelines import detection, layouts
from service.pipelines import segmentation as seg
from service.pipelines.common import Context, resize_plan
from service.spec import ModelSpec, TensorSpec

VOC = tuple(f"class_{i}" for i in range(21))
COCO = tuple(f"coco_{i}" for i in range(91))
K, M = 60, 28  # candidates, mask size


@pytest.fixture(scope="module")
def torch_ops():
    from service.export import tvshim

    tvshim.install()
    import torch
    import torch.nn.functional as F
    from torchvision.ops import batched_nms
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    return torch, F, batched_nms, paste_masks_in_image


def semantic_spec(classes=len(VOC), size=64) -> ModelSpec:
    return ModelSpec(
        name="unet", task="semantic_segmentation", architecture="unet",
        inputs=(TensorSpec("images__0", np.dtype(np.uint8), (3, size, size)),),
        outputs=(TensorSpec("logits__0", np.dtype(np.float32), (classes, size, size)),),
        resize_mode="stretch", output_layout="logits_nchw", labels=VOC[:classes])


def instance_spec(**options) -> ModelSpec:
    return ModelSpec(
        name="maskrcnn", task="instance_segmentation", architecture="maskrcnn_resnet50_fpn",
        inputs=(TensorSpec("images__0", np.dtype(np.uint8), (3, -1, -1)),),
        outputs=(TensorSpec("boxes__0", np.dtype(np.float32), (K, 4)),
                 TensorSpec("scores__1", np.dtype(np.float32), (K,)),
                 TensorSpec("labels__2", np.dtype(np.int64), (K,)),
                 TensorSpec("count__3", np.dtype(np.int32), (1,)),
                 TensorSpec("masks__4", np.dtype(np.float32), (K, M, M))),
        resize_mode="none", output_layout="rcnn_candidates", labels=COCO, options=options)


def smooth_logits(rng, classes, h, w, noise=0.2):
    """Region-like logits: a coarse random field upsampled, plus noise."""
    coarse = rng.normal(size=(classes, h // 8 + 2, w // 8 + 2)) * 4
    ys = np.linspace(0, coarse.shape[1] - 1, h)
    xs = np.linspace(0, coarse.shape[2] - 1, w)
    y0 = np.floor(ys).astype(int).clip(0, coarse.shape[1] - 2)
    x0 = np.floor(xs).astype(int).clip(0, coarse.shape[2] - 2)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    field = (coarse[:, y0][:, :, x0] * (1 - fy) * (1 - fx) + coarse[:, y0 + 1][:, :, x0] * fy * (1 - fx)
             + coarse[:, y0][:, :, x0 + 1] * (1 - fy) * fx + coarse[:, y0 + 1][:, :, x0 + 1] * fy * fx)
    return (field + rng.normal(size=field.shape) * noise).astype(np.float32)


# ---------------------------------------------------------------------- label maps
@pytest.mark.parametrize("classes,h,w,height,width", [
    (21, 64, 64, 240, 320), (21, 96, 96, 77, 203), (2, 32, 48, 300, 17), (21, 64, 64, 64, 64),
    (150, 64, 64, 160, 120), (21, 256, 256, 120, 90),
])
def test_upsample_argmax_equals_torch_interpolate_then_argmax(torch_ops, classes, h, w, height, width):
    torch, F, _, _ = torch_ops
    rng = np.random.default_rng(classes * 1000 + height)
    for noise in (0.0, 0.5, 3.0):  # from smooth regions to every pixel a boundary
        logits = smooth_logits(rng, classes, h, w, noise)
        expected = F.interpolate(torch.from_numpy(logits)[None], size=(height, width), mode="bilinear",
                                 align_corners=False)[0].argmax(0).numpy()
        got = masks.upsample_argmax(logits, height, width)
        assert got.shape == (height, width)
        np.testing.assert_array_equal(got, expected)


def test_upsample_argmax_rejects_bad_shapes():
    with pytest.raises(ValueError, match="C, h, w"):
        masks.upsample_argmax(np.zeros((4, 4), np.float32), 8, 8)


def test_semantic_result_png_and_counts(torch_ops):
    torch, F, _, _ = torch_ops
    rng = np.random.default_rng(3)
    spec = semantic_spec()
    logits = smooth_logits(rng, 21, 64, 64)
    result = seg.semantic_result(logits, spec, width=150, height=100)
    label_map = np.asarray(Image.open(io.BytesIO(result.label_map_png)))
    expected = F.interpolate(torch.from_numpy(logits)[None], size=(100, 150), mode="bilinear",
                             align_corners=False)[0].argmax(0).numpy()
    np.testing.assert_array_equal(label_map, expected)
    classes, counts = np.unique(expected, return_counts=True)
    assert [c.label.index for c in result.classes] == classes.tolist()
    assert [c.pixels for c in result.classes] == counts.tolist()
    assert [c.label.name for c in result.classes] == [VOC[c] for c in classes]
    assert (result.width, result.height) == (150, 100) and not result.instances


def test_semantic_refuses_logits_that_do_not_fit_the_labels():
    with pytest.raises(FailedPrecondition, match=r"\[21, H, W\]"):
        seg.semantic_result(np.zeros((5, 8, 8), np.float32), semantic_spec(), 8, 8)


def test_semantic_preprocess_stretches_to_the_input_size():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    tensors, _ = seg.SemanticSegmentation().preprocess(Decoded(image), semantic_spec(size=64), None)
    expected = np.asarray(image.resize((64, 64), Image.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(tensors["images__0"], expected[None])


# ------------------------------------------------------------------------ options
@pytest.mark.parametrize("request_fields, field", [
    ({"score_threshold": -0.01}, "score_threshold"), ({"score_threshold": 2.0}, "score_threshold"),
    ({"iou_threshold": float("inf")}, "iou_threshold"), ({"max_detections": 0}, "max_detections"),
    ({"mask_format": 9}, "mask_format"), ({"mask_format": "jpeg"}, "mask_format"),
])
def test_bad_options_name_the_field(request_fields, field):
    for spec in (semantic_spec(), instance_spec()):
        with pytest.raises(InvalidArgument) as info:
            seg.TASK.options(request_fields, spec)
        assert info.value.field == field


def test_options_default_from_spec_then_constants():
    candidates_layout = layouts.get("rcnn_candidates")
    options = seg.TASK.options({}, instance_spec(score_threshold="0.3"))
    assert options == seg.InstanceOptions(
        detection.DetectOptions(0.3, candidates_layout.default("iou_threshold"),
                                candidates_layout.default("max_detections")), "rle")
    assert (options.detect.iou_threshold, options.detect.max_detections) == (0.5, 100)  # torchvision's
    options = seg.TASK.options({"score_threshold": 0.5, "iou_threshold": 0.7, "max_detections": 3,
                                "mask_format": "png"}, instance_spec(score_threshold="0.3"))
    assert options == seg.InstanceOptions(detection.DetectOptions(0.5, 0.7, 3), "png")
    assert seg.TASK.options({"score_threshold": 0.5}, semantic_spec()) is None


def test_instance_models_must_follow_the_candidates_layout():
    spec = instance_spec()
    broken = ModelSpec(**{**spec.__dict__, "outputs": spec.outputs[:3]})
    with pytest.raises(FailedPrecondition, match="count__3"):
        seg.TASK.options({}, broken)


# ----------------------------------------------------------------------- instances
def instance_result(outputs, width, height, score, iou, top, mask_format="rle"):
    """The instance pipeline's postprocess for a width x height image."""
    spec = instance_spec()
    options = seg.InstanceOptions(detection.DetectOptions(score, iou, top), mask_format)
    return seg.instance_result(outputs, Context(width, height, resize_plan(spec, width, height)), spec, options)


def instances(result):
    """(box, label, name, score, mask) per instance of a result."""
    d = result.instances
    return [(tuple(box), int(label), name, float(score), mask)
            for box, label, name, score, mask in zip(d.boxes.tolist(), d.labels, d.names, d.scores, d.masks)]


def candidates(rng, height, width, count):
    """rcnn_candidates outputs for one image (item axis first): `count` valid rows,
    score-descending, overlapping boxes of a few classes, then zero padding."""
    centres = rng.uniform(0, [width, height], size=(6, 2))
    which = rng.integers(0, 6, count)
    size = rng.uniform(10, 80, size=(count, 2))
    jitter = rng.normal(0, 6, size=(count, 2))
    c = centres[which] + jitter
    boxes = np.concatenate([c - size / 2, c + size / 2], axis=1).astype(np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    scores = np.sort(rng.uniform(0.01, 1, count).astype(np.float32))[::-1]
    labels = rng.choice([1, 3, 18], count).astype(np.int64)
    probs = rng.random((count, M, M), dtype=np.float32)
    pad = K - count
    return {
        "boxes__0": np.concatenate([boxes, np.zeros((pad, 4), np.float32)])[None],
        "scores__1": np.concatenate([scores, np.zeros(pad, np.float32)])[None],
        "labels__2": np.concatenate([labels, np.zeros(pad, np.int64)])[None],
        "count__3": np.array([[count]], np.int32),
        "masks__4": np.concatenate([probs, np.zeros((pad, M, M), np.float32)])[None],
    }


def reference_instances(torch_ops, outputs, height, width, score_threshold, iou_threshold, max_detections):
    """torchvision's steps: valid rows, score > threshold, batched_nms, top N, then
    paste_masks_in_image > 0.5 and pycocotools' RLE of each full-image mask."""
    torch, _, batched_nms, paste_masks_in_image = torch_ops
    n = int(outputs["count__3"][0, 0])
    boxes = torch.from_numpy(outputs["boxes__0"][0, :n])
    scores = torch.from_numpy(outputs["scores__1"][0, :n])
    labels = torch.from_numpy(outputs["labels__2"][0, :n])
    probs = torch.from_numpy(outputs["masks__4"][0, :n])
    keep = torch.where(scores > score_threshold)[0]
    boxes, scores, labels, probs = boxes[keep], scores[keep], labels[keep], probs[keep]
    keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
    boxes, scores, labels, probs = boxes[keep], scores[keep], labels[keep], probs[keep]
    pasted = (paste_masks_in_image(probs[:, None], boxes, (height, width))[:, 0] > 0.5).numpy()
    return boxes.numpy(), scores.numpy(), labels.numpy(), pasted


@pytest.mark.parametrize("thresholds", [(0.05, 0.5, 100), (0.3, 0.3, 7), (0.0, 1.0, 100)])
def test_instances_equal_torchvision_steps_and_pycocotools(torch_ops, thresholds):
    score, iou, top = thresholds
    rng = np.random.default_rng(int(score * 100) + top)
    height, width = 180, 240
    outputs = candidates(rng, height, width, count=45)
    result = instance_result(outputs, width, height, score, iou, top)
    boxes, scores, labels, pasted = reference_instances(torch_ops, outputs, height, width, score, iou, top)
    got = instances(result)
    assert len(got) == len(boxes) > 0
    for (got_box, got_label, name, got_score, got_mask), box, s, label, mask in zip(got, boxes, scores, labels,
                                                                                       pasted):
        np.testing.assert_array_equal(got_box, box)  # already inside the image
        assert got_label == label and name == COCO[label]
        assert got_score == pytest.approx(float(s), abs=0)
        rle = coco_mask.frPyObjects({"size": [height, width], "counts": got_mask["rle"]}, height, width)
        np.testing.assert_array_equal(coco_mask.decode(rle).astype(bool), mask)
        assert rle["counts"] == coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


def test_png_masks_equal_rle_masks():
    rng = np.random.default_rng(5)
    outputs = candidates(rng, 120, 160, count=30)
    rle = instances(instance_result(outputs, 160, 120, 0.05, 0.5, 100, "rle"))
    png = instances(instance_result(outputs, 160, 120, 0.05, 0.5, 100, "png"))
    assert len(png) == len(rle) > 0
    for a, b in zip(rle, png):
        assert a[:4] == b[:4] and set(b[4]) == {"png"}
        decoded = np.asarray(Image.open(io.BytesIO(b[4]["png"]))).astype(bool)
        np.testing.assert_array_equal(decoded, masks.decode_rle(120, 160, a[4]["rle"]))


def test_only_kept_candidates_are_pasted(monkeypatch):
    rng = np.random.default_rng(6)
    outputs = candidates(rng, 100, 100, count=50)
    pasted = []
    real = masks.paste_and_encode

    def spy(probs, boxes, height, width, *args, **kwargs):
        pasted.append(len(probs))
        return real(probs, boxes, height, width, *args, **kwargs)

    monkeypatch.setattr(masks, "paste_and_encode", spy)
    result = instance_result(outputs, 100, 100, 0.5, 0.5, 4)
    assert pasted == [len(instances(result))] and 0 < len(instances(result)) <= 4


def test_no_valid_candidates_gives_no_instances():
    outputs = candidates(np.random.default_rng(7), 50, 60, count=0)
    result = instance_result(outputs, 60, 50, 0.05, 0.5, 100)
    assert instances(result) == [] and (result.width, result.height) == (60, 50)


def test_boxes_are_clipped_but_masks_use_the_models_boxes():
    outputs = candidates(np.random.default_rng(8), 50, 60, count=1)
    outputs["boxes__0"][0, 0] = [-5.5, 10.0, 70.25, 49.0]
    outputs["scores__1"][0, 0] = 0.9
    result = instance_result(outputs, 60, 50, 0.05, 0.5, 100)
    assert instances(result)[0][0] == (0.0, 10.0, 60.0, 49.0)
    expected = masks.paste_masks(outputs["masks__4"][0, :1], outputs["boxes__0"][0, :1], 50, 60)[0]
    np.testing.assert_array_equal(masks.decode_rle(50, 60, instances(result)[0][4]["rle"]), expected)


# -------------------------------------------------------------------------- drawing
def test_voc_palette_and_overlays():
    from service.client.draw import draw_instances, draw_label_map, voc_palette

    # The PASCAL VOC colour map's first entries (VOCdevkit's labelcolormap).
    assert voc_palette()[:6].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128],
                                          [128, 0, 128]]
    image = Image.fromarray(np.full((20, 30, 3), 200, np.uint8))
    label_map = np.zeros((20, 30), np.uint16)
    label_map[5:10, 5:20] = 1
    drawn = np.asarray(draw_label_map(image, label_map))
    assert (drawn[label_map == 0] == 200).all() and (drawn[label_map == 1] == [164, 100, 100]).all()
    mask = label_map == 1
    drawn = np.asarray(draw_instances(image, [((5.0, 5.0, 20.0, 10.0), "person 0.90", mask)]))
    assert drawn.shape == (20, 30, 3) and (drawn[7, 10] == [164, 100, 100]).all() and (drawn[15:, 25:] == 200).all()


def test_captions_keep_two_significant_digits_of_a_small_score():
    from service.client.draw import caption

    assert caption("person", 0.8734) == "person 0.87"
    assert caption("person", 0.01) == "person 0.01"
    # A box shown by a low --score-threshold: "0.00" would say nothing.
    assert caption("person", 0.000234) == "person 0.00023"
    assert caption("person", 0.0) == "person 0"

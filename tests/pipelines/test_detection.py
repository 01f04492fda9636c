"""Detection pipeline: letterbox and its inverse against Ultralytics' own steps, layout
decoding and the whole postprocess against slow per-box references, options."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from service.errors import FailedPrecondition, InvalidArgument
from service.ops import resize
from service.ops.imaging import Decoded
from service.ops.resize import letterbox, letterbox_geometry, resized_size_shorter_side
from service.pipelines import detection, layouts
from service.pipelines.common import Context, resize_plan
from service.spec import ModelSpec, TensorSpec
from references import slow_detect, ultralytics_letterbox

LABELS = tuple(f"c{i}" for i in range(6))


# ------------------------------------------------------------------ references
def make_spec(layout="yolov8", size=(320, 256), resize_mode="letterbox", options=None, anchors=50):
    h, w = size
    if layout == "rcnn_candidates":
        inputs = (TensorSpec("images__0", np.dtype(np.uint8), (3, -1, -1)),)
        outputs = (TensorSpec("boxes__0", np.dtype(np.float32), (anchors, 4)),
                   TensorSpec("scores__1", np.dtype(np.float32), (anchors,)),
                   TensorSpec("labels__2", np.dtype(np.int64), (anchors,)),
                   TensorSpec("count__3", np.dtype(np.int32), (1,)))
        resize_mode = "none"
    else:
        inputs = (TensorSpec("images__0", np.dtype(np.uint8), (3, h, w)),)
        dims = (4 + len(LABELS), anchors) if layout == "yolov8" else (anchors, 5 + len(LABELS))
        outputs = (TensorSpec("predictions__0", np.dtype(np.float32), dims),)
    return ModelSpec(name="det", task="detection", architecture="test", inputs=inputs, outputs=outputs,
                     resize_mode=resize_mode, output_layout=layout, labels=LABELS, options=options or {})


def context(spec, width, height) -> Context:
    """The context preprocess makes for a width x height image."""
    return Context(width, height, resize_plan(spec, width, height))


def random_rows(rng, n, w, h, objectness=False):
    """n candidate rows in input pixels: clustered boxes so that NMS has work to do."""
    centers = rng.uniform(0, [w, h], (6, 2))
    pick = rng.integers(0, 6, n)
    xy = centers[pick] + rng.normal(0, 6, (n, 2))
    wh = rng.uniform(10, 80, (n, 2))
    cls = rng.random((n, len(LABELS))) ** 3
    parts = [xy, wh] + ([rng.random((n, 1))] if objectness else []) + [cls]
    return np.concatenate(parts, 1).astype(np.float32)


# -------------------------------------------------------------------- letterbox
@pytest.mark.parametrize("size", [(240, 160), (160, 240), (101, 37), (640, 480), (320, 320), (7, 500)])
@pytest.mark.parametrize("out", [(320, 320), (256, 320)])
def test_letterbox_equals_ultralytics(size, out):
    rng = np.random.default_rng(sum(size) + sum(out))
    w, h = size
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out_h, out_w = out
    got = letterbox(Image.fromarray(pixels), out_w, out_h)
    np.testing.assert_array_equal(got, ultralytics_letterbox(pixels, out_h, out_w).transpose(2, 0, 1))


@pytest.mark.parametrize("size", [(240, 160), (101, 37), (1000, 333), (7, 500)])
def test_letterbox_placement_inverts_the_forward_map(size):
    w, h = size
    new_w, new_h, left, top = letterbox_geometry(w, h, 320, 256)
    rng = np.random.default_rng(w)
    original = np.concatenate([rng.uniform(0, w, (20, 1)), rng.uniform(0, h, (20, 1)),
                               rng.uniform(0, w, (20, 1)), rng.uniform(0, h, (20, 1))], 1)
    # Forward: the resize maps [0, w] onto [left, left + new_w] (pixel edges).
    forward = original * np.array([new_w / w, new_h / h] * 2) + np.array([left, top] * 2)
    back = resize.plan("letterbox", w, h, 320, 256).to_original(forward.astype(np.float64))
    np.testing.assert_allclose(back, original, rtol=0, atol=1e-9)
    # Ultralytics' scale_boxes divides by r instead: within half an input pixel.
    r = min(256 / h, 320 / w)
    ultra = (forward - np.array([left, top] * 2)) / r
    assert np.abs(ultra - back).max() <= 0.5 / r + 1e-9


def test_letterbox_keeps_content_where_the_placement_says():
    """A white rectangle on black comes back, through letterbox and the inverse, at
    its own pixel edges within one original pixel."""
    w, h, rect = 200, 120, (37, 21, 151, 88)
    img = np.zeros((h, w, 3), np.uint8)
    img[rect[1]:rect[3], rect[0]:rect[2]] = 255
    chw = letterbox(Image.fromarray(img), 320, 320)
    ys, xs = np.nonzero(chw.mean(0) > 127.5)
    box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float64)
    back = resize.plan("letterbox", w, h, 320, 320).to_original(box)[0]
    np.testing.assert_allclose(back, rect, atol=1.0)


def test_stretch_and_center_crop_placements():
    p = resize.plan("stretch", 200, 100, 50, 50)
    np.testing.assert_allclose(p.to_original(np.array([[0, 0, 50, 50]], np.float32)), [[0, 0, 200, 100]])
    # resize_center_crop: shorter side 100 -> 64 (the longer 200 -> 128), crop 56 centered.
    p = resize.plan("resize_center_crop", 200, 100, 56, 56, resize_size=64)
    new_w, new_h = resized_size_shorter_side(200, 100, 64)
    left, top = round((new_w - 56) / 2), round((new_h - 56) / 2)
    crop = np.array([[0, 0, 56, 56]], np.float64)
    np.testing.assert_allclose(p.to_original(crop)[0],
                               [left * 200 / new_w, top * 100 / new_h, (left + 56) * 200 / new_w,
                                (top + 56) * 100 / new_h])


# --------------------------------------------------------------------- decoding
@pytest.mark.parametrize("layout", ["yolov8", "yolov5"])
@pytest.mark.parametrize("seed", range(4))
def test_postprocess_equals_slow_reference(layout, seed):
    rng = np.random.default_rng(seed)
    v5 = layout == "yolov5"
    spec = make_spec(layout, anchors=400)
    rows = random_rows(rng, 400, spec.input_width, spec.input_height, objectness=v5)
    out = rows[None] if v5 else rows.T[None]
    classes = (1, 3) if seed % 2 else ()
    options = detection.DetectOptions(score_threshold=0.3, iou_threshold=0.45, max_detections=25,
                                      class_ids=classes, class_agnostic=seed == 2)
    w, h = 500, 300
    got = detection.postprocess({"predictions__0": out}, context(spec, w, h), spec, options)
    expected = slow_detect(rows, 0.3, 0.45, 25, classes, agnostic=seed == 2, objectness=v5)
    assert len(expected) >= 5
    assert got.labels.tolist() == [e[1] for e in expected]
    np.testing.assert_allclose(got.scores, [e[2] for e in expected], rtol=1e-6)
    assert got.names == tuple(LABELS[e[1]] for e in expected)
    # Letterbox 500x300 into 256x320 (w x h): r = 256/500, resized 256x154, top pad 83.
    new_w, new_h = round(w * 256 / 500), round(h * 256 / 500)
    top = (320 - new_h) // 2
    boxes = np.array([e[3] for e in expected])
    mapped = (boxes - [0, top, 0, top]) * np.array([w / new_w, h / new_h] * 2)
    mapped = np.clip(mapped, 0, [w, h, w, h])
    np.testing.assert_allclose(got.boxes, mapped, atol=1e-3)
    assert (got.width, got.height) == (w, h)


def test_rcnn_candidates_use_only_the_counted_rows():
    spec = make_spec("rcnn_candidates", anchors=6)
    boxes = np.array([[10, 10, 50, 50], [12, 12, 50, 50], [100, 100, 150, 140], [0, 0, 5, 5],
                      [1, 1, 2, 2], [1, 1, 2, 2]], np.float32)
    outputs = {"boxes__0": boxes[None], "scores__1": np.array([[0.9, 0.8, 0.7, 0.6, 0.99, 0.99]], np.float32),
               "labels__2": np.array([[1, 1, 2, 1, 3, 3]]), "count__3": np.array([[4]], np.int32)}
    options = detection.resolve_options({}, spec)
    got = detection.postprocess(outputs, context(spec, 120, 130), spec, options)
    # Row 1 is suppressed by row 0 (IoU 0.9 > 0.5, same class); rows 4-5 are padding.
    assert got.labels.tolist() == [1, 2, 1]
    np.testing.assert_allclose(got.boxes, [[10, 10, 50, 50], [100, 100, 120, 130], [0, 0, 5, 5]])


def test_rcnn_images_above_max_input_side_are_downscaled_and_mapped_back():
    spec = make_spec("rcnn_candidates", options={"max_input_side": "100"})
    decoded = Decoded(Image.new("RGB", (400, 200)))
    tensors, where = detection.preprocess(decoded, spec)
    assert tensors["images__0"].shape == (1, 3, 50, 100)
    np.testing.assert_allclose(where.plan.to_original(np.array([[10, 5, 100, 50]], np.float32)),
                               [[40, 20, 400, 200]])
    small = make_spec("rcnn_candidates", options={"max_input_side": "1000"})
    assert detection.preprocess(decoded, small)[0]["images__0"].shape == (1, 3, 200, 400)


def test_no_candidates_gives_an_empty_answer():
    spec = make_spec()
    out = np.zeros((1, 4 + len(LABELS), 50), np.float32)
    got = detection.postprocess({"predictions__0": out}, context(spec, 10, 10), spec,
                                detection.resolve_options({}, spec))
    assert got.boxes.shape == (0, 4) and got.scores.shape == (0,) and got.names == ()


# ---------------------------------------------------------------------- options
def test_options_default_to_the_models_then_the_pipelines():
    spec = make_spec(options={"score_threshold": "0.25", "iou_threshold": "0.7", "max_detections": "300",
                              "class_agnostic": "true"})
    assert detection.resolve_options({}, spec) == detection.DetectOptions(0.25, 0.7, 300, (), True)
    bare = detection.resolve_options({}, make_spec())
    # A yolov8 model without options takes its layout's defaults: Ultralytics' predict ones.
    yolo = layouts.get("yolov8")
    assert (bare.score_threshold, bare.iou_threshold, bare.max_detections, bare.class_agnostic) == (
        yolo.default("score_threshold"), yolo.default("iou_threshold"), yolo.default("max_detections"), False)
    assert (bare.score_threshold, bare.iou_threshold, bare.max_detections) == (0.25, 0.7, 300)
    got = detection.resolve_options({"score_threshold": 0.0, "iou_threshold": 1.0, "max_detections": 7,
                                     "class_ids": [5, 0]}, spec)
    assert (got.score_threshold, got.iou_threshold, got.max_detections, got.class_ids) == (0.0, 1.0, 7, (5, 0))


@pytest.mark.parametrize("request_fields, field", [
    ({"score_threshold": -0.01}, "score_threshold"),
    ({"score_threshold": 1.5}, "score_threshold"),
    ({"score_threshold": math.nan}, "score_threshold"),
    ({"iou_threshold": 2.0}, "iou_threshold"),
    ({"max_detections": 0}, "max_detections"),
    ({"max_detections": layouts.MAX_DETECTIONS_CAP + 1}, "max_detections"),
    ({"class_ids": [0, 6]}, "class_ids[1]"),
])
def test_bad_options_name_their_field(request_fields, field):
    with pytest.raises(InvalidArgument) as info:
        detection.resolve_options(request_fields, make_spec())
    assert info.value.field == field


def test_unknown_layout_is_refused():
    spec = make_spec(layout="ssd")
    with pytest.raises(FailedPrecondition, match="ssd"):
        detection.TASK.options({}, spec)


def test_resize_mode_and_input_size_must_agree():
    fixed_none = make_spec(resize_mode="none")
    with pytest.raises(FailedPrecondition, match="variable size"):
        detection.preprocess(Decoded(Image.new("RGB", (20, 10))), fixed_none)


@pytest.mark.parametrize("layout", ["yolov8", "yolov5"])
def test_early_threshold_keeps_exactly_the_candidates_above_it(layout):
    rng = np.random.default_rng(7)
    v5 = layout == "yolov5"
    rows = random_rows(rng, 300, 256, 320, objectness=v5)
    out = {"predictions__0": rows[None] if v5 else rows.T[None]}
    names = ("predictions__0",)
    some = layouts.decode_candidates(out, layout, names, 0.5)
    every = layouts.decode_candidates(out, layout, names)
    # One candidate per anchor, in anchor order; the early threshold keeps exactly those above it.
    assert len(every.scores) == 300
    above = every.scores > 0.5
    np.testing.assert_array_equal(some.boxes, every.boxes[above])
    np.testing.assert_array_equal(some.scores, every.scores[above])
    np.testing.assert_array_equal(some.labels, every.labels[above])
    cls = rows[:, 5:] * rows[:, 4:5] if v5 else rows[:, 4:]
    np.testing.assert_array_equal(every.labels, [int(np.argmax(r)) for r in cls])
    np.testing.assert_allclose(every.scores, cls.max(1), rtol=1e-6)
    assert 0 < above.sum() < 300

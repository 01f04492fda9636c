"""Detect and DetectStream through the real gateway and the real Triton.

- Coordinate mapping: BrightBox models (tests/stack_detection.py) box the bright pixels
  of their input; the answer must be the bright rectangle of the original image within
  1 px, for letterbox and stretch, yolov8 (TorchScript) and yolov5 (ONNX) layouts,
  non-square images and EXIF-rotated JPEGs.
- YOLO: the served model equals its eager PyTorch model fed by Ultralytics' letterbox,
  decoded by an independent per-box reference (tests/references.py's slow_detect)
  and mapped back with Ultralytics' scale_boxes.
"""
from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from helpers import PHOTO_NAMES, encode, photo, with_exif_orientation
from service._proto import vision_pb2
from stack_detection import BRIGHTBOX_LABELS, BRIGHTBOX_SCORE, YOLO_INPUT_SIZE
from references import slow_detect, ultralytics_letterbox

pytestmark = pytest.mark.e2e

# The tests' candidates per photo before NMS when they pick the threshold themselves.
CANDIDATES_PER_PHOTO = 30
MIN_DETECTIONS = 5


def detect(vision, model, images, **fields):
    return vision.Detect(vision_pb2.DetectRequest(model=model, images=images, **fields), timeout=120)


def as_rows(detections) -> tuple[list[int], np.ndarray, np.ndarray]:
    labels = [d.label.index for d in detections.detections]
    scores = np.array([d.label.score for d in detections.detections])
    boxes = np.array([[d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max] for d in detections.detections])
    return labels, scores, boxes.reshape(-1, 4)


def bright_rectangle(size, rect) -> Image.Image:
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, :, 2] = 60  # not pure black: a dim blue background
    x1, y1, x2, y2 = rect
    pixels[y1:y2, x1:x2] = (250, 240, 230)
    return Image.fromarray(pixels)


# ----------------------------------------------------------------- coordinates
CASES = [((200, 120), (37, 21, 151, 88)), ((150, 260), (10, 100, 140, 250)), ((480, 200), (300, 20, 470, 190))]


@pytest.mark.parametrize("model", ["brightbox_letterbox", "brightbox_stretch", "brightbox_v5"])
@pytest.mark.parametrize("size, rect", CASES)
def test_box_comes_back_in_original_pixels(vision, model, size, rect):
    image = bright_rectangle(size, rect)
    result = detect(vision, model, [vision_pb2.Image(encoded=encode(image, "PNG"))]).results[0]
    assert (result.image_width, result.image_height) == size
    labels, scores, boxes = as_rows(result)
    assert labels == [1] and result.detections[0].label.name == BRIGHTBOX_LABELS[1]
    np.testing.assert_allclose(scores, [BRIGHTBOX_SCORE], rtol=1e-6)
    np.testing.assert_allclose(boxes[0], rect, atol=1.0)


@pytest.mark.parametrize("model", ["brightbox_letterbox", "brightbox_stretch"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_boxes_are_upright(vision, model, orientation):
    size, rect = CASES[0]
    data = with_exif_orientation(bright_rectangle(size, rect), orientation)
    result = detect(vision, model, [vision_pb2.Image(encoded=data)]).results[0]
    assert (result.image_width, result.image_height) == size
    np.testing.assert_allclose(as_rows(result)[2][0], rect, atol=1.0)


def test_raw_images_and_batches_keep_their_own_sizes(vision):
    images = [bright_rectangle(size, rect) for size, rect in CASES]
    request = [vision_pb2.Image(raw=vision_pb2.RawImage(data=np.asarray(im).tobytes(), height=im.height,
                                                        width=im.width)) for im in images]
    response = detect(vision, "brightbox_letterbox", request)
    for result, (size, rect) in zip(response.results, CASES):
        assert (result.image_width, result.image_height) == size
        np.testing.assert_allclose(as_rows(result)[2][0], rect, atol=1.0)


# ------------------------------------------------------------------------ YOLO
@pytest.fixture(scope="module")
def yolo_reference(stack):
    """Eager YOLO (the zoo's nn.Module with the test checkpoint) on Ultralytics'
    letterbox; rows [A, 4 + C] in input pixels, and Ultralytics' scale_boxes."""
    import torch

    from service.export import zoo

    model = zoo.get("yolo").build(80)
    model.load_state_dict(torch.load(stack.checkpoints["yolo"], weights_only=True))
    model.eval()
    size = YOLO_INPUT_SIZE

    def rows(image: Image.Image) -> np.ndarray:
        boxed = ultralytics_letterbox(np.asarray(image), size, size)
        x = torch.from_numpy(boxed.transpose(2, 0, 1).copy())[None].float() / 255
        with torch.inference_mode():
            return model(x)[0].numpy().T

    def scale_boxes(boxes: np.ndarray, image: Image.Image) -> np.ndarray:
        gain = min(size / image.height, size / image.width)
        pad_x = round((size - image.width * gain) / 2 - 0.1)
        pad_y = round((size - image.height * gain) / 2 - 0.1)
        out = (boxes - [pad_x, pad_y, pad_x, pad_y]) / gain
        return np.clip(out, 0, [image.width, image.height] * 2)

    return rows, scale_boxes


def threshold_between(rows: np.ndarray, k: int) -> float:
    """A score threshold half-way between the k-th and (k+1)-th best candidate scores,
    so no candidate sits near it."""
    best = np.sort(rows[:, 4:].max(1))[::-1]
    return float((best[k - 1] + best[k]) / 2)


def compare(result, expected, scale_boxes, image):
    labels, scores, boxes = as_rows(result)
    assert len(expected) >= MIN_DETECTIONS
    assert labels == [e[1] for e in expected]
    np.testing.assert_allclose(scores, [e[2] for e in expected], atol=1e-5)
    np.testing.assert_allclose(boxes, scale_boxes(np.array([e[3] for e in expected]), image), atol=1.0)


@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_yolo_equals_eager_model_and_reference_postprocessing(vision, yolo_reference, name):
    rows, scale_boxes = yolo_reference
    image = photo(name)
    candidate_rows = rows(image)
    threshold = threshold_between(candidate_rows, CANDIDATES_PER_PHOTO)
    expected = slow_detect(candidate_rows, threshold, 0.7, 300)
    result = detect(vision, "yolo", [vision_pb2.Image(encoded=encode(image, "PNG"))],
                    score_threshold=threshold).results[0]
    compare(result, expected, scale_boxes, image)
    assert all(d.label.name for d in result.detections)


def test_yolo_defaults_and_class_filter(vision, yolo_reference):
    """Unset options are the model's defaults (Ultralytics': 0.25, 0.7, 300); class_ids,
    iou_threshold and max_detections set by the request match the reference."""
    rows, scale_boxes = yolo_reference
    image = photo("astronaut.png")
    data = [vision_pb2.Image(encoded=encode(image, "PNG"))]
    defaults = detect(vision, "yolo", data)
    explicit = detect(vision, "yolo", data, score_threshold=0.25, iou_threshold=0.7, max_detections=300)
    assert defaults == explicit and len(defaults.results[0].detections) >= MIN_DETECTIONS
    candidate_rows = rows(image)
    threshold = threshold_between(candidate_rows, 100)
    some = sorted({e[1] for e in slow_detect(candidate_rows, threshold, 0.5, 1000)})[:3]
    expected = slow_detect(candidate_rows, threshold, 0.5, 20, classes=tuple(some))
    result = detect(vision, "yolo", data, score_threshold=threshold, iou_threshold=0.5, max_detections=20,
                    class_ids=some).results[0]
    compare(result, expected, scale_boxes, image)


@pytest.mark.parametrize("name", ["coffee.png", "motorcycle_left.png"])
def test_ultralytics_layout_file_serves_like_the_zoo_entry(vision, yolo_reference, name):
    """The same weights brought in as a float-input ONNX file (x / 255 done by the
    gateway, ONNX Runtime) answer as the zoo's uint8 TorchScript entry."""
    rows, _ = yolo_reference
    image = photo(name)
    threshold = threshold_between(rows(image), CANDIDATES_PER_PHOTO)
    data = [vision_pb2.Image(encoded=encode(image, "PNG"))]
    zoo_labels, zoo_scores, zoo_boxes = as_rows(detect(vision, "yolo", data, score_threshold=threshold).results[0])
    labels, scores, boxes = as_rows(detect(vision, "yolo_from_file", data, score_threshold=threshold).results[0])
    assert len(zoo_labels) >= MIN_DETECTIONS and labels == zoo_labels
    np.testing.assert_allclose(scores, zoo_scores, atol=1e-4)
    np.testing.assert_allclose(boxes, zoo_boxes, atol=0.05)


def test_detect_errors(vision):
    data = [vision_pb2.Image(encoded=encode(photo("coffee.png"), "PNG"))]
    for fields, field in (({"class_ids": [80]}, "class_ids[0]"), ({"score_threshold": 1.5}, "score_threshold"),
                          ({"max_detections": 0}, "max_detections")):
        with pytest.raises(grpc.RpcError) as info:
            detect(vision, "yolo", data, **fields)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _bad_field(info.value) == field
    with pytest.raises(grpc.RpcError) as info:
        detect(vision, "resnet18", data)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:
        vision.Classify(vision_pb2.ClassifyRequest(model="yolo", images=data), timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def _bad_field(error) -> str:
    status = rpc_status.from_call(error)
    detail = error_details_pb2.BadRequest()
    status.details[0].Unpack(detail)
    return detail.field_violations[0].field


# ----------------------------------------------------------------- DetectStream
def _frames():
    names = ("astronaut.png", "coffee.png", "motorcycle_left.png", "chelsea.png", "astronaut.png")
    return [vision_pb2.DetectRequest(model="yolo", images=[vision_pb2.Image(encoded=encode(photo(n), "JPEG"))],
                                     score_threshold=0.6) for n in names]


def assert_same_answers(got, want):
    """Equal detections up to float noise: pipelined frames may share a Triton batch
    with each other, single calls run alone."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.model, g.model_version, len(g.results)) == (w.model, w.model_version, len(w.results))
        for gr, wr in zip(g.results, w.results):
            assert (gr.image_width, gr.image_height) == (wr.image_width, wr.image_height)
            g_labels, g_scores, g_boxes = as_rows(gr)
            w_labels, w_scores, w_boxes = as_rows(wr)
            assert g_labels == w_labels
            np.testing.assert_allclose(g_scores, w_scores, atol=1e-5)
            np.testing.assert_allclose(g_boxes, w_boxes, atol=1e-2)


def test_stream_of_frames_equals_detect_calls_in_order(vision):
    frames = _frames()
    streamed = list(vision.DetectStream(iter(frames), timeout=300))
    single = [vision.Detect(frame, timeout=120) for frame in frames]
    assert_same_answers(streamed, single)
    # The frames differ, so equal answers at every index means request order.
    assert len({r.results[0].SerializeToString() for r in single}) >= 3


def test_stream_bad_frame_ends_it_naming_the_frame(vision):
    frames = _frames()[:3]
    frames.insert(2, vision_pb2.DetectRequest(model="yolo", images=[vision_pb2.Image(encoded=b"not an image")]))
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for response in vision.DetectStream(iter(frames), timeout=300):
            got.append(response)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_field(info.value) == "frames[2].images[0].encoded"
    assert "frames[2].images[0].encoded" in info.value.details()
    assert_same_answers(got, [vision.Detect(frame, timeout=120) for frame in frames[:2]])
    # The server keeps serving.
    assert len(vision.Detect(frames[0], timeout=120).results) == 1


def test_stream_option_error_names_the_frame(vision):
    frames = _frames()[:2]
    frames[1].score_threshold = 7.0
    with pytest.raises(grpc.RpcError) as info:
        list(vision.DetectStream(iter(frames), timeout=300))
    assert _bad_field(info.value) == "frames[1].score_threshold"


# ---------------------------------------------------------------------- predict
def test_predict_prints_a_table_and_draws_boxes(stack, tmp_path):
    size, rect = CASES[0]
    source = tmp_path / "in.png"
    bright_rectangle(size, rect).save(source)
    out = tmp_path / "out.png"
    run = subprocess.run([sys.executable, "-m", "service.cli", "predict", str(source), "--model",
                          "brightbox_letterbox", "--server", stack.address, "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "bright" in run.stdout and "1 detections" in run.stdout
    before, after = np.asarray(Image.open(source).convert("RGB")), np.asarray(Image.open(out).convert("RGB"))
    changed = np.any(before != after, axis=2)
    ys, xs = np.nonzero(changed)
    # The outline is drawn on the box's edges (and the caption tab above it).
    assert abs(xs.min() - rect[0]) <= 2 and abs(xs.max() - rect[2]) <= 2 and abs(ys.max() - rect[3]) <= 2

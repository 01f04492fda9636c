"""Imported files served through the real gateway and the real Triton
(tests/stack_imports.py), each against its origin's own convention computed here:

- ``ultra_det``, an Ultralytics detect export with its batch fixed at 1: Ultralytics'
  predict rules written out (LetterBox(auto=False), x / 255, the file run by ONNX
  Runtime, conf 0.25 / iou 0.7 / max_det 300 as tests/references.py's slow_detect, and
  scale_boxes), for several images in one request and in a DetectStream;
- ``ultra_cls``, an Ultralytics classify export: classify_transforms written out, the
  file's own softmax;
- ``keras_nhwc``: HWC pixels normalized as Keras' MobileNet preprocess_input, its
  tensors in an external data file that the entry carries;
- ``caffe_bgr``: a float16 model that answers by channel order.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2 as mc

from helpers import PHOTO_NAMES, encode, photo
from model_files import (BGR_LABELS, CLASSIFY_IMGSZ, CLASSIFY_NAMES, DETECT_IMGSZ, DETECT_NAMES, KERAS_HEIGHT,
                         KERAS_MEAN, KERAS_STD, KERAS_WIDTH)
from references import slow_detect, ultralytics_classify_transforms, ultralytics_letterbox
from service._proto import vision_pb2
from stack_imports import KERAS_EXTERNAL_DATA, ULTRA_DET_INSTANCES

pytestmark = pytest.mark.e2e

# Ultralytics' predict defaults (conf, iou, max_det), written out as the reference's own.
CONF, IOU, MAX_DET = 0.25, 0.7, 300
MIN_DETECTIONS = 3


def run(path, array: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: array})[0]


def png(image: Image.Image) -> vision_pb2.Image:
    return vision_pb2.Image(encoded=encode(image, "PNG"))


def ultralytics_predict(source, image: Image.Image) -> list:
    """Ultralytics' detect predict on an RGB image: [(class, score, box in original px)]."""
    size = DETECT_IMGSZ
    boxed = ultralytics_letterbox(np.asarray(image), size, size)
    x = (boxed.transpose(2, 0, 1)[None] / 255).astype(np.float32)
    kept = slow_detect(run(source, x)[0].T, CONF, IOU, MAX_DET)
    # ultralytics.utils.ops.scale_boxes
    gain = min(size / image.height, size / image.width)
    pad_x = round((size - image.width * gain) / 2 - 0.1)
    pad_y = round((size - image.height * gain) / 2 - 0.1)
    return [(cls, score, np.clip((np.array(box) - [pad_x, pad_y, pad_x, pad_y]) / gain, 0,
                                 [image.width, image.height] * 2)) for _, cls, score, box in kept]


def assert_detections(result, expected, image):
    assert (result.image_width, result.image_height) == image.size
    assert len(expected) >= MIN_DETECTIONS
    assert [d.label.index for d in result.detections] == [e[0] for e in expected]
    assert [d.label.name for d in result.detections] == [DETECT_NAMES[e[0]] for e in expected]
    np.testing.assert_allclose([d.label.score for d in result.detections], [e[1] for e in expected], atol=1e-5)
    boxes = [[d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max] for d in result.detections]
    # Ultralytics' scale_boxes takes its padding from the unrounded resized size, up to
    # one model-input pixel away from where its LetterBox put the image (motorcycle_left:
    # 216 px high -> 64.8, placed at 15, unpadded from 16); the gateway inverts the
    # letterbox exactly. One input pixel, in original pixels:
    input_pixel = max(image.width, image.height) / DETECT_IMGSZ
    np.testing.assert_allclose(boxes, [e[2] for e in expected], atol=input_pixel + 1e-3)


def test_fixed_batch_ultralytics_file_answers_several_images_as_ultralytics(vision, stack):
    images = [photo(name) for name in PHOTO_NAMES[:4]]
    response = vision.Detect(vision_pb2.DetectRequest(model="ultra_det", images=[png(i) for i in images]),
                             timeout=120)
    assert len(response.results) == len(images)
    for result, image in zip(response.results, images):
        assert_detections(result, ultralytics_predict(stack.checkpoints["ultra_det"], image), image)


def test_fixed_batch_file_in_a_detect_stream(vision, stack):
    frames = [[photo(a), photo(b)] for a, b in (PHOTO_NAMES[:2], PHOTO_NAMES[2:4], PHOTO_NAMES[3:5])]
    requests = [vision_pb2.DetectRequest(model="ultra_det", images=[png(i) for i in frame]) for frame in frames]
    answers = list(vision.DetectStream(iter(requests), timeout=300))
    assert len(answers) == len(frames)
    for answer, frame in zip(answers, frames):
        for result, image in zip(answer.results, frame):
            assert_detections(result, ultralytics_predict(stack.checkpoints["ultra_det"], image), image)


def test_fixed_batch_entry_has_no_triton_batching_and_its_instances(vision, stack):
    config = text_format.Parse((stack.repo / "ultra_det" / "configs" / "cpu.pbtxt").read_text(), mc.ModelConfig())
    assert config.max_batch_size == 0 and config.instance_group[0].count == ULTRA_DET_INSTANCES
    assert list(config.input[0].dims) == [1, 3, DETECT_IMGSZ, DETECT_IMGSZ]
    info = vision.GetModel(vision_pb2.GetModelRequest(name="ultra_det"), timeout=30)
    assert (info.task, info.max_batch_size, info.resize_mode) == ("detection", 1, "letterbox")
    assert list(info.labels) == list(DETECT_NAMES.values())
    assert (info.input_width, info.input_height) == (DETECT_IMGSZ, DETECT_IMGSZ)


def test_ultralytics_classify_file_answers_as_ultralytics(vision, stack):
    images = [photo(name) for name in PHOTO_NAMES[:3]]
    response = vision.Classify(vision_pb2.ClassifyRequest(model="ultra_cls", images=[png(i) for i in images],
                                                          top_k=2), timeout=120)
    for result, image in zip(response.results, images):
        probs = run(stack.checkpoints["ultra_cls"], ultralytics_classify_transforms(image, CLASSIFY_IMGSZ))[0]
        order = np.argsort(-probs)[:2]
        assert [label.index for label in result.labels] == list(order)
        assert [label.name for label in result.labels] == [CLASSIFY_NAMES[i] for i in order]
        np.testing.assert_allclose([label.score for label in result.labels], probs[order], atol=2e-4)


def test_keras_nhwc_file_sees_hwc_pixels(vision, stack):
    # The entry holds the file's external data where the file names it (Triton loads both).
    version = stack.repo / "keras_nhwc" / "1"
    assert (version / KERAS_EXTERNAL_DATA).is_file() and (version / "model.onnx").is_file()
    images = [photo(name).resize((KERAS_WIDTH, KERAS_HEIGHT), Image.BILINEAR) for name in PHOTO_NAMES[:3]]
    response = vision.Classify(vision_pb2.ClassifyRequest(model="keras_nhwc", images=[png(i) for i in images],
                                                          top_k=3), timeout=120)
    for result, image in zip(response.results, images):
        x = ((np.asarray(image, np.float32) / 255 - KERAS_MEAN) / KERAS_STD).astype(np.float32)[None]
        probs = run(stack.checkpoints["keras_nhwc"], x)[0]
        order = np.argsort(-probs)[:3]
        assert [label.index for label in result.labels] == list(order)
        np.testing.assert_allclose([label.score for label in result.labels], probs[order], atol=2e-4)


@pytest.mark.parametrize("colour, expected", [((0, 0, 255), "blue"), ((255, 0, 0), "red"), ((40, 90, 220), "blue")])
def test_bgr_float16_file_is_fed_bgr(vision, colour, expected):
    image = Image.new("RGB", (50, 40), colour)
    response = vision.Classify(vision_pb2.ClassifyRequest(model="caffe_bgr", images=[png(image)], top_k=1),
                               timeout=120)
    assert response.results[0].labels[0].name == expected and expected in BGR_LABELS

"""Imported files' inputs through the classification pipeline: NHWC, float16, BGR and
Ultralytics' classify preprocessing, each against the model's own convention written
out independently (HWC pixels as PIL gives them, no transposes), and the file itself
run by ONNX Runtime on both."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from helpers import photo
from references import ultralytics_classify_transforms
from model_files import (BGR_LABELS, CLASSIFY_IMGSZ, KERAS_HEIGHT, KERAS_LABELS, KERAS_MEAN, KERAS_STD,
                         KERAS_WIDTH, bgr_half_file, keras_nhwc_file, ultralytics_classify_file)
from service.export.files import export_from_file
from service.ops.imaging import Decoded
from service.pipelines import classification


def run(path, array: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: array})[0]


def labels_file(tmp_path, labels) -> str:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(labels) + "\n")
    return path


def served(spec, source, image: Image.Image) -> tuple[np.ndarray, list]:
    """The pipeline's model input for `image`, and its answer from the file's outputs."""
    task = classification.TASK
    k = task.options({"top_k": 2}, spec)
    tensors, context = task.preprocess(Decoded(image), spec, k)
    (array,) = tensors.values()
    outputs = {spec.outputs[0].name: run(source, array)}
    return array, task.postprocess(outputs, context, spec, k)


@pytest.mark.parametrize("name", ["astronaut.png", "coffee.png"])
def test_keras_nhwc_input_is_hwc_pixels_normalized(tmp_path, name):
    source = keras_nhwc_file(tmp_path / "keras.onnx")
    spec = export_from_file(source, tmp_path / "repo", task="classification", layout="probabilities",
                            labels_file=labels_file(tmp_path, KERAS_LABELS), mean=KERAS_MEAN, std=KERAS_STD).spec
    # At the input's size, so the reference needs no resize: what Keras was fed.
    image = photo(name).resize((KERAS_WIDTH, KERAS_HEIGHT), Image.BILINEAR)
    want = ((np.asarray(image, np.float32) / 255 - KERAS_MEAN) / KERAS_STD).astype(np.float32)[None]
    got, answer = served(spec, source, image)
    assert got.shape == (1, KERAS_HEIGHT, KERAS_WIDTH, 3)
    np.testing.assert_allclose(got, want, atol=1e-6)
    probs = run(source, want)[0]
    assert [label.index for label in answer] == list(np.argsort(-probs)[:2])
    np.testing.assert_allclose([label.score for label in answer], np.sort(probs)[::-1][:2], rtol=1e-5)


@pytest.mark.parametrize("colour, expected", [((0, 0, 255), "blue"), ((255, 0, 0), "red"), ((20, 40, 200), "blue")])
def test_bgr_half_model_sees_bgr_in_float16(tmp_path, colour, expected):
    source = bgr_half_file(tmp_path / "bgr.onnx")
    spec = export_from_file(source, tmp_path / "repo", task="classification", channel_order="bgr",
                            labels_file=labels_file(tmp_path, BGR_LABELS), mean=(0, 0, 0), std=(1, 1, 1)).spec
    image = Image.new("RGB", (40, 30), colour)
    got, answer = served(spec, source, image)
    assert got.dtype == np.float16 and got.shape == (1, 3, 16, 16)
    np.testing.assert_array_equal(got[0, :, 0, 0], (np.array(colour[::-1]) / 255).astype(np.float16))
    assert answer[0].name == expected


@pytest.mark.parametrize("name", ["chelsea.png", "rocket.jpg"])
def test_ultralytics_classify_file_is_fed_as_ultralytics_predicts(tmp_path, name):
    source = ultralytics_classify_file(tmp_path / "cls.onnx")
    spec = export_from_file(source, tmp_path / "repo").spec
    image = photo(name)
    want = ultralytics_classify_transforms(image, CLASSIFY_IMGSZ)
    got, answer = served(spec, source, image)
    # Pillow rounds the crop folded into the resize like resize-then-crop, up to one
    # level on a rare pixel.
    np.testing.assert_allclose(got, want, atol=1 / 255 + 1e-6)
    assert np.mean(np.abs(got - want) > 1e-6) < 1e-3
    probs = run(source, got)[0]  # the file's own softmax: used as it is
    assert [label.index for label in answer] == list(np.argsort(-probs)[:2])
    np.testing.assert_allclose([label.score for label in answer], np.sort(probs)[::-1][:2], rtol=1e-5)

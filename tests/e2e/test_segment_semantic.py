"""Segment with U-Net and SegNet through the real gateway and the real Triton, against
an independent reference: the eager model built from the same checkpoint, fed the
photo stretched by Pillow, then ``F.interpolate(bilinear, align_corners=False)`` to the
original size and ``argmax`` (the method the gateway states it uses)."""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image, ImageOps

from helpers import bad_request_field, as_array, encode, photo, with_exif_orientation
from service._proto import vision_pb2
from stack_segmentation import SEGNET_INPUT, UNET_INPUT

pytestmark = pytest.mark.e2e

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png")
# model entry -> (architecture, input size)
ENTRIES = {"unet": ("unet", UNET_INPUT), "unet_onnx": ("unet", UNET_INPUT), "segnet": ("segnet", SEGNET_INPUT)}
# Triton's logits may differ from eager ones in the last float bits (ONNX Runtime, other
# batch sizes), which can only flip the argmax where the two best classes are this close.
NEAR_TIE = 1e-4


@pytest.fixture(scope="module")
def reference(stack):
    """entry -> fn(upright PIL image) -> (label map [H, W], interpolated logits [C, H, W])."""
    import torch
    import torch.nn.functional as F

    from service.export import zoo

    models = {}
    for arch_name in ("unet", "segnet"):
        arch = zoo.get(arch_name)
        model = arch.build(arch.num_classes)
        model.load_state_dict(torch.load(stack.checkpoints[arch_name], weights_only=True))
        models[arch_name] = (model.eval(), arch.mean, arch.std)

    def run(entry: str, image: Image.Image):
        arch_name, size = ENTRIES[entry]
        model, mean, std = models[arch_name]
        small = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32)
        x = torch.from_numpy(small.transpose(2, 0, 1).copy())[None] / 255.0
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.inference_mode():
            logits = F.interpolate(model(x), size=(image.height, image.width), mode="bilinear",
                                   align_corners=False)[0]
        return logits.argmax(0).numpy(), logits.numpy()
    return run


def segment(vision, model, images, **fields):
    return vision.Segment(vision_pb2.SegmentRequest(model=model, images=images, **fields), timeout=120)


def decode_label_map(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode in ("L", "I;16")
    return np.asarray(image).astype(np.int64)


def assert_label_maps_equal(got: np.ndarray, expected: np.ndarray, logits: np.ndarray):
    """Equal, except possibly at pixels where the reference's two best classes are
    within NEAR_TIE (there must be almost none)."""
    assert got.shape == expected.shape
    diff = got != expected
    if diff.any():
        top2 = np.sort(logits[:, diff], axis=0)[-2:]
        assert (top2[1] - top2[0] < NEAR_TIE).all(), "label differs away from a near-tie"
        assert diff.mean() < 1e-3


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_label_map_equals_eager_plus_bilinear_argmax(vision, reference, entry):
    for name in PHOTOS:
        image = photo(name)
        response = segment(vision, entry, [vision_pb2.Image(encoded=encode(image, "PNG"))])
        result = response.results[0]
        assert (result.image_width, result.image_height) == image.size
        assert not result.instances
        got = decode_label_map(result.label_map_png)
        expected, logits = reference(entry, image)
        assert_label_maps_equal(got, expected, logits)
        # Per-class counts: exactly the classes present, with their pixel counts.
        counts = np.bincount(got.ravel(), minlength=21)
        present = np.flatnonzero(counts)
        assert [c.label.index for c in result.classes] == present.tolist()
        assert [c.pixels for c in result.classes] == counts[present].tolist()
        assert all(c.label.name and abs(c.label.score - c.pixels / got.size) < 1e-6 for c in result.classes)
        assert len(present) >= 2, "the scaled classifier should make several classes win"
    assert response.model == entry and response.model_version == "1"


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_label_map_has_the_upright_size_for_exif_rotated_input(vision, reference, orientation):
    data = with_exif_orientation(photo("astronaut.png", max_side=200).crop((0, 0, 200, 150)), orientation)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert upright.size == (200, 150)
    result = segment(vision, "unet", [vision_pb2.Image(encoded=data)]).results[0]
    assert (result.image_width, result.image_height) == (200, 150)
    got = decode_label_map(result.label_map_png)
    assert got.shape == (150, 200)
    expected, logits = reference("unet", upright)
    assert_label_maps_equal(got, expected, logits)


def test_batch_of_mixed_sizes_equals_single_calls(vision):
    images = [photo(name) for name in PHOTOS] + [photo("rocket.jpg", max_side=150)]
    encoded = [vision_pb2.Image(encoded=encode(image, "PNG")) for image in images]
    batch = segment(vision, "segnet", encoded)
    assert len(batch.results) == len(images)
    for image, one, result in zip(images, encoded, batch.results):
        single = segment(vision, "segnet", [one]).results[0]
        assert (result.image_width, result.image_height) == image.size
        assert result.label_map_png == single.label_map_png


def test_raw_image_equals_encoded(vision):
    image = photo("coffee.png")
    pixels = as_array(image)
    raw = vision_pb2.Image(raw=vision_pb2.RawImage(data=pixels.tobytes(), height=pixels.shape[0],
                                                   width=pixels.shape[1]))
    from_raw = segment(vision, "unet", [raw]).results[0]
    from_png = segment(vision, "unet", [vision_pb2.Image(encoded=encode(image, "PNG"))]).results[0]
    assert from_raw.label_map_png == from_png.label_map_png


def test_semantic_models_ignore_valid_instance_fields(vision):
    image = [vision_pb2.Image(encoded=encode(photo("chelsea.png"), "PNG"))]
    plain = segment(vision, "unet", image).results[0]
    with_fields = segment(vision, "unet", image, mask_format=vision_pb2.MASK_FORMAT_PNG, score_threshold=0.9,
                          iou_threshold=0.3, max_detections=3).results[0]
    assert with_fields.label_map_png == plain.label_map_png



@pytest.mark.parametrize("fields, field", [
    ({"score_threshold": 1.5}, "score_threshold"),
    ({"score_threshold": float("nan")}, "score_threshold"),
    ({"iou_threshold": -0.1}, "iou_threshold"),
    ({"max_detections": 0}, "max_detections"),
    ({"mask_format": 7}, "mask_format"),
])
def test_bad_fields_are_invalid_argument_naming_the_field(vision, fields, field):
    image = [vision_pb2.Image(encoded=encode(photo("chelsea.png"), "PNG"))]
    with pytest.raises(grpc.RpcError) as info:
        segment(vision, "unet", image, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(info.value) == field
    assert segment(vision, "unet", image).results[0].label_map_png  # still serving


def test_segment_on_a_classifier_is_failed_precondition(vision):
    with pytest.raises(grpc.RpcError) as info:
        segment(vision, "resnet18", [vision_pb2.Image(encoded=encode(photo("chelsea.png"), "PNG"))])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_predict_cli_prints_classes_and_draws_the_label_map(stack, vision, tmp_path):
    import json
    import subprocess
    import sys

    image = photo("coffee.png")
    path = tmp_path / "coffee.png"
    image.save(path)
    base = [sys.executable, "-m", "service.cli", "predict", str(path), "--model", "unet", "--server", stack.address]
    out = tmp_path / "out.png"
    run = subprocess.run(base + ["--json", "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout[:run.stdout.rindex("}") + 1])
    result = segment(vision, "unet", [vision_pb2.Image(encoded=encode(image, "PNG"))]).results[0]
    assert [(c["index"], c["pixels"]) for c in payload["results"][0]["classes"]] == \
        [(c.label.index, c.pixels) for c in result.classes]
    label_map = decode_label_map(result.label_map_png)
    with Image.open(out) as drawn:
        assert drawn.size == image.size
        changed = np.any(as_array(drawn) != as_array(image), axis=2)
    # Coloured where a class other than background won, untouched elsewhere.
    assert not changed[label_map == 0].any()
    assert changed[label_map != 0].mean() > 0.9
    table = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and result.classes[0].label.name in table.stdout

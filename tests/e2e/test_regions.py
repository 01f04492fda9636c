"""R-CNN and Fast R-CNN end to end: Detect through the real gateway and a real Triton
(proposals, warp or scale, decoding in the gateway), against the eager model fed the
same proposals plus torchvision's own RoIHeads postprocessing."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import encode, photo
from service.export import zoo  # noqa: F401  (torchvision op shim before torchvision)
from service._proto import vision_pb2
from service.ops.imaging import decode_encoded
from service.pipelines.regions import REGION_INPUTS, image_proposals
from service.spec import ModelSpec
from stack_regions import FAST_OPTIONS, REGION_OPTIONS

from torchvision.models.detection.roi_heads import RoIHeads  # noqa: E402

pytestmark = pytest.mark.e2e

PHOTOS = ("astronaut.png", "coffee.png")
REQUEST = {"score_threshold": 0.02, "iou_threshold": 0.5, "max_detections": 30}


def served_spec(stack, model: str) -> ModelSpec:
    """The spec as the gateway sees it: from Triton's model config."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{stack.triton_grpc_port}")
    try:
        return ModelSpec.from_model_config(client.get_model_config(model).config)
    finally:
        client.close()


def detect(vision, model: str, images: list[bytes]):
    request = vision_pb2.DetectRequest(model=model, images=[vision_pb2.Image(encoded=b) for b in images], **REQUEST)
    return vision.Detect(request, timeout=300)


def eager(stack, arch: str, spec):
    from service.export.checkpoints import load_state_dict

    arch_def = zoo.get(arch)
    model = arch_def.build(len(spec.labels))
    model.load_state_dict(load_state_dict(stack.checkpoints["regions"]))
    return arch_def.wrap(model.eval(), spec).eval()


def reference_detections(logits, deltas, proposals, width, height):
    """torchvision's RoIHeads.postprocess_detections with the request's options."""
    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, REQUEST["score_threshold"],
                     REQUEST["iou_threshold"], REQUEST["max_detections"])
    boxes, scores, labels = heads.postprocess_detections(
        torch.as_tensor(logits), torch.as_tensor(deltas), [torch.as_tensor(proposals)], [(height, width)])
    return boxes[0].numpy(), scores[0].numpy(), labels[0].numpy()


def check(result, want, spec, width, height):
    boxes, scores, labels = want
    assert len(labels) > 0
    assert (result.image_width, result.image_height) == (width, height)
    got = result.detections
    np.testing.assert_array_equal([d.label.index for d in got], labels)
    assert [d.label.name for d in got] == [spec.labels[i] for i in labels]
    np.testing.assert_allclose([d.label.score for d in got], scores, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose([[d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max] for d in got], boxes,
                               rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("name", PHOTOS)
def test_rcnn_equals_eager_plus_torchvision_postprocessing(stack, vision, name):
    data = encode(photo(name, max_side=160))
    response = detect(vision, "rcnn", [data])
    spec = served_spec(stack, "rcnn")
    assert spec.output_layout == "rcnn_regions" and spec.settings.proposals == int(REGION_OPTIONS["proposals"])
    decoded = decode_encoded(data, "image", 10**8)
    tensors, context = REGION_INPUTS["rcnn_regions"](decoded, spec)
    proposals = context.proposals
    assert 16 < len(proposals) <= 40  # more regions than max_batch_size 16: several Triton calls
    with torch.inference_mode():
        logits, deltas = eager(stack, "rcnn", spec)(torch.from_numpy(tensors["regions__0"]))
    check(response.results[0], reference_detections(logits, deltas, proposals, decoded.width, decoded.height),
          spec, decoded.width, decoded.height)


def test_fast_rcnn_equals_eager_plus_torchvision_postprocessing(stack, vision):
    images = [encode(photo(name, max_side=160)) for name in PHOTOS]
    response = detect(vision, "fast_rcnn", images)
    spec = served_spec(stack, "fast_rcnn")
    assert spec.output_layout == "fast_rcnn" and spec.inputs[1].dims == (40, 4)
    model = eager(stack, "fast_rcnn", spec)
    for data, result in zip(images, response.results):
        decoded = decode_encoded(data, "image", 10**8)
        tensors, context = REGION_INPUTS["fast_rcnn"](decoded, spec)
        proposals = context.proposals
        assert min(tensors["images__0"].shape[2:]) == int(FAST_OPTIONS["min_side"])
        with torch.inference_mode():
            logits, deltas = model(torch.from_numpy(tensors["images__0"]), torch.from_numpy(tensors["rois__1"]))
        k = len(proposals)
        # The eager model on the padded RoIs; padding rows dropped, as the gateway does.
        check(result, reference_detections(logits[0, :k], deltas[0, :k], proposals, decoded.width, decoded.height),
              spec, decoded.width, decoded.height)


def test_proposals_are_reproducible_and_timed(stack):
    import urllib.request

    data = encode(photo("chelsea.png", max_side=160))
    decoded = decode_encoded(data, "image", 10**8)
    spec = served_spec(stack, "rcnn")
    assert np.array_equal(image_proposals(decoded, spec), image_proposals(decoded, spec))
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10).read().decode()
    assert 'convserve_stage_duration_seconds_count{model="rcnn",stage="proposals"}' in metrics


def test_predict_draws_rcnn_boxes(stack, tmp_path):
    source = tmp_path / "in.png"
    photo("coffee.png", max_side=160).save(source)
    out = tmp_path / "out.png"
    run = subprocess.run([sys.executable, "-m", "service.cli", "predict", str(source), "--model", "rcnn",
                          "--server", stack.address, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "detections" in run.stdout
    drawn = Image.open(out)
    assert drawn.size == Image.open(source).size

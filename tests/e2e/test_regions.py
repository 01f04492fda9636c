"""R-CNN and Fast R-CNN end to end: the gateway's pipeline (proposals, warp or scale,
decoding) through the data plane and a real Triton, against the eager model fed the
same proposals plus torchvision's own RoIHeads postprocessing."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from helpers import encode, photo
from service import zoo  # noqa: F401  (torchvision op shim before torchvision)
from service.dataplane import DataPlane
from service.imaging import decode_encoded
from service.pipelines.common import ImageInput
from service.pipelines.regions import LAYOUTS, TASK, image_proposals
from service.settings import Settings
from service.triton import TritonModels
from stack_regions import FAST_OPTIONS, REGION_OPTIONS

from torchvision.models.detection.roi_heads import RoIHeads  # noqa: E402

PHOTOS = ("astronaut.png", "coffee.png")
REQUEST = {"score_threshold": 0.02, "iou_threshold": 0.5, "max_detections": 30}


def run_plane(stack, model: str, images: list[bytes], request: dict):
    """One request through the gateway's data plane, against the stack's Triton."""

    async def go():
        triton = TritonModels(f"127.0.0.1:{stack.triton_grpc_port}")
        plane = DataPlane(Settings(), triton)
        plane.triton_ready = True
        try:
            answer = await plane.run(TASK, model, "", [ImageInput(encoded=b) for b in images], request, 120)
            spec = await triton.spec(model)
        finally:
            plane.close()
            await triton.close()
        return answer, spec

    return asyncio.run(go())


def eager(stack, arch: str, spec):
    from service.exporter import load_state_dict

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


def check(got, want):
    boxes, scores, labels = want
    assert len(labels) > 0
    np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_allclose(got.scores, scores, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got.boxes, boxes, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("name", PHOTOS)
def test_rcnn_equals_eager_plus_torchvision_postprocessing(stack, name):
    data = encode(photo(name, max_side=160))
    answer, spec = run_plane(stack, "rcnn", [data], REQUEST)
    assert spec.output_layout == "rcnn_regions" and spec.option("proposals") == REGION_OPTIONS["proposals"]
    decoded = decode_encoded(data, "image", 10**8)
    tensors = LAYOUTS["rcnn_regions"].preprocess(decoded, spec, None)
    proposals = tensors["proposals"]
    assert 1 < len(proposals) <= 40  # more regions than max_batch_size 16: several Triton calls
    with torch.inference_mode():
        logits, deltas = eager(stack, "rcnn", spec)(torch.from_numpy(tensors["regions__0"]))
    check(answer.results[0], reference_detections(logits, deltas, proposals, decoded.width, decoded.height))


def test_fast_rcnn_equals_eager_plus_torchvision_postprocessing(stack):
    images = [encode(photo(name, max_side=160)) for name in PHOTOS]
    answer, spec = run_plane(stack, "fast_rcnn", images, REQUEST)
    assert spec.output_layout == "fast_rcnn" and spec.inputs[1].dims == (40, 4)
    model = eager(stack, "fast_rcnn", spec)
    for data, got in zip(images, answer.results):
        decoded = decode_encoded(data, "image", 10**8)
        tensors = LAYOUTS["fast_rcnn"].preprocess(decoded, spec, None)
        proposals = tensors["proposals"]
        assert min(tensors["images__0"].shape[2:]) == int(FAST_OPTIONS["min_side"])
        with torch.inference_mode():
            logits, deltas = model(torch.from_numpy(tensors["images__0"]), torch.from_numpy(tensors["rois__0"]))
        k = len(proposals)
        # The eager model on the padded RoIs; padding rows dropped, as the gateway does.
        check(got, reference_detections(logits[0, :k], deltas[0, :k], proposals, decoded.width, decoded.height))


def test_proposals_are_reproducible_through_the_pipeline(stack):
    data = encode(photo("chelsea.png", max_side=160))
    decoded = decode_encoded(data, "image", 10**8)
    _, spec = run_plane(stack, "rcnn", [data], REQUEST)
    assert np.array_equal(image_proposals(decoded, spec), image_proposals(decoded, spec))

"""Classify through the real gateway and the real Triton, against an independent eager
pipeline: PIL + torchvision transforms + torch.jit.load of the same model.pt."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from helpers import bad_request_field, as_array, encode, photo
from service._proto import vision_pb2
from service.gateway.triton import unknown_model

pytestmark = pytest.mark.e2e

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png")


@pytest.fixture(scope="module")
def reference(stack):
    """Eager reference: torchvision's PIL transforms feed the exported TorchScript file."""
    import torch

    from service.export import tvshim

    tvshim.install()
    from torchvision import transforms

    model = torch.jit.load(str(stack.repo / "resnet18" / "1" / "model.pt")).eval()
    preprocess = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])

    def run(images):
        batch = torch.stack([preprocess(image) for image in images])
        with torch.inference_mode():
            return torch.softmax(model(batch), dim=1).numpy()
    return run


def classify(vision, images, **fields):
    request = vision_pb2.ClassifyRequest(model="resnet18", images=images, **fields)
    return vision.Classify(request, timeout=60)


def test_classify_equals_eager_reference(vision, reference):
    images = [photo(name) for name in PHOTOS]
    expected = reference(images)
    for image, probs in zip(images, expected):
        response = classify(vision, [vision_pb2.Image(encoded=encode(image, "PNG"))])
        labels = response.results[0].labels
        order = np.argsort(-probs, kind="stable")[:5]
        assert [l.index for l in labels] == order.tolist()
        np.testing.assert_allclose([l.score for l in labels], probs[order], atol=1e-4)
        # The scaled final layer makes top-1 lead by far more than the tolerance.
        assert probs[order[0]] - probs[order[1]] > 1e-2
        assert labels[0].name and labels[0].name != str(labels[0].index)
    assert response.model == "resnet18" and response.model_version == "1"


def test_batch_equals_single_calls(vision):
    images = [vision_pb2.Image(encoded=encode(photo(name), "JPEG", quality=92)) for name in PHOTOS]
    batch = classify(vision, images, top_k=3)
    singles = [classify(vision, [image], top_k=3).results[0] for image in images]
    assert len(batch.results) == 3
    for together, alone in zip(batch.results, singles):
        assert [l.index for l in together.labels] == [l.index for l in alone.labels]
        np.testing.assert_allclose([l.score for l in together.labels], [l.score for l in alone.labels], atol=1e-5)


def test_raw_image_equals_encoded(vision):
    image = photo("coffee.png")
    array = as_array(image)
    raw = vision_pb2.Image(raw=vision_pb2.RawImage(data=array.tobytes(), height=array.shape[0], width=array.shape[1]))
    a = classify(vision, [raw]).results[0].labels
    b = classify(vision, [vision_pb2.Image(encoded=encode(image, "PNG"))]).results[0].labels
    assert [l.index for l in a] == [l.index for l in b]


def test_more_images_than_max_batch_size_come_back_in_order(vision):
    # The test entry has max_batch_size 4; 6 images take two Triton calls.
    names = PHOTOS + ("rocket.jpg", "motorcycle_left.png", "chelsea.png")
    images = [vision_pb2.Image(encoded=encode(photo(n), "PNG")) for n in names]
    together = classify(vision, images, top_k=1).results
    for image, result in zip(images, together):
        assert classify(vision, [image], top_k=1).results[0].labels[0].index == result.labels[0].index



def test_bad_image_is_invalid_argument_naming_its_index(vision):
    good = vision_pb2.Image(encoded=encode(photo("chelsea.png"), "PNG"))
    bad = vision_pb2.Image(encoded=b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(grpc.RpcError) as info:
        classify(vision, [good, bad])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[1]" in info.value.details()
    assert bad_request_field(info.value) == "images[1].encoded"
    # ... and the server keeps serving.
    assert classify(vision, [good]).results[0].labels


def test_unknown_model_is_not_found(vision):
    with pytest.raises(grpc.RpcError) as info:
        vision.Classify(vision_pb2.ClassifyRequest(
            model="no_such_model", images=[vision_pb2.Image(encoded=encode(photo("chelsea.png")))]), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # The name sent, and the models that are ready: those ListModels says are.
    ready = [m.name for m in vision.ListModels(vision_pb2.ListModelsRequest(), timeout=30).models if m.ready]
    assert "resnet18" in ready
    assert info.value.details() == str(unknown_model("no_such_model", ready))
    with pytest.raises(grpc.RpcError) as info:
        vision.Classify(vision_pb2.ClassifyRequest(
            model="resnet19", images=[vision_pb2.Image(encoded=encode(photo("chelsea.png")))]), timeout=30)
    assert "did you mean 'resnet18'?" in info.value.details()


def test_health_and_metrics(stack, vision):
    import urllib.request

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with stack.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "liveness"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5).read().decode()
    assert 'convserve_requests_total{code="OK",method="Classify",model="resnet18"}' in text
    assert 'convserve_request_duration_seconds_bucket{le="0.001",method="Classify",model="resnet18"}' in text
    assert 'code="NOT_FOUND",method="Classify",model="unknown"' in text


def test_list_and_get_model(vision):
    info = vision.GetModel(vision_pb2.GetModelRequest(name="resnet18"), timeout=30)
    assert (info.task, info.architecture, info.ready) == ("classification", "resnet18", True)
    assert (info.input_width, info.input_height, info.resize_mode) == (224, 224, "resize_center_crop")
    assert list(info.versions) == ["1"] and len(info.labels) == 1000 and info.max_batch_size == 4
    # Where the weights came from: the test checkpoint, by file name and sha256 prefix.
    assert info.weights.startswith("resnet18_test.pth sha256:")
    models = {m.name: m for m in vision.ListModels(vision_pb2.ListModelsRequest(), timeout=30).models}
    assert "resnet18" in models and models["resnet18"].weights == info.weights
    assert models["versioned"].weights == "seeded"

"""Serving the exporter's other outputs: an ONNX entry through the CPU profile's
onnxruntime backend, and two versions of one model side by side."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import encode, photo
from service._proto import vision_pb2

pytestmark = pytest.mark.e2e

IMAGES = [vision_pb2.Image(encoded=encode(photo(n), "PNG")) for n in ("chelsea.png", "rocket.jpg")]


def test_onnx_entry_equals_torchscript_entry(vision):
    ts = vision.Classify(vision_pb2.ClassifyRequest(model="resnet18", images=IMAGES), timeout=60)
    onnx = vision.Classify(vision_pb2.ClassifyRequest(model="resnet18_onnx", images=IMAGES), timeout=60)
    assert onnx.model == "resnet18_onnx"
    for a, b in zip(ts.results, onnx.results):
        assert [l.index for l in a.labels] == [l.index for l in b.labels]
        np.testing.assert_allclose([l.score for l in a.labels], [l.score for l in b.labels], atol=1e-4)


def test_two_versions_answer_differently(vision):
    answers = {}
    for version in ("1", "2"):
        response = vision.Classify(vision_pb2.ClassifyRequest(
            model="versioned", images=IMAGES[:1], model_version=version, top_k=5), timeout=60)
        assert response.model_version == version
        answers[version] = [(l.index, round(l.score, 5)) for l in response.results[0].labels]
    assert answers["1"] != answers["2"]
    latest = vision.Classify(vision_pb2.ClassifyRequest(model="versioned", images=IMAGES[:1]), timeout=60)
    assert latest.model_version == "2"
    info = vision.GetModel(vision_pb2.GetModelRequest(name="versioned"), timeout=30)
    assert list(info.versions) == ["1", "2"] and info.input_width == 64
    listed = {m.name: list(m.versions) for m in vision.ListModels(vision_pb2.ListModelsRequest(), timeout=30).models}
    assert listed["versioned"] == ["1", "2"] and listed["resnet18_onnx"] == ["1"]


def test_unknown_version_is_not_found(vision):
    import grpc

    with pytest.raises(grpc.RpcError) as info:
        vision.Classify(vision_pb2.ClassifyRequest(model="versioned", images=IMAGES[:1], model_version="9"),
                        timeout=60)
    assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)

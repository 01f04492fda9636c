"""The spec round-trips through Triton model configs; both profiles agree."""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from service.spec import ModelSpec, TensorSpec
from references import sample_spec


@pytest.mark.parametrize("profile", ["production", "cpu"])
@pytest.mark.parametrize("fields", [{}, {"interpolation": "bicubic", "weights": "IMAGENET1K_V1"}])
def test_round_trip_through_pbtxt(profile, fields):
    spec = sample_spec(**fields)
    text = text_format.MessageToString(spec.to_model_config(profile, labels_file="labels.txt"))
    parsed = text_format.Parse(text, mc.ModelConfig())
    assert ModelSpec.from_model_config(parsed) == spec


def test_profiles_share_tensors_and_parameters():
    spec = sample_spec()
    prod = spec.to_model_config("production")
    cpu = spec.to_model_config("cpu")
    assert list(prod.input) == list(cpu.input)
    assert list(prod.output) == list(cpu.output)
    assert dict(prod.parameters) == dict(cpu.parameters)
    assert prod.platform == "pytorch_libtorch" and cpu.backend == "torchscript"
    assert prod.instance_group[0].kind == mc.ModelInstanceGroup.KIND_AUTO
    assert cpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert len(prod.model_warmup) == 1 and prod.dynamic_batching is not None


def test_foreign_config_is_rejected():
    with pytest.raises(ValueError, match="convserve.task"):
        ModelSpec.from_model_config(mc.ModelConfig(name="x"))


@pytest.mark.parametrize("bad", [dict(task="poetry"), dict(resize_mode="zoom"), dict(channel_order="GBR"),
                                 dict(inputs=(TensorSpec("x", np.dtype(np.uint8), (1, 8, 8)),))])
def test_invalid_specs_fail_fast(bad):
    with pytest.raises(ValueError):
        sample_spec(**bad)

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


@pytest.mark.parametrize("profile", ["production", "cpu"])
def test_dynamic_batching_holds_no_request_back(profile):
    # Batches form from what queued while the instance was busy; a lone request starts
    # at once (a queue delay held every request at concurrency 1 that long).
    text = text_format.MessageToString(sample_spec().to_model_config(profile))
    config = text_format.Parse(text, mc.ModelConfig())
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 0


def test_cpu_profile_runs_the_onnx_companion_production_the_torchscript_file():
    spec = sample_spec()
    prod = spec.to_model_config("production", "torchscript", cpu_fmt="onnx")
    cpu = spec.to_model_config("cpu", "torchscript", cpu_fmt="onnx")
    assert (prod.platform, prod.default_model_filename) == ("pytorch_libtorch", "model.pt")
    assert (cpu.backend, cpu.default_model_filename) == ("onnxruntime", "model.onnx")
    with pytest.raises(ValueError, match="format 'tensorrt' has no CPU profile"):
        spec.to_model_config("cpu", "torchscript", cpu_fmt="tensorrt")


def test_foreign_config_is_rejected():
    with pytest.raises(ValueError, match="convserve.task"):
        ModelSpec.from_model_config(mc.ModelConfig(name="x"))


@pytest.mark.parametrize("bad", [dict(task="poetry"), dict(resize_mode="zoom"), dict(channel_order="GBR"),
                                 dict(inputs=(TensorSpec("x", np.dtype(np.uint8), (1, 8, 8)),)),
                                 dict(input_layout="NHWC"), dict(input_layout="CHWN"),
                                 dict(max_batch_size=0), dict(fixed_batch=1), dict(fixed_batch=2, max_batch_size=0)])
def test_invalid_specs_fail_fast(bad):
    with pytest.raises(ValueError):
        sample_spec(**bad)


@pytest.mark.parametrize("profile", ["production", "cpu"])
def test_fixed_batch_nhwc_half_spec_round_trips_with_the_batch_in_config_dims(profile):
    """A file whose batch is fixed at 1: Triton sees max_batch_size 0 and the batch in
    every tensor's dims (warm-up included); the gateway's spec keeps per-item dims."""
    spec = sample_spec(inputs=(TensorSpec("input_1", np.dtype(np.float16), (24, 32, 3)),), input_layout="NHWC",
                       max_batch_size=0, fixed_batch=1, sources={"labels": "file-metadata", "batch": "file-shape"})
    assert (spec.input_height, spec.input_width, spec.items_per_call) == (24, 32, 1)
    config = spec.to_model_config(profile, "onnx")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 24, 32, 3] and list(config.output[0].dims) == [1, 3]
    assert config.parameters["convserve.fixed_batch"].string_value == "1"
    assert config.parameters["convserve.input_layout"].string_value == "NHWC"
    assert config.parameters["convserve.source.labels"].string_value == "file-metadata"
    if profile == "production":
        assert list(config.model_warmup[0].inputs["input_1"].dims) == [1, 24, 32, 3]
    parsed = text_format.Parse(text_format.MessageToString(config), mc.ModelConfig())
    assert ModelSpec.from_model_config(parsed) == spec
    # A config whose dims do not lead with the fixed batch is not a convserve spec.
    del parsed.input[0].dims[0]
    with pytest.raises(ValueError, match="not led by its fixed batch 1"):
        ModelSpec.from_model_config(parsed)


def test_batched_spec_config_is_unchanged_by_the_new_fields():
    config = sample_spec().to_model_config("cpu")
    assert config.max_batch_size == 4 and list(config.input[0].dims) == [3, 224, 224]
    assert "convserve.fixed_batch" not in config.parameters
    assert not any(key.startswith("convserve.source.") for key in config.parameters)

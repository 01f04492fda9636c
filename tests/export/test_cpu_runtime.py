"""What the embedded CPU profile runs: a TorchScript export's ONNX companion, kept only
where it holds parity with eager (at a second size too, for variable-size models)."""
from __future__ import annotations

import logging

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from service.export import ExportError, zoo
from service.pipelines import layouts
from service.export.repository import build_spec, example_inputs, export_model, onnx_companion


def cpu_config(entry) -> mc.ModelConfig:
    return text_format.Parse((entry / "configs" / "cpu.pbtxt").read_text(), mc.ModelConfig())


class OffInOnnx(torch.nn.Module):
    """Differs from eager only in its ONNX export: what the companion's parity check
    must catch."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.inner(images)
        if torch.onnx.is_in_onnx_export():
            out = out * 1.01
        return out


class SizeBaked(torch.nn.Module):
    """Right at the size it is traced at only: the tracer records the Python branch
    taken there, so its ONNX export never takes the other one."""

    def __init__(self, classes: int, size: int):
        super().__init__()
        self.classes, self.size = classes, size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        out = images.float().mean(dim=1, keepdim=True).expand(n, self.classes, h, w)
        if h > self.size:
            out = out + 1.0
        return out


def test_torchscript_entry_holds_onnx_for_cpu_and_libtorch_for_production(tmp_path):
    result = export_model("resnet18", tmp_path, input_size=64, num_classes=4)
    entry = tmp_path / "resnet18"
    assert sorted(p.name for p in (entry / "1").iterdir()) == ["model.onnx", "model.pt"]
    cpu = cpu_config(entry)
    assert (cpu.backend, cpu.default_model_filename) == ("onnxruntime", "model.onnx")
    prod = text_format.Parse((entry / "config.pbtxt").read_text(), mc.ModelConfig())
    assert (prod.platform, prod.default_model_filename) == ("pytorch_libtorch", "model.pt")
    assert result.cpu_runtime == "onnxruntime"


def test_cpu_runtime_torchscript_writes_no_onnx(tmp_path):
    result = export_model("resnet18", tmp_path, input_size=64, num_classes=4, cpu_runtime="torchscript")
    entry = tmp_path / "resnet18"
    assert [p.name for p in (entry / "1").iterdir()] == ["model.pt"]
    assert (cpu_config(entry).backend, cpu_config(entry).default_model_filename) == ("torchscript", "model.pt")
    assert result.cpu_runtime == "torchscript"
    with pytest.raises(ExportError, match="--cpu-runtime must be one of onnxruntime, torchscript, got 'tvm'"):
        export_model("resnet18", tmp_path, input_size=64, cpu_runtime="tvm")


def test_companion_off_from_eager_is_not_kept(tmp_path, caplog):
    arch = zoo.get("resnet18")
    spec = build_spec(arch, "resnet18", ["a", "b", "c"], 4, input_size=64)
    torch.manual_seed(0)
    wrapped = arch.wrap(arch.build(3).eval(), spec).eval()
    inputs = example_inputs(spec, arch, 0, size=(64, 64))
    with torch.inference_mode():
        expected = wrapped(*inputs)
    with caplog.at_level(logging.WARNING, logger="convserve.export"):
        assert onnx_companion(wrapped, inputs, expected, tmp_path / "ok.onnx", spec, arch, 0)
        assert not onnx_companion(OffInOnnx(wrapped), inputs, expected, tmp_path / "off.onnx", spec, arch, 0)
    assert "no ONNX file for the embedded CPU profile" in caplog.text
    assert "ONNX Runtime" in caplog.text and "differs" in caplog.text


def test_variable_size_companion_is_checked_at_a_second_size(tmp_path, caplog):
    arch = zoo.get("cyclegan")  # fully convolutional: any input size
    assert arch.variable_input_size
    spec = build_spec(arch, "cyclegan", [], 4)
    height, width = arch.input_size
    inputs = example_inputs(spec, arch, 0, size=(height, width))
    baked = SizeBaked(3, height).eval()
    with torch.inference_mode():
        expected = baked(*inputs)
    with caplog.at_level(logging.WARNING, logger="convserve.export"):
        assert not onnx_companion(baked, inputs, expected, tmp_path / "baked.onnx", spec, arch, 0)
    assert "ONNX Runtime (second size) output" in caplog.text


def test_an_older_version_without_onnx_keeps_the_cpu_profile_on_torchscript(tmp_path):
    export_model("resnet18", tmp_path, input_size=64, num_classes=4, version=1, version_policy="all",
                 cpu_runtime="torchscript")
    export_model("resnet18", tmp_path, input_size=64, num_classes=4, version=2, version_policy="all")
    entry = tmp_path / "resnet18"
    assert (entry / "2" / "model.onnx").is_file() and not (entry / "1" / "model.onnx").exists()
    # Both versions are served: the CPU profile must load each of them.
    assert cpu_config(entry).backend == "torchscript"
    # An ONNX entry stays one: a TorchScript entry's companion does not make it one.
    with pytest.raises(ExportError, match="one format"):
        export_model("resnet18", tmp_path, name="resnet18", fmt="onnx", input_size=64, version=3)


def test_a_model_that_selects_its_own_outputs_keeps_torchscript_on_cpu(tmp_path):
    # Faster R-CNN's candidates come out of its own top-k and NMS: ONNX Runtime's
    # rounding could change which rows are kept, so no ONNX companion is written.
    assert [name for name, layout in layouts.LAYOUTS.items() if layout.selects_in_model] == ["rcnn_candidates"]
    result = export_model("fasterrcnn_mobilenet_v3_large_fpn", tmp_path, num_classes=3,
                          options={"min_size": "128", "max_size": "128", "max_candidates": "20"})
    assert result.cpu_runtime == "torchscript"
    assert [p.name for p in (result.path / "1").iterdir()] == ["model.pt"]

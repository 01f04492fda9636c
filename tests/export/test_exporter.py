"""The exporter: every classifier in both formats against eager, checkpoints in the
usual layouts, versions, bring-your-own files, and the production profile."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from service.export import zoo
from service.export import ExportError
from service.export.files import export_from_file
from service.export.repository import export_model
from service.spec import ModelSpec

from helpers import assert_close_scaled

# Small inputs where the architecture allows; ONNX's adaptive pooling needs the pooled
# map to be a multiple of 6 (AlexNet) or 7 (VGG), which only 224 gives. The last field
# is what the embedded CPU profile of the entry runs: a TorchScript export also holds
# its ONNX file where that exports and holds parity (ResNet, GoogLeNet at 64), and runs
# TorchScript where it cannot (AlexNet at 96, VGG at 64: the pooling above). VGG16 at
# 224 asks for TorchScript only (`cpu_runtime`), sparing a second 528 MB file.
CASES = [
    ("resnet18", "torchscript", 64, "onnxruntime"), ("resnet18", "onnx", 64, "onnxruntime"),
    ("resnet34", "torchscript", 64, "onnxruntime"), ("resnet34", "onnx", 64, "onnxruntime"),
    ("resnet50", "torchscript", 64, "onnxruntime"), ("resnet50", "onnx", 64, "onnxruntime"),
    ("resnet101", "torchscript", 64, "onnxruntime"), ("resnet101", "onnx", 64, "onnxruntime"),
    ("googlenet", "torchscript", 64, "onnxruntime"), ("googlenet", "onnx", 64, "onnxruntime"),
    ("alexnet", "torchscript", 96, "torchscript"), ("alexnet", "onnx", 224, "onnxruntime"),
    ("vgg11", "torchscript", 64, "torchscript"), ("vgg11", "onnx", 224, "onnxruntime"),
    ("vgg16_bn", "torchscript", 64, "torchscript"), ("vgg16_bn", "onnx", 224, "onnxruntime"),
    # VGG16 once at full size, in both formats.
    ("vgg16", "torchscript", 224, "torchscript"), ("vgg16", "onnx", 224, "onnxruntime"),
]


def read_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


@pytest.mark.parametrize("arch,fmt,size,cpu_runtime", CASES)
def test_export_parity_every_architecture(tmp_path, arch, fmt, size, cpu_runtime):
    # export_model itself compares the exported file with eager (a bound that scales
    # with each output, see export.formats.parity_bound) and raises on a mismatch;
    # test_parity_failure_is_refused and tests/export/test_exporter_parity.py show that it does.
    asked = "torchscript" if (arch, fmt, size) == ("vgg16", "torchscript", 224) else "onnxruntime"
    result = export_model(arch, tmp_path, fmt=fmt, input_size=size, num_classes=10, max_batch_size=4,
                          cpu_runtime=asked)
    entry = tmp_path / (arch if fmt == "torchscript" else f"{arch}_onnx")
    files = {"onnxruntime": "model.onnx", "torchscript": "model.pt"}
    expected = {"model.pt", files[cpu_runtime]} if fmt == "torchscript" else {"model.onnx"}
    assert {p.name for p in (entry / "1").iterdir()} == expected
    prod, cpu = read_config(entry / "config.pbtxt"), read_config(entry / "configs" / "cpu.pbtxt")
    # The production profile parses with Triton's model_config.proto and carries the
    # same tensors and parameters as the embedded profile.
    assert list(prod.input) == list(cpu.input) and list(prod.output) == list(cpu.output)
    assert dict(prod.parameters) == dict(cpu.parameters)
    # Production runs the exported format; the embedded CPU profile runs the fastest
    # file the entry holds.
    assert prod.platform == {"torchscript": "pytorch_libtorch", "onnx": "onnxruntime_onnx"}[fmt]
    assert prod.default_model_filename == ("model.pt" if fmt == "torchscript" else "model.onnx")
    assert (cpu.backend, cpu.default_model_filename) == (cpu_runtime, files[cpu_runtime])
    assert result.cpu_runtime == cpu_runtime
    spec = ModelSpec.from_model_config(cpu)
    assert (spec.input_height, spec.input_width, len(spec.labels)) == (size, size, 10)


class Diverging(torch.nn.Module):
    """Differs from eager only once scripted: what the parity check must catch."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.inner(images)
        if torch.jit.is_scripting():
            out = out + 0.01
        return out


def test_parity_failure_is_refused(tmp_path, monkeypatch):
    import dataclasses

    arch = zoo.get("resnet18")
    monkeypatch.setitem(zoo.REGISTRY, "resnet18", dataclasses.replace(
        arch, wrap=lambda model, spec: Diverging(zoo.NormalizedModel(model, spec.mean, spec.std))))
    with pytest.raises(ExportError, match="TorchScript output logits__0 differs from eager"):
        export_model("resnet18", tmp_path, input_size=64)
    assert not (tmp_path / "resnet18" / "1").exists()


def test_onnx_file_runs_in_onnxruntime_like_eager(tmp_path):
    import onnxruntime as ort

    export_model("resnet18", tmp_path, fmt="onnx", input_size=64, seed=3)
    torch.manual_seed(3)
    arch = zoo.get("resnet18")
    eager = arch.wrap(arch.build(1000).eval(), ModelSpec.from_model_config(
        read_config(tmp_path / "resnet18_onnx" / "configs" / "cpu.pbtxt"))).eval()
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    session = ort.InferenceSession(str(tmp_path / "resnet18_onnx" / "1" / "model.onnx"))
    got = session.run(["logits__0"], {"images__0": images.numpy()})[0]
    with torch.inference_mode():
        # ONNX Runtime's kernels against torch's: rounding scales with the logits.
        assert_close_scaled(got, eager(images).numpy(), rtol=1e-4, atol=1e-5)


def _checkpoint(num_classes=1000, seed=5):
    torch.manual_seed(seed)
    return zoo.get("resnet18").build(num_classes).state_dict()


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "module", "safetensors"])
def test_checkpoint_layouts_load(tmp_path, layout):
    state = _checkpoint(num_classes=3)
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        wrapped = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
                   "model": {"model": state}, "module": {f"module.{k}": v for k, v in state.items()}}[layout]
        path = tmp_path / "w.pth"
        torch.save(wrapped, path)
    result = export_model("resnet18", tmp_path / "repo", weights=path, input_size=64)
    assert len(result.spec.labels) == 3  # the class count comes from the checkpoint
    scripted = torch.jit.load(str(result.path / "1" / "model.pt"))
    assert torch.equal(scripted.model.fc.weight, state["fc.weight"])


def test_mismatched_keys_are_an_error_naming_them(tmp_path):
    state = _checkpoint()
    state["extra.weight"] = torch.zeros(1)
    del state["layer1.0.conv1.weight"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ExportError) as info:
        export_model("resnet18", tmp_path / "repo", weights=tmp_path / "w.pth")
    assert "missing keys: layer1.0.conv1.weight" in str(info.value)
    assert "unexpected keys: extra.weight" in str(info.value)
    assert not (tmp_path / "repo" / "resnet18" / "1").exists()


def test_class_counts_that_disagree_name_all_three(tmp_path):
    torch.save(_checkpoint(num_classes=7), tmp_path / "w.pth")
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    with pytest.raises(ExportError) as info:
        export_model("resnet18", tmp_path / "repo", weights=tmp_path / "w.pth", labels_file=tmp_path / "labels.txt",
                     num_classes=5)
    assert all(str(n) in str(info.value) for n in (3, 5, 7))


def test_googlenet_accepts_torchvision_checkpoint_with_aux_heads(tmp_path):
    from service.export import tvshim

    tvshim.install()
    import torchvision

    torch.manual_seed(0)
    full = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    assert any(k.startswith("aux1.") for k in full.state_dict())
    torch.save(full.state_dict(), tmp_path / "g.pth")
    result = export_model("googlenet", tmp_path / "repo", weights=tmp_path / "g.pth", input_size=64)
    assert result.max_abs_diff <= 1e-3


def test_versions_side_by_side(tmp_path):
    export_model("resnet18", tmp_path, input_size=64, seed=1, version=1, version_policy="all")
    export_model("resnet18", tmp_path, input_size=64, seed=2, version=2, version_policy="all")
    entry = tmp_path / "resnet18"
    assert sorted(p.name for p in entry.iterdir() if p.name.isdigit()) == ["1", "2"]
    assert read_config(entry / "configs" / "cpu.pbtxt").version_policy.WhichOneof("policy_choice") == "all"
    with pytest.raises(ExportError, match="one format"):
        export_model("resnet18", tmp_path, name="resnet18", fmt="onnx", input_size=64, version=3)


def test_tensorrt_without_tensorrt_fails_clearly(tmp_path):
    try:
        import tensorrt  # noqa: F401
        has_trt = torch.cuda.is_available()
    except ImportError:
        has_trt = False
    if has_trt:
        pytest.skip("TensorRT and a GPU are present: the failure path does not apply")
    with pytest.raises(ExportError, match="--format tensorrt needs (NVIDIA TensorRT|an NVIDIA GPU)"):
        export_model("resnet18", tmp_path, fmt="tensorrt", input_size=64)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_from_file(tmp_path, fmt):
    torch.manual_seed(0)
    model = zoo.get("resnet18").build(4).eval()
    example = torch.randn(1, 3, 64, 64)
    source = tmp_path / ("model.pt" if fmt == "torchscript" else "model.onnx")
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(model), str(source))
    else:
        torch.onnx.export(model, (example,), str(source), input_names=["pixels"], output_names=["scores"],
                          dynamic_axes={"pixels": {0: "n"}, "scores": {0: "n"}}, dynamo=False)
    labels = tmp_path / "labels.txt"
    labels.write_text("w\nx\ny\nz\n")
    result = export_from_file(source, tmp_path / "repo", task="classification", name="mine", input_size=64,
                              labels_file=labels)
    spec = result.spec
    assert spec.image_input.dtype == np.float32 and not spec.normalize_in_model
    assert spec.labels == ("w", "x", "y", "z")
    labels.write_text("only\ntwo\n")
    with pytest.raises(ExportError, match=r"outputs shape \[2, 4\]"):
        export_from_file(source, tmp_path / "repo", task="classification", name="bad", input_size=64,
                         labels_file=labels)


def test_a_bad_option_is_refused_before_export(tmp_path):
    """`--option` values are checked against the layout's typed options: one error
    naming the key and the value, exit code 2 from the CLI."""
    with pytest.raises(ExportError, match=r"--option: option score_threshold=1.5 is outside \[0, 1\]"):
        export_model("yolo", tmp_path / "repo", options={"score_threshold": "1.5"}, input_size=64)
    with pytest.raises(ExportError, match="option proposals='many' is not an integer"):
        export_model("rcnn", tmp_path / "repo", options={"proposals": "many"})
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())

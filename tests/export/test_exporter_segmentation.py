"""Exporting segmentation models: U-Net and SegNet by name (TorchScript and ONNX, with
a checkpoint), and --from-file for both segmentation tasks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from service.export import zoo
from service.export import ExportError
from service.export.files import export_from_file
from service.export.repository import export_model
from service.spec import ModelSpec


@pytest.mark.parametrize("arch", ["unet", "segnet"])
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_by_name_with_checkpoint(tmp_path, arch, fmt):
    torch.manual_seed(3)
    model = zoo.get(arch).build(5)
    checkpoint = tmp_path / "weights.pth"
    torch.save(model.state_dict(), checkpoint)
    # export_model checks the file against eager (rtol 1e-3, atol 1e-5) before writing.
    result = export_model(arch, tmp_path / "repo", fmt=fmt, weights=checkpoint, input_size=64)
    spec = result.spec
    assert spec.task == "semantic_segmentation" and spec.output_layout == "logits_nchw"
    assert [(t.name, t.dims) for t in spec.outputs] == [("logits__0", (5, 64, 64))]
    assert spec.resize_mode == "stretch" and spec.normalize_in_model
    assert (result.path / "1" / ("model.pt" if fmt == "torchscript" else "model.onnx")).is_file()


def test_class_count_comes_from_the_checkpoint_and_must_agree(tmp_path):
    checkpoint = tmp_path / "weights.pth"
    torch.save(zoo.get("unet").build(3).state_dict(), checkpoint)
    spec = export_model("unet", tmp_path / "repo", weights=checkpoint, input_size=32).spec
    assert spec.outputs[0].dims == (3, 32, 32) and len(spec.labels) == 3
    with pytest.raises(ExportError, match="the checkpoint has 3"):
        export_model("unet", tmp_path / "repo", weights=checkpoint, num_classes=21, input_size=32)


class TinySegmenter(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_from_file_semantic(tmp_path):
    source = tmp_path / "seg.pt"
    torch.jit.save(torch.jit.script(TinySegmenter(3).eval()), str(source))
    labels = tmp_path / "labels.txt"
    labels.write_text("bg\nroad\nsky\n")
    spec = export_from_file(source, tmp_path / "repo", task="semantic_segmentation", name="mine", input_size=32,
                            labels_file=labels).spec
    assert spec.output_layout == "logits_nchw" and spec.resize_mode == "stretch"
    assert spec.outputs[0].dims == (3, 32, 32) and spec.image_input.dtype == np.float32
    labels.write_text("bg\nroad\n")
    with pytest.raises(ExportError, match=r"needs \[2, 2, 32, 32\]"):
        export_from_file(source, tmp_path / "repo", task="semantic_segmentation", name="bad", input_size=32,
                         labels_file=labels)


class Candidates(nn.Module):
    """A stand-in following the rcnn_candidates contract: uint8 [1, 3, H, W] in."""

    def __init__(self, k: int = 6, m: int = 28, label_dtype: torch.dtype = torch.int64):
        super().__init__()
        self.k, self.m, self.label_dtype = k, m, label_dtype

    def forward(self, images: torch.Tensor):
        n = images.shape[0]
        mean = images.float().mean()
        boxes = torch.zeros(n, self.k, 4) + mean
        scores = torch.linspace(1.0, 0.0, self.k).expand(n, self.k).contiguous()
        labels = torch.ones(n, self.k, dtype=self.label_dtype)
        count = torch.full((n, 1), 3, dtype=torch.int32)
        masks = torch.zeros(n, self.k, self.m, self.m) + mean / 255
        return boxes, scores, labels, count, masks


def test_from_file_instance_torchscript(tmp_path):
    source = tmp_path / "rcnn.pt"
    torch.jit.save(torch.jit.script(Candidates()), str(source))
    labels = tmp_path / "labels.txt"
    labels.write_text("__background__\nperson\ncar\n")
    result = export_from_file(source, tmp_path / "repo", task="instance_segmentation", name="mine",
                              input_size=64, labels_file=labels)
    spec = result.spec
    assert spec.image_input.dtype == np.uint8 and spec.image_input.dims == (3, -1, -1)
    assert spec.resize_mode == "none" and spec.output_layout == "rcnn_candidates" and spec.max_batch_size == 1
    assert [(t.name, t.dtype, t.dims) for t in spec.outputs] == [
        ("boxes__0", np.float32, (6, 4)), ("scores__1", np.float32, (6,)), ("labels__2", np.int64, (6,)),
        ("count__3", np.int32, (1,)), ("masks__4", np.float32, (6, 28, 28))]
    assert spec.settings.max_candidates == 6
    # The spec round-trips through the Triton config the gateway reads.
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    config = text_format.Parse((result.path / "configs" / "cpu.pbtxt").read_text(), mc.ModelConfig())
    assert ModelSpec.from_model_config(config).outputs == spec.outputs


def test_from_file_instance_onnx_names(tmp_path):
    source = tmp_path / "rcnn.onnx"
    names = ["boxes__0", "scores__1", "labels__2", "count__3", "masks__4"]
    torch.onnx.export(Candidates(), (torch.zeros(1, 3, 40, 50, dtype=torch.uint8),), str(source),
                      input_names=["images__0"], output_names=names,
                      dynamic_axes={"images__0": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
    labels = tmp_path / "labels.txt"
    labels.write_text("__background__\nperson\n")
    spec = export_from_file(source, tmp_path / "repo", task="instance_segmentation", name="mine",
                            input_size=48, labels_file=labels).spec
    assert [t.name for t in spec.outputs] == names and spec.image_input.name == "images__0"


@pytest.mark.parametrize("make, message", [
    (lambda: Candidates(label_dtype=torch.int32), "labels__2 is int32"),
    (lambda: nn.Identity(), "rcnn_candidates contract"),  # one output, not five
])
def test_from_file_instance_refuses_what_breaks_the_contract(tmp_path, make, message):
    source = tmp_path / "rcnn.pt"
    torch.jit.save(torch.jit.script(make()), str(source))
    labels = tmp_path / "labels.txt"
    labels.write_text("__background__\nperson\n")
    with pytest.raises(ExportError, match=message):
        export_from_file(source, tmp_path / "repo", task="instance_segmentation", name="bad", input_size=32,
                         labels_file=labels)

"""`export_from_file --task detection` and the YOLO zoo entries' export (no Triton)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from service.export import zoo
from service.export import ExportError
from service.export.files import export_from_file
from service.export.repository import export_model
from service.spec import ModelSpec


class Fixed(torch.nn.Module):
    """float [N, 3, S, S] -> zeros of a given per-image shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros([x.shape[0]] + self.shape)


@pytest.mark.parametrize("layout, shape", [("yolov8", [4 + 3, 84]), ("yolov5", [84, 5 + 3])])
def test_detection_file_is_checked_against_layout_and_labels(tmp_path, layout, shape):
    source = tmp_path / "det.pt"
    torch.jit.save(torch.jit.script(Fixed(shape)), str(source))
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    spec = export_from_file(source, tmp_path / "repo", task="detection", name="det", input_size=64,
                            labels_file=labels, layout=layout).spec
    assert (spec.output_layout, spec.resize_mode, spec.mean, spec.std) == (layout, "letterbox", (0.0,) * 3, (1.0,) * 3)
    assert spec.outputs[0].dims == tuple(shape) and spec.settings.score_threshold == 0.25
    config = (tmp_path / "repo" / "det" / "configs" / "cpu.pbtxt").read_text()
    assert "yolov8" in config or "yolov5" in config
    labels.write_text("a\nb\n")
    with pytest.raises(ExportError, match="2 labels needs"):
        export_from_file(source, tmp_path / "repo", task="detection", name="det2", input_size=64,
                         labels_file=labels, layout=layout)
    with pytest.raises(ExportError, match="yolov8 or yolov5"):
        export_from_file(source, tmp_path / "repo", task="detection", name="det3", input_size=64,
                         labels_file=labels, layout="ssd")


def test_yolo_widths_match_ultralytics_parameter_counts():
    """yolov8n / yolov8s have 3,157,200 / 11,166,560 parameters (Ultralytics' model
    summaries): the same layers and widths."""
    counts = {name: sum(p.numel() for p in zoo.get(name).build(80).parameters()) for name in ("yolo", "yolo_s")}
    assert counts == {"yolo": 3_157_200, "yolo_s": 11_166_560}
    keys = zoo.get("yolo").build(80).state_dict()
    assert "model.22.dfl.conv.weight" in keys and "model.2.m.0.cv1.conv.weight" in keys


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_yolo_exports_with_parity(tmp_path, fmt):
    result = export_model("yolo", tmp_path, input_size=128, fmt=fmt, max_batch_size=2)
    spec: ModelSpec = result.spec
    assert spec.outputs[0].dims == (84, 16 * 16 + 8 * 8 + 4 * 4)
    assert spec.resize_mode == "letterbox" and spec.output_layout == "yolov8" and spec.normalize_in_model
    assert len(spec.labels) == 80 and spec.labels[0] == "person"
    assert result.max_abs_diff < 1e-3


def test_yolo_output_is_cxcywh_in_input_pixels():
    """Decoding by hand: with all-zero box logits every DFL side is the mean bin
    (REG_MAX - 1) / 2 strides, so each box is centred on its anchor point."""
    model = zoo.get("yolo").build(3)
    head = model.model[22]
    with torch.no_grad():
        for branch in head.cv2:
            branch[-1].weight.zero_()
            branch[-1].bias.zero_()
        out = model(torch.rand(1, 3, 64, 96))[0].numpy()
    side = (zoo.yolo.REG_MAX - 1) / 2
    strides = np.concatenate([np.full((64 // s) * (96 // s), s) for s in (8, 16, 32)])
    centres_x = np.concatenate([np.tile(np.arange(96 // s) + 0.5, 64 // s) * s for s in (8, 16, 32)])
    np.testing.assert_allclose(out[0], centres_x, atol=1e-4)
    np.testing.assert_allclose(out[2], 2 * side * strides, rtol=1e-5)
    assert ((out[4:] > 0) & (out[4:] < 1)).all()

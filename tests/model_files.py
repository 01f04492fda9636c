"""Model files as users bring them, built here with known conventions, for the
`--from-file` tests (tests/export/test_files_origins.py) and the shared stack's
imported entries (tests/stack_imports.py). No test module imports another; they import
these.

- `ultralytics_detect_file`: a tiny YOLOv8-layout detector (float [1, 3, S, S] in
  [0, 1] named ``images`` -> [1, 4 + C, A] named ``output0``), batch fixed at 1 as
  Ultralytics' default ``dynamic=False`` exports it, with Ultralytics' metadata_props.
- `ultralytics_classify_file`: a tiny classifier ending in softmax, [1, C], with
  ``task: classify`` metadata.
- `keras_nhwc_file`: built with the onnx helper API as tf2onnx lays out a Keras
  classifier: float [unk, H, W, 3] -> softmax [unk, C], non-square, dynamic batch.
- `bgr_half_file`: built with the onnx helper API: float16 [N, 3, S, S] whose two
  classes are the mean of channel 0 and of channel 2, so a model trained on BGR
  answers "blue" for a blue image only when the gateway feeds it BGR.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Ultralytics' exporter writes `meta.key, meta.value = k, str(v)` for its metadata dict.
DETECT_NAMES = {0: "red thing", 1: "green thing", 2: "blue thing"}
DETECT_IMGSZ = 96
DETECT_STRIDE = 8  # the tiny detector's grid cell; Ultralytics' metadata says its max stride
CLASSIFY_NAMES = {0: "cat", 1: "dog", 2: "bird", 3: "fish"}
CLASSIFY_IMGSZ = 32
KERAS_HEIGHT, KERAS_WIDTH = 24, 32
KERAS_LABELS = ("k0", "k1", "k2", "k3", "k4")
KERAS_MEAN = KERAS_STD = (0.5, 0.5, 0.5)  # Keras MobileNet's preprocess_input: x / 127.5 - 1
BGR_SIZE = 16
BGR_LABELS = ("blue", "red")  # class 0: channel 0 (blue in BGR), class 1: channel 2


def ultralytics_metadata(task: str, names: dict, imgsz: int, stride: int) -> dict[str, str]:
    """The metadata dict of Ultralytics' Exporter, as str(v) per key."""
    return {key: str(value) for key, value in {
        "description": f"Ultralytics test {task} model", "author": "Ultralytics", "date": "2026-01-01T00:00:00",
        "version": "8.3.0", "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com", "stride": stride, "task": task, "batch": 1,
        "imgsz": [imgsz, imgsz], "names": names,
        "args": {"batch": 1, "half": False, "dynamic": False, "nms": False}, "channels": 3}.items()}


def add_metadata(path: Path, metadata: dict[str, str]) -> Path:
    import onnx

    model = onnx.load(str(path))
    for key, value in metadata.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))
    return path


def _torch_onnx(module, sample, path: Path, dynamic: bool) -> Path:
    import torch

    axes = {"images": {0: "batch"}, "output0": {0: "batch"}} if dynamic else None
    with torch.inference_mode():
        torch.onnx.export(module.eval(), (sample,), str(path), input_names=["images"], output_names=["output0"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


def tiny_detector(classes: int = len(DETECT_NAMES), seed: int = 0):
    """YOLOv8's output layout on a stride-8 grid: per cell, a box (cx, cy, w, h in input
    pixels) near the cell's centre and sigmoid class scores, all from seeded
    convolutions of the cell's pixels, so answers depend on the image and its place."""
    import torch
    from torch import nn

    class TinyDetector(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.cells = nn.Conv2d(3, 16, DETECT_STRIDE, stride=DETECT_STRIDE)
            self.head = nn.Conv2d(16, 4 + classes, 3, padding=1)
            with torch.no_grad():
                self.head.weight.mul_(4.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.head(torch.relu(self.cells(x)))                         # [N, 4 + C, gh, gw]
            gh, gw = f.shape[2], f.shape[3]
            gy = torch.arange(gh, dtype=x.dtype).view(1, gh, 1).expand(1, gh, gw)
            gx = torch.arange(gw, dtype=x.dtype).view(1, 1, gw).expand(1, gh, gw)
            cx = (gx + 0.5) * DETECT_STRIDE + torch.tanh(f[:, 0]) * DETECT_STRIDE
            cy = (gy + 0.5) * DETECT_STRIDE + torch.tanh(f[:, 1]) * DETECT_STRIDE
            w = DETECT_STRIDE + 6 * DETECT_STRIDE * torch.sigmoid(f[:, 2])
            h = DETECT_STRIDE + 6 * DETECT_STRIDE * torch.sigmoid(f[:, 3])
            out = torch.cat([torch.stack([cx, cy, w, h], 1), torch.sigmoid(f[:, 4:])], 1)
            return out.flatten(2)                                            # [N, 4 + C, A]

    return TinyDetector().eval()


def ultralytics_detect_file(path: Path) -> Path:
    import torch

    _torch_onnx(tiny_detector(), torch.rand(1, 3, DETECT_IMGSZ, DETECT_IMGSZ), path, dynamic=False)
    return add_metadata(path, ultralytics_metadata("detect", DETECT_NAMES, DETECT_IMGSZ, 32))


def ultralytics_classify_file(path: Path, seed: int = 0) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * (CLASSIFY_IMGSZ // 4) ** 2, len(CLASSIFY_NAMES)))
    with torch.no_grad():
        body[-1].weight.mul_(20.0)  # top-1 leads by far more than any tolerance
    model = nn.Sequential(body, nn.Softmax(1))  # Ultralytics' Classify head: softmax when exported
    _torch_onnx(model, torch.rand(1, 3, CLASSIFY_IMGSZ, CLASSIFY_IMGSZ), path, dynamic=False)
    return add_metadata(path, ultralytics_metadata("classify", CLASSIFY_NAMES, CLASSIFY_IMGSZ, 1))


def keras_nhwc_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = KERAS_HEIGHT * KERAS_WIDTH * 3
    weight = (rng.normal(size=(features, len(KERAS_LABELS))) * 0.5).astype(np.float32)
    return weight, rng.normal(size=(len(KERAS_LABELS),)).astype(np.float32)


def keras_nhwc_file(path: Path, seed: int = 0) -> Path:
    """Dense on the flattened NHWC pixels (so a transposed input answers differently),
    then softmax, as tf2onnx writes a Keras model: input ``input_1`` [unk__0, H, W, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight, bias = keras_nhwc_weights(seed)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input_1", "flat_shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "dense_w"], ["dense_mm"]),
         helper.make_node("Add", ["dense_mm", "dense_b"], ["dense_logits"]),
         helper.make_node("Softmax", ["dense_logits"], ["dense"], axis=-1)],
        "keras_model",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__0", KERAS_HEIGHT, KERAS_WIDTH, 3])],
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["unk__0", len(KERAS_LABELS)])],
        [numpy_helper.from_array(np.array([-1, weight.shape[0]], np.int64), "flat_shape"),
         numpy_helper.from_array(weight, "dense_w"), numpy_helper.from_array(bias, "dense_b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tf2onnx")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def bgr_half_file(path: Path) -> Path:
    """float16 [N, 3, S, S] -> logits float32 [N, 2]: 10 x (mean of channel 0, mean of
    channel 2). In BGR, channel 0 is blue."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["data"], ["data32"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["data32"], ["means"], axes=[2, 3], keepdims=0),   # [N, 3]
         helper.make_node("Gather", ["means", "channels"], ["picked"], axis=1),            # [N, 2]
         helper.make_node("Mul", ["picked", "gain"], ["prob"])],
        "caffe_style",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT16, ["N", 3, BGR_SIZE, BGR_SIZE])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.array([0, 2], np.int64), "channels"),
         numpy_helper.from_array(np.array(10.0, np.float32), "gain")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def with_external_data(path: Path, location: str) -> Path:
    """Re-save the ONNX file at `path` with its tensors in one external data file at
    `location` (relative to it; tensors under 1 KB stay inline, as onnx.save_model and
    torch.onnx write them), as ONNX files over 2 GB must keep theirs."""
    import onnx

    model = onnx.load(str(path))
    (path.parent / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    return path

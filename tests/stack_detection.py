"""Detection entries of the shared end-to-end stack (see conftest.py).

- ``yolo``: the zoo's YOLOv8-n at 320 x 320 with seeded test weights (`make_yolo_checkpoint`).
- ``yolo_from_file``: the same weights as a float-input ONNX file with Ultralytics'
  export names (``images`` -> ``output0``, x / 255 expected), brought in with
  ``export_from_file --task detection --layout yolov8``, as an Ultralytics export would be.
- ``brightbox_letterbox`` / ``brightbox_stretch`` (TorchScript, yolov8 layout) and
  ``brightbox_v5`` (ONNX, yolov5 layout): `BrightBox` files brought in with
  ``export_from_file``; their one box is known in the model's input pixels, so where
  the gateway puts it in the original image tests the coordinate mapping.
"""
from __future__ import annotations

from pathlib import Path

YOLO_INPUT_SIZE = 320
BRIGHTBOX_INPUT_SIZE = 320
BRIGHTBOX_LABELS = ("dark", "bright")
BRIGHTBOX_SCORE = 0.9
BRIGHTBOX_ANCHORS = 8
# Class logit bias of the test YOLO: with BN statistics calibrated on the photos, some
# anchors of every photo score far above the rest.
YOLO_TEST_CLS_BIAS = -2.0
YOLO_SEED = 0


def make_yolo_checkpoint(path: Path) -> Path:
    """Seeded YOLOv8-n weights whose detections are not vacuous: random convolutions
    shrink activations layer by layer, so the BatchNorm running statistics are
    calibrated on the test photos (letterboxed, as served), as training would leave
    them; then every class logit gets `YOLO_TEST_CLS_BIAS`."""
    import torch
    from torch import nn

    from helpers import PHOTO_NAMES, photo
    from service.export import zoo
    from service.ops.resize import letterbox

    torch.manual_seed(YOLO_SEED)
    model = zoo.get("yolo").build(80)
    batch = torch.stack([torch.from_numpy(letterbox(photo(name), YOLO_INPUT_SIZE, YOLO_INPUT_SIZE))
                         for name in PHOTO_NAMES]).float() / 255
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: the statistics of this batch
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(batch)
        for branch in model.model[22].cv3:
            branch[-1].bias.fill_(YOLO_TEST_CLS_BIAS)
    model.eval()
    torch.save(model.state_dict(), path)
    return path


def make_brightbox(layout: str):
    """A detector with a known answer: one box around the input pixels whose channel
    mean is above 0.5 (input: float [N, 3, H, W] in [0, 1]), class 1 with score 0.9, in
    the given layout; every other anchor is all zeros."""
    import torch
    from torch import nn

    class BrightBox(nn.Module):
        def __init__(self, yolov5: bool):
            super().__init__()
            self.yolov5 = yolov5
            self.score = BRIGHTBOX_SCORE
            self.anchors = BRIGHTBOX_ANCHORS

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, _, h, w = x.shape
            bright = x.mean(1) > 0.5                                  # [N, H, W]
            rows, cols = bright.any(2), bright.any(1)                 # [N, H], [N, W]
            ys = torch.arange(h).unsqueeze(0).expand(n, h)
            xs = torch.arange(w).unsqueeze(0).expand(n, w)
            # Pixel i covers [i, i + 1): the box spans the first to one past the last.
            y1 = torch.where(rows, ys, torch.full_like(ys, h)).min(1).values.float()
            y2 = torch.where(rows, ys, torch.full_like(ys, -1)).max(1).values.float() + 1
            x1 = torch.where(cols, xs, torch.full_like(xs, w)).min(1).values.float()
            x2 = torch.where(cols, xs, torch.full_like(xs, -1)).max(1).values.float() + 1
            box = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1)   # [N, 4]
            classes = torch.tensor([0.0, self.score]).expand(n, 2)
            if self.yolov5:
                first = torch.cat([box, torch.ones(n, 1), classes], 1).unsqueeze(1)   # [N, 1, 7]
                return torch.cat([first, torch.zeros(n, self.anchors - 1, 7)], 1)
            first = torch.cat([box, classes], 1).unsqueeze(2)                         # [N, 6, 1]
            return torch.cat([first, torch.zeros(n, 6, self.anchors - 1)], 2)

    return BrightBox(layout == "yolov5").eval()


def export_yolo_file(repo: Path, root: Path, checkpoint: Path) -> None:
    """The test YOLO as Ultralytics' `yolo export format=onnx dynamic=True` lays it out:
    float [N, 3, S, S] in [0, 1] named ``images``, [N, 84, A] named ``output0``."""
    import torch

    import service
    from service.export import zoo
    from service.export.files import export_from_file

    model = zoo.get("yolo").build(80)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    onnx_file = root / "yolo_ultralytics_layout.onnx"
    sample = torch.rand(1, 3, YOLO_INPUT_SIZE, YOLO_INPUT_SIZE)
    with torch.inference_mode():
        torch.onnx.export(model.eval(), (sample,), str(onnx_file), input_names=["images"], output_names=["output0"],
                          dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    labels = Path(service.__file__).parent / "data" / "coco80_classes.txt"
    export_from_file(onnx_file, repo, task="detection", name="yolo_from_file", layout="yolov8",
                     input_size=YOLO_INPUT_SIZE, labels_file=labels, max_batch_size=2)


def export(repo: Path, root: Path, checkpoints: dict) -> None:
    import torch

    from service.export.files import export_from_file

    from service.export.repository import export_model

    checkpoints["yolo"] = make_yolo_checkpoint(root / "yolo_test.pth")
    export_model("yolo", repo, weights=checkpoints["yolo"], input_size=YOLO_INPUT_SIZE, max_batch_size=4)
    export_yolo_file(repo, root, checkpoints["yolo"])

    labels = root / "brightbox_labels.txt"
    labels.write_text("\n".join(BRIGHTBOX_LABELS) + "\n")
    scripted = root / "brightbox.pt"
    torch.jit.save(torch.jit.script(make_brightbox("yolov8")), str(scripted))
    for mode in ("letterbox", "stretch"):
        export_from_file(scripted, repo, task="detection", name=f"brightbox_{mode}", layout="yolov8",
                         input_size=BRIGHTBOX_INPUT_SIZE, labels_file=labels, resize_mode=mode, max_batch_size=2)
    onnx_file = root / "brightbox_v5.onnx"
    sample = torch.rand(1, 3, BRIGHTBOX_INPUT_SIZE, BRIGHTBOX_INPUT_SIZE)
    torch.onnx.export(make_brightbox("yolov5"), (sample,), str(onnx_file), input_names=["images"],
                      output_names=["output0"], dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
                      opset_version=17, dynamo=False)
    export_from_file(onnx_file, repo, task="detection", name="brightbox_v5", layout="yolov5",
                     input_size=BRIGHTBOX_INPUT_SIZE, labels_file=labels, max_batch_size=2)

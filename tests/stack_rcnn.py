"""Two-stage detector entries of the shared end-to-end stack (see conftest.py): Faster
R-CNN (MobileNetV3-Large FPN) and Mask R-CNN (ResNet-50 FPN) at min_size 320, with test
checkpoints that detect on the test photos (`rcnn_weights`). `checkpoints[<arch>]` is
the checkpoint path, so tests can rebuild stock torchvision with the same weights.
Faster R-CNN ResNet-50 FPN is left out: it adds its export time and tests nothing the
other two don't (tests/export/test_zoo_detection.py covers it)."""
from __future__ import annotations

from pathlib import Path

RCNN_STACK_SIZE = 320
RCNN_STACK_ARCHITECTURES = ("fasterrcnn_mobilenet_v3_large_fpn", "maskrcnn_resnet50_fpn")


def export(repo: Path, root: Path, checkpoints: dict) -> None:
    from rcnn_weights import make_checkpoint
    from service.export.repository import export_model

    for arch in RCNN_STACK_ARCHITECTURES:
        checkpoints[arch] = make_checkpoint(arch, root / f"{arch}_test.pth", seed=0)
        export_model(arch, repo, weights=checkpoints[arch], input_size=RCNN_STACK_SIZE, max_batch_size=4)

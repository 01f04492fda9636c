"""R-CNN and Fast R-CNN entries of the shared end-to-end stack (see conftest.py):
small inputs, at most 50 proposals, searched at 160 px."""
from __future__ import annotations

from pathlib import Path

# Small enough for CI: R-CNN regions of 64 px, Fast R-CNN images of 128..192 px.
REGION_OPTIONS = {"proposals": "40", "proposal_side": "160"}
RCNN_SIZE = 64
FAST_OPTIONS = {**REGION_OPTIONS, "min_side": "128", "max_side": "192"}


def make_region_checkpoint(path: Path, num_classes: int = 21) -> Path:
    """Seeded R-CNN/Fast R-CNN weights whose heads are scaled up, so that class scores
    spread far beyond any tolerance and the box deltas move the boxes."""
    import torch

    from service.export.zoo.regions import RegionHead

    torch.manual_seed(2024)
    model = RegionHead(num_classes)
    with torch.no_grad():
        model.cls_score.weight.normal_(0, 0.5)
        model.bbox_pred.weight.normal_(0, 0.05)
    torch.save(model.state_dict(), path)
    return path


def export(repo: Path, root: Path, checkpoints: dict) -> None:
    from service.export.repository import export_model

    checkpoints["regions"] = make_region_checkpoint(root / "regions_test.pth")
    export_model("rcnn", repo, weights=checkpoints["regions"], input_size=RCNN_SIZE, max_batch_size=16,
                 options=REGION_OPTIONS)
    export_model("fast_rcnn", repo, weights=checkpoints["regions"], input_size=RCNN_SIZE, max_batch_size=2,
                 options=FAST_OPTIONS)

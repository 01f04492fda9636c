"""Classification entries of the shared end-to-end stack (see conftest.py)."""
from __future__ import annotations

from pathlib import Path


def export(repo: Path, root: Path, checkpoints: dict) -> None:
    from conftest import SLOW_MODEL_SECONDS, make_resnet18_checkpoint
    from service.export.repository import export_model
    from slow_model import export_slow_model

    checkpoints["resnet18"] = make_resnet18_checkpoint(root / "resnet18_test.pth")
    export_model("resnet18", repo, weights=checkpoints["resnet18"], max_batch_size=4)
    export_model("resnet18", repo, fmt="onnx", weights=checkpoints["resnet18"], max_batch_size=4)
    # Two versions served side by side, with different weights.
    for version in (1, 2):
        export_model("resnet18", repo, name="versioned", input_size=64, seed=version, version=version,
                     version_policy="all", max_batch_size=2)
    export_slow_model(repo, seconds=SLOW_MODEL_SECONDS)

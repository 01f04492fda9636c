"""Semantic segmentation entries of the shared end-to-end stack (see conftest.py):
U-Net (TorchScript and ONNX) and SegNet at small input sizes, with seeded weights whose
classifier layer is scaled up so that several classes win somewhere in every photo."""
from __future__ import annotations

from pathlib import Path

# Small inputs keep CPU inference fast: multiples of 2**4 (U-Net, depth 4) and 32 (SegNet).
UNET_INPUT = 96
SEGNET_INPUT = 64
# Seeded random weights give near-equal logits everywhere; scaling the last layer makes
# the argmax margins large beside float noise, so exact label maps are meaningful.
CLASSIFIER_SCALE = 20.0


def make_checkpoint(arch_name: str, path: Path, seed: int) -> Path:
    import torch

    from service import zoo

    arch = zoo.get(arch_name)
    torch.manual_seed(seed)
    model = arch.build(arch.num_classes)
    last = model.outc if arch_name == "unet" else model.classifier
    with torch.no_grad():
        last.weight.mul_(CLASSIFIER_SCALE)
        last.bias.mul_(CLASSIFIER_SCALE)
    torch.save(model.state_dict(), path)
    return path


def export(repo: Path, root: Path, checkpoints: dict) -> None:
    from service.exporter import export_model

    checkpoints["unet"] = make_checkpoint("unet", root / "unet_test.pth", seed=11)
    checkpoints["segnet"] = make_checkpoint("segnet", root / "segnet_test.pth", seed=12)
    export_model("unet", repo, weights=checkpoints["unet"], input_size=UNET_INPUT, max_batch_size=4)
    export_model("unet", repo, fmt="onnx", weights=checkpoints["unet"], input_size=UNET_INPUT, max_batch_size=4)
    export_model("segnet", repo, weights=checkpoints["segnet"], input_size=SEGNET_INPUT, max_batch_size=4)

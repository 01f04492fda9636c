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

    from service.export import zoo

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
    from service.export.repository import export_model

    checkpoints["unet"] = make_checkpoint("unet", root / "unet_test.pth", seed=11)
    checkpoints["segnet"] = make_checkpoint("segnet", root / "segnet_test.pth", seed=12)
    export_model("unet", repo, weights=checkpoints["unet"], input_size=UNET_INPUT, max_batch_size=4)
    export_model("unet", repo, fmt="onnx", weights=checkpoints["unet"], input_size=UNET_INPUT, max_batch_size=4)
    export_model("segnet", repo, weights=checkpoints["segnet"], input_size=SEGNET_INPUT, max_batch_size=4)
    export_candidates(repo, root, checkpoints)


# An instance model through the --from-file path, independent of the zoo's Mask R-CNN:
# a small TorchScript module that follows the rcnn_candidates contract, with candidates
# that depend on the image.
CANDIDATES = 24
PADDING_ROWS = 4  # rows past count__3, zero-filled, that the gateway must ignore
MASK_SIZE = 28


def candidate_model():
    """uint8 [N, 3, H, W] -> rcnn_candidates: seeded relative boxes scaled to the image
    (overlapping, in a few classes, so NMS has work), scores from the image's brightness
    under each box, masks from the image's own 28x28 brightness pattern."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class CandidateModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.k, self.m, self.count = CANDIDATES, MASK_SIZE, CANDIDATES - PADDING_ROWS
            g = torch.Generator().manual_seed(5)
            centre = torch.rand(CANDIDATES, 2, generator=g) * 0.8 + 0.1
            size = torch.rand(CANDIDATES, 2, generator=g) * 0.5 + 0.1
            self.register_buffer("relative", torch.cat([centre - size / 2, centre + size / 2], 1))
            self.register_buffer("classes", torch.randint(1, 4, (CANDIDATES,), generator=g))
            self.register_buffer("offsets", torch.randn(CANDIDATES, 1, 1, generator=g) * 2.0)

        def forward(self, images: torch.Tensor):
            n, h, w = images.shape[0], images.shape[2], images.shape[3]
            gray = images.float().mean(1, keepdim=True) / 255.0  # [N, 1, H, W]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            boxes = (self.relative * scale).expand(n, self.k, 4)
            grid = F.adaptive_avg_pool2d(gray, 8).flatten(1)  # [N, 64]
            scores = torch.sigmoid((grid[:, :self.k] - grid.mean(1, keepdim=True)) * 12.0)
            scores, order = scores.sort(dim=1, descending=True)
            boxes = torch.gather(boxes, 1, order[:, :, None].expand(n, self.k, 4))
            labels = self.classes[order]
            pattern = F.adaptive_avg_pool2d(gray, self.m)  # [N, 1, M, M]
            masks = torch.sigmoid((pattern - pattern.mean()) * 20.0 + self.offsets[order])  # [N, K, M, M]
            valid = (torch.arange(self.k) < self.count)[None]
            count = torch.full((n, 1), self.count, dtype=torch.int32)
            return (boxes * valid[:, :, None], scores * valid, labels * valid, count,
                    masks * valid[:, :, None, None])

    return CandidateModel().eval()


def export_candidates(repo: Path, root: Path, checkpoints: dict) -> None:
    import torch

    from service.export.files import export_from_file
    from service.export.zoo import read_labels

    source = root / "candidates.pt"
    torch.jit.save(torch.jit.script(candidate_model()), str(source))
    labels = root / "coco_labels.txt"
    labels.write_text("\n".join(read_labels("coco_categories.txt")) + "\n")
    checkpoints["candidates"] = source
    export_from_file(source, repo, task="instance_segmentation", name="candidates", input_size=64,
                     labels_file=labels)

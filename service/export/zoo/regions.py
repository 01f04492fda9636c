"""R-CNN and Fast R-CNN: detectors that score externally proposed regions.

Both use AlexNet (torchvision's layout), the backbone of the R-CNN paper (Girshick et
al. 2014) and the "S" model (CaffeNet) of the Fast R-CNN paper (Girshick 2015); it is
also the cheapest ImageNet backbone on CPU, which matters when R-CNN runs it once per
region. Both heads are Fast R-CNN's: fc6 -> fc7 -> a (C+1)-way classifier (background
at index 0) and class-specific box regression [4 (C+1)], deltas encoded as
torchvision's `BoxCoder` with weights (10, 10, 5, 5). (The R-CNN paper trains SVMs and
a ridge regressor on pool5 instead; one softmax head lets both models share weights.)

- `rcnn` takes warped regions, uint8 [N, 3, S, S] (the gateway crops and warps each
  proposal with 16 px of context); every region is one batch item.
- `fast_rcnn` takes one image, uint8 [N, 3, H, W], and its proposals, float32
  [N, P, 4] (x1, y1, x2, y2 in that image's pixels); the backbone runs once per image,
  then RoIAlign (torchvision's semantics, 6 x 6 bins on the stride-16 conv5 map, where
  the paper's RoIPool sits) feeds the same head per RoI.

The state_dict keys are shared: `features.*`, `classifier.*` (fc6, fc7 as in
torchvision's AlexNet), `cls_score.*`, `bbox_pred.*`; an R-CNN checkpoint loads into
Fast R-CNN and back.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from ...spec import TensorSpec
from ...pipelines import layouts
from . import Architecture, Normalize, contract, register

# AlexNet's conv5 has stride 16 once its last max-pool is dropped (Fast R-CNN's RoI
# pooling takes that pool's place); fc6 expects 256 x 6 x 6 inputs.
FEATURE_STRIDE = 16
POOLED_SIZE = 6
# torchvision's MultiScaleRoIAlign defaults in Faster R-CNN.
SAMPLING_RATIO = 2


class RegionHead(nn.Module):
    """AlexNet conv layers + fc6/fc7 + classification and class-specific box regression."""

    def __init__(self, num_classes: int):
        super().__init__()
        alexnet = torchvision.models.alexnet(weights=None)
        # conv1..conv5 (stride 16; same keys as torchvision's AlexNet), then pool5.
        self.features = nn.Sequential(*list(alexnet.features.children())[:-1])
        self.pool5 = alexnet.features[-1]
        self.avgpool = nn.AdaptiveAvgPool2d((POOLED_SIZE, POOLED_SIZE))
        self.classifier = nn.Sequential(*list(alexnet.classifier.children())[:-1])  # fc6, fc7
        self.cls_score = nn.Linear(4096, num_classes)
        self.bbox_pred = nn.Linear(4096, 4 * num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def head(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[K, 256, 6, 6] -> (class logits [K, C+1], box deltas [K, 4 (C+1)])."""
        x = self.classifier(torch.flatten(pooled, 1))
        return self.cls_score(x), self.bbox_pred(x)

    def forward(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """R-CNN: normalized float regions [K, 3, S, S] -> logits, deltas."""
        return self.head(self.avgpool(self.pool5(self.features(regions))))


class RCNNExport(nn.Module):
    """Exported R-CNN: uint8 regions [K, 3, S, S] -> (class_logits [K, C+1], box_deltas
    [K, 4 (C+1)])."""

    def __init__(self, model: RegionHead, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(self.normalize(regions))


class FastRCNNExport(nn.Module):
    """Exported Fast R-CNN: uint8 images [N, 3, H, W] and RoIs float32 [N, P, 4]
    (x1, y1, x2, y2, image pixels) -> (class_logits [N, P, C+1], box_deltas
    [N, P, 4 (C+1)])."""

    def __init__(self, model: RegionHead, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model
        self.pooled_size = POOLED_SIZE
        self.spatial_scale = 1.0 / FEATURE_STRIDE
        self.sampling_ratio = SAMPLING_RATIO

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, p = rois.shape[0], rois.shape[1]
        features = self.model.features(self.normalize(images))  # conv5, stride 16
        batch_index = torch.arange(n, dtype=rois.dtype, device=rois.device).view(n, 1, 1).expand(n, p, 1)
        flat = torch.cat([batch_index, rois], dim=2).reshape(n * p, 5)
        pooled = torchvision.ops.roi_align(features, flat, (self.pooled_size, self.pooled_size),
                                           spatial_scale=self.spatial_scale, sampling_ratio=self.sampling_ratio,
                                           aligned=False)
        logits, deltas = self.model.head(pooled)
        return logits.reshape(n, p, -1), deltas.reshape(n, p, -1)


# n_labels counts the background class: C + 1.
def _region_outputs(n_labels: int, height: int, width: int) -> tuple[TensorSpec, ...]:
    return contract("rcnn_regions", C=n_labels - 1)


def _fast_outputs(n_labels: int, height: int, width: int) -> tuple[TensorSpec, ...]:
    # One row per RoI: the RoI count is the entry's `proposals` option (rois__1's dim).
    return contract("fast_rcnn", C=n_labels - 1, R=-1)


def _fast_extra_inputs(options: dict, height: int, width: int) -> tuple[TensorSpec, ...]:
    fast = layouts.get("fast_rcnn")
    count = fast.parse_options(options).proposals
    return tuple(TensorSpec(t.name, t.dtype, t.dims) for t in fast.concrete(inputs=True, R=count, H=-1, W=-1)[1:])


def _example_rois(spec, batch: int, height: int, width: int, generator: torch.Generator) -> tuple[torch.Tensor]:
    """Random valid boxes inside a height x width image: float32 [batch, P, 4]."""
    count = spec.inputs[1].dims[0]
    corners = torch.rand((batch, count, 2, 2), generator=generator) * torch.tensor([float(width), float(height)])
    low, high = corners.min(dim=2).values, corners.max(dim=2).values
    return (torch.cat([low, high], dim=2),)


def _build(num_classes: int) -> RegionHead:
    return RegionHead(num_classes).eval()


# Options both write into their spec (the layouts' defaults): selective search's
# proposal count and search scale, and the Detect defaults (torchvision's RoIHeads').
_WRITTEN = ("proposals", "proposal_side", "proposal_min_size", "score_threshold", "iou_threshold",
            "max_detections")

register(Architecture(
    name="rcnn", task="detection", build=_build,
    wrap=lambda model, spec: RCNNExport(model, spec.mean, spec.std),
    num_classes=21, labels_resource="voc_classes.txt", input_size=(224, 224), resize_mode="stretch",
    output_layout="rcnn_regions",
    # 16 px of warped context around each proposal (R-CNN paper, appendix A).
    options=layouts.get("rcnn_regions").option_strings(*_WRITTEN, "context_padding"),
    output_specs=_region_outputs, classes_key="cls_score.weight",
))

register(Architecture(
    name="fast_rcnn", task="detection", build=_build,
    wrap=lambda model, spec: FastRCNNExport(model, spec.mean, spec.std),
    num_classes=21, labels_resource="voc_classes.txt", input_size=(600, 600), resize_mode="none",
    output_layout="fast_rcnn",
    # The gateway scales each image so its shorter side is min_side, its longer side
    # at most max_side (the Fast R-CNN paper's single scale, 600 / 1000).
    options=layouts.get("fast_rcnn").option_strings(*_WRITTEN, "min_side", "max_side"),
    output_specs=_fast_outputs, variable_input_size=True, extra_inputs=_fast_extra_inputs,
    example_extra_inputs=_example_rois, classes_key="cls_score.weight",
))

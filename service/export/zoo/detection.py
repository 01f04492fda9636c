"""Two-stage detectors: torchvision's Faster R-CNN (ResNet-50 FPN, MobileNetV3-Large FPN)
and Mask R-CNN (ResNet-50 FPN), exported with output layout ``rcnn_candidates``.

The exported model (`RCNNCandidates`, `MaskRCNNCandidates`) takes uint8 images
[N, 3, H, W] RGB of any size (the N images of one call share a shape) and runs
torchvision's own pipeline: normalize with ImageNet mean/std, resize so the shorter side
is ``min_size`` (the longer at most ``max_size``), pad to a multiple of 32, backbone +
FPN, RPN (with its NMS), RoIAlign, box head. It returns, per image, the box head's
*candidates*: exactly torchvision's ``RoIHeads.postprocess_detections`` up to, but not
including, the final class-aware NMS and the ``detections_per_img`` cut:

    softmax -> per-class box decoding -> clip to the resized image -> drop background
    -> score > score_threshold -> remove_small_boxes(1e-2) -> top K by score
    -> boxes mapped back to the input image's pixels (torchvision's transform.postprocess)

Outputs (K = ``max_candidates`` rows per image; the first ``count`` are valid, sorted by
score descending; the rest are zeros):

    boxes__0   float32 [K, 4]  (x1, y1, x2, y2) in input-image pixels
    scores__1  float32 [K]
    labels__2  int64   [K]     index into the labels (COCO: 91 entries, 0 = background never appears)
    count__3   int32   [1]
    masks__4   float32 [K, 28, 28]  Mask R-CNN only: mask probabilities (sigmoid) of each
                                    candidate's own class, in its box

The gateway then runs class-aware NMS and the top-``max_detections`` cut
(`service.ops.boxes.select_detections`), so request-time thresholds apply without a new
export. Greedy NMS decides each box from higher-scored boxes only, so NMS over the top
K equals full NMS restricted to them: the answer equals stock torchvision whenever
count < K, or whenever ``max_detections`` boxes survive within the top K.

Images are resized here with the scale computed in double precision, as torchvision's
*eager* `GeneralizedRCNNTransform` does (its scripted branch computes it in float32,
which can pick an output size one pixel smaller); everything else calls torchvision's
modules. Scripted, these models run on CPU-only torch through `service.export.tvshim`.

Batch norm: torchvision builds these detectors with `FrozenBatchNorm2d` whenever they
carry trained weights, so published checkpoints have no `num_batches_tracked` keys; the
zoo builds them the same way. The ResNet-50 models use eps 0, as torchvision does for
its published COCO_V1 weights (`overwrite_eps(model, 0.0)`).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops
from torchvision.ops.misc import FrozenBatchNorm2d

from ...spec import TensorSpec
from ...pipelines import layouts
from . import Architecture, contract, register, torchvision_published

COCO_NUM_CLASSES = 91  # torchvision's COCO indexing: 80 classes, gaps, 0 = background
COCO_LABELS_RESOURCE = "coco_categories.txt"
# torchvision's defaults: shorter side 800, longer side at most 1333 (the layout's).
MIN_SIZE, MAX_SIZE = (layouts.get("rcnn_candidates").default(k) for k in ("min_size", "max_size"))
# Candidates per image. Faster R-CNN: the RPN keeps 1000 proposals, so 1000 candidates
# hold every candidate of almost any image. Mask R-CNN runs its mask head (about 0.5
# GMAC per box) on every valid candidate, not on the <= 100 detections stock keeps after
# NMS: 300 bounds that cost at 3x stock's worst case, at the price of dropping candidates
# ranked below 300 (which changes the answer only when fewer than max_detections boxes
# survive NMS among the top 300).
FASTER_MAX_CANDIDATES, MASK_MAX_CANDIDATES = 1000, 300
# torchvision's RoIHeads: boxes with a side under this many pixels are dropped.
MIN_BOX_SIDE = layouts.MIN_BOX_SIZE
MASK_SIZE = 28  # Mask R-CNN's mask head output, per box


def _freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Every `BatchNorm2d` replaced by a `FrozenBatchNorm2d` (eps 1e-5): the layer
    torchvision's detection builders use whenever weights are loaded."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features))
        else:
            _freeze_batch_norm(child)
    return module


def _set_eps(module: nn.Module, eps: float) -> None:
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = eps


def _builder(name: str, eps: float | None):
    def build(num_classes: int) -> nn.Module:
        # min_size/max_size/score threshold are set again by `wrap` from the spec.
        model = getattr(torchvision.models.detection, name)(
            weights=None, weights_backbone=None, num_classes=num_classes)
        _freeze_batch_norm(model)
        if eps is not None:
            _set_eps(model, eps)
        return model.eval()
    return build


class RCNNCandidates(nn.Module):
    """Faster R-CNN's candidates (see the module docstring): uint8 images [N, 3, H, W]
    -> boxes [N, K, 4], scores [N, K], labels int64 [N, K], count int32 [N, 1]."""

    def __init__(self, model: nn.Module, max_candidates: int, score_threshold: float,
                 min_size: int, max_size: int):
        super().__init__()
        self.transform = model.transform
        self.backbone = model.backbone
        self.rpn = model.rpn
        self.roi_heads = model.roi_heads
        self.max_candidates = int(max_candidates)
        self.score_threshold = float(score_threshold)
        self.min_size = float(min_size)
        self.max_size = float(max_size)
        self.min_box_side = MIN_BOX_SIDE

    def _candidates(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Dict[str, Tensor],
                                                   List[Tuple[int, int]]]:
        """(boxes [N, K, 4] in input pixels, scores, labels, count [N, 1], boxes [N, K, 4]
        in the resized image, the FPN features, the resized image sizes)."""
        n, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        # torchvision's transform: [0, 1] floats, ImageNet normalization, resize, pad.
        x = self.transform.normalize(images.float() / 255.0)
        scale = min(self.min_size / float(min(height, width)), self.max_size / float(max(height, width)))
        x = F.interpolate(x, size=None, scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                          align_corners=False)
        resized: Tuple[int, int] = (x.shape[-2], x.shape[-1])
        sizes: List[Tuple[int, int]] = [resized for _ in range(n)]
        batched = self.transform.batch_images([x[i] for i in range(n)], self.transform.size_divisible)
        image_list = ImageList(batched, sizes)

        features = self.backbone(image_list.tensors)
        proposals, _ = self.rpn(image_list, features)
        box_features = self.roi_heads.box_roi_pool(features, proposals, sizes)
        box_features = self.roi_heads.box_head(box_features)
        class_logits, box_regression = self.roi_heads.box_predictor(box_features)

        pred_boxes = self.roi_heads.box_coder.decode(box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)
        num_classes = class_logits.shape[-1]
        per_image = [p.shape[0] for p in proposals]
        k = self.max_candidates
        out_boxes = torch.zeros((n, k, 4), dtype=torch.float32)
        out_resized = torch.zeros((n, k, 4), dtype=torch.float32)
        out_scores = torch.zeros((n, k), dtype=torch.float32)
        out_labels = torch.zeros((n, k), dtype=torch.int64)
        out_count = torch.zeros((n, 1), dtype=torch.int32)
        for i, (boxes, scores) in enumerate(zip(pred_boxes.split(per_image, 0), pred_scores.split(per_image, 0))):
            # Clip to the resized image, one row per (proposal, foreground class).
            boxes = box_ops.clip_boxes_to_image(boxes, resized)
            labels = torch.arange(num_classes).view(1, -1).expand_as(scores)
            boxes = boxes[:, 1:].reshape(-1, 4)
            scores = scores[:, 1:].reshape(-1)
            labels = labels[:, 1:].reshape(-1)
            # Score threshold (strict, as torchvision), then drop near-empty boxes.
            keep = torch.where(scores > self.score_threshold)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=self.min_box_side)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            # The K best, by decreasing score (stable: ties keep torchvision's row order).
            order = torch.sort(scores, descending=True, stable=True)[1][:k]
            m = order.shape[0]
            out_resized[i, :m] = boxes[order]
            out_boxes[i, :m] = resize_boxes(boxes[order], [resized[0], resized[1]], [height, width])
            out_scores[i, :m] = scores[order]
            out_labels[i, :m] = labels[order]
            out_count[i, 0] = m
        return out_boxes, out_scores, out_labels, out_count, out_resized, features, sizes

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        boxes, scores, labels, count, _, _, _ = self._candidates(images)
        return boxes, scores, labels, count


class MaskRCNNCandidates(RCNNCandidates):
    """Mask R-CNN's candidates: `RCNNCandidates`' outputs plus masks [N, K, 28, 28], the
    sigmoid mask probabilities of each valid candidate's own class (zeros for padding).
    The mask head runs on the valid candidates only; each box's mask depends only on
    its box and the features, so a kept detection's mask equals stock's."""

    def __init__(self, model: nn.Module, max_candidates: int, score_threshold: float,
                 min_size: int, max_size: int):
        super().__init__(model, max_candidates, score_threshold, min_size, max_size)
        self.mask_roi_pool = model.roi_heads.mask_roi_pool
        self.mask_head = model.roi_heads.mask_head
        self.mask_predictor = model.roi_heads.mask_predictor
        self.mask_size = MASK_SIZE  # an attribute: TorchScript cannot read module globals

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        boxes, scores, labels, count, resized_boxes, features, sizes = self._candidates(images)
        n, k = boxes.shape[0], boxes.shape[1]
        masks = torch.zeros((n, k, self.mask_size, self.mask_size), dtype=torch.float32)
        counts: List[int] = count[:, 0].long().tolist()
        if sum(counts) > 0:
            rois = [resized_boxes[i, :counts[i]] for i in range(n)]
            logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, rois, sizes)))
            # torchvision's maskrcnn_inference: sigmoid, then each box's own class.
            flat_labels = torch.cat([labels[i, :counts[i]] for i in range(n)])
            probs = logits.sigmoid()[torch.arange(flat_labels.shape[0]), flat_labels]
            start = 0
            for i in range(n):
                masks[i, :counts[i]] = probs[start:start + counts[i]]
                start += counts[i]
        return boxes, scores, labels, count, masks


def _sizes(spec) -> Tuple[int, int]:
    return spec.settings.min_size, spec.settings.max_size


def _wrap_with(cls):
    def wrap(model: nn.Module, spec) -> nn.Module:
        min_size, max_size = _sizes(spec)
        return cls(model, spec.settings.max_candidates, spec.settings.score_threshold, min_size, max_size)
    return wrap


def _sized_options(height: int, width: int) -> dict[str, str]:
    """An export size S sets min_size = S and max_size in torchvision's 800:1333 ratio."""
    size = min(height, width)
    return layouts.get("rcnn_candidates").option_strings(
        min_size=size, max_size=round(size * MAX_SIZE / MIN_SIZE))


def _output_specs(with_masks: bool, max_candidates: int):
    def specs(n_labels: int, height: int, width: int) -> tuple[TensorSpec, ...]:
        # boxes, scores, labels, count, and the masks for instance segmentation only.
        return contract("rcnn_candidates", count=None if with_masks else 4, K=max_candidates, M=MASK_SIZE)
    return specs


def _options(max_candidates: int) -> dict[str, str]:
    # torchvision's RoIHeads defaults (the layout's). score_threshold is also the model's
    # candidate cut, so a request can raise it but not lower it below this.
    return layouts.get("rcnn_candidates").option_strings("score_threshold", "iou_threshold", "max_detections",
                                                         max_candidates=max_candidates)


for _name, _task, _k, _eps in (
        ("fasterrcnn_resnet50_fpn", "detection", FASTER_MAX_CANDIDATES, 0.0),
        ("fasterrcnn_mobilenet_v3_large_fpn", "detection", FASTER_MAX_CANDIDATES, None),
        ("maskrcnn_resnet50_fpn", "instance_segmentation", MASK_MAX_CANDIDATES, 0.0)):
    _masks = _task == "instance_segmentation"
    register(Architecture(
        name=_name, task=_task, build=_builder(_name, _eps),
        wrap=_wrap_with(MaskRCNNCandidates if _masks else RCNNCandidates),
        num_classes=COCO_NUM_CLASSES, labels_resource=COCO_LABELS_RESOURCE,
        input_size=(MIN_SIZE, MIN_SIZE), resize_mode="none",
        output_layout="rcnn_candidates",
        options=_options(_k), output_specs=_output_specs(_masks, _k), variable_input_size=True,
        sized_options=_sized_options, classes_key="roi_heads.box_predictor.cls_score.weight",
        # COCO_V1: their preset is torchvision's own resize inside the model (min_size).
        published=torchvision_published(_name),
    ))

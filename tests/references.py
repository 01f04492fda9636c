"""Slow, obvious references and shared fixtures that several test modules compare
against: torchvision's CPU NMS and RoIAlign transcribed, Ultralytics' letterbox and
NMS rules, stock torchvision detectors assembled as its builders do, a sample spec.
No test module imports another; they import these."""
from __future__ import annotations

import math

import cv2

import numpy as np
import torch

from service.spec import ModelSpec, TensorSpec

SIZE = 320  # min_size of the exported R-CNN models and of the stock reference

def sample_spec(**overrides) -> ModelSpec:
    fields = dict(
        name="m", task="classification", architecture="resnet18",
        inputs=(TensorSpec("images__0", np.dtype(np.uint8), (3, 224, 224)),),
        outputs=(TensorSpec("logits__0", np.dtype(np.float32), (3,)),),
        max_batch_size=4, resize_mode="resize_center_crop", resize_size=256,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), labels=("a", "b, with comma", 'c "quoted"'),
        options={"top_k": "3"})
    fields.update(overrides)
    return ModelSpec(**fields)


F32 = np.float32


def reference_order(scores) -> list[int]:
    """torch's stable descending sort: NaN first, ties in index order."""
    return sorted(range(len(scores)), key=lambda i: (0, 0.0) if math.isnan(scores[i]) else (1, -float(scores[i])))


def reference_iou(a, b, dtype=F32):
    """torchvision's ``ovr``, one pair at a time, in ``dtype``."""
    a, b = [dtype(v) for v in a], [dtype(v) for v in b]
    w = max(dtype(0), min(a[2], b[2]) - max(a[0], b[0]))
    h = max(dtype(0), min(a[3], b[3]) - max(a[1], b[1]))
    inter = dtype(w * h)
    area_a = dtype((a[2] - a[0]) * (a[3] - a[1]))
    area_b = dtype((b[2] - b[0]) * (b[3] - b[1]))
    with np.errstate(invalid="ignore", divide="ignore"):
        return dtype(inter / dtype(dtype(area_a + area_b) - inter))


def reference_nms(b, s, threshold) -> np.ndarray:
    """torchvision/csrc/ops/cpu/nms_kernel.cpp, as a Python loop."""
    dtype = F32 if np.asarray(b).dtype != np.float64 else np.float64
    order = reference_order(s)
    suppressed = [False] * len(order)
    keep = []
    for rank, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[rank + 1:]:
            if not suppressed[j] and float(reference_iou(b[i], b[j], dtype)) > threshold:
                suppressed[j] = True
    return np.array(keep, np.int64)


def reference_roi_align(features, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
    feats = features.numpy()
    T = np.float32 if feats.dtype == np.float32 else np.float64
    _, channels, height, width = feats.shape
    out = np.zeros((len(rois), channels, pooled_h, pooled_w), T)
    for n, roi in enumerate(rois.numpy()):
        batch = int(roi[0])
        scale = T(spatial_scale)
        offset = T(0.5) if aligned else T(0.0)
        start_w, start_h = T(roi[1]) * scale - offset, T(roi[2]) * scale - offset
        end_w, end_h = T(roi[3]) * scale - offset, T(roi[4]) * scale - offset
        roi_w, roi_h = T(end_w - start_w), T(end_h - start_h)
        if not aligned:
            roi_w, roi_h = max(roi_w, T(1)), max(roi_h, T(1))
        bin_h, bin_w = T(roi_h / T(pooled_h)), T(roi_w / T(pooled_w))
        grid_h = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_h / T(pooled_h)))
        grid_w = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_w / T(pooled_w)))
        count = T(max(grid_h * grid_w, 1))
        for c in range(channels):
            plane = feats[batch, c].reshape(-1)
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    total = T(0)
                    for iy in range(grid_h):
                        y = T(start_h + T(ph) * bin_h) + T(T(T(iy + 0.5) * bin_h) / T(grid_h))
                        for ix in range(grid_w):
                            x = T(start_w + T(pw) * bin_w) + T(T(T(ix + 0.5) * bin_w) / T(grid_w))
                            total = T(total + bilinear(plane, height, width, y, x, T))
                    out[n, c, ph, pw] = T(total / count)
    return torch.from_numpy(out)


def bilinear(plane, height, width, y, x, T):
    if not (y >= -1.0 and y <= height and x >= -1.0 and x <= width):
        return T(0) * plane[0]  # weights 0 on pixel 0, as the precomputed table has it
    y, x = (T(0) if y <= 0 else y), (T(0) if x <= 0 else x)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = T(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = T(x_low)
    else:
        x_high = x_low + 1
    ly, lx = T(y - T(y_low)), T(x - T(x_low))
    hy, hx = T(1.0 - float(ly)), T(1.0 - float(lx))  # `T hy = 1. - ly`: in double, then to T
    w1, w2, w3, w4 = T(hy * hx), T(hy * lx), T(ly * hx), T(ly * lx)
    v1, v2 = plane[y_low * width + x_low], plane[y_low * width + x_high]
    v3, v4 = plane[y_high * width + x_low], plane[y_high * width + x_high]
    return T(T(T(T(w1 * v1) + T(w2 * v2)) + T(w3 * v3)) + T(w4 * v4))


def ultralytics_letterbox(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Ultralytics' LetterBox(auto=False, center=True) on an HWC array, transcribed."""
    shape = img.shape[:2]
    r = min(out_h / shape[0], out_w / shape[1])
    new_unpad = int(round(shape[1] * r)), int(round(shape[0] * r))
    dw, dh = (out_w - new_unpad[0]) / 2, (out_h - new_unpad[1]) / 2
    if shape[::-1] != new_unpad:
        img = cv2.resize(img, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))


def ultralytics_classify_transforms(image, size: int) -> np.ndarray:
    """Ultralytics' classify_transforms(size) with its defaults (crop_fraction 1, mean 0,
    std 1), written out for a PIL RGB image: torchvision Resize(size) of the shorter
    side (PIL bilinear, the longer side rounded down), CenterCrop(size), ToTensor.
    Returns float32 [1, 3, size, size] in [0, 1]."""
    from PIL import Image

    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    resized = image.resize(new, Image.BILINEAR)
    top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
    crop = resized.crop((left, top, left + size, top + size))
    return (np.asarray(crop, np.float32) / 255).transpose(2, 0, 1)[None]


def slow_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def slow_detect(rows, conf, iou, max_det, classes=(), agnostic=False, objectness=False):
    """One candidate per row (cx, cy, w, h, [obj,] class scores...): best class, score >
    conf, class filter, greedy NMS in score order (ties by row), first max_det.
    Returns [(row, class, score, [x1, y1, x2, y2])]."""
    candidates = []
    for a, row in enumerate(rows):
        row = [float(v) for v in row]
        cls = row[5:] if objectness else row[4:]
        scores = [c * row[4] for c in cls] if objectness else cls
        j = max(range(len(scores)), key=lambda k: (scores[k], -k))
        s = scores[j]
        if not s > conf or (classes and j not in classes):
            continue
        cx, cy, w, h = row[:4]
        candidates.append((a, j, s, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    candidates.sort(key=lambda c: (-c[2], c[0]))
    kept = []
    for c in candidates:
        if all(not ((agnostic or k[1] == c[1]) and slow_iou(k[3], c[3]) > iou) for k in kept):
            kept.append(c)
    return kept[:max_det]


def stock_model(arch_name: str, checkpoint, min_size: int = SIZE) -> torch.nn.Module:
    """torchvision's model as its builder makes it for trained weights, with `checkpoint`."""
    from torchvision.models import mobilenet_v3_large, resnet50
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    sizes = dict(min_size=min_size, max_size=round(min_size * 1333 / 800))
    if arch_name == "fasterrcnn_mobilenet_v3_large_fpn":
        backbone = _mobilenet_extractor(mobilenet_v3_large(norm_layer=FrozenBatchNorm2d), True, 3)
        anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
        model = FasterRCNN(backbone, 91, rpn_anchor_generator=anchors, rpn_score_thresh=0.05, **sizes)
    else:
        backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
        model = (MaskRCNN if arch_name.startswith("mask") else FasterRCNN)(backbone, num_classes=91, **sizes)
        overwrite_eps(model, 0.0)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    return model.eval()

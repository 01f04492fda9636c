"""YOLO: an anchor-free, YOLOv8-style detector (Ultralytics' YOLOv8 design).

CSP backbone of C2f blocks with SPPF, a PAN neck, and a decoupled head per stride
(8, 16, 32): one branch regresses each side's distance from the anchor point as a
distribution over `REG_MAX` bins (DFL), the other gives per-class logits.

The module tree and parameter names follow Ultralytics' `DetectionModel` for
`yolov8{n,s}.yaml`: layer ``i`` of the yaml is ``model.<i>`` (``model.0.conv.weight``,
``model.2.m.0.cv1.bn.running_mean``, ``model.22.cv2.0.2.bias``, ``model.22.dfl.conv.weight``).
So the state_dict of a trained Ultralytics YOLOv8 model, ``torch.load(pt)["model"].float()
.state_dict()`` saved as a plain state_dict, is meant to load unchanged: the layers,
widths and parameter counts equal Ultralytics' (3,157,200 for n, 11,166,560 for s), but
no real Ultralytics checkpoint could be tried here. Ultralytics' ``.pt`` files
themselves are pickled modules, which `--weights` does not unpickle.

Output, as Ultralytics' TorchScript/ONNX export: float32 ``[N, 4 + C, A]``, rows
(cx, cy, w, h) in input pixels then sigmoid class scores, A anchor points over the three
strides (8400 at 640 x 640). The exported model takes uint8 [N, 3, H, W] RGB and divides
by 255 itself.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
from torch import nn

from ...spec import TensorSpec
from ...pipelines import layouts
from . import Architecture, NormalizedModel, contract, register

REG_MAX = 16                # DFL bins per box side
STRIDES = (8.0, 16.0, 32.0)  # P3, P4, P5
COCO_CLASSES = 80
# Ultralytics' BatchNorm settings (eps 1e-3, momentum 0.03) for every Conv.
BN_EPS, BN_MOMENTUM = 1e-3, 0.03
# yolov8.yaml scales: (depth multiple, width multiple, max channels).
SCALES = {"n": (0.33, 0.25, 1024), "s": (0.33, 0.50, 1024)}
# Ultralytics' predict defaults (conf, iou, max_det), from the yolov8 layout.
DEFAULT_OPTIONS = layouts.get("yolov8").option_strings("score_threshold", "iou_threshold", "max_detections")
DEFAULT_INPUT_SIZE = 640


class Conv(nn.Module):
    """Conv2d (no bias, 'same' padding) -> BatchNorm -> SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 Convs, with a residual when `shortcut` (and the widths agree)."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = Conv(c1, c2, 3)
        self.cv2 = Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with two convolutions: split a 1x1 conv's output in halves, run n
    Bottlenecks on the second half, and fuse every intermediate with a 1x1 conv."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            y.append(block(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools, concatenated."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1)
        self.cv2 = Conv(hidden * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.cv1(x)
        y2 = self.m(y1)
        y3 = self.m(y2)
        return self.cv2(torch.cat([y1, y2, y3, self.m(y3)], 1))


class Concat(nn.Module):
    """Placeholder for the yaml's Concat layers (no parameters): keeps the layer indices,
    hence the state_dict keys, equal to Ultralytics'."""

    def forward(self, x: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, 1)


class DFL(nn.Module):
    """Distribution focal loss decoding: the expected bin index of a softmax over
    REG_MAX bins, as a fixed 1x1 conv with weights 0..REG_MAX-1."""

    def __init__(self, c1: int = REG_MAX):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 4 * REG_MAX, A] bin logits -> [N, 4, A] distances in stride units."""
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class Detect(nn.Module):
    """Decoupled head: per level a box branch (cv2, 4 * REG_MAX DFL logits) and a class
    branch (cv3, C logits), decoded to ``[N, 4 + C, A]`` (cx, cy, w, h in input pixels,
    sigmoid scores)."""

    def __init__(self, nc: int, ch: Tuple[int, int, int]):
        super().__init__()
        self.nc = nc
        self.reg_max = REG_MAX
        self.strides: List[float] = list(STRIDES)
        c2 = max(16, ch[0] // 4, REG_MAX * 4)
        c3 = max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * REG_MAX, 1))
                                 for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1))
                                 for x in ch)
        self.dfl = DFL(REG_MAX)
        self.bias_init()

    def bias_init(self) -> None:
        """Ultralytics' prior: box logits 1, class logits log(5 / nc / (640 / s)^2),
        i.e. about 5 objects per 640 x 640 image at each level."""
        for box, cls, s in zip(self.cv2, self.cv3, STRIDES):
            box[-1].bias.data[:] = 1.0
            cls[-1].bias.data[: self.nc] = math.log(5 / self.nc / (640 / s) ** 2)

    def forward(self, x: List[torch.Tensor]) -> torch.Tensor:
        dist: List[torch.Tensor] = []
        logits: List[torch.Tensor] = []
        points: List[torch.Tensor] = []
        strides: List[torch.Tensor] = []
        i = 0
        for box, cls in zip(self.cv2, self.cv3):
            feature = x[i]
            n, _, h, w = feature.shape
            dist.append(box(feature).view(n, 4 * self.reg_max, h * w))
            logits.append(cls(feature).view(n, self.nc, h * w))
            # Anchor points at cell centres, row-major (y then x), in stride units.
            sx = torch.arange(w, device=feature.device, dtype=feature.dtype) + 0.5
            sy = torch.arange(h, device=feature.device, dtype=feature.dtype) + 0.5
            gy, gx = torch.meshgrid(sy, sx, indexing="ij")
            points.append(torch.stack((gx, gy), -1).view(-1, 2))
            strides.append(torch.full((h * w, 1), self.strides[i], device=feature.device, dtype=feature.dtype))
            i += 1
        anchors = torch.cat(points).transpose(0, 1).unsqueeze(0)   # [1, 2, A]
        stride = torch.cat(strides).transpose(0, 1)                # [1, A]
        lt, rb = self.dfl(torch.cat(dist, 2)).chunk(2, 1)          # [N, 2, A] each
        x1y1 = anchors - lt
        x2y2 = anchors + rb
        boxes = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * stride
        return torch.cat((boxes, torch.cat(logits, 2).sigmoid()), 1)


def _width(channels: int, width: float, max_channels: int) -> int:
    """Ultralytics' make_divisible(min(c, max) * width, 8)."""
    return int(math.ceil(min(channels, max_channels) * width / 8) * 8)


def _depth(n: int, depth: float) -> int:
    return max(round(n * depth), 1)


class YOLO(nn.Module):
    """YOLOv8 at one scale: float [N, 3, H, W] in [0, 1] (H, W multiples of 32) ->
    [N, 4 + C, A]. ``model`` holds the 23 layers of yolov8.yaml in order."""

    def __init__(self, num_classes: int = COCO_CLASSES, scale: str = "n"):
        super().__init__()
        depth, width, max_channels = SCALES[scale]

        def c(channels: int) -> int:
            return _width(channels, width, max_channels)

        def d(n: int) -> int:
            return _depth(n, depth)

        self.model = nn.ModuleList([
            Conv(3, c(64), 3, 2),                              # 0  P1/2
            Conv(c(64), c(128), 3, 2),                         # 1  P2/4
            C2f(c(128), c(128), d(3), True),                   # 2
            Conv(c(128), c(256), 3, 2),                        # 3  P3/8
            C2f(c(256), c(256), d(6), True),                   # 4
            Conv(c(256), c(512), 3, 2),                        # 5  P4/16
            C2f(c(512), c(512), d(6), True),                   # 6
            Conv(c(512), c(1024), 3, 2),                       # 7  P5/32
            C2f(c(1024), c(1024), d(3), True),                 # 8
            SPPF(c(1024), c(1024), 5),                         # 9
            nn.Upsample(None, 2, "nearest"),                   # 10
            Concat(),                                          # 11 cat backbone P4
            C2f(c(1024) + c(512), c(512), d(3)),               # 12
            nn.Upsample(None, 2, "nearest"),                   # 13
            Concat(),                                          # 14 cat backbone P3
            C2f(c(512) + c(256), c(256), d(3)),                # 15 (P3/8 out)
            Conv(c(256), c(256), 3, 2),                        # 16
            Concat(),                                          # 17 cat head P4
            C2f(c(256) + c(512), c(512), d(3)),                # 18 (P4/16 out)
            Conv(c(512), c(512), 3, 2),                        # 19
            Concat(),                                          # 20 cat head P5
            C2f(c(512) + c(1024), c(1024), d(3)),              # 21 (P5/32 out)
            Detect(num_classes, (c(256), c(512), c(1024))),    # 22
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m[1](m[0](x))
        p3 = m[4](m[3](m[2](x)))
        p4 = m[6](m[5](p3))
        p5 = m[9](m[8](m[7](p4)))
        h4 = m[12](m[11]([m[10](p5), p4]))
        h3 = m[15](m[14]([m[13](h4), p3]))
        o4 = m[18](m[17]([m[16](h3), h4]))
        o5 = m[21](m[20]([m[19](o4), p5]))
        return m[22]([h3, o4, o5])


def _build(scale: str):
    def build(num_classes: int) -> nn.Module:
        return YOLO(num_classes, scale).eval()
    return build


def _outputs(n_labels: int, height: int, width: int) -> tuple[TensorSpec, ...]:
    """float32 [4 + C, A]; the input size must be a multiple of the largest stride."""
    step = int(STRIDES[-1])
    if height % step or width % step:
        raise ValueError(f"YOLO input size must be a multiple of {step}, got {height}x{width}")
    anchors = sum((height // int(s)) * (width // int(s)) for s in STRIDES)
    return contract("yolov8", C=n_labels, A=anchors)


for _name, _scale in (("yolo", "n"), ("yolo_s", "s")):
    register(Architecture(
        name=_name, task="detection", build=_build(_scale),
        # uint8 in, x / 255 inside the model: NormalizedModel with mean 0 and std 1.
        wrap=lambda model, spec: NormalizedModel(model, spec.mean, spec.std),
        num_classes=COCO_CLASSES, labels_resource="coco80_classes.txt",
        input_size=(DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE), resize_mode="letterbox",
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), output_layout="yolov8",
        options=dict(DEFAULT_OPTIONS), output_specs=_outputs,
    ))

"""Semantic segmentation: U-Net (Ronneberger et al., 2015) and SegNet (Badrinarayanan
et al., 2017).

Both map an image [N, 3, H, W] to per-pixel class logits [N, C, H, W] of the same size.
H and W must be multiples of 2**depth (U-Net) or 32 (SegNet): each encoder stage halves
them and each decoder stage doubles them back. Both compile with `torch.jit.script` and
export to ONNX (opset 17, `dynamo=False`).

ONNX and SegNet's unpooling: `nn.MaxUnpool2d` does not export to ONNX (torch 2.13's
TorchScript-based exporter has no symbolic for `aten::max_unpool2d`, and tracing fails
in its Python size check). SegNet therefore unpools with `IndexUnpool`, a scatter of the
pooled values to their max-pooling indices, which is exactly what `max_unpool2d` does
(the same values land in the same places; every other output is zero) and exports as
ONNX `ScatterElements`. One definition serves TorchScript and ONNX.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from ...spec import TensorSpec
from . import Architecture, NormalizedModel, contract, register

# PASCAL VOC 2012's 20 classes plus background: the class set U-Net and SegNet
# checkpoints are most often trained on.
VOC_NUM_CLASSES = 21
VOC_LABELS_RESOURCE = "voc_classes.txt"
# VGG16's convolution widths per stage (torchvision's cfg "D").
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def _conv_bn_relu(in_channels: int, out_channels: int, batch_norm: bool = True,
                  conv_bias: bool = False) -> List[nn.Module]:
    """3x3 convolution, padding 1 (the output keeps the input's size), then BN and ReLU.
    A convolution followed by BN needs no bias, but torchvision's VGG-BN keeps one
    (`conv_bias`), and SegNet's encoder must have VGG's parameters."""
    if not batch_norm:
        return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=conv_bias), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


# ------------------------------------------------------------------------- U-Net
class DoubleConv(nn.Sequential):
    """(3x3 conv -> BN -> ReLU) x 2, padded: U-Net's unit at every level."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool = True):
        super().__init__(*_conv_bn_relu(in_channels, out_channels, batch_norm),
                         *_conv_bn_relu(out_channels, out_channels, batch_norm))


class Down(nn.Sequential):
    """2x2 max-pool (halves H and W), then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool = True):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels, batch_norm))


class Up(nn.Module):
    """Double H and W and halve the channels (2x2 transposed conv, or bilinear upsampling
    then a 1x1 conv), concatenate the encoder's skip tensor, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = False, batch_norm: bool = True):
        super().__init__()
        if bilinear:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
                                    nn.Conv2d(in_channels, in_channels // 2, 1))
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
        self.conv = DoubleConv(in_channels // 2 + out_channels, out_channels, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net with padded convolutions, so the logits have the input's size.

    images: float [N, in_channels, H, W], H and W multiples of 2**depth.
    Returns logits float [N, num_classes, H, W].

    Widths double at each of the `depth` encoder levels, starting at `base_width`
    (the paper: depth 4, width 64, transposed-conv upsampling, no batch norm).
    """

    def __init__(self, num_classes: int = VOC_NUM_CLASSES, in_channels: int = 3, depth: int = 4,
                 base_width: int = 64, bilinear: bool = False, batch_norm: bool = True):
        super().__init__()
        if depth < 1 or base_width < 2:
            raise ValueError(f"depth must be >= 1 and base_width >= 2, got depth={depth}, base_width={base_width}")
        self.depth = depth
        widths = [base_width * 2 ** i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0], batch_norm)
        self.downs = nn.ModuleList([Down(widths[i], widths[i + 1], batch_norm) for i in range(depth)])
        self.ups = nn.ModuleList([Up(widths[i + 1], widths[i], bilinear, batch_norm) for i in reversed(range(depth))])
        self.outc = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.inc(images)
        skips: List[torch.Tensor] = []
        for down in self.downs:
            skips.append(x)
            x = down(x)
        for i, up in enumerate(self.ups):
            x = up(x, skips[len(skips) - 1 - i])
        return self.outc(x)


# ------------------------------------------------------------------------ SegNet
class IndexUnpool(nn.Module):
    """`F.max_unpool2d(x, indices, 2, 2)` as a scatter: each pooled value goes back to
    the position its max came from (indices are per [H, W] plane, as
    `MaxPool2d(return_indices=True)` gives them); the rest is zero.

    x, indices: [N, C, h, w]; size: the pre-pooling [H, W]. Returns [N, C, H, W].
    Exports to ONNX (ScatterElements), which `MaxUnpool2d` does not.
    """

    def forward(self, x: torch.Tensor, indices: torch.Tensor, size: List[int]) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        out = x.new_zeros((n, c, size[0] * size[1]))
        out = out.scatter(2, indices.flatten(2), x.flatten(2))
        return out.view(n, c, size[0], size[1])


class EncoderStage(nn.Sequential):
    """VGG16-BN stage: (3x3 conv with bias -> BN -> ReLU) x k, padded."""

    def __init__(self, in_channels: int, widths):
        layers: List[nn.Module] = []
        for width in widths:
            layers += _conv_bn_relu(in_channels, width, conv_bias=True)
            in_channels = width
        super().__init__(*layers)


class SegNet(nn.Module):
    """SegNet: VGG16-BN encoder (13 convs, 5 max-pools that keep their indices) and a
    mirrored decoder that upsamples with those indices.

    images: float [N, 3, H, W], H and W multiples of 32.
    Returns logits float [N, num_classes, H, W].

    The encoder's convolutions and batch norms are torchvision's `vgg16_bn().features`,
    grouped by stage: `encoder.{stage}.{i}` holds what torchvision calls
    `features.{j}`; `vgg16_bn_encoder_state_dict` maps one to the other.
    """

    def __init__(self, num_classes: int = VOC_NUM_CLASSES, in_channels: int = 3):
        super().__init__()
        stages, decoders = [], []
        channels = in_channels
        for widths in VGG16_STAGES:
            stages.append(EncoderStage(channels, widths))
            channels = widths[-1]
        # Decoder stage s mirrors encoder stage s: the same convolutions in reverse, the
        # last one narrowing to the width of the stage above (or to 64 at the top).
        for s, widths in enumerate(VGG16_STAGES):
            outs = list(reversed(widths))[1:] + [VGG16_STAGES[s - 1][-1] if s > 0 else widths[0]]
            layers: List[nn.Module] = []
            c = widths[-1]
            for out in outs:
                layers += _conv_bn_relu(c, out, conv_bias=True)
                c = out
            decoders.append(nn.Sequential(*layers))
        self.encoder = nn.ModuleList(stages)
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = IndexUnpool()
        # Decoders, deepest first (the order they run in).
        self.decoder = nn.ModuleList(list(reversed(decoders)))
        self.classifier = nn.Conv2d(VGG16_STAGES[0][0], num_classes, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        indices: List[torch.Tensor] = []
        sizes: List[List[int]] = []
        for stage in self.encoder:
            x = stage(x)
            sizes.append([x.shape[2], x.shape[3]])
            x, index = self.pool(x)
            indices.append(index)
        for i, stage in enumerate(self.decoder):
            level = len(indices) - 1 - i
            x = stage(self.unpool(x, indices[level], sizes[level]))
        return self.classifier(x)


def vgg16_bn_encoder_state_dict(vgg_state: dict) -> dict:
    """Map a torchvision `vgg16_bn` state_dict's `features.*` onto SegNet's encoder.

    Returns {"encoder.{stage}.{i}.{param}": tensor}: load it with
    ``segnet.load_state_dict(mapped, strict=False)`` (the decoder and classifier stay as
    they are), or use `load_vgg16_bn_encoder`. `classifier.*` (VGG's FC layers) is
    dropped: SegNet has no fully connected layers.
    """
    mapped = {}
    index = 0  # torchvision's features.{index}: conv, bn, relu per conv; one pool per stage
    for stage, widths in enumerate(VGG16_STAGES):
        for k in range(len(widths)):
            for offset, name in ((0, "conv"), (1, "bn")):
                source, target = f"features.{index + offset}.", f"encoder.{stage}.{3 * k + offset}."
                params = [key for key in vgg_state if key.startswith(source)]
                if not params:
                    raise ValueError(f"not a torchvision vgg16_bn state_dict: no {source}* keys ({name} of "
                                     f"stage {stage})")
                for key in params:
                    mapped[target + key[len(source):]] = vgg_state[key]
            index += 3
        index += 1  # the stage's max-pool
    return mapped


def load_vgg16_bn_encoder(model: SegNet, vgg_state: dict) -> None:
    """Load torchvision vgg16_bn weights into `model`'s encoder (all of it, strictly),
    leaving the decoder and classifier untouched."""
    mapped = vgg16_bn_encoder_state_dict(vgg_state)
    expected = {k for k in model.state_dict() if k.startswith("encoder.")}
    missing, unexpected = sorted(expected - mapped.keys()), sorted(mapped.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"vgg16_bn weights do not fit the SegNet encoder: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(mapped, strict=False)


# ------------------------------------------------------------------------ export
def _wrap(model, spec) -> nn.Module:
    """Exported form: uint8 images [N, 3, H, W] RGB -> logits float32 [N, C, H, W]
    (output `logits__0`); the gateway takes the argmax and resizes it to the original
    image."""
    return NormalizedModel(model, spec.mean, spec.std)


# The default U-Net for serving: the paper's depth with half its widths (base 32),
# about a quarter of its compute, so it runs in the CPU default set.
UNET_BASE_WIDTH = 32


def _logits_specs(num_labels: int, height: int, width: int) -> tuple[TensorSpec, ...]:
    """The exported output: per-pixel logits float32 [C, H, W] at the input size (the
    gateway's semantic pipeline reads it as layout `logits_nchw`)."""
    return contract("logits_nchw", C=num_labels, H=height, W=width)


def build_unet(num_classes: int) -> nn.Module:
    return UNet(num_classes=num_classes, depth=4, base_width=UNET_BASE_WIDTH).eval()


def build_segnet(num_classes: int) -> nn.Module:
    return SegNet(num_classes=num_classes).eval()


register(Architecture(
    name="unet", task="semantic_segmentation", build=build_unet, wrap=_wrap,
    num_classes=VOC_NUM_CLASSES, labels_resource=VOC_LABELS_RESOURCE, input_size=(256, 256),
    resize_mode="stretch", output_layout="logits_nchw", output_specs=_logits_specs, classes_key="outc.weight",
))
register(Architecture(
    name="segnet", task="semantic_segmentation", build=build_segnet, wrap=_wrap,
    num_classes=VOC_NUM_CLASSES, labels_resource=VOC_LABELS_RESOURCE, input_size=(256, 256),
    resize_mode="stretch", output_layout="logits_nchw", output_specs=_logits_specs,
    classes_key="classifier.weight",
))

"""Classifiers: AlexNet, VGG, GoogLeNet and ResNet with torchvision's definitions."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from . import Architecture, Normalize, NormalizedModel, register


class GoogLeNetClassifier(nn.Module):
    """GoogLeNet without its auxiliary heads: scripted, torchvision's forward returns a
    namedtuple, so the exported wrapper calls its input transform and trunk directly."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model._transform_input(self.normalize(images))
        return self.model._forward(x)[0]


def _wrap(model, spec) -> nn.Module:
    return NormalizedModel(model, spec.mean, spec.std)


def _torchvision(name: str, **kwargs):
    def build(num_classes: int) -> nn.Module:
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kwargs).eval()
    return build


def _drop_googlenet_aux(model: nn.Module, state: dict) -> dict:
    """torchvision-format GoogLeNet checkpoints carry the auxiliary heads (aux1, aux2),
    which only matter in training: they are dropped at export."""
    return {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}


for _name in ("alexnet", "vgg11", "vgg16", "vgg16_bn", "resnet18", "resnet34", "resnet50", "resnet101"):
    register(Architecture(
        name=_name, task="classification", build=_torchvision(_name), wrap=_wrap,
        num_classes=1000, labels_resource="imagenet_classes.txt", input_size=(224, 224),
        resize_mode="resize_center_crop", resize_size=256,
    ))

# transform_input=True, as in torchvision's published GoogLeNet weights: the model maps
# ImageNet-normalized input to the normalization it was originally trained with.
register(Architecture(
    name="googlenet", task="classification",
    build=_torchvision("googlenet", aux_logits=False, transform_input=True, init_weights=True),
    wrap=lambda model, spec: GoogLeNetClassifier(model, spec.mean, spec.std),
    num_classes=1000, labels_resource="imagenet_classes.txt", input_size=(224, 224),
    resize_mode="resize_center_crop", resize_size=256, adapt_state_dict=_drop_googlenet_aux,
))

"""Classifiers: every classification model of torchvision (`torchvision.models.list_models`
of the classification module: AlexNet, VGG, GoogLeNet, Inception v3, ResNet, ResNeXt,
Wide ResNet, MobileNet v2/v3, EfficientNet v1/v2, RegNet, ConvNeXt, DenseNet,
ShuffleNet, SqueezeNet, MNASNet, ViT, Swin, MaxViT), with torchvision's definitions.

Nothing here is written per model: each architecture is generated from torchvision's
own tables. Its preprocessing (input size, resize size, interpolation, mean and std) is
its weights' preset, `weights.transforms` (a `functools.partial` of torchvision's
`ImageClassification`): an architecture takes the preset of its first published
weights (torchvision's original recipe; a checkpoint of your own is fed the same way),
and `--weights NAME` takes the preset of the weights named.
"""
from __future__ import annotations

import inspect
from functools import partial

import torch
import torchvision
from torch import nn
from torchvision.transforms._presets import ImageClassification

from . import Architecture, NormalizedModel, register, torchvision_published

# The labels file of ImageNet-1k, the categories of every torchvision classifier's
# published weights (checked by the tests against `weights.meta["categories"]`).
IMAGENET_LABELS = "imagenet_classes.txt"


class TwoStageClassifier(NormalizedModel):
    """GoogLeNet or Inception v3 without their auxiliary heads: scripted, torchvision's
    forward returns a namedtuple, so the exported wrapper calls the model's input
    transform and trunk directly (the trunk's first output is the logits)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model._transform_input(self.normalize(images))
        return self.model._forward(x)[0]


def _wrap(model, spec) -> nn.Module:
    return NormalizedModel(model, spec.mean, spec.std)


def _wrap_two_stage(model, spec) -> nn.Module:
    return TwoStageClassifier(model, spec.mean, spec.std)


def _torchvision(name: str, **kwargs):
    def build(num_classes: int) -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs).eval()
    return build


def _drop_keys(*prefixes: str):
    """A state_dict adapter that drops the auxiliary heads, which only matter in
    training: torchvision-format GoogLeNet and Inception v3 checkpoints carry them."""
    def adapt(model: nn.Module, state: dict) -> dict:
        return {k: v for k, v in state.items() if not k.startswith(prefixes)}
    return adapt


# Models whose build or exported form differs from `getattr(torchvision.models, name)`:
# transform_input=True, as in torchvision's published GoogLeNet and Inception v3 weights
# (the model maps ImageNet-normalized input to the normalization it was originally
# trained with); aux_logits=False: the auxiliary heads are training-only.
_TWO_STAGE = {
    "googlenet": ("aux1.", "aux2."),
    "inception_v3": ("AuxLogits.",),
}


def _build_kwargs(name: str, input_size: int) -> dict:
    """Constructor arguments beyond num_classes: the two-stage models' flags, and ViT's
    image size (its position embeddings are sized for one input size, as torchvision's
    builder sets it from the weights' ``min_size``)."""
    if name in _TWO_STAGE:
        return {"aux_logits": False, "transform_input": True, "init_weights": True}
    if name.startswith("vit_"):
        return {"image_size": input_size}
    return {}


def preset(name: str, weights) -> dict:
    """The Architecture fields of torchvision weights `weights` of model `name`: their
    transforms' crop size (the input size), resize size, interpolation, mean and std
    (`ImageClassification`'s defaults where the partial leaves them), and a build for
    that input size."""
    transforms = weights.transforms
    if not (isinstance(transforms, partial) and transforms.func is ImageClassification and not transforms.args):
        raise ValueError(f"{name} weights {weights.name}: transforms {transforms!r} are not an ImageClassification "
                         "preset")
    signature = inspect.signature(ImageClassification.__init__).parameters
    keywords = {key: p.default for key, p in signature.items() if p.default is not inspect.Parameter.empty}
    keywords.update(transforms.keywords)
    crop = int(keywords["crop_size"])
    resize = keywords["resize_size"]
    return {
        "input_size": (crop, crop),
        "resize_size": int(resize[0] if isinstance(resize, (tuple, list)) else resize),
        "interpolation": keywords["interpolation"].value,
        "mean": tuple(float(v) for v in keywords["mean"]),
        "std": tuple(float(v) for v in keywords["std"]),
        "build": _torchvision(name, **_build_kwargs(name, crop)),
    }


def _classifier_weights(name: str) -> list:
    """torchvision's published weights of `name` that are classifiers (they list their
    categories; VGG-16's IMAGENET1K_FEATURES, for feature extraction only, does not)."""
    return [w for w in torchvision.models.get_model_weights(name) if w.meta.get("categories")]


def classifier(name: str) -> Architecture:
    """The architecture of torchvision classifier `name`, with its first published
    weights' preset."""
    first = _classifier_weights(name)[0]
    extra = {}
    if name in _TWO_STAGE:
        extra = {"wrap": _wrap_two_stage, "adapt_state_dict": _drop_keys(*_TWO_STAGE[name])}
    return Architecture(**{
        "name": name, "task": "classification", "wrap": _wrap, "num_classes": len(first.meta["categories"]),
        "labels_resource": IMAGENET_LABELS, "resize_mode": "resize_center_crop",
        "published": torchvision_published(name, preset), **preset(name, first), **extra,
    })


for _name in torchvision.models.list_models(module=torchvision.models):
    register(classifier(_name))

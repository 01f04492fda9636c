"""The model zoo: architecture name -> how to build it and how to feed it.

Importing this package imports torch (and, through the op shim, torchvision). The
gateway never imports it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from .. import tvshim
from ...pipelines import layouts
from ...spec import TensorSpec

tvshim.install()


# The name of an architecture's recommended published weights (torchvision's enum alias).
DEFAULT_WEIGHTS = "DEFAULT"


@dataclass(frozen=True)
class Published:
    """Weights published for an architecture, fetched by name (`export.hub`).

    `name` is the weights' own name (torchvision's enum name, ``IMAGENET1K_V1``, or the
    pix2pix/CycleGAN project's, ``horse2zebra``); `filename` is the file's name in the
    download cache. `labels` are the weights' categories (None: the architecture's);
    `preset` holds the Architecture fields the weights were trained with (input size,
    resize size, interpolation, mean/std, a build for their input size), which the
    export takes instead of the architecture's."""

    architecture: str
    name: str
    url: str
    filename: str
    labels: tuple[str, ...] | None = None
    preset: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Architecture:
    """One servable architecture.

    `build(num_classes)` returns the eager torch model in eval mode with its standard
    (torchvision-format) state_dict keys; `wrap(model, spec)` returns the module that
    is exported: it takes the gateway's input tensors and returns fixed-shape outputs.
    """

    name: str
    task: str
    build: Callable[[int], nn.Module]
    wrap: Callable[[nn.Module, "object"], nn.Module]
    num_classes: int
    labels_resource: str
    input_size: tuple[int, int]  # (height, width)
    resize_mode: str
    resize_size: int = 0
    # The resize filter of resize_center_crop and stretch (`ops.resize.RESAMPLE_FILTERS`).
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = layouts.IMAGENET_MEAN
    std: tuple[float, float, float] = layouts.IMAGENET_STD
    # The output format (`pipelines.layouts`): tensor names and option defaults come from it.
    output_layout: str = "logits"
    options: dict[str, str] = field(default_factory=dict)
    # The exported model's output tensors, given (number of labels, input height, input
    # width). None: the layout's one float32 [C] vector (a classifier).
    output_specs: Callable[[int, int, int], tuple[TensorSpec, ...]] | None = None
    # Fully convolutional models take any input size: the exported image input is
    # [3, -1, -1] and `input_size` is only the size used for parity checks.
    variable_input_size: bool = False
    # Called with (model, state_dict) after a strict load fails, to allow known
    # differences (e.g. GoogLeNet's auxiliary heads); returns the dict to load.
    adapt_state_dict: Callable[[nn.Module, dict], dict] | None = None
    # Spec options that follow the export input size: called with (height, width) of
    # `input_size` (or --input-size), merged over `options` (e.g. a detector's min_size).
    sized_options: Callable[[int, int], dict[str, str]] | None = None
    # The state_dict key whose first dimension is the class count, when it is not the
    # model's last weight (a detector's classification layer is not its last layer).
    classes_key: str | None = None
    # Inputs after the image (e.g. Fast R-CNN's RoIs), given (the entry's options, input
    # height, input width); the exported module takes them after the images, in order.
    extra_inputs: Callable[[dict, int, int], tuple[TensorSpec, ...]] | None = None
    # Example values of those inputs for the export's parity check, given (spec, batch,
    # height, width, torch.Generator); None: uniform random values in [0, 1).
    example_extra_inputs: Callable[..., tuple[torch.Tensor, ...]] | None = None
    # The weights published for it, by name (``DEFAULT`` too, where there is one): what
    # `--weights NAME` can fetch. Called on demand (it may read torchvision's tables).
    published: Callable[[], dict[str, Published]] | None = None

    @property
    def layout(self) -> layouts.Layout:
        return layouts.get(self.output_layout)

    @property
    def input_name(self) -> str:
        """The image input's name, as the layout's contract says."""
        return self.layout.input_name


def torchvision_published(name: str, preset: Callable[[str, object], dict] | None = None
                          ) -> Callable[[], dict[str, Published]]:
    """`Architecture.published` for torchvision model `name`: its weights enum's entries
    that list categories (the others are feature extractors), by enum name, plus
    DEFAULT_WEIGHTS; `preset(name, weights)` gives each one's Architecture fields."""
    def published() -> dict[str, Published]:
        import torchvision

        enum = torchvision.models.get_model_weights(name)
        out = {w.name: Published(architecture=name, name=w.name, url=w.url,
                                 filename=os.path.basename(urlparse(w.url).path),
                                 labels=tuple(w.meta["categories"]),
                                 preset=preset(name, w) if preset is not None else {})
               for w in enum if w.meta.get("categories")}
        if enum.DEFAULT.name in out:
            out[DEFAULT_WEIGHTS] = out[enum.DEFAULT.name]
        return out
    return published


def contract(layout: str, count: int | None = None, **sizes: int) -> tuple[TensorSpec, ...]:
    """A layout's output tensors as TensorSpecs, for the given sizes (see
    `layouts.Layout.concrete`)."""
    return tuple(TensorSpec(t.name, t.dtype, t.dims) for t in layouts.get(layout).concrete(count=count, **sizes))


REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    REGISTRY[arch.name] = arch
    return arch


def get(name: str) -> Architecture:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def read_labels(resource: str) -> list[str]:
    text = resources.files("service").joinpath("data", resource).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


class Normalize(nn.Module):
    """uint8 [N, 3, H, W] RGB -> float ``(x / 255 - mean) / std``: the normalization
    lives inside the exported model, so the gateway ships uint8 (4x fewer bytes)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("scale", torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor([m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * self.scale - self.shift


class NormalizedModel(nn.Module):
    """The exported form of a classifier or a semantic segmenter: uint8 images
    [N, 3, H, W] RGB -> `Normalize` -> the model's own output (logits [N, C] or
    [N, C, H, W])."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))


from . import classification, detection, generation, regions, segmentation, yolo  # noqa: E402,F401  (they register themselves)

"""Classification: resize + center-crop (or stretch), then softmax and top-k."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgument
from ..imaging import Decoded, resize_center_crop, resize_stretch, softmax, top_k
from ..spec import ModelSpec
from .common import Task, Tensors

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class LabelScore:
    index: int
    name: str
    score: float


def preprocess(decoded: Decoded, spec: ModelSpec) -> np.ndarray:
    """uint8 [3, H, W] at the model's input size, as the spec's resize mode says."""
    if spec.resize_mode == "resize_center_crop":
        return resize_center_crop(decoded.image, spec.resize_size, spec.input_width, spec.input_height)
    if spec.resize_mode == "stretch":
        return resize_stretch(decoded.image, spec.input_width, spec.input_height)
    raise InvalidArgument("model", f"classification does not support resize mode {spec.resize_mode!r}")


def resolve_top_k(requested: int | None, spec: ModelSpec) -> int:
    """The request's top_k, or the model's default; 0 is refused, more than the class
    count is clamped to it."""
    if requested is None:
        return int(spec.option("top_k", str(DEFAULT_TOP_K)))
    if requested <= 0:
        raise InvalidArgument("top_k", f"must be at least 1, got {requested}")
    return requested


def label_name(spec: ModelSpec, index: int) -> str:
    return spec.labels[index] if 0 <= index < len(spec.labels) else str(index)


def postprocess(outputs: dict[str, np.ndarray], spec: ModelSpec, k: int) -> list[list[LabelScore]]:
    """Top-k labels per image from the first output, [N, C] logits or probabilities."""
    scores = outputs[spec.outputs[0].name]
    scores = scores.reshape(scores.shape[0], -1)
    if spec.output_layout == "logits":
        scores = softmax(scores)
    results = []
    for row in scores:
        idx, values = top_k(row, k)
        results.append([LabelScore(int(i), label_name(spec, int(i)), float(v)) for i, v in zip(idx, values)])
    return results


class Classification(Task):
    tasks = ("classification",)

    def options(self, request, spec):
        return resolve_top_k(request.get("top_k"), spec)

    def preprocess(self, decoded, spec, options) -> Tensors:
        return {spec.image_input.name: preprocess(decoded, spec)[None]}

    def postprocess(self, outputs, spec, decoded, options):
        return postprocess(outputs, spec, options)[0]


TASK = Classification()

"""Classification: resize + center-crop (or stretch), then softmax and top-k."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FailedPrecondition, InvalidArgument
from ..ops.imaging import top_k
from ..spec import ModelSpec
from . import layouts
from .common import Task, check_layout, label_name, resized_inputs

# The resize modes a classifier's input can have.
RESIZE_MODES = ("resize_center_crop", "stretch")


@dataclass(frozen=True)
class LabelScore:
    index: int
    name: str
    score: float


def resolve_top_k(requested: int | None, spec: ModelSpec) -> int:
    """The request's top_k, or the model's default; 0 is refused, more than the class
    count is clamped to it."""
    if requested is None:
        return spec.settings.top_k
    if requested <= 0:
        raise InvalidArgument("top_k", f"must be at least 1, got {requested}")
    return requested


def postprocess(outputs: dict[str, np.ndarray], spec: ModelSpec, k: int) -> list[list[LabelScore]]:
    """Top-k labels per image from the first output, [N, C] logits or probabilities."""
    scores = layouts.class_scores(outputs, spec.outputs[0].name, spec.output_layout)
    results = []
    for row in scores:
        idx, values = top_k(row, k)
        results.append([LabelScore(int(i), label_name(spec, int(i)), float(v)) for i, v in zip(idx, values)])
    return results


class Classification(Task):
    tasks = ("classification",)

    def options(self, request, spec):
        check_layout(spec, "classification")
        if spec.resize_mode not in RESIZE_MODES:
            raise FailedPrecondition(f"model {spec.name!r}: classification does not support resize mode "
                                     f"{spec.resize_mode!r} ({' or '.join(RESIZE_MODES)})")
        return resolve_top_k(request.get("top_k"), spec)

    def preprocess(self, decoded, spec, options):
        return resized_inputs(decoded, spec)

    def postprocess(self, outputs, context, spec, options):
        return postprocess(outputs, spec, options)[0]


TASK = Classification()

"""What every task pipeline shares: plain request data (no protobuf, no gRPC), the
per-image `Context`, and the `Task` interface the data plane runs.

A task turns one decoded image into the model's input tensors plus a `Context`, and
the model's outputs for that image plus the same `Context` back into a result. The
context goes from `preprocess` to `postprocess` directly, never through Triton. The
data plane does everything in between, the same way for every task: decoding and
preprocessing in threads, grouping items of equal shape into Triton calls of at most
`spec.items_per_call` items (max_batch_size, or 1 for a model whose batch is fixed at
1), running the calls concurrently, and splitting outputs back per image.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import numpy as np

from ..errors import FailedPrecondition, InvalidArgument
from ..ops import resize
from ..ops.imaging import Decoded, decode_encoded, decode_raw, normalize
from ..spec import ModelSpec
from . import layouts


@dataclass(frozen=True)
class ImageInput:
    """One request image: `encoded` bytes, or `raw` uint8 HWC RGB pixels with their size."""

    encoded: bytes | None = None
    raw: bytes | None = None
    height: int = 0
    width: int = 0


def decode_image(image: ImageInput, index: int, max_pixels: int) -> Decoded:
    """Decode request image number `index`; errors name ``images[index]``."""
    if image.encoded is not None:
        return decode_encoded(image.encoded, f"images[{index}].encoded", max_pixels)
    if image.raw is not None:
        return decode_raw(image.raw, image.height, image.width, f"images[{index}].raw", max_pixels)
    raise InvalidArgument(f"images[{index}]", "neither encoded nor raw is set")


# Model inputs or outputs for one request image: tensor name -> array whose first axis
# counts that image's items (1 for most tasks; the regions of an image for R-CNN).
Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class Context:
    """What `postprocess` needs of one image besides the model's outputs: its original
    (EXIF-upright) size, the resize plan that made the model input (None where the
    task has none), and for the region formats the proposals float32 [P, 4] (x1, y1,
    x2, y2, original pixels) that the outputs refer to."""

    width: int
    height: int
    plan: resize.ResizePlan | None = None
    proposals: np.ndarray | None = None


class Task:
    """One task's pure steps. Subclasses set `tasks` (the spec tasks they serve) and
    override the three methods; none of them does I/O."""

    tasks: tuple[str, ...] = ()

    def options(self, request: dict[str, Any], spec: ModelSpec) -> Any:
        """Validate the request's task options against the model (InvalidArgument
        naming the field); the result is passed to `preprocess` and `postprocess`."""
        return request

    def preprocess(self, decoded: Decoded, spec: ModelSpec, options: Any) -> tuple[Tensors, Context]:
        """The model's input tensors for one image, ready to send (`model_inputs`: each
        with the item axis first), and the image's context for `postprocess`."""
        raise NotImplementedError

    def postprocess(self, outputs: Tensors, context: Context, spec: ModelSpec, options: Any) -> Any:
        """One image's result from its outputs (each with the item axis first)."""
        raise NotImplementedError


# ------------------------------------------------------------------ stage timing
# How a pipeline times a step inside its preprocess or postprocess (R-CNN's selective
# search): ``with timed(model, stage):``. Pipelines import nothing from the gateway; the
# data plane installs its metrics timer here (`set_stage_timer`), and without it (unit
# tests, benchmarks) steps are not timed.
_stage_timer: Callable[[str, str], ContextManager] = lambda model, stage: contextlib.nullcontext()


def set_stage_timer(timer: Callable[[str, str], ContextManager]) -> None:
    """Install the timer that `timed` uses: ``timer(model, stage)`` is a context manager."""
    global _stage_timer
    _stage_timer = timer


def timed(model: str, stage: str) -> ContextManager:
    """A context manager timing `stage` of `model` with the installed timer."""
    return _stage_timer(model, stage)


# ----------------------------------------------------------------- shared steps
def model_inputs(spec: ModelSpec, images: np.ndarray, *extra: np.ndarray) -> Tensors:
    """The model's inputs from uint8 images [n, 3, H, W] (RGB) and the inputs after the
    image, in the spec's order: images in the model's channel order, and normalized,
    ``(x / 255 - mean) / std`` in the input's float dtype (float32 or float16), unless
    the model takes uint8 (it normalizes itself); [n, H, W, 3] for NHWC models."""
    image = spec.image_input
    if not spec.normalize_in_model:
        images = normalize(images, spec.mean, spec.std).astype(image.dtype, copy=False)
    if spec.channel_order == "BGR":
        images = images[:, ::-1]
    if spec.input_layout == "NHWC":
        images = images.transpose(0, 2, 3, 1)
    if not images.flags.c_contiguous:
        images = np.ascontiguousarray(images)
    return {image.name: images, **{t.name: a for t, a in zip(spec.inputs[1:], extra)}}


def resize_plan(spec: ModelSpec, width: int, height: int) -> resize.ResizePlan:
    """The resize plan of a width x height image for this model: its resize mode, input
    size and interpolation, and for models that take any size its layout's resize
    options."""
    keywords = {}
    if spec.resize_mode == "none" and spec.layout.resize is not None:
        keywords = spec.layout.resize(spec.settings)
    try:
        return resize.plan(spec.resize_mode, width, height, spec.input_width, spec.input_height,
                           resize_size=spec.resize_size, resample=spec.interpolation, **keywords)
    except resize.ResizeError as exc:
        raise FailedPrecondition(f"model {spec.name!r}: {exc}") from None


def resized_inputs(decoded: Decoded, spec: ModelSpec) -> tuple[Tensors, Context]:
    """The common preprocess: the image through its resize plan (one item), and the
    context that holds the plan."""
    plan = resize_plan(spec, decoded.width, decoded.height)
    return model_inputs(spec, plan.apply(decoded.image)[None]), Context(decoded.width, decoded.height, plan)


def check_layout(spec: ModelSpec, task: str) -> None:
    """FailedPrecondition unless the spec's output layout serves `task`."""
    try:
        layout = spec.layout
    except layouts.LayoutError as exc:
        raise FailedPrecondition(f"model {spec.name!r}: {exc}") from None
    if task not in layout.tasks:
        raise FailedPrecondition(f"model {spec.name!r} has output layout {spec.output_layout!r}; {task} reads "
                                 f"{', '.join(layouts.for_task(task))}")


def label_name(spec: ModelSpec, index: int) -> str:
    """The label of a class index; an index outside the labels is named by its number."""
    return spec.labels[index] if 0 <= index < len(spec.labels) else str(index)


def unit_interval(value: float | None, field: str) -> float | None:
    """A request field in [0, 1] (None: unset); NaN and values outside are refused."""
    if value is None:
        return None
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise InvalidArgument(field, f"must be in [0, 1], got {value}")
    return float(value)

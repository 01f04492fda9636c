"""The layouts registry: one entry per model output format, the only place each is written.

An output layout (``spec.output_layout``) is the contract between an exported model and
the gateway. Its entry here declares, once:

- the **tensor contract**: the names, dtypes and per-item dims (symbolic: ``C`` classes,
  ``A`` anchors, ``K`` candidates, ``M`` mask side, ``R`` RoIs, ``H``/``W``) of the
  outputs, and of the inputs where the format fixes them;
- its **typed options**, with defaults and valid ranges. A spec's options travel as
  strings in ``config.pbtxt``; they are parsed and validated once per spec
  (`ModelSpec.settings`), and a bad one is always reported the same way
  (`BadModelOption`, which names the model, the key and the value);
- its **decoder**, outputs of one image -> `Candidates` (detection formats), class
  scores (classifiers), per-pixel scores (semantic) or pixels (generators);
- the **file check** that ``convserve export --from-file`` runs on a file's outputs.

The zoo, the exporter and the pipelines all read names and defaults from here. Numpy
only: no torch, no gRPC, no spec (`service.spec` imports this module).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..ops.boxes import clip_boxes, decode_deltas, xywh_to_xyxy
from ..ops.imaging import softmax


class BadModelOption(ValueError):
    """A model's spec option (``convserve.option.KEY`` in its config) that does not parse or
    lies outside its range; the message names the key and the value."""


class LayoutError(ValueError):
    """An unknown layout, or a model file whose outputs do not fit a layout."""


# ------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Option:
    """One typed spec option: ``kind`` is int, float, bool or str; a number must lie in
    [low, high] (None: unbounded on that side); a str in ``choices`` when given."""

    key: str
    kind: type
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    doc: str = ""

    def parse(self, text: str) -> Any:
        """The option's value from its config string; raises BadModelOption."""
        text = str(text).strip()
        try:
            if self.kind is bool:
                lowered = text.lower()
                if lowered not in _BOOLEANS:
                    raise ValueError
                value = _BOOLEANS[lowered]
            elif self.kind is int:
                value = int(text)
            elif self.kind is float:
                value = float(text)
                if not math.isfinite(value):
                    raise ValueError
            else:
                value = text
        except ValueError:
            raise BadModelOption(f"option {self.key}={text!r} is not {_KIND_NAMES[self.kind]}") from None
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        if self.choices and value not in self.choices:
            raise BadModelOption(f"option {self.key}={value!r} must be one of {', '.join(self.choices)}")
        if self.kind in (int, float):
            if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
                lo = "-inf" if self.low is None else _number(self.low)
                hi = "inf" if self.high is None else _number(self.high)
                raise BadModelOption(f"option {self.key}={value!r} is outside [{lo}, {hi}]")

    def text(self, value: Any) -> str:
        """The config string of a value (the inverse of `parse`)."""
        return ("true" if value else "false") if self.kind is bool else str(value)


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
             "off": False, "": False}
_KIND_NAMES = {int: "an integer", float: "a finite number", bool: "a boolean", str: "text"}


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


class Settings(Mapping):
    """A spec's parsed options: every option of its layout (the spec's value, else the
    default) as an attribute, ``settings.score_threshold``. Options the layout does not
    declare are not served from: they stay in ``spec.options`` as written."""

    def __init__(self, values: dict[str, Any]):
        self._values = dict(values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["_values"][key]
        except KeyError:
            raise AttributeError(key) from None

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"


# ----------------------------------------------------------------- tensor contracts
@dataclass(frozen=True)
class Tensor:
    """A tensor of the contract: ``name`` (None where the format leaves it to the model
    file), numpy dtype, per-item dims with symbols for sizes the model chooses."""

    name: str | None
    dtype: np.dtype
    dims: tuple[int | str, ...]


def _evaluate(dim: int | str, sizes: dict[str, int]) -> int:
    """A symbolic dim ("4+C", "4(C+1)", "K") for the given sizes; -1 stays variable."""
    if isinstance(dim, int):
        return dim
    expression = re.sub(r"(\d)\(", r"\1*(", dim)
    names = set(re.findall(r"[A-Za-z]+", expression))
    missing = names - set(sizes)
    if missing:
        raise LayoutError(f"dim {dim!r} needs the sizes {sorted(missing)}")
    return int(eval(expression, {"__builtins__": {}}, dict(sizes)))  # our own registry's arithmetic only


def _f32(name, *dims) -> Tensor:
    return Tensor(name, np.dtype(np.float32), tuple(dims))


# --------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Candidates:
    """One image's decoded detection candidates, before selection.

    ``boxes`` float32 [K, 4] (x1, y1, x2, y2) in model-input pixels when ``space`` is
    ``"input"``, in original-image pixels (already clipped) when ``"original"``;
    ``scores`` float32 [K]; ``labels`` int64 [K] (the model's class indices);
    ``masks`` float32 [K, M, M] mask probabilities of each candidate's own class, or
    None for formats without masks."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None = None
    space: str = "input"

    def take(self, rows: np.ndarray) -> "Candidates":
        return Candidates(self.boxes[rows], self.scores[rows], self.labels[rows],
                          None if self.masks is None else self.masks[rows], self.space)


def _best_class(class_scores: np.ndarray, axis: int, score_threshold: float | None):
    """The rows (along `axis` of [C, A] or [A, C] scores) whose best score is above the
    threshold (all rows when None), with that score and its class (the first on ties).
    The max is taken over every row; the slower argmax only over the rows kept."""
    best = class_scores.max(axis=axis)
    rows = np.flatnonzero(best > score_threshold) if score_threshold is not None else np.arange(len(best))
    labels = np.take(class_scores, rows, axis=1 - axis).argmax(axis=axis)
    return rows, best[rows].astype(np.float32, copy=False), labels.astype(np.int64)


# --------------------------------------------------------------------- the entries
@dataclass(frozen=True)
class Layout:
    """One output format. ``tasks`` are the spec tasks it serves; ``inputs`` and
    ``outputs`` its tensor contract (inputs: only those the format names); ``options``
    its typed options; ``file_check`` the `--from-file` validator (None: files of this
    format cannot be imported): ``check(outputs, labels, size, batch, source)`` takes
    the file's [(name, array)] outputs on a sample of `batch` images of `size`
    (height, width) and returns `FileOutputs`, or raises LayoutError naming `source`."""

    name: str
    tasks: tuple[str, ...]
    outputs: tuple[Tensor, ...]
    options: tuple[Option, ...] = ()
    inputs: tuple[Tensor, ...] = ()
    file_check: Callable[..., "FileOutputs"] | None = None
    # How the parsed options feed the resize plan (`ops.resize.plan` keywords) for
    # models that take any input size (resize mode none).
    resize: Callable[[Settings], dict] | None = None
    doc: str = ""
    # Extra per-layout constants (e.g. a generator's denormalization), read by decoders.
    constants: dict[str, Any] = field(default_factory=dict)
    # The model itself selects its outputs (its own top-k and NMS rank and cut): ONNX's
    # TopK and NonMaxSuppression break ties in their own order, so an ONNX companion
    # could keep other rows than eager, not only other last bits. The embedded CPU
    # profile keeps TorchScript (eager's own ops) for these. Dense outputs (logits, raw
    # predictions, maps) only move by rounding.
    selects_in_model: bool = False

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs if t.name is not None)

    @property
    def input_name(self) -> str:
        """The image input's name (the first input)."""
        return self.inputs[0].name if self.inputs else IMAGE_INPUT

    def concrete(self, *, inputs: bool = False, count: int | None = None, **sizes: int) -> tuple[Tensor, ...]:
        """The contract's outputs (or inputs) with their symbolic dims evaluated for
        `sizes` (e.g. ``C=80, A=8400``); `count` keeps only the first tensors (e.g. the
        rcnn_candidates outputs without ``masks__4``)."""
        tensors = self.inputs if inputs else self.outputs
        return tuple(Tensor(t.name, t.dtype, tuple(_evaluate(d, sizes) for d in t.dims))
                     for t in tensors[:count])

    def option(self, key: str) -> Option:
        for o in self.options:
            if o.key == key:
                return o
        raise KeyError(f"layout {self.name!r} has no option {key!r}")

    def default(self, key: str) -> Any:
        return self.option(key).default

    def parse_options(self, options: Mapping[str, str]) -> Settings:
        """Typed options from a spec's string options; raises BadModelOption."""
        declared = {o.key: o for o in self.options}
        values = {key: o.default for key, o in declared.items()}
        for key, text in options.items():
            if key in declared:
                values[key] = declared[key].parse(text)
        return Settings(values)

    def option_strings(self, *keys: str, **overrides: Any) -> dict[str, str]:
        """Spec options for an export: `keys` at their defaults, then `overrides`
        (checked against their ranges), all as config strings."""
        out = {key: self.option(key).text(self.default(key)) for key in keys}
        for key, value in overrides.items():
            o = self.option(key)
            o.check(value)
            out[key] = o.text(value)
        return out


# Tensor names shared by several formats. Names carry their position (``__0``,
# ``__1``): Triton's libtorch backend maps TorchScript inputs and outputs by it.
IMAGE_INPUT = "images__0"

# Detection options: the API's request fields with each format's defaults.
MAX_DETECTIONS_CAP = 1000  # keeps responses bounded whatever a client asks


def _detect_options(score: float, iou: float, max_det: int) -> tuple[Option, ...]:
    return (
        Option("score_threshold", float, score, 0.0, 1.0, doc="keep candidates scoring above this"),
        Option("iou_threshold", float, iou, 0.0, 1.0, doc="NMS: IoU above this suppresses"),
        Option("max_detections", int, max_det, 1, MAX_DETECTIONS_CAP, doc="answers per image"),
        Option("class_agnostic", bool, False, doc="one NMS over all classes instead of per class"),
    )


# torchvision's RoIHeads defaults (box_score_thresh, box_nms_thresh, detections_per_img).
TORCHVISION_DETECT = _detect_options(0.05, 0.5, 100)
# Ultralytics' predict defaults (conf, iou, max_det).
ULTRALYTICS_DETECT = _detect_options(0.25, 0.7, 300)
# Selective search, for the region formats (`ops.proposals`).
PROPOSAL_OPTIONS = (
    Option("proposals", int, 200, 1, None, doc="selective search proposals kept per image"),
    Option("proposal_side", int, 500, 16, None, doc="the search runs on the image at this longer side (px)"),
    Option("proposal_min_size", int, 8, 0, None, doc="smallest proposal side kept (original px)"),
)
# Classifier outputs.
TOP_K = Option("top_k", int, 5, 1, None, doc="labels returned when the request leaves top_k unset")
# Models that resize themselves (resize mode none): the gateway only bounds the bytes.
MAX_INPUT_SIDE = Option("max_input_side", int, 0, 0, None,
                        doc="downscale images whose longer side exceeds this before sending (0: never)")


def _images(batch: int) -> str:
    return "1 image" if batch == 1 else f"{batch} images"


def _classifier_check(outputs, labels, size, batch, source) -> "FileOutputs":
    name, out = outputs[0]
    if out.shape != (batch, len(labels)):
        raise LayoutError(f"{source} outputs shape {list(out.shape)} for {_images(batch)}; "
                          f"{len(labels)} labels need [{batch}, {len(labels)}]")
    if size[0] != size[1]:
        # torchvision's preset is square; a non-square input is stretched to, as
        # Keras' image_dataset_from_directory (crop_to_aspect_ratio=False) does.
        return FileOutputs((Tensor(name, np.dtype(np.float32), (len(labels),)),), "stretch")
    return FileOutputs((Tensor(name, np.dtype(np.float32), (len(labels),)),), "resize_center_crop",
                       round(size[0] * RESIZE_RATIO))


# torchvision's classification preset: Resize(256) then CenterCrop(224).
RESIZE_RATIO = 256 / 224


def _yolo_check(layout: str):
    extra = 4 if layout == "yolov8" else 5

    def check(outputs, labels, size, batch, source) -> "FileOutputs":
        name, out = outputs[0]
        c = len(labels)
        if out.ndim != 3 or out.shape[0] != batch:
            shape = f"[{batch}, 4 + C, A]" if layout == "yolov8" else f"[{batch}, A, 5 + C]"
            raise LayoutError(f"{source} outputs shape {list(out.shape)} for {_images(batch)}; "
                              f"layout {layout} needs {shape}")
        rows = out.shape[1] if layout == "yolov8" else out.shape[2]
        if rows != extra + c:
            raise LayoutError(f"{source} outputs shape {list(out.shape)}: layout {layout} with {c} labels needs "
                              f"{extra} + {c} = {extra + c} values per box, the file has {rows}")
        # Ultralytics' conventions: inputs x / 255 (mean 0, std 1), letterbox.
        return FileOutputs((Tensor(name, np.dtype(np.float32), tuple(int(d) for d in out.shape[1:])),),
                           "letterbox", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                           options=LAYOUTS[layout].option_strings("score_threshold", "iou_threshold",
                                                                  "max_detections"))
    return check


def _semantic_check(outputs, labels, size, batch, source) -> "FileOutputs":
    name, out = outputs[0]
    want = (batch, len(labels), *size)
    if out.shape != want:
        raise LayoutError(f"{source} outputs shape {list(out.shape)} for {_images(batch)} of {size[1]}x{size[0]}; "
                          f"semantic segmentation with {len(labels)} labels needs {list(want)}")
    return FileOutputs((Tensor(name, np.dtype(np.float32), want[1:]),), "stretch")


def _generator_check(outputs, labels, size, batch, source) -> "FileOutputs":
    name, out = outputs[0]
    if out.shape != (batch, 3, *size):
        raise LayoutError(f"{source} outputs shape {list(out.shape)} for {_images(batch)} of {size[1]}x{size[0]}; "
                          f"a generator needs [{batch}, 3, {size[0]}, {size[1]}] (the input's size)")
    return FileOutputs((Tensor(name, np.dtype(np.float32), (3, *size)),), "stretch",
                       mean=GAN_MEAN, std=GAN_STD)


def _candidates_check(outputs, labels, size, batch, source) -> "FileOutputs":
    contract = LAYOUTS["rcnn_candidates"].outputs
    by_name = dict(outputs)
    if all(t.name in by_name for t in contract):
        arrays = [by_name[t.name] for t in contract]
    elif len(outputs) == len(contract) and all(name.startswith("output__") for name, _ in outputs):
        arrays = [out for _, out in outputs]  # TorchScript: positional
    else:
        raise LayoutError(f"{source} has outputs {[n for n, _ in outputs]}; instance_segmentation files must "
                          f"return {', '.join(t.name for t in contract)} (the rcnn_candidates contract)")
    k = arrays[0].shape[1] if arrays[0].ndim == 3 else -1
    m = arrays[4].shape[-1] if arrays[4].ndim == 4 else -1
    specs = []
    for t, out in zip(contract, arrays):
        want = tuple(k if d == "K" else m if d == "M" else d for d in t.dims)
        if out.dtype != t.dtype or out.shape != (1, *want) or k < 1 or m < 1:
            raise LayoutError(f"{source}: output {t.name} is {out.dtype} {list(out.shape)} for one image; the "
                              f"rcnn_candidates contract needs {t.dtype} [1, {', '.join(map(str, t.dims))}]")
        specs.append(Tensor(t.name, t.dtype, want))
    count = int(arrays[3].reshape(-1)[0])
    valid_labels = arrays[2][0, :max(count, 0)]
    if not 0 <= count <= k or (valid_labels.size and not 0 <= valid_labels.min() <= valid_labels.max() < len(labels)):
        raise LayoutError(f"{source}: count {count} must lie in [0, {k}] and labels in [0, {len(labels)}) "
                          f"({len(labels)} labels in the labels file)")
    options = LAYOUTS["rcnn_candidates"].option_strings("score_threshold", "iou_threshold", "max_detections",
                                                         max_candidates=k)
    return FileOutputs(tuple(specs), "none", options=options)


@dataclass(frozen=True)
class FileOutputs:
    """What a layout's file check makes of a model file's outputs on the sample batch:
    the output tensors and the spec fields that follow from them (None: the task's)."""

    outputs: tuple[Tensor, ...]
    resize_mode: str
    resize_size: int = 0
    options: dict | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


# pix2pix / CycleGAN: trained on [-1, 1] inputs.
GAN_MEAN, GAN_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
# ImageNet statistics (torchvision's classification and detection presets).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_GENERATOR_OPTIONS = (
    Option("size_multiple", int, 4, 1, None, doc="inputs are padded to a multiple of this (resize mode none)"),
    Option("min_side", int, 1, 1, None, doc="inputs are padded to at least this side (resize mode none)"),
    Option("max_side", int, 0, 0, None, doc="larger inputs are downscaled to this longer side (0: never)"),
    Option("batch_norm", str, "running", choices=("running", "per_image"),
           doc="pix2pix: batch statistics of each image (the official test script) or the running ones"),
)



def _generator_resize(s: Settings) -> dict:
    return {"max_side": s.max_side, "multiple": s.size_multiple, "min_side": s.min_side}


_REGION_OUTPUTS = (_f32("class_logits__0", "C+1"), _f32("box_deltas__1", "4(C+1)"))
_RCNN_CANDIDATE_OUTPUTS = (
    _f32("boxes__0", "K", 4), _f32("scores__1", "K"),
    Tensor("labels__2", np.dtype(np.int64), ("K",)), Tensor("count__3", np.dtype(np.int32), (1,)),
    _f32("masks__4", "K", "M", "M"),
)

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("logits", ("classification",), (_f32("logits__0", "C"),), (TOP_K,), file_check=_classifier_check,
           doc="class logits [C]; softmax gives the scores"),
    Layout("probabilities", ("classification",), (_f32("logits__0", "C"),), (TOP_K,),
           file_check=_classifier_check, doc="class probabilities [C], used as they are"),
    Layout("yolov8", ("detection",), (_f32("predictions__0", "4+C", "A"),), ULTRALYTICS_DETECT,
           file_check=_yolo_check("yolov8"),
           doc="Ultralytics' export: cx, cy, w, h (input pixels) then C class scores per anchor"),
    Layout("yolov5", ("detection",), (_f32("predictions__0", "A", "5+C"),), ULTRALYTICS_DETECT,
           file_check=_yolo_check("yolov5"),
           doc="cx, cy, w, h, objectness, C class scores per anchor; score = objectness x class"),
    Layout("rcnn_candidates", ("detection", "instance_segmentation"), _RCNN_CANDIDATE_OUTPUTS,
           TORCHVISION_DETECT + (
               MAX_INPUT_SIDE,
               Option("max_candidates", int, 1000, 1, None, doc="K: candidates the model returns per image"),
               Option("min_size", int, 800, 1, None, doc="the model's own resize: shorter side"),
               Option("max_size", int, 1333, 1, None, doc="the model's own resize: longer side at most"),
           ),
           file_check=_candidates_check, resize=lambda s: {"max_side": s.max_input_side}, selects_in_model=True,
           doc="Faster/Mask R-CNN per-class candidates before the final NMS, best first; count__3 valid rows; "
               "masks__4 only for instance segmentation"),
    Layout("rcnn_regions", ("detection",), _REGION_OUTPUTS,
           TORCHVISION_DETECT + PROPOSAL_OPTIONS + (
               Option("context_padding", int, 16, 0, None, doc="R-CNN's context pixels around each warped region"),),
           inputs=(Tensor("regions__0", np.dtype(np.uint8), (3, "S", "S")),),
           doc="R-CNN: logits and box deltas per warped selective search proposal"),
    Layout("fast_rcnn", ("detection",), tuple(Tensor(t.name, t.dtype, ("R", *t.dims)) for t in _REGION_OUTPUTS),
           TORCHVISION_DETECT + PROPOSAL_OPTIONS + (
               Option("min_side", int, 600, 1, None, doc="the image's shorter side at the model"),
               Option("max_side", int, 1000, 1, None, doc="the image's longer side at most"),
           ),
           inputs=(Tensor(IMAGE_INPUT, np.dtype(np.uint8), (3, "H", "W")),
                   Tensor("rois__1", np.dtype(np.float32), ("R", 4))),
           # The Fast R-CNN paper's single scale, resized as torchvision's transform rule.
           resize=lambda s: {"shorter_side": s.min_side, "max_side": s.max_side, "interpolation": "cv2"},
           doc="Fast R-CNN: logits and deltas per RoI (selective search proposals, padded to R)"),
    Layout("logits_nchw", ("semantic_segmentation",), (_f32("logits__0", "C", "H", "W"),),
           file_check=_semantic_check, doc="per-pixel class scores at the input's size"),
    Layout("image_nchw_tanh", ("generation",), (_f32("generated__0", 3, "H", "W"),), _GENERATOR_OPTIONS,
           file_check=_generator_check, constants={"scale": 127.5, "shift": 127.5}, resize=_generator_resize,
           doc="an image in [-1, 1]; pixel = round((y + 1) * 127.5)"),
    Layout("image_nchw_01", ("generation",), (_f32("generated__0", 3, "H", "W"),), _GENERATOR_OPTIONS,
           file_check=_generator_check, constants={"scale": 255.0, "shift": 0.0}, resize=_generator_resize,
           doc="an image in [0, 1]; pixel = round(y * 255)"),
)}


def get(name: str) -> Layout:
    """The registry entry of an output layout; raises LayoutError for an unknown one."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise LayoutError(f"unknown output layout {name!r} (known: {', '.join(LAYOUTS)})") from None


def for_task(task: str) -> tuple[str, ...]:
    """The layouts a spec task can have."""
    return tuple(name for name, layout in LAYOUTS.items() if task in layout.tasks)


# ----------------------------------------------------------------------- decoders
def class_scores(outputs: Mapping[str, np.ndarray], output_name: str, layout: str) -> np.ndarray:
    """Classifier scores float32 [N, C] from the first output: softmax of ``logits``,
    ``probabilities`` as they are."""
    scores = outputs[output_name]
    scores = scores.reshape(scores.shape[0], -1)
    return softmax(scores) if layout == "logits" else scores


def decode_candidates(outputs: Mapping[str, np.ndarray], layout: str, output_names: tuple[str, ...],
                      score_threshold: float | None = None) -> Candidates:
    """One image's outputs (item axis first, one item) -> its candidates in model-input
    pixels (``yolov8``, ``yolov5``, ``rcnn_candidates``; the region formats decode with
    `decode_regions`).

    With `score_threshold`, only candidates scoring above it are decoded (the score step
    done early: a YOLO output has thousands of anchors and few candidates)."""
    if layout == "yolov8":
        pred = outputs[output_names[0]][0]       # [4 + C, A]
        rows, scores, labels = _best_class(pred[4:], 0, score_threshold)
        return Candidates(xywh_to_xyxy(pred[:4, rows].T), scores, labels)
    if layout == "yolov5":
        pred = outputs[output_names[0]][0]       # [A, 5 + C]
        rows, scores, labels = _best_class(pred[:, 5:] * pred[:, 4:5], 1, score_threshold)
        return Candidates(xywh_to_xyxy(pred[rows, :4]), scores, labels)
    if layout == "rcnn_candidates":
        boxes_t, scores_t, labels_t, count_t, masks_t = (t.name for t in LAYOUTS[layout].outputs)
        boxes = np.asarray(outputs[boxes_t][0], dtype=np.float32).reshape(-1, 4)
        count = min(max(int(np.asarray(outputs[count_t]).reshape(-1)[0]), 0), boxes.shape[0])
        scores = np.asarray(outputs[scores_t][0], dtype=np.float32)[:count]
        rows = np.flatnonzero(scores > score_threshold) if score_threshold is not None else np.arange(count)
        masks = outputs.get(masks_t)
        return Candidates(boxes[rows], scores[rows], np.asarray(outputs[labels_t][0]).astype(np.int64)[rows],
                          None if masks is None else np.asarray(masks[0][rows], dtype=np.float32))
    raise LayoutError(f"{layout!r} is not a candidate layout (yolov8, yolov5, rcnn_candidates)")


# torchvision's RoIHeads drops boxes narrower/shorter than this after clipping.
MIN_BOX_SIZE = 1e-2


def decode_regions(logits: np.ndarray, deltas: np.ndarray, proposals: np.ndarray, width: int,
                   height: int) -> Candidates:
    """Region formats (``rcnn_regions``, ``fast_rcnn``): per-proposal logits [P, C+1]
    and deltas [P, 4 (C+1)] relative to `proposals` float32 [P, 4] (original pixels),
    for an image of width x height -> one candidate per (proposal, class), background
    dropped, in original pixels: softmax, deltas decoded as torchvision's BoxCoder,
    clipped to the image, tiny boxes dropped (torchvision's RoIHeads order)."""
    logits = np.asarray(logits, np.float32).reshape(len(proposals), -1)
    classes = logits.shape[1]
    scores = softmax(logits)
    boxes = clip_boxes(decode_deltas(deltas, proposals).reshape(-1, 4), width, height).reshape(-1, classes, 4)
    # Drop the background column and flatten: (proposal, class) pairs, labels 1..C.
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = scores[:, 1:].reshape(-1)
    labels = np.tile(np.arange(1, classes, dtype=np.int64), len(proposals))
    big = np.flatnonzero(((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIZE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIZE))
    return Candidates(boxes[big], scores[big].astype(np.float32, copy=False), labels[big], space="original")


def to_pixels(output: np.ndarray, layout: str) -> np.ndarray:
    """Generator formats: float [3, H, W] model output -> uint8 [H, W, 3] pixels
    (``pixel = y * scale + shift``, rounded, clipped)."""
    constants = get(layout).constants
    pixels = np.rint(output.astype(np.float32) * constants["scale"] + constants["shift"])
    return np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0)

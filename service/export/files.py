"""Bring your own file: an already exported TorchScript or ONNX model put into the
repository, its outputs checked by its layout's registry entry (`pipelines.layouts`).

What the file says about itself (`origins`: its input's shape and dtype, Ultralytics'
metadata) fills in what flags leave out; a flag always wins, and the spec records where
each value came from (``convserve.source.<key>`` = the flag, ``file-shape``,
``file-metadata``, ``layout`` or ``default``)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..pipelines import layouts
from ..spec import ModelSpec, TensorSpec
from . import ExportError
from .checkpoints import read_labels_file
from .formats import _as_tuple
from .origins import (ULTRALYTICS_CLASSIFY_CROP_FRACTION, ULTRALYTICS_MEAN, ULTRALYTICS_STD, ULTRALYTICS_TASKS,
                      FileFacts, read_facts, ultralytics_metadata)
from .repository import DEFAULT_MAX_BATCH_SIZE, ExportResult, write_entry


# --task -> the layout a file of that task has unless --layout says otherwise. Each
# layout's file check (its registry entry) validates the file's outputs.
FILE_LAYOUTS = {"classification": "logits", "detection": "yolov8", "semantic_segmentation": "logits_nchw",
                "instance_segmentation": "rcnn_candidates", "generation": "image_nchw_tanh"}
# Tasks whose models have no classes: --labels is optional for them.
UNLABELLED_TASKS = ("generation",)
# Tasks whose files take uint8 RGB images [N, 3, H, W] of any size and resize and
# normalize them themselves (one image is sent per call); the others take float
# images of a fixed size, NCHW or NHWC, normalized with --mean/--std.
RAW_IMAGE_TASKS = ("instance_segmentation",)
# Files of other frameworks, and how each becomes an ONNX file that --from-file takes
# (tf2onnx for Keras and TensorFlow, as the README's Keras row).
CONVERT_FIRST = {
    ".h5": "tf2onnx.convert.from_keras(keras.models.load_model('MODEL.h5'), output_path='model.onnx')",
    ".keras": "tf2onnx.convert.from_keras(keras.models.load_model('MODEL.keras'), output_path='model.onnx')",
    ".pb": "python -m tf2onnx.convert --saved-model SAVED_MODEL_DIR --output model.onnx",
    ".tflite": "python -m tf2onnx.convert --tflite MODEL.tflite --output model.onnx",
}
FILE_FORMATS = {".pt": "torchscript", ".pth": "torchscript", ".torchscript": "torchscript", ".onnx": "onnx"}
# Images in a sample batch when the file's batch is dynamic: more than one, so that a
# file which mixes up its batch axis fails the check.
SAMPLE_BATCH = 2


def file_layout(task: str, layout: str | None) -> layouts.Layout:
    """The registry entry for a file of `task` with `--layout` (None: the task's default)."""
    allowed = [name for name in layouts.for_task(task) if layouts.LAYOUTS[name].file_check is not None]
    name = layout or FILE_LAYOUTS[task]
    if name not in allowed:
        raise ExportError(f"--layout for {task} is {' or '.join(allowed)}, got {layout!r}")
    return layouts.LAYOUTS[name]


def _run_file(source: Path, fmt: str, sample: np.ndarray, image_layout: str
              ) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """Run the file on the sample batch: (input name, [(output name, array), ...])."""
    shape = f"{list(sample.shape)} {sample.dtype} ({image_layout})"
    if fmt == "torchscript":
        try:
            module = torch.jit.load(str(source), map_location="cpu").eval()
            with torch.inference_mode():
                got = _as_tuple(module(torch.from_numpy(sample)))
        except Exception as exc:
            raise ExportError(f"{source.name} does not run as TorchScript on {shape} input: {exc}") from exc
        return "input__0", [(f"output__{i}", t.numpy()) for i, t in enumerate(got)]
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
        in_name = session.get_inputs()[0].name
        names = [o.name for o in session.get_outputs()]
        got = session.run(names, {in_name: sample})
    except Exception as exc:
        raise ExportError(f"{source.name} does not run in ONNX Runtime on {shape} input: {exc}") from exc
    return in_name, list(zip(names, got))


def export_from_file(
    source: Path,
    repo: Path,
    *,
    task: str | None = None,
    name: str | None = None,
    input_size: int | tuple[int, int] | None = None,
    labels_file: Path | None = None,
    layout: str | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    resize_mode: str | None = None,
    input_layout: str | None = None,
    channel_order: str | None = None,
    version: int = 1,
    version_policy: str = "latest",
    max_batch_size: int | None = None,
    max_queue_size: int = 0,
    instances: int = 1,
) -> ExportResult:
    """Put an already exported model (TorchScript ``.pt`` or ``.onnx``) into the
    repository as entry `name` (default: the file's stem).

    Every argument left None is read from the file where it says (`origins`): the
    task, layout and labels from Ultralytics' metadata; the input layout (NCHW or
    NHWC), size, dtype (float32 or float16) and a batch fixed at 1 from an ONNX input's
    shape; Ultralytics' preprocessing for its files (letterbox for detect, resize and
    centre crop for classify, x / 255). The rest falls back to the layout's file check
    and ImageNet's mean/std. The file must run on a sample batch, and its outputs must
    fit the task and layout."""
    source = Path(source)
    if not source.is_file():
        raise ExportError(f"model file {source} does not exist")
    fmt = FILE_FORMATS.get(source.suffix)
    if fmt is None:
        how = CONVERT_FIRST.get(source.suffix.lower())
        raise ExportError(f"--from-file takes a TorchScript .pt or an .onnx file, got {source.name}"
                          + (f"; convert it to ONNX first: {how}" if how else ""))
    facts = read_facts(source, fmt)
    meta = ultralytics_metadata(facts.metadata, source.name)
    sources: dict[str, str] = {}

    # Task and layout: flags, else Ultralytics' task.
    origin = ULTRALYTICS_TASKS.get(meta.task) if meta.task else None
    sources["task"] = "--task" if task is not None else "file-metadata"
    if task is None:
        if meta.task is not None and origin is None:
            raise ExportError(f"{source.name} is an Ultralytics {meta.task!r} export; convserve serves Ultralytics "
                              f"{' and '.join(ULTRALYTICS_TASKS)} files as they come (pass --task and --layout "
                              "to serve its outputs as another layout)")
        if origin is None:
            raise ExportError(f"--from-file needs --task: {source.name} names no task in its metadata")
        task = origin[0]
    if task not in FILE_LAYOUTS:
        raise ExportError(f"--from-file supports --task {', '.join(FILE_LAYOUTS)}; got {task!r}")
    # An Ultralytics file served as its own task keeps Ultralytics' conventions.
    ultralytics = origin is not None and origin[0] == task
    entry = file_layout(task, layout or (origin[1] if ultralytics else None))
    sources["output_layout"] = "--layout" if layout else "file-metadata" if ultralytics else "default"

    # Labels: --labels, else the file's class names.
    if labels_file is not None:
        labels, sources["labels"] = read_labels_file(labels_file), "--labels"
    elif meta.labels is not None:
        labels, sources["labels"] = list(meta.labels), "file-metadata"
    elif task in UNLABELLED_TASKS:
        labels = []
    else:
        raise ExportError(f"--from-file --task {task} needs --labels ({source.name} names no classes in its metadata)")

    if task in RAW_IMAGE_TASKS:
        return _export_raw_image_file(source, repo, fmt, entry, task=task, name=name, input_size=input_size,
                                      labels=labels, sources=sources, version=version,
                                      version_policy=version_policy, max_queue_size=max_queue_size,
                                      instances=instances, external_data=facts.external_data)

    # The image input: layout, size, dtype and batch, from flags and the file's shape.
    image_layout, sources["input_layout"] = _input_layout(facts, input_layout, source.name)
    size, sources["input_size"] = _input_size(facts, image_layout, input_size, meta, source.name)
    fixed_batch, max_batch_size, sources["batch"] = _batching(facts, max_batch_size, source.name)
    dtype = facts.input_dtype or np.dtype(np.float32)
    if dtype == np.uint8:
        raise ExportError(f"{source.name}: input {facts.input_name!r} is uint8; files of task {task} take float "
                          "images (float32 or float16) that the gateway normalizes")
    batch = 1 if fixed_batch else SAMPLE_BATCH
    sample_shape = (batch, 3, *size) if image_layout == "NCHW" else (batch, *size, 3)
    sample = np.random.default_rng(0).normal(size=sample_shape).astype(dtype)
    try:
        in_name, outputs = _run_file(source, fmt, sample, image_layout)
    except ExportError:
        if sources["input_layout"] == "default":  # nothing said NCHW: was it NHWC?
            _refuse_if_nhwc(source, fmt, sample)
        raise
    try:
        described = entry.file_check(outputs, labels, size, batch, source.name)
    except layouts.LayoutError as exc:
        raise ExportError(str(exc)) from None
    # Half-precision files answer in float16: the config declares what the file returns.
    returned = {out_name: array.dtype for out_name, array in outputs}

    # Preprocessing: flags, else Ultralytics' conventions, else the layout's.
    ultralytics_classify = ultralytics and task == "classification"
    if resize_mode:
        mode, sources["resize_mode"] = resize_mode, "--resize-mode"
    elif ultralytics_classify:
        # classify_transforms: Resize(shorter side) + CenterCrop for a square imgsz; a
        # (height, width) imgsz is resized to exactly that.
        mode, sources["resize_mode"] = ("resize_center_crop" if size[0] == size[1] else "stretch"), "file-metadata"
    else:
        mode, sources["resize_mode"] = described.resize_mode, "file-metadata" if ultralytics else "layout"
    resize_size = 0
    if mode == "resize_center_crop":
        # The shorter side before the crop: Ultralytics' imgsz / crop_fraction, else the
        # layout's ratio; at least the longer input side, so that the crop fits.
        resize_size = (round(max(size) / ULTRALYTICS_CLASSIFY_CROP_FRACTION) if ultralytics_classify
                       else max(described.resize_size, *size))
    normalization = {}
    for key, flag, given, ultra_value, layout_value, imagenet in (
            ("mean", "--mean", mean, ULTRALYTICS_MEAN, described.mean, layouts.IMAGENET_MEAN),
            ("std", "--std", std, ULTRALYTICS_STD, described.std, layouts.IMAGENET_STD)):
        normalization[key], sources[key] = (
            (tuple(given), flag) if given else (ultra_value, "file-metadata") if ultralytics else
            (layout_value, "layout") if layout_value else (imagenet, "default"))
    order = (channel_order or "RGB").upper()
    sources["channel_order"] = "--channel-order" if channel_order else "default"
    image_dims = (3, *size) if image_layout == "NCHW" else (*size, 3)
    spec = ModelSpec(
        name=name or entry_name(source), task=task, architecture=f"custom:{source.name}",
        inputs=(TensorSpec(in_name, dtype, image_dims),),
        outputs=tuple(TensorSpec(t.name, returned[t.name] if returned.get(t.name) == np.float16 else t.dtype, t.dims)
                      for t in described.outputs),
        max_batch_size=max_batch_size, fixed_batch=fixed_batch, resize_mode=mode, resize_size=resize_size,
        mean=normalization["mean"], std=normalization["std"], channel_order=order, input_layout=image_layout,
        output_layout=entry.name, labels=tuple(labels), options=dict(described.options or {}), sources=sources)
    return _write(source, repo, fmt, spec, version, version_policy, max_queue_size, instances, facts.external_data)


def entry_name(source: Path) -> str:
    """The default entry name of a file: its stem, in the characters Triton allows."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", source.stem) or "model"


def _write(source: Path, repo: Path, fmt: str, spec: ModelSpec, version: int, version_policy: str,
           max_queue_size: int, instances: int, external_data: tuple[str, ...] = ()) -> ExportResult:
    def copy(dest: Path) -> float:
        shutil.copyfile(source, dest)
        # An ONNX file's external data goes along, at the same place relative to it
        # (Triton's and convserve's runtimes read it from there); the file is renamed
        # model.onnx, its tensors keep naming their data files as they did.
        for location in external_data:
            (dest.parent / location).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.parent / location, dest.parent / location)
        return 0.0

    path, _, cpu_runtime = write_entry(repo, spec, fmt, version, copy, version_policy=version_policy,
                                       max_queue_size=max_queue_size, instance_count=instances)
    return ExportResult(spec.name, path, version, spec, 0.0, cpu_runtime=cpu_runtime)


def _export_raw_image_file(source: Path, repo: Path, fmt: str, entry: layouts.Layout, *, task: str,
                           name: str | None, input_size, labels: list[str], sources: dict[str, str],
                           version: int, version_policy: str, max_queue_size: int, instances: int,
                           external_data: tuple[str, ...] = ()) -> ExportResult:
    """A file that resizes and normalizes itself: uint8 RGB [1, 3, H, W] of any size,
    one image per call, checked on one image that is not square."""
    if input_size is None:
        raise ExportError(f"--from-file --task {task} needs --input-size (the sample image's side)")
    side = input_size if isinstance(input_size, int) else min(input_size)
    sample = np.random.default_rng(0).integers(0, 256, size=(1, 3, side, side + 32), dtype=np.uint8)
    in_name, outputs = _run_file(source, fmt, sample, "NCHW")
    try:
        described = entry.file_check(outputs, labels, (side, side + 32), 1, source.name)
    except layouts.LayoutError as exc:
        raise ExportError(str(exc)) from None
    spec = ModelSpec(
        name=name or entry_name(source), task=task, architecture=f"custom:{source.name}",
        inputs=(TensorSpec(in_name, np.dtype(np.uint8), (3, -1, -1)),),
        outputs=tuple(TensorSpec(t.name, t.dtype, t.dims) for t in described.outputs),
        max_batch_size=1, resize_mode=described.resize_mode, output_layout=entry.name, labels=tuple(labels),
        options=dict(described.options or {}), sources=sources)
    return _write(source, repo, fmt, spec, version, version_policy, max_queue_size, instances, external_data)


def _input_layout(facts: FileFacts, flag: str | None, source: str) -> tuple[str, str]:
    """(NCHW or NHWC, where it came from): --input-layout, else the axis of the
    input's shape that holds 3 channels, else NCHW. A flag the shape contradicts, and
    a shape with 3 channels on neither axis, are refused with what was found."""
    shape = facts.input_shape
    if shape is not None and len(shape) != 4:
        raise ExportError(f"{source}: input is {facts.shape_text()}; image models take a 4-d batch, "
                          "[N, 3, H, W] (NCHW) or [N, H, W, 3] (NHWC)")
    fits = {"NCHW": shape is None or shape[1] in (3, None), "NHWC": shape is None or shape[3] in (3, None)}
    if flag:
        wanted = flag.upper()
        if wanted not in fits:
            raise ExportError(f"--input-layout is nchw or nhwc, got {flag!r}")
        if not fits[wanted]:
            other = "NHWC" if wanted == "NCHW" else "NCHW"
            hint = f"which looks like {other}: pass --input-layout {other.lower()}" if fits[other] else \
                "which has 3 channels on neither axis 1 nor axis 3"
            raise ExportError(f"{source}: input is {facts.shape_text()}, {hint}")
        return wanted, "--input-layout"
    if shape is None or (shape[1] is None and shape[3] is None):
        return "NCHW", "default"
    if shape[1] == 3:
        return "NCHW", "file-shape"
    if shape[3] == 3:
        return "NHWC", "file-shape"
    raise ExportError(f"{source}: input is {facts.shape_text()}, with 3 channels on neither axis 1 (NCHW) nor "
                      "axis 3 (NHWC); convserve feeds 3-channel images")


def _refuse_if_nhwc(source: Path, fmt: str, sample: np.ndarray) -> None:
    """A file of unknown input shape that failed on the NCHW sample: when it runs on
    the same sample as NHWC, refuse with the flag that fits."""
    other = np.ascontiguousarray(sample.transpose(0, 2, 3, 1))
    try:
        _run_file(source, fmt, other, "NHWC")
    except ExportError:
        return
    shape = ", ".join(str(d) for d in other.shape[1:])
    raise ExportError(f"{source.name} fails on NCHW input and runs on [N, {shape}], which looks like NHWC: "
                      "pass --input-layout nhwc")


def _input_size(facts: FileFacts, image_layout: str, flag, meta, source: str) -> tuple[tuple[int, int], str]:
    """((height, width), where it came from): --input-size, else the input's static
    height and width, else Ultralytics' imgsz. A size the file's fixed size or its
    stride does not allow is refused."""
    fixed = (None, None)
    if facts.input_shape is not None:
        fixed = facts.input_shape[1:3] if image_layout == "NHWC" else facts.input_shape[2:4]
    if flag is not None:
        size = (flag, flag) if isinstance(flag, int) else tuple(int(v) for v in flag)
        if len(size) != 2 or min(size) < 1:
            raise ExportError(f"--input-size takes H W (or one side), got {list(size)}")
        if any(f is not None and f != s for f, s in zip(fixed, size)):
            raise ExportError(f"{source}: input is {facts.shape_text()}, its size fixed; --input-size "
                              f"{size[0]} {size[1]} does not fit it (leave --input-size out)")
        where = "--input-size"
    elif None not in fixed:
        size, where = tuple(fixed), "file-shape"
    elif meta.imgsz is not None:
        size, where = meta.imgsz, "file-metadata"
    else:
        raise ExportError(f"--from-file needs --input-size H W: {source}'s input is {facts.shape_text()}, its size "
                          "not fixed, and its metadata names none")
    if meta.stride and any(s % meta.stride for s in size):
        raise ExportError(f"{source}: input size {size[0]}x{size[1]} is not a multiple of the model's stride "
                          f"{meta.stride} (its metadata)")
    return size, where


def _batching(facts: FileFacts, max_batch_size: int | None, source: str) -> tuple[int, int, str]:
    """(fixed_batch, max_batch_size, where it came from). An input whose batch axis is
    fixed at 1 (Ultralytics' default dynamic=False, many tf2onnx exports) is served
    one image per call without Triton batching; --max-batch-size 0 asks the same of a
    file whose shape is unknown. Any other fixed batch is refused."""
    fixed = facts.input_shape[0] if facts.input_shape is not None else None
    if fixed is not None and fixed != 1:
        raise ExportError(f"{source}: input is {facts.shape_text()}, its batch fixed at {fixed}; convserve serves "
                          "files whose batch is 1 or dynamic (export again with batch 1, or a dynamic batch)")
    if fixed == 1:
        if max_batch_size:
            raise ExportError(f"{source}: input is {facts.shape_text()}, its batch fixed at 1: it is served one "
                              f"image per call (leave --max-batch-size {max_batch_size} out; --instances N runs "
                              "N copies side by side)")
        return 1, 0, "file-shape"
    if max_batch_size == 0:
        return 1, 0, "--max-batch-size"
    if max_batch_size is None:
        return 0, DEFAULT_MAX_BATCH_SIZE, "default"
    if max_batch_size < 0:
        raise ExportError(f"--max-batch-size must be 0 or more, got {max_batch_size}")
    return 0, max_batch_size, "--max-batch-size"

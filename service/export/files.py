"""Bring your own file: an already exported TorchScript or ONNX model put into the
repository, its outputs checked by its layout's registry entry (`pipelines.layouts`)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from ..pipelines import layouts
from ..spec import ModelSpec, TensorSpec
from . import ExportError
from .checkpoints import read_labels_file
from .formats import _as_tuple
from .repository import DEFAULT_MAX_BATCH_SIZE, ExportResult, write_entry


# --task -> the layout a file of that task has unless --layout says otherwise. Each
# layout's file check (its registry entry) validates the file's outputs.
FILE_LAYOUTS = {"classification": "logits", "detection": "yolov8", "semantic_segmentation": "logits_nchw",
                "instance_segmentation": "rcnn_candidates", "generation": "image_nchw_tanh"}
# Tasks whose models have no classes: --labels is optional for them.
UNLABELLED_TASKS = ("generation",)
# Tasks whose files take uint8 RGB images [N, 3, H, W] of any size and resize and
# normalize them themselves (one image is sent per call); the others take float32
# [N, 3, S, S] normalized with --mean/--std.
RAW_IMAGE_TASKS = ("instance_segmentation",)


def file_layout(task: str, layout: str | None) -> layouts.Layout:
    """The registry entry for a file of `task` with `--layout` (None: the task's default)."""
    allowed = [name for name in layouts.for_task(task) if layouts.LAYOUTS[name].file_check is not None]
    name = layout or FILE_LAYOUTS[task]
    if name not in allowed:
        raise ExportError(f"--layout for {task} is {' or '.join(allowed)}, got {layout!r}")
    return layouts.LAYOUTS[name]


def _run_file(source: Path, fmt: str, sample: np.ndarray) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """Run the file on the sample batch: (input name, [(output name, array), ...])."""
    shape = f"{list(sample.shape)} {'uint8' if sample.dtype == np.uint8 else 'float'}"
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
    task: str,
    name: str,
    input_size: int,
    labels_file: Path | None,
    layout: str | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    resize_mode: str | None = None,
    version: int = 1,
    version_policy: str = "latest",
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue_size: int = 0,
) -> ExportResult:
    """Put an already exported model (`model.pt` TorchScript or `model.onnx`) into the
    repository. It takes float32 [N, 3, S, S] RGB normalized with mean/std (the gateway
    normalizes; mean/std default to the task's, ImageNet's for most); the file must
    load, and its outputs must fit the task and `layout`."""
    source = Path(source)
    if task not in FILE_LAYOUTS:
        raise ExportError(f"--from-file supports --task {', '.join(FILE_LAYOUTS)}; got {task!r}")
    entry = file_layout(task, layout)
    if not source.is_file():
        raise ExportError(f"model file {source} does not exist")
    if labels_file is None and task not in UNLABELLED_TASKS:
        raise ExportError(f"--from-file --task {task} needs --labels")
    labels = read_labels_file(labels_file) if labels_file is not None else []
    fmt = {".pt": "torchscript", ".pth": "torchscript", ".torchscript": "torchscript",
           ".onnx": "onnx"}.get(source.suffix)
    if fmt is None:
        raise ExportError(f"--from-file takes a TorchScript .pt or an .onnx file, got {source.name}")
    rng = np.random.default_rng(0)
    raw_images = task in RAW_IMAGE_TASKS
    if raw_images:  # one image, not square: the file must take any size
        sample = rng.integers(0, 256, size=(1, 3, input_size, input_size + 32), dtype=np.uint8)
        image_input = (np.dtype(np.uint8), (3, -1, -1))
    else:
        sample = rng.normal(size=(2, 3, input_size, input_size)).astype(np.float32)
        image_input = (np.dtype(np.float32), (3, input_size, input_size))
    in_name, outputs = _run_file(source, fmt, sample)
    try:
        described = entry.file_check(outputs, labels, input_size, entry.name, source.name)
    except layouts.LayoutError as exc:
        raise ExportError(str(exc)) from None
    spec = ModelSpec(
        name=name, task=task, architecture=f"custom:{source.name}",
        inputs=(TensorSpec(in_name, *image_input),),
        outputs=tuple(TensorSpec(t.name, t.dtype, t.dims) for t in described.outputs),
        max_batch_size=1 if raw_images else max_batch_size,
        resize_mode=resize_mode or described.resize_mode,
        resize_size=described.resize_size if (resize_mode or described.resize_mode) == "resize_center_crop" else 0,
        mean=tuple(mean or described.mean or layouts.IMAGENET_MEAN),
        std=tuple(std or described.std or layouts.IMAGENET_STD),
        output_layout=entry.name, labels=tuple(labels),
        options=dict(described.options or {}))
    path, _ = write_entry(repo, spec, fmt, version, lambda dest: (shutil.copyfile(source, dest), 0.0)[1],
                          version_policy=version_policy, max_queue_size=max_queue_size)
    return ExportResult(name, path, version, spec, 0.0)

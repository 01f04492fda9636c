"""Repository entries: the spec of an export (from its architecture, labels and
options) and the writer of `<repo>/<name>/` (model file, both configs, labels).
`export_model` ties a zoo architecture, a checkpoint and a format together."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from google.protobuf import text_format

from ..pipelines import layouts
from ..spec import CPU_BACKEND, MODEL_FILENAME, SEEDED, ModelSpec, TensorSpec
from . import ExportError, hub, zoo
from .checkpoints import apply_state_dict, checkpoint_num_classes, load_state_dict, resolve_labels
from .formats import onnx_parity, to_onnx, write_model_file

log = logging.getLogger("convserve.export")

DEFAULT_MAX_BATCH_SIZE = 8
LABELS_FILE = "labels.txt"
# Entry-name suffix per format, so one repository can hold every format of a model.
NAME_SUFFIX = {"torchscript": "", "onnx": "_onnx", "tensorrt": "_trt"}


@dataclass
class ExportResult:
    name: str
    path: Path
    version: int
    spec: ModelSpec
    max_abs_diff: float
    # What the embedded CPU profile runs: "onnxruntime" or "torchscript" ("" for TensorRT).
    cpu_runtime: str = ""


def build_spec(arch: zoo.Architecture, name: str, labels: list[str], max_batch_size: int,
               input_size: int | None = None, options: dict[str, str] | None = None,
               weights: str = "") -> ModelSpec:
    """The spec of zoo architecture `arch` exported as entry `name`; the architecture's
    hooks say what its outputs and extra inputs are and whether its input size is
    fixed. `options` override the architecture's default options; `weights` says where
    the weights came from (`ModelSpec.weights`)."""
    height, width = arch.input_size
    resize_size = arch.resize_size
    if input_size is not None:
        # Same crop ratio as the architecture's default (224 of 256 for ImageNet).
        if resize_size:
            resize_size = round(input_size * resize_size / height)
        height = width = input_size
    options = {**arch.options, **(arch.sized_options(height, width) if arch.sized_options else {}),
               **{k: str(v) for k, v in (options or {}).items()}}
    if arch.output_specs is None:
        outputs = zoo.contract(arch.output_layout, C=len(labels))
    else:
        outputs = tuple(arch.output_specs(len(labels), height, width))
    in_dims = (3, -1, -1) if arch.variable_input_size else (3, height, width)
    try:
        arch.layout.parse_options(options)  # a bad --option is refused before anything is built
    except layouts.BadModelOption as exc:
        raise ExportError(f"--option: {exc}") from None
    extra = tuple(arch.extra_inputs(options, height, width)) if arch.extra_inputs is not None else ()
    return ModelSpec(
        name=name, task=arch.task, architecture=arch.name,
        inputs=(TensorSpec(arch.input_name, np.dtype(np.uint8), in_dims), *extra),
        outputs=outputs,
        max_batch_size=max_batch_size, resize_mode=arch.resize_mode, resize_size=resize_size,
        interpolation=arch.interpolation, mean=arch.mean, std=arch.std, output_layout=arch.output_layout,
        labels=tuple(labels), options=options, weights=weights,
    )


# Enough hex digits of a checkpoint's sha256 to tell files apart (torch.hub names use 8-10).
WEIGHTS_SHA_PREFIX = 12


def weights_origin(published: zoo.Published | None, weights: Path | str | None) -> str:
    """`ModelSpec.weights`: the published weights' name, a checkpoint's file name and
    sha256 prefix, or SEEDED."""
    if published is not None:
        return published.name
    if weights is not None:
        return f"{Path(weights).name} sha256:{hub.sha256(Path(weights))[:WEIGHTS_SHA_PREFIX]}"
    return SEEDED


def default_name(arch_name: str, fmt: str) -> str:
    return arch_name + NAME_SUFFIX[fmt]


def export_model(
    arch_name: str,
    repo: Path,
    *,
    name: str | None = None,
    weights: Path | str | None = None,
    labels_file: Path | None = None,
    num_classes: int | None = None,
    fmt: str = "torchscript",
    version: int = 1,
    version_policy: str = "latest",
    input_size: int | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue_size: int = 0,
    seed: int = 0,
    options: dict[str, str] | None = None,
    instances: int = 1,
    cpu_runtime: str = "onnxruntime",
) -> ExportResult:
    """Export zoo architecture `arch_name` (+ checkpoint) as entry `name`, version `version`;
    `options` override the architecture's spec options (e.g. ``--option proposals=50``).

    `weights` is a checkpoint file, or (a str) the name of weights published for the
    architecture (``DEFAULT``, ``IMAGENET1K_V2``, ``horse2zebra``): those are fetched
    into torch.hub's cache (`hub.fetch`) and bring their own preprocessing preset and
    labels.

    `cpu_runtime` (a TorchScript export only): ``onnxruntime`` also writes the model's
    ONNX file, checked like the TorchScript one, for the embedded CPU profile to run
    (faster than TorchScript for every default model: docs/performance.md); where it
    cannot be exported or misses parity, the CPU profile runs the TorchScript file and
    the reason is logged. ``torchscript`` writes no ONNX,
    nor does a model whose layout selects its outputs itself (`Layout.selects_in_model`:
    Faster/Mask R-CNN's in-graph NMS)."""
    arch = zoo.get(arch_name)
    if fmt not in NAME_SUFFIX:
        raise ExportError(f"format must be one of {', '.join(NAME_SUFFIX)}, got {fmt!r}")
    if cpu_runtime not in CPU_RUNTIMES:
        raise ExportError(f"--cpu-runtime must be one of {', '.join(CPU_RUNTIMES)}, got {cpu_runtime!r}")
    name = name or default_name(arch.name, fmt)
    published = hub.lookup(arch, weights)
    if published is not None:
        arch = dataclasses.replace(arch, **published.preset)
        weights = hub.fetch(published)
    elif weights is not None and not Path(weights).is_file() and hub.known_names(arch):
        raise ExportError(f"--weights {weights}: no such checkpoint file, and not the name of weights published "
                          f"for {arch.name} ({', '.join(hub.known_names(arch))})")
    state = load_state_dict(Path(weights)) if weights is not None else None
    ckpt_classes = (checkpoint_num_classes(state, arch)
                    if state is not None and (arch.task == "classification" or arch.classes_key) else None)
    labels = resolve_labels(arch.labels_resource, arch.num_classes, labels_file, num_classes, ckpt_classes,
                            default_labels=published.labels if published is not None else None)
    spec = build_spec(arch, name, labels, max_batch_size, input_size, options,
                      weights=weights_origin(published, weights))

    torch.manual_seed(seed)
    model = arch.build(len(labels))
    if state is not None:
        apply_state_dict(model, state, arch)
    else:
        warnings.warn(f"{arch.name}: no --weights given; exporting seeded random weights (seed {seed}). "
                      "Its answers are meaningless until you export a trained checkpoint.", stacklevel=2)
    wrapped = arch.wrap(model.eval(), spec).eval()
    size = (spec.input_height, spec.input_width) if input_size is None else (input_size, input_size)
    if arch.variable_input_size and input_size is None:
        size = arch.input_size
    inputs = example_inputs(spec, arch, seed, size=size)
    with torch.inference_mode():
        expected = wrapped(*inputs)

    def write(path: Path) -> float:
        return write_model_file(fmt, wrapped, inputs, expected, path, spec)

    def write_onnx_companion(path: Path) -> bool:
        return onnx_companion(wrapped, inputs, expected, path, spec, arch, seed)

    path, diff, cpu_backend = write_entry(repo, spec, fmt, version, write, version_policy=version_policy,
                                          max_queue_size=max_queue_size, instance_count=instances,
                                          write_cpu_model=write_onnx_companion if cpu_runtime == "onnxruntime"
                                          and not arch.layout.selects_in_model else None)
    log.info("exported", extra={"model": name, "path": str(path), "version": version, "format": fmt})
    return ExportResult(name, path, version, spec, diff, cpu_runtime=cpu_backend)


# The embedded CPU profile's runtime for a TorchScript export (`--cpu-runtime`).
CPU_RUNTIMES = ("onnxruntime", "torchscript")
# A second input size at which a variable-size model's ONNX file must also hold parity:
# a trace can fix a size it was made at; this catches it.
SECOND_SIZE_STEP = 32


def onnx_companion(wrapped: torch.nn.Module, inputs: tuple[torch.Tensor, ...], expected, path: Path,
                   spec: ModelSpec, arch: zoo.Architecture, seed: int) -> bool:
    """Write `wrapped`'s ONNX file to `path` for the embedded CPU profile; True when it
    holds parity with eager on the example inputs (and, for a variable-size model, at a
    second size too). False, with the reason logged, where it cannot be exported or
    misses parity: the CPU profile then runs the TorchScript file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings; parity is checked below
            to_onnx(wrapped, inputs, expected, path, spec)
            if arch.variable_input_size:
                height, width = inputs[0].shape[2:]
                other = example_inputs(spec, arch, seed + 1, size=(height + SECOND_SIZE_STEP,
                                                                   width + SECOND_SIZE_STEP))
                with torch.inference_mode():
                    want = wrapped(*other)
                onnx_parity(path, spec, other, want, "ONNX Runtime (second size)")
    except Exception as exc:  # any exporter failure: keep TorchScript for the CPU profile
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        log.warning(f"{spec.name}: no ONNX file for the embedded CPU profile, which runs TorchScript ({reason})")
        return False
    return True


def example_batch(spec: ModelSpec, seed: int, batch: int = 2, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    """Random uint8 images at the spec's input size (`size` where it is variable)."""
    generator = torch.Generator().manual_seed(seed)
    dims = tuple(d if d > 0 else fallback for d, fallback in zip(spec.image_input.dims, (3, *size)))
    return torch.randint(0, 256, (batch, *dims), generator=generator, dtype=torch.uint8)


def example_inputs(spec: ModelSpec, arch: zoo.Architecture, seed: int, batch: int = 2,
                   size: tuple[int, int] = (64, 64)) -> tuple[torch.Tensor, ...]:
    """Example values of every input of `spec`, in order: `example_batch` images, then
    the architecture's extra inputs (its own example values, or uniform [0, 1))."""
    images = example_batch(spec, seed, batch, size)
    extra = spec.inputs[1:]
    if not extra:
        return (images,)
    generator = torch.Generator().manual_seed(seed + 1)
    if arch.example_extra_inputs is not None:
        return (images, *arch.example_extra_inputs(spec, batch, *images.shape[2:], generator))
    return (images, *(torch.rand((batch, *t.dims), generator=generator).to(getattr(torch, t.dtype.name))
                      for t in extra))


def entry_format(version_dir: Path) -> str | None:
    """The format a version directory was exported in: its primary model file's (a
    TorchScript entry's `model.onnx` is its CPU companion, not its format)."""
    for fmt in ("torchscript", "tensorrt", "onnx"):
        if (version_dir / MODEL_FILENAME[fmt]).is_file():
            return fmt
    return None


def write_entry(repo: Path, spec: ModelSpec, fmt: str, version: int, write_model: Callable[[Path], float],
                *, version_policy: str = "latest", max_queue_size: int = 0,
                instance_count: int = 1, write_cpu_model: Callable[[Path], bool] | None = None,
                ) -> tuple[Path, float, str]:
    """Write (or update) `<repo>/<name>`: `<version>/model.*`, both configs and labels.
    Returns the entry's folder, `write_model`'s parity figure and the backend its
    embedded CPU profile runs ("" for TensorRT, which has none).

    The model file is written and checked in a temporary directory first and renamed
    into place, so Triton never sees a half-written model. Other versions stay. An
    entry holds one format: adding a version in another format is refused.
    `instance_count` copies of the model run side by side (Triton's instance group).

    `write_cpu_model`, for a TorchScript entry, writes the same model's ONNX file to the
    path it is given and returns whether it holds parity (False: nothing kept). When
    every version of the entry has one, the embedded CPU profile runs it with ONNX
    Runtime (docs/performance.md says why); production keeps the TorchScript file."""
    if instance_count < 1:
        raise ExportError(f"--instances must be at least 1, got {instance_count}")
    entry = Path(repo) / spec.name
    existing = {entry_format(p) for p in entry.glob("[0-9]*") if p.is_dir()} - {None} if entry.exists() else set()
    if existing and existing != {fmt}:
        files = sorted(p.name for p in entry.glob("[0-9]*/model.*"))
        raise ExportError(f"entry {spec.name!r} already holds {', '.join(files)}; "
                          f"each entry has one format (choose another --name)")
    (entry / "configs").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=entry))
    try:
        diff = write_model(tmp / MODEL_FILENAME[fmt])
        if write_cpu_model is not None and fmt == "torchscript":
            companion = tmp / MODEL_FILENAME["onnx"]
            if not write_cpu_model(companion):
                companion.unlink(missing_ok=True)
        target = entry / str(version)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    (entry / LABELS_FILE).write_text("\n".join(spec.labels) + "\n")
    versions = [p for p in entry.glob("[0-9]*") if p.is_dir()]
    cpu_fmt = "onnx" if fmt == "torchscript" and versions and all(
        (p / MODEL_FILENAME["onnx"]).is_file() for p in versions) else fmt
    profiles = [("production", entry / "config.pbtxt")]
    if fmt != "tensorrt":  # a TensorRT plan needs a GPU: no embedded CPU profile
        profiles.append(("cpu", entry / "configs" / "cpu.pbtxt"))
    for profile, path in profiles:
        config = spec.to_model_config(profile, fmt, labels_file=LABELS_FILE, version_policy=version_policy,
                                      max_queue_size=max_queue_size, instance_count=instance_count,
                                      cpu_fmt=cpu_fmt)
        path.write_text(f"# Written by convserve export ({profile} profile). Regenerate, don't edit.\n"
                        + text_format.MessageToString(config))
    return entry, diff, CPU_BACKEND.get(cpu_fmt, "") if fmt != "tensorrt" else ""

"""Export models into a Triton model repository entry:

    <repo>/<name>/config.pbtxt        production profile (NGC tritonserver)
    <repo>/<name>/configs/cpu.pbtxt   embedded CPU profile (python-based backends)
    <repo>/<name>/<version>/model.pt  the model file: model.pt, model.onnx or model.plan
    <repo>/<name>/labels.txt          one label per line

Two sources: a zoo architecture plus an optional checkpoint (`export_model`), or an
already exported TorchScript/ONNX file with a declared task and layout
(`export_from_file`). The spec (resize mode, mean/std, labels, layout) is written into
both configs as parameters; the gateway reads it back from Triton. Before anything is
written, the exported model's output is checked against the eager model (or, for a
file, that it loads and its outputs have the declared shape).
"""
from __future__ import annotations

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

from . import zoo
from .pipelines import layouts
from .spec import MODEL_FILENAME, ModelSpec, TensorSpec

log = logging.getLogger("convserve.export")

# Exported outputs must reproduce eager: same math, only graph-level and kernel
# differences. The bound scales with each output tensor (see `parity_bound`): kernels
# that sum in another order (another CPU's SIMD width, ONNX Runtime's own GEMM) move
# every element by about float32 rounding times the output's magnitude, not times the
# element's own, so a per-element relative check refuses correct exports on elements
# near zero (1.8e-4 on logits of ~120 is 1.5e-6 of the scale). 1e-4 of the scale is ~60x
# that, and far below what a wrong weight, channel order or normalization does (>1e-2).
PARITY_RTOL, PARITY_ATOL = 1e-4, 1e-5
DEFAULT_MAX_BATCH_SIZE = 8
LABELS_FILE = "labels.txt"
ONNX_OPSET = 17
# Entry-name suffix per format, so one repository can hold every format of a model.
NAME_SUFFIX = {"torchscript": "", "onnx": "_onnx", "tensorrt": "_trt"}


class ExportError(Exception):
    """A user-facing export failure (bad checkpoint, mismatched classes, parity)."""


@dataclass
class ExportResult:
    name: str
    path: Path
    version: int
    spec: ModelSpec
    max_abs_diff: float


# ------------------------------------------------------------------- checkpoints
def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a `.pth`/`.pt` file (optionally wrapped in `{"state_dict": ...}`
    or `{"model": ...}`, keys optionally prefixed `module.`) or a `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ExportError(f"cannot read checkpoint {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"checkpoint {path} is not a state_dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _listed(keys: list[str], limit: int = 10) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))


def _fits(value: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether `load_state_dict` copies `value` into `target`: same shape, or (as torch
    allows for old checkpoints) a one-element vector into a scalar."""
    return value.shape == target.shape or (target.dim() == 0 and value.dim() == 1 and value.numel() == 1)


def apply_state_dict(model: torch.nn.Module, state: dict, arch: zoo.Architecture) -> None:
    """Load strictly: missing or unexpected keys and tensors of the wrong shape are one
    ExportError naming them all (a mismatched shape as "key: checkpoint [..] vs model [..]"),
    never skipped and never a RuntimeError from `load_state_dict`."""
    if arch.adapt_state_dict is not None:
        state = arch.adapt_state_dict(model, state)
    expected = model.state_dict()
    mismatched = [f"{key}: checkpoint {_shape(value)} vs model {_shape(expected[key])}"
                  for key, value in state.items() if key in expected and not _fits(value, expected[key])]
    loadable = {k: v for k, v in state.items() if k not in expected or _fits(v, expected[k])}
    # load_state_dict itself decides what is missing or unexpected (modules may rename or
    # drop keys as they load, e.g. batch norm's num_batches_tracked in old checkpoints).
    result = model.load_state_dict(loadable, strict=False)
    skipped = set(state) - set(loadable)
    missing = [key for key in result.missing_keys if key not in skipped]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys: {_listed(result.unexpected_keys)}")
    if mismatched:
        problems.append(f"mismatched shapes: {_listed(mismatched)}")
    if problems:
        raise ExportError(f"checkpoint does not match {arch.name}: " + "; ".join(problems))


def checkpoint_num_classes(state: dict, arch: zoo.Architecture) -> int | None:
    """The class count a checkpoint was trained for: the rows of the architecture's
    `classes_key` (default: its last weight, a classifier's last layer)."""
    key = arch.classes_key
    if key is None:
        model = arch.build(arch.num_classes)
        key = [name for name, _ in model.named_parameters() if name.endswith(".weight")][-1]
    tensor = state.get(key)
    return int(tensor.shape[0]) if tensor is not None else None


def resolve_labels(default_resource: str | None, default_count: int, labels_file: Path | None,
                   num_classes: int | None, checkpoint_classes: int | None) -> list[str]:
    """Labels for the entry; the labels file, --num-classes and the checkpoint must agree."""
    labels = read_labels_file(labels_file) if labels_file is not None else None
    counts = {"the labels file has": len(labels) if labels is not None else None,
              "--num-classes is": num_classes, "the checkpoint has": checkpoint_classes}
    given = {k: v for k, v in counts.items() if v is not None}
    if len(set(given.values())) > 1:
        raise ExportError("class counts disagree: " + ", ".join(f"{k} {v}" for k, v in given.items()))
    n = next(iter(given.values()), default_count)
    if labels is None:
        default = zoo.read_labels(default_resource) if default_resource else []
        labels = default if len(default) == n else [f"class_{i}" for i in range(n)]
    return labels


def read_labels_file(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"labels file {path} does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------- formats
def _as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def parity_bound(expected: torch.Tensor, rtol: float = PARITY_RTOL, atol: float = PARITY_ATOL) -> float:
    """The largest abs difference an exported output may have from eager output
    `expected` (any shape, floating point): ``atol + rtol * max|expected|`` over its
    finite elements.

    A norm-wise bound, as Torch-TensorRT's accuracy check does (torchtrtc's `check_rtol`:
    ``max|a - b| <= threshold * max|a|``), rather than the per-element
    ``|a - b| <= atol + rtol * |b|`` of `torch.allclose` and torch.onnx.verification
    (rtol 1e-3, atol 1e-7, which needs `acceptable_error_percentage` to pass real
    models): rounding differences scale with the output, not with each element."""
    return atol + rtol * _finite_scale(expected)


def _finite_scale(values: torch.Tensor) -> float:
    """max |values| over the finite elements (0.0 when there are none)."""
    finite = values[torch.isfinite(values)]
    return finite.abs().max().item() if finite.numel() else 0.0


def compare_output(expected, got, what: str) -> float:
    """Check one exported output `got` against eager `expected` (tensors or arrays of
    any shape); returns the max abs difference (0.0 when empty).

    Raises ExportError on a shape change; for integer or bool outputs (labels, counts)
    on any difference; for floating outputs on a difference beyond `parity_bound`, or
    where either side is non-finite (NaN, inf) and the other does not hold the same
    value. `what` names the output in the message, e.g. "ONNX Runtime output logits__0"."""
    e, g = torch.as_tensor(expected).detach().cpu(), torch.as_tensor(got).detach().cpu()
    if e.shape != g.shape:
        raise ExportError(f"{what} has shape {list(g.shape)}, eager has {list(e.shape)}")
    if e.numel() == 0:
        return 0.0
    if not e.is_floating_point():
        # Labels, counts, indices: exact. A float export of an integer output must round-trip.
        differs = (e.double() != g.double())
        if differs.any():
            index = int(differs.flatten().nonzero()[0])
            raise ExportError(f"{what} differs from eager in {int(differs.sum())} of {e.numel()} values "
                              f"(an integer output must match exactly; first at flat index {index}: "
                              f"{g.flatten()[index].item()} vs {e.flatten()[index].item()})")
        return 0.0
    e, g = e.double(), g.double()
    e_finite, g_finite = torch.isfinite(e), torch.isfinite(g)
    # Non-finite values must sit at the same places with the same value (NaN where NaN,
    # +inf where +inf): a NaN in the export where eager is finite is a broken export.
    same_special = (e_finite == g_finite) & (e_finite | (e.isnan() & g.isnan()) | (e == g))
    if not same_special.all():
        bad = ~same_special
        index = int(bad.flatten().nonzero()[0])
        raise ExportError(f"{what} differs from eager in non-finite values at {int(bad.sum())} of {e.numel()} "
                          f"places (first at flat index {index}: {g.flatten()[index].item()} vs "
                          f"{e.flatten()[index].item()})")
    both = e_finite & g_finite
    diff = (e[both] - g[both]).abs().max().item() if both.any() else 0.0
    bound = parity_bound(e)
    if diff > bound:
        raise ExportError(f"{what} differs from eager: max abs diff {diff:.3g} exceeds the allowed {bound:.3g} "
                          f"(atol {PARITY_ATOL:g} + rtol {PARITY_RTOL:g} x max|eager| {_finite_scale(e):.3g})")
    return diff


def compare(expected, got, what: str, names: list[str] | tuple[str, ...] | None = None) -> float:
    """Check every exported output against eager (`compare_output`, one bound per output
    tensor); returns the max abs difference over all. `names` name the outputs in
    messages (default: their index)."""
    expected, got = _as_tuple(expected), _as_tuple(got)
    if len(expected) != len(got):
        raise ExportError(f"{what} returns {len(got)} outputs, eager returns {len(expected)}")
    worst = 0.0
    for i, (e, g) in enumerate(zip(expected, got)):
        name = names[i] if names is not None and i < len(names) else str(i)
        worst = max(worst, compare_output(e, g, f"{what} output {name}"))
    return worst


def to_torchscript(wrapped: torch.nn.Module, inputs: tuple[torch.Tensor, ...], expected, path: Path,
                   names: tuple[str, ...] | None = None) -> float:
    scripted = torch.jit.script(wrapped)
    with torch.inference_mode():
        diff = compare(expected, scripted(*inputs), "TorchScript", names)
    torch.jit.save(scripted, str(path))
    reloaded = torch.jit.load(str(path))
    with torch.inference_mode():
        return max(diff, compare(expected, reloaded(*inputs), "reloaded TorchScript", names))


def to_onnx(wrapped: torch.nn.Module, inputs: tuple[torch.Tensor, ...], expected, path: Path,
            spec: ModelSpec) -> float:
    import onnxruntime as ort

    values = inputs
    inputs = [t.name for t in spec.inputs]
    outputs = [t.name for t in spec.outputs]
    dynamic = {name: {0: "batch"} for name in inputs + outputs}
    for tensor in spec.inputs + spec.outputs:
        for axis, dim in enumerate(tensor.dims, start=1):
            if dim < 0:
                dynamic[tensor.name][axis] = f"{tensor.name}_dim{axis}"
    with torch.inference_mode():
        torch.onnx.export(wrapped, tuple(values), str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=ONNX_OPSET, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(outputs, {name: value.numpy() for name, value in zip(inputs, values)})
    return compare(expected, [torch.from_numpy(g) for g in got], "ONNX Runtime", outputs)


def to_tensorrt(wrapped, inputs: tuple[torch.Tensor, ...], expected, path: Path, spec: ModelSpec) -> float:
    """Build a TensorRT plan from the ONNX export; needs the tensorrt package and a GPU."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError("--format tensorrt needs NVIDIA TensorRT: the `tensorrt` Python package is not "
                          "installed (pip install tensorrt, on a machine with an NVIDIA GPU and driver)") from None
    if not torch.cuda.is_available():
        raise ExportError("--format tensorrt needs an NVIDIA GPU: torch sees no CUDA device here")
    onnx_path = path.with_suffix(".onnx")
    to_onnx(wrapped, inputs, expected, onnx_path, spec)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise ExportError("TensorRT could not parse the ONNX export: "
                          + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for tensor in spec.inputs:
        item = tuple(tensor.dims)
        profile.set_shape(tensor.name, (1, *item), (max(1, spec.max_batch_size // 2), *item),
                          (spec.max_batch_size, *item))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError("TensorRT failed to build the engine (see its log above)")
    path.write_bytes(bytes(plan))
    onnx_path.unlink()
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(plan))
    context = engine.create_execution_context()
    device_inputs = [value.cuda().contiguous() for value in inputs]
    for tensor, device_in in zip(spec.inputs, device_inputs):
        context.set_input_shape(tensor.name, tuple(device_in.shape))
        context.set_tensor_address(tensor.name, device_in.data_ptr())
    outs = []
    for tensor in spec.outputs:
        out = torch.empty(tuple(context.get_tensor_shape(tensor.name)), dtype=torch.float32, device="cuda")
        context.set_tensor_address(tensor.name, out.data_ptr())
        outs.append(out)
    stream = torch.cuda.Stream()
    context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return compare(expected, [o.cpu() for o in outs], "TensorRT", [t.name for t in spec.outputs])


def write_model_file(fmt: str, wrapped, inputs: tuple[torch.Tensor, ...], expected, path: Path,
                     spec: ModelSpec) -> float:
    """Write `wrapped` in `fmt` to `path`, checked against `expected` on `inputs` (the
    example values of every spec input, in order)."""
    if fmt == "torchscript":
        return to_torchscript(wrapped, inputs, expected, path, tuple(t.name for t in spec.outputs))
    if fmt == "onnx":
        return to_onnx(wrapped, inputs, expected, path, spec)
    if fmt == "tensorrt":
        return to_tensorrt(wrapped, inputs, expected, path, spec)
    raise ExportError(f"format must be torchscript, onnx or tensorrt, got {fmt!r}")


# ------------------------------------------------------------------------ export
def build_spec(arch: zoo.Architecture, name: str, labels: list[str], max_batch_size: int,
               input_size: int | None = None, options: dict[str, str] | None = None) -> ModelSpec:
    """The spec of zoo architecture `arch` exported as entry `name`; the architecture's
    hooks say what its outputs and extra inputs are and whether its input size is
    fixed. `options` override the architecture's default options."""
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
    extra = tuple(arch.extra_inputs(options, height, width)) if arch.extra_inputs is not None else ()
    return ModelSpec(
        name=name, task=arch.task, architecture=arch.name,
        inputs=(TensorSpec(arch.input_name, np.dtype(np.uint8), in_dims), *extra),
        outputs=outputs,
        max_batch_size=max_batch_size, resize_mode=arch.resize_mode, resize_size=resize_size,
        mean=arch.mean, std=arch.std, output_layout=arch.output_layout, labels=tuple(labels),
        options=options,
    )


def default_name(arch_name: str, fmt: str) -> str:
    return arch_name + NAME_SUFFIX[fmt]


def export_model(
    arch_name: str,
    repo: Path,
    *,
    name: str | None = None,
    weights: Path | None = None,
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
) -> ExportResult:
    """Export zoo architecture `arch_name` (+ checkpoint) as entry `name`, version `version`;
    `options` override the architecture's spec options (e.g. ``--option proposals=50``)."""
    arch = zoo.get(arch_name)
    if fmt not in NAME_SUFFIX:
        raise ExportError(f"format must be one of {', '.join(NAME_SUFFIX)}, got {fmt!r}")
    name = name or default_name(arch.name, fmt)
    state = load_state_dict(weights) if weights is not None else None
    ckpt_classes = (checkpoint_num_classes(state, arch)
                    if state is not None and (arch.task == "classification" or arch.classes_key) else None)
    labels = resolve_labels(arch.labels_resource, arch.num_classes, labels_file, num_classes, ckpt_classes)
    spec = build_spec(arch, name, labels, max_batch_size, input_size, options)

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

    path, diff = write_entry(repo, spec, fmt, version, write, version_policy=version_policy,
                             max_queue_size=max_queue_size)
    log.info("exported", extra={"model": name, "path": str(path), "version": version, "format": fmt})
    return ExportResult(name, path, version, spec, diff)


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


def write_entry(repo: Path, spec: ModelSpec, fmt: str, version: int, write_model: Callable[[Path], float],
                *, version_policy: str = "latest", max_queue_size: int = 0) -> tuple[Path, float]:
    """Write (or update) `<repo>/<name>`: `<version>/model.*`, both configs and labels.

    The model file is written and checked in a temporary directory first and renamed
    into place, so Triton never sees a half-written model. Other versions stay. An
    entry holds one format: adding a version in another format is refused."""
    entry = Path(repo) / spec.name
    existing = {p.name for p in entry.glob("[0-9]*/model.*")} if entry.exists() else set()
    if existing and MODEL_FILENAME[fmt] not in existing:
        raise ExportError(f"entry {spec.name!r} already holds {', '.join(sorted(existing))}; "
                          f"each entry has one format (choose another --name)")
    (entry / "configs").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=entry))
    try:
        diff = write_model(tmp / MODEL_FILENAME[fmt])
        target = entry / str(version)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    (entry / LABELS_FILE).write_text("\n".join(spec.labels) + "\n")
    profiles = [("production", entry / "config.pbtxt")]
    if fmt != "tensorrt":  # a TensorRT plan needs a GPU: no embedded CPU profile
        profiles.append(("cpu", entry / "configs" / "cpu.pbtxt"))
    for profile, path in profiles:
        config = spec.to_model_config(profile, fmt, labels_file=LABELS_FILE, version_policy=version_policy,
                                      max_queue_size=max_queue_size)
        path.write_text(f"# Written by convserve export ({profile} profile). Regenerate, don't edit.\n"
                        + text_format.MessageToString(config))
    return entry, diff


# ------------------------------------------------------------- bring your own file
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

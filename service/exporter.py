"""Export a PyTorch architecture (plus an optional checkpoint) into a Triton model
repository entry:

    <repo>/<name>/config.pbtxt        production profile (NGC tritonserver)
    <repo>/<name>/configs/cpu.pbtxt   embedded CPU profile (python-based backends)
    <repo>/<name>/<version>/model.pt  the TorchScript file (one format per entry)
    <repo>/<name>/labels.txt          one label per line

The spec (resize mode, mean/std, labels, layout) is written into both configs as
parameters; the gateway reads it back from Triton. Before anything is written, the
exported model's output is checked against the eager model.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format

from . import zoo
from .spec import MODEL_FILENAME, ModelSpec, TensorSpec

log = logging.getLogger("convserve.export")

# TorchScript must reproduce eager: same kernels, only graph-level differences.
PARITY_RTOL, PARITY_ATOL = 1e-3, 1e-5
DEFAULT_MAX_BATCH_SIZE = 8
LABELS_FILE = "labels.txt"


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


def apply_state_dict(model: torch.nn.Module, state: dict, arch: zoo.Architecture) -> None:
    """Load strictly: missing or unexpected keys are an error, never skipped."""
    if arch.adapt_state_dict is not None:
        state = arch.adapt_state_dict(model, state)
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys: {', '.join(result.missing_keys[:10])}"
                        + (f" (+{len(result.missing_keys) - 10} more)" if len(result.missing_keys) > 10 else ""))
    if result.unexpected_keys:
        problems.append(f"unexpected keys: {', '.join(result.unexpected_keys[:10])}"
                        + (f" (+{len(result.unexpected_keys) - 10} more)" if len(result.unexpected_keys) > 10 else ""))
    if problems:
        raise ExportError(f"checkpoint does not match {arch.name}: " + "; ".join(problems))


def checkpoint_num_classes(state: dict, arch: zoo.Architecture) -> int | None:
    """The class count a classifier checkpoint was trained for (its last layer's rows)."""
    model = arch.build(arch.num_classes)
    last = [name for name, _ in model.named_parameters() if name.endswith(".weight")][-1]
    tensor = state.get(last)
    return int(tensor.shape[0]) if tensor is not None else None


# ------------------------------------------------------------------------ export
def build_spec(arch: zoo.Architecture, name: str, labels: list[str], max_batch_size: int) -> ModelSpec:
    height, width = arch.input_size
    return ModelSpec(
        name=name,
        task=arch.task,
        architecture=arch.name,
        inputs=(TensorSpec(arch.input_name, np.dtype(np.uint8), (3, height, width)),),
        outputs=(TensorSpec(arch.output_names[0], np.dtype(np.float32), (len(labels),)),),
        max_batch_size=max_batch_size,
        resize_mode=arch.resize_mode,
        resize_size=arch.resize_size,
        mean=arch.mean,
        std=arch.std,
        output_layout=arch.output_layout,
        labels=tuple(labels),
        options=dict(arch.options),
    )


def resolve_labels(arch: zoo.Architecture, labels_file: Path | None, num_classes: int | None,
                   checkpoint_classes: int | None) -> list[str]:
    """Labels for the entry; the labels file, --num-classes and the checkpoint must agree."""
    labels = None
    if labels_file is not None:
        labels = [l.strip() for l in Path(labels_file).read_text().splitlines() if l.strip()]
    counts = {"labels file": len(labels) if labels is not None else None,
              "--num-classes": num_classes, "checkpoint": checkpoint_classes}
    given = {k: v for k, v in counts.items() if v is not None}
    if len(set(given.values())) > 1:
        raise ExportError("class counts disagree: " + ", ".join(
            f"{k} has {v}" if k != "--num-classes" else f"--num-classes is {v}" for k, v in given.items()))
    n = next(iter(given.values()), arch.num_classes)
    if labels is None:
        default = zoo.read_labels(arch.labels_resource)
        labels = default if len(default) == n else [f"class_{i}" for i in range(n)]
    return labels


def export_model(
    arch_name: str,
    repo: Path,
    *,
    name: str | None = None,
    weights: Path | None = None,
    labels_file: Path | None = None,
    num_classes: int | None = None,
    version: int = 1,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_queue_size: int = 0,
    seed: int = 0,
) -> ExportResult:
    arch = zoo.get(arch_name)
    name = name or arch.name
    state = load_state_dict(weights) if weights is not None else None
    ckpt_classes = checkpoint_num_classes(state, arch) if state is not None and arch.task == "classification" else None
    labels = resolve_labels(arch, labels_file, num_classes, ckpt_classes)
    spec = build_spec(arch, name, labels, max_batch_size)

    torch.manual_seed(seed)
    model = arch.build(len(labels))
    if state is not None:
        apply_state_dict(model, state, arch)
    else:
        warnings.warn(f"{arch.name}: no --weights given; exporting seeded random weights (seed {seed}). "
                      "Its answers are meaningless until you export a trained checkpoint.", stacklevel=2)
    model.eval()
    wrapped = arch.wrap(model, spec).eval()
    scripted = torch.jit.script(wrapped)
    max_diff = check_parity(wrapped, scripted, spec, seed)
    path = write_entry(repo, spec, scripted, version, max_queue_size=max_queue_size)
    log.info("exported", extra={"model": name, "path": str(path), "version": version})
    return ExportResult(name, path, version, spec, max_diff)


def example_batch(spec: ModelSpec, seed: int, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, *spec.image_input.dims), generator=generator, dtype=torch.uint8)


def check_parity(eager: torch.nn.Module, exported, spec: ModelSpec, seed: int) -> float:
    """Exported output must equal eager (rtol 1e-3, atol 1e-5) on a random uint8 batch."""
    images = example_batch(spec, seed)
    with torch.inference_mode():
        expected = eager(images)
        got = exported(images)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    worst = 0.0
    for i, (e, g) in enumerate(zip(expected, got)):
        if e.shape != g.shape or not torch.allclose(e, g, rtol=PARITY_RTOL, atol=PARITY_ATOL):
            diff = (e - g).abs().max().item() if e.shape == g.shape else float("inf")
            raise ExportError(f"exported output {i} differs from eager (max abs diff {diff:.3g})")
        worst = max(worst, (e - g).abs().max().item() if e.numel() else 0.0)
    return worst


def write_entry(repo: Path, spec: ModelSpec, scripted, version: int, fmt: str = "torchscript",
                *, max_queue_size: int = 0) -> Path:
    """Write (or update) `<repo>/<name>`: configs, labels and `<version>/model.*`.

    The version directory is written to a temporary path first and renamed into place,
    so Triton never sees a half-written model file."""
    entry = Path(repo) / spec.name
    (entry / "configs").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=entry))
    try:
        torch.jit.save(scripted, str(tmp / MODEL_FILENAME[fmt]))
        target = entry / str(version)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    (entry / LABELS_FILE).write_text("\n".join(spec.labels) + "\n")
    for profile, path in (("production", entry / "config.pbtxt"), ("cpu", entry / "configs" / "cpu.pbtxt")):
        config = spec.to_model_config(profile, fmt, labels_file=LABELS_FILE, max_queue_size=max_queue_size)
        path.write_text(f"# Written by convserve export ({profile} profile). Regenerate, don't edit.\n"
                        + text_format.MessageToString(config))
    return entry

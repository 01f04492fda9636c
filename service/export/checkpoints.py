"""Checkpoints: state dicts read from .pth/.pt/.safetensors and matched strictly to
a model (missing, unexpected and wrong-shape tensors are one error); labels."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch

from . import ExportError, zoo


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


def _with_versions(values: dict, state: dict, expected: dict) -> OrderedDict:
    """`values` carrying the module versions that `load_state_dict` passes to each
    module's `_load_from_state_dict` (a state_dict's `_metadata`): the checkpoint's own
    when it has the root module's, else the model's. A rebuilt dict or a safetensors
    file has none, and some modules refuse to load without theirs (torchvision's MNASNet
    raises "version should be set to 1 or 2")."""
    out = OrderedDict(values)
    metadata = getattr(state, "_metadata", None)
    if not metadata or "" not in metadata:
        metadata = getattr(expected, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata
    return out


def apply_state_dict(model: torch.nn.Module, state: dict, arch: zoo.Architecture) -> None:
    """Load strictly: missing or unexpected keys and tensors of the wrong shape are one
    ExportError naming them all (a mismatched shape as "key: checkpoint [..] vs model [..]"),
    never skipped and never a RuntimeError from `load_state_dict`."""
    if arch.adapt_state_dict is not None:
        state = arch.adapt_state_dict(model, state)
    expected = model.state_dict()
    mismatched = [f"{key}: checkpoint {_shape(value)} vs model {_shape(expected[key])}"
                  for key, value in state.items() if key in expected and not _fits(value, expected[key])]
    loadable = _with_versions({k: v for k, v in state.items() if k not in expected or _fits(v, expected[k])},
                              state, expected)
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
                   num_classes: int | None, checkpoint_classes: int | None,
                   default_labels: Sequence[str] | None = None) -> list[str]:
    """Labels for the entry; the labels file, --num-classes and the checkpoint must agree.
    Without a labels file: `default_labels` (published weights' categories), else the
    `default_resource` file, where their count fits; else ``class_<i>``."""
    labels = read_labels_file(labels_file) if labels_file is not None else None
    counts = {"the labels file has": len(labels) if labels is not None else None,
              "--num-classes is": num_classes, "the checkpoint has": checkpoint_classes}
    given = {k: v for k, v in counts.items() if v is not None}
    if len(set(given.values())) > 1:
        raise ExportError("class counts disagree: " + ", ".join(f"{k} {v}" for k, v in given.items()))
    n = next(iter(given.values()), default_count)
    if labels is None:
        default = (list(default_labels) if default_labels is not None
                   else zoo.read_labels(default_resource) if default_resource else [])
        labels = default if len(default) == n else [f"class_{i}" for i in range(n)]
    return labels


def read_labels_file(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"labels file {path} does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]

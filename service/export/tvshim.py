"""Torchvision's model code on CPU-only torch, when torchvision's compiled ops don't load.

torchvision 0.28's `_C.so` is CUDA-linked and does not load against CPU torch, so
`import torchvision` fails with "operator torchvision::nms does not exist". `install()`,
called *before* torchvision is imported:

1. tries to load torchvision's own `_C.so`; if that works, it does nothing else;
2. otherwise defines the `torchvision::` op schemas (read from `_C.so`), registers CPU
   kernels for the ops inference needs (service.export._tvops), and makes
   `torchvision.extension._has_ops` return True.

The exporter calls it, and so does the Triton backend before it loads any model.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# Schemas exactly as torchvision 0.28's _C.so registers them.
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, float rois_scale, "
    "int rois_zero_point, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
    "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
)

_state: dict[str, object] = {"installed": False, "shimmed": False}
_library = None  # keeps the torch.library.Library alive


def _native_ops_load() -> bool:
    """True when torchvision's own compiled ops load (then the shim stays out)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for location in spec.submodule_search_locations:
        for candidate in sorted(Path(location).glob("_C*.so")):
            try:
                torch.ops.load_library(str(candidate))
                return True
            except (OSError, RuntimeError):
                continue
    return False


def _has_ops() -> bool:
    return True


def install() -> bool:
    """Make torchvision importable on this torch; returns True when the shim is active.

    Idempotent. Must run before the first `import torchvision`."""
    global _library
    if _state["installed"]:
        return bool(_state["shimmed"])
    import torch

    if "torchvision" in sys.modules and not _state["installed"]:
        log.debug("torchvision already imported; op shim not installed")
    if _native_ops_load():
        _state.update(installed=True, shimmed=False)
        return False
    _library = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        _library.define(schema)
    from . import _tvops

    _tvops.register(_library)
    _state.update(installed=True, shimmed=True)
    import torchvision.extension
    import torchvision.ops.roi_align  # noqa: F401  (the module; `torchvision.ops.roi_align` is the function)

    torchvision.extension._has_ops = _has_ops
    # The roi_align module imported `_has_ops` by name; without this, eager roi_align
    # would take torchvision's torch.compile fallback instead of the registered kernel.
    sys.modules["torchvision.ops.roi_align"]._has_ops = _has_ops
    return True

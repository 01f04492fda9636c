"""CPU kernels for the torchvision ops that inference needs, registered by tvshim.

Each has torchvision's semantics, read from its CPU kernels
(``torchvision/csrc/ops/cpu/nms_kernel.cpp``, ``roi_align_kernel.cpp`` and
``roi_align_common.h``). For float32 and float64 the results are bit-identical to an
x86-64 build of those kernels: the same operations in the same order and dtype, with no
fused multiply-adds. The other ops whose schemas tvshim defines get a kernel that
raises a clear error, instead of a missing-kernel one.

They are plain torch (and numpy) code, so they also run, and can be checked, where
torchvision's own ops load.
"""
from __future__ import annotations

import torch

from ..ops import boxes

# Gathered feature rows per step of roi_align: [rows, C] float32 temporaries of 4 MiB,
# a handful alive at once, whatever the number of RoIs.
_ROI_ALIGN_CHUNK = 1 << 20

# Ops that tvshim defines and inference does not need.
_UNSUPPORTED = ("qnms", "_roi_align_backward", "qroi_align", "roi_pool", "_roi_pool_backward", "ps_roi_align",
                "_ps_roi_align_backward", "ps_roi_pool", "_ps_roi_pool_backward", "deform_conv2d",
                "_deform_conv2d_backward", "box_iou_rotated")


def nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``torchvision::nms`` on CPU: see `service.ops.boxes.nms`, which computes it.

    Args:
        dets (Tensor[N, 4]): float32 or float64 boxes in (x1, y1, x2, y2) format.
        scores (Tensor[N]): same dtype as ``dets``.
        iou_threshold (float): discard boxes whose IoU with a higher-scoring kept box is
            strictly greater.

    Returns:
        Tensor[K] int64: kept indices by decreasing score, ties in index order.
    """
    if dets.dim() != 2:
        raise RuntimeError(f"boxes should be a 2d tensor, got {dets.dim()}D")
    if dets.size(1) != 4:
        raise RuntimeError(f"boxes should have 4 elements in dimension 1, got {dets.size(1)}")
    if scores.dim() != 1:
        raise RuntimeError(f"scores should be a 1d tensor, got {scores.dim()}D")
    if dets.size(0) != scores.size(0):
        raise RuntimeError("boxes and scores should have same number of elements in dimension 0, "
                           f"got {dets.size(0)} and {scores.size(0)}")
    if dets.dtype != scores.dtype:
        raise RuntimeError(f"dets should have the same type as scores, got {dets.dtype} and {scores.dtype}")
    if dets.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f'"nms_kernel" not implemented for {dets.dtype}')
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    keep = boxes.nms(dets.detach().numpy(), scores.detach().numpy(), iou_threshold)
    return torch.from_numpy(keep)


def roi_align(input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int,
              pooled_width: int, sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """``torchvision::roi_align`` forward on CPU (average pooling of bilinear samples).

    Args:
        input (Tensor[N, C, H, W]): feature maps.
        rois (Tensor[K, 5]): (batch_index, x1, y1, x2, y2) in image coordinates, same
            dtype as ``input``; ``spatial_scale`` maps them onto the feature map.
        pooled_height, pooled_width: output bins per RoI.
        sampling_ratio: samples per bin along each axis; <= 0 means adaptive,
            ``ceil(roi_size / pooled_size)`` per RoI.
        aligned: shift the RoI by -0.5 pixel (Detectron2); when False, RoIs are at least
            1 x 1 feature pixels.

    Returns:
        Tensor[K, C, pooled_height, pooled_width] in ``input``'s dtype. float16/bfloat16
        are computed in float32 and rounded once (torchvision rounds every step).

    The bilinear weights and flat pixel indices of every sample are computed for all
    RoIs at once; feature values are then gathered as rows of a channels-last view of
    the whole batch (one copy at most, never one per RoI), in chunks of RoIs.
    """
    if input.dim() != 4:
        raise RuntimeError(f"input must have shape [N, C, H, W], got {list(input.shape)}")
    if rois.dim() != 2 or rois.size(1) != 5:
        raise RuntimeError(f"rois must have shape as Tensor[K, 5], got {list(rois.shape)}")
    if input.dtype != rois.dtype:
        raise RuntimeError(f"input should have the same type as rois, got {input.dtype} and {rois.dtype}")
    batch, channels, height, width = input.shape
    count = rois.size(0)
    output = input.new_zeros((count, channels, pooled_height, pooled_width))
    if output.numel() == 0:
        return output
    dtype = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32

    def scalar(value) -> torch.Tensor:  # a C++ `T` constant: the value rounded to dtype
        return torch.tensor(value, dtype=dtype)

    r = rois.to(dtype)
    batch_index = r[:, 0].to(torch.int64)  # (int) cast: truncation
    if count and not bool(((r[:, 0] > -1) & (batch_index < batch)).all()):  # NaN fails too
        bad = r[:, 0][~((r[:, 0] > -1) & (batch_index < batch))][0].item()
        raise RuntimeError(f"rois batch index {bad} is outside the batch of {batch}")
    offset = scalar(0.5 if aligned else 0.0)
    scale = scalar(spatial_scale)
    start_w = r[:, 1] * scale - offset
    start_h = r[:, 2] * scale - offset
    roi_width = (r[:, 3] * scale - offset) - start_w
    roi_height = (r[:, 4] * scale - offset) - start_h
    if not aligned:  # force malformed RoIs to be 1x1
        roi_width = torch.where(roi_width < 1, scalar(1.0), roi_width)
        roi_height = torch.where(roi_height < 1, scalar(1.0), roi_height)
    bin_h = roi_height / scalar(float(pooled_height))
    bin_w = roi_width / scalar(float(pooled_width))
    if sampling_ratio > 0:
        grid_h = torch.full((count,), sampling_ratio, dtype=torch.int64)
        grid_w = grid_h
    else:
        grid_h = _ceil_to_int(roi_height / scalar(float(pooled_height)))
        grid_w = _ceil_to_int(roi_width / scalar(float(pooled_width)))

    # One channels-last row per feature pixel of the whole batch: a view when the input
    # already is channels-last, else a single copy.
    rows = input.permute(0, 2, 3, 1).reshape(batch * height * width, channels).to(dtype).contiguous()
    base = batch_index * (height * width)
    per_roi = pooled_height * pooled_width * channels
    step = max(1, _ROI_ALIGN_CHUNK // per_roi)
    # RoIs with the same sample grid go together (one group unless sampling is adaptive);
    # RoIs with an empty grid (a side <= 0) keep their zeros, as in torchvision's loops.
    grid_h, grid_w = grid_h.clamp(min=0), grid_w.clamp(min=0)
    key = grid_h * (int(grid_w.max()) + 1) + grid_w
    for value in torch.unique(key[(grid_h > 0) & (grid_w > 0)]).tolist():
        members = torch.nonzero(key == value).flatten()
        gh, gw = int(grid_h[members[0]]), int(grid_w[members[0]])
        for lo in range(0, len(members), step):
            idx = members[lo:lo + step]
            pooled = _pool(rows, base[idx], height, width, start_h[idx], start_w[idx], bin_h[idx], bin_w[idx],
                           pooled_height, pooled_width, gh, gw, dtype)
            output[idx] = pooled.reshape(len(idx), pooled_height, pooled_width, channels).permute(0, 3, 1, 2).to(
                output.dtype)
    return output


def _ceil_to_int(value: torch.Tensor) -> torch.Tensor:
    """C++'s ``(int) ceil(value)``, with NaN (undefined there) as an empty grid."""
    return torch.nan_to_num(torch.ceil(value), nan=0.0).to(torch.int64)


def _axis(coord: torch.Tensor, size: int, dtype: torch.dtype):
    """roi_align_common.h's bilinear rules along one axis, for sample coordinates
    ``coord``: returns (valid, low, high, l, h) with weights l (to high) and h (to low)."""
    valid = (coord >= -1.0) & (coord <= size)  # NaN: invalid, as in `!(in range)`
    coord = torch.where(valid & (coord > 0), coord, torch.zeros((), dtype=dtype))  # y <= 0 -> 0
    low = coord.to(torch.int64)  # (int) y, y >= 0
    top = low >= size - 1
    low = torch.where(top, size - 1, low)
    high = torch.where(top, size - 1, low + 1)
    coord = torch.where(top, low.to(dtype), coord)
    l = coord - low.to(dtype)  # noqa: E741 - torchvision's name
    h = 1 - l
    return valid, low, high, l, h


def _pool(rows, base, height, width, start_h, start_w, bin_h, bin_w, pooled_height, pooled_width, gh, gw, dtype):
    """Average of ``gh x gw`` bilinear samples per bin, for k RoIs that share that grid.

    Returns ``[k * pooled_height * pooled_width, C]``. The sum runs over the samples in
    torchvision's order (row by row), each sample as ``w1*v1 + w2*v2 + w3*v3 + w4*v4``."""

    def samples(start, bin_size, pooled, grid):  # [k, pooled, grid], in C++'s order of operations
        cell = torch.arange(pooled, dtype=dtype)[None, :, None]
        offset = (torch.arange(grid, dtype=dtype) + 0.5)[None, None, :]
        return (start[:, None, None] + cell * bin_size[:, None, None]) + (
            offset * bin_size[:, None, None]) / torch.tensor(float(grid), dtype=dtype)

    vy, y_low, y_high, ly, hy = _axis(samples(start_h, bin_h, pooled_height, gh), height, dtype)
    vx, x_low, x_high, lx, hx = _axis(samples(start_w, bin_w, pooled_width, gw), width, dtype)

    # Everything per sample as [gh, gw, k, PH, PW], so that each sample is one contiguous slice.
    def along_y(t):  # [k, PH, gh] -> [gh, 1, k, PH, 1]
        return t.permute(2, 0, 1)[:, None, :, :, None]

    def along_x(t):  # [k, PW, gw] -> [1, gw, k, 1, PW]
        return t.permute(2, 0, 1)[None, :, :, None, :]

    valid = along_y(vy) & along_x(vx)
    image = base[None, None, :, None, None]
    zero = torch.zeros((), dtype=dtype)
    corners = []
    for wy, wx, py, px in ((hy, hx, y_low, x_low), (hy, lx, y_low, x_high),
                           (ly, hx, y_high, x_low), (ly, lx, y_high, x_high)):
        weight = torch.where(valid, along_y(wy) * along_x(wx), zero)
        # An invalid sample reads pixel 0 of its image with weight 0, as the C++ does.
        index = torch.where(valid, image + along_y(py) * width + along_x(px), image)
        corners.append((weight.reshape(gh, gw, -1, 1), index.reshape(gh, gw, -1)))
    bins = corners[0][1].size(2)
    total = torch.zeros((bins, rows.size(1)), dtype=dtype)
    value = torch.empty_like(total)
    term = torch.empty_like(total)
    gathered = torch.empty_like(total)
    for iy in range(gh):
        for ix in range(gw):
            for corner, (weight, index) in enumerate(corners):
                torch.index_select(rows, 0, index[iy, ix], out=gathered)
                torch.mul(weight[iy, ix], gathered, out=value if corner == 0 else term)
                if corner:
                    value += term
            total += value
    return total / torch.tensor(float(max(gh * gw, 1)), dtype=dtype)


def _unsupported(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"torchvision::{name} has no CPU kernel in convserve's op shim (service.export._tvops provides nms and "
            "roi_align, which inference needs)")
    return kernel


def register(library) -> None:
    """Register this module's CPU kernels on ``library`` (``torchvision``, DEF)."""
    library.impl("nms", nms, "CPU")
    library.impl("roi_align", roi_align, "CPU")
    for name in _UNSUPPORTED:
        library.impl(name, _unsupported(name), "CPU")

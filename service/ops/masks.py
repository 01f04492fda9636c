"""Pure mask ops: pasting Mask R-CNN masks into the image, COCO RLE and PNG encoding.

numpy and Pillow only (both gateway dependencies already): the gateway imports this,
and the gateway imports no torch.

Coordinate spaces: boxes are (x1, y1, x2, y2) in original-image pixels, the space
torchvision's `GeneralizedRCNNTransform.postprocess` pastes masks in. Full-image masks
are [H, W] (row-major, y first). RLE counts are COCO *uncompressed* RLE: run lengths
over the column-major (Fortran-order) flattening of the mask, starting with a run of
zeros, so ``counts[0]`` is 0 when the top-left pixel is set.

Pasting reproduces torchvision's `paste_masks_in_image` bit for bit (the float values,
not only the thresholded mask), so a mask served by the gateway equals the one eager
torchvision would draw:

1. `expand_masks`: pad each M x M mask with one zero pixel on every side, and scale its
   box about its centre by (M + 2) / M (`expand_boxes`), in float32; then cast the box to
   int64 (truncation toward zero).
2. `paste_mask_in_image`: resize the padded mask to the int box's
   ``(y2 - y1 + 1, x2 - x1 + 1)`` pixels with bilinear interpolation,
   ``align_corners=False``, and copy the part inside the image.
3. The caller thresholds the pasted probabilities: ``pasted > 0.5``.

Step 2 follows torch's CPU kernels exactly (torch 2.x on x86-64 builds with FMA, i.e.
the AVX2/AVX512 kernels): source positions are computed in double and rounded to
float32, and the four taps are combined with fused multiply-adds in the order torch's
two kernels use. Which kernel torch picks depends on the output size (see
`_TORCH_SMALL_OUTPUT`). OpenCV's `cv2.resize(INTER_LINEAR)` samples the same positions
but rounds differently (it differs from torch in the last bits of ~85% of pixels), so
it is not used. A fused multiply-add is emulated in float64, which rounds twice; that
differs from a true FMA only when the float64 result sits exactly on a float32 tie
(about one value in 2**28), and changes a mask only when that value is also within one
ulp of the threshold.

Only the part of each box that lies inside the image is interpolated, and only boxes
that are passed in are pasted: callers filter candidates first.
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

# torchvision's `paste_masks_in_image(padding=1)`: one zero pixel around the M x M mask,
# so the mask fades out at the box border instead of being cut.
MASK_PADDING = 1
# torchvision's `paste_mask_in_image`: an int box (x1, x2) covers x2 - x1 + 1 pixels.
_TO_REMOVE = 1
# The usual binarization of Mask R-CNN's pasted probabilities (torchvision's COCO
# evaluation, `masks > 0.5`).
MASK_THRESHOLD = 0.5
# torch's `upsample_bilinear2d` on CPU uses its channels-last kernel (four taps summed
# in one expression) when output height + width <= 128, and the generic separable kernel
# (width pass, then height pass) above; the two round differently.
_TORCH_SMALL_OUTPUT = 128
# Logit values gathered per step when interpolating a label map's boundary pixels:
# bounds the float64 temporaries to a few tens of MiB whatever the image size.
_LABEL_MAP_CHUNK = 1 << 20
# PNG zlib level: masks compress well even at level 1, and encoding sits on the
# request path.
PNG_COMPRESSION = 1


# ----------------------------------------------------------------------------- RLE
def encode_rle(mask: np.ndarray) -> tuple[int, int, list[int]]:
    """COCO uncompressed RLE of a binary mask.

    mask: [H, W], bool or any integer dtype (non-zero is foreground).
    Returns (height, width, counts): run lengths over the column-major flattening,
    alternating zeros and ones and starting with zeros; ``sum(counts) == H * W``.
    An empty mask is ``[H * W]``, a full one ``[0, H * W]``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {list(mask.shape)}")
    height, width = mask.shape
    flat = mask.astype(bool, copy=False).ravel(order="F")
    if flat.size == 0:
        return height, width, []
    # Run boundaries: the positions where the value differs from the one before, with an
    # implicit zero before the first pixel.
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if flat[0]:
        changes = np.concatenate(([0], changes))
    return height, width, _counts_from_boundaries(changes, flat.size)


def decode_rle(height: int, width: int, counts) -> np.ndarray:
    """bool [height, width] from COCO uncompressed RLE counts (column-major runs,
    zeros first)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("counts must be a flat list of non-negative run lengths")
    total = int(counts.sum())
    if total != height * width:
        raise ValueError(f"counts sum to {total}, expected height*width = {height}*{width} = {height * width}")
    values = (np.arange(counts.size) % 2).astype(bool)
    return np.repeat(values, counts).reshape(width, height).T


def rle_area(counts) -> int:
    """Foreground pixels of an RLE: the sum of its odd-indexed runs."""
    return int(np.asarray(counts, dtype=np.int64)[1::2].sum())


def _counts_from_boundaries(boundaries: np.ndarray, total: int) -> list[int]:
    """Run lengths from sorted run-start positions (the first starts a run of ones)."""
    edges = np.empty(boundaries.size + 2, dtype=np.int64)
    edges[0] = 0
    edges[1:-1] = boundaries
    edges[-1] = total
    return np.diff(edges).tolist()


def _encode_local_rle(local: np.ndarray, x0: int, y0: int, height: int, width: int) -> list[int]:
    """RLE of a [height, width] mask that is zero outside ``local`` placed at (x0, y0).

    local: bool [h, w] with y0 + h <= height and x0 + w <= width. No full-image array is
    built: the local columns get one zero row above (if y0 > 0) and below (if the local
    block stops above the image's bottom), which stand for the zeros outside the block;
    run starts found in that padded block map back to full-image positions. A run that
    starts at the top pad begins at row 0 of its column: the pixel before it in
    column-major order is the previous column's last row, which is only foreground when
    the block reaches the bottom of the image.
    """
    h, w = local.shape
    top = 1 if y0 > 0 else 0
    bottom = 1 if y0 + h < height else 0
    padded_h = h + top + bottom
    block = np.zeros((w, padded_h), dtype=bool)  # one row per image column
    block[:, top:top + h] = local.T
    flat = block.ravel()
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if flat[0]:
        starts = np.concatenate(([0], starts))
    if flat[-1] and (x0 + w) * height < height * width:
        # The last column's run of ones stops at the block's bottom (no bottom pad),
        # and zeros follow unless that is the image's last pixel.
        starts = np.concatenate((starts, [padded_h * w]))
    if starts.size == 0:
        return [height * width]
    column, row = np.divmod(starts, padded_h)
    row_to_y = np.empty(padded_h, dtype=np.int64)
    if top:
        row_to_y[0] = 0
    row_to_y[top:top + h] = np.arange(y0, y0 + h)
    row_to_y[top + h:] = y0 + h  # the bottom pad
    positions = (x0 + column) * height + row_to_y[row]
    return _counts_from_boundaries(positions, height * width)


# ---------------------------------------------------------------------- mask paste
def expand_boxes(boxes: np.ndarray, mask_size: int, padding: int = MASK_PADDING) -> np.ndarray:
    """torchvision's `expand_boxes(boxes, (M + 2p) / M).to(int64)`.

    boxes: [N, 4] (x1, y1, x2, y2) in original-image pixels, computed in float32 as
    Mask R-CNN's boxes are. Returns int64 [N, 4], truncated toward zero.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scale = np.float32(float(mask_size + 2 * padding) / mask_size)
    half = np.float32(0.5)
    w_half = (boxes[:, 2] - boxes[:, 0]) * half * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * half * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * half
    y_c = (boxes[:, 3] + boxes[:, 1]) * half
    expanded = np.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), axis=1)
    return expanded.astype(np.int64)


@lru_cache(maxsize=2048)
def _linear_taps(in_size: int, out_size: int):
    """torch's bilinear (align_corners=False) taps along one axis: (index0, index1,
    lambda0, lambda1), each [out_size], as `compute_source_index_and_lambda` makes them
    (scale in float32, source position in double rounded to float32)."""
    if in_size == out_size:
        index = np.arange(out_size)
        return _frozen(index, index, np.ones(out_size, np.float32), np.zeros(out_size, np.float32))
    scale = np.float32(in_size) / np.float32(out_size)
    source = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    source = np.maximum(source, np.float32(0))
    index0 = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    lambda1 = np.clip(source - index0.astype(np.float32), np.float32(0), np.float32(1))
    lambda0 = np.float32(1) - lambda1
    index1 = index0 + (index0 < in_size - 1)
    return _frozen(index0, index1, lambda0, lambda1)


def _frozen(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``a * b + c`` with one rounding (emulated in float64: the product of two
    float32 is exact there)."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def resize_bilinear(src: np.ndarray, out_h: int, out_w: int, rows=None, cols=None) -> np.ndarray:
    """torch's ``F.interpolate(src[None, None], size=(out_h, out_w), mode="bilinear",
    align_corners=False)[0, 0]`` on CPU, bit for bit.

    src: float32 [h, w]. ``rows``/``cols`` (slices of the output) compute only that
    window of the output; each output pixel depends only on its own taps, so the window
    equals the same window of the full result. Returns float32 [len(rows), len(cols)].
    """
    src = np.asarray(src, dtype=np.float32)
    rows = rows if rows is not None else slice(0, out_h)
    cols = cols if cols is not None else slice(0, out_w)
    y0, y1, ly0, ly1 = (t[rows] for t in _linear_taps(src.shape[0], out_h))
    x0, x1, lx0, lx1 = (t[cols] for t in _linear_taps(src.shape[1], out_w))
    if out_h + out_w <= _TORCH_SMALL_OUTPUT:
        # Channels-last kernel: out = i00*w00 + i01*w01 + i10*w10 + i11*w11 with the
        # weights' products in float32, contracted as fma(i11, w11, fma(i10, w10,
        # fma(i00, w00, i01 * w01))).
        w00 = ly0[:, None] * lx0[None, :]
        w01 = ly0[:, None] * lx1[None, :]
        w10 = ly1[:, None] * lx0[None, :]
        w11 = ly1[:, None] * lx1[None, :]
        top, bottom = src[y0], src[y1]
        out = top[:, x1] * w01
        out = _fma(top[:, x0], w00, out)
        out = _fma(bottom[:, x0], w10, out)
        return _fma(bottom[:, x1], w11, out)
    # Generic kernel: t(y) = fma(s[y, x0], lx0, s[y, x1] * lx1) along the width, then
    # fma(t(y0), ly0, t(y1) * ly1) along the height.
    across = _fma(src[:, x0], lx0, src[:, x1] * lx1)
    return _fma(across[y0], ly0[:, None], across[y1] * ly1[:, None])


def _check_masks_boxes(masks: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks, dtype=np.float32)
    if masks.ndim == 4 and masks.shape[1] == 1:  # torchvision's [N, 1, M, M]
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, M, M] (or [N, 1, M, M]), got shape {list(masks.shape)}")
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] != masks.shape[0]:
        raise ValueError(f"boxes must be [N, 4] with N = {masks.shape[0]} masks, got shape {list(boxes.shape)}")
    return masks, boxes


def _paste_windows(masks: np.ndarray, boxes: np.ndarray, height: int, width: int):
    """Per instance: (index, probabilities inside the image float32 [y1-y0, x1-x0], x0,
    y0), or None for a box that lies entirely outside the image."""
    padded = np.pad(masks, ((0, 0), (MASK_PADDING, MASK_PADDING), (MASK_PADDING, MASK_PADDING)))
    int_boxes = expand_boxes(boxes, masks.shape[-1]).tolist()
    for i, (bx1, by1, bx2, by2) in enumerate(int_boxes):
        box_w = max(bx2 - bx1 + _TO_REMOVE, 1)
        box_h = max(by2 - by1 + _TO_REMOVE, 1)
        x0, x1 = max(bx1, 0), min(bx2 + 1, width)
        y0, y1 = max(by1, 0), min(by2 + 1, height)
        if x0 >= x1 or y0 >= y1:
            yield i, None, 0, 0
            continue
        window = resize_bilinear(padded[i], box_h, box_w,
                                 rows=slice(y0 - by1, y1 - by1), cols=slice(x0 - bx1, x1 - bx1))
        yield i, window, x0, y0


def paste_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int,
                threshold: float | None = MASK_THRESHOLD) -> np.ndarray:
    """torchvision's `paste_masks_in_image(masks, boxes, (height, width))`, thresholded.

    masks: float32 [N, M, M] (or [N, 1, M, M]) mask probabilities from the mask head.
    boxes: float32 [N, 4] (x1, y1, x2, y2) in original-image pixels.
    Returns bool [N, height, width]: ``pasted > threshold``; with ``threshold=None``,
    the pasted float32 probabilities themselves (what torchvision returns).
    A box entirely outside the image gives an empty mask.
    """
    masks, boxes = _check_masks_boxes(masks, boxes)
    dtype = np.float32 if threshold is None else bool
    out = np.zeros((masks.shape[0], height, width), dtype=dtype)
    limit = None if threshold is None else np.float32(threshold)
    for i, window, x0, y0 in _paste_windows(masks, boxes, height, width):
        if window is not None:
            h, w = window.shape
            out[i, y0:y0 + h, x0:x0 + w] = window if limit is None else window > limit
    return out


def paste_and_encode(masks: np.ndarray, boxes: np.ndarray, height: int, width: int,
                     threshold: float = MASK_THRESHOLD) -> list[list[int]]:
    """COCO uncompressed RLE counts of each ``paste_masks(...)[i]``, for an image of
    ``height`` x ``width``, without building any full-image mask: each instance is
    interpolated and encoded inside its box only.

    masks: float32 [N, M, M]; boxes: float32 [N, 4] (x1, y1, x2, y2) in original-image
    pixels. Returns N lists of run lengths (see `encode_rle`).
    """
    masks, boxes = _check_masks_boxes(masks, boxes)
    limit = np.float32(threshold)
    counts: list[list[int]] = []
    for _, window, x0, y0 in _paste_windows(masks, boxes, height, width):
        if window is None:
            counts.append([height * width])
        else:
            counts.append(_encode_local_rle(window > limit, x0, y0, height, width))
    return counts


# ------------------------------------------------------------------- label maps
def upsample_argmax(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """``F.interpolate(logits[None], (height, width), mode="bilinear",
    align_corners=False)[0].argmax(0)``: per-pixel class ids at the original size.

    logits: float32 [C, h, w] at the model's resolution (scores of any kind: the
    argmax is all that is kept). Returns uint16 [height, width] (int32 when C > 65536).

    This is the evaluation-time rule of semantic segmentation (torchvision's FCN and
    DeepLab heads resize logits bilinearly, then take the argmax), without its C x H x W
    cost: the argmax is taken at model resolution first, and an output pixel whose four
    bilinear taps all carry the same class c gets c, since a non-negative combination
    of logit vectors that each rank c first ranks c first (and float rounding is
    monotonic, so this holds for the rounded values too). Only pixels whose taps
    disagree, i.e. pixels along class boundaries, are interpolated in full, in chunks.

    Those use torch's separable CPU kernel bit for bit (width pass then height pass,
    fused multiply-adds; see `resize_bilinear`), the one torch runs when height + width
    > 128. Two cases can differ from torch, both only at near-ties: a rounding that
    makes two classes' interpolated logits exactly equal inside a uniform region (torch
    then takes the lower index), and tiny outputs (height + width <= 128), for which
    torch uses a vectorized kernel that rounds differently for C > 3.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 3 or 0 in logits.shape:
        raise ValueError(f"logits must be a non-empty [C, h, w] array, got shape {list(logits.shape)}")
    classes, h, w = logits.shape
    dtype = np.uint16 if classes <= np.iinfo(np.uint16).max + 1 else np.int32
    coarse = logits.argmax(axis=0).astype(dtype)
    y0, y1, ly0, ly1 = _linear_taps(h, height)
    x0, x1, lx0, lx1 = _linear_taps(w, width)
    rows0, rows1 = coarse[y0], coarse[y1]
    labels = rows0[:, x0]
    mixed = labels != rows0[:, x1]
    mixed |= labels != rows1[:, x0]
    mixed |= labels != rows1[:, x1]
    ys, xs = np.nonzero(mixed)
    # Channels last, so that each tap gathers one contiguous C-vector.
    pixels = np.ascontiguousarray(logits.transpose(1, 2, 0))
    step = max(1, _LABEL_MAP_CHUNK // classes)
    for lo in range(0, ys.size, step):
        py, px = ys[lo:lo + step], xs[lo:lo + step]
        sy0, sy1, sx0, sx1 = y0[py], y1[py], x0[px], x1[px]
        wx0, wx1 = lx0[px, None], lx1[px, None]
        # [P, C]: the width pass at both source rows, then the height pass.
        top = _fma(pixels[sy0, sx0], wx0, pixels[sy0, sx1] * wx1)
        bottom = _fma(pixels[sy1, sx0], wx0, pixels[sy1, sx1] * wx1)
        values = _fma(top, ly0[py, None], bottom * ly1[py, None])
        labels[py, px] = values.argmax(axis=1)
    return labels


# ----------------------------------------------------------------------------- PNG
def encode_png_mask(mask: np.ndarray) -> bytes:
    """A 1-bit grayscale PNG of a binary mask [H, W] (non-zero is foreground, stored as
    1 = white). Pillow reads it back as mode "1", i.e. a bool array."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {list(mask.shape)}")
    return _png(Image.fromarray(np.ascontiguousarray(mask, dtype=bool)))


def label_map_png(label_map: np.ndarray) -> bytes:
    """A grayscale PNG whose pixel values are class ids: 8-bit when every id is below
    256, else 16-bit.

    label_map: [H, W] of non-negative integers below 65536 (any integer dtype, e.g. an
    argmax's int64), in original-image pixels.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label map must be an integer [H, W] array, got {label_map.dtype} {list(label_map.shape)}")
    low, high = (int(label_map.min()), int(label_map.max())) if label_map.size else (0, 0)
    if low < 0 or high > np.iinfo(np.uint16).max:
        raise ValueError(f"class ids must lie in [0, 65535] for a PNG label map, got [{low}, {high}]")
    dtype = np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16
    # Pillow stores uint8 as mode "L" (8-bit) and uint16 as mode "I;16" (16-bit PNG).
    return _png(Image.fromarray(np.ascontiguousarray(label_map, dtype=dtype)))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESSION)
    return buffer.getvalue()

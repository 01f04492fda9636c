"""Pure box ops over numpy, with torchvision's semantics. No torch.

Boxes are ``float32[N, 4]`` arrays in ``(x1, y1, x2, y2)`` format, in whatever pixel space
the caller works in (the model's input space or the original image's); nothing here
rescales. ``float64`` boxes are computed in float64; any other dtype is cast to float32,
the dtype torchvision's detection heads produce. Boxes must be finite; degenerate
(zero-area) boxes are allowed.

`nms` and `batched_nms` reproduce torchvision's CPU kernel bit for bit: the IoU of a
higher-scoring box ``i`` and a lower-scoring box ``j`` is
``inter / (area_i + area_j - inter)``, evaluated in the boxes' dtype, and ``j`` is
suppressed when that value is *strictly* greater than the (float64) threshold. A pair
of zero-area boxes gives 0/0 = NaN, which is never greater than the threshold, so a
zero-area box never suppresses anything and is never suppressed by one.

Greedy NMS is sequential, but its result is the unique fixed point of
``keep[j] = not any(keep[i] and S[i, j] for i < j)``, where ``S[i, j]`` says that the
i-th box in score order would suppress the j-th. Entry j of that map depends only on
entries before it, so iterating it from ``keep = all True`` makes at least one more
leading entry final per round, and the fixed point is reached in (longest chain of
suppressions + 2) rounds, a handful on detector output. Each round is a masked
matrix-vector product over bit-packed rows, with no loop over boxes or classes.

One sort puts the boxes in (class, score) order. ``S`` is only needed between a box
and the earlier boxes of its own class, so it is evaluated in small square tiles along
that block diagonal, in cache-sized steps. Classes longer than `_BLOCK` are solved in
score-ordered blocks, each first cleared against the boxes already kept; that bounds
memory (a few arrays of `_TILE_PAIRS` floats) and the rounds a chain can take.
"""
from __future__ import annotations

import math

import numpy as np

# Longest class solved in one piece; longer ones go block by block, which bounds both
# memory and the rounds a pathological chain of suppressions can take.
_BLOCK = 256
# Box pairs evaluated per step: float32 temporaries of 128 KiB stay in the L2 cache,
# which made the whole op about twice as fast as 4 MiB steps.
_TILE_PAIRS = 1 << 15
# Candidate tile sizes (bits per stored word) and the fixed cost of one tile pair,
# in pairs: the gathers and mask work done per tile pair rather than per box pair.
_TILES = (8, 16, 32, 64)
_TILE_PAIR_OVERHEAD = 32


def _as_boxes(boxes, name: str = "boxes") -> np.ndarray:
    array = np.asarray(boxes)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4], got {list(array.shape)}")
    if array.dtype != np.float64 and array.dtype != np.float32:
        array = array.astype(np.float32)
    return array


def _as_scores(scores, count: int) -> np.ndarray:
    array = np.asarray(scores)
    if array.shape != (count,):
        raise ValueError(f"scores must have shape [{count}] to match the boxes, got {list(array.shape)}")
    if array.dtype.kind != "f":
        array = array.astype(np.float64)  # negating unsigned ints would wrap
    return array


def box_area(boxes) -> np.ndarray:
    """Areas ``(x2 - x1) * (y2 - y1)`` of ``boxes`` (``[N, 4]``, x1, y1, x2, y2).

    Returns ``[N]`` in the boxes' dtype (float32 unless they are float64). Degenerate
    boxes give 0; inverted boxes (x2 < x1) give negative areas, as in torchvision."""
    b = _as_boxes(boxes)
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def box_iou(boxes1, boxes2) -> np.ndarray:
    """Pairwise IoU of ``boxes1`` (``[N, 4]``) and ``boxes2`` (``[M, 4]``), (x1, y1, x2, y2).

    Returns ``[N, M]`` in the boxes' dtype, ``inter / (area1 + area2 - inter)`` exactly as
    torchvision evaluates it. One deviation, on purpose: where the union is 0 (two
    zero-area boxes), torchvision's ``box_iou`` returns 0/0 = NaN; this returns 0, so that
    a NaN never reaches a caller's comparison or a response. (NMS is not affected: a
    NaN IoU never suppresses and a 0 IoU does not either, for any threshold >= 0.)"""
    a = _as_boxes(boxes1, "boxes1")
    b = _as_boxes(boxes2, "boxes2")
    dtype = np.result_type(a, b)
    a, b = a.astype(dtype, copy=False), b.astype(dtype, copy=False)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype)
    inter, union = _inter_union(a[:, None, :], b[None, :, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    iou[union == 0] = 0
    return iou


def _inter_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersection and union of broadcastable ``[..., 4]`` box arrays, in torchvision's
    order of operations (so float32 results are bit-identical to its CPU kernels)."""
    w = np.minimum(a[..., 2], b[..., 2])
    w -= np.maximum(a[..., 0], b[..., 0])
    np.fmax(w, 0, out=w)  # fmax: a NaN width counts as 0, like std::max(0, w)
    h = np.minimum(a[..., 3], b[..., 3])
    h -= np.maximum(a[..., 1], b[..., 1])
    np.fmax(h, 0, out=h)
    w *= h
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union -= w
    return w, union


def _threshold_below(iou_threshold: float, dtype) -> np.generic:
    """The largest ``dtype`` value t <= iou_threshold, so that ``iou > t`` in ``dtype``
    equals torchvision's ``iou > iou_threshold`` with the IoU widened to double."""
    t = dtype.type(iou_threshold)
    if float(t) > iou_threshold:
        t = np.nextafter(t, dtype.type(-np.inf))
    return t


def _suppression(x1, y1, x2, y2, area, rows, cols, t) -> np.ndarray:
    """``S[r, c]``: box ``cols[c]`` would suppress box ``rows[r]`` (IoU > t).

    ``rows``/``cols`` are broadcastable index arrays into the coordinate arrays. Every
    operation is elementwise and commutative in the two boxes, so the value equals
    torchvision's ``ovr`` whichever of the two has the higher score."""
    w = np.minimum(x2[rows], x2[cols])
    w -= np.maximum(x1[rows], x1[cols])
    np.fmax(w, 0, out=w)  # fmax: a NaN width counts as 0, like std::max(0, w)
    h = np.minimum(y2[rows], y2[cols])
    h -= np.maximum(y1[rows], y1[cols])
    np.fmax(h, 0, out=h)
    w *= h  # intersection
    union = area[rows] + area[cols]
    union -= w
    np.divide(w, union, out=w)
    return w > t


def _tile_pairs(group_start: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile pairs (a, b), b <= a, whose boxes may interact: tile a's rows can only be
    suppressed by earlier boxes of their own group, the earliest at ``group_start``."""
    tiles = len(group_start) // tile
    a = np.arange(tiles)
    first = group_start[a * tile] // tile
    per_a = a - first + 1
    pa = np.repeat(a, per_a)
    pb = np.arange(len(pa)) - np.repeat(np.cumsum(per_a) - per_a, per_a) + np.repeat(first, per_a)
    return pa, pb


def _keep_tiled(coords: tuple[np.ndarray, ...], group_start: np.ndarray, t) -> np.ndarray:
    """Greedy NMS over score-ordered boxes sorted into contiguous groups.

    ``coords`` are (x1, y1, x2, y2, area), each ``[N]``; ``group_start[k]`` is the position
    of the first box of box k's group. Box k can only be suppressed by a kept box in
    ``[group_start[k], k)``. The N x N relation is evaluated in T x T tiles, only for
    tile pairs that hold such pairs, and stored as one bit word per (tile pair, row)."""
    count = len(group_start)
    tile = _choose_tile(group_start)
    word = np.dtype(f"<u{tile // 8}")
    tiles = -(-count // tile)
    pad = tiles * tile - count
    # Pads go last, in an empty group of their own: they neither suppress nor count.
    x1, y1, x2, y2, area = (np.concatenate([c, np.zeros(pad, c.dtype)]) for c in coords)
    group_start = np.concatenate([group_start, np.arange(count, count + pad)])
    pa, pb = _tile_pairs(group_start, tile)
    lanes = np.arange(tile)[:, None]
    # Bit masks of columns [0, k) for k in 0..T, to clip each row to [group_start, row).
    below = np.array([(1 << k) - 1 for k in range(tile + 1)], dtype=np.uint64).astype(word)
    bits = np.empty((tile, len(pa)), word)  # [row lane, tile pair]
    step = max(1, _TILE_PAIRS // (tile * tile))
    with np.errstate(invalid="ignore", divide="ignore"):
        for lo in range(0, len(pa), step):
            # Tile pairs on the last axis, so that every ufunc runs over long contiguous rows.
            rows = pa[lo:lo + step] * tile + lanes  # [T, p] positions
            cols = pb[lo:lo + step] * tile + lanes
            hit = _suppression(x1, y1, x2, y2, area, rows[:, None, :], cols[None, :, :], t)  # [T, T, p]
            bits[:, lo:lo + step] = _pack_columns(hit).view(word)[..., 0]
    # Keep, for each row, only the columns in [group_start[row], row).
    rows = pa * tile + lanes
    col0 = pb * tile
    first = np.minimum(np.maximum(group_start[rows] - col0, 0), tile)
    last = np.minimum(rows - col0, tile)  # >= 0: b <= a
    bits &= below[last]
    bits &= ~below[first]
    words = np.ascontiguousarray(bits.T)  # [tile pair, row lane]
    # Fixed point of keep[j] = not any(keep[i] and S[i, j]); see the module docstring.
    offsets = np.flatnonzero(np.r_[True, pa[1:] != pa[:-1]])  # every tile pairs with itself
    keep = np.ones(tiles * tile, bool)
    for _ in range(count + 2):
        kept_words = np.packbits(keep.reshape(tiles, tile), axis=-1, bitorder="little").view(word)[:, 0]
        hits = np.bitwise_or.reduceat(words & kept_words[pb][:, None], offsets, axis=0)
        new = (hits == 0).ravel()
        if np.array_equal(new, keep):
            return keep[:count]
        keep = new
    raise AssertionError("NMS fixed point did not converge")  # unreachable: see docstring


def _pack_columns(hit: np.ndarray) -> np.ndarray:
    """Bool ``[T, T, p]`` to uint8 ``[T, p, T/8]``: bit c of byte k is column 8k + c.
    Shifting whole planes is about 3x faster than ``np.packbits`` along a middle axis."""
    planes = hit.view(np.uint8)
    tile, _, count = hit.shape
    packed = np.empty((tile, count, tile // 8), np.uint8)
    for k in range(tile // 8):
        byte = planes[:, 8 * k].copy()
        for c in range(1, 8):
            byte |= planes[:, 8 * k + c] << c
        packed[:, :, k] = byte
    return packed


def _choose_tile(group_start: np.ndarray) -> int:
    """The tile size that evaluates the fewest pairs, counting each tile pair's fixed
    cost as `_TILE_PAIR_OVERHEAD` pairs."""
    count = len(group_start)
    costs = []
    for tile in _TILES:
        a = np.arange(-(-count // tile))
        first = group_start[np.minimum(a * tile, count - 1)] // tile
        pairs = int((a - first + 1).sum())
        costs.append(pairs * (tile * tile + _TILE_PAIR_OVERHEAD))
    return _TILES[int(np.argmin(costs))]


def _keep_long(coords: tuple[np.ndarray, ...], t) -> np.ndarray:
    """Greedy NMS for one long score-ordered group, block by block: each block is first
    cleared against the boxes kept before it (final by then), then solved alone. This
    bounds memory and the rounds of any suppression chain."""
    x1, y1, x2, y2, area = coords
    count = len(x1)
    keep = np.zeros(count, bool)
    kept = np.zeros(0, np.int64)
    for start in range(0, count, _BLOCK):
        block = np.arange(start, min(start + _BLOCK, count))
        alive = np.ones(len(block), bool)
        step = max(1, _TILE_PAIRS // len(block))
        with np.errstate(invalid="ignore", divide="ignore"):
            for lo in range(0, len(kept), step):
                hit = _suppression(x1, y1, x2, y2, area, block[:, None], kept[None, lo:lo + step], t)
                alive &= ~hit.any(axis=1)
        block = block[alive]
        if len(block):
            block = block[_keep_tiled(tuple(c[block] for c in coords), np.zeros(len(block), np.int64), t)]
            keep[block] = True
            kept = np.concatenate([kept, block])
    return keep


def _score_order(scores: np.ndarray) -> np.ndarray:
    """Indices by decreasing score, ties in index order: torch's stable descending sort,
    which also puts NaN scores first and treats -0.0 and 0.0 as equal."""
    if scores.dtype != np.float32:
        order = np.argsort(-scores, kind="stable")
        nan = np.isnan(scores)
        if nan.any():
            order = np.concatenate([np.flatnonzero(nan), order[:len(order) - int(nan.sum())]])
        return order
    # Map each score to a uint32 that ascends as the score descends, append the index
    # below it, and sort the unique uint64 keys: twice as fast as a stable argsort.
    bits = (scores + np.float32(0)).view(np.uint32).astype(np.uint64)  # + 0 turns -0.0 into 0.0
    negative = bits >= 1 << 31
    ascending = np.where(negative, bits ^ 0xFFFFFFFF, bits | 1 << 31)  # monotone in the score
    key = np.where(np.isnan(scores), 0, ascending ^ 0xFFFFFFFF)
    key <<= 32
    key |= np.arange(len(scores), dtype=np.uint64)
    key.sort()
    return (key & 0xFFFFFFFF).astype(np.int64)


def _keep_grouped(boxes: np.ndarray, starts: np.ndarray, counts: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Kept mask over ``boxes`` ([N, 4], sorted into contiguous groups, each in score
    order), groups given by ``starts``/``counts``; NMS never crosses groups."""
    t = _threshold_below(iou_threshold, boxes.dtype)
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[:, k]) for k in range(4))
    coords = (x1, y1, x2, y2, (x2 - x1) * (y2 - y1))
    keep = np.zeros(len(boxes), bool)
    long = counts > _BLOCK
    for g in np.flatnonzero(long):
        span = slice(starts[g], starts[g] + counts[g])
        keep[span] = _keep_long(tuple(c[span] for c in coords), t)
    if long.any():
        rest = np.repeat(~long, counts)
        positions = np.flatnonzero(rest)
        starts, counts = np.cumsum(np.r_[0, counts[~long]])[:-1], counts[~long]
        coords = tuple(c[positions] for c in coords)
    else:
        positions = slice(None)
    if len(counts):
        keep[positions] = _keep_tiled(coords, np.repeat(starts, counts), t)
    return keep


def _compact(ids: np.ndarray) -> np.ndarray:
    """``ids`` with the same order, as uint16 when their range allows: numpy sorts those
    with a stable radix sort, several times faster than a merge sort of int64."""
    if ids.dtype.kind not in "iu" or len(ids) == 0:
        return ids
    low, high = int(ids.min()), int(ids.max())
    if high - low < 1 << 16:
        return (ids - low).astype(np.uint16)
    return ids


def nms(boxes, scores, iou_threshold: float) -> np.ndarray:
    """Non-maximum suppression, exactly as ``torchvision.ops.nms`` on CPU.

    Args:
        boxes: ``[N, 4]`` in (x1, y1, x2, y2) format, any one coordinate space.
        scores: ``[N]``.
        iou_threshold: a box is discarded when its IoU with a higher-scoring kept box
            is strictly greater than this.

    Returns:
        int64 ``[K]`` indices of the kept boxes, by decreasing score; equal scores keep
        index order. Empty input gives an empty array.
    """
    b = _as_boxes(boxes)
    s = _as_scores(scores, len(b))
    if len(b) == 0:
        return np.zeros(0, np.int64)
    order = _score_order(s)
    keep = _keep_grouped(b[order], np.zeros(1, np.int64), np.array([len(b)]), iou_threshold)
    return order[keep].astype(np.int64, copy=False)


def batched_nms(boxes, scores, class_ids, iou_threshold: float, *, class_agnostic: bool = False) -> np.ndarray:
    """Class-aware NMS: boxes of different classes never suppress each other.

    Args:
        boxes: ``[N, 4]`` in (x1, y1, x2, y2) format.
        scores: ``[N]``.
        class_ids: integer ``[N]``; ignored when ``class_agnostic`` (plain `nms`).
        iou_threshold: as in `nms`.

    Returns:
        int64 ``[K]`` kept indices by decreasing score, ties in index order. The kept set
        is exactly per-class `nms`, i.e. ``torchvision.ops.batched_nms`` as it runs for
        more than 1000 boxes (``_batched_nms_vanilla``). For fewer, torchvision shifts
        each class by ``class_id * (max_coordinate + 1)`` and runs one NMS; in float32
        that shift can round an IoU lying within an ulp of the threshold to the other
        side, which this function does not imitate.
    """
    b = _as_boxes(boxes)
    s = _as_scores(scores, len(b))
    if class_agnostic:
        return nms(b, s, iou_threshold)
    ids = np.asarray(class_ids)
    if ids.shape != (len(b),):
        raise ValueError(f"class_ids must have shape [{len(b)}] to match the boxes, got {list(ids.shape)}")
    if len(b) == 0:
        return np.zeros(0, np.int64)
    order = _score_order(s)
    # One stable sort by class keeps score order inside each class.
    by_class = order[np.argsort(_compact(ids)[order], kind="stable")]
    sorted_ids = ids[by_class]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    counts = np.diff(np.r_[starts, len(b)])
    keep_sorted = _keep_grouped(b[by_class], starts, counts, iou_threshold)
    keep = np.zeros(len(b), bool)
    keep[by_class[keep_sorted]] = True
    return order[keep[order]].astype(np.int64, copy=False)


def select_detections(boxes, scores, labels, *, score_threshold: float, iou_threshold: float,
                      max_detections: int, class_ids=None, class_agnostic: bool = False) -> np.ndarray:
    """The detections a Detect (or instance Segment) answer returns, best first.

    The order of steps is the API's: ``score > score_threshold`` (strict, as
    torchvision's RoIHeads and Ultralytics' NMS), then the ``class_ids`` filter (empty or
    None: every class), then class-aware NMS (`batched_nms`, or plain `nms` when
    ``class_agnostic``), then the first ``max_detections``. Returns int64 indices into the
    inputs, by decreasing score (ties in index order)."""
    s = _as_scores(scores, len(_as_boxes(boxes)))
    candidates = s > score_threshold
    labels = np.asarray(labels)
    if class_ids is not None and len(class_ids):
        candidates &= np.isin(labels, np.asarray(class_ids))
    idx = np.flatnonzero(candidates)
    kept = batched_nms(np.asarray(boxes)[idx], s[idx], labels[idx], iou_threshold,
                       class_agnostic=class_agnostic)
    return idx[kept[:max_detections]].astype(np.int64, copy=False)


def clip_boxes(boxes, width: int, height: int) -> np.ndarray:
    """``boxes`` ([N, 4], x1, y1, x2, y2) clipped to an image of ``width`` x ``height``."""
    b = np.array(boxes, dtype=np.float32 if np.asarray(boxes).dtype != np.float64 else np.float64)
    np.clip(b[:, 0::2], 0, width, out=b[:, 0::2])
    np.clip(b[:, 1::2], 0, height, out=b[:, 1::2])
    return b


def xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    """[N, 4] (cx, cy, w, h) -> [N, 4] (x1, y1, x2, y2), float32."""
    xywh = xywh.astype(np.float32, copy=False).reshape(-1, 4)
    half = xywh[:, 2:] / 2
    return np.concatenate([xywh[:, :2] - half, xywh[:, :2] + half], axis=1)


# torchvision's Fast/Faster R-CNN box coder: deltas are (dx, dy, dw, dh) scaled by these.
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# torchvision's cap on dw, dh before exp(): boxes at most 1000/16 times the proposal.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def decode_deltas(deltas: np.ndarray, boxes: np.ndarray, weights=BOX_CODER_WEIGHTS,
                  clip: float = BBOX_XFORM_CLIP) -> np.ndarray:
    """torchvision `BoxCoder.decode_single`: deltas float32 [P, 4 M] (dx, dy, dw, dh
    per class) relative to `boxes` float32 [P, 4] (x1, y1, x2, y2) -> boxes
    float32 [P, M, 4] in the proposals' coordinates."""
    boxes = np.asarray(boxes, np.float32)
    d = np.asarray(deltas, np.float32).reshape(len(boxes), -1, 4)
    wx, wy, ww, wh = (np.float32(w) for w in weights)
    widths = (boxes[:, 2] - boxes[:, 0])[:, None]
    heights = (boxes[:, 3] - boxes[:, 1])[:, None]
    ctr_x = boxes[:, 0][:, None] + np.float32(0.5) * widths
    ctr_y = boxes[:, 1][:, None] + np.float32(0.5) * heights
    dx, dy = d[..., 0] / wx, d[..., 1] / wy
    dw = np.minimum(d[..., 2] / ww, np.float32(clip))
    dh = np.minimum(d[..., 3] / wh, np.float32(clip))
    pred_ctr_x, pred_ctr_y = dx * widths + ctr_x, dy * heights + ctr_y
    half_w, half_h = np.float32(0.5) * np.exp(dw) * widths, np.float32(0.5) * np.exp(dh) * heights
    return np.stack([pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h],
                    axis=2).astype(np.float32, copy=False)

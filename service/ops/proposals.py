"""Region proposals for R-CNN and Fast R-CNN: selective search, fast mode.

Gateway side: numpy and OpenCV contrib (`cv2.ximgproc.segmentation`), no torch.

The search runs on a copy of the image resized so that its longer side is
`proposal_side` pixels (its cost grows with the pixel count: about 0.5 s at 300 px,
2 s at 500 px on one CPU core), and the boxes are mapped back to original pixels.

Determinism: OpenCV's selective search ranks its regions with C's ``rand()`` (the set
of regions is deterministic, their order is not). Each search therefore seeds
``rand()`` with a fixed value and runs under a process-wide lock, because ``rand()``'s
state is shared by every thread of the process. The same image always gets the same
proposals, in the same order; searches of concurrent requests run one at a time.
"""
from __future__ import annotations

import ctypes
import threading

import cv2
import numpy as np

# Seed of C's rand() before each search: any fixed value makes the order reproducible.
_RAND_SEED = 0
_LIBC = ctypes.CDLL(None)
_SEARCH_LOCK = threading.Lock()


def selective_search(image: np.ndarray, max_proposals: int, side: int, min_size: float) -> np.ndarray:
    """Selective search (fast mode) proposals for one image.

    Args:
        image: uint8 [H, W, 3] RGB.
        max_proposals: at most this many boxes are returned, in selective search's
            ranking order (best first).
        side: the search runs on the image resized so its longer side is `side` px
            (never upscaled: smaller images are searched at their own size).
        min_size: boxes narrower or shorter than this (original pixels) are dropped,
            as are degenerate ones.

    Returns:
        float32 [P, 4] boxes (x1, y1, x2, y2) in original pixels, P <= max_proposals;
        the same image always gives the same array.
    """
    height, width = image.shape[:2]
    scale = min(side / max(height, width), 1.0)
    small = image if scale == 1.0 else cv2.resize(
        image, (max(1, round(width * scale)), max(1, round(height * scale))),
        interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(small[:, :, ::-1]))  # OpenCV expects BGR
    search.switchToSelectiveSearchFast()
    with _SEARCH_LOCK:
        _LIBC.srand(_RAND_SEED)
        rects = search.process()
    if rects is None or len(rects) == 0:
        return np.zeros((0, 4), np.float32)
    rects = np.asarray(rects, np.float32).reshape(-1, 4)  # x, y, w, h at the search scale
    sx, sy = width / small.shape[1], height / small.shape[0]
    boxes = np.empty_like(rects)
    boxes[:, 0] = rects[:, 0] * sx
    boxes[:, 1] = rects[:, 1] * sy
    boxes[:, 2] = (rects[:, 0] + rects[:, 2]) * sx
    boxes[:, 3] = (rects[:, 1] + rects[:, 3]) * sy
    np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
    # Drop tiny and degenerate boxes, then exact duplicates (a region found by both
    # strategies), keeping the first, best-ranked copy.
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = boxes[(w >= max(min_size, 1e-3)) & (h >= max(min_size, 1e-3))]
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)]
    return np.ascontiguousarray(boxes[:max_proposals])

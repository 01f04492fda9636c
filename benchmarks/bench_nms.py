"""Class-aware NMS speed: service.ops.boxes.batched_nms against the slow reference of
tests/test_boxes.py and, where its compiled ops load, torchvision's CPU kernel.

Run: python benchmarks/bench_nms.py   (pinned to one core and one thread)
"""
from __future__ import annotations

import os

# One thread everywhere, set before numpy/torch load their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from service.ops import boxes  # noqa: E402
from test_boxes import reference_batched_nms  # noqa: E402

SIZES = (1_000, 5_000, 10_000)
CLASSES = 80
IOU_THRESHOLD = 0.5
GOAL_MS_PER_1K = 1.0  # the gateway's budget for NMS, per 1000 candidate boxes
REFERENCE_SIZES = (1_000,)  # the pure-Python reference is O(N^2) in Python: 1k only
IMAGE_SIDE = 640.0


def detector_like(n: int, layout: str, rng: np.random.Generator):
    """``uniform``: boxes anywhere; ``clustered``: jittered copies around a few objects
    per class, the shape of a detector's raw output."""
    classes = rng.integers(0, CLASSES, n)
    if layout == "uniform":
        xy = rng.uniform(0, IMAGE_SIDE, (n, 2))
        wh = rng.uniform(8, 200, (n, 2))
    else:
        objects = rng.uniform(0, IMAGE_SIDE, (CLASSES, 3, 4))
        objects[..., 2:] = rng.uniform(16, 200, (CLASSES, 3, 2))
        picked = objects[classes, rng.integers(0, 3, n)]
        xy = picked[:, :2] + rng.normal(0, 0.08, (n, 2)) * picked[:, 2:]
        wh = picked[:, 2:] * rng.uniform(0.8, 1.25, (n, 2))
    b = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    return b, rng.random(n).astype(np.float32), classes


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def torchvision_nms():
    """torchvision's own batched_nms when its compiled ops load, else (None, why)."""
    try:
        import torch

        from service.export import tvshim

        if not tvshim._native_ops_load():
            return None, "torchvision's compiled ops do not load on this CPU-only torch"
        import torchvision

        torch.set_num_threads(1)
    except ImportError as exc:
        return None, f"not installed ({exc.name})"

    def run(b, s, c):
        return torchvision.ops.batched_nms(torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(c),
                                           IOU_THRESHOLD)
    return run, ""


def main() -> None:
    rng = np.random.default_rng(0)
    tv, why = torchvision_nms()
    header = (f"{'boxes':>6} {'layout':>9} {'kept':>5} {'ours ms':>8} {'ms/1k':>6} {'reference ms':>13} "
              f"{'ref/ours':>9} {'torchvision ms':>15} {'tv/ours':>8}  goal <= {GOAL_MS_PER_1K} ms/1k")
    print(f"batched NMS, {CLASSES} classes, IoU > {IOU_THRESHOLD}, one core; median of repeats")
    print(header)
    print("-" * len(header))
    for layout in ("uniform", "clustered"):
        for n in SIZES:
            b, s, c = detector_like(n, layout, rng)
            keep = boxes.batched_nms(b, s, c, IOU_THRESHOLD)
            ours = median_ms(lambda: boxes.batched_nms(b, s, c, IOU_THRESHOLD), repeats=max(5, 50_000 // n))
            ref = tv_ms = "n/a"
            ref_ratio = tv_ratio = ""
            if n in REFERENCE_SIZES:
                start = time.perf_counter()
                expected = reference_batched_nms(b, s, c, IOU_THRESHOLD)
                ref_value = (time.perf_counter() - start) * 1e3
                assert np.array_equal(keep, expected), "batched_nms differs from the reference"
                ref, ref_ratio = f"{ref_value:.1f}", f"{ref_value / ours:.0f}x"
            if tv is not None:
                tv_value = median_ms(lambda: tv(b, s, c), repeats=max(5, 50_000 // n))
                tv_ms, tv_ratio = f"{tv_value:.2f}", f"{tv_value / ours:.2f}x"
            per_1k = ours / (n / 1000)
            print(f"{n:>6} {layout:>9} {len(keep):>5} {ours:>8.2f} {per_1k:>6.2f} {ref:>13} {ref_ratio:>9} "
                  f"{tv_ms:>15} {tv_ratio:>8}  {'met' if per_1k <= GOAL_MS_PER_1K else 'MISSED'}")
    if tv is None:
        print(f"torchvision: n/a, {why}.")
    postprocess_table(rng)


def postprocess_table(rng: np.random.Generator) -> None:
    """The whole Detect postprocess of one image (decode + threshold + class-aware NMS +
    top-N + mapping back) on a YOLOv8 output at 640 x 640: [84, 8400]."""
    from service.pipelines import detection
    from service.pipelines.common import Context, resize_plan
    from service.spec import ModelSpec, TensorSpec

    anchors, labels = 8400, tuple(str(i) for i in range(CLASSES))
    spec = ModelSpec(name="yolo", task="detection", architecture="yolo",
                     inputs=(TensorSpec("images__0", np.dtype(np.uint8), (3, 640, 640)),),
                     outputs=(TensorSpec("predictions__0", np.dtype(np.float32), (4 + CLASSES, anchors)),),
                     resize_mode="letterbox", output_layout="yolov8", labels=labels)
    context = Context(1280, 720, resize_plan(spec, 1280, 720))
    print(f"\nDetect postprocess, yolov8 [{4 + CLASSES}, {anchors}] at 640, image 1280x720, IoU > 0.7, "
          "max 300; median of repeats")
    print(f"{'candidates':>10} {'kept':>5} {'ms':>7}")
    for candidates in (100, 1_000, 5_000):
        b, s, c = detector_like(anchors, "clustered", rng)
        rows = np.zeros((4 + CLASSES, anchors), np.float32)
        rows[0], rows[1] = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        rows[2], rows[3] = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        rows[4:] = rng.random((CLASSES, anchors), np.float32) * 0.2
        rows[4 + c, np.arange(anchors)] = np.where(np.arange(anchors) < candidates, 0.3 + 0.7 * s, 0.1)
        outputs = {"predictions__0": rows[None]}
        options = detection.DetectOptions(0.25, 0.7, 300)
        kept = len(detection.postprocess(outputs, context, spec, options).scores)
        ms = median_ms(lambda: detection.postprocess(outputs, context, spec, options), repeats=30)
        print(f"{candidates:>10} {kept:>5} {ms:>7.2f}")


if __name__ == "__main__":
    main()

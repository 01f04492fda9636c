"""Mask postprocessing cost: paste + COCO RLE for Mask R-CNN instances on CPU.

    python benchmarks/bench_masks.py [--instances 100] [--height 480] [--width 640] [--no-model]

Times, on the same random 28x28 mask probabilities and boxes (one run, median of
repeats), the gateway's `service.ops.masks` against torchvision's `paste_masks_in_image`
and pycocotools' `encode`, and prints each beside Mask R-CNN's own forward pass (eager
torchvision `maskrcnn_resnet50_fpn`, random weights, one image) and beside its dense
part alone, the lower bound used for the share. The goal: the gateway's
postprocessing stays under 20% of the model's time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.ops import masks  # noqa: E402

MASK_SIZE = 28
# Postprocessing should cost at most this share of the model's forward pass.
BUDGET_SHARE = 0.20


def random_instances(rng, n, height, width):
    """Mask R-CNN-like outputs: probabilities [n, 28, 28] and clipped boxes [n, 4] of
    sizes from a few pixels to half the image."""
    probs = rng.random((n, MASK_SIZE, MASK_SIZE), dtype=np.float32)
    centre = rng.uniform(0, [width, height], size=(n, 2))
    size = rng.uniform(8, [width / 2, height / 2], size=(n, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return probs, boxes


def timed(fn, repeats):
    fn()  # warm caches (tap tables, imports)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def model_forward_s(height, width, instances):
    """[(what, seconds)]: Mask R-CNN's eager forward of one image (random weights, so its
    RPN keeps its full 1000 proposals and the NMS/RoIAlign shims run at full load), and
    its dense part alone (transform, ResNet-50-FPN backbone, RPN head, and the mask head
    on `instances` RoIs): a lower bound of any Mask R-CNN forward at this size, so the
    share printed against it is an upper bound of postprocessing's share. The full
    forward is skipped where the torchvision op kernels are missing."""
    import torch

    from service.export import tvshim

    tvshim.install()
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    image = torch.rand(3, height, width)

    def full():
        model([image])

    def dense():
        images, _ = model.transform([image])
        features = model.backbone(images.tensors)
        model.rpn.head(list(features.values()))
        roi_features = torch.rand(instances, model.backbone.out_channels, 14, 14)
        model.roi_heads.mask_predictor(model.roi_heads.mask_head(roi_features))

    timings = []
    with torch.inference_mode():
        for what, fn in (("maskrcnn_resnet50_fpn eager forward", full),
                         ("maskrcnn dense part (backbone, RPN head, mask head)", dense)):
            try:
                fn()
            except (NotImplementedError, RuntimeError):
                continue
            start = time.perf_counter()
            fn()
            timings.append((what, time.perf_counter() - start))
    return timings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-model", action="store_true", help="skip timing Mask R-CNN's forward pass")
    args = parser.parse_args(argv)

    import torch
    from pycocotools import mask as coco_mask

    from service.export import tvshim

    tvshim.install()
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    h, w, n = args.height, args.width, args.instances
    probs, boxes = random_instances(np.random.default_rng(0), n, h, w)
    binary = masks.paste_masks(probs, boxes, h, w)
    fortran = np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8))  # pycocotools' [H, W, N] layout
    probs_t, boxes_t = torch.from_numpy(probs)[:, None], torch.from_numpy(boxes)

    def tv_paste():
        with torch.inference_mode():
            return paste_masks_in_image(probs_t, boxes_t, (h, w))[:, 0] > 0.5

    def tv_paste_coco_rle():
        pasted = tv_paste().numpy()
        coco_mask.encode(np.asfortranarray(pasted.transpose(1, 2, 0).astype(np.uint8)))

    rows = [
        ("service.ops.masks.paste_and_encode (RLE, no full masks)", lambda: masks.paste_and_encode(probs, boxes, h, w)),
        ("service.ops.masks.paste_masks (bool [N, H, W])", lambda: masks.paste_masks(probs, boxes, h, w)),
        ("service.ops.masks.encode_rle of those masks", lambda: [masks.encode_rle(m) for m in binary]),
        ("pycocotools encode of those masks", lambda: coco_mask.encode(fortran)),
        ("torchvision paste_masks_in_image > 0.5", tv_paste),
        ("torchvision paste + pycocotools encode", tv_paste_coco_rle),
    ]
    results = [(name, timed(fn, args.repeats)) for name, fn in rows]
    reference = dict(results)["torchvision paste + pycocotools encode"]
    timings = [] if args.no_model else model_forward_s(h, w, n)
    model_s = min(seconds for _, seconds in timings) if timings else None  # the conservative one

    print(f"{n} instances, {w}x{h} image, {MASK_SIZE}x{MASK_SIZE} masks; median of {args.repeats} "
          f"(torch threads: {torch.get_num_threads()})")
    header = f"{'step':<55} {'ms':>9} {'vs tv+coco':>11}"
    if model_s:
        header += f" {'of model':>9}"
    print(header)
    print("-" * len(header))
    for name, seconds in results:
        line = f"{name:<55} {seconds * 1e3:>9.2f} {seconds / reference:>10.2f}x"
        if model_s:
            line += f" {seconds / model_s:>8.1%}"
        print(line)
    for what, seconds in timings:
        print(f"{what + ' (1 image)':<55} {seconds * 1e3:>9.1f}")
    if model_s:
        ours = dict(results)["service.ops.masks.paste_and_encode (RLE, no full masks)"]
        verdict = "within" if ours <= BUDGET_SHARE * model_s else "OVER"
        print(f"gateway mask postprocessing = {ours / model_s:.1%} of the model's dense part (the lower bound "
              f"of its time): {verdict} the {BUDGET_SHARE:.0%} budget")


if __name__ == "__main__":
    main()

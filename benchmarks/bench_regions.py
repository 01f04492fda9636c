"""R-CNN vs Fast R-CNN vs Faster R-CNN: per-image latency on the same photos.

R-CNN and Fast R-CNN run the gateway's own steps (selective search proposals, warp or
resize, decoding and NMS) around their TorchScript exports run in this process (what
Triton's CPU backend runs); Faster R-CNN is torchvision's
`fasterrcnn_mobilenet_v3_large_fpn`, eager, with its own transform, RPN and NMS. All
use seeded weights: speed does not depend on training, the regions count does not
either (R-CNN/Fast R-CNN: selective search; Faster R-CNN: the RPN's post-NMS count).

Run: python benchmarks/bench_regions.py [--photos N] [--threads T]   (pinned cores)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png")
MAX_SIDE = 512  # the photos as a phone app might send them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=3, help="how many of the skimage photos")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and pinned cores)")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    cores = sorted(os.sched_getaffinity(0))[:args.threads]
    os.sched_setaffinity(0, set(cores))

    import numpy as np
    import torch

    from service.export import zoo  # noqa: F401  (op shim before torchvision)
    import torchvision

    from helpers import encode, photo
    from service.export.repository import export_model
    from service.ops.imaging import decode_encoded
    from service.pipelines import detection, regions
    from service.pipelines.detection import resolve_options
    from service.spec import ModelSpec

    torch.set_num_threads(args.threads)
    images = [decode_encoded(encode(photo(name, max_side=MAX_SIDE)), "image", 10**8)
              for name in PHOTOS[:args.photos]]
    repo = Path(tempfile.mkdtemp(prefix="bench-regions-"))
    searched = []  # seconds of each selective search, timed inside preprocess
    search = regions.image_proposals

    def timed_search(*a):
        start = time.perf_counter()
        out = search(*a)
        searched.append(time.perf_counter() - start)
        return out

    regions.image_proposals = timed_search

    def region_model(arch: str):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = export_model(arch, repo, max_batch_size=64)
        spec: ModelSpec = result.spec
        model = torch.jit.load(str(result.path / "1" / "model.pt")).eval()
        return spec, model

    def run_regions(spec, model, decoded):
        """(proposals, warp/resize, network, decode + NMS) seconds, and the region count."""
        options = resolve_options({}, spec)
        t0 = time.perf_counter()
        tensors, context = regions.REGION_INPUTS[spec.output_layout](decoded, spec)
        t1 = time.perf_counter()
        inputs = [torch.from_numpy(tensors[t.name]) for t in spec.inputs]
        with torch.inference_mode():
            outs = model(*inputs)
        t2 = time.perf_counter()
        outputs = {t.name: o.numpy() for t, o in zip(spec.outputs, outs)}
        detection.postprocess(outputs, context, spec, options)
        t3 = time.perf_counter()
        return (searched[-1], t1 - t0 - searched[-1], t2 - t1, t3 - t2), len(context.proposals)

    faster = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None).eval()
    counted = []
    faster.rpn.register_forward_hook(lambda module, inputs, output: counted.append(len(output[0][0])))

    def run_faster(decoded):
        tensor = torch.from_numpy(np.asarray(decoded.image).transpose(2, 0, 1).copy()).float() / 255
        t0 = time.perf_counter()
        with torch.inference_mode():
            faster([tensor])
        return (0.0, 0.0, time.perf_counter() - t0, 0.0), counted[-1]

    runners = {arch: (lambda d, m=region_model(arch): run_regions(*m, d)) for arch in ("rcnn", "fast_rcnn")}
    runners["fasterrcnn_mobilenet_v3_large_fpn"] = run_faster
    for run in runners.values():  # warm-up
        run(images[0])
    results = {name: ([], []) for name in runners}
    # Photo by photo, the three models in turn: load from other processes on the machine
    # falls on all three alike.
    for decoded in images:
        for name, run in runners.items():
            timing, count = run(decoded)
            results[name][0].append(count)
            results[name][1].append(timing)
    rows = [(name, counts, timings) for name, (counts, timings) in results.items()]

    print(f"{len(images)} photos (longer side {MAX_SIDE} px), {args.threads} thread(s), per image, mean:\n")
    print("| model | regions | proposals (ms) | warp / resize (ms) | network (ms) | decode + NMS (ms) | total (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, counts, timings in rows:
        cols = [1000 * statistics.mean(t[k] for t in timings) for k in range(4)]
        print(f"| {name} | {statistics.mean(counts):.0f} | {cols[0]:.0f} | {cols[1]:.0f} | {cols[2]:.0f} | "
              f"{cols[3]:.1f} | {sum(cols):.0f} |")
    print("\nFaster R-CNN's network column includes its own resize, RPN and NMS.")


if __name__ == "__main__":
    main()

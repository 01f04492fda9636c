"""TorchScript against ONNX Runtime on the same weights, per default model: why the
embedded CPU profile runs a TorchScript entry's ONNX companion.

Exports each model of the default set (seed 0) once into --workdir/repo, as `convserve
serve` does (`model.pt` plus `model.onnx` where the ONNX export holds parity), then
times one batch-1 forward pass of each file at the model's input size (variable-size
models at --size), alternating the two runtimes call by call so that outside load
falls on both alike, with the same intra-op thread count (--threads, default all cores).
Prints the median per runtime and the ratio TorchScript / ONNX Runtime.

    python benchmarks/bench_runtimes.py [--models resnet18,yolo,...] [--calls 10] [--threads 2]

Not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import machine, table  # noqa: E402


def example_feeds(entry: Path, size: int) -> dict[str, np.ndarray]:
    """One example of each input: a random uint8 image, and boxes (x1, y1, x2, y2
    inside the image) or unit floats for the region models' extra inputs."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    config = text_format.Parse((entry / "configs" / "cpu.pbtxt").read_text(), mc.ModelConfig())
    rng = np.random.default_rng(0)
    feeds = {}
    for tensor in config.input:
        dims = [d if d > 0 else size for d in tensor.dims]
        if tensor.data_type == mc.TYPE_UINT8:
            feeds[tensor.name] = rng.integers(0, 256, (1, *dims), dtype=np.uint8)
        elif len(dims) == 2 and dims[1] == 4:
            corners = np.sort(rng.uniform(0, size, (dims[0], 2, 2)), axis=1)
            feeds[tensor.name] = corners.transpose(0, 2, 1).reshape(1, dims[0], 4)[..., [0, 2, 1, 3]].astype(np.float32)
        else:
            feeds[tensor.name] = rng.random((1, *dims), dtype=np.float32)
    return feeds


def time_model(entry: Path, size: int, calls: int, threads: int) -> tuple[float, float]:
    """Median seconds per call: (TorchScript, ONNX Runtime), alternating."""
    import onnxruntime as ort
    import torch

    from service.export import tvshim

    tvshim.install()  # the region models call torchvision's roi_align
    torch.set_num_threads(threads)
    feeds = example_feeds(entry, size)
    scripted = torch.jit.load(str(entry / "1" / "model.pt")).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(entry / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    tensors = [torch.from_numpy(a) for a in feeds.values()]

    def torchscript():
        with torch.inference_mode():
            scripted(*tensors)

    def onnxruntime():
        session.run(None, feeds)

    for _ in range(2):  # warm-up: TorchScript's profiling runs, ORT's allocations
        torchscript()
        onnxruntime()
    times = {torchscript: [], onnxruntime: []}
    for _ in range(calls):
        for run in times:
            start = time.perf_counter()
            run()
            times[run].append(time.perf_counter() - start)
    return statistics.median(times[torchscript]), statistics.median(times[onnxruntime])


def main(argv=None) -> int:
    from service.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(Settings().default_model_list))
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--size", type=int, default=512, help="input side for variable-size models")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "results" / "runtimes")
    args = parser.parse_args(argv)
    repo = args.workdir / "repo"
    rows = []
    print(f"machine: {machine()}; {args.threads} threads per runtime; load average {os.getloadavg()}", flush=True)
    for model in args.models.split(","):
        entry = repo / model
        if not (entry / "1").is_dir():
            subprocess.run([sys.executable, "-m", "service.cli", "export", model, "--repo", str(repo), "--seed", "0"],
                           cwd=ROOT, check=True)
        if not (entry / "1" / "model.onnx").is_file():
            rows.append([model, "", "", "no ONNX file (the CPU profile runs TorchScript)"])
            continue
        ts, ort_s = time_model(entry, args.size, args.calls, args.threads)
        rows.append([model, f"{ts * 1000:.1f}", f"{ort_s * 1000:.1f}", f"{ts / ort_s:.2f}"])
        print(f"  {model}: done", flush=True)
    print(table("TorchScript vs ONNX Runtime, batch 1, median ms per call",
                ["model", "TorchScript ms", "ONNX Runtime ms", "TorchScript / ONNX Runtime"], rows))
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

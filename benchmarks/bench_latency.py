"""Where one request's time goes, at concurrency 1: a per-stage latency breakdown.

Starts its own embedded Triton and gateway (as bench_gateway.py does) on a repository
of seeded resnet18 entries in --workdir, then sends --requests Classify calls one at a
time (640x480 JPEGs of the five scikit-image photos) and splits their mean latency
into stages from three independent sources:

- the gateway's own stage timers (`convserve_stage_duration_seconds`: pool wait,
  decode, preprocess, infer, postprocess) and its request timer
  (`convserve_request_duration_seconds`), scraped from /metrics before and after;
- Triton's per-model statistics (`ModelStatistics` over gRPC: queue, compute input,
  compute infer, compute output, and the request total);
- the same model file run in this process (ONNX Runtime or torch, as the backend does,
  with the backend's thread count) on the same tensor: the model's own time, so what
  Triton's compute-infer adds on top of it is the python backend's transfer to and
  from its stub process.

The calls of each mode are interleaved in blocks (gateway, Triton direct with the
gateway's tensors, in-process), so outside load falls on all of them alike.
With --py-spy, a sampling profile of the gateway process during one more block is
summarized (the functions holding most samples, the event loop and the pool apart).

    python benchmarks/bench_latency.py [--requests 200] [--models resnet18_onnx,resnet18] [--py-spy]

Not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers_kserve_model as peers  # noqa: E402
from bench_gateway import Stack, delta, machine, metric, scrape, table  # noqa: E402
from bench_peers import photos  # noqa: E402

STAGES = ("pool_wait", "decode", "preprocess", "infer", "postprocess")
MESSAGE_BYTES = 64 * 1024 * 1024


def export_repository(repo: Path, models: list[str]) -> None:
    for model in models:
        if (repo / model / "1").is_dir():
            continue
        extra = ["--format", "onnx"] if model.endswith("_onnx") else []
        subprocess.run([sys.executable, "-m", "service.cli", "export", model.removesuffix("_onnx"),
                        "--repo", str(repo), "--seed", "0", "--name", model, *extra], cwd=ROOT, check=True)


def gateway_counters(text: str, model: str) -> dict[str, float]:
    out = {}
    for stage in STAGES:
        for kind in ("sum", "count"):
            out[f"{stage}_{kind}"] = metric(text, f"convserve_stage_duration_seconds_{kind}", model=model,
                                            stage=stage)
    for kind in ("sum", "count"):
        out[f"request_{kind}"] = metric(text, f"convserve_request_duration_seconds_{kind}", model=model)
    return out


def triton_statistics(client, model: str) -> dict[str, float]:
    stats = client.get_inference_statistics(model).model_stats
    s = next(m for m in stats if m.name == model).inference_stats
    return {"success_ns": s.success.ns, "success": s.success.count, "queue_ns": s.queue.ns,
            "input_ns": s.compute_input.ns, "infer_ns": s.compute_infer.ns, "output_ns": s.compute_output.ns}


class LocalModel:
    """The entry's model file run in this process, as the embedded backend runs it."""

    def __init__(self, path: Path, threads: int):
        self.kind = path.suffix
        if self.kind == ".onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads > 0:
                options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.feed = self.session.get_inputs()[0].name
        else:
            import torch

            from service.export import tvshim

            tvshim.install()
            if threads > 0:
                torch.set_num_threads(threads)
            self.torch = torch
            self.model = torch.jit.load(str(path), map_location="cpu").eval()

    def __call__(self, tensor: np.ndarray):
        if self.kind == ".onnx":
            return self.session.run(None, {self.feed: tensor})
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(tensor))


def model_file(repo: Path, model: str) -> Path:
    """The file the entry's embedded CPU profile runs."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    config = text_format.Parse((repo / model / "configs" / "cpu.pbtxt").read_text(), mc.ModelConfig())
    return repo / model / "1" / config.default_model_filename


def backend_threads(repo: Path) -> int:
    """The threads an embedded backend's run gets when it is the only one (this benchmark
    calls one request at a time), as `start_triton` chooses them."""
    from service.embedded import repository_thread_counts

    return repository_thread_counts(repo).alone


async def run_blocks(stack: Stack, repo: Path, model: str, jpegs: list[bytes], requests: int, blocks: int,
                     py_spy: Path | None = None) -> dict:
    import grpc
    import tritonclient.grpc as triton_sync
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.grpc import InferInput, InferRequestedOutput

    from service._proto import vision_pb2, vision_pb2_grpc
    from service.pipelines import classification, detection
    from service.pipelines.common import decode_image, ImageInput
    from service.spec import ModelSpec

    stats_client = triton_sync.InferenceServerClient(f"127.0.0.1:{stack.triton_grpc}")
    spec = ModelSpec.from_model_config(stats_client.get_model_config(model).config)
    if spec.task == "classification":
        task, options = classification.TASK, classification.TASK.options({"top_k": 5}, spec)
        method, message = "Classify", vision_pb2.ClassifyRequest
        extra = {"top_k": 5}
    else:
        task, options = detection.TASK, detection.TASK.options({}, spec)
        method, message = "Detect", vision_pb2.DetectRequest
        extra = {}
    tensors = [task.preprocess(decode_image(ImageInput(encoded=j), 0, 10**9), spec, options)[0] for j in jpegs]
    name = spec.image_input.name
    local = LocalModel(model_file(repo, model), backend_threads(repo))

    triton = triton_aio.InferenceServerClient(f"127.0.0.1:{stack.triton_grpc}")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.gateway_port}", options=[
        ("grpc.max_send_message_length", MESSAGE_BYTES), ("grpc.max_receive_message_length", MESSAGE_BYTES)])
    vision = vision_pb2_grpc.VisionStub(channel)
    outputs = [InferRequestedOutput(o.name) for o in spec.outputs]
    requests_pb = [message(model=model, images=[vision_pb2.Image(encoded=j)], **extra) for j in jpegs]
    rpc = getattr(vision, method)

    def infer_inputs(i):
        t = tensors[i % len(tensors)][name]
        tensor = InferInput(name, list(t.shape), "UINT8")
        tensor.set_data_from_numpy(t)
        return [tensor]

    async def gateway(i):
        await rpc(requests_pb[i % len(requests_pb)], timeout=60)

    async def direct(i):
        await triton.infer(model, infer_inputs(i), outputs=outputs)

    async def local_model(i):
        local(tensors[i % len(tensors)][name])

    # The in-process reference: the peer benchmark's Pillow decode + torchvision-style
    # Resize + CenterCrop.
    crop = {"resize_size": spec.resize_size, "interpolation": spec.interpolation,
            "width": spec.input_width, "height": spec.input_height}

    def pillow_prepare(data: bytes) -> np.ndarray:
        return peers.center_crop(Image.open(io.BytesIO(data)).convert("RGB"), crop)

    async def in_process(i):
        local(pillow_prepare(jpegs[i % len(jpegs)]))

    modes = {"gateway": gateway, "triton direct": direct, "model alone": local_model}
    if spec.task == "classification":  # the Pillow reference below is torchvision's Resize + CenterCrop
        modes["in-process (Pillow + model)"] = in_process
    latencies = {m: [] for m in modes}
    gw = collections.Counter()
    tr = collections.Counter()
    for call in modes.values():  # warm-up
        for i in range(10):
            await call(i)
    per_block = max(1, requests // blocks)
    for _ in range(blocks):
        for mode, call in modes.items():
            g0 = gateway_counters(scrape(stack.gateway_metrics), model) if mode == "gateway" else None
            t0 = triton_statistics(stats_client, model)
            for i in range(per_block):
                start = time.perf_counter()
                await call(i)
                latencies[mode].append(time.perf_counter() - start)
            t1 = triton_statistics(stats_client, model)
            if mode == "gateway":
                gw.update(delta(gateway_counters(scrape(stack.gateway_metrics), model), g0))
                tr.update(delta(t1, t0))
    profile = []
    if py_spy:  # one more block of gateway calls under the sampling profiler
        out = py_spy / f"py-spy-{model}.txt"
        seconds = 8
        recorder = subprocess.Popen(
            [_py_spy(), "record", "--pid", str(stack.gateway.pid), "--duration", str(seconds), "--rate", "1000",
             "--format", "raw", "--threads", "--output", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done = 0
        while recorder.poll() is None:
            await gateway(done)
            done += 1
        profile = pyspy_summary(out, done, rate=1000)
    await channel.close()
    await triton.close()
    return {"latencies_ms": {m: [x * 1000 for x in v] for m, v in latencies.items()},
            "gateway": dict(gw), "triton": dict(tr), "py_spy": profile}


def breakdown(result: dict) -> list[tuple[str, float, str]]:
    """Mean ms per stage of a gateway call, each with its source."""
    lat = result["latencies_ms"]
    g, t = result["gateway"], result["triton"]
    n = g.get("request_count") or 1

    def gw(stage):
        return g.get(f"{stage}_sum", 0.0) / n * 1000.0

    ns = t.get("success") or 1
    triton_total = t.get("success_ns", 0) / ns / 1e6
    queue = t.get("queue_ns", 0) / ns / 1e6
    c_in, c_infer, c_out = (t.get(k, 0) / ns / 1e6 for k in ("input_ns", "infer_ns", "output_ns"))
    model_alone = float(np.mean(lat["model alone"]))
    client = float(np.mean(lat["gateway"]))
    request = g.get("request_sum", 0.0) / n * 1000.0
    stages = sum(gw(s) for s in STAGES)
    rows = [
        ("client -> gateway -> client: gRPC, receive and reply", client - request, "client − gateway request timer"),
        ("gateway: handler outside the stages (resolve, convert, event loop)", request - stages,
         "request timer − stage timers"),
        ("gateway: waiting for the preprocessing pool", gw("pool_wait"), "stage timer pool_wait"),
        ("gateway: decode", gw("decode"), "stage timer"),
        ("gateway: preprocess", gw("preprocess"), "stage timer"),
        ("gateway -> Triton: serialize, gRPC, deserialize", gw("infer") - triton_total,
         "stage timer infer − Triton request total"),
        ("Triton: queue (dynamic batcher)", queue, "Triton statistics"),
        ("Triton: compute input + output", c_in + c_out, "Triton statistics"),
        ("Triton: python backend stub transfer + execute loop", c_infer - model_alone,
         "compute infer − the model alone in-process"),
        ("model itself (same file, same threads, in-process)", model_alone, "timed here"),
        ("Triton: other (request bookkeeping)", triton_total - queue - c_in - c_infer - c_out,
         "request total − its parts"),
        ("gateway: postprocess", gw("postprocess"), "stage timer"),
    ]
    return rows


def _py_spy() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


# Frames that say where a busy gateway thread was: the first of these found walking a
# sampled stack from its innermost frame up names the sample.
PROFILE_FRAMES = ("decode_encoded", "_load_jpeg", "jpeg_body", "preprocess", "postprocess", "set_data_from_numpy",
                  "as_numpy", "InferenceServerClient.infer", "_get_inference_request", "SerializeToString",
                  "_run_once", "select", "intercept_service", "Classify", "Detect", "_handle_")


def pyspy_summary(path: Path, requests: int, rate: int) -> list[tuple[str, float]]:
    """py-spy's raw stacks (busy threads only) as ms of thread time per request, named
    by the innermost frame that matches PROFILE_FRAMES (else the innermost frame)."""
    by_frame = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        name = next((f for f in reversed(frames) if any(key in f for key in PROFILE_FRAMES)), frames[-1])
        by_frame[name.split(" (")[0] + " (" + frames[0].split(" (")[0] + ")"] += int(count)
    per_request = 1000.0 / rate / max(1, requests)
    return [(frame, count * per_request) for frame, count in by_frame.most_common(20)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--models", default="resnet18_onnx,resnet18")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "results" / "latency")
    parser.add_argument("--py-spy", action="store_true", help="profile the gateway during one more block")
    parser.add_argument("--no-shared-memory", action="store_true",
                        help="tensors between the gateway and Triton over gRPC (default: shared memory, as serve)")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    repo = args.workdir / "repo"
    args.workdir.mkdir(parents=True, exist_ok=True)
    export_repository(repo, models)
    jpegs = photos()
    stack = Stack(repo, args.workdir, shared_memory=not args.no_shared_memory)
    report = [f"machine: {machine()}", f"load average at start: {os.getloadavg()}",
              f"CONVSERVE_TORCH_THREADS={os.environ.get('CONVSERVE_TORCH_THREADS', '(unset)')}",
              f"tensors between gateway and Triton: {'gRPC' if args.no_shared_memory else 'shared memory'}"]
    results = {}
    try:
        for model in models:
            result = asyncio.run(run_blocks(stack, repo, model, jpegs, args.requests, args.blocks,
                                            args.workdir if args.py_spy else None))
            results[model] = result
            lat = result["latencies_ms"]
            report.append(table(f"## {model}: {len(lat['gateway'])} requests per mode, one at a time",
                                ["mode", "p50 ms", "mean ms", "p90 ms"],
                                [[m, float(np.percentile(v, 50)), float(np.mean(v)), float(np.percentile(v, 90))]
                                 for m, v in lat.items()]))
            report.append(table(f"{model}: stages of a gateway call (mean)", ["stage", "ms", "source"],
                                [[name, float(ms), source] for name, ms, source in breakdown(result)]))
            if args.py_spy:
                report.append(table(f"py-spy, gateway process, {model}: busy thread time per request, "
                                    "by the innermost frame of ours or a library's",
                                    ["frame", "ms per request"],
                                    [[frame[:100], f"{ms:.3f}"] for frame, ms in result["py_spy"]]))
    finally:
        stack.stop()
    report.append(f"\nload average at end: {os.getloadavg()}")
    text = "\n".join(report)
    print(text)
    (args.workdir / "report.txt").write_text(text + "\n")
    (args.workdir / "results.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

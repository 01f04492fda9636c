"""What the gateway costs on top of Triton, measured in one run.

Starts its own embedded Triton and gateway (a subprocess, as in production) on free
ports, with seeded resnet18 entries exported into --workdir (kept and reused), then:

1. Gateway overhead at concurrency 1, 4, 16, closed loop, same photos:
   (a) tritonclient.grpc.aio straight to Triton, tensors preprocessed beforehand;
   (b) the gateway fed JPEG bytes (its decode/preprocess stage times shown apart);
   (c) the gateway fed RawImage at the model's input size (224x224).
   The three modes are interleaved in --rounds short rounds per concurrency, so that
   load from other processes on the machine falls on all of them alike.
2. Dynamic batching on vs off at concurrency 16 (the same model exported twice, the
   second config without `dynamic_batching`), direct to Triton; the average batch Triton
   formed is nv_inference_count / nv_inference_exec_count.
3. ONNX Runtime vs TorchScript for the same weights, direct to Triton.
4. Preprocessing (decode + resize + crop to uint8 CHW), one thread: the gateway's
   pipeline vs plain Pillow, on 640x480 and 1920x1080 JPEGs; plus Pillow with draft()
   (JPEG DCT downscaling: faster, but not torchvision's pixels).

Prints tables, writes results.json and a PNG chart (drawn with Pillow):

    python benchmarks/bench_gateway.py [--seconds 4 --rounds 3] [--chart docs/performance.png]

Not a test: nothing here asserts; the goals are reported as met or missed.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtests.run import free_port, wait_serving  # noqa: E402
from service.ops.imaging import decode_encoded  # noqa: E402
from service.pipelines.common import resize_plan  # noqa: E402

MODEL = "resnet18"
NOBATCH = "resnet18_nobatch"
ONNX = "resnet18_onnx"
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")
CONCURRENCY = (1, 4, 16)
BATCH_CONCURRENCY = 16
JPEG_QUALITY = 90
PREPROCESS_SIZES = ((640, 480), (1920, 1080))
MAX_PIXELS = 40_000_000
MESSAGE_BYTES = 64 * 1024 * 1024
# How long the idle gateway's own CPU use is sampled, to net it out of per-request CPU.
IDLE_SECONDS = 3.0


# ------------------------------------------------------------------ set-up
def export_repository(repo: Path) -> None:
    """resnet18 (TorchScript), resnet18_onnx and resnet18_nobatch, seed 0, exported once."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    def export(*extra):
        subprocess.run([sys.executable, "-m", "service.cli", "export", "resnet18", "--repo", str(repo),
                        "--seed", "0", *extra], cwd=ROOT, check=True)

    if not (repo / MODEL / "1").is_dir():
        export()
    if not (repo / ONNX / "1").is_dir():
        export("--format", "onnx")
    if not (repo / NOBATCH / "1").is_dir():
        shutil.copytree(repo / MODEL, repo / NOBATCH)
        for path in (repo / NOBATCH / "config.pbtxt", repo / NOBATCH / "configs" / "cpu.pbtxt"):
            config = text_format.Parse(path.read_text(), mc.ModelConfig())
            config.name = NOBATCH
            config.ClearField("dynamic_batching")  # Triton's default scheduler: one request per execute
            path.write_text(text_format.MessageToString(config))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def tree_cpu_seconds(pid: int, part=lambda process: "server") -> dict[str, float]:
    """CPU seconds (user + system) used so far by process `pid` and its live
    descendants, summed by `part(process)` (a psutil.Process -> a name)."""
    import psutil

    root = psutil.Process(pid)
    out: dict[str, float] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            name = part(process)
        except psutil.NoSuchProcess:
            continue
        out[name] = out.get(name, 0.0) + times.user + times.system
    return out


class Stack:
    """Embedded Triton + the gateway as its own process, on free ports (tensors between
    them through system shared memory unless `shared_memory` is False)."""

    def __init__(self, repo: Path, workdir: Path, shared_memory: bool = True):
        from service.embedded import start_triton

        self.triton_grpc, self.triton_metrics = free_port(), free_port()
        self.triton = start_triton(repo, http_port=free_port(), grpc_port=self.triton_grpc,
                                   metrics_port=self.triton_metrics, log_path=workdir / "triton.log",
                                   state_dir=workdir / "state")
        self.triton.wait_ready(600)
        self.gateway_port, self.gateway_metrics = free_port(), free_port()
        # Tensors through shared memory, as `convserve serve` runs its co-located gateway.
        env = dict(os.environ, CONVSERVE_MODEL_REPOSITORY=str(workdir / "none"),
                   CONVSERVE_TRITON_SHARED_MEMORY=str(shared_memory).lower(),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.gateway = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "gateway", "--port", str(self.gateway_port),
             "--metrics-port", str(self.gateway_metrics), "--triton-url", f"127.0.0.1:{self.triton_grpc}"],
            cwd=workdir, env=env, stdout=open(workdir / "gateway.log", "wb"), stderr=subprocess.STDOUT)
        wait_serving(f"127.0.0.1:{self.gateway_port}", self.gateway, 60, workdir / "gateway.log")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by the gateway and by Triton with its backend stubs: on
        a saturated machine, CPU per request is what throughput trades against."""
        return {"gateway_cpu_s": sum(tree_cpu_seconds(self.gateway.pid).values()),
                "triton_cpu_s": sum(tree_cpu_seconds(self.triton.process.pid).values())}

    def stop(self) -> None:
        self.gateway.terminate()
        self.gateway.wait(60)
        self.triton.stop()


# ------------------------------------------------------------------ load
async def closed_loop(call, concurrency: int, seconds: float) -> tuple[list[float], float]:
    """`concurrency` workers call `call(worker, n)` back to back for `seconds`;
    returns every latency (s) and the elapsed wall time."""
    latencies: list[float] = []
    start = time.perf_counter()
    stop = start + seconds

    async def worker(w: int) -> None:
        n = 0
        while (t0 := time.perf_counter()) < stop:
            await call(w, n)
            latencies.append(time.perf_counter() - t0)
            n += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return latencies, time.perf_counter() - start


class Phase:
    """Accumulated latencies and metric deltas of one (mode, concurrency) cell."""

    def __init__(self):
        self.latencies: list[float] = []
        self.elapsed = 0.0
        self.triton: dict[str, float] = {}
        self.gateway: dict[str, float] = {}

    def add(self, latencies, elapsed, triton, gateway):
        self.latencies += latencies
        self.elapsed += elapsed
        for target, delta in ((self.triton, triton), (self.gateway, gateway)):
            for key, value in delta.items():
                target[key] = target.get(key, 0.0) + value

    def summary(self, gateway_idle_cpu: float = 0.0) -> dict:
        lat = np.asarray(self.latencies) * 1000.0
        out = {"requests": len(lat), "throughput": len(lat) / self.elapsed if self.elapsed else 0.0,
               "mean_ms": float(lat.mean()) if len(lat) else 0.0,
               "p50_ms": float(np.percentile(lat, 50)) if len(lat) else 0.0,
               "p99_ms": float(np.percentile(lat, 99)) if len(lat) else 0.0}
        t = self.triton
        if t.get("success"):
            out["triton_compute_ms"] = t["compute_us"] / t["success"] / 1000.0
            out["triton_request_ms"] = t["request_us"] / t["success"] / 1000.0
            out["avg_batch"] = t["count"] / t["exec"] if t.get("exec") else 0.0
        if len(lat):
            out["gateway_cpu_ms"] = t.get("gateway_cpu_s", 0.0) / len(lat) * 1000.0
            out["triton_cpu_ms"] = t.get("triton_cpu_s", 0.0) / len(lat) * 1000.0
            # Net of what the idle gateway burns anyway (readiness polls, event loop).
            out["gateway_net_cpu_ms"] = max(
                0.0, t.get("gateway_cpu_s", 0.0) - gateway_idle_cpu * self.elapsed) / len(lat) * 1000.0
        for stage in ("decode", "preprocess", "infer", "postprocess"):
            if self.gateway.get(f"{stage}_count"):
                out[f"gw_{stage}_ms"] = self.gateway[f"{stage}_sum"] / self.gateway[f"{stage}_count"] * 1000.0
        return out


def triton_counters(text: str, model: str) -> dict[str, float]:
    return {
        "success": metric(text, "nv_inference_request_success", model=model),
        "count": metric(text, "nv_inference_count", model=model),
        "exec": metric(text, "nv_inference_exec_count", model=model),
        "compute_us": metric(text, "nv_inference_compute_infer_duration_us", model=model),
        "request_us": metric(text, "nv_inference_request_duration_us", model=model),
    }


def gateway_counters(text: str, model: str) -> dict[str, float]:
    out = {}
    for stage in ("decode", "preprocess", "infer", "postprocess"):
        for kind in ("sum", "count"):
            out[f"{stage}_{kind}"] = metric(text, f"convserve_stage_duration_seconds_{kind}", model=model, stage=stage)
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0.0) for k in after}


# ------------------------------------------------------------------ the modes
class Clients:
    def __init__(self, stack: Stack, spec, photos: list[Image.Image]):
        import grpc
        import tritonclient.grpc.aio as triton_aio
        from tritonclient.grpc import InferInput, InferRequestedOutput

        from service._proto import vision_pb2, vision_pb2_grpc

        self.stack = stack
        self.gateway_idle_cpu = 0.0  # CPU seconds per second the idle gateway uses
        self.triton = triton_aio.InferenceServerClient(f"127.0.0.1:{stack.triton_grpc}", channel_args=[
            ("grpc.max_send_message_length", MESSAGE_BYTES), ("grpc.max_receive_message_length", MESSAGE_BYTES)])
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.gateway_port}", options=[
            ("grpc.max_send_message_length", MESSAGE_BYTES), ("grpc.max_receive_message_length", MESSAGE_BYTES)])
        self.vision = vision_pb2_grpc.VisionStub(self.channel)
        jpegs = [encode_jpeg(p) for p in photos]
        # (a) tensors made beforehand by the gateway's own preprocessing, as InferInputs.
        tensors = [gateway_preprocess(j, spec)[None] for j in jpegs]
        self.infer_inputs = []
        for t in tensors:
            tensor = InferInput(spec.image_input.name, list(t.shape), "UINT8")
            tensor.set_data_from_numpy(t)
            self.infer_inputs.append([tensor])
        self.outputs = [InferRequestedOutput(o.name) for o in spec.outputs]
        # (b) JPEG bytes; (c) RawImage at the model's input size (HWC of the same tensors).
        self.jpeg_requests = [vision_pb2.ClassifyRequest(model=MODEL, images=[vision_pb2.Image(encoded=j)])
                              for j in jpegs]
        self.raw_requests = [vision_pb2.ClassifyRequest(model=MODEL, images=[vision_pb2.Image(raw=vision_pb2.RawImage(
            data=np.ascontiguousarray(t[0].transpose(1, 2, 0)).tobytes(), height=t.shape[2], width=t.shape[3]))])
            for t in tensors]

    def direct(self, model: str):
        async def call(w, n):
            await self.triton.infer(model, self.infer_inputs[(w + n) % len(self.infer_inputs)], outputs=self.outputs)
        return call

    def gateway(self, requests):
        async def call(w, n):
            await self.vision.Classify(requests[(w + n) % len(requests)], timeout=60)
        return call

    async def close(self):
        await self.triton.close()
        await self.channel.close()


async def measure(clients: Clients, cells: list[tuple[str, str, int, object]], seconds: float, rounds: int,
                  warmup_s: float) -> dict:
    """Run every (label, triton model, concurrency, call) cell `rounds` times, interleaved."""
    phases = {label: Phase() for label, *_ in cells}
    for label, model, concurrency, call in cells:  # warm-up: connections, caches, allocator
        await closed_loop(call, concurrency, warmup_s)
    for _ in range(rounds):
        for label, model, concurrency, call in cells:
            stack = clients.stack
            t0, g0, c0 = scrape(stack.triton_metrics), scrape(stack.gateway_metrics), stack.cpu_seconds()
            latencies, elapsed = await closed_loop(call, concurrency, seconds)
            c1 = stack.cpu_seconds()
            t1, g1 = scrape(stack.triton_metrics), scrape(stack.gateway_metrics)
            phases[label].add(latencies, elapsed,
                              {**delta(triton_counters(t1, model), triton_counters(t0, model)), **delta(c1, c0)},
                              delta(gateway_counters(g1, model), gateway_counters(g0, model)))
    return {label: phase.summary(clients.gateway_idle_cpu) for label, phase in phases.items()}


# ------------------------------------------------------------------ preprocessing
def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def pillow_pipeline(data: bytes, resize: int, crop: int, draft: bool = False) -> np.ndarray:
    """The textbook pipeline: open, RGB, Resize(shorter side), CenterCrop, CHW array."""
    image = Image.open(io.BytesIO(data))
    if draft:
        # DCT scaling to the smallest size >= the resize target; changes the pixels.
        scale = resize / min(image.size)
        image.draft("RGB", (int(image.width * scale) + 1, int(image.height * scale) + 1))
    image = image.convert("RGB")
    w, h = image.size
    new = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    image = image.resize(new, Image.BILINEAR)
    left, top = int(round((new[0] - crop) / 2.0)), int(round((new[1] - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def rates(fns: dict, data: list[bytes], seconds: float, rounds: int = 3) -> dict[str, float]:
    """Images per second for each of `fns` over `data`, one thread, interleaved in
    `rounds` so that outside load falls on all alike."""
    counts = {name: 0 for name in fns}
    times = {name: 0.0 for name in fns}
    for fn in fns.values():
        fn(data[0])
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                fn(data[counts[name] % len(data)])
                counts[name] += 1
            times[name] += time.perf_counter() - start
    return {name: counts[name] / times[name] for name in fns}


def gateway_preprocess(data: bytes, spec) -> np.ndarray:
    """The gateway's decode and resize plan for one classifier image: uint8 [3, H, W]."""
    decoded = decode_encoded(data, "bench", MAX_PIXELS)
    return resize_plan(spec, decoded.width, decoded.height).apply(decoded.image)


def bench_preprocess(spec, photos: list[Image.Image], seconds: float) -> dict:
    out = {}
    for w, h in PREPROCESS_SIZES:
        data = [encode_jpeg(p.resize((w, h), Image.LANCZOS)) for p in photos]
        gateway = lambda d: gateway_preprocess(d, spec)  # noqa: E731
        plain = lambda d: pillow_pipeline(d, spec.resize_size, spec.input_width)  # noqa: E731
        draft = lambda d: pillow_pipeline(d, spec.resize_size, spec.input_width, draft=True)  # noqa: E731
        diffs = [np.abs(gateway(d).astype(np.int16) - plain(d)) for d in data]
        out[f"{w}x{h}"] = {**rates({"gateway": gateway, "pillow": plain, "pillow_draft": draft}, data, seconds),
                           "max_abs_diff": int(max(d.max() for d in diffs)),
                           "diff_fraction": float(np.mean([(d > 0).mean() for d in diffs]))}
    return out


# ------------------------------------------------------------------ report
def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [f"\n{title}", "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in cells[1:]]
    return "\n".join(lines)


def report(results: dict) -> str:
    ov, out = results["overhead"], []
    rows = []
    for c in CONCURRENCY:
        a, b, cc = ov[f"a c={c}"], ov[f"b c={c}"], ov[f"c c={c}"]
        for name, r in (("(a) triton direct", a), ("(b) gateway JPEG", b), ("(c) gateway raw", cc)):
            rows.append([c, name, r["throughput"], r["p50_ms"], r["p99_ms"], r.get("triton_compute_ms", 0.0),
                         r.get("gw_decode_ms", 0.0), r.get("gw_preprocess_ms", 0.0), r.get("gateway_net_cpu_ms", 0.0),
                         r.get("triton_cpu_ms", 0.0), f"{r['throughput'] / a['throughput']:.3f}"])
    out.append(table("Gateway overhead (resnet18, closed loop; stage and CPU times per request)",
                     ["conc", "mode", "req/s", "p50 ms", "p99 ms", "triton compute ms", "gw decode ms",
                      "gw preprocess ms", "gw CPU ms (net)", "triton CPU ms", "thr / (a)"], rows))
    rows = []
    for c in CONCURRENCY:
        a, b, cc = ov[f"a c={c}"], ov[f"b c={c}"], ov[f"c c={c}"]
        budget = max(1.0, 0.1 * a.get("triton_compute_ms", 0.0))
        for name, r in (("(b) JPEG", b), ("(c) raw", cc)):
            added = r["mean_ms"] - a["mean_ms"]
            cpu = r.get("gateway_net_cpu_ms", 0.0)
            rows.append([c, name, added, cpu, budget, "met" if added <= budget else "missed",
                         "met" if cpu <= budget else "missed"])
    out.append(table("Gateway-added time per request vs max(1 ms, 10% of Triton compute of (a))",
                     ["conc", "mode", "mean(x)-mean(a) ms", "gw CPU ms (net)", "budget ms", "latency goal",
                      "CPU goal"], rows))
    on, off = results["batching"]["on"], results["batching"]["off"]
    out.append(table(f"Dynamic batching at concurrency {BATCH_CONCURRENCY} (direct to Triton)",
                     ["batching", "req/s", "p50 ms", "p99 ms", "avg batch"],
                     [["on", on["throughput"], on["p50_ms"], on["p99_ms"], on.get("avg_batch", 0.0)],
                      ["off", off["throughput"], off["p50_ms"], off["p99_ms"], off.get("avg_batch", 0.0)]]))
    rows = [[name, c, r["throughput"], r["p50_ms"], r["p99_ms"], r.get("triton_compute_ms", 0.0)]
            for (name, c), r in ((k.rsplit(" c=", 1)[0:1] + [int(k.rsplit("=", 1)[1])], v)
                                 for k, v in results["backends"].items())]
    out.append(table("Backends, same weights (direct to Triton)",
                     ["backend", "conc", "req/s", "p50 ms", "p99 ms", "triton compute ms"], rows))
    rows = [[size, r["gateway"], r["pillow"], r["gateway"] / r["pillow"], r["pillow_draft"],
             f"{r['max_abs_diff']} ({100 * r['diff_fraction']:.3f}% px)"] for size, r in results["preprocess"].items()]
    out.append(table("Preprocessing, decode + resize + crop, images/s on one thread",
                     ["JPEG", "gateway", "Pillow", "gateway / Pillow", "Pillow+draft (inexact)",
                      "max |gateway - Pillow|"], rows))
    out.append("\nGoals")
    for line in goals(results):
        out.append(f"- {line}")
    return "\n".join(out)


def goals(results: dict) -> list[str]:
    ov = results["overhead"]
    a, b, c = ov["a c=16"], ov["b c=16"], ov["c c=16"]
    ratio = c["throughput"] / a["throughput"]
    lines = [f"(c)/(a) throughput at c=16 = {ratio:.3f} (goal >= 0.9): {'met' if ratio >= 0.9 else 'missed'}; "
             f"(b)/(a) = {b['throughput'] / a['throughput']:.3f}"]
    a1, c1 = ov["a c=1"], ov["c c=1"]
    budget = max(1.0, 0.1 * a1.get("triton_compute_ms", 0.0))
    added = c1["mean_ms"] - a1["mean_ms"]
    cpu = c1.get("gateway_net_cpu_ms", 0.0)
    lines.append(f"gateway-added latency (raw, c=1) = {added:.2f} ms, gateway CPU {cpu:.2f} ms per request "
                 f"(goal <= {budget:.2f} ms): latency {'met' if added <= budget else 'missed'}, "
                 f"CPU {'met' if cpu <= budget else 'missed'}")
    on, off = results["batching"]["on"], results["batching"]["off"]
    r = on["throughput"] / off["throughput"]
    lines.append(f"dynamic batching throughput on/off = {r:.3f} (goal >= 1.0), p99 {on['p99_ms']:.1f} vs "
                 f"{off['p99_ms']:.1f} ms (goal: lower), avg batch {on.get('avg_batch', 0):.2f}: "
                 f"{'met' if r >= 1.0 and on['p99_ms'] < off['p99_ms'] else 'missed'}")
    for size, p in results["preprocess"].items():
        q = p["gateway"] / p["pillow"]
        lines.append(f"preprocessing {size}: gateway/Pillow = {q:.2f} (goal >= 1.0): {'met' if q >= 1.0 else 'missed'}")
    return lines


def chart(results: dict, path: Path) -> None:
    """Grouped bar chart (throughput) with Pillow: no plotting library needed."""
    from PIL import ImageDraw

    groups = []
    ov = results["overhead"]
    for c in CONCURRENCY:
        groups.append((f"c={c}", [("a", ov[f"a c={c}"]["throughput"]), ("b", ov[f"b c={c}"]["throughput"]),
                                  ("c", ov[f"c c={c}"]["throughput"])]))
    bt = results["batching"]
    groups.append(("batching c=16", [("on", bt["on"]["throughput"]), ("off", bt["off"]["throughput"])]))
    be = results["backends"]
    groups.append(("c=16 backends", [("TS", be["torchscript c=16"]["throughput"]),
                                     ("ORT", be["onnxruntime c=16"]["throughput"])]))
    colors = [(66, 133, 244), (234, 67, 53), (251, 188, 5)]
    width, height, margin, bar = 900, 420, 60, 44
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    top = max(v for _, bars in groups for _, v in bars) * 1.15
    base = height - margin
    scale = (height - 2 * margin) / top
    draw.text((margin, 15), "resnet18 throughput (req/s): (a) Triton direct, (b) gateway JPEG, (c) gateway raw; "
              "dynamic batching; backends", fill="black")
    draw.line((margin, base, width - 20, base), fill="black")
    step = 10 ** int(np.floor(np.log10(top / 4))) if top > 0 else 1
    for tick in np.arange(0, top, step * max(1, int(top / step / 6))):
        y = base - tick * scale
        draw.line((margin - 4, y, width - 20, y), fill=(225, 225, 225))
        draw.text((8, y - 6), f"{tick:g}", fill="black")
    x = margin + 20
    for name, bars in groups:
        for i, (label, value) in enumerate(bars):
            draw.rectangle((x, base - value * scale, x + bar - 4, base), fill=colors[i % len(colors)])
            draw.text((x + 2, base - value * scale - 14), f"{value:.1f}", fill="black")
            draw.text((x + 10, base + 4), label, fill="black")
            x += bar
        draw.text((x - bar * len(bars), base + 22), name, fill="black")
        x += 40
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average": os.getloadavg()}


# ------------------------------------------------------------------ main
async def run_all(stack: Stack, spec, photos, args) -> dict:
    clients = Clients(stack, spec, photos)
    before = stack.cpu_seconds()["gateway_cpu_s"]
    await asyncio.sleep(IDLE_SECONDS)
    clients.gateway_idle_cpu = (stack.cpu_seconds()["gateway_cpu_s"] - before) / IDLE_SECONDS
    try:
        overhead = {}
        for c in CONCURRENCY:
            cells = [(f"a c={c}", MODEL, c, clients.direct(MODEL)),
                     (f"b c={c}", MODEL, c, clients.gateway(clients.jpeg_requests)),
                     (f"c c={c}", MODEL, c, clients.gateway(clients.raw_requests))]
            overhead.update(await measure(clients, cells, args.seconds, args.rounds, args.warmup))
            print(f"  overhead c={c} done", flush=True)
        batching = await measure(clients, [("on", MODEL, BATCH_CONCURRENCY, clients.direct(MODEL)),
                                           ("off", NOBATCH, BATCH_CONCURRENCY, clients.direct(NOBATCH))],
                                 args.seconds, args.rounds, args.warmup)
        print("  batching done", flush=True)
        cells = []
        for c in (1, 16):
            cells += [(f"torchscript c={c}", MODEL, c, clients.direct(MODEL)),
                      (f"onnxruntime c={c}", ONNX, c, clients.direct(ONNX))]
        backends = await measure(clients, cells, args.seconds, args.rounds, args.warmup)
        print("  backends done", flush=True)
    finally:
        await clients.close()
    return {"overhead": overhead, "batching": batching, "backends": backends}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one measured round per cell")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per cell")
    parser.add_argument("--preprocess-seconds", type=float, default=6.0, help="per pipeline and size")
    parser.add_argument("--backend-threads", type=int, default=0,
                        help="CONVSERVE_TORCH_THREADS for Triton's backends (0: their default, all cores)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "results" / "gateway")
    parser.add_argument("--chart", type=Path, default=None, help="PNG path (default: <workdir>/gateway.png)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    repo = workdir / "model_repository"
    export_repository(repo)
    from service.spec import ModelSpec

    photos = [Image.open(Path(__import__("skimage").__file__).parent / "data" / name).convert("RGB")
              for name in PHOTOS]
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load_average']}", flush=True)
    if args.backend_threads:
        os.environ["CONVSERVE_TORCH_THREADS"] = str(args.backend_threads)  # start_triton passes the env on
    stack = Stack(repo, workdir)
    try:
        import tritonclient.grpc as triton_sync

        with triton_sync.InferenceServerClient(f"127.0.0.1:{stack.triton_grpc}") as client:
            spec = ModelSpec.from_model_config(client.get_model_config(MODEL).config)
        results = asyncio.run(run_all(stack, spec, photos, args))
    finally:
        stack.stop()
    results["preprocess"] = bench_preprocess(spec, photos, args.preprocess_seconds)
    info["load_average_end"] = os.getloadavg()
    results["machine"] = info
    results["settings"] = {"seconds": args.seconds, "rounds": args.rounds, "warmup": args.warmup,
                           "backend_threads": args.backend_threads, "command": " ".join(sys.argv)}
    text = report(results)
    print(text)
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    (workdir / "report.txt").write_text(text + "\n")
    chart_path = args.chart or workdir / "gateway.png"
    chart(results, chart_path)
    print(f"\nresults: {workdir / 'results.json'}; chart: {chart_path}; "
          f"load average at the end {info['load_average_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

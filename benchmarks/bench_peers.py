"""convserve beside its peers: an in-process loop, a pipelined in-process ceiling and
KServe's ModelServer, on the same model file and the same photos.

    .venv/bin/python benchmarks/bench_peers.py [--models resnet18,yolo] [--seconds 4 --rounds 3] [--no-kserve]

Every system runs THE SAME ONNX file (`<workdir>/repo/<entry>/1/model.onnx`, exported
once with seed 0: resnet18_onnx at 224, yolo_onnx at 640) with ONNX Runtime on CPU
(the in-process loops and KServe with intra_op_num_threads = --threads, default
os.cpu_count(); convserve as below), on the same five
scikit-image photos (astronaut, coffee, chelsea, rocket, motorcycle_left), each
resized to 640x480 and sent as the same JPEG bytes (quality 90), cycling. How each
model is fed and read (input and output names, sizes, resize mode, top_k, detection
thresholds) comes from its entry's configs/cpu.pbtxt.

The systems:

- in-process: this process runs `peers_kserve_model.Pipeline`: Pillow decode,
  torchvision's Resize + CenterCrop (resnet18) or Ultralytics' letterbox (YOLO), ORT,
  then softmax + top-5 or Ultralytics' YOLOv8 NMS and box scaling. Concurrency 1 is a
  plain loop; concurrency 8 is 8 threads sharing one ORT session.
- pipelined (concurrency 8 only): the harder reference, a throughput ceiling without
  any serving: one thread decodes and preprocesses into a queue of 8, another runs
  ORT and the postprocessing. Its latency counts from the start of an image's decode,
  so it includes the queue.
- convserve: the embedded Triton and the gateway as bench_gateway.py starts them, with
  convserve's own thread default (adaptive: every core for a run that is alone, the
  cores shared out while runs overlap; --convserve-threads N fixes it) and
  --instances model instances per entry, called with the JPEG bytes through the
  gateway's Classify (top_k from the model) / Detect, grpc.aio closed loop.
- kserve: KServe's ModelServer 0.21 running `peers_kserve_model.py`: a kserve.Model
  whose predict() takes an open-inference-protocol request with one BYTES input (the
  JPEG) and runs the same Pipeline off its event loop; called with tritonclient's
  grpc.aio client (the v2 GRPCInferenceService that KServe implements). KServe 0.21
  needs numpy 2 and grpcio 1.85 while this project pins numpy < 2, so it runs in its
  own virtual environment, built on first use under <workdir>/kserve-venv with the
  same onnxruntime, Pillow and OpenCV versions as this one. --no-kserve skips it.

At start-up every system answers one photo and the answers must agree (resnet18: the
same top-1 class; YOLO: as many detections, boxes within 1 px); the run stops otherwise.
Then, in --rounds rounds, for each concurrency (1 and 8) and each system in turn: a
--warmup, then --seconds measured, so that load from elsewhere falls on all alike.
Pooled over rounds: images/s, p50/p90/p99 latency and the 1-minute load average at
the start and end of each cell; then the ratios and the goals.

CPU per image: each cell also counts the CPU time (user + system, every thread) that
the system under test used while it was measured, per image, in core-milliseconds:
this process for the in-process loops; the gateway, tritonserver and the python
backend stubs (where the model runs) for convserve; KServe's process tree. The
callers' own CPU is not in the remote systems' figures. On a machine whose cores are
saturated, throughput is at most cores x 1000 / (core-ms per image), so the table
says how much of each system's time is the model and how much is serving.

Writes report.txt and results.json to --workdir. Not a test: the goals are reported as
met or missed.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from bench_gateway import (MESSAGE_BYTES, PHOTOS, ROOT, Stack, closed_loop, encode_jpeg, machine, table,
                           tree_cpu_seconds)
import peers_kserve_model as peers

from loadtests.run import free_port  # noqa: E402 (bench_gateway put the repository on sys.path)

MODELS = {"resnet18": "resnet18_onnx", "yolo": "yolo_onnx"}
CONCURRENCY = (1, 8)
PIPELINED = 8  # the pipelined ceiling's concurrency (its queue's depth)
PHOTO_SIZE = (640, 480)
# The start-up check of a detector also runs at a threshold that keeps its this-many best anchors.
CHECK_ANCHORS = 50
SYSTEMS = ("in-process", "pipelined", "convserve", "kserve")
COMPANION = Path(__file__).resolve().parent / "peers_kserve_model.py"
KSERVE = "kserve==0.21.*"
# The goals: (label, numerator cell, denominator cell, kind, goal); kind "ratio" is
# numerator / denominator, "minus" numerator - denominator (p50, ms).
GOALS = (
    ("c=1 p50 convserve / kserve", "convserve c=1", "kserve c=1", "p50 ratio", 1.0),
    ("c=1 p50 convserve - in-process (ms)", "convserve c=1", "in-process c=1", "p50 minus", 3.0),
    ("c=8 images/s convserve / kserve", "convserve c=8", "kserve c=8", "throughput ratio", 1.1),
    ("c=8 images/s convserve / pipelined", "convserve c=8", "pipelined c=8", "throughput ratio", 0.9),
)


# ------------------------------------------------------------------ set-up
def export(repo: Path, model: str, instances: int) -> None:
    if not (repo / MODELS[model] / "1").is_dir():
        subprocess.run([sys.executable, "-m", "service.cli", "export", model, "--format", "onnx", "--repo", str(repo),
                        "--seed", "0", "--instances", str(instances)], cwd=ROOT, check=True)


def recipe(repo: Path, entry: str) -> dict:
    """How the entry's file is fed and read, from its configs/cpu.pbtxt."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from service.spec import ModelSpec

    config = text_format.Parse((repo / entry / "configs" / "cpu.pbtxt").read_text(), mc.ModelConfig())
    spec = ModelSpec.from_model_config(config)
    wanted = {"classification": ("resize_center_crop", "logits"), "detection": ("letterbox", "yolov8")}
    if (spec.resize_mode, spec.output_layout) != wanted.get(spec.task) or not spec.normalize_in_model or \
            (spec.input_layout, spec.channel_order) != ("NCHW", "RGB"):
        raise SystemExit(f"{entry}: the peer pipeline runs uint8 NCHW RGB {wanted}, not {spec.task} with "
                         f"{spec.resize_mode}, {spec.output_layout}, {spec.input_layout} {spec.channel_order}")
    out = {"path": str(repo / entry / "1" / config.default_model_filename), "task": spec.task,
           "input": spec.image_input.name, "output": spec.outputs[0].name, "width": spec.input_width,
           "height": spec.input_height, "resize_size": spec.resize_size, "interpolation": spec.interpolation}
    return {**out, **spec.settings}


def photos() -> list[bytes]:
    data = Path(__import__("skimage").__file__).parent / "data"
    return [encode_jpeg(Image.open(data / name).convert("RGB").resize(PHOTO_SIZE, Image.LANCZOS)) for name in PHOTOS]


def kserve_requirements() -> list[str]:
    """KServe's venv: kserve 0.21 with numpy 2 and grpcio 1.85, and this venv's
    onnxruntime, Pillow and OpenCV versions (the same kernels and decoder)."""
    opencv = next(metadata.version(d) for d in ("opencv-python-headless", "opencv-contrib-python-headless",
                                                "opencv-python", "opencv-contrib-python") if _installed(d))
    return [KSERVE, "grpcio==1.85.*", "numpy>=2", f"onnxruntime=={metadata.version('onnxruntime')}",
            f"pillow=={metadata.version('pillow')}", f"opencv-python-headless=={opencv}"]


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def kserve_venv(path: Path) -> Path:
    """The KServe venv's python, built (or rebuilt when the requirements change) here."""
    python = path / "bin" / "python"
    stamp = path / "peers-requirements.txt"
    wanted = "\n".join(kserve_requirements()) + "\n"
    if not (python.exists() and stamp.exists() and stamp.read_text() == wanted):
        print(f"building KServe's venv in {path} (--no-kserve skips KServe) ...", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
            pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            subprocess.run([*pip, "--upgrade", "pip"], check=True)
            subprocess.run([*pip, *wanted.split()], check=True)
        except subprocess.CalledProcessError as error:
            raise SystemExit(f"could not build KServe's venv ({error}); run with --no-kserve to skip KServe")
        stamp.write_text(wanted)
    return python


def venv_versions(python: Path) -> dict[str, str]:
    names = ["kserve", "grpcio", "numpy", "onnxruntime", "pillow", "opencv-python-headless", "protobuf"]
    code = f"import json; from importlib.metadata import version; print(json.dumps({{n: version(n) for n in {names}}}))"
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


class KServe:
    """KServe's ModelServer serving `recipes` in its own process group, on free ports;
    it dies with this process (parent-death signal) or at `stop`."""

    def __init__(self, python: Path, recipes: dict[str, dict], threads: int, workdir: Path):
        import tritonclient.grpc as triton_sync

        from service.embedded import lifetime

        self.grpc_port = free_port()
        self.log = workdir / "kserve.log"
        self.process = subprocess.Popen(
            lifetime.with_parent_death_signal(
                [str(python), str(COMPANION), "--recipes", json.dumps(recipes), "--threads", str(threads),
                 "--grpc_port", str(self.grpc_port), "--http_port", str(free_port()),
                 "--enable_latency_logging", "false"]),
            cwd=workdir, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 120
        with triton_sync.InferenceServerClient(f"127.0.0.1:{self.grpc_port}") as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"KServe exited ({self.process.returncode}); see {self.log}")
                try:
                    if all(client.is_model_ready(name) for name in recipes):
                        return
                except Exception:  # noqa: BLE001 (not listening yet)
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"KServe not ready after 120 s; see {self.log}")
                time.sleep(0.5)

    def stop(self) -> None:
        for signum, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                pass


# ------------------------------------------------------------------ the systems
def thread_loop(fn, jpegs: list[bytes], concurrency: int, seconds: float) -> tuple[list[float], float]:
    """`concurrency` threads (1: this one, a plain loop) call fn(jpeg) back to back."""
    latencies: list[float] = []
    start = time.perf_counter()
    stop = start + seconds

    def worker(w: int) -> None:
        for n in itertools.count():
            t0 = time.perf_counter()
            if t0 >= stop:
                return
            fn(jpegs[(w + n) % len(jpegs)])
            latencies.append(time.perf_counter() - t0)

    if concurrency == 1:
        worker(0)
    else:
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return latencies, time.perf_counter() - start


def pipelined(pipeline: peers.Pipeline, jpegs: list[bytes], depth: int, seconds: float) -> tuple[list[float], float]:
    """Decode + preprocess on one thread into a queue of `depth`, ORT + postprocess on
    this one; latency from the start of each image's decode."""
    prepared: queue.Queue = queue.Queue(maxsize=depth)
    latencies: list[float] = []
    start = time.perf_counter()
    stop = start + seconds

    def produce() -> None:
        n = 0
        while (t0 := time.perf_counter()) < stop:
            prepared.put((t0, pipeline.prepare(jpegs[n % len(jpegs)])))
            n += 1
        prepared.put(None)

    producer = threading.Thread(target=produce)
    producer.start()
    while (item := prepared.get()) is not None:
        pipeline.finish(item[1])
        latencies.append(time.perf_counter() - item[0])
    producer.join()
    return latencies, time.perf_counter() - start


class Remote:
    """The convserve gateway and KServe, called over gRPC from this process's event loop."""

    def __init__(self, gateway_port: int, kserve_port: int | None):
        import grpc
        import tritonclient.grpc.aio as triton_aio

        from service._proto import vision_pb2, vision_pb2_grpc

        options = [("grpc.max_send_message_length", MESSAGE_BYTES), ("grpc.max_receive_message_length", MESSAGE_BYTES)]
        self.pb = vision_pb2
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway_port}", options=options)
        self.vision = vision_pb2_grpc.VisionStub(self.channel)
        self.kserve = None if kserve_port is None else triton_aio.InferenceServerClient(
            f"127.0.0.1:{kserve_port}", channel_args=options)

    def convserve(self, entry: str, recipe: dict, jpegs: list[bytes], score_threshold: float | None = None):
        """An async call(jpeg index) -> the gateway's response."""
        images = [[self.pb.Image(encoded=j)] for j in jpegs]
        if recipe["task"] == "classification":
            requests = [self.pb.ClassifyRequest(model=entry, images=i, top_k=recipe["top_k"]) for i in images]
            method = self.vision.Classify
        else:
            requests = [self.pb.DetectRequest(model=entry, images=i, score_threshold=score_threshold)
                        for i in images]
            method = self.vision.Detect

        async def call(i: int):
            return await method(requests[i % len(requests)], timeout=120)
        return call

    def kserve_call(self, entry: str, jpegs: list[bytes], score_threshold: float | None = None):
        """An async call(jpeg index) -> KServe's InferResult."""
        from tritonclient.grpc import InferInput

        parameters = None if score_threshold is None else {"score_threshold": repr(score_threshold)}
        inputs = []
        for j in jpegs:
            tensor = InferInput("jpeg", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([j], dtype=object))
            inputs.append([tensor])

        async def call(i: int):
            return await self.kserve.infer(entry, inputs[i % len(inputs)], client_timeout=120, parameters=parameters)
        return call

    async def close(self) -> None:
        await self.channel.close()
        if self.kserve is not None:
            await self.kserve.close()


def gateway_answer(response, task: str) -> dict:
    """The gateway's answer for its one image, as the pipeline's arrays."""
    result = response.results[0]
    if task == "classification":
        return {"indices": np.array([label.index for label in result.labels], np.int64),
                "scores": np.array([label.score for label in result.labels], np.float32)}
    found = result.detections
    return {"boxes": np.array([[d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max] for d in found],
                              np.float32).reshape(-1, 4),
            "scores": np.array([d.label.score for d in found], np.float32),
            "labels": np.array([d.label.index for d in found], np.int64)}


def disagreement(answers: dict[str, dict], recipe: dict) -> str:
    """'' when every system's answer for the photo agrees with the in-process one."""
    ref = answers["in-process"]
    for system, answer in answers.items():
        if recipe["task"] == "classification":
            if answer["indices"].shape != (recipe["top_k"],) or answer["scores"].shape != (recipe["top_k"],):
                return f"{system} answered top-k of shape {answer['indices'].shape}, not ({recipe['top_k']},)"
            if answer["indices"][0] != ref["indices"][0]:
                return f"{system} top-1 is class {answer['indices'][0]}, in-process {ref['indices'][0]}"
            continue
        if len(answer["boxes"]) != len(ref["boxes"]):
            return f"{system} found {len(answer['boxes'])} detections, in-process {len(ref['boxes'])}"
        if len(ref["boxes"]):  # each box has a same-class box within 1 px in the other answer
            gap = np.abs(answer["boxes"][:, None] - ref["boxes"][None]).max(-1)
            gap[answer["labels"][:, None] != ref["labels"][None]] = np.inf
            if max(gap.min(0).max(), gap.min(1).max()) > 1.0:
                return f"{system} boxes differ from in-process ones by up to {gap.min(1).max():.2f} px"
    return ""


def summarize(latencies: list[float], elapsed: float, loads: list[tuple[float, float]],
              cpu_s: dict[str, float]) -> dict:
    lat = np.asarray(latencies) * 1000.0
    p = np.percentile(lat, (50, 90, 99)) if len(lat) else (0.0, 0.0, 0.0)
    per_image = {part: seconds * 1000.0 / len(lat) for part, seconds in cpu_s.items()} if len(lat) else {}
    return {"images": len(lat), "images_per_s": len(lat) / elapsed if elapsed else 0.0, "p50_ms": float(p[0]),
            "p90_ms": float(p[1]), "p99_ms": float(p[2]), "load_start": float(np.mean([a for a, _ in loads])),
            "load_end": float(np.mean([b for _, b in loads])), "loads": loads, "cpu_ms_per_image": per_image}


# ------------------------------------------------------------------ CPU meters
def convserve_cpu_seconds(stack: Stack) -> dict[str, float]:
    """The gateway's CPU, tritonserver's own, and its python backend stubs' (the model)."""
    def part(process) -> str:
        return "stubs" if "triton_python_backend_stub" in " ".join(process.cmdline()) else "tritonserver"

    return {"gateway": sum(tree_cpu_seconds(stack.gateway.pid).values()),
            **tree_cpu_seconds(stack.triton.process.pid, part)}


def own_cpu_seconds() -> dict[str, float]:
    return {"process": time.process_time()}


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {part: after[part] - before.get(part, 0.0) for part in after}


async def agreement(model: str, pipeline: peers.Pipeline, jpeg: bytes, remote: Remote, kserve: bool) -> str:
    """Every system's answer for the first photo, checked against the in-process one;
    stops the run when they disagree. A detector is also checked at a score threshold
    just below its CHECK_ANCHORS-th best anchor's score (a float32 the gateway's float
    field carries exactly), so that decoding, NMS and the boxes' scaling are compared
    even when the model finds nothing at its own threshold (as seeded weights do)."""
    recipe, entry = pipeline.recipe, MODELS[model]
    thresholds = [None]
    if recipe["task"] == "detection":
        ranked = np.sort(peers.best_class(pipeline.forward(pipeline.prepare(jpeg)[0]))[1])[::-1]
        thresholds.append(float(np.nextafter(ranked[CHECK_ANCHORS - 1], np.float32(0))))
    found = []
    for threshold in thresholds:
        answers = {"in-process": pipeline(jpeg, threshold),
                   "pipelined": pipeline.finish(pipeline.prepare(jpeg), threshold),
                   "convserve": gateway_answer(await remote.convserve(entry, recipe, [jpeg], threshold)(0),
                                               recipe["task"])}
        if kserve:
            result = await remote.kserve_call(entry, [jpeg], threshold)(0)
            answers["kserve"] = {name: result.as_numpy(name) for name, _ in peers.ANSWER[recipe["task"]]}
        problem = disagreement(answers, recipe)
        at = "" if threshold is None else f" at score threshold {threshold:.6g}"
        if problem:
            raise SystemExit(f"{model}: the systems disagree on {PHOTOS[0]}{at}: {problem}; not comparing them")
        first = answers["in-process"]
        found.append(f"top-1 class {int(first['indices'][0])}" if recipe["task"] == "classification"
                     else f"{len(first['boxes'])} detections{at or ' at the model threshold'}")
    agreed = f"{' and '.join(found)} in every system ({', '.join(answers)}) on {PHOTOS[0]}"
    if recipe["task"] == "detection":
        agreed += ", boxes within 1 px"
    print(f"{model}: answers agree: {agreed}", flush=True)
    return agreed


async def run_model(model: str, recipe: dict, jpegs: list[bytes], remote: Remote, kserve: bool,
                    meters: dict, args) -> dict:
    """Every cell of one model, interleaved over rounds. `meters`: system -> a function
    returning the CPU seconds that system has used so far, by part."""
    entry = MODELS[model]
    pipeline = peers.Pipeline(recipe, args.threads)
    agreed = await agreement(model, pipeline, jpegs[0], remote, kserve)
    gateway = remote.convserve(entry, recipe, jpegs)
    kserve_call = remote.kserve_call(entry, jpegs) if kserve else None

    async def remote_loop(call, concurrency, seconds):
        return await closed_loop(lambda w, n: call(w + n), concurrency, seconds)

    def runner(system: str, concurrency: int):
        if system == "in-process":
            return lambda s: thread_loop(pipeline, jpegs, concurrency, s)
        if system == "pipelined":
            return lambda s: pipelined(pipeline, jpegs, concurrency, s)
        return lambda s: remote_loop(gateway if system == "convserve" else kserve_call, concurrency, s)

    cells = [(f"{system} c={c}", runner(system, c)) for c in CONCURRENCY for system in SYSTEMS
             if (system != "pipelined" or c == PIPELINED) and (system != "kserve" or kserve)]
    pooled = {label: ([], 0.0, [], {}) for label, _ in cells}
    for r in range(args.rounds):
        for label, run in cells:
            meter = meters[label.rsplit(" c=", 1)[0]]
            load_start = os.getloadavg()[0]
            await _awaited(run(args.warmup))
            cpu_before = meter()
            latencies, elapsed = await _awaited(run(args.seconds))
            used = cpu_used(cpu_before, meter())
            lat, total, loads, cpu = pooled[label]
            pooled[label] = (lat + latencies, total + elapsed, loads + [(load_start, os.getloadavg()[0])],
                             {part: cpu.get(part, 0.0) + used.get(part, 0.0) for part in {*cpu, *used}})
        print(f"  {model}: round {r + 1}/{args.rounds} done", flush=True)
    return {"entry": entry, "recipe": recipe, "agreement": agreed,
            "cells": {label: summarize(*pooled[label]) for label, _ in cells}}


async def _awaited(value):
    """A remote cell's loop is a coroutine, a local one's a finished result."""
    return await value if asyncio.iscoroutine(value) else value


# ------------------------------------------------------------------ report
def compare(cells: dict, numerator: str, denominator: str, kind: str) -> float | None:
    if numerator not in cells or denominator not in cells:
        return None
    key = "p50_ms" if kind.startswith("p50") else "images_per_s"
    a, b = cells[numerator][key], cells[denominator][key]
    if kind.endswith("minus"):
        return a - b
    return a / b if b else None


def goals(results: dict) -> list[dict]:
    rows = []
    for model, out in results["models"].items():
        for label, numerator, denominator, kind, goal in GOALS:
            value = compare(out["cells"], numerator, denominator, kind)
            at_most = kind.startswith("p50")
            if value is None:
                verdict = "not run (KServe skipped)" if "kserve" in denominator else "not run"
            else:
                verdict = "met" if (value <= goal if at_most else value >= goal) else "missed"
            rows.append({"model": model, "goal": label, "measured": value,
                         "target": f"{'<=' if at_most else '>='} {goal:g}", "verdict": verdict})
    return rows


def report(results: dict) -> str:
    info, settings = results["machine"], results["settings"]
    out = [f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}; load average (1/5/15 min) "
           f"{_loads(info['load_average'])} at the start, {_loads(info['load_average_end'])} at the end",
           f"onnxruntime {settings['onnxruntime']}, intra_op_num_threads {settings['threads']} in every system; "
           f"{settings['rounds']} rounds x {settings['seconds']:g} s per cell (+{settings['warmup']:g} s warm-up)",
           f"KServe: {results['kserve']}"]
    for model, res in results["models"].items():
        out.append(f"\n{model} ({res['entry']}): {res['agreement']}")
        rows = [[label.rsplit(" c=", 1)[1], label.rsplit(" c=", 1)[0], r["images_per_s"], r["p50_ms"], r["p90_ms"],
                 r["p99_ms"], r["images"], f"{r['load_start']:.2f} -> {r['load_end']:.2f}"]
                for label, r in res["cells"].items()]
        out.append(table(f"{model}: closed loop, pooled over rounds", ["conc", "system", "images/s", "p50 ms",
                                                                       "p90 ms", "p99 ms", "images", "load 1 min"],
                         rows))
        rows = []
        for c, kind, others in ((1, "p50 ratio", ("kserve", "in-process")),
                                (8, "throughput ratio", ("kserve", "in-process", "pipelined"))):
            for other in others:
                value = compare(res["cells"], f"convserve c={c}", f"{other} c={c}", kind)
                what = "p50 latency" if c == 1 else "images/s"
                rows.append([c, f"{what}: convserve / {other}", "n/a" if value is None else f"{value:.3f}"])
        minus = compare(res["cells"], "convserve c=1", "in-process c=1", "p50 minus")
        rows.append([1, "p50 latency: convserve - in-process (ms)", f"{minus:.2f}"])
        out.append(cpu_table(model, res["cells"], info["cores"]))
        out.append(table(f"{model}: ratios", ["conc", "ratio", "value"], rows))
    rows = [[g["model"], g["goal"], "n/a" if g["measured"] is None else f"{g['measured']:.3f}", g["target"],
             g["verdict"]] for g in results["goals"]]
    out.append(table("Goals", ["model", "goal", "measured", "target", "verdict"], rows))
    return "\n".join(out)


def cpu_table(model: str, cells: dict, cores: int) -> str:
    """Core-ms per image of each cell, by part, and the throughput that CPU allows."""
    rows = []
    for label, r in cells.items():
        parts = r.get("cpu_ms_per_image") or {}
        total = sum(parts.values())
        detail = ", ".join(f"{part} {ms:.2f}" for part, ms in sorted(parts.items(), key=lambda kv: -kv[1]))
        rows.append([label.rsplit(" c=", 1)[1], label.rsplit(" c=", 1)[0], f"{total:.2f}", detail,
                     f"{cores * 1000.0 / total:.1f}" if total else "n/a"])
    return table(f"{model}: CPU per image, core-ms (servers only; {cores} cores)",
                 ["conc", "system", "core-ms/image", "by part", f"images/s at {cores} cores busy"], rows)


def _loads(values) -> str:
    return "/".join(f"{v:.2f}" for v in values)


# ------------------------------------------------------------------ main
async def run_all(stack: Stack, kserve: KServe | None, recipes: dict, jpegs: list[bytes], args) -> dict:
    remote = Remote(stack.gateway_port, kserve.grpc_port if kserve else None)
    meters = {"in-process": own_cpu_seconds, "pipelined": own_cpu_seconds,
              "convserve": lambda: convserve_cpu_seconds(stack)}
    if kserve:
        meters["kserve"] = lambda: tree_cpu_seconds(kserve.process.pid)
    try:
        return {model: await run_model(model, recipes[model], jpegs, remote, kserve is not None, meters, args)
                for model in recipes}
    finally:
        await remote.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per cell and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each measured cell")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="ORT intra_op_num_threads, everywhere")
    parser.add_argument("--instances", type=int, default=1,
                        help="convserve's model instances per entry (convserve export --instances)")
    parser.add_argument("--convserve-threads", type=int, default=0,
                        help="fix convserve's backend threads (CONVSERVE_TORCH_THREADS; 0: its adaptive default)")
    parser.add_argument("--no-kserve", action="store_true", help="skip KServe (e.g. when its venv cannot be built)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "results" / "peers")
    parser.add_argument("--kserve-venv", type=Path, default=None, help="default: <workdir>/kserve-venv")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no server outlives us
    workdir = args.workdir.resolve()
    # The same seed gives the same file; only the entry's instance count differs.
    repo = workdir / ("repo" if args.instances == 1 else f"repo-instances{args.instances}")
    workdir.mkdir(parents=True, exist_ok=True)
    for model in models:
        export(repo, model, args.instances)
    recipes = {model: recipe(repo, MODELS[model]) for model in models}
    jpegs = photos()
    import onnxruntime

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {_loads(info['load_average'])}", flush=True)
    kserve_python, kserve_note = None, "skipped (--no-kserve)"
    if not args.no_kserve:
        kserve_python = kserve_venv((args.kserve_venv or workdir / "kserve-venv").resolve())
        versions = venv_versions(kserve_python)
        kserve_note = "ModelServer in its own venv: " + ", ".join(f"{k} {v}" for k, v in versions.items())
    # convserve runs its own default: adaptive threads (every core for a lone run, the
    # cores shared out while runs overlap), unless --convserve-threads fixes them.
    if args.convserve_threads:
        os.environ["CONVSERVE_TORCH_THREADS"] = str(args.convserve_threads)
    else:
        os.environ.pop("CONVSERVE_TORCH_THREADS", None)
    stack = kserve = None
    try:
        stack = Stack(repo, workdir)
        if kserve_python:
            kserve = KServe(kserve_python, {MODELS[m]: r for m, r in recipes.items()}, args.threads, workdir)
        measured = asyncio.run(run_all(stack, kserve, recipes, jpegs, args))
    finally:
        if kserve:
            kserve.stop()
        if stack:
            stack.stop()
    info["load_average_end"] = os.getloadavg()
    results = {"machine": info, "kserve": kserve_note, "models": measured,
               "settings": {"seconds": args.seconds, "rounds": args.rounds, "warmup": args.warmup,
                            "threads": args.threads, "instances": args.instances,
                            "convserve_threads": args.convserve_threads or "adaptive", "onnxruntime": onnxruntime.__version__,
                            "photos": list(PHOTOS), "photo_size": PHOTO_SIZE, "command": " ".join(sys.argv)}}
    results["goals"] = goals(results)
    text = report(results)
    print(text)
    (workdir / "report.txt").write_text(text + "\n")
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {workdir / 'results.json'}, {workdir / 'report.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

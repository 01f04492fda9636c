"""Locust users that speak gRPC to the convserve gateway.

Every call goes through `GrpcClient`, which fires Locust's `request` event with
request_type "grpc", name "<Method>/<model>", the response time in ms, the response size
in bytes and, on failure, an `RpcFailure` whose text is the gRPC status code name (so
Locust's failure table groups by code: UNAVAILABLE, RESOURCE_EXHAUSTED, ...).

Run it headless (see loadtests/run.py and `make loadtest`):

    locust -f loadtests/locustfile.py --headless -u 8 -r 4 -t 60s --host 127.0.0.1:50051

Configuration: Locust arguments, each also read from an environment variable.

  --task-weights  CONVSERVE_LOAD_WEIGHTS  classify=8,detect=2,segment=1,generate=1
  --task-models   CONVSERVE_LOAD_MODELS   classify=resnet18,detect=yolo,segment=unet,generate=cyclegan
  --image-mix     CONVSERVE_LOAD_IMAGES   astronaut,coffee,chelsea,rocket,motorcycle_left
  --image-sizes   CONVSERVE_LOAD_SIZES    320,640   (longer side in pixels; JPEG encoded)
  --images-per-request CONVSERVE_LOAD_BATCH 1
  --call-timeout  CONVSERVE_LOAD_TIMEOUT_S 30

A task whose model the gateway does not list as ready is dropped at start (its weight
becomes 0), so the default mix runs against any subset of the default models; a run
where no task is left stops with an error instead of measuring nothing.
"""
from __future__ import annotations

import io
import logging
import random
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent
from gevent.lock import Semaphore
from locust import User, events, task
from locust.exception import StopUser

grpc_gevent.init_gevent()  # grpc's own threads would block gevent's loop otherwise

from service._proto import vision_pb2, vision_pb2_grpc  # noqa: E402

log = logging.getLogger("convserve.loadtest")

DEFAULT_WEIGHTS = "classify=8,detect=2,segment=1,generate=1"
DEFAULT_MODELS = "classify=resnet18,detect=yolo,segment=unet,generate=cyclegan"
DEFAULT_IMAGES = "astronaut,coffee,chelsea,rocket,motorcycle_left"
DEFAULT_SIZES = "320,640"
JPEG_QUALITY = 90
# Large enough for a batch of 640-px JPEGs in and a generated image or masks out.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The photos that ship inside scikit-image's wheel, by short name.
PHOTO_FILES = {
    "astronaut": "astronaut.png", "coffee": "coffee.png", "chelsea": "chelsea.png",
    "rocket": "rocket.jpg", "motorcycle_left": "motorcycle_left.png", "motorcycle_right": "motorcycle_right.png",
    "hubble": "hubble_deep_field.jpg", "retina": "retina.jpg",
}
TASKS = ("classify", "detect", "segment", "generate")


@events.init_command_line_parser.add_listener
def _add_arguments(parser):
    group = parser.add_argument_group("convserve", "what the Vision users send")
    group.add_argument("--task-weights", env_var="CONVSERVE_LOAD_WEIGHTS", default=DEFAULT_WEIGHTS,
                       help="task=weight pairs (classify, detect, segment, generate); 0 turns a task off")
    group.add_argument("--task-models", env_var="CONVSERVE_LOAD_MODELS", default=DEFAULT_MODELS,
                       help="task=model pairs")
    group.add_argument("--image-mix", env_var="CONVSERVE_LOAD_IMAGES", default=DEFAULT_IMAGES,
                       help=f"comma list of photos: {', '.join(PHOTO_FILES)}")
    group.add_argument("--image-sizes", env_var="CONVSERVE_LOAD_SIZES", default=DEFAULT_SIZES,
                       help="comma list of longer-side sizes in pixels; each photo is sent at each size")
    group.add_argument("--images-per-request", env_var="CONVSERVE_LOAD_BATCH", type=int, default=1)
    group.add_argument("--call-timeout", env_var="CONVSERVE_LOAD_TIMEOUT_S", type=float, default=30.0,
                       help="gRPC deadline per call, seconds")


def parse_pairs(text: str, what: str) -> dict[str, str]:
    """'a=1,b=2' -> {'a': '1', 'b': '2'}; keys must be known task names."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in TASKS:
            raise ValueError(f"{what}: expected task=value with task in {TASKS}, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


@lru_cache(maxsize=None)
def photo_jpeg(name: str, max_side: int) -> bytes:
    """A real photo as JPEG bytes, downscaled so its longer side is at most `max_side`."""
    import skimage
    from PIL import Image

    if name not in PHOTO_FILES:
        raise ValueError(f"unknown photo {name!r}; choose from {', '.join(PHOTO_FILES)}")
    image = Image.open(Path(skimage.__file__).parent / "data" / PHOTO_FILES[name]).convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class RpcFailure(Exception):
    """A failed call; its text is the status code name, Locust's failure key."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code.name)
        self.code = code
        self.details = details


class GrpcClient:
    """A Vision stub whose calls report to Locust. `call("Classify", "resnet18", request)`."""

    def __init__(self, address: str, environment, timeout_s: float):
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self.stub = vision_pb2_grpc.VisionStub(self.channel)
        self.environment = environment
        self.timeout_s = timeout_s

    def call(self, method: str, model: str, request):
        start = time.perf_counter()
        response, exception, length = None, None, 0
        try:
            response = getattr(self.stub, method)(request, timeout=self.timeout_s)
            length = response.ByteSize()
        except grpc.RpcError as exc:
            exception = RpcFailure(exc.code(), exc.details() or "")
        self.environment.events.request.fire(
            request_type="grpc", name=f"{method}/{model}" if model else method,
            response_time=(time.perf_counter() - start) * 1000.0, response_length=length,
            response=response, context={}, exception=exception)
        return response

    def close(self) -> None:
        self.channel.close()


@dataclass(frozen=True)
class Plan:
    """What the users send: tasks with weight > 0 whose model is served, and the images."""

    tasks: tuple[str, ...]
    weights: tuple[float, ...]
    models: dict
    images: tuple[bytes, ...]
    per_request: int


_plan: Plan | None = None
_plan_lock = Semaphore()  # users start concurrently; the first one asks the gateway


def make_plan(environment, address: str) -> Plan:
    options = environment.parsed_options
    weights = {name: float(w) for name, w in parse_pairs(options.task_weights, "--task-weights").items()}
    models = parse_pairs(options.task_models, "--task-models")
    names = [n.strip() for n in options.image_mix.split(",") if n.strip()]
    sizes = [int(s) for s in options.image_sizes.split(",") if s.strip()]
    images = tuple(photo_jpeg(n, s) for n in names for s in sizes)
    if not images:
        raise ValueError("--image-mix and --image-sizes select no image")
    if options.images_per_request < 1:
        raise ValueError("--images-per-request must be at least 1")
    with grpc.insecure_channel(address) as channel:
        listed = vision_pb2_grpc.VisionStub(channel).ListModels(vision_pb2.ListModelsRequest(), timeout=30)
    ready = {m.name for m in listed.models if m.ready}
    chosen = [t for t in TASKS if weights.get(t, 0) > 0 and t in models]
    kept = [t for t in chosen if models[t] in ready]
    for t in sorted(set(chosen) - set(kept)):
        log.warning("task %s skipped: model %r is not served by %s", t, models[t], address)
    if not kept:
        raise ValueError(f"no task left to run: none of {[models[t] for t in chosen]} is ready at {address} "
                         f"(ready: {sorted(ready)})")
    log.info("load mix: %s; %d images", ", ".join(f"{t}={models[t]} x{weights[t]:g}" for t in kept), len(images))
    return Plan(tuple(kept), tuple(weights[t] for t in kept), models, images, options.images_per_request)


def target_address(host: str | None) -> str:
    if not host:
        raise ValueError("give the gateway address with --host HOST:PORT")
    return host.removeprefix("grpc://").rstrip("/")


class VisionUser(User):
    """One client: picks a task by weight, sends photos from the mix, no think time."""

    # Locust requires a host; ours is the gateway's host:port.
    host = "127.0.0.1:50051"

    def on_start(self):
        global _plan
        address = target_address(self.host)
        with _plan_lock:
            if _plan is None:
                try:
                    _plan = make_plan(self.environment, address)
                except (ValueError, grpc.RpcError) as exc:
                    log.error("cannot start: %s", exc)
                    self.environment.process_exit_code = 2
                    self.environment.runner.quit()
                    raise StopUser() from None
        self.plan = _plan
        self.client = GrpcClient(address, self.environment, self.environment.parsed_options.call_timeout)

    def on_stop(self):
        if getattr(self, "client", None) is not None:
            self.client.close()

    def images(self) -> list:
        return [vision_pb2.Image(encoded=random.choice(self.plan.images)) for _ in range(self.plan.per_request)]

    @task
    def one_call(self):
        kind = random.choices(self.plan.tasks, weights=self.plan.weights)[0]
        model = self.plan.models[kind]
        if kind == "classify":
            self.client.call("Classify", model, vision_pb2.ClassifyRequest(model=model, images=self.images()))
        elif kind == "detect":
            self.client.call("Detect", model, vision_pb2.DetectRequest(model=model, images=self.images()))
        elif kind == "segment":
            self.client.call("Segment", model, vision_pb2.SegmentRequest(
                model=model, images=self.images(), mask_format=vision_pb2.MASK_FORMAT_RLE))
        else:
            self.client.call("Generate", model, vision_pb2.GenerateRequest(model=model, images=self.images()))

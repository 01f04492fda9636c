"""The `convserve` command line: export, triton, gateway, serve, predict.

Heavy imports happen inside each command, so `gateway` and `predict` never load torch.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .gateway import logs
from .settings import load_settings

log = logging.getLogger("convserve")


# ----------------------------------------------------------------------- export
def cmd_export(args) -> int:
    import warnings

    from .export import ExportError

    from .export.files import export_from_file

    from .export.repository import DEFAULT_MAX_BATCH_SIZE, export_model

    warnings.simplefilter("always", UserWarning)
    # The library's warnings as the command's own lines, not Python's file:line form.
    warnings.showwarning = lambda message, *_args, **_kw: print(
        f"convserve export: warning: {message}", file=sys.stderr, flush=True)
    settings = load_settings(model_repository=args.repo)
    common = dict(version=args.version, version_policy=args.version_policy, max_queue_size=args.max_queue_size,
                  instances=args.instances)
    try:
        if args.input_size is not None and len(args.input_size) not in (1, 2):
            raise ExportError(f"--input-size takes H W, or one side for a square, got {args.input_size}")
        if args.from_file:
            # What the file says about itself fills in every flag left out.
            extra = {k: tuple(v) for k, v in (("mean", args.mean), ("std", args.std)) if v}
            # H W, or one side for a square.
            size = None if args.input_size is None else (args.input_size[0], args.input_size[-1])
            result = export_from_file(
                args.from_file, settings.model_repository, task=args.task, name=args.name,
                input_size=size, labels_file=args.labels, layout=args.layout,
                resize_mode=args.resize_mode, input_layout=args.input_layout, channel_order=args.channel_order,
                max_batch_size=args.max_batch_size, **extra, **common)
        else:
            if not args.architecture:
                raise ExportError("name an architecture, or give --from-file")
            if args.input_size is not None and len(set(args.input_size)) != 1:
                raise ExportError(f"zoo architectures take a square --input-size, got {args.input_size}")
            if args.published_if_cached and args.weights is not None:
                raise ExportError("--published-if-cached chooses the weights itself; leave out --weights")
            weights = _published_if_cached(args.architecture) if args.published_if_cached else args.weights
            if args.published_if_cached and weights is None:
                # Already said, with the reason: not again as the library's warning.
                warnings.filterwarnings("ignore", message=".*no --weights given", category=UserWarning)
            result = export_model(
                args.architecture, settings.model_repository, name=args.name, weights=weights,
                labels_file=args.labels, num_classes=args.num_classes, fmt=args.format,
                input_size=args.input_size and args.input_size[0], seed=args.seed,
                options=_parse_options(args.option), cpu_runtime=args.cpu_runtime,
                max_batch_size=DEFAULT_MAX_BATCH_SIZE if args.max_batch_size is None else args.max_batch_size,
                **common)
    except (ExportError, ValueError) as exc:
        print(f"convserve export: error: {exc}", file=sys.stderr)
        return 2
    if result.spec.sources:  # an imported file: copied as given (with its external data), no eager to compare
        print(f"exported {result.name} version {result.version} to {result.path} (the file as given)")
    else:
        print(f"exported {result.name} version {result.version} to {result.path} "
              f"(max abs diff against eager {result.max_abs_diff:.2e})")
    if result.cpu_runtime:
        print(f"  the embedded CPU profile runs it with {result.cpu_runtime}")
    if result.spec.sources:  # an imported file: say where each value came from
        print("  " + ", ".join(f"{key} from {where}" for key, where in result.spec.sources.items()))
    return 0


def _published_if_cached(arch_name: str) -> str | None:
    """`--published-if-cached`: the architecture's DEFAULT published weights when their
    file is already in torch.hub's cache, else None (seeded weights); says which."""
    from .export import hub, zoo

    arch = zoo.get(arch_name)
    path = hub.cached(arch, hub.DEFAULT)
    if path is not None:
        print(f"convserve export: {arch_name}: published weights {arch.published()[hub.DEFAULT].name} "
              f"(cached at {path})", flush=True)
        return hub.DEFAULT
    if hub.DEFAULT in hub.known_names(arch):
        why = (f"its published weights are not in the cache {hub.cache_dir()}; "
               f"`convserve export {arch_name} --weights DEFAULT` downloads them")
    else:
        why = "it has no default published weights; export a trained checkpoint with --weights"
    print(f"convserve export: {arch_name}: seeded random weights ({why})", flush=True)
    return None


def _parse_options(items: list[str] | None) -> dict[str, str]:
    """`--option KEY=VALUE` flags -> spec options (they override the architecture's)."""
    from .export import ExportError

    options = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ExportError(f"--option takes KEY=VALUE, got {item!r}")
        options[key.strip()] = value.strip()
    return options


def is_empty_repository(repo: Path) -> bool:
    """True when `repo` holds no model entry (no `<name>/config.pbtxt`)."""
    repo = Path(repo)
    return not repo.is_dir() or not any((p / "config.pbtxt").is_file() for p in repo.iterdir() if p.is_dir())


def export_defaults(settings) -> None:
    """Export the default model set into an empty repository, each in a subprocess so
    that the serving process never holds torch: with published weights where they are
    in torch.hub's cache, seeded otherwise (each export says which)."""
    models = settings.default_model_list
    start = time.monotonic()
    for k, arch in enumerate(models, 1):
        print(f"convserve: [{k}/{len(models)}, {time.monotonic() - start:.0f} s] exporting default model {arch} "
              f"into {settings.model_repository} (a first start takes minutes) ...", flush=True)
        subprocess.run([sys.executable, "-m", "service.cli", "export", arch, "--published-if-cached",
                        "--repo", str(settings.model_repository)], check=True)
    print(f"convserve: {len(models)} default models exported in {time.monotonic() - start:.0f} s", flush=True)


# ------------------------------------------------------------------------ triton
def _triton_settings(args):
    return load_settings(model_repository=args.repo, triton_http_port=args.http_port,
                         triton_grpc_port=args.triton_grpc_port, triton_metrics_port=args.triton_metrics_port)


def _launch_triton(settings):
    from .embedded import start_triton

    return start_triton(
        settings.model_repository, http_port=settings.triton_http_port, grpc_port=settings.triton_grpc_port,
        metrics_port=settings.triton_metrics_port, log_path=settings.triton_log,
        state_dir=settings.triton_log.parent, bind_address=settings.triton_bind_address,
        threads=settings.torch_threads)


def _start_triton(settings):
    triton = _launch_triton(settings)
    try:
        triton.wait_ready(settings.triton_startup_timeout_s)
    except BaseException:
        triton.stop()
        raise
    return triton


def _wait_for_signal_or_exit(triton) -> int | None:
    """Block until SIGTERM/SIGINT (returns None) or until tritonserver dies (returns
    its shell-style exit status, after its stubs are killed and it is reaped).

    The signals are blocked and taken with sigtimedwait, SIGCHLD among them, so neither
    can slip in between a check and the wait; the timeout is only a safety net."""
    watched = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        while True:
            if triton.dead():
                return triton.reap()
            info = signal.sigtimedwait(watched, 1.0)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                return None
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)


def _stop_with_parent() -> None:
    """SIGTERM this process when whatever started it (a shell, make, a supervisor) dies,
    so it drains and stops its Triton instead of serving on as an orphan; the signal is
    handled like any SIGTERM. Closes the race with a parent that died already."""
    from .embedded import lifetime

    lifetime.die_with_parent(signal.SIGTERM, os.getppid())


def cmd_triton(args) -> int:
    """Runs until SIGTERM/SIGINT (exit 0) or until Triton dies: then it exits with Triton's
    status (128 + signal number for a signal, as shells report it), so a supervisor
    (systemd, Kubernetes) sees the crash and restarts the whole unit."""
    from .embedded import TritonExited

    _stop_with_parent()

    settings = _triton_settings(args)
    try:
        triton = _start_triton(settings)
    except TritonExited as exc:
        print(f"convserve triton: {exc}", file=sys.stderr, flush=True)
        return exc.status
    print(f"triton ready: grpc 127.0.0.1:{settings.triton_grpc_port}, "
          f"http 127.0.0.1:{settings.triton_http_port}; log {settings.triton_log}", flush=True)
    status = None
    try:
        status = _wait_for_signal_or_exit(triton)
    finally:
        if status is None:
            triton.stop()
    if status is None:
        return 0
    print(f"convserve triton: tritonserver died (exit status {status}); see {settings.triton_log}",
          file=sys.stderr, flush=True)
    return status


# ----------------------------------------------------------------------- gateway
def _gateway_settings(args, **extra):
    return load_settings(grpc_port=args.port, metrics_port=args.metrics_port, triton_url=args.triton_url,
                         reflection=False if args.no_reflection else None, **extra)


async def _run_gateway(settings, on_stopped=None, beside=None) -> None:
    """Serve until SIGTERM/SIGINT, then drain. `beside`: a coroutine run as a task while
    the gateway serves and drains (`serve`'s Triton supervisor), cancelled after."""
    from .gateway import metrics
    from .gateway.server import Gateway

    metrics.start_exporter(settings.metrics_port)
    gateway = Gateway(settings)
    await gateway.start()
    print(f"gateway serving on port {gateway.port} (metrics :{settings.metrics_port}), "
          f"triton {settings.triton_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(beside) if beside is not None else None
    await stop.wait()
    # Drain first: NOT_SERVING, refuse new calls, finish the ones in flight.
    await gateway.stop()
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if on_stopped is not None:
        on_stopped()


def cmd_gateway(args) -> int:
    settings = _gateway_settings(args)
    logs.configure(settings.log_level)
    asyncio.run(_run_gateway(settings))
    return 0


# ------------------------------------------------------------------------- serve
class TritonSupervisor:
    """`convserve serve` keeps its embedded Triton alive: when tritonserver dies, what is
    left of its process group (the python backend stubs, with their models) is killed,
    and a new Triton starts on the same ports after a backoff that doubles while Triton
    keeps dying soon after each start (capped). The gateway needs no help: it turns
    NOT_SERVING while Triton is down and reconnects by itself.

    It runs on the event loop, so each new tritonserver is started from the main thread
    (see `start_triton`: its parent-death signal follows the starting thread)."""

    # How often it looks whether tritonserver is still running (a waitid, no syscall
    # storm: four a second).
    POLL_S = 0.25

    def __init__(self, settings, triton):
        self.settings = settings
        self.triton = triton
        self.restarts = 0

    async def run(self) -> None:
        s = self.settings
        delay = s.triton_restart_backoff_s
        started = time.monotonic()
        while True:
            await asyncio.sleep(self.POLL_S)
            if not self.triton.dead():
                continue
            status = self.triton.reap()
            if time.monotonic() - started >= s.triton_restart_reset_s:
                delay = s.triton_restart_backoff_s  # it had run well: start over from the shortest delay
            log.error("tritonserver died; restarting it", extra={
                "exit_status": status, "restart_in_s": delay, "triton_log": str(s.triton_log)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, s.triton_restart_backoff_max_s)
            started = time.monotonic()
            try:
                self.triton = _launch_triton(s)
            except Exception:  # e.g. the repository is gone: keep the backoff, try again
                log.exception("tritonserver could not be started")
                continue
            self.restarts += 1
            if await self._wait_ready():
                log.info("tritonserver restarted", extra={"restarts": self.restarts,
                                                         "seconds": round(time.monotonic() - started, 2)})

    async def _wait_ready(self) -> bool:
        """True once the new Triton is ready; False if it died first (the loop restarts
        it) or was not ready in time (then it is stopped, and the loop restarts it)."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.triton_startup_timeout_s
        while time.monotonic() < deadline:
            if self.triton.dead():
                return False
            if await loop.run_in_executor(None, self.triton.ready):
                return True
            await asyncio.sleep(self.POLL_S)
        log.error("restarted tritonserver not ready in time; stopping it",
                  extra={"timeout_s": self.settings.triton_startup_timeout_s})
        self.triton.stop()
        return False


def cmd_serve(args) -> int:
    _stop_with_parent()
    base = _triton_settings(args)
    if is_empty_repository(base.model_repository):
        export_defaults(base)
    settings = _gateway_settings(args, model_repository=args.repo, triton_http_port=args.http_port,
                                 triton_grpc_port=args.triton_grpc_port,
                                 triton_metrics_port=args.triton_metrics_port)
    # Triton runs beside the gateway: tensors go through shared memory unless the
    # environment says otherwise.
    settings = settings.model_copy(update={
        "triton_url": f"127.0.0.1:{settings.triton_grpc_port}",
        "triton_shared_memory": settings.triton_shared_memory or "triton_shared_memory" not in settings.model_fields_set})
    logs.configure(settings.log_level)
    supervisor = TritonSupervisor(settings, _start_triton(settings))
    print(f"triton ready on 127.0.0.1:{settings.triton_grpc_port}; log {settings.triton_log}", flush=True)
    try:
        # Triton stops only after the gateway has drained.
        asyncio.run(_run_gateway(settings, beside=supervisor.run()))
    finally:
        code = supervisor.triton.stop()
        print(f"triton stopped (exit code {code})", flush=True)
    return 0


# ----------------------------------------------------------------------- predict
def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (the API's fields are unsigned)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def cmd_predict(args) -> int:
    from .client.predict import predict_main

    return predict_main(args)


# -------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def repo_flag(p):
        p.add_argument("--repo", type=Path, help="model repository (env CONVSERVE_MODEL_REPOSITORY)")

    def triton_flags(p):
        repo_flag(p)
        p.add_argument("--http-port", type=int, help="Triton HTTP port (CONVSERVE_TRITON_HTTP_PORT)")
        p.add_argument("--triton-grpc-port", type=int, help="Triton gRPC port (CONVSERVE_TRITON_GRPC_PORT)")
        p.add_argument("--triton-metrics-port", type=int, help="Triton metrics port (CONVSERVE_TRITON_METRICS_PORT)")

    def gateway_flags(p, url=True):
        p.add_argument("--port", type=int, help="gateway gRPC port (CONVSERVE_GRPC_PORT)")
        p.add_argument("--metrics-port", type=int, help="Prometheus port, 0 disables (CONVSERVE_METRICS_PORT)")
        if url:
            p.add_argument("--triton-url", help="Triton gRPC address (CONVSERVE_TRITON_URL)")
        p.add_argument("--no-reflection", action="store_true", help="turn gRPC reflection off")

    p = sub.add_parser("export", help="export an architecture (+ checkpoint), or a model file, into the repository")
    p.add_argument("architecture", nargs="?", help="zoo architecture, e.g. resnet18 (omit with --from-file)")
    repo_flag(p)
    p.add_argument("--weights", help="checkpoint (.pth/.pt state_dict or .safetensors), or the name of weights "
                   "published for the architecture: DEFAULT or torchvision's enum name (IMAGENET1K_V1, ...), "
                   "a pix2pix/CycleGAN model (horse2zebra, ...); fetched once into torch.hub's cache")
    p.add_argument("--published-if-cached", action="store_true",
                   help="instead of --weights: the architecture's DEFAULT published weights when they are already "
                   "in torch.hub's cache, else seeded weights (never downloads; what `serve` does for its "
                   "default set)")
    p.add_argument("--format", choices=("torchscript", "onnx", "tensorrt"), default="torchscript")
    p.add_argument("--cpu-runtime", choices=("onnxruntime", "torchscript"), default="onnxruntime",
                   help="TorchScript exports: what the embedded CPU profile runs. onnxruntime (default) also "
                   "writes the model's ONNX file, kept where it holds parity with eager (else TorchScript runs); "
                   "production keeps libtorch either way")
    p.add_argument("--name", help="entry name (default: the architecture, plus _onnx/_trt for those formats; "
                   "with --from-file, the file's stem)")
    p.add_argument("--labels", type=Path, help="labels file, one name per line")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--version", type=int, default=1, help="version directory to write; others are kept")
    p.add_argument("--version-policy", choices=("latest", "all"), default="latest",
                   help="serve only the newest version, or all of them side by side")
    p.add_argument("--input-size", type=int, nargs="+", metavar="H [W]",
                   help="input size: H W, or one side for a square (default: the architecture's, or the file's)")
    p.add_argument("--max-batch-size", type=int,
                   help="images per Triton call (default 8; a file whose batch is fixed at 1 takes one per call)")
    p.add_argument("--instances", type=int, default=1,
                   help="copies of the model Triton runs side by side (its instance group count)")
    p.add_argument("--max-queue-size", type=int, default=0,
                   help="Triton refuses requests past this queue length (0: unbounded)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights when --weights is absent")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="model option stored in the spec, e.g. proposals=100 (repeatable)")
    p.add_argument("--from-file", type=Path, help="an exported TorchScript .pt or .onnx file to add as it is; "
                   "what its ONNX input shape and metadata (Ultralytics') say fills in the flags left out")
    p.add_argument("--task", help="with --from-file: the model's task (classification, detection, "
                   "semantic_segmentation, instance_segmentation, generation; default: the file's metadata)")
    p.add_argument("--layout", help="with --from-file: the output layout (classification: logits or "
                   "probabilities; detection: yolov8 or yolov5; generation: image_nchw_tanh (default) or "
                   "image_nchw_01)")
    p.add_argument("--mean", type=float, nargs=3,
                   help="with --from-file: per-channel mean (0-1 scale; default ImageNet's, 0.5 for generation)")
    p.add_argument("--std", type=float, nargs=3,
                   help="with --from-file: per-channel std (0-1 scale; default ImageNet's, 0.5 for generation)")
    p.add_argument("--resize-mode", choices=("resize_center_crop", "letterbox", "stretch", "none"),
                   help="with --from-file: how images are brought to the input size")
    p.add_argument("--input-layout", choices=("nchw", "nhwc"),
                   help="with --from-file: channels first or last (default: read from the file's input shape)")
    p.add_argument("--channel-order", choices=("rgb", "bgr"),
                   help="with --from-file: the channel order the model was trained on (default rgb; "
                   "OpenCV/Caffe models are bgr)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("triton", help="run the embedded Triton server (CPU profile)")
    triton_flags(p)
    p.set_defaults(func=cmd_triton)

    p = sub.add_parser("gateway", help="run the gRPC gateway against a Triton server")
    gateway_flags(p)
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("serve", help="embedded Triton plus the gateway")
    triton_flags(p)
    gateway_flags(p, url=False)
    p.set_defaults(func=cmd_serve, triton_url=None)

    p = sub.add_parser("predict", help="send images to the gateway and print the results")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--server", default="localhost:50051")
    p.add_argument("--top-k", type=_non_negative_int)
    p.add_argument("--mask-format", choices=("rle", "png"), help="instance segmentation: how masks come back")
    p.add_argument("--score-threshold", type=float, help="detection and instance segmentation: keep scores above this")
    p.add_argument("--iou-threshold", type=float, help="detection and instance segmentation: NMS suppresses above this IoU")
    p.add_argument("--max-detections", type=_non_negative_int,
                   help="detection and instance segmentation: at most this many per image")
    p.add_argument("--class-ids", type=_non_negative_int, nargs="+", help="detection: only these class indices")
    p.add_argument("--model-version", default="")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", type=Path, help="write a PNG with the results drawn on the first image; for a "
                   "generation model, each generated image (JPEG if PATH ends in .jpg/.jpeg)")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
    p.set_defaults(func=cmd_predict)
    return parser


# Status when stdout's reader went away (`convserve predict ... | head`): 128 + SIGPIPE,
# what the shell reports for any Unix tool that a closed pipe ended (`seq 9999 | head -1;
# echo ${PIPESTATUS[0]}` prints 141). Not 0: that would tell a `set -o pipefail` script
# the whole output was delivered; not 1 (the Python docs' example), which is this CLI's
# status for real failures.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _quiet_broken_pipe() -> int:
    """The pattern the Python docs recommend for SIGPIPE (signal module, "Note on
    SIGPIPE"): point stdout at /dev/null, so that the interpreter's final flush of what
    is still buffered cannot raise a second BrokenPipeError at exit."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def main(argv=None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            print(f"convserve: invalid setting CONVSERVE_{field.upper()} (or its flag): {error['msg']}, "
                  f"got {error.get('input')!r}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

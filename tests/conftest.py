"""Session fixtures, among them one real stack for every end-to-end test: the embedded
`tritonserver` with models exported by the real exporter, and the real gateway in its
own process, on free ports."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import free_port  # noqa: E402

# Seeded test weights with the final layer scaled up, so that top-1 leads by far more
# than any tolerance and the comparison with the reference cannot pass by accident.
FINAL_LAYER_SCALE = 40.0
# Forward time of the deliberately slow test model (deadline, queue and drain tests).
SLOW_MODEL_SECONDS = 0.5


def make_resnet18_checkpoint(path: Path) -> Path:
    import torch

    from service.export import tvshim

    tvshim.install()
    import torchvision

    torch.manual_seed(1234)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        model.fc.weight.mul_(FINAL_LAYER_SCALE)
        model.fc.bias.mul_(FINAL_LAYER_SCALE)
    torch.save(model.state_dict(), path)
    return path


@dataclass
class Stack:
    repo: Path
    workdir: Path
    gateway_port: int
    metrics_port: int
    triton_grpc_port: int
    triton_http_port: int
    triton_metrics_port: int
    triton: object
    gateway: subprocess.Popen
    gateway_log: Path
    checkpoints: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)])


def _wait_serving(address: str, timeout_s: float, process: subprocess.Popen, log: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"gateway exited: {log.read_text()[-3000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"gateway not serving after {timeout_s}s: {log.read_text()[-3000:]}")


def start_gateway(workdir: Path, triton_grpc_port: int, port: int, metrics_port: int,
                  extra_env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """The real gateway as its own process, run from a folder with no model repository:
    everything it knows comes from Triton."""
    log = workdir / f"gateway-{port}.log"
    env = dict(os.environ)
    env.update({
        "CONVSERVE_MODEL_REPOSITORY": str(workdir / "no-repository-here"),
        "CONVSERVE_HEALTH_POLL_S": "0.2",
        # Triton runs on this host: tensors go through system shared memory, as under
        # `convserve serve` (tests/gateway/test_shared_memory.py covers gRPC beside it).
        "CONVSERVE_TRITON_SHARED_MEMORY": "true",
        **(extra_env or {}),
    })
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "gateway", "--port", str(port), "--metrics-port",
         str(metrics_port), "--triton-url", f"127.0.0.1:{triton_grpc_port}"],
        cwd=workdir, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    _wait_serving(f"127.0.0.1:{port}", 60, process, log)
    return process, log


def stack_modules():
    import importlib

    return [importlib.import_module(path.stem) for path in sorted(Path(__file__).parent.glob("stack_*.py"))]


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    from service.embedded import start_triton

    root = tmp_path_factory.mktemp("stack")
    repo = root / "model_repository"
    workdir = root / "work"
    workdir.mkdir()
    checkpoints: dict = {}
    # Every tests/stack_<task>.py adds its task's models to the one shared repository.
    for module in stack_modules():
        module.export(repo, root, checkpoints)

    http, grpc_port, metrics = free_port(), free_port(), free_port()
    triton = start_triton(repo, http_port=http, grpc_port=grpc_port, metrics_port=metrics,
                          log_path=root / "triton.log", state_dir=root / "state")
    try:
        triton.wait_ready(300)
        gateway_port, gateway_metrics = free_port(), free_port()
        gateway, gateway_log = start_gateway(workdir, grpc_port, gateway_port, gateway_metrics)
    except BaseException:
        triton.stop()
        raise
    yield Stack(repo, workdir, gateway_port, gateway_metrics, grpc_port, http, metrics, triton, gateway,
                gateway_log, checkpoints)
    gateway.terminate()
    try:
        gateway.wait(30)
    except subprocess.TimeoutExpired:
        gateway.kill()
    triton.stop()


@pytest.fixture(scope="session")
def vision(stack):
    from service._proto import vision_pb2_grpc

    with stack.channel() as channel:
        yield vision_pb2_grpc.VisionStub(channel)

"""The gateway image's Python environment, built the way the Dockerfile builds it, in a
fresh venv: requirements-gateway.txt, then the package with --no-deps (its build step
generates the protobuf code), then grpcio-tools removed. It must serve Classify against
the e2e stack's real Triton, through a dns:/// target as the chart configures it, and
it must not be able to import torch."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from helpers import encode, free_port, photo

from ._deploy import ROOT

pytestmark = pytest.mark.e2e

# What the Dockerfile copies into its build stage.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "protos", "service")
PIP_TIMEOUT_S = 900


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _clean_env(venv: Path) -> dict:
    """The environment of a process in the venv: nothing from the development venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"} and not k.startswith("CONVSERVE_")}
    dev_bin = str(Path(sys.executable).parent)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != dev_bin]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["VIRTUAL_ENV"] = str(venv)
    return env


@pytest.fixture(scope="module")
def gateway_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gateway-image")
    source = root / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*_pb2*.py", "*_pb2*.pyi")
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    env = _clean_env(venv)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "install", "--quiet", "-r", str(ROOT / "requirements-gateway.txt")], env=env, timeout=PIP_TIMEOUT_S)
    _run([*pip, "install", "--quiet", "--no-deps", "--no-build-isolation", str(source)], env=env,
         timeout=PIP_TIMEOUT_S)
    _run([*pip, "uninstall", "--yes", "--quiet", "grpcio-tools"], env=env, timeout=120)
    return venv


def test_venv_has_no_torch(gateway_venv):
    python = str(gateway_venv / "bin" / "python")
    env = _clean_env(gateway_venv)
    result = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=env,
                            cwd=gateway_venv, timeout=60)
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr
    installed = _run([python, "-m", "pip", "list", "--format=freeze"], env=env, timeout=60).stdout.lower()
    for name in ("torch==", "torchvision==", "onnxruntime==", "nvidia-pytriton==", "grpcio-tools=="):
        assert name not in installed, name
    # The package comes from the venv, with its generated protobuf code, not from the repo.
    where = _run([python, "-c", "import service._proto.vision_pb2 as m; print(m.__file__)"], env=env,
                 cwd=gateway_venv, timeout=60).stdout.strip()
    assert where.startswith(str(gateway_venv)), where


def _wait_serving(address: str, process: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, f"gateway exited:\n{log.read_text()[-3000:]}"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    pytest.fail(f"gateway from the venv not serving after {timeout_s}s:\n{log.read_text()[-3000:]}")


def test_venv_gateway_classifies_through_the_stacks_triton(gateway_venv, stack, vision):
    from service._proto import vision_pb2, vision_pb2_grpc

    port, metrics_port = free_port(), free_port()
    log = gateway_venv.parent / "gateway.log"
    env = _clean_env(gateway_venv)
    # The chart's form of the address: the dns resolver, which round_robin balances over.
    env["CONVSERVE_TRITON_URL"] = f"dns:///localhost:{stack.triton_grpc_port}"
    env["CONVSERVE_HEALTH_POLL_S"] = "0.2"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(gateway_venv / "bin" / "convserve"), "gateway", "--port", str(port), "--metrics-port",
             str(metrics_port)], cwd=gateway_venv.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_serving(f"127.0.0.1:{port}", process, log)
        image = vision_pb2.Image(encoded=encode(photo("chelsea.png"), "PNG"))
        request = vision_pb2.ClassifyRequest(model="resnet18", images=[image], top_k=3)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = vision_pb2_grpc.VisionStub(channel).Classify(request, timeout=60)
        assert answer.model == "resnet18" and len(answer.results) == 1
        labels = answer.results[0].labels
        assert len(labels) == 3 and labels[0].name
        # The same answer as the development gateway of the stack.
        expected = vision.Classify(request, timeout=60).results[0].labels
        assert [l.index for l in labels] == [l.index for l in expected]
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'convserve_requests_total{code="OK",method="Classify",model="resnet18"} 1.0' in text
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.read_text()[-3000:]

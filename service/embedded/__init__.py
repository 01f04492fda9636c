"""Embedded Triton: the real `tritonserver` binary from the nvidia-pytriton wheel.

It runs CPU-only with `--model-config-name=cpu`, which makes Triton read each model's
`configs/cpu.pbtxt`. Those configs name the project's python-based backends
(`torchscript`, `onnxruntime`), which this module assembles into a backend directory
next to the python backend's library and the stub that matches this interpreter.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("convserve.triton")

BACKENDS = ("torchscript", "onnxruntime")


def _pytriton_paths() -> tuple[Path, Path]:
    """(tritonserver install dir, nvidia_pytriton.libs dir) inside the installed wheel."""
    try:
        import pytriton
    except ImportError:
        raise RuntimeError("embedded Triton needs nvidia-pytriton: pip install 'convserve[triton]'") from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return root, libs


def assemble_backends(target: Path) -> Path:
    """Build a Triton backend directory at `target`:

    - python/: libtriton_python.so, triton_python_backend_utils.py and the stub built
      for this Python version (the stub runs the environment first on PATH);
    - <name>/model.py for each of the project's python-based backends.
    """
    root, _ = _pytriton_paths()
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"nvidia-pytriton has no python backend stub for Python {sys.version_info[:2]}")
    for source in (root / "backends" / "python" / "libtriton_python.so",
                   root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        _copy_if_changed(source, python_dir / source.name)
    here = Path(__file__).resolve().parent / "backends"
    for name in BACKENDS:
        (target / name).mkdir(exist_ok=True)
        _copy_if_changed(here / name / "model.py", target / name / "model.py")
    return target


def _copy_if_changed(source: Path, dest: Path) -> None:
    if dest.exists() and dest.stat().st_size == source.stat().st_size and \
            dest.stat().st_mtime >= source.stat().st_mtime:
        return
    shutil.copy2(source, dest)


@dataclass
class TritonProcess:
    """A running tritonserver in its own process group."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with code {self.process.returncode}; see {self.log_path}:\n"
                    + _tail(self.log_path))
            if self.ready():
                return
            time.sleep(0.25)
        raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f}s; see {self.log_path}:\n" + _tail(self.log_path))

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM the process group (Triton unloads its models), SIGKILL after timeout."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in time; killing it")
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_triton(
    repository: Path,
    *,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    log_path: Path,
    state_dir: Path,
    exit_timeout_s: int = 30,
    bind_address: str = "127.0.0.1",
) -> TritonProcess:
    """Start the embedded tritonserver on `repository` (CPU profile); returns at once.

    Call `wait_ready` on the result to block until every model is loaded.
    """
    root, libs = _pytriton_paths()
    repository = Path(repository).resolve()
    if not repository.is_dir():
        raise RuntimeError(f"model repository {repository} does not exist")
    backend_dir = assemble_backends(Path(state_dir).resolve() / "backends")
    log_path = Path(log_path).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The python backend stub runs the Python environment first on PATH: this one,
    # where torch, onnxruntime and the service package are installed.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [str(libs), env.get("LD_LIBRARY_PATH", "")] if p)
    command = [
        str(root / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={backend_dir}",
        "--model-config-name=cpu",
        f"--http-address={bind_address}",
        f"--grpc-address={bind_address}",
        f"--metrics-address={bind_address}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        "--allow-gpu-metrics=false",
        f"--exit-timeout-secs={exit_timeout_s}",
        "--strict-readiness=true",
        "--log-verbose=0",
    ]
    log.info("starting tritonserver", extra={"repository": str(repository), "grpc_port": grpc_port,
                                             "log": str(log_path)})
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return TritonProcess(process, http_port, grpc_port, log_path)

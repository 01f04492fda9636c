"""Embedded Triton: the real `tritonserver` binary from the nvidia-pytriton wheel.

It runs CPU-only with `--model-config-name=cpu`, which makes Triton read each model's
`configs/cpu.pbtxt`. Those configs name the project's python-based backends
(`torchscript`, `onnxruntime`), which this module assembles into a backend directory
next to the python backend's library and the stub that matches this interpreter.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import lifetime, regions

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


# What start_triton tells the backends (they read it from their environment): the
# intra-op threads of a run while other runs are under way (settings.torch_threads), of a
# run that has the cores to itself, and the lock file through which runs see each other.
THREADS_VARIABLE = "CONVSERVE_TORCH_THREADS"
ALONE_THREADS_VARIABLE = "CONVSERVE_TORCH_THREADS_ALONE"
CORE_LOCKS_VARIABLE = "CONVSERVE_CORE_LOCKS"


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, lowered to a cgroup v2 CPU
    quota (a container's CPU limit, `/sys/fs/cgroup/cpu.max`) where one is set."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def repository_instances(repository: Path) -> int:
    """Model instances the embedded profile will load: the instance-group counts of every
    entry's configs/cpu.pbtxt (1 where a config names none)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    total = 0
    for path in Path(repository).glob("*/configs/cpu.pbtxt"):
        try:
            config = text_format.Parse(path.read_text(), mc.ModelConfig())
        except (OSError, text_format.ParseError):
            continue  # Triton itself reports a broken config
        total += sum(group.count or 1 for group in config.instance_group) or 1
    return total


def backend_threads(cores: int, instances: int) -> int:
    """Intra-op threads per model instance so that all instances together use no more
    threads than `cores` (at least 1 each): see settings.torch_threads for why."""
    return max(1, cores // max(1, instances))


@dataclass(frozen=True)
class Threads:
    """Intra-op threads of one run in an embedded backend: `shared` while any other run
    (of any model instance of this Triton) is under way, `alone` when none is. Equal
    when fixed by the settings."""

    shared: int
    alone: int

    @property
    def adaptive(self) -> bool:
        return self.alone > self.shared


def thread_counts(threads: int, env: dict[str, str], instances: int) -> Threads:
    """The intra-op threads of the embedded backends' runs. Fixed at `threads` when given
    (> 0), else at CONVSERVE_TORCH_THREADS from `env` when set (> 0). Otherwise adaptive:
    a run that has the machine to itself uses every available core (one caller, the
    latency case), and runs that overlap use the cores shared out over `instances`
    (`backend_threads`: under load, no oversubscription)."""
    fixed = threads or int(env.get(THREADS_VARIABLE) or 0)
    if fixed:
        return Threads(fixed, fixed)
    cores = available_cores()
    return Threads(backend_threads(cores, instances), cores)


def repository_thread_counts(repository: Path, threads: int = 0, env: dict[str, str] | None = None) -> Threads:
    """`thread_counts` for the embedded Triton on `repository` (its model instances),
    `env` defaulting to this process's environment: what `start_triton` gives the
    backends, for callers that want to run a model as Triton does."""
    return thread_counts(threads, dict(os.environ) if env is None else env, repository_instances(repository))


def _copy_if_changed(source: Path, dest: Path) -> None:
    if dest.exists() and dest.stat().st_size == source.stat().st_size and \
            dest.stat().st_mtime >= source.stat().st_mtime:
        return
    shutil.copy2(source, dest)


class TritonExited(RuntimeError):
    """tritonserver died before it was ready; `status` is its shell-style exit status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class TritonProcess:
    """A running tritonserver in its own process group."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log_path: Path
    # Its python backend stubs' shared-memory regions start with this (`regions.prefix`).
    shm_prefix: str = ""

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
            if self.dead():
                status = self.reap()
                raise TritonExited(status, f"tritonserver exited with status {status}; see {self.log_path}:\n"
                                   + _tail(self.log_path))
            if self.ready():
                return
            time.sleep(0.25)
        raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f}s; see {self.log_path}:\n" + _tail(self.log_path))

    def dead(self) -> bool:
        """True once tritonserver has exited. It is not reaped here (WNOWAIT), so its pid,
        which is also its process group's id, cannot be reused before `reap`."""
        if self.process.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # reaped elsewhere
            return True

    def reap(self) -> int:
        """After tritonserver died: SIGKILL what is left of its process group (the python
        backend stubs and their loaded models), reap it, remove the stubs' shared-memory
        regions (a killed tritonserver leaves them in /dev/shm: see `regions`), and
        return `exit_status`."""
        if self.process.returncode is None:
            self._signal_group(signal.SIGKILL)
            self.process.wait()
        if self.shm_prefix:
            regions.remove(self.shm_prefix)
        return self.exit_status

    @property
    def exit_status(self) -> int:
        """tritonserver's exit status in the shell's convention: its exit code, or 128 +
        the signal number when a signal ended it (137 for SIGKILL)."""
        code = self.process.returncode
        return 128 - code if code < 0 else code

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM the process group (Triton unloads its models), SIGKILL after timeout;
        then SIGKILL whatever is left in the group. Returns tritonserver's return code."""
        if not self.dead():
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while not self.dead() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.dead():
                log.warning("tritonserver did not stop in time; killing it")
        self.reap()
        return self.process.returncode

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


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
    threads: int = 0,
) -> TritonProcess:
    """Start the embedded tritonserver on `repository` (CPU profile); returns at once.

    Call `wait_ready` on the result to block until every model is loaded. Each run of a
    model instance gets `threads` intra-op threads when that is > 0 (or
    CONVSERVE_TORCH_THREADS where the environment sets it); otherwise `thread_counts`
    makes it adaptive: every core for a run that has the machine to itself, the cores
    shared out over the repository's instances while runs overlap. The backends read
    the numbers, and the lock file in `state_dir` through which their runs see each
    other (`backends._common.CoreShare`), from their environment.

    tritonserver runs in a session and process group of its own (a terminal's Ctrl-C
    reaches the caller only, who stops Triton after the gateway has drained), and it
    dies with the caller: SIGKILL is its parent-death signal (see `lifetime`). That
    signal follows the thread that forks, so this must be called from the main thread,
    which lives as long as the process; it raises anywhere else.

    Its stubs' shared-memory regions carry a prefix of their own, removed when it is
    reaped (`TritonProcess.reap`); those of tritonservers whose starter died without
    reaping them are removed here, before it starts (`regions`).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("start_triton must be called from the main thread: tritonserver's parent-death "
                           "signal fires when the thread that started it exits")
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
    instances = repository_instances(repository)
    counts = thread_counts(threads, env, instances)
    env[THREADS_VARIABLE] = str(counts.shared)
    env[ALONE_THREADS_VARIABLE] = str(counts.alone)
    locks = Path(state_dir).resolve() / "core-locks"
    locks.touch()
    env[CORE_LOCKS_VARIABLE] = str(locks)
    regions.remove_orphans()
    shm_prefix = regions.prefix()
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
        regions.backend_config(shm_prefix),
    ]
    log.info("starting tritonserver", extra={"repository": str(repository), "grpc_port": grpc_port,
                                             "log": str(log_path), "model_instances": instances,
                                             "threads_shared": counts.shared, "threads_alone": counts.alone})
    with open(log_path, "ab") as log_file:
        # No preexec_fn: nothing may run in a forked copy of this process, whose other
        # threads may be in gRPC (see `lifetime`); the launcher sets the signal instead.
        process = subprocess.Popen(lifetime.with_parent_death_signal(command), stdout=log_file,
                                   stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    return TritonProcess(process, http_port, grpc_port, log_path, shm_prefix)

"""Process life cycle with real processes and SIGKILL: neither tritonserver nor a python
backend stub outlives its parent; `convserve triton` exits with Triton's status when
Triton dies; `convserve serve` restarts a dead Triton and the gateway serves again; and
`convserve predict` ends quietly when its stdout closes, with `--out` written. The
stubs' shared-memory regions in /dev/shm go with a killed tritonserver too: its reaper
removes them, or, when its starter was killed as well, the next start does.

Each test runs its own small repository (two 64 px resnet18 entries, TorchScript and
ONNX, so both python-based backends run a stub) on free ports, and kills every process
it saw in `finally`, whatever happened."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
from PIL import Image

from conftest import _wait_serving
from helpers import encode, free_port, photo
from service._proto import vision_pb2, vision_pb2_grpc
from service.embedded import regions

pytestmark = pytest.mark.e2e

# One stub per model instance: resnet18 (torchscript backend) and resnet18_onnx.
STUBS = 2
# "Within a few seconds": a stub looks for its parent every 0.5 s.
GONE_WITHIN_S = 5.0
START_TIMEOUT_S = 300
SIGKILL_STATUS = 128 + signal.SIGKILL  # the shell's convention for a death by signal


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    from service.export.repository import export_model

    repo = tmp_path_factory.mktemp("processes") / "repo"
    export_model("resnet18", repo, input_size=64, max_batch_size=4, seed=3)
    export_model("resnet18", repo, fmt="onnx", input_size=64, max_batch_size=4, seed=3)
    return repo


class Run:
    """A `convserve` command in its own process group, and every process of its tree
    that the test saw: all of them are SIGKILLed by `cleanup`."""

    def __init__(self, command: str, repo: Path, workdir: Path, extra_env: dict | None = None,
                 parent_shell: bool = False):
        self.workdir = workdir
        self.ports = dict(http=free_port(), grpc=free_port(), metrics=free_port(), gateway=free_port(),
                          gateway_metrics=free_port())
        env = dict(os.environ)
        env.update({
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            "CONVSERVE_TRITON_LOG": str(workdir / "triton.log"),
            "CONVSERVE_HEALTH_POLL_S": "0.2",
            "CONVSERVE_TRITON_RESTART_BACKOFF_S": "0.5",
            **(extra_env or {}),
        })
        args = [sys.executable, "-m", "service.cli", command, "--repo", str(repo),
                "--http-port", str(self.ports["http"]), "--triton-grpc-port", str(self.ports["grpc"]),
                "--triton-metrics-port", str(self.ports["metrics"])]
        if command == "serve":
            args += ["--port", str(self.ports["gateway"]), "--metrics-port", str(self.ports["gateway_metrics"])]
        if parent_shell:  # started by a shell that waits for it, as `make serve` does
            args = ["sh", "-c", '"$@" & wait', "sh", *args]
        self.log = workdir / f"convserve-{command}.log"
        self.process = subprocess.Popen(args, cwd=workdir, env=env, stdout=open(self.log, "wb"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: list[psutil.Process] = [psutil.Process(self.process.pid)]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['gateway']}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_triton_ready(self) -> None:
        """Until `convserve triton` says Triton is ready (it is then watching it)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()[-3000:]
            if "triton ready:" in self.output():
                return
            time.sleep(0.2)
        raise AssertionError(f"Triton not ready after {START_TIMEOUT_S}s: {self.output()[-3000:]}")

    def triton_tree(self, not_pid: int | None = None) -> tuple[psutil.Process, list[psutil.Process]]:
        """The running tritonserver child (other than `not_pid`) and its STUBS stubs."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for child in psutil.Process(self.process.pid).children():
                if _alive(child) and child.name() == "tritonserver" and child.pid != not_pid:
                    stubs = [p for p in child.children(recursive=True)
                             if _alive(p) and p.name().startswith("triton_python")]
                    if len(stubs) == STUBS:
                        self.seen += [child, *stubs]
                        return child, stubs
            time.sleep(0.1)
        raise AssertionError(f"no tritonserver with {STUBS} stubs: {self.output()[-3000:]}")

    def cleanup(self) -> None:
        try:  # what is still running below the command: Triton is in a session of its own
            self.seen += psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            pass
        for process in self.seen:
            try:
                process.kill()  # psutil checks the create time: never a reused pid
            except psutil.Error:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(processes: list[psutil.Process], timeout_s: float = GONE_WITHIN_S) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if not any(_alive(p) for p in processes):
            return time.monotonic() - start
        time.sleep(0.05)
    alive = [(p.pid, p.name()) for p in processes if _alive(p)]
    raise AssertionError(f"still alive {timeout_s}s later: {alive}")


def _classify(address: str):
    request = vision_pb2.ClassifyRequest(
        model="resnet18", images=[vision_pb2.Image(encoded=encode(photo("chelsea.png", max_side=64), "PNG"))])
    with grpc.insecure_channel(address) as channel:
        return vision_pb2_grpc.VisionStub(channel).Classify(request, timeout=30)


def test_sigkill_serve_takes_triton_and_every_stub_with_it(repo, tmp_path):
    run = Run("serve", repo, tmp_path)
    try:
        _wait_serving(run.address, START_TIMEOUT_S, run.process, run.log)
        triton, stubs = run.triton_tree()
        assert len(regions.owned_by(run.process.pid)) == STUBS  # one region per stub
        os.kill(run.process.pid, signal.SIGKILL)
        run.process.wait()
        took = _wait_gone([triton, *stubs])
        # Nobody reaped that tritonserver: its regions stay until the next start's sweep.
        assert len(regions.owned_by(run.process.pid)) == STUBS
        regions.remove_orphans()
        assert regions.owned_by(run.process.pid) == []
        print(f"convserve serve SIGKILLed: tritonserver and {len(stubs)} stubs gone in {took:.2f}s")
    finally:
        run.cleanup()


def test_serve_drains_and_stops_when_the_process_that_started_it_dies(repo, tmp_path):
    run = Run("serve", repo, tmp_path, parent_shell=True)
    try:
        _wait_serving(run.address, START_TIMEOUT_S, run.process, run.log)
        serve = psutil.Process(run.process.pid).children()[0]
        tree = [serve, *serve.children(recursive=True)]
        run.seen += tree
        os.kill(run.process.pid, signal.SIGKILL)  # the shell, not serve
        run.process.wait()
        took = _wait_gone(tree, timeout_s=60)
        # Its parent-death signal is SIGTERM: it drained and stopped Triton, as on any SIGTERM.
        assert "triton stopped (exit code 0)" in run.output(), run.output()[-3000:]
        print(f"the shell above convserve serve SIGKILLed: serve, tritonserver and stubs gone in {took:.2f}s")
    finally:
        run.cleanup()


def test_sigkill_convserve_triton_takes_triton_and_every_stub_with_it(repo, tmp_path):
    run = Run("triton", repo, tmp_path)
    try:
        run.wait_triton_ready()
        triton, stubs = run.triton_tree()
        os.kill(run.process.pid, signal.SIGKILL)
        run.process.wait()
        took = _wait_gone([triton, *stubs])
        print(f"convserve triton SIGKILLed: tritonserver and {len(stubs)} stubs gone in {took:.2f}s")
    finally:
        run.cleanup()


def test_sigkill_tritonserver_ends_convserve_triton_with_its_status(repo, tmp_path):
    run = Run("triton", repo, tmp_path)
    try:
        run.wait_triton_ready()
        triton, stubs = run.triton_tree()
        assert len(regions.owned_by(run.process.pid)) == STUBS
        os.kill(triton.pid, signal.SIGKILL)
        took = _wait_gone(stubs)
        # A supervisor sees the crash: convserve triton ends too, with 128 + SIGKILL.
        assert run.process.wait(GONE_WITHIN_S) == SIGKILL_STATUS, run.output()[-3000:]
        assert f"exit status {SIGKILL_STATUS}" in run.output()
        assert not _alive(triton)  # reaped, no zombie left behind
        assert regions.owned_by(run.process.pid) == []  # and its stubs' regions removed
        print(f"tritonserver SIGKILLed: stubs gone in {took:.2f}s, convserve triton exited {SIGKILL_STATUS}")
    finally:
        run.cleanup()


def test_stubs_do_not_outlive_an_unreaped_tritonserver(repo, tmp_path):
    """A dead Triton whose parent has not reaped it yet is a zombie, which the stub's own
    liveness check (`kill(parent, 0)`) takes for alive; the stubs must go all the same."""
    from service.embedded import start_triton

    triton = start_triton(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          log_path=tmp_path / "triton.log", state_dir=tmp_path / "state")
    seen = [psutil.Process(triton.process.pid)]
    try:
        triton.wait_ready(START_TIMEOUT_S)
        stubs = [p for p in seen[0].children(recursive=True) if p.name().startswith("triton_python")]
        seen += stubs
        assert len(stubs) == STUBS
        assert len(list(regions.SHM_DIR.glob(triton.shm_prefix + "*"))) == STUBS
        os.kill(triton.process.pid, signal.SIGKILL)  # and not reaped: a zombie until `finally`
        took = _wait_gone(stubs)
        assert triton.process.returncode is None
        print(f"tritonserver SIGKILLed, left unreaped: stubs gone in {took:.2f}s")
    finally:
        for process in seen:
            try:
                process.kill()
            except psutil.Error:
                pass
        triton.reap()
    assert list(regions.SHM_DIR.glob(triton.shm_prefix + "*")) == []  # reaped: its stubs' regions removed


def test_sigkill_tritonserver_under_serve_restarts_it_and_the_gateway_recovers(repo, tmp_path):
    run = Run("serve", repo, tmp_path)
    try:
        _wait_serving(run.address, START_TIMEOUT_S, run.process, run.log)
        assert _classify(run.address).results
        triton, stubs = run.triton_tree()
        old_regions = regions.owned_by(run.process.pid)
        assert len(old_regions) == STUBS
        killed_at = time.monotonic()
        os.kill(triton.pid, signal.SIGKILL)
        took = _wait_gone([triton, *stubs])
        new_triton, new_stubs = run.triton_tree(not_pid=triton.pid)
        # The restart reaped the dead one and removed its stubs' regions; the new stubs have their own.
        new_regions = regions.owned_by(run.process.pid)
        assert len(new_regions) == STUBS and not set(old_regions) & set(new_regions)
        _wait_serving(run.address, START_TIMEOUT_S, run.process, run.log)
        assert _classify(run.address).results
        recovered = time.monotonic() - killed_at
        output = run.output()
        assert '"tritonserver died; restarting it"' in output and f'"exit_status": {SIGKILL_STATUS}' in output
        assert '"tritonserver restarted"' in output
        # A clean stop still takes the new Triton and its stubs down.
        run.process.send_signal(signal.SIGTERM)
        assert run.process.wait(60) == 0, run.output()[-3000:]
        _wait_gone([new_triton, *new_stubs])
        assert regions.owned_by(run.process.pid) == []
        print(f"tritonserver SIGKILLed under serve: old stubs gone in {took:.2f}s, "
              f"Classify through the gateway OK again {recovered:.2f}s after the kill")
    finally:
        run.cleanup()


def test_predict_into_a_closed_pipe_is_quiet_and_still_writes_out(repo, tmp_path):
    run = Run("serve", repo, tmp_path)
    try:
        _wait_serving(run.address, START_TIMEOUT_S, run.process, run.log)
        source = tmp_path / "chelsea.png"
        photo("chelsea.png", max_side=64).save(source)
        predict = [sys.executable, "-m", "service.cli", "predict", "--model", "resnet18", "--server", run.address]

        # The reader is gone before predict writes a byte.
        out = tmp_path / "closed.png"
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            closed = subprocess.run(predict + [str(source), "--out", str(out)], stdout=write_end,
                                    stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write_end)
        assert closed.returncode == 141, closed.stderr
        assert "Traceback" not in closed.stderr and "BrokenPipe" not in closed.stderr, closed.stderr

        # `| head -n 1` on far more output than a pipe holds (16 images x 1000 labels).
        out_head = tmp_path / "head.png"
        head = subprocess.run(
            ["bash", "-c", '"$@" | head -n 1; exit "${PIPESTATUS[0]}"', "_",
             *predict, *[str(source)] * 16, "--top-k", "1000", "--out", str(out_head)],
            capture_output=True, text=True, timeout=120)
        assert head.returncode == 141, head.stderr
        assert "Traceback" not in head.stderr and "BrokenPipe" not in head.stderr, head.stderr
        assert len(head.stdout.splitlines()) == 1

        for path in (out, out_head):
            with Image.open(path) as drawn:
                drawn.verify()
                assert drawn.format == "PNG" and drawn.size == photo("chelsea.png", max_side=64).size
    finally:
        run.cleanup()

"""`lifetime.with_parent_death_signal`, the launcher that starts tritonserver: the command
keeps the launcher's pid and exit status, dies with the thread that started it, and
nothing runs in a forked copy of the starting process (the way a restart under gRPC
load once crashed before exec; see `service.embedded.lifetime`)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from service.embedded import lifetime

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True  # dead, waiting for its (new) parent to reap it
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_the_command_keeps_the_pid_and_the_exit_status():
    process = subprocess.Popen(lifetime.with_parent_death_signal(["/bin/sh", "-c", "echo $$; exit 3"]),
                               stdout=subprocess.PIPE, text=True)
    out, _ = process.communicate(timeout=30)
    assert int(out) == process.pid
    assert process.returncode == 3


def test_a_program_that_cannot_run_exits_127_naming_it(tmp_path):
    missing = tmp_path / "no-such-tritonserver"
    run = subprocess.run(lifetime.with_parent_death_signal([str(missing)]), capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 127
    assert str(missing) in run.stderr


def test_the_command_dies_with_its_parent(tmp_path):
    # A parent that starts `sleep` through the launcher, says its pid, and is then SIGKILLed.
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import subprocess, sys, time
        from service.embedded import lifetime
        child = subprocess.Popen(lifetime.with_parent_death_signal(["/bin/sleep", "600"]))
        print(child.pid, flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child, 0.5), "the child ended by itself"
        parent.kill()
        parent.wait(30)
        assert _gone(child, 10), f"sleep {child} outlived its SIGKILLed parent"
    finally:
        parent.kill()
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, NameError):
            pass


def test_a_launcher_whose_parent_is_already_gone_ends_itself():
    argv = lifetime.with_parent_death_signal(["/bin/sleep", "600"])
    argv[argv.index(str(os.getpid()))] = "1"  # as if re-parented to init before the flag was set
    process = subprocess.Popen(argv)
    assert process.wait(30) == -signal.SIGKILL


@pytest.mark.parametrize("how", ["launcher", "preexec_fn"])
def test_no_code_runs_in_a_forked_copy_of_the_starter(tmp_path, how):
    """A Python at-fork handler stands for gRPC's: it must not run when the launcher starts
    a command. The preexec_fn variant shows the check can fail."""
    marker = tmp_path / "forked"
    script = textwrap.dedent(f"""
        import os, subprocess
        from service.embedded import lifetime
        os.register_at_fork(after_in_child=lambda: open({str(marker)!r}, "w").close())
        if {how!r} == "launcher":
            subprocess.run(lifetime.with_parent_death_signal(["/bin/true"]), check=True)
        else:
            subprocess.run(["/bin/true"], check=True, preexec_fn=lambda: None)
        """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, cwd=os.getcwd())
    assert marker.exists() == (how == "preexec_fn")

"""Tie a child process's life to its parent's: no tritonserver and no python backend
stub may outlive the process that started it.

Why a parent-death signal, and not the alternatives:

- Killing the process group when the parent ends needs a parent that is still alive to
  do it. SIGKILL (the OOM killer, `kill -9`) gives it no chance to, so it only helps when
  the parent ends cleanly (and `convserve` does that too: see `TritonProcess.stop`).
- `exec`ing tritonserver in place of `convserve triton` would let a supervisor see
  Triton itself, but `convserve serve` must stay a parent (the gateway runs beside
  Triton and restarts it), so it cannot cover both commands.
- Linux's `prctl(PR_SET_PDEATHSIG, SIGKILL)` is set in the child and carried out by the
  kernel when the parent dies, whatever killed it. It survives `execve` (tritonserver is
  not set-uid), so a small launcher can set it and then exec tritonserver.

Where it is set matters. Not in a `Popen(preexec_fn=...)`: that runs Python in a forked
copy of a process whose other threads may be inside gRPC, and the copy runs gRPC's and
Python's at-fork handlers before the hook. Measured: a process with three threads making
gRPC calls (as the gateway's, or a test's load) started 2000 children that way: one died
of SIGABRT before its exec and others logged gRPC errors from the child; CI once saw
tritonserver "exit" with 139 (SIGSEGV) and no line of log when restarted under load.
Without a preexec_fn, `subprocess` starts the child with vfork+exec, which runs no
handlers, and the launcher (`with_parent_death_signal`) is a fresh interpreter.

Two caveats, both handled here:

- The signal fires when the parent *thread* that forked the child exits, not the whole
  process. `convserve` therefore starts tritonserver from its main thread only (see
  `start_triton`). Triton launches its stubs from short-lived threads, so stubs use a
  watcher thread instead (see `die_with_triton`).
- If the parent died before the flag was set, no signal ever comes. So after setting it,
  the child checks that its parent is still the one it expects, and ends itself if not.

Everywhere but Linux these functions do nothing: the embedded Triton only runs on Linux.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
# How often a stub looks whether Triton is still its parent (see die_with_triton).
PARENT_POLL_S = 0.5

if sys.platform.startswith("linux"):
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _prctl.restype = ctypes.c_int
else:  # pragma: no cover - not Linux
    _prctl = None


def set_parent_death_signal(signum: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `signum` to this process when its parent thread exits.
    False where that is not available (not Linux)."""
    if _prctl is None:
        return False
    if _prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return True


def die_with_parent(signum: int, parent_pid: int) -> None:
    """Set `signum` as this process's parent-death signal, and close the race with a
    parent that died before it was set (the signal would never come): when this
    process's parent is no longer `parent_pid`, send `signum` to itself now."""
    if set_parent_death_signal(signum) and os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)


def launch(argv: list[str]) -> None:
    """The launcher's body (`with_parent_death_signal`), in a fresh interpreter: argv is
    the parent's pid, then the command. SIGKILL when that parent's thread exits, then
    exec the command in this process's place (127 with a message if it cannot run)."""
    die_with_parent(signal.SIGKILL, int(argv[0]))
    try:
        os.execv(argv[1], argv[1:])
    except OSError as exc:
        sys.stderr.write(f"convserve launcher: cannot run {argv[1]}: {exc}\n")
        os._exit(127)


def with_parent_death_signal(command: list[str]) -> list[str]:
    """`command` (argv, the program as a path) wrapped so that it gets SIGKILL when the
    calling thread exits: pass the result to `subprocess.Popen` *without* a preexec_fn.
    The process keeps its pid through the launcher's exec, so Popen's pid, signals and
    return code are the command's own (127 if the program cannot be run). Call it from
    the thread that calls Popen, one that lives as long as the process. Elsewhere than
    Linux the command comes back unchanged."""
    if _prctl is None:
        return list(command)
    # A fresh interpreter runs `launch`, not a forked copy of this one (see above).
    return [sys.executable, "-c", "import sys; from service.embedded.lifetime import launch; launch(sys.argv[1:])",
            str(os.getpid()), *map(str, command)]


def _parent_is_triton(ppid: int) -> bool:
    try:
        with open(f"/proc/{ppid}/comm", "rb") as f:
            return f.read().strip() == b"tritonserver"
    except OSError:
        return False


def die_with_triton() -> None:
    """Called in a python backend stub (a process tritonserver launched): end this
    process as soon as tritonserver is gone, even while Triton's corpse is not yet
    reaped (the stub's own liveness check, `kill(parent, 0)`, still sees a zombie as
    alive, so stubs outlived a Triton whose parent did not reap it).

    A daemon thread looks every PARENT_POLL_S whether the parent is still the same
    process, and SIGKILLs this one when it is not: `getppid` changes the moment the
    parent dies (the kernel re-parents orphans at exit, before any reaping). It also
    covers the race in which Triton died before this function ran: then the parent is
    no longer a tritonserver at all.

    Not a parent-death signal here: it follows the Triton *thread* that launched the
    stub, and Triton launches stubs from short-lived model-loading threads. Measured with
    Triton 2.51: a stub that set PR_SET_PDEATHSIG in `initialize` was killed right after
    its model loaded, while Triton lived on.
    """
    if _prctl is None:
        return
    ppid = os.getppid()
    if not _parent_is_triton(ppid):
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch_parent, args=(ppid,), name="convserve-parent-watch", daemon=True).start()


def _watch_parent(ppid: int) -> None:
    import time

    while True:
        if os.getppid() != ppid:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(PARENT_POLL_S)

"""The shared-memory regions of the embedded Triton's python backend stubs.

Triton's python backend (`python_be.cc`) gives each model instance's stub a region in
/dev/shm named `<shm-region-prefix-name><uuid>` (by default the prefix is
`triton_<backend>_backend_shm_region_`) and removes it when the stub shuts down. A
tritonserver killed with SIGKILL (the OOM killer, `kill -9`, its parent-death signal)
removes nothing: its regions stay in /dev/shm, a tmpfs whose pages count against the
machine's memory (or a pod's /dev/shm limit), and pile up over restarts until a new
stub cannot get a region and its model fails to load.

So `start_triton` gives each tritonserver a prefix of its own (`prefix`) that names the
process that starts it, and

- `remove(prefix)` removes its regions once it has been reaped (`TritonProcess.reap`,
  which every stop and every restart goes through);
- `remove_orphans()`, run at every start, removes the regions whose starting process
  no longer exists: one killed with SIGKILL takes its tritonserver along (the
  parent-death signal) but never reaps it.

The prefix also carries the starting process's PID namespace: a process only judges
owners in its own namespace (a container that shares /dev/shm with another must not
take the other's live PIDs for dead ones). Removing a region's name never disturbs a
process that still has it mapped; its memory is freed when the last mapping goes.
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger("convserve.triton")

SHM_DIR = Path("/dev/shm")
# Every region of an embedded tritonserver started by convserve begins with this.
PREFIX = "convserve_triton_"


def pid_namespace() -> str:
    """This process's PID namespace, as its inode number ('0' where /proc has none)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def prefix(owner_pid: int | None = None) -> str:
    """A new tritonserver's region prefix: `convserve_triton_<PID namespace>_<owner
    pid>_<random token>_`, the owner being the process that starts it (default: this one).
    The stubs' regions are named `<prefix><uuid>`."""
    owner = os.getpid() if owner_pid is None else owner_pid
    return f"{PREFIX}{pid_namespace()}_{owner}_{secrets.token_hex(4)}_"


def backend_config(region_prefix: str) -> str:
    """tritonserver's `--backend-config` argument that gives the stubs regions under
    `region_prefix` (python_be.cc's `shm-region-prefix-name`). It is set on the python
    backend: python-based backends (`torchscript`, `onnxruntime`) run its library and
    take its configuration, not one of their own (checked with Triton 2.51)."""
    return f"--backend-config=python,shm-region-prefix-name={region_prefix}"


def remove(region_prefix: str) -> int:
    """Unlink every region in /dev/shm whose name starts with `region_prefix`; returns how
    many. Call it once the tritonserver that made them has exited."""
    if not region_prefix.startswith(PREFIX):
        raise ValueError(f"{region_prefix!r} is not an embedded Triton's region prefix")
    return sum(_unlink(path) for path in SHM_DIR.glob(region_prefix + "*"))


def _unlink(path: Path) -> bool:
    """Remove one region's name; False when it is gone already or not ours to remove
    (another user's, in the sticky /dev/shm)."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("could not remove a shared-memory region", extra={"path": str(path), "error": str(exc)})
        return False


def owned_by(owner_pid: int) -> list[Path]:
    """The regions in /dev/shm of the tritonservers that process `owner_pid` (in this PID
    namespace) started."""
    return sorted(SHM_DIR.glob(f"{PREFIX}{pid_namespace()}_{owner_pid}_*"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphans() -> int:
    """Unlink the regions whose owner (in this PID namespace) no longer exists; returns
    how many. Regions of live owners, of other namespaces, and Triton's default-named
    ones (whose owner cannot be told) are left alone."""
    namespace = pid_namespace()
    removed = 0
    for path in SHM_DIR.glob(f"{PREFIX}{namespace}_*"):
        owner = path.name[len(PREFIX) + len(namespace) + 1:].split("_", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            removed += _unlink(path)
    if removed:
        log.info("removed orphaned python backend shared-memory regions", extra={"regions": removed})
    return removed

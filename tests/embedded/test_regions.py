"""The python backend stubs' shared-memory regions: which a tritonserver's reaper removes,
and which the orphan sweep at every start removes (only those whose starter is gone,
in this PID namespace). Files in the real /dev/shm; a real Triton is in
tests/e2e/test_processes.py and test_outage.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.embedded import regions

pytestmark = pytest.mark.skipif(not regions.SHM_DIR.is_dir(), reason="no /dev/shm")


@pytest.fixture
def made():
    """Create regions (empty files) by name; every one is removed afterwards."""
    paths = []

    def make(name: str):
        path = regions.SHM_DIR / name
        path.write_bytes(b"\0" * 64)
        paths.append(path)
        return path

    yield make
    for path in paths:
        path.unlink(missing_ok=True)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_prefix_names_the_namespace_and_the_owner_and_is_new_each_time():
    first, second = regions.prefix(), regions.prefix()
    assert first.startswith(f"{regions.PREFIX}{regions.pid_namespace()}_{os.getpid()}_")
    assert first != second and first.endswith("_")
    assert regions.prefix(owner_pid=42).startswith(f"{regions.PREFIX}{regions.pid_namespace()}_42_")
    assert regions.backend_config(first) == f"--backend-config=python,shm-region-prefix-name={first}"


def test_remove_takes_only_the_regions_of_its_prefix(made):
    mine, other = regions.prefix(), regions.prefix()
    gone = [made(mine + "a1b2"), made(mine + "c3d4")]
    kept = made(other + "a1b2")
    assert regions.remove(mine) == 2
    assert not any(path.exists() for path in gone) and kept.exists()
    assert regions.remove(mine) == 0


def test_remove_refuses_a_prefix_that_is_not_ours(made):
    triton_default = made(f"triton_onnxruntime_backend_shm_region_test{os.getpid()}")
    with pytest.raises(ValueError, match="not an embedded Triton's region prefix"):
        regions.remove("triton_onnxruntime_backend_shm_region_")
    with pytest.raises(ValueError):
        regions.remove("")  # would match every file in /dev/shm
    assert triton_default.exists()


def test_remove_orphans_takes_the_regions_of_dead_owners_only(made):
    dead = _dead_pid()
    orphaned = [made(regions.prefix(dead) + "u1"), made(regions.prefix(dead) + "u2")]
    live = made(regions.prefix() + "u1")  # this process: alive
    other_namespace = made(f"{regions.PREFIX}1_{dead}_abcd1234_u1")
    malformed = made(f"{regions.PREFIX}{regions.pid_namespace()}_notapid_u1")
    assert regions.owned_by(dead) == sorted(orphaned)
    assert regions.remove_orphans() >= 2
    assert regions.owned_by(dead) == []
    assert live.exists() and other_namespace.exists() and malformed.exists()


def test_a_region_it_may_not_remove_is_left_with_a_warning(made, monkeypatch, caplog):
    """Another user's region in the sticky /dev/shm: unlink raises PermissionError; the
    sweep goes on (a start must not fail on it)."""
    dead = _dead_pid()
    theirs, ours = made(regions.prefix(dead) + "theirs"), made(regions.prefix(dead) + "ours")
    real_unlink = type(theirs).unlink

    def unlink(path, *args, **kwargs):
        if path == theirs:
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(type(theirs), "unlink", unlink)
    with caplog.at_level("WARNING", logger="convserve.triton"):
        assert regions.remove_orphans() >= 1
    assert theirs.exists() and not ours.exists()
    assert any("could not remove" in r.message and str(theirs) in r.path for r in caplog.records)

"""`CoreShare`, how the embedded backends' runs see each other across stub processes: a
run alone gets every core, a run beside another gets the shared count, and a stub that
dies mid-run leaves no stale lock behind. Real processes and real POSIX record locks."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from service.embedded.backends._common import CoreShare


def _environ(tmp_path, shared: int = 1, alone: int = 2) -> dict[str, str]:
    return {"CONVSERVE_TORCH_THREADS": str(shared), "CONVSERVE_TORCH_THREADS_ALONE": str(alone),
            "CONVSERVE_CORE_LOCKS": str(tmp_path / "core-locks")}


def _hold_a_run(environ: dict[str, str]) -> subprocess.Popen:
    """Another stub, in the middle of a run until killed."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from service.embedded.backends._common import CoreShare
        with CoreShare({environ!r}).run() as threads:
            print(threads, flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == environ["CONVSERVE_TORCH_THREADS_ALONE"]  # it was alone
    return holder


def test_runs_one_after_another_each_get_every_core(tmp_path):
    share = CoreShare(_environ(tmp_path))
    assert share.adaptive
    for _ in range(3):
        with share.run() as threads:
            assert threads == 2


def test_a_run_beside_another_gets_the_share_and_a_killed_stub_releases_its_cores(tmp_path):
    environ = _environ(tmp_path, shared=3, alone=8)
    holder = _hold_a_run(environ)
    try:
        with CoreShare(environ).run() as threads:
            assert threads == 3
    finally:
        holder.kill()
        holder.wait(30)
    with CoreShare(environ).run() as threads:
        assert threads == 8


def test_fixed_counts_lock_nothing(tmp_path):
    environ = _environ(tmp_path, shared=2, alone=2)
    share = CoreShare(environ)
    assert not share.adaptive
    with share.run() as threads:
        assert threads == 2
    assert not (tmp_path / "core-locks").exists()
    assert CoreShare({"CONVSERVE_TORCH_THREADS": "4"}).shared == 4  # no lock file: fixed


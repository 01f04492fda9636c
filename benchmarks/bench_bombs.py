"""Decompression-bomb headers: time to refusal and peak RSS growth, against the goals
(< 50 ms, < 50 MB). Each bomb is a tiny, valid file claiming a huge size
(tests/bombs.py), refused through `decode_image`, the gateway's decode path.

Run: python benchmarks/bench_bombs.py   (pinned to one core)
"""
from __future__ import annotations

import os

os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bombs import BOMBS  # noqa: E402
from memory import MIB, peak_rss_bytes, reset_peak  # noqa: E402
from service.errors import InvalidArgument  # noqa: E402
from service.pipelines.common import ImageInput, decode_image  # noqa: E402

GOAL_MS = 50.0
GOAL_RSS_MB = 50.0
MAX_PIXELS = 40_000_000  # the default CONVSERVE_MAX_IMAGE_PIXELS
REPEATS = 200


def refuse(data: bytes) -> str:
    try:
        decode_image(ImageInput(encoded=data), 0, MAX_PIXELS)
    except InvalidArgument as exc:
        return exc.message
    raise AssertionError("a bomb was decoded")


def main() -> int:
    if not reset_peak():
        print("note: /proc/self/clear_refs is not writable; peak RSS includes earlier work")
    print(f"{'bomb':<18} {'bytes':>6} {'median ms':>10} {'max ms':>8} {'peak RSS +MB':>13}  "
          f"goal <{GOAL_MS:.0f} ms, <{GOAL_RSS_MB:.0f} MB")
    failed = False
    for name, make in BOMBS.items():
        data = make()
        refuse(data)  # warm up the plugin imports
        reset_peak()
        base = peak_rss_bytes()
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            message = refuse(data)
            times.append((time.perf_counter() - start) * 1000)
        growth = (peak_rss_bytes() - base) / MIB
        ok = max(times) < GOAL_MS and growth < GOAL_RSS_MB
        failed |= not ok
        print(f"{name:<18} {len(data):>6} {statistics.median(times):>10.3f} {max(times):>8.3f} {growth:>13.1f}  "
              f"{'ok' if ok else 'OVER'}  ({message[:60]}...)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

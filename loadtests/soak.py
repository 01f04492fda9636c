"""Soak test: a bounded run of mixed Classify calls against a gateway, watching for
leaks and unexpected status codes.

Traffic: valid calls with real photos, plus 1% malformed images, 1% calls cancelled
by the client mid-flight and 1% calls with a deadline too short to meet. Expected
codes are OK, INVALID_ARGUMENT, CANCELLED and DEADLINE_EXCEEDED; any other code fails
the run. The gateway's RSS and open file descriptors are sampled after a warm-up and at
the end; growth past the thresholds fails the run too.

By default it starts its own `convserve serve` (gateway and embedded Triton) on free
ports, with a small model it exports on first use; `--address` with `--pid` soaks a
gateway that is already running instead.

    python loadtests/soak.py --seconds 600            # make soak (SOAK_SECONDS=...)
    python loadtests/soak.py --address host:50051 --pid 1234 --model resnet18
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service._proto import vision_pb2, vision_pb2_grpc  # noqa: E402

EXPECTED = {"OK", "INVALID_ARGUMENT", "CANCELLED", "DEADLINE_EXCEEDED"}
# Share of calls with a malformed image; the same share is cancelled, and the same
# share gets a tiny deadline (--event-rate changes all three).
EVENT_RATE = 0.01
TINY_DEADLINE_S = 0.001
CALL_TIMEOUT_S = 60.0
SAMPLE_EVERY_S = 5.0
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
MAX_SIDE = 320  # real photos, downscaled: the gateway's cost, not the model's, is soaked


# ----------------------------------------------------------------------- images
def photos() -> list[bytes]:
    """Real photos from scikit-image's wheel in several formats (random noise where
    scikit-image is absent)."""
    images = []
    try:
        import skimage

        folder = Path(skimage.__file__).parent / "data"
        for name in PHOTOS:
            image = Image.open(folder / name).convert("RGB")
            image.thumbnail((MAX_SIDE, MAX_SIDE))
            images.append(image)
    except ImportError:
        rng = random.Random(0)
        images = [Image.frombytes("RGB", (MAX_SIDE, 240), rng.randbytes(MAX_SIDE * 240 * 3)) for _ in range(3)]
    encoded = []
    for i, image in enumerate(images):
        fmt = ("JPEG", "PNG", "WEBP")[i % 3]
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **({"quality": 90} if fmt != "PNG" else {}))
        encoded.append(buffer.getvalue())
    return encoded


def malformed(rng: random.Random, valid: list[bytes]) -> bytes:
    """A real file cut short with flipped header bits, or random bytes."""
    if rng.random() < 0.2:
        return rng.randbytes(rng.randrange(1, 2048))
    data = bytearray(rng.choice(valid))
    del data[rng.randrange(16, len(data) // 2):]
    data[rng.randrange(2, 16)] ^= 1 << rng.randrange(8)
    return bytes(data)


# ------------------------------------------------------------------- the process
def _statm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(repo: Path, model: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    """`convserve serve` on free ports; exports `model` (small input) into an empty repo."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    workdir.mkdir(parents=True, exist_ok=True)
    if not (repo / model / "config.pbtxt").is_file():
        print(f"soak: exporting {model} (input 64 px, seeded weights) into {repo} ...", flush=True)
        subprocess.run([sys.executable, "-m", "service.cli", "export", model, "--repo", str(repo),
                        "--input-size", "64", "--max-batch-size", "8"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = _free_port()
    env.update({"CONVSERVE_TRITON_LOG": str(workdir / "triton.log"), "CONVSERVE_LOG_LEVEL": "WARNING"})
    log = open(workdir / "serve.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--repo", str(repo), "--port", str(port),
         "--metrics-port", "0", "--http-port", str(_free_port()), "--triton-grpc-port", str(_free_port()),
         "--triton-metrics-port", str(_free_port())],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, f"127.0.0.1:{port}"


async def wait_serving(address: str, timeout_s: float, process: subprocess.Popen | None) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"convserve serve exited with code {process.returncode}")
            try:
                answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"gateway {address} not serving after {timeout_s:.0f}s")


# ---------------------------------------------------------------------- the load
async def soak(address: str, pid: int | None, model: str, seconds: float, concurrency: int, seed: int,
               rate: float = EVENT_RATE) -> dict:
    rng = random.Random(seed)
    valid = photos()
    codes: Counter = Counter()
    kinds: Counter = Counter()
    samples: list[tuple[float, int, int]] = []
    start = time.monotonic()
    end = start + seconds
    warmup_until = start + min(max(10.0, 0.1 * seconds), seconds / 2)

    def request(data: bytes) -> vision_pb2.ClassifyRequest:
        return vision_pb2.ClassifyRequest(model=model, images=[vision_pb2.Image(encoded=data)])

    async def one(stub) -> None:
        roll = rng.random()
        try:
            if roll < rate:
                kinds["malformed"] += 1
                await stub.Classify(request(malformed(rng, valid)), timeout=CALL_TIMEOUT_S)
            elif roll < 2 * rate:
                kinds["cancelled"] += 1
                call = stub.Classify(request(rng.choice(valid)), timeout=CALL_TIMEOUT_S)
                await asyncio.sleep(rng.uniform(0, 0.02))
                call.cancel()
                try:
                    await call
                except asyncio.CancelledError:
                    codes["CANCELLED"] += 1
                    return
            elif roll < 3 * rate:
                kinds["tiny_deadline"] += 1
                await stub.Classify(request(rng.choice(valid)), timeout=TINY_DEADLINE_S)
            else:
                kinds["valid"] += 1
                await stub.Classify(request(rng.choice(valid)), timeout=CALL_TIMEOUT_S)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] += 1

    async def worker(stub) -> None:
        while time.monotonic() < end:
            await one(stub)

    async def sampler() -> None:
        while time.monotonic() < end:
            await asyncio.sleep(min(SAMPLE_EVERY_S, max(end - time.monotonic(), 0)))
            if pid is not None and time.monotonic() >= warmup_until:
                samples.append((time.monotonic() - start, _statm_rss(pid), _fds(pid)))

    async with grpc.aio.insecure_channel(address) as channel:
        stub = vision_pb2_grpc.VisionStub(channel)
        await asyncio.gather(sampler(), *(worker(stub) for _ in range(concurrency)))
    return {"codes": codes, "kinds": kinds, "samples": samples, "seconds": time.monotonic() - start}


def report(result: dict, rss_limit_mb: float, fd_limit: int) -> int:
    codes, kinds, samples = result["codes"], result["kinds"], result["samples"]
    total = sum(codes.values())
    print(f"\nsoak: {total} calls in {result['seconds']:.0f} s ({total / result['seconds']:.1f}/s); "
          f"sent: {dict(kinds)}")
    print(f"{'status code':<20} {'calls':>8} {'share':>8}")
    for code, count in codes.most_common():
        print(f"{code:<20} {count:>8} {count / total:>8.2%}{'' if code in EXPECTED else '   UNEXPECTED'}")
    failed = [code for code in codes if code not in EXPECTED]
    if len(samples) >= 2:
        (t0, rss0, fd0), (t1, rss1, fd1) = samples[0], samples[-1]
        peak = max(rss for _, rss, _ in samples)
        rss_growth = (rss1 - rss0) / 2 ** 20
        fd_growth = fd1 - fd0
        print(f"gateway RSS {rss0 / 2 ** 20:.1f} MB at {t0:.0f} s -> {rss1 / 2 ** 20:.1f} MB at {t1:.0f} s "
              f"(growth {rss_growth:+.1f} MB, limit {rss_limit_mb:.0f}; peak {peak / 2 ** 20:.1f} MB)")
        print(f"gateway open fds {fd0} -> {fd1} (growth {fd_growth:+d}, limit {fd_limit})")
        if rss_growth > rss_limit_mb:
            failed.append(f"RSS grew {rss_growth:.1f} MB")
        if fd_growth > fd_limit:
            failed.append(f"fds grew by {fd_growth}")
    else:
        print("gateway RSS/fds: not measured (no --pid, or the run was shorter than its warm-up)")
    if failed:
        print(f"soak FAILED: {', '.join(failed)}")
        return 1
    print("soak passed")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)))
    parser.add_argument("--address", help="soak a running gateway (default: start convserve serve)")
    parser.add_argument("--pid", type=int, help="with --address: the gateway's process id, for RSS and fds")
    parser.add_argument("--repo", type=Path, default=ROOT / ".convserve" / "soak" / "repo",
                        help="model repository for the serve it starts")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--event-rate", type=float, default=EVENT_RATE,
                        help="share of malformed, of cancelled and of tiny-deadline calls (each)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=50.0)
    parser.add_argument("--max-fd-growth", type=int, default=20)
    args = parser.parse_args(argv)

    serve = None
    address, pid = args.address, args.pid
    if address is None:
        serve, address = start_serve(args.repo, args.model, args.repo.parent)
        pid = serve.pid  # `serve` runs the gateway in its own process (Triton is a child)
    try:
        asyncio.run(wait_serving(address, 600, serve))
        print(f"soak: {args.seconds:.0f} s against {address} (pid {pid}), model {args.model}, "
              f"{args.concurrency} concurrent clients", flush=True)
        result = asyncio.run(soak(address, pid, args.model, args.seconds, args.concurrency, args.seed,
                                  args.event_rate))
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(120)
            except subprocess.TimeoutExpired:
                serve.kill()
    return report(result, args.max_rss_growth_mb, args.max_fd_growth)


if __name__ == "__main__":
    sys.exit(main())

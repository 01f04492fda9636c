"""A bounded, headless load test with a verdict (what `make loadtest` runs).

1. Without --target: start `convserve serve` on loopback, on free ports, over
   --repo (default `model_repository/`, the repository `make serve` uses: an empty one
   gets the default model set exported on first start, which takes a few minutes once).
2. Run Locust headless (loadtests/locustfile.py) for --duration with --users users.
3. Write Locust's CSV and HTML reports into --results (default loadtests/results/,
   ignored by git): <prefix>_stats.csv, <prefix>_failures.csv, <prefix>.html.
4. Stop the server (SIGTERM: the gateway drains, then Triton stops).
5. Exit non-zero when a request failed, nothing was sent, or the aggregated p99
   exceeds --slo-p99-ms (0 skips the latency check).

Locust options it does not know (e.g. --task-weights, --image-sizes) are passed on.
"""
from __future__ import annotations

import argparse
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
# The first start may export the default models into an empty repository.
SERVE_STARTUP_TIMEOUT_S = 1800
STOP_TIMEOUT_S = 90


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, and never one this process handed out before:
    two binds to port 0 in a row may get the same port once the first socket is closed
    (seen once: Triton's HTTP and metrics ports equal, and Triton refused to start)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_serving(address: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"convserve serve exited ({process.returncode}); see {log}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"convserve serve not serving after {timeout_s:.0f}s; see {log}")


def start_serve(repo: Path, results: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = results / "serve.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               CONVSERVE_TRITON_LOG=str(results / "triton" / "triton.log"))
    command = [sys.executable, "-m", "service.cli", "serve", "--repo", str(repo), "--port", str(port),
               "--metrics-port", "0", "--http-port", str(free_port()), "--triton-grpc-port", str(free_port()),
               "--triton-metrics-port", str(free_port()), "--no-reflection"]
    print(f"loadtest: starting convserve serve on 127.0.0.1:{port} (repository {repo}; log {log})", flush=True)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, process, SERVE_STARTUP_TIMEOUT_S, log)
    except BaseException:
        stop_serve(process)
        raise
    return process, address


def stop_serve(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def aggregated(stats_csv: Path) -> dict:
    """The 'Aggregated' row of Locust's <prefix>_stats.csv."""
    with open(stats_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated":
                return row
    raise RuntimeError(f"{stats_csv} has no Aggregated row")


def verdict(stats_csv: Path, slo_p99_ms: float) -> list[str]:
    """Reasons the run failed (empty: passed)."""
    row = aggregated(stats_csv)
    requests, failures = int(row["Request Count"]), int(row["Failure Count"])
    p99 = row["99%"]
    print(f"loadtest: {requests} requests, {failures} failures, p50 {row['50%']} ms, p99 {p99} ms, "
          f"{float(row['Requests/s']):.1f} req/s", flush=True)
    problems = []
    if requests == 0:
        problems.append("no request was sent")
    if failures:
        problems.append(f"{failures} of {requests} requests failed")
    if slo_p99_ms > 0 and p99 not in ("", "N/A") and float(p99) > slo_p99_ms:
        problems.append(f"p99 {float(p99):.0f} ms is over the SLO of {slo_p99_ms:.0f} ms")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--spawn-rate", type=float, default=4)
    parser.add_argument("--duration", default="60s", help="Locust run time, e.g. 30s, 2m")
    parser.add_argument("--slo-p99-ms", type=float, default=2000.0, help="0: no latency check")
    parser.add_argument("--target", default="", help="a running gateway host:port (else start convserve serve)")
    parser.add_argument("--repo", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--results", type=Path, default=ROOT / "loadtests" / "results")
    parser.add_argument("--prefix", default="loadtest", help="report file name prefix")
    args, locust_extra = parser.parse_known_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    prefix = args.results / args.prefix

    server = None
    address = args.target
    if not address:
        server, address = start_serve(args.repo.resolve(), args.results)
    try:
        command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
                   "--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", args.duration,
                   "--host", address, "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
                   "--stop-timeout", "30", *locust_extra]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        print("loadtest: " + " ".join(command), flush=True)
        code = subprocess.run(command, cwd=ROOT, env=env).returncode
    finally:
        if server is not None:
            stop_serve(server)
    stats = Path(f"{prefix}_stats.csv")
    if not stats.is_file():
        print(f"loadtest: FAILED: Locust wrote no statistics (exit code {code})", file=sys.stderr)
        return 1
    problems = verdict(stats, args.slo_p99_ms)
    if code != 0 and not problems:
        problems.append(f"locust exited with code {code}")
    print(f"loadtest: reports in {args.results} ({prefix.name}_stats.csv, {prefix.name}.html)")
    if problems:
        print("loadtest: FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("loadtest: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

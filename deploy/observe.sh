#!/usr/bin/env bash
# `make observe`: a real Prometheus, on loopback only, scraping a running `convserve serve`:
# the gateway's /metrics (localhost:9464) and its embedded Triton's (localhost:8002).
# Storage lives in a temporary folder that is removed on exit. Ctrl-C stops it.
#
# Environment (defaults in brackets):
#   OBSERVE_GATEWAY    gateway metrics address          [localhost:9464]
#   OBSERVE_TRITON     Triton metrics address           [localhost:8002]
#   OBSERVE_LISTEN     Prometheus web/API address       [127.0.0.1:9090]
#   OBSERVE_INTERVAL   scrape interval                  [5s]
#   OBSERVE_NO_INSTALL set to 1 to never apt-get install prometheus
set -euo pipefail

gateway=${OBSERVE_GATEWAY:-localhost:9464}
triton=${OBSERVE_TRITON:-localhost:8002}
listen=${OBSERVE_LISTEN:-127.0.0.1:9090}
interval=${OBSERVE_INTERVAL:-5s}

case "$listen" in
  127.*|localhost:*|\[::1\]:*) ;;
  *) echo "observe: OBSERVE_LISTEN must be a loopback address, got $listen" >&2; exit 2 ;;
esac

# Debian's package brings both prometheus and promtool.
if ! command -v prometheus >/dev/null 2>&1; then
  if [ "${OBSERVE_NO_INSTALL:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "observe: installing Debian's prometheus package ..." >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null
  else
    echo "observe: prometheus is not installed; run: sudo apt-get install prometheus" >&2
    exit 1
  fi
fi

workdir=$(mktemp -d "${TMPDIR:-/tmp}/convserve-observe.XXXXXX")
prometheus_pid=
cleanup() {
  if [ -n "$prometheus_pid" ] && kill -0 "$prometheus_pid" 2>/dev/null; then
    kill -TERM "$prometheus_pid" 2>/dev/null || true
    wait "$prometheus_pid" 2>/dev/null || true
  fi
  rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cat > "$workdir/prometheus.yml" <<YAML
# Written by deploy/observe.sh; removed when it exits.
global:
  scrape_interval: $interval
  evaluation_interval: $interval
scrape_configs:
  - job_name: convserve-gateway
    static_configs:
      - targets: ["$gateway"]
        labels: {component: gateway}
  - job_name: triton
    static_configs:
      - targets: ["$triton"]
        labels: {component: triton}
YAML

if command -v promtool >/dev/null 2>&1; then
  promtool check config "$workdir/prometheus.yml" >/dev/null
fi

cat >&2 <<MSG
observe: Prometheus on http://$listen scraping gateway $gateway and Triton $triton every $interval
observe: p99 request latency over 5 minutes:
  histogram_quantile(0.99, sum by (le) (rate(convserve_request_duration_seconds_bucket[5m])))
observe: data in $workdir (removed on exit); Ctrl-C to stop
MSG

prometheus \
  --config.file="$workdir/prometheus.yml" \
  --storage.tsdb.path="$workdir/data" \
  --storage.tsdb.retention.time=1d \
  --web.listen-address="$listen" \
  --log.level=warn &
prometheus_pid=$!
wait "$prometheus_pid"

#!/usr/bin/env bash
# Make sure prometheus and promtool are on PATH (`convoy monitor` and the monitoring tests
# run them): install Debian's package when running as root, otherwise say exactly what to run.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "convoy: installing prometheus (Debian package)..."
  apt-get update -qq
  # --no-install-recommends: the server and promtool only, no node exporter service.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package starts a system service on :9090; convoy starts its own Prometheus.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
  fi
  command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 && exit 0
fi
cat >&2 <<'MSG'
convoy: prometheus (with promtool) is required for `convoy monitor` and the monitoring tests.
  Debian/Ubuntu:  sudo apt-get update && sudo apt-get install -y prometheus
  macOS:          brew install prometheus
  Elsewhere:      https://prometheus.io/download/ (put prometheus and promtool on PATH)
MSG
exit 1

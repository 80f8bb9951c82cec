#!/usr/bin/env bash
# Make sure redis-server is on PATH: install Debian's package when running as root,
# otherwise say exactly what to run.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "convoy: installing redis-server (Debian package)..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  command -v redis-server >/dev/null 2>&1 && exit 0
fi
cat >&2 <<'MSG'
convoy: redis-server is required (replay shards run on it) and is not installed.
  Debian/Ubuntu:  sudo apt-get update && sudo apt-get install -y redis-server
  macOS:          brew install redis
Or point convoy at existing shards with replay.shard_urls=redis://HOST:PORT/0
MSG
exit 1

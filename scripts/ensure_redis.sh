#!/usr/bin/env bash
# Make sure `redis-server` is on PATH: the serving tests start their own throwaway instance on 127.0.0.1
# (the response cache's Redis backend runs against a real server). Installs Debian's package when missing.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_redis: redis-server is missing and apt-get is not available; install Redis by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "ensure_redis: installing Debian's redis-server" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
# The package may start a system service on 6379; the tests never use it, they start their own.
command -v redis-server >/dev/null

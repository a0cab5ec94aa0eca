#!/usr/bin/env bash
# The benchmark on a fresh machine: installs lighttpd, wrk, iperf3 and the
# project, then compares the kernel's TCP stack with mtcpshim's (about ten
# minutes with the defaults). Extra arguments go to `mtcpshim bench`, e.g.
#   scripts/bench.sh --quick
# Writes the table to stdout and bench-results/bench.json, bench-results/bench.png.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "bench.sh: run as root (network namespaces, packet sockets, apt-get)" >&2
    exit 1
fi
scripts/install.sh
mkdir -p bench-results
python3 -m mtcpshim.cli bench --json bench-results/bench.json --plot bench-results/bench.png "$@" \
    | tee bench-results/bench.md

#!/usr/bin/env bash
# Installs everything, then runs the whole test suite (unit, interposer,
# and integration tests with real programs in network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec python3 -m pytest -q -rs "$@"

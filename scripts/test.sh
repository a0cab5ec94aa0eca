#!/usr/bin/env bash
# Installs everything, then runs the whole test suite (unit, interposer,
# and integration tests with real programs in network namespaces).  The
# stack process runs under PyPy where it is ready (scripts/install.sh
# installs it; the default `--stack-python auto`); then every suite that
# starts a stack process runs again with the stack under CPython, the
# fallback where PyPy is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
python3 -m pytest -q -rs "$@"
if [ $# -eq 0 ] && python3 -c "import sys; from mtcpshim.launcher import pypy_ready; sys.exit(pypy_ready() is None)"; then
    echo "== again with the stack process under CPython"
    MTCPSHIM_STACK_PYTHON=cpython python3 -m pytest -q -rs tests/integration tests/faults tests/fuzz
fi

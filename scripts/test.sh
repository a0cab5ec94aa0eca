#!/usr/bin/env bash
# Installs everything, then runs the whole test suite (unit, interposer,
# and integration tests with real programs in network namespaces).  Where
# the stack can run under PyPy (scripts/install.sh installs it), every suite
# that starts a stack process runs again with the stack under PyPy.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
python3 -m pytest -q -rs "$@"
if [ $# -eq 0 ] && python3 -c "import sys; from mtcpshim.launcher import pypy_ready; sys.exit(pypy_ready() is None)"; then
    echo "== again with the stack process under PyPy"
    MTCPSHIM_STACK_PYTHON=pypy python3 -m pytest -q -rs tests/integration tests/faults tests/fuzz
fi

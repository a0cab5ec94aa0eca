"""cffi builder for stack._netfast (out-of-line API mode).

Development build, in place, from any directory:

    python3 stack/_build_netfast.py

Packaging: setup(cffi_modules=["stack/_build_netfast.py:ffibuilder"]).
"""
import shutil
import tempfile
from pathlib import Path

from cffi import FFI

_CSRC = Path(__file__).resolve().parent / "csrc"

ffibuilder = FFI()
ffibuilder.cdef((_CSRC / "netfast.h").read_text())
ffibuilder.set_source(
    "stack._netfast",
    '#include "netfast.h"',
    sources=[str(_CSRC / "netfast.c")],
    include_dirs=[str(_CSRC)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    # Build in a scratch directory so only the module lands in stack/.
    with tempfile.TemporaryDirectory() as scratch:
        built = Path(ffibuilder.compile(tmpdir=scratch))
        shutil.copy2(built, Path(__file__).resolve().parent / built.name)

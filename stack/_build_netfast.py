"""cffi builder for mtcpshim.stack._netfast (out-of-line API mode).

Built by `pip install -e .` (setup.py's cffi_modules).
"""
import os
from pathlib import Path

from cffi import FFI

_CSRC = Path(__file__).resolve().parent / "csrc"

ffibuilder = FFI()
ffibuilder.cdef((_CSRC / "netfast.h").read_text())
ffibuilder.set_source(
    "mtcpshim.stack._netfast",
    '#include "netfast.h"',
    # setuptools refuses absolute source paths.
    sources=[os.path.relpath(_CSRC / "netfast.c")],
    include_dirs=[str(_CSRC)],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra"],  # -O3: vectorized checksums
)


"""cffi builder for mtcpshim.stack._netfast (out-of-line API mode).

Built by `pip install -e .` (setup.py's cffi_modules).
"""
import os
from pathlib import Path

from cffi import FFI

_CSRC = Path(__file__).resolve().parent / "csrc"
_HEADERS = ("netfast.h", "fastpath.h")

ffibuilder = FFI()
ffibuilder.cdef("\n".join((_CSRC / name).read_text() for name in _HEADERS))
ffibuilder.set_source(
    "mtcpshim.stack._netfast",
    "".join(f'#include "{name}"\n' for name in _HEADERS),
    # setuptools refuses absolute source paths.
    sources=[os.path.relpath(_CSRC / name) for name in ("netfast.c", "fastpath.c")],
    include_dirs=[str(_CSRC)],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra"],  # -O3: vectorized checksums
)

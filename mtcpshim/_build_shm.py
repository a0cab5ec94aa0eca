"""cffi builder for mtcpshim._shm, the stack side of the shared-memory ABI.
Built by `pip install -e .` (setup.py's cffi_modules)."""
import pathlib
import sys

import cffi

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from abi_source import PRELOAD_DIR, c_source, cdef_text  # noqa: E402

ffibuilder = cffi.FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "mtcpshim._shm",
    c_source(),
    include_dirs=[str(PRELOAD_DIR)],
    extra_compile_args=["-O2", "-std=gnu11"],
)


"""Turns the ABI header into cffi declarations: the header stays the single
source of truth for the shared layout, cffi only sees it filtered.

Used at build time by _build_shm.py and at run time for the header's string
constants (environment variable names), which cffi cannot carry.
"""
import pathlib
import re

PRELOAD_DIR = pathlib.Path(__file__).resolve().parent.parent / "preload"
ABI_HEADER = PRELOAD_DIR / "mtcpshim_abi.h"
SHM_HEADER = PRELOAD_DIR / "mts_shm.h"

_INT_DEFINE = re.compile(r"#define\s+\w+\s+(0x[0-9a-fA-F]+|\d+)\s*(/\*.*)?$")
_STRING_DEFINE = re.compile(r'#define\s+(\w+)\s+"([^"]*)"')


def cdef_text() -> str:
    """Declarations for cffi: the ABI header's structs and integer constants,
    plus the prototypes mts_shm.h marks for the stack."""
    lines = []
    for line in ABI_HEADER.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not _INT_DEFINE.match(stripped):
            continue
        lines.append(line)
    shm = SHM_HEADER.read_text()
    prototypes = shm.split("/* cdef-begin */", 1)[1].split("#endif /* cdef-end */", 1)[0]
    return "\n".join(lines) + "\n" + prototypes


def string_constants() -> dict[str, str]:
    """The header's string #defines (MTS_ENV_FDS and friends)."""
    return dict(_STRING_DEFINE.findall(ABI_HEADER.read_text()))

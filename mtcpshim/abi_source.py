"""Turns the ABI header into cffi declarations: the header stays the single
source of truth for the shared layout, cffi only sees it filtered.

Used at build time by _build_shm.py.  The header's string constants
(environment variable names), which cffi cannot carry, are compiled into the
module as a name/value table, so an installed wheel, which has no preload/
directory, still finds them.
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
    return "\n".join(lines) + "\n" + prototypes + "\nextern const char *const mts_string_constants[];\n"


def c_source() -> str:
    """What the cffi module compiles: the shared operations, and the
    header's string #defines as a NULL-terminated name, value table."""
    names = [name for name, _ in _STRING_DEFINE.findall(ABI_HEADER.read_text())]
    table = "".join(f'"{name}", {name}, ' for name in names)
    return f'#include "mts_shm.h"\nconst char *const mts_string_constants[] = {{{table}NULL}};\n'


def string_constants() -> dict[str, str]:
    """The header's string #defines (MTS_ENV_FDS and friends), as compiled."""
    from mtcpshim._shm import ffi, lib
    table, constants, i = lib.mts_string_constants, {}, 0
    while table[i] != ffi.NULL:
        constants[ffi.string(table[i]).decode()] = ffi.string(table[i + 1]).decode()
        i += 2
    return constants

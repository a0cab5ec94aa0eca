"""Network namespace helpers: run a command in a named namespace, or move
the calling thread into one for a while.

Named namespaces are the bind mounts that `ip netns add` creates under
/run/netns.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator, Sequence

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


def netns_path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def netns_inode(name: str | None) -> int:
    """The identity of namespace `name` (None: the caller's own), the same
    under every name it is bound to (`ip netns attach`, mount --bind)."""
    return os.stat(netns_path(name) if name else "/proc/self/ns/net").st_ino


def in_netns(name: str | None) -> contextlib.AbstractContextManager:
    """enter_netns(name), or stay where we are for None."""
    return enter_netns(name) if name else contextlib.nullcontext()


def run_in_ns(ns: str, argv: Sequence[str], **subprocess_kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(argv) inside network namespace `ns` (via `ip netns exec`)."""
    return subprocess.run(["ip", "netns", "exec", ns, *argv], **subprocess_kwargs)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextlib.contextmanager
def enter_netns(name: str) -> Iterator[None]:
    """Move the calling thread into namespace `name` for the `with` block.

    setns(2) changes only the calling thread, so the way back is taken from
    /proc/thread-self (not /proc/self, which names the main thread). Sockets
    opened inside the block stay in `name` after the thread returns.
    """
    with open("/proc/thread-self/ns/net", "rb") as original, open(netns_path(name), "rb") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(original.fileno())

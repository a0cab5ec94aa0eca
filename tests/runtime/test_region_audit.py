"""The C side of the trust boundary, checked rather than trusted: the stack's
shared-memory operations rebuilt with MTS_AUDIT (every address derived from
the geometry must lie inside the region, or the process aborts) and under
AddressSanitizer, then driven by the hostile storm of world.py in a fresh
interpreter that uses them in place of mtcpshim._shm."""
import json
import os
import subprocess
import sys
import textwrap

import cffi
import pytest

from mtcpshim import abi_source

HERE = os.path.dirname(os.path.abspath(__file__))
STORM_WRITES = int(os.environ.get("MTCPSHIM_AUDIT_WRITES", "20000"))


@pytest.fixture(scope="module")
def audited_shm(tmp_path_factory):
    """Builds the audited module; returns (its directory, the environment
    that loads AddressSanitizer first)."""
    build = tmp_path_factory.mktemp("shm-audit")
    builder = cffi.FFI()
    builder.cdef(abi_source.cdef_text())
    builder.set_source("_shm_audit", "#define MTS_AUDIT 1\n" + abi_source.c_source(),
                       include_dirs=[str(abi_source.PRELOAD_DIR)],
                       extra_compile_args=["-O1", "-g", "-std=gnu11", "-fsanitize=address",
                                           "-fno-omit-frame-pointer"],
                       extra_link_args=["-fsanitize=address"])
    builder.compile(tmpdir=str(build))
    asan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(asan):
        pytest.skip("gcc has no AddressSanitizer runtime")
    env = dict(os.environ, LD_PRELOAD=asan, ASAN_OPTIONS="detect_leaks=0")
    return build, env


def run_with_audit(audited_shm, code: str) -> subprocess.CompletedProcess:
    build, env = audited_shm
    prelude = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(build)!r}, {HERE!r}, {os.path.dirname(HERE)!r}]
        import _shm_audit
        sys.modules["mtcpshim._shm"] = _shm_audit
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_audit_catches_an_address_outside_the_region(audited_shm):
    """The check itself can fail: a geometry that claims one slot too many
    puts that slot's receive ring just past the region's end."""
    done = run_with_audit(audited_shm, """
        from world import World
        from mtcpshim._shm import lib
        world = World()
        world.g.nslots += 1
        lib.mts_rx_data(world.g, world.g.nslots - 1)
    """)
    assert done.returncode != 0
    assert "mts_audit: mts_rx_data" in done.stderr


def test_a_hostile_storm_touches_nothing_outside_the_region(audited_shm):
    done = run_with_audit(audited_shm, f"""
        import collections, json, random
        from world import World, hostile_storm
        total = collections.Counter()
        for seed in range(4):
            total.update(hostile_storm(World(), random.Random(seed), writes={STORM_WRITES // 4}))
        print(json.dumps(total))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mts_audit" not in done.stderr and "AddressSanitizer" not in done.stderr
    counters = json.loads(done.stdout)
    assert counters["cmd_bad"] and counters["sockets_reset"], counters

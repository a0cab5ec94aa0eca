"""Fixtures for the interposer tests: the library and the probe program,
built once per session, and the real stack, served in this process, per
test."""
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from inprocess_stack import PROGRAM_TIMEOUT, STACK_IP, InProcessStack  # noqa: E402


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("preload-build")


@pytest.fixture(scope="session")
def preload_library(build_dir):
    """The interposer, built with the project's command (warnings are errors
    here, the command itself only asks for them)."""
    library = build_dir / "libmtcpshim_preload.so"
    sources = sorted(str(p) for p in (ROOT / "preload").glob("*.c"))
    subprocess.run(["gcc", "-O2", "-g", "-fPIC", "-shared", "-std=gnu11", "-Wall", "-Wextra", "-Werror",
                    f"-I{ROOT / 'preload'}", "-o", str(library), *sources, "-ldl", "-lpthread"], check=True)
    return library


@pytest.fixture(scope="session")
def probe(build_dir):
    program = build_dir / "probe"
    subprocess.run(["gcc", "-O1", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-o", str(program),
                    str(HERE / "progs" / "probe.c"), "-lpthread"], check=True)
    return program


@pytest.fixture
def stack():
    served = InProcessStack(STACK_IP).start()
    yield served
    served.close()


class Probe:
    """Runs probe scenarios over one stack."""

    def __init__(self, program, library, stack):
        self.program, self.library, self.stack = program, library, stack

    def env(self, attached=True, extra_env=None):
        env = dict(os.environ, LD_PRELOAD=str(self.library), PROBE_IP=STACK_IP)
        env.update(extra_env or {})
        env.pop("MTCPSHIM_FDS", None)
        if attached:
            env.update(self.stack.env)
        return env

    def start(self, scenario, attached=True, extra_env=None):
        return subprocess.Popen([str(self.program), scenario], env=self.env(attached, extra_env),
                                pass_fds=self.stack.fds if attached else (),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, scenario, attached=True, extra_env=None):
        """The scenario's trace, one string per line; fails on a bad exit."""
        process = self.start(scenario, attached, extra_env)
        try:
            out, err = process.communicate(timeout=PROGRAM_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 0, f"probe {scenario} exited {process.returncode}: {err}\n{out}"
        return out.splitlines()


@pytest.fixture
def run_probe(probe, preload_library, stack):
    return Probe(probe, preload_library, stack)

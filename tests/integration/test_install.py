"""Installed as users install it: a wheel built from the tree, in a fresh
virtual environment, run from a directory where the checkout is not on the
path.  The wheel has no preload/ or stack/csrc/: whatever the launcher, the
stack and the interposer need at run time must travel inside it."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
CONNECT = "import socket; print(socket.socket().connect_ex(('198.18.0.1', 9)))"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "wheels"), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = (work / "wheels").glob("mtcpshim-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, timeout=120)
    subprocess.run([str(work / "venv" / "bin" / "pip"), "install", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    return work


def test_a_wheel_in_a_fresh_venv_runs_a_program_over_the_stack(installed, test_network):
    # Port 9 on the client's kernel is closed: its RST comes back through our stack.
    done = subprocess.run([str(installed / "venv" / "bin" / "mtcpshim"), "run", "--", sys.executable, "-c", CONNECT],
                          cwd=installed, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "111", done.stdout + done.stderr  # ECONNREFUSED, from the peer's RST

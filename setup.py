"""Builds the C parts besides the pure-Python packages: the cffi modules
(cffi_modules; for PyPy too where pypy3 is installed) and the LD_PRELOAD
interposer, a plain shared library that the launcher finds next to
mtcpshim/launcher.py."""
import pathlib
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent
PRELOAD_NAME = "libmtcpshim_preload.so"


def build_preload(output: pathlib.Path) -> None:
    sources = sorted(str(p) for p in (ROOT / "preload").glob("*.c"))
    output.parent.mkdir(parents=True, exist_ok=True)
    subprocess.check_call(
        ["gcc", "-O2", "-g", "-fPIC", "-shared", "-std=gnu11", "-Wall", "-Wextra",
         f"-I{ROOT / 'preload'}", "-o", str(output), *sources, "-ldl", "-lpthread"])


def build_for_pypy(package: pathlib.Path) -> None:
    """The stack's cffi modules for PyPy too, where pypy3 and its cffi are
    installed (`mtcpshim run --stack-python pypy`); without them the stack
    runs under CPython only, so a failure here is a warning."""
    pypy = shutil.which("pypy3")
    if pypy is None:
        return
    done = subprocess.run([pypy, str(ROOT / "mtcpshim" / "_build_pypy.py"), str(ROOT), str(package)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"warning: the stack's modules could not be built for PyPy (is pypy3-dev installed?):\n"
              f"{done.stderr.strip()[-2000:]}", file=sys.stderr)


class BuildWithPreload(build_ext):
    def run(self):
        super().run()
        target = ROOT / "mtcpshim" if self.inplace else pathlib.Path(self.build_lib) / "mtcpshim"
        build_preload(target / PRELOAD_NAME)
        build_for_pypy(target)


setup(
    cffi_modules=["mtcpshim/_build_shm.py:ffibuilder", "stack/_build_netfast.py:ffibuilder"],
    cmdclass={"build_ext": BuildWithPreload},
)

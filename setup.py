"""Builds the two C parts besides the pure-Python packages: the cffi modules
(cffi_modules) and the LD_PRELOAD interposer, a plain shared library that
the launcher finds next to mtcpshim/launcher.py."""
import pathlib
import subprocess

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


class BuildWithPreload(build_ext):
    def run(self):
        super().run()
        target = ROOT / "mtcpshim" if self.inplace else pathlib.Path(self.build_lib) / "mtcpshim"
        build_preload(target / PRELOAD_NAME)


setup(
    cffi_modules=["mtcpshim/_build_shm.py:ffibuilder", "stack/_build_netfast.py:ffibuilder"],
    cmdclass={"build_ext": BuildWithPreload},
)

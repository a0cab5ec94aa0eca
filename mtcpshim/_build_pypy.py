"""Builds the stack's two cffi modules (mtcpshim._shm, mtcpshim.stack._netfast)
for PyPy, so that the stack process can run under PyPy's JIT.  setup.py runs
it with pypy3 when pypy3 and its cffi are installed:

    pypy3 mtcpshim/_build_pypy.py SOURCE_ROOT PACKAGE_DIR

SOURCE_ROOT is the checkout (it holds mtcpshim/_build_shm.py and
stack/_build_netfast.py); PACKAGE_DIR the `mtcpshim` package being built or
installed, which gets the modules beside CPython's."""
import os
import pathlib
import runpy
import shutil
import sys
import tempfile

BUILDERS = (("mtcpshim/_build_shm.py", "."), ("stack/_build_netfast.py", "stack"))


def main(source_root: str, package_dir: str) -> None:
    root, package = pathlib.Path(source_root).resolve(), pathlib.Path(package_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="mtcpshim-pypy-") as scratch:
        for builder, subpackage in BUILDERS:
            # The builders name their C sources relative to the working
            # directory, and cffi compiles in its tmpdir: make them one.
            os.chdir(scratch)
            ffi = runpy.run_path(str(root / builder))["ffibuilder"]
            built = pathlib.Path(ffi.compile(tmpdir=scratch))
            target = package / subpackage / built.name
            shutil.copyfile(built, target)
            print(f"built {target}")


if __name__ == "__main__":
    main(*sys.argv[1:])

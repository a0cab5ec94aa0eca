"""The stack process's interpreter: CPython, or PyPy where pypy3 and the
modules built for it are installed (`mtcpshim run --stack-python`)."""
import shutil

import pytest

from mtcpshim import launcher
from support.transfers import make_body, stack_sends

pypy = pytest.mark.skipif(launcher.pypy_ready() is None,
                          reason="pypy3, or the stack's modules built for it, not installed")


def test_cpython_is_this_interpreter_and_auto_the_default_prefers_pypy_where_ready():
    assert launcher.stack_command("cpython") == [launcher.sys.executable]
    assert launcher.stack_command("auto") == [launcher.pypy_ready() or launcher.sys.executable]
    assert launcher.DEFAULT_STACK_PYTHON == launcher.StackOptions(None, None, None).stack_python == "auto"
    assert launcher.resolve_stack_python("auto") == ("pypy" if launcher.pypy_ready() else "cpython")


def test_an_unknown_interpreter_is_refused():
    with pytest.raises(launcher.LaunchError, match="unknown stack interpreter 'jython'"):
        launcher.stack_command("jython")


def test_pypy_without_pypy3_says_what_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(launcher.LaunchError, match="pypy3 is not installed"):
        launcher.stack_command("pypy")
    assert launcher.stack_command("auto") == [launcher.sys.executable]


@pypy
def test_lighttpd_over_a_pypy_stack_serves_byte_exact(private_net, tmp_path):
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    docroot.chmod(0o755)
    make_body(docroot / "body.bin", 8 << 20)
    transfer = stack_sends(private_net, docroot, "body.bin", tmp_path, options=("--stack-python", "pypy"))
    assert transfer.exact
    assert transfer.stack_counters["python"].startswith("PyPy ")

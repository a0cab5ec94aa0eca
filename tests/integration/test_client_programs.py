"""The other direction: clients under `mtcpshim run` download from a kernel
server (python3 -m http.server) in the client namespace."""
import pytest

from support.programs import run_under_shim
from support.transfers import sha256_of


@pytest.mark.parametrize("client", ["curl", "wget"])
def test_client_downloads_large_file_intact(client, kernel_url, docroot, tmp_path):
    out = tmp_path / "large.bin"
    url = f"{kernel_url}/large.bin"
    argv = (["curl", "-sS", "--fail", "-o", str(out), url] if client == "curl"
            else ["wget", "-q", "-O", str(out), url])
    result = run_under_shim(argv, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sha256_of(out) == sha256_of(docroot / "large.bin")

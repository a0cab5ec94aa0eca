"""The other direction: clients under `mtcpshim run` download from a kernel
server (python3 -m http.server) in the client namespace."""
import pytest

from netharness import download_under_shim, sha256_of


@pytest.mark.parametrize("client", ["curl", "wget"])
def test_client_downloads_large_file_intact(client, kernel_http_server, docroot, tmp_path):
    out = tmp_path / "large.bin"
    url = f"{kernel_http_server}/large.bin"
    argv = (["curl", "-sS", "--fail", "-o", str(out), url] if client == "curl"
            else ["wget", "-q", "-O", str(out), url])
    download_under_shim(argv)
    assert sha256_of(out) == sha256_of(docroot / "large.bin")

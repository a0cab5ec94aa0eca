"""One stack per interface: the launcher's claim excludes a second one,
whatever name the namespace is reached by, and leaves nothing behind once
released."""
import os
import secrets
import subprocess

import pytest

from mtcpshim import launcher
from mtcpshim.netns import netns_path

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lock directory is under /run; namespaces need root")


@pytest.fixture
def netns():
    """A namespace of this test's own (its loopback is enough for a claim)."""
    name = f"claimtest-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_a_second_claim_is_refused_until_the_first_is_released(netns):
    with launcher.interface_claim(netns, "lo") as claim:
        assert claim.stats == launcher.runtime_path(netns, "lo", "stats")
        with pytest.raises(launcher.LaunchError, match=f"already serves lo in {netns}"):
            with launcher.interface_claim(netns, "lo"):
                pass
    with launcher.interface_claim(netns, "lo"):
        pass
    assert not os.path.exists(launcher.runtime_path(netns, "lo", "lock"))


def test_a_second_name_of_the_namespace_is_the_same_claim(netns):
    alias = f"{netns}-alias"
    open(netns_path(alias), "w").close()
    try:
        subprocess.run(["mount", "--bind", netns_path(netns), netns_path(alias)], check=True)
        assert launcher.runtime_path(alias, "lo", "lock") == launcher.runtime_path(netns, "lo", "lock")
        with launcher.interface_claim(netns, "lo"):
            with pytest.raises(launcher.LaunchError, match="already serves"):
                with launcher.interface_claim(alias, "lo"):
                    pass
    finally:
        subprocess.run(["umount", netns_path(alias)], capture_output=True)
        os.unlink(netns_path(alias))


def test_a_missing_interface_or_namespace_is_one_line(netns):
    with pytest.raises(launcher.LaunchError, match=f"^no such interface: nothere0 in {netns}$"):
        launcher.runtime_path(netns, "nothere0", "lock")
    with pytest.raises(launcher.LaunchError, match=f"^no such network namespace: {netns}-gone$"):
        launcher.runtime_path(f"{netns}-gone", "lo", "lock")

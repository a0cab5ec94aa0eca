"""One stack per interface: the launcher's claim excludes a second one and
leaves nothing behind once released."""
import os

import pytest

from mtcpshim import launcher

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lock directory is under /run")


def test_a_second_claim_is_refused_until_the_first_is_released():
    netns, iface = f"claimtest{os.getpid()}", "if0"
    with launcher.interface_claim(netns, iface):
        with pytest.raises(launcher.LaunchError, match=f"already serves {iface} in {netns}"):
            with launcher.interface_claim(netns, iface):
                pass
    with launcher.interface_claim(netns, iface):
        pass
    assert not os.path.exists(launcher.runtime_path(netns, iface, "lock"))

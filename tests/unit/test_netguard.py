"""Which addresses a webhook may reach: globally routable ones, and the allowed networks."""

from __future__ import annotations

import pytest

from dispatcher.netguard import is_blocked
from dispatcher.settings import Settings


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("192.168.0.1", True),
        ("169.254.169.254", True),
        ("::1", True),
        ("fe80::1", True),
        ("::ffff:10.0.0.1", True),
        ("64:ff9b::7f00:1", True),  # NAT64 of 127.0.0.1
        ("2002:a00:1::1", True),  # 6to4 of 10.0.0.1
        ("fec0::1", True),  # site-local
        ("64:ff9b::808:808", False),  # NAT64 of 8.8.8.8
        ("8.8.8.8", False),
        ("2001:4860:4860::8888", False),
    ],
)
def test_private_loopback_and_link_local_addresses_are_blocked(address: str, blocked: bool) -> None:
    """Webhooks may only reach globally routable addresses."""
    assert is_blocked(address, ()) is blocked


def test_allowed_networks_lift_the_block() -> None:
    """DISPATCHER_ALLOW_PRIVATE_TARGETS exempts the listed networks only."""
    allowed = Settings.from_env(
        {"DISPATCHER_ALLOW_PRIVATE_TARGETS": "127.0.0.0/8"}
    ).allow_private_targets
    assert not is_blocked("127.0.0.1", allowed)
    assert is_blocked("10.0.0.1", allowed)

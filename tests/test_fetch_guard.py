"""Which addresses a caller-chosen fetch may reach, and the allow list that widens it (pure parts)."""

from __future__ import annotations

import ipaddress

import pytest

from agentgw.errors import ConfigError
from agentgw.fetch_guard import address_allowed, parse_allow
from agentgw.settings import load_settings

REFUSED = [
    "127.0.0.1",
    "127.255.0.9",
    "0.0.0.0",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.0.1",
    "169.254.169.254",
    "100.100.100.200",
    "168.63.129.16",
    "224.0.0.251",
    "255.255.255.255",
    "240.0.0.1",
    "198.18.0.1",
    "::",
    "::1",
    "fe80::1",
    "fd00:ec2::254",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "2002:7f00:1::1",  # 6to4 around 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 around 169.254.169.254
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo around 127.0.0.1
]
ALLOWED = ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", REFUSED)
def test_internal_addresses_and_those_hidden_in_ipv6_are_refused(address: str) -> None:
    assert not address_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_public_unicast_addresses_are_allowed(address: str) -> None:
    assert address_allowed(ipaddress.ip_address(address))


def test_the_allow_list_opens_exactly_what_it_names() -> None:
    networks, hosts = parse_allow(["127.0.0.1", "10.20.0.0/16", "[fd00::1]", "Clients.Corp.Example."])
    assert hosts == {"clients.corp.example"}
    assert address_allowed(ipaddress.ip_address("127.0.0.1"), networks)
    assert address_allowed(ipaddress.ip_address("::ffff:127.0.0.1"), networks)
    assert address_allowed(ipaddress.ip_address("10.20.255.1"), networks)
    assert address_allowed(ipaddress.ip_address("fd00::1"), networks)
    assert not address_allowed(ipaddress.ip_address("127.0.0.2"), networks)
    assert not address_allowed(ipaddress.ip_address("10.21.0.1"), networks)
    assert not address_allowed(ipaddress.ip_address("169.254.169.254"), networks)


@pytest.mark.parametrize("entry", ["", "10.0.0.0/33", "a..b", "http://x/", "a/b"])
def test_an_allow_list_entry_that_is_no_address_or_name_stops_start_up(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_allow([entry])
    with pytest.raises(ConfigError, match="fetch_allow"):
        load_settings(fetch_allow=[entry])

"""Addresses: every spelling of a wildcard is refused, host:port is read one way."""

import re

import pytest

from tffpipe import network


@pytest.mark.parametrize(
    "spelling",
    ["0.0.0.0", "::", "[::]", "::ffff:0.0.0.0", "[::ffff:0.0.0.0]", "::0.0.0.0", "0:0:0:0:0:0:0:0", "0.1.2.3"],
)
def test_every_spelling_of_a_wildcard_is_refused_without_the_flag(spelling):
    with pytest.raises(ValueError, match="a wildcard address"):
        network.check_bind(spelling, accept_unauthenticated_access=False)


@pytest.mark.parametrize("spelling", ["8.8.8.8", "::ffff:8.8.8.8", "2001:4860:4860::8888", "ff02::1"])
def test_public_and_multicast_addresses_are_refused_without_the_flag(spelling):
    with pytest.raises(ValueError, match="a public address"):
        network.check_bind(spelling, accept_unauthenticated_access=False)


@pytest.mark.parametrize(
    "spelling, normalized, exposure",
    [
        ("127.0.0.1", "127.0.0.1", network.Exposure.LOOPBACK),
        ("::ffff:127.0.0.1", "127.0.0.1", network.Exposure.LOOPBACK),
        ("[::1]", "::1", network.Exposure.LOOPBACK),
        ("10.1.2.3", "10.1.2.3", network.Exposure.PRIVATE),
        ("fd00::5", "fd00::5", network.Exposure.PRIVATE),
    ],
)
def test_loopback_and_private_addresses_are_taken_normalized(spelling, normalized, exposure):
    address = network.check_bind(spelling, accept_unauthenticated_access=False)
    assert (str(address), network.exposure(address)) == (normalized, exposure)


def test_the_flag_lets_a_wildcard_through_as_the_address_the_kernel_uses():
    assert str(network.check_bind("::ffff:0.0.0.0", accept_unauthenticated_access=True)) == "0.0.0.0"


@pytest.mark.parametrize("text", ["myhost", "", "fe80::1%eth0", "1.2.3"])
def test_names_and_malformed_addresses_are_not_ip_addresses(text):
    with pytest.raises(ValueError):
        network.check_bind(text, accept_unauthenticated_access=True)


@pytest.mark.parametrize(
    "text, endpoint",
    [
        ("127.0.0.1:8000", "127.0.0.1:8000"),
        ("[::1]:8000", "[::1]:8000"),
        ("[::ffff:10.0.0.2]:9", "10.0.0.2:9"),
        ("worker-3.example.org:8000", "worker-3.example.org:8000"),
    ],
)
def test_endpoints_are_read_as_host_and_port(text, endpoint):
    assert str(network.parse_endpoint(text)) == endpoint


@pytest.mark.parametrize(
    "text, message",
    [
        ("http://127.0.0.1:18731", "is a URL"),
        ("::1", "write an IPv6 address in brackets"),
        ("localhost", "is not host:port"),
        ("127.0.0.1:0", "port must be a number in 1-65535"),
        ("127.0.0.1:65536", "port must be a number in 1-65535"),
        ("host:８０", "port must be a number"),
        ("a b:1", "is not a host name or IP address"),
        ("[::1]8000", "is not [ipv6]:port"),
    ],
)
def test_malformed_endpoints_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        network.parse_endpoint(text)

"""Addresses, read once: where a worker listens and where a run connects (standard library only).

A TFF worker service has no authentication: whoever reaches it runs TensorFlow graphs
as its user. Whether an address is safe to listen on is therefore decided here, in one
place, on the address the kernel will actually use: every spelling is normalized
first (`::ffff:0.0.0.0` is IPv4's wildcard written as IPv6, `[::1]` is `::1`,
`0.1.2.3` is in 0.0.0.0/8, "this network"), so no spelling escapes the check.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


class Exposure(enum.Enum):
    """Who can reach a service listening on an address."""

    LOOPBACK = "every user of this machine (and SSH forwards to it), no other machine"
    PRIVATE = "every user of this machine and every host that can route to this private address"
    WILDCARD = "every host that can reach any address of this machine"
    PUBLIC = "every host that can route to this address, possibly the whole internet"


def parse_ip(text: str) -> IPAddress:
    """The address `text` means, normalized: brackets dropped, IPv4-mapped IPv6 read as IPv4.

    Raises:
      ValueError: `text` is not an IP address (names are not resolved: what a name
        resolves to can change after the check).
    """
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        stripped = stripped[1:-1]
    try:
        address = ipaddress.ip_address(stripped)
    except ValueError:
        raise ValueError(f"not an IP address: {text!r} (give one, e.g. 127.0.0.1 or ::1)") from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            raise ValueError(f"{text!r}: scoped (link-local) addresses are not supported; give another")
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


def exposure(address: IPAddress) -> Exposure:
    """Who reaches a service on `address` (after `parse_ip`)."""
    if address.is_unspecified or (isinstance(address, ipaddress.IPv4Address) and address in _THIS_NETWORK):
        return Exposure.WILDCARD
    if address.is_loopback:
        return Exposure.LOOPBACK
    if address.is_private and not address.is_multicast:
        return Exposure.PRIVATE
    return Exposure.PUBLIC


def check_bind(text: str, *, accept_unauthenticated_access: bool) -> IPAddress:
    """The normalized address to listen on; refuses a wildcard or public one unless accepted.

    Raises:
      ValueError: not an IP address, or a wildcard or public one without
        `accept_unauthenticated_access`.
    """
    address = parse_ip(text)
    kind = exposure(address)
    if kind in (Exposure.WILDCARD, Exposure.PUBLIC) and not accept_unauthenticated_access:
        article = "a wildcard" if kind is Exposure.WILDCARD else "a public"
        spelled = "" if str(address) == text else f" ({address} once normalized)"
        raise ValueError(
            f"{article} address{spelled} exposes an unauthenticated service that runs any "
            "TensorFlow graph it is sent; keep 127.0.0.1 and reach it through an SSH forward or a private network, "
            "or pass --accept_unauthenticated_access if the network is yours alone"
        )
    return address


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A worker service's address as a gRPC target: `host:port`, IPv6 in brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _valid_hostname(host: str) -> bool:
    labels = host.rstrip(".").split(".")
    return (
        0 < len(host) <= 253
        and all(
            0 < len(label) <= 63
            and label[0] != "-"
            and label[-1] != "-"
            and all(c.isalnum() or c == "-" for c in label)
            for label in labels
        )
        and host.isascii()
    )


def parse_endpoint(text: str) -> Endpoint:
    """`host:port` or `[ipv6]:port` as an `Endpoint`.

    Raises:
      ValueError: a URL, a bare IPv6 address (`::1` would read as host ':' port 1),
        a missing or out-of-range port, or a malformed host name.
    """
    example = "give host:port, e.g. 127.0.0.1:8000 or [::1]:8000"
    if "://" in text:
        raise ValueError(f"{text!r} is a URL; {example}")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [ipv6]:port; {example}")
        port = rest[1:]
        host = str(parse_ip(host))
    else:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:8000")
        if not host:
            raise ValueError(f"{text!r} is not host:port; {example}")
        try:
            host = str(parse_ip(host))
        except ValueError:
            if not _valid_hostname(host):
                raise ValueError(f"{text!r}: {host!r} is not a host name or IP address; {example}") from None
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port must be a number in 1-65535; {example}")
    return Endpoint(host, int(port))

"""The one way the gateway fetches a URL that a caller chose (a Client ID Metadata Document today).

An unauthenticated caller must not be able to make the gateway reach what only the gateway can reach:
its own loopback, the private network, the cloud metadata service. So, for each fetch:

    1. the URL is plain https (or what the caller site allows), no credentials in it;
    2. the host is resolved once, and every address it resolves to must be public (`is_global`, not
       multicast, not a cloud metadata address, not hiding such an address inside an IPv6 one),
       unless the operator allow-listed it (`fetch_allow`: IPs, CIDRs, or host names);
    3. the connection goes to exactly the addresses checked (a pinned resolver), so a DNS answer that
       changes between the check and the connect (rebinding) changes nothing; TLS still verifies the
       certificate against the host name;
    4. no redirects, no proxies from the environment, no cookies, and small size and time limits.

Any failure is a `FetchRefused` whose message says why in words a caller may read (the caller chose
the URL; nothing in it is the gateway's secret). URLs from the config file (upstreams, issuers,
token endpoints, agent cards) are the operator's and do not come through here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = ["FetchGuard", "FetchRefused", "Resolve", "address_allowed", "parse_allow"]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Host name, port -> the addresses it resolves to (IP strings). A seam for tests of rebinding.
Resolve = Callable[[str, int], Awaitable[list[str]]]

# Cloud metadata and host-agent addresses that are global unicast, so `is_global` lets them through.
# (169.254.169.254, fd00:ec2::254 and 100.100.100.200 are link-local, unique-local and shared space.)
_METADATA = frozenset({ipaddress.ip_address("168.63.129.16")})
# NAT64 (RFC 6052): the last 32 bits are an IPv4 address the translator will connect to.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchRefused(Exception):
    """A fetch on a caller's behalf was refused or failed; the message says why and may be shown."""


def parse_allow(entries: Iterable[str]) -> tuple[tuple[IpNetwork, ...], frozenset[str]]:
    """Split an allow list into networks (IPs and CIDRs) and host names (lower-cased).

    Raises:
        ValueError: an entry is neither an IP, a CIDR nor a host name.
    """
    networks: list[IpNetwork] = []
    hosts: set[str] = set()
    for entry in entries:
        value = entry.strip().lower()
        try:
            networks.append(ipaddress.ip_network(value.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        labels = value.rstrip(".").split(".")
        if not value or not all(label and len(label) <= 63 for label in labels) or "/" in value:
            raise ValueError(f"fetch_allow entry {entry!r} is not an IP address, a CIDR or a host name")
        hosts.add(value.rstrip("."))
    return tuple(networks), frozenset(hosts)


def _inside(address: IpAddress) -> list[IpAddress]:
    """The address, and any IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64)."""
    found: list[IpAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            found.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            found.append(address.sixtofour)
        if address.teredo is not None:
            found.extend(address.teredo)
        if address in _NAT64:
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def address_allowed(address: IpAddress, allow: Iterable[IpNetwork] = ()) -> bool:
    """Whether a fetch may connect to `address`: a public unicast address, or an allow-listed one."""
    inside = _inside(address)
    if any(a in network for a in inside for network in allow if a.version == network.version):
        return True
    return all(a.is_global and not a.is_multicast and a not in _METADATA for a in inside)


async def _system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _Pinned(AbstractResolver):
    """Answers aiohttp with the addresses already checked, for the one host checked."""

    def __init__(self, host: str, addresses: list[IpAddress]) -> None:
        self._host = host
        self._addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if _normal(host) != self._host:
            raise OSError(f"{host} was not checked")  # unreachable without redirects; fail closed
        return [
            {
                "hostname": host,
                "host": str(a),
                "port": port,
                "family": socket.AF_INET6 if a.version == 6 else socket.AF_INET,
                "proto": socket.IPPROTO_TCP,
                "flags": socket.AI_NUMERICHOST,
            }
            for a in self._addresses
        ]

    async def close(self) -> None:
        """Nothing to release."""


class FetchGuard:
    """Fetches caller-chosen URLs under the rules above."""

    def __init__(
        self,
        allow: Iterable[str] = (),
        *,
        resolve: Resolve = _system_resolve,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """A guard that lets through public addresses and those in `allow`.

        Args:
            allow: `fetch_allow` from the config file: IPs, CIDRs and host names that may be reached
                although they are not public.
            resolve: how host names are resolved (the system resolver unless a test says otherwise).
            ssl_context: the TLS trust (default: the system's; tests pass one that trusts their CA).

        Raises:
            ValueError: an entry of `allow` is neither an IP, a CIDR nor a host name.
        """
        self._networks, self._hosts = parse_allow(allow)
        self._resolve = resolve
        self._ssl: dict[str, Any] = {} if ssl_context is None else {"ssl": ssl_context}

    async def addresses(self, host: str, port: int) -> list[IpAddress]:
        """The addresses `host` resolves to, every one of them checked.

        Raises:
            FetchRefused: the host does not resolve, or resolves to an address that is not allowed.
        """
        name = _normal(host)
        found = await self._lookup(name, port)
        if name in self._hosts:
            return found
        for address in found:
            if not address_allowed(address, self._networks):
                raise FetchRefused(f"address {address} is not allowed")
        return found

    async def _lookup(self, name: str, port: int) -> list[IpAddress]:
        try:
            return [ipaddress.ip_address(name)]
        except ValueError:
            pass
        try:
            found = [ipaddress.ip_address(a.split("%")[0]) for a in await self._resolve(name, port)]
        except (OSError, UnicodeError, ValueError) as exc:
            raise FetchRefused(f"host {name} does not resolve") from exc
        if not found:
            raise FetchRefused(f"host {name} does not resolve")
        return found

    async def get(
        self,
        url: str,
        *,
        max_bytes: int,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        schemes: tuple[str, ...] = ("https",),
    ) -> bytes:
        """GET `url` and return its body, if it answers 200 within `timeout_s` and `max_bytes`.

        Raises:
            FetchRefused: the URL, its host's addresses or the answer are not acceptable, or the
                fetch failed (the message says which).
        """
        try:
            # Parsed as aiohttp parses it (yarl): the host checked is the host connected to.
            parsed = yarl.URL(url)
            host, port = parsed.raw_host, parsed.port
        except (ValueError, TypeError) as exc:
            raise FetchRefused("the URL is invalid") from exc
        if parsed.scheme not in schemes or not host or port is None:
            raise FetchRefused(f"only {' or '.join(schemes)} URLs are fetched")
        if parsed.raw_user is not None or parsed.raw_password is not None:
            raise FetchRefused("a URL with credentials in it is not fetched")
        try:
            async with asyncio.timeout(timeout_s):
                addresses = await self.addresses(host, port)
                return await self._read(parsed, _normal(host), addresses, max_bytes, headers)
        except TimeoutError as exc:
            raise FetchRefused(f"no answer within {timeout_s:g}s") from exc

    async def _read(
        self,
        url: yarl.URL,
        host: str,
        addresses: list[IpAddress],
        max_bytes: int,
        headers: Mapping[str, str] | None,
    ) -> bytes:
        # A connector per fetch: these fetches are rare (their results are cached by the caller site),
        # and a pool shared between hosts is one more thing that could connect somewhere unchecked.
        connector = aiohttp.TCPConnector(resolver=_Pinned(host, addresses), use_dns_cache=False, limit=1)
        # Bytes as sent: a compressed answer is not inflated past the size limit (nor parsed).
        sent = {**(headers or {}), "accept-encoding": "identity"}
        async with aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, auto_decompress=False
        ) as session:
            try:
                async with session.get(url, headers=sent, allow_redirects=False, **self._ssl) as response:
                    if 300 <= response.status < 400:
                        raise FetchRefused(f"redirects are not followed (HTTP {response.status})")
                    if response.status != 200:
                        raise FetchRefused(f"HTTP {response.status}")
                    body = bytearray()
                    async for chunk in response.content.iter_any():
                        body += chunk
                        if len(body) > max_bytes:
                            raise FetchRefused(f"larger than {max_bytes} bytes")
                    return bytes(body)
            except aiohttp.ClientConnectorCertificateError as exc:
                raise FetchRefused("the TLS certificate does not verify") from exc
            except aiohttp.ClientConnectorError as exc:
                raise FetchRefused(f"cannot connect ({exc.os_error.strerror or 'refused'})") from exc
            except aiohttp.ClientError as exc:
                raise FetchRefused(f"the fetch failed ({type(exc).__name__})") from exc


def _normal(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()

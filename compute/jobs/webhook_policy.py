"""Where webhooks may go: the SSRF guard, applied at submit and again at every connect.

A job's webhook URL comes from the network, and compute sits inside the deployment: without a
guard, a client could make compute POST to 169.254.169.254 (cloud metadata), to the database
next door, or to compute's own metrics port. So a destination is allowed when every address
its host resolves to is

- in a network of the allowlist (`10.1.2.0/24`, `127.0.0.1`), or
- resolved from a host name of the allowlist (`hooks.example.com`, `*.example.com`), or
- a public (globally routable, unicast) address, unless `webhook_allow_public` is off.

Private, loopback, link-local (the metadata endpoints among them), shared (100.64/10),
multicast, reserved, site-local and unspecified addresses are therefore refused unless
allowlisted; an IPv6 address that carries an IPv4 one (mapped, NAT64, 6to4, Teredo,
compatible) must pass as that IPv4 address too. The sender connects to the very addresses
that were checked (`Destination.addresses`), so a DNS answer that changes between the check
and the connect (rebinding) cannot slip through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses it resolves to (the loop's getaddrinfo; tests pass their own).
Resolver = Callable[[str, int], Awaitable[list[str]]]


class DestinationRefused(Exception):
    """The URL or the addresses it resolves to are not allowed. The message names no address:
    it may reach the submitter, and what a name resolves to inside the deployment is not theirs."""


class DestinationUnresolved(Exception):
    """The host name did not resolve now (no such name, or DNS down or slow): at delivery time
    a failed attempt, retried like any other; at submit, refused with DestinationRefused's words
    (one answer for both, so submitters cannot probe which internal names exist)."""


@dataclass(frozen=True, slots=True)
class Destination:
    """A checked target: connect to one of `addresses` (all checked), send `Host: host_header`,
    verify TLS for `host`."""

    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]
    path: str  # path and query, as given

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def connect_url(self, address: str) -> str:
        """The URL with a checked address in place of the host name."""
        literal = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{literal}:{self.port}{self.path}"


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


class WebhookPolicy:
    """Immutable once built; `check(url)` is safe to call from many tasks at once."""

    def __init__(
        self,
        allowlist: Iterable[str] = (),
        *,
        allow_public: bool = True,
        allow_http: bool = False,
        resolver: Resolver = system_resolver,
        resolve_timeout: float = 5.0,
    ) -> None:
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.hosts: set[str] = set()
        self.suffixes: list[str] = []
        for entry in allowlist:
            kind, value = parse_allow_entry(entry)
            if kind == "network":
                self.networks.append(value)
            elif kind == "suffix":
                self.suffixes.append(value)
            else:
                self.hosts.add(value)
        self.allow_public = allow_public
        self.allow_http = allow_http
        self._resolve = resolver
        self._resolve_timeout = resolve_timeout

    def parse(self, url: str) -> tuple[str, str, int, str]:
        """(scheme, host, port, path) of an acceptable URL; DestinationRefused otherwise."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise DestinationRefused("the webhook url is not a valid URL") from exc
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise DestinationRefused("the webhook url must be https (or http where compute allows it)")
        if scheme == "http" and not self.allow_http:
            raise DestinationRefused("the webhook url must be https: plain http is off on this compute")
        if parts.username is not None or parts.password is not None:
            raise DestinationRefused("the webhook url must not carry user info; authenticate with the signature")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise DestinationRefused("the webhook url has no host")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return scheme, host, port or (443 if scheme == "https" else 80), path

    async def check(self, url: str) -> Destination:
        """Resolve the URL's host and check every address it resolves to.

        Raises DestinationRefused (not allowed: final) or DestinationUnresolved (try again later).
        """
        scheme, host, port, path = self.parse(url)
        literal = _address(host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = await asyncio.wait_for(self._resolve(host, port), self._resolve_timeout)
            except (UnicodeError, ValueError) as exc:  # IDNA: an empty or over-long label
                raise DestinationRefused("the webhook url's host is not a valid host name") from exc
            except (OSError, TimeoutError) as exc:
                raise DestinationUnresolved("the webhook url's host did not resolve") from exc
            if not addresses:
                raise DestinationUnresolved("the webhook url's host did not resolve")
        for text in addresses:
            address = _address(text)
            if address is None or not self.allows(host, address):
                raise DestinationRefused(REFUSED)
        return Destination(scheme, host, port, tuple(addresses), path)

    def allows(self, host: str, address: IPAddress) -> bool:
        """Every form of the address must pass: an IPv6 address that carries an IPv4 one
        (mapped, NAT64, 6to4, Teredo, compatible) is judged as that IPv4 address too."""
        return all(self._allows_one(host, form) for form in _forms(address))

    def _allows_one(self, host: str, address: IPAddress) -> bool:
        if any(address in network for network in self.networks):
            return True
        if _address(host) is None and (host in self.hosts or any(host.endswith(s) for s in self.suffixes)):
            return True
        return self.allow_public and is_public(address)


REFUSED = (
    "the webhook url's host does not resolve to an allowed address (private, loopback, link-local, "
    "reserved and unresolvable ones are refused unless compute's webhook allowlist names them)"
)
# IPv6 ranges that are not global whatever the Python version says of them.
_NEVER_PUBLIC = (ipaddress.ip_network("fec0::/10"),)  # site-local (deprecated, still routed privately)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast: what any client may target without an allowlist."""
    if any(address in network for network in _NEVER_PUBLIC if network.version == address.version):
        return False
    return address.is_global and not address.is_multicast


def _forms(address: IPAddress) -> list[IPAddress]:
    """The address, and any IPv4 address embedded in an IPv6 one."""
    forms: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None]
        packed = int(address)
        if packed >> 32 == 0 and packed > 1:  # ::a.b.c.d, IPv4-compatible (not :: or ::1)
            embedded.append(ipaddress.IPv4Address(packed & 0xFFFFFFFF))
        if packed >> 32 == 0xFFFF0000:  # ::ffff:0:a.b.c.d, IPv4-translated
            embedded.append(ipaddress.IPv4Address(packed & 0xFFFFFFFF))
        if any(address in network for network in _NAT64):
            embedded.append(ipaddress.IPv4Address(packed & 0xFFFFFFFF))
        forms.extend(a for a in embedded if a is not None)
    return forms


def parse_allow_entry(entry: str) -> tuple[str, object]:
    """("network", IPv4/6Network) | ("host", name) | ("suffix", ".example.com"); ValueError if neither."""
    text = entry.strip().lower().rstrip(".")
    if not text:
        raise ValueError("an empty webhook allowlist entry")
    try:
        return "network", ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    if text.startswith("*."):
        name, kind = text[2:], "suffix"
    else:
        name, kind = text, "host"
    labels = name.split(".")
    if not all(label and len(label) <= 63 and label.replace("-", "").isalnum() for label in labels):
        raise ValueError(f"webhook allowlist entry {entry!r} is neither a network, a host name nor *.domain")
    return kind, ("." + name if kind == "suffix" else name)


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone index is not part of the address
    except ValueError:
        return None

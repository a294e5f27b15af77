"""gRPC address helpers shared by both processes (never imports grpc)."""

from __future__ import annotations

import ipaddress


def is_loopback(target: str) -> bool:
    """True for unix sockets and loopback host:port targets (every address of an `ipv4:` /
    `ipv6:` list, as for replicas): where plaintext is acceptable."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for prefix in ("dns:///", "ipv4:", "ipv6:"):
        if target.startswith(prefix):
            target = target[len(prefix) :]
    return all(_is_loopback_address(address) for address in target.split(","))


def _is_loopback_address(address: str) -> bool:
    host = address.strip().rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

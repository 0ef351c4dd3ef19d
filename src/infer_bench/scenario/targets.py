"""Where load may go: the bundled reference server, or a base URL on a loopback address.

The project's rule is that this build sends load to loopback only, so a scenario cannot be pointed at
someone else's server by accident (or by a shared file). Names are not resolved: ``localhost`` is the
only name accepted, and any other host must be a loopback IP literal.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator

from infer_bench.scenario.base import invalid, show

REFERENCE = "reference"
SCHEMES = ("http", "https", "ws", "wss")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or an IP literal in 127.0.0.0/8 or ::1 (IPv4-mapped included)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_target(value: str) -> str:
    """``value`` if it is ``reference`` or a loopback base URL, without a trailing slash.

    Raises:
        ValueError: the target is malformed or not on a loopback address.
    """
    if value == REFERENCE:
        return value
    parts = urlsplit(value)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in SCHEMES or not parts.hostname or not port_ok or parts.query or parts.fragment:
        raise ValueError(
            f"expected 'reference' or a base URL like http://127.0.0.1:8000 (http, https, ws or wss), got {show(value)}"
        )
    if parts.path.strip("/"):
        raise ValueError(
            f"the target is a base URL (scheme, host and port), got the path {show(parts.path)} in {show(value)}: "
            "put paths in the request (request.path, or request.path_prefix for openai)"
        )
    if not is_loopback(parts.hostname):
        raise ValueError(
            f"this build only sends load to loopback addresses (127.0.0.0/8, ::1, localhost), got {show(value)}"
        )
    return value.rstrip("/")


def _validate(value: str) -> str:
    try:
        return check_target(value)
    except ValueError as exc:
        raise invalid(str(exc)) from None


Target = Annotated[str, AfterValidator(_validate)]
"""``reference`` (start the bundled server) or a loopback base URL."""

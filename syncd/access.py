"""Who may call the endpoint's private routes (SPEC §6): the client's address and the `Host`.

`/`, `/status`, `/files/` and the POST actions answer a client that is `trusted` (loopback, or
carrying `Authorization: Bearer $SYNCD_HTTP_TOKEN`) AND names the daemon by a `Host` that
`host_ok` accepts. The second check is against DNS rebinding: a hostile web page whose name
resolves to 127.0.0.1 reaches the daemon from the user's browser as a loopback client, but its
requests still carry its own name in `Host`. IP literals cannot be rebound and `localhost` is
not anyone's to point; any other name must be listed in `http_hosts`. The token does not lift
the Host check: a legitimate remote client uses an address or a listed name anyway.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Iterable

TOKEN_ENV = "SYNCD_HTTP_TOKEN"
# A client that resets or closes its connection mid-answer (a probe's timeout, a browser that
# navigated away): not an error of the daemon (SPEC §6).
HANGUPS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


def is_loopback(client_ip: str) -> bool:
    """127.0.0.0/8, ::1, and an IPv4 loopback client of a dual-stack socket (::ffff:127.0.0.1)."""
    try:
        addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def trusted(client_ip: str, authorization: str | None, env: dict[str, str] | None = None) -> bool:
    """SPEC §6: loopback clients, or anyone carrying the bearer token of $SYNCD_HTTP_TOKEN
    (never from the config file). Without the variable only loopback is trusted."""
    if is_loopback(client_ip):
        return True
    token = (os.environ if env is None else env).get(TOKEN_ENV, "")
    if not token or not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def normalize_host(name: str) -> str:
    """A host name as compared: lower case, without the root's trailing dot."""
    return name.lower().removesuffix(".")


def host_ok(host: str | None, allowed: Iterable[str]) -> bool:
    """Whether a request's `Host` header names the daemon: an IP literal, `localhost` or one of
    `allowed` (normalized names), with any port. No header at all (HTTP/1.0 tools) passes: no
    browser omits it, so such a request cannot come from a rebinding page."""
    if host is None:
        return True
    if host.startswith("["):  # [IPv6]:port
        inside, sep, rest = host[1:].partition("]")
        if not sep or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return False
        try:
            ipaddress.IPv6Address(inside.split("%", 1)[0])
        except ValueError:
            return False
        return True
    name, sep, port = host.rpartition(":")
    if not sep:
        name = port
    elif not port.isdigit() or ":" in name:  # a bare IPv6 address or junk after the name
        return False
    name = normalize_host(name)
    if not name:
        return False
    try:
        ipaddress.IPv4Address(name)
        return True
    except ValueError:
        pass
    return name == "localhost" or name in allowed

"""Offline guard: every non-loopback network connection (and every DNS lookup of another host)
fails with OfflineError, at the level of Python's socket module.

tests/conftest.py installs it in the test process and puts tests/support/offline_site on PYTHONPATH, whose
sitecustomize.py installs it in every Python subprocess too (`python -m slm ...`, torchrun's
workers), so the whole suite runs offline by construction. A refused attempt is also written to
stderr as "slm offline guard: refused ...", so a test can assert that nothing even tried.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}
installed = False


class OfflineError(ConnectionRefusedError):
    """A network connection to a non-loopback address, refused by the offline guard."""


def _is_local_host(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").split("%")[0].lower()
    if host in _LOCAL_NAMES or host == socket.gethostname().lower():
        return True
    try:
        return ipaddress.ip_address(host).is_loopback or ipaddress.ip_address(host) == ipaddress.ip_address("::ffff:127.0.0.1")
    except ValueError:
        return False


def _check(sock_or_family, address, what: str) -> None:
    family = getattr(sock_or_family, "family", sock_or_family)
    if family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return  # Unix sockets and the like stay on this machine
    host = address[0]
    try:
        ok = ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:  # a name here means a lookup: only local names
        ok = _is_local_host(host)
    if not ok:
        print(f"slm offline guard: refused {what} to {address!r}", file=sys.stderr, flush=True)
        raise OfflineError(f"offline guard: {what} to {address!r} refused (only loopback is allowed)")


def install() -> None:
    global installed
    if installed:
        return
    connect, connect_ex, sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto
    getaddrinfo, create_connection = socket.getaddrinfo, socket.create_connection

    def guarded_connect(self, address):
        _check(self, address, "connection")
        return connect(self, address)

    def guarded_connect_ex(self, address):
        _check(self, address, "connection")
        return connect_ex(self, address)

    def guarded_sendto(self, data, *args):
        _check(self, args[-1], "datagram")
        return sendto(self, data, *args)

    def guarded_getaddrinfo(host, *args, **kw):
        if not _is_local_host(host):
            try:
                ipaddress.ip_address(str(host.decode() if isinstance(host, bytes) else host).strip("[]").split("%")[0])
            except ValueError:  # a name that would need DNS: refuse the lookup itself
                print(f"slm offline guard: refused name lookup of {host!r}", file=sys.stderr, flush=True)
                raise socket.gaierror(socket.EAI_NONAME, f"offline guard: name lookup of {host!r} refused") from None
        return getaddrinfo(host, *args, **kw)

    def guarded_create_connection(address, *args, **kw):
        _check(socket.AF_INET, address, "connection")
        return create_connection(address, *args, **kw)

    socket.socket.connect, socket.socket.connect_ex = guarded_connect, guarded_connect_ex
    socket.socket.sendto = guarded_sendto
    socket.getaddrinfo, socket.create_connection = guarded_getaddrinfo, guarded_create_connection
    installed = True

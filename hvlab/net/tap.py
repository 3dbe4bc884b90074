"""A TAP port: a Linux network namespace on the switch, so the host kernel's own IP stack is an endpoint.

Tests use it to talk to real sockets through the switch (and to rehearse guest scenarios without a VM):
the namespace is the test's own little host, created here with pyroute2 and removed at the end; nothing is
configured outside it. Root only (``/dev/net/tun`` and namespaces need CAP_NET_ADMIN).

The TAP device is created in this process's namespace (so the file descriptor stays ours), then moved into
the test namespace and configured there. A reader thread feeds frames the kernel sends into the switch;
``deliver`` writes frames to the TAP without blocking ("tap-full" when the kernel's queue is full).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import select
import struct
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

from hvlab.errors import HvlabError
from hvlab.net.switch import Port, Switch, mac_bytes, mac_str
from hvlab.net.topology import check_test_address

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
_names = itertools.count()


def available() -> str | None:
    """None when TAP ports can be made here, else the reason (for pytest.skip)."""
    if os.geteuid() != 0:
        return "TAP ports and network namespaces need root"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "pyroute2 is not installed (pip install pyroute2)"
    return None


class NetNamespace:
    """A named network namespace that exists for the lifetime of this object (``with`` or ``close()``)."""

    def __init__(self, name: str | None = None) -> None:
        from pyroute2 import NetNS, netns

        self.name = name or f"hvlab-{os.getpid()}-{next(_names)}"
        netns.create(self.name)
        with NetNS(self.name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        # IPv6 off: router solicitations and DAD would only add noise to counted traffic
        self.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                  "net.ipv6.conf.default.disable_ipv6=1"], check=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (stdout/stderr captured as text)."""
        r = subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise HvlabError(f"in netns {self.name}: {' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(argv), text=True, **kw)

    def close(self) -> None:
        from pyroute2 import netns

        with contextlib.suppress(OSError):
            netns.remove(self.name)

    def __enter__(self) -> NetNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TapPort:
    """A switch port whose other end is ``ifname`` inside ``ns`` with ``mac`` and ``addr`` (192.0.2.x/n).

    With ``addr=None`` the interface is left down and unaddressed (for tests of guest set-up scripts)."""

    def __init__(self, switch: Switch, name: str, ns: NetNamespace, *, ifname: str = "eth0", mac: str,
                 addr: str | None) -> None:
        from pyroute2 import IPRoute, NetNS

        iface = check_test_address(addr) if addr is not None else None
        self.ns, self.ifname, self.mac = ns, ifname, mac_str(mac_bytes(mac))
        tmp = f"hvtap{os.getpid() % 10000}x{next(_names)}"[:15]
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH22x", tmp.encode(), IFF_TAP | IFF_NO_PI))
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=tmp)[0], net_ns_fd=ns.name)
            with NetNS(ns.name) as n:
                idx = n.link_lookup(ifname=tmp)[0]
                n.link("set", index=idx, ifname=ifname, address=self.mac)
                if iface is not None:
                    n.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
                    n.link("set", index=idx, state="up")
        except Exception:
            os.close(self.fd)
            raise
        self._stop_r, self._stop_w = os.pipe()
        self.port: Port = switch.add_port(name, self._deliver)
        self.switch = switch
        self._thread = threading.Thread(target=self._reader, name=f"hvlab-tap-{name}", daemon=True)
        self._thread.start()

    def _deliver(self, frame: bytes) -> str | None:
        try:
            os.write(self.fd, frame)
        except BlockingIOError:
            return "tap-full"
        except OSError as e:
            return "link-down" if e.errno == errno.EIO else f"tap-{errno.errorcode.get(e.errno, e.errno)}"
        return None

    def _reader(self) -> None:
        while True:
            r, _, _ = select.select([self.fd, self._stop_r], [], [])
            if self._stop_r in r:
                return
            try:
                frame = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                return
            self.port.send(frame)

    def close(self) -> None:
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        self.switch.remove_port(self.port)
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)
        self._stop_w = -1

    def __enter__(self) -> TapPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

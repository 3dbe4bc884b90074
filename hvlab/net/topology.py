"""The default test network: one switch, the guest's NIC on it, and a responder standing in for "the host".

Everything lives in 192.0.2.0/24 (TEST-NET-1, RFC 5737: documentation only, routed nowhere), so a guest or
a namespace that misroutes traffic can never reach a real network::

    guest eth0 (hv_netvsc)  00:15:5d:00:02:02  192.0.2.2/24  --- port "guest" ---+
                                                                               switch "sw0"
    responder (Scapy)       02:48:56:00:02:01  192.0.2.1     --- port "responder" -+

The guest MAC uses Microsoft's Hyper-V OUI (00:15:5d), as Hyper-V assigns; its VF gets the same MAC. The
responder's MAC is locally administered (02:...), so it can never collide with a real vendor's.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hvlab.net.switch import Switch
from hvlab.timeline import TimelineSink

if TYPE_CHECKING:
    from hvlab.net.traffic import Responder

NETWORK = ipaddress.IPv4Network("192.0.2.0/24")
GUEST_IP = "192.0.2.2"
GUEST_PREFIX = 24
GUEST_MAC = "00:15:5d:00:02:02"
RESPONDER_IP = "192.0.2.1"
RESPONDER_MAC = "02:48:56:00:02:01"
#: UDP ports the responder serves: echo (RFC 862) answers, everything else is a flow sink.
UDP_ECHO_PORT = 7
UDP_FLOW_PORT = 9000

_IFACE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


def check_test_address(addr: str) -> ipaddress.IPv4Interface:
    """Parse "a.b.c.d[/n]" and refuse anything outside 192.0.2.0/24: test traffic must never leave it."""
    iface = ipaddress.IPv4Interface(addr)
    if iface.ip not in NETWORK or iface.network.prefixlen < NETWORK.prefixlen:
        raise ValueError(f"{addr}: hvlab test networks use {NETWORK} only")
    return iface


def guest_ip_setup(iface: str = "eth0", addr: str = f"{GUEST_IP}/{GUEST_PREFIX}") -> str:
    """A busybox-sh snippet: wait up to 10 s for ``iface``, add ``addr``, set the link up, and check.

    The host runs it through the guest agent. It exits non-zero with a message naming the interface when
    the interface never appears or the address did not stick; running it twice is harmless.
    """
    if not _IFACE_RE.match(iface):
        raise ValueError(f"not an interface name: {iface!r}")
    ip_if = check_test_address(addr)
    i, a, ip = shlex.quote(iface), shlex.quote(str(ip_if.with_prefixlen)), shlex.quote(str(ip_if.ip))
    return (
        f"n=0; while [ ! -e /sys/class/net/{i} ]; do n=$((n+1)); "
        f"if [ $n -gt 100 ]; then echo \"hvlab: interface {iface} did not appear in 10 s\" >&2; exit 1; fi; "
        f"sleep 0.1; done; "
        f"ip link set dev {i} up && "
        f"{{ ip -4 addr show dev {i} | grep -q \"inet {ip}/\" || ip addr add {a} dev {i}; }} && "
        f"ip -4 addr show dev {i} | grep -q \"inet {ip}/\" || "
        f"{{ echo \"hvlab: could not set {ip_if.with_prefixlen} on {iface}\" >&2; exit 1; }}"
    )


@dataclass
class Topology:
    """The default network, built by ``default_topology``; ``close()`` stops the responder and switch."""

    switch: Switch
    responder: Responder

    def close(self) -> None:
        self.responder.close()
        self.switch.close()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_topology(*, timeline: TimelineSink | None = None, pcap_dir: str | Path | None = None,
                     name: str = "sw0") -> Topology:
    """A switch with the responder on port "responder"; the caller attaches the guest NIC (netvsp) itself
    with ``switch.add_port("guest", deliver)``. With ``pcap_dir``, the responder's port is captured to
    ``<pcap_dir>/responder.pcap``."""
    from hvlab.net.traffic import Responder

    sw = Switch(name, timeline=timeline)
    responder = Responder(sw, "responder", mac=RESPONDER_MAC, ip=RESPONDER_IP)
    if pcap_dir is not None:
        responder.port.set_pcap(Path(pcap_dir) / "responder.pcap")
    return Topology(sw, responder)

"""The default topology: constants, the responder, and the guest's address set-up snippet (run for real
with busybox sh in a namespace, with iproute2's ip and with busybox's)."""

from __future__ import annotations

import ipaddress
import os
import subprocess

import pytest

from hvlab.guest import initramfs
from hvlab.net import tap, topology
from hvlab.net.switch import mac_bytes


def test_constants_are_in_the_documentation_range() -> None:
    net = ipaddress.ip_network("192.0.2.0/24")
    assert ipaddress.ip_address(topology.GUEST_IP) in net and ipaddress.ip_address(topology.RESPONDER_IP) in net
    assert topology.GUEST_PREFIX == 24 and topology.GUEST_IP != topology.RESPONDER_IP
    assert topology.GUEST_MAC.startswith("00:15:5d:")  # Hyper-V OUI
    assert mac_bytes(topology.RESPONDER_MAC)[0] & 0b11 == 0b10  # locally administered unicast


def test_guest_ip_setup_refuses_other_networks_and_odd_names() -> None:
    assert "192.0.2.2/24" in topology.guest_ip_setup() and "eth0" in topology.guest_ip_setup()
    for bad in ("10.0.0.2/24", "192.0.2.2/8", "not-an-ip"):
        with pytest.raises(ValueError):
            topology.guest_ip_setup(addr=bad)
    with pytest.raises(ValueError):
        topology.guest_ip_setup(iface="eth0; reboot")


def test_default_topology_has_a_responder(tmp_path) -> None:
    with topology.default_topology(pcap_dir=tmp_path) as topo:
        assert set(topo.switch.ports) == {"responder"}
        assert topo.responder.ip == topology.RESPONDER_IP and topo.responder.mac == topology.RESPONDER_MAC
        assert topo.responder.port.pcap_path == str(tmp_path / "responder.pcap")


@pytest.mark.skipif(tap.available() is not None, reason=str(tap.available()))
@pytest.mark.parametrize("ip_impl", ["iproute2", "busybox"])
def test_guest_ip_setup_runs_in_busybox_sh(tmp_path, ip_impl) -> None:
    bb = str(initramfs.busybox_path())
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for applet in ("grep", "sleep", "[", "test") + (("ip",) if ip_impl == "busybox" else ()):
        os.symlink(bb, bindir / applet)
    path = f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin"
    with topology.default_topology() as topo, tap.NetNamespace() as ns, \
            tap.TapPort(topo.switch, "guest", ns, mac=topology.GUEST_MAC, addr=None):
        snippet = topology.guest_ip_setup()
        for _ in range(2):  # idempotent
            r = ns.run(["env", f"PATH={path}", bb, "sh", "-c", snippet], check=False)
            assert r.returncode == 0, r.stderr
        out = ns.run(["ip", "-4", "addr", "show", "dev", "eth0"]).stdout
        assert out.count("inet 192.0.2.2/24") == 1 and "UP" in out
        assert topo.responder.ping(topology.GUEST_IP) is not None  # and it really works on the switch
        r = subprocess.run(ns.command(["env", f"PATH={path}", bb, "sh", "-c",
                                       topology.guest_ip_setup(addr="192.0.2.9/24").replace(
                                           "ip addr add", "false")]), capture_output=True, text=True)
        assert r.returncode == 1 and "could not set 192.0.2.9/24 on eth0" in r.stderr

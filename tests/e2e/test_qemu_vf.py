"""End to end under QEMU 11 (TCG, on this host): Linux's vmxnet3 driver on hvlab's vmxnet3 model over
vfio-user. Ping and zero-loss UDP both ways on 6.1, 6.12 and 7.3; QMP hot-plug, unplug and re-plug.

One guest per kernel (module-scoped), one QEMU at a time, all from the one cached QEMU root.
"""

from __future__ import annotations

import json
import time

import pytest

from hvlab.net.topology import GUEST_MAC, RESPONDER_IP

pytestmark = pytest.mark.slow

KERNELS = ["6.12", "6.1", "7.3"]
FLOW_COUNT = 1000
FLOW_RATE = 500  # datagrams per second, each way


@pytest.fixture(scope="module")
def qemu_root():
    import os

    from hvlab.qemu.root import QemuRoot

    root = QemuRoot()
    if not root.ready and os.geteuid() != 0:
        pytest.skip(f"no QEMU root at {root.path} and building one needs root (debootstrap, chroot)")
    return root.ensure()


@pytest.fixture(scope="module", params=KERNELS)
def guest(request, qemu_root):
    from hvlab.qemu.runner import QemuVfConfig, QemuVfGuest

    g = QemuVfGuest(QemuVfConfig(kernel=request.param), qemu_root).start()
    try:
        g.setup_network()
        yield g
    finally:
        g.close()


def test_ping_responder_with_configured_mac(guest):
    r = guest.run(f"cat /sys/class/net/{guest.iface}/address; ping -c 3 -W 5 {RESPONDER_IP}", 60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0] == GUEST_MAC
    assert "3 packets received" in r.stdout
    drv = guest.run(f"basename $(readlink /sys/class/net/{guest.iface}/device/driver)").stdout.strip()
    assert drv == "vmxnet3"
    assert list(guest.device.violations) == []


def _checksums_ok(frame: bytes) -> bool:
    """IPv4 header and UDP checksums of a frame as it left the VF (the device completed them: Linux
    hands vmxnet3 CHECKSUM_PARTIAL packets)."""
    from hvlab.net.frames import ones_sum

    ihl = (frame[14] & 0xF) * 4
    ip, udp = frame[14:14 + ihl], frame[14 + ihl:]
    pseudo = ip[12:20] + bytes([0, 17]) + len(udp).to_bytes(2, "big")
    return ones_sum(ip) == 0xFFFF and udp[6:8] != b"\0\0" and ones_sum(udp, ones_sum(pseudo)) == 0xFFFF


def test_udp_guest_to_host_loses_nothing(guest):
    flow = 21
    seen: list[bytes] = []
    guest.responder.handlers.append(lambda f: seen.append(f) if f[12:14] == b"\x08\x00" and f[23] == 17 else None)
    r = guest.run(f"hvlab-udp send -d {RESPONDER_IP} -p 9000 -n {FLOW_COUNT} -r {FLOW_RATE} -s 64 -f {flow}", 60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sent"] == FLOW_COUNT
    guest.responder.flows.wait(flow, FLOW_COUNT, timeout=10)
    st = guest.responder.flows.stats(flow, expected=FLOW_COUNT)
    assert (st.unique, st.lost, st.duplicates) == (FLOW_COUNT, 0, 0), st
    deadline = time.monotonic() + 5
    while len(seen) < FLOW_COUNT and time.monotonic() < deadline:
        time.sleep(0.05)
    guest.responder.handlers.clear()
    assert len(seen) >= FLOW_COUNT and all(_checksums_ok(f) for f in seen)


def test_udp_host_to_guest_loses_nothing(guest):
    flow = 22
    guest.run(f"rm -f /tmp/r.json; hvlab-udp recv -p 9001 -t 20 -n {FLOW_COUNT} >/tmp/r.json 2>/tmp/r.err &")
    assert guest.run("for i in $(seq 50); do grep -q listening /tmp/r.err && exit 0; sleep 0.1; done; exit 1"
                     ).returncode == 0
    rep = guest.responder.udp_flow("192.0.2.2", 9001, count=FLOW_COUNT, rate=FLOW_RATE, flow=flow)
    assert rep.sent == FLOW_COUNT
    r = guest.run("for i in $(seq 100); do [ -s /tmp/r.json ] && break; sleep 0.1; done; cat /tmp/r.json", 30)
    out = json.loads(r.stdout)
    (f,) = [x for x in out["flows"] if x["flow"] == flow]
    assert (f["unique"], f["lost"], f["duplicates"]) == (FLOW_COUNT, 0, 0), f
    assert guest.port.counters.drops.get("no-rx-buffer", 0) == 0


def test_link_events_and_jumbo_frames(guest):
    carrier = f"/sys/class/net/{guest.iface}/carrier"
    wait_for = "for i in $(seq 50); do [ $(cat {c}) = {v} ] && exit 0; sleep 0.1; done; exit 1"
    guest.device.set_link(False)
    assert guest.run(wait_for.format(c=carrier, v=0)).returncode == 0
    guest.device.set_link(True)
    assert guest.run(wait_for.format(c=carrier, v=1)).returncode == 0
    # MTU 9000: the driver quiesces, resets and re-activates with head and body buffers in ring 1.
    r = guest.run(f"ip link set {guest.iface} mtu 9000 && ping -c 2 -W 5 -s 8000 {RESPONDER_IP}; "
                  f"rc=$?; ip link set {guest.iface} mtu 1500; exit $rc", 60)
    assert r.returncode == 0 and "2 packets received" in r.stdout, r.stdout
    assert guest.run(f"ping -c 1 -W 5 {RESPONDER_IP}").returncode == 0
    assert list(guest.device.violations) == []


@pytest.mark.parametrize("kernel", KERNELS)
def test_hotplug_unplug_replug(qemu_root, kernel):
    from hvlab.qemu.runner import QemuVfConfig, QemuVfGuest

    with QemuVfGuest(QemuVfConfig(kernel=kernel, msix=False, cold_plug=False), qemu_root) as g:
        assert not g.interface_present()
        g.plug()
        g.setup_network()
        assert g.run(f"ping -c 2 -W 5 {RESPONDER_IP}", 30).returncode == 0
        t0 = time.monotonic()
        g.unplug()
        assert time.monotonic() - t0 < 30
        assert g.server.wait_for(lambda: not g.server.connected, 10)
        assert not g.interface_present()
        g.plug()
        g.setup_network()
        r = g.run(f"ping -c 2 -W 5 {RESPONDER_IP}", 30)
        assert r.returncode == 0, r.stdout
        assert g.server.connections_served == 2
        assert list(g.device.violations) == []


def test_cli_acceptance_command(qemu_root):
    """The issue's acceptance line, as a user types it; exit status is the guest command's."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "hvlab", "qemu", "--kernel", "6.12", "--vf", "vmxnet3", "--exec"]
    r = subprocess.run([*cmd, f"ping -c 3 {RESPONDER_IP}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "3 packets received" in r.stdout
    r = subprocess.run([*cmd, "exit 3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr


def test_intx_mode(qemu_root):
    """pci=nomsi: the driver falls back to INTx (type 1) and reads ICR in its handler."""
    from hvlab.qemu.runner import QemuVfConfig, QemuVfGuest

    with QemuVfGuest(QemuVfConfig(kernel="6.12", append="pci=nomsi"), qemu_root) as g:
        g.setup_network()
        r = g.run(f"ping -c 3 -W 5 {RESPONDER_IP} && dmesg | grep -c 'intr type 1'", 60)
        assert r.returncode == 0 and r.stdout.strip().endswith("1"), r.stdout
        assert g.device.counters["interrupts"] > 3 and list(g.device.violations) == []

"""End to end: Linux's hv_netvsc against hvlab's netvsp, switch and responder, on the synthetic path.

Per kernel, two boots: one for traffic (MAC, ping, carrier flips, UDP flows both ways counted at both ends
and in the pcaps), one with two NICs for reconfiguration (MTU 9000 and back, driver reload, vRSS channel
count), each step followed by traffic. The default topology: guest 192.0.2.2/24 (MAC 00:15:5d:00:02:02), responder
192.0.2.1.
"""

import time

import pytest

from hvlab.net import topology, traffic
from hvlab.pytest_plugin import KERNELS, retry_on_guest_fault

pytestmark = pytest.mark.kvm


def ping(vm, count=3, size=56, timeout=60):
    r = vm.run(f"ping -c {count} -s {size} -W 5 192.0.2.1", timeout=timeout)
    assert r.returncode == 0, f"ping -s {size} failed:\n{r.stdout}{r.stderr}"
    assert f"{count} packets received" in r.stdout, r.stdout
    return r.stdout


def wait_guest(vm, command, expected, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        out = vm.run(command, timeout=10).stdout.strip()
        if out == expected or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


@retry_on_guest_fault
@pytest.mark.parametrize("label", KERNELS)
def test_synthetic_nic_traffic(hvlab_guest, label):
    vm = hvlab_guest(label, smp=2, pcap=True)
    nic = vm.net.nics[0]
    iface = vm.guest_iface
    r = vm.run(f"cat /sys/class/net/{iface}/address; basename $(readlink /sys/class/net/{iface}/device/driver)")
    assert r.stdout.split() == [vm.net.guest_mac, "hv_netvsc"]
    ping(vm)
    assert nic.counters["rx_frames"] >= 3 and nic.counters["tx_frames"] >= 3

    # Host-side carrier flips reach the guest (RNDIS media disconnect/connect indications).
    nic.set_link(False)
    assert wait_guest(vm, f"cat /sys/class/net/{iface}/carrier", "0") == "0"
    nic.set_link(True)
    assert wait_guest(vm, f"cat /sys/class/net/{iface}/carrier", "1") == "1"
    ping(vm, count=2)

    # UDP at a fixed rate both ways: nothing lost, duplicated or reordered, counted by the receiving
    # end (hvlab-udp in the guest, the responder on the host) and matching both switch ports' pcaps.
    # The rate is modest because the host-side sender is Python inside the nested runner's L1.
    count, rate = 300, 100
    _, got = traffic.host_to_guest(vm.run, vm.net.responder, topology.GUEST_IP, count=count, rate=rate, flow=1)
    assert (got["unique"], got["lost"], got["duplicates"], got["reordered"]) == (count, 0, 0, 0), got
    sent, stats = traffic.guest_to_host(vm.run, vm.net.responder, count=count, rate=rate, flow=2)
    assert sent["sent"] == count, sent
    assert (stats.unique, stats.lost, stats.duplicates, stats.reordered) == (count, 0, 0, 0), stats
    vm.net.switch.drain()
    for port in ("nic0", "responder"):
        pcap = vm.run_dir / f"{port}.pcap"
        assert traffic.pcap_flow_seqs(pcap, 1, dst_ip=topology.GUEST_IP) == list(range(count)), port
        assert traffic.pcap_flow_seqs(pcap, 2, dst_ip=topology.RESPONDER_IP) == list(range(count)), port
    assert not nic.drops, nic.drops
    assert vm.vmbus.violation_count == 0, vm.vmbus.violations
    assert nic.counters["violations"] == 0


@retry_on_guest_fault
@pytest.mark.parametrize("label", KERNELS)
def test_synthetic_nic_reconfiguration(hvlab_guest, label):
    vm = hvlab_guest(label, smp=2, nics=2)
    nic = vm.net.nics[0]
    iface = vm.guest_iface

    # Two NICs, each with its own MAC and instance id, both driven by hv_netvsc.
    r = vm.run("for d in /sys/class/net/*/device; do n=${d%/device}; "
               "echo $(cat $n/address) $(basename $(readlink $d)) $(basename $(readlink $d/driver)); done")
    seen = {tuple(line.split()) for line in r.stdout.splitlines()}
    assert seen == {(dev.mac.hex(":"), str(dev.instance_guid), "hv_netvsc") for dev in vm.net.nics}, r.stdout

    # MTU 9000 and back: netvsc tears its channels down and reopens them with new buffers.
    r = vm.run(f"ip link set dev {iface} mtu 9000 && cat /sys/class/net/{iface}/mtu", timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "9000", r.stderr
    ping(vm, count=2, size=8000)
    assert nic.mtu == 9000
    r = vm.run(f"ip link set dev {iface} mtu 1500 && cat /sys/class/net/{iface}/mtu", timeout=60)
    assert r.stdout.strip() == "1500", r.stderr
    ping(vm, count=2)

    # Driver reload: every channel is closed and the device probed again; the address must be set anew.
    resets = nic.counters["resets"]
    r = vm.run("rmmod hv_netvsc && modprobe hv_netvsc", timeout=60)
    assert r.returncode == 0, r.stderr
    vm.guest_iface = vm.net.configure_guest(vm.run)
    ping(vm, count=2)
    assert nic.counters["resets"] > resets

    # vRSS: with 2 vCPUs netvsc asks for one subchannel; the host offers it and both queues exist.
    queues = vm.run(f"ls /sys/class/net/{vm.guest_iface}/queues").stdout.split()
    assert {"rx-0", "rx-1", "tx-0", "tx-1"} <= set(queues), queues
    assert len(nic.channels) == 2
    assert vm.vmbus.violation_count == 0, vm.vmbus.violations
    assert nic.counters["violations"] == 0

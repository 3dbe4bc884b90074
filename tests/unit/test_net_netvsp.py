"""netvsp on the switch next to the responder, driven by the guest-side netvsc model: ARP, ping and UDP
flows both ways, counted at both ends and matching the pcaps (the acceptance scenario without a VM).

The NIC's switch port hands frames to a relay the test thread drains into ``NetvspDevice.deliver``,
because the netvsc model is single-threaded: it must not read its rings while the responder's worker
thread writes them.
"""

from __future__ import annotations

import collections
import time

import pytest

from hvlab.net import topology
from hvlab.net.switch import mac_bytes
from hvlab.net.traffic import (
    FlowReceiver,
    UdpFrameBuilder,
    build_arp,
    flow_match,
    flow_payload,
    parse_arp,
    parse_udp,
    pcap_flow_seqs,
)

pytest.importorskip("hvlab.vmbus.netvsc_model")
from hvlab.vmbus.netvsc_model import make_testbed  # noqa: E402

GUEST_MAC, GUEST_IP = topology.GUEST_MAC, topology.GUEST_IP


class Nic:
    """netvsc model + netvsp device on switch port "nic0"; ``pump()`` moves switch frames into the guest."""

    def __init__(self, topo, pcap_dir=None) -> None:
        self.tb = make_testbed("6.12", mac=GUEST_MAC)
        self.relay: collections.deque[bytes] = collections.deque()
        self.port = topo.switch.add_port("nic0", self._to_relay)
        if pcap_dir is not None:
            self.port.set_pcap(pcap_dir / "nic0.pcap")
        self.tb.device.attach_port(self.port)
        topo.switch.pin(GUEST_MAC, self.port)
        self.refused: collections.Counter[str] = collections.Counter()
        self.seen = 0

    def _to_relay(self, frame: bytes) -> None:
        self.relay.append(frame)

    def pump(self) -> None:
        while self.relay:
            reason = self.tb.device.deliver(self.relay.popleft())
            if reason is not None:
                self.refused[reason] += 1
            self.tb.settle()
        self.tb.settle()

    def received(self) -> list[bytes]:
        return [r.frame for r in self.tb.netvsc.rx]

    def send(self, frame: bytes) -> None:
        self.tb.netvsc.send(frame)
        self.tb.settle()

    def wait_for(self, pred, timeout: float = 5.0) -> bytes:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.pump()
            for f in self.received():
                if pred(f):
                    return f
            time.sleep(0.002)
        raise AssertionError("the guest model did not receive the expected frame")


@pytest.fixture
def net(tmp_path):
    with topology.default_topology(pcap_dir=tmp_path) as topo:
        nic = Nic(topo, tmp_path)
        yield topo, nic
        assert nic.refused == collections.Counter()
        assert nic.tb.bus.server.violations == [] and nic.tb.device.counters["violations"] == 0


def resolve(nic: Nic) -> bytes:
    nic.send(build_arp(1, mac_bytes(GUEST_MAC), bytes([192, 0, 2, 2]), b"\0" * 6, bytes([192, 0, 2, 1])))
    reply = nic.wait_for(lambda f: (a := parse_arp(f)) is not None and a[0] == 2)
    assert reply[:6] == mac_bytes(GUEST_MAC)
    return parse_arp(reply)[1]  # type: ignore[index]


def collect(nic: Nic, flow: int, unique: int, timeout: float) -> FlowReceiver:
    """Pump frames into the guest model and count the flow datagrams it received for the guest's IP,
    until ``unique`` distinct ones arrived or ``timeout`` passed (the count is then checked by the test)."""
    rx = FlowReceiver()
    deadline = time.monotonic() + timeout
    while rx.stats(flow).unique < unique and time.monotonic() < deadline:
        nic.pump()
        for f in nic.received()[nic.seen:]:
            u = parse_udp(f)
            if u is not None and u.dst_ip == GUEST_IP:
                rx.feed(u.payload)
        nic.seen = len(nic.received())
        time.sleep(0.001)
    return rx


def test_arp_and_ping_through_netvsp(net) -> None:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether

    topo, nic = net
    assert resolve(nic) == mac_bytes(topology.RESPONDER_MAC)
    nic.send(bytes(Ether(src=GUEST_MAC, dst=topology.RESPONDER_MAC) / IP(src=GUEST_IP, dst="192.0.2.1")
                   / ICMP(id=9, seq=1) / (b"x" * 56)))
    rep = Ether(nic.wait_for(lambda f: f[12:14] == b"\x08\x00" and f[23] == 1))
    assert rep[ICMP].type == 0 and rep[ICMP].id == 9 and rep[IP].dst == GUEST_IP
    assert topo.responder.answered == {"arp": 1, "icmp": 1}


def test_udp_flows_both_ways_through_netvsp(net, tmp_path) -> None:
    topo, nic = net
    resolve(nic)
    # guest -> host: 2000 datagrams through netvsp's TX path, counted by the responder
    b = UdpFrameBuilder(GUEST_MAC, topology.RESPONDER_MAC, GUEST_IP, "192.0.2.1", 40001, 9000)
    for seq in range(2000):
        nic.send(b.build(flow_payload(1, seq, 300)))
    assert topo.responder.flows.wait(1, 2000, 10)
    st = topo.responder.flows.stats(1, expected=2000)
    assert (st.received, st.lost, st.duplicates, st.reordered) == (2000, 0, 0, 0)
    # host -> guest: 2000 datagrams from the responder, into netvsp's receive buffer, counted in the guest
    rep = topo.responder.udp_flow(GUEST_IP, 9000, count=2000, rate=0, flow=2, size=300)
    assert rep.sent == 2000
    rx = collect(nic, 2, 2000, timeout=20)
    st2 = rx.stats(2, expected=2000)
    assert (st2.received, st2.lost, st2.duplicates, st2.reordered) == (2000, 0, 0, 0)
    # the pcaps of both ports hold exactly those datagrams, in order
    for name in ("nic0.pcap", "responder.pcap"):
        assert pcap_flow_seqs(tmp_path / name, 1) == list(range(2000))
        assert pcap_flow_seqs(tmp_path / name, 2) == list(range(2000))
    assert topo.switch.balance()["ok"] and topo.switch.balance()["dropped"] == 0


def test_injected_loss_is_seen_by_the_guest(net) -> None:
    topo, nic = net
    resolve(nic)
    hook = nic.port.drop("tx", match=flow_match(3, {10, 11, 500}))
    topo.responder.udp_flow(GUEST_IP, 9000, count=600, rate=0, flow=3, size=100)
    rx = collect(nic, 3, 597, timeout=10)
    st = rx.stats(3, expected=600)
    assert st.lost == 3 == hook.matched and rx.seqs(3) == set(range(600)) - {10, 11, 500}
    assert nic.port.counters.drops["hook"] == 3 and topo.switch.balance()["ok"]

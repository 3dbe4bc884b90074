"""Scapy endpoints, the responder, and sequenced flows whose loss/dup/reorder counts match injected faults."""

from __future__ import annotations

import random
import threading

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from hvlab.net import topology
from hvlab.net.switch import Switch, mac_bytes
from hvlab.net.traffic import (
    FLOW_HEADER,
    Endpoint,
    FlowReceiver,
    Responder,
    UdpFrameBuilder,
    flow_match,
    flow_payload,
    inet_checksum,
    parse_flow_payload,
    pcap_flow_seqs,
)

GUEST_MAC = topology.GUEST_MAC


class Probe:
    """A bare port that records frames, to talk to the responder with hand-built Scapy packets."""

    def __init__(self, sw: Switch, name: str = "probe") -> None:
        self.frames: list[bytes] = []
        self.event = threading.Event()
        self.port = sw.add_port(name, self._rx)

    def _rx(self, f: bytes) -> None:
        self.frames.append(f)
        self.event.set()

    def wait(self, n: int, timeout: float = 3.0) -> list[Ether]:
        import time

        end = time.monotonic() + timeout
        while len(self.frames) < n and time.monotonic() < end:
            self.event.wait(0.05)
            self.event.clear()
        return [Ether(f) for f in self.frames]


@pytest.fixture
def net():
    topo = topology.default_topology()
    yield topo.switch, topo.responder
    topo.close()


def test_checksum_matches_scapy() -> None:
    rng = random.Random(5)
    for n in (0, 1, 2, 3, 24, 99, 1472):
        b = UdpFrameBuilder(GUEST_MAC, topology.RESPONDER_MAC, "192.0.2.2", "192.0.2.1", rng.randrange(1, 65535),
                            9000)
        f = b.build(bytes(rng.randrange(256) for _ in range(n)))
        p = Ether(f)
        got = (p[IP].chksum, p[UDP].chksum)
        del p[IP].chksum, p[UDP].chksum
        q = Ether(bytes(p))
        assert got == (q[IP].chksum, q[UDP].chksum), n
    assert inet_checksum(b"\0\0") == 0xFFFF and inet_checksum(b"\xff\xff") == 0


def test_flow_payload_roundtrip() -> None:
    p = flow_payload(7, 123456789012, 100, ts_ns=42)
    assert len(p) == 100 and parse_flow_payload(p) == (7, 123456789012, 42)
    assert len(flow_payload(1, 1, 3)) == FLOW_HEADER.size
    assert parse_flow_payload(b"XXXX" + p[4:]) is None and parse_flow_payload(p[:10]) is None


def test_flow_receiver_counts_from_sequence_numbers() -> None:
    rx = FlowReceiver()
    for seq in [0, 1, 3, 2, 2, 5, 4, 9, 1]:  # 6, 7, 8 lost; 2 and 1 duplicated; 2 and 4 reordered
        assert rx.feed(flow_payload(1, seq, 32))
    assert not rx.feed(b"junk")
    st = rx.stats(1)
    assert (st.received, st.unique, st.duplicates, st.reordered, st.lost, st.expected) == (9, 7, 2, 2, 3, 10)
    assert rx.stats(1, expected=12).lost == 5 and rx.invalid == 1
    assert rx.stats(99).received == 0


def test_responder_answers_arp(net) -> None:
    sw, resp = net
    probe = Probe(sw)
    probe.port.send(bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
                          / ARP(op=1, hwsrc=GUEST_MAC, psrc="192.0.2.2", pdst="192.0.2.1")))
    probe.port.send(bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
                          / ARP(op=1, hwsrc=GUEST_MAC, psrc="192.0.2.2", pdst="192.0.2.77")))  # not its IP
    (reply,) = probe.wait(1)
    assert reply[Ether].dst == GUEST_MAC and reply[Ether].src == topology.RESPONDER_MAC
    a = reply[ARP]
    assert (a.op, a.hwsrc, a.psrc, a.hwdst, a.pdst) == (2, topology.RESPONDER_MAC, "192.0.2.1", GUEST_MAC,
                                                         "192.0.2.2")
    assert resp.answered["arp"] == 1 and resp.arp_table["192.0.2.2"] == GUEST_MAC
    assert sw.balance()["ok"]


def test_responder_answers_ping_and_udp_echo(net) -> None:
    sw, resp = net
    probe = Probe(sw)
    req = (Ether(src=GUEST_MAC, dst=topology.RESPONDER_MAC) / IP(src="192.0.2.2", dst="192.0.2.1")
           / ICMP(id=77, seq=5) / b"hello-hvlab")
    probe.port.send(bytes(req))
    (rep,) = probe.wait(1)
    assert rep[ICMP].type == 0 and rep[ICMP].id == 77 and rep[ICMP].seq == 5
    assert rep[Raw].load == b"hello-hvlab" and rep[IP].len == 20 + 8 + 11 and len(bytes(rep)) == 60  # padded
    ipc = rep[IP].chksum
    del rep[IP].chksum
    assert Ether(bytes(rep))[IP].chksum == ipc
    assert rep[IP].src == "192.0.2.1" and rep[IP].dst == "192.0.2.2"
    ic = rep[ICMP].chksum
    del rep[ICMP].chksum
    assert Ether(bytes(rep))[ICMP].chksum == ic
    probe.port.send(bytes(Ether(src=GUEST_MAC, dst=topology.RESPONDER_MAC) / IP(src="192.0.2.2", dst="192.0.2.1")
                          / UDP(sport=5555, dport=topology.UDP_ECHO_PORT) / b"echo-me"))
    rep2 = probe.wait(2)[1]
    assert rep2[UDP].sport == 7 and rep2[UDP].dport == 5555 and rep2[Raw].load == b"echo-me"
    assert resp.answered == {"icmp": 1, "udp-echo": 1}


def test_endpoint_ping_and_resolve(net) -> None:
    sw, resp = net
    with Endpoint(sw, "guest", mac=GUEST_MAC, ip="192.0.2.2") as g:
        assert g.resolve("192.0.2.1") == topology.RESPONDER_MAC
        rtt = g.ping("192.0.2.1")
        assert rtt is not None and rtt < 2
        assert resp.ping("192.0.2.2") is not None  # and the other way round
        with pytest.raises(TimeoutError):
            g.resolve("192.0.2.99", timeout=0.6)
        with pytest.raises(ValueError):
            g.ping("198.51.100.1")  # outside the test network: refused, never sent
    assert sw.balance()["ok"]


def _flow(sw: Switch, resp: Responder, g: Endpoint, count: int, rate: float = 20000.0, flow: int = 3):
    rep = resp.udp_flow("192.0.2.2", 9000, count=count, rate=rate, flow=flow, size=200)
    assert rep.sent == count and rep.errors == 0
    sw.drain()
    g.flows.wait_quiet(flow, 0.2, 5)
    return g.flows.stats(flow, expected=count)


def test_flow_without_faults_loses_nothing_and_matches_pcaps(net, tmp_path) -> None:
    sw, resp = net
    resp.port.set_pcap(tmp_path / "resp.pcap")
    with Endpoint(sw, "guest", mac=GUEST_MAC, ip="192.0.2.2") as g:
        g.port.set_pcap(tmp_path / "guest.pcap")
        st = _flow(sw, resp, g, 2000, rate=5000)
        assert (st.received, st.unique, st.lost, st.duplicates, st.reordered) == (2000, 2000, 0, 0, 0)
        # the other way round: "guest" -> responder
        rep = g.udp_flow("192.0.2.1", topology.UDP_FLOW_PORT, count=1000, rate=5000, flow=4)
        assert rep.sent == 1000
        resp.flows.wait(4, 1000, 5)
        st2 = resp.flows.stats(4, expected=1000)
        assert (st2.received, st2.lost, st2.duplicates, st2.reordered) == (1000, 0, 0, 0)
        assert pcap_flow_seqs(tmp_path / "resp.pcap", 3) == list(range(2000))
        assert pcap_flow_seqs(tmp_path / "guest.pcap", 3) == list(range(2000))
        assert pcap_flow_seqs(tmp_path / "guest.pcap", 4) == list(range(1000))
        assert pcap_flow_seqs(tmp_path / "resp.pcap", 4, dst_ip="192.0.2.1") == list(range(1000))
    assert sw.balance()["ok"]


def test_flow_measures_exactly_the_injected_faults(net, tmp_path) -> None:
    sw, resp = net
    with Endpoint(sw, "guest", mac=GUEST_MAC, ip="192.0.2.2") as g:
        g.port.set_pcap(tmp_path / "guest.pcap")
        drop_seqs, dup_seqs, reorder_seqs = {5, 17, 300, 999}, {10, 20}, {30, 60, 90}
        drop = resp.port.drop("rx", match=flow_match(3, drop_seqs))
        dup = g.port.duplicate("tx", match=flow_match(3, dup_seqs))
        reo = g.port.reorder("tx", distance=2, match=flow_match(3, reorder_seqs))
        st = _flow(sw, resp, g, 1000)
        assert (drop.matched, dup.matched, reo.matched) == (4, 2, 3)
        assert st.lost == 4 and st.duplicates == 2 and st.reordered == 3
        assert st.received == 1000 - 4 + 2 and st.unique == 996
        assert g.flows.seqs(3) == set(range(1000)) - drop_seqs
        seqs = pcap_flow_seqs(tmp_path / "guest.pcap", 3)  # what the guest port really got, in order
        assert seqs.index(30) == seqs.index(32) + 1 and seqs.count(10) == 2 and 17 not in seqs
        assert resp.port.counters.drops["hook"] == 4 and g.port.counters.created == 2
    assert sw.balance()["ok"]


def test_random_loss_is_measured_not_guessed(net) -> None:
    sw, resp = net
    with Endpoint(sw, "guest", mac=GUEST_MAC, ip="192.0.2.2") as g:
        g.resolve("192.0.2.1")  # ARP before the lossy hook, so only flow frames are affected
        h = g.port.drop("tx", probability=0.05, seed=7, match=flow_match(3))
        st = _flow(sw, resp, g, 2000)
        assert h.matched > 50 and st.lost == h.matched == g.port.counters.drops["hook"]
        assert st.duplicates == 0 and st.reordered == 0
    assert sw.balance()["ok"]


def test_concurrent_flows_from_threads(net) -> None:
    sw, resp = net
    with Endpoint(sw, "g1", mac="00:15:5d:00:02:03", ip="192.0.2.3") as g1, \
            Endpoint(sw, "g2", mac="00:15:5d:00:02:04", ip="192.0.2.4") as g2:
        runs = [g1.start_udp_flow("192.0.2.1", 9000, count=1500, rate=4000, flow=11),
                g2.start_udp_flow("192.0.2.1", 9000, count=1500, rate=4000, flow=12),
                resp.start_udp_flow("192.0.2.3", 9000, count=1500, rate=4000, flow=13)]
        for t, _ in runs:
            t.join(30)
        assert [r[0].sent for _, r in runs] == [1500] * 3
        for ep, flow in ((resp, 11), (resp, 12), (g1, 13)):
            assert ep.flows.wait(flow, 1500, 10), ep.flows.stats(flow)
            st = ep.flows.stats(flow, expected=1500)
            assert (st.lost, st.duplicates, st.reordered) == (0, 0, 0)
    assert sw.balance()["ok"]


def test_endpoint_queue_full_is_counted() -> None:
    sw = Switch()
    ep = Endpoint(sw, "slow", mac="02:00:00:00:00:05", ip="192.0.2.5", queue_size=1)
    gate = threading.Event()
    ep.handlers.append(lambda f: gate.wait(5))
    src = sw.add_port("src", lambda f: None)
    b = UdpFrameBuilder("02:00:00:00:00:06", ep.mac, "192.0.2.6", ep.ip, 1, 9000)
    for i in range(20):
        src.send(b.build(flow_payload(1, i, 30)))
    gate.set()
    assert ep.port.counters.drops["queue-full"] > 0
    assert ep.port.counters.tx_frames + ep.port.counters.drops["queue-full"] == 20
    ep.close()
    assert sw.balance()["ok"]


def test_addresses_outside_test_net_refused() -> None:
    sw = Switch()
    with pytest.raises(ValueError):
        Endpoint(sw, "x", mac="02:00:00:00:00:01", ip="10.0.0.1")
    with pytest.raises(ValueError):
        topology.check_test_address("192.0.3.1/24")
    with pytest.raises(ValueError):
        topology.check_test_address("192.0.2.1/16")


def test_malformed_frames_never_break_the_responder(net, caplog) -> None:
    """Guest input is untrusted: truncated and random ARP/IPv4/UDP/ICMP frames are ignored (no exception
    in the worker), and the responder keeps answering."""
    sw, resp = net
    probe = Probe(sw)
    rng = random.Random(11)
    hdr = mac_bytes(topology.RESPONDER_MAC) + mac_bytes(GUEST_MAC)
    good_ping = bytes(Ether(src=GUEST_MAC, dst=topology.RESPONDER_MAC) / IP(src="192.0.2.2", dst="192.0.2.1")
                      / ICMP(id=1, seq=1))
    for i in range(1500):
        kind = i % 5
        if kind == 0:
            f = hdr + b"\x08\x06" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        elif kind == 1:
            f = hdr + b"\x08\x00" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        elif kind == 2:  # a valid ping cut short anywhere
            f = good_ping[: rng.randrange(14, len(good_ping))]
        elif kind == 3:  # a valid ping with one random byte changed in the IP/ICMP headers
            b = bytearray(good_ping)
            b[rng.randrange(14, len(b))] = rng.randrange(256)
            f = bytes(b)
        else:  # IPv4/UDP to the responder with random lengths and payload
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 60)))
            f = bytes(Ether(src=GUEST_MAC, dst=topology.RESPONDER_MAC) / IP(src="192.0.2.2", dst="192.0.2.1")
                      / UDP(sport=1, dport=rng.choice([7, 9000]), len=rng.randrange(0, 120)) / body)
        probe.port.send(f)
    with Endpoint(sw, "guest", mac="00:15:5d:00:02:09", ip="192.0.2.9") as g:
        assert g.ping("192.0.2.1") is not None
    assert "frame handling failed" not in caplog.text
    assert sw.balance()["ok"]

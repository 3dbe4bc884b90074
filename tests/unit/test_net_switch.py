"""The virtual switch: learning, flooding, pins, link state, hooks, delays, pcap, timeline, concurrency.

Every test ends by checking the conservation law (every frame delivered or counted as dropped).
"""

from __future__ import annotations

import threading
import time

import pytest

from hvlab.net.pcap import read_pcap
from hvlab.net.switch import Switch, mac_bytes
from hvlab.timeline import MemoryTimeline

A, B, C, D = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c", "02:00:00:00:00:0d"
BCAST = "ff:ff:ff:ff:ff:ff"


def frame(dst: str, src: str, tag: int = 0, size: int = 60) -> bytes:
    body = tag.to_bytes(4, "big")
    return mac_bytes(dst) + mac_bytes(src) + b"\x88\xb5" + body + b"\0" * max(0, size - 18)


class Sink:
    """An endpoint that records what it gets; ``reason`` makes it refuse frames."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.reason: str | None = None
        self.lock = threading.Lock()

    def __call__(self, f: bytes) -> str | None:
        if self.reason:
            return self.reason
        with self.lock:
            self.frames.append(f)
        return None

    def tags(self) -> list[int]:
        return [int.from_bytes(f[14:18], "big") for f in self.frames]


def balanced(sw: Switch) -> dict[str, int]:
    b = sw.balance()
    assert b["ok"], b
    return b


@pytest.fixture
def sw4():
    sw = Switch("t")
    sinks = {n: Sink() for n in "abcd"}
    ports = {n: sw.add_port(n, sinks[n]) for n in "abcd"}
    yield sw, ports, sinks
    sw.close()


def test_unknown_unicast_floods_then_learns(sw4) -> None:
    sw, p, s = sw4
    p["a"].send(frame(B, A, 1))  # B unknown: flooded to b, c, d
    assert [len(s[n].frames) for n in "abcd"] == [0, 1, 1, 1]
    assert sw.fdb() == {A: "a"}
    p["b"].send(frame(A, B, 2))  # A learnt: only a
    assert [len(s[n].frames) for n in "abcd"] == [1, 1, 1, 1]
    p["a"].send(frame(B, A, 3))  # B learnt now: only b
    assert s["b"].tags() == [1, 3] and s["c"].tags() == [1]
    assert sw.fdb() == {A: "a", B: "b"}
    assert p["a"].counters.rx_frames == 2 and p["b"].counters.tx_frames == 2
    assert p["a"].counters.tx_bytes == 60 and p["b"].counters.rx_bytes == 60
    b = balanced(sw)
    assert b["created"] == 2 and b["tx"] == 5 and b["dropped"] == 0


def test_broadcast_and_multicast_flood_to_up_ports_only(sw4) -> None:
    sw, p, s = sw4
    p["c"].link_up = False
    p["a"].send(frame(BCAST, A, 7))
    p["a"].send(frame("01:00:5e:00:00:01", A, 8))
    assert s["b"].tags() == [7, 8] and s["d"].tags() == [7, 8]
    assert s["c"].frames == [] and s["a"].frames == [] and p["c"].counters.drops == {}
    balanced(sw)


def test_flood_with_nobody_else_is_a_counted_drop() -> None:
    sw = Switch()
    a = sw.add_port("a", Sink())
    a.send(frame(BCAST, A))
    assert a.counters.drops == {"no-such-port": 1} and a.counters.rx_dropped == 1
    balanced(sw)


def test_pin_beats_learning_and_unpin_restores_it(sw4) -> None:
    sw, p, s = sw4
    p["b"].send(frame(A, B))  # B learnt on b
    sw.pin(B, p["c"])  # e.g. data path switched to the VF on port c
    p["a"].send(frame(B, A, 1))
    p["b"].send(frame(A, B))  # learning B on b again must not beat the pin
    p["a"].send(frame(B, A, 2))
    assert s["c"].tags() == [0, 1, 2] and s["b"].tags() == []
    assert sw.lookup(B) is p["c"] and sw.pins() == {B: "c"}
    sw.pin(B, None)
    p["a"].send(frame(B, A, 3))
    assert s["b"].tags()[-1] == 3 and s["c"].tags()[-1] == 2
    balanced(sw)


def test_pin_to_foreign_port_refused(sw4) -> None:
    sw, _, _ = sw4
    other = Switch("x").add_port("z", Sink())
    with pytest.raises(ValueError):
        sw.pin(A, other)
    with pytest.raises(ValueError):
        sw.pin("not-a-mac", None)


def test_link_down_drops_both_ways_and_counts() -> None:
    tl = MemoryTimeline()
    sw = Switch("t", timeline=tl)
    sa, sb = Sink(), Sink()
    a, b = sw.add_port("a", sa), sw.add_port("b", sb)
    b.send(frame(A, B))  # flood to a: learn B
    a.send(frame(B, A))  # learn A
    b.link_up = False
    for i in range(5):
        a.send(frame(B, A, i))  # to a down port: tx drop on b
    for i in range(3):
        b.send(frame(A, B, i))  # from a down port: rx drop on b
    assert b.counters.drops == {"link-down": 8}
    assert b.counters.tx_dropped == 5 and b.counters.rx_dropped == 3
    assert a.counters.drops == {}
    b.link_up = True
    a.send(frame(B, A, 9))
    assert sb.tags()[-1] == 9
    balanced(sw)
    links = tl.of_kind("switch.link")
    assert [e["up"] for e in links] == [False, True]
    sw.close()
    drops = [e for e in tl.of_kind("switch.drop") if e["port"] == "b"]
    # summarised: the first drop of each kind at once, the rest in one line at close
    assert sum(e["count"] for e in drops) == 8 and len(drops) <= 4


def test_runt_and_bad_input_are_counted_not_raised(sw4) -> None:
    sw, p, s = sw4
    p["a"].send(b"\x01\x02")
    p["a"].send(b"")
    p["a"].send(None)  # type: ignore[arg-type]
    assert p["a"].counters.drops == {"runt": 3}
    assert all(not x.frames for x in s.values())
    balanced(sw)


def test_endpoint_refusal_and_exceptions_counted(sw4) -> None:
    sw, p, s = sw4
    s["b"].reason = "ring-full"
    p["c"].__dict__["_deliver"] = lambda f: 1 / 0  # an endpoint bug must not escape into the sender
    p["a"].send(frame(BCAST, A))
    assert p["b"].counters.drops == {"ring-full": 1} and p["c"].counters.drops == {"deliver-error": 1}
    assert len(s["d"].frames) == 1
    balanced(sw)


def test_same_port_destination_dropped(sw4) -> None:
    sw, p, _ = sw4
    p["a"].send(frame(BCAST, B))  # B learnt on a
    p["a"].send(frame(B, A))
    assert p["a"].counters.drops == {"same-port": 1}
    balanced(sw)


def test_remove_port_forgets_macs_and_pins(sw4) -> None:
    sw, p, s = sw4
    p["b"].send(frame(A, B))
    sw.pin(C, p["b"])
    sw.remove_port(p["b"])
    assert "b" not in sw.ports and sw.fdb() == {} and sw.pins() == {}
    p["b"].send(frame(A, B))  # a stale handle: counted, not raised
    assert p["b"].counters.drops == {"no-such-port": 1}
    p["a"].send(frame(B, A, 5))  # B unknown again: flooded to c, d
    assert s["c"].tags()[-1] == 5 and s["b"].tags() == []
    with pytest.raises(ValueError):
        sw.add_port("a", Sink())
    balanced(sw)


def test_drop_hooks_next_n_predicate_probability(sw4) -> None:
    sw, p, s = sw4
    p["b"].send(frame(A, B))
    p["a"].send(frame(B, A))
    h = p["a"].drop("rx", count=3)
    for i in range(10):
        p["a"].send(frame(B, A, i))
    assert s["b"].tags()[-7:] == list(range(3, 10)) and h.matched == 3
    p["a"].remove_hook(h)
    h = p["b"].drop("tx", match=lambda f: f[17] % 2 == 1, reason="odd")
    for i in range(10):
        p["a"].send(frame(B, A, i))
    assert s["b"].tags()[-5:] == [0, 2, 4, 6, 8] and p["b"].counters.drops["odd"] == 5
    p["b"].remove_hook(h)
    before = len(s["b"].frames)
    h = p["b"].drop("tx", probability=0.3, seed=42)
    for i in range(1000):
        p["a"].send(frame(B, A, i))
    got = len(s["b"].frames) - before
    assert got + h.matched == 1000 and 230 < h.matched < 370
    assert p["b"].counters.drops["hook"] == h.matched
    # the same seed gives the same choice of frames
    sw2 = Switch()
    s2 = Sink()
    x, y = sw2.add_port("x", Sink()), sw2.add_port("y", s2)
    y.drop("tx", probability=0.3, seed=42)
    for i in range(1000):
        x.send(frame(B, A, i))
    assert s2.tags() == s["b"].tags()[before:]
    balanced(sw)
    balanced(sw2)


def test_delay_keeps_order_and_counts_in_flight(sw4) -> None:
    sw, p, s = sw4
    p["b"].send(frame(A, B))
    p["a"].send(frame(B, A))
    p["b"].delay("tx", 0.2)
    t0 = time.monotonic()
    for i in range(50):
        p["a"].send(frame(B, A, i))
    assert sw.in_flight == 50 and len(s["b"].frames) == 1
    b = sw.balance()
    assert b["ok"] and b["in_flight"] == 50
    assert sw.drain(5)
    assert time.monotonic() - t0 >= 0.2
    assert s["b"].tags()[1:] == list(range(50))
    balanced(sw)


def test_delay_rx_then_close_counts_pending_as_dropped() -> None:
    sw = Switch()
    sb = Sink()
    a, _ = sw.add_port("a", Sink()), sw.add_port("b", sb)
    a.delay("rx", 10)
    for i in range(4):
        a.send(frame(B, A, i))
    assert sw.in_flight == 4
    sw.close()
    assert a.counters.drops == {"switch-closed": 4} and sb.frames == []
    balanced(sw)


def test_duplicate_and_reorder_hooks(sw4) -> None:
    sw, p, s = sw4
    p["b"].send(frame(A, B))
    p["a"].send(frame(B, A))
    dup = p["a"].duplicate("rx", match=lambda f: f[17] in (2, 5))
    for i in range(8):
        p["a"].send(frame(B, A, i))
    assert s["b"].tags()[1:] == [0, 1, 2, 2, 3, 4, 5, 5, 6, 7]
    assert p["a"].counters.created == 2 and dup.matched == 2
    p["a"].remove_hook(dup)
    del s["b"].frames[:]
    r = p["b"].reorder("tx", distance=2, match=lambda f: f[17] == 3)
    for i in range(8):
        p["a"].send(frame(B, A, i))
    assert s["b"].tags() == [0, 1, 2, 4, 5, 3, 6, 7] and r.matched == 1
    # a frame held when the hook goes is released, not lost
    del s["b"].frames[:]
    r2 = p["b"].reorder("tx", match=lambda f: f[17] == 9)
    p["a"].send(frame(B, A, 9))
    assert s["b"].frames == [] and sw.in_flight == 1 and sw.balance()["ok"]
    p["b"].remove_hook(r2)
    assert s["b"].tags() == [9] and sw.in_flight == 0
    balanced(sw)


def test_pcap_readable_while_running_by_scapy_and_ours(tmp_path, sw4) -> None:
    from scapy.layers.l2 import Ether  # registers LINKTYPE_ETHERNET with rdpcap
    from scapy.utils import rdpcap

    sw, p, s = sw4
    p["a"].set_pcap(tmp_path / "a.pcap")
    p["b"].send(frame(A, B, 1))  # a receives (tx)
    p["a"].send(frame(B, A, 2, size=1514))  # a sends (rx)
    s["a"].reason = "ring-full"
    p["b"].send(frame(A, B, 3))  # refused: not in a's pcap
    pk = rdpcap(str(tmp_path / "a.pcap"))  # no close(): must be readable while running
    assert [bytes(x) for x in pk] == [frame(A, B, 1), frame(B, A, 2, size=1514)]
    assert isinstance(pk[0], Ether) and pk[0].src == B and pk[1].dst == B
    recs = read_pcap(tmp_path / "a.pcap")
    assert len(recs) == p["a"].counters.tx_frames + p["a"].counters.rx_frames
    assert abs(recs[0][0] - time.time()) < 60
    p["a"].set_pcap(None)
    p["a"].send(frame(B, A, 4))
    assert len(read_pcap(tmp_path / "a.pcap")) == 2
    balanced(sw)


def test_pcap_readable_by_tshark(tmp_path) -> None:
    import shutil
    import subprocess

    if shutil.which("tshark") is None:
        pytest.skip("needs tshark")
    from hvlab.net.traffic import UdpFrameBuilder, flow_payload

    sw = Switch()
    a, _ = sw.add_port("a", Sink()), sw.add_port("b", Sink())
    a.set_pcap(tmp_path / "a.pcap")
    ub = UdpFrameBuilder(A, B, "192.0.2.1", "192.0.2.2", 1000, 9000)
    for i in range(3):
        a.send(ub.build(flow_payload(1, i, 100)))
    out = subprocess.run(["tshark", "-r", str(tmp_path / "a.pcap"), "-T", "fields", "-e", "udp.dstport",
                          "-e", "ip.dst", "-o", "udp.check_checksum:TRUE", "-e", "udp.checksum.status"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["9000\t192.0.2.2\t1"] * 3  # 1 = PROTO_CHECKSUM_E_GOOD


def test_concurrent_senders_conserve_frames() -> None:
    sw = Switch()
    sinks = [Sink() for _ in range(4)]
    macs = [f"02:00:00:00:01:{i:02x}" for i in range(4)]
    ports = [sw.add_port(f"p{i}", sinks[i]) for i in range(4)]
    for i, p in enumerate(ports):
        p.send(frame(BCAST, macs[i]))  # everyone learnt
    ports[3].drop("tx", probability=0.1, seed=1)
    ports[2].duplicate("rx", match=lambda f: f[17] % 7 == 0)
    n = 2000

    def blast(i: int) -> None:
        for k in range(n):
            ports[i].send(frame(macs[(i + 1 + k % 3) % 4], macs[i], k))

    threads = [threading.Thread(target=blast, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b = balanced(sw)
    assert b["rx"] == 4 * n + 4
    assert b["dropped"] == ports[3].counters.drops["hook"] > 0
    assert sum(len(s.frames) for s in sinks) == b["tx"]


def test_deliver_may_send_reentrantly() -> None:
    sw = Switch()
    got = Sink()
    a = sw.add_port("a", got)

    def bounce(f: bytes) -> None:
        assert sw._lock.acquire(blocking=False), "deliver called with the switch lock held"
        sw._lock.release()
        if f[17] < 3:  # answer with tag + 1
            b.send(frame(A, B, f[17] + 1))

    b = sw.add_port("b", bounce)
    a.send(frame(B, A, 0))
    assert got.tags() == [1]
    a.send(frame(B, A, 2))
    assert got.tags() == [1, 3]
    balanced(sw)


def test_timeline_events(tmp_path) -> None:
    tl = MemoryTimeline()
    sw = Switch("tl", timeline=tl)
    a = sw.add_port("a", Sink())
    b = sw.add_port("b", Sink())
    sw.pin(B, b)
    a.drop("rx")
    for _ in range(100):
        a.send(frame(B, A))
    sw.remove_port(a)
    kinds = tl.kinds()
    for k in ("switch.create", "switch.port.add", "switch.pin", "switch.hook.add", "switch.port.remove"):
        assert k in kinds
    drops = tl.of_kind("switch.drop")
    assert sum(e["count"] for e in drops) == 100 and len(drops) <= 3  # summarised, not per frame
    assert all(e["switch"] == "tl" for e in tl.events)
    rem = tl.of_kind("switch.port.remove")[0]
    assert rem["counters"]["rx_frames"] == 100 and rem["counters"]["drops"] == {"hook": 100}

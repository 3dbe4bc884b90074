"""Real sockets: the guest's hvlab-udp against the Python flow code, over a namespace's loopback and through
the switch via a TAP port (the host kernel standing in for the guest). Root only; skipped otherwise."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from hvlab.guest import initramfs
from hvlab.net import tap, topology
from hvlab.net.traffic import pcap_flow_seqs

pytestmark = pytest.mark.skipif(tap.available() is not None, reason=str(tap.available()))

PY = [sys.executable, "-m", "hvlab.net.traffic"]


@pytest.fixture(scope="module")
def udp_tool() -> str:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc (scripts/install.sh)")
    path = initramfs.udp_tool()
    assert path is not None and initramfs._is_static_elf(path)
    return str(path)


@pytest.fixture
def ns():
    with tap.NetNamespace() as n:
        n.run(["ip", "addr", "add", "192.0.2.2/24", "dev", "lo"])  # the namespace's own loopback only
        yield n


def start_receiver(ns: tap.NetNamespace, argv: list[str]) -> subprocess.Popen[str]:
    """Start a receiver in the namespace and wait until its socket is bound."""
    p = ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if argv[0].endswith("hvlab-udp"):
        assert "listening" in p.stderr.readline()  # type: ignore[union-attr]
    else:
        ns.run(["sh", "-c", "for i in $(seq 100); do ss -uln | grep -q ':9000 ' && exit 0; sleep 0.05; done; "
                "exit 1"])
    return p


def finish(p: subprocess.Popen[str]) -> dict:
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return json.loads(out)


@pytest.mark.parametrize("direction", ["c-to-python", "python-to-c"])
def test_tool_and_python_agree_over_real_sockets(ns, udp_tool, direction) -> None:
    send_c = [udp_tool, "send", "-d", "192.0.2.2", "-p", "9000", "-n", "3000", "-r", "20000", "-f", "9", "-s", "300"]
    send_py = [*PY, "send", "-d", "192.0.2.2", "-p", "9000", "-n", "3000", "-r", "20000", "-f", "9", "-s", "300"]
    recv_c = [udp_tool, "recv", "-p", "9000", "-n", "3000", "-t", "20"]
    recv_py = [*PY, "recv", "-p", "9000", "-n", "3000", "-t", "20"]
    recv, send = (recv_py, send_c) if direction == "c-to-python" else (recv_c, send_py)
    p = start_receiver(ns, recv)
    sent = json.loads(ns.run(send).stdout)
    got = finish(p)
    assert sent["sent"] == 3000 and sent["errors"] == 0 and 0.1 < sent["elapsed"] < 5
    assert got["datagrams"] == 3000 and got["invalid"] == 0
    assert got["flows"] == [{"flow": 9, "received": 3000, "unique": 3000, "duplicates": 0, "reordered": 0,
                             "lost": 0, "expected": 3000, "max_seq": 2999}]


def test_tool_counts_like_python_on_a_crafted_sequence(ns, udp_tool) -> None:
    """Same datagrams (loss, duplicates, reordering, junk) to both receivers: identical JSON."""
    script = ("import socket,sys; from hvlab.net.traffic import flow_payload\n"
              "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
              "for port in (9000,9001):\n"
              "    for f,q in [(1,0),(1,1),(1,3),(1,2),(1,2),(1,6),(1,4),(2,5),(2,0),(1,1)]:\n"
              "        s.sendto(flow_payload(f,q,64),('192.0.2.2',port))\n"
              "    s.sendto(b'junk',('192.0.2.2',port))\n")
    t0 = time.monotonic()
    pc = start_receiver(ns, [udp_tool, "recv", "-p", "9000", "-t", "20", "-i", "0.5"])
    pp = ns.popen([*PY, "recv", "-p", "9001", "-t", "20", "-i", "0.5"], stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
    ns.run(["sh", "-c", "for i in $(seq 100); do ss -uln | grep -q ':9001 ' && exit 0; sleep 0.05; done; exit 1"])
    ns.run([sys.executable, "-c", script])
    c, py = finish(pc), finish(pp)
    assert time.monotonic() - t0 < 10  # both stopped on the idle limit, not the 20 s one
    assert c.pop("port") == 9000 and py.pop("port") == 9001
    assert c == py
    f1 = next(f for f in c["flows"] if f["flow"] == 1)
    assert (f1["received"], f1["unique"], f1["duplicates"], f1["reordered"], f1["lost"]) == (8, 6, 2, 2, 1)
    assert c["invalid"] == 1 and c["datagrams"] == 11


def test_udp_flows_both_ways_through_switch_and_tap(tmp_path, udp_tool) -> None:
    """The acceptance scenario with the host kernel as the guest: fixed-rate flows both ways lose nothing,
    counted at both ends and matching both ports' pcaps."""
    with topology.default_topology(pcap_dir=tmp_path) as topo, tap.NetNamespace() as ns, \
            tap.TapPort(topo.switch, "guest", ns, mac=topology.GUEST_MAC, addr="192.0.2.2/24") as t:
        t.port.set_pcap(tmp_path / "guest.pcap")
        resp = topo.responder
        ping = [shutil.which("ping")] if shutil.which("ping") else [str(initramfs.busybox_path()), "ping"]
        assert ns.run([*ping, "-c", "1", "-W", "2", "192.0.2.1"]).returncode == 0
        assert resp.ping("192.0.2.2") is not None
        # host -> guest
        p = start_receiver(ns, [udp_tool, "recv", "-p", "9000", "-n", "2000", "-t", "20"])
        rep = resp.udp_flow("192.0.2.2", 9000, count=2000, rate=2000, flow=21, size=512)
        got = finish(p)
        assert rep.sent == 2000
        (f,) = got["flows"]
        assert (f["flow"], f["received"], f["lost"], f["duplicates"], f["reordered"]) == (21, 2000, 0, 0, 0)
        assert pcap_flow_seqs(tmp_path / "responder.pcap", 21) == list(range(2000))
        assert pcap_flow_seqs(tmp_path / "guest.pcap", 21) == list(range(2000))
        # guest -> host
        sent = json.loads(ns.run([udp_tool, "send", "-d", "192.0.2.1", "-p", str(topology.UDP_FLOW_PORT),
                                  "-n", "2000", "-r", "2000", "-f", "22", "-s", "512"]).stdout)
        assert sent["sent"] == 2000 and sent["errors"] == 0
        assert resp.flows.wait(22, 2000, 10)
        st = resp.flows.stats(22, expected=2000)
        assert (st.received, st.lost, st.duplicates, st.reordered) == (2000, 0, 0, 0)
        assert pcap_flow_seqs(tmp_path / "guest.pcap", 22) == list(range(2000))
        assert pcap_flow_seqs(tmp_path / "responder.pcap", 22) == list(range(2000))
        b = topo.switch.balance()
        assert b["ok"] and b["dropped"] == 0, (b, {n: p.counters.snapshot() for n, p in topo.switch.ports.items()})


def test_guest_flow_helpers_measure_injected_loss(tmp_path, udp_tool) -> None:
    """host_to_guest/guest_to_host, with the namespace standing in for the guest's agent, count exactly
    the datagrams a hook dropped on the guest's port."""
    from hvlab.net.traffic import flow_match, guest_to_host, host_to_guest

    with topology.default_topology() as topo, tap.NetNamespace() as ns, \
            tap.TapPort(topo.switch, "guest", ns, mac=topology.GUEST_MAC, addr="192.0.2.2/24") as t:
        def run(cmd: str, timeout: float = 60):
            return ns.run(["sh", "-c", cmd], check=False, timeout=timeout)

        t.port.set_pcap(tmp_path / "guest.pcap")
        lost_in, lost_out = {3, 500, 999}, {0, 7}
        t.port.drop("tx", match=flow_match(31, lost_in))
        t.port.drop("rx", match=flow_match(32, lost_out))
        rep, got = host_to_guest(run, topo.responder, topology.GUEST_IP, count=1000, rate=2000, flow=31,
                                 size=256, tool=udp_tool)
        assert rep.sent == 1000
        assert (got["received"], got["lost"], got["duplicates"], got["reordered"]) == (997, 3, 0, 0)
        sent, st = guest_to_host(run, topo.responder, count=1000, rate=2000, flow=32, tool=udp_tool)
        assert sent["sent"] == 1000 and (st.received, st.lost) == (998, 2)
        assert topo.responder.flows.seqs(32) == set(range(1000)) - lost_out
        assert pcap_flow_seqs(tmp_path / "guest.pcap", 31) == sorted(set(range(1000)) - lost_in)
        assert pcap_flow_seqs(tmp_path / "guest.pcap", 32) == list(range(1000))  # rx: recorded before hooks
        assert t.port.counters.drops["hook"] == 5 and topo.switch.balance()["ok"]


def test_receivers_report_on_sigterm(ns, udp_tool) -> None:
    """A driver that knows the sender is done stops the receiver with SIGTERM and still gets the counts."""
    pc = start_receiver(ns, [udp_tool, "recv", "-p", "9000", "-t", "60"])
    pp = ns.popen([*PY, "recv", "-p", "9001", "-t", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ns.run(["sh", "-c", "for i in $(seq 100); do ss -uln | grep -q ':9001 ' && exit 0; sleep 0.05; done; exit 1"])
    for port in ("9000", "9001"):
        ns.run([*PY, "send", "-d", "192.0.2.2", "-p", port, "-n", "50", "-r", "0", "-f", "4"])
    t0 = time.monotonic()
    for p in (pc, pp):
        p.terminate()  # SIGTERM to `ip netns exec`, which execs the receiver: it is the receiver itself
    c, py = finish(pc), finish(pp)
    assert time.monotonic() - t0 < 10
    for rep in (c, py):
        assert rep["flows"] == [{"flow": 4, "received": 50, "unique": 50, "duplicates": 0, "reordered": 0,
                                 "lost": 0, "expected": 50, "max_seq": 49}]


@pytest.mark.parametrize("direction", ["c-to-python", "python-to-c"])
def test_tcp_flows_between_tool_and_python(ns, udp_tool, direction) -> None:
    args = ["-p", "9000", "-n", "2000", "-T"]
    send_c = [udp_tool, "send", "-d", "192.0.2.2", *args, "-r", "0", "-f", "3", "-s", "700"]
    send_py = [*PY, "send", "-d", "192.0.2.2", *args, "-r", "0", "-f", "3", "-s", "700"]
    recv_c, recv_py = [udp_tool, "recv", *args, "-t", "20"], [*PY, "recv", *args, "-t", "20"]
    recv, send = (recv_py, send_c) if direction == "c-to-python" else (recv_c, send_py)
    p = ns.popen(recv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ns.run(["sh", "-c", "for i in $(seq 100); do ss -tln | grep -q ':9000 ' && exit 0; sleep 0.05; done; exit 1"])
    sent = json.loads(ns.run(send).stdout)
    got = finish(p)
    assert sent["sent"] == 2000 and sent["errors"] == 0
    assert got["flows"] == [{"flow": 3, "received": 2000, "unique": 2000, "duplicates": 0, "reordered": 0,
                             "lost": 0, "expected": 2000, "max_seq": 1999}]


def test_tcp_through_the_switch_recovers_from_injected_loss(tmp_path, udp_tool) -> None:
    """Two namespaces on the switch; the switch drops 2 % of the frames one way (seeded) and delays the
    other: TCP retransmits, so the application sees every record once and in order, and the sender's pcap
    shows the retransmissions the switch caused."""
    with topology.default_topology() as topo, tap.NetNamespace() as a, tap.NetNamespace() as b, \
            tap.TapPort(topo.switch, "a", a, mac="02:00:00:00:aa:02", addr="192.0.2.2/24") as ta, \
            tap.TapPort(topo.switch, "b", b, mac="02:00:00:00:aa:03", addr="192.0.2.3/24") as tb:
        ta.port.set_pcap(tmp_path / "a.pcap")  # a's rx: every segment a sent, recorded before the hooks
        drop = tb.port.drop("tx", probability=0.02, seed=3, match=lambda f: len(f) > 200)  # data, not ACKs
        ta.port.delay("tx", 0.002)
        p = b.popen([udp_tool, "recv", "-p", "9000", "-n", "3000", "-t", "60", "-T"], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
        assert "listening" in p.stderr.readline()  # type: ignore[union-attr]
        sent = json.loads(a.run([udp_tool, "send", "-d", "192.0.2.3", "-p", "9000", "-n", "3000", "-r", "3000",
                                 "-s", "1000", "-f", "8", "-T"], timeout=120).stdout)
        got = finish(p)
        assert sent["sent"] == 3000
        assert got["flows"] == [{"flow": 8, "received": 3000, "unique": 3000, "duplicates": 0, "reordered": 0,
                                 "lost": 0, "expected": 3000, "max_seq": 2999}]
        assert drop.matched > 0 and tb.port.counters.drops["hook"] == drop.matched
        from scapy.layers.inet import TCP
        from scapy.utils import rdpcap

        starts = [x[TCP].seq for x in rdpcap(str(tmp_path / "a.pcap"))
                  if TCP in x and x[TCP].dport == 9000 and len(x[TCP].payload)]
        assert len(starts) > len(set(starts))  # a retransmitted what the switch dropped
        topo.switch.drain()
        assert topo.switch.balance()["ok"]

"""Traffic on the switch: endpoints that answer ARP/ping/UDP echo, and sequenced UDP flows that measure loss.

A flow datagram's payload starts with a 24-byte header (``FLOW_HEADER``): magic "HVFL", flow id (u32),
sequence number (u64, from 0) and the sender's wall-clock send time in ns (u64), all big-endian, then
padding up to the requested size. The same format is spoken by the guest's ``/usr/bin/hvlab-udp``
(hvlab/guest/files/udpflow.c) and by ``python3 -m hvlab.net.traffic``, so a flow can run host -> guest,
guest -> host or socket -> socket and always be counted the same way: from sequence numbers, never guessed.
Over TCP (``tcp=True``, the tools' ``-T``) the same records travel on one connection, each preceded by
its length (u32); that needs a kernel at both ends (guest, TAP namespace), since endpoints speak no TCP.

Counting (``FlowStats``), per flow id:
  received    datagrams that arrived (duplicates included)
  unique      distinct sequence numbers
  duplicates  received - unique
  reordered   datagrams that arrived after a higher sequence number and were not duplicates
  lost        expected - unique, where expected is the count the sender announced (or max_seq + 1)

Endpoints answer ARP, ICMP echo and UDP echo with frames parsed and built by hand, so they answer in
microseconds even where Python is slow (inside the nested runner's L1, where lazily importing Scapy for
the first ARP once took seconds and the guest's ARP timed out). Scapy is for what tests send and inspect
(``send(pkt)``, ``expect()``, ``ping()``). Frames are handled on the endpoint's own worker thread, never on
the thread that called ``deliver`` (a NIC model's TX path), so answering never re-enters the sender.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import queue
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hvlab.net.frames import inet_checksum
from hvlab.net.pcap import read_pcap
from hvlab.net.switch import BROADCAST_MAC, Port, Switch, mac_bytes, mac_str
from hvlab.net.topology import RESPONDER_IP, RESPONDER_MAC, UDP_ECHO_PORT, check_test_address

log = logging.getLogger("hvlab.net")

FLOW_MAGIC = b"HVFL"
FLOW_HEADER = struct.Struct("!4sIQQ")
ETH_IPV4, ETH_ARP = b"\x08\x00", b"\x08\x06"
#: Ethernet + IPv4 + UDP header bytes in front of a flow payload.
UDP_OVERHEAD = 14 + 20 + 8


def _ip_bytes(ip: str) -> bytes:
    return socket.inet_aton(ip)


def flow_payload(flow: int, seq: int, size: int, ts_ns: int | None = None) -> bytes:
    """A flow datagram payload of ``size`` bytes (at least the 24-byte header)."""
    hdr = FLOW_HEADER.pack(FLOW_MAGIC, flow, seq, time.time_ns() if ts_ns is None else ts_ns)
    return hdr + b"\0" * max(0, size - len(hdr))


def parse_flow_payload(payload: bytes) -> tuple[int, int, int] | None:
    """(flow, seq, send time ns) or None when the payload is not a flow datagram."""
    if len(payload) < FLOW_HEADER.size or payload[:4] != FLOW_MAGIC:
        return None
    _, flow, seq, ts = FLOW_HEADER.unpack_from(payload)
    return flow, seq, ts


class UdpFrameBuilder:
    """Ethernet/IPv4/UDP frames from a fixed 4-tuple with proper checksums, without Scapy's per-packet cost
    (a paced flow builds one frame per datagram)."""

    def __init__(self, src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int, dport: int,
                 *, ttl: int = 64) -> None:
        self.eth = mac_bytes(dst_mac) + mac_bytes(src_mac) + ETH_IPV4
        self.src, self.dst = _ip_bytes(src_ip), _ip_bytes(dst_ip)
        self.sport, self.dport, self.ttl = sport, dport, ttl

    def build(self, payload: bytes) -> bytes:
        ulen = 8 + len(payload)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0x4000, self.ttl, 17, 0, self.src, self.dst)
        ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
        udp = struct.pack("!HHHH", self.sport, self.dport, ulen, 0)
        csum = inet_checksum(self.src + self.dst + struct.pack("!BBH", 0, 17, ulen) + udp + payload) or 0xFFFF
        return self.eth + ip + udp[:6] + struct.pack("!H", csum) + payload


@dataclass
class Udp:
    """A parsed IPv4/UDP frame (the endpoints' hot path)."""

    src_mac: bytes
    src_ip: str
    dst_ip: str
    sport: int
    dport: int
    payload: bytes


def parse_udp(frame: bytes) -> Udp | None:
    """The UDP datagram in an Ethernet/IPv4 frame (unfragmented), or None."""
    if len(frame) < 42 or frame[12:14] != ETH_IPV4 or frame[14] >> 4 != 4 or frame[23] != 17:
        return None
    ihl = (frame[14] & 0xF) * 4
    flags_frag = struct.unpack_from("!H", frame, 20)[0]
    if flags_frag & 0x3FFF:  # fragment
        return None
    total = struct.unpack_from("!H", frame, 16)[0]
    u = 14 + ihl
    if len(frame) < u + 8:
        return None
    sport, dport, ulen = struct.unpack_from("!HHH", frame, u)
    end = min(len(frame), 14 + total, u + ulen)
    return Udp(frame[6:12], socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]), sport, dport,
               frame[u + 8: end])


def _pad(frame: bytes) -> bytes:
    """Pad to the 60-byte Ethernet minimum (without FCS), as a real NIC or switch would."""
    return frame + b"\0" * (60 - len(frame)) if len(frame) < 60 else frame


def parse_arp(frame: bytes) -> tuple[int, bytes, bytes, bytes] | None:
    """(op, sender MAC, sender IP, target IP) of an Ethernet/IPv4 ARP frame, or None."""
    if len(frame) < 42 or frame[12:14] != ETH_ARP or frame[14:20] != b"\x00\x01\x08\x00\x06\x04":
        return None
    return struct.unpack_from("!H", frame, 20)[0], frame[22:28], frame[28:32], frame[38:42]


def build_arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes, *, dst: bytes | None = None) -> bytes:
    """An ARP request (op 1, broadcast) or reply (op 2, to ``tha``)."""
    eth_dst = dst if dst is not None else (BROADCAST_MAC if op == 1 else tha)
    return _pad(eth_dst + sha + ETH_ARP + b"\x00\x01\x08\x00\x06\x04" + struct.pack("!H", op)
                + sha + spa + tha + tpa)


def icmp_echo_reply(frame: bytes, my_mac: bytes) -> bytes | None:
    """The ICMP echo reply to an IPv4 echo request frame (same id, seq and data), or None if it is not one.

    Built by hand rather than with Scapy: the responder must answer in microseconds even where Python is
    slow (inside the nested runner's L1), or the guest's ARP and ping time out."""
    if len(frame) < 42 or frame[12:14] != ETH_IPV4 or frame[14] >> 4 != 4 or frame[23] != 1:
        return None
    ihl = (frame[14] & 0xF) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    icmp = frame[14 + ihl: 14 + total]
    if len(icmp) < 8 or icmp[0] != 8 or icmp[1] != 0 or struct.unpack_from("!H", frame, 20)[0] & 0x3FFF:
        return None
    body = b"\0\0\0\0" + icmp[4:]
    body = b"\0\0" + struct.pack("!H", inet_checksum(body)) + body[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, 1, 0, frame[30:34], frame[26:30])
    ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
    return _pad(frame[6:12] + my_mac + ETH_IPV4 + ip + body)


# --------------------------------------------------------------------------------------------------
# Counting


@dataclass
class FlowStats:
    flow: int
    received: int = 0
    unique: int = 0
    duplicates: int = 0
    reordered: int = 0
    lost: int = 0
    expected: int = 0
    max_seq: int = -1

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _FlowState:
    seen: set[int] = field(default_factory=set)
    received: int = 0
    reordered: int = 0
    max_seq: int = -1
    first_ts: float = 0.0
    last_ts: float = 0.0


class FlowReceiver:
    """Counts flow datagrams by flow id; thread-safe; ``wait()`` blocks until enough have arrived."""

    def __init__(self) -> None:
        self._flows: dict[int, _FlowState] = {}
        self._cond = threading.Condition()
        self.invalid = 0

    def feed(self, payload: bytes) -> bool:
        """Count one datagram payload; False (and ``invalid`` += 1) if it is not a flow datagram."""
        parsed = parse_flow_payload(payload)
        with self._cond:
            if parsed is None:
                self.invalid += 1
                return False
            flow, seq, _ts = parsed
            st = self._flows.get(flow)
            if st is None:
                st = self._flows[flow] = _FlowState(first_ts=time.monotonic())
            st.received += 1
            st.last_ts = time.monotonic()
            if seq not in st.seen:
                st.seen.add(seq)
                if seq < st.max_seq:
                    st.reordered += 1
            st.max_seq = max(st.max_seq, seq)
            self._cond.notify_all()
        return True

    def flows(self) -> list[int]:
        with self._cond:
            return sorted(self._flows)

    def unique_total(self) -> int:
        """Distinct sequence numbers over all flows."""
        with self._cond:
            return sum(len(st.seen) for st in self._flows.values())

    def stats(self, flow: int, expected: int | None = None) -> FlowStats:
        """Counts for ``flow``; ``expected`` is how many the sender sent (default: highest seq + 1)."""
        with self._cond:
            st = self._flows.get(flow, _FlowState())
            unique = len(st.seen)
            exp = expected if expected is not None else st.max_seq + 1
            return FlowStats(flow, st.received, unique, st.received - unique, st.reordered,
                             max(0, exp - unique), exp, st.max_seq)

    def seqs(self, flow: int) -> set[int]:
        with self._cond:
            return set(self._flows.get(flow, _FlowState()).seen)

    def wait(self, flow: int, count: int, timeout: float) -> bool:
        """Wait until ``count`` distinct sequence numbers of ``flow`` arrived; False on timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while len(self._flows.get(flow, _FlowState()).seen) < count:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def wait_quiet(self, flow: int, quiet: float, timeout: float) -> None:
        """Wait until ``flow`` has had no datagram for ``quiet`` seconds (or ``timeout`` passed)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._cond:
                st = self._flows.get(flow)
                last = st.last_ts if st else 0.0
            if st is not None and time.monotonic() - last >= quiet:
                return
            time.sleep(min(quiet / 4, 0.05))

    def reset(self) -> None:
        with self._cond:
            self._flows.clear()
            self.invalid = 0


@dataclass
class SendReport:
    flow: int
    sent: int
    errors: int
    elapsed: float

    def to_dict(self) -> dict[str, Any]:
        return {"mode": "send", **asdict(self)}


def pace(count: int, rate: float, send_one: Callable[[int], bool]) -> tuple[int, int, float]:
    """Call ``send_one(seq)`` for seq 0..count-1 at ``rate`` per second on an absolute schedule (no drift:
    a late send is followed by catch-up, not by a permanently shifted schedule); rate <= 0 means flat out.
    Returns (sent, errors, elapsed seconds)."""
    t0 = time.monotonic()
    period = 1.0 / rate if rate > 0 else 0.0
    sent = errors = 0
    for seq in range(count):
        if period:
            delay = t0 + seq * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if send_one(seq):
            sent += 1
        else:
            errors += 1
    return sent, errors, time.monotonic() - t0


# --------------------------------------------------------------------------------------------------
# Endpoints on the switch


class Endpoint:
    """A host on a switch port, with a MAC and an IPv4 address in 192.0.2.0/24.

    Like a small IP stack it answers ARP for its address, ICMP echo requests, UDP echo on port 7 (when
    ``echo`` is set), and counts every flow datagram sent to it in ``flows`` (a sink on every other UDP
    port). It remembers the last ``history`` frames it received for ``expect()``.
    """

    def __init__(self, switch: Switch, name: str, *, mac: str, ip: str, echo: bool = True,
                 queue_size: int = 65536, history: int = 4096) -> None:
        check_test_address(ip)
        self.switch = switch
        self.name = name
        self.mac = mac_str(mac_bytes(mac))
        self.ip = ip
        self.echo = echo
        self._mac_b = mac_bytes(mac)
        self._ip_b = _ip_bytes(ip)
        self.flows = FlowReceiver()
        self.arp_table: dict[str, str] = {}
        self.answered: collections.Counter[str] = collections.Counter()  # "arp", "icmp", "udp-echo"
        self.handlers: list[Callable[[bytes], None]] = []
        self._q: queue.Queue[bytes | None] = queue.Queue(queue_size)
        self._history: collections.deque[bytes] = collections.deque(maxlen=history)
        self._cond = threading.Condition()
        self._rx_seq = 0
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=f"hvlab-ep-{name}", daemon=True)
        self._thread.start()
        self.port: Port = switch.add_port(name, self._deliver)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.mac} {self.ip}>"

    # -- receive path -----------------------------------------------------------------------------

    def _deliver(self, frame: bytes) -> str | None:
        if self._closed:
            return "link-down"
        try:
            self._q.put_nowait(frame)
        except queue.Full:
            return "queue-full"
        return None

    def _main(self) -> None:
        while True:
            frame = self._q.get()
            if frame is None:
                return
            try:
                self._handle(frame)
                for h in list(self.handlers):
                    h(frame)
            except Exception:  # a malformed frame or a test's handler must not kill the endpoint
                log.exception("endpoint %s: frame handling failed", self.name)
            with self._cond:
                self._history.append(frame)
                self._rx_seq += 1
                self._cond.notify_all()

    def _for_me(self, frame: bytes) -> bool:
        return frame[:6] == self._mac_b or frame[:6] == BROADCAST_MAC

    def _handle(self, frame: bytes) -> None:
        etype = frame[12:14]
        if etype == ETH_ARP:
            self._handle_arp(frame)
        elif etype == ETH_IPV4 and self._for_me(frame) and frame[30:34] == self._ip_b:
            proto = frame[23] if len(frame) > 23 else -1
            if proto == 17:
                u = parse_udp(frame)
                if u is None:
                    return
                if self.echo and u.dport == UDP_ECHO_PORT:
                    b = UdpFrameBuilder(self.mac, mac_str(u.src_mac), self.ip, u.src_ip, u.dport, u.sport)
                    self.port.send(b.build(u.payload))
                    self.answered["udp-echo"] += 1
                else:
                    self.flows.feed(u.payload)
            elif proto == 1:
                self._handle_icmp(frame)

    def _handle_arp(self, frame: bytes) -> None:
        a = parse_arp(frame)
        if a is None:
            return
        op, sha, spa, tpa = a
        if spa != b"\0\0\0\0" and not sha[0] & 1:
            self.arp_table[socket.inet_ntoa(spa)] = mac_str(sha)
        if op == 1 and tpa == self._ip_b:
            self.port.send(build_arp(2, self._mac_b, self._ip_b, sha, spa))
            self.answered["arp"] += 1

    def _handle_icmp(self, frame: bytes) -> None:
        reply = icmp_echo_reply(frame, self._mac_b)
        if reply is not None:
            self.port.send(reply)
            self.answered["icmp"] += 1

    # -- inspection -----------------------------------------------------------------------------

    @property
    def received(self) -> int:
        """Frames handled so far (whatever they were)."""
        with self._cond:
            return self._rx_seq

    def expect(self, match: Callable[[Any], bool], timeout: float = 2.0, *, since: int = 0) -> Any:
        """The first received frame (as a Scapy packet) with ``match(pkt)`` true, among those received after
        the ``since``-th (use ``ep.received`` before triggering); waits up to ``timeout``; None on timeout."""
        from scapy.layers.l2 import Ether

        end = time.monotonic() + timeout
        checked = since
        while True:
            with self._cond:
                hist = list(self._history)
                total = self._rx_seq
            first = total - len(hist)
            for i in range(max(checked, first), total):
                pkt = Ether(hist[i - first])
                try:
                    if match(pkt):
                        return pkt
                except Exception:
                    pass
            checked = total
            left = end - time.monotonic()
            if left <= 0:
                return None
            with self._cond:
                if self._rx_seq == total:
                    self._cond.wait(left)

    # -- send path ------------------------------------------------------------------------------

    def send(self, pkt: Any) -> None:
        """Send a Scapy packet or raw frame bytes out of this endpoint's port."""
        self.port.send(bytes(pkt))

    def resolve(self, ip: str, timeout: float = 2.0) -> str:
        """The MAC for ``ip`` (ARP, retried every 0.5 s); TimeoutError when nobody answers."""
        from scapy.layers.l2 import ARP

        check_test_address(ip)
        end = time.monotonic() + timeout
        while True:
            if ip in self.arp_table:
                return self.arp_table[ip]
            since = self.received
            self.port.send(build_arp(1, self._mac_b, self._ip_b, b"\0" * 6, _ip_bytes(ip)))
            left = end - time.monotonic()
            self.expect(lambda p: ARP in p and p[ARP].op == 2 and p[ARP].psrc == ip, min(0.5, max(left, 0)),
                        since=since)
            if ip in self.arp_table:
                return self.arp_table[ip]
            if time.monotonic() >= end:
                raise TimeoutError(f"{self.name}: no ARP reply from {ip} in {timeout} s")

    def ping(self, ip: str, *, seq: int = 1, ident: int = 0x4856, timeout: float = 2.0,
             size: int = 56) -> float | None:
        """Round-trip time of one ICMP echo to ``ip`` in seconds, or None without a reply."""
        from scapy.layers.inet import ICMP, IP
        from scapy.layers.l2 import Ether

        dst_mac = self.resolve(ip, timeout)
        since = self.received
        t0 = time.monotonic()
        self.send(Ether(dst=dst_mac, src=self.mac) / IP(src=self.ip, dst=ip) / ICMP(id=ident, seq=seq)
                  / (b"\xa5" * size))
        r = self.expect(lambda p: ICMP in p and p[ICMP].type == 0 and p[ICMP].id == ident
                        and p[ICMP].seq == seq and p[IP].src == ip, timeout, since=since)
        return None if r is None else time.monotonic() - t0

    def udp_flow(self, dst_ip: str, dport: int, *, count: int, rate: float, flow: int = 1, size: int = 64,
                 sport: int | None = None, dst_mac: str | None = None, timeout: float = 2.0) -> SendReport:
        """Send ``count`` flow datagrams of ``size`` payload bytes to dst_ip:dport at ``rate`` pps (blocking)."""
        check_test_address(dst_ip)
        mac = dst_mac or self.resolve(dst_ip, timeout)
        b = UdpFrameBuilder(self.mac, mac, self.ip, dst_ip, sport or 40000 + flow % 20000, dport)
        port = self.port

        def one(seq: int) -> bool:
            port.send(b.build(flow_payload(flow, seq, size)))
            return True

        sent, errors, elapsed = pace(count, rate, one)
        return SendReport(flow, sent, errors, elapsed)

    def start_udp_flow(self, *args: Any, **kw: Any) -> tuple[threading.Thread, list[SendReport]]:
        """``udp_flow`` on a thread; the report is appended to the returned list when it ends."""
        out: list[SendReport] = []
        t = threading.Thread(target=lambda: out.append(self.udp_flow(*args, **kw)), daemon=True)
        t.start()
        return t, out

    def close(self) -> None:
        """Detach from the switch and stop the worker thread."""
        if self._closed:
            return
        self._closed = True
        self.switch.remove_port(self.port)
        with contextlib.suppress(queue.Full):
            self._q.put(None, timeout=1)
        self._thread.join(5)

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Responder(Endpoint):
    """The default topology's "host" at 192.0.2.1 / RESPONDER_MAC: ARP, ping, UDP echo (port 7), flow sink."""

    def __init__(self, switch: Switch, name: str = "responder", *, mac: str = RESPONDER_MAC,
                 ip: str = RESPONDER_IP, **kw: Any) -> None:
        super().__init__(switch, name, mac=mac, ip=ip, **kw)


# --------------------------------------------------------------------------------------------------
# Matching pcaps and flow predicates


def flow_match(flow: int, seqs: Iterable[int] | None = None) -> Callable[[bytes], bool]:
    """A hook predicate: frames carrying a datagram of ``flow`` (with a sequence number in ``seqs``)."""
    wanted = None if seqs is None else frozenset(seqs)

    def match(frame: bytes) -> bool:
        u = parse_udp(frame)
        p = parse_flow_payload(u.payload) if u else None
        return p is not None and p[0] == flow and (wanted is None or p[1] in wanted)

    return match


def pcap_flow_seqs(path: str | Path, flow: int, *, dst_ip: str | None = None) -> list[int]:
    """Sequence numbers of ``flow`` in a pcap, in capture order (optionally only datagrams to ``dst_ip``)."""
    out = []
    for _ts, frame in read_pcap(path):
        u = parse_udp(frame)
        if u is None or (dst_ip is not None and u.dst_ip != dst_ip):
            continue
        p = parse_flow_payload(u.payload)
        if p is not None and p[0] == flow:
            out.append(p[1])
    return out


# --------------------------------------------------------------------------------------------------
# Flows with a guest: its /usr/bin/hvlab-udp driven through the agent, the responder on the host side

GUEST_TOOL = "/usr/bin/hvlab-udp"


def tool_report(stdout: str) -> dict[str, Any]:
    """The JSON line hvlab-udp (or ``python3 -m hvlab.net.traffic``) printed last."""
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise ValueError(f"no JSON report in hvlab-udp output: {stdout[-200:]!r}")
    return json.loads(lines[-1])


def guest_to_host(run: Callable[..., Any], endpoint: Endpoint, *, count: int, rate: float, flow: int,
                  size: int = 64, port: int = 9000, timeout: float | None = None, idle: float = 0.5,
                  tool: str = GUEST_TOOL) -> tuple[dict[str, Any], FlowStats]:
    """The guest sends a flow to ``endpoint`` (the responder) with hvlab-udp; ``run`` is ``GuestVM.run``.

    Returns the guest's send report and what the endpoint counted (lost is against ``count``)."""
    check_test_address(endpoint.ip)
    limit = timeout or count / max(rate, 1) + 30
    r = run(f"{tool} send -d {endpoint.ip} -p {int(port)} -n {int(count)} -r {rate:g} -f {int(flow)} "
            f"-s {int(size)}", timeout=limit)
    sent = tool_report(r.stdout)
    endpoint.flows.wait_quiet(flow, idle, 10)  # until nothing more arrives (late or duplicated datagrams)
    return sent, endpoint.flows.stats(flow, expected=count)


def host_to_guest(run: Callable[..., Any], endpoint: Endpoint, guest_ip: str, *, count: int, rate: float,
                  flow: int, size: int = 64, port: int = 9000, settle: float = 2.0, timeout: float | None = None,
                  tool: str = GUEST_TOOL) -> tuple[SendReport, dict[str, Any]]:
    """``endpoint`` sends a flow to hvlab-udp receiving in the guest; returns the send report and the
    guest's per-flow counts (lost against ``count``).

    The receiver is started in the background, and the flow only once its socket is bound. It ends by
    itself when all ``count`` datagrams arrived. Otherwise it is stopped with SIGTERM ``settle`` seconds
    after the host sent the last one, and still reports what it counted. A slow sender (Python inside L1)
    therefore never cuts the measurement short."""
    check_test_address(guest_ip)
    limit = timeout or count / max(rate, 1) * 4 + 60
    base = f"/tmp/hvlab-udp.{int(flow)}"
    start = (f"rm -f {base}.json {base}.err {base}.pid; "
             f"{tool} recv -p {int(port)} -n {int(count)} -t {limit:g} <"
             f"/dev/null >{base}.json 2>{base}.err & echo $! > {base}.pid; "
             f"n=0; until grep -q listening {base}.err 2>/dev/null; do n=$((n+1)); "
             f"[ $n -gt 200 ] && {{ cat {base}.err >&2; exit 1; }}; sleep 0.05; done")
    r = run(start, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"hvlab-udp recv did not start in the guest: {r.stderr.strip()}")
    rep = endpoint.udp_flow(guest_ip, port, count=count, rate=rate, flow=flow, size=size)
    finish = (f"n=0; until [ -s {base}.json ]; do n=$((n+1)); "
              f"[ $n -eq {max(1, int(settle * 10))} ] && kill -TERM $(cat {base}.pid) 2>/dev/null; "
              f"[ $n -gt {int(settle * 10) + 100} ] && exit 1; sleep 0.1; done; cat {base}.json")
    r = run(finish, timeout=settle + 30)
    got = tool_report(r.stdout)
    flows = {f["flow"]: f for f in got.get("flows", [])}
    empty = {"flow": flow, "received": 0, "unique": 0, "duplicates": 0, "reordered": 0, "lost": count,
             "expected": count, "max_seq": -1}
    return rep, flows.get(flow, empty)


# --------------------------------------------------------------------------------------------------
# Real sockets: the same flows between namespaces, loopback, or the guest tool


def socket_send(dst_ip: str, dport: int, *, count: int, rate: float, flow: int = 1, size: int = 64,
                sport: int = 0, bind_ip: str = "", tcp: bool = False) -> SendReport:
    """Send a flow over a real UDP socket (send errors such as ENOBUFS are counted, not raised), or over one
    TCP connection with ``tcp`` (each record preceded by its u32 length; a broken stream loses the rest)."""
    check_test_address(dst_ip)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as s:
        s.bind((bind_ip, sport))
        if tcp:
            s.connect((dst_ip, dport))
        broken = False

        def one(seq: int) -> bool:
            nonlocal broken
            if broken:
                return False
            payload = flow_payload(flow, seq, size)
            try:
                if tcp:
                    s.sendall(struct.pack("!I", len(payload)) + payload)
                else:
                    s.sendto(payload, (dst_ip, dport))
                return True
            except OSError:
                broken = tcp
                return False

        sent, errors, elapsed = pace(count, rate, one)
        if tcp:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
    return SendReport(flow, sent, errors, elapsed)


def socket_receive(port: int, *, duration: float, expect: int | None = None, idle: float = 0.0,
                   bind_ip: str = "", tcp: bool = False,
                   ready: threading.Event | None = None) -> tuple[FlowReceiver, int]:
    """Receive a flow on a UDP socket (or the first TCP connection, with ``tcp``) for up to ``duration`` s,
    until ``expect`` distinct records (over all flows) arrived, ``idle`` s after the last one (0: no idle
    limit), the TCP peer closed, or SIGTERM (when called from the main thread). Returns the receiver and
    the total record count."""
    rx = FlowReceiver()
    total = 0
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():  # SIGTERM ends the run with a report
        import signal

        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((bind_ip, port))
        if tcp:
            s.listen(1)
        if ready is not None:
            ready.set()
        conn: socket.socket | None = None if tcp else s
        buf = b""
        end = time.monotonic() + duration
        last = 0.0
        try:
            while (left := end - time.monotonic()) > 0 and not stop.is_set():
                if expect is not None and rx.unique_total() >= expect:
                    break
                if idle > 0 and total and time.monotonic() - last >= idle:
                    break
                sock = conn if conn is not None else s
                sock.settimeout(min(left, 0.05 if idle else 0.2))
                try:
                    if conn is None:
                        conn, _ = s.accept()
                        continue
                    data = conn.recv(1 << 20)
                except TimeoutError:
                    continue
                last = time.monotonic()
                if not tcp:
                    total += 1
                    rx.feed(data)
                    continue
                if not data:
                    break  # the sender closed the stream
                buf += data
                off = 0
                while len(buf) - off >= 4:
                    n = struct.unpack_from("!I", buf, off)[0]
                    if len(buf) - off < 4 + n:
                        break
                    total += 1
                    rx.feed(buf[off + 4: off + 4 + n])
                    off += 4 + n
                buf = buf[off:]
        finally:
            if tcp and conn is not None:
                conn.close()
    return rx, total


def recv_report(rx: FlowReceiver, total: int, port: int, expect: int | None) -> dict[str, Any]:
    """The JSON the receivers print (identical keys from hvlab-udp)."""
    flows = [rx.stats(f, expect).to_dict() for f in rx.flows()]
    return {"mode": "recv", "port": port, "datagrams": total, "invalid": rx.invalid, "flows": flows}


def main(argv: list[str] | None = None) -> int:
    """``python3 -m hvlab.net.traffic send|recv``: the same options and JSON as the guest's hvlab-udp."""
    ap = argparse.ArgumentParser(prog="python3 -m hvlab.net.traffic",
                                 description="Sequenced UDP flows (the host twin of the guest's hvlab-udp).")
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("send", help="send COUNT datagrams at RATE pps to IP:PORT")
    s.add_argument("-d", "--dest", required=True)
    s.add_argument("-p", "--port", type=int, required=True)
    s.add_argument("-n", "--count", type=int, default=1000)
    s.add_argument("-r", "--rate", type=float, default=1000.0)
    s.add_argument("-s", "--size", type=int, default=64)
    s.add_argument("-f", "--flow", type=int, default=1)
    s.add_argument("-b", "--bind-port", type=int, default=0)
    s.add_argument("-T", "--tcp", action="store_true", help="one TCP connection, length-prefixed records")
    r = sub.add_parser("recv", help="receive on PORT for SECONDS, print counts")
    r.add_argument("-p", "--port", type=int, required=True)
    r.add_argument("-t", "--time", type=float, default=5.0)
    r.add_argument("-n", "--count", type=int, default=None, help="stop after COUNT distinct datagrams; "
                   "also the expected count per flow for 'lost'")
    r.add_argument("-i", "--idle", type=float, default=0.0, help="stop IDLE seconds after the last datagram")
    r.add_argument("-B", "--bind", default="")
    r.add_argument("-T", "--tcp", action="store_true", help="accept one TCP connection")
    a = ap.parse_args(argv)
    if a.mode == "send":
        check_test_address(a.dest)
        rep = socket_send(a.dest, a.port, count=a.count, rate=a.rate, flow=a.flow, size=a.size,
                          sport=a.bind_port, tcp=a.tcp)
        print(json.dumps(rep.to_dict()))
        return 0 if rep.errors == 0 else 1
    rx, total = socket_receive(a.port, duration=a.time, expect=a.count, idle=a.idle, bind_ip=a.bind, tcp=a.tcp)
    print(json.dumps(recv_report(rx, total, a.port, a.count)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

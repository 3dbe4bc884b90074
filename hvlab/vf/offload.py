"""Transmit offloads a NIC performs for the guest: checksum insertion, TCP segmentation, VLAN tag insertion.

Linux's vmxnet3 driver always advertises HW_CSUM, TSO and VLAN TX, so a device that ignores them would
send frames with unfinished checksums or 64 KiB "frames". These helpers work on plain Ethernet frames
and never raise on malformed input: they return None and the caller reports a violation.
"""

from __future__ import annotations

import struct

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
IPPROTO_TCP = 6


def csum_add(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """One's-complement sum of ``data`` (16-bit big-endian words) folded to 16 bits, added to ``start``."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def insert_checksum(frame: bytearray, start: int, field: int) -> bool:
    """CHECKSUM_PARTIAL completion: the 16-bit field at byte ``field`` of the frame holds the pseudo-header
    sum already; sum from ``start`` to the end and store the complement there. False when out of range."""
    if start >= len(frame) or field < start or field + 2 > len(frame):
        return False
    frame[field:field + 2] = struct.pack("!H", ~csum_add(frame[start:]) & 0xFFFF)
    return True


def insert_vlan(frame: bytes, tci: int) -> bytes:
    """Insert an 802.1Q tag after the MAC addresses."""
    return frame[:12] + struct.pack("!HH", ETH_P_8021Q, tci) + frame[12:]


def _l3(frame: bytes) -> tuple[int, int] | None:
    """(ethertype, offset of the L3 header), looking through one VLAN tag."""
    if len(frame) < 14:
        return None
    etype = struct.unpack_from("!H", frame, 12)[0]
    off = 14
    if etype == ETH_P_8021Q:
        if len(frame) < 18:
            return None
        etype = struct.unpack_from("!H", frame, 16)[0]
        off = 18
    return etype, off


def tso_segments(frame: bytes, hlen: int, mss: int) -> list[bytes] | None:
    """Cut a TSO super-frame (headers of ``hlen`` bytes, TCP over IPv4/IPv6) into MSS-sized frames with
    correct lengths, IDs, sequence numbers, flags and checksums. None if the headers do not parse."""
    l3 = _l3(frame)
    if l3 is None or mss <= 0 or hlen >= len(frame) or hlen > len(frame):
        return None
    etype, ip_off = l3
    if etype == ETH_P_IP:
        if len(frame) < ip_off + 20:
            return None
        ihl = (frame[ip_off] & 0xF) * 4
        if frame[ip_off + 9] != IPPROTO_TCP:
            return None
        tcp_off = ip_off + ihl
    elif etype == ETH_P_IPV6:
        if len(frame) < ip_off + 40 or frame[ip_off + 6] != IPPROTO_TCP:
            return None  # extension headers are not offloaded by Linux's vmxnet3 TSO path
        tcp_off = ip_off + 40
    else:
        return None
    if tcp_off + 20 > hlen:
        return None
    header = frame[:hlen]
    payload = frame[hlen:]
    seq0 = struct.unpack_from("!I", frame, tcp_off + 4)[0]
    flags0 = frame[tcp_off + 13]
    out = []
    n = (len(payload) + mss - 1) // mss
    for i in range(n):
        chunk = payload[i * mss:(i + 1) * mss]
        seg = bytearray(header + chunk)
        flags = flags0
        if i:
            flags &= ~0x80  # CWR only on the first segment
        if i != n - 1:
            flags &= ~0x09  # FIN, PSH only on the last
        seg[tcp_off + 13] = flags
        struct.pack_into("!I", seg, tcp_off + 4, (seq0 + i * mss) & 0xFFFFFFFF)
        tcp_len = len(seg) - tcp_off
        if etype == ETH_P_IP:
            struct.pack_into("!H", seg, ip_off + 2, len(seg) - ip_off)
            ident = struct.unpack_from("!H", frame, ip_off + 4)[0]
            struct.pack_into("!H", seg, ip_off + 4, (ident + i) & 0xFFFF)
            struct.pack_into("!H", seg, ip_off + 10, 0)
            struct.pack_into("!H", seg, ip_off + 10, ~csum_add(seg[ip_off:tcp_off]) & 0xFFFF)
            pseudo = bytes(seg[ip_off + 12:ip_off + 20]) + struct.pack("!BBH", 0, IPPROTO_TCP, tcp_len)
        else:
            struct.pack_into("!H", seg, ip_off + 4, len(seg) - ip_off - 40)
            pseudo = bytes(seg[ip_off + 8:ip_off + 40]) + struct.pack("!IxxxB", tcp_len, IPPROTO_TCP)
        struct.pack_into("!H", seg, tcp_off + 16, 0)
        struct.pack_into("!H", seg, tcp_off + 16, ~csum_add(seg[tcp_off:], csum_add(pseudo)) & 0xFFFF)
        out.append(bytes(seg))
    return out

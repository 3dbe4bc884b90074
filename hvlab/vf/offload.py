"""Transmit offloads a NIC performs for the guest: checksum insertion, TCP segmentation, VLAN tag insertion.

Linux's vmxnet3 driver always advertises HW_CSUM, TSO and VLAN TX, so a device that ignores them would
send frames with unfinished checksums or 64 KiB "frames". These helpers work on plain Ethernet frames
and never raise on malformed input: they return None and the caller reports a violation.
"""

from __future__ import annotations

import struct

from hvlab.net.frames import ETH_P_IP, ETH_P_IPV6, inet_checksum, l3_header, ones_sum

IPPROTO_TCP = 6


def insert_checksum(frame: bytearray, start: int, field: int) -> bool:
    """CHECKSUM_PARTIAL completion: the 16-bit field at byte ``field`` of the frame holds the pseudo-header
    sum already; sum from ``start`` to the end and store the complement there. False when out of range."""
    if start >= len(frame) or field < start or field + 2 > len(frame):
        return False
    frame[field:field + 2] = struct.pack("!H", inet_checksum(frame[start:]))
    return True


def tso_segments(frame: bytes, hlen: int, mss: int) -> list[bytes] | None:
    """Cut a TSO super-frame (headers of ``hlen`` bytes, TCP over IPv4/IPv6) into MSS-sized frames with
    correct lengths, IDs, sequence numbers, flags and checksums. None if the headers do not parse."""
    l3 = l3_header(frame)
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
            struct.pack_into("!H", seg, ip_off + 10, inet_checksum(seg[ip_off:tcp_off]))
            pseudo = bytes(seg[ip_off + 12:ip_off + 20]) + struct.pack("!BBH", 0, IPPROTO_TCP, tcp_len)
        else:
            struct.pack_into("!H", seg, ip_off + 4, len(seg) - ip_off - 40)
            pseudo = bytes(seg[ip_off + 8:ip_off + 40]) + struct.pack("!IxxxB", tcp_len, IPPROTO_TCP)
        struct.pack_into("!H", seg, tcp_off + 16, 0)
        struct.pack_into("!H", seg, tcp_off + 16, inet_checksum(seg[tcp_off:], ones_sum(pseudo)))
        out.append(bytes(seg))
    return out

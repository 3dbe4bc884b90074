"""Ethernet/IP frame arithmetic shared by everything that builds or finishes frames: the Internet
checksum (RFC 1071), 802.1Q tag insertion and finding the L3 header.

The traffic builders, netvsp's transmit offloads and the vmxnet3 model's checksum/TSO offloads all
need the same few operations on the per-packet path, so they live here once, in their fastest form.
"""

from __future__ import annotations

import struct

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100

Buffer = bytes | bytearray | memoryview


def ones_sum(data: Buffer, start: int = 0) -> int:
    """The folded 16-bit ones'-complement sum of ``data`` (big-endian words, odd length zero-padded)
    plus ``start`` (an earlier sum, e.g. a pseudo-header's); 0 only when everything is zero.

    Fast in pure Python: 2**16 == 1 (mod 0xffff), so the sum of the words equals the whole buffer read
    as one big integer, modulo 0xffff, and one int.from_bytes replaces the word loop."""
    total = int.from_bytes(data, "big") + start if len(data) % 2 == 0 else \
        int.from_bytes(bytes(data) + b"\0", "big") + start
    if total == 0:
        return 0
    return total % 0xFFFF or 0xFFFF


def inet_checksum(data: Buffer, start: int = 0) -> int:
    """The checksum field to store big-endian: the complement of ``ones_sum(data, start)``."""
    return ~ones_sum(data, start) & 0xFFFF


def insert_vlan(frame: bytes, tci: int) -> bytes:
    """Insert an 802.1Q tag (TPID 0x8100, ``tci``) after the MAC addresses."""
    return frame[:12] + struct.pack("!HH", ETH_P_8021Q, tci) + frame[12:]


def l3_header(frame: Buffer) -> tuple[int, int] | None:
    """(ethertype, offset of the L3 header), looking through one VLAN tag; None for a short frame."""
    if len(frame) < 14:
        return None
    etype = struct.unpack_from("!H", frame, 12)[0]
    if etype != ETH_P_8021Q:
        return etype, 14
    if len(frame) < 18:
        return None
    return struct.unpack_from("!H", frame, 16)[0], 18

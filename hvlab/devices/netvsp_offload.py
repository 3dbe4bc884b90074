"""Transmit offloads the synthetic NIC finishes on the host side (only when the device advertises them).

With ``NetvspDevice(offloads=True)`` the guest leaves two jobs to the host (spec §3.6.3/§3.6.4):
* **checksum** (TCPIP_CHKSUM PPI): the TCP/UDP checksum field holds only the pseudo-header sum; the host
  computes the real checksum before the frame leaves;
* **LSO** (TCP_LARGESEND PPI): one TCP segment up to 64 KiB with IPv4 tot_len = 0 (netvsc_xmit zeroes it)
  and a pseudo-header checksum. Hyper-V would cut it into MSS-sized segments; this host forwards it as
  one big frame (the brief's choice) but makes it a *valid* frame: IP lengths, IPv4 header checksum and
  the TCP checksum are filled in, so a receiver on the switch can parse it.
The L4 offset comes from the guest's PPI and is checked against the frame (guest input): a frame the host
cannot make sense of is forwarded unchanged and counted by the caller.
"""

from __future__ import annotations

import struct

from hvlab.net.frames import inet_checksum, l3_header, ones_sum
from hvlab.protocol import rndis

IPPROTO_TCP = 6
IPPROTO_UDP = 17


def _pseudo_sum(frame: bytearray, l3: int, ipv6: bool, proto: int, l4_len: int) -> int:
    if ipv6:
        return ones_sum(bytes(frame[l3 + 8 : l3 + 40]) + struct.pack(">IxxxB", l4_len, proto))
    return ones_sum(bytes(frame[l3 + 12 : l3 + 20]) + struct.pack(">xBH", proto, l4_len))


def _fill_l4(frame: bytearray, l3: int, l4: int, end: int, ipv6: bool, proto: int) -> None:
    csum_at = l4 + (16 if proto == IPPROTO_TCP else 6)
    if csum_at + 2 > end:
        raise ValueError("L4 header truncated")
    frame[csum_at : csum_at + 2] = b"\0\0"
    value = inet_checksum(frame[l4:end], _pseudo_sum(frame, l3, ipv6, proto, end - l4))
    if proto == IPPROTO_UDP and value == 0:
        value = 0xFFFF
    frame[csum_at : csum_at + 2] = struct.pack(">H", value)


def finish_offloads(frame: bytes, info: rndis.PacketInfo) -> tuple[bytes, str | None]:
    """Apply the checksum / LSO work a frame's PPIs ask for. Returns (frame, what was done or None);
    ValueError when the PPIs do not match the frame (the caller forwards it unchanged)."""
    lso = info.u32(rndis.PpiType.TCP_LARGESEND)
    csum = info.u32(rndis.PpiType.TCPIP_CHKSUM)
    if not lso and not csum:
        return frame, None
    out = bytearray(frame)
    header = l3_header(out)
    if header is None:
        raise ValueError(f"a {len(out)}-byte frame has no L3 header")
    l3 = header[1]
    if lso:
        _mss, l4, ipv6 = rndis.parse_lso(lso)
        proto = IPPROTO_TCP
    else:
        assert csum is not None
        ipv6 = bool(csum & rndis.TXCSUM_IPV6)
        if csum & rndis.TXCSUM_TCP:
            proto = IPPROTO_TCP
        elif csum & rndis.TXCSUM_UDP:
            proto = IPPROTO_UDP
        else:
            return frame, None
        l4 = (csum >> 16) & 0x3FF
    if not l3 + (40 if ipv6 else 20) <= l4 < len(out):
        raise ValueError(f"L4 offset {l4} outside the {len(out)}-byte frame")
    if lso:  # netvsc zeroed the IP length: make the big frame self-consistent
        if ipv6:
            out[l3 + 4 : l3 + 6] = struct.pack(">H", len(out) - l3 - 40)
        else:
            out[l3 + 2 : l3 + 4] = struct.pack(">H", len(out) - l3)
            ihl = (out[l3] & 0xF) * 4
            out[l3 + 10 : l3 + 12] = b"\0\0"
            out[l3 + 10 : l3 + 12] = struct.pack(">H", inet_checksum(out[l3 : l3 + ihl]))
    if ipv6:
        end = l3 + 40 + struct.unpack_from(">H", out, l3 + 4)[0]
    else:
        end = l3 + struct.unpack_from(">H", out, l3 + 2)[0]
    if end > len(out) or end <= l4:
        raise ValueError(f"IP length ends at {end}, frame is {len(out)} bytes, L4 at {l4}")
    _fill_l4(out, l3, l4, end, ipv6, proto)
    return bytes(out), "lso" if lso else "csum"

"""Transmit offloads the vmxnet3 model performs: checksum completion, TSO (IPv4/IPv6), VLAN insertion,
and refusal of frames whose headers do not parse."""

from __future__ import annotations

import struct

from hvlab.net import frames
from hvlab.vf import offload

SRC6 = bytes.fromhex("20010db8000000000000000000000002")
DST6 = bytes.fromhex("20010db8000000000000000000000001")


def eth(etype: int) -> bytes:
    return bytes.fromhex("024856000201" "00155d000202") + struct.pack("!H", etype)


def tcp_header(seq: int = 100, flags: int = 0x19) -> bytes:  # FIN|PSH|ACK
    return struct.pack("!HHIIBBHHH", 40000, 80, seq, 1, 5 << 4, flags, 65535, 0, 0)


def test_checksum_completion_matches_a_full_checksum():
    payload = bytes(range(200))
    udp = struct.pack("!HHHH", 1, 2, 8 + len(payload), 0) + payload
    frame = bytearray(eth(0x0800) + bytes(20) + udp)
    assert offload.insert_checksum(frame, 34, 40)
    assert frames.ones_sum(frame[34:]) == 0xFFFF


def test_checksum_out_of_range_is_refused():
    frame = bytearray(64)
    assert not offload.insert_checksum(frame, 34, 63)
    assert not offload.insert_checksum(frame, 70, 72)
    assert not offload.insert_checksum(frame, 40, 34)
    assert frame == bytearray(64)


def test_tso_ipv6():
    payload = bytes(range(256)) * 9  # 2304 bytes
    ip6 = struct.pack("!IHBB", 6 << 28, 0, 6, 64) + SRC6 + DST6
    frame = eth(0x86DD) + ip6 + tcp_header()
    frame += payload
    segs = offload.tso_segments(frame, 14 + 40 + 20, 1000)
    assert segs is not None and [len(s) - 74 for s in segs] == [1000, 1000, 304]
    for i, s in enumerate(segs):
        assert struct.unpack_from("!H", s, 18)[0] == len(s) - 54  # payload length
        assert struct.unpack_from("!I", s, 58)[0] == 100 + 1000 * i
        pseudo = s[22:54] + struct.pack("!IxxxB", len(s) - 54, 6)
        assert frames.ones_sum(s[54:], frames.ones_sum(pseudo)) == 0xFFFF
        assert (s[67] & 0x09 != 0) == (i == len(segs) - 1)  # FIN/PSH only on the last
    assert b"".join(s[74:] for s in segs) == payload


def test_tso_through_a_vlan_tag_and_ip_ids():
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 7, 0x4000, 64, 6, 0, bytes([192, 0, 2, 2]),
                               bytes([192, 0, 2, 1])))
    frame = eth(0x8100)[:12] + struct.pack("!HHH", 0x8100, 5, 0x0800) + bytes(ip) + tcp_header() + bytes(3000)
    segs = offload.tso_segments(frame, 18 + 20 + 20, 1448)
    assert segs is not None and len(segs) == 3
    assert [struct.unpack_from("!H", s, 22)[0] for s in segs] == [7, 8, 9]
    assert all(frames.ones_sum(s[18:38]) == 0xFFFF for s in segs)


def test_tso_refuses_what_does_not_parse():
    assert offload.tso_segments(b"short", 54, 1000) is None
    udp_ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, 17, 0, bytes(4), bytes(4))
    assert offload.tso_segments(eth(0x0800) + udp_ip + bytes(2000), 54, 1000) is None
    assert offload.tso_segments(eth(0x0806) + bytes(2000), 54, 1000) is None
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, 6, 0, bytes(4), bytes(4))
    assert offload.tso_segments(eth(0x0800) + ip + tcp_header() + bytes(100), 54, 0) is None
    assert offload.tso_segments(eth(0x0800) + ip + tcp_header(), 40, 1000) is None  # hlen inside TCP


def test_vlan_insertion():
    f = eth(0x0800) + bytes(46)
    t = frames.insert_vlan(f, 0x2005)
    assert t[12:16] == b"\x81\x00\x20\x05" and t[16:] == f[12:] and t[:12] == f[:12]

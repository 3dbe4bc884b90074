"""Ring packet descriptors (spec/HOST_CONTRACT.md §2.10), checked against hand-written bytes."""

from __future__ import annotations

import struct

import pytest

from hvlab.protocol import vmbus_packet as vp


def test_inband_layout_and_padding() -> None:
    pkt = vp.build_inband(b"abcde", trans_id=0x1122334455667788, completion_requested=True)
    # descriptor: type 6, offset8 2, len8 (16 + 5 → 24)/8 = 3, flags 1, trans_id
    assert pkt == struct.pack("<HHHHQ", 6, 2, 3, 1, 0x1122334455667788) + b"abcde\0\0\0"
    parsed = vp.parse_packet(pkt)
    assert parsed.type == vp.PacketType.DATA_INBAND
    assert parsed.completion_requested and parsed.trans_id == 0x1122334455667788
    assert parsed.payload == b"abcde\0\0\0"  # hv_pkt_datalen includes the padding
    assert parsed.total_size == 24


def test_completion_layout() -> None:
    pkt = vp.build_completion(bytes(40), trans_id=7)
    assert pkt[:16] == struct.pack("<HHHHQ", 0xB, 2, 7, 0, 7)
    assert len(pkt) == 56
    empty = vp.build_completion(b"", trans_id=42)  # SWITCH_DATA_PATH: zero-length completion
    assert empty == struct.pack("<HHHHQ", 0xB, 2, 2, 0, 42)
    assert vp.parse_packet(empty).payload == b""


def test_xfer_pages_layout() -> None:
    nvsp = struct.pack("<I", 1) + bytes(36)  # a 40-byte NVSP message
    pkt = vp.build_xfer_pages([(1514, 0), vp.XferRange(60, 1728)], nvsp, trans_id=99, xfer_pageset_id=0xCAFE)
    expected = (
        struct.pack("<HHHHQ", 7, (24 + 16) // 8, (24 + 16 + 40) // 8, 1, 99)
        + struct.pack("<HBBI", 0xCAFE, 0, 0, 2)
        + struct.pack("<II", 1514, 0)
        + struct.pack("<II", 60, 1728)
        + nvsp
    )
    assert pkt == expected
    parsed = vp.parse_packet(pkt)
    assert parsed.xfer_pageset_id == 0xCAFE and not parsed.sender_owns_set
    assert parsed.xfer_ranges == [vp.XferRange(1514, 0), vp.XferRange(60, 1728)]
    assert parsed.payload == nvsp


def test_gpa_direct_layout() -> None:
    ranges = [vp.GpaRange(100, 4000, (0x10, 0x11)), vp.GpaRange(4096, 0, (0x20,))]
    payload = b"rndis-hdr"
    pkt = vp.build_gpa_direct(ranges, payload, trans_id=3)
    ranges_bytes = struct.pack("<IIQQ", 100, 4000, 0x10, 0x11) + struct.pack("<IIQ", 4096, 0, 0x20)
    offset = 24 + len(ranges_bytes)
    assert offset % 8 == 0
    expected_head = struct.pack("<HHHHQ", 9, offset // 8, (offset + 16) // 8, 1, 3) + struct.pack("<II", 0, 2)
    assert pkt == expected_head + ranges_bytes + payload + bytes(7)
    parsed = vp.parse_packet(pkt)
    assert parsed.gpa_ranges == ranges
    assert vp.GpaRange.pfn_count(100, 4000) == 2 and vp.GpaRange.pfn_count(0, 0) == 0
    with pytest.raises(ValueError):
        vp.build_gpa_direct([vp.GpaRange(5000, 0, (1,))], b"", 1)


def test_parse_rejects_inconsistent_packets() -> None:
    good = vp.build_inband(b"12345678", 1)
    with pytest.raises(vp.PacketError) as exc:
        vp.parse_packet(good[:-8])
    assert exc.value.field == "len8"
    bad_off = bytearray(good)
    struct.pack_into("<H", bad_off, 2, 1)
    with pytest.raises(vp.PacketError) as exc:
        vp.parse_packet(bad_off)
    assert exc.value.field == "offset8"
    struct.pack_into("<H", bad_off, 2, 4)  # beyond len8 = 3
    with pytest.raises(vp.PacketError):
        vp.parse_packet(bad_off)
    with pytest.raises(vp.PacketError):
        vp.parse_packet(b"\0" * 8)

    xfer = bytearray(vp.build_xfer_pages([(1, 0)], b"", 1, 0xCAFE))
    struct.pack_into("<I", xfer, 20, 5)  # range_cnt overruns offset8
    with pytest.raises(vp.PacketError) as exc:
        vp.parse_packet(xfer)
    assert exc.value.field == "range_cnt"

    gpa = bytearray(vp.build_gpa_direct([vp.GpaRange(10, 0, (1,))], b"", 1))
    struct.pack_into("<I", gpa, 28, 4096)  # range offset must be < 4096
    with pytest.raises(vp.PacketError):
        vp.parse_packet(gpa)
    gpa2 = bytearray(vp.build_gpa_direct([vp.GpaRange(10, 0, (1,))], b"", 1))
    struct.pack_into("<I", gpa2, 24, 8192)  # len now needs 2 PFNs, only 1 present
    with pytest.raises(vp.PacketError):
        vp.parse_packet(gpa2)


def test_build_limits() -> None:
    with pytest.raises(ValueError):
        vp.build_packet(6, b"", extra_header=b"abc")
    with pytest.raises(ValueError):
        vp.build_inband(bytes(0x10000 * 8), 0)
    assert vp.align8(0) == 0 and vp.align8(1) == 8 and vp.align8(8) == 8

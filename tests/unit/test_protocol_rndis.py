"""RNDIS layouts against spec §3.6 (offsets relative to the body at byte 8) and the untrusting parsers."""

from __future__ import annotations

import struct

import pytest

from hvlab.protocol import rndis


def test_control_message_layouts() -> None:
    assert rndis.build_init(1) == struct.pack("<IIIIII", 2, 24, 1, 1, 0, 0x4000)
    init_c = rndis.build_init_c(7)
    assert len(init_c) == 52
    assert struct.unpack("<13I", init_c) == (0x80000002, 52, 7, 0, 1, 0, 1, 0, 8, 0x4000, 3, 0, 0)
    q = rndis.build_query(3, rndis.Oid.GEN_MAXIMUM_FRAME_SIZE)
    assert q == struct.pack("<7I", 4, 28, 3, 0x00010106, 0, 20, 0)
    s = rndis.build_set(4, rndis.Oid.GEN_CURRENT_PACKET_FILTER, struct.pack("<I", 0xD))
    assert s == struct.pack("<8I", 5, 32, 4, 0x0001010E, 4, 20, 0, 0xD)
    assert rndis.build_set_c(4) == struct.pack("<4I", 0x80000005, 16, 4, 0)
    assert rndis.build_halt(9) == struct.pack("<3I", 3, 12, 9)
    qc = rndis.build_query_c(3, b"\x01\x02\x03\x04\x05\x06")
    assert qc[:24] == struct.pack("<6I", 0x80000004, 30, 3, 0, 6, 16) and qc[24:] == bytes(range(1, 7))
    # "not supported": buflen 0 AND offset 0, so the guest treats it as a failed query (§3.6.1)
    assert struct.unpack("<6I", rndis.build_query_c(3, None)) == (0x80000004, 24, 3, 0xC00000BB, 0, 0)
    ind = rndis.build_indicate(rndis.STATUS_LINK_SPEED_CHANGE, struct.pack("<I", 100000))
    assert struct.unpack("<6I", ind) == (7, 24, 0x40010013, 4, 12, 100000)
    assert rndis.build_indicate(rndis.STATUS_MEDIA_CONNECT) == struct.pack("<5I", 7, 20, 0x4001000B, 0, 0)


def test_packet_layout_and_alignment() -> None:
    frame = bytes(range(60))
    msg = rndis.build_packet(frame, [rndis.ppi_u32(rndis.PpiType.IEEE_8021Q, rndis.vlan_info(100, pri=5))])
    head = struct.unpack_from("<11I", msg)
    # type, msg_len, data_offset (body-relative), data_len, oob x3, ppi_offset 36, ppi_len 16, vc, reserved
    assert head == (1, 44 + 16 + 60, 36 + 16, 60, 0, 0, 0, 36, 16, 0, 0)
    assert struct.unpack_from("<4I", msg, 44) == (16, 6, 12, (100 << 4) | 5)
    assert msg[60:] == frame
    padded = rndis.build_packet(frame, alignment=8)
    assert len(padded) % 8 == 0 and struct.unpack_from("<I", padded, 4)[0] == len(padded)
    parsed, info = rndis.parse_packet(msg)
    assert bytes(parsed) == frame and rndis.parse_vlan(info.u32(rndis.PpiType.IEEE_8021Q) or 0) == (100, 5, 0)


def test_ppi_value_bits() -> None:
    assert rndis.csum_tx(True, False, True, False, 34) == 0b0101 | 34 << 16
    assert rndis.lso_info(1448, 54, ipv6=True) == 1448 | 54 << 20 | 1 << 30 | 1 << 31
    assert rndis.parse_lso(rndis.lso_info(1448, 34, ipv6=False)) == (1448, 34, False)
    assert rndis.vlan_info(0xFFF, pri=7, cfi=1) == 0xFFFF
    assert rndis.PPI_PKTINFO_ID == 0x80000001


def test_offload_and_rss_layouts() -> None:
    off = rndis.build_offload(
        ip4_txcsum=0x54, lsov2_ip4_encap=2, lsov2_ip4_maxsz=62768, lsov2_ip6_opts=5, rsc_ip4=1, rsc_ip6=1
    )
    assert len(off) == 156 and off[:4] == bytes([0xA7, 3, 156, 0])
    assert struct.unpack_from("<I", off, 8)[0] == 0x54
    assert struct.unpack_from("<II", off, 80) == (2, 62768)
    assert struct.unpack_from("<I", off, 104)[0] == 5
    assert off[144:146] == b"\x01\x01"
    assert rndis.offload_request(0x60001)[:4] == bytes([0xA7, 3, 156, 0])
    assert (
        rndis.offload_request(0x40000)[:4] == bytes([0xA7, 2, 144, 0])
        and len(rndis.offload_request(0x40000)) == 144
    )
    assert rndis.offload_request(0x30002)[:4] == bytes([0xA7, 1, 112, 0])
    params = rndis.build_offload_params(0x60001, lso_v2_ipv4=2, rsc_ip_v6=2)
    assert len(params) == 28 and params[:4] == bytes([0x80, 3, 28, 0]) and params[4] == 1
    assert params[11] == 2 and params[23] == 2
    assert len(rndis.build_offload_params(0x40000)) == 22
    caps = rndis.build_rss_caps(4)
    assert len(caps) == 18 and caps[:4] == bytes([0x88, 2, 18, 0])
    assert struct.unpack_from("<IIIH", caps, 4) == (0, 4, 4, 128)
    table = [i % 3 for i in range(128)]
    p = rndis.build_rss_params(0x10, table, bytes(40))
    assert p[:4] == bytes([0x89, 2, 40, 0])
    assert struct.unpack_from("<HHIH", p, 4) == (0x10, 0, 0x1701, 512)
    assert struct.unpack_from("<I", p, 16)[0] == 40 and struct.unpack_from("<H", p, 20)[0] == 40
    assert struct.unpack_from("<I", p, 24)[0] == 40 + 512 and len(p) == 40 + 512 + 40
    parsed = rndis.parse_rss_params(p)
    assert parsed.table == table and parsed.flag == 0x10 and parsed.key == bytes(40)
    cfg = rndis.build_config_parameter("NetworkAddress", "00155d000102")
    assert struct.unpack_from("<5I", cfg) == (20, 28, 2, 48, 24)
    assert rndis.parse_config_parameter(cfg) == ("NetworkAddress", "00155d000102")


def test_guest_offload_acceptance_rules() -> None:
    assert rndis.guest_check_offload(rndis.build_offload()).header.size == 156
    assert rndis.guest_check_offload(rndis.build_offload(1, 112)).header.revision == 1
    for bad, field in [
        (rndis.build_offload() + b"\0", "info_buflen"),
        (bytes([0xA6, 3, 156, 0]) + bytes(152), "header.type"),
        (bytes([0xA7, 0, 156, 0]) + bytes(152), "header.revision"),
        (bytes([0xA7, 3, 100, 0]) + bytes(152), "header.size"),
        (bytes([0xA7, 3, 156, 0]) + bytes(100), "header.size"),
    ]:
        with pytest.raises(rndis.RndisError) as exc:
            rndis.guest_check_offload(bad)
        assert exc.value.field == field


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda m: m[:40], "msg_len"),
        (lambda m: m[:4] + struct.pack("<I", 30) + m[8:], "msg_len"),
        (lambda m: m[:8] + struct.pack("<I", 1000) + m[12:], "data_offset"),
        (lambda m: m[:12] + struct.pack("<I", 5000) + m[16:], "data_offset"),
        (lambda m: m[:8] + struct.pack("<I", 4) + m[12:], "data_offset"),
        (lambda m: m[:28] + struct.pack("<I", 2000) + m[32:], "per_pkt_info_offset"),
        (lambda m: m[:44] + struct.pack("<I", 100) + m[48:], "ppi.size"),
        (lambda m: m[:44] + struct.pack("<I", 8) + m[48:], "ppi.size"),
        (lambda m: m[:52] + struct.pack("<I", 16) + m[56:], "ppi.ppi_offset"),
        (lambda m: m[:52] + struct.pack("<I", 3) + m[56:], "ppi.ppi_offset"),
        (lambda m: struct.pack("<I", 2) + m[4:], "ndis_msg_type"),
    ],
)
def test_parse_packet_rejects_bad_offsets(mutate, field) -> None:  # type: ignore[no-untyped-def]
    msg = rndis.build_packet(bytes(60), [rndis.ppi_u32(0, 1)])
    with pytest.raises(rndis.RndisError) as exc:
        rndis.parse_packet(mutate(msg))
    assert exc.value.field == field


def test_split_messages_and_info_buffer() -> None:
    a = rndis.build_packet(bytes(61), alignment=8)
    b = rndis.build_packet(bytes(70))
    assert rndis.split_messages(a + b + bytes(100)) == [(0, len(a)), (len(a), len(b))]
    with pytest.raises(rndis.RndisError):
        rndis.split_messages(a[:4] + struct.pack("<I", 4) + a[8:])
    with pytest.raises(rndis.RndisError):
        rndis.split_messages(a[:4] + struct.pack("<I", 5000) + a[8:])
    with pytest.raises(rndis.RndisError):
        rndis.split_messages(bytes(4))
    q = rndis.build_query(1, 0x10203, b"abcd")
    assert rndis.info_buffer(q, rndis.parse(q)) == b"abcd"
    bad = q[:20] + struct.pack("<I", 200) + q[24:]
    with pytest.raises(rndis.RndisError) as exc:
        rndis.info_buffer(bad, rndis.parse(bad))
    assert exc.value.field == "info_buf_offset"
    with pytest.raises(rndis.RndisError):
        rndis.parse(struct.pack("<II", 4, 8))  # QUERY header without body


def test_guest_ppi_walk_detects_the_softirq_spin() -> None:
    good = rndis.ppi_u32(0, 1) + rndis.ppi_u32(8, 2)
    assert rndis.guest_ppi_walk(good) == {0: b"\1\0\0\0", 8: b"\2\0\0\0"}
    assert rndis.guest_ppi_walk(struct.pack("<3I", 40, 0, 12) + bytes(4)) is None  # size > remaining
    assert rndis.guest_ppi_walk(struct.pack("<3I", 16, 0, 16) + bytes(4)) is None  # ppi_offset >= size

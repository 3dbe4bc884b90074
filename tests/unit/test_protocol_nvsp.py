"""NVSP layouts against the byte offsets of spec §3.2 / §3.10 (hand-written bytes, not the code's own view)."""

from __future__ import annotations

import struct

import pytest

from hvlab.protocol import nvsp


def test_every_message_is_40_bytes_with_fields_at_spec_offsets() -> None:
    cases = [
        (nvsp.INIT, dict(min_protocol_ver=0x60001, max_protocol_ver=0x60001), "<III", (1, 0x60001, 0x60001)),
        (nvsp.INIT_COMPLETE, dict(negotiated_protocol_ver=0x50000, max_mdl_chain_len=34, status=1), "<IIII",
         (2, 0x50000, 34, 1)),
        (nvsp.SEND_NDIS_VER, dict(ndis_major_ver=6, ndis_minor_ver=30), "<III", (100, 6, 30)),
        (nvsp.SEND_RECV_BUF, dict(gpadl_handle=0xE1E11, id=0xCAFE), "<IIH", (101, 0xE1E11, 0xCAFE)),
        (nvsp.REVOKE_RECV_BUF, dict(id=0xCAFE), "<IH", (103, 0xCAFE)),
        (nvsp.SEND_SEND_BUF, dict(gpadl_handle=7, id=0), "<IIH", (104, 7, 0)),
        (nvsp.SEND_SEND_BUF_COMPLETE, dict(status=1, section_size=6144), "<III", (105, 1, 6144)),
        (nvsp.REVOKE_SEND_BUF, dict(id=0), "<IH", (106, 0)),
        (nvsp.SEND_RNDIS_PKT, dict(channel_type=1, send_buf_section_index=0xFFFFFFFF, send_buf_section_size=0),
         "<IIII", (107, 1, 0xFFFFFFFF, 0)),
        (nvsp.SEND_RNDIS_PKT_COMPLETE, dict(status=1), "<II", (108, 1)),
        (nvsp.SEND_NDIS_CONFIG, dict(mtu=1514, capability=0xAC), "<IIIQ", (125, 1514, 0, 0xAC)),
        (nvsp.SEND_VF_ASSOCIATION, dict(allocated=1, serial=0x1234), "<III", (128, 1, 0x1234)),
        (nvsp.SWITCH_DATA_PATH, dict(active_datapath=1), "<II", (129, 1)),
        (nvsp.SUBCHANNEL_REQUEST, dict(op=1, num_subchannels=7), "<III", (133, 1, 7)),
        (nvsp.SUBCHANNEL_COMPLETE, dict(status=1, num_subchannels=3), "<III", (133, 1, 3)),
        (nvsp.SEND_INDIRECTION_TABLE, dict(count=16, offset=12), "<III", (134, 16, 12)),
    ]  # fmt: skip
    for struct_, fields, fmt, expected in cases:
        raw = nvsp.build(struct_, **fields)
        assert len(raw) == nvsp.NVSP_MESSAGE_SIZE
        assert struct.unpack_from(fmt, raw) == expected, struct_
        assert raw[struct.calcsize(fmt) :] == bytes(40 - struct.calcsize(fmt))


def test_recv_buf_complete_layout_is_28_bytes_of_content() -> None:
    raw = nvsp.build(
        nvsp.SEND_RECV_BUF_COMPLETE,
        status=1,
        num_sections=1,
        section=dict(offset=0, sub_alloc_size=1728, num_sub_allocs=9709, end_offset=1728 * 9709),
    )
    assert struct.unpack_from("<IIIIIII", raw) == (102, 1, 1, 0, 1728, 9709, 1728 * 9709)
    assert nvsp.min_size(nvsp.SEND_RECV_BUF_COMPLETE) == 28 == nvsp.GUEST_MIN_COMPLETION["6.12"][102]


def test_guest_constants() -> None:
    assert [int(v) for v in nvsp.GUEST_VERSIONS] == [0x60001, 0x60000, 0x50000, 0x40000, 0x30002, 0x2]
    assert [nvsp.guest_capability(v) for v in (0x30002, 0x40000, 0x50000, 0x60000, 0x60001)] == [
        0x08, 0x08, 0x2C, 0x2C, 0xAC,
    ]  # fmt: skip
    assert nvsp.guest_ndis_version(0x40000) == (6, 1) and nvsp.guest_ndis_version(0x50000) == (6, 30)
    assert nvsp.GUEST_MIN_COMPLETION["6.1"][nvsp.MsgType.INIT_COMPLETE] == 28
    assert nvsp.GUEST_MIN_COMPLETION["7.3"][nvsp.MsgType.INIT_COMPLETE] == 16


def test_parse_checks_type_and_length() -> None:
    msg = nvsp.parse(nvsp.build(nvsp.SEND_RECV_BUF, gpadl_handle=5, id=0xCAFE))
    assert (msg.gpadl_handle, msg.id) == (5, 0xCAFE)
    with pytest.raises(nvsp.NvspError) as exc:
        nvsp.parse(b"\x65\x00")
    assert exc.value.field == "msg_type"
    with pytest.raises(nvsp.NvspError) as exc:
        nvsp.parse(struct.pack("<II", 101, 5))  # gpadl but no id
    assert exc.value.field == "length"
    with pytest.raises(nvsp.NvspError) as exc:
        nvsp.parse(struct.pack("<I", 2) + bytes(36))  # INIT_COMPLETE is host -> guest
    assert exc.value.field == "msg_type"
    assert (
        nvsp.parse(
            nvsp.build(nvsp.SUBCHANNEL_COMPLETE, status=1, num_subchannels=2), nvsp.HOST_TO_GUEST
        ).status
        == 1
    )


def test_fast_paths_match_construct() -> None:
    fast, names = nvsp.flat_struct(nvsp.SEND_RNDIS_PKT)
    assert names == ("msg_type", "channel_type", "send_buf_section_index", "send_buf_section_size")
    assert nvsp.rndis_pkt(0, 3, 100) == nvsp.build(
        nvsp.SEND_RNDIS_PKT, channel_type=0, send_buf_section_index=3, send_buf_section_size=100
    )
    assert nvsp.rndis_pkt_complete(2, size=8) == struct.pack("<II", 108, 2)
    assert nvsp.rndis_pkt_complete() == nvsp.build(nvsp.SEND_RNDIS_PKT_COMPLETE, status=1)
    assert nvsp.flat_struct(nvsp.SEND_NDIS_CONFIG)[0].size == 20
    with pytest.raises(TypeError):
        nvsp.flat_struct(nvsp.SEND_RECV_BUF_COMPLETE)  # nested struct: not flat

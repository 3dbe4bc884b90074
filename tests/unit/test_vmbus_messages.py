"""Byte-exact VMBus channel message layouts against spec/HOST_CONTRACT.md §2.5 offset tables.

Each expected buffer is written by hand (struct.pack_into at the spec's offsets), compared with
build_message(), then parsed back.
"""

from __future__ import annotations

import struct
import uuid

import pytest

from hvlab.protocol import vmbus as vm
from hvlab.protocol.vmbus import MsgType

INSTANCE = uuid.UUID("12345678-9abc-def0-1122-334455667788")


def hand(size: int, msgtype: int, *fields: tuple[int, str, object]) -> bytes:
    """A message of ``size`` bytes: header with msgtype, then (offset, struct format, value) fields."""
    buf = bytearray(size)
    struct.pack_into("<II", buf, 0, msgtype, 0)
    for offset, fmt, value in fields:
        if fmt == "raw":
            assert isinstance(value, bytes | bytearray)
            buf[offset : offset + len(value)] = value
        else:
            struct.pack_into("<" + fmt, buf, offset, value)
    return bytes(buf)


def roundtrip(msgtype: MsgType, expected: bytes, **fields: object) -> object:
    built = vm.build_message(msgtype, **fields)
    assert built == expected, f"{msgtype.name}: {built.hex()} != {expected.hex()}"
    parsed = vm.parse_message(expected)
    assert parsed.msgtype is msgtype
    for key, value in fields.items():
        assert parsed[key] == value, key
    return parsed


def test_guid_mixed_endian() -> None:
    raw = vm.guid_from_str("f8615163-df3e-46c5-913f-f2d2f965ed0e")
    assert raw == bytes.fromhex("635161f83edfc546913ff2d2f965ed0e")
    assert vm.guid_to_str(raw) == "f8615163-df3e-46c5-913f-f2d2f965ed0e"
    assert vm.guid_from_bytes(raw) == vm.ClassGuid.NETVSC
    assert vm.to_uuid("{44C4F61D-4444-4400-9D52-802E27EDE19F}") == vm.ClassGuid.VPCI
    # hyperv.h writes the vPCI GUID as bytes 1d f6 c4 44 44 44 00 44 9d 52 ...
    assert vm.guid_to_bytes(vm.ClassGuid.VPCI)[:8] == bytes([0x1D, 0xF6, 0xC4, 0x44, 0x44, 0x44, 0x00, 0x44])
    assert vm.CLASS_GUID_NAMES[vm.ClassGuid.HEARTBEAT] == "heartbeat"
    with pytest.raises(vm.MessageError):
        vm.to_uuid(b"short")


def test_header_size_and_catalogue_sizes() -> None:
    assert vm.HEADER_SIZE == 8
    expected = {
        MsgType.OFFERCHANNEL: 196,
        MsgType.RESCIND_CHANNELOFFER: 12,
        MsgType.REQUESTOFFERS: 8,
        MsgType.ALLOFFERS_DELIVERED: 8,
        MsgType.OPENCHANNEL: 148,
        MsgType.OPENCHANNEL_RESULT: 20,
        MsgType.CLOSECHANNEL: 12,
        MsgType.GPADL_HEADER: 28,
        MsgType.GPADL_BODY: 16,
        MsgType.GPADL_CREATED: 20,
        MsgType.GPADL_TEARDOWN: 16,
        MsgType.GPADL_TORNDOWN: 12,
        MsgType.RELID_RELEASED: 12,
        MsgType.INITIATE_CONTACT: 40,
        MsgType.VERSION_RESPONSE: 16,
        MsgType.UNLOAD: 8,
        MsgType.UNLOAD_RESPONSE: 8,
        MsgType.TL_CONNECT_REQUEST: 40,
        MsgType.MODIFYCHANNEL: 16,
        MsgType.MODIFYCHANNEL_RESPONSE: 16,
    }
    assert expected == vm.MESSAGE_SIZE
    for t, minimum in vm.GUEST_MIN_PAYLOAD.items():
        assert vm.DIRECTION[t] is vm.Direction.H2G
        assert minimum in (0, vm.MESSAGE_SIZE[t])


def test_offerchannel() -> None:
    user_def = bytes(range(120))
    expected = hand(
        196,
        1,
        (8, "raw", vm.ClassGuid.NETVSC.bytes_le),
        (24, "raw", INSTANCE.bytes_le),
        (56, "H", 0x2000),
        (58, "H", 7),
        (60, "raw", user_def),
        (180, "H", 3),
        (184, "I", 0x7FF),
        (188, "B", 0x21),
        (189, "B", 1),
        (190, "H", 1),
        (192, "I", 0x10007),
    )
    roundtrip(
        MsgType.OFFERCHANNEL,
        expected,
        if_type=vm.ClassGuid.NETVSC,
        if_instance=INSTANCE,
        chn_flags=0x2000,
        mmio_megabytes=7,
        user_def=user_def,
        sub_channel_index=3,
        child_relid=0x7FF,
        monitorid=0x21,
        monitor_allocated=True,
        is_dedicated_interrupt=True,
        connection_id=0x10007,
    )
    # Defaults: everything reserved is zero; GUIDs may be given as strings.
    minimal = vm.build_message(
        MsgType.OFFERCHANNEL,
        if_type=str(vm.ClassGuid.VPCI),
        if_instance=INSTANCE,
        child_relid=2,
        connection_id=2,
    )
    assert minimal == hand(
        196,
        1,
        (8, "raw", vm.ClassGuid.VPCI.bytes_le),
        (24, "raw", INSTANCE.bytes_le),
        (184, "I", 2),
        (192, "I", 2),
    )
    parsed = vm.parse_message(minimal)
    assert parsed.monitor_allocated is False and parsed.is_dedicated_interrupt is False


@pytest.mark.parametrize(
    "msgtype",
    [MsgType.RESCIND_CHANNELOFFER, MsgType.RELID_RELEASED, MsgType.CLOSECHANNEL],
)
def test_relid_only_messages(msgtype: MsgType) -> None:
    roundtrip(msgtype, hand(12, int(msgtype), (8, "I", 0x1234)), child_relid=0x1234)


@pytest.mark.parametrize(
    "msgtype",
    [MsgType.REQUESTOFFERS, MsgType.ALLOFFERS_DELIVERED, MsgType.UNLOAD, MsgType.UNLOAD_RESPONSE],
)
def test_header_only_messages(msgtype: MsgType) -> None:
    roundtrip(msgtype, struct.pack("<II", int(msgtype), 0))


def test_openchannel() -> None:
    userdata = b"\xaa" * 120
    expected = hand(
        148,
        5,
        (8, "I", 9),
        (12, "I", 9),
        (16, "I", 0xE1E10),
        (20, "I", 3),
        (24, "I", 128),
        (28, "raw", userdata),
    )
    roundtrip(
        MsgType.OPENCHANNEL,
        expected,
        child_relid=9,
        openid=9,
        ringbuffer_gpadlhandle=0xE1E10,
        target_vp=3,
        downstream_ringbuffer_pageoffset=128,
        userdata=userdata,
    )


def test_openchannel_result() -> None:
    roundtrip(
        MsgType.OPENCHANNEL_RESULT,
        hand(20, 6, (8, "I", 9), (12, "I", 10), (16, "I", 0xC0000001)),
        child_relid=9,
        openid=10,
        status=0xC0000001,
    )


def test_gpadl_header_and_body() -> None:
    pfns = [0x1000 + i for i in range(3)]
    expected = hand(
        28 + 24,
        8,
        (8, "I", 4),
        (12, "I", 0xE1E11),
        (16, "H", 8 + 8 * 3),
        (18, "H", 1),
        (20, "I", 3 * 4096),
        (24, "I", 0),
        (28, "Q", pfns[0]),
        (36, "Q", pfns[1]),
        (44, "Q", pfns[2]),
    )
    roundtrip(
        MsgType.GPADL_HEADER,
        expected,
        child_relid=4,
        gpadl=0xE1E11,
        range_buflen=32,
        rangecount=1,
        byte_count=3 * 4096,
        byte_offset=0,
        pfn_array=pfns,
    )
    body = hand(16 + 16, 9, (8, "I", 0), (12, "I", 0xE1E11), (16, "Q", 7), (24, "Q", 1 << 40))
    roundtrip(MsgType.GPADL_BODY, body, msgnumber=0, gpadl=0xE1E11, pfn=[7, 1 << 40])
    with pytest.raises(vm.MessageError):
        vm.parse_message(body[:-4])  # PFN array not a multiple of 8


def test_gpadl_created_teardown_torndown() -> None:
    roundtrip(
        MsgType.GPADL_CREATED,
        hand(20, 10, (8, "I", 4), (12, "I", 0xE1E10), (16, "I", 5)),
        child_relid=4,
        gpadl=0xE1E10,
        creation_status=5,
    )
    roundtrip(
        MsgType.GPADL_TEARDOWN, hand(16, 11, (8, "I", 4), (12, "I", 0xE1E10)), child_relid=4, gpadl=0xE1E10
    )
    roundtrip(MsgType.GPADL_TORNDOWN, hand(12, 12, (8, "I", 0xE1E10)), gpadl=0xE1E10)


def test_initiate_contact_v5_fields() -> None:
    expected = hand(
        40,
        14,
        (8, "I", 0x50003),
        (12, "I", 1),
        (16, "B", 2),
        (17, "B", 0),
        (20, "I", 0x10),
        (24, "Q", 0x7000),
        (32, "Q", 0x8000),
    )
    parsed = roundtrip(
        MsgType.INITIATE_CONTACT,
        expected,
        vmbus_version_requested=0x50003,
        target_vcpu=1,
        msg_sint=2,
        msg_vtl=0,
        feature_flags=0x10,
        monitor_page1=0x7000,
        monitor_page2=0x8000,
    )
    assert parsed.interrupt_page == 0x10_0000_0002  # the < 5.0 view of the same 8 bytes


def test_initiate_contact_interrupt_page() -> None:
    expected = hand(
        40, 14, (8, "I", 0x30000), (12, "I", 0), (16, "Q", 0x12345000), (24, "Q", 1), (32, "Q", 2)
    )
    built = vm.build_message(
        MsgType.INITIATE_CONTACT,
        vmbus_version_requested=0x30000,
        target_vcpu=0,
        interrupt_page=0x12345000,
        monitor_page1=1,
        monitor_page2=2,
    )
    assert built == expected
    assert vm.parse_message(expected).interrupt_page == 0x12345000


def test_version_response() -> None:
    roundtrip(
        MsgType.VERSION_RESPONSE,
        hand(16, 15, (8, "B", 1), (9, "B", 2), (12, "I", 4)),
        version_supported=1,
        connection_state=2,
        msg_conn_id=4,
    )


def test_tl_connect_request() -> None:
    other = uuid.UUID("00000000-facb-11e6-bd58-64006a7986d3")
    roundtrip(
        MsgType.TL_CONNECT_REQUEST,
        hand(40, 21, (8, "raw", INSTANCE.bytes_le), (24, "raw", other.bytes_le)),
        guest_endpoint_id=INSTANCE,
        host_service_id=other,
    )


def test_modifychannel_and_response() -> None:
    roundtrip(MsgType.MODIFYCHANNEL, hand(16, 22, (8, "I", 5), (12, "I", 2)), child_relid=5, target_vp=2)
    roundtrip(
        MsgType.MODIFYCHANNEL_RESPONSE, hand(16, 24, (8, "I", 5), (12, "I", 1)), child_relid=5, status=1
    )


def test_parse_rejects_malformed() -> None:
    with pytest.raises(vm.MessageError):
        vm.parse_message(b"\x01\x00\x00")  # no header
    with pytest.raises(vm.MessageError):
        vm.parse_message(struct.pack("<II", 25, 0))  # unknown type
    with pytest.raises(vm.MessageError):
        vm.parse_message(struct.pack("<II", 23, 0))  # TL_CONNECT_RESULT: no layout
    with pytest.raises(vm.MessageError):
        vm.parse_message(struct.pack("<III", 5, 0, 1))  # OPENCHANNEL cut short
    # Trailing bytes after a fixed-size message are ignored.
    assert vm.parse_message(hand(12, 7, (8, "I", 3)) + b"\xff" * 8).child_relid == 3
    with pytest.raises(vm.MessageError):
        vm.build_message(MsgType.GPADL_BODY, gpadl=1, pfn=list(range(29)))  # 248 bytes > 240


def test_gpadl_split_matches_linux_counts() -> None:
    # spec §2.7: 256 PFNs → header + 9 bodies; 10 PFNs → header only; 4096 → header + 146 bodies.
    for total, messages in ((256, 10), (10, 1), (255, 10), (4096, 147), (26, 1), (27, 2)):
        msgs = vm.gpadl_messages(1, 0xE1E10, total * 4096, list(range(100, 100 + total)))
        assert len(msgs) == messages
        assert all(len(m) <= vm.MAX_MESSAGE_PAYLOAD for m in msgs)
        asm = vm.GpadlAssembler()
        results = [asm.feed(vm.parse_message(m)) for m in msgs]
        assert all(r is None for r in results[:-1])
        done = results[-1]
        assert done is not None and done.pfns == list(range(100, 100 + total))
        assert done.byte_count == total * 4096 and done.handle == 0xE1E10 and done.child_relid == 1
        assert not asm.pending
    header = vm.parse_message(vm.gpadl_messages(1, 5, 256 * 4096, list(range(256)))[0])
    assert header.range_buflen == 8 + 8 * 256 and len(header.pfn_array) == 26


def test_gpadl_assembler_rejects_bad_input() -> None:
    asm = vm.GpadlAssembler()
    with pytest.raises(vm.MessageError):
        asm.feed(vm.parse_message(vm.build_message(MsgType.GPADL_BODY, gpadl=9, pfn=[1])))  # unknown handle
    msgs = vm.gpadl_messages(1, 9, 30 * 4096, list(range(30)))
    asm.feed(vm.parse_message(msgs[0]))
    with pytest.raises(vm.MessageError):
        asm.feed(vm.parse_message(msgs[0]))  # duplicate header while in progress
    with pytest.raises(vm.MessageError):
        asm.feed(
            vm.parse_message(vm.build_message(MsgType.GPADL_BODY, gpadl=9, pfn=list(range(5))))
        )  # too many
    two_ranges = vm.build_message(
        MsgType.GPADL_HEADER,
        child_relid=1,
        gpadl=10,
        range_buflen=16,
        rangecount=2,
        byte_count=4096,
        pfn_array=[1],
    )
    with pytest.raises(vm.MessageError):
        asm.feed(vm.parse_message(two_ranges))
    too_big = vm.build_message(
        MsgType.GPADL_HEADER, child_relid=1, gpadl=11, range_buflen=16, byte_count=4097, pfn_array=[1]
    )
    with pytest.raises(vm.MessageError):
        asm.feed(vm.parse_message(too_big))


def test_post_message_input_layout() -> None:
    payload = vm.build_message(MsgType.REQUESTOFFERS)
    built = vm.build_post_message(0x1000004, payload)
    expected = bytearray(256)
    struct.pack_into("<IIII", expected, 0, 0x1000004, 0, 1, 8)
    expected[16:24] = payload
    assert built == bytes(expected)
    post = vm.parse_post_message(built)
    assert post == vm.PostMessage(4, 1, payload)  # connection id keeps its low 24 bits
    bad = bytearray(expected)
    struct.pack_into("<I", bad, 12, 241)
    with pytest.raises(vm.MessageError) as exc:
        vm.parse_post_message(bad)
    assert exc.value.hv_status == vm.HV_STATUS_INVALID_PARAMETER
    with pytest.raises(vm.MessageError):
        vm.parse_post_message(bytes(100))


def test_synic_message_slot_layout() -> None:
    payload = vm.build_message(MsgType.VERSION_RESPONSE, version_supported=1, msg_conn_id=4)
    built = vm.build_hv_message(payload, msg_pending=True, port=0x1122)
    expected = bytearray(256)
    struct.pack_into("<IBBHQ", expected, 0, 1, 16, 1, 0, 0x1122)
    expected[16:32] = payload
    assert built == bytes(expected)
    assert vm.parse_hv_message(built) == vm.SynicMessage(1, True, 0x1122, payload)

    page = bytearray(4096)
    slot = memoryview(page)[vm.SYNIC_MESSAGE_SLOT_OFFSET : vm.SYNIC_MESSAGE_SLOT_OFFSET + 256]
    assert vm.SYNIC_MESSAGE_SLOT_OFFSET == 0x200
    assert vm.slot_is_free(slot)
    vm.write_message_slot(slot, payload)
    assert not vm.slot_is_free(slot)
    assert page[0x200:0x204] == b"\x01\x00\x00\x00" and page[0x204] == 16 and page[0x205] == 0
    vm.set_msg_pending(slot)
    assert vm.parse_hv_message(slot).msg_pending
    with pytest.raises(vm.MessageError):
        vm.write_message_slot(slot, payload, message_type=0)


def test_versions_and_connection_ids() -> None:
    assert vm.make_version(5, 3) == 0x50003 == vm.VmbusVersion.V5_3
    assert vm.version_str(0x60000) == "6.0"
    assert vm.VERSIONS_7_3[0] == 0x60000 and 0x30000 not in vm.VERSIONS_7_3
    assert vm.VERSIONS_6_12[-1] == 0x20004
    assert vm.initiate_contact_connection_id(0x50000) == 4
    assert vm.initiate_contact_connection_id(0x40001) == 1
    assert vm.GPADL_HEADER_MAX_PFNS == 26 and vm.GPADL_BODY_MAX_PFNS == 28


def test_describe_is_json_friendly() -> None:
    import json

    msg = vm.parse_message(
        vm.build_message(
            MsgType.OFFERCHANNEL,
            if_type=vm.ClassGuid.NETVSC,
            if_instance=INSTANCE,
            child_relid=1,
            connection_id=1,
        )
    )
    text = json.dumps(vm.describe(msg))
    assert "OFFERCHANNEL" in text and str(vm.ClassGuid.NETVSC) in text
    assert list(vm.iter_relids(b"\x02\x00\x81")) == [1, 16, 23]

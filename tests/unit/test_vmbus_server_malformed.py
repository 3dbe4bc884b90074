"""An untrusted guest: every malformed message, GPADL or ring becomes a ProtocolViolation, nothing
escapes the server's entry points, waits the guest would block on are still answered, and the next
valid message is served normally."""

from __future__ import annotations

import random
import struct

import pytest

from hvlab.protocol import vmbus as vm
from hvlab.protocol import vmbus_packet as vp
from hvlab.protocol.vmbus import MsgType
from hvlab.timeline import MemoryTimeline
from hvlab.vmbus.channel import ChannelState, ProtocolViolation
from hvlab.vmbus.guest_model import GuestOperationFailed
from hvlab.vmbus.server import STATUS_UNSUCCESSFUL
from hvlab.vmbus.testing import Bus, EchoDevice, make_bus


def connected(n: int = 2, **kw: object) -> tuple[Bus, list[EchoDevice]]:
    devices = [EchoDevice(f"00000000-0000-4000-8000-00000000010{i}") for i in range(n)]
    bus = make_bus(devices, **kw)  # type: ignore[arg-type]
    bus.connect()
    return bus, devices


def post_raw(bus: Bus, payload: bytes, conn: int = 4, message_type: int = 1) -> int:
    return bus.server.handle_post_message(0, conn, message_type, payload)


def last_reply(bus: Bus) -> object:
    return vm.parse_message(bus.synic.posted[-1][2])


def still_serves(bus: Bus, relid: int = 2) -> None:
    """The server keeps working after the violation: a full open + packet round trip."""
    ch = bus.guest.open_channel(relid)
    ch.send_inband(b"still-alive", completion_requested=True)
    assert ch.receive()[0].payload.startswith(b"done:still-alive")


def test_violation_record_is_logged_counted_and_on_the_timeline(caplog: pytest.LogCaptureFixture) -> None:
    timeline = MemoryTimeline()
    bus, _ = connected(timeline=timeline)
    with caplog.at_level("WARNING", logger="hvlab.vmbus"):
        post_raw(bus, (30).to_bytes(4, "little") + bytes(4))
    (v,) = bus.server.violations
    assert v == ProtocolViolation(None, "30", "msgtype", 30, v.detail) and bus.server.violation_count == 1
    assert "msgtype" in caplog.text and "protocol violation" in caplog.text
    assert timeline.of_kind("vmbus.violation")[0]["field"] == "msgtype"
    still_serves(bus)


def test_truncated_and_headerless_messages() -> None:
    bus, _ = connected()
    full = vm.build_message(
        MsgType.OPENCHANNEL,
        child_relid=1,
        openid=1,
        ringbuffer_gpadlhandle=1,
        target_vp=0,
        downstream_ringbuffer_pageoffset=2,
    )
    assert post_raw(bus, full[:20]) == 0
    assert post_raw(bus, b"\x05\x00") == 0
    fields = [(v.message, v.field) for v in bus.server.violations]
    assert fields == [("OPENCHANNEL", "length"), ("post", "payload_size")]
    gpadl = vm.build_message(
        MsgType.GPADL_HEADER, child_relid=1, gpadl=5, range_buflen=16, byte_count=4096, pfn_array=[100]
    )
    post_raw(bus, gpadl + b"\x01\x02\x03")  # PFN array not a multiple of 8
    assert bus.server.violations[-1].field == "length"
    still_serves(bus)


def test_wrong_direction_and_premature_messages() -> None:
    bus = make_bus([EchoDevice("00000000-0000-4000-8000-000000000201")])
    assert post_raw(bus, vm.build_message(MsgType.REQUESTOFFERS)) == 0
    assert bus.server.violations[-1].detail == "sent before a version was negotiated"
    assert not bus.synic.posted
    bus.connect()
    post_raw(
        bus,
        vm.build_message(
            MsgType.OFFERCHANNEL,
            if_type=vm.ClassGuid.NETVSC,
            if_instance=vm.ClassGuid.VPCI,
            child_relid=9,
            connection_id=9,
        ),
    )
    assert bus.server.violations[-1].message == "OFFERCHANNEL" and 9 not in bus.server.channels
    assert len(bus.server.violations) == 2
    bus.guest.open_channel(1)


def test_post_parameters() -> None:
    bus, _ = connected()
    good = vm.build_message(MsgType.REQUESTOFFERS)
    assert post_raw(bus, good, message_type=0) == vm.HV_STATUS_INVALID_PARAMETER
    assert post_raw(bus, good, message_type=0x80000010) == vm.HV_STATUS_INVALID_PARAMETER
    assert post_raw(bus, good + bytes(240)) == vm.HV_STATUS_INVALID_PARAMETER
    assert post_raw(bus, good, conn=0x123) == vm.HV_STATUS_INVALID_CONNECTION_ID
    assert [v.field for v in bus.server.violations] == [
        "message_type",
        "message_type",
        "payload_size",
        "connection_id",
    ]


def test_bad_relids_are_answered_where_the_guest_would_wait() -> None:
    bus, _ = connected()
    bus.guest.post(
        MsgType.OPENCHANNEL,
        child_relid=99,
        openid=99,
        ringbuffer_gpadlhandle=0,
        target_vp=0,
        downstream_ringbuffer_pageoffset=2,
    )
    reply = last_reply(bus)
    assert reply.msgtype is MsgType.OPENCHANNEL_RESULT and reply.status == STATUS_UNSUCCESSFUL  # type: ignore[attr-defined]
    bus.guest.post(MsgType.CLOSECHANNEL, child_relid=99)
    bus.guest.post(MsgType.RELID_RELEASED, child_relid=1)  # not rescinded
    bus.guest.post(MsgType.GPADL_TEARDOWN, child_relid=1, gpadl=0x4242)
    reply = last_reply(bus)
    assert reply.msgtype is MsgType.GPADL_TORNDOWN and reply.gpadl == 0x4242  # type: ignore[attr-defined]
    bus.guest.post(MsgType.MODIFYCHANNEL, child_relid=77, target_vp=1)
    assert last_reply(bus).status == STATUS_UNSUCCESSFUL  # type: ignore[attr-defined]
    assert [(v.message, v.field) for v in bus.server.violations] == [
        ("OPENCHANNEL", "child_relid"),
        ("CLOSECHANNEL", "child_relid"),
        ("RELID_RELEASED", "child_relid"),
        ("GPADL_TEARDOWN", "gpadl"),
        ("MODIFYCHANNEL", "child_relid"),
    ]
    bus.guest.strict = False
    bus.guest.poll()  # drop the replies nobody waits for
    assert bus.server.channels[1].state is ChannelState.OFFERED
    still_serves(bus, 1)


def test_gpadl_pfn_outside_ram() -> None:
    bus, _ = connected()
    outside = len(bus.memory.buf) // 4096 + 5
    with pytest.raises(GuestOperationFailed, match="creation_status"):
        bus.guest.create_gpadl(1, [bus.memory.alloc_pages(1)[0], outside])
    v = bus.server.violations[-1]
    assert (v.relid, v.field, v.value) == (1, "pfn", outside) and not bus.server.gpadls
    with pytest.raises(GuestOperationFailed):
        bus.guest.create_gpadl(1, [1 << 52])  # GPA overflows any RAM
    still_serves(bus)


def test_gpadl_protocol_errors() -> None:
    bus, _ = connected()
    handle = bus.guest.create_gpadl(1, bus.memory.alloc_pages(1))
    bus.guest.post(
        MsgType.GPADL_HEADER,
        child_relid=1,
        gpadl=handle,
        range_buflen=16,
        byte_count=4096,
        pfn_array=[bus.memory.alloc_pages(1)[0]],
    )
    assert last_reply(bus).creation_status == STATUS_UNSUCCESSFUL  # type: ignore[attr-defined]
    assert bus.server.gpadls[handle].pfns  # the existing GPADL is untouched
    bus.guest.post(MsgType.GPADL_BODY, gpadl=0x777, pfn=[1, 2])
    bus.guest.post(
        MsgType.GPADL_HEADER, child_relid=1, gpadl=0x900, range_buflen=12, byte_count=1, pfn_array=[]
    )
    bus.guest.post(
        MsgType.GPADL_HEADER,
        child_relid=55,
        gpadl=0x901,
        range_buflen=16,
        byte_count=4096,
        pfn_array=[bus.memory.alloc_pages(1)[0]],
    )
    # A body that brings more PFNs than announced.
    pfns = bus.memory.alloc_pages(27)
    bus.guest.post(
        MsgType.GPADL_HEADER,
        child_relid=1,
        gpadl=0x902,
        range_buflen=8 + 8 * 27,
        byte_count=27 * 4096,
        pfn_array=pfns[:26],
    )
    bus.guest.post(MsgType.GPADL_BODY, gpadl=0x902, pfn=pfns[26:] + [pfns[0]])
    assert last_reply(bus).creation_status == STATUS_UNSUCCESSFUL  # type: ignore[attr-defined]
    assert [(v.message, v.field) for v in bus.server.violations] == [
        ("GPADL_HEADER", "gpadl"),
        ("GPADL_BODY", "gpadl"),
        ("GPADL_HEADER", "range"),
        ("GPADL_HEADER", "child_relid"),
        ("GPADL_BODY", "pfn"),
    ]
    assert set(bus.server.gpadls) == {handle}
    bus.guest.strict = False
    bus.guest.poll()
    still_serves(bus)


def test_openchannel_with_bad_ring_gpadl() -> None:
    bus, _ = connected()
    handle = bus.guest.create_gpadl(1, bus.memory.alloc_pages(4))
    other = bus.guest.create_gpadl(2, bus.memory.alloc_pages(4))
    for gpadl, offset in ((handle, 1), (handle, 3), (other, 2), (0xDEAD, 2)):
        bus.guest.post(
            MsgType.OPENCHANNEL,
            child_relid=1,
            openid=1,
            ringbuffer_gpadlhandle=gpadl,
            target_vp=0,
            downstream_ringbuffer_pageoffset=offset,
        )
        assert last_reply(bus).status == STATUS_UNSUCCESSFUL  # type: ignore[attr-defined]
    assert [v.field for v in bus.server.violations] == [
        "downstream_ringbuffer_pageoffset",
        "downstream_ringbuffer_pageoffset",
        "ringbuffer_gpadlhandle",
        "ringbuffer_gpadlhandle",
    ]
    # Ring indices already corrupt at open time.
    pages = bus.memory.alloc_pages(4)
    bad = bus.guest.create_gpadl(1, pages)
    bus.memory.write(pages[0] * 4096 + 4, struct.pack("<I", 12345))  # G→H read_index
    bus.guest.post(
        MsgType.OPENCHANNEL,
        child_relid=1,
        openid=1,
        ringbuffer_gpadlhandle=bad,
        target_vp=0,
        downstream_ringbuffer_pageoffset=2,
    )
    assert last_reply(bus).status == STATUS_UNSUCCESSFUL  # type: ignore[attr-defined]
    assert bus.server.violations[-1].field == "read_index"
    bus.guest.strict = False
    bus.guest.poll()
    still_serves(bus)


def test_corrupt_ring_indices_break_only_that_channel() -> None:
    bus, devices = connected()
    ch = bus.guest.open_channel(1)
    host = bus.server.channels[1]
    assert ch.outbound is not None
    ch.outbound.ring.write_index = 0x7FFFFFF8  # beyond the data area
    bus.guest.transport.signal_event(ch.connection_id)
    v = bus.server.violations[-1]
    assert (v.relid, v.message, v.field) == (1, "ring", "write_index")
    assert host.broken and not host.is_open and devices[0].closed == [host]
    assert not host.send_inband(b"nope")
    bus.guest.transport.signal_event(ch.connection_id)  # ignored now: no second violation
    assert bus.server.violation_count == 1
    ch.close()  # the guest can still close properly
    assert host.state is ChannelState.OFFERED and not bus.server.gpadls and bus.server.violation_count == 1
    still_serves(bus, 1)
    still_serves(bus)


def test_corrupt_read_index_of_inbound_ring() -> None:
    bus, devices = connected()
    ch = bus.guest.open_channel(1)
    assert ch.inbound is not None
    ch.inbound.ring.read_index = 3  # not 8-aligned
    assert not bus.server.channels[1].send_inband(b"x")
    assert bus.server.violations[-1].field == "read_index" and devices[0].closed


def test_bad_packet_framing_and_bad_extra_headers() -> None:
    bus, (dev, _) = connected()
    ch = bus.guest.open_channel(1)
    dev.echo = False
    # A GPA-direct packet whose range count overruns its header: skipped, the next packet still arrives.
    extra = struct.pack("<II", 0, 5) + struct.pack("<II", 4096, 0) + struct.pack("<Q", 100)
    bad = vp.build_packet(vp.PacketType.DATA_USING_GPA_DIRECT, b"payload", 1, 0, extra)
    assert ch.send_packet(bad)
    ch.send_inband(b"next")
    assert bus.server.violations[-1].message == "packet" and dev.packets[-1].payload.startswith(b"next")
    # len8 larger than what the producer published: the ring is corrupt.
    assert ch.outbound is not None
    ring = ch.outbound.ring
    write = ring.write_index
    ring.write_data(write, struct.pack("<HHHHQ", 6, 2, 0x1000, 0, 0) + bytes(8))
    ring.write_index = write + 24
    bus.guest.transport.signal_event(ch.connection_id)
    assert bus.server.violations[-1].field == "len8" and bus.server.channels[1].broken


def test_oversized_guest_packet_is_a_violation() -> None:
    class Small(EchoDevice):
        max_packet_size = 64

    dev = Small("00000000-0000-4000-8000-000000000301")
    bus = make_bus([dev])
    bus.connect()
    ch = bus.guest.open_channel(1)
    ch.send_inband(bytes(100))
    assert bus.server.violations[-1].field == "len8" and bus.server.channels[1].broken


def test_signal_with_unknown_connection_id() -> None:
    bus, _ = connected()
    assert bus.server.handle_signal_event(0xABCDEF) == vm.HV_STATUS_INVALID_CONNECTION_ID
    assert bus.server.violations[-1].message == "signal"
    assert (
        bus.server.handle_signal_event(bus.server.channels[1].connection_id) == 0
    )  # offered, not open: ignored
    assert bus.server.violation_count == 1


def test_platform_failures_never_escape() -> None:
    class ExplodingSynic:
        def post(self, vp: int, sint: int, payload: bytes) -> bool:
            raise OSError("platform bug")

        def signal_event(self, vp: int, relid: int) -> None:
            raise OSError("platform bug")

    bus, _ = connected()
    bus.server.synic = ExplodingSynic()
    hello = vm.build_message(
        MsgType.INITIATE_CONTACT, vmbus_version_requested=0x50003, target_vcpu=0, msg_sint=2
    )
    assert bus.server.handle_post_message(0, 4, 1, hello) == 0
    assert bus.server.pending_messages() == 1
    bus.server.on_eom(0)
    bus.server.retry_pending()


def test_fuzzed_posts_never_raise_and_the_bus_recovers() -> None:
    timeline = MemoryTimeline()
    bus, _ = connected(timeline=timeline)
    rng = random.Random(1234)
    types = list(range(0, 26))
    for i in range(400):
        length = rng.choice([0, 3, 8, 12, 16, 20, 28, 40, 148, 196, 240])
        body = bytes(rng.getrandbits(8) for _ in range(max(0, length - 4)))
        payload = (rng.choice(types).to_bytes(4, "little") + body)[:length]
        status = bus.server.handle_post_message(rng.randrange(4), rng.choice([1, 4, 4, 4, 9]), 1, payload)
        assert status in (0, vm.HV_STATUS_INVALID_PARAMETER, vm.HV_STATUS_INVALID_CONNECTION_ID)
        if i % 50 == 0:
            assert bus.server.handle_signal_event(rng.getrandbits(24)) in (0, 18)
    assert bus.server.violation_count > 0
    assert not timeline.of_kind("vmbus.internal_error")
    # Whatever state the fuzzing left, a guest reconnecting from scratch gets a working bus.
    bus.synic.events.clear()
    bus.guest.strict = False
    bus.guest.channels.clear()
    bus.guest.connect()
    bus.guest.request_offers()
    bus.guest.strict = True
    bus.guest.channels = {r: c for r, c in bus.guest.channels.items() if r in (1, 2)}
    still_serves(bus, 2)


def test_tearing_down_the_ring_of_an_open_channel() -> None:
    bus, (dev, _) = connected()
    ch = bus.guest.open_channel(1)
    assert ch.ring_gpadl is not None
    bus.guest.post(MsgType.GPADL_TEARDOWN, child_relid=2, gpadl=ch.ring_gpadl)
    fields = [(v.message, v.field) for v in bus.server.violations]
    assert fields == [("GPADL_TEARDOWN", "child_relid"), ("GPADL_TEARDOWN", "gpadl")]
    assert dev.closed and bus.server.channels[1].state is ChannelState.OFFERED
    assert last_reply(bus).msgtype is MsgType.GPADL_TORNDOWN  # type: ignore[attr-defined]
    # A teardown of a GPADL still being described.
    bus.guest.post(
        MsgType.GPADL_HEADER,
        child_relid=2,
        gpadl=0x999,
        range_buflen=24,
        byte_count=8192,
        pfn_array=[bus.memory.alloc_pages(1)[0]],
    )
    bus.guest.post(MsgType.GPADL_TEARDOWN, child_relid=2, gpadl=0x999)
    assert bus.server.violations[-1].detail == "GPADL still being described"


@pytest.mark.parametrize(("sint", "vtl"), [(0, 0), (16, 0), (2, 1)])
def test_initiate_contact_with_unusable_sint_or_vtl_is_refused(sint: int, vtl: int) -> None:
    bus = make_bus([])
    hello = vm.build_message(
        MsgType.INITIATE_CONTACT, vmbus_version_requested=0x50003, target_vcpu=0, msg_sint=sint, msg_vtl=vtl
    )
    assert post_raw(bus, hello) == 0
    assert last_reply(bus).version_supported == 0 and not bus.server.connected  # type: ignore[attr-defined]


def test_gpadl_for_a_rescinded_channel_and_unload_while_rescinded() -> None:
    bus, (dev, other) = connected()
    bus.guest.strict = False
    bus.server.remove_device(other)  # the guest model processes the rescind only when it polls
    bus.guest.post(
        MsgType.GPADL_HEADER,
        child_relid=2,
        gpadl=0x55,
        range_buflen=16,
        byte_count=4096,
        pfn_array=[bus.memory.alloc_pages(1)[0]],
    )
    assert last_reply(bus).creation_status == STATUS_UNSUCCESSFUL  # type: ignore[attr-defined]
    assert not bus.server.violations  # a race, not a guest bug
    assert bus.server.find_device(other.class_guid) == [dev, other]
    bus.guest.post(MsgType.UNLOAD)
    assert (
        other.removed and 2 not in bus.server.channels and bus.server.find_device(other.class_guid) == [dev]
    )

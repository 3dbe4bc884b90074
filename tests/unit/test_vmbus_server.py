"""The VMBus server against the pure-Python guest model: negotiation, offers, GPADLs, channels, rings.

The guest model behaves like Linux's hv_vmbus where the host can observe it, and ModelSynic gives the
server real SynIC slot semantics (busy slot, msg_pending, EOM), so these tests exercise the server's
protocol logic exactly as the platform will drive it, minus KVM.
"""

from __future__ import annotations

import pytest

from hvlab.protocol import vmbus as vm
from hvlab.protocol import vmbus_packet as vp
from hvlab.protocol.vmbus import MsgType
from hvlab.timeline import MemoryTimeline
from hvlab.vmbus.channel import Channel, ChannelState
from hvlab.vmbus.guest_model import GuestOperationFailed
from hvlab.vmbus.server import (
    CHANNEL_CONNECTION_ID_BASE,
    STATUS_UNSUCCESSFUL,
    SUPPORTED_VERSIONS,
    VmbusServer,
)
from hvlab.vmbus.testing import TEST_CLASS, Bus, EchoDevice, make_bus


def bus_with(n: int = 1, **kw: object) -> tuple[Bus, list[EchoDevice]]:
    devices = [EchoDevice(f"00000000-0000-4000-8000-00000000000{i + 1}") for i in range(n)]
    return make_bus(devices, **kw), devices  # type: ignore[arg-type]


def posted_types(bus: Bus) -> list[MsgType]:
    return [vm.parse_message(p).msgtype for _, _, p in bus.synic.posted]


# Negotiation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flavour", "version"),
    [
        (f, v)
        for f, versions in (("6.1", vm.VERSIONS_6_1), ("6.12", vm.VERSIONS_6_12), ("7.3", vm.VERSIONS_7_3))
        for v in versions
    ],
)
def test_every_version_each_kernel_tries(flavour: str, version: int) -> None:
    bus, _ = bus_with(flavour=flavour, versions=(version,))
    assert bus.guest.connect() == version
    tried = bus.guest.versions
    refused = tried[: tried.index(version)]
    assert bus.server.negotiations == [(v, False) for v in refused] + [(version, True)]
    # Real Hyper-V: a host without any >= 5.0 version has no connection id 4 (status 18); otherwise an
    # unsupported version gets VERSION_RESPONSE(version_supported=0).
    responses = [vm.parse_message(p) for _, _, p in bus.synic.posted]
    expected = [v for v in refused if not (v >= 0x50000 and version < 0x50000)] + [version]
    assert [r.version_supported for r in responses] == [0] * (len(expected) - 1) + [1]
    assert bus.guest.msg_conn_id == (4 if version >= 0x50000 else 1)
    channels = bus.guest.request_offers()
    assert len(channels) == 1 and bus.server.offers_requested
    assert bus.server.version == version and not bus.server.violations


@pytest.mark.parametrize(("flavour", "expected"), [("6.1", 0x50003), ("6.12", 0x50003), ("7.3", 0x60000)])
def test_default_server_accepts_the_highest(flavour: str, expected: int) -> None:
    bus, _ = bus_with(flavour=flavour)
    assert bus.guest.connect() == expected
    assert bus.server.negotiations == [(expected, True)]
    assert set(SUPPORTED_VERSIONS) == set(vm.VERSIONS_6_1) | set(vm.VERSIONS_7_3)


def test_refusal_modes_and_unknown_versions() -> None:
    bus, _ = bus_with(flavour="7.3", versions=(0x50003,))
    assert bus.guest.connect() == 0x50003
    first = vm.parse_message(bus.synic.posted[0][2])
    assert first.msgtype is MsgType.VERSION_RESPONSE and first.version_supported == 0
    bus, _ = bus_with(flavour="7.3", versions=(0x50003,), refusal="status")
    assert bus.guest.connect() == 0x50003
    assert posted_types(bus) == [MsgType.VERSION_RESPONSE]  # 6.0 refused by status 18 only
    bus, _ = bus_with(guest_versions=(0x70000, 0x10000))
    with pytest.raises(GuestOperationFailed, match="Unable to connect"):
        bus.guest.connect()
    assert not bus.server.connected and bus.server.negotiations == [(0x70000, False), (0x10000, False)]
    with pytest.raises(ValueError):
        VmbusServer(bus.synic, bus.ram, refusal="maybe")


def test_message_connection_ids() -> None:
    bus, _ = bus_with()
    srv = bus.server
    hello = vm.build_message(
        MsgType.INITIATE_CONTACT, vmbus_version_requested=0x50003, target_vcpu=0, msg_sint=2
    )
    assert srv.handle_post_message(0, vm.VMBUS_MESSAGE_CONNECTION_ID_REDIRECT, 1, hello) == 18
    assert not srv.violations  # VTL2 guests probe this id: not a violation
    assert srv.handle_post_message(0, 7, 1, hello) == 18
    assert srv.violations[-1].field == "connection_id"
    assert srv.handle_post_message(0, 4, 1, hello) == 0 and srv.version == 0x50003
    # Versions below 5.0 only: connection id 4 does not exist on such a host.
    old, _ = bus_with(versions=(0x40001,))
    assert old.server.handle_post_message(0, 4, 1, hello) == 18


def test_version_response_goes_to_target_vcpu_and_sint() -> None:
    bus, _ = bus_with()
    hello = vm.build_message(
        MsgType.INITIATE_CONTACT, vmbus_version_requested=0x50003, target_vcpu=3, msg_sint=5
    )
    assert bus.server.handle_post_message(1, 4, 1, hello) == 0
    assert bus.synic.posted[-1][:2] == (3, 5)
    assert bus.server.message_vp == 3 and bus.server.sint == 5


# Offers -----------------------------------------------------------------------------------------------


def test_offers_relids_and_connection_ids() -> None:
    bus, devices = bus_with(3)
    changes: list[dict[int, int]] = []
    bus.server.on_channels_changed = changes.append
    channels = bus.connect()
    assert [c.relid for c in channels] == [1, 2, 3]
    offers = [
        vm.parse_message(p) for _, _, p in bus.synic.posted if vm.message_type(p) == MsgType.OFFERCHANNEL
    ]
    assert [o.if_instance for o in offers] == [d.instance_guid for d in devices]
    for offer in offers:
        assert offer.if_type == TEST_CLASS and offer.chn_flags == 0 and offer.sub_channel_index == 0
        assert (
            not offer.monitor_allocated
            and offer.connection_id == CHANNEL_CONNECTION_ID_BASE + offer.child_relid
        )
    assert posted_types(bus)[-1] is MsgType.ALLOFFERS_DELIVERED
    assert bus.server.channel_connection_ids() == {r: CHANNEL_CONNECTION_ID_BASE + r for r in (1, 2, 3)}
    assert all(c.state is ChannelState.OFFERED for c in bus.server.channels.values())
    assert changes == []  # no change since the devices were added


def test_hot_add_rescind_release_and_relid_reuse() -> None:
    bus, devices = bus_with(1)
    bus.connect()
    late = EchoDevice("00000000-0000-4000-8000-0000000000aa")
    changes: list[dict[int, int]] = []
    bus.server.on_channels_changed = changes.append
    bus.server.add_device(late)
    bus.guest.poll()
    assert 2 in bus.guest.channels and bus.guest.channels[2].if_instance == late.instance_guid
    assert changes[-1] == {1: CHANNEL_CONNECTION_ID_BASE + 1, 2: CHANNEL_CONNECTION_ID_BASE + 2}
    bus.guest.open_channel(2)
    bus.server.remove_device(late)
    assert late.primary is not None and late.primary.state is ChannelState.RESCINDED and len(late.closed) == 1
    bus.run()  # the guest closes (no GPADL teardown after rescind) and releases the relid
    assert late.removed and late not in bus.server.devices and 2 not in bus.server.channels
    assert bus.guest.released_relids == [2] and not bus.server.gpadls and not bus.server.violations
    again = EchoDevice("00000000-0000-4000-8000-0000000000bb")
    assert bus.server.add_device(again).relid == 2
    with pytest.raises(ValueError):
        bus.server.add_device(again)


def test_remove_before_offer_and_relid_kept_until_released() -> None:
    bus, devices = bus_with(2)
    bus.server.remove_device(devices[1])  # never offered: gone at once
    assert devices[1].removed and list(bus.server.channels) == [1]
    bus.connect()
    bus.guest.strict = False
    bus.server.remove_device(devices[0])
    assert (
        bus.server.add_device(EchoDevice("00000000-0000-4000-8000-0000000000cc")).relid == 2
    )  # 1 is reserved


def test_subchannel_offer() -> None:
    bus, (dev,) = bus_with(1)
    bus.connect()
    sub = dev.offer_subchannel()
    bus.guest.poll()
    guest_sub = bus.guest.channels[sub.relid]
    assert guest_sub.sub_channel_index == 1 and guest_sub.if_instance == dev.instance_guid
    assert [c.sub_channel_index for c in dev.channels] == [0, 1]
    bus.guest.open_channel(1)
    ch = bus.guest.open_channel(sub.relid)
    ch.send_inband(b"on-sub")
    assert dev.packets[-1].payload.startswith(b"on-sub")
    bus.server.remove_device(dev)
    rescinds = [
        vm.parse_message(p).child_relid
        for _, _, p in bus.synic.posted
        if vm.message_type(p) == MsgType.RESCIND_CHANNELOFFER
    ]
    assert rescinds == [sub.relid, 1]  # sub-channels first


# Slot semantics -----------------------------------------------------------------------------------------


def test_busy_slot_queues_and_eom_delivers_in_order() -> None:
    bus, devices = bus_with(4, eager=False)
    bus.guest.connect()
    channels = bus.guest.request_offers()
    assert [c.relid for c in channels] == [1, 2, 3, 4]
    assert bus.synic.busy > 0 and bus.synic.eoms > 0
    assert posted_types(bus) == [MsgType.VERSION_RESPONSE] + [MsgType.OFFERCHANNEL] * 4 + [
        MsgType.ALLOFFERS_DELIVERED
    ]
    assert bus.server.pending_messages() == 0


def test_retry_pending_backstop() -> None:
    bus, _ = bus_with(2, eager=False)
    bus.guest.connect()
    bus.guest.post(MsgType.REQUESTOFFERS)
    assert bus.server.pending_messages() == 2  # two offers behind the slot, ALLOFFERS after them
    slot = bus.synic.slot(0)
    slot[0:4] = bytes(4)  # the guest freed the slot but its EOM got lost
    bus.server.retry_pending()
    assert bus.server.pending_messages() == 1


# GPADLs ---------------------------------------------------------------------------------------------------


def test_gpadl_create_read_write_teardown() -> None:
    bus, (dev,) = bus_with(1)
    bus.connect()
    pfns = bus.memory.alloc_pages(256)
    handle = bus.guest.create_gpadl(1, pfns, byte_count=256 * 4096 - 100)
    kinds = [t for t in (m.msgtype for m in bus.guest.posted)]
    assert kinds.count(MsgType.GPADL_BODY) == 9
    host = bus.server.channels[1].gpadl(handle)
    assert host.pfns == pfns and host.size == 256 * 4096 - 100
    host.write(4090, b"across a page")
    assert (
        bus.memory.read(pfns[0] * 4096 + 4090, 6) == b"across"
        and bus.memory.read(pfns[1] * 4096, 7) == b" a page"
    )
    bus.memory.write(pfns[255] * 4096, b"guest")
    assert host.read(255 * 4096, 5) == b"guest"
    with pytest.raises(ValueError):
        host.read(256 * 4096 - 100, 1)
    with pytest.raises(KeyError):
        bus.server.channels[1].gpadl(handle + 1)
    bus.guest.teardown_gpadl(1, handle)
    assert handle not in bus.server.gpadls and dev.torn_down == [handle]


def test_gpadl_of_another_device_is_not_reachable() -> None:
    bus, (a, b) = bus_with(2)
    bus.connect()
    handle = bus.guest.create_gpadl(1, bus.memory.alloc_pages(2))
    assert a.primary is not None and b.primary is not None
    assert a.primary.gpadl(handle).size == 8192
    with pytest.raises(KeyError):
        b.primary.gpadl(handle)


# Channels -------------------------------------------------------------------------------------------------


def test_open_close_reopen() -> None:
    bus, (dev,) = bus_with(1)
    bus.connect()
    ch = bus.guest.open_channel(1, send_pages=4, recv_pages=6, target_vp=2)
    host = bus.server.channels[1]
    assert host.state is ChannelState.OPEN and host.target_vp == 2 and dev.opened == [host]
    assert host.reader is not None and host.reader.ring.data_size == 3 * 4096
    assert host.writer is not None and host.writer.ring.data_size == 5 * 4096
    ch.close()
    assert host.state is ChannelState.OFFERED and dev.closed == [host] and not bus.server.gpadls
    ch = bus.guest.open_channel(1)
    ch.send_inband(b"again")
    assert dev.packets[-1].payload.startswith(b"again") and host.opens == 2
    assert not bus.server.violations and not bus.guest.warnings


def test_device_can_refuse_open() -> None:
    bus, (dev,) = bus_with(1)
    bus.connect()
    dev.refuse_open = True
    with pytest.raises(GuestOperationFailed, match="EAGAIN"):
        bus.guest.open_channel(1)
    assert not bus.server.gpadls and bus.server.channels[1].state is ChannelState.OFFERED


def test_packets_round_trip_with_signalling() -> None:
    bus, (dev,) = bus_with(1)
    bus.connect()
    ch = bus.guest.open_channel(1, target_vp=1)
    host = bus.server.channels[1]
    tid = ch.send_inband(b"hello", completion_requested=True)
    assert host.signals_in == 1 and dev.packets[0].payload.rstrip(b"\0") == b"hello"
    assert bus.synic.signalled == [(1, 1)]  # the guest's inbound ring went non-empty: interrupt VP 1
    packets = ch.receive()
    assert [(p.type, p.trans_id, p.payload.rstrip(b"\0")) for p in packets] == [
        (vp.PacketType.COMP, tid, b"done:hello")
    ]
    ch.send_inband(b"ping")
    assert ch.receive()[0].payload.rstrip(b"\0") == b"echo:ping"
    assert host.send_inband(b"unsolicited", trans_id=7)
    assert ch.receive()[0].trans_id == 7
    assert host.packets_in == 2 and host.packets_out == 3 and len(bus.synic.signalled) == 3
    bus.synic.deliver_events()
    assert ch.events == 3


def test_many_packets_wrap_and_stay_in_order() -> None:
    bus, (dev,) = bus_with(1)
    bus.connect()
    ch = bus.guest.open_channel(1, send_pages=2, recv_pages=2)
    dev.echo = False
    for i in range(200):
        ch.send_inband(bytes([i % 256]) * (1 + (i * 37) % 900))
    assert [p.payload[0] for p in dev.packets] == [i % 256 for i in range(200)]


def test_full_inbound_ring_and_on_ring_space() -> None:
    bus, (dev,) = bus_with(1)
    bus.connect()
    ch = bus.guest.open_channel(1, send_pages=2, recv_pages=2)
    host = bus.server.channels[1]
    sent = 0
    while host.send_inband(bytes(1000)):
        sent += 1
    assert sent == 3 and host.blocked and dev.space == 0
    assert len(ch.receive()) == 3  # hv_pkt_iter_close signals the blocked host
    assert dev.space == 1 and not host.blocked
    assert host.send_inband(bytes(1000))


def test_modify_channel_per_version() -> None:
    bus, _ = bus_with(1)
    bus.connect()
    bus.guest.open_channel(1)
    bus.guest.modify_channel(1, 3)
    assert bus.server.channels[1].target_vp == 3 and posted_types(bus)[-1] is MsgType.MODIFYCHANNEL_RESPONSE
    old, _ = bus_with(1, versions=(0x40001,))
    old.connect()
    n = len(old.synic.posted)
    old.guest.modify_channel(1, 2)  # 4.1: no response expected, none sent
    assert len(old.synic.posted) == n and old.server.channels[1].target_vp == 2
    older, _ = bus_with(1, versions=(0x40000,))
    older.connect()
    older.guest.post(MsgType.MODIFYCHANNEL, child_relid=1, target_vp=1)
    assert older.server.violations[-1].message == "MODIFYCHANNEL"


def test_unload_and_reconnect() -> None:
    bus, (dev,) = bus_with(1)
    bus.connect()
    bus.guest.open_channel(1)
    bus.guest.unload()
    assert posted_types(bus)[-1] is MsgType.UNLOAD_RESPONSE
    assert not bus.server.connected and dev.closed and not bus.server.gpadls
    assert bus.server.channels[1].state is ChannelState.IDLE
    bus.guest.channels.clear()
    bus.connect()
    assert list(bus.guest.channels) == [1]
    bus.guest.open_channel(1)
    assert dev.primary is not None and dev.primary.opens == 2


def test_initiate_contact_while_connected_resets() -> None:
    bus, (dev,) = bus_with(1)
    bus.connect()
    bus.guest.open_channel(1)
    bus.guest.channels.clear()
    bus.connect()  # e.g. kexec without UNLOAD
    assert dev.closed and bus.server.channels[1].state is ChannelState.OFFERED
    assert bus.server.negotiations == [(0x50003, True), (0x50003, True)]


def test_device_bug_does_not_break_the_bus() -> None:
    class Broken(EchoDevice):
        def on_packet(self, channel: Channel, packet: vp.Packet) -> None:
            raise RuntimeError("device bug")

    timeline = MemoryTimeline()
    dev = Broken("00000000-0000-4000-8000-0000000000dd")
    bus = make_bus([dev], timeline=timeline)
    bus.connect()
    ch = bus.guest.open_channel(1)
    ch.send_inband(b"x")
    ch.send_inband(b"y")
    assert len(timeline.of_kind("vmbus.device_error")) == 2 and not bus.server.violations


def test_timeline_records_messages_and_states() -> None:
    timeline = MemoryTimeline()
    bus, _ = bus_with(1, timeline=timeline)
    bus.connect()
    bus.guest.open_channel(1).close()
    rx = [e["msgtype"] for e in timeline.of_kind("vmbus.rx")]
    tx = [e["msgtype"] for e in timeline.of_kind("vmbus.tx")]
    assert rx == [
        "INITIATE_CONTACT",
        "REQUESTOFFERS",
        "GPADL_HEADER",
        "OPENCHANNEL",
        "CLOSECHANNEL",
        "GPADL_TEARDOWN",
    ]
    assert tx == [
        "VERSION_RESPONSE",
        "OFFERCHANNEL",
        "ALLOFFERS_DELIVERED",
        "GPADL_CREATED",
        "OPENCHANNEL_RESULT",
        "GPADL_TORNDOWN",
    ]
    states = [e["state"] for e in timeline.of_kind("vmbus.channel") if "device" in e]
    assert states == ["idle", "offered", "open", "offered"]
    assert timeline.of_kind("vmbus.connection")[0]["version"] == "5.3"


def test_status_constant_is_nonzero() -> None:
    assert STATUS_UNSUCCESSFUL != 0


def test_gpa_direct_ranges_are_read_from_guest_pages() -> None:
    bus, (dev,) = bus_with(1)
    bus.connect()
    ch = bus.guest.open_channel(1)
    dev.echo = False
    pages = bus.memory.alloc_pages(2, contiguous=True)
    bus.memory.write(pages[0] * 4096 + 4000, bytes(range(96)) + bytes(range(100, 200)))
    rng = vp.GpaRange(196, 4000, tuple(pages))
    ch.send_gpa_direct([rng], b"rndis")
    host = bus.server.channels[1]
    (packet,) = dev.packets
    assert host.read_gpa_range(packet.gpa_ranges[0]) == bytes(range(96)) + bytes(range(100, 200))
    with pytest.raises(ValueError):
        host.read_gpa_range(vp.GpaRange(10, 0, (1 << 40,)))
    with pytest.raises(ValueError):
        host.read_gpa_range(vp.GpaRange(8192, 0, (pages[0],)))


def test_rescind_one_subchannel_keeps_the_device() -> None:
    bus, (dev,) = bus_with(1)
    bus.connect()
    sub = dev.offer_subchannel()
    bus.guest.poll()
    bus.guest.open_channel(1)
    bus.guest.open_channel(sub.relid)
    bus.server.rescind_channel(sub)
    assert sub.state is ChannelState.RESCINDED and dev.primary.state is ChannelState.OPEN
    bus.run()  # the guest closes the sub-channel and releases its relid
    assert sub.relid not in bus.server.channels and dev in bus.server.devices
    assert [c.sub_channel_index for c in dev.channels] == [0] and not bus.server.violations
    with pytest.raises(ValueError):
        bus.server.rescind_channel(sub)  # released: no longer this server's

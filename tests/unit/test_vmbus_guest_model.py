"""The pure-Python guest model against a minimal in-test host built from the same protocol pieces.

MiniHost is deliberately small: it shows how a VMBus server plugs into GuestTransport, and it
lets the tests drive ring traffic in both directions through real ring code on both sides.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from hvlab.protocol import vmbus as vm
from hvlab.protocol import vmbus_packet as vp
from hvlab.protocol.vmbus import MsgType
from hvlab.vmbus.guest_model import (
    GuestHang,
    GuestMemory,
    GuestOperationFailed,
    GuestProtocolError,
    GuestTransport,
    VmbusGuest,
)
from hvlab.vmbus.ring import RingReader, RingViolation, RingWriter, split_ring_gpadl

NIC_INSTANCE = uuid.UUID("9a4b1c2d-0001-4e5f-8a9b-0c1d2e3f4a5b")
VPCI_INSTANCE = uuid.UUID("00000000-b5d6-4e5f-8a9b-0c1d2e3f4a5b")


class HostChannel:
    def __init__(self, relid: int, if_type: uuid.UUID, instance: uuid.UUID, **offer: object) -> None:
        self.relid = relid
        self.offer = dict(
            if_type=if_type, if_instance=instance, child_relid=relid, connection_id=0x100 + relid
        )
        self.offer.update(offer)
        self.reader: RingReader | None = None
        self.writer: RingWriter | None = None
        self.received: list[vp.Packet] = []
        self.signals = 0
        self.echo = True


class MiniHost:
    """Just enough of a VMBus server to exercise the guest model."""

    def __init__(self, memory: GuestMemory, versions: tuple[int, ...] = (0x50003,)) -> None:
        self.memory = memory
        self.versions = versions
        self.guest: VmbusGuest | None = None
        self.channels: dict[int, HostChannel] = {}
        self.gpadls: dict[int, vm.Gpadl] = {}
        self.assembler = vm.GpadlAssembler()
        self.log: list[tuple[int, vm.MsgType]] = []
        self.silent: set[MsgType] = set()
        self.slot = memoryview(bytearray(4096))[0x200:0x300]
        self.open_status = 0
        self.released: list[int] = []

    def transport(self) -> GuestTransport:
        return GuestTransport(post_message=self.post_message, signal_event=self.signal_event)

    def add(self, relid: int, if_type: uuid.UUID, instance: uuid.UUID, **offer: object) -> HostChannel:
        ch = HostChannel(relid, if_type, instance, **offer)
        self.channels[relid] = ch
        return ch

    # Host → guest
    def send(self, msgtype: MsgType, **fields: object) -> None:
        assert self.guest is not None
        assert vm.slot_is_free(self.slot)
        vm.write_message_slot(self.slot, vm.build_message(msgtype, **fields))
        self.guest.on_message(self.slot)
        self.slot[0:4] = bytes(4)  # the guest freed it

    # Guest → host
    def post_message(self, data: bytes) -> int:
        post = vm.parse_post_message(data)
        msg = vm.parse_message(post.payload)
        self.log.append((post.connection_id, msg.msgtype))
        if msg.msgtype in self.silent:
            return vm.HV_STATUS_SUCCESS
        handler: Callable[[object], None] | None = getattr(self, "on_" + msg.msgtype.name.lower(), None)
        if handler is not None:
            handler(msg)
        return vm.HV_STATUS_SUCCESS

    def on_initiate_contact(self, msg) -> None:
        ok = msg.vmbus_version_requested in self.versions
        self.send(MsgType.VERSION_RESPONSE, version_supported=int(ok), msg_conn_id=4 if ok else 0)

    def on_requestoffers(self, msg) -> None:
        for ch in self.channels.values():
            self.send(MsgType.OFFERCHANNEL, **ch.offer)
        self.send(MsgType.ALLOFFERS_DELIVERED)

    def on_gpadl_header(self, msg) -> None:
        self._gpadl(self.assembler.feed(msg))

    def on_gpadl_body(self, msg) -> None:
        self._gpadl(self.assembler.feed(msg))

    def _gpadl(self, gpadl: vm.Gpadl | None) -> None:
        if gpadl is not None:
            self.gpadls[gpadl.handle] = gpadl
            self.send(MsgType.GPADL_CREATED, child_relid=gpadl.child_relid, gpadl=gpadl.handle)

    def on_gpadl_teardown(self, msg) -> None:
        del self.gpadls[msg.gpadl]
        self.send(MsgType.GPADL_TORNDOWN, gpadl=msg.gpadl)

    def on_openchannel(self, msg) -> None:
        ch = self.channels[msg.child_relid]
        if self.open_status == 0:
            pages = self.memory.pages(self.gpadls[msg.ringbuffer_gpadlhandle].pfns)
            g2h, h2g = split_ring_gpadl(pages, msg.downstream_ringbuffer_pageoffset, channel=ch.relid)
            ch.reader = RingReader(g2h)
            ch.writer = RingWriter(h2g)
        self.send(
            MsgType.OPENCHANNEL_RESULT,
            child_relid=msg.child_relid,
            openid=msg.openid,
            status=self.open_status,
        )

    def on_closechannel(self, msg) -> None:
        ch = self.channels[msg.child_relid]
        ch.reader = ch.writer = None

    def on_relid_released(self, msg) -> None:
        self.released.append(msg.child_relid)

    def on_modifychannel(self, msg) -> None:
        self.send(MsgType.MODIFYCHANNEL_RESPONSE, child_relid=msg.child_relid, status=0)

    def on_unload(self, msg) -> None:
        self.send(MsgType.UNLOAD_RESPONSE)

    def signal_event(self, connection_id: int) -> None:
        ch = next(c for c in self.channels.values() if c.offer["connection_id"] == connection_id)
        ch.signals += 1
        self.drain(ch)

    def drain(self, ch: HostChannel) -> None:
        assert ch.reader is not None
        raws, _ = ch.reader.read_all()
        for raw in raws:
            pkt = vp.parse_packet(raw)
            ch.received.append(pkt)
            if not ch.echo:
                continue
            if pkt.completion_requested:
                self.write(ch, vp.build_completion(b"ok:" + pkt.payload, pkt.trans_id))
            elif pkt.type == vp.PacketType.DATA_INBAND:
                self.write(ch, vp.build_inband(pkt.payload))

    def write(self, ch: HostChannel, packet: bytes, **kw: bool) -> bool:
        assert ch.writer is not None and self.guest is not None
        res = ch.writer.write(packet, **kw)
        if res.signal:
            self.guest.on_event(ch.relid)
        return res.written


def setup(
    versions: tuple[int, ...] = (0x50003,), flavour: str = "6.12", strict: bool = True, **offer: object
) -> tuple[MiniHost, VmbusGuest]:
    mem = GuestMemory(8 << 20)
    host = MiniHost(mem, versions)
    host.add(1, vm.ClassGuid.NETVSC, NIC_INSTANCE, **offer)
    host.add(2, vm.ClassGuid.VPCI, VPCI_INSTANCE)
    guest = VmbusGuest(host.transport(), mem, flavour=flavour, strict=strict)
    host.guest = guest
    return host, guest


def test_connect_and_offers() -> None:
    host, guest = setup()
    assert guest.connect() == 0x50003
    assert host.log == [(4, MsgType.INITIATE_CONTACT)]
    first = guest.posted[0]
    assert first.msg_sint == 2 and first.target_vcpu == 0 and first.monitor_page1 and first.monitor_page2
    channels = guest.request_offers()
    assert [c.relid for c in channels] == [1, 2]
    assert host.log[-1] == (4, MsgType.REQUESTOFFERS)  # msg_conn_id from VERSION_RESPONSE
    assert guest.find_channels(str(vm.ClassGuid.NETVSC))[0].if_instance == NIC_INSTANCE
    assert guest.all_offers_delivered and not guest.warnings


def test_version_walk_down_and_connection_ids() -> None:
    host, guest = setup(versions=(0x40000,))
    assert guest.connect() == 0x40000
    assert [conn for conn, _ in host.log] == [4, 4, 4, 4, 1, 1]
    last = guest.posted[-1]
    assert last.vmbus_version_requested == 0x40000
    assert last.interrupt_page == guest.int_page * 4096
    assert guest.msg_conn_id == 1
    _, guest73 = setup(versions=(0x60000, 0x50003), flavour="7.3")
    assert guest73.connect() == 0x60000


def test_connect_failures() -> None:
    host, guest = setup(versions=(0x20004,), flavour="7.3")  # 7.3 dropped 2.4
    with pytest.raises(GuestOperationFailed):
        guest.connect()
    host, guest = setup()
    host.silent.add(MsgType.INITIATE_CONTACT)
    with pytest.raises(GuestHang):
        guest.connect()


def test_open_netvsc_sized_ring_gpadl() -> None:
    host, guest = setup()
    guest.connect()
    guest.request_offers()
    ch = guest.open_channel(1, send_pages=128, recv_pages=128, target_vp=1)
    kinds = [t for _, t in host.log]
    assert kinds.count(MsgType.GPADL_HEADER) == 1 and kinds.count(MsgType.GPADL_BODY) == 9
    gpadl = host.gpadls[ch.ring_gpadl]
    assert ch.ring_gpadl == vm.FIRST_GPADL_HANDLE
    assert gpadl.pfns == ch.ring_pfns and len(gpadl.pfns) == 256
    assert any(b != a + 1 for a, b in zip(gpadl.pfns, gpadl.pfns[1:]))  # not contiguous
    opened = [m for m in guest.posted if m.msgtype is MsgType.OPENCHANNEL][0]
    assert opened.downstream_ringbuffer_pageoffset == 128 and opened.target_vp == 1 and opened.openid == 1
    assert host.channels[1].reader.ring.data_size == 127 * 4096


def test_ring_round_trip_both_directions() -> None:
    host, guest = setup()
    guest.connect()
    guest.request_offers()
    ch = guest.open_channel(2)
    events = []
    ch.on_event = lambda c: events.append(c.relid)
    tid = ch.send_inband(b"hello", completion_requested=True)
    assert tid == 1 and ch.outstanding == {1}
    hc = host.channels[2]
    assert hc.signals == 1 and hc.received[0].payload == b"hello\0\0\0"
    assert events == [2]
    packets = ch.receive()
    assert [(p.type, p.trans_id, p.payload) for p in packets] == [
        (vp.PacketType.COMP, 1, b"ok:hello\0\0\0\0\0\0\0\0")
    ]
    assert ch.outstanding == frozenset()
    # Host → guest unsolicited packet.
    assert host.write(hc, vp.build_inband(b"from-host", trans_id=0))
    assert events == [2, 2]
    assert ch.receive()[0].payload.rstrip(b"\0") == b"from-host"


def test_many_packets_wrap_both_rings() -> None:
    host, guest = setup()
    guest.connect()
    guest.request_offers()
    ch = guest.open_channel(2, send_pages=2, recv_pages=2)  # 4 KiB data areas: wraps quickly
    hc = host.channels[2]
    got: list[bytes] = []
    for i in range(300):
        payload = bytes([i % 251]) * (1 + (i * 53) % 700)
        ch.send_inband(payload)
        got.extend(p.payload[: len(payload)] for p in ch.receive())
    assert len(hc.received) == 300
    assert got == [bytes([i % 251]) * (1 + (i * 53) % 700) for i in range(300)]
    assert hc.reader.ring.read_index == hc.reader.ring.write_index


def test_guest_signals_blocked_host_via_pending_send_sz() -> None:
    host, guest = setup()
    guest.connect()
    guest.request_offers()
    ch = guest.open_channel(2, send_pages=2, recv_pages=2)
    hc = host.channels[2]
    big = vp.build_inband(bytes(1000))
    n = 0
    while host.write(hc, big, set_pending_on_full=True):
        n += 1
    assert n == 3 and hc.writer.ring.pending_send_sz == len(big) + 8
    before = hc.signals
    hc.echo = False
    assert len(ch.receive()) == 3
    assert hc.signals == before + 1  # hv_pkt_iter_close: full → enough space
    assert host.write(hc, big, set_pending_on_full=True)


def test_invalid_completion_is_reported() -> None:
    host, guest = setup()
    guest.connect()
    guest.request_offers()
    ch = guest.open_channel(2)
    host.write(host.channels[2], vp.build_completion(b"", trans_id=17))
    with pytest.raises(GuestProtocolError, match="Invalid transaction ID"):
        ch.receive()


def test_oversized_host_packet_is_reported() -> None:
    host, guest = setup(strict=False)
    guest.connect()
    guest.request_offers()
    ch = guest.open_channel(2, send_pages=3, recv_pages=3, max_pkt_size=4096)
    host.write(host.channels[2], vp.build_inband(bytes(4096)))
    assert len(ch.receive()) == 1
    assert "truncates" in guest.warnings[0]


def test_close_tears_down_ring_gpadl() -> None:
    host, guest = setup()
    guest.connect()
    guest.request_offers()
    ch = guest.open_channel(2)
    free = guest.memory.free_page_count
    ch.close()
    assert [t for _, t in host.log][-2:] == [MsgType.CLOSECHANNEL, MsgType.GPADL_TEARDOWN]
    assert not host.gpadls and not ch.is_open
    assert guest.memory.free_page_count == free + 10


def test_rescind_of_open_channel() -> None:
    host, guest = setup()
    guest.connect()
    guest.request_offers()
    guest.open_channel(1)
    n = len(host.log)
    host.send(MsgType.RESCIND_CHANNELOFFER, child_relid=1)
    guest.poll()
    assert [t for _, t in host.log[n:]] == [MsgType.CLOSECHANNEL, MsgType.RELID_RELEASED]
    assert host.released == [1] and 1 not in guest.channels
    guest.on_event(1)  # events for a gone relid are ignored


def test_open_failure_and_gpadl_status() -> None:
    host, guest = setup()
    guest.connect()
    guest.request_offers()
    host.open_status = 0xC0000001
    with pytest.raises(GuestOperationFailed, match="EAGAIN"):
        guest.open_channel(1)
    assert not host.gpadls  # the ring GPADL was torn down again
    host.silent.add(MsgType.GPADL_HEADER)
    with pytest.raises(GuestHang):
        guest.create_gpadl(1, [100])


def test_modify_and_unload() -> None:
    host, guest = setup()
    guest.connect()
    guest.request_offers()
    guest.modify_channel(1, 1)
    assert host.log[-1][1] is MsgType.MODIFYCHANNEL
    guest.unload()
    assert host.log[-1][1] is MsgType.UNLOAD and guest.version is None


def test_guest_rejects_what_linux_rejects() -> None:
    host, guest = setup(strict=False)
    guest.connect()
    guest.request_offers()
    host.send(
        MsgType.OFFERCHANNEL,
        if_type=vm.ClassGuid.NETVSC,
        if_instance=NIC_INSTANCE,
        child_relid=9,
        connection_id=9,
    )
    host.send(MsgType.REQUESTOFFERS)  # G→H type: no guest handler
    guest.on_channel_message(vm.build_message(MsgType.OPENCHANNEL_RESULT, child_relid=1, openid=1)[:12])
    guest.on_channel_message((30).to_bytes(4, "little") + bytes(4))
    guest.poll()
    assert len(guest.warnings) == 4
    assert "no guest handler" in guest.warnings[0] and "minimum" in guest.warnings[1]
    assert "unknown msgtype 30" in guest.warnings[2] and "duplicates" in guest.warnings[3]
    host73, guest73 = setup(flavour="7.3", strict=False, chn_flags=0x4)
    guest73.connect()
    guest73.request_offers()
    assert 1 not in guest73.channels and "confidential" in guest73.warnings[0]


def test_monitor_allocated_offer_uses_monitor_page() -> None:
    host, guest = setup(monitor_allocated=True, monitorid=33)
    guest.connect()
    guest.request_offers()
    ch = guest.open_channel(1)
    host.channels[1].echo = False
    ch.send_inband(b"x")
    assert host.channels[1].signals == 0  # no hypercall at all (channel.c:vmbus_setevent)
    pending = guest.memory.read(guest.monitor_pages[1] * 4096 + 8 + 8 * 1, 4)
    assert int.from_bytes(pending, "little") == 1 << 1


def test_guest_memory_allocator() -> None:
    mem = GuestMemory(1 << 20, reserved_pages=4)
    scattered = mem.alloc_pages(4)
    assert scattered == sorted(scattered, reverse=True) and scattered[0] - scattered[-1] == 6
    run = mem.alloc_pages(3, contiguous=True)
    assert run == list(range(run[0], run[0] + 3))
    mem.write(run[0] * 4096 + 10, b"abc")
    assert bytes(mem.page(run[0])[10:13]) == b"abc"
    mem.free_pages(run)
    with pytest.raises(MemoryError):
        mem.alloc_pages(10_000)
    with pytest.raises(ValueError):
        mem.page(1 << 30)


def test_events_for_closed_channels_and_7_3_hiwater() -> None:
    host, guest = setup(strict=False)
    guest.connect()
    guest.request_offers()
    guest.on_event(2)  # offered, not open
    assert "not open" in guest.warnings[-1]
    guest.on_event(0)
    guest.on_event(1500)
    assert len(guest.warnings) == 1
    _, guest73 = setup(flavour="7.3", versions=(0x60000,))
    guest73.connect()
    guest73.request_offers()
    assert guest73.relid_hiwater == 2
    guest73.on_event(3)  # above hiwater: not even scanned


def test_split_ring_gpadl_validates_offset() -> None:
    pages = [memoryview(bytearray(4096)) for _ in range(6)]
    g2h, h2g = split_ring_gpadl(pages, 2)
    assert g2h.data_size == 4096 and h2g.data_size == 3 * 4096
    for bad in (0, 1, 5, 6, 100):
        with pytest.raises(RingViolation) as exc:
            split_ring_gpadl(pages, bad, channel=3)
        assert exc.value.field == "downstream_ringbuffer_pageoffset" and exc.value.channel == 3


def test_unload_skipped_below_3_0_on_6x() -> None:
    host, guest = setup(versions=(0x20004,))
    assert guest.connect() == 0x20004
    n = len(host.log)
    guest.unload()
    assert len(host.log) == n and guest.version is None

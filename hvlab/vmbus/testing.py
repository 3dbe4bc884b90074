"""Glue to run the VMBus server (and its devices) against the pure-Python guest model, without a VM.

``ModelSynic`` plays the platform's SynIC with real slot semantics: one 256-byte message slot per VP,
``post`` refuses a busy slot and sets msg_pending, and the "guest" frees the slot and writes EOM (which
calls ``server.on_eom``) only when it runs — eagerly inside ``post`` or when ``pump()`` is called.
Channel interrupts are queued and delivered by ``pump()``, like a real interrupt that arrives after
the host's call returned. ``ModelRam`` exposes the guest model's memory as ``GuestRam``.
``HvUtilsModel`` answers IC requests the way Linux's hv_utils does.

Used by the unit tests and by device-model tests (netvsp, vpci) that need a working bus.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hvlab.protocol import ic
from hvlab.protocol import vmbus as vm
from hvlab.protocol import vmbus_packet as vp
from hvlab.vmbus.channel import Channel, GpadlBuffer
from hvlab.vmbus.device import VmbusDevice
from hvlab.vmbus.guest_model import GuestChannel, GuestMemory, GuestTransport, VmbusGuest
from hvlab.vmbus.server import VmbusServer

TEST_CLASS = uuid.UUID("6d1f2b8e-0c3a-4e7b-9a51-2f6c0d8e4b13")
"""Class GUID of EchoDevice (no Linux driver binds it)."""


class ModelRam:
    """GuestRam over a guest-model GuestMemory (GPA 0 = byte 0)."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def contains(self, gpa: int, length: int = 1) -> bool:
        return gpa >= 0 and length >= 0 and gpa + length <= len(self.memory.buf)

    def view_at(self, gpa: int, length: int) -> memoryview:
        if not self.contains(gpa, length):
            raise ValueError(f"GPA range {gpa:#x}+{length} is not guest RAM")
        return self.memory.view[gpa : gpa + length]


class ModelSynic:
    """A SynicPort whose far side is a VmbusGuest model, with one message slot per VP."""

    def __init__(self, *, eager: bool = True) -> None:
        self.eager = eager
        self.server: VmbusServer | None = None
        self.guest: VmbusGuest | None = None
        self._pages: dict[int, bytearray] = {}
        self.posted: list[tuple[int, int, bytes]] = []
        """Every message placed in a slot: (vp, sint, payload)."""
        self.busy = 0
        """How many posts found the slot occupied."""
        self.eoms = 0
        self.events: deque[tuple[int, int]] = deque()
        """Interrupts raised by the host and not yet delivered to the guest: (vp, relid)."""
        self.signalled: list[tuple[int, int]] = []

    def slot(self, vp_index: int) -> memoryview:
        page = self._pages.setdefault(vp_index, bytearray(vm.PAGE_SIZE))
        off = vm.SYNIC_MESSAGE_SLOT_OFFSET
        return memoryview(page)[off : off + vm.HV_MESSAGE_SIZE]

    # SynicPort ---------------------------------------------------------------------------------
    def post(self, vp: int, sint: int, payload: bytes) -> bool:
        slot = self.slot(vp)
        if not vm.slot_is_free(slot):
            vm.set_msg_pending(slot)
            self.busy += 1
            return False
        vm.write_message_slot(slot, payload)
        self.posted.append((vp, sint, bytes(payload)))
        if self.eager:
            self.consume(vp)
        return True

    def signal_event(self, vp: int, relid: int) -> None:
        self.events.append((vp, relid))
        self.signalled.append((vp, relid))

    # The guest's side ---------------------------------------------------------------------------
    def consume(self, vp_index: int) -> bool:
        """vmbus_on_msg_dpc(): copy the slot, free it, and write EOM only if msg_pending was set."""
        slot = self.slot(vp_index)
        if vm.slot_is_free(slot):
            return False
        data = bytes(slot)
        slot[0:4] = bytes(4)
        if self.guest is not None:
            self.guest.on_message(data)
        if data[5] & vm.HV_MESSAGE_FLAG_MSG_PENDING:
            self.eoms += 1
            if self.server is not None:
                self.server.on_eom(vp_index)
        return True

    def deliver_events(self) -> int:
        n = 0
        while self.events:
            _, relid = self.events.popleft()
            if self.guest is not None:
                self.guest.on_event(relid)
            n += 1
        return n

    def pump(self) -> None:
        """One guest interrupt: every VP's slot once, then pending channel events."""
        for vp_index in list(self._pages):
            self.consume(vp_index)
        self.deliver_events()


@dataclass
class Bus:
    """A server and a guest model wired together."""

    server: VmbusServer
    guest: VmbusGuest
    synic: ModelSynic
    memory: GuestMemory
    ram: ModelRam

    def run(self, rounds: int = 50) -> None:
        """Let both sides settle: deliver messages and interrupts until nothing is left."""
        for _ in range(rounds):
            before = (len(self.synic.posted), len(self.synic.signalled), self.synic.eoms)
            self.synic.pump()
            self.guest.poll()
            after = (len(self.synic.posted), len(self.synic.signalled), self.synic.eoms)
            if before == after and not self.synic.events and not self.server.pending_messages():
                return

    def connect(self) -> list[GuestChannel]:
        self.guest.connect()
        return self.guest.request_offers()


def make_bus(
    devices: Iterable[VmbusDevice] = (),
    *,
    flavour: str = "6.12",
    versions: Sequence[int] | None = None,
    guest_versions: Sequence[int] | None = None,
    eager: bool = True,
    timeline: Any = None,
    strict: bool = True,
    memory_size: int = 8 << 20,
    **server_kw: Any,
) -> Bus:
    """Server (``versions`` accepted) + guest model (``flavour``) over one ModelSynic and RAM."""
    memory = GuestMemory(memory_size)
    ram = ModelRam(memory)
    synic = ModelSynic(eager=eager)
    server = VmbusServer(synic, ram, timeline=timeline, versions=versions, **server_kw)
    guest_ref: list[VmbusGuest] = []

    def post_message(data: bytes) -> int:
        post = vm.parse_post_message(data)
        return server.handle_post_message(
            guest_ref[0].vp_index, post.connection_id, post.message_type, post.payload
        )

    transport = GuestTransport(
        post_message=post_message, signal_event=server.handle_signal_event, pump=synic.pump
    )
    guest = VmbusGuest(transport, memory, flavour=flavour, versions=guest_versions, strict=strict)
    guest_ref.append(guest)
    synic.server = server
    synic.guest = guest
    for device in devices:
        server.add_device(device)
    return Bus(server, guest, synic, memory, ram)


@dataclass
class HvUtilsModel:
    """Linux's hv_utils for one IC channel of the guest model (hv_util.c *_onchannelcallback).

    ``kind`` is "heartbeat", "shutdown" or "timesync". Attach with ``HvUtilsModel(channel, kind)``: it installs
    itself as the channel's event callback, reads every request, answers in place and records what a
    real guest would do (``negotiated``, ``heartbeats``, ``actions``).
    """

    channel: GuestChannel
    kind: str
    hibernation_supported: bool = False
    negotiated: tuple[int, int] | None = None
    heartbeats: list[int] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    requests: list[ic.IcMessage] = field(default_factory=list)
    samples: list[ic.TimeSample] = field(default_factory=list)
    enabled: bool = True

    def __post_init__(self) -> None:
        self.channel.on_event = lambda _ch: self.process()

    def process(self) -> None:
        if not self.enabled or not self.channel.is_open:
            return
        for packet in self._read():
            if packet.type != vp.PacketType.DATA_INBAND:
                continue
            response = self.respond(packet.payload)
            if response is not None:
                self.channel.send_inband(response, trans_id=packet.trans_id)

    def _read(self) -> list[vp.Packet]:
        """Heartbeat/timesync loop until the ring is empty; shutdown reads one packet per interrupt."""
        if self.kind != "shutdown":
            return self.channel.receive()
        reader = self.channel.inbound
        assert reader is not None
        raw = reader.read()
        if raw is None:
            return []
        if reader.commit():
            self.channel.guest._set_event(self.channel)
        return [vp.parse_packet(raw)]

    def respond(self, payload: bytes) -> bytes | None:
        msg = ic.parse_ic_message(payload)
        self.requests.append(msg)
        service = {"heartbeat": ic.HEARTBEAT_VERSIONS, "shutdown": ic.SHUTDOWN_VERSIONS,
                   "timesync": ic.TIMESYNC_VERSIONS}[self.kind]
        if msg.header.msgtype == ic.ICMSGTYPE_NEGOTIATE:
            out, fw, srv = ic.guest_negotiate_response(payload, ic.FRAMEWORK_VERSIONS, service)
            if fw is not None and srv is not None:
                self.negotiated = (fw, srv)
            return out
        if self.kind == "heartbeat" and msg.header.msgtype == ic.ICMSGTYPE_HEARTBEAT:
            self.heartbeats.append(ic.parse_heartbeat(msg.body))
            return ic.guest_heartbeat_response(payload)
        if self.kind == "shutdown" and msg.header.msgtype == ic.ICMSGTYPE_SHUTDOWN:
            out, action = ic.guest_shutdown_response(
                payload, hibernation_supported=self.hibernation_supported
            )
            if action is not None:
                self.actions.append(action)
            return out
        if self.kind == "timesync" and msg.header.msgtype == ic.ICMSGTYPE_TIMESYNC:
            assert self.negotiated is not None
            out, sample = ic.guest_timesync_response(payload, self.negotiated[1])
            self.samples.append(sample)
            return out
        return None


class EchoDevice(VmbusDevice):
    """Completes what asks for a completion, echoes other in-band packets, records everything."""

    class_guid = TEST_CLASS
    name = "echo"

    def __init__(self, instance: str | None = None, **kw: Any) -> None:
        super().__init__(instance, **kw)
        self.opened: list[Channel] = []
        self.closed: list[Channel] = []
        self.packets: list[vp.Packet] = []
        self.space = 0
        self.removed = False
        self.torn_down: list[int] = []
        self.echo = True
        self.refuse_open = False

    def can_open(self, channel: Channel) -> bool:
        return not self.refuse_open

    def on_open(self, channel: Channel) -> None:
        self.opened.append(channel)

    def on_close(self, channel: Channel) -> None:
        self.closed.append(channel)

    def on_packet(self, channel: Channel, packet: vp.Packet) -> None:
        self.packets.append(packet)
        if not self.echo:
            return
        if packet.completion_requested:
            channel.send_completion(packet.trans_id, b"done:" + packet.payload.rstrip(b"\0"))
        elif packet.type == vp.PacketType.DATA_INBAND:
            channel.send_inband(b"echo:" + packet.payload.rstrip(b"\0"))

    def on_ring_space(self, channel: Channel) -> None:
        self.space += 1

    def on_gpadl_torn_down(self, channel: Channel, gpadl: GpadlBuffer) -> None:
        self.torn_down.append(gpadl.handle)

    def on_removed(self) -> None:
        self.removed = True

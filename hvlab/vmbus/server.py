"""The host side of VMBus: version negotiation, offers, GPADLs, channel life cycle and ring dispatch.

The server is free of KVM. Its two boundaries are:

* below, the Hyper-V platform (hvlab.hyperv) through ``SynicPort`` — ``post(vp, sint, payload)``
  places one channel message in a VP's SynIC message slot (False when the slot is busy: the server
  keeps the message queued and retries on ``on_eom``) and ``signal_event(vp, relid)`` sets a channel's
  event flag and interrupts the VP — and guest RAM through ``GuestRam`` (``contains``/``view_at``);
  the platform calls ``handle_post_message`` (HvPostMessage), ``handle_signal_event`` (HvSignalEvent
  or an ioeventfd) and ``on_eom`` (the guest wrote MSR EOM);
* above, device models (hvlab.vmbus.device.VmbusDevice) that see channels, packets and GPADLs.

The guest is untrusted: every message, GPADL page and ring index it supplies is checked; anything
unacceptable becomes a ``ProtocolViolation`` (recorded, counted, logged to "hvlab.vmbus" and sent to
the timeline) and the server carries on. Where Linux would wait forever for an answer (spec §9) the
server still answers — with a failure status — so a bad message cannot hang the guest either. Nothing
raises out of the ``handle_*``/``on_eom`` entry points.

Threading: vCPU threads and the event-loop thread call in concurrently; one re-entrant lock
(``server.lock``) serialises everything, devices included. The platform must not hold its own SynIC
lock while calling into the server (the server calls ``post``/``signal_event`` with its lock held).

References: spec/HOST_CONTRACT.md §2 (layouts, sequences) and §9 (waits without timeout); Linux
drivers/hv/connection.c, channel.c, channel_mgmt.c.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from hvlab.protocol import vmbus as vm
from hvlab.protocol import vmbus_packet as vp
from hvlab.protocol.vmbus import MsgType
from hvlab.vmbus.channel import Channel, ChannelState, GpadlBuffer, ProtocolViolation
from hvlab.vmbus.device import VmbusDevice
from hvlab.vmbus.ring import RingReader, RingViolation, RingWriter, SignalPolicy, split_ring_gpadl

__all__ = [
    "CHANNEL_CONNECTION_ID_BASE",
    "STATUS_UNSUCCESSFUL",
    "SUPPORTED_VERSIONS",
    "Channel",
    "ChannelState",
    "GpadlBuffer",
    "GuestRam",
    "ProtocolViolation",
    "SynicPort",
    "VmbusServer",
]

log = logging.getLogger("hvlab.vmbus")

SUPPORTED_VERSIONS: tuple[int, ...] = tuple(sorted(set(vm.VERSIONS_6_1) | set(vm.VERSIONS_7_3), reverse=True))
"""Every version Linux 6.1, 6.12 and 7.3 try (6.0 down to 2.4): each is accepted by default."""

CHANNEL_CONNECTION_ID_BASE = 0x10000
"""A channel's signal connection id is this plus its relid: unique per live channel, distinct from the
message connection ids 1 and 4, and inside the 24-bit id of hv_connection_id."""

STATUS_UNSUCCESSFUL = 0xC0000001
"""NTSTATUS used in OPENCHANNEL_RESULT / GPADL_CREATED / MODIFYCHANNEL_RESPONSE refusals (non-zero is
all Linux checks: -EAGAIN, -EDQUOT)."""

MAX_VIOLATION_RECORDS = 10_000
"""Violations kept in ``violations`` (the counter keeps counting): a hostile guest cannot exhaust memory."""


class SynicPort(Protocol):
    """What the server needs from the platform's SynIC (implemented by hvlab.hyperv and by tests)."""

    def post(self, vp: int, sint: int, payload: bytes) -> bool:
        """Deliver one channel message into the SINT slot of ``vp``; False if the slot is busy (the
        platform then sets msg_pending so the guest writes EOM, and calls ``on_eom``)."""
        ...

    def signal_event(self, vp: int, relid: int) -> None:
        """Set bit ``relid`` in ``vp``'s SIEF area of SINT 2 and interrupt the VP."""
        ...


class GuestRam(Protocol):
    """Guest physical memory (hvlab.kvm.memory.GuestMemory has these)."""

    def contains(self, gpa: int, length: int = 1) -> bool: ...

    def view_at(self, gpa: int, length: int) -> memoryview: ...


class VmbusServer:
    """Host-side VMBus for one VM.

    ``versions``: protocol versions accepted (default: all that 6.1/6.12/7.3 try).
    ``refusal``: how an unsupported INITIATE_CONTACT version is refused — ``"auto"`` (real Hyper-V:
    a host with no ≥ 5.0 version has no connection id 4, so ≥ 5.0 requests fail with status 18,
    HV_STATUS_INVALID_CONNECTION_ID; anything else gets VERSION_RESPONSE version_supported = 0),
    ``"response"`` (always VERSION_RESPONSE 0) or ``"status"`` (always status 18).
    ``msg_conn_id``: returned in VERSION_RESPONSE for ≥ 5.0; 4 keeps one id for all messages.
    ``signal_policy``: when a host write interrupts the guest (real Hyper-V: empty → non-empty).
    """

    def __init__(
        self,
        synic: SynicPort,
        ram: GuestRam,
        *,
        timeline: Any = None,
        versions: Iterable[int] | None = None,
        refusal: str = "auto",
        msg_conn_id: int = vm.VMBUS_MESSAGE_CONNECTION_ID_4,
        signal_policy: SignalPolicy = SignalPolicy.EMPTY_TO_NONEMPTY,
        lock: Any = None,
    ) -> None:
        if refusal not in ("auto", "response", "status"):
            raise ValueError("refusal must be 'auto', 'response' or 'status'")
        self.synic = synic
        self.ram = ram
        self.timeline = timeline
        self.versions: tuple[int, ...] = (
            tuple(sorted(set(versions), reverse=True)) if versions else SUPPORTED_VERSIONS
        )
        self.refusal = refusal
        self.msg_conn_id = msg_conn_id
        self.signal_policy = signal_policy
        self.lock = lock if lock is not None else threading.RLock()

        # Connection state.
        self.version: int | None = None
        self.message_vp = 0
        self.sint = vm.VMBUS_MESSAGE_SINT
        self.monitor_pages: tuple[int, int] = (0, 0)
        self.interrupt_page = 0
        self.feature_flags = 0
        self.offers_requested = False
        self.negotiations: list[tuple[int, bool]] = []
        """Every INITIATE_CONTACT seen: (version, accepted)."""

        # Devices, channels, GPADLs.
        self.devices: list[VmbusDevice] = []
        self.channels: dict[int, Channel] = {}
        """Live channels by relid (including rescinded ones waiting for RELID_RELEASED)."""
        self._by_connection: dict[int, Channel] = {}
        self.gpadls: dict[int, GpadlBuffer] = {}
        self._assembler = vm.GpadlAssembler()
        self.on_channels_changed: Callable[[dict[int, int]], None] | None = None
        """Called with channel_connection_ids() whenever it changes (the platform's ioeventfds)."""

        # Message delivery (one FIFO per VP; the SINT is the bus-wide one).
        self._queues: dict[int, deque[tuple[int, bytes]]] = {}
        """Per VP: (sint, payload) not yet placed in the slot, oldest first."""
        self._flushing: set[int] = set()

        # Diagnostics.
        self.violations: list[ProtocolViolation] = []
        self.violation_count = 0
        self.messages_in = 0
        self.messages_out = 0

    # ==============================================================================================
    # Platform entry points
    # ==============================================================================================

    @property
    def connected(self) -> bool:
        return self.version is not None

    def handle_post_message(self, vp: int, connection_id: int, message_type: int, payload: bytes) -> int:
        """HvPostMessage from ``vp``: returns the hypercall status (0, or 5 / 18 on refusal)."""
        with self.lock:
            try:
                return self._post_message(vp, connection_id, message_type, bytes(payload))
            except Exception as exc:  # never let a host bug escape into the vCPU thread
                log.exception("VMBus server failed on a posted message")
                self._event("vmbus.internal_error", where="post_message", error=repr(exc))
                return vm.HV_STATUS_SUCCESS

    def handle_signal_event(self, connection_id: int) -> int:
        """HvSignalEvent / ioeventfd for a channel: drain its outbound ring. Returns the HV status."""
        with self.lock:
            try:
                channel = self._by_connection.get(connection_id & 0xFFFFFF)
                if channel is None:
                    self._violation(None, "signal", "connection_id", connection_id, "no channel has this id")
                    return vm.HV_STATUS_INVALID_CONNECTION_ID
                channel.signals_in += 1
                if channel.is_open:
                    self._drain(channel)
                return vm.HV_STATUS_SUCCESS
            except Exception as exc:
                log.exception("VMBus server failed on a signal")
                self._event("vmbus.internal_error", where="signal_event", error=repr(exc))
                return vm.HV_STATUS_SUCCESS

    def on_eom(self, vp: int) -> None:
        """The guest freed the slot on ``vp`` (EOM): deliver the next queued message(s)."""
        with self.lock:
            try:
                self._flush(vp)
            except Exception as exc:
                log.exception("VMBus server failed on EOM")
                self._event("vmbus.internal_error", where="on_eom", error=repr(exc))

    def retry_pending(self) -> None:
        """Retry every queued message (a polling backstop for a missed EOM)."""
        with self.lock:
            for vp_index in list(self._queues):
                self.on_eom(vp_index)

    def install_backstop(self, scheduler: Any, interval: float = 0.05) -> None:
        """Every ``interval`` seconds retry queued messages and drain open channels: cheap insurance
        against a lost EOM or a guest signal the platform missed (spec §2.9). ``scheduler`` is a
        hvlab.vmbus.loop Scheduler; the ticks take the server lock themselves."""

        def tick() -> None:
            self.retry_pending()
            self.poll_channels()
            scheduler.schedule(interval, tick)

        scheduler.schedule(interval, tick)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-friendly summary of the bus (for reports, the CLI and failure messages)."""
        with self.lock:
            return {
                "version": vm.version_str(self.version) if self.version is not None else None,
                "message_vp": self.message_vp,
                "offers_requested": self.offers_requested,
                "messages_in": self.messages_in,
                "messages_out": self.messages_out,
                "pending_messages": self.pending_messages(),
                "violations": self.violation_count,
                "gpadls": len(self.gpadls),
                "channels": [
                    {
                        "relid": ch.relid,
                        "device": ch.device.name,
                        "sub_channel_index": ch.sub_channel_index,
                        "state": ch.state.value,
                        "broken": ch.broken,
                        "target_vp": ch.target_vp,
                        "packets_in": ch.packets_in,
                        "packets_out": ch.packets_out,
                        "signals_in": ch.signals_in,
                        "signals_out": ch.signals_out,
                        "blocked": ch.blocked,
                        "guest_to_host": ch.reader.ring.control() if ch.reader is not None else None,
                        "host_to_guest": ch.writer.ring.control() if ch.writer is not None else None,
                    }
                    for ch in sorted(self.channels.values(), key=lambda c: c.relid)
                ],
            }

    def pending_messages(self, vp: int | None = None) -> int:
        """Messages queued behind a busy slot (on ``vp`` or on all VPs)."""
        with self.lock:
            if vp is not None:
                return len(self._queues.get(vp, ()))
            return sum(len(q) for q in self._queues.values())

    def channel_connection_ids(self) -> dict[int, int]:
        """relid → signal connection id of every live channel (for ioeventfds)."""
        with self.lock:
            return {relid: ch.connection_id for relid, ch in sorted(self.channels.items())}

    # ==============================================================================================
    # Devices
    # ==============================================================================================

    def add_device(self, device: VmbusDevice) -> Channel:
        """Register a device; it is offered now if the guest already asked for offers (hot add),
        else with the others at REQUESTOFFERS. Returns its primary channel."""
        with self.lock:
            if device in self.devices:
                raise ValueError(f"{device!r} was already added")
            for other in self.devices:
                if (other.class_guid, other.instance_guid) == (device.class_guid, device.instance_guid):
                    raise ValueError(f"{device!r} duplicates the GUIDs of {other!r}")
            device.attach(self)
            self.devices.append(device)
            channel = self._new_channel(device, 0)
            self._event(
                "vmbus.device",
                device=device.name,
                action="add",
                relid=channel.relid,
                class_guid=str(device.class_guid),
                instance=str(device.instance_guid),
            )
            if self.offers_requested:
                self._offer(channel)
            return channel

    def offer_subchannel(self, device: VmbusDevice) -> Channel:
        """One more channel for ``device`` with the next sub_channel_index (offered at once if possible)."""
        with self.lock:
            if device not in self.devices or not device.channels:
                raise ValueError(f"{device!r} is not a live device of this server")
            index = max(c.sub_channel_index for c in device.channels) + 1
            channel = self._new_channel(device, index)
            if self.offers_requested:
                self._offer(channel)
            return channel

    def remove_device(self, device: VmbusDevice) -> None:
        """Rescind every channel of ``device`` (sub-channels first). The relids stay reserved until the
        guest sends RELID_RELEASED; ``device.on_removed()`` runs when the last one is released."""
        with self.lock:
            if device not in self.devices:
                return
            self._event("vmbus.device", device=device.name, action="remove")
            for channel in sorted(device.channels, key=lambda c: -c.sub_channel_index):
                self._rescind(channel)

    def rescind_channel(self, channel: Channel) -> None:
        """Rescind one channel (e.g. a stale netvsc sub-channel) without removing its device: the guest
        closes it and sends RELID_RELEASED; the relid stays reserved until then."""
        with self.lock:
            if self.channels.get(channel.relid) is not channel:
                raise ValueError(f"{channel!r} is not a live channel of this server")
            self._rescind(channel)

    def find_device(self, class_guid: vm.GuidLike) -> list[VmbusDevice]:
        want = vm.to_uuid(class_guid)
        with self.lock:
            return [d for d in self.devices if d.class_guid == want]

    # ==============================================================================================
    # Incoming messages
    # ==============================================================================================

    def _accepted_connection_ids(self) -> set[int]:
        ids = {vm.VMBUS_MESSAGE_CONNECTION_ID}
        if self._supports_v5():
            ids.add(vm.VMBUS_MESSAGE_CONNECTION_ID_4)
            if self.connected:
                ids.add(self.msg_conn_id)
        return ids

    def _supports_v5(self) -> bool:
        return any(v >= vm.VmbusVersion.V5_0 for v in self.versions)

    def _post_message(self, vp_index: int, connection_id: int, message_type: int, payload: bytes) -> int:
        if message_type == vm.HVMSG_NONE or message_type & 0x80000000:
            self._violation(None, "post", "message_type", message_type, "not a partition message type")
            return vm.HV_STATUS_INVALID_PARAMETER
        if len(payload) > vm.MAX_MESSAGE_PAYLOAD:
            self._violation(None, "post", "payload_size", len(payload), "more than 240 bytes")
            return vm.HV_STATUS_INVALID_PARAMETER
        conn = connection_id & 0xFFFFFF
        contact_on_4 = conn == vm.VMBUS_MESSAGE_CONNECTION_ID_4 and payload[:4] == bytes(
            [MsgType.INITIATE_CONTACT, 0, 0, 0]
        )
        if conn not in self._accepted_connection_ids() and not contact_on_4:
            # (INITIATE_CONTACT on id 4 is let through: its refusal is part of version negotiation.)
            if conn == vm.VMBUS_MESSAGE_CONNECTION_ID_REDIRECT:
                self._event("vmbus.post_refused", vp=vp_index, connection_id=conn, reason="no VTL2 redirect")
            else:
                self._violation(None, "post", "connection_id", conn, "not a message connection id")
            return vm.HV_STATUS_INVALID_CONNECTION_ID
        try:
            mtype = vm.message_type(payload)
        except vm.MessageError as exc:
            self._violation(None, "post", "payload_size", len(payload), str(exc))
            return vm.HV_STATUS_SUCCESS
        try:
            msg = vm.parse_message(payload)
        except vm.MessageError as exc:
            name = MsgType(mtype).name if mtype in MsgType._value2member_map_ else str(mtype)
            field = "msgtype" if name == str(mtype) else "length"
            self._violation(None, name, field, mtype if field == "msgtype" else len(payload), str(exc))
            return vm.HV_STATUS_SUCCESS
        self.messages_in += 1
        self._event("vmbus.rx", vp=vp_index, post_connection_id=conn, **vm.describe(msg))
        msgtype: MsgType = msg.msgtype
        if vm.DIRECTION.get(msgtype) is not vm.Direction.G2H:
            self._violation(
                getattr(msg, "child_relid", None),
                msgtype.name,
                "msgtype",
                int(msgtype),
                "a host-to-guest message type posted by the guest",
            )
            return vm.HV_STATUS_SUCCESS
        if msgtype is MsgType.INITIATE_CONTACT:
            return self._on_initiate_contact(vp_index, conn, msg)
        if not self.connected:
            self._violation(
                getattr(msg, "child_relid", None),
                msgtype.name,
                "msgtype",
                int(msgtype),
                "sent before a version was negotiated",
            )
            return vm.HV_STATUS_SUCCESS
        handler = self._handlers.get(msgtype)
        if handler is None:
            self._event("vmbus.ignored", msgtype=msgtype.name, reason="not supported by this host")
        else:
            handler(self, msg)
        return vm.HV_STATUS_SUCCESS

    # Connection ----------------------------------------------------------------------------------
    def _on_initiate_contact(self, vp_index: int, conn: int, msg: Any) -> int:
        version = msg.vmbus_version_requested
        target = msg.target_vcpu
        if self.connected:
            self._reset("INITIATE_CONTACT while connected")
        accepted = version in self.versions
        reason = "" if accepted else "version not supported"
        sint = vm.VMBUS_MESSAGE_SINT
        if accepted and version >= vm.VmbusVersion.V5_0:
            if not 0 < msg.msg_sint < 16:
                self._violation(None, "INITIATE_CONTACT", "msg_sint", msg.msg_sint, "not a usable SINT")
                accepted, reason = False, "bad msg_sint"
            elif msg.msg_vtl != 0:
                accepted, reason = False, f"VTL {msg.msg_vtl} is not supported"
            else:
                sint = msg.msg_sint
        self.negotiations.append((version, accepted))
        if not accepted:
            refuse_by_status = self.refusal == "status" or (
                self.refusal == "auto" and version >= vm.VmbusVersion.V5_0 and not self._supports_v5()
            )
            self._event(
                "vmbus.connection",
                state="refused",
                version=vm.version_str(version),
                reason=reason,
                by="status 18" if refuse_by_status else "VERSION_RESPONSE",
            )
            if refuse_by_status:
                return vm.HV_STATUS_INVALID_CONNECTION_ID
            self._send(MsgType.VERSION_RESPONSE, vp=target, sint=sint, version_supported=0, msg_conn_id=0)
            return vm.HV_STATUS_SUCCESS
        self.version = version
        self.message_vp = target
        self.sint = sint
        self.monitor_pages = (msg.monitor_page1, msg.monitor_page2)
        if version < vm.VmbusVersion.V5_0:
            self.interrupt_page = msg.interrupt_page
            self.feature_flags = 0
        else:
            self.interrupt_page = 0
            self.feature_flags = msg.feature_flags
        self.offers_requested = False
        self._event(
            "vmbus.connection",
            state="connected",
            version=vm.version_str(version),
            target_vcpu=target,
            sint=sint,
            feature_flags=self.feature_flags,
        )
        conn_id = self.msg_conn_id if version >= vm.VmbusVersion.V5_0 else 0
        self._send(MsgType.VERSION_RESPONSE, version_supported=1, msg_conn_id=conn_id)
        return vm.HV_STATUS_SUCCESS

    def _on_requestoffers(self, msg: Any) -> None:
        if self.offers_requested:
            self._event("vmbus.note", text="REQUESTOFFERS again: offering what was not offered yet")
        self.offers_requested = True
        for channel in self._ordered_channels():
            if channel.state is ChannelState.IDLE:
                self._offer(channel)
        self._send(MsgType.ALLOFFERS_DELIVERED)

    def _on_unload(self, msg: Any) -> None:
        self._reset("UNLOAD")
        self._send(MsgType.UNLOAD_RESPONSE)
        self.version = None
        self._event("vmbus.connection", state="unloaded")

    def _reset(self, reason: str) -> None:
        """Forget the guest's side of everything: close channels, drop GPADLs and queued messages,
        release rescinded relids; devices stay and are offered again at the next REQUESTOFFERS."""
        self._event("vmbus.reset", reason=reason)
        for queue in self._queues.values():
            queue.clear()
        for channel in list(self.channels.values()):
            if channel.state is ChannelState.OPEN:
                self._close(channel, reason)
            if channel.state is ChannelState.RESCINDED:
                self._release(channel, reason)
            elif channel.state is not ChannelState.RELEASED:
                self._set_state(channel, ChannelState.IDLE, reason)
        self.gpadls.clear()
        self._assembler = vm.GpadlAssembler()
        self.offers_requested = False
        self.version = None

    # GPADLs --------------------------------------------------------------------------------------
    def _gpadl_created(self, relid: int, handle: int, status: int = 0) -> None:
        self._send(MsgType.GPADL_CREATED, child_relid=relid, gpadl=handle, creation_status=status)

    def _on_gpadl_header(self, msg: Any) -> None:
        if msg.gpadl in self.gpadls:
            self._violation(msg.child_relid, "GPADL_HEADER", "gpadl", msg.gpadl, "handle already in use")
            self._gpadl_created(msg.child_relid, msg.gpadl, STATUS_UNSUCCESSFUL)
            return
        try:
            done = self._assembler.feed(msg)
        except vm.MessageError as exc:
            self._violation(msg.child_relid, "GPADL_HEADER", "range", msg.gpadl, str(exc))
            self._gpadl_created(msg.child_relid, msg.gpadl, STATUS_UNSUCCESSFUL)
            return
        if done is not None:
            self._gpadl_complete(done)

    def _on_gpadl_body(self, msg: Any) -> None:
        pending = self._assembler.pending.get(msg.gpadl)
        try:
            done = self._assembler.feed(msg)
        except vm.MessageError as exc:
            relid = pending.child_relid if pending is not None else None
            self._violation(relid, "GPADL_BODY", "gpadl" if pending is None else "pfn", msg.gpadl, str(exc))
            if pending is not None:
                self._gpadl_created(pending.child_relid, msg.gpadl, STATUS_UNSUCCESSFUL)
            return
        if done is not None:
            self._gpadl_complete(done)

    def _gpadl_complete(self, gpadl: vm.Gpadl) -> None:
        relid, handle = gpadl.child_relid, gpadl.handle
        channel = self.channels.get(relid)
        if channel is None:
            self._violation(relid, "GPADL_HEADER", "child_relid", relid, "no such channel")
            self._gpadl_created(relid, handle, STATUS_UNSUCCESSFUL)
            return
        if channel.state not in (ChannelState.OFFERED, ChannelState.OPEN):
            self._event(
                "vmbus.gpadl", relid=relid, gpadl=handle, action="refused", reason=channel.state.value
            )
            self._gpadl_created(relid, handle, STATUS_UNSUCCESSFUL)
            return
        pages: list[memoryview] = []
        for pfn in gpadl.pfns:
            gpa = pfn * vm.PAGE_SIZE
            if not self.ram.contains(gpa, vm.PAGE_SIZE):
                self._violation(
                    relid, "GPADL_HEADER", "pfn", pfn, f"GPADL {handle:#x}: page is not guest RAM"
                )
                self._gpadl_created(relid, handle, STATUS_UNSUCCESSFUL)
                return
            pages.append(self.ram.view_at(gpa, vm.PAGE_SIZE))
        self.gpadls[handle] = GpadlBuffer(
            handle, relid, gpadl.byte_count, gpadl.byte_offset, list(gpadl.pfns), pages
        )
        self._event(
            "vmbus.gpadl",
            relid=relid,
            gpadl=handle,
            action="created",
            pages=len(pages),
            byte_count=gpadl.byte_count,
        )
        self._gpadl_created(relid, handle)

    def _on_gpadl_teardown(self, msg: Any) -> None:
        relid, handle = msg.child_relid, msg.gpadl
        half_built = self._assembler.pending.pop(handle, None) is not None
        if half_built:
            self._violation(relid, "GPADL_TEARDOWN", "gpadl", handle, "GPADL still being described")
        buf = self.gpadls.pop(handle, None)
        if buf is None:
            if not half_built:
                self._violation(relid, "GPADL_TEARDOWN", "gpadl", handle, "no such GPADL")
        else:
            if buf.child_relid != relid:
                self._violation(
                    relid,
                    "GPADL_TEARDOWN",
                    "child_relid",
                    relid,
                    f"GPADL {handle:#x} belongs to relid {buf.child_relid}",
                )
            owner = self.channels.get(buf.child_relid)
            if owner is not None and owner.state is ChannelState.OPEN and owner.ring_gpadl == handle:
                self._violation(owner.relid, "GPADL_TEARDOWN", "gpadl", handle, "ring of an open channel")
                self._close(owner, "ring GPADL torn down")
                self._set_state(owner, ChannelState.OFFERED, "ring GPADL torn down")
            if owner is not None:
                self._device_call(owner.device.on_gpadl_torn_down, owner, buf)
            self._event("vmbus.gpadl", relid=buf.child_relid, gpadl=handle, action="torn down")
        # Always answer: the guest waits for TORNDOWN without timeout (spec §9).
        self._send(MsgType.GPADL_TORNDOWN, gpadl=handle)

    # Channels ------------------------------------------------------------------------------------
    def _open_result(self, relid: int, openid: int, status: int) -> None:
        self._send(MsgType.OPENCHANNEL_RESULT, child_relid=relid, openid=openid, status=status)

    def _on_openchannel(self, msg: Any) -> None:
        relid, openid = msg.child_relid, msg.openid
        channel = self.channels.get(relid)

        def refuse(field: str | None, value: Any, detail: str) -> None:
            if field is not None:
                self._violation(relid, "OPENCHANNEL", field, value, detail)
            else:
                self._event("vmbus.channel", relid=relid, state="open refused", reason=detail)
            self._open_result(relid, openid, STATUS_UNSUCCESSFUL)

        if channel is None:
            return refuse("child_relid", relid, "no such channel")
        if channel.state is ChannelState.RESCINDED:
            return refuse(None, relid, "channel rescinded")
        if channel.state is not ChannelState.OFFERED:
            return refuse("child_relid", relid, f"channel is {channel.state.value}")
        buf = self.gpadls.get(msg.ringbuffer_gpadlhandle)
        if buf is None:
            return refuse("ringbuffer_gpadlhandle", msg.ringbuffer_gpadlhandle, "no such GPADL")
        if buf.child_relid != relid:
            return refuse(
                "ringbuffer_gpadlhandle",
                msg.ringbuffer_gpadlhandle,
                f"GPADL belongs to relid {buf.child_relid}",
            )
        if buf.byte_offset != 0 or buf.byte_count != len(buf.pfns) * vm.PAGE_SIZE:
            return refuse(
                "ringbuffer_gpadlhandle",
                msg.ringbuffer_gpadlhandle,
                "ring GPADL must cover whole pages from offset 0",
            )
        try:
            outbound, inbound = split_ring_gpadl(
                buf.view, msg.downstream_ringbuffer_pageoffset, channel=relid
            )
            limit = channel.device.max_packet_size
            reader = RingReader(outbound, max_packet_size=limit)
            writer = RingWriter(inbound, policy=channel.device.signal_policy or self.signal_policy)
        except RingViolation as exc:
            return refuse(exc.field, exc.value, exc.detail or str(exc))
        if not self._device_call(channel.device.can_open, channel, default=False):
            return refuse(None, relid, f"{channel.device.name} refused the open")
        channel.reader, channel.writer = reader, writer
        channel.ring_gpadl = buf.handle
        channel.downstream_offset = msg.downstream_ringbuffer_pageoffset
        channel.target_vp = msg.target_vp
        channel.open_userdata = bytes(msg.userdata)
        channel.broken = channel.blocked = False
        channel.opens += 1
        self._set_state(
            channel,
            ChannelState.OPEN,
            "OPENCHANNEL",
            target_vp=msg.target_vp,
            ring_pages=len(buf.pfns),
            downstream_offset=msg.downstream_ringbuffer_pageoffset,
        )
        self._open_result(relid, openid, 0)
        self._device_call(channel.device.on_open, channel)

    def _on_closechannel(self, msg: Any) -> None:
        relid = msg.child_relid
        channel = self.channels.get(relid)
        if channel is None:
            self._violation(relid, "CLOSECHANNEL", "child_relid", relid, "no such channel")
        elif channel.state is ChannelState.OPEN:
            self._close(channel, "CLOSECHANNEL")
            self._set_state(channel, ChannelState.OFFERED, "CLOSECHANNEL")
        elif channel.state is ChannelState.RESCINDED:
            self._event("vmbus.channel", relid=relid, state="rescinded", reason="CLOSECHANNEL after rescind")
        else:
            self._violation(relid, "CLOSECHANNEL", "child_relid", relid, f"channel is {channel.state.value}")

    def _on_relid_released(self, msg: Any) -> None:
        relid = msg.child_relid
        channel = self.channels.get(relid)
        if channel is None or channel.state is not ChannelState.RESCINDED:
            state = "unknown" if channel is None else channel.state.value
            self._violation(
                relid, "RELID_RELEASED", "child_relid", relid, f"channel is {state}, not rescinded"
            )
            return
        self._release(channel, "RELID_RELEASED")

    def _on_modifychannel(self, msg: Any) -> None:
        relid = msg.child_relid
        assert self.version is not None
        if self.version < vm.VmbusVersion.V4_1:
            self._violation(
                relid,
                "MODIFYCHANNEL",
                "msgtype",
                int(MsgType.MODIFYCHANNEL),
                f"not part of version {vm.version_str(self.version)}",
            )
            return
        channel = self.channels.get(relid)
        status = 0
        if channel is None or channel.state not in (ChannelState.OFFERED, ChannelState.OPEN):
            self._violation(relid, "MODIFYCHANNEL", "child_relid", relid, "no such live channel")
            status = STATUS_UNSUCCESSFUL
        else:
            old = channel.target_vp
            channel.target_vp = msg.target_vp
            self._event(
                "vmbus.channel",
                relid=relid,
                state=channel.state.value,
                reason="MODIFYCHANNEL",
                target_vp=msg.target_vp,
                old_target_vp=old,
            )
        # Only ≥ 5.3 guests wait for (and expect) the response (channel.c:send_modifychannel_with_ack).
        if self.version >= vm.VmbusVersion.V5_3:
            self._send(MsgType.MODIFYCHANNEL_RESPONSE, child_relid=relid, status=status)

    def _on_tl_connect_request(self, msg: Any) -> None:
        self._event("vmbus.ignored", msgtype="TL_CONNECT_REQUEST", reason="hv_sock is not emulated")

    _handlers: dict[MsgType, Callable[[VmbusServer, Any], None]] = {
        MsgType.REQUESTOFFERS: _on_requestoffers,
        MsgType.UNLOAD: _on_unload,
        MsgType.GPADL_HEADER: _on_gpadl_header,
        MsgType.GPADL_BODY: _on_gpadl_body,
        MsgType.GPADL_TEARDOWN: _on_gpadl_teardown,
        MsgType.OPENCHANNEL: _on_openchannel,
        MsgType.CLOSECHANNEL: _on_closechannel,
        MsgType.RELID_RELEASED: _on_relid_released,
        MsgType.MODIFYCHANNEL: _on_modifychannel,
        MsgType.TL_CONNECT_REQUEST: _on_tl_connect_request,
    }

    # ==============================================================================================
    # Channel internals
    # ==============================================================================================

    def _allocate_relid(self) -> int:
        for relid in range(1, vm.MAX_CHANNEL_RELIDS):
            if relid not in self.channels:
                return relid
        raise RuntimeError("all 2047 relids are in use")

    def _new_channel(self, device: VmbusDevice, index: int) -> Channel:
        relid = self._allocate_relid()
        channel = Channel(self, device, relid, CHANNEL_CONNECTION_ID_BASE + relid, index)
        self.channels[relid] = channel
        self._by_connection[channel.connection_id] = channel
        device.channels.append(channel)
        device.channels.sort(key=lambda c: c.sub_channel_index)
        self._set_state(channel, ChannelState.IDLE, "created")
        self._channels_changed()
        return channel

    def _ordered_channels(self) -> list[Channel]:
        """Primaries in device order, each followed by its sub-channels (Linux needs the primary first)."""
        return [c for d in self.devices for c in sorted(d.channels, key=lambda c: c.sub_channel_index)]

    def _offer(self, channel: Channel) -> None:
        device = channel.device
        user_def = bytes(device.user_def)[:120]
        self._send(
            MsgType.OFFERCHANNEL,
            if_type=device.class_guid,
            if_instance=device.instance_guid,
            chn_flags=0,  # 7.3 rejects 0x2/0x4 (confidential bits) in a normal guest (spec §2.5)
            mmio_megabytes=device.mmio_megabytes,
            user_def=user_def + bytes(120 - len(user_def)),
            sub_channel_index=channel.sub_channel_index,
            child_relid=channel.relid,
            monitorid=0,
            monitor_allocated=False,  # the guest then always uses HvSignalEvent (spec §2.3)
            is_dedicated_interrupt=device.is_dedicated_interrupt,
            connection_id=channel.connection_id,
        )
        self._set_state(channel, ChannelState.OFFERED, "OFFERCHANNEL")

    def _rescind(self, channel: Channel) -> None:
        if channel.state in (ChannelState.RESCINDED, ChannelState.RELEASED):
            return
        if channel.state is ChannelState.IDLE:
            self._release(channel, "removed before being offered")
            return
        if channel.state is ChannelState.OPEN:
            self._close(channel, "rescind")
        self._send(MsgType.RESCIND_CHANNELOFFER, child_relid=channel.relid)
        self._set_state(channel, ChannelState.RESCINDED, "RESCIND_CHANNELOFFER")

    def _close(self, channel: Channel, reason: str) -> None:
        """Stop using the rings (host side) and tell the device; the protocol state is the caller's."""
        was_usable = channel.reader is not None or channel.writer is not None
        channel.reader = channel.writer = None
        channel.blocked = False
        if was_usable:
            self._event("vmbus.channel", relid=channel.relid, state="closed", reason=reason)
            self._device_call(channel.device.on_close, channel)

    def _release(self, channel: Channel, reason: str) -> None:
        self._close(channel, reason)
        for handle in [h for h, g in self.gpadls.items() if g.child_relid == channel.relid]:
            del self.gpadls[handle]
        self._assembler.discard_channel(channel.relid)
        self.channels.pop(channel.relid, None)
        self._by_connection.pop(channel.connection_id, None)
        self._set_state(channel, ChannelState.RELEASED, reason)
        device = channel.device
        if channel in device.channels:
            device.channels.remove(channel)
        self._channels_changed()
        if not device.channels and device in self.devices:
            self.devices.remove(device)
            self._event("vmbus.device", device=device.name, action="removed")
            self._device_call(device.on_removed)

    def _set_state(self, channel: Channel, state: ChannelState, reason: str, **extra: Any) -> None:
        channel.state = state
        self._event(
            "vmbus.channel",
            relid=channel.relid,
            device=channel.device.name,
            sub_channel_index=channel.sub_channel_index,
            state=state.value,
            reason=reason,
            **extra,
        )

    def _channels_changed(self) -> None:
        if self.on_channels_changed is not None:
            try:
                self.on_channels_changed(self.channel_connection_ids())
            except Exception:
                log.exception("on_channels_changed callback failed")

    def _drain(self, channel: Channel) -> None:
        """Read every packet the guest queued and hand them to the device in order.

        The guest only signals on an empty → non-empty transition, so the ring must be drained to
        empty each time (spec §2.9); the loop re-reads after publishing read_index in case the guest
        wrote meanwhile. A device callback that makes the guest signal again re-enters here: that
        inner call only flags a re-drain, so packets are never delivered out of order.
        """
        if channel._draining:
            channel._redrain = True
            return
        channel._draining = True
        try:
            while True:
                channel._redrain = False
                reader = channel.reader
                if reader is None or channel.broken:
                    break
                try:
                    raws, signal_producer = reader.read_all()
                except RingViolation as exc:
                    self._ring_violation(channel, exc)
                    break
                if signal_producer:
                    self._signal_guest(channel)
                for raw in raws:
                    if not channel.is_open:
                        break
                    try:
                        packet = vp.parse_packet(raw)
                    except vp.PacketError as exc:
                        self._violation(channel.relid, "packet", exc.field, exc.value, exc.detail)
                        continue
                    channel.packets_in += 1
                    self._device_call(channel.device.on_packet, channel, packet)
                if not raws and not channel._redrain:
                    break
            if channel.blocked and channel.is_open and channel.writer is not None:
                try:
                    room = channel.writer.free_bytes() > channel.writer.ring.pending_send_sz
                except RingViolation as exc:
                    self._ring_violation(channel, exc)
                    room = False
                if room:
                    channel.blocked = False
                    self._device_call(channel.device.on_ring_space, channel)
        finally:
            channel._draining = False

    def _ring_violation(self, channel: Channel, exc: RingViolation) -> None:
        """The guest corrupted a ring: record it and stop using the channel's rings (the guest can
        still close the channel normally; the host no longer reads or writes its memory)."""
        self._violation(channel.relid, "ring", exc.field, exc.value, exc.detail or str(exc))
        if not channel.broken:
            channel.broken = True
            self._close(channel, f"ring violation ({exc.field})")

    def _signal_guest(self, channel: Channel) -> None:
        channel.signals_out += 1
        try:
            self.synic.signal_event(channel.target_vp, channel.relid)
        except Exception:
            log.exception("SynIC signal_event(%d, %d) failed", channel.target_vp, channel.relid)

    def poll_channels(self) -> None:
        """Drain every open channel once (a polling backstop for a missed guest signal)."""
        with self.lock:
            for channel in list(self.channels.values()):
                if channel.is_open:
                    self._drain(channel)

    # ==============================================================================================
    # Outgoing messages
    # ==============================================================================================

    def _send(
        self, msgtype: MsgType, *, vp: int | None = None, sint: int | None = None, **fields: Any
    ) -> None:
        """Queue one channel message for ``vp`` (default: the connection's target VP) and deliver what
        the slot allows now; the rest follows on ``on_eom``."""
        payload = vm.build_message(msgtype, **fields)
        target = self.message_vp if vp is None else vp
        self.messages_out += 1
        self._event("vmbus.tx", vp=target, **vm.describe(vm.parse_message(payload)))
        self._queues.setdefault(target, deque()).append((self.sint if sint is None else sint, payload))
        self._flush(target)

    def _flush(self, vp_index: int) -> None:
        queue = self._queues.get(vp_index)
        if not queue or vp_index in self._flushing:
            return  # an outer _flush on this VP (a post that called on_eom back) will continue
        self._flushing.add(vp_index)
        try:
            while queue:
                sint, payload = queue[0]
                try:
                    delivered = self.synic.post(vp_index, sint, payload)
                except Exception:
                    log.exception("SynIC post to VP %d failed", vp_index)
                    delivered = False
                if not delivered:
                    break  # the slot is busy: the platform set msg_pending, EOM will call on_eom
                queue.popleft()
        finally:
            self._flushing.discard(vp_index)

    # ==============================================================================================
    # Diagnostics
    # ==============================================================================================

    def _violation(
        self, relid: int | None, message: str, field: str, value: Any, detail: str = ""
    ) -> ProtocolViolation:
        record = ProtocolViolation(relid, message, field, value, detail)
        self.violation_count += 1
        if len(self.violations) < MAX_VIOLATION_RECORDS:
            self.violations.append(record)
        log.warning("VMBus protocol violation: %s", record)
        self._event("vmbus.violation", **record.as_dict())
        return record

    def _event(self, kind: str, **fields: Any) -> None:
        if self.timeline is None:
            return
        try:
            self.timeline.event(kind, **fields)
        except Exception:
            log.exception("timeline event %s failed", kind)

    def _device_call(self, fn: Callable[..., Any], *args: Any, default: Any = None) -> Any:
        """Run a device hook; a device bug is logged (not a guest violation) and the bus carries on."""
        try:
            return fn(*args)
        except Exception as exc:
            log.exception("device hook %s failed", getattr(fn, "__qualname__", fn))
            self._event("vmbus.device_error", hook=getattr(fn, "__qualname__", str(fn)), error=repr(exc))
            return default

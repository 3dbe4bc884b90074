"""A pure-Python model of the guest side of VMBus, to unit-test the host without a VM.

It behaves like Linux's hv_vmbus where the host can observe it (drivers/hv/connection.c,
channel.c, channel_mgmt.c, ring_buffer.c): negotiates the version highest first, requests offers,
splits ring GPADLs into GPADL_HEADER/BODY, opens channels, writes and reads packets through the same
ring code (hvlab.vmbus.ring) in the guest role, and answers rescinds with CLOSECHANNEL and
RELID_RELEASED. Where Linux would WARN and drop a host message, or block forever (spec §9), the model
records a warning / raises, so a host bug shows up as a clear test failure instead of a hang.

Plugging in a host: the guest talks through a ``GuestTransport`` of callables —

* ``post_message(input: bytes) -> int``: the 256-byte ``hv_input_post_message`` the guest would pass
  to HvPostMessage; returns the hypercall status (0 = success, 18 = invalid connection id, ...);
* ``signal_event(connection_id: int) -> None``: HvSignalEvent (fast hypercall 0x5D);
* ``pump() -> None`` (optional): let the host make progress while the guest waits for a reply.

and the host calls back ``VmbusGuest.on_message(slot: bytes)`` with a 256-byte SynIC message slot
(or ``on_channel_message(payload)``) and ``VmbusGuest.on_event(relid)`` for a channel interrupt.
Incoming messages are only queued by ``on_message``; they are processed when the guest waits or
``poll()`` runs, so a host may deliver them from inside ``post_message``.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import construct as c

from hvlab.protocol import vmbus as vm
from hvlab.protocol import vmbus_packet as vp
from hvlab.vmbus.ring import RingReader, RingWriter, split_ring_gpadl

PAGE_SIZE = vm.PAGE_SIZE


class GuestModelError(Exception):
    """Base class of guest-model failures."""


class GuestHang(GuestModelError):
    """The real guest would wait here forever (no timeout): the host never answered (spec §9)."""


class GuestProtocolError(GuestModelError):
    """The host sent something Linux would reject, WARN about or silently drop."""


class GuestOperationFailed(GuestModelError):
    """An operation the host refused (version rejected, non-zero open/GPADL status, ...)."""


# --------------------------------------------------------------------------------------------------
# Guest memory
# --------------------------------------------------------------------------------------------------


class GuestMemory:
    """Fake guest-physical memory: a bytearray with a page allocator.

    GPA 0 is byte 0. ``alloc_pages`` hands out *non-contiguous, descending* pages by default, the way
    vmalloc'ed netvsc buffers look to the host, so a host that assumes contiguous GPADLs fails here.
    The first ``reserved_pages`` pages are never allocated (PFN 0 is a suspicious value in a GPADL).
    """

    def __init__(self, size: int = 16 << 20, *, reserved_pages: int = 16, scatter: bool = True) -> None:
        if size % PAGE_SIZE:
            raise ValueError("guest memory size must be a whole number of pages")
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.scatter = scatter
        self._free: list[int] = list(range(reserved_pages, size // PAGE_SIZE))

    @property
    def num_pages(self) -> int:
        return len(self.buf) // PAGE_SIZE

    @property
    def free_page_count(self) -> int:
        return len(self._free)

    def alloc_pages(self, count: int, *, contiguous: bool | None = None) -> list[int]:
        """Allocate ``count`` zeroed pages and return their PFNs (in buffer order)."""
        contiguous = not self.scatter if contiguous is None else contiguous
        if contiguous:
            for i in range(len(self._free) - count + 1):
                run = self._free[i : i + count]
                if run[-1] - run[0] == count - 1:
                    del self._free[i : i + count]
                    break
            else:
                raise MemoryError(f"no {count} contiguous free pages")
        else:
            if count > len(self._free):
                raise MemoryError(f"{count} pages requested, {len(self._free)} free")
            take = self._free[: 2 * count][::2] if len(self._free) >= 2 * count else self._free[:count]
            taken = set(take)
            self._free = [p for p in self._free if p not in taken]
            run = list(reversed(take))
        for pfn in run:
            self.page(pfn)[:] = bytes(PAGE_SIZE)
        return run

    def free_pages(self, pfns: Sequence[int]) -> None:
        self._free = sorted(set(self._free) | set(pfns))

    def page(self, pfn: int) -> memoryview:
        """The 4 KiB page at ``pfn`` as a writable memoryview."""
        if not 0 <= pfn < self.num_pages:
            raise ValueError(f"PFN {pfn:#x} outside guest memory")
        return self.view[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE]

    def pages(self, pfns: Sequence[int]) -> list[memoryview]:
        return [self.page(p) for p in pfns]

    def read(self, gpa: int, length: int) -> bytes:
        if gpa < 0 or gpa + length > len(self.buf):
            raise ValueError(f"GPA range {gpa:#x}+{length} outside guest memory")
        return bytes(self.view[gpa : gpa + length])

    def write(self, gpa: int, data: bytes) -> None:
        if gpa < 0 or gpa + len(data) > len(self.buf):
            raise ValueError(f"GPA range {gpa:#x}+{len(data)} outside guest memory")
        self.view[gpa : gpa + len(data)] = data


# --------------------------------------------------------------------------------------------------
# Transport
# --------------------------------------------------------------------------------------------------


def _nothing() -> None:
    return None


@dataclass
class GuestTransport:
    """The guest's two hypercalls towards the host, plus a way to let the host run."""

    post_message: Callable[[bytes], int]
    """HvPostMessage: receives the 256-byte hv_input_post_message, returns the HV status."""
    signal_event: Callable[[int], object]
    """HvSignalEvent: receives the channel's connection id."""
    pump: Callable[[], object] = _nothing
    """Called while the guest waits for a reply; a synchronous host can leave it a no-op."""


# --------------------------------------------------------------------------------------------------
# Channels
# --------------------------------------------------------------------------------------------------


class GuestChannel:
    """An offered channel as the guest sees it; open once ``open_channel`` returned it."""

    def __init__(self, guest: VmbusGuest, offer: c.Container) -> None:
        self.guest = guest
        self.offer = offer
        self.relid: int = offer.child_relid
        self.connection_id: int = offer.connection_id
        self.rescinded = False
        self.is_open = False
        self.events = 0
        """How many times the host signalled this channel (on_event)."""
        self.on_event: Callable[[GuestChannel], object] | None = None
        self.ring_gpadl: int | None = None
        self.ring_pfns: list[int] = []
        self.send_pages = 0
        self.outbound: RingWriter | None = None
        self.inbound: RingReader | None = None
        self.max_pkt_size = 4096
        self.rqstor_size = 64
        self._outstanding: set[int] = set()
        self._next_id = 1

    @property
    def if_type(self) -> uuid.UUID:
        return self.offer.if_type

    @property
    def if_instance(self) -> uuid.UUID:
        return self.offer.if_instance

    @property
    def sub_channel_index(self) -> int:
        return self.offer.sub_channel_index

    @property
    def outstanding(self) -> frozenset[int]:
        """Transaction ids sent with COMPLETION_REQUESTED and not yet completed."""
        return frozenset(self._outstanding)

    # Sending -------------------------------------------------------------------------------------
    def send_packet(self, packet: bytes) -> bool:
        """Write one raw packet into the outbound ring; signal the host as Linux would.

        Returns False when the ring is full (Linux returns -EAGAIN and the driver retries).
        """
        if not self.is_open or self.outbound is None:
            raise GuestModelError(f"channel {self.relid} is not open")
        result = self.outbound.write(packet)
        if result.written and result.signal:
            self.guest._set_event(self)
        return result.written

    def _alloc_trans_id(self) -> int:
        """vmbus_next_request_id(): small ids 1..rqstor_size, never 0."""
        for _ in range(self.rqstor_size):
            tid = self._next_id
            self._next_id = tid % self.rqstor_size + 1
            if tid not in self._outstanding:
                self._outstanding.add(tid)
                return tid
        raise GuestModelError(f"channel {self.relid}: all {self.rqstor_size} request ids are outstanding")

    def send_inband(self, payload: bytes, *, completion_requested: bool = False, trans_id: int = 0) -> int:
        """Send VM_PKT_DATA_INBAND; with a completion requested a fresh request id is used.

        Returns the trans_id (0 or the caller's value when no completion is requested). Raises
        GuestModelError when the ring is full.
        """
        if completion_requested:
            trans_id = self._alloc_trans_id()
        if not self.send_packet(vp.build_inband(payload, trans_id, completion_requested)):
            if completion_requested:
                self._outstanding.discard(trans_id)
            raise GuestModelError(f"channel {self.relid}: outbound ring full")
        return trans_id

    def send_gpa_direct(self, ranges: Sequence[vp.GpaRange], payload: bytes) -> int:
        """Send VM_PKT_DATA_USING_GPA_DIRECT with a completion requested; returns its trans_id."""
        trans_id = self._alloc_trans_id()
        if not self.send_packet(vp.build_gpa_direct(ranges, payload, trans_id)):
            self._outstanding.discard(trans_id)
            raise GuestModelError(f"channel {self.relid}: outbound ring full")
        return trans_id

    def complete(self, trans_id: int, payload: bytes = b"") -> None:
        """Send VM_PKT_COMP echoing a host trans_id (e.g. netvsc receive completions)."""
        if not self.send_packet(vp.build_completion(payload, trans_id)):
            raise GuestModelError(f"channel {self.relid}: outbound ring full")

    # Receiving -----------------------------------------------------------------------------------
    def receive(self) -> list[vp.Packet]:
        """Drain the inbound ring, publish read_index, signal the host if it was blocked
        (ring_buffer.c:hv_pkt_iter_close), and check completions against outstanding ids."""
        if not self.is_open or self.inbound is None:
            raise GuestModelError(f"channel {self.relid} is not open")
        raws, signal = self.inbound.read_all()
        if signal:
            self.guest._set_event(self)
        packets = []
        for raw in raws:
            if len(raw) > self.max_pkt_size:
                self.guest._warn(
                    f"channel {self.relid}: host packet of {len(raw)} bytes exceeds max_pkt_size "
                    f"{self.max_pkt_size}; Linux truncates it silently (hv_pkt_iter_first)"
                )
            pkt = vp.parse_packet(raw)
            if pkt.type == vp.PacketType.COMP:
                if pkt.trans_id not in self._outstanding:
                    self.guest._warn(
                        f"channel {self.relid}: completion with trans_id {pkt.trans_id:#x} that is not "
                        f"outstanding (Linux: 'Invalid transaction ID', the waiter blocks forever)"
                    )
                self._outstanding.discard(pkt.trans_id)
            packets.append(pkt)
        return packets

    def close(self) -> None:
        """vmbus_close_internal(): CLOSECHANNEL, then (unless rescinded) tear down the ring GPADL."""
        self.guest.close_channel(self)


# --------------------------------------------------------------------------------------------------
# The guest
# --------------------------------------------------------------------------------------------------

FLAVOURS: dict[str, tuple[int, ...]] = {
    "6.1": vm.VERSIONS_6_1,
    "6.12": vm.VERSIONS_6_12,
    "7.3": vm.VERSIONS_7_3,
}


class VmbusGuest:
    """Guest-side VMBus: connection, offers, GPADLs, channels.

    ``flavour`` picks the kernel behaviour modelled ("6.1", "6.12", "7.3": version list, 7.3's
    rejection of offers with chn_flags 0x2/0x4). ``strict`` turns every warning into a
    GuestProtocolError raised where it is detected. ``max_pumps`` bounds each wait.
    """

    def __init__(
        self,
        transport: GuestTransport,
        memory: GuestMemory | None = None,
        *,
        flavour: str = "6.12",
        versions: Sequence[int] | None = None,
        vp_index: int = 0,
        strict: bool = True,
        max_pumps: int = 100,
    ) -> None:
        if flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {sorted(FLAVOURS)}")
        self.transport = transport
        self.memory = memory or GuestMemory()
        self.flavour = flavour
        self.versions = tuple(versions) if versions is not None else FLAVOURS[flavour]
        self.vp_index = vp_index
        self.strict = strict
        self.max_pumps = max_pumps
        self.version: int | None = None
        self.msg_conn_id = vm.VMBUS_MESSAGE_CONNECTION_ID
        self.channels: dict[int, GuestChannel] = {}
        """Offered channels by relid (open or not)."""
        self.all_offers_delivered = False
        self.warnings: list[str] = []
        self.posted: list[c.Container] = []
        """Every channel message the guest posted (parsed), in order."""
        self.received: list[c.Container] = []
        """Every valid channel message the host delivered (parsed), in order."""
        self.released_relids: list[int] = []
        self.relid_hiwater = 0
        """Highest relid ever offered (channel_mgmt.c:vmbus_channel_map_relid, used by 7.3)."""
        self._inbox: deque[c.Container] = deque()
        self._replies: list[c.Container] = []
        self._next_gpadl = vm.FIRST_GPADL_HANDLE
        self.int_page = self.memory.alloc_pages(1)[0]
        self.monitor_pages = self.memory.alloc_pages(2)

    # Host → guest ------------------------------------------------------------------------------
    def on_message(self, slot: bytes | bytearray | memoryview) -> None:
        """Take a 256-byte SynIC message slot (vmbus_drv.c:vmbus_on_msg_dpc copies it, then frees it)."""
        try:
            msg = vm.parse_hv_message(slot)
        except vm.MessageError as exc:
            self._warn(f"bad SynIC message: {exc}")
            return
        if msg.message_type == vm.HVMSG_NONE:
            self._warn("on_message called with an empty slot (message_type 0)")
            return
        if msg.message_type == vm.HVMSG_TIMER_EXPIRED:
            self._warn("message_type HVMSG_TIMER_EXPIRED is treated as a stimer expiry by 6.x guests")
            return
        self.on_channel_message(msg.payload)

    def on_channel_message(self, payload: bytes) -> None:
        """Validate one channel message like vmbus_on_msg_dpc() and queue it."""
        if len(payload) < vm.HEADER_SIZE:
            self._warn(f"channel message of {len(payload)} bytes has no header")
            return
        mtype = vm.message_type(payload)
        if mtype >= vm.MSGTYPE_COUNT:
            self._warn(f"unknown msgtype {mtype} (dropped with a WARN)")
            return
        try:
            msgtype: vm.MsgType | None = vm.MsgType(mtype)
        except ValueError:
            msgtype = None
        if msgtype is None or msgtype not in vm.GUEST_MIN_PAYLOAD:
            self._warn(f"msgtype {mtype} has no guest handler (dropped)")
            return
        minimum = vm.GUEST_MIN_PAYLOAD[msgtype]
        if len(payload) < minimum:
            self._warn(
                f"{msgtype.name}: payload_size {len(payload)} < minimum {minimum} (dropped with a WARN)"
            )
            return
        padded = bytes(payload) + bytes(max(0, vm.MESSAGE_SIZE[msgtype] - len(payload)))
        msg = vm.parse_message(padded)
        self.received.append(msg)
        self._inbox.append(msg)

    def on_event(self, relid: int) -> None:
        """A channel interrupt for ``relid``.

        vmbus_drv.c:vmbus_chan_sched ignores bit 0, unknown and rescinded relids; 7.3 does not even
        scan bits above relid_hiwater (the highest relid ever offered). Signalling a channel that is
        offered but not open is a host bug (spec §2.8: nothing before OPENCHANNEL_RESULT, nothing
        after CLOSECHANNEL) and is reported.
        """
        if self.flavour == "7.3" and relid > self.relid_hiwater:
            return
        channel = self.channels.get(relid)
        if relid == 0 or channel is None or channel.rescinded:
            return
        if not channel.is_open:
            self._warn(f"host signalled channel {relid}, which is not open")
            return
        channel.events += 1
        if channel.on_event is not None:
            channel.on_event(channel)

    # Guest → host ------------------------------------------------------------------------------
    def post(self, msgtype: vm.MsgType, *, connection_id: int | None = None, **fields: object) -> int:
        """Build and post one channel message; returns the HvPostMessage status."""
        payload = vm.build_message(msgtype, **fields)
        conn = self.msg_conn_id if connection_id is None else connection_id
        self.posted.append(vm.parse_message(payload))
        return self.transport.post_message(vm.build_post_message(conn, payload))

    def _post_ok(self, msgtype: vm.MsgType, **fields: object) -> None:
        """Post and retry on 11/19 like vmbus_post_msg(); any other failure is an error."""
        for _ in range(100):
            status = self.post(msgtype, **fields)
            if status == vm.HV_STATUS_SUCCESS:
                return
            if status not in (
                vm.HV_STATUS_INSUFFICIENT_MEMORY,
                vm.HV_STATUS_INSUFFICIENT_BUFFERS,
                vm.HV_STATUS_INVALID_CONNECTION_ID,
            ):
                raise GuestOperationFailed(f"HvPostMessage({msgtype.name}) returned status {status}")
            self.transport.pump()
        raise GuestHang(f"HvPostMessage({msgtype.name}) kept failing for 100 attempts")

    def _set_event(self, channel: GuestChannel) -> None:
        """vmbus_setevent(): monitor page bit if monitor_allocated, else interrupt-page bit (when not
        dedicated) plus HvSignalEvent (channel.c:vmbus_setevent, hyperv_vmbus.h:vmbus_send_interrupt)."""
        offer = channel.offer
        if offer.monitor_allocated:
            group, bit = divmod(offer.monitorid, 32)
            gpa = self.monitor_pages[1] * PAGE_SIZE + vm.MONITOR_TRIGGER_GROUP_OFFSET + 8 * group
            pending = int.from_bytes(self.memory.read(gpa, 4), "little") | (1 << bit)
            self.memory.write(gpa, pending.to_bytes(4, "little"))
            return
        if not offer.is_dedicated_interrupt:
            gpa = self.int_page * PAGE_SIZE + vm.INTERRUPT_PAGE_SEND_OFFSET + channel.relid // 8
            self.memory.write(gpa, bytes([self.memory.read(gpa, 1)[0] | (1 << (channel.relid % 8))]))
        self.transport.signal_event(channel.connection_id)

    # Waiting -----------------------------------------------------------------------------------
    def poll(self) -> None:
        """Process queued host messages (offers, rescinds; replies are kept for waiters)."""
        while self._inbox:
            msg = self._inbox.popleft()
            t = msg.msgtype
            if t is vm.MsgType.OFFERCHANNEL:
                self._on_offer(msg)
            elif t is vm.MsgType.RESCIND_CHANNELOFFER:
                self._on_rescind(msg.child_relid)
            elif t is vm.MsgType.ALLOFFERS_DELIVERED:
                self.all_offers_delivered = True
            else:
                self._replies.append(msg)

    def _take(self, msgtype: vm.MsgType, **match: int) -> c.Container | None:
        for i, msg in enumerate(self._replies):
            if msg.msgtype is msgtype and all(msg[k] == v for k, v in match.items()):
                return self._replies.pop(i)
        return None

    def wait_for(
        self, msgtype: vm.MsgType, *, abort_relid: int | None = None, **match: int
    ) -> c.Container | None:
        """Wait for a reply; None if channel ``abort_relid`` got rescinded meanwhile (the guest's
        waits on GPADL/open replies end on rescind). Raises GuestHang when the host stays silent."""
        for _ in range(self.max_pumps + 1):
            self.poll()
            msg = self._take(msgtype, **match)
            if msg is not None:
                return msg
            if abort_relid is not None:
                ch = self.channels.get(abort_relid)
                if ch is None or ch.rescinded:
                    return None
            self.transport.pump()
        what = ", ".join(f"{k}={v:#x}" for k, v in match.items())
        raise GuestHang(f"no {msgtype.name}({what}) from the host: the guest would block forever")

    # Connection --------------------------------------------------------------------------------
    def connect(self) -> int:
        """vmbus_negotiate_version(): try each version highest first; return the accepted one."""
        for version in self.versions:
            conn = vm.initiate_contact_connection_id(version)
            fields: dict[str, int] = dict(
                vmbus_version_requested=version,
                target_vcpu=self.vp_index,
                monitor_page1=self.monitor_pages[0] * PAGE_SIZE,
                monitor_page2=self.monitor_pages[1] * PAGE_SIZE,
            )
            if version >= vm.VmbusVersion.V5_0:
                fields.update(msg_sint=vm.VMBUS_MESSAGE_SINT, msg_vtl=0, feature_flags=0)
            else:
                fields.update(interrupt_page=self.int_page * PAGE_SIZE)
            status = self.post(vm.MsgType.INITIATE_CONTACT, connection_id=conn, **fields)
            if status != vm.HV_STATUS_SUCCESS:
                continue  # e.g. 18: this version is not reachable, try the next one
            resp = self.wait_for(vm.MsgType.VERSION_RESPONSE)
            assert resp is not None
            if resp.version_supported:
                self.version = version
                self.msg_conn_id = resp.msg_conn_id if version >= vm.VmbusVersion.V5_0 else conn
                return version
        raise GuestOperationFailed("Unable to connect to host: every VMBus version was refused")

    def request_offers(self) -> list[GuestChannel]:
        """REQUESTOFFERS, then wait for ALLOFFERS_DELIVERED (7.3 waits ≤ 60 s; the model requires it)."""
        self._require_connected()
        self.all_offers_delivered = False
        self._post_ok(vm.MsgType.REQUESTOFFERS)
        for _ in range(self.max_pumps + 1):
            self.poll()
            if self.all_offers_delivered:
                return list(self.channels.values())
            self.transport.pump()
        raise GuestHang("no ALLOFFERS_DELIVERED after REQUESTOFFERS (7.3 waits 60 s, then warns)")

    def unload(self) -> None:
        """vmbus_initiate_unload(): UNLOAD, wait UNLOAD_RESPONSE (6.x skips it below version 3.0)."""
        self._require_connected()
        assert self.version is not None
        if self.flavour != "7.3" and self.version < vm.VmbusVersion.V3_0:
            self.version = None
            return
        self._post_ok(vm.MsgType.UNLOAD)
        self.wait_for(vm.MsgType.UNLOAD_RESPONSE)
        self.version = None

    def _require_connected(self) -> None:
        if self.version is None:
            raise GuestModelError("not connected: call connect() first")

    # Offers ------------------------------------------------------------------------------------
    def _on_offer(self, offer: c.Container) -> None:
        """channel_mgmt.c:vmbus_onoffer / vmbus_process_offer checks the host can trip."""
        relid = offer.child_relid
        if not 1 <= relid < vm.MAX_CHANNEL_RELIDS:
            self._warn(f"offer with child_relid {relid} outside 1..{vm.MAX_CHANNEL_RELIDS - 1}")
            return
        if relid in self.channels:
            self._warn(f"offer reuses relid {relid} of a live channel")
            return
        if self.flavour == "7.3" and offer.chn_flags & 0x0006:
            self._warn(f"7.3 rejects offer {relid} with confidential chn_flags {offer.chn_flags:#x}")
            return
        for other in self.channels.values():
            same = other.if_type == offer.if_type and other.if_instance == offer.if_instance
            if same and offer.sub_channel_index in (0, other.sub_channel_index):
                self._warn(f"offer {relid} duplicates the GUIDs of channel {other.relid} (dropped)")
                return
        self.channels[relid] = GuestChannel(self, offer)
        self.relid_hiwater = max(self.relid_hiwater, relid)

    def _on_rescind(self, relid: int) -> None:
        """vmbus_onoffer_rescind() then device removal: CLOSECHANNEL if open (no GPADL teardown),
        then RELID_RELEASED (channel_mgmt.c:hv_process_channel_removal)."""
        channel = self.channels.get(relid)
        if channel is None:
            self._warn(f"rescind of unknown relid {relid}")
            return
        channel.rescinded = True
        if channel.is_open:
            self._post_ok(vm.MsgType.CLOSECHANNEL, child_relid=relid)
            self._free_ring(channel)
        del self.channels[relid]
        self._post_ok(vm.MsgType.RELID_RELEASED, child_relid=relid)
        self.released_relids.append(relid)

    def find_channels(self, if_type: uuid.UUID | str) -> list[GuestChannel]:
        """Offered channels of a device class, primary first."""
        want = vm.to_uuid(if_type)
        found = [ch for ch in self.channels.values() if ch.if_type == want]
        return sorted(found, key=lambda ch: ch.sub_channel_index)

    # GPADLs ------------------------------------------------------------------------------------
    def create_gpadl(self, relid: int, pfns: Sequence[int], byte_count: int | None = None) -> int:
        """__vmbus_establish_gpadl(): header + bodies, wait GPADL_CREATED on (child_relid, gpadl)."""
        handle = self._next_gpadl
        self._next_gpadl += 1
        size = len(pfns) * PAGE_SIZE if byte_count is None else byte_count
        for message in vm.gpadl_messages(relid, handle, size, pfns):
            msg = vm.parse_message(message)
            fields = {k: v for k, v in msg.items() if k not in ("msgtype", "padding")}
            self._post_ok(msg.msgtype, **fields)
        reply = self.wait_for(vm.MsgType.GPADL_CREATED, abort_relid=relid, child_relid=relid, gpadl=handle)
        if reply is None:
            raise GuestOperationFailed(f"channel {relid} rescinded while creating GPADL {handle:#x}")
        if reply.creation_status:
            raise GuestOperationFailed(
                f"GPADL {handle:#x}: creation_status {reply.creation_status:#x} (-EDQUOT)"
            )
        return handle

    def teardown_gpadl(self, relid: int, handle: int) -> None:
        """vmbus_teardown_gpadl(): skipped for rescinded channels, else wait GPADL_TORNDOWN (gpadl only)."""
        channel = self.channels.get(relid)
        if channel is not None and channel.rescinded:
            return
        self._post_ok(vm.MsgType.GPADL_TEARDOWN, child_relid=relid, gpadl=handle)
        self.wait_for(vm.MsgType.GPADL_TORNDOWN, abort_relid=relid, gpadl=handle)

    # Open / close / modify ---------------------------------------------------------------------
    def open_channel(
        self,
        relid: int,
        *,
        send_pages: int = 5,
        recv_pages: int = 5,
        target_vp: int = 0,
        max_pkt_size: int = 4096,
        rqstor_size: int = 64,
    ) -> GuestChannel:
        """vmbus_open(): ring pages → ring init → GPADL → OPENCHANNEL → wait OPENCHANNEL_RESULT.

        ``send_pages``/``recv_pages`` include each ring's control page (pci-hyperv: 5 + 5, netvsc
        default: 128 + 128).
        """
        self._require_connected()
        channel = self.channels.get(relid)
        if channel is None:
            raise GuestModelError(f"no offer for relid {relid}")
        if channel.is_open:
            raise GuestModelError(f"channel {relid} is already open")
        if send_pages < 2 or recv_pages < 2:
            raise ValueError("each ring needs a control page and at least one data page")
        pfns = self.memory.alloc_pages(send_pages + recv_pages)
        out_ring, in_ring = split_ring_gpadl(self.memory.pages(pfns), send_pages, channel=relid)
        out_ring.init_header()
        in_ring.init_header()
        channel.ring_pfns = pfns
        channel.send_pages = send_pages
        channel.max_pkt_size = max_pkt_size
        channel.rqstor_size = rqstor_size
        try:
            channel.ring_gpadl = self.create_gpadl(relid, pfns)
        except GuestModelError:
            self.memory.free_pages(pfns)
            raise
        self._post_ok(
            vm.MsgType.OPENCHANNEL,
            child_relid=relid,
            openid=relid,
            ringbuffer_gpadlhandle=channel.ring_gpadl,
            target_vp=target_vp,
            downstream_ringbuffer_pageoffset=send_pages,
        )
        result = self.wait_for(
            vm.MsgType.OPENCHANNEL_RESULT, abort_relid=relid, child_relid=relid, openid=relid
        )
        if result is None or result.status:
            status = "rescinded" if result is None else f"status {result.status:#x}"
            self.teardown_gpadl(relid, channel.ring_gpadl)
            self.memory.free_pages(pfns)
            channel.ring_gpadl = None
            raise GuestOperationFailed(f"OPENCHANNEL {relid} failed: {status} (-EAGAIN)")
        if in_ring.write_index != 0:
            self._warn(f"channel {relid}: host wrote into the inbound ring before OPENCHANNEL_RESULT")
        channel.outbound = RingWriter(out_ring)
        channel.inbound = RingReader(in_ring)
        channel.is_open = True
        return channel

    def close_channel(self, channel: GuestChannel) -> None:
        """vmbus_close_internal(): CLOSECHANNEL (no reply), then GPADL_TEARDOWN unless rescinded."""
        if not channel.is_open:
            raise GuestModelError(f"channel {channel.relid} is not open")
        self._post_ok(vm.MsgType.CLOSECHANNEL, child_relid=channel.relid)
        if not channel.rescinded and channel.ring_gpadl is not None:
            self.teardown_gpadl(channel.relid, channel.ring_gpadl)
        self._free_ring(channel)

    def _free_ring(self, channel: GuestChannel) -> None:
        channel.is_open = False
        channel.outbound = None
        channel.inbound = None
        channel.ring_gpadl = None
        self.memory.free_pages(channel.ring_pfns)
        channel.ring_pfns = []

    def modify_channel(self, relid: int, target_vp: int) -> None:
        """vmbus_send_modifychannel(): needs ≥ 4.1; waits for the response only with ≥ 5.3."""
        self._require_connected()
        assert self.version is not None
        if self.version < vm.VmbusVersion.V4_1:
            raise GuestModelError("MODIFYCHANNEL needs VMBus 4.1 or later")
        self._post_ok(vm.MsgType.MODIFYCHANNEL, child_relid=relid, target_vp=target_vp)
        if self.version >= vm.VmbusVersion.V5_3:
            resp = self.wait_for(vm.MsgType.MODIFYCHANNEL_RESPONSE, child_relid=relid)
            if resp is not None and resp.status:
                raise GuestOperationFailed(f"MODIFYCHANNEL {relid}: status {resp.status:#x} (-EAGAIN)")

    # Diagnostics -------------------------------------------------------------------------------
    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        if self.strict:
            raise GuestProtocolError(text)

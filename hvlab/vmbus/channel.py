"""Host-side view of one VMBus channel and of the guest buffers (GPADLs) it uses.

A ``Channel`` is created by the server for each offer (a device's primary channel or one of its
sub-channels). Device models use it to send packets into the guest's inbound ring and to reach other
GPADLs (netvsc's receive and send buffers); the server owns the life cycle (offer, open, close,
rescind, release) and feeds received packets to the device. Everything here runs under the server's
lock, so a device may call ``send_*`` from a packet callback or from a timer thread alike.

Nothing in a channel trusts the guest: ring indices are validated by hvlab.vmbus.ring and a
violation closes the channel on the host side (the guest can still close it properly afterwards).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from hvlab.protocol import vmbus_packet as vp
from hvlab.protocol.vmbus import PAGE_SIZE
from hvlab.vmbus.ring import PagedView, RingReader, RingViolation, RingWriter

if TYPE_CHECKING:
    from hvlab.vmbus.device import VmbusDevice
    from hvlab.vmbus.server import VmbusServer


@dataclass(frozen=True)
class ProtocolViolation:
    """Something the (untrusted) guest did that the host could not accept.

    ``relid`` is the channel concerned (None for bus-level messages), ``message`` the channel message
    type name or "ring", "packet", "signal", "post"; ``field``/``value`` the offending datum.
    """

    relid: int | None
    message: str
    field: str
    value: Any
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"relid {self.relid}" if self.relid is not None else "bus"
        value = f"{self.value:#x}" if isinstance(self.value, int) else repr(self.value)
        return f"{where}: {self.message}.{self.field}={value}" + (f" ({self.detail})" if self.detail else "")


class ChannelState(enum.Enum):
    """Where a channel is in its life cycle, as the host sees it."""

    IDLE = "idle"
    """Known to the host, not offered yet (bus not connected or offers not requested)."""
    OFFERED = "offered"
    """OFFERCHANNEL sent; the guest may open it."""
    OPEN = "open"
    """OPENCHANNEL accepted; rings are live."""
    RESCINDED = "rescinded"
    """RESCIND_CHANNELOFFER sent; the relid stays reserved until RELID_RELEASED."""
    RELEASED = "released"
    """Gone; the relid may be reused."""


class GpadlBuffer:
    """A guest buffer described by a GPADL, reachable through per-page views of guest RAM.

    Offsets passed to ``read``/``write`` are relative to the buffer start (the GPADL's byte_offset
    into its first page is applied here) and are bounds-checked against byte_count: a device bug
    raises ValueError instead of touching memory outside the buffer.
    """

    def __init__(
        self,
        handle: int,
        child_relid: int,
        byte_count: int,
        byte_offset: int,
        pfns: list[int],
        pages: list[memoryview],
    ) -> None:
        self.handle = handle
        self.child_relid = child_relid
        self.byte_count = byte_count
        self.byte_offset = byte_offset
        self.pfns = pfns
        self.view = PagedView(pages)

    @property
    def size(self) -> int:
        return self.byte_count

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.byte_count:
            raise ValueError(
                f"GPADL {self.handle:#x}: range {offset}+{length} outside {self.byte_count} bytes"
            )

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return self.view.read(self.byte_offset + offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check(offset, len(data))
        self.view.write(self.byte_offset + offset, data)

    def __repr__(self) -> str:
        return f"GpadlBuffer({self.handle:#x}, relid={self.child_relid}, {self.byte_count} bytes, {len(self.pfns)} pages)"


class Channel:
    """One offered channel. Created and driven by VmbusServer; used by its device.

    Public attributes a device may read: ``relid``, ``connection_id``, ``sub_channel_index``,
    ``state``, ``target_vp``, ``open_userdata``, counters ``packets_in/out``, ``signals_in/out``.
    """

    def __init__(
        self, server: VmbusServer, device: VmbusDevice, relid: int, connection_id: int, sub_channel_index: int
    ) -> None:
        self.server = server
        self.device = device
        self.relid = relid
        self.connection_id = connection_id
        self.sub_channel_index = sub_channel_index
        self.state = ChannelState.IDLE
        self.target_vp = 0
        self.ring_gpadl: int | None = None
        self.downstream_offset = 0
        self.open_userdata = b""
        self.reader: RingReader | None = None
        self.writer: RingWriter | None = None
        self.broken = False
        """The host stopped using the rings after a ring violation (the guest may still close)."""
        self.blocked = False
        """A send found the inbound ring full; on_ring_space follows when the guest frees room."""
        self.packets_in = 0
        self.packets_out = 0
        self.signals_in = 0
        self.signals_out = 0
        self.opens = 0
        self._draining = False
        self._redrain = False

    # Properties ----------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        """True while the host may use the rings."""
        return self.state is ChannelState.OPEN and not self.broken and self.writer is not None

    @property
    def is_primary(self) -> bool:
        return self.sub_channel_index == 0

    @property
    def name(self) -> str:
        suffix = f"/{self.sub_channel_index}" if self.sub_channel_index else ""
        return f"{self.device.name}{suffix}"

    # Sending -------------------------------------------------------------------------------------
    def send_packet(self, packet: bytes) -> bool:
        """Write one complete packet (built with hvlab.protocol.vmbus_packet) into the guest's
        inbound ring and interrupt the guest if the ring rules say so.

        Returns False when the channel is not open or the ring is full; in the latter case
        pending_send_sz is set so the guest signals once it has made room, and the device's
        ``on_ring_space`` is called then. A packet that can never fit raises ValueError.
        """
        with self.server.lock:
            if not self.is_open or self.writer is None:
                return False
            try:
                result = self.writer.write(packet, set_pending_on_full=True)
            except RingViolation as exc:
                self.server._ring_violation(self, exc)
                return False
            if not result.written:
                self.blocked = True
                return False
            self.packets_out += 1
            if result.signal:
                self.server._signal_guest(self)
            return True

    def send_inband(self, payload: bytes, trans_id: int = 0, completion_requested: bool = False) -> bool:
        """VM_PKT_DATA_INBAND with ``payload``."""
        return self.send_packet(vp.build_inband(payload, trans_id, completion_requested))

    def send_completion(self, trans_id: int, payload: bytes = b"") -> bool:
        """VM_PKT_COMP echoing ``trans_id`` exactly (the guest drops completions whose id it does not
        have outstanding and then waits forever, spec §2.10)."""
        return self.send_packet(vp.build_completion(payload, trans_id))

    def signal(self) -> None:
        """Interrupt the guest for this channel regardless of the ring state (rarely needed)."""
        with self.server.lock:
            if self.is_open:
                self.server._signal_guest(self)

    def poll(self) -> None:
        """Drain the guest's outbound ring now, as if it had signalled (a polling backstop)."""
        with self.server.lock:
            if self.is_open:
                self.server._drain(self)

    # Guest buffers -------------------------------------------------------------------------------
    def gpadl(self, handle: int) -> GpadlBuffer:
        """A GPADL the guest created on this channel or on another channel of the same device (netvsc
        sub-channels share the primary's buffers). KeyError if there is none."""
        with self.server.lock:
            buf = self.server.gpadls.get(handle)
            relids = {c.relid for c in self.device.channels}
            if buf is None or buf.child_relid not in relids:
                raise KeyError(f"no GPADL {handle:#x} on the channels of {self.device.name}")
            return buf

    def gpadl_pages(self, pfn: int, count: int = 1) -> memoryview:
        """A view of ``count`` guest pages starting at ``pfn`` (for GPA-direct packets); ValueError when
        they are not guest RAM (the PFNs come from the guest)."""
        gpa = pfn * PAGE_SIZE
        if pfn < 0 or not self.server.ram.contains(gpa, count * PAGE_SIZE):
            raise ValueError(f"PFN {pfn:#x}+{count} is not guest RAM")
        return self.server.ram.view_at(gpa, count * PAGE_SIZE)

    def read_gpa_range(self, gpa_range: vp.GpaRange) -> bytes:
        """The bytes a GPA-direct range describes (``len`` bytes from ``offset`` in its first PFN, on
        through consecutive PFNs), e.g. a netvsc send; ValueError when a PFN is not guest RAM."""
        out = bytearray()
        remaining, offset = gpa_range.len, gpa_range.offset
        for pfn in gpa_range.pfns:
            if remaining <= 0:
                break
            chunk = min(remaining, PAGE_SIZE - offset)
            out += self.gpadl_pages(pfn)[offset : offset + chunk]
            remaining -= chunk
            offset = 0
        if remaining > 0:
            raise ValueError(f"GPA range of {gpa_range.len} bytes has too few PFNs")
        return bytes(out)

    # Diagnostics ---------------------------------------------------------------------------------
    def report_violation(self, field: str, value: Any, detail: str = "", *, message: str = "packet") -> None:
        """Let a device report guest misbehaviour inside its own protocol (same record/log/timeline)."""
        with self.server.lock:
            self.server._violation(self.relid, message, field, value, detail)

    def __repr__(self) -> str:
        return f"Channel(relid={self.relid}, {self.name}, {self.state.value})"

"""VMBus ring buffers over guest memory, in either role (spec/HOST_CONTRACT.md §2.9).

A channel has two rings inside its ring GPADL: pages [0, S) are the guest→host ("outbound" from the
guest's view) ring, pages [S, S+R) the host→guest ("inbound") ring. Each ring is a 4 KiB control
page (``struct hv_ring_buffer``) followed by a circular data area:

    write_index u32 @0   producer's next byte      read_index u32 @4   consumer's next byte
    interrupt_mask u32 @8   consumer: "don't signal me"   pending_send_sz u32 @12   blocked producer's need
    feature_bits u32 @64   bit 0 = feat_pending_send_sz

The same classes serve the host (reader of the guest's outbound ring, writer of its inbound ring)
and the pure-Python guest model (the opposite roles): the rules are symmetric and come from
drivers/hv/ring_buffer.c. Everything the other side wrote is untrusted: indices are validated on
every load and a bad value raises RingViolation (never IndexError); each side keeps the index it
owns privately and only publishes it.

Memory ordering: on x86 loads are not reordered with loads and stores not with stores, which
covers the "copy then publish index" rules; the signalling decisions need a full barrier between a
store and a later load (virt_mb() in ring_buffer.c). ``full_barrier()`` gets one from a locked
instruction (a lock acquire/release). Index fields are accessed through a ``memoryview.cast('I')``
so each load and store is a single aligned 32-bit access.
"""

from __future__ import annotations

import enum
import struct
import threading
from collections.abc import Sequence
from typing import NamedTuple

from hvlab.protocol.vmbus_packet import DESCRIPTOR_SIZE, TRAILER_SIZE

PAGE_SIZE = 4096
RING_HEADER_SIZE = PAGE_SIZE
"""The control page; the data area starts right after it."""

# u32 slots of the control page (byte offset / 4).
_WRITE_INDEX = 0
_READ_INDEX = 1
_INTERRUPT_MASK = 2
_PENDING_SEND_SZ = 3
_FEATURE_BITS = 16

FEAT_PENDING_SEND_SZ = 0x1
"""feature_bits bit 0. Linux sets it in both rings itself (ring_buffer.c:hv_ringbuffer_init)."""

_DESC_LENS = struct.Struct("<HHH")  # type, offset8, len8
_TRAILER = struct.Struct("<Q")

_barrier_lock = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier (virt_mb()): acquiring and releasing a lock runs a locked instruction."""
    _barrier_lock.acquire()
    _barrier_lock.release()


class RingViolation(Exception):
    """The other side of a ring broke the ring protocol.

    ``channel`` identifies the channel (whatever the caller passed, usually the relid), ``field``
    names the offending value ("write_index", "read_index", "len8", "offset8", ...) and ``value``
    is what was found. A host should treat the channel as broken (stop reading it, log the event).
    """

    def __init__(self, channel: object, field: str, value: int, detail: str = "") -> None:
        text = f"ring violation on channel {channel}: {field}={value:#x}"
        super().__init__(f"{text}: {detail}" if detail else text)
        self.channel = channel
        self.field = field
        self.value = value
        self.detail = detail


class PagedView:
    """A byte range made of one contiguous memoryview or of a list of 4 KiB page memoryviews.

    GPADL buffers are lists of PFNs that need not be contiguous (netvsc rings are vmalloc'ed), so
    the host cannot always have one flat view. ``read``/``write`` take offsets within the range and
    never wrap.
    """

    def __init__(self, pages: memoryview | bytearray | Sequence[memoryview]) -> None:
        if isinstance(pages, memoryview | bytearray):
            view = memoryview(pages).cast("B")
            self._flat: memoryview | None = view
            self._pages: list[memoryview] = []
            self._size = len(view)
        else:
            self._flat = None
            self._pages = [memoryview(p).cast("B") for p in pages]
            for i, p in enumerate(self._pages):
                if len(p) != PAGE_SIZE:
                    raise ValueError(f"page {i} is {len(p)} bytes, not {PAGE_SIZE}")
            self._size = PAGE_SIZE * len(self._pages)

    def __len__(self) -> int:
        return self._size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"range {offset}+{length} outside a {self._size}-byte view")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if self._flat is not None:
            return bytes(self._flat[offset : offset + length])
        out = bytearray()
        while length:
            page, off = divmod(offset, PAGE_SIZE)
            n = min(length, PAGE_SIZE - off)
            out += self._pages[page][off : off + n]
            offset += n
            length -= n
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        self._check(offset, length)
        if self._flat is not None:
            self._flat[offset : offset + length] = data
            return
        src = memoryview(data).cast("B")
        pos = 0
        while pos < length:
            page, off = divmod(offset, PAGE_SIZE)
            n = min(length - pos, PAGE_SIZE - off)
            self._pages[page][off : off + n] = src[pos : pos + n]
            offset += n
            pos += n

    def slice(self, offset: int, length: int) -> PagedView:
        """A sub-view at a page-aligned offset (e.g. one of the two rings inside a ring GPADL)."""
        self._check(offset, length)
        if self._flat is not None:
            return PagedView(self._flat[offset : offset + length])
        if offset % PAGE_SIZE or length % PAGE_SIZE:
            raise ValueError("paged views slice on page boundaries only")
        first = offset // PAGE_SIZE
        return PagedView(self._pages[first : first + length // PAGE_SIZE])

    def first_page(self) -> memoryview:
        """The first 4 KiB as a single contiguous memoryview (the ring control page)."""
        if self._flat is not None:
            return self._flat[:PAGE_SIZE]
        return self._pages[0]


class RingBuffer:
    """One ring (control page + data area) in guest memory, without a role.

    ``memory`` is the ring's pages: a flat memoryview/bytearray or a list of page views, the first
    page being the control page. ``channel`` is only used in RingViolation reports.
    """

    def __init__(
        self, memory: memoryview | bytearray | Sequence[memoryview] | PagedView, *, channel: object = None
    ) -> None:
        view = memory if isinstance(memory, PagedView) else PagedView(memory)
        if len(view) <= RING_HEADER_SIZE or len(view) % PAGE_SIZE:
            raise ValueError(f"a ring needs a control page plus whole data pages, got {len(view)} bytes")
        self.channel = channel
        self._ctl = view.first_page().cast("I")
        self._data = view.slice(RING_HEADER_SIZE, len(view) - RING_HEADER_SIZE)
        self.data_size = len(view) - RING_HEADER_SIZE

    # Raw, unvalidated control fields -------------------------------------------------------------
    @property
    def write_index(self) -> int:
        return self._ctl[_WRITE_INDEX]

    @write_index.setter
    def write_index(self, value: int) -> None:
        self._ctl[_WRITE_INDEX] = value

    @property
    def read_index(self) -> int:
        return self._ctl[_READ_INDEX]

    @read_index.setter
    def read_index(self, value: int) -> None:
        self._ctl[_READ_INDEX] = value

    @property
    def interrupt_mask(self) -> int:
        return self._ctl[_INTERRUPT_MASK]

    @interrupt_mask.setter
    def interrupt_mask(self, value: int) -> None:
        self._ctl[_INTERRUPT_MASK] = value

    @property
    def pending_send_sz(self) -> int:
        return self._ctl[_PENDING_SEND_SZ]

    @pending_send_sz.setter
    def pending_send_sz(self, value: int) -> None:
        self._ctl[_PENDING_SEND_SZ] = value

    @property
    def feature_bits(self) -> int:
        return self._ctl[_FEATURE_BITS]

    @feature_bits.setter
    def feature_bits(self, value: int) -> None:
        self._ctl[_FEATURE_BITS] = value

    def control(self) -> dict[str, int]:
        """The raw control fields, for diagnostics (unvalidated: the guest may have scribbled on them)."""
        return {"write_index": self.write_index, "read_index": self.read_index,
                "interrupt_mask": self.interrupt_mask, "pending_send_sz": self.pending_send_sz}

    def init_header(self) -> None:
        """What the guest does before opening (ring_buffer.c:hv_ringbuffer_init): zero the control
        page and advertise feat_pending_send_sz."""
        for i in range(len(self._ctl)):
            self._ctl[i] = 0
        self.feature_bits = FEAT_PENDING_SEND_SZ

    # Validated index loads ------------------------------------------------------------------------
    def checked_index(self, name: str, value: int) -> int:
        """Reject an index the other side wrote that is outside the data area or not 8-aligned
        (the guest returns -EIO on the same condition, ring_buffer.c)."""
        if value >= self.data_size:
            raise RingViolation(self.channel, name, value, f"beyond the {self.data_size}-byte data area")
        if value % 8:
            raise RingViolation(self.channel, name, value, "not a multiple of 8")
        return value

    def load_write_index(self) -> int:
        return self.checked_index("write_index", self._ctl[_WRITE_INDEX])

    def load_read_index(self) -> int:
        return self.checked_index("read_index", self._ctl[_READ_INDEX])

    # Data access with byte-wise wrap --------------------------------------------------------------
    def read_data(self, offset: int, length: int) -> bytes:
        """``length`` bytes from data offset ``offset``, wrapping at the end of the data area."""
        end = offset + length
        if end <= self.data_size:
            return self._data.read(offset, length)
        head = self.data_size - offset
        return self._data.read(offset, head) + self._data.read(0, length - head)

    def write_data(self, offset: int, data: bytes) -> None:
        """Copy ``data`` to data offset ``offset``, wrapping like hv_copyto_ringbuffer()."""
        head = self.data_size - offset
        if len(data) <= head:
            self._data.write(offset, data)
        else:
            mv = memoryview(data)
            self._data.write(offset, mv[:head])
            self._data.write(0, mv[head:])

    # Space arithmetic (ring_buffer.c) -------------------------------------------------------------
    def bytes_to_write(self, write_index: int, read_index: int) -> int:
        """hv_get_bytes_to_write(): free bytes; an empty ring reports the whole data size."""
        if write_index >= read_index:
            return self.data_size - (write_index - read_index)
        return read_index - write_index

    def bytes_to_read(self, write_index: int, read_index: int) -> int:
        """hv_get_bytes_to_read() / hv_pkt_iter_avail(): bytes between read and write index."""
        if write_index >= read_index:
            return write_index - read_index
        return self.data_size - read_index + write_index


def split_ring_gpadl(
    pages: memoryview | bytearray | Sequence[memoryview] | PagedView,
    downstream_offset: int,
    *,
    channel: object = None,
) -> tuple[RingBuffer, RingBuffer]:
    """The (guest→host, host→guest) rings inside a channel's ring GPADL.

    Pages [0, S) are the guest's outbound ring and [S, end) its inbound ring, S being
    OPENCHANNEL's ``downstream_ringbuffer_pageoffset`` (channel.c:__vmbus_open, spec §2.7). S comes
    from the guest: each ring needs a control page and at least one data page, else RingViolation.
    """
    view = pages if isinstance(pages, PagedView) else PagedView(pages)
    total = len(view) // PAGE_SIZE
    if len(view) % PAGE_SIZE or not 2 <= downstream_offset <= total - 2:
        raise RingViolation(
            channel,
            "downstream_ringbuffer_pageoffset",
            downstream_offset,
            f"ring GPADL of {len(view)} bytes cannot hold two rings split there",
        )
    split = downstream_offset * PAGE_SIZE
    outbound = RingBuffer(view.slice(0, split), channel=channel)
    inbound = RingBuffer(view.slice(split, len(view) - split), channel=channel)
    return outbound, inbound


class RingReader:
    """Consumer of one ring: the host on the guest's outbound ring, the guest model on its inbound.

    Packets are read with a private read index (priv_read_index in Linux) and published with
    ``commit()``, which also answers whether the producer must be signalled because it was blocked
    on pending_send_sz (ring_buffer.c:hv_pkt_iter_close). ``max_packet_size`` (bytes without the
    trailer), when given, turns an oversized packet into a RingViolation instead of a copy.
    """

    def __init__(self, ring: RingBuffer, *, max_packet_size: int | None = None) -> None:
        self.ring = ring
        self.max_packet_size = max_packet_size
        self._read = ring.load_read_index()
        self._published = self._read

    @property
    def private_read_index(self) -> int:
        return self._read

    def bytes_available(self) -> int:
        """Unread bytes after the private read index (validates the producer's write_index)."""
        return self.ring.bytes_to_read(self.ring.load_write_index(), self._read)

    def read(self) -> bytes | None:
        """The next packet (len8·8 bytes, trailer excluded) or None when the ring is empty.

        Raises RingViolation when write_index is bad, when fewer bytes than a descriptor plus
        trailer are available, or when len8/offset8 disagree with the available data. On a violation
        the private index does not move.
        """
        ring = self.ring
        avail = self.bytes_available()
        if avail == 0:
            return None
        ch = ring.channel
        if avail < DESCRIPTOR_SIZE + TRAILER_SIZE:
            raise RingViolation(
                ch, "write_index", ring.write_index, f"only {avail} bytes available, less than a packet"
            )
        desc = ring.read_data(self._read, DESCRIPTOR_SIZE)
        _ptype, offset8, len8 = _DESC_LENS.unpack_from(desc, 0)
        length = len8 * 8
        if length < DESCRIPTOR_SIZE:
            raise RingViolation(ch, "len8", len8, "packet shorter than its descriptor")
        if length + TRAILER_SIZE > avail:
            raise RingViolation(ch, "len8", len8, f"packet + trailer exceed the {avail} bytes available")
        if offset8 < 2 or offset8 > len8:
            raise RingViolation(ch, "offset8", offset8, f"payload offset outside the packet (len8 {len8})")
        if self.max_packet_size is not None and length > self.max_packet_size:
            raise RingViolation(
                ch, "len8", len8, f"packet larger than the {self.max_packet_size}-byte maximum"
            )
        packet = desc + ring.read_data(
            (self._read + DESCRIPTOR_SIZE) % ring.data_size, length - DESCRIPTOR_SIZE
        )
        self._read = (self._read + length + TRAILER_SIZE) % ring.data_size  # __hv_pkt_iter_next
        return packet

    def commit(self) -> bool:
        """Publish the private read index; True if the producer must now be signalled.

        hv_pkt_iter_close(): only when feat_pending_send_sz is set, pending_send_sz ≠ 0, the producer
        did *not* already have more than pending_send_sz free before this batch, and now does. The
        arithmetic is u32 as in the kernel.
        """
        ring = self.ring
        start = self._published
        full_barrier()  # reads of the data before the index update (virt_rmb)
        ring.read_index = self._read
        self._published = self._read
        if not ring.feature_bits & FEAT_PENDING_SEND_SZ:
            return False
        full_barrier()  # virt_mb(): publish read_index before looking at pending_send_sz
        pending = ring.pending_send_sz
        if not pending:
            return False
        curr_write_sz = ring.bytes_to_write(ring.load_write_index(), self._read)
        bytes_read = self._read - start if self._read >= start else ring.data_size - start + self._read
        if ((curr_write_sz - bytes_read) & 0xFFFFFFFF) > pending:
            return False  # the producer was not blocked before this batch
        return curr_write_sz > pending

    def read_all(self, limit: int | None = None) -> tuple[list[bytes], bool]:
        """Drain up to ``limit`` packets, publish, and return (packets, signal the producer?).

        A host must drain completely on every guest signal: the guest signals only on an empty →
        non-empty transition (ring_buffer.c:hv_signal_on_write).
        """
        packets: list[bytes] = []
        while limit is None or len(packets) < limit:
            pkt = self.read()
            if pkt is None:
                break
            packets.append(pkt)
        return packets, self.commit() if packets else False

    def mask_interrupts(self) -> None:
        """hv_begin_read(): ask the producer not to signal while we poll."""
        self.ring.interrupt_mask = 1
        full_barrier()

    def unmask_interrupts(self) -> int:
        """hv_end_read(): allow signals again and return the bytes still unread; non-zero means a
        packet raced in and the caller must poll again (no signal will come for it)."""
        self.ring.interrupt_mask = 0
        full_barrier()
        return self.ring.bytes_to_read(self.ring.load_write_index(), self._published)


class SignalPolicy(enum.Enum):
    """When a producer signals the consumer after writing."""

    EMPTY_TO_NONEMPTY = "empty"
    """hv_signal_on_write(): interrupt_mask == 0 and the ring was empty before the write (what Linux
    does as a producer and what real Hyper-V does)."""
    WHEN_UNMASKED = "unmasked"
    """Whenever interrupt_mask == 0; Linux tolerates the extra interrupts (spec §2.9)."""


class WriteResult(NamedTuple):
    written: bool
    """False when the ring lacked space (nothing was written)."""
    signal: bool
    """True when the consumer must be interrupted now."""


class RingWriter:
    """Producer of one ring: the host on the guest's inbound ring, the guest model on its outbound.

    Follows hv_ringbuffer_write(): refuse a write unless free space is strictly greater than the
    packet plus its 8-byte trailer (a ring is never filled completely, so full ≠ empty), copy the
    packet and the trailer ``(u64)old_write_index << 32``, then publish write_index.
    """

    def __init__(self, ring: RingBuffer, *, policy: SignalPolicy = SignalPolicy.EMPTY_TO_NONEMPTY) -> None:
        self.ring = ring
        self.policy = policy
        self._write = ring.load_write_index()
        self._pending_set = False

    @property
    def private_write_index(self) -> int:
        return self._write

    def free_bytes(self) -> int:
        """hv_get_bytes_to_write() with our own write index (validates the consumer's read_index)."""
        return self.ring.bytes_to_write(self._write, self.ring.load_read_index())

    def can_write(self, packet_size: int) -> bool:
        return self.free_bytes() > packet_size + TRAILER_SIZE

    def write(self, packet: bytes, *, set_pending_on_full: bool = False) -> WriteResult:
        """Write one packet (len8·8 bytes, built by hvlab.protocol.vmbus_packet).

        On a full ring nothing is written; with ``set_pending_on_full`` the needed size is stored in
        pending_send_sz so the consumer signals when it frees enough (hv_pkt_iter_close), and the
        space is re-checked once to close the race with a consumer that just drained.
        """
        if len(packet) % 8 or len(packet) < DESCRIPTOR_SIZE:
            raise ValueError(
                f"packet length {len(packet)} is not a multiple of 8 of at least {DESCRIPTOR_SIZE}"
            )
        ring = self.ring
        total = len(packet) + TRAILER_SIZE
        if total >= ring.data_size:
            raise ValueError(f"a {len(packet)}-byte packet can never fit a {ring.data_size}-byte ring")
        if self.free_bytes() <= total:
            if not set_pending_on_full:
                return WriteResult(False, False)
            ring.pending_send_sz = total
            self._pending_set = True
            full_barrier()
            if self.free_bytes() <= total:
                return WriteResult(False, False)
        old = self._write
        ring.write_data(old, bytes(packet) + _TRAILER.pack(old << 32))
        new = (old + total) % ring.data_size
        full_barrier()  # data before the index (virt_mb in hv_ringbuffer_write)
        ring.write_index = new
        self._write = new
        if self._pending_set:
            ring.pending_send_sz = 0
            self._pending_set = False
        full_barrier()  # hv_signal_on_write: publish before reading the consumer's fields
        if ring.interrupt_mask:
            return WriteResult(True, False)
        if self.policy is SignalPolicy.WHEN_UNMASKED:
            return WriteResult(True, True)
        return WriteResult(True, old == ring.load_read_index())

"""Packets inside VMBus ring buffers (spec/HOST_CONTRACT.md §2.10).

Every packet starts with a 16-byte ``vmpacket_descriptor`` (type u16, offset8 u16, len8 u16,
flags u16, trans_id u64). ``len8`` is the whole packet (descriptor + extra header + payload +
zero padding) in 8-byte units; ``offset8`` is where the payload starts, also in 8-byte units. In
the ring each packet is followed by an 8-byte trailer, ``(u64)previous_write_index << 32``, that is
not counted in len8 (ring_buffer.c:hv_ringbuffer_write); the ring code in hvlab.vmbus.ring adds and
skips it, so the functions here deal with packets without trailers.

Pure functions, no I/O. Parsing is strict: packets come from the untrusted guest.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import construct as c

from hvlab.protocol.errors import FieldError

DESCRIPTOR_SIZE = 16
"""sizeof(struct vmpacket_descriptor)."""
TRAILER_SIZE = 8
"""VMBUS_PKT_TRAILER: the u64 after each packet in a ring, holding the previous write index << 32."""
XFER_HEADER_SIZE = 24
"""Descriptor + xfer_pageset_id u16, sender_owns_set u8, reserved u8, range_cnt u32."""
GPA_HEADER_SIZE = 24
"""Descriptor + reserved u32 + range_cnt u32 (vmdata_gpa_direct / vmbus_packet_mpb_array)."""
PAGE_SIZE = 4096

VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED = 0x1
"""flags bit 0: the sender wants a VM_PKT_COMP echoing trans_id."""

NETVSC_NO_COMPLETION_TRANS_ID = 0xFFFFFFFFFFFFFFFD
"""trans_id netvsc puts on packets that do not request a completion (spec §2.10; informative)."""


class PacketType(enum.IntEnum):
    """enum vmbus_packet_type (include/linux/hyperv.h)."""

    INVALID = 0x0
    SYNCH = 0x1
    ADD_XFER_PAGESET = 0x2
    RM_XFER_PAGESET = 0x3
    ESTABLISH_GPADL = 0x4
    TEARDOWN_GPADL = 0x5
    DATA_INBAND = 0x6
    DATA_USING_XFER_PAGES = 0x7
    DATA_USING_GPADL = 0x8
    DATA_USING_GPA_DIRECT = 0x9
    CANCEL_REQUEST = 0xA
    COMP = 0xB
    DATA_USING_ADDITIONAL_PKT = 0xC
    ADDITIONAL_DATA = 0xD


class PacketError(FieldError):
    """A ring packet whose descriptor or extra header is inconsistent (field, value say which)."""

    what = "bad VMBus packet:"


DESCRIPTOR = c.Struct(
    "type" / c.Int16ul,  # @0
    "offset8" / c.Int16ul,  # @2
    "len8" / c.Int16ul,  # @4
    "flags" / c.Int16ul,  # @6
    "trans_id" / c.Int64ul,  # @8
)
"""struct vmpacket_descriptor."""

XFER_PAGE_HEADER = c.Struct(
    "xfer_pageset_id" / c.Int16ul,  # @16
    "sender_owns_set" / c.Int8ul,  # @18
    "reserved" / c.Default(c.Int8ul, 0),  # @19
    "range_cnt" / c.Int32ul,  # @20
)
"""vmtransfer_page_packet_header after the descriptor; ranges {byte_count u32, byte_offset u32} follow @24."""

GPA_DIRECT_HEADER = c.Struct(
    "reserved" / c.Default(c.Int32ul, 0),  # @16
    "range_cnt" / c.Int32ul,  # @20
)
"""vmdata_gpa_direct after the descriptor; ranges {len u32, offset u32, pfn[] u64} follow @24."""

_DESC = struct.Struct("<HHHHQ")
_U32X2 = struct.Struct("<II")


def align8(n: int) -> int:
    """Round up to a multiple of 8, as every length in the ring is."""
    return (n + 7) & ~7


@dataclass(frozen=True)
class XferRange:
    """One vmtransfer_page_range: a slice of the receive buffer (offset from its start)."""

    byte_count: int
    byte_offset: int


@dataclass(frozen=True)
class GpaRange:
    """One GPA-direct range: ``len`` bytes from ``offset`` into the first of consecutive PFNs."""

    len: int
    offset: int
    pfns: tuple[int, ...]

    @staticmethod
    def pfn_count(length: int, offset: int) -> int:
        """ceil((offset + len) / 4096): the number of PFNs a range carries (spec §2.10)."""
        return (offset + length + PAGE_SIZE - 1) // PAGE_SIZE

    @property
    def wire_size(self) -> int:
        return 8 + 8 * len(self.pfns)


@dataclass
class Packet:
    """A parsed ring packet. ``payload`` is the bytes from offset8·8 to len8·8 (padding included)."""

    type: int
    flags: int
    trans_id: int
    offset8: int
    len8: int
    payload: bytes
    xfer_pageset_id: int | None = None
    sender_owns_set: bool = False
    xfer_ranges: list[XferRange] = field(default_factory=list)
    gpa_ranges: list[GpaRange] = field(default_factory=list)

    @property
    def completion_requested(self) -> bool:
        return bool(self.flags & VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED)

    @property
    def total_size(self) -> int:
        """Bytes in the ring without the trailer (len8·8)."""
        return self.len8 * 8


def build_packet(
    ptype: int, payload: bytes, trans_id: int = 0, flags: int = 0, extra_header: bytes = b""
) -> bytes:
    """Descriptor + extra header + payload, zero-padded to 8 (no trailer).

    offset8 covers descriptor and extra header; len8 covers everything (hv_pkt_datalen() =
    (len8 − offset8)·8 therefore includes the padding, as the guest sees it).
    """
    if len(extra_header) % 8:
        raise ValueError("extra header must be a multiple of 8 bytes")
    offset = DESCRIPTOR_SIZE + len(extra_header)
    total = align8(offset + len(payload))
    if total // 8 > 0xFFFF:
        raise ValueError(f"packet of {total} bytes does not fit len8 (u16)")
    head = _DESC.pack(ptype, offset // 8, total // 8, flags, trans_id & 0xFFFFFFFFFFFFFFFF)
    return head + bytes(extra_header) + bytes(payload) + bytes(total - offset - len(payload))


def build_inband(payload: bytes, trans_id: int = 0, completion_requested: bool = False) -> bytes:
    """VM_PKT_DATA_INBAND (channel.c:vmbus_sendpacket): payload right after the descriptor."""
    flags = VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED if completion_requested else 0
    return build_packet(PacketType.DATA_INBAND, payload, trans_id, flags)


def build_completion(payload: bytes, trans_id: int) -> bytes:
    """VM_PKT_COMP echoing ``trans_id``, flags 0 (spec §2.10: the trans_id must match exactly)."""
    return build_packet(PacketType.COMP, payload, trans_id, 0)


def build_xfer_pages(
    ranges: Sequence[XferRange | tuple[int, int]],
    payload: bytes,
    trans_id: int,
    xfer_pageset_id: int,
    *,
    sender_owns_set: bool = False,
    completion_requested: bool = True,
) -> bytes:
    """VM_PKT_DATA_USING_XFER_PAGES: the netvsc receive path (spec §3.5).

    ``ranges`` are (byte_count, byte_offset) into the transfer page set; the payload (the NVSP
    message) follows the ranges.
    """
    rs = [r if isinstance(r, XferRange) else XferRange(*r) for r in ranges]
    extra = XFER_PAGE_HEADER.build(
        dict(xfer_pageset_id=xfer_pageset_id, sender_owns_set=int(sender_owns_set), range_cnt=len(rs))
    ) + b"".join(_U32X2.pack(r.byte_count, r.byte_offset) for r in rs)
    flags = VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED if completion_requested else 0
    return build_packet(PacketType.DATA_USING_XFER_PAGES, payload, trans_id, flags, extra)


def build_gpa_direct(
    ranges: Sequence[GpaRange], payload: bytes, trans_id: int, *, completion_requested: bool = True
) -> bytes:
    """VM_PKT_DATA_USING_GPA_DIRECT: netvsc send with page lists (channel.c:vmbus_sendpacket_mpb_desc)."""
    parts = [GPA_DIRECT_HEADER.build(dict(range_cnt=len(ranges)))]
    for r in ranges:
        if len(r.pfns) != GpaRange.pfn_count(r.len, r.offset):
            raise ValueError(
                f"range len={r.len} offset={r.offset} needs {GpaRange.pfn_count(r.len, r.offset)} PFNs"
            )
        parts.append(_U32X2.pack(r.len, r.offset) + struct.pack(f"<{len(r.pfns)}Q", *r.pfns))
    flags = VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED if completion_requested else 0
    return build_packet(PacketType.DATA_USING_GPA_DIRECT, payload, trans_id, flags, b"".join(parts))


def parse_descriptor(raw: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int]:
    """(type, offset8, len8, flags, trans_id) of the first 16 bytes."""
    if len(raw) < DESCRIPTOR_SIZE:
        raise PacketError("len8", len(raw) // 8, "shorter than a descriptor")
    return _DESC.unpack_from(raw, 0)


def parse_packet(raw: bytes | bytearray | memoryview) -> Packet:
    """Parse one packet of exactly len8·8 bytes (as hvlab.vmbus.ring returns them).

    Strict where the guest is lenient (hv_pkt_iter_first caps a bad offset8 to 2): offset8 must be
    ≥ 2 and ≤ len8, len8·8 must equal the buffer length, and transfer-page / GPA-direct range
    tables must fit inside offset8·8. Raises PacketError.
    """
    data = bytes(raw)
    ptype, offset8, len8, flags, trans_id = parse_descriptor(data)
    if len8 * 8 != len(data):
        raise PacketError("len8", len8, f"packet buffer is {len(data)} bytes")
    if offset8 < 2 or offset8 > len8:
        raise PacketError("offset8", offset8, f"must be in 2..len8 ({len8})")
    off = offset8 * 8
    pkt = Packet(ptype, flags, trans_id, offset8, len8, data[off:])
    if ptype == PacketType.DATA_USING_XFER_PAGES:
        if off < XFER_HEADER_SIZE:
            raise PacketError("offset8", offset8, "too small for a transfer-page header")
        hdr = XFER_PAGE_HEADER.parse(data[DESCRIPTOR_SIZE:XFER_HEADER_SIZE])
        if XFER_HEADER_SIZE + 8 * hdr.range_cnt > off:
            raise PacketError("range_cnt", hdr.range_cnt, f"ranges overrun payload offset {off}")
        pkt.xfer_pageset_id = hdr.xfer_pageset_id
        pkt.sender_owns_set = bool(hdr.sender_owns_set)
        pkt.xfer_ranges = [
            XferRange(*_U32X2.unpack_from(data, XFER_HEADER_SIZE + 8 * i)) for i in range(hdr.range_cnt)
        ]
    elif ptype == PacketType.DATA_USING_GPA_DIRECT:
        if off < GPA_HEADER_SIZE:
            raise PacketError("offset8", offset8, "too small for a GPA-direct header")
        hdr = GPA_DIRECT_HEADER.parse(data[DESCRIPTOR_SIZE:GPA_HEADER_SIZE])
        pos = GPA_HEADER_SIZE
        for _ in range(hdr.range_cnt):
            if pos + 8 > off:
                raise PacketError("range_cnt", hdr.range_cnt, f"ranges overrun payload offset {off}")
            length, offset = _U32X2.unpack_from(data, pos)
            if offset >= PAGE_SIZE:
                raise PacketError("offset", offset, "GPA range offset must be < 4096")
            n = GpaRange.pfn_count(length, offset)
            if pos + 8 + 8 * n > off:
                raise PacketError("len", length, f"range needs {n} PFNs, beyond payload offset {off}")
            pfns = struct.unpack_from(f"<{n}Q", data, pos + 8)
            pkt.gpa_ranges.append(GpaRange(length, offset, tuple(pfns)))
            pos += 8 + 8 * n
    return pkt

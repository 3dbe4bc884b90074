"""vfio-user wire formats (QEMU docs/interop/vfio-user.rst, protocol 0.1) and the VFIO constants it reuses.

Declarations only: no sockets, no file descriptors. The server, the client and the tests all build and
parse messages with these structures so a field can never be laid out twice in two different ways.

All integers are in host byte order, as the protocol says ("the endianness of the host system"); the
structures therefore use construct's native-endian fields.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from construct import (
    Array,
    Bytes,
    Container,
    GreedyBytes,
    Int16un,
    Int32un,
    Int64un,
    Struct,
    this,
)

# --------------------------------------------------------------------------------------------------
# Protocol version and limits

VERSION_MAJOR = 0
VERSION_MINOR = 1

#: Defaults the protocol assumes when a peer does not name a capability.
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 0xFFFF
DEFAULT_PGSIZES = 4096


class Command(enum.IntEnum):
    """Message command numbers (the ``Command`` header field)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


def command_name(value: int) -> str:
    """A printable name for a command number, also for numbers no enum member has (for logs)."""
    try:
        return Command(value).name
    except ValueError:
        return f"UNKNOWN({value})"


# Header ``flags`` field
MSG_TYPE_MASK = 0xF
MSG_TYPE_COMMAND = 0x0
MSG_TYPE_REPLY = 0x1
MSG_FLAG_NO_REPLY = 1 << 4
MSG_FLAG_ERROR = 1 << 5
MSG_FLAGS_KNOWN = MSG_TYPE_MASK | MSG_FLAG_NO_REPLY | MSG_FLAG_ERROR

# --------------------------------------------------------------------------------------------------
# <linux/vfio.h> constants reused by the protocol

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1


class PciRegion(enum.IntEnum):
    """VFIO_PCI_*_REGION_INDEX."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


VFIO_PCI_NUM_REGIONS = 9


class PciIrq(enum.IntEnum):
    """VFIO_PCI_*_IRQ_INDEX."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


VFIO_PCI_NUM_IRQS = 5

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2

VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_DATA_TYPE_MASK = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_IRQ_SET_ACTION_TYPE_MASK = (
    VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER
)

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1

VFIO_USER_IO_FD_TYPE_IOEVENTFD = 0
VFIO_USER_IO_FD_TYPE_IOREGIONFD = 1

# --------------------------------------------------------------------------------------------------
# Structures (offsets relative to the end of the 16-byte header unless said otherwise)

Header = Struct(
    "msg_id" / Int16un,
    "command" / Int16un,
    "msg_size" / Int32un,
    "flags" / Int32un,
    "error" / Int32un,
)
HEADER_SIZE = Header.sizeof()  # 16

Version = Struct(
    "major" / Int16un,
    "minor" / Int16un,
    "data" / GreedyBytes,  # UTF-8 JSON, NUL-terminated; optional
)
VERSION_FIXED_SIZE = 4

DmaMap = Struct(
    "argsz" / Int32un,
    "flags" / Int32un,
    "offset" / Int64un,
    "address" / Int64un,
    "size" / Int64un,
)

DmaUnmap = Struct(
    "argsz" / Int32un,
    "flags" / Int32un,
    "address" / Int64un,
    "size" / Int64un,
)

DeviceInfo = Struct(
    "argsz" / Int32un,
    "flags" / Int32un,
    "num_regions" / Int32un,
    "num_irqs" / Int32un,
)

RegionInfo = Struct(
    "argsz" / Int32un,
    "flags" / Int32un,
    "index" / Int32un,
    "cap_offset" / Int32un,
    "size" / Int64un,
    "offset" / Int64un,
)

CapHeader = Struct(
    "id" / Int16un,
    "version" / Int16un,
    "next" / Int32un,
)

SparseMmapArea = Struct(
    "offset" / Int64un,
    "size" / Int64un,
)

#: VFIO_REGION_INFO_CAP_SPARSE_MMAP, including its cap header.
SparseMmapCap = Struct(
    "header" / CapHeader,
    "nr_areas" / Int32un,
    "reserved" / Int32un,
    "areas" / Array(this.nr_areas, SparseMmapArea),
)

RegionIoFds = Struct(
    "argsz" / Int32un,
    "flags" / Int32un,
    "index" / Int32un,
    "count" / Int32un,
)

SubRegionIoFd = Struct(
    "offset" / Int64un,
    "size" / Int64un,
    "fd_index" / Int32un,
    "type" / Int32un,
    "flags" / Int32un,
    "padding" / Int32un,
    "datamatch" / Int64un,  # or user_data for ioregionfd
)

IrqInfo = Struct(
    "argsz" / Int32un,
    "flags" / Int32un,
    "index" / Int32un,
    "count" / Int32un,
)

IrqSet = Struct(
    "argsz" / Int32un,
    "flags" / Int32un,
    "index" / Int32un,
    "start" / Int32un,
    "count" / Int32un,
)
IRQ_SET_FIXED_SIZE = IrqSet.sizeof()  # 20; DATA_BOOL bytes follow

RegionAccess = Struct(
    "offset" / Int64un,
    "region" / Int32un,
    "count" / Int32un,
)
REGION_ACCESS_FIXED_SIZE = RegionAccess.sizeof()  # 16; data follows for a read reply / write request

DmaAccess = Struct(
    "address" / Int64un,
    "count" / Int64un,
)
DMA_ACCESS_FIXED_SIZE = DmaAccess.sizeof()  # 16; data follows for a read reply / write request

WriteOne = Struct(
    "offset" / Int64un,
    "region" / Int32un,
    "count" / Int32un,
    "data" / Bytes(8),
)

WriteMulti = Struct(
    "wr_cnt" / Int64un,
)
WRITE_MULTI_FIXED_SIZE = WriteMulti.sizeof()

DeviceFeature = Struct(
    "argsz" / Int32un,
    "flags" / Int32un,
)

# --------------------------------------------------------------------------------------------------
# Helpers shared by both sides


def build_header(msg_id: int, command: int, payload_len: int, flags: int = 0, error: int = 0) -> bytes:
    """Header bytes for a message whose payload is ``payload_len`` bytes long."""
    return Header.build(
        Container(
            msg_id=msg_id & 0xFFFF,
            command=command,
            msg_size=HEADER_SIZE + payload_len,
            flags=flags,
            error=error,
        )
    )


def capabilities_json(caps: dict[str, Any]) -> bytes:
    """The version message's data: ``{"capabilities": {...}}`` as UTF-8 with the terminating NUL."""
    return json.dumps({"capabilities": caps}, separators=(",", ":")).encode() + b"\0"


def parse_capabilities(data: bytes) -> dict[str, Any]:
    """Parse a version message's JSON data into the ``capabilities`` object.

    Raises ValueError with a message naming what is wrong (missing NUL, not JSON, wrong types), so the
    caller can log the field and reject the version.
    """
    if not data:
        return {}
    if not data.endswith(b"\0"):
        raise ValueError("version data is not NUL-terminated")
    text = data[:-1]
    try:
        obj = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"version data is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError("version data is not a JSON object")
    caps = obj.get("capabilities", {})
    if not isinstance(caps, dict):
        raise ValueError("capabilities is not a JSON object")
    for key in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"):
        if key in caps and (not isinstance(caps[key], int) or isinstance(caps[key], bool) or caps[key] < 0):
            raise ValueError(f"capability {key} is not a non-negative integer")
    if "write_multiple" in caps and not isinstance(caps["write_multiple"], bool):
        raise ValueError("capability write_multiple is not a boolean")
    return caps

"""NVSP: the message layer hv_netvsc and its host exchange inside VMBus packets (spec §3.2, §3.10).

Every NVSP message is ``msg_type u32 @0`` followed by a type-specific union; ``sizeof(struct
nvsp_message)`` is 40 bytes and Linux always sends 40 (zero-filled) bytes, except its receive
completions (8 bytes). The host must send 40-byte messages in its completions too: the guest copies 40
bytes out of every init-type completion regardless of the packet's length (netvsc.c:
netvsc_send_completion). ``build()`` therefore always pads to 40 bytes.

Each layout is declared once with construct (the full message, msg_type included, so the offsets in
the comments are byte offsets in the NVSP payload). The data path (one NVSP message per frame batch)
uses ``flat_struct()``, a ``struct.Struct`` derived mechanically from the same declaration, because a
construct parse costs microseconds that the packet path cannot afford.

Pure data layouts and functions, no I/O. Parsing is strict about lengths: the payload comes from the
untrusted guest, and ``NvspError`` names the offending field.
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import construct as c

from hvlab.protocol.errors import FieldError

NVSP_MESSAGE_SIZE = 40
"""sizeof(struct nvsp_message): what both sides send (except guest receive completions, 8 bytes)."""
RECV_COMPLETION_SIZE = 8
"""The guest's receive completion: {msg_type 108, status} (netvsc.c:enq_receive_complete)."""

NETVSC_RECEIVE_BUFFER_ID = 0xCAFE
"""id in SEND_RECV_BUF / REVOKE_RECV_BUF, and the xfer_pageset_id of every receive packet."""
NETVSC_SEND_BUFFER_ID = 0
"""id in SEND_SEND_BUF / REVOKE_SEND_BUF."""
NO_SECTION = 0xFFFFFFFF
"""send_buf_section_index meaning "not in the send buffer" (NETVSC_INVALID_INDEX)."""

CHANNEL_TYPE_DATA = 0
CHANNEL_TYPE_CONTROL = 1

DATAPATH_SYNTHETIC = 0
DATAPATH_VF = 1

SUBCHANNEL_OP_ALLOCATE = 1
INDIRECTION_TABLE_SIZE = 16
"""VRSS_SEND_TAB_SIZE: the guest ignores a SEND_INDIRECTION_TABLE with another count."""


class MsgType(enum.IntEnum):
    """enum nvsp_message_type values Linux uses (hyperv_net.h)."""

    INIT = 1
    INIT_COMPLETE = 2
    SEND_NDIS_VER = 100
    SEND_RECV_BUF = 101
    SEND_RECV_BUF_COMPLETE = 102
    REVOKE_RECV_BUF = 103
    SEND_SEND_BUF = 104
    SEND_SEND_BUF_COMPLETE = 105
    REVOKE_SEND_BUF = 106
    SEND_RNDIS_PKT = 107
    SEND_RNDIS_PKT_COMPLETE = 108
    SEND_NDIS_CONFIG = 125
    SEND_VF_ASSOCIATION = 128
    SWITCH_DATA_PATH = 129
    UPLINK_CONNECT_STATE_DEPRECATED = 130
    OID_QUERY_EX = 131
    OID_QUERY_EX_COMP = 132
    SUBCHANNEL = 133
    SEND_INDIRECTION_TABLE = 134


class Status(enum.IntEnum):
    """NVSP_STAT_*."""

    NONE = 0
    SUCCESS = 1
    FAIL = 2
    PROTOCOL_TOO_NEW = 3
    PROTOCOL_TOO_OLD = 4
    INVALID_RNDIS_PKT = 5
    BUSY = 6
    PROTOCOL_UNSUPPORTED = 7


class Version(enum.IntEnum):
    """NVSP protocol versions (NVSP_PROTOCOL_VERSION_*)."""

    V1 = 0x2
    V2 = 0x30002
    V4 = 0x40000
    V5 = 0x50000
    V6 = 0x60000
    V61 = 0x60001


GUEST_VERSIONS: tuple[int, ...] = (Version.V61, Version.V6, Version.V5, Version.V4, Version.V2, Version.V1)
"""The order netvsc tries versions, min = max each time (netvsc.c:netvsc_connect_vsp); same in 6.1/6.12/7.3."""


class Capability(enum.IntFlag):
    """nvsp_2_vsc_capability bits in SEND_NDIS_CONFIG.capability."""

    VMQ = 1 << 0
    CHIMNEY = 1 << 1
    SRIOV = 1 << 2
    IEEE8021Q = 1 << 3
    CORRELATION_ID = 1 << 4
    TEAMING = 1 << 5
    VSUBNETID = 1 << 6
    RSC = 1 << 7


def guest_capability(version: int) -> int:
    """The capability a non-isolated Linux guest sends for ``version`` (spec §3.3 step 3): 0x08, 0x2C, 0xAC."""
    cap = Capability.IEEE8021Q
    if version >= Version.V5:
        cap |= Capability.SRIOV | Capability.TEAMING
    if version >= Version.V61:
        cap |= Capability.RSC
    return int(cap)


def guest_ndis_version(version: int) -> tuple[int, int]:
    """NDIS (major, minor) netvsc announces: 6.1 up to NVSP 4, 6.30 from NVSP 5 (netvsc.c)."""
    return (6, 1) if version <= Version.V4 else (6, 30)


class NvspError(FieldError):
    """An NVSP message that is too short or has a bad field (``field``/``value`` say which)."""

    what = "NVSP"


# --------------------------------------------------------------------------------------------------
# Layouts (offsets are within the NVSP payload; msg_type included)
# --------------------------------------------------------------------------------------------------


def _msg(msg_type: MsgType, *fields: Any) -> c.Struct:
    return c.Struct("msg_type" / c.Const(int(msg_type), c.Int32ul), *fields)


INIT = _msg(MsgType.INIT, "min_protocol_ver" / c.Int32ul, "max_protocol_ver" / c.Int32ul)  # @4, @8
INIT_COMPLETE = _msg(
    MsgType.INIT_COMPLETE,
    "negotiated_protocol_ver" / c.Int32ul,  # @4 (ignored by Linux)
    "max_mdl_chain_len" / c.Int32ul,  # @8 (ignored)
    "status" / c.Int32ul,  # @12
)
SEND_NDIS_VER = _msg(MsgType.SEND_NDIS_VER, "ndis_major_ver" / c.Int32ul, "ndis_minor_ver" / c.Int32ul)
SEND_RECV_BUF = _msg(MsgType.SEND_RECV_BUF, "gpadl_handle" / c.Int32ul, "id" / c.Int16ul)  # @4, @8
RECV_SECTION = c.Struct(
    "offset" / c.Int32ul,
    "sub_alloc_size" / c.Int32ul,
    "num_sub_allocs" / c.Int32ul,
    "end_offset" / c.Int32ul,
)
"""nvsp_1_receive_buffer_section (16 bytes)."""
SEND_RECV_BUF_COMPLETE = _msg(
    MsgType.SEND_RECV_BUF_COMPLETE,
    "status" / c.Int32ul,  # @4
    "num_sections" / c.Int32ul,  # @8 (the guest requires 1)
    "section" / RECV_SECTION,  # @12 sections[0]; the guest needs ≥ 28 bytes in all
)
REVOKE_RECV_BUF = _msg(MsgType.REVOKE_RECV_BUF, "id" / c.Int16ul)
SEND_SEND_BUF = _msg(MsgType.SEND_SEND_BUF, "gpadl_handle" / c.Int32ul, "id" / c.Int16ul)
SEND_SEND_BUF_COMPLETE = _msg(
    MsgType.SEND_SEND_BUF_COMPLETE, "status" / c.Int32ul, "section_size" / c.Int32ul
)
REVOKE_SEND_BUF = _msg(MsgType.REVOKE_SEND_BUF, "id" / c.Int16ul)
SEND_RNDIS_PKT = _msg(
    MsgType.SEND_RNDIS_PKT,
    "channel_type" / c.Int32ul,  # @4 0 = data, 1 = control
    "send_buf_section_index" / c.Int32ul,  # @8 NO_SECTION = none
    "send_buf_section_size" / c.Int32ul,  # @12
)
SEND_RNDIS_PKT_COMPLETE = _msg(MsgType.SEND_RNDIS_PKT_COMPLETE, "status" / c.Int32ul)
SEND_NDIS_CONFIG = _msg(
    MsgType.SEND_NDIS_CONFIG,
    "mtu" / c.Int32ul,  # @4 netdev MTU + 14
    "reserved" / c.Default(c.Int32ul, 0),  # @8
    "capability" / c.Int64ul,  # @12 Capability bits
)
SEND_VF_ASSOCIATION = _msg(MsgType.SEND_VF_ASSOCIATION, "allocated" / c.Int32ul, "serial" / c.Int32ul)
SWITCH_DATA_PATH = _msg(MsgType.SWITCH_DATA_PATH, "active_datapath" / c.Int32ul)
SUBCHANNEL_REQUEST = _msg(MsgType.SUBCHANNEL, "op" / c.Int32ul, "num_subchannels" / c.Int32ul)
SUBCHANNEL_COMPLETE = _msg(MsgType.SUBCHANNEL, "status" / c.Int32ul, "num_subchannels" / c.Int32ul)
SEND_INDIRECTION_TABLE = _msg(
    MsgType.SEND_INDIRECTION_TABLE,
    "count" / c.Int32ul,  # @4 must be 16
    "offset" / c.Int32ul,  # @8 from the start of the NVSP message (0x60001 only; older read @40... see §3.8)
)

GUEST_TO_HOST: dict[MsgType, c.Struct] = {
    MsgType.INIT: INIT,
    MsgType.SEND_NDIS_VER: SEND_NDIS_VER,
    MsgType.SEND_RECV_BUF: SEND_RECV_BUF,
    MsgType.REVOKE_RECV_BUF: REVOKE_RECV_BUF,
    MsgType.SEND_SEND_BUF: SEND_SEND_BUF,
    MsgType.REVOKE_SEND_BUF: REVOKE_SEND_BUF,
    MsgType.SEND_RNDIS_PKT: SEND_RNDIS_PKT,
    MsgType.SEND_RNDIS_PKT_COMPLETE: SEND_RNDIS_PKT_COMPLETE,
    MsgType.SEND_NDIS_CONFIG: SEND_NDIS_CONFIG,
    MsgType.SWITCH_DATA_PATH: SWITCH_DATA_PATH,
    MsgType.SUBCHANNEL: SUBCHANNEL_REQUEST,
}
"""Messages the guest sends, as the host parses them (SUBCHANNEL is the request form)."""

HOST_TO_GUEST: dict[MsgType, c.Struct] = {
    MsgType.INIT_COMPLETE: INIT_COMPLETE,
    MsgType.SEND_RECV_BUF_COMPLETE: SEND_RECV_BUF_COMPLETE,
    MsgType.SEND_SEND_BUF_COMPLETE: SEND_SEND_BUF_COMPLETE,
    MsgType.SEND_RNDIS_PKT: SEND_RNDIS_PKT,
    MsgType.SEND_RNDIS_PKT_COMPLETE: SEND_RNDIS_PKT_COMPLETE,
    MsgType.SEND_VF_ASSOCIATION: SEND_VF_ASSOCIATION,
    MsgType.SUBCHANNEL: SUBCHANNEL_COMPLETE,
    MsgType.SEND_INDIRECTION_TABLE: SEND_INDIRECTION_TABLE,
}
"""Messages the host sends, as the guest parses them (SUBCHANNEL is the completion form)."""

GUEST_MIN_COMPLETION: dict[str, dict[int, int]] = {
    "6.1": {MsgType.INIT_COMPLETE: 28, MsgType.SEND_RECV_BUF_COMPLETE: 28, MsgType.SEND_SEND_BUF_COMPLETE: 12,
            MsgType.SUBCHANNEL: 12, MsgType.SEND_RNDIS_PKT_COMPLETE: 8},
    "6.12": {MsgType.INIT_COMPLETE: 16, MsgType.SEND_RECV_BUF_COMPLETE: 28, MsgType.SEND_SEND_BUF_COMPLETE: 12,
             MsgType.SUBCHANNEL: 12, MsgType.SEND_RNDIS_PKT_COMPLETE: 8},
}  # fmt: skip
"""Minimum completion payload the guest accepts per type (netvsc.c:netvsc_send_completion; spec §3.2).
6.1's checks fall through cumulatively, so INIT_COMPLETE needs 28 bytes there. 7.3 is as 6.12."""
GUEST_MIN_COMPLETION["7.3"] = GUEST_MIN_COMPLETION["6.12"]


# --------------------------------------------------------------------------------------------------
# Build / parse
# --------------------------------------------------------------------------------------------------


def min_size(struct_: c.Struct) -> int:
    """Bytes a message needs to carry every declared field."""
    return int(struct_.sizeof())


def build(struct_: c.Struct, size: int = NVSP_MESSAGE_SIZE, **fields: Any) -> bytes:
    """One NVSP message, zero-padded to ``size`` (40 unless a test wants a short one)."""
    raw = struct_.build(fields)
    if len(raw) > size:
        raise ValueError(f"NVSP message of {len(raw)} bytes does not fit {size}")
    return raw + bytes(size - len(raw))


def msg_type(payload: bytes | bytearray | memoryview) -> int:
    """msg_type of an NVSP payload; NvspError when fewer than 4 bytes."""
    if len(payload) < 4:
        raise NvspError("msg_type", len(payload), "payload shorter than the 4-byte msg_type")
    return int.from_bytes(payload[:4], "little")


def parse(
    payload: bytes | bytearray | memoryview, table: dict[MsgType, c.Struct] = GUEST_TO_HOST
) -> c.Container:
    """Parse an NVSP message with the layout ``table`` gives its type.

    NvspError("msg_type", ...) for an unknown type and ("length", ...) when the payload is shorter
    than the declared fields (Linux sends 40 bytes; anything shorter is malformed).
    """
    mtype = msg_type(payload)
    try:
        struct_ = table[MsgType(mtype)]
    except (ValueError, KeyError):
        raise NvspError("msg_type", mtype, "not a message of this direction") from None
    need = min_size(struct_)
    if len(payload) < need:
        raise NvspError("length", len(payload), f"{MsgType(mtype).name} needs {need} bytes")
    return struct_.parse(bytes(payload[:need]))


def flat_struct(struct_: c.Struct) -> tuple[struct.Struct, tuple[str, ...]]:
    """A ``struct.Struct`` with the same layout as a flat construct Struct (integers, Const, Default,
    Padding), and its field names: the fast path for per-packet messages, declared only once."""
    fmt, names = "<", []
    for sub in struct_.subcons:
        name, inner = sub.name, sub
        while isinstance(inner, c.Renamed | c.Const | c.Default):
            inner = inner.subcon
        if isinstance(inner, c.FormatField):
            fmt += inner.fmtstr[-1]
            names.append(name)
        elif isinstance(inner, c.Padded) and inner.subcon is c.Pass:
            fmt += f"{inner.length}x"
        else:
            raise TypeError(f"flat_struct: field {name!r} ({type(inner).__name__}) is not flat")
    return struct.Struct(fmt), tuple(names)


RNDIS_PKT_FAST, _ = flat_struct(SEND_RNDIS_PKT)
"""<IIII: msg_type, channel_type, send_buf_section_index, send_buf_section_size."""
RNDIS_PKT_COMPLETE_FAST, _ = flat_struct(SEND_RNDIS_PKT_COMPLETE)
"""<II: msg_type, status."""


def rndis_pkt(channel_type: int, section_index: int = NO_SECTION, section_size: int = 0) -> bytes:
    """SEND_RNDIS_PKT as 40 bytes (hot path: no construct)."""
    return RNDIS_PKT_FAST.pack(MsgType.SEND_RNDIS_PKT, channel_type, section_index, section_size) + bytes(
        NVSP_MESSAGE_SIZE - RNDIS_PKT_FAST.size
    )


def rndis_pkt_complete(status: int = Status.SUCCESS, size: int = NVSP_MESSAGE_SIZE) -> bytes:
    """SEND_RNDIS_PKT_COMPLETE: 40 bytes from the host, 8 from the guest's receive completions."""
    return RNDIS_PKT_COMPLETE_FAST.pack(MsgType.SEND_RNDIS_PKT_COMPLETE, status) + bytes(
        size - RNDIS_PKT_COMPLETE_FAST.size
    )

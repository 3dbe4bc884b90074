"""VMBus channel messages, the HvPostMessage input and the SynIC message slot, declared once.

Pure data layouts and pure functions: no I/O, no KVM. Every layout is a `construct` Struct whose
byte offsets are those of spec/HOST_CONTRACT.md §2.5 (which were checked there against gcc); the unit
tests compare each one with hand-written bytes. All integers are little-endian.

A channel message is what travels in the 240-byte payload of a SynIC message (host→guest) or of an
HvPostMessage hypercall (guest→host). It starts with an 8-byte header: ``msgtype u32, padding u32``
(include/linux/hyperv.h:vmbus_channel_message_header). Each full-message Struct below includes that
header, so ``build_message()`` output is exactly what goes into the payload and ``parse_message()``
takes exactly the payload.

GUIDs on the wire are Windows GUIDs in "mixed-endian" order (first three groups little-endian,
the rest as written), which is Python's ``uuid.UUID.bytes_le``.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import construct as c

# --------------------------------------------------------------------------------------------------
# Constants (spec §2.1, §2.2, §1.4, §10)
# --------------------------------------------------------------------------------------------------

PAGE_SIZE = 4096
"""Hyper-V page (HV_HYP_PAGE_SIZE): GPADL PFNs and ring pages are always 4 KiB frames."""

HEADER_SIZE = 8
"""Size of vmbus_channel_message_header (msgtype u32, padding u32)."""

MAX_MESSAGE_PAYLOAD = 240
"""HV_MESSAGE_PAYLOAD_BYTE_COUNT: largest channel message that fits one SynIC message / post."""

HV_MESSAGE_SIZE = 256
"""sizeof(struct hv_message): one SynIC message slot, and also sizeof(hv_input_post_message)."""

VMBUS_MESSAGE_CONNECTION_ID = 1
"""Connection id for G→H messages when the negotiated version is < 5.0 (hyperv_vmbus.h)."""
VMBUS_MESSAGE_CONNECTION_ID_4 = 4
"""Connection id of INITIATE_CONTACT for versions ≥ 5.0 (hyperv_vmbus.h)."""
VMBUS_MESSAGE_CONNECTION_ID_REDIRECT = 0x800074
"""Tried first only by VTL2 guests (connection.c:vmbus_negotiate_version, 6.12/7.3)."""
VMBUS_MESSAGE_SINT = 2
"""The only SINT Linux uses, for messages and events (hyperv_vmbus.h)."""
VMBUS_VECTOR = 0xF3
"""HYPERVISOR_CALLBACK_VECTOR on x86 (arch/x86/include/asm/irq_vectors.h)."""
MAX_CHANNEL_RELIDS = 2048
"""Valid relids are 1..2047; 0 means "channel message" in the event bitmap (vmbus_drv.c:vmbus_chan_sched)."""
FIRST_GPADL_HANDLE = 0xE1E10
"""Linux's global GPADL handle counter starts here and adds 1 per GPADL (channel.c)."""

SYNIC_MESSAGE_SLOT_OFFSET = VMBUS_MESSAGE_SINT * HV_MESSAGE_SIZE
"""Byte offset of SINT2's slot (0x200) in the SIMP page, and of its area in the SIEF page."""

INTERRUPT_PAGE_SEND_OFFSET = 2048
"""The interrupt page's second half is the guest's "send" bitmap (bit = relid), set before
HvSignalEvent when the offer's is_dedicated_interrupt is 0 (hyperv_vmbus.h:vmbus_send_interrupt)."""
MONITOR_TRIGGER_GROUP_OFFSET = 8
"""hv_monitor_page.trigger_group[4] (u32 pending, u32 armed each) starts at byte 8; with
monitor_allocated the guest sets bit monitorid % 32 of group monitorid / 32's pending word in
monitor_page2 instead of calling HvSignalEvent (channel.c:vmbus_setevent)."""

HVMSG_NONE = 0
"""hv_message.message_type 0: the slot is free."""
HVMSG_VMBUS = 1
"""message_type used for VMBus messages, in both directions (hv.c:hv_post_message writes 1)."""
HVMSG_TIMER_EXPIRED = 0x80000010
"""Never use for VMBus: 6.x treats it as a stimer expiry (vmbus_drv.c:__vmbus_isr)."""
HV_MESSAGE_FLAG_MSG_PENDING = 0x01
"""hv_message.message_flags bit 0: the guest writes MSR EOM after freeing the slot only if set."""

# Hypercall status codes the guest interprets for HvPostMessage (connection.c:vmbus_post_msg).
HV_STATUS_SUCCESS = 0
HV_STATUS_INVALID_HYPERCALL_CODE = 2
HV_STATUS_INVALID_PARAMETER = 5
HV_STATUS_INSUFFICIENT_MEMORY = 11
HV_STATUS_INVALID_CONNECTION_ID = 18
HV_STATUS_INSUFFICIENT_BUFFERS = 19

HVCALL_POST_MESSAGE = 0x005C
HVCALL_SIGNAL_EVENT = 0x005D
HVCALL_RETARGET_INTERRUPT = 0x007E

GPADL_HEADER_MAX_PFNS = (MAX_MESSAGE_PAYLOAD - 20 - 8) // 8
"""26: PFNs that fit in GPADL_HEADER after its 20 fixed bytes and gpa_range's 8 (channel.c:create_gpadl_header)."""
GPADL_BODY_MAX_PFNS = (MAX_MESSAGE_PAYLOAD - 16) // 8
"""28: PFNs per GPADL_BODY message."""

# chn_flags bits of the offer (include/linux/hyperv.h, spec §2.5).
VMBUS_CHANNEL_ENUMERATE_DEVICE_INTERFACE = 0x0001
VMBUS_CHANNEL_SERVER_SUPPORTS_TRANSFER_PAGES = 0x0002
"""7.3 redefines 0x0002 as CONFIDENTIAL_RING_BUFFER: a non-confidential 7.3 guest rejects the offer."""
VMBUS_CHANNEL_SERVER_SUPPORTS_GPADLS = 0x0004
"""7.3 redefines 0x0004 as CONFIDENTIAL_EXTERNAL_MEMORY: alone it wedges later rescinds (channel_mgmt.c:vmbus_onoffer)."""
VMBUS_CHANNEL_NAMED_PIPE_MODE = 0x0010
VMBUS_CHANNEL_LOOPBACK_OFFER = 0x0100
VMBUS_CHANNEL_PARENT_OFFER = 0x0200
VMBUS_CHANNEL_REQUEST_MONITORED_NOTIFICATION = 0x0400
VMBUS_CHANNEL_TLNPI_PROVIDER_OFFER = 0x2000
"""Marks hv_sock offers; never set it for devices."""

INITIATE_CONTACT_FEATURE_CONFIDENTIAL_CHANNELS = 0x10
"""7.3 only, version ≥ 6.0 with confidential VMBus (connection.c:vmbus_try_connection_id)."""


class MessageError(ValueError):
    """A channel message, post-message input or message slot that is malformed.

    Raised instead of construct's own exceptions so callers (the VMBus server handling untrusted
    guest input) need to catch one type. ``hv_status`` is the HvPostMessage status a host should
    return when the error came from a hypercall input.
    """

    def __init__(self, message: str, hv_status: int = HV_STATUS_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.hv_status = hv_status


# --------------------------------------------------------------------------------------------------
# Versions (spec §2.6)
# --------------------------------------------------------------------------------------------------


class VmbusVersion(enum.IntEnum):
    """VMBus protocol versions, (major << 16) | minor (include/linux/hyperv.h VERSION_*)."""

    V2_4 = 0x00020004  # VERSION_WIN8
    V3_0 = 0x00030000  # VERSION_WIN8_1
    V4_0 = 0x00040000  # VERSION_WIN10
    V4_1 = 0x00040001  # VERSION_WIN10_V4_1
    V5_0 = 0x00050000  # VERSION_WIN10_V5
    V5_1 = 0x00050001
    V5_2 = 0x00050002
    V5_3 = 0x00050003
    V6_0 = 0x00060000  # 7.3 only


VERSIONS_6_1: tuple[int, ...] = (0x50003, 0x50002, 0x50001, 0x50000, 0x40001, 0x40000, 0x30000, 0x20004)
"""connection.c vmbus_versions[] in 6.1, highest first."""
VERSIONS_6_12: tuple[int, ...] = VERSIONS_6_1
"""Same list as 6.1."""
VERSIONS_7_3: tuple[int, ...] = (0x60000, 0x50003, 0x50002, 0x50001, 0x50000, 0x40001, 0x40000)
"""7.3 adds 6.0 and drops 3.0 and 2.4."""


def make_version(major: int, minor: int) -> int:
    """(major << 16) | minor, the encoding of vmbus_version_requested."""
    return ((major & 0xFFFF) << 16) | (minor & 0xFFFF)


def version_str(version: int) -> str:
    """'5.3' for 0x50003, the form hv_vmbus prints in "Vmbus version:5.3"."""
    return f"{version >> 16}.{version & 0xFFFF}"


def initiate_contact_connection_id(version: int) -> int:
    """Connection id the guest posts INITIATE_CONTACT on: 4 for ≥ 5.0, else 1 (connection.c:vmbus_negotiate_version)."""
    return VMBUS_MESSAGE_CONNECTION_ID_4 if version >= VmbusVersion.V5_0 else VMBUS_MESSAGE_CONNECTION_ID


# --------------------------------------------------------------------------------------------------
# GUIDs
# --------------------------------------------------------------------------------------------------

GuidLike = uuid.UUID | str | bytes


def to_uuid(value: GuidLike) -> uuid.UUID:
    """Accept a UUID, its canonical string (braces optional) or 16 wire bytes (Windows order)."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if len(raw) != 16:
            raise MessageError(f"a GUID is 16 bytes, got {len(raw)}")
        return uuid.UUID(bytes_le=raw)
    if isinstance(value, str):
        return uuid.UUID(value.strip("{}"))
    raise TypeError(f"not a GUID: {value!r}")


def guid_to_bytes(value: GuidLike) -> bytes:
    """Wire form (16 bytes, mixed-endian as Windows' GUID struct) of a GUID given in any form."""
    return to_uuid(value).bytes_le


def guid_from_bytes(raw: bytes | bytearray | memoryview) -> uuid.UUID:
    """GUID from its 16 wire bytes (Windows order)."""
    return to_uuid(bytes(raw))


def guid_to_str(value: GuidLike) -> str:
    """Canonical lower-case string, the form Linux uses in /sys/bus/vmbus/devices/<instance>."""
    return str(to_uuid(value))


def guid_from_str(text: str) -> bytes:
    """Wire bytes of a GUID written as text (e.g. 'f8615163-df3e-46c5-913f-f2d2f965ed0e')."""
    return guid_to_bytes(text)


class ClassGuid:
    """Device class GUIDs (include/linux/hyperv.h HV_*_GUID) as uuid.UUID."""

    NETVSC = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")  # HV_NIC_GUID
    VPCI = uuid.UUID("44c4f61d-4444-4400-9d52-802e27ede19f")  # HV_PCIE_GUID
    HEARTBEAT = uuid.UUID("57164f39-9115-4e78-ab55-382f3bd5422d")  # HV_HEART_BEAT_GUID
    SHUTDOWN = uuid.UUID("0e0b6031-5213-4934-818b-38d90ced39db")  # HV_SHUTDOWN_GUID
    TIMESYNC = uuid.UUID("9527e630-d0ae-497b-adce-e80ab0175caf")  # HV_TS_GUID
    KVP = uuid.UUID("a9a0f4e7-5a45-4d96-b827-8a841e8c03e6")  # HV_KVP_GUID
    VSS = uuid.UUID("35fa2e29-ea23-4236-96ae-3a6ebacba440")  # HV_VSS_GUID
    FCOPY = uuid.UUID("34d14be3-dee4-41c8-9ae7-6b174977c192")  # HV_FCOPY_GUID
    DYNAMIC_MEMORY = uuid.UUID("525074dc-8985-46e2-8057-a307dc18a502")  # HV_DM_GUID
    IDE = uuid.UUID("32412632-86cb-44a2-9b5c-50d1417354f5")  # HV_IDE_GUID
    SCSI = uuid.UUID("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f")  # HV_SCSI_GUID
    MOUSE = uuid.UUID("cfa8b69e-5b4a-4cc0-b98b-8ba1a1f3f95a")  # HV_MOUSE_GUID
    KEYBOARD = uuid.UUID("f912ad6d-2b17-48ea-bd65-f927a61c7684")  # HV_KBD_GUID
    SYNTHVID = uuid.UUID("da0a7802-e377-4aac-8e77-0558eb1073f8")  # HV_SYNTHVID_GUID
    SYNTHFC = uuid.UUID("2f9bcc4a-0069-4af3-b76b-6fd0be528cda")  # HV_SYNTHFC_GUID
    NETWORK_DIRECT = uuid.UUID("8c2eaf3d-32a7-4b09-ab99-bd1f1c86b501")  # HV_ND_GUID
    AVMA1 = uuid.UUID("f8e65716-3cb3-4a06-9a60-1889c5cccab5")  # unsupported by Linux
    AVMA2 = uuid.UUID("3375baf4-9e15-4b30-b765-67acb10d607b")  # unsupported by Linux
    RDV = uuid.UUID("276aacf4-ac15-426c-98dd-7521ad3f01fe")  # unsupported by Linux
    IMC = uuid.UUID("c376c1c3-d276-48d2-90a9-c04748072c60")  # unsupported by Linux


CLASS_GUID_NAMES: dict[uuid.UUID, str] = {
    v: k.lower() for k, v in vars(ClassGuid).items() if isinstance(v, uuid.UUID)
}
"""Class GUID → short name ('netvsc', 'vpci', 'heartbeat', ...), for logs and the event timeline."""


class _GuidAdapter(c.Adapter):
    """16 wire bytes ↔ uuid.UUID; building also accepts a string or raw bytes."""

    def _decode(self, obj: bytes, context: Any, path: str) -> uuid.UUID:
        return uuid.UUID(bytes_le=bytes(obj))

    def _encode(self, obj: GuidLike, context: Any, path: str) -> bytes:
        return guid_to_bytes(obj)


Guid = _GuidAdapter(c.Bytes(16))
"""construct field for a Windows GUID."""


class _BitFlag(c.Adapter):
    """Bit 0 of an integer field as a bool (C bitfields `x:1, reserved:n`); reserved bits build as 0."""

    def _decode(self, obj: int, context: Any, path: str) -> bool:
        return bool(obj & 1)

    def _encode(self, obj: Any, context: Any, path: str) -> int:
        return 1 if obj else 0


# --------------------------------------------------------------------------------------------------
# Channel messages (spec §2.4, §2.5)
# --------------------------------------------------------------------------------------------------


class MsgType(enum.IntEnum):
    """enum vmbus_channel_message_type (include/linux/hyperv.h)."""

    INVALID = 0
    OFFERCHANNEL = 1
    RESCIND_CHANNELOFFER = 2
    REQUESTOFFERS = 3
    ALLOFFERS_DELIVERED = 4
    OPENCHANNEL = 5
    OPENCHANNEL_RESULT = 6
    CLOSECHANNEL = 7
    GPADL_HEADER = 8
    GPADL_BODY = 9
    GPADL_CREATED = 10
    GPADL_TEARDOWN = 11
    GPADL_TORNDOWN = 12
    RELID_RELEASED = 13
    INITIATE_CONTACT = 14
    VERSION_RESPONSE = 15
    UNLOAD = 16
    UNLOAD_RESPONSE = 17
    # 18..20 (CHANNELMSG_18..20) are unused; the guest ignores them.
    TL_CONNECT_REQUEST = 21
    MODIFYCHANNEL = 22
    TL_CONNECT_RESULT = 23
    MODIFYCHANNEL_RESPONSE = 24


MSGTYPE_COUNT = 25
"""CHANNELMSG_COUNT: the guest WARNs and drops msgtype ≥ 25 (vmbus_drv.c:vmbus_on_msg_dpc)."""


class Direction(enum.Enum):
    G2H = "guest→host"
    H2G = "host→guest"


DIRECTION: dict[MsgType, Direction] = {
    MsgType.OFFERCHANNEL: Direction.H2G,
    MsgType.RESCIND_CHANNELOFFER: Direction.H2G,
    MsgType.REQUESTOFFERS: Direction.G2H,
    MsgType.ALLOFFERS_DELIVERED: Direction.H2G,
    MsgType.OPENCHANNEL: Direction.G2H,
    MsgType.OPENCHANNEL_RESULT: Direction.H2G,
    MsgType.CLOSECHANNEL: Direction.G2H,
    MsgType.GPADL_HEADER: Direction.G2H,
    MsgType.GPADL_BODY: Direction.G2H,
    MsgType.GPADL_CREATED: Direction.H2G,
    MsgType.GPADL_TEARDOWN: Direction.G2H,
    MsgType.GPADL_TORNDOWN: Direction.H2G,
    MsgType.RELID_RELEASED: Direction.G2H,
    MsgType.INITIATE_CONTACT: Direction.G2H,
    MsgType.VERSION_RESPONSE: Direction.H2G,
    MsgType.UNLOAD: Direction.G2H,
    MsgType.UNLOAD_RESPONSE: Direction.H2G,
    MsgType.TL_CONNECT_REQUEST: Direction.G2H,
    MsgType.MODIFYCHANNEL: Direction.G2H,
    MsgType.TL_CONNECT_RESULT: Direction.H2G,
    MsgType.MODIFYCHANNEL_RESPONSE: Direction.H2G,
}
"""Who sends each message type (spec §2.4 'dir')."""

GUEST_MIN_PAYLOAD: dict[MsgType, int] = {
    MsgType.OFFERCHANNEL: 196,
    MsgType.RESCIND_CHANNELOFFER: 12,
    MsgType.ALLOFFERS_DELIVERED: 0,
    MsgType.OPENCHANNEL_RESULT: 20,
    MsgType.GPADL_CREATED: 20,
    MsgType.GPADL_TORNDOWN: 12,
    MsgType.VERSION_RESPONSE: 16,
    MsgType.UNLOAD_RESPONSE: 0,
    MsgType.MODIFYCHANNEL_RESPONSE: 16,
}
"""H→G types that have a guest handler, with the minimum payload_size the guest accepts
(channel_mgmt.c:channel_message_table). Any other type sent to the guest is dropped with a WARN."""


def _msg(msgtype: MsgType, *fields: c.Subconstruct) -> c.Struct:
    """A full channel message: the 8-byte header with a fixed msgtype, then the body fields."""
    return c.Struct(
        "msgtype" / c.Const(int(msgtype), c.Int32ul),
        "padding" / c.Default(c.Int32ul, 0),
        *fields,
    )


def _zero(sub: c.Construct, size: int | None = None) -> c.Construct:
    """A reserved field that builds as zero when not given."""
    return c.Default(sub, bytes(size) if size is not None else 0)


OFFERCHANNEL = _msg(
    MsgType.OFFERCHANNEL,
    "if_type" / Guid,  # @8
    "if_instance" / Guid,  # @24
    "reserved1" / _zero(c.Int64ul),  # @40 (interface latency, ignored)
    "reserved2" / _zero(c.Int64ul),  # @48
    "chn_flags" / _zero(c.Int16ul),  # @56
    "mmio_megabytes" / _zero(c.Int16ul),  # @58
    "user_def" / _zero(c.Bytes(120), 120),  # @60 (or pipe_mode u32 + 116 bytes)
    "sub_channel_index" / _zero(c.Int16ul),  # @180
    "reserved3" / _zero(c.Int16ul),  # @182
    "child_relid" / c.Int32ul,  # @184
    "monitorid" / _zero(c.Int8ul),  # @188
    "monitor_allocated" / c.Default(_BitFlag(c.Int8ul), False),  # @189 bit 0
    "is_dedicated_interrupt" / c.Default(_BitFlag(c.Int16ul), False),  # @190 bit 0
    "connection_id" / c.Int32ul,  # @192
)
RESCIND_CHANNELOFFER = _msg(MsgType.RESCIND_CHANNELOFFER, "child_relid" / c.Int32ul)
REQUESTOFFERS = _msg(MsgType.REQUESTOFFERS)
ALLOFFERS_DELIVERED = _msg(MsgType.ALLOFFERS_DELIVERED)
OPENCHANNEL = _msg(
    MsgType.OPENCHANNEL,
    "child_relid" / c.Int32ul,  # @8
    "openid" / c.Int32ul,  # @12 (= child_relid in Linux)
    "ringbuffer_gpadlhandle" / c.Int32ul,  # @16
    "target_vp" / c.Int32ul,  # @20
    "downstream_ringbuffer_pageoffset" / c.Int32ul,  # @24 (= G→H ring pages)
    "userdata" / _zero(c.Bytes(120), 120),  # @28
)
OPENCHANNEL_RESULT = _msg(
    MsgType.OPENCHANNEL_RESULT,
    "child_relid" / c.Int32ul,
    "openid" / c.Int32ul,
    "status" / _zero(c.Int32ul),
)
CLOSECHANNEL = _msg(MsgType.CLOSECHANNEL, "child_relid" / c.Int32ul)
GPADL_HEADER = _msg(
    MsgType.GPADL_HEADER,
    "child_relid" / c.Int32ul,  # @8
    "gpadl" / c.Int32ul,  # @12
    "range_buflen" / c.Int16ul,  # @16 (8 + 8 * total PFNs)
    "rangecount" / c.Default(c.Int16ul, 1),  # @18
    "byte_count" / c.Int32ul,  # @20 range[0].byte_count
    "byte_offset" / _zero(c.Int32ul),  # @24 range[0].byte_offset
    "pfn_array" / c.GreedyRange(c.Int64ul),  # @28 first ≤ 26 PFNs
)
GPADL_BODY = _msg(
    MsgType.GPADL_BODY,
    "msgnumber" / _zero(c.Int32ul),  # @8 (always 0 in Linux)
    "gpadl" / c.Int32ul,  # @12
    "pfn" / c.GreedyRange(c.Int64ul),  # @16 ≤ 28 PFNs
)
GPADL_CREATED = _msg(
    MsgType.GPADL_CREATED,
    "child_relid" / c.Int32ul,
    "gpadl" / c.Int32ul,
    "creation_status" / _zero(c.Int32ul),
)
GPADL_TEARDOWN = _msg(MsgType.GPADL_TEARDOWN, "child_relid" / c.Int32ul, "gpadl" / c.Int32ul)
GPADL_TORNDOWN = _msg(MsgType.GPADL_TORNDOWN, "gpadl" / c.Int32ul)
RELID_RELEASED = _msg(MsgType.RELID_RELEASED, "child_relid" / c.Int32ul)
INITIATE_CONTACT = _msg(
    MsgType.INITIATE_CONTACT,
    "vmbus_version_requested" / c.Int32ul,  # @8
    "target_vcpu" / c.Int32ul,  # @12
    # @16 is a union: interrupt_page u64 (< 5.0) or msg_sint/msg_vtl/reserved/feature_flags (≥ 5.0).
    # Parsing yields both views; build_message() accepts interrupt_page= and splits it.
    "interrupt_page" / c.Peek(c.Int64ul),
    "msg_sint" / _zero(c.Int8ul),  # @16
    "msg_vtl" / _zero(c.Int8ul),  # @17
    "reserved" / _zero(c.Int16ul),  # @18
    "feature_flags" / _zero(c.Int32ul),  # @20 (7.3 only)
    "monitor_page1" / _zero(c.Int64ul),  # @24
    "monitor_page2" / _zero(c.Int64ul),  # @32
)
VERSION_RESPONSE = _msg(
    MsgType.VERSION_RESPONSE,
    "version_supported" / c.Int8ul,  # @8 non-zero = accepted
    "connection_state" / _zero(c.Int8ul),  # @9 ignored by Linux
    "padding2" / _zero(c.Int16ul),  # @10
    "msg_conn_id" / _zero(c.Int32ul),  # @12
)
UNLOAD = _msg(MsgType.UNLOAD)
UNLOAD_RESPONSE = _msg(MsgType.UNLOAD_RESPONSE)
TL_CONNECT_REQUEST = _msg(
    MsgType.TL_CONNECT_REQUEST,
    "guest_endpoint_id" / Guid,  # @8
    "host_service_id" / Guid,  # @24
)
MODIFYCHANNEL = _msg(MsgType.MODIFYCHANNEL, "child_relid" / c.Int32ul, "target_vp" / c.Int32ul)
MODIFYCHANNEL_RESPONSE = _msg(
    MsgType.MODIFYCHANNEL_RESPONSE, "child_relid" / c.Int32ul, "status" / _zero(c.Int32ul)
)

MESSAGE_STRUCTS: dict[MsgType, c.Struct] = {
    MsgType.OFFERCHANNEL: OFFERCHANNEL,
    MsgType.RESCIND_CHANNELOFFER: RESCIND_CHANNELOFFER,
    MsgType.REQUESTOFFERS: REQUESTOFFERS,
    MsgType.ALLOFFERS_DELIVERED: ALLOFFERS_DELIVERED,
    MsgType.OPENCHANNEL: OPENCHANNEL,
    MsgType.OPENCHANNEL_RESULT: OPENCHANNEL_RESULT,
    MsgType.CLOSECHANNEL: CLOSECHANNEL,
    MsgType.GPADL_HEADER: GPADL_HEADER,
    MsgType.GPADL_BODY: GPADL_BODY,
    MsgType.GPADL_CREATED: GPADL_CREATED,
    MsgType.GPADL_TEARDOWN: GPADL_TEARDOWN,
    MsgType.GPADL_TORNDOWN: GPADL_TORNDOWN,
    MsgType.RELID_RELEASED: RELID_RELEASED,
    MsgType.INITIATE_CONTACT: INITIATE_CONTACT,
    MsgType.VERSION_RESPONSE: VERSION_RESPONSE,
    MsgType.UNLOAD: UNLOAD,
    MsgType.UNLOAD_RESPONSE: UNLOAD_RESPONSE,
    MsgType.TL_CONNECT_REQUEST: TL_CONNECT_REQUEST,
    MsgType.MODIFYCHANNEL: MODIFYCHANNEL,
    MsgType.MODIFYCHANNEL_RESPONSE: MODIFYCHANNEL_RESPONSE,
}
"""Every channel message with a known layout. TL_CONNECT_RESULT (23) has none in Linux (no handler)."""

VARIABLE_SIZE: frozenset[MsgType] = frozenset({MsgType.GPADL_HEADER, MsgType.GPADL_BODY})

MESSAGE_SIZE: dict[MsgType, int] = {
    t: (28 if t is MsgType.GPADL_HEADER else 16 if t is MsgType.GPADL_BODY else s.sizeof())
    for t, s in MESSAGE_STRUCTS.items()
}
"""Size of each message; for GPADL_HEADER/BODY the fixed part before the PFN array."""


def build_message(msgtype: MsgType | int, **fields: Any) -> bytes:
    """Bytes of one channel message (header included), ready to be a SynIC / post-message payload.

    Reserved and padding fields default to 0. For INITIATE_CONTACT, ``interrupt_page=`` (the
    < 5.0 view of the union at offset 16) is accepted and split into the ≥ 5.0 fields.
    """
    msgtype = MsgType(msgtype)
    struct = MESSAGE_STRUCTS.get(msgtype)
    if struct is None:
        raise MessageError(f"no layout for channel message type {msgtype!r}")
    if msgtype is MsgType.INITIATE_CONTACT and fields.get("interrupt_page") is not None:
        page = int(fields.pop("interrupt_page"))
        fields.update(
            msg_sint=page & 0xFF,
            msg_vtl=(page >> 8) & 0xFF,
            reserved=(page >> 16) & 0xFFFF,
            feature_flags=(page >> 32) & 0xFFFFFFFF,
        )
    fields.pop("msgtype", None)
    try:
        data = struct.build(fields)
    except (c.ConstructError, TypeError, ValueError, OverflowError) as exc:
        raise MessageError(f"cannot build {msgtype.name}: {exc}") from exc
    if len(data) > MAX_MESSAGE_PAYLOAD:
        raise MessageError(f"{msgtype.name} is {len(data)} bytes, more than {MAX_MESSAGE_PAYLOAD}")
    return data


def message_type(data: bytes | bytearray | memoryview) -> int:
    """The msgtype of a raw channel message (no validation beyond the header being present)."""
    if len(data) < HEADER_SIZE:
        raise MessageError(f"channel message of {len(data)} bytes is shorter than its 8-byte header")
    return int.from_bytes(bytes(data[0:4]), "little")


def parse_message(data: bytes | bytearray | memoryview) -> c.Container:
    """Parse one channel message; ``result.msgtype`` is a MsgType.

    Raises MessageError when the header is short, the type has no layout, the message is shorter
    than its type's size or a PFN array is not a whole number of u64. Trailing bytes after a
    fixed-size message are ignored (the guest only requires a minimum, channel_message_table).
    """
    raw = bytes(data)
    mtype = message_type(raw)
    try:
        msgtype = MsgType(mtype)
    except ValueError:
        raise MessageError(f"unknown channel message type {mtype}") from None
    struct = MESSAGE_STRUCTS.get(msgtype)
    if struct is None:
        raise MessageError(f"no layout for channel message type {msgtype.name}")
    size = MESSAGE_SIZE[msgtype]
    if len(raw) < size:
        raise MessageError(f"{msgtype.name} needs {size} bytes, got {len(raw)}")
    if msgtype in VARIABLE_SIZE:
        if (len(raw) - size) % 8:
            raise MessageError(f"{msgtype.name}: {len(raw) - size} bytes of PFNs is not a multiple of 8")
    else:
        raw = raw[:size]
    try:
        msg = struct.parse(raw)
    except c.ConstructError as exc:  # pragma: no cover - sizes were checked above
        raise MessageError(f"cannot parse {msgtype.name}: {exc}") from exc
    msg.msgtype = msgtype
    msg.pop("_io", None)
    return msg


def describe(msg: c.Container) -> dict[str, Any]:
    """A JSON-friendly dict of a parsed message (GUIDs as strings), for the event timeline."""
    out: dict[str, Any] = {}
    for key, value in msg.items():
        if key.startswith("_"):
            continue
        if isinstance(value, MsgType):
            out[key] = value.name
        elif isinstance(value, uuid.UUID):
            out[key] = str(value)
        elif isinstance(value, bytes):
            out[key] = value.hex() if any(value) else f"<{len(value)} zero bytes>"
        elif isinstance(value, list):
            out[key] = list(value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# GPADL split (guest side, channel.c:create_gpadl_header) and reassembly (host side)
# --------------------------------------------------------------------------------------------------


def gpadl_messages(
    child_relid: int, gpadl: int, byte_count: int, pfns: Sequence[int], byte_offset: int = 0
) -> list[bytes]:
    """The GPADL_HEADER and GPADL_BODY messages Linux sends for one buffer, in order.

    Header carries the first ≤ 26 PFNs, each body ≤ 28; body msgnumber is 0 as in Linux.
    """
    if not pfns:
        raise MessageError("a GPADL needs at least one PFN")
    total = len(pfns)
    range_buflen = 8 + 8 * total
    if range_buflen > 0xFFFF:
        raise MessageError(f"{total} PFNs do not fit range_buflen (u16)")
    first = list(pfns[:GPADL_HEADER_MAX_PFNS])
    out = [
        build_message(
            MsgType.GPADL_HEADER,
            child_relid=child_relid,
            gpadl=gpadl,
            range_buflen=range_buflen,
            rangecount=1,
            byte_count=byte_count,
            byte_offset=byte_offset,
            pfn_array=first,
        )
    ]
    for start in range(len(first), total, GPADL_BODY_MAX_PFNS):
        chunk = list(pfns[start : start + GPADL_BODY_MAX_PFNS])
        out.append(build_message(MsgType.GPADL_BODY, msgnumber=0, gpadl=gpadl, pfn=chunk))
    return out


@dataclass
class Gpadl:
    """One guest buffer described by a GPADL: byte range over a list of 4 KiB PFNs."""

    handle: int
    child_relid: int
    byte_count: int
    byte_offset: int
    pfns: list[int] = field(default_factory=list)
    total_pfns: int = 0

    @property
    def complete(self) -> bool:
        return len(self.pfns) == self.total_pfns


class GpadlAssembler:
    """Host side: collects GPADL_HEADER + GPADL_BODY messages until all PFNs have arrived.

    The host must answer GPADL_CREATED only after the last PFN (spec §2.7); the guest waits for it
    without timeout (channel.c:__vmbus_establish_gpadl). Bodies are matched on the gpadl handle
    (msgnumber is always 0 in Linux). Several GPADLs may be in progress at once.
    """

    def __init__(self) -> None:
        self.pending: dict[int, Gpadl] = {}

    def feed(self, msg: c.Container) -> Gpadl | None:
        """Add a parsed GPADL_HEADER or GPADL_BODY; return the Gpadl when it is complete."""
        if msg.msgtype is MsgType.GPADL_HEADER:
            return self._header(msg)
        if msg.msgtype is MsgType.GPADL_BODY:
            return self._body(msg)
        raise MessageError(f"{msg.msgtype!r} is not a GPADL header or body")

    def _header(self, msg: c.Container) -> Gpadl | None:
        if msg.gpadl in self.pending:
            raise MessageError(f"GPADL_HEADER for handle {msg.gpadl:#x} while one is in progress")
        if msg.rangecount != 1:
            raise MessageError(f"GPADL {msg.gpadl:#x}: rangecount {msg.rangecount} (Linux always sends 1)")
        if msg.range_buflen < 16 or msg.range_buflen % 8:
            raise MessageError(f"GPADL {msg.gpadl:#x}: bad range_buflen {msg.range_buflen}")
        total = msg.range_buflen // 8 - 1
        if len(msg.pfn_array) > total:
            raise MessageError(
                f"GPADL {msg.gpadl:#x}: {len(msg.pfn_array)} PFNs in header, {total} announced"
            )
        if msg.byte_offset >= PAGE_SIZE or msg.byte_offset + msg.byte_count > total * PAGE_SIZE:
            raise MessageError(
                f"GPADL {msg.gpadl:#x}: byte_offset {msg.byte_offset} + byte_count {msg.byte_count} "
                f"exceeds {total} pages"
            )
        gpadl = Gpadl(msg.gpadl, msg.child_relid, msg.byte_count, msg.byte_offset, list(msg.pfn_array), total)
        if gpadl.complete:
            return gpadl
        self.pending[gpadl.handle] = gpadl
        return None

    def _body(self, msg: c.Container) -> Gpadl | None:
        gpadl = self.pending.get(msg.gpadl)
        if gpadl is None:
            raise MessageError(f"GPADL_BODY for unknown handle {msg.gpadl:#x}")
        if len(gpadl.pfns) + len(msg.pfn) > gpadl.total_pfns:
            del self.pending[msg.gpadl]
            raise MessageError(f"GPADL {msg.gpadl:#x}: more PFNs than range_buflen announced")
        gpadl.pfns.extend(msg.pfn)
        if gpadl.complete:
            del self.pending[msg.gpadl]
            return gpadl
        return None

    def discard_channel(self, child_relid: int) -> None:
        """Forget half-built GPADLs of a channel (e.g. on rescind or CLOSECHANNEL)."""
        for handle in [h for h, g in self.pending.items() if g.child_relid == child_relid]:
            del self.pending[handle]


# --------------------------------------------------------------------------------------------------
# HvPostMessage input (spec §1.4) and the SynIC message slot (spec §2.2)
# --------------------------------------------------------------------------------------------------

HV_INPUT_POST_MESSAGE = c.Struct(
    "connection_id" / c.Int32ul,  # @0 (low 24 bits)
    "reserved" / _zero(c.Int32ul),  # @4
    "message_type" / c.Default(c.Int32ul, HVMSG_VMBUS),  # @8 (always 1 from Linux)
    "payload_size" / c.Int32ul,  # @12
    "payload" / c.Bytes(MAX_MESSAGE_PAYLOAD),  # @16
)
"""struct hv_input_post_message (256 B), read by the host from the hypercall input GPA."""

HV_MESSAGE = c.Struct(
    "message_type" / c.Int32ul,  # @0, 0 = slot free
    "payload_size" / c.Int8ul,  # @4
    "message_flags" / _zero(c.Int8ul),  # @5 bit 0 msg_pending
    "reserved" / _zero(c.Int16ul),  # @6
    "port" / _zero(c.Int64ul),  # @8 sender / port id, ignored by Linux
    "payload" / c.Bytes(MAX_MESSAGE_PAYLOAD),  # @16
)
"""struct hv_message (256 B): one SynIC message slot (include/asm-generic/hyperv-tlfs.h)."""


class PostMessage(NamedTuple):
    """A decoded HvPostMessage input."""

    connection_id: int
    message_type: int
    payload: bytes


class SynicMessage(NamedTuple):
    """A decoded SynIC message slot."""

    message_type: int
    msg_pending: bool
    port: int
    payload: bytes


def _pad_payload(payload: bytes) -> bytes:
    if len(payload) > MAX_MESSAGE_PAYLOAD:
        raise MessageError(f"payload of {len(payload)} bytes exceeds {MAX_MESSAGE_PAYLOAD}")
    return bytes(payload) + bytes(MAX_MESSAGE_PAYLOAD - len(payload))


def build_post_message(connection_id: int, payload: bytes, message_type: int = HVMSG_VMBUS) -> bytes:
    """The 256-byte hv_input_post_message the guest writes before HvPostMessage (hv.c:hv_post_message)."""
    return HV_INPUT_POST_MESSAGE.build(
        dict(
            connection_id=connection_id,
            message_type=message_type,
            payload_size=len(payload),
            payload=_pad_payload(payload),
        )
    )


def parse_post_message(data: bytes | bytearray | memoryview) -> PostMessage:
    """Decode an HvPostMessage input (untrusted guest memory).

    Raises MessageError (hv_status = HV_STATUS_INVALID_PARAMETER) when the buffer is short or
    payload_size exceeds 240. The payload is cut to payload_size; the connection id keeps its
    low 24 bits (hv_connection_id.id).
    """
    if len(data) < HV_MESSAGE_SIZE:
        raise MessageError(f"post-message input of {len(data)} bytes, need {HV_MESSAGE_SIZE}")
    msg = HV_INPUT_POST_MESSAGE.parse(bytes(data[:HV_MESSAGE_SIZE]))
    if msg.payload_size > MAX_MESSAGE_PAYLOAD:
        raise MessageError(f"post-message payload_size {msg.payload_size} > {MAX_MESSAGE_PAYLOAD}")
    return PostMessage(msg.connection_id & 0xFFFFFF, msg.message_type, msg.payload[: msg.payload_size])


def build_hv_message(
    payload: bytes, *, message_type: int = HVMSG_VMBUS, msg_pending: bool = False, port: int = 0
) -> bytes:
    """The 256 bytes of a SynIC message slot carrying ``payload``."""
    return HV_MESSAGE.build(
        dict(
            message_type=message_type,
            payload_size=len(payload),
            message_flags=HV_MESSAGE_FLAG_MSG_PENDING if msg_pending else 0,
            port=port,
            payload=_pad_payload(payload),
        )
    )


def parse_hv_message(data: bytes | bytearray | memoryview) -> SynicMessage:
    """Decode a SynIC message slot; the payload is cut to payload_size (≤ 240, else MessageError)."""
    if len(data) < HV_MESSAGE_SIZE:
        raise MessageError(f"message slot of {len(data)} bytes, need {HV_MESSAGE_SIZE}")
    msg = HV_MESSAGE.parse(bytes(data[:HV_MESSAGE_SIZE]))
    if msg.payload_size > MAX_MESSAGE_PAYLOAD:
        raise MessageError(f"message slot payload_size {msg.payload_size} > {MAX_MESSAGE_PAYLOAD}")
    return SynicMessage(
        msg.message_type,
        bool(msg.message_flags & HV_MESSAGE_FLAG_MSG_PENDING),
        msg.port,
        msg.payload[: msg.payload_size],
    )


def slot_is_free(slot: memoryview) -> bool:
    """True when the guest has released the slot (message_type == HVMSG_NONE, spec §2.2)."""
    return int.from_bytes(slot[0:4], "little") == HVMSG_NONE


def write_message_slot(
    slot: memoryview, payload: bytes, *, message_type: int = HVMSG_VMBUS, msg_pending: bool = False
) -> None:
    """Deliver ``payload`` into a free slot, writing message_type last.

    The guest polls message_type ≠ 0 to decide the slot holds a message (vmbus_drv.c:__vmbus_isr),
    so every other byte must be in place before it (x86 keeps stores in program order). The
    caller checks slot_is_free() first and injects the vector afterwards.
    """
    if len(slot) < HV_MESSAGE_SIZE:
        raise MessageError(f"message slot view of {len(slot)} bytes, need {HV_MESSAGE_SIZE}")
    if message_type == HVMSG_NONE:
        raise MessageError("message_type 0 means 'slot free' and cannot carry a message")
    full = build_hv_message(payload, message_type=message_type, msg_pending=msg_pending)
    slot[4:HV_MESSAGE_SIZE] = full[4:]
    slot[0:4] = full[0:4]


def set_msg_pending(slot: memoryview) -> None:
    """Set msg_pending in an occupied slot so the guest writes EOM when it frees it (spec §2.2 step 2)."""
    slot[5] = slot[5] | HV_MESSAGE_FLAG_MSG_PENDING


def iter_relids(bitmap: bytes | bytearray | memoryview) -> Iterable[int]:
    """Set bit numbers of an event-flags bitmap (byte n/8, bit n%8), e.g. the interrupt page's send half."""
    for byte_index, byte in enumerate(bytes(bitmap)):
        if byte:
            for bit in range(8):
                if byte & (1 << bit):
                    yield byte_index * 8 + bit

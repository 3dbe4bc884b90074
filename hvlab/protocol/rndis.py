"""RNDIS as hv_netvsc speaks it over NVSP: messages, OIDs, OID payloads and per-packet info (spec §3.6).

An RNDIS message is an 8-byte header (``ndis_msg_type u32, msg_len u32`` — msg_len covers the whole
message) and a body. Guest → host, every RNDIS message travels in an NVSP SEND_RNDIS_PKT (control ones
in guest memory described by a GPA-direct range, data ones in the send buffer or GPA ranges); host →
guest, each one is written into a receive-buffer section and announced by a transfer-page packet.

Layouts are construct Structs of the *whole* message (header included) whose comments give offsets
relative to the body (byte 8), as the spec tables do. The per-frame path (RNDIS_PACKET and its PPIs)
uses ``struct.Struct``s derived from the same declarations (``hvlab.protocol.nvsp.flat_struct``).

Guest input is untrusted: every parser checks offsets and lengths against the message and raises
``RndisError`` naming the field. Host output must be well-formed above all for PPIs: a PPI whose size
overruns the PPI area or whose ppi_offset ≥ size makes the guest loop forever in softirq
(rndis_filter.c:rndis_get_ppi, spec §3.6.4), so ``build_packet`` only emits PPIs it laid out itself.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import construct as c

from hvlab.protocol.errors import FieldError
from hvlab.protocol.nvsp import flat_struct

HEADER_SIZE = 8
PACKET_BODY_SIZE = 36
PACKET_HEADER_SIZE = HEADER_SIZE + PACKET_BODY_SIZE
"""44: RNDIS_PACKET header + body before the PPIs."""
PPI_HEADER_SIZE = 12
RNDIS_MESSAGE_SIZE = 52
"""sizeof(struct rndis_message); the guest rejects a response longer than this + 4096 (overflow)."""
MAX_RESPONSE_SIZE = RNDIS_MESSAGE_SIZE + 4096

# ndis_msg_type
MSG_PACKET = 0x00000001
MSG_INIT = 0x00000002
MSG_INIT_C = 0x80000002
MSG_HALT = 0x00000003
MSG_QUERY = 0x00000004
MSG_QUERY_C = 0x80000004
MSG_SET = 0x00000005
MSG_SET_C = 0x80000005
MSG_RESET = 0x00000006
MSG_RESET_C = 0x80000006
MSG_INDICATE = 0x00000007
MSG_KEEPALIVE = 0x00000008
MSG_KEEPALIVE_C = 0x80000008

MSG_NAMES = {
    MSG_PACKET: "PACKET", MSG_INIT: "INIT", MSG_INIT_C: "INIT_C", MSG_HALT: "HALT", MSG_QUERY: "QUERY",
    MSG_QUERY_C: "QUERY_C", MSG_SET: "SET", MSG_SET_C: "SET_C", MSG_RESET: "RESET", MSG_RESET_C: "RESET_C",
    MSG_INDICATE: "INDICATE", MSG_KEEPALIVE: "KEEPALIVE", MSG_KEEPALIVE_C: "KEEPALIVE_C",
}  # fmt: skip

# Status codes
STATUS_SUCCESS = 0x00000000
STATUS_FAILURE = 0xC0000001
STATUS_NOT_SUPPORTED = 0xC00000BB
STATUS_INVALID_DATA = 0xC0010015
STATUS_MEDIA_CONNECT = 0x4001000B
STATUS_MEDIA_DISCONNECT = 0x4001000C
STATUS_LINK_SPEED_CHANGE = 0x40010013
STATUS_NETWORK_CHANGE = 0x40010018


class Oid(enum.IntEnum):
    """OIDs netvsc uses (include/linux/rndis.h, hyperv_net.h)."""

    GEN_MAXIMUM_FRAME_SIZE = 0x00010106
    GEN_LINK_SPEED = 0x00010107
    GEN_CURRENT_PACKET_FILTER = 0x0001010E
    GEN_MEDIA_CONNECT_STATUS = 0x00010114
    GEN_RECEIVE_SCALE_CAPABILITIES = 0x00010203
    GEN_RECEIVE_SCALE_PARAMETERS = 0x00010204
    GEN_FRIENDLY_NAME = 0x00020216
    GEN_RNDIS_CONFIG_PARAMETER = 0x0001021B
    OID_802_3_PERMANENT_ADDRESS = 0x01010101
    OID_802_3_CURRENT_ADDRESS = 0x01010102
    TCP_OFFLOAD_PARAMETERS = 0xFC01020C
    TCP_OFFLOAD_HARDWARE_CAPABILITIES = 0xFC01020D


# OID_GEN_CURRENT_PACKET_FILTER bits
FILTER_DIRECTED = 0x1
FILTER_MULTICAST = 0x2
FILTER_ALL_MULTICAST = 0x4
FILTER_BROADCAST = 0x8
FILTER_PROMISCUOUS = 0x20

# NDIS object header types
NDIS_OBJECT_TYPE_DEFAULT = 0x80
NDIS_OBJECT_TYPE_RSS_CAPABILITIES = 0x88
NDIS_OBJECT_TYPE_RSS_PARAMETERS = 0x89
NDIS_OBJECT_TYPE_OFFLOAD = 0xA7

NDIS_OFFLOAD_SIZE = 156
NDIS_OFFLOAD_SIZE_REV2 = 144
NDIS_OFFLOAD_SIZE_REV1 = 112
RSS_CAP_SIZE = 18
RSS_PARAM_SIZE = 40
RSS_HASH_KEY_SIZE = 40
NDIS_RSS_PARAM_FLAG_DISABLE_RSS = 0x10

# Offload encapsulation / capability bits the guest looks at (rndis_filter.c:rndis_netdev_set_hwcaps)
NDIS_OFFLOAD_ENCAP_8023 = 0x2
NDIS_TXCSUM_CAP_IP4OPT = 0x001
NDIS_TXCSUM_CAP_TCP4OPT = 0x004
NDIS_TXCSUM_CAP_TCP4 = 0x010
NDIS_TXCSUM_CAP_UDP4 = 0x040
NDIS_TXCSUM_CAP_TCP6 = 0x010
NDIS_TXCSUM_CAP_UDP6 = 0x040


class PpiType(enum.IntEnum):
    """enum ndis_per_pkt_info_type values netvsc uses (bit 31 of the wire value = internal)."""

    TCPIP_CHKSUM = 0
    TCP_LARGESEND = 2
    IEEE_8021Q = 6
    NBL_HASH_VALUE = 8


PPI_INTERNAL = 0x80000000
PPI_PKTINFO_ID = PPI_INTERNAL | 1
"""RNDIS_PKTINFO_ID (internal type 1): {ver u8, flag u8, pkt_id u16} for RSC fragments."""
PKTINFO_SUBALLOC = 1
PKTINFO_FIRST = 2
PKTINFO_LAST = 4

# Receive checksum info bits (ndis_tcp_ip_checksum_info.receive)
RXCSUM_TCP_FAILED = 1 << 0
RXCSUM_UDP_FAILED = 1 << 1
RXCSUM_IP_FAILED = 1 << 2
RXCSUM_TCP_OK = 1 << 3
RXCSUM_UDP_OK = 1 << 4
RXCSUM_IP_OK = 1 << 5
RXCSUM_IP_VALUE_INVALID = 1 << 8
# Transmit checksum info bits (.transmit)
TXCSUM_IPV4 = 1 << 0
TXCSUM_IPV6 = 1 << 1
TXCSUM_TCP = 1 << 2
TXCSUM_UDP = 1 << 3


class RndisError(FieldError):
    """A malformed RNDIS message or OID payload (``field``/``value`` name the culprit)."""

    what = "RNDIS"


# --------------------------------------------------------------------------------------------------
# Message layouts (whole message; "@n" = offset n within the body, i.e. byte 8 + n)
# --------------------------------------------------------------------------------------------------

HEADER = c.Struct("ndis_msg_type" / c.Int32ul, "msg_len" / c.Int32ul)


def _msg(mtype: int, *fields: Any) -> c.Struct:
    return c.Struct("ndis_msg_type" / c.Const(mtype, c.Int32ul), "msg_len" / c.Int32ul, *fields)


INIT = _msg(
    MSG_INIT,
    "req_id" / c.Int32ul,  # @0
    "major_ver" / c.Int32ul,  # @4 (1)
    "minor_ver" / c.Int32ul,  # @8 (0)
    "max_xfer_size" / c.Int32ul,  # @12 (0x4000)
)
INIT_C = _msg(
    MSG_INIT_C,
    "req_id" / c.Int32ul,  # @0
    "status" / c.Int32ul,  # @4
    "major_ver" / c.Int32ul,  # @8
    "minor_ver" / c.Int32ul,  # @12
    "dev_flags" / c.Int32ul,  # @16 (1 = connectionless)
    "medium" / c.Int32ul,  # @20 (0 = 802.3)
    "max_pkt_per_msg" / c.Int32ul,  # @24 guest TX batching limit
    "max_xfer_size" / c.Int32ul,  # @28
    "pkt_alignment_factor" / c.Int32ul,  # @32 alignment = 1 << factor
    "af_list_offset" / c.Int32ul,  # @36
    "af_list_size" / c.Int32ul,  # @40
)
_OID_REQUEST = (
    "req_id" / c.Int32ul,  # @0
    "oid" / c.Int32ul,  # @4
    "info_buflen" / c.Int32ul,  # @8
    "info_buf_offset" / c.Int32ul,  # @12 relative to @0 (20 in Linux; the info buffer follows @20)
    "dev_vc_handle" / c.Int32ul,  # @16
)
QUERY = _msg(MSG_QUERY, *_OID_REQUEST)
SET = _msg(MSG_SET, *_OID_REQUEST)
QUERY_C = _msg(
    MSG_QUERY_C,
    "req_id" / c.Int32ul,  # @0
    "status" / c.Int32ul,  # @4 (ignored by the guest)
    "info_buflen" / c.Int32ul,  # @8
    "info_buf_offset" / c.Int32ul,  # @12 relative to @0, ≥ 16 (0 with buflen 0 = not supported)
)
SET_C = _msg(MSG_SET_C, "req_id" / c.Int32ul, "status" / c.Int32ul)
HALT = _msg(MSG_HALT, "req_id" / c.Int32ul)
RESET_C = _msg(MSG_RESET_C, "status" / c.Int32ul, "addressing_reset" / c.Int32ul)
KEEPALIVE = _msg(MSG_KEEPALIVE, "req_id" / c.Int32ul)
KEEPALIVE_C = _msg(MSG_KEEPALIVE_C, "req_id" / c.Int32ul, "status" / c.Int32ul)
INDICATE = _msg(
    MSG_INDICATE,
    "status" / c.Int32ul,  # @0
    "status_buflen" / c.Int32ul,  # @4
    "status_buf_offset" / c.Int32ul,  # @8 relative to @0, ≥ 12
)
PACKET = _msg(
    MSG_PACKET,
    "data_offset" / c.Int32ul,  # @0 relative to the body
    "data_len" / c.Int32ul,  # @4
    "oob_data_offset" / c.Int32ul,  # @8
    "oob_data_len" / c.Int32ul,  # @12
    "num_oob_data_elements" / c.Int32ul,  # @16
    "per_pkt_info_offset" / c.Int32ul,  # @20 relative to the body
    "per_pkt_info_len" / c.Int32ul,  # @24
    "vc_handle" / c.Int32ul,  # @28
    "reserved" / c.Int32ul,  # @32
)
PPI = c.Struct(
    "size" / c.Int32ul,  # @0 whole element
    "type" / c.Int32ul,  # @4 bits 0..30 type, bit 31 internal
    "ppi_offset" / c.Int32ul,  # @8 value offset from the element start (12)
)
PKTINFO_ID = c.Struct("ver" / c.Int8ul, "flag" / c.Int8ul, "pkt_id" / c.Int16ul)

NDIS_OBJECT_HEADER = c.Struct("type" / c.Int8ul, "revision" / c.Int8ul, "size" / c.Int16ul)

NDIS_OFFLOAD = c.Struct(
    "header" / NDIS_OBJECT_HEADER,  # @0 {0xA7, rev, size}
    "ip4_txenc" / c.Int32ul,  # @4  csum.*
    "ip4_txcsum" / c.Int32ul,  # @8
    "ip4_rxenc" / c.Int32ul,  # @12
    "ip4_rxcsum" / c.Int32ul,  # @16
    "ip6_txenc" / c.Int32ul,  # @20
    "ip6_txcsum" / c.Int32ul,  # @24
    "ip6_rxenc" / c.Int32ul,  # @28
    "ip6_rxcsum" / c.Int32ul,  # @32
    "lsov1" / c.Default(c.Bytes(16), bytes(16)),  # @36
    "ipsecv1" / c.Default(c.Bytes(28), bytes(28)),  # @52
    "lsov2_ip4_encap" / c.Int32ul,  # @80
    "lsov2_ip4_maxsz" / c.Int32ul,  # @84
    "lsov2_ip4_minsg" / c.Int32ul,  # @88
    "lsov2_ip6_encap" / c.Int32ul,  # @92
    "lsov2_ip6_maxsz" / c.Int32ul,  # @96
    "lsov2_ip6_minsg" / c.Int32ul,  # @100
    "lsov2_ip6_opts" / c.Int32ul,  # @104
    "flags" / c.Int32ul,  # @108
    "ipsecv2" / c.Default(c.Bytes(32), bytes(32)),  # @112
    "rsc_ip4" / c.Int8ul,  # @144
    "rsc_ip6" / c.Int8ul,  # @145
    "rsc_pad" / c.Default(c.Bytes(2), bytes(2)),  # @146
    "encap_gre" / c.Default(c.Bytes(8), bytes(8)),  # @148
)
"""struct ndis_offload (156 bytes, revision 3)."""

NDIS_OFFLOAD_PARAMS = c.Struct(
    "header" / NDIS_OBJECT_HEADER,  # @0 {0x80, 3, 28} (size 22 for NVSP ≤ 4)
    "ip_v4_csum" / c.Int8ul,  # @4
    "tcp_ip_v4_csum" / c.Int8ul,  # @5
    "udp_ip_v4_csum" / c.Int8ul,  # @6
    "tcp_ip_v6_csum" / c.Int8ul,  # @7
    "udp_ip_v6_csum" / c.Int8ul,  # @8
    "lso_v1" / c.Int8ul,  # @9
    "ip_sec_v1" / c.Int8ul,  # @10
    "lso_v2_ipv4" / c.Int8ul,  # @11
    "lso_v2_ipv6" / c.Int8ul,  # @12
    "tcp_connection_ip_v4" / c.Int8ul,  # @13
    "tcp_connection_ip_v6" / c.Int8ul,  # @14
    "reserved" / c.Int8ul,  # @15
    "flags" / c.Int32ul,  # @16
    "ip_sec_v2" / c.Int8ul,  # @20
    "ip_sec_v2_ip_v4" / c.Int8ul,  # @21
    "rsc_ip_v4" / c.Int8ul,  # @22
    "rsc_ip_v6" / c.Int8ul,  # @23
    "encapsulated_packet_task_offload" / c.Int8ul,  # @24
    "encapsulation_types" / c.Int8ul,  # @25
    "pad" / c.Default(c.Bytes(2), bytes(2)),  # @26
)
"""struct ndis_offload_params (28 bytes)."""

RSS_CAPABILITIES = c.Struct(
    "header" / NDIS_OBJECT_HEADER,  # @0 {0x88, 2, 18}
    "cap_flag" / c.Int32ul,  # @4
    "num_int_msg" / c.Int32ul,  # @8
    "num_recv_que" / c.Int32ul,  # @12
    "num_indirect_tabent" / c.Int16ul,  # @16
)
"""struct ndis_recv_scale_cap (18 bytes, packed)."""

RSS_PARAMETERS = c.Struct(
    "header" / NDIS_OBJECT_HEADER,  # @0 {0x89, 2, 40}
    "flag" / c.Int16ul,  # @4
    "base_cpu_number" / c.Int16ul,  # @6
    "hashinfo" / c.Int32ul,  # @8
    "indirect_tabsize" / c.Int16ul,  # @12 bytes (4 × entries)
    "pad1" / c.Default(c.Int16ul, 0),  # @14
    "indirect_taboffset" / c.Int32ul,  # @16 from the start of this struct
    "hashkey_size" / c.Int16ul,  # @20
    "pad2" / c.Default(c.Int16ul, 0),  # @22
    "hashkey_offset" / c.Int32ul,  # @24
    "processor_masks_offset" / c.Int32ul,  # @28
    "num_processor_masks" / c.Int32ul,  # @32
    "processor_masks_entry_size" / c.Int32ul,  # @36
)
"""struct ndis_recv_scale_param (40 bytes); the table (u32 entries) and the key follow."""

CONFIG_PARAMETER_INFO = c.Struct(
    "name_offset" / c.Int32ul,  # @0 from the start of this struct (20)
    "name_length" / c.Int32ul,  # @4 bytes of UTF-16
    "type" / c.Int32ul,  # @8 (2 = string)
    "value_offset" / c.Int32ul,  # @12
    "value_length" / c.Int32ul,  # @16
)
"""struct rndis_config_parameter_info (OID_GEN_RNDIS_CONFIG_PARAMETER, used for MAC changes)."""
CONFIG_PARAMETER_STRING = 2

REQUESTS: dict[int, c.Struct] = {MSG_INIT: INIT, MSG_QUERY: QUERY, MSG_SET: SET, MSG_HALT: HALT,
                                 MSG_KEEPALIVE: KEEPALIVE}  # fmt: skip
"""Control messages the guest may send (RESET and KEEPALIVE are never sent by Linux)."""
RESPONSES: dict[int, c.Struct] = {MSG_INIT_C: INIT_C, MSG_QUERY_C: QUERY_C, MSG_SET_C: SET_C,
                                  MSG_INDICATE: INDICATE, MSG_KEEPALIVE_C: KEEPALIVE_C,
                                  MSG_RESET_C: RESET_C}  # fmt: skip

PACKET_FAST, _ = flat_struct(PACKET)
"""<11 x u32>: the 44-byte RNDIS_PACKET header (per-frame path)."""
PPI_FAST, _ = flat_struct(PPI)
_HEADER_FAST, _ = flat_struct(HEADER)
_U32 = struct.Struct("<I")


def align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


# --------------------------------------------------------------------------------------------------
# Generic message access
# --------------------------------------------------------------------------------------------------


def message_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """(ndis_msg_type, msg_len) at ``offset``; RndisError when fewer than 8 bytes remain."""
    if len(buf) - offset < HEADER_SIZE:
        raise RndisError("msg_len", len(buf) - offset, "fewer than 8 bytes for an RNDIS header")
    mtype, mlen = _HEADER_FAST.unpack_from(buf, offset)
    return mtype, mlen


def split_messages(buf: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    """(offset, msg_len) of each RNDIS message in a batch (netvsc packs several RNDIS_PACKETs into
    one send section, each msg_len including the alignment padding). A trailing run of zero bytes
    (unused section tail) ends the batch; a msg_len that is < 8 or overruns the buffer is an error."""
    out: list[tuple[int, int]] = []
    pos, end = 0, len(buf)
    while end - pos >= HEADER_SIZE:
        mtype, mlen = _HEADER_FAST.unpack_from(buf, pos)
        if mtype == 0 and mlen == 0 and out:
            break
        if mlen < HEADER_SIZE:
            raise RndisError("msg_len", mlen, f"message at {pos} shorter than its header")
        if mlen > end - pos:
            raise RndisError("msg_len", mlen, f"message at {pos} overruns the {end - pos} bytes left")
        out.append((pos, mlen))
        pos += mlen
    if not out:
        raise RndisError("msg_len", end, "no complete RNDIS message")
    return out


def parse(msg: bytes | bytearray | memoryview, table: dict[int, c.Struct] = REQUESTS) -> c.Container:
    """Parse one control message (exactly msg_len bytes) with the layout for its type."""
    mtype, mlen = message_header(msg)
    struct_ = table.get(mtype)
    if struct_ is None:
        raise RndisError("ndis_msg_type", mtype, "not a message of this direction")
    need = struct_.sizeof()
    if mlen < need or len(msg) < need:
        raise RndisError("msg_len", mlen, f"{MSG_NAMES.get(mtype, hex(mtype))} needs {need} bytes")
    return struct_.parse(bytes(msg[:need]))


def info_buffer(msg: bytes | bytearray | memoryview, req: c.Container) -> bytes:
    """The information buffer of a QUERY/SET (offset relative to the body, i.e. byte 8)."""
    mlen = min(req.msg_len, len(msg))
    if req.info_buflen == 0:
        return b""
    start = HEADER_SIZE + req.info_buf_offset
    if req.info_buf_offset < 20 or start + req.info_buflen > mlen:
        raise RndisError(
            "info_buf_offset",
            req.info_buf_offset,
            f"buffer of {req.info_buflen} bytes at {req.info_buf_offset} outside the {mlen}-byte message",
        )
    return bytes(msg[start : start + req.info_buflen])


def build_query(req_id: int, oid: int, info: bytes = b"") -> bytes:
    """QUERY as netvsc sends it (info_buf_offset 20; the info buffer carries request headers for some OIDs)."""
    return _oid_request(QUERY, req_id, oid, info)


def build_set(req_id: int, oid: int, info: bytes) -> bytes:
    return _oid_request(SET, req_id, oid, info)


def _oid_request(struct_: c.Struct, req_id: int, oid: int, info: bytes) -> bytes:
    fields = dict(req_id=req_id, oid=oid, info_buflen=len(info), info_buf_offset=20, dev_vc_handle=0)
    return struct_.build(dict(msg_len=28 + len(info), **fields)) + info


def build_init(req_id: int, max_xfer_size: int = 0x4000) -> bytes:
    return INIT.build(dict(msg_len=24, req_id=req_id, major_ver=1, minor_ver=0, max_xfer_size=max_xfer_size))


def build_halt(req_id: int) -> bytes:
    return HALT.build(dict(msg_len=12, req_id=req_id))


def build_init_c(
    req_id: int,
    status: int = STATUS_SUCCESS,
    *,
    max_pkt_per_msg: int = 8,
    pkt_alignment_factor: int = 3,
    max_xfer_size: int = 0x4000,
) -> bytes:
    """INIT_C with the recommended values (major 1, minor 0, connectionless, 802.3)."""
    return INIT_C.build(
        dict(msg_len=52, req_id=req_id, status=status, major_ver=1, minor_ver=0, dev_flags=1, medium=0,
             max_pkt_per_msg=max_pkt_per_msg, max_xfer_size=max_xfer_size,
             pkt_alignment_factor=pkt_alignment_factor, af_list_offset=0, af_list_size=0)
    )  # fmt: skip


def build_query_c(req_id: int, info: bytes | None, status: int = STATUS_SUCCESS) -> bytes:
    """QUERY_C; ``info=None`` is "not supported": buflen 0 and offset 0, which the guest treats as a
    failed query (a status alone would not: it ignores the status field, spec §3.6.1)."""
    if info is None:
        return QUERY_C.build(dict(msg_len=24, req_id=req_id, status=status or STATUS_NOT_SUPPORTED,
                                  info_buflen=0, info_buf_offset=0))  # fmt: skip
    head = QUERY_C.build(dict(msg_len=24 + len(info), req_id=req_id, status=status, info_buflen=len(info),
                              info_buf_offset=16))  # fmt: skip
    return head + info


def build_set_c(req_id: int, status: int = STATUS_SUCCESS) -> bytes:
    return SET_C.build(dict(msg_len=16, req_id=req_id, status=status))


def build_indicate(status: int, buf: bytes = b"") -> bytes:
    head = INDICATE.build(dict(msg_len=20 + len(buf), status=status, status_buflen=len(buf),
                               status_buf_offset=12 if buf else 0))  # fmt: skip
    return head + buf


# --------------------------------------------------------------------------------------------------
# Data packets and PPIs
# --------------------------------------------------------------------------------------------------


@dataclass
class PacketInfo:
    """What an RNDIS_PACKET carried besides the frame. ``ppis`` maps the wire type to its value bytes."""

    ppis: dict[int, bytes] = field(default_factory=dict)

    def u32(self, ppi_type: int) -> int | None:
        value = self.ppis.get(ppi_type)
        if value is None or len(value) < 4:
            return None
        return int(_U32.unpack_from(value, 0)[0])


def ppi(ppi_type: int, value: bytes) -> bytes:
    """One well-formed PPI element (size 12 + len(value) rounded to 4, ppi_offset 12)."""
    size = PPI_HEADER_SIZE + align(len(value), 4)
    return PPI_FAST.pack(size, ppi_type, PPI_HEADER_SIZE) + value + bytes(size - PPI_HEADER_SIZE - len(value))


def ppi_u32(ppi_type: int, value: int) -> bytes:
    return ppi(ppi_type, _U32.pack(value & 0xFFFFFFFF))


def build_packet(
    frame: bytes | bytearray | memoryview, ppis: Iterable[bytes] = (), *, alignment: int = 0
) -> bytes:
    """RNDIS_PACKET: header, PPIs at body offset 36 (as netvsc and Hyper-V lay them out), the frame.
    With ``alignment`` the message is zero-padded to a multiple of it and msg_len counts the padding
    (how netvsc batches packets in one send section)."""
    ppi_blob = b"".join(ppis)
    data_offset = PACKET_BODY_SIZE + len(ppi_blob)
    msg_len = PACKET_HEADER_SIZE + len(ppi_blob) + len(frame)
    pad = align(msg_len, alignment) - msg_len if alignment else 0
    head = PACKET_FAST.pack(MSG_PACKET, msg_len + pad, data_offset, len(frame), 0, 0, 0,
                            PACKET_BODY_SIZE if ppi_blob else 0, len(ppi_blob), 0, 0)  # fmt: skip
    return b"".join((head, ppi_blob, bytes(frame), bytes(pad)))


def parse_packet(
    msg: bytes | bytearray | memoryview, offset: int = 0, msg_len: int | None = None
) -> tuple[memoryview, PacketInfo]:
    """Frame and PPIs of the RNDIS_PACKET at ``offset`` (length ``msg_len``, default its header's).

    Nothing is trusted: data and PPI areas must lie inside the message, every PPI must have
    12 ≤ ppi_offset ≤ size ≤ what is left. Raises RndisError naming the field.
    """
    view = memoryview(msg)
    if len(view) - offset < PACKET_HEADER_SIZE:
        raise RndisError("msg_len", len(view) - offset, "RNDIS_PACKET shorter than its 44-byte header")
    (mtype, mlen, data_off, data_len, _oo, _ol, _on, ppi_off, ppi_len, _vc, _r) = PACKET_FAST.unpack_from(
        view, offset
    )
    if mtype != MSG_PACKET:
        raise RndisError("ndis_msg_type", mtype, "expected RNDIS_PACKET")
    if msg_len is None:
        msg_len = mlen
    if mlen < PACKET_HEADER_SIZE or mlen > msg_len or offset + mlen > len(view):
        raise RndisError("msg_len", mlen, f"RNDIS_PACKET length outside 44..{msg_len}")
    body = offset + HEADER_SIZE
    limit = offset + mlen
    if data_off < PACKET_BODY_SIZE or body + data_off + data_len > limit:
        raise RndisError(
            "data_offset", data_off, f"{data_len} data bytes at {data_off} overrun the {mlen}-byte message"
        )
    info = PacketInfo()
    if ppi_len:
        if ppi_off < PACKET_BODY_SIZE or body + ppi_off + ppi_len > limit:
            raise RndisError("per_pkt_info_offset", ppi_off, f"{ppi_len} PPI bytes overrun the message")
        pos, end = body + ppi_off, body + ppi_off + ppi_len
        while pos < end:
            if end - pos < PPI_HEADER_SIZE:
                raise RndisError("per_pkt_info_len", ppi_len, "trailing bytes shorter than a PPI header")
            size, ptype, voff = PPI_FAST.unpack_from(view, pos)
            if size < PPI_HEADER_SIZE or size > end - pos:
                raise RndisError("ppi.size", size, f"PPI at {pos - body} overruns the PPI area")
            if voff < PPI_HEADER_SIZE or voff >= size:
                raise RndisError("ppi.ppi_offset", voff, f"value offset outside the {size}-byte element")
            info.ppis[ptype] = bytes(view[pos + voff : pos + size])
            pos += size
    return view[body + data_off : body + data_off + data_len], info


def guest_ppi_walk(area: bytes | bytearray | memoryview) -> dict[int, bytes] | None:
    """rndis_get_ppi() as Linux runs it on a received packet's PPI area: returns the PPIs, or None
    where the guest would spin forever (size > remaining or ppi_offset ≥ size: the loop ``continue``s
    without advancing, spec §3.6.4). Used by the guest model to catch a host that emits bad PPIs."""
    out: dict[int, bytes] = {}
    pos, left = 0, len(area)
    while left > 0:
        if left < PPI_HEADER_SIZE:
            return out
        size, ptype, voff = PPI_FAST.unpack_from(area, pos)
        if size > left or voff >= size or size == 0:
            return None
        out[ptype] = bytes(area[pos + voff : pos + size])
        pos += size
        left -= size
    return out


# Per-packet info values -------------------------------------------------------------------------


def csum_tx(is_ipv4: bool, is_ipv6: bool, tcp: bool, udp: bool, tcp_header_offset: int = 0) -> int:
    """ndis_tcp_ip_checksum_info.transmit."""
    return (int(is_ipv4) | int(is_ipv6) << 1 | int(tcp) << 2 | int(udp) << 3
            | (tcp_header_offset & 0x3FF) << 16)  # fmt: skip


def lso_info(mss: int, tcp_header_offset: int, ipv6: bool) -> int:
    """ndis_tcp_lso_info.lso_v2_transmit: mss 0–19, tcp_header_offset 20–29, type bit 30 = 1 (v2), ip_version bit 31."""
    return (mss & 0xFFFFF) | (tcp_header_offset & 0x3FF) << 20 | 1 << 30 | int(ipv6) << 31


def parse_lso(value: int) -> tuple[int, int, bool]:
    """(mss, tcp_header_offset, ipv6) of an LSO PPI."""
    return value & 0xFFFFF, (value >> 20) & 0x3FF, bool(value >> 31)


def vlan_info(vlan_id: int, pri: int = 0, cfi: int = 0) -> int:
    """ndis_pkt_8021q_info: pri bits 0–2, cfi bit 3, vlan id bits 4–15."""
    return (pri & 7) | (cfi & 1) << 3 | (vlan_id & 0xFFF) << 4


def parse_vlan(value: int) -> tuple[int, int, int]:
    """(vlan_id, pri, cfi)."""
    return (value >> 4) & 0xFFF, value & 7, (value >> 3) & 1


# --------------------------------------------------------------------------------------------------
# OID payloads
# --------------------------------------------------------------------------------------------------


def build_offload(revision: int = 3, size: int = NDIS_OFFLOAD_SIZE, **fields: int) -> bytes:
    """ndis_offload with the given capabilities (all zero = no offloads), cut to ``size`` bytes."""
    values = {name: 0 for name in ("ip4_txenc", "ip4_txcsum", "ip4_rxenc", "ip4_rxcsum", "ip6_txenc",
              "ip6_txcsum", "ip6_rxenc", "ip6_rxcsum", "lsov2_ip4_encap", "lsov2_ip4_maxsz",
              "lsov2_ip4_minsg", "lsov2_ip6_encap", "lsov2_ip6_maxsz", "lsov2_ip6_minsg",
              "lsov2_ip6_opts", "flags", "rsc_ip4", "rsc_ip6")}  # fmt: skip
    values.update(fields)
    raw = NDIS_OFFLOAD.build(
        dict(header=dict(type=NDIS_OBJECT_TYPE_OFFLOAD, revision=revision, size=size), **values)
    )
    return raw[:size]


def offload_request(nvsp_version: int) -> bytes:
    """The ndis_offload header netvsc puts in its OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES query
    (rev 3/156 for NVSP ≥ 5, rev 2/144 for NVSP 4, rev 1/112 otherwise); buffer 156 bytes."""
    if nvsp_version >= 0x50000:
        rev, size = 3, NDIS_OFFLOAD_SIZE
    elif nvsp_version >= 0x40000:
        rev, size = 2, NDIS_OFFLOAD_SIZE_REV2
    else:
        rev, size = 1, NDIS_OFFLOAD_SIZE_REV1
    return NDIS_OBJECT_HEADER.build(dict(type=NDIS_OBJECT_TYPE_OFFLOAD, revision=rev, size=size)) + bytes(
        size - 4
    )


def guest_check_offload(info: bytes) -> c.Container:
    """rndis_filter.c:rndis_query_hwcaps acceptance (fatal for the probe otherwise)."""
    if len(info) > NDIS_OFFLOAD_SIZE:
        raise RndisError("info_buflen", len(info), "hardware offload answer longer than 156 bytes")
    if len(info) < 4:
        raise RndisError("info_buflen", len(info), "no ndis_object_header")
    head = NDIS_OBJECT_HEADER.parse(info[:4])
    if head.type != NDIS_OBJECT_TYPE_OFFLOAD:
        raise RndisError("header.type", head.type, "expected 0xA7")
    if head.revision < 1:
        raise RndisError("header.revision", head.revision, "must be ≥ 1")
    if not NDIS_OFFLOAD_SIZE_REV1 <= head.size <= len(info):
        raise RndisError("header.size", head.size, f"must be in 112..{len(info)}")
    return NDIS_OFFLOAD.parse(info + bytes(NDIS_OFFLOAD_SIZE - len(info)))


def build_offload_params(nvsp_version: int, **fields: int) -> bytes:
    """ndis_offload_params as netvsc sends it at probe (ip_v4_csum = 1 disabled, others 'no change')."""
    values = {name: 0 for name in ("ip_v4_csum", "tcp_ip_v4_csum", "udp_ip_v4_csum", "tcp_ip_v6_csum",
              "udp_ip_v6_csum", "lso_v1", "ip_sec_v1", "lso_v2_ipv4", "lso_v2_ipv6",
              "tcp_connection_ip_v4", "tcp_connection_ip_v6", "reserved", "flags", "ip_sec_v2",
              "ip_sec_v2_ip_v4", "rsc_ip_v4", "rsc_ip_v6", "encapsulated_packet_task_offload",
              "encapsulation_types")}  # fmt: skip
    values["ip_v4_csum"] = 1
    values.update(fields)
    size = 28 if nvsp_version > 0x40000 else 22
    raw = NDIS_OFFLOAD_PARAMS.build(
        dict(header=dict(type=NDIS_OBJECT_TYPE_DEFAULT, revision=3 if size == 28 else 2, size=size), **values)
    )
    return raw[:size] if size == 22 else raw


def parse_offload_params(info: bytes) -> c.Container:
    if len(info) < 22:
        raise RndisError("info_buflen", len(info), "ndis_offload_params needs ≥ 22 bytes")
    return NDIS_OFFLOAD_PARAMS.parse(info[:28] + bytes(max(0, 28 - len(info))))


def build_rss_caps(num_recv_que: int, num_indirect_tabent: int = 128) -> bytes:
    return RSS_CAPABILITIES.build(dict(header=dict(type=NDIS_OBJECT_TYPE_RSS_CAPABILITIES, revision=2, size=RSS_CAP_SIZE),
                                       cap_flag=0, num_int_msg=num_recv_que, num_recv_que=num_recv_que,
                                       num_indirect_tabent=num_indirect_tabent))  # fmt: skip


def rss_caps_request() -> bytes:
    """The 18-byte buffer netvsc sends with its RSS capabilities query (header {0x88, 2, 18})."""
    return NDIS_OBJECT_HEADER.build(
        dict(type=NDIS_OBJECT_TYPE_RSS_CAPABILITIES, revision=2, size=RSS_CAP_SIZE)
    ) + bytes(14)


@dataclass
class RssParams:
    flag: int
    hashinfo: int
    table: list[int]
    key: bytes


def build_rss_params(flag: int, table: Sequence[int], key: bytes, hashinfo: int = 0x1701) -> bytes:
    """ndis_recv_scale_param + table + key as rndis_set_rss_param_msg builds them."""
    head = RSS_PARAMETERS.build(dict(
        header=dict(type=NDIS_OBJECT_TYPE_RSS_PARAMETERS, revision=2, size=RSS_PARAM_SIZE), flag=flag,
        base_cpu_number=0, hashinfo=hashinfo, indirect_tabsize=4 * len(table), indirect_taboffset=RSS_PARAM_SIZE,
        hashkey_size=len(key), hashkey_offset=RSS_PARAM_SIZE + 4 * len(table), processor_masks_offset=0,
        num_processor_masks=0, processor_masks_entry_size=0))  # fmt: skip
    return head + struct.pack(f"<{len(table)}I", *table) + bytes(key)


def parse_rss_params(info: bytes) -> RssParams:
    """Validate and unpack OID_GEN_RECEIVE_SCALE_PARAMETERS (table and key offsets inside the buffer)."""
    if len(info) < RSS_PARAM_SIZE:
        raise RndisError("info_buflen", len(info), f"RSS parameters need ≥ {RSS_PARAM_SIZE} bytes")
    p = RSS_PARAMETERS.parse(info[:RSS_PARAM_SIZE])
    if p.indirect_tabsize % 4 or p.indirect_taboffset + p.indirect_tabsize > len(info):
        raise RndisError("indirect_taboffset", p.indirect_taboffset, "table outside the buffer")
    if p.hashkey_offset + p.hashkey_size > len(info):
        raise RndisError("hashkey_offset", p.hashkey_offset, "hash key outside the buffer")
    n = p.indirect_tabsize // 4
    table = list(struct.unpack_from(f"<{n}I", info, p.indirect_taboffset))
    key = bytes(info[p.hashkey_offset : p.hashkey_offset + p.hashkey_size])
    return RssParams(p.flag, p.hashinfo, table, key)


def build_config_parameter(name: str, value: str) -> bytes:
    """rndis_config_parameter_info + UTF-16 name + UTF-16 value (netvsc_set_mac_addr: NetworkAddress)."""
    n, v = name.encode("utf-16-le"), value.encode("utf-16-le")
    head = CONFIG_PARAMETER_INFO.build(dict(name_offset=20, name_length=len(n), type=CONFIG_PARAMETER_STRING,
                                            value_offset=20 + len(n), value_length=len(v)))  # fmt: skip
    return head + n + v


def parse_config_parameter(info: bytes) -> tuple[str, str]:
    """(name, value) of a string config parameter; RndisError on bad offsets or encodings."""
    if len(info) < 20:
        raise RndisError("info_buflen", len(info), "config parameter needs ≥ 20 bytes")
    p = CONFIG_PARAMETER_INFO.parse(info[:20])
    if p.name_offset + p.name_length > len(info) or p.name_length % 2:
        raise RndisError("name_offset", p.name_offset, "name outside the buffer")
    if p.value_offset + p.value_length > len(info) or p.value_length % 2:
        raise RndisError("value_offset", p.value_offset, "value outside the buffer")
    if p.type != CONFIG_PARAMETER_STRING:
        raise RndisError("type", p.type, "only string parameters are supported")
    try:
        name = info[p.name_offset : p.name_offset + p.name_length].decode("utf-16-le")
        value = info[p.value_offset : p.value_offset + p.value_length].decode("utf-16-le")
    except UnicodeDecodeError:
        raise RndisError("value_length", p.value_length, "not UTF-16") from None
    return name, value

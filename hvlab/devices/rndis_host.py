"""The RNDIS control plane of the synthetic NIC: what the host answers to INIT, QUERY, SET and HALT.

Split from hvlab.devices.netvsp so the device keeps the transport (NVSP, buffers, rings) and this module
keeps the NDIS semantics (spec §3.6.1–3.6.3). The guest waits without timeout for every INIT/QUERY/SET
response (spec §9), so every request gets an answer, even a malformed or unknown one: malformed ones
are reported as violations by the caller (``RndisError`` carries the field) and still answered with a
failure.

Choices (all from the spec's recommendations):
* INIT_C: major 1, minor 0, connectionless, 802.3, max_pkt_per_msg 8, alignment factor 3 (8 bytes).
* OID_GEN_MAXIMUM_FRAME_SIZE answers the largest MTU the device supports (``max_mtu``), so an MTU the
  guest chose survives the detach/attach it causes.
* Hardware offloads: none by default (the guest checksums and segments itself, which keeps frames on
  the switch valid); ``offloads=True`` advertises TX checksum and LSOv2, and the device then completes
  checksums on the frames it forwards (hvlab.devices.netvsp).
* RSS capabilities: ``num_recv_queues`` = 1 + the sub-channels the device may offer.
* FRIENDLY_NAME "Network Adapter", which Linux ignores (no ifalias is set).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from hvlab.protocol import rndis

FRIENDLY_NAME = "Network Adapter"


@dataclass
class RndisState:
    """Everything the guest configured through RNDIS; reset when the NVSP channel resets."""

    initialized: bool = False
    halted: bool = False
    packet_filter: int = 0
    offload_params: dict[str, int] = field(default_factory=dict)
    rss: rndis.RssParams | None = None
    current_mac: bytes | None = None
    """Set by OID_GEN_RNDIS_CONFIG_PARAMETER "NetworkAddress" (MAC change); None = permanent MAC."""
    requests: int = 0


class RndisHost:
    """Answers control messages for one device. ``config`` is read live for MAC, link and limits."""

    def __init__(
        self,
        *,
        mac: bytes,
        max_mtu: int = 65521,
        link_speed_100bps: int = 100_000_000,
        num_recv_queues: int = 1,
        offloads: bool = False,
        max_pkt_per_msg: int = 8,
        pkt_alignment_factor: int = 3,
    ) -> None:
        self.mac = mac
        self.max_mtu = max_mtu
        self.link_speed_100bps = link_speed_100bps
        self.num_recv_queues = num_recv_queues
        self.offloads = offloads
        self.max_pkt_per_msg = max_pkt_per_msg
        self.pkt_alignment_factor = pkt_alignment_factor
        self.link_up = True
        self.state = RndisState()

    def reset(self) -> None:
        self.state = RndisState()

    # ----------------------------------------------------------------------------------------------
    def handle(self, mtype: int, msg: bytes, nvsp_version: int) -> tuple[bytes | None, dict[str, Any]]:
        """One control message → (response or None for HALT, fields for the timeline).

        Raises rndis.RndisError for a malformed message *after* nothing was changed; the caller then
        answers with ``failure_response``.
        """
        st = self.state
        st.requests += 1
        if mtype == rndis.MSG_INIT:
            req = rndis.parse(msg)
            st.initialized, st.halted = True, False
            return (
                rndis.build_init_c(
                    req.req_id,
                    max_pkt_per_msg=self.max_pkt_per_msg,
                    pkt_alignment_factor=self.pkt_alignment_factor,
                ),
                dict(req_id=req.req_id, major=req.major_ver, minor=req.minor_ver),
            )
        if mtype == rndis.MSG_HALT:
            req = rndis.parse(msg)
            st.halted, st.initialized = True, False
            return None, dict(req_id=req.req_id)
        if mtype == rndis.MSG_KEEPALIVE:
            req = rndis.parse(msg)
            return rndis.KEEPALIVE_C.build(dict(msg_len=16, req_id=req.req_id, status=0)), dict(
                req_id=req.req_id
            )
        if mtype == rndis.MSG_QUERY:
            req = rndis.parse(msg)
            info = rndis.info_buffer(msg, req)
            answer = self.query(req.oid, info, nvsp_version)
            return rndis.build_query_c(req.req_id, answer), dict(
                req_id=req.req_id, oid=_oid_name(req.oid), supported=answer is not None
            )
        if mtype == rndis.MSG_SET:
            req = rndis.parse(msg)
            info = rndis.info_buffer(msg, req)
            status, detail = self.set(req.oid, info)
            return rndis.build_set_c(req.req_id, status), dict(
                req_id=req.req_id, oid=_oid_name(req.oid), status=status, **detail
            )
        raise rndis.RndisError("ndis_msg_type", mtype, "not a control message the host handles")

    @staticmethod
    def failure_response(mtype: int, msg: bytes) -> bytes | None:
        """An answer for a malformed request so the guest does not wait forever (if a req_id is there)."""
        if len(msg) < 12 or mtype not in (
            rndis.MSG_INIT,
            rndis.MSG_QUERY,
            rndis.MSG_SET,
            rndis.MSG_KEEPALIVE,
        ):
            return None
        req_id = struct.unpack_from("<I", msg, 8)[0]
        if mtype == rndis.MSG_INIT:
            return rndis.build_init_c(req_id, rndis.STATUS_FAILURE)
        if mtype == rndis.MSG_QUERY:
            return rndis.build_query_c(req_id, None, rndis.STATUS_INVALID_DATA)
        if mtype == rndis.MSG_SET:
            return rndis.build_set_c(req_id, rndis.STATUS_INVALID_DATA)
        return rndis.KEEPALIVE_C.build(dict(msg_len=16, req_id=req_id, status=rndis.STATUS_FAILURE))

    # ----------------------------------------------------------------------------------------------
    def query(self, oid: int, info: bytes, nvsp_version: int) -> bytes | None:
        """The information buffer for ``oid`` or None (not supported)."""
        u32 = struct.Struct("<I").pack
        if oid == rndis.Oid.GEN_MAXIMUM_FRAME_SIZE:
            return u32(self.max_mtu)
        if oid == rndis.Oid.OID_802_3_PERMANENT_ADDRESS:
            return self.mac
        if oid == rndis.Oid.OID_802_3_CURRENT_ADDRESS:
            return self.state.current_mac or self.mac
        if oid == rndis.Oid.GEN_FRIENDLY_NAME:
            return FRIENDLY_NAME.encode("utf-16-le") + b"\0\0"
        if oid == rndis.Oid.GEN_MEDIA_CONNECT_STATUS:
            return u32(0 if self.link_up else 1)
        if oid == rndis.Oid.GEN_LINK_SPEED:
            return u32(self.link_speed_100bps)
        if oid == rndis.Oid.GEN_CURRENT_PACKET_FILTER:
            return u32(self.state.packet_filter)
        if oid == rndis.Oid.TCP_OFFLOAD_HARDWARE_CAPABILITIES:
            return self.offload_caps(info, nvsp_version)
        if oid == rndis.Oid.GEN_RECEIVE_SCALE_CAPABILITIES:
            if nvsp_version < 0x50000:
                return None
            return rndis.build_rss_caps(self.num_recv_queues)
        return None

    def offload_caps(self, request: bytes, nvsp_version: int) -> bytes:
        """ndis_offload at the revision/size the guest asked for (its header is in the request)."""
        rev, size = 3, rndis.NDIS_OFFLOAD_SIZE
        if len(request) >= 4:
            head = rndis.NDIS_OBJECT_HEADER.parse(request[:4])
            if head.type == rndis.NDIS_OBJECT_TYPE_OFFLOAD and head.size in (
                rndis.NDIS_OFFLOAD_SIZE_REV1,
                rndis.NDIS_OFFLOAD_SIZE_REV2,
                rndis.NDIS_OFFLOAD_SIZE,
            ):
                rev, size = max(1, head.revision), head.size
        if not self.offloads:
            return rndis.build_offload(rev, size)
        tcp4 = rndis.NDIS_TXCSUM_CAP_TCP4 | rndis.NDIS_TXCSUM_CAP_TCP4OPT | rndis.NDIS_TXCSUM_CAP_IP4OPT
        tcp6 = rndis.NDIS_TXCSUM_CAP_TCP6 | rndis.NDIS_TXCSUM_CAP_TCP4OPT | rndis.NDIS_TXCSUM_CAP_IP4OPT
        return rndis.build_offload(
            rev,
            size,
            ip4_txenc=rndis.NDIS_OFFLOAD_ENCAP_8023,
            ip4_txcsum=tcp4 | rndis.NDIS_TXCSUM_CAP_UDP4,
            ip6_txenc=rndis.NDIS_OFFLOAD_ENCAP_8023,
            ip6_txcsum=tcp6 | rndis.NDIS_TXCSUM_CAP_UDP6,
            lsov2_ip4_encap=rndis.NDIS_OFFLOAD_ENCAP_8023,
            lsov2_ip4_maxsz=62768,
            lsov2_ip4_minsg=2,
            lsov2_ip6_encap=rndis.NDIS_OFFLOAD_ENCAP_8023,
            lsov2_ip6_maxsz=62768,
            lsov2_ip6_minsg=2,
            lsov2_ip6_opts=0x5,
        )

    def set(self, oid: int, info: bytes) -> tuple[int, dict[str, Any]]:
        """Apply a SET; returns (RNDIS status, timeline details). RndisError on a malformed buffer."""
        st = self.state
        if oid == rndis.Oid.GEN_CURRENT_PACKET_FILTER:
            if len(info) < 4:
                raise rndis.RndisError("info_buflen", len(info), "packet filter needs 4 bytes")
            st.packet_filter = struct.unpack_from("<I", info)[0]
            return rndis.STATUS_SUCCESS, dict(filter=st.packet_filter)
        if oid == rndis.Oid.TCP_OFFLOAD_PARAMETERS:
            params = rndis.parse_offload_params(info)
            st.offload_params = {k: v for k, v in params.items() if k not in ("_io", "header", "pad")}
            return rndis.STATUS_SUCCESS, {}
        if oid == rndis.Oid.GEN_RECEIVE_SCALE_PARAMETERS:
            rss = rndis.parse_rss_params(info)
            st.rss = rss
            return rndis.STATUS_SUCCESS, dict(rss_flag=rss.flag, table=len(rss.table))
        if oid == rndis.Oid.GEN_RNDIS_CONFIG_PARAMETER:
            name, value = rndis.parse_config_parameter(info)
            if name.rstrip("\0") != "NetworkAddress":
                return rndis.STATUS_NOT_SUPPORTED, dict(parameter=name)
            digits = value.rstrip("\0").replace(":", "").replace("-", "")
            try:
                mac = bytes.fromhex(digits)
            except ValueError:
                mac = b""
            if len(mac) != 6:
                raise rndis.RndisError("value_length", len(value), f"NetworkAddress {value!r} is not a MAC")
            st.current_mac = mac
            return rndis.STATUS_SUCCESS, dict(mac=mac.hex(":"))
        return rndis.STATUS_NOT_SUPPORTED, {}


def _oid_name(oid: int) -> str:
    try:
        return rndis.Oid(oid).name
    except ValueError:
        return f"{oid:#010x}"

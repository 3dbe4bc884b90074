"""A pure-Python model of the guest side of Linux's hv_netvsc + rndis_filter, on the VMBus guest model.

It does what the real driver does on the wire (spec §3.3–3.10), in the same order, with the checks the
real driver applies to host answers, so a netvsp host can be unit-tested without a VM:

* probe: open the primary channel (netvsc's ring and packet-size limits), NVSP INIT highest version
  first, NDIS_CONFIG, NDIS_VER, receive and send buffer GPADLs, RNDIS INIT and the OID sequence of
  §3.6.2 (6.1 / 6.12 / 7.3 flavours, §3.12), then vRSS sub-channels when the host offers queues;
* data: frames sent as RNDIS_PACKETs copied into send sections (batched with the host's alignment),
  as GPA-direct page ranges, or both ("partial copy"); transfer-page receive packets validated and
  completed; link indications; VF association and SWITCH_DATA_PATH;
* teardown: HALT, revoke, close (sub-channels first), GPADL teardown in each flavour's order (§3.9),
  and re-attach with a new MTU.

Where Linux waits forever (spec §9) the model raises ``GuestHang``; where Linux rejects or mis-handles a
host message it records a warning (``GuestProtocolError`` when the VMBus guest is strict).

The model is synchronous: every wait pumps the bus (``pump``), which delivers host messages and
interrupts; the interrupt handler drains the channel's inbound ring like netvsc_poll does.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hvlab.protocol import nvsp, rndis
from hvlab.protocol import vmbus as vm
from hvlab.protocol import vmbus_packet as vp
from hvlab.vmbus.guest_model import (
    GuestChannel,
    GuestHang,
    GuestModelError,
    GuestOperationFailed,
    VmbusGuest,
)

PAGE = vm.PAGE_SIZE
NETVSC_MAX_PKT_SIZE = 4624
NETVSC_RECV_SECTION_SIZE = 1728
NETVSC_SEND_SECTION_SIZE = 6144
NETVSC_HASH_KEY = bytes(range(0x6D, 0x6D + 40))
"""Any 40-byte key does for the model (Linux uses netvsc_hash_key)."""
ITAB_NUM = 128


@dataclass
class RxFrame:
    """A frame the guest received over VMBus."""

    frame: bytes
    ppis: dict[int, bytes]
    channel: int
    """sub_channel_index it arrived on."""


@dataclass
class _TxSlot:
    section: int | None
    pages: list[int] = field(default_factory=list)
    """Pages freed on completion (control messages)."""
    runs: list[list[int]] = field(default_factory=list)
    """Page runs of data ranges, kept for reuse on completion."""
    frames: int = 0


class NetvscGuest:
    """hv_netvsc for one synthetic NIC of ``guest``.

    ``flavour`` defaults to the VMBus guest's ("6.1", "6.12", "7.3"). Sizes default small so unit tests
    stay fast (Linux: 128-page rings, 9709 receive and 170 send sections). ``pump`` is called while
    waiting (default: the VMBus transport's pump); pass one that also runs a ManualLoop when the
    device defers work to a scheduler.
    """

    def __init__(
        self,
        guest: VmbusGuest,
        *,
        relid: int | None = None,
        flavour: str | None = None,
        mtu: int = 1500,
        ring_pages: int = 16,
        recv_sections: int = 64,
        send_sections: int = 16,
        cpus: int = 4,
        ifalias: str | None = None,
        pump: Callable[[], object] | None = None,
        max_pumps: int = 200,
    ) -> None:
        self.guest = guest
        self.flavour = flavour or guest.flavour
        if relid is None:
            found = [ch for ch in guest.find_channels(vm.ClassGuid.NETVSC) if ch.sub_channel_index == 0]
            if not found:
                raise GuestModelError("no netvsc offer")
            relid = found[0].relid
        self.relid = relid
        self.mtu = mtu
        self.ring_pages = ring_pages
        self.recv_sections = recv_sections
        self.send_sections = send_sections
        self.cpus = cpus
        self.ifalias = ifalias
        self._pump = pump or guest.transport.pump
        self.max_pumps = max_pumps
        self.channels: list[GuestChannel] = []
        self.rx: list[RxFrame] = []
        self.indications: list[int] = []
        self.carrier = True
        self.link_speed_100bps = 0
        self.vf_alloc = 0
        self.vf_serial = 0
        self.vf_associations: list[tuple[int, int]] = []
        self.data_path_is_vf = False
        self.send_table: list[int] = []
        self.rx_packets = 0
        self.rx_failed = 0
        self._req_ids = itertools.count(1)
        self._ctl_sent = 0
        self._page_cache: dict[int, list[list[int]]] = {}
        self._reset()

    def _reset(self) -> None:
        self.nvsp_version: int | None = None
        self.perm_addr: bytes | None = None
        self.offload: object | None = None
        self.rss_queues = 1
        self.max_pkt_per_msg = 0
        self.pkt_alignment = 8
        self.recv_pfns: list[int] = []
        self.send_pfns: list[int] = []
        self.recv_gpadl: int | None = None
        self.send_gpadl: int | None = None
        self.recv_section_size = 0
        self.recv_section_count = 0
        self.send_section_size = 0
        self.send_free: list[int] = []
        self.packet_filter = 0
        self.halted = False
        self.oids: list[tuple[str, int]] = []
        """("query"|"set", oid) in the order sent."""
        self._init_completion: tuple[int, bytes] | None = None
        self._bare: set[tuple[int, int]] = set()
        self._requests: dict[tuple[int, int], int] = {}
        self._tx: dict[tuple[int, int], _TxSlot] = {}
        self._rndis_responses: dict[int, bytes] = {}

    @property
    def primary(self) -> GuestChannel:
        return self.channels[0]

    @property
    def tx_outstanding(self) -> int:
        return len(self._tx)

    # ==============================================================================================
    # Probe (netvsc_probe → netvsc_device_add → rndis_filter_device_add)
    # ==============================================================================================

    def probe(self, *, subchannels: bool = True) -> NetvscGuest:
        """The whole §3.3 handshake; GuestOperationFailed where netvsc_probe fails."""
        self._reset()
        ch = self.guest.open_channel(
            self.relid,
            send_pages=self.ring_pages,
            recv_pages=self.ring_pages,
            max_pkt_size=NETVSC_MAX_PKT_SIZE,
            rqstor_size=4096,
        )
        ch.on_event = self._on_interrupt
        self.channels = [ch]
        try:
            self._negotiate()
            self._init_buffers()
            self._rndis_init()
        except GuestOperationFailed:
            self._teardown()
            raise
        if subchannels:
            self.open_subchannels()
        return self

    def _negotiate(self) -> None:
        for version in nvsp.GUEST_VERSIONS:
            self._request(nvsp.build(nvsp.INIT, min_protocol_ver=version, max_protocol_ver=version))
            mtype, payload = self._wait_init_completion(nvsp.MsgType.INIT_COMPLETE)
            status = struct.unpack_from("<I", payload, 12)[0]
            if status == nvsp.Status.SUCCESS:
                self.nvsp_version = version
                break
        else:
            raise GuestOperationFailed("NVSP: no protocol version accepted (-EPROTO)")
        if version >= nvsp.Version.V2:
            self._send_nvsp(
                nvsp.build(
                    nvsp.SEND_NDIS_CONFIG, mtu=self.mtu + 14, capability=nvsp.guest_capability(version)
                )
            )
        major, minor = nvsp.guest_ndis_version(version)
        self._send_nvsp(nvsp.build(nvsp.SEND_NDIS_VER, ndis_major_ver=major, ndis_minor_ver=minor))

    def _init_buffers(self) -> None:
        size = -(-self.recv_sections * NETVSC_RECV_SECTION_SIZE // PAGE) * PAGE
        self.recv_pfns = self.guest.memory.alloc_pages(size // PAGE)
        self.recv_gpadl = self.guest.create_gpadl(self.relid, self.recv_pfns)
        self._request(
            nvsp.build(nvsp.SEND_RECV_BUF, gpadl_handle=self.recv_gpadl, id=nvsp.NETVSC_RECEIVE_BUFFER_ID)
        )
        _, payload = self._wait_init_completion(nvsp.MsgType.SEND_RECV_BUF_COMPLETE)
        msg = nvsp.SEND_RECV_BUF_COMPLETE.parse(payload[:28])
        sec = msg.section
        if msg.status != nvsp.Status.SUCCESS or msg.num_sections != 1 or sec.offset != 0:
            raise GuestOperationFailed(f"Unable to complete receive buffer initialization: {msg}")
        if (
            sec.sub_alloc_size < 68
            or sec.sub_alloc_size * sec.num_sub_allocs > size
            or not sec.num_sub_allocs
        ):
            raise GuestOperationFailed(
                f"invalid recv_section_size {sec.sub_alloc_size} × {sec.num_sub_allocs}"
            )
        self.recv_section_size, self.recv_section_count = sec.sub_alloc_size, sec.num_sub_allocs

        size = self.send_sections * NETVSC_SEND_SECTION_SIZE
        size = -(-size // PAGE) * PAGE
        self.send_pfns = self.guest.memory.alloc_pages(size // PAGE)
        self.send_gpadl = self.guest.create_gpadl(self.relid, self.send_pfns)
        self._request(
            nvsp.build(nvsp.SEND_SEND_BUF, gpadl_handle=self.send_gpadl, id=nvsp.NETVSC_SEND_BUFFER_ID)
        )
        _, payload = self._wait_init_completion(nvsp.MsgType.SEND_SEND_BUF_COMPLETE)
        msg = nvsp.SEND_SEND_BUF_COMPLETE.parse(payload[:12])
        if msg.status != nvsp.Status.SUCCESS or msg.section_size < 68:
            raise GuestOperationFailed(f"Unable to complete send buffer initialization: {msg}")
        self.send_section_size = msg.section_size
        self.send_free = list(range(size // msg.section_size - 1, -1, -1))

    def _rndis_init(self) -> None:
        assert self.nvsp_version is not None
        resp = self._rndis_request(rndis.build_init(next(self._req_ids)))
        init_c = rndis.parse(resp, rndis.RESPONSES)
        if init_c.status != rndis.STATUS_SUCCESS:
            raise GuestOperationFailed(f"RNDIS INIT failed: status {init_c.status:#x}")
        self.max_pkt_per_msg = init_c.max_pkt_per_msg
        self.pkt_alignment = 1 << init_c.pkt_alignment_factor
        # §3.6.2, in order.
        value = self.query(rndis.Oid.GEN_MAXIMUM_FRAME_SIZE, 4)
        if value is not None and len(value) == 4:
            max_mtu = struct.unpack("<I", value)[0]
            if max_mtu < self.mtu:
                self.mtu = max_mtu
        mac = self.query(rndis.Oid.OID_802_3_PERMANENT_ADDRESS, 6)
        if mac is None or len(mac) != 6:
            raise GuestOperationFailed("Unable to query the permanent MAC address")
        self.perm_addr = mac
        if self.ifalias is None:
            name = self.query(rndis.Oid.GEN_FRIENDLY_NAME, 512)
            text = (name or b"").decode("utf-16-le", "replace").rstrip("\0")
            if text and text != "Network Adapter":
                self.ifalias = text
        caps = self.query(rndis.Oid.TCP_OFFLOAD_HARDWARE_CAPABILITIES, rndis.NDIS_OFFLOAD_SIZE,
                          info=rndis.offload_request(self.nvsp_version))  # fmt: skip
        if caps is None:
            raise GuestOperationFailed("hardware offload query failed")
        try:
            self.offload = rndis.guest_check_offload(caps)
        except rndis.RndisError as exc:
            raise GuestOperationFailed(f"bad hardware offload answer: {exc}") from None
        status = self.set(rndis.Oid.TCP_OFFLOAD_PARAMETERS, rndis.build_offload_params(self.nvsp_version))
        if status != rndis.STATUS_SUCCESS:
            raise GuestOperationFailed(f"OID_TCP_OFFLOAD_PARAMETERS failed: {status:#x}")
        link = self.query(rndis.Oid.GEN_MEDIA_CONNECT_STATUS, 4, want_status=True)
        if link is not None and len(link) >= 4:
            self.carrier = struct.unpack_from("<I", link)[0] == 0
        if self.nvsp_version >= nvsp.Version.V5:
            self.query(rndis.Oid.GEN_LINK_SPEED, 4)
            caps_rss = self.query(rndis.Oid.GEN_RECEIVE_SCALE_CAPABILITIES, rndis.RSS_CAP_SIZE,
                                  info=rndis.rss_caps_request())  # fmt: skip
            if caps_rss is not None and len(caps_rss) >= rndis.RSS_CAP_SIZE:
                self.rss_queues = rndis.RSS_CAPABILITIES.parse(caps_rss).num_recv_que

    def open_subchannels(self) -> int:
        """rndis_set_subchannel (run from a work item after probe): returns the channel count."""
        assert self.nvsp_version is not None
        if self.nvsp_version < nvsp.Version.V5 or self.rss_queues < 2:
            return 1
        default = 8 if self.flavour == "6.1" else max(16, min(self.cpus, 16))
        wanted = min(self.rss_queues, self.cpus, 64, default)
        if wanted < 2:
            return 1
        self._request(
            nvsp.build(nvsp.SUBCHANNEL_REQUEST, op=nvsp.SUBCHANNEL_OP_ALLOCATE, num_subchannels=wanted - 1)
        )
        _, payload = self._wait_init_completion(nvsp.MsgType.SUBCHANNEL)
        msg = nvsp.SUBCHANNEL_COMPLETE.parse(payload[:12])
        if msg.status != nvsp.Status.SUCCESS or msg.num_subchannels > wanted - 1:
            return 1
        n = msg.num_subchannels
        want_indices = set(range(1, n + 1))
        opened: dict[int, GuestChannel] = {}

        def offers_arrived() -> bool:
            for ch in self.guest.find_channels(vm.ClassGuid.NETVSC):
                if ch.if_instance != self.primary.if_instance:
                    continue
                idx = ch.sub_channel_index
                if idx in want_indices and idx not in opened and not ch.is_open:
                    sub = self.guest.open_channel(ch.relid, send_pages=self.ring_pages, recv_pages=self.ring_pages,
                                                  max_pkt_size=NETVSC_MAX_PKT_SIZE, rqstor_size=4096)  # fmt: skip
                    sub.on_event = self._on_interrupt
                    opened[idx] = sub
            return len(opened) == n

        self._wait(offers_arrived, f"offers for {n} sub-channels (netvsc waits holding RTNL)")
        self.channels = [self.primary] + [opened[i] for i in sorted(opened)]
        table = [i % len(self.channels) for i in range(ITAB_NUM)]
        for flag in (rndis.NDIS_RSS_PARAM_FLAG_DISABLE_RSS, 0):
            self.set(
                rndis.Oid.GEN_RECEIVE_SCALE_PARAMETERS, rndis.build_rss_params(flag, table, NETVSC_HASH_KEY)
            )
        return len(self.channels)

    # ==============================================================================================
    # ndo_open / ndo_stop / MAC / MTU / teardown
    # ==============================================================================================

    def open(self) -> None:
        """ip link set up: packet filter DIRECTED | ALL_MULTICAST | BROADCAST (status ignored)."""
        self.set_packet_filter(rndis.FILTER_DIRECTED | rndis.FILTER_ALL_MULTICAST | rndis.FILTER_BROADCAST)

    def stop(self) -> None:
        self.set_packet_filter(0)

    def set_packet_filter(self, value: int) -> None:
        self.set(rndis.Oid.GEN_CURRENT_PACKET_FILTER, struct.pack("<I", value))
        self.packet_filter = value

    def set_mac(self, mac: bytes) -> int:
        return self.set(
            rndis.Oid.GEN_RNDIS_CONFIG_PARAMETER, rndis.build_config_parameter("NetworkAddress", mac.hex())
        )

    def detach(self) -> None:
        """netvsc_detach: RNDIS HALT and drain, then netvsc_device_remove (spec §3.9)."""
        if not self.channels:
            return
        self.halted = True
        self._send_rndis(rndis.build_halt(next(self._req_ids)))
        self._wait(lambda: not self._tx, "halt drain: every send completed (wait_event without timeout)")
        self._teardown()

    def _teardown(self) -> None:
        old_vmbus = (self.guest.version or 0) < vm.VmbusVersion.V4_0 and self.flavour != "7.3"
        primary = self.primary
        if self.recv_gpadl is not None:
            self._send_nvsp(nvsp.build(nvsp.REVOKE_RECV_BUF, id=nvsp.NETVSC_RECEIVE_BUFFER_ID))
            if old_vmbus:
                self._teardown_buffer("recv")
        if self.send_gpadl is not None:
            self._send_nvsp(nvsp.build(nvsp.REVOKE_SEND_BUF, id=nvsp.NETVSC_SEND_BUFFER_ID))
            if old_vmbus:
                self._teardown_buffer("send")
        for ch in reversed(self.channels[1:]):
            if ch.is_open:
                ch.close()
        if primary.is_open:
            primary.close()
        self._teardown_buffer("recv")
        self._teardown_buffer("send")
        self.channels = []
        self.guest.poll()

    def _teardown_buffer(self, which: str) -> None:
        handle = self.recv_gpadl if which == "recv" else self.send_gpadl
        if handle is None:
            return
        self.guest.teardown_gpadl(self.relid, handle)
        pfns = self.recv_pfns if which == "recv" else self.send_pfns
        self.guest.memory.free_pages(pfns)
        if which == "recv":
            self.recv_gpadl, self.recv_pfns = None, []
        else:
            self.send_gpadl, self.send_pfns = None, []

    def change_mtu(self, mtu: int) -> None:
        """netvsc_change_mtu: detach, then attach with NDIS_CONFIG carrying the new MTU."""
        was_open = bool(self.packet_filter)
        self.detach()
        self.mtu = mtu
        self.probe()
        if was_open:
            self.open()

    # ==============================================================================================
    # RNDIS requests
    # ==============================================================================================

    def query(self, oid: int, buflen: int, *, info: bytes = b"", want_status: bool = False) -> bytes | None:
        """rndis_filter_query_device: the info buffer, or None where the guest sees a failed query."""
        self.oids.append(("query", int(oid)))
        resp = self._rndis_request(rndis.build_query(next(self._req_ids), oid, info))
        if len(resp) < rndis.HEADER_SIZE + 16:
            return None
        q = rndis.QUERY_C.parse(resp[:24])
        if q.info_buflen > buflen or q.info_buf_offset < 16:
            return None
        if q.info_buf_offset + q.info_buflen > q.msg_len - 8:
            return None
        if want_status and q.status != rndis.STATUS_SUCCESS:
            return None
        start = rndis.HEADER_SIZE + q.info_buf_offset
        return resp[start : start + q.info_buflen]

    def set(self, oid: int, info: bytes) -> int:
        """rndis_filter_set: returns SET_C status."""
        self.oids.append(("set", int(oid)))
        resp = self._rndis_request(rndis.build_set(next(self._req_ids), oid, info))
        return rndis.parse(resp, rndis.RESPONSES).status

    def _rndis_request(self, msg: bytes) -> bytes:
        req_id = struct.unpack_from("<I", msg, 8)[0]
        self._send_rndis(msg)
        self._wait(lambda: req_id in self._rndis_responses, f"RNDIS response to request {req_id}")
        return self._rndis_responses.pop(req_id)

    def _send_rndis(self, msg: bytes) -> None:
        """rndis_filter_send_request: one GPA-direct range over a kmalloc'ed buffer (may span 2 PFNs)."""
        self._ctl_sent += 1
        offset = ((self._ctl_sent * 1000 + 3000) % (PAGE - 8)) & ~7  # sometimes crosses a page
        pfns = self.guest.memory.alloc_pages(vp.GpaRange.pfn_count(len(msg), offset))
        buf = bytearray(len(pfns) * PAGE)
        buf[offset : offset + len(msg)] = msg
        for i, pfn in enumerate(pfns):
            self.guest.memory.page(pfn)[:] = buf[i * PAGE : (i + 1) * PAGE]
        ch = self.primary
        tid = ch.send_gpa_direct(
            [vp.GpaRange(len(msg), offset, tuple(pfns))], nvsp.rndis_pkt(nvsp.CHANNEL_TYPE_CONTROL)
        )
        self._tx[(ch.relid, tid)] = _TxSlot(None, pfns)

    # ==============================================================================================
    # Data
    # ==============================================================================================

    def send(self, frame: bytes, *, mode: str = "copy", channel: int = 0, vlan: int | None = None,
             hash_value: int | None = None, csum: int | None = None, lso: int | None = None) -> int:  # fmt: skip
        """netvsc_xmit for one frame: ``mode`` "copy" (send section), "gpa" (page ranges) or "partial"
        (RNDIS header in a section, frame in a page range). ``csum``/``lso`` are raw PPI values
        (rndis.csum_tx / rndis.lso_info), sent only if the host advertised the offload. Returns the trans_id."""
        ppis = self._tx_ppis(vlan, hash_value)
        if csum is not None:
            ppis.append(rndis.ppi_u32(rndis.PpiType.TCPIP_CHKSUM, csum))
        if lso is not None:
            ppis.append(rndis.ppi_u32(rndis.PpiType.TCP_LARGESEND, lso))
        ch = self.channels[channel]
        if mode == "copy":
            return self.send_batch([frame], channel=channel, ppis=ppis)
        msg = rndis.build_packet(frame, ppis)
        header, data = msg[: len(msg) - len(frame)], frame
        if mode == "gpa":
            ranges, pages = self._gpa_ranges([header, data])
            tid = ch.send_gpa_direct(ranges, nvsp.rndis_pkt(nvsp.CHANNEL_TYPE_DATA))
            self._tx[(ch.relid, tid)] = _TxSlot(None, runs=pages, frames=1)
            return tid
        if mode == "partial":
            section = self._take_section()
            self._write_section(section, header)
            ranges, pages = self._gpa_ranges([data])
            payload = nvsp.rndis_pkt(nvsp.CHANNEL_TYPE_DATA, section, len(header))
            tid = ch.send_gpa_direct(ranges, payload)
            self._tx[(ch.relid, tid)] = _TxSlot(section, runs=pages, frames=1)
            return tid
        raise ValueError(f"unknown send mode {mode!r}")

    def send_batch(self, frames: Sequence[bytes], *, channel: int = 0, ppis: Sequence[bytes] = ()) -> int:
        """Several RNDIS_PACKETs in one send section, each padded to the host's alignment (the last one
        unpadded), as netvsc_copy_to_send_buf batches them; at most max_pkt_per_msg (1 if 0)."""
        limit = max(1, self.max_pkt_per_msg)
        if len(frames) > limit:
            raise ValueError(f"host allows {limit} packets per message")
        parts = []
        for i, frame in enumerate(frames):
            last = i == len(frames) - 1
            parts.append(rndis.build_packet(frame, ppis, alignment=0 if last else self.pkt_alignment))
        blob = b"".join(parts)
        if len(blob) > self.send_section_size:
            raise ValueError(f"{len(blob)} bytes do not fit a {self.send_section_size}-byte section")
        section = self._take_section()
        self._write_section(section, blob)
        ch = self.channels[channel]
        tid = ch.send_inband(
            nvsp.rndis_pkt(nvsp.CHANNEL_TYPE_DATA, section, len(blob)), completion_requested=True
        )
        self._tx[(ch.relid, tid)] = _TxSlot(section, frames=len(frames))
        return tid

    def _tx_ppis(self, vlan: int | None, hash_value: int | None) -> list[bytes]:
        out = []
        if hash_value is not None:
            out.append(rndis.ppi_u32(rndis.PpiType.NBL_HASH_VALUE, hash_value))
        if vlan is not None:
            out.append(rndis.ppi_u32(rndis.PpiType.IEEE_8021Q, rndis.vlan_info(vlan)))
        return out

    def _take_section(self) -> int:
        if not self.send_free:
            self._wait(lambda: bool(self.send_free), "a free send section")
        return self.send_free.pop()

    def _write_section(self, section: int, data: bytes) -> None:
        self._buf_write(self.send_pfns, section * self.send_section_size, data)

    def _gpa_ranges(self, chunks: Sequence[bytes]) -> tuple[list[vp.GpaRange], list[list[int]]]:
        ranges, pages = [], []
        for chunk in chunks:
            offset = 64
            count = vp.GpaRange.pfn_count(len(chunk), offset)
            cached = self._page_cache.get(count)
            pfns = cached.pop() if cached else self.guest.memory.alloc_pages(count, contiguous=True)
            self.guest.memory.write(pfns[0] * PAGE + offset, chunk)
            ranges.append(vp.GpaRange(len(chunk), offset, tuple(pfns)))
            pages.append(pfns)
        return ranges, pages

    # ==============================================================================================
    # VF
    # ==============================================================================================

    def switch_data_path(self, vf: bool) -> None:
        """netvsc_vf_changed → netvsc_switch_datapath: waits for the association (switching to the VF)
        and for the zero-length completion, both without timeout in Linux."""
        if vf and not self.vf_alloc:
            self._wait(
                lambda: bool(self.vf_alloc), "VF association from the host (netvsc waits holding RTNL)"
            )
        if not vf:
            self.data_path_is_vf = False
        ch = self.primary
        value = nvsp.DATAPATH_VF if vf else nvsp.DATAPATH_SYNTHETIC
        tid = self._request(nvsp.build(nvsp.SWITCH_DATA_PATH, active_datapath=value))
        self._wait(
            lambda: (ch.relid, tid) in self._bare, "zero-length SWITCH_DATA_PATH completion (RTNL held)"
        )
        self._bare.discard((ch.relid, tid))
        self.data_path_is_vf = vf

    # ==============================================================================================
    # Interrupts and completions
    # ==============================================================================================

    def poll(self) -> None:
        """netvsc_poll on every open channel."""
        for ch in list(self.channels):
            if ch.is_open:
                self._process(ch)

    def _on_interrupt(self, ch: GuestChannel) -> None:
        if ch.is_open:
            self._process(ch)

    def _process(self, ch: GuestChannel) -> None:
        for pkt in ch.receive():
            if pkt.type == vp.PacketType.COMP:
                self._on_completion(ch, pkt)
            elif pkt.type == vp.PacketType.DATA_USING_XFER_PAGES:
                self._on_receive(ch, pkt)
            elif pkt.type == vp.PacketType.DATA_INBAND:
                self._on_inband(ch, pkt)
            else:
                self.guest._warn(f"netvsc: unhandled packet type {pkt.type:#x} on relid {ch.relid}")

    def _on_completion(self, ch: GuestChannel, pkt: vp.Packet) -> None:
        payload = pkt.payload
        key = (ch.relid, pkt.trans_id)
        request = self._requests.pop(key, None)
        if pkt.len8 == pkt.offset8:
            if request == nvsp.MsgType.SWITCH_DATA_PATH:
                self._bare.add(key)
            else:
                self.guest._warn(f"netvsc: Unexpected VMBUS completion (trans_id {pkt.trans_id})")
            return
        mtype = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else -1
        minimum = nvsp.GUEST_MIN_COMPLETION[self.flavour].get(mtype)
        if minimum is None:
            self.guest._warn(f"netvsc: Unknown send completion type {mtype} (dropped)")
            return
        if len(payload) < minimum:
            self.guest._warn(f"netvsc: nvsp_msg type {mtype} length {len(payload)} too small (dropped)")
            return
        if mtype == nvsp.MsgType.SEND_RNDIS_PKT_COMPLETE:
            slot = self._tx.pop(key, None)
            if slot is None:
                self.guest._warn(f"netvsc: send completion for unknown trans_id {pkt.trans_id}")
                return
            if slot.section is not None:
                self.send_free.append(slot.section)
            for run in slot.runs:
                self._page_cache.setdefault(len(run), []).append(run)  # like skb pages: reused
            if slot.pages:
                self.guest.memory.free_pages(slot.pages)
            return
        # Init-type completion: copied (40 bytes) into channel_init_pkt and the waiter woken.
        self._init_completion = (
            mtype,
            bytes(payload[: nvsp.NVSP_MESSAGE_SIZE]).ljust(nvsp.NVSP_MESSAGE_SIZE, b"\0"),
        )

    def _on_inband(self, ch: GuestChannel, pkt: vp.Packet) -> None:
        payload = pkt.payload
        mtype = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else -1
        if mtype == nvsp.MsgType.SEND_VF_ASSOCIATION and len(payload) >= 12:
            msg = nvsp.SEND_VF_ASSOCIATION.parse(payload[:12])
            self.vf_alloc, self.vf_serial = msg.allocated, msg.serial
            self.vf_associations.append((msg.allocated, msg.serial))
        elif mtype == nvsp.MsgType.SEND_INDIRECTION_TABLE and len(payload) >= 12:
            msg = nvsp.SEND_INDIRECTION_TABLE.parse(payload[:12])
            if msg.count != nvsp.INDIRECTION_TABLE_SIZE:
                return
            off = msg.offset if self.nvsp_version == nvsp.Version.V61 else 40
            if off + 4 * msg.count <= len(payload):
                self.send_table = list(struct.unpack_from(f"<{msg.count}I", payload, off))
        else:
            self.guest._warn(f"netvsc: unhandled in-band NVSP message {mtype}")

    def _on_receive(self, ch: GuestChannel, pkt: vp.Packet) -> None:
        """netvsc_receive: † checks drop without completion (sections lost), the rest complete."""
        payload = pkt.payload
        if len(payload) < 4 or struct.unpack_from("<I", payload)[0] != nvsp.MsgType.SEND_RNDIS_PKT:
            self.guest._warn("netvsc: receive packet is not SEND_RNDIS_PKT (dropped, no completion)")
            return
        if pkt.xfer_pageset_id != nvsp.NETVSC_RECEIVE_BUFFER_ID:
            self.guest._warn(f"netvsc: Invalid xfer page set id {pkt.xfer_pageset_id} (no completion)")
            return
        self.rx_packets += 1
        status = nvsp.Status.SUCCESS
        size = self.recv_section_count * self.recv_section_size
        for r in pkt.xfer_ranges:
            if r.byte_offset + r.byte_count > size or r.byte_count > self.recv_section_size:
                self.guest._warn(f"netvsc: range {r} beyond the receive buffer or a section")
                status = nvsp.Status.FAIL
                continue
            data = self._buf_read(self.recv_pfns, r.byte_offset, r.byte_count)
            if not self._rndis_receive(ch, data):
                status = nvsp.Status.FAIL
        if status != nvsp.Status.SUCCESS:
            self.rx_failed += 1
        ch.complete(pkt.trans_id, nvsp.rndis_pkt_complete(status, size=nvsp.RECV_COMPLETION_SIZE))

    def _rndis_receive(self, ch: GuestChannel, data: bytes) -> bool:
        if len(data) < rndis.HEADER_SIZE:
            return False
        mtype, mlen = rndis.message_header(data)
        if mlen > len(data):
            self.guest._warn(f"netvsc: rndis msg_len {mlen} > range {len(data)}")
            return False
        if mtype == rndis.MSG_PACKET:
            return self._rndis_data(ch, data[:mlen])
        if mtype in (rndis.MSG_INIT_C, rndis.MSG_QUERY_C, rndis.MSG_SET_C):
            if mlen > rndis.MAX_RESPONSE_SIZE:
                self.guest._warn(f"netvsc: rndis response of {mlen} bytes overflows")
                return True
            req_id = struct.unpack_from("<I", data, 8)[0] if mlen >= 12 else -1
            self._rndis_responses[req_id] = data[:mlen]
            return True
        if mtype == rndis.MSG_INDICATE:
            ind = rndis.INDICATE.parse(data[:20]) if mlen >= 20 else None
            if ind is not None:
                self.indications.append(ind.status)
                if ind.status == rndis.STATUS_MEDIA_CONNECT:
                    self.carrier = True
                elif ind.status == rndis.STATUS_MEDIA_DISCONNECT:
                    self.carrier = False
                elif ind.status == rndis.STATUS_LINK_SPEED_CHANGE:
                    at = rndis.HEADER_SIZE + ind.status_buf_offset
                    if ind.status_buflen < 4 or ind.status_buf_offset < 12 or at + 4 > mlen:
                        self.guest._warn("netvsc: malformed LINK_SPEED_CHANGE indication (ignored)")
                    else:
                        self.link_speed_100bps = struct.unpack_from("<I", data, at)[0]
            return True
        self.guest._warn(f"netvsc: unhandled rndis message type {mtype:#x}")
        return True

    def _rndis_data(self, ch: GuestChannel, msg: bytes) -> bool:
        """rndis_filter_receive_data: bounds checks, then the PPI walk (which spins on bad PPIs)."""
        if len(msg) < rndis.PACKET_HEADER_SIZE:
            return False
        f = rndis.PACKET_FAST.unpack_from(msg)
        data_off, data_len, ppi_off, ppi_len = f[2], f[3], f[7], f[8]
        if data_off >= len(msg) - 8 or data_len > len(msg) - 8 - data_off:
            self.guest._warn(f"netvsc: rndis packet data_offset {data_off}/len {data_len} invalid")
            return False
        ppis: dict[int, bytes] = {}
        if ppi_len:
            area = msg[8 + ppi_off : 8 + ppi_off + ppi_len]
            walked = rndis.guest_ppi_walk(area)
            if walked is None:
                raise GuestHang("rndis_get_ppi: malformed PPI, the guest CPU spins forever in softirq")
            ppis = walked
        self.rx.append(RxFrame(msg[8 + data_off : 8 + data_off + data_len], ppis, ch.sub_channel_index))
        return True

    # ==============================================================================================
    # Plumbing
    # ==============================================================================================

    def _send_nvsp(self, payload: bytes) -> None:
        self.primary.send_inband(payload, trans_id=vp.NETVSC_NO_COMPLETION_TRANS_ID)

    def _request(self, payload: bytes) -> int:
        ch = self.primary
        tid = ch.send_inband(payload, completion_requested=True)
        self._requests[(ch.relid, tid)] = struct.unpack_from("<I", payload)[0]
        return tid

    def _wait_init_completion(self, mtype: int) -> tuple[int, bytes]:
        self._wait(lambda: self._init_completion is not None, f"NVSP completion type {mtype}")
        assert self._init_completion is not None
        got, payload = self._init_completion
        self._init_completion = None
        if got != mtype:
            raise GuestOperationFailed(f"expected NVSP completion {mtype}, got {got}")
        return got, payload

    def _wait(self, cond: Callable[[], bool], what: str) -> None:
        for _ in range(self.max_pumps):
            self.poll()
            if cond():
                return
            self._pump()
            self.guest.poll()
        self.poll()
        if not cond():
            raise GuestHang(f"netvsc waits forever: {what}")

    def wait_tx_idle(self) -> None:
        self._wait(lambda: not self._tx, "all sends completed")

    def _buf_read(self, pfns: list[int], offset: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            page, off = divmod(offset, PAGE)
            n = min(length, PAGE - off)
            out += self.guest.memory.page(pfns[page])[off : off + n]
            offset, length = offset + n, length - n
        return bytes(out)

    def _buf_write(self, pfns: list[int], offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            page, off = divmod(offset + pos, PAGE)
            n = min(len(data) - pos, PAGE - off)
            self.guest.memory.page(pfns[page])[off : off + n] = data[pos : pos + n]
            pos += n


# ==================================================================================================
# A ready-made test bed: device + VMBus server + guest model (+ a recording port)
# ==================================================================================================


class RecordingPort:
    """A stand-in for hvlab.net.switch.Port (same shape: ``name``, ``link_up``, ``send``) that keeps
    every frame the endpoint sent, for tests that do not need a switch."""

    def __init__(self, name: str = "port0") -> None:
        self.name = name
        self.link_up = True
        self.sent: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.sent.append(bytes(frame))


@dataclass
class NetvscTestbed:
    bus: Any
    device: Any
    netvsc: NetvscGuest
    port: RecordingPort
    loop: Any
    timeline: Any

    def settle(self) -> None:
        """Run deferred device work and let the guest process everything."""
        for _ in range(4):
            if self.loop is not None:
                self.loop.run_pending()
            self.bus.synic.pump()
            self.bus.guest.poll()
            self.netvsc.poll()


def make_testbed(
    flavour: str = "6.12",
    *,
    mac: str = "00:15:5d:00:00:01",
    scheduler: bool = False,
    probe: bool = True,
    open_: bool = True,
    memory_size: int = 16 << 20,
    device_kw: dict[str, Any] | None = None,
    bus_kw: dict[str, Any] | None = None,
    **model_kw: Any,
) -> NetvscTestbed:
    """NetvspDevice on a VmbusServer, the VMBus guest model connected, and a NetvscGuest probed and
    opened (``ip link set up``) unless told otherwise. ``scheduler=True`` gives the device a ManualLoop
    (deferred receive announcements), which the guest's waits run."""
    from hvlab.devices.netvsp import NetvspDevice
    from hvlab.timeline import MemoryTimeline
    from hvlab.vmbus.loop import ManualLoop
    from hvlab.vmbus.testing import make_bus

    loop = ManualLoop() if scheduler else None
    timeline = MemoryTimeline()
    device = NetvspDevice(mac, scheduler=loop, **(device_kw or {}))
    port = RecordingPort(device.name)
    device.attach_port(port)
    bus = make_bus([device], flavour=flavour, timeline=timeline, memory_size=memory_size, **(bus_kw or {}))
    bus.connect()

    def pump() -> None:
        if loop is not None:
            loop.run_pending()
        bus.synic.pump()

    netvsc = NetvscGuest(bus.guest, pump=pump, **model_kw)
    if probe:
        netvsc.probe()
        if open_:
            netvsc.open()
    return NetvscTestbed(bus, device, netvsc, port, loop, timeline)

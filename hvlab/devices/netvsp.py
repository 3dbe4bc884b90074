"""netvsp: the host side of Linux's hv_netvsc, as a VMBus device model (spec §3).

The guest drives everything; the host answers (spec §3.3 order): NVSP INIT → NDIS_CONFIG → NDIS_VER →
receive buffer (SEND_RECV_BUF) → send buffer (SEND_SEND_BUF) → RNDIS INIT and OIDs (in SEND_RNDIS_PKT
messages, answered through the receive buffer) → optionally SUBCHANNEL (vRSS) and SWITCH_DATA_PATH.

Data paths:
* **guest → host**: SEND_RNDIS_PKT whose RNDIS bytes are a send-buffer section, GPA-direct ranges, or
  a section followed by ranges ("partial copy"); several RNDIS_PACKETs may be batched in one section.
  Every packet is completed with {108, status} (the guest waits for it, §3.4); frames go to the
  attached switch port, with a VLAN PPI turned back into an 802.1Q tag.
* **host → guest** (hvlab.devices.netvsp_rx): ``deliver(frame)`` (the switch's Deliver, any thread)
  fills receive sections, announced in batched transfer-page packets; vRSS spreads flows over the
  sub-channels with the guest's Toeplitz key and indirection table. RNDIS responses share that path.
* **offloads** (hvlab.devices.netvsp_offload): none advertised by default; with ``offloads=True`` the
  host completes TX checksums and forwards LSO frames whole.

Threading: callbacks run under ``server.lock``; ``deliver``/``set_link``/``offer_vf`` take it. Frames
are handed to ``port.send`` under that lock, so a switch endpoint that answers synchronously re-enters
``deliver`` on the same thread (the lock is re-entrant). Two VMs on one switch must not share a thread
that holds one server lock while delivering to the other (lock order); today each VM has its own.

Untrusted guest: every malformed NVSP/RNDIS message is ``Channel.report_violation`` (message "nvsp"
or "rndis", naming the field), counted in ``counters["violations"]``, and the host carries on —
every packet that asked for a completion still gets one.
"""

from __future__ import annotations

import itertools
import logging
import struct
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

from hvlab.devices.netvsp_offload import finish_offloads
from hvlab.devices.netvsp_rx import ReceivePath, _Buffer
from hvlab.devices.rndis_host import RndisHost
from hvlab.net.frames import insert_vlan
from hvlab.net.switch import mac_bytes
from hvlab.protocol import nvsp, rndis
from hvlab.protocol import vmbus as vm
from hvlab.protocol import vmbus_packet as vp
from hvlab.vmbus.channel import Channel, ChannelState, GpadlBuffer
from hvlab.vmbus.device import VmbusDevice
from hvlab.vmbus.loop import Scheduler

log = logging.getLogger("hvlab.netvsp")

DEFAULT_RECV_SECTION = 1728
"""Receive section size: a 1514-byte frame + 44-byte RNDIS header + PPIs (spec §3.3 step 5)."""
DEFAULT_SEND_SECTION = 6144
"""Send section size Linux expects (NETVSC_SEND_SECTION_SIZE)."""
MAX_XFER_RANGES = 562
"""Ranges per transfer-page packet the guest accepts (spec §3.5)."""
GUEST_MAX_PACKET = 4624
"""NETVSC_MAX_PKT_SIZE: the guest truncates longer host packets."""
RX_PPI_SPACE = 3 * 16
"""Checksum + hash + VLAN PPIs, 16 bytes each."""
MAX_BACKLOG = 65536
"""Packets queued per channel while the guest's inbound ring is full (the guest's request ids bound it)."""


class NetvspDevice(ReceivePath, VmbusDevice):
    """A synthetic NIC. Public state: ``data_path``, ``mtu``, ``nvsp_version``, ``ndis_version``,
    ``link_up``, ``counters``, ``vf_serial``; hooks ``on_data_path``.

    ``mac`` is the permanent address (the VF must carry the same one, spec §3.10.2); ``scheduler``
    defers receive announcements so bursts share a packet (None: announce at once); ``timeline``
    overrides the server's; ``max_subchannels`` bounds vRSS (RSS queues reported = 1 + this);
    ``nvsp_versions`` the NVSP versions accepted; ``offloads`` advertises TX checksum + LSOv2;
    ``max_mtu`` is the OID_GEN_MAXIMUM_FRAME_SIZE answer; ``recv_section_size`` the minimum receive
    section (grown to fit the MTU from NDIS_CONFIG); ``rx_batch`` ranges per transfer-page packet.
    """

    class_guid = vm.ClassGuid.NETVSC
    name = "netvsp0"
    ring_size_hint = 512 * 1024
    max_packet_size = 8192

    def __init__(
        self,
        mac: str,
        *,
        instance_guid: vm.GuidLike | None = None,
        name: str = "netvsp0",
        scheduler: Scheduler | None = None,
        timeline: Any = None,
        max_subchannels: int = 8,
        link_up: bool = True,
        nvsp_versions: Iterable[int] = nvsp.GUEST_VERSIONS,
        offloads: bool = False,
        max_mtu: int = 65521,
        recv_section_size: int = DEFAULT_RECV_SECTION,
        send_section_size: int = DEFAULT_SEND_SECTION,
        rx_batch: int = 64,
    ) -> None:
        super().__init__(instance_guid, name=name)
        self.mac = mac_bytes(mac)
        self.scheduler = scheduler
        self.timeline = timeline
        self.max_subchannels = max(0, min(max_subchannels, 63))
        self.link_up = link_up
        self.nvsp_versions = frozenset(int(v) for v in nvsp_versions)
        self.recv_section_size = recv_section_size
        self.send_section_size = send_section_size
        self.rx_batch = max(1, min(rx_batch, MAX_XFER_RANGES))
        self.rndis = RndisHost(mac=self.mac, max_mtu=max_mtu, offloads=offloads,
                               num_recv_queues=1 + self.max_subchannels)  # fmt: skip
        self.rndis.link_up = link_up
        self.port: Any = None
        self.data_path = "synthetic"
        self.on_data_path: Callable[[str], None] | None = None
        """Called with "vf" / "synthetic" when the RX path changes (guest SWITCH_DATA_PATH, or revoke_vf),
        under the server lock and before the guest sees the completion: pin the switch MAC here."""
        self.vf_serial: int | None = None
        self.counters: Counter[str] = Counter()
        """tx_frames/tx_bytes (guest → switch), rx_frames/rx_bytes (switch → guest, accepted),
        rx_drop.<reason>, tx_drop.<reason>, violations, rx_packets (transfer-page packets),
        nvsp_rndis_packets (guest SEND_RNDIS_PKT), resets."""
        self._tids = itertools.count(1)
        self._reset_state()

    # ==============================================================================================
    # Public API (any thread)
    # ==============================================================================================

    def attach_port(self, port: Any) -> None:
        """Frames the guest transmits go to ``port.send(frame)``."""
        self.port = port

    def deliver(self, frame: bytes) -> str | None:
        """Switch → guest: None when accepted, else a drop reason (counted). Never raises."""
        server = self.server
        if server is None:
            return self._rx_drop("not-attached")
        with server.lock:
            try:
                reason = self._rx_enqueue(frame)
                if reason is None:
                    self._kick(self._last_rx_channel)
                return reason
            except Exception:
                log.exception("%s: deliver failed", self.name)
                return self._rx_drop("internal-error")

    def deliver_many(self, frames: Iterable[bytes]) -> list[str | None]:
        """Deliver a burst and announce it in as few transfer-page packets as possible."""
        server = self.server
        if server is None:
            return [self._rx_drop("not-attached") for _ in frames]
        with server.lock:
            out: list[str | None] = []
            try:
                for frame in frames:
                    out.append(self._rx_enqueue(frame))
                for relid in list(self._rx_pending):
                    self._flush(relid)
            except Exception:
                log.exception("%s: deliver_many failed", self.name)
            return out

    def set_link(self, up: bool) -> None:
        """Carrier on/off: RNDIS INDICATE MEDIA_CONNECT / MEDIA_DISCONNECT (if RNDIS is up)."""
        with self._lock():
            self.link_up = self.rndis.link_up = bool(up)
            self._event("netvsp.link", up=self.link_up)
            if self.rndis.state.initialized:
                status = rndis.STATUS_MEDIA_CONNECT if up else rndis.STATUS_MEDIA_DISCONNECT
                self._send_control(rndis.build_indicate(status), "INDICATE", status=status)

    def offer_vf(self, serial: int | None) -> None:
        """SEND_VF_ASSOCIATION {allocated 1, serial}; ``None`` revokes (allocated 0). Sent now if the
        guest's buffers are set up, else right after SEND_SEND_BUF_COMPLETE (and again after every
        channel re-open while the VF exists, spec §3.10.1)."""
        if serial is None:
            self.revoke_vf()
            return
        with self._lock():
            self.vf_serial = int(serial) & 0xFFFFFFFF
            self._event("netvsp.vf", action="offer", serial=self.vf_serial)
            if self._send is not None:
                self._send_vf_association()

    def revoke_vf(self) -> None:
        """SEND_VF_ASSOCIATION {allocated 0, last serial} (informational for the guest), sent after the
        VF is gone. Receive traffic returns to the synthetic path now even if the guest never sent
        SWITCH_DATA_PATH(0) (spec §3.10.7: surprise removal)."""
        with self._lock():
            serial, self.vf_serial = self.vf_serial, None
            self._event("netvsp.vf", action="revoke", serial=serial)
            if self._send is not None and serial is not None:
                self._send_vf_association(allocated=0, serial=serial)
            if self.data_path != "synthetic":
                self._set_data_path("synthetic", reason="VF revoked")

    def set_link_speed(self, bits_per_second: int) -> None:
        """RNDIS INDICATE LINK_SPEED_CHANGE (u32 in 100 bit/s units) and the OID_GEN_LINK_SPEED answer."""
        with self._lock():
            self.rndis.link_speed_100bps = max(1, bits_per_second // 100) & 0xFFFFFFFF
            if self.rndis.state.initialized:
                buf = struct.pack("<I", self.rndis.link_speed_100bps)
                self._send_control(
                    rndis.build_indicate(rndis.STATUS_LINK_SPEED_CHANGE, buf),
                    "INDICATE",
                    speed=bits_per_second,
                )

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def drops(self) -> dict[str, int]:
        return {k: v for k, v in self.counters.items() if "_drop." in k}

    @property
    def ready(self) -> bool:
        """The guest can receive data: primary open, receive buffer posted, RNDIS initialised."""
        p = self.primary
        return p is not None and p.is_open and self._recv is not None and self.rndis.state.initialized

    def snapshot(self) -> dict[str, Any]:
        with self._lock():
            return {
                "name": self.name,
                "mac": self.mac.hex(":"),
                "nvsp_version": self.nvsp_version,
                "ndis_version": self.ndis_version,
                "mtu": self._mtu,
                "data_path": self.data_path,
                "link_up": self.link_up,
                "packet_filter": self.rndis.state.packet_filter,
                "vf_serial": self.vf_serial,
                "channels": len(self.channels),
                "recv_sections": None if self._recv is None else (self._recv.count, len(self._recv.free)),
                "counters": dict(self.counters),
            }

    # ==============================================================================================
    # VmbusDevice hooks
    # ==============================================================================================

    def on_open(self, channel: Channel) -> None:
        if not channel.is_primary:
            return
        self._reset_state()
        self._event("netvsp.channel", action="open", relid=channel.relid)
        # Sub-channels of an earlier attach (MTU change, reload, VMBus reset) are dead: the guest only
        # opens sub-channels from fresh offers, numbered 1..n (spec §3.7). Rescind them now, while the
        # guest runs its handshake, so their relids and indices are free before it asks again.
        # Hyper-V rescinds at primary close; doing it here also covers a VMBus reset, where the server
        # re-offers every known channel.
        server = self.server
        for sub in [c for c in self.channels if not c.is_primary]:
            if server is not None and sub.state in (ChannelState.OFFERED, ChannelState.OPEN):
                server.rescind_channel(sub)

    def on_close(self, channel: Channel) -> None:
        if channel.is_primary:
            self._event("netvsp.channel", action="close", relid=channel.relid)
            self._reset_state()
            self.counters["resets"] += 1
            return
        self._tx_backlog.pop(channel.relid, None)
        self._drop_channel_rx(channel.relid, "channel-closed")

    def on_gpadl_torn_down(self, channel: Channel, gpadl: GpadlBuffer) -> None:
        for which in ("recv", "send"):
            buf = self._recv if which == "recv" else self._send
            if buf is not None and buf.gpadl.handle == gpadl.handle:
                primary = self.primary
                if primary is not None and primary.is_open:
                    self._violation(
                        channel, "gpadl_handle", gpadl.handle, f"{which} buffer torn down before REVOKE"
                    )
                self._revoke(which)

    def on_ring_space(self, channel: Channel) -> None:
        backlog = self._tx_backlog.get(channel.relid)
        while backlog:
            if not channel.send_packet(backlog[0]):
                return  # still full: the server calls us again when the guest makes room
            backlog.popleft()
        self._flush(channel.relid)

    def on_packet(self, channel: Channel, packet: vp.Packet) -> None:
        if packet.type == vp.PacketType.COMP:
            self._on_rx_completion(channel, packet)
            return
        payload = packet.payload
        mtype = int.from_bytes(payload[:4], "little") if len(payload) >= 4 else None
        completion = b""
        self._after: list[Callable[[], None]] = []
        try:
            if packet.type not in (vp.PacketType.DATA_INBAND, vp.PacketType.DATA_USING_GPA_DIRECT):
                self._violation(channel, "type", packet.type, "netvsc sends in-band or GPA-direct packets")
            elif mtype is None:
                self._violation(channel, "msg_type", len(payload), "payload shorter than msg_type")
            elif mtype == nvsp.MsgType.SEND_RNDIS_PKT:
                completion = self._on_rndis_pkt(channel, packet)
            else:
                completion = self._on_control(channel, packet, mtype)
        except Exception:
            log.exception("%s: packet handling failed", self.name)
            completion = (
                nvsp.rndis_pkt_complete(nvsp.Status.FAIL)
                if mtype == nvsp.MsgType.SEND_RNDIS_PKT
                else _failure_completion(mtype or 0)
            )
        if packet.completion_requested:
            self._send_reliably(channel, vp.build_completion(completion, packet.trans_id))
        elif mtype in _NEEDS_COMPLETION:
            self._violation(channel, "flags", packet.flags, "request sent without COMPLETION_REQUESTED")
        after, self._after = self._after, []
        for fn in after:
            fn()

    # ==============================================================================================
    # NVSP control
    # ==============================================================================================

    def _on_control(self, channel: Channel, packet: vp.Packet, mtype: int) -> bytes:
        try:
            msg = nvsp.parse(packet.payload)
        except nvsp.NvspError as exc:
            self._violation(channel, exc.field, exc.value, exc.detail)
            return _failure_completion(mtype)
        name = nvsp.MsgType(mtype).name
        if not channel.is_primary:
            self._violation(channel, "msg_type", mtype, f"{name} on a sub-channel")
            return _failure_completion(mtype)
        if mtype != nvsp.MsgType.INIT and self.nvsp_version is None:
            self._violation(channel, "msg_type", mtype, f"{name} before a successful INIT")
        handler = _CONTROL.get(nvsp.MsgType(mtype))
        if handler is None:
            self._violation(channel, "msg_type", mtype, f"{name} is not a guest request")
            return b""
        return handler(self, channel, msg)

    def _on_init(self, channel: Channel, msg: Any) -> bytes:
        version = msg.max_protocol_ver
        ok = msg.min_protocol_ver <= version and version in self.nvsp_versions
        if ok:
            self.nvsp_version = version
        self._nvsp_event("rx", "INIT", version=f"{version:#x}", accepted=ok)
        status = nvsp.Status.SUCCESS if ok else nvsp.Status.PROTOCOL_UNSUPPORTED
        return nvsp.build(nvsp.INIT_COMPLETE, negotiated_protocol_ver=version if ok else 0,
                          max_mdl_chain_len=0x22, status=status)  # fmt: skip

    def _on_ndis_config(self, channel: Channel, msg: Any) -> bytes:
        if not 68 <= msg.mtu <= self.rndis.max_mtu + 14:
            self._violation(channel, "mtu", msg.mtu, f"NDIS_CONFIG mtu outside 68..{self.rndis.max_mtu + 14}")
        else:
            self._mtu = msg.mtu - 14
        self.capability = msg.capability
        self._nvsp_event("rx", "SEND_NDIS_CONFIG", mtu=msg.mtu, capability=f"{msg.capability:#x}")
        return b""

    def _on_ndis_ver(self, channel: Channel, msg: Any) -> bytes:
        self.ndis_version = (msg.ndis_major_ver, msg.ndis_minor_ver)
        self._nvsp_event("rx", "SEND_NDIS_VER", major=msg.ndis_major_ver, minor=msg.ndis_minor_ver)
        return b""

    def _buffer_gpadl(self, channel: Channel, handle: int, which: str) -> GpadlBuffer | None:
        try:
            buf = channel.gpadl(handle)
        except KeyError:
            self._violation(channel, "gpadl_handle", handle, f"{which} buffer: no such GPADL on this device")
            return None
        if any(c.ring_gpadl == handle and c.state is ChannelState.OPEN for c in self.channels):
            self._violation(channel, "gpadl_handle", handle, f"{which} buffer is a ring GPADL")
            return None
        other = self._send if which == "receive" else self._recv
        if other is not None and other.gpadl.handle == handle:
            self._violation(channel, "gpadl_handle", handle, "receive and send buffers are the same GPADL")
            return None
        return buf

    def _on_recv_buf(self, channel: Channel, msg: Any) -> bytes:
        fail = nvsp.build(nvsp.SEND_RECV_BUF_COMPLETE, status=nvsp.Status.FAIL, num_sections=0,
                          section=dict(offset=0, sub_alloc_size=0, num_sub_allocs=0, end_offset=0))  # fmt: skip
        if msg.id != nvsp.NETVSC_RECEIVE_BUFFER_ID:
            self._violation(channel, "id", msg.id, "receive buffer id must be 0xCAFE")
        if self._recv is not None:
            self._violation(channel, "gpadl_handle", msg.gpadl_handle, "a receive buffer is already posted")
            return fail
        buf = self._buffer_gpadl(channel, msg.gpadl_handle, "receive")
        section = self._recv_section_for_mtu()
        if buf is None or buf.size < section:
            if buf is not None:
                self._violation(channel, "gpadl_handle", msg.gpadl_handle, f"{buf.size} bytes < one section")
            self._nvsp_event("rx", "SEND_RECV_BUF", gpadl=msg.gpadl_handle, accepted=False)
            return fail
        count = buf.size // section
        self._recv = _Buffer(buf, section, count, list(range(count - 1, -1, -1)))
        self._nvsp_event(
            "rx", "SEND_RECV_BUF", gpadl=msg.gpadl_handle, size=buf.size, section=section, sections=count
        )
        return nvsp.build(nvsp.SEND_RECV_BUF_COMPLETE, status=nvsp.Status.SUCCESS, num_sections=1,
                          section=dict(offset=0, sub_alloc_size=section, num_sub_allocs=count,
                                       end_offset=section * count))  # fmt: skip

    def _on_send_buf(self, channel: Channel, msg: Any) -> bytes:
        fail = nvsp.build(nvsp.SEND_SEND_BUF_COMPLETE, status=nvsp.Status.FAIL, section_size=0)
        if msg.id != nvsp.NETVSC_SEND_BUFFER_ID:
            self._violation(channel, "id", msg.id, "send buffer id must be 0")
        if self._send is not None:
            self._violation(channel, "gpadl_handle", msg.gpadl_handle, "a send buffer is already posted")
            return fail
        buf = self._buffer_gpadl(channel, msg.gpadl_handle, "send")
        if buf is None or buf.size < self.send_section_size:
            self._nvsp_event("rx", "SEND_SEND_BUF", gpadl=msg.gpadl_handle, accepted=False)
            return fail
        count = buf.size // self.send_section_size
        self._send = _Buffer(buf, self.send_section_size, count)
        self._nvsp_event("rx", "SEND_SEND_BUF", gpadl=msg.gpadl_handle, size=buf.size, sections=count)
        if self.vf_serial is not None:
            self._after.append(self._send_vf_association)
        return nvsp.build(
            nvsp.SEND_SEND_BUF_COMPLETE, status=nvsp.Status.SUCCESS, section_size=self.send_section_size
        )

    def _on_revoke_recv(self, channel: Channel, msg: Any) -> bytes:
        if msg.id != nvsp.NETVSC_RECEIVE_BUFFER_ID:
            self._violation(channel, "id", msg.id, "REVOKE_RECV_BUF id must be 0xCAFE")
        self._nvsp_event("rx", "REVOKE_RECV_BUF")
        self._revoke("recv")
        return b""

    def _on_revoke_send(self, channel: Channel, msg: Any) -> bytes:
        if msg.id != nvsp.NETVSC_SEND_BUFFER_ID:
            self._violation(channel, "id", msg.id, "REVOKE_SEND_BUF id must be 0")
        self._nvsp_event("rx", "REVOKE_SEND_BUF")
        self._revoke("send")
        return b""

    def _on_switch_data_path(self, channel: Channel, msg: Any) -> bytes:
        if msg.active_datapath not in (nvsp.DATAPATH_SYNTHETIC, nvsp.DATAPATH_VF):
            self._violation(channel, "active_datapath", msg.active_datapath, "must be 0 or 1")
        else:
            self._set_data_path(
                "vf" if msg.active_datapath == nvsp.DATAPATH_VF else "synthetic", "SWITCH_DATA_PATH"
            )
        return b""  # spec §3.10.4: a zero-length completion, or the guest hangs holding RTNL

    def _set_data_path(self, new: str, reason: str) -> None:
        old, self.data_path = self.data_path, new
        self._nvsp_event(
            "rx" if reason == "SWITCH_DATA_PATH" else "host", reason, data_path=new, previous=old
        )
        if self.on_data_path is not None:
            try:
                self.on_data_path(new)
            except Exception:
                log.exception("%s: on_data_path callback failed", self.name)

    def _on_subchannel(self, channel: Channel, msg: Any) -> bytes:
        live = [
            c
            for c in self.channels
            if not c.is_primary and c.state in (ChannelState.OFFERED, ChannelState.OPEN)
        ]
        ok = msg.op == nvsp.SUBCHANNEL_OP_ALLOCATE and (self.nvsp_version or 0) >= nvsp.Version.V5
        if msg.op != nvsp.SUBCHANNEL_OP_ALLOCATE:
            self._violation(channel, "op", msg.op, "SUBCHANNEL op must be 1 (ALLOCATE)")
        n = max(0, min(msg.num_subchannels, self.max_subchannels - len(live))) if ok else 0
        self._nvsp_event("rx", "SUBCHANNEL", requested=msg.num_subchannels, allocated=n)
        if n:
            self._after.append(lambda: [self.offer_subchannel() for _ in range(n)])
        status = nvsp.Status.SUCCESS if ok else nvsp.Status.FAIL
        return nvsp.build(nvsp.SUBCHANNEL_COMPLETE, status=status, num_subchannels=n)

    def _on_unexpected(self, channel: Channel, msg: Any) -> bytes:
        self._violation(channel, "msg_type", msg.msg_type, "a host-to-guest message sent by the guest")
        return b""

    # ==============================================================================================
    # RNDIS from the guest
    # ==============================================================================================

    def _on_rndis_pkt(self, channel: Channel, packet: vp.Packet) -> bytes:
        self.counters["nvsp_rndis_packets"] += 1
        payload = packet.payload
        if len(payload) < nvsp.RNDIS_PKT_FAST.size:
            self._violation(channel, "length", len(payload), "SEND_RNDIS_PKT needs 16 bytes")
            return nvsp.rndis_pkt_complete(nvsp.Status.FAIL)
        _t, chan_type, index, size = nvsp.RNDIS_PKT_FAST.unpack_from(payload)
        parts: list[bytes] = []
        if index != nvsp.NO_SECTION:
            send = self._send
            if send is None:
                self._violation(channel, "send_buf_section_index", index, "no send buffer posted")
                return nvsp.rndis_pkt_complete(nvsp.Status.FAIL)
            if index >= send.count:
                self._violation(channel, "send_buf_section_index", index, f"only {send.count} sections")
                return nvsp.rndis_pkt_complete(nvsp.Status.FAIL)
            if size > send.section_size or size == 0:
                self._violation(channel, "send_buf_section_size", size, f"must be 1..{send.section_size}")
                return nvsp.rndis_pkt_complete(nvsp.Status.FAIL)
            parts.append(send.gpadl.read(index * send.section_size, size))
        for r in packet.gpa_ranges:
            try:
                parts.append(channel.read_gpa_range(r))
            except ValueError as exc:
                self._violation(channel, "pfn", r.pfns[0] if r.pfns else 0, str(exc))
                return nvsp.rndis_pkt_complete(nvsp.Status.FAIL)
        if not parts:
            self._violation(channel, "send_buf_section_index", index, "neither a section nor GPA ranges")
            return nvsp.rndis_pkt_complete(nvsp.Status.FAIL)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            messages = rndis.split_messages(data)
        except rndis.RndisError as exc:
            self._violation(channel, exc.field, exc.value, exc.detail, message="rndis")
            return nvsp.rndis_pkt_complete(nvsp.Status.INVALID_RNDIS_PKT)
        status = nvsp.Status.SUCCESS
        for offset, length in messages:
            mtype = int.from_bytes(data[offset : offset + 4], "little")
            if mtype == rndis.MSG_PACKET:
                try:
                    frame, info = rndis.parse_packet(data, offset, length)
                except rndis.RndisError as exc:
                    self._violation(channel, exc.field, exc.value, exc.detail, message="rndis")
                    self.counters["tx_drop.malformed"] += 1
                    status = nvsp.Status.INVALID_RNDIS_PKT
                    continue
                self._tx_frame(frame, info)
            elif not self._rndis_control(channel, mtype, data[offset : offset + length]):
                status = nvsp.Status.INVALID_RNDIS_PKT
        return nvsp.rndis_pkt_complete(status)

    def _rndis_control(self, channel: Channel, mtype: int, msg: bytes) -> bool:
        name = rndis.MSG_NAMES.get(mtype, f"{mtype:#x}")
        try:
            response, fields = self.rndis.handle(mtype, msg, self.nvsp_version or 0)
        except rndis.RndisError as exc:
            self._violation(channel, exc.field, exc.value, f"{name}: {exc.detail}", message="rndis")
            response = RndisHost.failure_response(mtype, msg)
            if response is not None:
                self._send_control(response, f"{name}_C", failed=True)
            return False
        self._event("netvsp.rndis", dir="rx", msg=name, **fields)
        if response is not None:
            self._send_control(response, rndis.MSG_NAMES.get(int.from_bytes(response[:4], "little"), "?"))
        return True

    def _tx_frame(self, frame: memoryview, info: rndis.PacketInfo) -> None:
        if len(frame) < 14:
            self.counters["tx_drop.runt"] += 1
            return
        out = bytes(frame)
        if self.rndis.offloads and info.ppis:
            try:
                out, done = finish_offloads(out, info)
                if done:
                    self.counters[f"tx_{done}"] += 1
            except ValueError as exc:
                self.counters["tx_offload_unparsed"] += 1
                log.debug("%s: offload PPIs do not match the frame: %s", self.name, exc)
        vlan = info.u32(rndis.PpiType.IEEE_8021Q)
        if vlan:
            vid, pri, cfi = rndis.parse_vlan(vlan)
            tci = (pri << 13) | (cfi << 12) | vid
            out = insert_vlan(out, tci)
        if not self.link_up:
            self.counters["tx_drop.link-down"] += 1
            return
        self.counters["tx_frames"] += 1
        self.counters["tx_bytes"] += len(out)
        port = self.port
        if port is None:
            self.counters["tx_drop.no-port"] += 1
            return
        try:
            port.send(out)
        except Exception:
            log.exception("%s: port.send failed", self.name)
            self.counters["tx_drop.port-error"] += 1

    def _revoke(self, which: str) -> None:
        if which == "recv":
            self._recv = None
            for relid in list(self._rx_pending):
                self._drop_channel_rx(relid, "revoked")
            self._rx_inflight.clear()
            self._ctl_backlog.clear()
        else:
            self._send = None

    def _recv_section_for_mtu(self) -> int:
        need = rndis.PACKET_HEADER_SIZE + RX_PPI_SPACE + self._mtu + 14 + 4
        return max(self.recv_section_size, (need + 63) // 64 * 64)

    # ==============================================================================================
    # Helpers
    # ==============================================================================================

    def _reset_state(self) -> None:
        """Forget everything the guest set up on the primary channel (close, reopen, MTU change).
        The data path and the VF serial survive (spec §3.10.9: the guest does not resend them)."""
        self.nvsp_version: int | None = None
        self.ndis_version: tuple[int, int] | None = None
        self.capability = 0
        if not hasattr(self, "_mtu"):
            self._mtu = 1500
        self._recv: _Buffer | None = None
        self._send: _Buffer | None = None
        self._rx_pending: dict[int, list[tuple[int, int, int]]] = {}
        self._rx_inflight: dict[int, tuple[int, list[int]]] = {}
        self._ctl_backlog: deque[bytes] = deque()
        self._flush_scheduled: set[int] = set()
        self._hash_cache: dict[bytes, int] = {}
        self._last_rx_channel: int | None = None
        self._after = []
        self._tx_backlog: dict[int, deque[bytes]] = {}
        self.rndis.reset()

    def _send_vf_association(self, allocated: int = 1, serial: int | None = None) -> None:
        primary = self.primary
        serial = self.vf_serial if serial is None else serial
        if primary is None or not primary.is_open or serial is None:
            return
        msg = nvsp.build(nvsp.SEND_VF_ASSOCIATION, allocated=allocated, serial=serial)
        self._send_reliably(primary, vp.build_inband(msg))
        self._nvsp_event("tx", "SEND_VF_ASSOCIATION", allocated=allocated, serial=serial)

    def _send_reliably(self, channel: Channel, packet: bytes) -> None:
        """Completions and NVSP messages the guest waits for must not be lost on a full inbound ring:
        they queue per channel, in order, until the guest makes room (on_ring_space)."""
        backlog = self._tx_backlog.get(channel.relid)
        if not backlog and channel.send_packet(packet):
            return
        if not channel.is_open:
            return
        if backlog is None:
            backlog = self._tx_backlog[channel.relid] = deque()
        if len(backlog) >= MAX_BACKLOG:
            self.counters["tx_backlog_overflow"] += 1
            log.error(
                "%s: relid %d: %d packets waiting for ring space", self.name, channel.relid, len(backlog)
            )
            return
        backlog.append(packet)
        self.counters["ring_full"] += 1

    def _lock(self) -> Any:
        server = self.server
        if server is None:
            import contextlib

            return contextlib.nullcontext()
        return server.lock

    def _violation(
        self, channel: Channel, field_: str, value: Any, detail: str, *, message: str = "nvsp"
    ) -> None:
        self.counters["violations"] += 1
        channel.report_violation(field_, value, f"{self.name}: {detail}", message=message)

    def _nvsp_event(self, direction: str, msg: str, **fields: Any) -> None:
        self._event("netvsp.nvsp", dir=direction, msg=msg, **fields)

    def _event(self, kind: str, **fields: Any) -> None:
        if self.timeline is not None:
            try:
                self.timeline.event(kind, device=self.name, **fields)
            except Exception:
                log.exception("timeline event failed")
        elif self.server is not None:
            self.server._event(kind, device=self.name, **fields)


_NEEDS_COMPLETION = frozenset(
    {nvsp.MsgType.INIT, nvsp.MsgType.SEND_RECV_BUF, nvsp.MsgType.SEND_SEND_BUF, nvsp.MsgType.SEND_RNDIS_PKT,
     nvsp.MsgType.SWITCH_DATA_PATH, nvsp.MsgType.SUBCHANNEL}
)  # fmt: skip
"""Guest requests that Linux always sends with COMPLETION_REQUESTED."""


def _failure_completion(mtype: int) -> bytes:
    """A completion the guest can match for a malformed request (so it fails instead of hanging)."""
    if mtype == nvsp.MsgType.INIT:
        return nvsp.build(
            nvsp.INIT_COMPLETE, negotiated_protocol_ver=0, max_mdl_chain_len=0, status=nvsp.Status.FAIL
        )
    if mtype == nvsp.MsgType.SEND_RECV_BUF:
        return nvsp.build(nvsp.SEND_RECV_BUF_COMPLETE, status=nvsp.Status.FAIL, num_sections=0,
                          section=dict(offset=0, sub_alloc_size=0, num_sub_allocs=0, end_offset=0))  # fmt: skip
    if mtype == nvsp.MsgType.SEND_SEND_BUF:
        return nvsp.build(nvsp.SEND_SEND_BUF_COMPLETE, status=nvsp.Status.FAIL, section_size=0)
    if mtype == nvsp.MsgType.SUBCHANNEL:
        return nvsp.build(nvsp.SUBCHANNEL_COMPLETE, status=nvsp.Status.FAIL, num_subchannels=0)
    return b""


_CONTROL: dict[nvsp.MsgType, Callable[[NetvspDevice, Channel, Any], bytes]] = {
    nvsp.MsgType.INIT: NetvspDevice._on_init,
    nvsp.MsgType.SEND_NDIS_CONFIG: NetvspDevice._on_ndis_config,
    nvsp.MsgType.SEND_NDIS_VER: NetvspDevice._on_ndis_ver,
    nvsp.MsgType.SEND_RECV_BUF: NetvspDevice._on_recv_buf,
    nvsp.MsgType.SEND_SEND_BUF: NetvspDevice._on_send_buf,
    nvsp.MsgType.REVOKE_RECV_BUF: NetvspDevice._on_revoke_recv,
    nvsp.MsgType.REVOKE_SEND_BUF: NetvspDevice._on_revoke_send,
    nvsp.MsgType.SWITCH_DATA_PATH: NetvspDevice._on_switch_data_path,
    nvsp.MsgType.SUBCHANNEL: NetvspDevice._on_subchannel,
    nvsp.MsgType.SEND_RNDIS_PKT_COMPLETE: NetvspDevice._on_unexpected,
}

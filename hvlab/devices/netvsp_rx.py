"""The receive path of netvsp (switch → guest): receive sections, transfer-page batching, vRSS.

``deliver`` writes each accepted frame as RNDIS_PACKET + PPIs into a free section of the guest's receive
buffer and queues it per channel; queued sections are announced together in one transfer-page packet
(at most ``rx_batch`` ranges, spec §3.5), right away or on the scheduler's next turn. A section returns
to the free list only when the guest completes the packet that carried it. RNDIS control responses and
indications take the same path on the primary channel and are never dropped: without a free section
they wait in a backlog until a completion frees one (the guest waits for them without timeout, §9).

vRSS: the channel is the one the guest's indirection table selects for the Toeplitz hash of the IP
addresses (plus TCP ports), computed with the guest's key — Hyper-V's behaviour — and the hash travels
in an NBL_HASH_VALUE PPI; non-IP traffic and guests without RSS parameters use the primary.

``ReceivePath`` is a mixin of NetvspDevice (it shares the device's state; split out for size only).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hvlab.net.switch import BROADCAST_MAC
from hvlab.protocol import nvsp, rndis
from hvlab.protocol import vmbus_packet as vp
from hvlab.vmbus.channel import Channel, GpadlBuffer

if TYPE_CHECKING:
    from hvlab.devices.rndis_host import RndisHost
    from hvlab.vmbus.loop import Scheduler
    from hvlab.vmbus.server import VmbusServer

log = logging.getLogger("hvlab.netvsp")

RSS_HASH_IPV4, RSS_HASH_TCP_IPV4, RSS_HASH_IPV6, RSS_HASH_TCP_IPV6 = 0x100, 0x200, 0x400, 0x1000
"""NDIS_HASH_* bits of ndis_recv_scale_param.hashinfo."""
_RX_CSUM_PPI = rndis.ppi_u32(rndis.PpiType.TCPIP_CHKSUM, 0)
"""Checksum info on every received frame: nothing verified, the guest checks (no RX offload claimed)."""
_RX_PPIS = (_RX_CSUM_PPI,)


def toeplitz(key: bytes, data: bytes) -> int:
    """The Toeplitz hash NDIS RSS uses (32-bit result), over ``data`` with ``key``."""
    k = int.from_bytes(key, "big")
    klen = 8 * len(key)
    result = 0
    for i, byte in enumerate(data):
        for bit in range(8):
            if byte & (0x80 >> bit):
                shift = klen - 32 - (8 * i + bit)
                if shift < 0:
                    return result
                result ^= (k >> shift) & 0xFFFFFFFF
    return result


def rss_input(frame: bytes | memoryview, hashinfo: int) -> bytes | None:
    """The bytes RSS hashes for this frame (addresses, plus ports for TCP when enabled), or None."""
    if len(frame) < 14:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == 0x0800 and len(frame) >= 34 and hashinfo & RSS_HASH_IPV4:
        ihl = (frame[14] & 0xF) * 4
        addrs = bytes(frame[26:34])
        if frame[23] == 6 and hashinfo & RSS_HASH_TCP_IPV4 and len(frame) >= 14 + ihl + 4:
            return addrs + bytes(frame[14 + ihl : 18 + ihl])
        return addrs
    if ethertype == 0x86DD and len(frame) >= 54 and hashinfo & RSS_HASH_IPV6:
        addrs = bytes(frame[22:54])
        if frame[20] == 6 and hashinfo & RSS_HASH_TCP_IPV6 and len(frame) >= 58:
            return addrs + bytes(frame[54:58])
        return addrs
    return None


@dataclass
class _Buffer:
    """A guest buffer (receive or send) cut into sections; ``free`` = receive sections not in use."""

    gpadl: GpadlBuffer
    section_size: int
    count: int
    free: list[int] = field(default_factory=list)


class ReceivePath:
    """Receive-side methods of NetvspDevice."""

    if TYPE_CHECKING:
        server: VmbusServer | None
        channels: list[Channel]
        primary: Channel | None
        scheduler: Scheduler | None
        rndis: RndisHost
        counters: Counter[str]
        link_up: bool
        data_path: str
        mac: bytes
        rx_batch: int
        ready: bool
        _recv: _Buffer | None
        _rx_pending: dict[int, list[tuple[int, int, int]]]
        _rx_inflight: dict[int, tuple[int, list[int]]]
        _ctl_backlog: deque[bytes]
        _flush_scheduled: set[int]
        _hash_cache: dict[bytes, int]
        _last_rx_channel: int | None
        name: str

        _tids: Any

        def _event(self, kind: str, **fields: Any) -> None: ...
        def _violation(
            self, channel: Channel, field_: str, value: Any, detail: str, *, message: str = "nvsp"
        ) -> None: ...

    def _rx_drop(self, reason: str) -> str:
        self.counters[f"rx_drop.{reason}"] += 1
        return reason

    def _accepts(self, frame: bytes | memoryview) -> bool:
        flt = self.rndis.state.packet_filter
        if flt & rndis.FILTER_PROMISCUOUS:
            return True
        dst = bytes(frame[:6])
        if dst == BROADCAST_MAC:
            return bool(flt & rndis.FILTER_BROADCAST)
        if dst[0] & 1:
            return bool(flt & (rndis.FILTER_ALL_MULTICAST | rndis.FILTER_MULTICAST))
        return bool(flt & rndis.FILTER_DIRECTED) and dst == (self.rndis.state.current_mac or self.mac)

    def _rx_enqueue(self, frame: bytes) -> str | None:
        """Checks, then RNDIS_PACKET + PPIs written into a free section and queued (per frame: keep lean)."""
        if len(frame) < 14:
            return self._rx_drop("runt")
        if not self.link_up:
            return self._rx_drop("link-down")
        if self.data_path == "vf":
            return self._rx_drop("vf-data-path")
        recv, state = self._recv, self.rndis.state
        primary = self.primary
        if recv is None or primary is None or not primary.is_open or not state.initialized or state.halted:
            return self._rx_drop("not-ready")
        if not state.packet_filter or not self._accepts(frame):
            return self._rx_drop("filtered")
        channel, hash_value = primary, None
        rss = state.rss
        if (
            rss is not None
            and not rss.flag & rndis.NDIS_RSS_PARAM_FLAG_DISABLE_RSS
            and rss.table
            and len(rss.key) >= 4
        ):
            channel, hash_value = self._rss_channel(frame, primary, rss)
        if hash_value is None:
            msg = rndis.build_packet(frame, _RX_PPIS)
        else:
            msg = rndis.build_packet(
                frame, (_RX_CSUM_PPI, rndis.ppi_u32(rndis.PpiType.NBL_HASH_VALUE, hash_value))
            )
        if len(msg) > recv.section_size:
            return self._rx_drop("too-big")
        if not recv.free:
            return self._rx_drop("no-rx-buffer")
        section = recv.free.pop()
        offset = section * recv.section_size
        recv.gpadl.write(offset, msg)
        relid = channel.relid
        pending = self._rx_pending.get(relid)
        if pending is None:
            pending = self._rx_pending[relid] = []
        pending.append((len(msg), offset, section))
        self._last_rx_channel = relid
        counters = self.counters
        counters["rx_frames"] += 1
        counters["rx_bytes"] += len(frame)
        return None

    def _rss_channel(
        self, frame: bytes, primary: Channel, rss: rndis.RssParams
    ) -> tuple[Channel, int | None]:
        data = rss_input(frame, rss.hashinfo)
        if data is None:
            return primary, None
        h = self._hash_cache.get(data)
        if h is None:
            if len(self._hash_cache) > 4096:
                self._hash_cache.clear()
            h = self._hash_cache[data] = toeplitz(rss.key, data)
        index = rss.table[h % len(rss.table)]
        for ch in self.channels:
            if ch.sub_channel_index == index and ch.is_open:
                return ch, h
        return primary, h

    def _kick(self, relid: int | None) -> None:
        """Announce pending sections now, or on the next scheduler turn (coalescing a burst)."""
        if relid is None:
            return
        if self.scheduler is None:
            self._flush(relid)
            return
        if relid in self._flush_scheduled:
            return
        self._flush_scheduled.add(relid)
        server = self.server

        def run() -> None:
            if server is None:
                return
            with server.lock:
                self._flush_scheduled.discard(relid)
                self._flush(relid)

        self.scheduler.schedule(0.0, run)

    def _flush(self, relid: int) -> None:
        pending = self._rx_pending.get(relid)
        if not pending:
            return
        channel = next((c for c in self.channels if c.relid == relid), None)
        if channel is None or not channel.is_open:
            self._drop_channel_rx(relid, "channel-closed")
            return
        nvsp_msg = nvsp.rndis_pkt(nvsp.CHANNEL_TYPE_DATA)
        while pending:
            batch = pending[: self.rx_batch]
            tid = next(self._tids)
            packet = vp.build_xfer_pages(
                [(n, off) for n, off, _ in batch], nvsp_msg, tid, nvsp.NETVSC_RECEIVE_BUFFER_ID
            )
            self._rx_inflight[tid] = (relid, [s for _, _, s in batch])
            if not channel.send_packet(packet):
                del self._rx_inflight[tid]
                if not channel.is_open:
                    self._drop_channel_rx(relid, "channel-closed")
                return  # ring full: on_ring_space flushes again
            self.counters["rx_packets"] += 1
            del pending[: len(batch)]

    def _send_control(self, msg: bytes, name: str, **fields: Any) -> None:
        """An RNDIS response/indication for the guest: never dropped (it may wait forever for it)."""
        self._event("netvsp.rndis", dir="tx", msg=name, **fields)
        self._ctl_backlog.append(msg)
        self._drain_control()

    def _drain_control(self) -> None:
        primary, recv = self.primary, self._recv
        if primary is None or not primary.is_open or recv is None:
            return
        while self._ctl_backlog and recv.free:
            msg = self._ctl_backlog.popleft()
            if len(msg) > recv.section_size:
                log.error("%s: control message of %d bytes exceeds a section", self.name, len(msg))
                continue
            section = recv.free.pop()
            offset = section * recv.section_size
            recv.gpadl.write(offset, msg)
            self._rx_pending.setdefault(primary.relid, []).append((len(msg), offset, section))
        self._flush(primary.relid)

    def _on_rx_completion(self, channel: Channel, packet: vp.Packet) -> None:
        entry = self._rx_inflight.pop(packet.trans_id, None)
        if entry is None:
            self._violation(
                channel, "trans_id", packet.trans_id, "completion for no outstanding receive packet"
            )
            return
        relid, sections = entry
        payload = packet.payload
        if len(payload) < 8 or int.from_bytes(payload[:4], "little") != nvsp.MsgType.SEND_RNDIS_PKT_COMPLETE:
            self._violation(channel, "msg_type", len(payload), "receive completion must be {108, status}")
        elif int.from_bytes(payload[4:8], "little") != nvsp.Status.SUCCESS:
            self.counters["rx_guest_failed"] += 1
        if relid != channel.relid:
            self._violation(channel, "trans_id", packet.trans_id, f"receive packet was sent on relid {relid}")
        if self._recv is not None:
            self._recv.free.extend(sections)
        if self._ctl_backlog:
            self._drain_control()

    def _drop_channel_rx(self, relid: int, reason: str) -> None:
        """Forget what was queued or in flight on a channel that went away; its sections are free."""
        pending = self._rx_pending.pop(relid, [])
        if pending:
            self.counters[f"rx_drop.{reason}"] += len(pending)
        recv = self._recv
        for tid in [t for t, (r, _) in self._rx_inflight.items() if r == relid]:
            _, sections = self._rx_inflight.pop(tid)
            if recv is not None:
                recv.free.extend(sections)
        if recv is not None:
            recv.free.extend(s for _, _, s in pending)

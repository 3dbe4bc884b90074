"""Integration components driven by the stock hv_utils driver: Heartbeat and Shutdown.

Both follow the IC pattern of Hyper-V (hvlab.protocol.ic): once the guest opens the channel the host
sends ICMSGTYPE_NEGOTIATE offering framework and service versions; hv_utils picks the highest of its
own that the host listed and echoes the buffer back; after that the host sends requests and the guest
answers each one in place, echoing the packet's trans_id. The guest never speaks first.

The first packet is sent from a timer, not from ``on_open``: OPENCHANNEL_RESULT may still be queued
behind a busy SynIC slot when ``on_open`` runs and the host must not touch the ring before the guest
has it (spec §2.8).

``scheduler`` is anything with ``schedule(delay, callback) -> handle.cancel()`` (hvlab.vmbus.loop); the
callbacks take the server lock themselves, so the loop need not hold it.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from hvlab.protocol import ic
from hvlab.protocol import vmbus as vm
from hvlab.protocol import vmbus_packet as vp
from hvlab.vmbus.channel import Channel
from hvlab.vmbus.device import VmbusDevice
from hvlab.vmbus.loop import Cancellable, Scheduler
from hvlab.vmbus.ring import SignalPolicy

MAX_OUTSTANDING = 64
"""Unanswered IC requests remembered per device (older ones are forgotten)."""

NEGOTIATE_VERSION = ic.ic_version(1, 0)
"""icverframe / icvermsg written in the negotiate request itself (Linux does not look at them)."""


@dataclass
class _Request:
    msgtype: int
    body: bytes
    sent_at: float
    on_response: Callable[[ic.IcMessage], None] | None = None


class IcDevice(VmbusDevice):
    """Common IC behaviour: negotiation, request/response matching, violations.

    Subclasses set ``class_guid``, ``name``, ``service_versions`` and override ``on_negotiated`` /
    ``on_channel_closed``.
    """

    framework_versions: ClassVar[tuple[int, ...]] = ic.FRAMEWORK_VERSIONS
    service_versions: ClassVar[tuple[int, ...]] = ()
    ring_size_hint = 4 * vm.PAGE_SIZE  # hv_utils: VMBUS_RING_SIZE(3 pages) per direction
    # hv_utils opens IC channels in direct callback mode: one callback per interrupt, interrupt_mask
    # never set, and the shutdown callback reads a single packet. Signal on every write so a second
    # request queued behind an unread one still gets its interrupt.
    signal_policy = SignalPolicy.WHEN_UNMASKED
    max_packet_size = vp.DESCRIPTOR_SIZE + ic.MAX_IC_PACKET

    def __init__(
        self,
        instance_guid: vm.GuidLike | None = None,
        *,
        scheduler: Scheduler,
        negotiate_delay: float = 0.0,
        clock: Callable[[], float] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(instance_guid, name=name)
        self.scheduler = scheduler
        self.negotiate_delay = negotiate_delay
        self._clock = clock or getattr(scheduler, "time", None) or (lambda: 0.0)
        self.channel: Channel | None = None
        self.fw_version: int | None = None
        self.srv_version: int | None = None
        self.negotiation_failed = False
        self._pending: dict[int, _Request] = {}
        self._tids = itertools.count(1)
        self._timers: list[Cancellable] = []

    @property
    def negotiated(self) -> bool:
        return self.srv_version is not None

    def now(self) -> float:
        return float(self._clock())

    # Channel hooks ----------------------------------------------------------------------------
    def on_open(self, channel: Channel) -> None:
        if not channel.is_primary:
            return
        self.channel = channel
        self.fw_version = self.srv_version = None
        self.negotiation_failed = False
        self._pending.clear()
        self.later(self.negotiate_delay, self._negotiate)

    def on_close(self, channel: Channel) -> None:
        if channel is not self.channel:
            return
        self.channel = None
        self._pending.clear()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self.on_channel_closed()

    def on_packet(self, channel: Channel, packet: vp.Packet) -> None:
        if packet.completion_requested:
            channel.send_completion(packet.trans_id)
        if packet.type != vp.PacketType.DATA_INBAND:
            channel.report_violation("type", packet.type, f"{self.name} IC expects in-band packets")
            return
        try:
            msg = ic.parse_ic_message(packet.payload)
        except ic.IcError as exc:
            channel.report_violation(exc.field, exc.value, exc.detail, message="ic")
            return
        request = self._pending.pop(packet.trans_id, None)
        if request is None:
            channel.report_violation(
                "trans_id", packet.trans_id, "no IC request outstanding with this id", message="ic"
            )
            return
        if not msg.header.is_response or msg.header.msgtype != request.msgtype:
            channel.report_violation(
                "icmsgtype",
                msg.header.msgtype,
                f"expected a response to IC message type {request.msgtype}",
                message="ic",
            )
            return
        try:
            if request.msgtype == ic.ICMSGTYPE_NEGOTIATE:
                self._negotiated(channel, msg)
            elif request.on_response is not None:
                request.on_response(msg)
        except ic.IcError as exc:
            channel.report_violation(exc.field, exc.value, exc.detail, message="ic")

    # Sending ----------------------------------------------------------------------------------
    def later(self, delay: float, fn: Callable[[], Any]) -> None:
        """Run ``fn`` after ``delay`` under the server lock, unless the channel closed meanwhile."""
        channel = self.channel

        def run() -> None:
            server = self.server
            if server is None:
                return
            with server.lock:
                if self.channel is channel and channel is not None and channel.is_open:
                    fn()

        self._timers = [t for t in self._timers if not getattr(t, "cancelled", False)][-32:]
        self._timers.append(self.scheduler.schedule(delay, run))

    def send_request(
        self, msgtype: int, body: bytes, on_response: Callable[[ic.IcMessage], None] | None = None
    ) -> bool:
        """Send one IC request; the guest's answer goes to ``on_response``."""
        channel = self.channel
        if channel is None or not channel.is_open:
            return False
        tid = next(self._tids)
        negotiating = msgtype == ic.ICMSGTYPE_NEGOTIATE
        payload = ic.build_ic_message(
            msgtype,
            body,
            fw_version=NEGOTIATE_VERSION if negotiating else (self.fw_version or ic.UTIL_FW_VERSION),
            msg_version=NEGOTIATE_VERSION if negotiating else (self.srv_version or 0),
            transaction_id=tid,
        )
        # Register before sending: a synchronous guest may answer before send_inband returns. Keep a
        # bounded number of unanswered requests so a late answer (slow nested guest) still matches.
        while len(self._pending) >= MAX_OUTSTANDING:
            del self._pending[next(iter(self._pending))]
        self._pending[tid] = _Request(msgtype, body, self.now(), on_response)
        if not channel.send_inband(payload, trans_id=tid):
            self._pending.pop(tid, None)
            self._event("ic.send_failed", msgtype=msgtype)
            return False
        return True

    def _negotiate(self) -> None:
        self.send_request(
            ic.ICMSGTYPE_NEGOTIATE, ic.build_negotiate(self.framework_versions, self.service_versions)
        )

    def _negotiated(self, channel: Channel, msg: ic.IcMessage) -> None:
        nego = ic.parse_negotiate(msg.body)
        if len(nego.fw_versions) != 1 or len(nego.srv_versions) != 1:
            self.negotiation_failed = True
            self._event(
                "ic.negotiate",
                result="failed",
                fw_count=len(nego.fw_versions),
                srv_count=len(nego.srv_versions),
            )
            return
        fw, srv = nego.fw_versions[0], nego.srv_versions[0]
        if fw not in self.framework_versions or srv not in self.service_versions:
            channel.report_violation(
                "icversion_data",
                (fw << 32) | srv,
                "guest chose a version the host did not offer",
                message="ic",
            )
            self.negotiation_failed = True
            return
        self.fw_version, self.srv_version = fw, srv
        self._event(
            "ic.negotiate", result="ok", framework=ic.ic_version_str(fw), service=ic.ic_version_str(srv)
        )
        self.on_negotiated()

    # Subclass hooks ---------------------------------------------------------------------------
    def on_negotiated(self) -> None:
        """Versions agreed: the service may start sending requests."""

    def on_channel_closed(self) -> None:
        """The channel closed; outstanding requests were dropped."""

    def _event(self, kind: str, **fields: Any) -> None:
        server = self.server
        if server is not None:
            server._event(kind, device=self.name, **fields)


@dataclass(frozen=True)
class HeartbeatRecord:
    """One heartbeat round trip: the host's sequence number and what the guest answered."""

    sent: int
    reply: int
    sent_at: float
    replied_at: float

    @property
    def ok(self) -> bool:
        return self.reply == (self.sent + 1) & 0xFFFFFFFFFFFFFFFF


class HeartbeatDevice(IcDevice):
    """Heartbeat IC: every ``interval`` seconds a request carrying a sequence number; hv_utils answers
    with the number plus one. ``history`` keeps the round trips so tests can assert the guest is alive
    and the sequence advances; a request still unanswered when the next is due counts as ``missed``.
    """

    class_guid = vm.ClassGuid.HEARTBEAT
    name = "heartbeat"
    service_versions = ic.HEARTBEAT_VERSIONS

    def __init__(
        self,
        instance_guid: vm.GuidLike | None = None,
        *,
        scheduler: Scheduler,
        interval: float = 1.0,
        initial_seq: int = 0,
        history_size: int = 1000,
        **kw: Any,
    ) -> None:
        super().__init__(instance_guid, scheduler=scheduler, **kw)
        self.interval = interval
        self.next_seq = initial_seq
        self.history: deque[HeartbeatRecord] = deque(maxlen=history_size)
        self.missed = 0
        self.bad_replies = 0
        self._outstanding: int | None = None

    @property
    def beats(self) -> int:
        return len(self.history)

    @property
    def last(self) -> HeartbeatRecord | None:
        return self.history[-1] if self.history else None

    def alive(self, within: float | None = None) -> bool:
        """Did the guest answer a heartbeat in the last ``within`` seconds (default 2 intervals)?"""
        last = self.last
        window = 2 * self.interval if within is None else within
        return last is not None and last.ok and self.now() - last.replied_at <= window

    def on_negotiated(self) -> None:
        self._outstanding = None
        self.later(0.0, self._tick)

    def on_channel_closed(self) -> None:
        self._outstanding = None

    def _tick(self) -> None:
        if self._outstanding is not None:
            self.missed += 1
            self._event("ic.heartbeat", result="missed", seq=self._outstanding)
            self.next_seq = (self._outstanding + 1) & 0xFFFFFFFFFFFFFFFF
        seq = self.next_seq
        self._outstanding = seq
        sent_at = self.now()
        if not self.send_request(
            ic.ICMSGTYPE_HEARTBEAT, ic.build_heartbeat(seq), lambda msg: self._reply(seq, sent_at, msg)
        ):
            self._outstanding = None
        self.later(self.interval, self._tick)

    def _reply(self, seq: int, sent_at: float, msg: ic.IcMessage) -> None:
        reply = ic.parse_heartbeat(msg.body)
        record = HeartbeatRecord(seq, reply, sent_at, self.now())
        self.history.append(record)
        if self._outstanding == seq:
            self._outstanding = None
        if record.ok:
            self.next_seq = reply
        else:
            self.bad_replies += 1
            self.next_seq = (seq + 1) & 0xFFFFFFFFFFFFFFFF
            if self.channel is not None:
                self.channel.report_violation("seq_num", reply, f"expected {seq + 1}", message="ic")


@dataclass(frozen=True)
class ShutdownResult:
    flags: int
    status: int

    @property
    def accepted(self) -> bool:
        return self.status == ic.HV_S_OK


class ShutdownDevice(IcDevice):
    """Shutdown IC: ``request_shutdown()`` asks hv_utils to power off (or reboot / hibernate); the
    guest answers S_OK and runs orderly_poweroff(). A request made before negotiation completes is
    sent right after it. ``results`` records the guest's answers."""

    class_guid = vm.ClassGuid.SHUTDOWN
    name = "shutdown"
    service_versions = ic.SHUTDOWN_VERSIONS

    def __init__(self, instance_guid: vm.GuidLike | None = None, *, scheduler: Scheduler, **kw: Any) -> None:
        super().__init__(instance_guid, scheduler=scheduler, **kw)
        self.results: list[ShutdownResult] = []
        self.on_result: Callable[[ShutdownResult], None] | None = None
        self._queued: list[bytes] = []
        self.requested = 0

    def request_shutdown(
        self,
        *,
        reboot: bool = False,
        hibernate: bool = False,
        force: bool = False,
        reason_code: int = 0,
        timeout_seconds: int = 0,
        message: str = "",
    ) -> bool:
        """Ask the guest to shut down. Returns False if no channel is open (the guest has no hv_utils
        bound yet); True when sent, or queued until negotiation finishes."""
        flags = (ic.SHUTDOWN_FLAG_RESTART if reboot else 0) | (ic.SHUTDOWN_FLAG_HIBERNATE if hibernate else 0)
        flags |= ic.SHUTDOWN_FLAG_FORCE if force else 0
        body = ic.build_shutdown(
            flags, reason_code=reason_code, timeout_seconds=timeout_seconds, display_message=message
        )
        server = self.server
        if server is None:
            return False
        with server.lock:
            if self.channel is None or not self.channel.is_open:
                return False
            self.requested += 1
            self._event("ic.shutdown", action="request", flags=flags)
            if not self.negotiated:
                self._queued.append(body)
                return True
            return self._send(body)

    def _send(self, body: bytes) -> bool:
        flags = ic.parse_shutdown(body).flags
        return self.send_request(ic.ICMSGTYPE_SHUTDOWN, body, lambda msg: self._reply(flags, msg))

    def on_negotiated(self) -> None:
        queued, self._queued = self._queued, []
        for body in queued:
            self._send(body)

    def on_channel_closed(self) -> None:
        self._queued.clear()

    def _reply(self, flags: int, msg: ic.IcMessage) -> None:
        result = ShutdownResult(flags, msg.header.status)
        self.results.append(result)
        self._event("ic.shutdown", action="reply", flags=flags, status=msg.header.status)
        if self.on_result is not None:
            self.on_result(result)


class TimeSyncDevice(IcDevice):
    """TimeSync IC: right after negotiation a SYNC sample (hv_utils steps the guest clock to it), then
    a SAMPLE every ``interval`` seconds for the guest's "hyperv" PTP clock, as Hyper-V does.

    ``wall_clock`` gives the host time to send (Unix seconds; tests shift it to see the guest follow);
    ``reference_counter`` gives the partition reference counter (100 ns, the platform's
    HV_X64_MSR_TIME_REF_COUNT) that v4 samples carry so the guest can correct for delivery delay.
    """

    class_guid = vm.ClassGuid.TIMESYNC
    name = "timesync"
    service_versions = ic.TIMESYNC_VERSIONS

    def __init__(
        self,
        instance_guid: vm.GuidLike | None = None,
        *,
        scheduler: Scheduler,
        reference_counter: Callable[[], int],
        wall_clock: Callable[[], float] | None = None,
        interval: float = 5.0,
        **kw: Any,
    ) -> None:
        super().__init__(instance_guid, scheduler=scheduler, **kw)
        import time

        self.reference_counter = reference_counter
        self.wall_clock = wall_clock or time.time
        self.interval = interval
        self.samples_sent = 0
        self.samples_acked = 0

    def on_negotiated(self) -> None:
        self.later(0.0, lambda: self._send(ic.ICTIMESYNCFLAG_SYNC))

    def sync_now(self) -> bool:
        """Send a SYNC sample now (the guest steps its clock). False if the channel is not ready."""
        server = self.server
        if server is None:
            return False
        with server.lock:
            return self.negotiated and self._send(ic.ICTIMESYNCFLAG_SYNC, periodic=False)

    def _send(self, flags: int, periodic: bool = True) -> bool:
        sample = ic.TimeSample(ic.unix_to_parenttime(self.wall_clock()), flags, self.reference_counter())
        ok = self.send_request(
            ic.ICMSGTYPE_TIMESYNC, ic.build_timesync(self.srv_version or 0, sample), self._acked
        )
        if ok:
            self.samples_sent += 1
        if periodic:
            self.later(self.interval, lambda: self._send(ic.ICTIMESYNCFLAG_SAMPLE))
        return ok

    def _acked(self, msg: ic.IcMessage) -> None:
        self.samples_acked += 1

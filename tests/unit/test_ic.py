"""Integration components: message layouts (vs. include/linux/hyperv.h), the hv_utils negotiation rules,
and the Heartbeat / Shutdown devices driven through the VMBus server by a model of hv_utils."""

from __future__ import annotations

import struct

import pytest

from hvlab.devices.ic import HeartbeatDevice, ShutdownDevice
from hvlab.protocol import ic
from hvlab.protocol import vmbus as vm
from hvlab.protocol import vmbus_packet as vp
from hvlab.timeline import MemoryTimeline
from hvlab.vmbus.loop import ManualLoop
from hvlab.vmbus.testing import Bus, HvUtilsModel, make_bus

# Layouts ------------------------------------------------------------------------------------------


def test_header_layout_matches_linux() -> None:
    msg = ic.build_ic_message(
        ic.ICMSGTYPE_HEARTBEAT,
        ic.build_heartbeat(0x1122334455667788),
        fw_version=ic.ic_version(3, 0),
        msg_version=ic.ic_version(3, 1),
        transaction_id=0x1AB,
    )
    assert ic.ICMSG_HDR == 28 and len(msg) == 28 + ic.HEARTBEAT_MSG_SIZE
    pipe_flags, pipe_size = struct.unpack_from("<II", msg, 0)
    assert pipe_flags == 0 and pipe_size == 20 + 40
    assert struct.unpack_from("<HH", msg, 8) == (3, 0)  # icverframe
    assert struct.unpack_from("<H", msg, 12) == (ic.ICMSGTYPE_HEARTBEAT,)
    assert struct.unpack_from("<HH", msg, 14) == (3, 1)  # icvermsg
    assert struct.unpack_from("<H", msg, 18) == (40,)  # icmsgsize
    assert struct.unpack_from("<I", msg, 20) == (0,)  # status
    assert msg[24] == 0xAB and msg[25] == ic.ICMSGHDRFLAG_TRANSACTION | ic.ICMSGHDRFLAG_REQUEST
    assert struct.unpack_from("<Q", msg, 28) == (0x1122334455667788,)
    parsed = ic.parse_ic_message(msg)
    assert (
        parsed.header.msgtype == 1 and parsed.header.fw_version == 0x30000 and not parsed.header.is_response
    )
    assert ic.parse_heartbeat(parsed.body) == 0x1122334455667788


def test_negotiate_and_shutdown_bodies() -> None:
    body = ic.build_negotiate([0x30000], [0x30002, 0x10000])
    assert body[:8] == struct.pack("<HHI", 1, 2, 0) and body[8:] == struct.pack("<HHHHHH", 3, 0, 3, 2, 1, 0)
    assert ic.parse_negotiate(body) == ic.Negotiate([0x30000], [0x30002, 0x10000])
    with pytest.raises(ic.IcError):
        ic.parse_negotiate(struct.pack("<HHI", 5, 5, 0))
    sd = ic.build_shutdown(ic.SHUTDOWN_FLAG_RESTART, reason_code=7, timeout_seconds=30, display_message="bye")
    assert len(sd) == ic.SHUTDOWN_MSG_SIZE == 2060
    parsed = ic.parse_shutdown(sd)
    assert (parsed.flags, parsed.reason_code, parsed.timeout_seconds) == (2, 7, 30)
    assert parsed.display_message.startswith("bye".encode("utf-16-le"))
    with pytest.raises(ic.IcError):
        ic.parse_shutdown(sd[:100])
    with pytest.raises(ic.IcError):
        ic.parse_ic_message(bytes(27))
    with pytest.raises(ValueError):
        ic.build_ic_message(ic.ICMSGTYPE_SHUTDOWN, bytes(5000), fw_version=0, msg_version=0)


def test_guest_negotiation_rules() -> None:
    request = ic.build_ic_message(
        ic.ICMSGTYPE_NEGOTIATE,
        ic.build_negotiate([0x10000, 0x30000], [0x10000, 0x30000]),
        fw_version=0x10000,
        msg_version=0x10000,
    )
    out, fw, srv = ic.guest_negotiate_response(request, ic.FRAMEWORK_VERSIONS, ic.HEARTBEAT_VERSIONS)
    assert (fw, srv) == (0x30000, 0x30000)  # the guest's own order decides, not the host's
    reply = ic.parse_ic_message(out)
    assert reply.header.is_response and reply.header.msgsize == 0x10
    assert ic.parse_negotiate(reply.body[:16]) == ic.Negotiate([0x30000], [0x30000])
    none = ic.build_ic_message(
        ic.ICMSGTYPE_NEGOTIATE,
        ic.build_negotiate([0x30000], [0x20000]),
        fw_version=0x10000,
        msg_version=0x10000,
    )
    out, fw, srv = ic.guest_negotiate_response(none, ic.FRAMEWORK_VERSIONS, ic.HEARTBEAT_VERSIONS)
    assert fw is None and srv is None and struct.unpack_from("<HH", out, 28) == (0, 0)
    hb = ic.build_ic_message(
        ic.ICMSGTYPE_HEARTBEAT, ic.build_heartbeat(41), fw_version=0x30000, msg_version=0x30000
    )
    assert ic.parse_heartbeat(ic.parse_ic_message(ic.guest_heartbeat_response(hb)).body) == 42
    for flags, action in (
        (0, "poweroff"),
        (1, "poweroff"),
        (2, "reboot"),
        (3, "reboot"),
        (4, None),
        (8, None),
    ):
        sd = ic.build_ic_message(
            ic.ICMSGTYPE_SHUTDOWN, ic.build_shutdown(flags), fw_version=0x30000, msg_version=0x30002
        )
        out, got = ic.guest_shutdown_response(sd)
        assert got == action
        assert ic.parse_ic_message(out).header.status == (ic.HV_S_OK if action else ic.HV_E_FAIL)


# Devices over the bus ---------------------------------------------------------------------------------


def ic_bus(
    flavour: str = "6.12", **kw: object
) -> tuple[Bus, ManualLoop, HeartbeatDevice, ShutdownDevice, HvUtilsModel, HvUtilsModel]:
    loop = ManualLoop()
    hb = HeartbeatDevice(scheduler=loop, interval=2.0)
    sd = ShutdownDevice(scheduler=loop)
    bus = make_bus([hb, sd], flavour=flavour, **kw)  # type: ignore[arg-type]
    bus.connect()
    g_hb = bus.guest.open_channel(
        bus.guest.find_channels(vm.ClassGuid.HEARTBEAT)[0].relid, send_pages=4, recv_pages=4
    )
    g_sd = bus.guest.open_channel(
        bus.guest.find_channels(vm.ClassGuid.SHUTDOWN)[0].relid, send_pages=4, recv_pages=4
    )
    m_hb, m_sd = HvUtilsModel(g_hb, "heartbeat"), HvUtilsModel(g_sd, "shutdown")
    settle(bus, loop)
    return bus, loop, hb, sd, m_hb, m_sd


def settle(bus: Bus, loop: ManualLoop) -> None:
    for _ in range(5):
        loop.run_pending()
        bus.run()


def tick(bus: Bus, loop: ManualLoop, seconds: float) -> None:
    loop.advance(seconds)
    settle(bus, loop)


@pytest.mark.parametrize("flavour", ["6.1", "6.12", "7.3"])
def test_negotiation_with_each_kernel(flavour: str) -> None:
    bus, loop, hb, sd, m_hb, m_sd = ic_bus(flavour)
    assert (hb.fw_version, hb.srv_version) == (ic.UTIL_FW_VERSION, ic.ic_version(3, 0)) == m_hb.negotiated
    assert (sd.fw_version, sd.srv_version) == (ic.UTIL_FW_VERSION, ic.ic_version(3, 2)) == m_sd.negotiated
    assert not bus.server.violations and not bus.guest.warnings


def test_heartbeat_sequence_advances() -> None:
    bus, loop, hb, _, m_hb, _ = ic_bus()
    assert hb.beats == 1 and hb.last is not None and hb.last.ok  # first beat right after negotiation
    for _ in range(5):
        tick(bus, loop, 2.0)
    assert [(r.sent, r.reply) for r in hb.history] == [(i, i + 1) for i in range(6)]
    assert m_hb.heartbeats == list(range(6)) and hb.missed == 0 and hb.alive()
    requests = [m for m in m_hb.requests if m.header.msgtype == ic.ICMSGTYPE_HEARTBEAT]
    assert all(m.header.fw_version == 0x30000 and m.header.msg_version == 0x30000 for m in requests)


def test_heartbeat_missed_when_guest_is_silent_and_resumes() -> None:
    bus, loop, hb, _, m_hb, _ = ic_bus()
    m_hb.enabled = False
    tick(bus, loop, 2.0)
    tick(bus, loop, 2.0)
    assert hb.missed == 1 and not hb.alive(within=1.0)
    m_hb.enabled = True
    m_hb.process()  # hv_utils catches up: both stale requests are answered late
    tick(bus, loop, 2.0)
    assert hb.last is not None and hb.last.ok and hb.alive() and not bus.server.violations
    assert [r.sent for r in hb.history][-1] > 2


def test_heartbeat_stops_when_the_channel_closes() -> None:
    bus, loop, hb, _, m_hb, _ = ic_bus()
    m_hb.channel.close()
    beats = hb.beats
    tick(bus, loop, 10.0)
    assert hb.beats == beats and hb.channel is None and not bus.server.violations


def test_bad_heartbeat_reply_is_a_violation() -> None:
    bus, loop, hb, _, m_hb, _ = ic_bus()
    m_hb.respond = lambda payload: payload[:20]  # type: ignore[method-assign]  # truncated answer
    tick(bus, loop, 2.0)
    assert bus.server.violations[-1].message == "ic" and bus.server.violations[-1].field == "length"
    m_hb.respond = lambda payload: bytes(payload)  # type: ignore[method-assign]  # echoes a request
    tick(bus, loop, 2.0)
    assert bus.server.violations[-1].field == "icmsgtype"


def test_shutdown_request_delivered() -> None:
    timeline = MemoryTimeline()
    bus, loop, _, sd, _, m_sd = ic_bus(timeline=timeline)
    results = []
    sd.on_result = results.append
    assert sd.request_shutdown()
    settle(bus, loop)
    assert m_sd.actions == ["poweroff"] and sd.results == results and results[0].accepted
    assert sd.request_shutdown(reboot=True, force=True)
    settle(bus, loop)
    assert m_sd.actions == ["poweroff", "reboot"] and sd.results[-1].flags == 3
    assert sd.request_shutdown(hibernate=True)
    settle(bus, loop)
    assert not sd.results[-1].accepted  # no hibernation support in the guest: E_FAIL
    shutdown_events = [e for e in timeline.of_kind("ic.shutdown") if e["action"] == "reply"]
    assert [e["status"] for e in shutdown_events] == [0, 0, ic.HV_E_FAIL]


def test_back_to_back_shutdown_requests_each_interrupt() -> None:
    bus, loop, _, sd, _, m_sd = ic_bus()
    assert sd.request_shutdown() and sd.request_shutdown(reboot=True)
    settle(bus, loop)  # hv_utils reads one packet per interrupt: the second needs its own signal
    assert m_sd.actions == ["poweroff", "reboot"] and len(sd.results) == 2


def test_shutdown_before_negotiation_is_queued_and_refused_when_closed() -> None:
    loop = ManualLoop()
    sd = ShutdownDevice(scheduler=loop, negotiate_delay=1.0)
    bus = make_bus([sd])
    assert not sd.request_shutdown()  # not even offered
    bus.connect()
    ch = bus.guest.open_channel(1, send_pages=4, recv_pages=4)
    model = HvUtilsModel(ch, "shutdown")
    assert sd.request_shutdown()
    settle(bus, loop)
    assert not model.actions and not sd.negotiated
    tick(bus, loop, 1.0)
    assert sd.negotiated and model.actions == ["poweroff"]


def test_negotiation_failure_is_recorded() -> None:
    loop = ManualLoop()
    hb = HeartbeatDevice(scheduler=loop)
    hb.service_versions = (ic.ic_version(9, 9),)  # type: ignore[misc]
    bus = make_bus([hb])
    bus.connect()
    HvUtilsModel(bus.guest.open_channel(1, send_pages=4, recv_pages=4), "heartbeat")
    settle(bus, loop)
    assert hb.negotiation_failed and not hb.negotiated and hb.beats == 0


def test_wrong_sequence_and_unsolicited_ic_packets_are_violations() -> None:
    bus, loop, hb, _, m_hb, _ = ic_bus()

    def wrong_seq(payload: bytes) -> bytes:
        out = bytearray(ic.guest_heartbeat_response(payload))
        out[28] ^= 0x40
        return bytes(out)

    m_hb.respond = wrong_seq  # type: ignore[method-assign]
    tick(bus, loop, 2.0)
    assert hb.bad_replies == 1 and bus.server.violations[-1].field == "seq_num"
    m_hb.channel.send_inband(bytes(40), trans_id=0xDEAD)  # the guest never speaks first
    m_hb.channel.send_packet(vp.build_completion(b"", 5))
    assert [v.field for v in bus.server.violations[-2:]] == ["trans_id", "type"]


# TimeSync ----------------------------------------------------------------------------------------


def test_timesync_layouts_are_the_packed_kernel_structs() -> None:
    sample = ic.TimeSample(ic.unix_to_parenttime(1_700_000_000.5), ic.ICTIMESYNCFLAG_SYNC, 123456789)
    v4 = ic.build_timesync(ic.TIMESYNC_V4, sample)
    assert len(v4) == ic.TIMESYNC_V4_SIZE == 22
    assert v4[:8] == (17_000_000_005_000_000 + ic.WLTIMEDELTA).to_bytes(8, "little")
    assert v4[8:16] == (123456789).to_bytes(8, "little") and v4[16] == 1
    v3 = ic.build_timesync(ic.ic_version(3, 0), sample)
    assert len(v3) == ic.TIMESYNC_V3_SIZE == 25 and v3[24] == 1 and v3[8:24] == bytes(16)
    assert ic.parse_timesync(ic.TIMESYNC_V4, v4) == sample
    assert ic.parse_timesync(ic.ic_version(3, 0), v3).parenttime == sample.parenttime
    with pytest.raises(ic.IcError):
        ic.parse_timesync(ic.TIMESYNC_V4, v4[:21])


def test_timesync_syncs_then_samples_periodically() -> None:
    from hvlab.devices.ic import TimeSyncDevice

    loop = ManualLoop()
    ref = [1000]
    ts = TimeSyncDevice(scheduler=loop, reference_counter=lambda: ref[0], wall_clock=lambda: 86400.0, interval=5.0)
    bus = make_bus([ts])
    bus.connect()
    g = bus.guest.open_channel(bus.guest.find_channels(vm.ClassGuid.TIMESYNC)[0].relid, send_pages=4, recv_pages=4)
    model = HvUtilsModel(g, "timesync")
    settle(bus, loop)
    assert model.negotiated == (ic.UTIL_FW_VERSION, ic.TIMESYNC_V4) and ts.srv_version == ic.TIMESYNC_V4
    ref[0] = 2000
    tick(bus, loop, 5.0)
    tick(bus, loop, 5.0)
    assert [s.flags for s in model.samples] == [ic.ICTIMESYNCFLAG_SYNC] + [ic.ICTIMESYNCFLAG_SAMPLE] * 2
    assert model.samples[0].parenttime == ic.unix_to_parenttime(86400.0)
    assert [s.vmreferencetime for s in model.samples] == [1000, 2000, 2000]
    assert ts.samples_sent == ts.samples_acked == 3
    assert not bus.server.violations

"""netvsp against a hostile guest: truncated and misdirected NVSP messages, bogus buffers, sections,
GPADLs and PFNs, malformed RNDIS (lengths, offsets, PPIs), stray completions, and random fuzz.

Every case must end in a counted protocol violation naming the field, a completion for every packet
that asked for one (the real guest would wait forever otherwise), no exception, and a device that still
works afterwards."""

from __future__ import annotations

import logging
import random
import struct

import pytest

from hvlab.protocol import nvsp, rndis
from hvlab.protocol import vmbus_packet as vp
from hvlab.vmbus.guest_model import GuestChannel
from hvlab.vmbus.netvsc_model import NetvscTestbed, make_testbed

MAC = bytes.fromhex("00155d000001")
PEER = bytes.fromhex("020000000002")
FRAME_TO_GUEST = MAC + PEER + b"\x88\xb5" + bytes(46)
FRAME_FROM_GUEST = PEER + MAC + b"\x88\xb5" + bytes(46)


def raw_testbed(**kw: object) -> tuple[NetvscTestbed, GuestChannel]:
    tb = make_testbed(**kw)  # type: ignore[arg-type]
    ch = tb.netvsc.primary
    for c in tb.netvsc.channels:
        c.on_event = None  # the test reads the rings itself
    return tb, ch


def exchange(tb: NetvscTestbed, ch: GuestChannel, packet_tid: int | None) -> bytes | None:
    """Let the host run, then return the payload of the completion for ``packet_tid`` (None if none)."""
    tb.bus.synic.pump()
    found = None
    for pkt in ch.receive():
        if pkt.type == vp.PacketType.COMP and pkt.trans_id == packet_tid:
            found = bytes(pkt.payload[: (pkt.len8 - pkt.offset8) * 8])
    return found


def request(tb: NetvscTestbed, ch: GuestChannel, payload: bytes) -> bytes | None:
    return exchange(tb, ch, ch.send_inband(payload, completion_requested=True))


def last(tb: NetvscTestbed) -> tuple[str, str]:
    v = tb.bus.server.violations[-1]
    assert "netvsp0" in v.detail
    return v.message, v.field


def still_works(tb: NetvscTestbed) -> None:
    """Re-attach the guest (as after an MTU change) and move one frame each way."""
    g = tb.netvsc
    for c in g.channels:
        c.on_event = g._on_interrupt
    g.poll()
    g.change_mtu(1500)
    assert tb.device.deliver(FRAME_TO_GUEST) is None
    g.send(FRAME_FROM_GUEST)
    tb.settle()
    g.wait_tx_idle()
    assert g.rx[-1].frame == FRAME_TO_GUEST and tb.port.sent[-1] == FRAME_FROM_GUEST


@pytest.mark.parametrize(
    "mtype, short_len, expected_type",
    [
        (nvsp.MsgType.INIT, 8, nvsp.MsgType.INIT_COMPLETE),
        (nvsp.MsgType.SEND_RECV_BUF, 8, nvsp.MsgType.SEND_RECV_BUF_COMPLETE),
        (nvsp.MsgType.SEND_SEND_BUF, 8, nvsp.MsgType.SEND_SEND_BUF_COMPLETE),
        (nvsp.MsgType.SUBCHANNEL, 8, nvsp.MsgType.SUBCHANNEL),
        (nvsp.MsgType.SEND_RNDIS_PKT, 8, nvsp.MsgType.SEND_RNDIS_PKT_COMPLETE),
        (nvsp.MsgType.SEND_NDIS_CONFIG, 16, None),
        (nvsp.MsgType.SWITCH_DATA_PATH, 4, None),
    ],
)
def test_truncated_nvsp_messages_fail_with_a_completion(
    mtype: int, short_len: int, expected_type: int | None
) -> None:
    tb, ch = raw_testbed()
    before = tb.device.counters["violations"]
    payload = struct.pack("<I", mtype) + bytes(short_len - 4)
    completion = request(tb, ch, payload)
    assert completion is not None
    if mtype == nvsp.MsgType.SWITCH_DATA_PATH:
        # 4 bytes padded to 8 still carry active_datapath = 0: valid, and a bare completion.
        assert completion == b"" and tb.device.counters["violations"] == before
    else:
        assert last(tb) == ("nvsp", "length") and tb.device.counters["violations"] == before + 1
        if expected_type is None:
            assert completion == b""
        else:
            assert struct.unpack_from("<I", completion)[0] == expected_type
            status_at = 12 if expected_type == nvsp.MsgType.INIT_COMPLETE else 4
            assert struct.unpack_from("<I", completion, status_at)[0] == nvsp.Status.FAIL
    still_works(tb)


def test_unknown_and_misdirected_nvsp_messages() -> None:
    tb, ch = raw_testbed()
    assert request(tb, ch, struct.pack("<I", 999) + bytes(36)) == b""
    assert last(tb) == ("nvsp", "msg_type")
    assert (
        request(
            tb, ch, nvsp.build(nvsp.INIT_COMPLETE, negotiated_protocol_ver=1, max_mdl_chain_len=0, status=1)
        )
        == b""
    )
    assert last(tb) == ("nvsp", "msg_type")
    ch.send_inband(nvsp.rndis_pkt_complete())  # a host-to-guest completion type sent as a request
    exchange(tb, ch, None)
    assert last(tb) == ("nvsp", "msg_type")
    tid = ch._alloc_trans_id()  # a registered request id for a raw packet
    ch.send_packet(vp.build_packet(vp.PacketType.SYNCH, bytes(40), tid, 1))
    assert exchange(tb, ch, tid) == b"" and last(tb) == ("nvsp", "type")
    ch.send_inband(nvsp.build(nvsp.SEND_RECV_BUF, gpadl_handle=1, id=0xCAFE))  # no completion requested
    exchange(tb, ch, None)
    assert last(tb) == ("nvsp", "flags")
    still_works(tb)


def test_control_messages_on_a_sub_channel_are_refused() -> None:
    tb, _ = raw_testbed(cpus=2)
    sub = tb.netvsc.channels[1]
    completion = request(tb, sub, nvsp.build(nvsp.INIT, min_protocol_ver=0x60001, max_protocol_ver=0x60001))
    assert completion is not None and struct.unpack_from("<I", completion, 12)[0] == nvsp.Status.FAIL
    assert last(tb) == ("nvsp", "msg_type")
    still_works(tb)


def test_bogus_buffers_and_gpadls() -> None:
    tb, ch = raw_testbed()
    g = tb.netvsc

    def status_of(completion: bytes | None) -> int:
        assert completion is not None
        return int(struct.unpack_from("<I", completion, 4)[0])

    already = request(tb, ch, nvsp.build(nvsp.SEND_RECV_BUF, gpadl_handle=g.recv_gpadl or 0, id=0xCAFE))
    assert status_of(already) == nvsp.Status.FAIL and last(tb) == ("nvsp", "gpadl_handle")
    ch.send_inband(nvsp.build(nvsp.REVOKE_RECV_BUF, id=0xCAFE))
    ch.send_inband(nvsp.build(nvsp.REVOKE_SEND_BUF, id=0))
    for struct_, ident in ((nvsp.SEND_RECV_BUF, 0xCAFE), (nvsp.SEND_SEND_BUF, 0)):
        missing = request(tb, ch, nvsp.build(struct_, gpadl_handle=0xDEAD, id=ident))
        assert status_of(missing) == nvsp.Status.FAIL and last(tb) == ("nvsp", "gpadl_handle")
        ring = request(tb, ch, nvsp.build(struct_, gpadl_handle=ch.ring_gpadl or 0, id=ident))
        assert status_of(ring) == nvsp.Status.FAIL and last(tb) == ("nvsp", "gpadl_handle")
    assert tb.device.deliver(FRAME_TO_GUEST) == "not-ready"
    ok = request(tb, ch, nvsp.build(nvsp.SEND_RECV_BUF, gpadl_handle=g.recv_gpadl or 0, id=0xBEEF))
    assert status_of(ok) == nvsp.Status.SUCCESS and last(tb) == ("nvsp", "id")  # wrong id: reported, accepted
    same = request(tb, ch, nvsp.build(nvsp.SEND_SEND_BUF, gpadl_handle=g.recv_gpadl or 0, id=0))
    assert status_of(same) == nvsp.Status.FAIL and last(tb) == ("nvsp", "gpadl_handle")
    still_works(tb)


def test_bad_send_sections_and_pfns() -> None:
    tb, ch = raw_testbed()
    g = tb.netvsc

    def status(completion: bytes | None) -> int:
        assert completion is not None and struct.unpack_from("<I", completion)[0] == 108
        return int(struct.unpack_from("<I", completion, 4)[0])

    assert status(request(tb, ch, nvsp.rndis_pkt(0, 999, 100))) == nvsp.Status.FAIL
    assert last(tb) == ("nvsp", "send_buf_section_index")
    assert status(request(tb, ch, nvsp.rndis_pkt(0, 0, 7000))) == nvsp.Status.FAIL
    assert last(tb) == ("nvsp", "send_buf_section_size")
    assert status(request(tb, ch, nvsp.rndis_pkt(0, nvsp.NO_SECTION, 0))) == nvsp.Status.FAIL
    assert last(tb) == ("nvsp", "send_buf_section_index")
    outside = tb.bus.guest.memory.num_pages + 10
    tid = ch.send_gpa_direct([vp.GpaRange(100, 0, (outside,))], nvsp.rndis_pkt(0))
    assert status(exchange(tb, ch, tid)) == nvsp.Status.FAIL and last(tb) == ("nvsp", "pfn")
    # Garbage RNDIS in a section: msg_len smaller than a header, then a bad PPI.
    g._write_section(0, struct.pack("<II", 1, 3) + bytes(40))
    assert status(request(tb, ch, nvsp.rndis_pkt(0, 0, 48))) == nvsp.Status.INVALID_RNDIS_PKT
    assert last(tb) == ("rndis", "msg_len")
    bad_ppi = bytearray(rndis.build_packet(FRAME_FROM_GUEST, [rndis.ppi_u32(0, 0)]))
    bad_ppi[44:48] = struct.pack("<I", 4000)
    g._write_section(0, bytes(bad_ppi))
    assert status(request(tb, ch, nvsp.rndis_pkt(0, 0, len(bad_ppi)))) == nvsp.Status.INVALID_RNDIS_PKT
    assert last(tb) == ("rndis", "ppi.size") and tb.port.sent == []
    # One good and one bad packet in a batch: the good one still goes out.
    good = rndis.build_packet(FRAME_FROM_GUEST, alignment=8)
    g._write_section(0, good + bytes(bad_ppi))
    assert (
        status(request(tb, ch, nvsp.rndis_pkt(0, 0, len(good) + len(bad_ppi))))
        == nvsp.Status.INVALID_RNDIS_PKT
    )
    assert tb.port.sent == [FRAME_FROM_GUEST] and tb.device.drops["tx_drop.malformed"] == 2
    still_works(tb)


def test_malformed_rndis_control_is_answered_and_reported() -> None:
    tb = make_testbed()
    g = tb.netvsc
    query = bytearray(rndis.build_query(900, rndis.Oid.GEN_LINK_SPEED, b"abcd"))
    query[20:24] = struct.pack("<I", 500)  # info_buf_offset beyond the message
    g._send_rndis(bytes(query))
    g._wait(lambda: 900 in g._rndis_responses, "QUERY_C")
    resp = rndis.QUERY_C.parse(g._rndis_responses.pop(900)[:24])
    assert resp.status == rndis.STATUS_INVALID_DATA and resp.info_buflen == 0
    assert last(tb) == ("rndis", "info_buf_offset")
    g._send_rndis(struct.pack("<III", rndis.MSG_INIT, 12, 901))  # INIT without its body
    g._wait(lambda: 901 in g._rndis_responses, "INIT_C")
    assert rndis.parse(g._rndis_responses.pop(901), rndis.RESPONSES).status == rndis.STATUS_FAILURE
    assert last(tb) == ("rndis", "msg_len")
    g._send_rndis(struct.pack("<III", rndis.MSG_RESET, 12, 0))  # never sent by Linux
    g.wait_tx_idle()
    assert last(tb) == ("rndis", "ndis_msg_type")
    bad_filter = rndis.build_set(902, rndis.Oid.GEN_CURRENT_PACKET_FILTER, b"\x01")
    g._send_rndis(bad_filter)
    g._wait(lambda: 902 in g._rndis_responses, "SET_C")
    assert last(tb) == ("rndis", "info_buflen")
    bad_rss = rndis.build_set(
        903, rndis.Oid.GEN_RECEIVE_SCALE_PARAMETERS, rndis.build_rss_params(0, [0] * 4, bytes(40))[:60]
    )
    g._send_rndis(bad_rss)
    g._wait(lambda: 903 in g._rndis_responses, "SET_C")
    assert last(tb) == ("rndis", "hashkey_offset")
    assert tb.device.counters["violations"] == 5
    assert tb.device.deliver(FRAME_TO_GUEST) is None
    tb.settle()
    assert g.rx[-1].frame == FRAME_TO_GUEST


def test_stray_receive_completions() -> None:
    tb, ch = raw_testbed()
    ch.complete(0xABCDEF, nvsp.rndis_pkt_complete(1, size=8))
    exchange(tb, ch, None)
    assert last(tb) == ("nvsp", "trans_id")
    assert tb.device.deliver(FRAME_TO_GUEST) is None
    tb.bus.synic.pump()
    xfer = [p for p in ch.receive() if p.type == vp.PacketType.DATA_USING_XFER_PAGES]
    assert len(xfer) == 1
    free = len(tb.device._recv.free)  # type: ignore[union-attr]
    ch.complete(xfer[0].trans_id, b"\x07")  # not {108, status}: reported, sections still returned
    exchange(tb, ch, None)
    assert last(tb) == ("nvsp", "msg_type") and len(tb.device._recv.free) == free + 1  # type: ignore[union-attr]
    ch.complete(xfer[0].trans_id, nvsp.rndis_pkt_complete(1, size=8))  # twice
    exchange(tb, ch, None)
    assert last(tb) == ("nvsp", "trans_id")
    still_works(tb)


def test_random_fuzz_never_raises_or_leaves_a_request_uncompleted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="hvlab")
    tb, ch = raw_testbed(cpus=2)
    rng = random.Random(20261124)
    types = [int(t) for t in nvsp.MsgType] + [0, 3, 0xFFFFFFFF]
    pages = tb.bus.guest.memory.num_pages
    for i in range(400):
        body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 60)))
        if rng.random() < 0.5:
            mtype = rng.choice(types)
            if mtype == nvsp.MsgType.SEND_RNDIS_PKT and rng.random() < 0.7:
                body = struct.pack(
                    "<III",
                    rng.randrange(2),
                    rng.choice([0, 1, 5, 200, nvsp.NO_SECTION]),
                    rng.randrange(0, 7000),
                )
            payload = struct.pack("<I", mtype) + body
        else:
            payload = body
        if rng.random() < 0.3:
            pfn = rng.choice([rng.randrange(16, pages), pages + rng.randrange(100)])
            length = rng.randrange(1, 9000)
            rng_range = vp.GpaRange(length, 0, tuple(range(pfn, pfn + vp.GpaRange.pfn_count(length, 0))))
            tid = ch.send_gpa_direct([rng_range], payload or b"\0")
        else:
            tid = ch.send_inband(payload, completion_requested=True)
        assert exchange(tb, ch, tid) is not None, f"iteration {i}: no completion for {payload[:16].hex()}"
        if rng.random() < 0.1:
            tb.device.deliver(FRAME_TO_GUEST)
    assert not ch.outstanding
    assert tb.device.counters["violations"] > 100
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and "hvlab" in r.name]
    assert not tb.timeline.of_kind("vmbus.device_error")
    still_works(tb)

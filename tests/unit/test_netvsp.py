"""netvsp (host side of hv_netvsc) against the guest-side netvsc model on the VMBus guest model:
the §3.3 handshake per kernel flavour, receive and send paths, vRSS, link, VF data path, MTU change."""

from __future__ import annotations

import socket
import struct

import pytest

from hvlab.devices.netvsp import NetvspDevice
from hvlab.devices.netvsp_rx import rss_input, toeplitz
from hvlab.protocol import nvsp, rndis
from hvlab.protocol import vmbus as vm
from hvlab.vmbus.guest_model import GuestHang
from hvlab.vmbus.netvsc_model import NetvscTestbed, make_testbed

MAC = bytes.fromhex("00155d000001")
PEER = bytes.fromhex("020000000002")
BCAST = b"\xff" * 6


def eth(dst: bytes, src: bytes = PEER, payload: bytes = bytes(46), ethertype: int = 0x0800) -> bytes:
    return dst + src + struct.pack(">H", ethertype) + payload


def tcp4(sip: str, dip: str, sport: int, dport: int, dst: bytes = MAC) -> bytes:
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, socket.inet_aton(sip), socket.inet_aton(dip)
    )
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, 0x02, 8192, 0, 0)
    return eth(dst, payload=ip + tcp + bytes(6))


def clean(tb: NetvscTestbed) -> None:
    assert tb.bus.server.violations == [] and tb.bus.guest.warnings == []
    assert tb.device.counters["violations"] == 0


def nvsp_events(tb: NetvscTestbed) -> list[str]:
    return [e["msg"] for e in tb.timeline.of_kind("netvsp.nvsp")]


PROBE_OIDS = [
    ("query", rndis.Oid.GEN_MAXIMUM_FRAME_SIZE),
    ("query", rndis.Oid.OID_802_3_PERMANENT_ADDRESS),
    ("query", rndis.Oid.GEN_FRIENDLY_NAME),
    ("query", rndis.Oid.TCP_OFFLOAD_HARDWARE_CAPABILITIES),
    ("set", rndis.Oid.TCP_OFFLOAD_PARAMETERS),
    ("query", rndis.Oid.GEN_MEDIA_CONNECT_STATUS),
    ("query", rndis.Oid.GEN_LINK_SPEED),
    ("query", rndis.Oid.GEN_RECEIVE_SCALE_CAPABILITIES),
]


# Handshake -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour, channels", [("6.1", 8), ("6.12", 9), ("7.3", 9)])
def test_handshake_per_flavour(flavour: str, channels: int) -> None:
    # 16 CPUs: 6.1 caps the channel count at 8, 6.12/7.3 at max(16, ...); the host offers 1 + 8 queues.
    tb = make_testbed(flavour, cpus=16, memory_size=32 << 20)
    dev, g = tb.device, tb.netvsc
    assert g.nvsp_version == dev.nvsp_version == nvsp.Version.V61
    assert dev.ndis_version == (6, 30) and dev.capability == 0xAC and dev.mtu == 1500
    assert g.perm_addr == MAC and g.max_pkt_per_msg == 8 and g.pkt_alignment == 8
    assert g.recv_section_size == 1728 and g.send_section_size == 6144
    assert [(k, rndis.Oid(o)) for k, o in g.oids[: len(PROBE_OIDS)]] == PROBE_OIDS
    assert [o for _, o in g.oids[len(PROBE_OIDS) :]] == [rndis.Oid.GEN_RECEIVE_SCALE_PARAMETERS] * 2 + [
        rndis.Oid.GEN_CURRENT_PACKET_FILTER
    ]
    assert len(g.channels) == channels and len(dev.channels) == channels
    assert [c.sub_channel_index for c in g.channels] == list(range(channels))
    assert nvsp_events(tb)[:6] == [
        "INIT", "SEND_NDIS_CONFIG", "SEND_NDIS_VER", "SEND_RECV_BUF", "SEND_SEND_BUF", "SUBCHANNEL",
    ]  # fmt: skip
    assert dev.rndis.state.rss is not None and dev.rndis.state.rss.flag == 0
    assert g.carrier and g.ifalias is None  # "Network Adapter" is ignored by Linux
    clean(tb)


def test_older_nvsp_versions_fall_back() -> None:
    tb = make_testbed(device_kw=dict(nvsp_versions=[nvsp.Version.V4, nvsp.Version.V2]))
    dev, g = tb.device, tb.netvsc
    inits = [e for e in tb.timeline.of_kind("netvsp.nvsp") if e["msg"] == "INIT"]
    assert [(e["version"], e["accepted"]) for e in inits] == [
        ("0x60001", False), ("0x60000", False), ("0x50000", False), ("0x40000", True),
    ]  # fmt: skip
    assert g.nvsp_version == 0x40000 and dev.ndis_version == (6, 1) and dev.capability == 0x08
    # No link speed / RSS queries below NVSP 5, a revision-2 (144-byte) offload answer, one channel.
    assert rndis.Oid.GEN_RECEIVE_SCALE_CAPABILITIES not in [o for _, o in g.oids]
    assert g.offload is not None and g.offload.header.size == 144  # type: ignore[attr-defined]
    assert len(g.channels) == 1
    clean(tb)


def test_no_version_accepted_fails_the_probe() -> None:
    tb = make_testbed(probe=False, device_kw=dict(nvsp_versions=[]))
    with pytest.raises(Exception, match="EPROTO"):
        tb.netvsc.probe()
    assert not tb.bus.guest.channels[tb.netvsc.relid].is_open  # the guest tore the channel down


# Receive path --------------------------------------------------------------------------------------


def test_receive_filter_and_ppis() -> None:
    tb = make_testbed(probe=False)
    dev, g = tb.device, tb.netvsc
    assert dev.deliver(eth(MAC)) == "not-ready"
    g.probe()
    assert dev.deliver(eth(MAC)) == "filtered"  # packet filter 0 until ip link set up
    g.open()
    assert dev.deliver(eth(MAC, payload=b"unicast".ljust(46, b"\0"))) is None
    assert dev.deliver(eth(bytes.fromhex("020000000099"))) == "filtered"
    assert dev.deliver(eth(BCAST)) is None
    assert dev.deliver(eth(bytes.fromhex("01005e000001"))) is None  # ALL_MULTICAST
    assert dev.deliver(b"short") == "runt"
    tb.settle()
    assert [f.frame[:6] for f in g.rx] == [MAC, BCAST, bytes.fromhex("01005e000001")]
    assert g.rx[0].frame == eth(MAC, payload=b"unicast".ljust(46, b"\0"))
    assert g.rx[0].ppis[rndis.PpiType.TCPIP_CHKSUM] == bytes(4)  # checksum info: "not verified"
    g.set_packet_filter(rndis.FILTER_PROMISCUOUS)
    assert dev.deliver(eth(bytes.fromhex("020000000099"))) is None
    assert dev.drops == {"rx_drop.not-ready": 1, "rx_drop.filtered": 2, "rx_drop.runt": 1}
    assert dev.counters["rx_frames"] == 4 and dev.counters["rx_bytes"] == 4 * 60
    clean(tb)


def test_frames_queued_together_share_one_transfer_page_packet() -> None:
    tb = make_testbed(scheduler=True)
    dev, g = tb.device, tb.netvsc
    before = dev.counters["rx_packets"]
    frames = [eth(MAC, payload=bytes([i]) * 46, ethertype=0x88B5) for i in range(10)]  # not IP: no RSS
    assert [dev.deliver(f) for f in frames] == [None] * 10
    assert dev.counters["rx_packets"] == before  # nothing announced until the loop turns
    tb.settle()
    assert dev.counters["rx_packets"] == before + 1 and g.rx_packets >= 1
    assert [f.frame for f in g.rx] == frames
    assert dev.deliver_many(frames[:3]) == [None] * 3  # explicit batch, announced at once
    assert dev.counters["rx_packets"] == before + 2
    clean(tb)


def test_receive_sections_run_out_and_are_reused_after_completion() -> None:
    tb = make_testbed(recv_sections=8)
    dev, g = tb.device, tb.netvsc
    g.channels[0].on_event = None  # the guest does not run NAPI for now
    n = g.recv_section_count
    assert n == 16384 // 1728  # 8 × 1728 bytes rounded up to 4 pages hold 9 sections
    results = [dev.deliver(eth(MAC)) for _ in range(n + 1)]
    assert results == [None] * n + ["no-rx-buffer"]
    g.poll()  # NAPI: receive, then complete every transfer-page packet
    assert len(g.rx) == n
    assert [dev.deliver(eth(MAC)) for _ in range(n)] == [None] * n
    assert dev.drops == {"rx_drop.no-rx-buffer": 1}
    clean(tb)


def test_control_messages_wait_for_a_section_instead_of_being_dropped() -> None:
    tb = make_testbed(recv_sections=4)
    dev, g = tb.device, tb.netvsc
    g.channels[0].on_event = None
    n = g.recv_section_count
    assert [dev.deliver(eth(MAC)) for _ in range(n)] == [None] * n
    dev.set_link(False)  # INDICATE needs a section: none is free
    assert len(dev._ctl_backlog) == 1
    g.poll()  # completes the four data packets → the indication goes out
    g.poll()
    assert rndis.STATUS_MEDIA_DISCONNECT in g.indications and not g.carrier
    clean(tb)


def test_oversized_frame_and_jumbo_after_mtu_change() -> None:
    tb = make_testbed()
    dev, g = tb.device, tb.netvsc
    jumbo = eth(MAC, payload=bytes(9000))
    assert dev.deliver(jumbo) == "too-big"
    g.change_mtu(9000)
    assert dev.mtu == 9000 and g.recv_section_size >= 9000 + 14 + 44
    assert dev.deliver(jumbo) is None
    tb.settle()
    assert g.rx[-1].frame == jumbo
    clean(tb)


# Send path -----------------------------------------------------------------------------------------


def test_send_shapes_all_reach_the_port_and_complete() -> None:
    tb = make_testbed()
    dev, g, port = tb.device, tb.netvsc, tb.port
    free = len(g.send_free)
    frames = [eth(PEER, MAC, bytes([i]) * 100) for i in range(8)]
    g.send(frames[0])  # copied into a send section
    g.send(frames[1], mode="gpa")  # header and frame in page ranges
    g.send(frames[2], mode="partial")  # header in a section, frame in a page range
    g.send_batch(frames[3:8])  # five RNDIS packets in one section, 8-byte aligned
    g.wait_tx_idle()
    assert port.sent == frames
    g.send(eth(PEER, MAC, bytes(60), ethertype=0x0800), vlan=100, hash_value=0x1234)
    g.wait_tx_idle()
    tagged = port.sent[-1]
    assert tagged[12:16] == struct.pack(">HH", 0x8100, 100) and tagged[16:18] == b"\x08\x00"
    assert g.tx_outstanding == 0 and len(g.send_free) == free
    assert dev.counters["tx_frames"] == 9 and dev.counters["tx_bytes"] == sum(map(len, port.sent))
    clean(tb)


def test_send_on_sub_channels_and_link_down_drops() -> None:
    tb = make_testbed(cpus=4)
    dev, g, port = tb.device, tb.netvsc, tb.port
    for i in range(len(g.channels)):
        g.send(eth(PEER, MAC, bytes([i]) * 50), channel=i)
    g.wait_tx_idle()
    assert len(port.sent) == len(g.channels) == 4
    dev.set_link(False)
    g.send(eth(PEER, MAC))
    g.wait_tx_idle()
    assert len(port.sent) == 4 and dev.drops["tx_drop.link-down"] == 1
    clean(tb)


# vRSS ----------------------------------------------------------------------------------------------


def test_toeplitz_matches_the_microsoft_verification_vector() -> None:
    key = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa")
    data = (
        socket.inet_aton("66.9.149.187") + socket.inet_aton("161.142.100.80") + struct.pack(">HH", 2794, 1766)
    )
    assert toeplitz(key, data) == 0x51CCC178
    assert toeplitz(key, data[:8]) == 0x323E8FC2


def test_receive_traffic_spread_by_the_guests_indirection_table() -> None:
    tb = make_testbed(cpus=4)
    dev, g = tb.device, tb.netvsc
    rss = dev.rndis.state.rss
    assert rss is not None and len(g.channels) == 4
    frames = [tcp4("10.0.0.1", "10.0.0.2", 1000 + i, 80) for i in range(32)]
    for f in frames:
        assert dev.deliver(f) is None
    tb.settle()
    assert sorted(r.frame for r in g.rx) == sorted(frames)
    for r in g.rx:
        expected = toeplitz(rss.key, rss_input(r.frame, rss.hashinfo) or b"")
        assert r.ppis[rndis.PpiType.NBL_HASH_VALUE] == struct.pack("<I", expected)
        assert r.channel == rss.table[expected % len(rss.table)]
    assert len({r.channel for r in g.rx}) > 1
    assert {r.channel for r in g.rx if r.frame[12:14] != b"\x08\x00"} <= {0}
    clean(tb)


# Link, VF, data path --------------------------------------------------------------------------------


def test_link_indications() -> None:
    tb = make_testbed(device_kw=dict(link_up=False), probe=False)
    dev, g = tb.device, tb.netvsc
    g.probe()
    g.open()
    assert not g.carrier  # OID_GEN_MEDIA_CONNECT_STATUS said disconnected
    assert dev.deliver(eth(MAC)) == "link-down"
    dev.set_link(True)
    tb.settle()
    assert g.carrier and g.indications == [rndis.STATUS_MEDIA_CONNECT]
    assert dev.deliver(eth(MAC)) is None
    dev.set_link(False)
    tb.settle()
    assert not g.carrier and g.indications[-1] == rndis.STATUS_MEDIA_DISCONNECT
    assert [e["up"] for e in tb.timeline.of_kind("netvsp.link")] == [True, False]
    dev.set_link_speed(25_000_000_000)
    tb.settle()
    assert g.indications[-1] == rndis.STATUS_LINK_SPEED_CHANGE and g.link_speed_100bps == 250_000_000
    assert g.query(rndis.Oid.GEN_LINK_SPEED, 4) == struct.pack("<I", 250_000_000)
    clean(tb)


def test_switch_data_path_needs_the_association_and_gets_a_zero_length_completion() -> None:
    tb = make_testbed()
    dev, g, port = tb.device, tb.netvsc, tb.port
    switched: list[str] = []
    dev.on_data_path = switched.append
    with pytest.raises(GuestHang, match="VF association"):
        g.switch_data_path(True)
    dev.offer_vf(7)
    tb.settle()
    assert g.vf_associations == [(1, 7)] and g.vf_serial == 7
    g.switch_data_path(True)  # the model rejects a completion with a payload (6.x "Unknown ... type")
    assert dev.data_path == "vf" and g.data_path_is_vf and switched == ["vf"]
    assert dev.deliver(eth(MAC)) == "vf-data-path"
    g.send(eth(PEER, MAC))
    g.wait_tx_idle()
    assert len(port.sent) == 1  # guest TX over VMBus is accepted on either data path
    g.switch_data_path(False)
    assert dev.data_path == "synthetic" and switched == ["vf", "synthetic"]
    assert dev.deliver(eth(MAC)) is None
    dev.revoke_vf()
    tb.settle()
    assert g.vf_associations[-1] == (0, 7) and g.vf_alloc == 0 and dev.vf_serial is None
    # Surprise removal: the guest never switched back, the host does once the VF is gone.
    dev.offer_vf(8)
    tb.settle()
    g.switch_data_path(True)
    dev.revoke_vf()
    assert dev.data_path == "synthetic" and switched[-2:] == ["vf", "synthetic"]
    assert dev.deliver(eth(MAC)) is None
    clean(tb)


def test_vf_association_timing_and_data_path_survive_a_channel_reopen() -> None:
    tb = make_testbed(probe=False)
    dev, g = tb.device, tb.netvsc
    dev.offer_vf(42)  # before the guest is up: sent after SEND_SEND_BUF_COMPLETE
    g.probe()
    assert g.vf_associations == [(1, 42)]
    events = nvsp_events(tb)
    assert events.index("SEND_VF_ASSOCIATION") == events.index("SEND_SEND_BUF") + 1
    g.open()
    g.switch_data_path(True)
    g.change_mtu(4000)  # detach + attach: the guest does not re-send SWITCH_DATA_PATH
    assert g.vf_associations == [(1, 42), (1, 42)] and dev.data_path == "vf" and dev.mtu == 4000
    clean(tb)


# Reset / teardown --------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["6.1", "6.12", "7.3"])
def test_mtu_change_resets_the_device_cleanly(flavour: str) -> None:
    tb = make_testbed(flavour, cpus=4)
    dev, g, server = tb.device, tb.netvsc, tb.bus.server
    old_subs = [c.relid for c in g.channels[1:]]
    g.send(eth(PEER, MAC))
    assert dev.deliver(eth(MAC)) is None
    tb.settle()
    g.change_mtu(1400)
    assert dev.mtu == 1400 and dev.counters["resets"] == 1 and len(g.channels) == 4
    assert set(old_subs) <= set(tb.bus.guest.released_relids)  # rescinded on close, re-offered on request
    assert [c.sub_channel_index for c in dev.channels] == [0, 1, 2, 3]
    assert len(server.gpadls) == 4 + 2  # four rings, receive and send buffer: nothing leaked
    assert dev.deliver(eth(MAC)) is None
    g.send(eth(PEER, MAC))
    tb.settle()
    g.wait_tx_idle()
    assert len(g.rx) == 2 and len(tb.port.sent) == 2
    clean(tb)


@pytest.mark.parametrize(
    "flavour, versions, teardown_before_close",
    [("6.12", None, False), ("6.12", [vm.VmbusVersion.V3_0], True), ("7.3", None, False)],
)
def test_teardown_order_per_flavour(
    flavour: str, versions: list[int] | None, teardown_before_close: bool
) -> None:
    tb = make_testbed(flavour, bus_kw=dict(guest_versions=versions))
    dev, g = tb.device, tb.netvsc
    recv = g.recv_gpadl
    g.detach()
    posted = [(m.msgtype, m.get("gpadl")) for m in tb.bus.guest.posted]
    close = max(i for i, (t, _) in enumerate(posted) if t is vm.MsgType.CLOSECHANNEL)
    teardown = posted.index((vm.MsgType.GPADL_TEARDOWN, recv))
    assert (teardown < close) is teardown_before_close
    assert dev.deliver(eth(MAC)) == "not-ready" and dev._recv is None and dev._send is None
    assert len(tb.bus.server.gpadls) == 0
    clean(tb)


def test_mac_change_through_rndis_config_parameter() -> None:
    tb = make_testbed()
    dev, g = tb.device, tb.netvsc
    new = bytes.fromhex("00155d0000aa")
    assert g.set_mac(new) == rndis.STATUS_SUCCESS
    assert g.query(rndis.Oid.OID_802_3_CURRENT_ADDRESS, 6) == new
    assert g.query(rndis.Oid.OID_802_3_PERMANENT_ADDRESS, 6) == MAC
    assert dev.deliver(eth(new)) is None and dev.deliver(eth(MAC)) == "filtered"
    assert g.set(rndis.Oid.GEN_RNDIS_CONFIG_PARAMETER, rndis.build_config_parameter("Other", "1")) == (
        rndis.STATUS_NOT_SUPPORTED
    )
    clean(tb)


def test_timeline_records_control_messages_not_data() -> None:
    tb = make_testbed()
    dev, g = tb.device, tb.netvsc
    rndis_events = tb.timeline.of_kind("netvsp.rndis")
    assert [e["msg"] for e in rndis_events[:3]] == ["INIT", "INIT_C", "QUERY"]
    assert rndis_events[2]["oid"] == "GEN_MAXIMUM_FRAME_SIZE"
    count = len(tb.timeline.events)
    for _ in range(20):
        g.send(eth(PEER, MAC))
        dev.deliver(eth(MAC))
    tb.settle()
    g.wait_tx_idle()
    assert len(tb.timeline.events) == count
    clean(tb)


def test_device_api_without_a_server_and_snapshot() -> None:
    dev = NetvspDevice("00:15:5d:00:00:09", max_subchannels=100)
    assert dev.deliver(eth(MAC)) == "not-attached" and dev.max_subchannels == 63
    dev.set_link(False)
    dev.offer_vf(3)
    assert dev.vf_serial == 3 and not dev.link_up and dev.data_path == "synthetic"
    snap = dev.snapshot()
    assert snap["mac"] == "00:15:5d:00:00:09" and snap["counters"]["rx_drop.not-attached"] == 1
    with pytest.raises(ValueError):
        NetvspDevice("00:15:5d")


# Offloads --------------------------------------------------------------------------------------------


def ones_complement_ok(data: bytes) -> bool:
    """Independent RFC 1071 check: big-endian word sum of data that includes its checksum is 0xFFFF."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def tcp_checksum_ok(frame: bytes) -> bool:
    ihl = (frame[14] & 0xF) * 4
    total = struct.unpack_from(">H", frame, 16)[0]
    segment = frame[14 + ihl : 14 + total]
    pseudo = frame[26:34] + struct.pack(">xBH", frame[23], len(segment))
    return ones_complement_ok(pseudo + segment)


def test_offloads_advertised_and_finished_by_the_host() -> None:
    tb = make_testbed(device_kw=dict(offloads=True))
    dev, g, port = tb.device, tb.netvsc, tb.port
    caps = g.offload
    assert caps.ip4_txcsum & 0x14 == 0x14 and caps.lsov2_ip4_encap == 2 and caps.lsov2_ip4_maxsz > 0  # type: ignore[attr-defined]
    base = bytearray(tcp4("10.0.0.1", "10.0.0.2", 1234, 80))
    base[50:52] = b"\xde\xad"  # checksum field: garbage (the guest leaves the pseudo-header sum)
    g.send(bytes(base), csum=rndis.csum_tx(True, False, True, False, 34))
    # LSO: a 3000-byte segment, IPv4 tot_len zeroed by netvsc_xmit
    big = bytearray(tcp4("10.0.0.1", "10.0.0.2", 1234, 80)[:54] + bytes(range(256)) * 12)
    big[16:18] = b"\0\0"
    g.send(bytes(big), mode="gpa", lso=rndis.lso_info(1448, 34, ipv6=False))
    g.send(bytes(base), csum=rndis.csum_tx(True, False, True, False, 2000))  # offset outside the frame
    g.wait_tx_idle()
    fixed, lso, unparsed = port.sent
    assert fixed[:50] == bytes(base[:50]) and tcp_checksum_ok(fixed)
    assert struct.unpack_from(">H", lso, 16)[0] == len(lso) - 14 and ones_complement_ok(lso[14:34])
    assert tcp_checksum_ok(lso) and len(lso) == len(big)
    assert unparsed == bytes(base)
    assert (
        dev.counters["tx_csum"] == 1
        and dev.counters["tx_lso"] == 1
        and dev.counters["tx_offload_unparsed"] == 1
    )
    clean(tb)


def test_offload_ppis_ignored_when_not_advertised() -> None:
    tb = make_testbed()
    caps = tb.netvsc.offload
    assert caps.ip4_txcsum == 0 and caps.lsov2_ip4_encap == 0  # type: ignore[attr-defined]
    frame = bytearray(tcp4("10.0.0.1", "10.0.0.2", 1, 2))
    frame[50:52] = b"\x12\x34"
    tb.netvsc.send(bytes(frame), csum=rndis.csum_tx(True, False, True, False, 34))
    tb.netvsc.wait_tx_idle()
    assert tb.port.sent == [bytes(frame)]


def test_deliver_from_other_threads_with_a_real_event_loop() -> None:
    import threading
    import time

    from hvlab.vmbus.loop import EventLoop

    tb = make_testbed(probe=False, recv_sections=32)
    dev, g = tb.device, tb.netvsc
    g.probe()
    g.open()
    loop = EventLoop(name="netvsp-test")
    dev.scheduler = loop  # announcements now happen on the loop thread
    results: list[str | None] = []
    lock = threading.Lock()

    def sender(tag: int) -> None:
        for i in range(150):
            r = dev.deliver(eth(MAC, payload=struct.pack(">HH", tag, i) + bytes(42), ethertype=0x88B5))
            with lock:
                results.append(r)

    with loop:
        threads = [threading.Thread(target=sender, args=(t,)) for t in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            tb.bus.synic.pump()
            g.poll()
            accepted = sum(r is None for r in results)
            if not any(t.is_alive() for t in threads) and len(g.rx) == accepted and not dev._rx_inflight:
                break
            time.sleep(0.001)
        for t in threads:
            t.join()
    accepted = sum(r is None for r in results)
    assert len(results) == 300 and accepted == len(g.rx) == dev.counters["rx_frames"]
    assert set(results) <= {None, "no-rx-buffer"} and accepted > 0
    for tag in range(2):  # per-sender order is preserved
        seq = [struct.unpack_from(">HH", r.frame, 14) for r in g.rx]
        mine = [i for t, i in seq if t == tag]
        assert mine == sorted(mine)
    clean(tb)


def test_completions_wait_for_ring_space_instead_of_being_lost() -> None:
    tb = make_testbed(ring_pages=3, recv_sections=256)  # 8 KiB inbound ring
    dev, g = tb.device, tb.netvsc
    g.primary.on_event = None  # the guest stops reading its inbound ring (busy CPU)
    accepted = [dev.deliver(eth(MAC)) for _ in range(200)].count(None)
    assert accepted == 200 and dev._rx_pending  # the ring is full: frames wait in their sections
    tid = g.send(eth(PEER, MAC))
    g.send(eth(PEER, MAC), mode="gpa")
    assert dev.counters["ring_full"] == 2 and len(tb.port.sent) == 2  # forwarded, completions queued
    g.primary.on_event = g._on_interrupt
    g.wait_tx_idle()  # the guest drains, the host is signalled, the completions follow
    tb.settle()
    assert g.tx_outstanding == 0 and tid not in g.primary.outstanding
    assert len(g.rx) == accepted and not any(dev._rx_pending.values())
    clean(tb)

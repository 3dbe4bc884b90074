"""The vmxnet3 model driven through the vfio-user client by a minimal driver (hvlab.vf.testing):
probe, activate, tx to the switch port, rx into the ring with interrupts, link events, reset, reconnect,
and malformed guest state."""

from __future__ import annotations

import logging
import struct

import pytest

from hvlab.net.switch import mac_bytes as parse_mac
from hvlab.protocol import vmxnet3 as V
from hvlab.vf.testing import GuestMemory, MiniDriver
from hvlab.vf.vmxnet3 import Vmxnet3
from hvlab.vfio_user import VfioUserClient, VfioUserServer

MAC = "00:15:5d:12:34:56"
PEER = bytes.fromhex("02000000aa01")


class FakePort:
    """The switch port's shape (hvlab.net.switch.Port.send)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)


def frame_to(dst: bytes, payload: bytes = b"x" * 46, src: bytes = PEER, etype: int = 0x0800) -> bytes:
    return dst + src + struct.pack("!H", etype) + payload


@pytest.fixture
def port():
    return FakePort()


@pytest.fixture
def dev(port):
    return Vmxnet3(MAC, port=port)


@pytest.fixture
def server(dev, tmp_path):
    srv = VfioUserServer(dev, tmp_path / "vmxnet3.sock", io_timeout=0.5).start()
    yield srv
    srv.stop()


def connect(server, intr="msix"):
    c = VfioUserClient.connect(server.path, retry_for=3.0)
    c.negotiate()
    mem = GuestMemory()
    mem.map(c)
    drv = MiniDriver(c, mem, intr=intr)
    return c, mem, drv


@pytest.fixture
def drv(server):
    c, mem, d = connect(server)
    d.probe()
    yield d
    d.close()
    c.close()
    mem.close()


@pytest.fixture
def active(drv):
    assert drv.activate() == 0
    return drv


# ------------------------------------------------------------------------------------------- layouts


def test_fast_descriptor_codecs_agree_with_construct():
    raw = V.pack_txd(0x123456789A, 1514, 1, eop=True, cq=True, om=V.OM_CSUM, hlen=34, msscof=16, ti=True, tci=7)
    c = V.TxDesc.parse(raw)
    t = V.unpack_txd(raw)
    assert (c.addr, c.dword2.len, c.dword2.gen, c.dword3.eop, c.dword3.cq, c.dword3.om, c.dword3.hlen,
            c.dword2.msscof, c.dword3.ti, c.dword3.tci) == (t.addr, t.len, t.gen, t.eop, t.cq, t.om, t.hlen,
                                                           t.msscof, t.ti, t.tci)
    rcd = V.RxCompDesc.parse(V.pack_rcd(17, 1, 1000, 1, sop=True, eop=False))
    assert (rcd.dword0.rxdIdx, rcd.dword0.rqID, rcd.dword2.len, rcd.dword3.gen, rcd.dword3.type,
            rcd.dword0.sop, rcd.dword0.eop, rcd.dword0.cnc) == (17, 1, 1000, 1, V.CDTYPE_RXCOMP, 1, 0, 1)
    tcd = V.TxCompDesc.parse(V.pack_tcd(4095, 1))
    assert (tcd.dword0.txdIdx, tcd.dword3.gen, tcd.dword3.type) == (4095, 1, V.CDTYPE_TXCOMP)
    rxd = V.RxDesc.parse(V.pack_rxd(0x1000, 4096 - 1, 1, 1))
    assert (rxd.addr, rxd.dword2.len, rxd.dword2.btype, rxd.dword2.gen) == (0x1000, 4095, 1, 1)


def test_shared_layout_offsets():
    assert V.ECR_OFFSET == 696 and V.CMD_INFO_OFFSET == 704
    assert V.QUEUE_STATUS_OFFSET == 80 and V.QUEUE_STATS_OFFSET == 88


# ------------------------------------------------------------------------------------------- probe


def test_probe_negotiates_highest_revision_and_reads_mac(dev, drv):
    assert drv.revision == 3 and dev.revision_selected == 3 and dev.upt_selected == 1
    assert drv.mac == parse_mac(MAC)
    assert drv.c.config_read(0, 2) == V.VENDOR_ID and drv.c.config_read(2, 2) == V.DEVICE_ID


def test_get_commands(drv):
    assert drv.cmd(V.Cmd.GET_LINK) == V.LINK_UP
    assert drv.cmd(V.Cmd.GET_CONF_INTR) & 3 == V.IT_AUTO
    lo, hi = drv.cmd(V.Cmd.GET_PERM_MAC_LO), drv.cmd(V.Cmd.GET_PERM_MAC_HI)
    assert struct.pack("<IH", lo, hi) == parse_mac(MAC)
    assert drv.cmd(V.Cmd.GET_DID_LO) == V.DEVICE_ID
    assert drv.cmd(V.Cmd.GET_TXDATA_DESC_SIZE) == 128
    for code in (V.Cmd.GET_DID_HI, V.Cmd.GET_DEV_EXTRA_INFO, V.Cmd.GET_COALESCE, V.Cmd.GET_RSS_FIELDS,
                 V.Cmd.GET_RESERVED1):
        drv.cmd(code)  # answered, no violation
    assert drv.c.bar_read(1, V.Bar1.VRRS, 4) == 0b111


def test_bad_version_selection_is_a_violation(dev, drv):
    drv.vd_write(V.Bar1.VRRS, 0b11)
    drv.vd_write(V.Bar1.VRRS, 1 << 7)
    drv.vd_write(V.Bar1.UVRS, 2)
    assert sum("VRRS" in v for v in dev.violations) == 2 and any("UVRS" in v for v in dev.violations)


def test_mac_registers_are_writable_but_perm_mac_stays(dev, drv):
    drv.vd_write(V.Bar1.MACL, 0x04030201)
    drv.vd_write(V.Bar1.MACH, 0x0605)
    assert dev.mac == bytes(range(1, 7))
    assert drv.cmd(V.Cmd.GET_PERM_MAC_LO) == int.from_bytes(parse_mac(MAC)[:4], "little")


def test_unknown_command_and_register_are_violations(dev, drv):
    drv.cmd(0xCAFE0FFF)
    drv.vd_write(0x100, 1)
    drv.c.bar_write(1, V.Bar1.CMD + 2, 2, 1)
    assert len(dev.violations) == 3


# ------------------------------------------------------------------------------------------- data path


@pytest.mark.parametrize("intr", ["msix", "msi", "intx"])
def test_tx_reaches_the_port_with_completion_and_interrupt(server, dev, port, intr):
    c, mem, d = connect(server, intr)
    try:
        d.probe()
        assert d.activate() == 0 and dev.active
        f = frame_to(PEER, b"hello vmxnet3".ljust(46, b"."))
        idx = d.send(f)
        assert port.sent == [f]
        assert d.tx_completions() == [idx]
        assert d.fired(0) == 1
        if intr == "intx":
            assert d.vd_read(V.Bar1.ICR) == 1 and d.vd_read(V.Bar1.ICR) == 0
    finally:
        d.close()
        c.close()
        mem.close()


def test_rx_frame_lands_in_ring_with_interrupt(dev, active):
    f = frame_to(parse_mac(MAC))
    assert dev.deliver(f) is None
    assert active.receive() == [f]
    assert active.fired(1) == 1 and active.fired(0) == 0


def test_rx_long_frame_spans_ring2_body_buffers(dev, active):
    active.RX_BUF  # noqa: B018 - documents the head buffer size used below
    f = frame_to(parse_mac(MAC), bytes(range(256)) * 12)  # 3086 bytes: head + two 4 KiB... one body page
    assert dev.deliver(f) is None
    assert active.receive() == [f]


def test_rx_without_buffers_is_dropped_with_reason(dev, active):
    f = frame_to(parse_mac(MAC))
    reasons = [dev.deliver(f) for _ in range(40)]
    assert reasons[:32] == [None] * 32 and set(reasons[32:]) == {"no-rx-buffer"}
    assert len(active.receive()) == 32  # refills the ring
    assert dev.deliver(f) is None
    assert dev.counters["rx_dropped no-rx-buffer"] == 8


def test_rx_filter(dev, active):
    assert dev.deliver(frame_to(bytes.fromhex("020000000001"))) == "filtered"
    assert dev.deliver(frame_to(b"\xff" * 6)) is None
    assert dev.deliver(frame_to(bytes.fromhex("01005e000001"))) == "filtered"
    active.write_shared(8 + V.MiscConf.sizeof() + V.IntrConf.sizeof(), struct.pack("<I", V.RXM_PROMISC))
    active.cmd(V.Cmd.UPDATE_RX_MODE)
    assert dev.deliver(frame_to(bytes.fromhex("020000000001"))) is None


def test_rx_ring_wraps_with_generation_bits(dev, active):
    for i in range(100):
        f = frame_to(parse_mac(MAC), i.to_bytes(2, "big") * 23)
        assert dev.deliver(f) is None, i
        assert active.receive() == [f]


def test_tx_ring_wraps_and_masked_interrupt_fires_on_unmask(dev, port, active):
    active.pt_write(V.Bar0.IMR, 1)
    for i in range(70):
        active.send(frame_to(PEER, i.to_bytes(2, "big") * 23))
        assert len(active.tx_completions()) == 1
    assert len(port.sent) == 70 and active.fired(0) == 0
    active.pt_write(V.Bar0.IMR, 0)
    assert active.fired(0) == 1


def test_batched_doorbell_sends_everything_posted(port, active):
    for i in range(5):
        active.send(frame_to(PEER, bytes([i]) * 46), doorbell=False)
    assert port.sent == []
    active.pt_write(V.Bar0.TXPROD, active.tx.idx)
    assert [f[14] for f in port.sent] == [0, 1, 2, 3, 4]


def test_tx_checksum_offload(port, active):
    ip = bytes.fromhex("4500001c000000004011") + b"\0\0" + bytes([192, 0, 2, 2, 192, 0, 2, 1])
    udp = struct.pack("!HHHH", 1000, 2000, 8, 0)
    # CHECKSUM_PARTIAL: the stack seeds the UDP checksum field with the pseudo-header sum.
    from hvlab.net import frames
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, 8)
    udp = udp[:6] + struct.pack("!H", frames.ones_sum(pseudo))
    f = frame_to(PEER, ip + udp + bytes(18))
    active.send(f, om=V.OM_CSUM, hlen=34, msscof=34 + 6)  # as Linux: field offset from frame start
    out = port.sent[0]
    assert frames.ones_sum(out[34:42], frames.ones_sum(pseudo)) == 0xFFFF


def test_tso_segments(port, active):
    from hvlab.net import frames
    payload = bytes(range(256)) * 10
    ip = bytearray(bytes.fromhex("45000000123440004006") + b"\0\0" + bytes([192, 0, 2, 2, 192, 0, 2, 1]))
    tcp = struct.pack("!HHIIBBHHH", 1000, 2000, 1000, 0, 5 << 4, 0x18, 65535, 0, 0)
    f = frame_to(PEER, bytes(ip) + tcp + payload)
    active.mem.write(active.tx_bufs[0], f)
    active.mem.write(active.tx.base, V.pack_txd(active.tx_bufs[0], len(f), 1, om=V.OM_TSO, hlen=54, msscof=1000))
    active.tx.advance()
    active.pt_write(V.Bar0.TXPROD, 1)
    assert [len(s) - 54 for s in port.sent] == [1000, 1000, 560]
    seqs = [struct.unpack_from("!I", s, 38)[0] for s in port.sent]
    assert seqs == [1000, 2000, 3000]
    for s in port.sent:
        assert frames.ones_sum(s[14:34]) == 0xFFFF
        pseudo = s[26:34] + struct.pack("!BBH", 0, 6, len(s) - 34)
        assert frames.ones_sum(s[34:], frames.ones_sum(pseudo)) == 0xFFFF
    assert [s[47] & 0x08 for s in port.sent] == [0, 0, 8]  # PSH only on the last


# ------------------------------------------------------------------------------------------- link


def test_link_down_up_raises_events(dev, port, active):
    dev.set_link(False)
    assert active.fired(2) == 1
    assert active.ecr() & V.ECR_LINK and active.vd_read(V.Bar1.ECR) & V.ECR_LINK
    assert active.cmd(V.Cmd.GET_LINK) == V.LINK_DOWN
    assert dev.deliver(frame_to(parse_mac(MAC))) == "link-down"
    active.send(frame_to(PEER))
    assert port.sent == [] and active.tx_completions()  # completed, but discarded
    active.vd_write(V.Bar1.ECR, V.ECR_LINK)  # acknowledge
    assert active.ecr() == 0 and active.vd_read(V.Bar1.ECR) == 0
    dev.set_link(True)
    assert active.fired(2) == 1 and active.cmd(V.Cmd.GET_LINK) == V.LINK_UP


# ------------------------------------------------------------------------------------------- reset, reconnect


def test_reset_dev_then_reactivate(dev, port, active):
    assert active.cmd(V.Cmd.QUIESCE_DEV) == 0 and not dev.active
    assert dev.deliver(frame_to(parse_mac(MAC))) == "not-active"
    active.cmd(V.Cmd.RESET_DEV)
    active.mem._next = active.mem.base
    assert active.activate() == 0
    active.send(frame_to(PEER))
    assert len(port.sent) == 1


def test_vfio_reset_returns_to_power_on(dev, drv):
    drv.activate()
    drv.vd_write(V.Bar1.MACL, 0)
    drv.c.reset()
    assert not dev.active and dev.mac == parse_mac(MAC) and dev.dsa == 0


def test_reconnect_keeps_device_state(server, dev, port):
    c, mem, d = connect(server)
    d.probe()
    d.activate()
    d.send(frame_to(PEER))
    dev.set_link(False)
    c.close()
    assert server.wait_for(lambda: not server.connected)
    assert not dev.active and dev.counters["tx_frames"] == 1
    c2, mem2, d2 = connect(server, "msi")
    try:
        d2.probe()
        assert d2.cmd(V.Cmd.GET_LINK) == V.LINK_DOWN  # state kept across connections
        dev.set_link(True)
        assert d2.activate() == 0
        d2.send(frame_to(PEER))
        assert len(port.sent) == 2 and dev.counters["tx_frames"] == 2
        assert dev.deliver(frame_to(parse_mac(MAC))) is None and d2.fired(0) >= 1
        assert len(d2.receive()) == 1
    finally:
        d2.close()
        c2.close()
        mem2.close()
        mem.close()
        d.close()


# ------------------------------------------------------------------------------------------- malformed state


def test_activate_with_bad_magic_fails(dev, drv, caplog):
    drv.activate()
    drv.write_shared(0, b"\0\0\0\0")
    with caplog.at_level(logging.WARNING, "hvlab.vf.vmxnet3"):
        assert drv.cmd(V.Cmd.ACTIVATE_DEV) == 1
    assert "magic" in caplog.text


def test_activate_with_bad_ring_size_fails(dev, drv):
    assert drv.activate(tx_ring_size=33) == 1
    assert not dev.active and any("txRingSize" in v for v in dev.violations)


def test_activate_with_short_queue_table_fails(dev, drv):
    assert drv.activate(queue_desc_len=256) == 1
    assert any("queueDescLen" in v for v in dev.violations)


def test_activate_with_unmapped_shared_area_fails(dev, drv):
    drv.vd_write(V.Bar1.DSAL, 0x7000_0000)
    drv.vd_write(V.Bar1.DSAH, 0)
    assert drv.cmd(V.Cmd.ACTIVATE_DEV) == 1 and not dev.active


def test_tx_descriptor_with_bad_address_stops_queue(dev, port, active):
    active.mem.write(active.tx.base, V.pack_txd(0xDEAD_0000_0000, 64, 1))
    active.tx.advance()
    active.pt_write(V.Bar0.TXPROD, 1)
    assert port.sent == []
    assert active.fired(2) == 1 and active.ecr() & V.ECR_TQERR
    active.cmd(V.Cmd.GET_QUEUE_STATUS)
    st = active.queue_status(0)
    assert st.stopped == 1 and st.error == V.ERR_TXD_INVALID
    assert any("txq0" in v and "addr" in v for v in dev.violations)
    active.send(frame_to(PEER))  # the stopped queue sends nothing more, the server keeps serving
    assert port.sent == [] and active.cmd(V.Cmd.GET_LINK) == V.LINK_UP


def test_tx_packet_without_eop_stops_queue(dev, active):
    active.mem.write(active.tx.base, V.pack_txd(active.tx_bufs[0], 64, 1, eop=False))
    active.tx.advance()
    active.pt_write(V.Bar0.TXPROD, 1)
    active.cmd(V.Cmd.GET_QUEUE_STATUS)
    assert active.queue_status(0).error == V.ERR_NOEOP


def test_rx_descriptor_with_bad_address_stops_rx_queue(dev, active):
    active.mem.write(active.rx[0].base, V.pack_rxd(0xDEAD_0000_0000, 1536, 0, 1))
    assert dev.deliver(frame_to(parse_mac(MAC))) == "queue-error"
    active.cmd(V.Cmd.GET_QUEUE_STATUS)
    assert active.queue_status(1).stopped == 1 and active.ecr() & V.ECR_RQERR
    assert dev.deliver(frame_to(parse_mac(MAC))) == "queue-stopped"


def test_doorbell_for_missing_queue_and_odd_access(dev, active):
    active.pt_write(V.Bar0.TXPROD + 8 * 5, 1)
    active.c.bar_write(0, V.Bar0.TXPROD + 2, 2, 1)
    assert len(dev.violations) == 2


def test_msi_only_device_has_no_msix_capability(tmp_path):
    d = Vmxnet3(MAC, msix=False)
    srv = VfioUserServer(d, tmp_path / "s.sock").start()
    try:
        c = VfioUserClient.connect(srv.path, retry_for=3.0)
        c.negotiate()
        caps, pos = [], c.config_read(0x34, 1)
        while pos:
            caps.append(c.config_read(pos, 1))
            pos = c.config_read(pos + 1, 1)
        assert 0x11 not in caps and 0x05 in caps
        assert c.get_irq_info(2).count == 0  # the MSI-X index
        c.close()
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------- every command

RESERVED = {V.Cmd.RESERVED1, V.Cmd.RESERVED2, V.Cmd.RESERVED3}
SET_COMMANDS = [c for c in V.Cmd if c < V.FIRST_GET and c not in RESERVED]
GET_COMMANDS = [c for c in V.Cmd if c >= V.FIRST_GET and c != V.Cmd.GET_MAX_QUEUES_CONF]


@pytest.mark.parametrize("code", SET_COMMANDS, ids=lambda c: c.name)
def test_every_set_command_on_an_active_device(dev, port, active, code):
    result = active.cmd(code)
    assert result == 0, V.command_name(code)
    assert list(dev.violations) == []
    if code in (V.Cmd.QUIESCE_DEV, V.Cmd.RESET_DEV):
        assert not dev.active
    else:
        assert dev.active
        active.send(frame_to(PEER))
        assert len(port.sent) == 1


def test_reserved_commands_are_violations(dev, active):
    for code in RESERVED:
        active.cmd(code)
    assert len(dev.violations) == 3 and dev.active


@pytest.mark.parametrize("code", GET_COMMANDS, ids=lambda c: c.name)
def test_every_get_command_answers_without_violation(dev, active, code):
    expected = {V.Cmd.GET_LINK: V.LINK_UP, V.Cmd.GET_DID_LO: V.DEVICE_ID, V.Cmd.GET_TXDATA_DESC_SIZE: 128,
                V.Cmd.GET_PERM_MAC_HI: 0x5634, V.Cmd.GET_PERM_MAC_LO: 0x125D1500}
    r = active.cmd(code)
    if code in expected:
        assert r == expected[code]
    assert list(dev.violations) == [] and dev.active


def test_get_stats_writes_queue_stats(dev, active):
    active.send(frame_to(PEER))
    dev.deliver(frame_to(parse_mac(MAC)))
    active.cmd(V.Cmd.GET_STATS)
    tx = V.TxStats.parse(active.mem.read(active.qdesc + V.QUEUE_STATS_OFFSET, 80))
    rx = V.RxStats.parse(active.mem.read(active.qdesc + V.QUEUE_DESC_SIZE + V.QUEUE_STATS_OFFSET, 80))
    assert (tx.ucastPktsTxOK, tx.ucastBytesTxOK) == (1, 60)
    assert (rx.ucastPktsRxOK, rx.ucastBytesRxOK) == (1, 60)


def test_update_mac_filters_reads_the_multicast_table(dev, active):
    table = bytes.fromhex("01005e0000fb") + bytes.fromhex("333300000001")
    pa = active.mem.alloc(len(table), 64)
    active.mem.write(pa, table)
    rxf = 8 + V.MiscConf.sizeof() + V.IntrConf.sizeof()
    active.write_shared(rxf, struct.pack("<IHHQ", V.RXM_UCAST | V.RXM_MCAST, len(table), 0, pa))
    active.cmd(V.Cmd.UPDATE_RX_MODE)
    active.cmd(V.Cmd.UPDATE_MAC_FILTERS)
    assert dev.deliver(frame_to(bytes.fromhex("01005e0000fb"))) is None
    assert dev.deliver(frame_to(bytes.fromhex("01005e0000fc"))) == "filtered"


def test_update_vlan_filters(dev, active):
    tagged = parse_mac(MAC) + PEER + b"\x81\x00" + struct.pack("!H", 5) + b"\x08\x00" + bytes(46)
    assert dev.deliver(tagged) == "filtered"
    rxf = 8 + V.MiscConf.sizeof() + V.IntrConf.sizeof()
    active.write_shared(rxf + 16, struct.pack("<I", 1 << 5))
    active.cmd(V.Cmd.UPDATE_VLAN_FILTERS)
    assert dev.deliver(tagged) is None


# ------------------------------------------------------------------------------------------- out of order


def test_commands_before_the_shared_area_is_set(dev, drv):
    assert drv.cmd(V.Cmd.ACTIVATE_DEV) == 1
    drv.cmd(V.Cmd.UPDATE_RX_MODE)
    drv.cmd(V.Cmd.UPDATE_FEATURE)
    assert sum("DSAL/DSAH" in v for v in dev.violations) == 3 and not dev.active
    for code in (V.Cmd.GET_STATS, V.Cmd.GET_QUEUE_STATUS, V.Cmd.QUIESCE_DEV, V.Cmd.RESET_DEV):
        assert drv.cmd(code) == 0  # nothing configured, nothing to do: not an error
    assert len(dev.violations) == 3


def test_doorbells_and_frames_before_activation_are_harmless(dev, port, drv):
    drv.pt_write(V.Bar0.TXPROD, 1)
    drv.pt_write(V.Bar0.RXPROD, 1)
    drv.pt_write(V.Bar0.IMR, 0)
    assert dev.deliver(frame_to(parse_mac(MAC))) == "not-active" and port.sent == []
    assert list(dev.violations) == []
    dev.set_link(False)
    dev.set_link(True)
    assert drv.activate() == 0


def test_activate_twice_restarts_rings(dev, port, active):
    active.send(frame_to(PEER))
    active.mem._next = active.mem.base
    assert active.activate() == 0  # Linux re-activates after a reset without RESET_DEV in between too
    active.send(frame_to(PEER))
    assert len(port.sent) == 2 and active.tx_completions() == [0]


def test_rx_from_another_thread_while_tx_runs(dev, port, active):
    import threading

    got = []

    def feeder():
        for i in range(200):
            got.append(dev.deliver(frame_to(parse_mac(MAC), i.to_bytes(2, "big") * 23)))

    t = threading.Thread(target=feeder)
    t.start()
    received = []
    for _ in range(50):
        active.send(frame_to(PEER))
        active.tx_completions()
        received += active.receive()
    t.join()
    received += active.receive()
    assert len(port.sent) == 50
    assert got.count(None) == len(received)
    assert set(got) <= {None, "no-rx-buffer"}


def test_jumbo_layout_skips_unused_body_buffers_in_ring1(server, dev):
    """MTU 9000 makes Linux interleave HEAD and BODY buffers in ring 1; a short frame needs only the head,
    and the next packet must start at the next HEAD (the skipped bodies are reclaimed by the driver)."""
    c, mem, d = connect(server)
    d.rx_buf_per_pkt = 3
    try:
        d.probe()
        assert d.activate() == 0
        for i in range(40):
            size = 60 if i % 2 else 5000  # short frames leave bodies unused; long ones use them
            f = frame_to(parse_mac(MAC), bytes([i]) * (size - 14))
            assert dev.deliver(f) is None, i
            assert d.receive() == [f], i
        assert list(dev.violations) == []
    finally:
        d.close()
        c.close()
        mem.close()


def test_bad_offload_requests_are_violations_but_frames_still_go(dev, port, active):
    f = frame_to(PEER)
    active.send(f, om=V.OM_CSUM, hlen=34, msscof=4000)
    active.send(f, om=V.OM_TSO, hlen=54, msscof=100)  # an ARP-less garbage "TCP" frame
    active.send(f, om=V.OM_ENCAP)
    assert port.sent == [f, f, f]
    assert [v.split(": ")[1] for v in dev.violations] == ["hlen/msscof", "hlen/msscof", "om"]
    assert len(active.tx_completions()) == 3


def test_msi_only_device_has_no_bar2():
    assert Vmxnet3(MAC, msix=False).config.bar_region_size(2) == 0
    assert Vmxnet3(MAC).config.bar_region_size(2) == 0x2000


def test_random_guest_state_never_breaks_the_server(server, dev, port, active):
    """Seeded fuzz: garbage in the shared area, queue table and rings, random register writes and
    commands, frames from the switch meanwhile. Every failure must be a violation; the server keeps
    answering and deliver() keeps returning a value."""
    import random

    rnd = random.Random(6)
    regions = [(active.shared, V.DRIVER_SHARED_SIZE), (active.qdesc, 512), (active.tx.base, 512),
               (active.tc.base, 512), (active.rx[0].base, 512), (active.rc.base, 1024)]
    cmds = list(V.Cmd) + [0xCAFE1234, 0xF00DFFFF, 0, 0xFFFFFFFF]
    for _ in range(300):
        what = rnd.random()
        if what < 0.3:
            base, size = rnd.choice(regions)
            off = rnd.randrange(0, size - 8)
            active.mem.write(base + off, rnd.randbytes(rnd.choice((1, 4, 8))))
        elif what < 0.5:
            active.cmd(rnd.choice(cmds))
        elif what < 0.7:
            active.pt_write(rnd.choice((V.Bar0.TXPROD, V.Bar0.RXPROD, V.Bar0.IMR + 8 * rnd.randrange(30))),
                            rnd.getrandbits(32))
        elif what < 0.8:
            active.vd_write(rnd.choice(list(V.Bar1)), rnd.getrandbits(32))
        else:
            assert isinstance(dev.deliver(frame_to(parse_mac(MAC), rnd.randbytes(rnd.randrange(46, 3000)))),
                              (str, type(None)))
    assert server.connected
    assert active.c.bar_read(1, V.Bar1.VRRS, 4) == 0b111
    assert dev.counters["violations"] == len(dev.violations) > 0


def test_tx_producer_index_outside_the_ring_is_a_violation(dev, port, active):
    active.send(frame_to(PEER), doorbell=False)
    active.pt_write(V.Bar0.TXPROD, 4096)
    assert len(port.sent) == 1 and any("TXPROD" in v for v in dev.violations)


def test_a_repeating_guest_does_not_flood_the_log(dev, drv, caplog):
    with caplog.at_level(logging.WARNING, "hvlab.vf.vmxnet3"):
        for _ in range(50):
            drv.vd_write(V.Bar1.UVRS, 7)
    assert dev.counters["violations"] == 50 and len(dev.violations) == 50
    assert len(caplog.records) == 20

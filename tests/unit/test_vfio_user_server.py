"""vfio-user round trips through a real Unix socket (and a socketpair): every command, DMA, interrupts,
posted writes, reset, disconnect/reconnect."""

from __future__ import annotations

import mmap
import os
import select
import socket
import threading

import pytest

from hvlab.protocol import vfio_user as P
from hvlab.vfio_user import BytearrayDma, VfioUserClient, VfioUserError, VfioUserServer
from hvlab.vfio_user import pci as C
from hvlab.vfio_user import sample as S
from hvlab.vfio_user.device import DmaError
from hvlab.vfio_user.sample import SampleDevice

GPA = 0x10_0000
MEM = 1 << 20


@pytest.fixture
def device():
    return SampleDevice()


@pytest.fixture
def server(device, tmp_path):
    srv = VfioUserServer(device, tmp_path / "dev.sock", io_timeout=0.5, dma_timeout=3.0).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    c = VfioUserClient.connect(server.path, retry_for=3.0)
    c.negotiate()
    yield c
    c.close()


@pytest.fixture
def guest_memory():
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, MEM)
    m = mmap.mmap(fd, MEM)
    yield fd, m
    m.close()
    os.close(fd)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def fired(fd: int) -> int:
    """Eventfd counter (0 if not signalled); reading resets it."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def reg_write(c: VfioUserClient, reg: int, value: int, posted: bool = False) -> None:
    c.bar_write(0, reg, 8, value, posted=posted)


def reg_read(c: VfioUserClient, reg: int) -> int:
    return c.bar_read(0, reg, 8)


# ---------------------------------------------------------------------------------------------- basics


def test_version_negotiation(server):
    c = VfioUserClient.connect(server.path, retry_for=3.0)
    caps = c.negotiate(max_msg_fds=4, max_data_xfer_size=4096)
    assert caps["max_msg_fds"] == 16 and caps["max_data_xfer_size"] == 1 << 20 and caps["pgsizes"] == 4096
    assert "migration" not in caps and "twin_socket" not in caps and "write_multiple" not in caps
    assert c.server_minor == 1
    c.close()
    c = VfioUserClient.connect(server.path, retry_for=3.0)
    caps = c.negotiate(minor=0, write_multiple=True, extra_caps={"twin_socket": {"supported": True}})
    assert c.server_minor == 0 and caps["write_multiple"] is True and "twin_socket" not in caps
    c.close()


def test_device_info(client):
    info = client.get_device_info()
    assert info.argsz == 16 and info.flags == P.VFIO_DEVICE_FLAGS_RESET | P.VFIO_DEVICE_FLAGS_PCI
    assert info.num_regions == 9 and info.num_irqs == 5


def test_region_info(client):
    sizes = {i: client.get_region_info(i).size for i in range(9)}
    assert sizes == {0: 0x1000, 1: 0, 2: 0x4000, 3: 0, 4: 0x20, 5: 0, 6: 0, 7: 4096, 8: 0}
    cfg = client.get_region_info(P.PciRegion.CONFIG)
    assert cfg.readable and cfg.writable and not cfg.mappable and cfg.fd is None and cfg.argsz == 32
    assert client.get_region_info(1).flags == 0


def test_region_io_fds_offers_none(client):
    hdr, subs, fds = client.get_region_io_fds(0)
    assert hdr.count == 0 and subs == [] and fds == []


def test_irq_info(client):
    got = {i: client.get_irq_info(i) for i in range(5)}
    assert [got[i].count for i in range(5)] == [1, 4, 8, 1, 1]
    assert got[0].flags == P.VFIO_IRQ_INFO_EVENTFD | P.VFIO_IRQ_INFO_MASKABLE | P.VFIO_IRQ_INFO_AUTOMASKED
    assert got[1].flags & P.VFIO_IRQ_INFO_NORESIZE and got[2].flags & P.VFIO_IRQ_INFO_MASKABLE
    assert got[3].flags == got[4].flags == P.VFIO_IRQ_INFO_EVENTFD


def test_config_space_through_socket(client):
    assert client.config_read(0, 4) == 0x00051B36
    assert client.config_read(C.CLASS_PROG, 3) == 0xFF0000 >> 0 & 0xFFFFFF
    client.config_write(C.BAR0, 4, 0xFFFFFFFF)
    assert client.config_read(C.BAR0, 4) == 0xFFFFF000
    client.config_write(C.BAR0 + 8, 4, 0xFFFFFFFF)
    client.config_write(C.BAR0 + 12, 4, 0xFFFFFFFF)
    assert (
        client.config_read(C.BAR0 + 8, 4) == 0xFFFFC004 and client.config_read(C.BAR0 + 12, 4) == 0xFFFFFFFF
    )
    client.config_write(C.BAR0 + 16, 4, 0xFFFFFFFF)
    assert client.config_read(C.BAR0 + 16, 4) == 0xFFFFFFE1
    client.config_write(C.ROM_ADDRESS, 4, 0xFFFFFFFF)
    assert client.config_read(C.ROM_ADDRESS, 4) == 0
    ids, ptr = [], client.config_read(C.CAPABILITY_LIST, 1)
    while ptr:
        ids.append(client.config_read(ptr, 1))
        ptr = client.config_read(ptr + 1, 1)
    assert ids == [C.CAP_ID_EXP, C.CAP_ID_MSI, C.CAP_ID_MSIX]


def test_bar_read_write(client, device):
    assert reg_read(client, S.REG_ID) == S.ID_VALUE
    reg_write(client, S.REG_SCRATCH, 0x1122334455667788)
    assert reg_read(client, S.REG_SCRATCH) == 0x1122334455667788
    assert client.bar_read(0, S.REG_SCRATCH + 2, 2) == 0x5566
    client.region_write(4, 4, b"io!")
    assert client.region_read(4, 4, 3) == b"io!"
    client.region_write(0, S.BUFFER, bytes(range(256)) * 8)
    assert client.region_read(0, S.BUFFER, 0x800) == bytes(range(256)) * 8


def test_posted_writes_are_ordered_and_unanswered(client, device):
    for i in range(50):
        reg_write(client, S.REG_SCRATCH, i, posted=True)
    # Nothing comes back for posted writes ...
    r, _, _ = select.select([client.sock], [], [], 0.3)
    assert not r
    # ... and a later read sees all of them, in order.
    assert reg_read(client, S.REG_SCRATCH) == 49
    assert reg_read(client, S.REG_WRITES) == 50


def test_write_multi(server, device):
    c = VfioUserClient.connect(server.path, retry_for=3.0)
    c.negotiate(write_multiple=True)
    c.region_write_multi([(0, S.REG_SCRATCH, (7).to_bytes(8, "little")), (4, 0, b"ab"), (4, 2, b"c")])
    assert reg_read(c, S.REG_SCRATCH) == 7 and c.region_read(4, 0, 3) == b"abc"
    c.region_write_multi([(4, 8, b"\x01")], posted=False)
    assert c.region_read(4, 8, 1) == b"\x01"
    c.close()


def test_reset(client, device):
    reg_write(client, S.REG_SCRATCH, 5)
    client.config_write(C.COMMAND, 2, C.CMD_MEMORY | C.CMD_MASTER)
    client.config_write(device.config.msix_offset + 2, 2, C.MSIX_FLAGS_ENABLE)
    client.region_write(2, 12, b"\0\0\0\0")  # unmask MSI-X vector 0
    efd = eventfd()
    client.set_irq_eventfds(P.PciIrq.MSIX, [efd])
    client.reset()
    assert device.resets == 1 and reg_read(client, S.REG_SCRATCH) == 0
    assert client.config_read(C.COMMAND, 2) == 0
    assert client.region_read(2, 12, 4) == b"\x01\0\0\0"  # vector masked again
    assert device.msix_events[-1] == (False, False)
    # eventfds stay wired across a reset
    client.config_write(device.config.msix_offset + 2, 2, C.MSIX_FLAGS_ENABLE)
    client.region_write(2, 12, b"\0\0\0\0")
    reg_write(client, S.REG_IRQ, 0)
    assert fired(efd) == 1
    os.close(efd)


# ---------------------------------------------------------------------------------------------- DMA


def test_dma_map_fd_and_device_dma(client, device, guest_memory):
    fd, m = guest_memory
    client.dma_map(GPA, MEM, fd, 0)
    m[0x3000:0x3010] = b"from the guest.."
    reg_write(client, S.REG_DMA_ADDR, GPA + 0x3000)
    reg_write(client, S.REG_DMA_LEN, 16)
    reg_write(client, S.REG_DMA_CMD, S.DMA_TO_DEVICE)
    assert reg_read(client, S.REG_DMA_CMD) == 0
    assert client.region_read(0, S.BUFFER, 16) == b"from the guest.."
    client.region_write(0, S.BUFFER, b"to the guest!!!!")
    reg_write(client, S.REG_DMA_ADDR, GPA + MEM - 8)  # last 8 bytes of the window
    reg_write(client, S.REG_DMA_LEN, 8)
    reg_write(client, S.REG_DMA_CMD, S.DMA_FROM_DEVICE)
    assert reg_read(client, S.REG_DMA_CMD) == 0 and m[MEM - 8 : MEM] == b"to the g"
    view = device.dma_view(GPA + 0x3000, 4)
    assert view is not None and bytes(view) == b"from" and view.readonly
    view.release()
    # Crossing the end of the window is refused.
    reg_write(client, S.REG_DMA_LEN, 16)
    reg_write(client, S.REG_DMA_CMD, S.DMA_TO_DEVICE)
    assert reg_read(client, S.REG_DMA_CMD) == 14  # EFAULT


def test_dma_map_at_file_offset_and_adjacent_windows(client, device, guest_memory):
    fd, m = guest_memory
    client.dma_map(GPA, 0x1000, fd, 0x5000)
    client.dma_map(GPA + 0x1000, 0x1000, fd, 0x1000)
    m[0x5FFC:0x6000] = b"abcd"
    m[0x1000:0x1004] = b"efgh"
    assert device.dma_read(GPA + 0xFFC, 8) == b"abcdefgh"  # spans both windows
    device.dma_write(GPA + 0xFFE, b"XYZW")
    assert m[0x5FFE:0x6000] == b"XY" and m[0x1000:0x1002] == b"ZW"
    assert device.dma_view(GPA + 0xFFC, 8) is None  # not contiguous in one window


def test_dma_map_unaligned_file_offset(client, device, guest_memory):
    fd, m = guest_memory
    client.dma_map(GPA, 0x1000, fd, 0x2123)
    m[0x2123:0x2127] = b"odd!"
    assert device.dma_read(GPA, 4) == b"odd!"


def test_dma_unmap(client, device, guest_memory):
    fd, _ = guest_memory
    client.dma_map(GPA, 0x2000, fd, 0)
    client.dma_map(GPA + 0x4000, 0x2000, fd, 0x4000)
    client.dma_unmap(GPA, 0x2000)
    with pytest.raises(DmaError):
        device.dma_read(GPA, 4)
    assert device.dma_read(GPA + 0x4000, 4) == bytes(4)
    client.dma_unmap(unmap_all=True)
    with pytest.raises(DmaError):
        device.dma_read(GPA + 0x4000, 4)


def test_dma_read_only_window(client, device, guest_memory):
    fd, _ = guest_memory
    client.dma_map(GPA, 0x1000, fd, 0, writable=False)
    assert device.dma_read(GPA, 4) == bytes(4)
    with pytest.raises(DmaError) as e:
        device.dma_write(GPA, b"x")
    assert e.value.errno == 1  # EPERM


def test_fdless_dma_through_messages(server, device):
    mem = bytearray(0x4000)
    mem[0x100:0x108] = b"fdlessRD"
    c = VfioUserClient.connect(server.path, retry_for=3.0, dma_handler=BytearrayDma(GPA, mem))
    c.negotiate(max_data_xfer_size=64)  # forces the server to split DMA into 64-byte messages
    c.dma_map(GPA, 0x4000)
    reg_write(c, S.REG_DMA_ADDR, GPA + 0x100)
    reg_write(c, S.REG_DMA_LEN, 200)
    reg_write(c, S.REG_DMA_CMD, S.DMA_TO_DEVICE)  # server sends DMA_READ while we wait for the reply
    assert reg_read(c, S.REG_DMA_CMD) == 0
    assert c.region_read(0, S.BUFFER, 8) == b"fdlessRD"
    c.region_write(0, S.BUFFER, b"W" * 200)
    reg_write(c, S.REG_DMA_ADDR, GPA + 0x1000)
    reg_write(c, S.REG_DMA_CMD, S.DMA_FROM_DEVICE, posted=True)  # DMA_WRITE arrives while we're idle
    assert reg_read(c, S.REG_DMA_CMD) == 0  # served while waiting for this reply
    assert mem[0x1000 : 0x1000 + 200] == b"W" * 200
    # The client refusing (outside its memory) surfaces as an errno in the device.
    reg_write(c, S.REG_DMA_ADDR, GPA + 0x3FF0)
    reg_write(c, S.REG_DMA_CMD, S.DMA_FROM_DEVICE)
    assert reg_read(c, S.REG_DMA_CMD) == 14
    c.close()


def test_fdless_dma_from_another_thread(server, device):
    mem = bytearray(b"threaded" * 16)
    c = VfioUserClient.connect(server.path, retry_for=3.0, dma_handler=BytearrayDma(GPA, mem))
    c.negotiate()
    c.dma_map(GPA, 0x1000)
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(device.dma_read(GPA, 16)))
    t.start()
    while t.is_alive():
        c.process_incoming(0.1)
    t.join()
    assert got == [b"threadedthreaded"]
    c.close()


# ---------------------------------------------------------------------------------------------- interrupts


def enable_msix(c: VfioUserClient, dev: SampleDevice, fmask: bool = False) -> None:
    c.config_write(
        dev.config.msix_offset + 2, 2, C.MSIX_FLAGS_ENABLE | (C.MSIX_FLAGS_MASKALL if fmask else 0)
    )


def msix_vector_mask(c: VfioUserClient, vector: int, masked: bool) -> None:
    c.region_write(2, vector * 16 + 12, (1 if masked else 0).to_bytes(4, "little"))


def pba(c: VfioUserClient) -> int:
    return int.from_bytes(c.region_read(2, 0x2000, 8), "little")


def test_msix_delivery_masking_and_pending(client, device):
    fds = [eventfd() for _ in range(8)]
    client.set_irq_eventfds(P.PciIrq.MSIX, fds)
    enable_msix(client, device)
    assert device.msix_events == [(True, False)]
    # The guest programs the table (as hvlab's VMM forwards it); vectors start masked, so the
    # interrupt becomes pending and nothing fires.
    msix_vector_mask(client, 3, True)
    reg_write(client, S.REG_IRQ, 3)
    assert fired(fds[3]) == 0 and pba(client) == 1 << 3
    # Unmasking the vector delivers it and clears the pending bit.
    msix_vector_mask(client, 3, False)
    assert fired(fds[3]) == 1 and pba(client) == 0
    reg_write(client, S.REG_IRQ, 3)
    assert fired(fds[3]) == 1
    # Function mask holds every vector.
    enable_msix(client, device, fmask=True)
    reg_write(client, S.REG_IRQ, 3)
    assert fired(fds[3]) == 0 and pba(client) == 1 << 3
    enable_msix(client, device)
    assert fired(fds[3]) == 1 and pba(client) == 0
    # vfio-level mask (SET_IRQS ACTION_MASK) as QEMU uses it.
    client.mask_irq(P.PciIrq.MSIX, 3)
    reg_write(client, S.REG_IRQ, 3)
    assert fired(fds[3]) == 0 and pba(client) == 1 << 3
    client.unmask_irq(P.PciIrq.MSIX, 3)
    assert fired(fds[3]) == 1 and pba(client) == 0
    # Out-of-range vector is ignored; PBA writes are ignored.
    reg_write(client, S.REG_IRQ, 8)
    assert all(fired(fd) == 0 for fd in fds)
    for fd in fds:
        os.close(fd)


def test_msix_qemu_style_client_emulated_table(client, device):
    """QEMU keeps the MSI-X table to itself: vectors are masked with SET_IRQS, the PBA is read from us."""
    fds = [eventfd() for _ in range(8)]
    client.set_irq_eventfds(P.PciIrq.MSIX, fds)
    enable_msix(client, device)
    reg_write(client, S.REG_IRQ, 5)  # our table was never written: its reset-state mask bits don't count
    assert fired(fds[5]) == 1
    client.mask_irq(P.PciIrq.MSIX, 5)
    reg_write(client, S.REG_IRQ, 5)
    assert fired(fds[5]) == 0 and pba(client) == 1 << 5
    client.unmask_irq(P.PciIrq.MSIX, 5)
    assert fired(fds[5]) == 1 and pba(client) == 0
    for fd in fds:
        os.close(fd)


def test_msix_table_roundtrip(client, device):
    client.region_write(
        2, 0x10, (0xFEE00000).to_bytes(4, "little") + bytes(4) + (0x4021).to_bytes(4, "little")
    )
    assert client.region_read(2, 0x10, 12)[8:12] == (0x4021).to_bytes(4, "little")
    assert device.msix_table.entry(1)[:2] == (0xFEE00000, 0x4021)


def test_msi_delivery_and_per_vector_mask(client, device):
    fds = [eventfd() for _ in range(4)]
    client.set_irq_eventfds(P.PciIrq.MSI, fds)
    o = device.config.msi_offset
    client.config_write(o + 2, 2, C.MSI_FLAGS_ENABLE | (2 << 4))  # 4 vectors
    assert device.msi_events == [(True, 4)]
    reg_write(client, S.REG_IRQ, 2)
    assert fired(fds[2]) == 1
    client.config_write(o + 16, 4, 0b0100)  # mask vector 2
    reg_write(client, S.REG_IRQ, 2)
    assert fired(fds[2]) == 0 and client.config_read(o + 20, 4) == 0b0100
    client.config_write(o + 16, 4, 0)
    assert fired(fds[2]) == 1 and client.config_read(o + 20, 4) == 0
    # Only the enabled vectors count.
    client.config_write(o + 2, 2, C.MSI_FLAGS_ENABLE)  # 1 vector
    reg_write(client, S.REG_IRQ, 2)
    assert fired(fds[2]) == 0
    for fd in fds:
        os.close(fd)


def test_intx_automask_and_unmask(client, device):
    efd = eventfd()
    client.set_irq_eventfds(P.PciIrq.INTX, [efd])
    assert device.irq(0) and fired(efd) == 1
    assert client.config_read(C.STATUS, 2) & C.STATUS_INTERRUPT
    assert not device.irq(0) and fired(efd) == 0  # automasked
    client.unmask_irq(P.PciIrq.INTX, 0)
    assert fired(efd) == 1  # still asserted: fires again on unmask
    device.intx_deassert()
    client.unmask_irq(P.PciIrq.INTX, 0)
    assert fired(efd) == 0
    client.config_write(C.COMMAND, 2, C.CMD_INTX_DISABLE)
    assert not device.irq(0) and fired(efd) == 0
    os.close(efd)


def test_intx_unmask_eventfd(client, device, server):
    efd, unmask = eventfd(), eventfd()
    client.set_irq_eventfds(P.PciIrq.INTX, [efd])
    client.set_irqs(
        P.PciIrq.INTX, P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_UNMASK, 0, 1, fds=[unmask]
    )
    done = threading.Event()
    server.call_soon(lambda: (device.irq(0), device.irq(0), done.set()))
    assert done.wait(2) and fired(efd) == 1
    os.write(unmask, (1).to_bytes(8, "little"))  # the resampler's signal
    # Still asserted (it became pending while masked), so the unmask re-delivers it.
    assert select.select([efd], [], [], 2)[0] and fired(efd) == 1
    assert device.irq_lines[P.PciIrq.INTX].masked[0]  # automasked again
    os.close(efd)
    os.close(unmask)


def test_set_irqs_trigger_bool_and_disable(client, device):
    fds = [eventfd() for _ in range(4)]
    client.set_irq_eventfds(P.PciIrq.MSI, fds)
    client.trigger_irq(P.PciIrq.MSI, 0, 4)
    assert [fired(fd) for fd in fds] == [1, 1, 1, 1]
    client.set_irqs(
        P.PciIrq.MSI,
        P.VFIO_IRQ_SET_DATA_BOOL | P.VFIO_IRQ_SET_ACTION_TRIGGER,
        1,
        3,
        bools=[True, False, True],
    )
    assert [fired(fd) for fd in fds] == [0, 1, 0, 1]
    # De-assign two vectors by sending no fds, then disable the whole index.
    client.set_irqs(P.PciIrq.MSI, P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_TRIGGER, 0, 2)
    client.trigger_irq(P.PciIrq.MSI, 0, 4)
    assert [fired(fd) for fd in fds] == [0, 0, 1, 1]
    client.disable_irqs(P.PciIrq.MSI)
    client.trigger_irq(P.PciIrq.MSI, 0, 4)
    assert [fired(fd) for fd in fds] == [0, 0, 0, 0]
    for fd in fds:
        os.close(fd)


def test_many_eventfds_are_chunked(server, device):
    c = VfioUserClient.connect(server.path, retry_for=3.0)
    c.negotiate()
    c.server_max_fds = 3  # pretend the server takes only 3 per message
    fds = [eventfd() for _ in range(8)]
    c.set_irq_eventfds(P.PciIrq.MSIX, fds)
    assert all(fd is not None for fd in device.irq_lines[P.PciIrq.MSIX].fds)
    c.trigger_irq(P.PciIrq.MSIX, 7)
    assert fired(fds[7]) == 1
    for fd in fds:
        os.close(fd)
    c.close()


def test_err_and_req_notifications(client, device, server):
    err, req = eventfd(), eventfd()
    client.set_irq_eventfds(P.PciIrq.ERR, [err])
    client.set_irq_eventfds(P.PciIrq.REQ, [req])
    assert device.request_release() and fired(req) == 1
    assert device.signal_error() and fired(err) == 1
    os.close(err)
    os.close(req)


# ---------------------------------------------------------------------------------------------- connections


def test_disconnect_keeps_state_and_unmaps(server, device, guest_memory):
    fd, _ = guest_memory
    efd = eventfd()
    c = VfioUserClient.connect(server.path, retry_for=3.0)
    c.negotiate()
    c.dma_map(GPA, MEM, fd, 0)
    c.set_irq_eventfds(P.PciIrq.MSI, [efd])
    reg_write(c, S.REG_SCRATCH, 0xABCD)
    c.config_write(C.COMMAND, 2, C.CMD_MEMORY)
    c.close()
    assert server.wait_for(lambda: server.conn is None, 3)
    with pytest.raises(DmaError):
        device.dma_read(GPA, 1)
    assert device.irq_lines[P.PciIrq.MSI].fds == [None] * 4
    c = VfioUserClient.connect(server.path, retry_for=3.0)
    c.negotiate()
    assert reg_read(c, S.REG_SCRATCH) == 0xABCD and c.config_read(C.COMMAND, 2) == C.CMD_MEMORY
    reg_write(c, S.REG_DMA_ADDR, GPA)
    reg_write(c, S.REG_DMA_LEN, 4)
    reg_write(c, S.REG_DMA_CMD, S.DMA_TO_DEVICE)
    assert reg_read(c, S.REG_DMA_CMD) == 14  # EFAULT: the old mapping is gone
    c.dma_map(GPA, MEM, fd, 0)  # and the same window can be mapped again
    c.close()
    os.close(efd)
    assert server.connections_served == 2


def test_sequential_clients(server):
    first = VfioUserClient.connect(server.path, retry_for=3.0)
    first.negotiate()
    second = VfioUserClient.connect(server.path, retry_for=3.0, timeout=0.5)
    # The second waits in the backlog while the first is served.
    with pytest.raises(TimeoutError):
        second.negotiate()
    assert first.get_device_info().num_regions == 9
    first.close()
    second.close()
    third = VfioUserClient.connect(server.path, retry_for=3.0)
    third.negotiate()
    assert third.get_device_info().num_irqs == 5
    third.close()


def test_socketpair_connection(device):
    srv = VfioUserServer(device).start()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.add_connection(a)
    c = VfioUserClient(b)
    c.negotiate()
    assert c.config_read(0, 2) == 0x1B36
    c.close()
    assert srv.wait_for(lambda: srv.conn is None, 3)
    srv.stop()


def test_msi_only_mode(tmp_path):
    dev = SampleDevice(msix=None)
    with VfioUserServer(dev, tmp_path / "msi.sock") as srv:
        c = VfioUserClient.connect(srv.path, retry_for=3.0)
        c.negotiate()
        assert c.get_irq_info(P.PciIrq.MSIX).count == 0
        ids, ptr = [], c.config_read(C.CAPABILITY_LIST, 1)
        while ptr:
            ids.append(c.config_read(ptr, 1))
            ptr = c.config_read(ptr + 1, 1)
        assert C.CAP_ID_MSIX not in ids and C.CAP_ID_MSI in ids
        with pytest.raises(VfioUserError):
            c.set_irq_eventfds(P.PciIrq.MSIX, [eventfd()])
        c.close()


def test_device_helpers_need_a_server():
    dev = SampleDevice()
    with pytest.raises(DmaError):
        dev.dma_read(0, 1)
    assert dev.irq(0) is False  # INTx with nothing wired


def test_call_later_and_add_reader(server, device):
    hits: list[str] = []
    r, w = os.pipe()
    device.add_reader(r, lambda: hits.append(os.read(r, 10).decode()))
    device.call_later(0.05, hits.append, "timer")
    os.write(w, b"io")
    assert server.wait_for(lambda: len(hits) == 2, 3)
    assert sorted(hits) == ["io", "timer"]
    device.remove_reader(r)
    os.close(r)
    os.close(w)


# ---------------------------------------------------------------------------------------------- mmap-able BARs


class MmapDevice(SampleDevice):
    """Sample device whose BAR2 upper half (beyond the MSI-X table and PBA) is mmap-able."""

    mmap_areas = {2: [(0x3000, 0x1000)]}  # noqa: RUF012


def test_sparse_mmap_region(tmp_path):
    dev = MmapDevice()
    with VfioUserServer(dev, tmp_path / "mm.sock") as srv:
        c = VfioUserClient.connect(srv.path, retry_for=3.0)
        c.negotiate()
        info = c.get_region_info(2)
        assert info.mappable and info.flags & P.VFIO_REGION_INFO_FLAG_CAPS
        assert info.sparse_areas == [(0x3000, 0x1000)] and info.fd is not None and info.argsz == 32 + 32
        short = c.request(
            P.Command.DEVICE_GET_REGION_INFO,
            P.RegionInfo.build(dict(argsz=32, flags=0, index=2, cap_offset=0, size=0, offset=0)),
        )
        assert (
            len(short.payload) == 32 and P.RegionInfo.parse(short.payload).argsz == 64
        )  # "ask again, bigger"
        for fd in short.fds:
            os.close(fd)
        assert not c.get_region_info(0).mappable
        m = mmap.mmap(info.fd, 0x4000, mmap.MAP_SHARED, offset=info.offset)
        m[0x3000:0x3004] = b"mmio"
        assert bytes(dev.bar_memory(2)[0x3000:0x3004]) == b"mmio"
        assert c.region_read(2, 0x3000, 4) == b"mmio"  # message access sees the same memory
        c.region_write(2, 0x3004, b"!!")
        assert m[0x3004:0x3006] == b"!!"
        m.close()
        os.close(info.fd)
        c.close()


def test_mmap_area_validation():
    with pytest.raises(ValueError, match="page-aligned"):
        SampleDevice(mmap_areas={0: [(0x100, 0x1000)]})
    with pytest.raises(ValueError, match="MSI-X"):
        SampleDevice(mmap_areas={2: [(0x0, 0x1000)]})
    with pytest.raises(ValueError, match="not a memory BAR"):
        SampleDevice(mmap_areas={4: [(0x0, 0x1000)]})


def test_mmap_backed_dma_from_another_thread(client, device, guest_memory):
    fd, m = guest_memory
    client.dma_map(GPA, MEM, fd, 0)
    m[0:4] = b"thrd"
    out: list[bytes] = []
    t = threading.Thread(
        target=lambda: (out.append(device.dma_read(GPA, 4)), device.dma_write(GPA + 4, b"done"))
    )
    t.start()
    t.join(5)
    assert out == [b"thrd"] and m[4:8] == b"done"


def test_commands_arriving_during_fdless_dma_in_a_callback(server, device):
    """A DMA request made from a loop callback queues client commands that arrive meanwhile; they are
    served afterwards, in order."""
    mem = bytearray(b"cb-dma!!" * 8)
    c = VfioUserClient.connect(server.path, retry_for=3.0, dma_handler=BytearrayDma(GPA, mem))
    c.negotiate()
    c.dma_map(GPA, 0x1000)
    got: list[bytes] = []
    server.call_soon(lambda: got.append(device.dma_read(GPA, 8)))
    reg_write(c, S.REG_SCRATCH, 41, posted=True)
    reg_write(c, S.REG_SCRATCH, 42, posted=True)
    assert reg_read(c, S.REG_SCRATCH) == 42  # the DMA_READ is served while this waits
    assert server.wait_for(lambda: got == [b"cb-dma!!"], 3)
    c.close()

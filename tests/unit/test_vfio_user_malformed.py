"""Malformed, truncated, oversized and out-of-order client messages: each gets an error reply with an
errno, is logged naming command and field, and the server keeps serving."""

from __future__ import annotations

import errno
import logging
import os
import random
import select
import socket
import time

import pytest
from construct import Container

from hvlab.protocol import vfio_user as P
from hvlab.vfio_user import PciDevice, VfioUserClient, VfioUserError, VfioUserServer
from hvlab.vfio_user.pci import Bar
from hvlab.vfio_user.sample import SampleDevice
from hvlab.vfio_user.transport import DRAIN_LIMIT, send_raw

LOGGER = "hvlab.vfio_user"


@pytest.fixture
def device():
    return SampleDevice()


@pytest.fixture
def server(device, tmp_path):
    srv = VfioUserServer(device, tmp_path / "dev.sock", io_timeout=0.3).start()
    yield srv
    srv.stop()


def connect(server: VfioUserServer, negotiate: bool = True) -> VfioUserClient:
    c = VfioUserClient.connect(server.path, retry_for=3.0, timeout=3.0)
    if negotiate:
        c.negotiate()
    return c


@pytest.fixture
def client(server):
    c = connect(server)
    yield c
    c.close()


def err_of(c: VfioUserClient, command: int, payload: bytes = b"", fds=(), flags: int = 0) -> int:
    reply = c.request(command, payload, fds, flags, check=False)
    assert reply.is_reply and reply.command == command
    if not reply.is_error:
        return 0
    assert reply.payload == b""  # an error reply carries only the header
    return reply.error


def still_serving(c: VfioUserClient) -> None:
    assert c.get_device_info().num_regions == 9


def logged(caplog, *fragments: str) -> bool:
    return any(
        r.name == LOGGER and r.levelno >= logging.WARNING and all(f in r.getMessage() for f in fragments)
        for r in caplog.records
    )


def region_rw(region: int, offset: int, count: int, data: bytes = b"") -> bytes:
    return P.RegionAccess.build(Container(offset=offset, region=region, count=count)) + data


# ---------------------------------------------------------------------------------------------- ordering


def test_command_before_negotiation(server, caplog):
    c = connect(server, negotiate=False)
    assert (
        err_of(
            c,
            P.Command.DEVICE_GET_INFO,
            P.DeviceInfo.build(Container(argsz=16, flags=0, num_regions=0, num_irqs=0)),
        )
        == errno.EINVAL
    )
    assert logged(caplog, "DEVICE_GET_INFO", "command", "before VERSION")
    c.negotiate()
    still_serving(c)
    c.close()


def test_version_twice_and_bad_versions(server, caplog):
    c = connect(server, negotiate=False)
    bad_major = P.Version.build(Container(major=1, minor=0, data=b""))
    assert err_of(c, P.Command.VERSION, bad_major) == errno.ENOTSUP
    assert logged(caplog, "VERSION", "major")
    assert (
        err_of(c, P.Command.VERSION, P.Version.build(Container(major=0, minor=1, data=b"{oops\0")))
        == errno.EINVAL
    )
    assert logged(caplog, "VERSION", "version data")
    assert err_of(c, P.Command.VERSION, b"\0") == errno.EINVAL  # shorter than major+minor
    assert logged(caplog, "VERSION", "msg_size")
    twin = P.capabilities_json({"twin_socket": 5})
    assert (
        err_of(c, P.Command.VERSION, P.Version.build(Container(major=0, minor=1, data=twin))) == errno.EINVAL
    )
    # A version without JSON data is fine (all defaults) ...
    assert err_of(c, P.Command.VERSION, P.Version.build(Container(major=0, minor=1, data=b""))) == 0
    # ... but only once.
    assert (
        err_of(c, P.Command.VERSION, P.Version.build(Container(major=0, minor=1, data=b""))) == errno.EINVAL
    )
    assert logged(caplog, "VERSION", "twice")
    still_serving(c)
    c.close()


def test_unsolicited_reply_is_ignored(client, caplog):
    send_raw(client.sock, P.build_header(77, P.Command.REGION_READ, 0, P.MSG_TYPE_REPLY))
    assert not select.select([client.sock], [], [], 0.2)[0]
    assert logged(caplog, "REGION_READ", "flags", "unsolicited")
    still_serving(client)


# ---------------------------------------------------------------------------------------------- headers


def test_unknown_command(client, caplog):
    assert err_of(client, 99, b"whatever") == errno.ENOSYS
    assert err_of(client, 14) == errno.ENOSYS
    assert logged(caplog, "UNKNOWN(99)", "command")
    still_serving(client)


@pytest.mark.parametrize("command", [P.Command.DMA_READ, P.Command.DMA_WRITE])
def test_server_direction_commands_refused(client, command):
    assert err_of(client, command, P.DmaAccess.build(Container(address=0, count=4))) == errno.EINVAL
    still_serving(client)


@pytest.mark.parametrize(
    "command", [P.Command.DEVICE_FEATURE, P.Command.MIG_DATA_READ, P.Command.MIG_DATA_WRITE]
)
def test_migration_not_supported(client, command):
    assert err_of(client, command, bytes(8)) == errno.ENOTSUP


@pytest.mark.parametrize("flags", [0x2, 0x40, P.MSG_FLAG_ERROR, 0x8000_0000])
def test_bad_header_flags(client, caplog, flags):
    mid = client.new_id()
    send_raw(client.sock, P.build_header(mid, P.Command.DEVICE_RESET, 0, flags))
    reply = client.wait_reply(mid)
    assert reply.is_error and reply.error == errno.EINVAL
    assert logged(caplog, "DEVICE_RESET", "flags")
    still_serving(client)


def test_msg_size_smaller_than_header(client, caplog):
    mid = client.new_id()
    hdr = P.Header.build(Container(msg_id=mid, command=P.Command.DEVICE_RESET, msg_size=8, flags=0, error=0))
    send_raw(client.sock, hdr)
    reply = client.wait_reply(mid)
    assert reply.is_error and reply.error == errno.EINVAL
    assert logged(caplog, "DEVICE_RESET", "msg_size")
    still_serving(client)


def test_oversized_message_is_drained(client, server, caplog):
    size = server.max_msg_size + 4096
    mid = client.new_id()
    send_raw(
        client.sock, P.build_header(mid, P.Command.REGION_WRITE, size - P.HEADER_SIZE) + bytes(size - 16)
    )
    reply = client.wait_reply(mid)
    assert reply.is_error and reply.error == errno.E2BIG
    assert logged(caplog, "REGION_WRITE", "msg_size")
    still_serving(client)  # the stream stayed in step


def test_absurd_message_size_drops_only_the_connection(client, server):
    mid = client.new_id()
    send_raw(client.sock, P.build_header(mid, P.Command.REGION_WRITE, DRAIN_LIMIT + 1))
    reply = client.wait_reply(mid)
    assert reply.is_error and reply.error == errno.E2BIG
    assert server.wait_for(lambda: server.conn is None, 3)
    c2 = connect(server)
    still_serving(c2)
    c2.close()


def test_stalled_payload_times_out(client, server, caplog):
    mid = client.new_id()
    send_raw(client.sock, P.build_header(mid, P.Command.DMA_MAP, 32) + bytes(10))
    reply = client.wait_reply(mid)
    assert reply.is_error and reply.error == errno.EINVAL
    assert logged(caplog, "DMA_MAP", "truncated")
    assert server.wait_for(lambda: server.conn is None, 3)
    c2 = connect(server)
    still_serving(c2)
    c2.close()


def test_stalled_header_drops_connection(client, server):
    send_raw(client.sock, b"\x01\x00\x04")
    assert server.wait_for(lambda: server.conn is None, 3)
    c2 = connect(server)
    still_serving(c2)
    c2.close()


def test_disconnect_mid_message(server):
    c = connect(server)
    send_raw(c.sock, P.build_header(1, P.Command.REGION_WRITE, 100) + bytes(20))
    c.close()
    assert server.wait_for(lambda: server.conn is None, 3)
    c2 = connect(server)
    still_serving(c2)
    c2.close()


# ---------------------------------------------------------------------------------------------- payloads


@pytest.mark.parametrize(
    ("command", "payload"),
    [
        (P.Command.DMA_MAP, bytes(16)),
        (P.Command.DMA_UNMAP, bytes(8)),
        (P.Command.DEVICE_GET_INFO, bytes(4)),
        (P.Command.DEVICE_GET_REGION_INFO, bytes(12)),
        (P.Command.DEVICE_GET_REGION_IO_FDS, bytes(8)),
        (P.Command.DEVICE_GET_IRQ_INFO, bytes(8)),
        (P.Command.DEVICE_SET_IRQS, bytes(16)),
        (P.Command.REGION_READ, bytes(12)),
        (P.Command.REGION_WRITE, bytes(15)),
        (P.Command.REGION_WRITE_MULTI, bytes(4)),
    ],
)
def test_truncated_payloads(client, caplog, command, payload):
    assert err_of(client, command, payload) == errno.EINVAL
    assert logged(caplog, P.Command(command).name, "msg_size")
    still_serving(client)


@pytest.mark.parametrize(
    ("command", "payload", "field"),
    [
        (
            P.Command.DEVICE_GET_INFO,
            P.DeviceInfo.build(Container(argsz=8, flags=0, num_regions=0, num_irqs=0)),
            "argsz",
        ),
        (
            P.Command.DEVICE_GET_REGION_INFO,
            P.RegionInfo.build(Container(argsz=32, flags=0, index=9, cap_offset=0, size=0, offset=0)),
            "index",
        ),
        (
            P.Command.DEVICE_GET_REGION_INFO,
            P.RegionInfo.build(Container(argsz=16, flags=0, index=0, cap_offset=0, size=0, offset=0)),
            "argsz",
        ),
        (
            P.Command.DEVICE_GET_REGION_IO_FDS,
            P.RegionIoFds.build(Container(argsz=16, flags=0, index=42, count=0)),
            "index",
        ),
        (
            P.Command.DEVICE_GET_IRQ_INFO,
            P.IrqInfo.build(Container(argsz=16, flags=0, index=5, count=0)),
            "index",
        ),
        (P.Command.REGION_READ, region_rw(9, 0, 4), "index"),
        (P.Command.REGION_READ, region_rw(0xFFFFFFFF, 0, 4), "index"),
        (P.Command.REGION_READ, region_rw(1, 0, 4), "region"),  # BAR1 not implemented
        (P.Command.REGION_READ, region_rw(P.PciRegion.ROM, 0, 4), "region"),
        (P.Command.REGION_READ, region_rw(0, 0x1000, 4), "offset"),
        (P.Command.REGION_READ, region_rw(0, 0xFFC, 8), "offset"),
        (P.Command.REGION_READ, region_rw(P.PciRegion.CONFIG, 0xFFFFFFFFFFFFFFF0, 4), "offset"),
        (P.Command.REGION_READ, region_rw(0, 0, 0), "count"),
        (P.Command.REGION_READ, region_rw(0, 0, (1 << 20) + 1), "count"),
        (P.Command.REGION_WRITE, region_rw(0, 8, 8, b"1234"), "count"),
        (P.Command.REGION_WRITE, region_rw(4, 0x1E, 4, b"1234"), "offset"),
        (P.Command.REGION_WRITE_MULTI, P.WriteMulti.build(Container(wr_cnt=2)) + bytes(24), "wr_cnt"),
        (
            P.Command.REGION_WRITE_MULTI,
            P.WriteMulti.build(Container(wr_cnt=1))
            + P.WriteOne.build(Container(offset=0, region=0, count=9, data=bytes(8))),
            "count",
        ),
    ],
)
def test_bad_fields(client, caplog, command, payload, field):
    assert err_of(client, command, payload) == errno.EINVAL
    assert logged(caplog, P.Command(command).name, field)
    still_serving(client)


def irq_set(
    flags: int, index: int = P.PciIrq.MSI, start: int = 0, count: int = 1, data: bytes = b""
) -> bytes:
    return (
        P.IrqSet.build(Container(argsz=20 + len(data), flags=flags, index=index, start=start, count=count))
        + data
    )


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (irq_set(P.VFIO_IRQ_SET_DATA_NONE | P.VFIO_IRQ_SET_ACTION_TRIGGER, index=5), "index"),
        (
            irq_set(P.VFIO_IRQ_SET_DATA_NONE | P.VFIO_IRQ_SET_DATA_BOOL | P.VFIO_IRQ_SET_ACTION_TRIGGER),
            "flags",
        ),
        (
            irq_set(P.VFIO_IRQ_SET_DATA_NONE | P.VFIO_IRQ_SET_ACTION_MASK | P.VFIO_IRQ_SET_ACTION_TRIGGER),
            "flags",
        ),
        (irq_set(P.VFIO_IRQ_SET_ACTION_TRIGGER), "flags"),
        (irq_set(P.VFIO_IRQ_SET_DATA_NONE | P.VFIO_IRQ_SET_ACTION_TRIGGER | 0x100), "flags"),
        (irq_set(P.VFIO_IRQ_SET_DATA_NONE | P.VFIO_IRQ_SET_ACTION_TRIGGER, start=3, count=2), "count"),
        (
            irq_set(P.VFIO_IRQ_SET_DATA_NONE | P.VFIO_IRQ_SET_ACTION_TRIGGER, start=0xFFFFFFFF, count=2),
            "count",
        ),
        (irq_set(P.VFIO_IRQ_SET_DATA_NONE | P.VFIO_IRQ_SET_ACTION_MASK, count=0), "count"),
        (irq_set(P.VFIO_IRQ_SET_DATA_BOOL | P.VFIO_IRQ_SET_ACTION_TRIGGER, count=3, data=b"\1"), "msg_size"),
        (
            P.IrqSet.build(
                Container(
                    argsz=4,
                    flags=P.VFIO_IRQ_SET_DATA_NONE | P.VFIO_IRQ_SET_ACTION_TRIGGER,
                    index=1,
                    start=0,
                    count=1,
                )
            ),
            "argsz",
        ),
    ],
)
def test_bad_set_irqs(client, caplog, payload, field):
    assert err_of(client, P.Command.DEVICE_SET_IRQS, payload) == errno.EINVAL
    assert logged(caplog, "DEVICE_SET_IRQS", field)
    still_serving(client)


# ---------------------------------------------------------------------------------------------- fds


def test_wrong_fd_counts(client, caplog):
    e1, e2 = os.eventfd(0), os.eventfd(0)
    trig = P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_TRIGGER
    assert err_of(client, P.Command.DEVICE_SET_IRQS, irq_set(trig, count=1), fds=[e1, e2]) == errno.EINVAL
    assert logged(caplog, "DEVICE_SET_IRQS", "fds")
    assert err_of(client, P.Command.DEVICE_SET_IRQS, irq_set(trig, count=3), fds=[e1]) == errno.EINVAL
    assert err_of(client, P.Command.REGION_READ, region_rw(0, 0, 4), fds=[e1]) == errno.EINVAL
    assert logged(caplog, "REGION_READ", "fds")
    dma = P.DmaMap.build(Container(argsz=32, flags=3, offset=0, address=0x1000, size=0x1000))
    assert err_of(client, P.Command.DMA_MAP, dma, fds=[e1, e2]) == errno.EINVAL
    assert logged(caplog, "DMA_MAP", "fds")
    # Mask-notification eventfds are not offered (except INTx unmask).
    assert (
        err_of(
            client,
            P.Command.DEVICE_SET_IRQS,
            irq_set(P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_MASK),
            fds=[e1],
        )
        == errno.ENOTSUP
    )
    # Something that is not an eventfd (a pipe could block the server when written) is refused.
    r, w = os.pipe()
    assert err_of(client, P.Command.DEVICE_SET_IRQS, irq_set(trig, count=1), fds=[w]) == errno.EINVAL
    assert logged(caplog, "DEVICE_SET_IRQS", "fds", "not an eventfd")
    for fd in (e1, e2, r, w):
        os.close(fd)
    still_serving(client)


def test_server_closes_fds_it_refuses(client, device):
    r, w = os.pipe()
    dma = P.DmaMap.build(Container(argsz=32, flags=3, offset=0, address=0x1000, size=0x1000))
    assert err_of(client, P.Command.DMA_MAP, dma, fds=[w, w]) == errno.EINVAL
    os.close(w)
    # Were any copy of the write end still open in the server, this read would block instead of EOF.
    assert select.select([r], [], [], 2)[0] and os.read(r, 1) == b""
    os.close(r)


# ---------------------------------------------------------------------------------------------- DMA map


def dma_map(address: int, size: int, flags: int = 3, offset: int = 0, argsz: int = 32) -> bytes:
    return P.DmaMap.build(Container(argsz=argsz, flags=flags, offset=offset, address=address, size=size))


def dma_unmap(address: int, size: int, flags: int = 0) -> bytes:
    return P.DmaUnmap.build(Container(argsz=24, flags=flags, address=address, size=size))


def test_dma_map_errors(client, caplog):
    fd = os.memfd_create("g")
    os.ftruncate(fd, 0x10000)
    client.dma_map(0x10000, 0x4000, fd)
    assert err_of(client, P.Command.DMA_MAP, dma_map(0x12000, 0x4000), fds=[fd]) == errno.EEXIST
    assert logged(caplog, "DMA_MAP", "address", "overlaps")
    assert err_of(client, P.Command.DMA_MAP, dma_map(0x20000, 0)) == errno.EINVAL
    assert err_of(client, P.Command.DMA_MAP, dma_map(0x20001, 0x1000)) == errno.EINVAL
    assert err_of(client, P.Command.DMA_MAP, dma_map(0xFFFFFFFFFFFFF000, 0x2000)) == errno.EINVAL
    assert err_of(client, P.Command.DMA_MAP, dma_map(0x20000, 0x1000, flags=4)) == errno.EINVAL
    assert err_of(client, P.Command.DMA_MAP, dma_map(0x20000, 0x1000, argsz=16)) == errno.EINVAL
    # Past the end of the file: refused up front (it would SIGBUS on access otherwise).
    assert (
        err_of(client, P.Command.DMA_MAP, dma_map(0x20000, 0x2000, offset=0xF000), fds=[fd]) == errno.EINVAL
    )
    assert logged(caplog, "DMA_MAP", "offset", "beyond the end")
    r, w = os.pipe()  # not mmap-able
    assert err_of(client, P.Command.DMA_MAP, dma_map(0x20000, 0x1000), fds=[r]) == errno.EINVAL
    assert logged(caplog, "DMA_MAP", "fds", "regular file")
    # An offset that is not page aligned is fine (the server maps from the page below).
    assert err_of(client, P.Command.DMA_MAP, dma_map(0x20000, 0x1000, offset=0x123), fds=[fd]) == 0
    for x in (r, w, fd):
        os.close(x)
    still_serving(client)


def test_dma_unmap_errors(client, caplog):
    fd = os.memfd_create("g")
    os.ftruncate(fd, 0x10000)
    client.dma_map(0x10000, 0x4000, fd)
    assert err_of(client, P.Command.DMA_UNMAP, dma_unmap(0x40000, 0x1000)) == errno.ENOENT
    assert logged(caplog, "DMA_UNMAP", "address", "not mapped")
    assert err_of(client, P.Command.DMA_UNMAP, dma_unmap(0x10000, 0x1000)) == errno.EINVAL
    assert logged(caplog, "DMA_UNMAP", "size", "cuts through")
    assert err_of(client, P.Command.DMA_UNMAP, dma_unmap(0x10000, 0x4000, flags=1)) == errno.ENOTSUP
    assert err_of(client, P.Command.DMA_UNMAP, dma_unmap(0x10000, 0x4000, flags=8)) == errno.EINVAL
    reply = client.request(P.Command.DMA_UNMAP, dma_unmap(0x10000, 0x4000))
    assert P.DmaUnmap.parse(reply.payload).address == 0x10000  # echoes the entry
    assert err_of(client, P.Command.DMA_UNMAP, dma_unmap(0x10000, 0x4000)) == errno.ENOENT
    os.close(fd)
    still_serving(client)


# ---------------------------------------------------------------------------------------------- misc


def test_posted_error_gets_no_reply(client, caplog):
    client.send(P.Command.REGION_WRITE, region_rw(9, 0, 4, b"abcd"), flags=P.MSG_FLAG_NO_REPLY)
    assert not select.select([client.sock], [], [], 0.2)[0]
    assert logged(caplog, "REGION_WRITE", "index")
    still_serving(client)


class Exploding(PciDevice):
    bars = {0: Bar(0x1000)}  # noqa: RUF012

    def bar_read(self, bar, offset, size):
        raise RuntimeError("model bug")


def test_device_exception_becomes_eio(tmp_path, caplog):
    with VfioUserServer(Exploding(), tmp_path / "x.sock") as srv:
        c = VfioUserClient.connect(srv.path, retry_for=3.0)
        c.negotiate()
        with pytest.raises(VfioUserError) as e:
            c.region_read(0, 0, 4)
        assert e.value.errno == errno.EIO
        assert logged(caplog, "REGION_READ", "device model raised")
        still_serving(c)
        c.close()


def test_random_messages_never_kill_the_server(server, device):
    rng = random.Random(1234)
    c = connect(server)
    commands = [int(x) for x in P.Command] + [0, 14, 19, 0xFFFF]
    sent = 0
    for _ in range(400):
        command = rng.choice(commands)
        if command in (P.Command.VERSION, P.Command.DEVICE_RESET):
            continue
        payload = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 4, 16, 20, 24, 32, 40])))
        flags = rng.choice([0, 0, 0, P.MSG_FLAG_NO_REPLY, 1, 0x40])
        mid = c.new_id()
        send_raw(c.sock, P.build_header(mid, command, len(payload), flags) + payload)
        sent += 1
        if flags & P.MSG_FLAG_NO_REPLY or flags & P.MSG_TYPE_MASK == P.MSG_TYPE_REPLY:
            continue
        reply = c.wait_reply(mid)
        assert reply.is_reply
    assert sent > 300
    still_serving(c)
    c.close()
    deadline = time.monotonic() + 3
    c2 = connect(server)
    still_serving(c2)
    c2.close()
    assert time.monotonic() < deadline


def test_raw_socket_garbage_then_new_client(server):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(server.path)
    s.sendall(os.urandom(4096))
    s.close()
    c = connect(server)
    still_serving(c)
    c.close()

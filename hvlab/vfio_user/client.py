"""vfio-user client: drives a device server over a Unix socket.

hvlab's VMM uses it to put a vfio-user function behind its virtual PCI bus (vpci), and the tests use it
to drive the server. Calls are synchronous and thread-safe (one request in flight at a time). The server
may send DMA_READ/DMA_WRITE for fd-less mappings at any time; they are answered from ``dma_handler``
while a reply is awaited, or by ``process_incoming()`` when the caller's event loop sees the socket
readable.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from construct import Container

from hvlab.protocol import vfio_user as P
from hvlab.vfio_user.transport import ConnectionClosed, FramingError, Message, recv_message, send_message

log = logging.getLogger("hvlab.vfio_user")


class VfioUserError(OSError):
    """The server answered a command with an error reply."""

    def __init__(self, err: int, command: int) -> None:
        super().__init__(err, f"{P.command_name(command)} failed: {os.strerror(err) if err else 'error'}")
        self.command = command


@dataclass
class RegionInfo:
    """A parsed DEVICE_GET_REGION_INFO reply."""

    index: int
    flags: int
    size: int
    offset: int
    argsz: int
    sparse_areas: list[tuple[int, int]] = field(default_factory=list)
    fd: int | None = None

    @property
    def readable(self) -> bool:
        return bool(self.flags & P.VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & P.VFIO_REGION_INFO_FLAG_WRITE)

    @property
    def mappable(self) -> bool:
        return bool(self.flags & P.VFIO_REGION_INFO_FLAG_MMAP)


class DmaHandler:
    """Serves the server's DMA_READ/DMA_WRITE for fd-less mappings. Default: refuse with EFAULT."""

    def read(self, address: int, count: int) -> bytes:
        raise OSError(errno.EFAULT, f"no memory behind {address:#x}")

    def write(self, address: int, data: bytes) -> None:
        raise OSError(errno.EFAULT, f"no memory behind {address:#x}")


class BytearrayDma(DmaHandler):
    """Guest memory as a bytearray at ``base``: the simplest fd-less DMA backing (tests, tools)."""

    def __init__(self, base: int, mem: bytearray) -> None:
        self.base = base
        self.mem = mem

    def _range(self, address: int, count: int) -> slice:
        off = address - self.base
        if off < 0 or off + count > len(self.mem):
            raise OSError(errno.EFAULT, f"{address:#x}+{count} outside guest memory")
        return slice(off, off + count)

    def read(self, address: int, count: int) -> bytes:
        return bytes(self.mem[self._range(address, count)])

    def write(self, address: int, data: bytes) -> None:
        self.mem[self._range(address, len(data))] = data


class VfioUserClient:
    """One connection to a vfio-user server."""

    def __init__(
        self, sock: socket.socket, *, timeout: float = 5.0, dma_handler: DmaHandler | None = None
    ) -> None:
        self.sock = sock
        self.timeout = timeout
        self.sock.settimeout(timeout)
        self.dma_handler = dma_handler or DmaHandler()
        self.server_caps: dict[str, Any] = {}
        self.server_minor = 0
        self.max_data_xfer_size = P.DEFAULT_MAX_DATA_XFER_SIZE
        self.server_max_fds = P.DEFAULT_MAX_MSG_FDS
        self.own_max_xfer = P.DEFAULT_MAX_DATA_XFER_SIZE
        #: Error replies that arrived for messages nobody waits for (e.g. posted writes), newest last.
        self.stray_replies: list[Message] = []
        self._next_id = 0
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ connection
    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: float = 5.0,
        retry_for: float = 0.0,
        dma_handler: DmaHandler | None = None,
    ) -> VfioUserClient:
        """Connect to a server socket, retrying up to ``retry_for`` seconds while it does not exist yet."""
        deadline = time.monotonic() + retry_for
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(os.fspath(path))
                return cls(s, timeout=timeout, dma_handler=dma_handler)
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    # ------------------------------------------------------------------ raw messaging
    def new_id(self) -> int:
        with self._lock:
            self._next_id = (self._next_id + 1) & 0xFFFF
            return self._next_id

    def send(
        self,
        command: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        flags: int = 0,
        msg_id: int | None = None,
    ) -> int:
        """Send a command without waiting; returns its message id."""
        with self._lock:
            mid = self.new_id() if msg_id is None else msg_id
            send_message(self.sock, Message(mid, command, P.MSG_TYPE_COMMAND | flags, 0, payload, list(fds)))
            return mid

    def request(
        self, command: int, payload: bytes = b"", fds: Sequence[int] = (), flags: int = 0, check: bool = True
    ) -> Message:
        """Send a command and wait for its reply; raises VfioUserError on an error reply if ``check``."""
        with self._lock:
            mid = self.send(command, payload, fds, flags)
            reply = self.wait_reply(mid)
        if check and reply.is_error:
            raise VfioUserError(reply.error, command)
        return reply

    def wait_reply(self, msg_id: int) -> Message:
        """Receive until the reply to ``msg_id`` arrives, serving server commands meanwhile."""
        with self._lock:
            deadline = time.monotonic() + self.timeout
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no reply to message {msg_id}")
                msg = self._recv()
                if msg.is_reply:
                    if msg.msg_id == msg_id:
                        return msg
                    msg.close_fds()
                    log.warning(
                        "vfio-user client: reply %d for %s while waiting for %d",
                        msg.msg_id,
                        P.command_name(msg.command),
                        msg_id,
                    )
                    self.stray_replies.append(msg)
                else:
                    self._serve(msg)

    def process_incoming(self, timeout: float = 0.0) -> int:
        """Serve server-to-client commands that are ready (within ``timeout``); returns how many."""
        n = 0
        with self._lock:
            while True:
                r, _, _ = select.select([self.sock], [], [], timeout)
                if not r:
                    return n
                msg = self._recv()
                if msg.is_reply:
                    msg.close_fds()
                    self.stray_replies.append(msg)
                else:
                    self._serve(msg)
                    n += 1
                timeout = 0.0

    def _recv(self) -> Message:
        try:
            return recv_message(self.sock, P.HEADER_SIZE + P.DMA_ACCESS_FIXED_SIZE + self.own_max_xfer + 4096)
        except FramingError as e:
            raise ConnectionError(f"bad message from server: {e.reason}") from None
        except ConnectionClosed as e:
            raise ConnectionError(str(e)) from None

    def _serve(self, msg: Message) -> None:
        """Answer DMA_READ/DMA_WRITE from the server out of ``dma_handler``."""
        msg.close_fds()
        err = 0
        payload = b""
        try:
            if msg.command not in (P.Command.DMA_READ, P.Command.DMA_WRITE):
                raise OSError(errno.ENOSYS, f"unexpected server command {P.command_name(msg.command)}")
            if len(msg.payload) < P.DMA_ACCESS_FIXED_SIZE:
                raise OSError(errno.EINVAL, "short DMA request")
            a = P.DmaAccess.parse(msg.payload)
            if a.count > self.own_max_xfer:
                raise OSError(errno.E2BIG, f"DMA count {a.count} too large")
            if msg.command == P.Command.DMA_READ:
                data = self.dma_handler.read(a.address, a.count)
                payload = msg.payload[: P.DMA_ACCESS_FIXED_SIZE] + bytes(data)
            else:
                data = msg.payload[P.DMA_ACCESS_FIXED_SIZE :]
                if len(data) != a.count:
                    raise OSError(errno.EINVAL, "DMA_WRITE count does not match its data")
                self.dma_handler.write(a.address, data)
                payload = msg.payload[: P.DMA_ACCESS_FIXED_SIZE]
        except OSError as e:
            err = e.errno or errno.EIO
            log.warning("vfio-user client: %s refused: %s", P.command_name(msg.command), e)
        if msg.no_reply:
            return
        flags = P.MSG_TYPE_REPLY | (P.MSG_FLAG_ERROR if err else 0)
        send_message(self.sock, Message(msg.msg_id, msg.command, flags, err, b"" if err else payload))

    # ------------------------------------------------------------------ commands
    def negotiate(
        self,
        *,
        max_msg_fds: int = 16,
        max_data_xfer_size: int = P.DEFAULT_MAX_DATA_XFER_SIZE,
        pgsizes: int = P.DEFAULT_PGSIZES,
        write_multiple: bool = False,
        extra_caps: dict[str, Any] | None = None,
        minor: int = P.VERSION_MINOR,
    ) -> dict[str, Any]:
        """VERSION handshake; returns the server's capabilities (also kept in ``server_caps``)."""
        caps: dict[str, Any] = {
            "max_msg_fds": max_msg_fds,
            "max_data_xfer_size": max_data_xfer_size,
            "pgsizes": pgsizes,
        }
        if write_multiple:
            caps["write_multiple"] = True
        caps.update(extra_caps or {})
        self.own_max_xfer = max_data_xfer_size
        payload = P.Version.build(
            Container(major=P.VERSION_MAJOR, minor=minor, data=P.capabilities_json(caps))
        )
        reply = self.request(P.Command.VERSION, payload)
        v = P.Version.parse(reply.payload)
        if v.major != P.VERSION_MAJOR or v.minor > minor:
            raise ConnectionError(f"server answered incompatible version {v.major}.{v.minor}")
        self.server_caps = P.parse_capabilities(v.data)
        self.server_minor = v.minor
        self.max_data_xfer_size = self.server_caps.get("max_data_xfer_size", P.DEFAULT_MAX_DATA_XFER_SIZE)
        self.server_max_fds = self.server_caps.get("max_msg_fds", P.DEFAULT_MAX_MSG_FDS)
        return self.server_caps

    def dma_map(
        self,
        address: int,
        size: int,
        fd: int | None = None,
        offset: int = 0,
        *,
        readable: bool = True,
        writable: bool = True,
    ) -> None:
        """Offer guest memory [address, address+size) to the server, backed by ``fd`` at ``offset``
        (mmap-able, e.g. a memfd) or fd-less (served through ``dma_handler``)."""
        flags = (P.VFIO_DMA_MAP_FLAG_READ if readable else 0) | (P.VFIO_DMA_MAP_FLAG_WRITE if writable else 0)
        payload = P.DmaMap.build(
            Container(
                argsz=P.DmaMap.sizeof(),
                flags=flags,
                offset=offset if fd is not None else 0,
                address=address,
                size=size,
            )
        )
        self.request(P.Command.DMA_MAP, payload, [fd] if fd is not None else [])

    def dma_unmap(self, address: int = 0, size: int = 0, *, unmap_all: bool = False) -> None:
        payload = P.DmaUnmap.build(
            Container(
                argsz=P.DmaUnmap.sizeof(),
                flags=P.VFIO_DMA_UNMAP_FLAG_ALL if unmap_all else 0,
                address=address,
                size=size,
            )
        )
        self.request(P.Command.DMA_UNMAP, payload)

    def get_device_info(self) -> Container:
        payload = P.DeviceInfo.build(
            Container(argsz=P.DeviceInfo.sizeof(), flags=0, num_regions=0, num_irqs=0)
        )
        return P.DeviceInfo.parse(self.request(P.Command.DEVICE_GET_INFO, payload).payload)

    def get_region_info(self, index: int, argsz: int = 4096) -> RegionInfo:
        """Region info, with the sparse-mmap areas when the server lists them."""
        payload = P.RegionInfo.build(
            Container(argsz=argsz, flags=0, index=index, cap_offset=0, size=0, offset=0)
        )
        reply = self.request(P.Command.DEVICE_GET_REGION_INFO, payload)
        r = P.RegionInfo.parse(reply.payload)
        info = RegionInfo(r.index, r.flags, r.size, r.offset, r.argsz, fd=reply.fds[0] if reply.fds else None)
        for extra in reply.fds[1:]:
            os.close(extra)
        pos = r.cap_offset if r.flags & P.VFIO_REGION_INFO_FLAG_CAPS else 0
        seen = set()
        while pos and pos + P.CapHeader.sizeof() <= len(reply.payload) and pos not in seen:
            seen.add(pos)
            hdr = P.CapHeader.parse(reply.payload[pos:])
            if hdr.id == P.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                cap = P.SparseMmapCap.parse(reply.payload[pos:])
                info.sparse_areas = [(a.offset, a.size) for a in cap.areas]
            pos = hdr.next
        return info

    def get_region_io_fds(self, index: int) -> tuple[Container, list[Container], list[int]]:
        payload = P.RegionIoFds.build(Container(argsz=4096, flags=0, index=index, count=0))
        reply = self.request(P.Command.DEVICE_GET_REGION_IO_FDS, payload)
        hdr = P.RegionIoFds.parse(reply.payload)
        subs = []
        if hdr.count:
            stride = (len(reply.payload) - P.RegionIoFds.sizeof()) // hdr.count
            for i in range(hdr.count):
                subs.append(P.SubRegionIoFd.parse(reply.payload[P.RegionIoFds.sizeof() + i * stride :]))
        return hdr, subs, reply.fds

    def get_irq_info(self, index: int) -> Container:
        payload = P.IrqInfo.build(Container(argsz=P.IrqInfo.sizeof(), flags=0, index=index, count=0))
        return P.IrqInfo.parse(self.request(P.Command.DEVICE_GET_IRQ_INFO, payload).payload)

    def set_irqs(
        self,
        index: int,
        flags: int,
        start: int = 0,
        count: int = 0,
        *,
        fds: Sequence[int] = (),
        bools: Iterable[bool] | None = None,
    ) -> None:
        """DEVICE_SET_IRQS as in <linux/vfio.h>; eventfds travel as SCM_RIGHTS, in chunks the server takes."""
        data = bytes(int(bool(b)) for b in bools) if bools is not None else b""
        if fds and len(fds) > self.server_max_fds:
            step = self.server_max_fds
            for i in range(0, len(fds), step):
                chunk = fds[i : i + step]
                self.set_irqs(index, flags, start + i, len(chunk), fds=chunk)
            return
        payload = (
            P.IrqSet.build(
                Container(
                    argsz=P.IRQ_SET_FIXED_SIZE + len(data), flags=flags, index=index, start=start, count=count
                )
            )
            + data
        )
        self.request(P.Command.DEVICE_SET_IRQS, payload, fds)

    def set_irq_eventfds(self, index: int, fds: Sequence[int], start: int = 0) -> None:
        """Wire eventfds to vectors start.. of an IRQ index (TRIGGER)."""
        self.set_irqs(
            index, P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_TRIGGER, start, len(fds), fds=fds
        )

    def disable_irqs(self, index: int) -> None:
        self.set_irqs(index, P.VFIO_IRQ_SET_DATA_NONE | P.VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0)

    def mask_irq(self, index: int, start: int, count: int = 1) -> None:
        self.set_irqs(index, P.VFIO_IRQ_SET_DATA_NONE | P.VFIO_IRQ_SET_ACTION_MASK, start, count)

    def unmask_irq(self, index: int, start: int, count: int = 1) -> None:
        self.set_irqs(index, P.VFIO_IRQ_SET_DATA_NONE | P.VFIO_IRQ_SET_ACTION_UNMASK, start, count)

    def trigger_irq(self, index: int, start: int, count: int = 1) -> None:
        self.set_irqs(index, P.VFIO_IRQ_SET_DATA_NONE | P.VFIO_IRQ_SET_ACTION_TRIGGER, start, count)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        payload = P.RegionAccess.build(Container(offset=offset, region=index, count=count))
        reply = self.request(P.Command.REGION_READ, payload)
        r = P.RegionAccess.parse(reply.payload)
        data = reply.payload[P.REGION_ACCESS_FIXED_SIZE :]
        if r.count != count or len(data) != count:
            raise ConnectionError(
                f"REGION_READ reply has {len(data)} bytes (count {r.count}), wanted {count}"
            )
        return data

    def region_write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        """Write a region; ``posted`` sets No_reply (the server answers nothing, ordering is kept)."""
        payload = P.RegionAccess.build(Container(offset=offset, region=index, count=len(data))) + bytes(data)
        if posted:
            self.send(P.Command.REGION_WRITE, payload, flags=P.MSG_FLAG_NO_REPLY)
        else:
            self.request(P.Command.REGION_WRITE, payload)

    def region_write_multi(self, writes: Sequence[tuple[int, int, bytes]], *, posted: bool = True) -> None:
        """REGION_WRITE_MULTI of (region, offset, data<=8 bytes) writes."""
        body = P.WriteMulti.build(Container(wr_cnt=len(writes)))
        for region, offset, data in writes:
            body += P.WriteOne.build(
                Container(offset=offset, region=region, count=len(data), data=bytes(data).ljust(8, b"\0"))
            )
        if posted:
            self.send(P.Command.REGION_WRITE_MULTI, body, flags=P.MSG_FLAG_NO_REPLY)
        else:
            self.request(P.Command.REGION_WRITE_MULTI, body)

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.region_read(P.PciRegion.CONFIG, offset, size), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.region_write(
            P.PciRegion.CONFIG, offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        )

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        return int.from_bytes(self.region_read(bar, offset, size), "little")

    def bar_write(self, bar: int, offset: int, size: int, value: int, *, posted: bool = False) -> None:
        self.region_write(
            bar, offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), posted=posted
        )

    def reset(self) -> None:
        self.request(P.Command.DEVICE_RESET)


def connect_and_negotiate(path: str | os.PathLike[str], **kwargs: Any) -> VfioUserClient:
    """Connect (waiting briefly for the socket to appear) and do the VERSION handshake."""
    c = VfioUserClient.connect(path, retry_for=kwargs.pop("retry_for", 5.0))
    c.negotiate(**kwargs)
    return c

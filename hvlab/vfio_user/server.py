"""vfio-user server: serves one PciDevice to one client at a time over a Unix socket.

The server owns a selector loop (in its own thread via ``start()``, or the caller's via
``serve_forever()``). Clients are served one after the other, because QEMU's ``device_add`` connects
anew each time; a disconnect unmaps all DMA and closes the client's eventfds but keeps the device state.

Every client message is validated before it reaches the device; a bad one gets an error reply with an
errno (unless the client asked for no reply), a warning on the "hvlab.vfio_user" logger naming command
and field, and the server carries on. Only a lost stream position (a peer stalling mid-message, or an
absurd message size) ends the connection, and even then the server keeps listening.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import logging
import mmap
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from construct import Container

from hvlab.protocol import vfio_user as P
from hvlab.vfio_user.device import DmaError, PciDevice, is_eventfd, signal_eventfd
from hvlab.vfio_user.transport import (
    ConnectionClosed,
    FramingError,
    Message,
    recv_message,
    send_message,
)

log = logging.getLogger("hvlab.vfio_user")

_PAGE = mmap.ALLOCATIONGRANULARITY


class ProtocolViolation(Exception):
    """A client message broke the protocol; ``field`` names the offending field for the log."""

    def __init__(self, err: int, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.errno = err
        self.field = field
        self.detail = detail


@dataclass
class DmaRegion:
    """One DMA_MAP window. ``mem`` is the mmap of the client's fd, or None for a fd-less mapping."""

    address: int
    size: int
    flags: int
    mem: mmap.mmap | None = None
    view: memoryview | None = None  # window into ``mem`` starting at the mapped offset

    @property
    def end(self) -> int:
        return self.address + self.size

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
        if self.mem is not None:
            try:
                self.mem.close()
            except BufferError:
                # The device still holds a dma_view; the mapping goes when that is garbage collected.
                log.warning(
                    "DMA window %#x+%#x still referenced by the device at unmap", self.address, self.size
                )
            self.mem = None


class _Connection:
    """Per-client state: negotiation results and DMA windows."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.negotiated = False
        self.client_max_fds = P.DEFAULT_MAX_MSG_FDS
        self.client_max_xfer = P.DEFAULT_MAX_DATA_XFER_SIZE
        self.write_multiple = False
        self.dma: list[DmaRegion] = []
        self.queued: collections.deque[Message] = collections.deque()
        self.replies: dict[int, Message] = {}
        self.next_id = itertools.count(1)
        self.closed = False


def _need(msg: Message, size: int, what: str) -> None:
    if len(msg.payload) < size:
        raise ProtocolViolation(
            errno.EINVAL, "msg_size", f"payload {len(msg.payload)} bytes, {what} needs {size}"
        )


def _no_fds(msg: Message) -> None:
    if msg.fds:
        raise ProtocolViolation(
            errno.EINVAL, "fds", f"{len(msg.fds)} file descriptors on a message that takes none"
        )


class VfioUserServer:
    """Serve ``device`` on the Unix socket ``path`` (or on sockets handed to ``add_connection``)."""

    def __init__(
        self,
        device: PciDevice,
        path: str | os.PathLike[str] | None = None,
        *,
        max_msg_fds: int = 16,
        max_data_xfer_size: int = P.DEFAULT_MAX_DATA_XFER_SIZE,
        max_dma_maps: int = P.DEFAULT_MAX_DMA_MAPS,
        io_timeout: float = 2.0,
        dma_timeout: float = 5.0,
    ) -> None:
        self.device = device
        self.path = os.fspath(path) if path is not None else None
        self.max_msg_fds = max_msg_fds
        self.max_data_xfer_size = max_data_xfer_size
        self.max_dma_maps = max_dma_maps
        self.io_timeout = io_timeout
        self.dma_timeout = dma_timeout
        # Largest acceptable message: a region write of max_data_xfer_size, or a big WRITE_MULTI.
        self.max_msg_size = P.HEADER_SIZE + P.REGION_ACCESS_FIXED_SIZE + max_data_xfer_size
        self.conn: _Connection | None = None
        self.connections_served = 0
        self._waiting: collections.deque[socket.socket] = collections.deque()
        self._listener: socket.socket | None = None
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._calls: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._timers: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._timer_seq = itertools.count()
        self._readers: dict[int, Callable[[], Any]] = {}
        self._thread: threading.Thread | None = None
        self._loop_thread_id: int | None = None
        self._stop = False
        self._closed = False
        self._cond = threading.Condition()
        self._handlers: dict[int, Callable[[Message], tuple[bytes, list[int]] | bytes]] = {
            P.Command.VERSION: self._h_version,
            P.Command.DMA_MAP: self._h_dma_map,
            P.Command.DMA_UNMAP: self._h_dma_unmap,
            P.Command.DEVICE_GET_INFO: self._h_get_info,
            P.Command.DEVICE_GET_REGION_INFO: self._h_region_info,
            P.Command.DEVICE_GET_REGION_IO_FDS: self._h_region_io_fds,
            P.Command.DEVICE_GET_IRQ_INFO: self._h_irq_info,
            P.Command.DEVICE_SET_IRQS: self._h_set_irqs,
            P.Command.REGION_READ: self._h_region_read,
            P.Command.REGION_WRITE: self._h_region_write,
            P.Command.REGION_WRITE_MULTI: self._h_region_write_multi,
            P.Command.DEVICE_RESET: self._h_reset,
        }
        device.server = self

    # ================================================================== lifecycle
    def listen(self) -> None:
        """Bind and listen on ``path`` (replacing a stale socket file)."""
        if self.path is None or self._listener is not None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.bind(self.path)
        s.listen(4)
        s.setblocking(False)
        self._listener = s
        self._sel.register(s, selectors.EVENT_READ, ("listen", None))

    def start(self) -> VfioUserServer:
        """Listen and run the loop in a daemon thread; returns self for chaining."""
        self.listen()
        self._thread = threading.Thread(target=self.serve_forever, name="vfio-user-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Run the loop in the calling thread until ``stop()`` (a stopped server cannot be restarted)."""
        if self._closed:
            raise RuntimeError("this VfioUserServer was stopped; create a new one")
        self.listen()
        self._loop_thread_id = threading.get_ident()
        try:
            while not self._stop:
                self._run_once()
        finally:
            self._shutdown()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (from any thread), drop the client and remove the socket file."""
        self._stop = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> VfioUserServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_connection(self, sock: socket.socket) -> None:
        """Serve an already-connected socket (e.g. one end of a socketpair); queued if one is active."""
        self.call_soon(self._adopt, sock)

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Block until ``predicate()`` is true (checked after each loop iteration); for tests and tools."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    # ================================================================== loop services
    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self._calls.append((fn, args))
        self._wake()

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        def arm() -> None:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), fn, args))

        self.call_soon(arm)

    def add_reader(self, fd: int, callback: Callable[[], Any]) -> None:
        def reg() -> None:
            self._readers[fd] = callback
            self._sel.register(fd, selectors.EVENT_READ, ("reader", fd))

        self._in_loop(reg)

    def remove_reader(self, fd: int) -> None:
        def unreg() -> None:
            if self._readers.pop(fd, None) is not None:
                self._sel.unregister(fd)

        self._in_loop(unreg)

    def in_loop_thread(self) -> bool:
        return self._loop_thread_id is None or self._loop_thread_id == threading.get_ident()

    def _in_loop(self, fn: Callable[[], Any]) -> None:
        if self.in_loop_thread():
            fn()
        else:
            self.call_soon(fn)

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # pipe full (a wake-up is pending anyway) or server shut down

    def _run_once(self) -> None:
        timeout = None
        if self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        if self._calls or (self.conn is not None and self.conn.queued):
            timeout = 0.0
        for key, _ in self._sel.select(timeout):
            kind, arg = key.data
            try:
                if kind == "wake":
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                elif kind == "listen":
                    self._accept()
                elif kind == "conn":
                    if self.conn is not None and self.conn.sock is arg:
                        self._service_connection()
                elif kind == "intx-unmask":
                    self._intx_unmask_event(arg)
                elif kind == "reader":
                    cb = self._readers.get(arg)
                    if cb is not None:
                        cb()
            except Exception:
                log.exception("vfio-user server: error in %s handler", kind)
        while self._calls:
            fn, args = self._calls.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("vfio-user server: error in call_soon callback %r", fn)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn, args = heapq.heappop(self._timers)
            try:
                fn(*args)
            except Exception:
                log.exception("vfio-user server: error in timer callback %r", fn)
        # Commands that arrived while a DMA request waited for its reply outside a dispatch (in a
        # callback or timer) are served now, in order.
        conn = self.conn
        while conn is not None and conn.queued and not conn.closed:
            self._dispatch(conn, conn.queued.popleft())
        with self._cond:
            self._cond.notify_all()

    def _shutdown(self) -> None:
        if self.conn is not None:
            self._drop_connection("server stopping")
        for s in self._waiting:
            s.close()
        self._waiting.clear()
        if self._listener is not None:
            try:
                self._sel.unregister(self._listener)
            except (KeyError, ValueError):
                pass
            self._listener.close()
            self._listener = None
            if self.path:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        for fd in list(self._readers):
            self._sel.unregister(fd)
        self._readers.clear()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1
        self._closed = True
        with self._cond:
            self._cond.notify_all()

    # ================================================================== connections
    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        self._adopt(sock)

    def _adopt(self, sock: socket.socket) -> None:
        if self.conn is not None:
            self._waiting.append(sock)
            return
        if self._listener is not None:
            # One client at a time: later connects wait in the listen backlog until this one leaves.
            try:
                self._sel.unregister(self._listener)
            except (KeyError, ValueError):
                pass
        sock.settimeout(self.io_timeout)
        self.conn = _Connection(sock)
        self.connections_served += 1
        self._sel.register(sock, selectors.EVENT_READ, ("conn", sock))
        log.info("vfio-user client connected (#%d)", self.connections_served)

    def _drop_connection(self, why: str) -> None:
        # Under _cond: wait_for() must not see the connection gone before the device was told.
        with self._cond:
            self._drop_connection_locked(why)
            self._cond.notify_all()

    def _drop_connection_locked(self, why: str) -> None:
        conn = self.conn
        if conn is None:
            return
        log.info("vfio-user client disconnected: %s", why)
        conn.closed = True
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        for q in conn.queued:
            q.close_fds()
        for region in conn.dma:
            self._release_region(region)
        conn.dma.clear()
        intx = self.device.irq_lines.get(P.PciIrq.INTX)
        if intx is not None and intx.unmask_fd is not None:
            try:
                self._sel.unregister(intx.unmask_fd)
            except (KeyError, ValueError):
                pass
        self.device.reset_irq_lines()
        self.conn = None
        try:
            self.device.disconnected()
        except Exception:
            log.exception("device.disconnected() failed")
        if self._waiting:
            self._adopt(self._waiting.popleft())
        elif self._listener is not None and not self._stop:
            try:
                self._sel.register(self._listener, selectors.EVENT_READ, ("listen", None))
            except KeyError:
                pass

    def _service_connection(self) -> None:
        conn = self.conn
        assert conn is not None
        msg = self._receive(conn)
        if msg is not None:
            self._dispatch(conn, msg)
        while conn.queued and not conn.closed:
            self._dispatch(conn, conn.queued.popleft())

    def _receive(self, conn: _Connection) -> Message | None:
        """One message from the client, or None after handling a framing problem."""
        try:
            return recv_message(conn.sock, self.max_msg_size)
        except ConnectionClosed as e:
            self._drop_connection(str(e))
        except FramingError as e:
            name = P.command_name(e.header.command)
            log.warning("vfio-user %s: msg_size: %s", name, e.reason)
            self._send_error(conn, e.header.msg_id, e.header.command, e.errno)
            if e.fatal:
                self._drop_connection("stream position lost after a bad message")
        except TimeoutError:
            log.warning("vfio-user: header: client stalled in the middle of a message header")
            self._drop_connection("stream position lost (truncated header)")
        except OSError as e:
            self._drop_connection(f"socket error: {e}")
        return None

    def _send(self, conn: _Connection, msg: Message) -> None:
        if conn.closed:
            return
        try:
            send_message(conn.sock, msg)
        except OSError as e:
            log.info("vfio-user: cannot send to client: %s", e)
            self._drop_connection(f"send failed: {e}")

    def _send_error(self, conn: _Connection, msg_id: int, command: int, err: int) -> None:
        self._send(conn, Message(msg_id, command, P.MSG_TYPE_REPLY | P.MSG_FLAG_ERROR, err))

    def _dispatch(self, conn: _Connection, msg: Message) -> None:
        name = P.command_name(msg.command)
        if msg.is_reply:
            log.warning("vfio-user %s: flags: unsolicited reply (id %d) ignored", name, msg.msg_id)
            msg.close_fds()
            return
        try:
            if msg.flags & ~P.MSG_FLAGS_KNOWN or (msg.flags & P.MSG_TYPE_MASK) != P.MSG_TYPE_COMMAND:
                raise ProtocolViolation(errno.EINVAL, "flags", f"bad header flags {msg.flags:#x}")
            if msg.flags & P.MSG_FLAG_ERROR:
                raise ProtocolViolation(errno.EINVAL, "flags", "error bit set on a command")
            handler = self._handlers.get(msg.command)
            if handler is None:
                if msg.command in (P.Command.DMA_READ, P.Command.DMA_WRITE):
                    raise ProtocolViolation(
                        errno.EINVAL, "command", "server-to-client command sent by the client"
                    )
                if msg.command in (
                    P.Command.DEVICE_FEATURE,
                    P.Command.MIG_DATA_READ,
                    P.Command.MIG_DATA_WRITE,
                ):
                    raise ProtocolViolation(errno.ENOTSUP, "command", "migration is not supported")
                raise ProtocolViolation(errno.ENOSYS, "command", "unknown command")
            if not conn.negotiated and msg.command != P.Command.VERSION:
                raise ProtocolViolation(errno.EINVAL, "command", "sent before VERSION negotiation")
            result = handler(msg)
        except ProtocolViolation as v:
            log.warning("vfio-user %s: %s: %s", name, v.field, v.detail)
            msg.close_fds()
            if not msg.no_reply:
                self._send_error(conn, msg.msg_id, msg.command, v.errno)
            return
        except DmaError as e:
            log.warning("vfio-user %s: DMA failed inside the device: %s", name, e)
            msg.close_fds()
            if not msg.no_reply:
                self._send_error(conn, msg.msg_id, msg.command, e.errno or errno.EFAULT)
            return
        except Exception:
            log.exception("vfio-user %s: device model raised", name)
            msg.close_fds()
            if not msg.no_reply:
                self._send_error(conn, msg.msg_id, msg.command, errno.EIO)
            return
        msg.close_fds()
        payload, fds = result if isinstance(result, tuple) else (result, [])
        if not msg.no_reply:
            self._send(conn, Message(msg.msg_id, msg.command, P.MSG_TYPE_REPLY, 0, payload, fds))

    # ================================================================== command handlers
    def _h_version(self, msg: Message) -> bytes:
        conn = self.conn
        assert conn is not None
        _no_fds(msg)
        if conn.negotiated:
            raise ProtocolViolation(errno.EINVAL, "command", "VERSION sent twice")
        _need(msg, P.VERSION_FIXED_SIZE, "VERSION")
        v = P.Version.parse(msg.payload)
        if v.major != P.VERSION_MAJOR:
            raise ProtocolViolation(errno.ENOTSUP, "major", f"version {v.major}.{v.minor} not supported")
        try:
            caps = P.parse_capabilities(v.data)
        except ValueError as e:
            raise ProtocolViolation(errno.EINVAL, "version data", str(e)) from None
        if "twin_socket" in caps and not isinstance(caps["twin_socket"], dict):
            raise ProtocolViolation(errno.EINVAL, "twin_socket", "not a JSON object")
        conn.client_max_fds = caps.get("max_msg_fds", P.DEFAULT_MAX_MSG_FDS)
        conn.client_max_xfer = caps.get("max_data_xfer_size", P.DEFAULT_MAX_DATA_XFER_SIZE) or 1
        conn.write_multiple = bool(caps.get("write_multiple", False))
        reply_caps: dict[str, Any] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "max_dma_maps": self.max_dma_maps,
            "pgsizes": P.DEFAULT_PGSIZES,
        }
        if conn.write_multiple:
            reply_caps["write_multiple"] = True
        conn.negotiated = True
        log.info(
            "vfio-user: negotiated version %d.%d, client caps %s",
            P.VERSION_MAJOR,
            min(v.minor, P.VERSION_MINOR),
            caps,
        )
        try:
            self.device.connected()
        except Exception:
            log.exception("device.connected() failed")
        return P.Version.build(
            Container(
                major=P.VERSION_MAJOR,
                minor=min(v.minor, P.VERSION_MINOR),
                data=P.capabilities_json(reply_caps),
            )
        )

    def _h_dma_map(self, msg: Message) -> bytes:
        conn = self.conn
        assert conn is not None
        _need(msg, P.DmaMap.sizeof(), "DMA_MAP")
        m = P.DmaMap.parse(msg.payload)
        if m.argsz < P.DmaMap.sizeof():
            raise ProtocolViolation(errno.EINVAL, "argsz", f"{m.argsz} < {P.DmaMap.sizeof()}")
        if m.flags & ~(P.VFIO_DMA_MAP_FLAG_READ | P.VFIO_DMA_MAP_FLAG_WRITE):
            raise ProtocolViolation(errno.EINVAL, "flags", f"unknown DMA_MAP flags {m.flags:#x}")
        if len(msg.fds) > 1:
            raise ProtocolViolation(
                errno.EINVAL, "fds", f"{len(msg.fds)} file descriptors, DMA_MAP takes 0 or 1"
            )
        if m.size == 0 or m.address + m.size > 1 << 64:
            raise ProtocolViolation(errno.EINVAL, "size", f"bad window {m.address:#x}+{m.size:#x}")
        if (m.address | m.size) & (P.DEFAULT_PGSIZES - 1):
            raise ProtocolViolation(
                errno.EINVAL, "address", f"window {m.address:#x}+{m.size:#x} not page aligned"
            )
        for r in conn.dma:
            if m.address < r.end and r.address < m.address + m.size:
                raise ProtocolViolation(
                    errno.EEXIST, "address", f"{m.address:#x}+{m.size:#x} overlaps {r.address:#x}+{r.size:#x}"
                )
        if len(conn.dma) >= self.max_dma_maps:
            raise ProtocolViolation(errno.ENOSPC, "address", "too many DMA windows")
        region = DmaRegion(m.address, m.size, m.flags)
        if msg.fds:
            fd = msg.fds[0]
            base = m.offset - m.offset % _PAGE
            prot = (mmap.PROT_READ if m.flags & P.VFIO_DMA_MAP_FLAG_READ else 0) | (
                mmap.PROT_WRITE if m.flags & P.VFIO_DMA_MAP_FLAG_WRITE else 0
            )
            # Mapping past the end of the file would "work" and then SIGBUS the server on first access.
            try:
                st = os.fstat(fd)
            except OSError as e:
                raise ProtocolViolation(errno.EBADF, "fds", f"cannot fstat the fd: {e}") from None
            if not stat.S_ISREG(st.st_mode):
                raise ProtocolViolation(
                    errno.EINVAL, "fds", "cannot mmap the fd: not a regular file or memfd"
                )
            if m.offset + m.size > st.st_size:
                raise ProtocolViolation(
                    errno.EINVAL,
                    "offset",
                    f"cannot mmap {m.offset:#x}+{m.size:#x}: "
                    f"beyond the end of the file ({st.st_size:#x} bytes)",
                )
            try:
                region.mem = mmap.mmap(
                    fd, m.offset - base + m.size, mmap.MAP_SHARED, prot or mmap.PROT_READ, offset=base
                )
            except (OSError, ValueError, OverflowError) as e:
                err = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
                raise ProtocolViolation(
                    err, "offset", f"cannot mmap fd at {m.offset:#x}+{m.size:#x}: {e}"
                ) from None
            region.view = memoryview(region.mem)[m.offset - base : m.offset - base + m.size]
        conn.dma.append(region)
        conn.dma.sort(key=lambda r: r.address)
        log.debug(
            "DMA_MAP %#x+%#x flags %#x %s", m.address, m.size, m.flags, "mmap" if msg.fds else "fd-less"
        )
        return b""

    def _release_region(self, region: DmaRegion) -> None:
        try:
            self.device.dma_unmapped(region.address, region.size)
        except Exception:
            log.exception("device.dma_unmapped() failed")
        region.close()

    def _h_dma_unmap(self, msg: Message) -> bytes:
        conn = self.conn
        assert conn is not None
        _no_fds(msg)
        _need(msg, P.DmaUnmap.sizeof(), "DMA_UNMAP")
        u = P.DmaUnmap.parse(msg.payload)
        if u.argsz < P.DmaUnmap.sizeof():
            raise ProtocolViolation(errno.EINVAL, "argsz", f"{u.argsz} < {P.DmaUnmap.sizeof()}")
        if u.flags & P.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
            raise ProtocolViolation(errno.ENOTSUP, "flags", "dirty page tracking is not supported")
        if u.flags & ~P.VFIO_DMA_UNMAP_FLAG_ALL:
            raise ProtocolViolation(errno.EINVAL, "flags", f"unknown DMA_UNMAP flags {u.flags:#x}")
        if u.flags & P.VFIO_DMA_UNMAP_FLAG_ALL:
            victims = list(conn.dma)
        else:
            end = u.address + u.size
            victims = [r for r in conn.dma if r.address >= u.address and r.end <= end]
            partial = [r for r in conn.dma if r.address < end and u.address < r.end and r not in victims]
            if partial:
                raise ProtocolViolation(
                    errno.EINVAL,
                    "size",
                    f"{u.address:#x}+{u.size:#x} cuts through window "
                    f"{partial[0].address:#x}+{partial[0].size:#x}",
                )
            if not victims:
                raise ProtocolViolation(errno.ENOENT, "address", f"{u.address:#x}+{u.size:#x} is not mapped")
        for r in victims:
            conn.dma.remove(r)
            self._release_region(r)
        return msg.payload[: P.DmaUnmap.sizeof()]

    def _h_get_info(self, msg: Message) -> bytes:
        _no_fds(msg)
        _need(msg, P.DeviceInfo.sizeof(), "DEVICE_GET_INFO")
        argsz = P.DeviceInfo.parse(msg.payload).argsz
        if argsz < P.DeviceInfo.sizeof():
            raise ProtocolViolation(errno.EINVAL, "argsz", f"{argsz} < {P.DeviceInfo.sizeof()}")
        return P.DeviceInfo.build(
            Container(
                argsz=P.DeviceInfo.sizeof(),
                flags=P.VFIO_DEVICE_FLAGS_RESET | P.VFIO_DEVICE_FLAGS_PCI,
                num_regions=P.VFIO_PCI_NUM_REGIONS,
                num_irqs=P.VFIO_PCI_NUM_IRQS,
            )
        )

    def region_size(self, index: int) -> int:
        """Size of vfio region ``index`` (0 for absent regions)."""
        if index == P.PciRegion.CONFIG:
            return self.device.config.size
        if 0 <= index <= P.PciRegion.BAR5:
            return self.device.config.bar_region_size(index)
        return 0  # ROM (none: reads as 0 through config space) and VGA

    def _region_index(self, index: int) -> None:
        if not 0 <= index < P.VFIO_PCI_NUM_REGIONS:
            raise ProtocolViolation(errno.EINVAL, "index", f"region {index} does not exist")

    def _h_region_info(self, msg: Message) -> bytes | tuple[bytes, list[int]]:
        _no_fds(msg)
        _need(msg, P.RegionInfo.sizeof(), "DEVICE_GET_REGION_INFO")
        req = P.RegionInfo.parse(msg.payload)
        if req.argsz < P.RegionInfo.sizeof():
            raise ProtocolViolation(errno.EINVAL, "argsz", f"{req.argsz} < {P.RegionInfo.sizeof()}")
        self._region_index(req.index)
        size = self.region_size(req.index)
        flags = P.VFIO_REGION_INFO_FLAG_READ | P.VFIO_REGION_INFO_FLAG_WRITE if size else 0
        areas = self.device.mmap_areas.get(req.index) if size and req.index <= P.PciRegion.BAR5 else None
        if not areas:
            return P.RegionInfo.build(
                Container(
                    argsz=P.RegionInfo.sizeof(),
                    flags=flags,
                    index=req.index,
                    cap_offset=0,
                    size=size,
                    offset=0,
                )
            )
        # mmap-able BAR: the fd maps the whole BAR at offset 0; the sparse capability says which parts.
        cap = P.SparseMmapCap.build(
            Container(
                header=Container(id=P.VFIO_REGION_INFO_CAP_SPARSE_MMAP, version=1, next=0),
                nr_areas=len(areas),
                reserved=0,
                areas=[Container(offset=o, size=n) for o, n in areas],
            )
        )
        need = P.RegionInfo.sizeof() + len(cap)
        flags |= P.VFIO_REGION_INFO_FLAG_MMAP | P.VFIO_REGION_INFO_FLAG_CAPS
        fits = req.argsz >= need
        info = P.RegionInfo.build(
            Container(
                argsz=need,
                flags=flags,
                index=req.index,
                cap_offset=P.RegionInfo.sizeof() if fits else 0,
                size=size,
                offset=0,
            )
        )
        return (info + cap if fits else info), [self.device.bar_fds[req.index]]

    def _h_region_io_fds(self, msg: Message) -> bytes:
        _no_fds(msg)
        _need(msg, P.RegionIoFds.sizeof(), "DEVICE_GET_REGION_IO_FDS")
        req = P.RegionIoFds.parse(msg.payload)
        self._region_index(req.index)
        if req.argsz < P.RegionIoFds.sizeof():
            raise ProtocolViolation(errno.EINVAL, "argsz", f"{req.argsz} < {P.RegionIoFds.sizeof()}")
        # No ioeventfd sub-regions are offered: all I/O arrives as messages.
        return P.RegionIoFds.build(Container(argsz=P.RegionIoFds.sizeof(), flags=0, index=req.index, count=0))

    def irq_info_flags(self, index: int) -> int:
        if index == P.PciIrq.INTX:
            return P.VFIO_IRQ_INFO_EVENTFD | P.VFIO_IRQ_INFO_MASKABLE | P.VFIO_IRQ_INFO_AUTOMASKED
        if index == P.PciIrq.MSI:
            return P.VFIO_IRQ_INFO_EVENTFD | P.VFIO_IRQ_INFO_MASKABLE | P.VFIO_IRQ_INFO_NORESIZE
        if index == P.PciIrq.MSIX:
            return P.VFIO_IRQ_INFO_EVENTFD | P.VFIO_IRQ_INFO_MASKABLE
        return P.VFIO_IRQ_INFO_EVENTFD

    def _h_irq_info(self, msg: Message) -> bytes:
        _no_fds(msg)
        _need(msg, P.IrqInfo.sizeof(), "DEVICE_GET_IRQ_INFO")
        req = P.IrqInfo.parse(msg.payload)
        if req.argsz < P.IrqInfo.sizeof():
            raise ProtocolViolation(errno.EINVAL, "argsz", f"{req.argsz} < {P.IrqInfo.sizeof()}")
        if not 0 <= req.index < P.VFIO_PCI_NUM_IRQS:
            raise ProtocolViolation(errno.EINVAL, "index", f"IRQ index {req.index} does not exist")
        return P.IrqInfo.build(
            Container(
                argsz=P.IrqInfo.sizeof(),
                flags=self.irq_info_flags(req.index),
                index=req.index,
                count=self.device.irq_count(req.index),
            )
        )

    def _h_set_irqs(self, msg: Message) -> bytes:
        _need(msg, P.IRQ_SET_FIXED_SIZE, "DEVICE_SET_IRQS")
        s = P.IrqSet.parse(msg.payload)
        if s.argsz < P.IRQ_SET_FIXED_SIZE:
            raise ProtocolViolation(errno.EINVAL, "argsz", f"{s.argsz} < {P.IRQ_SET_FIXED_SIZE}")
        if not 0 <= s.index < P.VFIO_PCI_NUM_IRQS:
            raise ProtocolViolation(errno.EINVAL, "index", f"IRQ index {s.index} does not exist")
        data_type = s.flags & P.VFIO_IRQ_SET_DATA_TYPE_MASK
        action = s.flags & P.VFIO_IRQ_SET_ACTION_TYPE_MASK
        if s.flags & ~(P.VFIO_IRQ_SET_DATA_TYPE_MASK | P.VFIO_IRQ_SET_ACTION_TYPE_MASK):
            raise ProtocolViolation(errno.EINVAL, "flags", f"unknown SET_IRQS flags {s.flags:#x}")
        if data_type.bit_count() != 1 or action.bit_count() != 1:
            raise ProtocolViolation(
                errno.EINVAL, "flags", f"need exactly one DATA and one ACTION flag, got {s.flags:#x}"
            )
        lines = self.device.irq_lines[s.index]
        if data_type != P.VFIO_IRQ_SET_DATA_EVENTFD:
            _no_fds(msg)
        if s.count == 0:
            if data_type == P.VFIO_IRQ_SET_DATA_NONE and action == P.VFIO_IRQ_SET_ACTION_TRIGGER:
                self._disable_irqs(s.index)
                return b""
            if data_type == P.VFIO_IRQ_SET_DATA_EVENTFD and not msg.fds:
                return b""
            raise ProtocolViolation(
                errno.EINVAL, "count", "count 0 is only valid to disable (DATA_NONE|TRIGGER)"
            )
        if s.start + s.count > lines.count:
            raise ProtocolViolation(
                errno.EINVAL,
                "count",
                f"vectors {s.start}..{s.start + s.count - 1} beyond the {lines.count} of index {s.index}",
            )
        vectors = list(range(s.start, s.start + s.count))
        if data_type == P.VFIO_IRQ_SET_DATA_BOOL:
            _need(msg, P.IRQ_SET_FIXED_SIZE + s.count, "DEVICE_SET_IRQS with DATA_BOOL")
            bools = msg.payload[P.IRQ_SET_FIXED_SIZE : P.IRQ_SET_FIXED_SIZE + s.count]
            vectors = [v for v, b in zip(vectors, bools) if b]
        if data_type == P.VFIO_IRQ_SET_DATA_EVENTFD:
            if len(msg.fds) not in (0, s.count):
                raise ProtocolViolation(errno.EINVAL, "fds", f"{len(msg.fds)} eventfds for count {s.count}")
            for i, fd in enumerate(msg.fds):
                if not is_eventfd(fd):
                    raise ProtocolViolation(errno.EINVAL, "fds", f"descriptor {i} is not an eventfd")
            if action == P.VFIO_IRQ_SET_ACTION_TRIGGER:
                fds: list[int | None] = list(msg.take_fds()) or [None] * s.count
                for v, fd in zip(vectors, fds):
                    lines.set_fd(v, fd)
                return b""
            if s.index == P.PciIrq.INTX and action == P.VFIO_IRQ_SET_ACTION_UNMASK:
                self._set_intx_unmask_fd(msg.take_fds()[0] if msg.fds else None)
                return b""
            raise ProtocolViolation(errno.ENOTSUP, "flags", "mask notification eventfds are not supported")
        if action == P.VFIO_IRQ_SET_ACTION_TRIGGER:
            for v in vectors:
                fd = lines.fds[v]
                if fd is not None:
                    signal_eventfd(fd)
        elif action == P.VFIO_IRQ_SET_ACTION_MASK:
            for v in vectors:
                lines.masked[v] = True
        else:
            for v in vectors:
                self.device.vfio_unmask(s.index, v)
        return b""

    def _disable_irqs(self, index: int) -> None:
        lines = self.device.irq_lines[index]
        if index == P.PciIrq.INTX:
            self._set_intx_unmask_fd(None)
        for v in range(lines.count):
            lines.set_fd(v, None)
            lines.masked[v] = False
            lines.pending[v] = False

    def _set_intx_unmask_fd(self, fd: int | None) -> None:
        lines = self.device.irq_lines[P.PciIrq.INTX]
        if lines.unmask_fd is not None:
            try:
                self._sel.unregister(lines.unmask_fd)
            except (KeyError, ValueError):
                pass
            os.close(lines.unmask_fd)
        lines.unmask_fd = fd
        if fd is not None:
            self._sel.register(fd, selectors.EVENT_READ, ("intx-unmask", fd))

    def _intx_unmask_event(self, fd: int) -> None:
        try:
            os.read(fd, 8)
        except OSError:
            pass
        self.device.vfio_unmask(P.PciIrq.INTX, 0)

    def _check_access(self, region: int, offset: int, count: int) -> None:
        self._region_index(region)
        size = self.region_size(region)
        if size == 0:
            raise ProtocolViolation(errno.EINVAL, "region", f"region {region} is not implemented")
        if count == 0 or count > self.max_data_xfer_size:
            raise ProtocolViolation(errno.EINVAL, "count", f"count {count} (max {self.max_data_xfer_size})")
        if offset + count > size:
            raise ProtocolViolation(
                errno.EINVAL, "offset", f"{offset:#x}+{count} beyond region {region} of size {size:#x}"
            )

    def _region_read(self, region: int, offset: int, count: int) -> bytes:
        if region == P.PciRegion.CONFIG:
            data = self.device.config_read(offset, count)
        else:
            data = self.device.handle_bar_read(region, offset, count)
        return bytes(data[:count]).ljust(count, b"\0")

    def _region_write(self, region: int, offset: int, data: bytes) -> None:
        if region == P.PciRegion.CONFIG:
            self.device.handle_config_write(offset, data)
        else:
            self.device.handle_bar_write(region, offset, data)

    def _h_region_read(self, msg: Message) -> bytes:
        _no_fds(msg)
        _need(msg, P.REGION_ACCESS_FIXED_SIZE, "REGION_READ")
        r = P.RegionAccess.parse(msg.payload)
        self._check_access(r.region, r.offset, r.count)
        return msg.payload[: P.REGION_ACCESS_FIXED_SIZE] + self._region_read(r.region, r.offset, r.count)

    def _h_region_write(self, msg: Message) -> bytes:
        _no_fds(msg)
        _need(msg, P.REGION_ACCESS_FIXED_SIZE, "REGION_WRITE")
        r = P.RegionAccess.parse(msg.payload)
        data = msg.payload[P.REGION_ACCESS_FIXED_SIZE :]
        if len(data) != r.count:
            raise ProtocolViolation(errno.EINVAL, "count", f"count {r.count} but {len(data)} data bytes")
        self._check_access(r.region, r.offset, r.count)
        self._region_write(r.region, r.offset, data)
        return msg.payload[: P.REGION_ACCESS_FIXED_SIZE]

    def _h_region_write_multi(self, msg: Message) -> bytes:
        _no_fds(msg)
        _need(msg, P.WRITE_MULTI_FIXED_SIZE, "REGION_WRITE_MULTI")
        n = P.WriteMulti.parse(msg.payload).wr_cnt
        one = P.WriteOne.sizeof()
        if len(msg.payload) != P.WRITE_MULTI_FIXED_SIZE + n * one:
            raise ProtocolViolation(
                errno.EINVAL, "wr_cnt", f"{n} writes but {len(msg.payload)} payload bytes"
            )
        writes = [P.WriteOne.parse(msg.payload[P.WRITE_MULTI_FIXED_SIZE + i * one :][:one]) for i in range(n)]
        for i, w in enumerate(writes):
            if w.count > 8:
                raise ProtocolViolation(errno.EINVAL, f"wrs[{i}].count", f"{w.count} > 8")
            self._check_access(w.region, w.offset, w.count)
        for w in writes:
            self._region_write(w.region, w.offset, w.data[: w.count])
        return msg.payload[: P.WRITE_MULTI_FIXED_SIZE]

    def _h_reset(self, msg: Message) -> bytes:
        _no_fds(msg)
        self.device.handle_reset()
        return b""

    # ================================================================== DMA for the device
    def _find(self, gpa: int, n: int, write: bool) -> list[tuple[DmaRegion, int, int]]:
        """Split [gpa, gpa+n) over the DMA windows: (region, offset in region, length) pieces."""
        conn = self.conn
        if conn is None or conn.closed:
            raise DmaError(errno.ENODEV, "no client connected: guest memory is not mapped")
        if n < 0 or gpa < 0:
            raise DmaError(errno.EINVAL, f"bad DMA range {gpa:#x}+{n}")
        windows = list(conn.dma)  # a snapshot: the loop thread may map/unmap meanwhile
        pieces = []
        pos, left = gpa, n
        while left > 0:
            for r in windows:
                if r.address <= pos < r.end:
                    break
            else:
                raise DmaError(errno.EFAULT, f"guest address {pos:#x} is not DMA-mapped")
            need = P.VFIO_DMA_MAP_FLAG_WRITE if write else P.VFIO_DMA_MAP_FLAG_READ
            if not r.flags & need:
                raise DmaError(
                    errno.EPERM,
                    f"DMA window {r.address:#x}+{r.size:#x} is not {'writable' if write else 'readable'}",
                )
            take = min(left, r.end - pos)
            pieces.append((r, pos - r.address, take))
            pos += take
            left -= take
        return pieces

    def dma_read(self, gpa: int, n: int) -> bytes:
        """Read guest memory. mmap-backed windows are read directly from any thread; fd-less ones need
        the socket, so other threads hand the request to the loop thread and wait."""
        in_loop = self.in_loop_thread()
        pieces = self._find(gpa, n, write=False)
        if not in_loop and any(r.view is None for r, _, _ in pieces):
            return self._marshal(self.dma_read, gpa, n)
        out = bytearray()
        try:
            for r, off, take in pieces:
                view = r.view
                if view is not None:
                    out += view[off : off + take]
                else:
                    out += self._dma_via_client(P.Command.DMA_READ, r.address + off, take, None)
        except ValueError:  # the window was unmapped under a non-loop thread
            raise DmaError(errno.EFAULT, f"guest address {gpa:#x} was unmapped during the access") from None
        return bytes(out)

    def dma_write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest memory (same threading rules as dma_read)."""
        data = memoryview(data).cast("B")
        pieces = self._find(gpa, len(data), write=True)
        if not self.in_loop_thread() and any(r.view is None for r, _, _ in pieces):
            self._marshal(self.dma_write, gpa, bytes(data))
            return
        pos = 0
        try:
            for r, off, take in pieces:
                view = r.view
                if view is not None:
                    view[off : off + take] = data[pos : pos + take]
                else:
                    self._dma_via_client(
                        P.Command.DMA_WRITE, r.address + off, take, bytes(data[pos : pos + take])
                    )
                pos += take
        except ValueError:
            raise DmaError(errno.EFAULT, f"guest address {gpa:#x} was unmapped during the access") from None

    def dma_view(self, gpa: int, n: int, writable: bool = False) -> memoryview | None:
        try:
            pieces = self._find(gpa, n, write=writable)
        except DmaError:
            if self.conn is None:
                raise
            return None
        if len(pieces) != 1 or pieces[0][0].view is None:
            return None
        r, off, take = pieces[0]
        assert r.view is not None
        v = r.view[off : off + take]
        return v if writable else v.toreadonly()

    def _marshal(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a DMA call on the loop thread and wait for it (fd-less DMA needs the socket)."""
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, fn(*args)))
            except BaseException as e:  # noqa: BLE001 - handed back to the calling thread
                box.append((False, e))
            done.set()

        self.call_soon(run)
        if not done.wait(self.dma_timeout + self.io_timeout):
            raise DmaError(errno.ETIMEDOUT, "server loop did not run the DMA request")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _dma_via_client(self, command: int, address: int, count: int, data: bytes | None) -> bytes:
        """DMA_READ/DMA_WRITE over the socket; other client commands arriving meanwhile are queued."""
        conn = self.conn
        assert conn is not None
        out = bytearray()
        step = max(1, min(conn.client_max_xfer, self.max_data_xfer_size))
        for pos in range(0, count, step):
            take = min(step, count - pos)
            msg_id = next(conn.next_id) & 0xFFFF
            payload = P.DmaAccess.build(Container(address=address + pos, count=take))
            if data is not None:
                payload += data[pos : pos + take]
            self._send(conn, Message(msg_id, command, P.MSG_TYPE_COMMAND, 0, payload))
            reply = self._await_reply(conn, msg_id)
            if reply.is_error:
                raise DmaError(
                    reply.error or errno.EIO,
                    f"client refused {P.command_name(command)} {address + pos:#x}+{take}",
                )
            if data is None:
                got = reply.payload[P.DMA_ACCESS_FIXED_SIZE :]
                if len(got) != take:
                    raise DmaError(errno.EIO, f"DMA_READ reply carries {len(got)} bytes, wanted {take}")
                out += got
        return bytes(out)

    def _await_reply(self, conn: _Connection, msg_id: int) -> Message:
        deadline = time.monotonic() + self.dma_timeout
        while True:
            if conn.closed:
                raise DmaError(errno.ENOTCONN, "client disconnected during DMA")
            if time.monotonic() > deadline:
                raise DmaError(errno.ETIMEDOUT, f"client did not answer DMA request {msg_id}")
            try:
                msg = recv_message(conn.sock, self.max_msg_size)
            except TimeoutError:
                continue
            except ConnectionClosed as e:
                self._drop_connection(str(e))
                raise DmaError(errno.ENOTCONN, "client disconnected during DMA") from None
            except FramingError as e:
                log.warning("vfio-user %s: msg_size: %s", P.command_name(e.header.command), e.reason)
                self._send_error(conn, e.header.msg_id, e.header.command, e.errno)
                if e.fatal:
                    self._drop_connection("stream position lost after a bad message")
                continue
            if msg.is_reply:
                if msg.msg_id == msg_id:
                    msg.close_fds()
                    return msg
                log.warning(
                    "vfio-user %s: msg_id: unexpected reply %d ignored",
                    P.command_name(msg.command),
                    msg.msg_id,
                )
                msg.close_fds()
            else:
                conn.queued.append(msg)
